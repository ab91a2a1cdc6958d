"""The up-front sanity pass over a records table: find bad rows before training, then raise, warn or drop."""

from __future__ import annotations

import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Collection, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fer_lightning.data.records import REQUIRED_COLUMNS, VA_NONFACE_MARKER
from fer_lightning.taxonomy import CANONICAL

log = logging.getLogger(__name__)

POLICIES = ("error", "warn", "drop")
DECODE_MODES = ("header", "full", "none")
# Report order; also the names used in CheckReport.counts.
CHECKS = (
    "null_path",
    "null_split",
    "path_escapes_root",
    "duplicate",
    "null_expression",
    "unknown_label",
    "label_outside_taxonomy",
    "va_out_of_range",
    "va_nonface_marker",
    "va_missing",
    "landmarks",
    "missing_file",
    "empty_file",
    "undecodable",
)
LANDMARKS_SHAPE = (68, 2)
_FILE_CHUNK = 256
_POLICY_HINT = (
    "fix the data, or set data.checks=warn (log this report and keep the rows) "
    "or data.checks=drop (drop the rows); data.checks takes error|warn|drop"
)


class DataCheckError(ValueError):
    """The records failed the checks under policy 'error' (or have the wrong columns)."""

    def __init__(self, message: str, report: CheckReport | None = None):
        super().__init__(message)
        self.report = report


@dataclass(frozen=True)
class Issue:
    """One problem with one row; `row` is the row's index label in the table given to run_checks."""

    row: Hashable
    path: str
    check: str
    reason: str


@dataclass
class CheckReport:
    """What the checks found: the issues, their count per check, and rows in/out."""

    issues: list[Issue]
    counts: dict[str, int]
    n_rows_in: int
    n_rows_out: int
    # Counted but not problems under the settings used (e.g. the non-face VA marker when VA is not trained).
    notes: dict[str, int] = field(default_factory=dict)

    @property
    def offending_rows(self) -> list[Hashable]:
        """Distinct rows with at least one issue, in table order."""
        return list(dict.fromkeys(i.row for i in self.issues))

    def to_frame(self) -> pd.DataFrame:
        """One line per issue: row, path, check, reason."""
        return pd.DataFrame([vars(i) for i in self.issues], columns=["row", "path", "check", "reason"])

    def to_text(self, max_rows: int = 10) -> str:
        """A short human report: counts per check, the first `max_rows` issues and how many more there are."""
        if not self.issues:
            lines = [f"data checks: all {self.n_rows_in} rows passed"]
        else:
            per_check = ", ".join(f"{k}: {v}" for k, v in self.counts.items() if v)
            lines = [f"data checks: {len(self.offending_rows)} of {self.n_rows_in} rows have problems ({per_check})"]
            lines += [f"  row {i.row}: {i.path}: {i.check}: {i.reason}" for i in self.issues[:max_rows]]
            if len(self.issues) > max_rows:
                lines.append(f"  and {len(self.issues) - max_rows} more")
        if self.notes:
            lines.append(
                "notes (not problems with these settings): " + ", ".join(f"{k}: {v}" for k, v in self.notes.items())
            )
        if self.n_rows_out != self.n_rows_in:
            lines.append(f"rows kept: {self.n_rows_out} of {self.n_rows_in}")
        return "\n".join(lines)


def run_checks(
    records: pd.DataFrame,
    root: Path,
    *,
    classes: Sequence[int],
    policy: str = "error",
    decode: str = "header",
    va_required: bool = False,
    known_ids: Collection[int] | None = None,
    workers: int = 16,
) -> tuple[pd.DataFrame, CheckReport]:
    """Check every row; policy 'error' raises DataCheckError, 'warn' logs and keeps, 'drop' drops offending rows.

    `classes` are the trained class ids (empty when only valence/arousal is trained: label checks are skipped).
    Rows whose id is a taxonomy class (`known_ids`, default the canonical AffectNet ids) outside `classes` are
    not problems (the data module filters them) and are only counted in the notes. `decode`: 'header' opens
    each image and reads its header, 'full' decodes all pixels (catches truncated data), 'none' only looks at
    the file's existence and size. The returned table has a fresh 0..n-1 index; issues name the input's labels.
    """
    if policy not in POLICIES:
        raise ValueError(f"data.checks: {policy!r} is not one of {'|'.join(POLICIES)}")
    if decode not in DECODE_MODES:
        raise ValueError(f"data.checks_decode: {decode!r} is not one of {'|'.join(DECODE_MODES)}")
    _check_schema(records)
    t0 = time.perf_counter()
    root = Path(root).absolute()
    paths = records["path"]
    path_text = paths.astype(object).where(paths.notna(), None).to_numpy()
    found: list[tuple[int, str, str]] = []  # (position, check, reason)
    notes: dict[str, int] = {}

    for pos in np.flatnonzero(records["split"].isna().to_numpy()):
        # make_records turns a split name outside train/val/test into NaN: such a row would be in no split.
        found.append((pos, "null_split", "no split (the split name was not train, val or test)"))
    full_paths = _check_paths(path_text, root, records["split"].astype(object).to_numpy(), records.index, found)
    if len(classes):
        _check_labels(records, list(classes), known_ids, found, notes)
    _check_va(records, va_required, found, notes)
    _check_landmarks(records["landmarks"].to_numpy(), found)
    _check_files(full_paths, decode, workers, found)

    order = {name: k for k, name in enumerate(CHECKS)}
    found.sort(key=lambda f: (f[0], order[f[1]]))
    index = records.index
    issues = [
        Issue(index[pos], "" if path_text[pos] is None else str(path_text[pos]), check, reason)
        for pos, check, reason in found
    ]
    counts = Counter(check for _, check, _ in found)
    bad = np.zeros(len(records), dtype=bool)
    bad[[pos for pos, _, _ in found]] = True
    keep = policy != "drop" or not bad.any()
    report = CheckReport(
        issues=issues,
        counts={c: counts[c] for c in CHECKS if counts[c]},
        n_rows_in=len(records),
        n_rows_out=len(records) if keep else int((~bad).sum()),
        notes=notes,
    )
    log.info("data checks of %d rows took %.1f s", len(records), time.perf_counter() - t0)

    if not issues:
        log.info(report.to_text())
        return records.reset_index(drop=True), report
    if policy == "error":
        raise DataCheckError(f"{report.to_text(max_rows=10)}\n{_POLICY_HINT}", report)
    if policy == "warn":
        log.warning("%s\n(data.checks=warn: the rows are kept)", report.to_text())
        return records.reset_index(drop=True), report
    log.warning("%s\n(data.checks=drop: dropped %d rows)", report.to_text(), int(bad.sum()))
    return records.loc[~bad].reset_index(drop=True), report


def _check_schema(records: pd.DataFrame) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in records.columns]
    wrong = []
    if "expression" in records and not pd.api.types.is_integer_dtype(records["expression"]):
        wrong.append(f"expression is {records['expression'].dtype}, expected Int64")
    for col in ("valence", "arousal"):
        if col in records and not pd.api.types.is_float_dtype(records[col]):
            wrong.append(f"{col} is {records[col].dtype}, expected float32")
    if "landmarks" in records and records["landmarks"].dtype != object:
        wrong.append(f"landmarks is {records['landmarks'].dtype}, expected object (None or a 68x2 array)")
    if missing or wrong:
        problems = ([f"missing columns {missing}"] if missing else []) + wrong
        raise DataCheckError(
            f"the records table has the wrong schema: {'; '.join(problems)}; a format reader's "
            "output must go through fer_lightning.data.records.make_records"
        )


def _check_paths(
    paths: np.ndarray, root: Path, splits: np.ndarray, index: pd.Index, found: list
) -> list[tuple[int, str]]:
    """Null and escaping paths, duplicates per split; returns (position, absolute path) of the files to look at."""
    root_text = os.path.normpath(str(root))
    to_check = []
    first_seen: dict[tuple[object, str], int] = {}
    for pos, p in enumerate(paths):
        if p is None or str(p).strip() == "":
            found.append((pos, "null_path", "no image path"))
            continue
        full = os.path.normpath(os.path.join(root_text, str(p)))
        # Lexical, not resolved: a data root that is a symlink farm is legitimate, '..' out of it is not.
        if os.path.commonpath([root_text, full]) != root_text:
            found.append((pos, "path_escapes_root", f"resolves to {full}, outside the data root {root_text}"))
            continue
        key = (splits[pos], full)
        if key in first_seen:
            found.append((pos, "duplicate", f"same file as row {index[first_seen[key]]} in split {splits[pos]}"))
        else:
            first_seen[key] = pos
        to_check.append((pos, full))
    return to_check


def _check_labels(
    records: pd.DataFrame, classes: list[int], known_ids: Collection[int] | None, found: list, notes: dict
) -> None:
    expr = records["expression"]
    raw = records["label_raw"] if "label_raw" in records else pd.Series(pd.NA, index=records.index, dtype=object)
    na = expr.isna().to_numpy()
    raw_na = raw.isna().to_numpy()
    raw_text = raw.astype(object).to_numpy()
    for pos in np.flatnonzero(na & raw_na):
        found.append((pos, "null_expression", "no expression label"))
    for pos in np.flatnonzero(na & ~raw_na):
        found.append((pos, "unknown_label", f"label {raw_text[pos]!r} maps to no class"))
    known = set(CANONICAL if known_ids is None else known_ids) | set(classes)
    values = expr.to_numpy(dtype=np.float64, na_value=np.nan)
    outside = ~na & ~np.isin(values, sorted(known))
    for pos in np.flatnonzero(outside):
        found.append(
            (
                pos,
                "label_outside_taxonomy",
                f"class id {int(values[pos])} is not a known class (classes {classes}, known {sorted(known)})",
            )
        )
    n_other = int((~na & ~outside & ~np.isin(values, classes)).sum())
    if n_other:
        notes["label_not_in_classes"] = n_other


def _check_va(records: pd.DataFrame, va_required: bool, found: list, notes: dict) -> None:
    va = records[["valence", "arousal"]].to_numpy(dtype=np.float64)
    marker = (va == VA_NONFACE_MARKER).any(axis=1)
    finite = np.isfinite(va)
    out_of_range = (finite & (np.abs(va) > 1.0) & (va != VA_NONFACE_MARKER)).any(axis=1)
    for pos in np.flatnonzero(out_of_range):
        found.append((pos, "va_out_of_range", f"valence {va[pos, 0]:g}, arousal {va[pos, 1]:g}: outside [-1, 1]"))
    if va_required:
        for pos in np.flatnonzero(marker):
            found.append(
                (
                    pos,
                    "va_nonface_marker",
                    f"valence {va[pos, 0]:g}, arousal {va[pos, 1]:g}: the non-face marker, not a target",
                )
            )
        for pos in np.flatnonzero((~finite).any(axis=1)):
            found.append((pos, "va_missing", "valence/arousal missing while they are trained"))
    elif marker.any():
        notes["va_nonface_marker"] = int(marker.sum())


def _check_landmarks(landmarks: np.ndarray, found: list) -> None:
    for pos, lm in enumerate(landmarks):
        if lm is None:
            continue
        if not isinstance(lm, np.ndarray):
            found.append((pos, "landmarks", f"a {type(lm).__name__}, expected a {LANDMARKS_SHAPE} array or None"))
        elif lm.shape != LANDMARKS_SHAPE:
            found.append((pos, "landmarks", f"shape {lm.shape}, expected {LANDMARKS_SHAPE}"))
        elif not np.isfinite(lm).all():
            found.append((pos, "landmarks", "non-finite coordinates"))


def _check_files(to_check: list[tuple[int, str]], decode: str, workers: int, found: list) -> None:
    chunks = [to_check[i : i + _FILE_CHUNK] for i in range(0, len(to_check), _FILE_CHUNK)]
    t0 = time.perf_counter()
    done, next_report = 0, 0.1
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for chunk_found in pool.map(lambda c: [(pos, *r) for pos, f in c if (r := _file_issue(f, decode))], chunks):
            found.extend(chunk_found)
            done += _FILE_CHUNK
            if len(to_check) >= 20 * _FILE_CHUNK and done / len(to_check) >= next_report:
                log.info(
                    "checked %d/%d image files (%.0f s)",
                    min(done, len(to_check)),
                    len(to_check),
                    time.perf_counter() - t0,
                )
                next_report += 0.1


def _file_issue(path: str, decode: str) -> tuple[str, str] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing_file", "file not found"
    except OSError as err:
        return "missing_file", f"cannot stat the file ({err})"
    if not stat.S_ISREG(st.st_mode):
        return "missing_file", "not a regular file"
    if st.st_size == 0:
        return "empty_file", "the file has zero bytes"
    if decode == "none":
        return None
    try:
        with Image.open(path) as im:
            if decode == "full":
                im.load()
            else:
                im.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        return "undecodable", f"{type(err).__name__}: {err}"
    return None
