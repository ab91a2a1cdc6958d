"""Reader for Kaggle's `fer2013.csv` (emotion, pixels, Usage): pixels are written once as PNG files."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fer_lightning.taxonomy import Taxonomy, id_mapping

log = logging.getLogger(__name__)

# FER2013's own label ids; mapped onto canonical ids by name, never by position.
FER2013_CLASSES: dict[int, str] = {
    0: "angry",
    1: "disgust",
    2: "fear",
    3: "happy",
    4: "sad",
    5: "surprise",
    6: "neutral",
}
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "val", "PrivateTest": "test"}
SIDE = 48
N_PIXELS = SIDE * SIDE
CACHE_FOLDER = ".fer_lightning_cache"
# Rows parsed per block: bounds the memory of the byte-level validation (about 9 kB per row) and keeps it in cache.
_BLOCK_ROWS = 1024
_MANIFEST = "manifest.json"
_DIGIT = np.zeros(256, dtype=bool)
_DIGIT[ord("0") : ord("9") + 1] = True
_ALLOWED = _DIGIT.copy()
_ALLOWED[[ord(" "), ord("\t"), ord("\r"), ord("\n")]] = True


def read(
    root: Path, csv: str = "fer2013.csv", cache_dir: str | None = None, extra_classes: Sequence[str] = ()
) -> pd.DataFrame:
    """Read fer2013.csv; the 48x48 images are materialised once as PNGs in a cache keyed by the CSV's content.

    `csv` and a relative `cache_dir` are taken relative to root; the default cache is root/.fer_lightning_cache.
    """
    root = Path(root)
    csv_path = Path(csv) if Path(csv).is_absolute() else root / csv
    if not csv_path.is_file():
        raise _format_error(
            f"fer2013_csv: {csv_path} does not exist; expected <root>/fer2013.csv with columns emotion,pixels,Usage "
            "(or name the file with data.reader.csv)",
            missing=True,
        )
    digest = _content_hash(csv_path)
    parent = root / CACHE_FOLDER if cache_dir is None else Path(cache_dir)
    parent = parent if parent.is_absolute() else root / parent
    image_dir = parent / f"fer2013-{digest}"

    columns = ["emotion", "Usage"] if _cache_complete(image_dir) else ["emotion", "pixels", "Usage"]
    table = _read_table(csv_path, columns)
    split = _splits(table["Usage"], csv_path)
    if "pixels" in table:
        _materialise(table["pixels"], csv_path, image_dir)

    taxonomy = Taxonomy(extra_classes)
    fer_to_canonical = id_mapping(FER2013_CLASSES, taxonomy)
    raw = table["emotion"].str.strip()
    fer_ids = pd.to_numeric(raw, errors="coerce")
    expression = fer_ids.map(fer_to_canonical).astype("Int64")
    names = _image_names(len(table))
    # Paths stay relative to the root when the cache lies inside it (the schema's preference), absolute otherwise.
    try:
        base = image_dir.relative_to(root).as_posix()
    except ValueError:
        base = image_dir.as_posix()
    df = pd.DataFrame(
        {
            "path": [f"{base}/{name}" for name in names],
            "split": split,
            "expression": expression.array,
            "label_raw": raw.to_numpy(dtype=object),
            "source_row": np.arange(1, len(table) + 1),
        }
    )
    df.attrs["label_mapping"] = {str(k): taxonomy.name_of(v) for k, v in fer_to_canonical.items()}
    df.attrs["source_classes"] = dict(FER2013_CLASSES)
    return df


def _content_hash(path: Path) -> str:
    h = hashlib.sha1()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _read_table(csv_path: Path, columns: list[str]) -> pd.DataFrame:
    header = pd.read_csv(csv_path, nrows=0, encoding="utf-8-sig").columns.str.strip().tolist()
    missing = [c for c in ("emotion", "pixels", "Usage") if c not in header]
    if missing:
        raise _format_error(
            f"fer2013_csv: {csv_path} lacks the columns {missing} (found {header}); expected emotion,pixels,Usage"
        )
    table = pd.read_csv(
        csv_path,
        usecols=lambda c: c.strip() in columns,
        dtype=str,
        keep_default_na=False,
        encoding="utf-8-sig",
    )
    table.columns = [c.strip() for c in table.columns]
    return table


def _splits(usage: pd.Series, csv_path: Path) -> np.ndarray:
    split = usage.str.strip().map(USAGE_TO_SPLIT)
    bad = np.flatnonzero(split.isna().to_numpy())
    if len(bad):
        i = int(bad[0])
        raise _format_error(
            f"fer2013_csv: {csv_path} data row {i + 1} (line {i + 2}): Usage {usage.iloc[i]!r} is not one of "
            f"{list(USAGE_TO_SPLIT)} ({len(bad)} such rows)"
        )
    return split.to_numpy(dtype=object)


def _cache_complete(image_dir: Path) -> bool:
    # The folder appears only through an atomic rename after all files are written, so the manifest suffices.
    return (image_dir / _MANIFEST).is_file()


def _materialise(pixels: pd.Series, csv_path: Path, image_dir: Path) -> None:
    """Parse every pixel row (all rows are checked before anything is written) and write the PNG cache atomically."""
    start = time.perf_counter()
    images = np.empty((len(pixels), SIDE, SIDE), dtype=np.uint8)
    values = pixels.tolist()
    for first in range(0, len(values), _BLOCK_ROWS):
        block = values[first : first + _BLOCK_ROWS]
        images[first : first + len(block)] = _parse_block(block, first, csv_path)
    parsed = time.perf_counter()

    image_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{image_dir.name}-", dir=image_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared data set's cache from other users
    try:
        names = _image_names(len(images))
        with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
            # zlib releases the GIL, so threads overlap the PNG compression.
            list(pool.map(lambda i: Image.fromarray(images[i]).save(tmp / names[i]), range(len(images))))
        (tmp / _MANIFEST).write_text(json.dumps({"source": csv_path.name, "rows": len(images)}))
        try:
            os.rename(tmp, image_dir)
        except OSError:
            # Another process finished the same cache first; its files are identical.
            if not _cache_complete(image_dir):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info(
        "fer2013_csv: parsed %d rows in %.1f s, wrote PNGs to %s in %.1f s",
        len(images),
        parsed - start,
        image_dir,
        time.perf_counter() - parsed,
    )


def _parse_block(rows: list[str], first: int, csv_path: Path) -> np.ndarray:
    """Parse rows of space-separated ints into (n, 48, 48) uint8; any bad row raises, naming its CSV row."""
    joined = "\n".join(rows)
    try:
        text = joined.encode("ascii")
    except UnicodeEncodeError as err:
        line = joined[: err.start].count("\n")
        raise _bad_row(csv_path, first + line, "holds a non-ASCII character", rows[line]) from None
    if joined.count("\n") != len(rows) - 1:
        line = next(i for i, r in enumerate(rows) if "\n" in r)
        raise _bad_row(csv_path, first + line, "holds a line break", rows[line])
    # Padding lets every token look three bytes ahead without bounds checks.
    buf = np.frombuffer(text + b"   ", dtype=np.uint8)
    newlines = np.flatnonzero(buf == ord("\n"))
    if not _ALLOWED[buf].all():
        line = int(np.searchsorted(newlines, np.argmax(~_ALLOWED[buf])))
        raise _bad_row(csv_path, first + line, "holds a value that is not a non-negative integer", rows[line])
    is_digit = _DIGIT[buf]
    # A token is a maximal run of digits; count them per row between the line breaks.
    starts = np.flatnonzero(is_digit[1:] & ~is_digit[:-1]) + 1
    if is_digit[0]:
        starts = np.concatenate([[0], starts])
    bounds = np.searchsorted(starts, np.concatenate([[0], newlines, [len(buf)]]))
    counts = np.diff(bounds)
    wrong = np.flatnonzero(counts != N_PIXELS)
    if len(wrong):
        line = int(wrong[0])
        raise _bad_row(csv_path, first + line, f"has {counts[line]} values, expected {N_PIXELS} (48x48)", rows[line])
    # Decode up to three digits per token without masks; a fourth digit means the value is above 255.
    d0, d1, d2 = (buf[starts + k].astype(np.int32) - ord("0") for k in range(3))
    has1 = is_digit[starts + 1]
    has2 = has1 & is_digit[starts + 2]
    values = np.where(has2, d0 * 100 + d1 * 10 + d2, np.where(has1, d0 * 10 + d1, d0))
    too_big = (values > 255) | (has2 & is_digit[starts + 3])
    if too_big.any():
        line = int(np.searchsorted(newlines, starts[np.argmax(too_big)]))
        raise _bad_row(csv_path, first + line, "has a value above 255", rows[line])
    return values.astype(np.uint8).reshape(len(rows), SIDE, SIDE)


def _bad_row(csv_path: Path, index: int, problem: str, row: str) -> ValueError:
    return _format_error(
        f"fer2013_csv: {csv_path} data row {index + 1} (line {index + 2}, counting the header as line 1): pixels "
        f"{problem}: {row[:60]!r}...; every row needs 2304 space-separated integers 0-255"
    )


def _image_names(n: int) -> list[str]:
    return [f"{i:05d}.png" for i in range(n)]


def _format_error(message: str, missing: bool = False) -> ValueError:
    # Imported lazily: the registry imports the readers.
    from fer_lightning.formats.registry import DataFileNotFoundError, DataFormatError

    return DataFileNotFoundError(message) if missing else DataFormatError(message)
