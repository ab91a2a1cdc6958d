"""Reader for the original AffectNet release: two CSV file lists with a face box, 68 landmarks, expression and VA.

Layout::

    root/Manually_Annotated_file_lists/training.csv    -> split "train"
    root/Manually_Annotated_file_lists/validation.csv  -> split "test" (the framework's test set; "val" is
                                                          held out of train later)
    root/Manually_Annotated_Images/<subDirectory_filePath>

A CSV without its header row (some copies of validation.csv) is read with the expected column names.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fer_lightning.data.records import VA_NONFACE_MARKER
from fer_lightning.formats.registry import DataFileNotFoundError, DataFormatError
from fer_lightning.taxonomy import NON_EXPRESSION_IDS

log = logging.getLogger(__name__)

COLUMNS = (
    "subDirectory_filePath",
    "face_x",
    "face_y",
    "face_width",
    "face_height",
    "facial_landmarks",
    "expression",
    "valence",
    "arousal",
)
_BOX = {"face_x": "face_x", "face_y": "face_y", "face_width": "face_w", "face_height": "face_h"}
N_LANDMARKS = 68
# expression stays text: a label that is not a whole number is kept (label_raw) for the checks to report
_FAST_DTYPES = {
    "subDirectory_filePath": str,
    "facial_landmarks": str,
    "expression": str,
    **{c: np.float64 for c in ("face_x", "face_y", "face_width", "face_height", "valence", "arousal")},
}


def read(
    root: Path,
    *,
    drop_non_expression: bool = True,
    official_val_split: str = "test",
    landmarks: bool = True,
    lists_dir: str = "Manually_Annotated_file_lists",
    images_dir: str = "Manually_Annotated_Images",
) -> pd.DataFrame:
    """Read training.csv and validation.csv into a records-shaped DataFrame (paths relative to root).

    `landmarks=False` skips parsing the landmark strings (the slow part) and leaves the column empty.
    """
    if official_val_split not in ("val", "test"):
        raise DataFormatError(f"official_val_split: {official_val_split!r} is not 'val' or 'test'")
    root = Path(root)
    if not root.is_dir():
        raise DataFileNotFoundError(
            f"data.root: {str(root)!r} does not exist; expected the AffectNet folder holding "
            f"{lists_dir}/ and {images_dir}/"
        )
    frames = []
    for name, split in (("training.csv", "train"), ("validation.csv", official_val_split)):
        csv_path = root / lists_dir / name
        if not csv_path.is_file():
            raise DataFileNotFoundError(
                f"{csv_path} not found; the affectnet format expects {lists_dir}/training.csv and "
                f"{lists_dir}/validation.csv under data.root (for the 8-labels .npy release use format affectnet_npy)"
            )
        frames.append(_read_csv(csv_path, split, images_dir, landmarks))
    df = pd.concat(frames, ignore_index=True)
    if drop_non_expression:
        df = drop_non_expression_rows(df, "affectnet")
    return df.reset_index(drop=True)


def _read_csv(csv_path: Path, split: str, images_dir: str, parse_landmarks: bool) -> pd.DataFrame:
    t0 = time.perf_counter()
    with open(csv_path, encoding="utf-8", newline="") as fh:
        first = fh.readline()
    has_header = COLUMNS[0] in first
    if has_header:
        header = [c.strip() for c in next(csv.reader([first]))]
        missing = [c for c in COLUMNS if c not in header]
        if missing:
            raise DataFormatError(
                f"{csv_path}: missing columns {missing}; expected the AffectNet columns {list(COLUMNS)}, found {header}"
            )
    elif len(next(csv.reader([first]), [])) != len(COLUMNS):
        raise DataFormatError(
            f"{csv_path}: no header row and {len(next(csv.reader([first]), []))} columns on line 1; "
            f"expected the {len(COLUMNS)} AffectNet columns {list(COLUMNS)}"
        )
    wanted = [c for c in COLUMNS if parse_landmarks or c != "facial_landmarks"]
    options = dict(
        header=0 if has_header else None,
        names=None if has_header else list(COLUMNS),
        usecols=wanted,
        keep_default_na=False,
        na_values=[""],
        skipinitialspace=True,
    )
    try:
        try:
            # Typed parsing in the C reader is about twice as fast as reading text and converting afterwards.
            raw = pd.read_csv(csv_path, dtype=_FAST_DTYPES, **options)
        except ValueError:
            # Text in a number column: read everything as text so that _numbers can name the lines.
            raw = pd.read_csv(csv_path, dtype=str, **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataFormatError(
            f"{csv_path}: not a readable AffectNet CSV ({err}); expected the columns {list(COLUMNS)}"
        ) from err
    first_line = 2 if has_header else 1

    out = pd.DataFrame({"path": images_dir + "/" + raw["subDirectory_filePath"].astype(str), "split": split})
    for src, dst in _BOX.items():
        out[dst] = _numbers(raw[src], csv_path, first_line).astype(np.float32)
    out["expression"] = _numbers(raw["expression"], csv_path, first_line, strict=False).astype("Int64")
    out["label_raw"] = raw["expression"].astype("string")
    out["valence"] = _numbers(raw["valence"], csv_path, first_line).astype(np.float32)
    out["arousal"] = _numbers(raw["arousal"], csv_path, first_line).astype(np.float32)
    if parse_landmarks:
        out["landmarks"] = _parse_landmarks(raw["facial_landmarks"], csv_path, first_line)
    log.info("%s: %d rows read in %.1f s", csv_path.name, len(out), time.perf_counter() - t0)
    return out


def _numbers(col: pd.Series, csv_path: Path, first_line: int, strict: bool = True) -> pd.Series:
    """Parse a numeric column; text that is not a number is an error (strict) or NA for the checks to report."""
    values = pd.to_numeric(col, errors="coerce")
    if not strict:
        # Expression ids must be whole numbers; 1.5 is as unknown as "abc".
        whole = values.isna() | (values == np.floor(values))
        return values.where(whole)
    bad = values.isna() & col.notna()
    if bad.any():
        lines = (np.flatnonzero(bad.to_numpy()) + first_line)[:5].tolist()
        raise DataFormatError(
            f"{csv_path}: column {col.name!r} holds text that is not a number on lines {lines} "
            f"(e.g. {col[bad].iloc[0]!r}); fix or remove those rows"
        )
    return values


def _parse_landmarks(col: pd.Series, csv_path: Path, first_line: int) -> pd.Series:
    """'x1;y1;...;x68;y68' strings -> float32 (68, 2) arrays, None where empty; one C-parser pass for all rows."""
    out = pd.Series([None] * len(col), index=col.index, dtype=object)
    idx = np.flatnonzero(col.notna().to_numpy())  # empty fields are already NA (na_values=[""])
    if len(idx) == 0:
        return out
    strings = col.to_numpy()[idx]
    arrays = _parse_all(strings)
    if arrays is None:  # text, quoted newlines, ...: row by row, which names the offending line
        arrays = [_parse_one(s, csv_path, first_line + i) for i, s in zip(idx, strings)]
    else:
        for j, arr in enumerate(arrays):
            if arr is None:  # a row with a wrong count or an empty value
                arrays[j] = _parse_one(strings[j], csv_path, first_line + idx[j])
    out.iloc[idx] = pd.Series(arrays, index=out.index[idx], dtype=object)
    return out


def _parse_all(strings: np.ndarray) -> list[np.ndarray | None] | None:
    """Fast path: (68, 2) views of one parsed array for rows with exactly 136 numbers, None for the other rows."""
    n_seps = np.fromiter((s.count(";") for s in strings), dtype=np.int64, count=len(strings))
    good = np.flatnonzero(n_seps == 2 * N_LANDMARKS - 1)
    arrays: list[np.ndarray | None] = [None] * len(strings)
    if len(good) == 0:
        return arrays
    blob = "\n".join(strings[good]).encode()
    try:
        # Every line has exactly 136 fields (counted above), so the wide parse cannot shift or truncate a row.
        grid = pd.read_csv(
            io.BytesIO(blob),
            sep=";",
            header=None,
            names=list(range(2 * N_LANDMARKS)),
            index_col=False,
            dtype=np.float32,
            engine="c",
        ).to_numpy()
    except (ValueError, pd.errors.ParserError):
        return None
    if grid.shape[0] != len(good):  # a quoted newline inside a value
        return None
    grid = grid.reshape(-1, N_LANDMARKS, 2)
    finite = np.isfinite(grid).all(axis=(1, 2))
    for j, arr, ok in zip(good, grid, finite):
        if ok:
            arrays[j] = arr
    return arrays


def _parse_one(s: str, csv_path: Path, line: int) -> np.ndarray | None:
    s = s.strip().strip(";")
    if not s:
        return None
    try:
        flat = np.array([float(v) for v in s.split(";")], dtype=np.float32)
    except ValueError as err:
        raise DataFormatError(
            f"{csv_path} line {line}: facial_landmarks is not a ';'-separated list of numbers ({str(s)[:60]!r}...)"
        ) from err
    # Kept as read when the count is wrong, so that the checks report the shape.
    return flat.reshape(-1, 2) if flat.size % 2 == 0 else flat


def drop_non_expression_rows(df: pd.DataFrame, reader: str) -> pd.DataFrame:
    """Drop AffectNet's ids 8/9/10 and rows with the non-face valence/arousal marker, logging the counts."""
    non_expr = df["expression"].isin(sorted(NON_EXPRESSION_IDS)).fillna(False).to_numpy(bool)
    non_face_va = ((df["valence"] == VA_NONFACE_MARKER) | (df["arousal"] == VA_NONFACE_MARKER)).to_numpy(bool)
    drop = non_expr | non_face_va
    if drop.any():
        by_label = df.loc[non_expr].groupby(["split", "expression"], observed=True).size()
        log.info(
            "%s: dropped %d rows (drop_non_expression=True; set it to false to keep them): "
            "ids 8/9/10 per (split, id): %s; %d more rows with the non-face valence/arousal marker %.0f",
            reader,
            int(drop.sum()),
            by_label.to_dict(),
            int((non_face_va & ~non_expr).sum()),
            VA_NONFACE_MARKER,
        )
    return df.loc[~drop]
