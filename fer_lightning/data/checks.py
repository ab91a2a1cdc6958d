"""The up-front sanity pass over a records table: find bad rows before training, then raise, warn or drop."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
import time
from collections import Counter, defaultdict
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
    "conflicting_label",
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
# byte-identical files: only files of a size another file has are hashed, first their first HASH_PREFIX_BYTES
# (what a header read touches anyway), in full only when those agree too; none above HASH_MAX_BYTES
HASH_PREFIX_BYTES = 16 * 1024
HASH_MAX_BYTES = 32 * 1024 * 1024
_POLICY_HINT = (
    "fix the data, or set data.checks=warn (log this report and keep the rows) "
    "or data.checks=drop (drop the rows); data.checks takes error|warn|drop"
)
_CONFLICT_HINT = (
    "conflicting_label: one file (and face box) listed with different labels; fix the labels, or data.checks=warn "
    "keeps the rows with the label of the file's first row, data.checks=drop drops every row of such a file"
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


@dataclass(frozen=True)
class IdenticalFiles:
    """Two files with the same bytes under different names: `first` is the one of the earlier row."""

    first: str
    first_label: str
    other: str
    other_label: str
    same_label: bool


@dataclass
class CheckReport:
    """What the checks found: the issues, their count per check, and rows in/out."""

    issues: list[Issue]
    counts: dict[str, int]
    n_rows_in: int
    n_rows_out: int
    # Counted but not problems under the settings used (e.g. the non-face VA marker when VA is not trained).
    notes: dict[str, int] = field(default_factory=dict)
    # exact duplicate rows (same file, face box, label and split as an earlier row), removed whatever the
    # policy: (row, the earlier row that was kept, path)
    collapsed: list[tuple[Hashable, Hashable, str]] = field(default_factory=list)
    # byte-identical files under different names (hashed when the checks read files: checks_decode != none)
    identical_files: list[IdenticalFiles] = field(default_factory=list)

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
        lines += self._duplicate_lines(max_rows)
        if self.n_rows_out != self.n_rows_in:
            lines.append(f"rows kept: {self.n_rows_out} of {self.n_rows_in}")
        return "\n".join(lines)

    def _duplicate_lines(self, max_rows: int) -> list[str]:
        lines = []
        if self.collapsed:
            lines.append(
                f"collapsed {len(self.collapsed)} exact duplicate rows (same file, face box, label and split as "
                "an earlier row; the earlier row is kept, whatever data.checks says):"
            )
            lines += [f"  row {row}: {path}: same as row {kept}" for row, kept, path in self.collapsed[:max_rows]]
            if len(self.collapsed) > max_rows:
                lines.append(f"  and {len(self.collapsed) - max_rows} more")
        if self.identical_files:
            pairs = sorted(self.identical_files, key=lambda p: p.same_label)  # different labels first, stable
            n_diff = sum(not p.same_label for p in pairs)
            lines.append(
                f"byte-identical files under different names: {len(pairs)} pairs, {n_diff} with different labels "
                "(a note, not an error: check those labels; copies across splits are data.leakage's report):"
            )
            lines += [
                f"  {p.first} ({p.first_label}) = {p.other} ({p.other_label})"
                + ("" if p.same_label else ": different labels")
                for p in pairs[:max_rows]
            ]
            if len(pairs) > max_rows:
                lines.append(f"  and {len(pairs) - max_rows} more")
        return lines


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

    Duplicates: a row repeating an earlier row's file (and face box), label and split is collapsed into it
    whatever the policy (report.collapsed); one file with different labels (in any splits) is `conflicting_label`
    on each of its rows: 'error' raises, 'warn' keeps the rows with the label of the file's first row, 'drop'
    drops them all. With `decode` other than 'none', files of equal size are hashed and byte-identical files
    under different names are listed in report.identical_files (a note, never an issue).
    """
    if policy not in POLICIES:
        raise ValueError(f"data.checks: {policy!r} is not one of {'|'.join(POLICIES)}")
    if decode not in DECODE_MODES:
        raise ValueError(f"data.checks_decode: {decode!r} is not one of {'|'.join(DECODE_MODES)}")
    _check_schema(records)
    t0 = time.perf_counter()
    root_text = os.path.normpath(str(Path(root).absolute()))
    n_rows_in = len(records)
    # exact duplicates go first, whatever the policy: they are not problems, only repeats
    samples, labels = _sample_keys(records, root_text), _label_keys(records)
    kept, collapsed = _collapse_exact_duplicates(records, samples, labels)
    records, samples, labels = records.iloc[kept], [samples[i] for i in kept], [labels[i] for i in kept]
    paths = records["path"]
    path_text = paths.astype(object).where(paths.notna(), None).to_numpy()
    found: list[tuple[int, str, str]] = []  # (position, check, reason)
    notes: dict[str, int] = {}

    for pos in np.flatnonzero(records["split"].isna().to_numpy()):
        # make_records turns a split name outside train/val/test into NaN: such a row would be in no split.
        found.append((pos, "null_split", "no split (the split name was not train, val or test)"))
    full_paths = _check_paths(path_text, root_text, found)
    other_label = _check_conflicts(records, samples, labels, found)
    if len(classes):
        _check_labels(records, list(classes), known_ids, found, notes)
    _check_va(records, va_required, found, notes)
    _check_landmarks(records["landmarks"].to_numpy(), found)
    sizes = _check_files(full_paths, decode, workers, found)
    identical = _identical_files(records, labels, full_paths, sizes, workers) if decode != "none" else []

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
    # warn keeps every row except those whose file's first row has another label; drop drops every offending row
    gone = bad if policy == "drop" else other_label if policy == "warn" else np.zeros(len(records), dtype=bool)
    report = CheckReport(
        issues=issues,
        counts={c: counts[c] for c in CHECKS if counts[c]},
        n_rows_in=n_rows_in,
        n_rows_out=int((~gone).sum()),
        notes=notes,
        collapsed=collapsed,
        identical_files=identical,
    )
    log.info("data checks of %d rows took %.1f s", n_rows_in, time.perf_counter() - t0)

    hint = f"{_POLICY_HINT}\n{_CONFLICT_HINT}" if counts["conflicting_label"] else _POLICY_HINT
    if counts["unknown_label"]:
        hint = _unknown_label_hint(records, found, hint if len(counts) > 1 else None)
    if not issues:
        log.log(logging.WARNING if collapsed or identical else logging.INFO, report.to_text())
    elif policy == "error":
        raise DataCheckError(f"{report.to_text(max_rows=10)}\n{hint}", report)
    elif policy == "warn":
        extra = f", except {int(gone.sum())} rows with another label than their file's first row" if gone.any() else ""
        log.warning("%s\n(data.checks=warn: the rows are kept%s)", report.to_text(), extra)
    else:
        conflicts = len({pos for pos, check, _ in found if check == "conflicting_label"})
        extra = f", {conflicts} of them rows of files with conflicting labels" if conflicts else ""
        log.warning("%s\n(data.checks=drop: dropped %d rows%s)", report.to_text(), int(bad.sum()), extra)
    return records.iloc[np.flatnonzero(~gone)].reset_index(drop=True), report


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


def _is_missing(value: object) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))


def _sample_keys(records: pd.DataFrame, root_text: str) -> list[tuple | None]:
    """(normalised absolute file, face box) per row, None without a path; img/./a.jpg is img/a.jpg. Two faces
    boxed in one image are two samples."""
    boxes = records[["face_x", "face_y", "face_w", "face_h"]].to_numpy(dtype=np.float64)
    keys: list[tuple | None] = []
    for p, box in zip(records["path"].astype(object).to_numpy(), boxes):
        if _is_missing(p) or str(p).strip() == "":
            keys.append(None)
        else:
            full = os.path.normpath(os.path.join(root_text, str(p)))
            keys.append((full, *(None if np.isnan(b) else float(b) for b in box)))
    return keys


def _label_keys(records: pd.DataFrame) -> list[tuple]:
    """What a row teaches: its class (its raw label when it has none) and its valence/arousal."""
    expr = records["expression"].astype(object).to_numpy()
    raw = records["label_raw"].astype(object).to_numpy() if "label_raw" in records else [None] * len(expr)
    va = records[["valence", "arousal"]].to_numpy(dtype=np.float64)
    return [
        (
            None if _is_missing(e) else int(e),
            None if not _is_missing(e) or _is_missing(r) else str(r),
            *(None if np.isnan(x) else float(x) for x in v),
        )
        for e, r, v in zip(expr, raw, va)
    ]


def _label_text(records: pd.DataFrame, pos: int) -> str:
    row = records.iloc[pos]
    raw = row.get("label_raw")
    raw = None if _is_missing(raw) else str(raw)
    if _is_missing(row["expression"]):
        text = "no class" + (f" (label {raw!r})" if raw is not None else "")
    else:
        cid = int(row["expression"])
        name = CANONICAL.get(cid)
        shown_raw = f", label {raw!r}" if raw is not None and raw != name else ""
        text = f"{name} (class {cid}{shown_raw})" if name else f"class {cid}" + (f" (label {raw!r})" if raw else "")
    if np.isfinite(row["valence"]) or np.isfinite(row["arousal"]):
        text += f", valence {row['valence']:g}, arousal {row['arousal']:g}"
    return text


def _collapse_exact_duplicates(
    records: pd.DataFrame, samples: list[tuple | None], labels: list[tuple]
) -> tuple[np.ndarray, list[tuple[Hashable, Hashable, str]]]:
    """Positions of the rows to keep: not repeating an earlier row's file, face box, label and split; and the
    (row, earlier row, path) of each repeat."""
    splits = records["split"].astype(object).to_numpy()
    first: dict[tuple, int] = {}
    keep = np.ones(len(records), dtype=bool)
    collapsed = []
    for pos, (sample, label) in enumerate(zip(samples, labels)):
        if sample is None:
            continue
        key = (None if _is_missing(splits[pos]) else splits[pos], sample, label)
        if key in first:
            keep[pos] = False
            collapsed.append((records.index[pos], records.index[first[key]], str(records["path"].iloc[pos])))
        else:
            first[key] = pos
    return np.flatnonzero(keep), collapsed


def _check_conflicts(
    records: pd.DataFrame, samples: list[tuple | None], labels: list[tuple], found: list
) -> np.ndarray:
    """One file (and face box) with different labels, in any splits: an issue on each of its rows.

    Returns the rows whose label differs from the label of their file's first row (what data.checks=warn drops).
    """
    rows_of: dict[tuple, list[int]] = defaultdict(list)
    for pos, sample in enumerate(samples):
        if sample is not None:
            rows_of[sample].append(pos)
    splits = records["split"].astype(object).to_numpy()
    other = np.zeros(len(records), dtype=bool)
    for rows in rows_of.values():
        if len(rows) < 2 or len({labels[p] for p in rows}) < 2:
            continue
        shown = "; ".join(f"row {records.index[p]} ({splits[p]}): {_label_text(records, p)}" for p in rows[:4])
        more = f"; and {len(rows) - 4} more rows" if len(rows) > 4 else ""
        reason = f"{len(rows)} rows of this file have different labels: {shown}{more}"
        for p in rows:
            found.append((p, "conflicting_label", reason))
            other[p] = labels[p] != labels[rows[0]]
    return other


def _check_paths(paths: np.ndarray, root_text: str, found: list) -> list[tuple[int, str]]:
    """Null and escaping paths; returns (position, absolute path) of the files to look at."""
    to_check = []
    for pos, p in enumerate(paths):
        if p is None or str(p).strip() == "":
            found.append((pos, "null_path", "no image path"))
            continue
        full = os.path.normpath(os.path.join(root_text, str(p)))
        # Lexical, not resolved: a data root that is a symlink farm is legitimate, '..' out of it is not.
        if os.path.commonpath([root_text, full]) != root_text:
            found.append((pos, "path_escapes_root", f"resolves to {full}, outside the data root {root_text}"))
            continue
        to_check.append((pos, full))
    return to_check


def _unknown_label_hint(records: pd.DataFrame, found: list, other_hint: str | None) -> str:
    """Unknown labels are classes to keep (or spellings to fix), never rows to drop: name the keys that keep them."""
    raw = records["label_raw"].astype(object).to_numpy() if "label_raw" in records else None
    names = sorted({str(raw[pos]) for pos, check, _ in found if check == "unknown_label"}) if raw is not None else []
    shown = ",".join(names[:10]) + (",..." if len(names) > 10 else "")
    text = (
        f"unknown_label: the labels [{shown}] are no class of the taxonomy. To train on them as data-set classes: "
        "image folders take every class folder with data.classes=auto; otherwise declare them with "
        f"data.extra_classes=[{shown}] and list them in data.classes=[...]. A misspelt canonical class is fixed in "
        "the data (or as an alias in fer_lightning/taxonomy.py ALIASES)."
    )
    return f"{text}\nfor the other problems: {other_hint}" if other_hint else text


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


def _check_files(to_check: list[tuple[int, str]], decode: str, workers: int, found: list) -> dict[str, int]:
    """File issues into `found`; returns the size of every regular, non-empty file."""
    chunks = [to_check[i : i + _FILE_CHUNK] for i in range(0, len(to_check), _FILE_CHUNK)]
    t0 = time.perf_counter()
    done, next_report = 0, 0.1
    sizes: dict[str, int] = {}

    def check_chunk(chunk: list[tuple[int, str]]) -> list[tuple[int, str, tuple[str, str] | None, int | None]]:
        return [(pos, f, *_file_issue(f, decode)) for pos, f in chunk]

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for chunk_result in pool.map(check_chunk, chunks):
            for pos, full, issue, size in chunk_result:
                if issue is not None:
                    found.append((pos, *issue))
                if size is not None:
                    sizes[full] = size
            done += _FILE_CHUNK
            if len(to_check) >= 20 * _FILE_CHUNK and done / len(to_check) >= next_report:
                log.info(
                    "checked %d/%d image files (%.0f s)",
                    min(done, len(to_check)),
                    len(to_check),
                    time.perf_counter() - t0,
                )
                next_report += 0.1
    return sizes


def _identical_files(
    records: pd.DataFrame, labels: list[tuple], to_check: list[tuple[int, str]], sizes: dict[str, int], workers: int
) -> list[IdenticalFiles]:
    """Byte-identical files under different names, in table order; only files that share a size are read."""
    first_pos: dict[str, int] = {}
    for pos, full in to_check:
        first_pos.setdefault(full, pos)
    by_size: dict[int, list[str]] = defaultdict(list)
    for full, size in sizes.items():
        if size <= HASH_MAX_BYTES:
            by_size[size].append(full)
    candidates = [f for files in by_size.values() if len(files) > 1 for f in files]
    if not candidates:
        return []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        prefix = dict(zip(candidates, pool.map(lambda f: _digest(f, HASH_PREFIX_BYTES), candidates)))
        by_prefix: dict[tuple[int, bytes], list[str]] = defaultdict(list)
        for full, digest in prefix.items():
            if digest is not None:
                by_prefix[(sizes[full], digest)].append(full)
        # files longer than the prefix whose size and prefix agree with another's: the whole file decides
        longer = [f for files in by_prefix.values() if len(files) > 1 for f in files if sizes[f] > HASH_PREFIX_BYTES]
        whole = dict(zip(longer, pool.map(_digest, longer)))
    same: dict[tuple[int, bytes, bytes | None], list[int]] = defaultdict(list)
    for (size, digest), files in by_prefix.items():
        for full in files if len(files) > 1 else ():
            rest = whole.get(full) if size > HASH_PREFIX_BYTES else b""
            if rest is not None:
                same[(size, digest, rest)].append(first_pos[full])
    path_text = records["path"].astype(str).to_numpy()
    pairs = []
    for positions in same.values():
        first, *others = sorted(positions)
        pairs += [(first, b) for b in others]
    return [
        IdenticalFiles(
            path_text[a], _label_text(records, a), path_text[b], _label_text(records, b), labels[a] == labels[b]
        )
        for a, b in sorted(pairs)
    ]


def _digest(path: str, limit: int | None = None) -> bytes | None:
    """Hash of the file's bytes (its first `limit` bytes when given); None when it cannot be read."""
    h = hashlib.blake2b(digest_size=16)
    left = math.inf if limit is None else limit
    try:
        with open(path, "rb") as f:
            while left > 0 and (chunk := f.read(int(min(1 << 20, left)))):
                h.update(chunk)
                left -= len(chunk)
    except OSError:
        return None
    return h.digest()


def _file_issue(path: str, decode: str) -> tuple[tuple[str, str] | None, int | None]:
    """(check, reason) or None, and the file's size when it is a regular, non-empty file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return ("missing_file", "file not found"), None
    except OSError as err:
        return ("missing_file", f"cannot stat the file ({err})"), None
    if not stat.S_ISREG(st.st_mode):
        return ("missing_file", "not a regular file"), None
    if st.st_size == 0:
        return ("empty_file", "the file has zero bytes"), None
    if decode == "none":
        return None, st.st_size
    try:
        with Image.open(path) as im:
            if decode == "full":
                im.load()
            else:
                im.verify()
    except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, struct.error, ...
        return ("undecodable", f"{type(err).__name__}: {err}"), st.st_size
    return None, st.st_size
