"""Reader for AffectNet's "8 labels" release: one image plus four small .npy annotation files per sample.

Layout::

    root/train_set/images/{N}.jpg
    root/train_set/annotations/{N}_exp.npy  {N}_val.npy  {N}_aro.npy  {N}_lnd.npy
    root/val_set/...   (same)

The official validation set is the framework's *test* set (model selection uses a part held out of train),
so ``val_set`` maps to split "test" unless ``official_val_split`` says otherwise.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from fer_lightning.formats.affectnet import drop_non_expression_rows
from fer_lightning.formats.registry import DataFileNotFoundError, DataFormatError

log = logging.getLogger(__name__)

SET_DIRS = ("train_set", "val_set")
_CHUNK = 256

# Parsed .npy headers by their raw bytes: the hundreds of thousands of files share a handful of headers,
# and np.load's per-file header parsing costs several times the actual read.
_HEADER_CACHE: dict[bytes, tuple[tuple[int, ...], bool, np.dtype]] = {}


def read(
    root: Path,
    *,
    drop_non_expression: bool = True,
    official_val_split: str = "test",
    workers: int = 16,
) -> pd.DataFrame:
    """Read root/train_set and root/val_set into a records-shaped DataFrame (paths relative to root)."""
    if official_val_split not in ("val", "test"):
        raise DataFormatError(f"official_val_split: {official_val_split!r} is not 'val' or 'test'")
    root = Path(root)
    if not root.is_dir():
        raise DataFileNotFoundError(
            f"data.root: {str(root)!r} does not exist; expected a folder holding "
            f"{' and '.join(SET_DIRS)} (AffectNet 8-labels layout)"
        )
    split_of = {"train_set": "train", "val_set": official_val_split}
    present = [d for d in SET_DIRS if (root / d).is_dir()]
    if not present:
        raise DataFileNotFoundError(
            f"{root}: neither {SET_DIRS[0]}/ nor {SET_DIRS[1]}/ found; the affectnet_npy format expects "
            "root/train_set/{images,annotations}/ and root/val_set/{images,annotations}/"
        )
    for missing in sorted(set(SET_DIRS) - set(present)):
        log.warning("%s: %s/ is missing; reading only %s", root, missing, ", ".join(present))
    frames = [_read_set(root, d, split_of[d], workers) for d in present]
    df = pd.concat(frames, ignore_index=True)
    if drop_non_expression:
        df = drop_non_expression_rows(df, "affectnet_npy")
    return df.reset_index(drop=True)


def _read_set(root: Path, set_dir: str, split: str, workers: int) -> pd.DataFrame:
    ann_dir = root / set_dir / "annotations"
    img_dir = root / set_dir / "images"
    for folder in (ann_dir, img_dir):
        if not folder.is_dir():
            raise DataFileNotFoundError(
                f"{folder} is missing; the affectnet_npy format expects {set_dir}/images/ "
                f"and {set_dir}/annotations/ under {root}"
            )
    ids = _sample_ids(ann_dir)
    if not ids:
        log.warning("%s: no *_exp.npy files; %s contributes no rows", ann_dir, set_dir)
    images = {Path(e.name).stem: e.name for e in os.scandir(img_dir) if e.is_file()}
    unannotated = len(images.keys() - set(ids))
    if unannotated:
        log.warning("%s: %d images have no _exp.npy annotation and are not read", img_dir, unannotated)

    t0 = time.perf_counter()
    chunks = [ids[i : i + _CHUNK] for i in range(0, len(ids), _CHUNK)]
    rows: list[tuple] = []
    missing: Counter[str] = Counter()
    next_report = 0.1
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for chunk_rows, chunk_missing in pool.map(lambda c: _read_chunk(ann_dir, c), chunks):
            rows.extend(chunk_rows)
            missing.update(chunk_missing)
            if len(ids) >= 10 * _CHUNK and len(rows) / len(ids) >= next_report:
                log.info("%s: read %d/%d annotations (%.0f s)", ann_dir, len(rows), len(ids), time.perf_counter() - t0)
                next_report += 0.1
    for kind, n in sorted(missing.items()):
        log.warning(
            "%s: %d samples have no %s file; their %s is left empty (NaN/None)",
            ann_dir,
            n,
            f"_{kind}.npy",
            {"val": "valence", "aro": "arousal", "lnd": "landmarks"}[kind],
        )
    log.info("%s: %d samples read in %.1f s", set_dir, len(ids), time.perf_counter() - t0)

    label_raw, expression, valence, arousal, landmarks = zip(*rows) if rows else ((),) * 5
    rel_img = f"{set_dir}/images/"
    return pd.DataFrame(
        {
            "path": [rel_img + images.get(i, f"{i}.jpg") for i in ids],
            "split": split,
            "expression": pd.array(list(expression), dtype="Int64"),
            "valence": np.asarray(valence, dtype=np.float32),
            "arousal": np.asarray(arousal, dtype=np.float32),
            "landmarks": pd.Series(list(landmarks), dtype=object),
            "label_raw": pd.array(list(label_raw), dtype="string"),
        }
    )


def _sample_ids(ann_dir: Path) -> list[str]:
    ids = [e.name[: -len("_exp.npy")] for e in os.scandir(ann_dir) if e.name.endswith("_exp.npy")]
    # Numeric ids in numeric order so that row order does not depend on the file system.
    return sorted(ids, key=lambda s: (0, int(s), "") if s.isdigit() else (1, 0, s))


def _read_chunk(ann_dir: Path, ids: list[str]) -> tuple[list[tuple], Counter[str]]:
    rows = []
    missing: Counter[str] = Counter()
    for sample_id in ids:
        base = ann_dir / sample_id
        exp_file = Path(f"{base}_exp.npy")
        label_raw = str(_scalar(_load_npy(exp_file), exp_file)).strip()
        values = []
        for kind in ("val", "aro"):
            f = Path(f"{base}_{kind}.npy")
            try:
                values.append(_to_float(_scalar(_load_npy(f), f), f))
            except FileNotFoundError:
                missing[kind] += 1
                values.append(np.nan)
        lnd_file = Path(f"{base}_lnd.npy")
        try:
            lnd = _landmarks(_load_npy(lnd_file))
        except FileNotFoundError:
            missing["lnd"] += 1
            lnd = None
        rows.append((label_raw, _label_id(label_raw), values[0], values[1], lnd))
    return rows, missing


def _load_npy(path: Path) -> np.ndarray:
    """np.load for small files, with the header parse cached (see _HEADER_CACHE)."""
    with open(path, "rb") as fh:
        buf = fh.read()
    try:
        if buf[:6] != b"\x93NUMPY":
            raise ValueError("not a .npy file (bad magic bytes)")
        size_bytes = 2 if buf[6] == 1 else 4
        end = 8 + size_bytes + int.from_bytes(buf[8 : 8 + size_bytes], "little")
        spec = _HEADER_CACHE.get(buf[6:end])
        if spec is None:
            fp = io.BytesIO(buf)
            version = np.lib.format.read_magic(fp)
            spec = (
                np.lib.format.read_array_header_1_0(fp)
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0(fp)
            )
            if spec[2].hasobject:
                raise ValueError("object arrays (pickles) are not read")
            _HEADER_CACHE[buf[6:end]] = spec
        shape, fortran, dtype = spec
        return np.frombuffer(buf, dtype=dtype, offset=end).reshape(shape, order="F" if fortran else "C")
    except (ValueError, IndexError) as err:
        raise DataFormatError(f"{path}: cannot read as a numpy .npy array ({err})") from err


def _scalar(arr: np.ndarray, path: Path):
    if arr.size != 1:
        raise DataFormatError(f"{path}: expected a single value, found an array of shape {arr.shape}")
    return arr.reshape(()).item()


def _to_float(value, path: Path) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as err:
        raise DataFormatError(f"{path}: expected a number, found {value!r}") from err


def _label_id(label_raw: str) -> int | None:
    """AffectNet writes the id as text ('1'); anything that is not an integer is left for the checks to report."""
    try:
        return int(label_raw)
    except ValueError:
        try:
            f = float(label_raw)
        except ValueError:
            return None
        return int(f) if f.is_integer() else None


def _landmarks(arr: np.ndarray) -> np.ndarray:
    flat = np.asarray(arr, dtype=np.float32).reshape(-1)
    # A wrong count is kept as read so that the checks report it with its shape.
    return flat.reshape(-1, 2) if flat.size % 2 == 0 else flat
