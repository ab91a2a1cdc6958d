"""Preprocessed image cache: every record decoded once by `load_face` into one uint8 (N, C, H, W) memmap.

Layout under `cache_dir`:
    <fingerprint>/images.u8    raw uint8 array, row i = records row i, (C, size, size)
    <fingerprint>/meta.json    shape, parameters, build time; written last
    <fingerprint>.lock         fcntl lock: one builder at a time, the others wait and then open its result
    <fingerprint>.tmp-<pid>-<random>/   a build in progress, renamed to <fingerprint>/ only when complete

The fingerprint covers the ordered paths, face boxes, file sizes and mtimes and every decoding parameter, so
a changed table, a replaced image or a new setting gives a new cache directory instead of stale pixels.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import operator
import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from fer_lightning.data.images import DECODE_POLICY, ImageDecodeError, load_face, resolve_image_path, to_chw
from fer_lightning.data.records import BOX_COLUMNS

log = logging.getLogger(__name__)

# Bump when the decoding or the file layout changes in a way the parameters do not show.
CACHE_VERSION = 1
IMAGES_FILE = "images.u8"
META_FILE = "meta.json"


def cache_fingerprint(records: pd.DataFrame, root: Path, params: Mapping[str, Any]) -> str:
    """sha256 over the ordered paths, face boxes, file sizes + mtimes, the data root and `params`."""
    paths = records["path"].astype(str).tolist()
    h = hashlib.sha256()
    h.update(f"fer_lightning image cache v{CACHE_VERSION}\n".encode())
    h.update(json.dumps(dict(params), sort_keys=True, default=str).encode())
    h.update(str(Path(root).resolve()).encode())
    h.update(len(paths).to_bytes(8, "little"))
    h.update("\0".join(paths).encode("utf-8", "surrogateescape"))
    h.update(_boxes(records).tobytes())
    h.update(_file_stats(paths, Path(root)).tobytes())
    return h.hexdigest()


def cache_disk_usage(cache_dir: str | Path) -> int:
    """Bytes held by all files under `cache_dir` (0 when it does not exist)."""
    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return 0
    return sum(p.stat().st_size for p in cache_dir.rglob("*") if p.is_file())


class ImageCache:
    """Read-only view of a built cache; row i holds records row i as uint8 (C, size, size)."""

    def __init__(self, path: Path, shape: tuple[int, int, int, int], fingerprint: str, *, built: bool = False):
        self._path = Path(path)
        self._shape = shape
        self._fingerprint = fingerprint
        # True when this call built the cache, False when it opened one that already existed.
        self.built = built
        self._array: np.ndarray | None = None
        self._pid: int | None = None

    @classmethod
    def build_or_open(
        cls,
        records: pd.DataFrame,
        root: Path,
        cache_dir: Path,
        *,
        size: int,
        channels: int,
        num_workers: int = 0,
        draft: bool = True,
        progress: bool = True,
    ) -> ImageCache:
        """Open the cache for these records and parameters, building it first (once, under a lock) if needed."""
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}")
        if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
            raise ValueError(f"size must be a positive integer, got {size!r}")
        size = int(size)
        root, cache_dir = Path(root), Path(cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        params = {"size": size, "channels": channels, "draft": bool(draft), "layout": "NCHW-uint8", **DECODE_POLICY}
        fingerprint = cache_fingerprint(records, root, params)
        final = cache_dir / fingerprint
        shape = (len(records), channels, size, size)

        cache = cls._open_complete(final, fingerprint, shape)
        if cache is not None:
            return cache
        with _exclusive_lock(cache_dir / f"{fingerprint}.lock"):
            # Another process may have finished the build while we waited for the lock.
            cache = cls._open_complete(final, fingerprint, shape)
            if cache is not None:
                return cache
            _remove_leftovers(cache_dir, fingerprint)
            _build(records, root, cache_dir, fingerprint, params, shape, num_workers=num_workers, progress=progress)
        log.info("image cache directory %s now holds %.1f MB", cache_dir, cache_disk_usage(cache_dir) / 2**20)
        return cls(final, shape, fingerprint, built=True)

    @classmethod
    def _open_complete(cls, final: Path, fingerprint: str, shape: tuple[int, int, int, int]) -> ImageCache | None:
        """The finished cache at `final`, or None when there is none or it does not match (then it is rebuilt)."""
        meta_path = final / META_FILE
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            images_bytes = (final / IMAGES_FILE).stat().st_size
        except (OSError, ValueError) as e:
            log.warning("image cache %s is unreadable (%s); rebuilding it", final, e)
            return None
        if meta.get("fingerprint") != fingerprint or tuple(meta.get("shape", ())) != shape:
            log.warning("image cache %s does not match its fingerprint or shape; rebuilding it", final)
            return None
        if images_bytes != int(np.prod(shape)):
            log.warning("image cache %s has %d bytes, expected %d; rebuilding it", final, images_bytes, np.prod(shape))
            return None
        log.info("using image cache %s (%d images, %.1f MB)", final, shape[0], images_bytes / 2**20)
        return cls(final, shape, fingerprint, built=False)

    @property
    def path(self) -> Path:
        """The cache directory (holds images.u8 and meta.json)."""
        return self._path

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self._shape

    @property
    def nbytes(self) -> int:
        return int(np.prod(self._shape))

    @property
    def meta(self) -> dict[str, Any]:
        """The cache's meta.json."""
        return json.loads((self._path / META_FILE).read_text())

    @property
    def array(self) -> np.ndarray:
        """The whole read-only (N, C, H, W) memmap, opened lazily once per process (safe after fork)."""
        if self._array is None or self._pid != os.getpid():
            if self._shape[0] == 0:
                self._array = np.empty(self._shape, dtype=np.uint8)
            else:
                self._array = np.memmap(self._path / IMAGES_FILE, dtype=np.uint8, mode="r", shape=self._shape)
            self._pid = os.getpid()
        return self._array

    def __len__(self) -> int:
        return self._shape[0]

    def __getitem__(self, i: int) -> np.ndarray:
        """Row i as a writable (C, H, W) uint8 copy."""
        return np.array(self.array[operator.index(i)])

    def __getstate__(self) -> dict[str, Any]:
        # Workers reopen the memmap themselves; the pixels never travel through pickle.
        state = self.__dict__.copy()
        state["_array"] = None
        state["_pid"] = None
        return state

    def __repr__(self) -> str:
        return f"ImageCache({str(self._path)!r}, shape={self._shape})"


def _boxes(records: pd.DataFrame) -> np.ndarray:
    cols = [
        records[c].to_numpy(dtype=np.float64, na_value=np.nan) if c in records else np.full(len(records), np.nan)
        for c in BOX_COLUMNS
    ]
    boxes = np.stack(cols, axis=1) if cols else np.empty((0, 4))
    # One NaN bit pattern, so equal tables always hash equal.
    return np.where(np.isnan(boxes), np.nan, boxes)


def _file_stats(paths: list[str], root: Path) -> np.ndarray:
    stats = np.empty((len(paths), 2), dtype=np.int64)
    for i, p in enumerate(paths):
        full = resolve_image_path(root, p)
        try:
            st = full.stat()
        except OSError as e:
            raise ImageDecodeError(full, f"cannot stat the file while fingerprinting the image cache ({e})") from e
        stats[i] = (st.st_size, st.st_mtime_ns)
    return stats


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    with open(lock_path, "a+b") as f:  # append mode creates the file without truncating another holder's
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish building the image cache (%s)", lock_path)
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(cache_dir: Path, fingerprint: str) -> None:
    """Remove temp dirs of builds that died and an invalid final dir; called with the lock held."""
    # Builds only run under the lock we hold, so every temp dir of this fingerprint belongs to a dead build.
    for stale in cache_dir.glob(f"{fingerprint}.tmp-*"):
        log.warning("removing leftover of an interrupted image cache build: %s", stale)
        shutil.rmtree(stale, ignore_errors=True)
    final = cache_dir / fingerprint
    if final.exists():
        shutil.rmtree(final)


def _build(
    records: pd.DataFrame,
    root: Path,
    cache_dir: Path,
    fingerprint: str,
    params: Mapping[str, Any],
    shape: tuple[int, int, int, int],
    *,
    num_workers: int,
    progress: bool,
) -> None:
    n, channels, size, _ = shape
    tmp = cache_dir / f"{fingerprint}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        start = time.perf_counter()
        jobs = [
            (i, str(resolve_image_path(root, p)), tuple(box), size, channels, bool(params["draft"]))
            for i, (p, box) in enumerate(zip(records["path"].astype(str), _boxes(records).tolist()))
        ]
        if n == 0:
            (tmp / IMAGES_FILE).touch()
        else:
            out = np.memmap(tmp / IMAGES_FILE, dtype=np.uint8, mode="w+", shape=shape)
            with tqdm(total=n, desc="caching images", unit="img", disable=not progress, leave=False) as bar:
                for i, chw in _decode_all(jobs, num_workers):
                    out[i] = chw
                    bar.update(1)
            out.flush()  # msync: the pixels are on disk before meta.json and the rename make them visible
            del out
        seconds = time.perf_counter() - start
        meta = {
            "cache_version": CACHE_VERSION,
            "fingerprint": fingerprint,
            "n": n,
            "shape": list(shape),
            "dtype": "uint8",
            "params": dict(params),
            "root": str(Path(root).resolve()),
            "bytes": int(np.prod(shape)),
            "build_seconds": seconds,
            "built_at": datetime.now(timezone.utc).isoformat(),
            "built_by": {"host": socket.gethostname(), "pid": os.getpid()},
        }
        with open(tmp / META_FILE, "w") as f:
            json.dump(meta, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, cache_dir / fingerprint)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rate = n / seconds if seconds > 0 else float("inf")
    log.info(
        "built image cache %s: %d images, %.1f MB in %.1f s (%.0f images/s)",
        cache_dir / fingerprint,
        n,
        meta["bytes"] / 2**20,
        seconds,
        rate,
    )


def _decode_all(jobs: list[tuple[Any, ...]], num_workers: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (row, CHW array) for every job, in a worker pool when num_workers > 0 (any order)."""
    if num_workers <= 0 or len(jobs) < 2:
        yield from map(_decode_job, jobs)
        return
    workers = min(num_workers, len(jobs))
    chunksize = max(1, min(64, len(jobs) // (workers * 8)))
    with multiprocessing.get_context().Pool(workers) as pool:
        yield from pool.imap_unordered(_decode_job, jobs, chunksize=chunksize)


def _decode_job(job: tuple[Any, ...]) -> tuple[int, np.ndarray]:
    i, path, box, size, channels, draft = job
    return i, to_chw(load_face(path, size=size, channels=channels, box=box, draft=draft))
