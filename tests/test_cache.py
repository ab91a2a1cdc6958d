"""ImageCache: content equals load_face, fingerprint hits and misses, atomic and concurrent builds, real processes."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import pickle
import signal
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_lightning.data.cache import IMAGES_FILE, META_FILE, ImageCache, cache_disk_usage, cache_fingerprint
from fer_lightning.data.images import ImageDecodeError, load_face, to_chw
from fer_lightning.data.records import make_records

NAN = float("nan")


def _write_dataset(root: Path, n: int = 12) -> pd.DataFrame:
    """n small images of several formats and sizes in a real folder tree; some with a face box."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        h, w = 48 + 8 * (i % 3), 64 - 4 * (i % 4)
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        sub = root / ("train" if i % 2 == 0 else "val")
        sub.mkdir(parents=True, exist_ok=True)
        if i % 3 == 0:
            rel = f"{sub.name}/img{i}.jpg"
            Image.fromarray(arr).save(root / rel, quality=90)
        elif i % 3 == 1:
            rel = f"{sub.name}/img{i}.png"
            Image.fromarray(arr[:, :, 0]).save(root / rel)
        else:
            rel = f"{sub.name}/img{i}.png"
            Image.fromarray(np.dstack([arr, np.full((h, w), 200, np.uint8)])).save(root / rel)
        box = (4.0, 6.0, 30.0, 28.0) if i % 2 else (NAN, NAN, NAN, NAN)
        rows.append(
            {"path": rel, "split": sub.name, "face_x": box[0], "face_y": box[1], "face_w": box[2], "face_h": box[3]}
        )
    return make_records(pd.DataFrame(rows))


def _expected(records: pd.DataFrame, root: Path, size: int, channels: int, draft: bool = True) -> np.ndarray:
    """The independent path: load_face row by row, stacked as (N, C, H, W)."""
    out = []
    for row in records.itertuples():
        box = (row.face_x, row.face_y, row.face_w, row.face_h)
        out.append(to_chw(load_face(root / row.path, size=size, channels=channels, box=box, draft=draft)))
    return np.stack(out)


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[pd.DataFrame, Path, Path]:
    root = tmp_path / "data"
    return _write_dataset(root), root, tmp_path / "cache"


def _final_dirs(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if p.is_dir() and ".tmp-" not in p.name)


def _tmp_dirs(cache_dir: Path) -> list[Path]:
    return sorted(p for p in cache_dir.iterdir() if ".tmp-" in p.name)


# --- content ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("channels", "num_workers"), [(3, 0), (1, 0), (3, 2)])
def test_items_are_byte_identical_to_load_face(dataset, channels: int, num_workers: int) -> None:
    records, root, cache_dir = dataset
    cache = ImageCache.build_or_open(
        records, root, cache_dir, size=24, channels=channels, num_workers=num_workers, progress=False
    )
    expected = _expected(records, root, 24, channels)
    assert cache.built and len(cache) == len(records) == 12
    assert cache.nbytes == expected.nbytes == 12 * channels * 24 * 24
    for i in range(len(cache)):
        item = cache[i]
        assert item.dtype == np.uint8 and item.shape == (channels, 24, 24)
        np.testing.assert_array_equal(item, expected[i])
    np.testing.assert_array_equal(cache[-1], expected[-1])
    item = cache[0]
    assert type(item) is np.ndarray and item.flags.writeable  # a copy: transforms may write into it
    with pytest.raises(IndexError):
        cache[12]
    meta = json.loads((cache.path / META_FILE).read_text())
    assert meta["shape"] == [12, channels, 24, 24] and meta["n"] == 12 and meta["bytes"] == cache.nbytes
    assert meta["fingerprint"] == cache.fingerprint == cache.path.name
    assert (cache.path / IMAGES_FILE).stat().st_size == cache.nbytes


def test_draft_flag_reaches_the_decoder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    yy, xx = np.mgrid[0:256, 0:256]
    Image.fromarray(((xx * 7 + yy * 3) % 256).astype(np.uint8)).convert("RGB").save(root / "big.jpg", quality=90)
    records = make_records(pd.DataFrame({"path": ["big.jpg"], "split": ["train"]}))
    for draft in (True, False):
        cache = ImageCache.build_or_open(
            records, root, tmp_path / "c", size=32, channels=3, draft=draft, progress=False
        )
        np.testing.assert_array_equal(cache[0], _expected(records, root, 32, 3, draft=draft)[0])
    assert not np.array_equal(_expected(records, root, 32, 3, True), _expected(records, root, 32, 3, False))


# --- hits and misses -------------------------------------------------------------------------------------------


def test_second_open_is_a_hit(dataset) -> None:
    records, root, cache_dir = dataset
    first = ImageCache.build_or_open(records, root, cache_dir, size=16, channels=3, progress=False)
    meta_before = (first.path / META_FILE).read_text()
    mtime_before = (first.path / IMAGES_FILE).stat().st_mtime_ns
    second = ImageCache.build_or_open(records, root, cache_dir, size=16, channels=3, progress=False)
    assert first.built and not second.built
    assert second.path == first.path and second.fingerprint == first.fingerprint
    assert (second.path / META_FILE).read_text() == meta_before
    assert (second.path / IMAGES_FILE).stat().st_mtime_ns == mtime_before
    np.testing.assert_array_equal(second.array, first.array)
    assert len(_final_dirs(cache_dir)) == 1


@pytest.mark.parametrize("change", [{"size": 20}, {"channels": 1}, {"draft": False}], ids=["size", "channels", "draft"])
def test_parameter_change_is_a_miss(dataset, change: dict) -> None:
    records, root, cache_dir = dataset
    params = {"size": 16, "channels": 3, "draft": True, "progress": False}
    base = ImageCache.build_or_open(records, root, cache_dir, **params)
    other = ImageCache.build_or_open(records, root, cache_dir, **{**params, **change})
    assert other.built and other.fingerprint != base.fingerprint
    assert len(_final_dirs(cache_dir)) == 2


def test_replaced_file_is_a_miss_and_gives_new_pixels(dataset) -> None:
    records, root, cache_dir = dataset
    old = ImageCache.build_or_open(records, root, cache_dir, size=16, channels=3, progress=False)
    target = root / records.loc[1, "path"]
    Image.new("L", (40, 40), 9).save(target)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))  # a distinct mtime even on coarse clocks
    new = ImageCache.build_or_open(records, root, cache_dir, size=16, channels=3, progress=False)
    assert new.built and new.fingerprint != old.fingerprint
    assert (new[1] == 9).all() and not (old[1] == 9).all()
    np.testing.assert_array_equal(new[0], old[0])


def test_fingerprint_covers_order_boxes_and_params(dataset) -> None:
    records, root, _ = dataset
    params = {"size": 16}
    fp = cache_fingerprint(records, root, params)
    assert fp == cache_fingerprint(records.copy(), root, dict(params))
    assert len(fp) == 64 and int(fp, 16) >= 0
    reordered = records.iloc[::-1].reset_index(drop=True)
    moved_box = records.copy()
    moved_box.loc[1, "face_x"] += 1
    assert cache_fingerprint(reordered, root, params) != fp
    assert cache_fingerprint(moved_box, root, params) != fp
    assert cache_fingerprint(records, root, {"size": 17}) != fp


def test_fingerprint_of_missing_file_names_it(dataset) -> None:
    records, root, cache_dir = dataset
    (root / records.loc[3, "path"]).unlink()
    with pytest.raises(ImageDecodeError, match="img3"):
        ImageCache.build_or_open(records, root, cache_dir, size=16, channels=3, progress=False)


# --- atomic builds ---------------------------------------------------------------------------------------------


def test_leftover_tmp_dir_is_not_used_and_removed(dataset) -> None:
    records, root, cache_dir = dataset
    params = {"size": 16, "channels": 3, "progress": False}
    fp = ImageCache.build_or_open(records, root, cache_dir.parent / "probe", **params).fingerprint
    # What a build killed after writing everything but the rename leaves behind: data and meta, wrong pixels.
    stale = cache_dir / f"{fp}.tmp-999999-deadbeef"
    stale.mkdir(parents=True)
    np.full((12, 3, 16, 16), 7, np.uint8).tofile(stale / IMAGES_FILE)
    (stale / META_FILE).write_text(json.dumps({"fingerprint": fp, "shape": [12, 3, 16, 16]}))
    cache = ImageCache.build_or_open(records, root, cache_dir, **params)
    assert cache.built and cache.path == cache_dir / fp
    np.testing.assert_array_equal(cache.array, _expected(records, root, 16, 3))
    assert _tmp_dirs(cache_dir) == []


def test_final_dir_without_meta_is_rebuilt(dataset) -> None:
    records, root, cache_dir = dataset
    params = {"size": 16, "channels": 3, "progress": False}
    first = ImageCache.build_or_open(records, root, cache_dir, **params)
    (first.path / META_FILE).unlink()
    (first.path / IMAGES_FILE).write_bytes(b"\0" * first.nbytes)
    again = ImageCache.build_or_open(records, root, cache_dir, **params)
    assert again.built
    np.testing.assert_array_equal(again.array, _expected(records, root, 16, 3))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_decode_error_leaves_no_cache(dataset, num_workers: int) -> None:
    records, root, cache_dir = dataset
    bad = root / records.loc[5, "path"]
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageDecodeError) as info:
        ImageCache.build_or_open(records, root, cache_dir, size=16, channels=3, num_workers=num_workers, progress=False)
    assert info.value.path == str(bad)
    assert _final_dirs(cache_dir) == [] and _tmp_dirs(cache_dir) == []


# --- real processes --------------------------------------------------------------------------------------------


def _build_in_child(records, root, cache_dir, started, results) -> None:
    """Spawned builder: signal, build or open, report what happened."""
    started.set()
    cache = ImageCache.build_or_open(records, root, cache_dir, size=16, channels=3, progress=False)
    results.put((os.getpid(), cache.built, cache.fingerprint, cache.array.tobytes()))


def test_two_concurrent_builders_make_one_cache(dataset) -> None:
    records, root, cache_dir = dataset
    cache_dir.mkdir()
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    events = [ctx.Event(), ctx.Event()]
    fp = ImageCache.build_or_open(
        records, root, cache_dir.parent / "probe", size=16, channels=3, progress=False
    ).fingerprint
    # Hold the build lock so that both children are surely waiting for it at the same time.
    with open(cache_dir / f"{fp}.lock", "a+b") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        procs = [ctx.Process(target=_build_in_child, args=(records, root, cache_dir, e, results)) for e in events]
        for p in procs:
            p.start()
        for e in events:
            assert e.wait(60)
        time.sleep(0.5)
        assert _final_dirs(cache_dir) == []
        fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    got = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sorted(built for _, built, _, _ in got) == [False, True]
    assert {f for _, _, f, _ in got} == {fp}
    assert got[0][3] == got[1][3] == _expected(records, root, 16, 3).tobytes()
    assert _final_dirs(cache_dir) == [cache_dir / fp] and _tmp_dirs(cache_dir) == []
    builder_pid = next(pid for pid, built, _, _ in got if built)
    assert json.loads((cache_dir / fp / META_FILE).read_text())["built_by"]["pid"] == builder_pid


def test_killed_build_leaves_no_cache_and_next_build_succeeds(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (768, 3))).save(root / "big.png")
    # One slow-to-decode file many times over keeps the child busy long enough to be killed mid-build.
    records = make_records(pd.DataFrame({"path": ["big.png"] * 150, "split": ["train"] * 150}))
    cache_dir = tmp_path / "cache"
    ctx = multiprocessing.get_context("spawn")
    started, results = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_build_in_child, args=(records, root, cache_dir, started, results))
    child.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(cache_dir.glob("*.tmp-*/" + IMAGES_FILE)):
        time.sleep(0.005)
    os.kill(child.pid, signal.SIGKILL)
    child.join(30)
    assert child.exitcode == -signal.SIGKILL
    assert len(_tmp_dirs(cache_dir)) == 1, "the child finished before the kill; the test proved nothing"
    assert _final_dirs(cache_dir) == []
    full = ImageCache.build_or_open(records, root, cache_dir, size=16, channels=3, progress=False)
    assert full.built and _tmp_dirs(cache_dir) == []
    np.testing.assert_array_equal(full[149], to_chw(load_face(root / "big.png", size=16, channels=3)))


def _read_rows(args: tuple[ImageCache, list[int]]) -> bytes:
    cache, rows = args
    return b"".join(cache[i].tobytes() for i in rows)


def test_pickles_without_pixels_and_reads_after_fork(dataset) -> None:
    records, root, cache_dir = dataset
    cache = ImageCache.build_or_open(records, root, cache_dir, size=32, channels=3, progress=False)
    _ = cache.array  # opened in the parent before fork, as a DataLoader's main process would
    blob = pickle.dumps(cache)
    assert len(blob) < 2000 < cache.nbytes
    clone = pickle.loads(blob)
    np.testing.assert_array_equal(clone.array, cache.array)
    with multiprocessing.get_context("fork").Pool(2) as pool:
        parts = pool.map(_read_rows, [(cache, [0, 1, 2]), (cache, [9, 10, 11])])
    assert parts[0] == b"".join(cache[i].tobytes() for i in (0, 1, 2))
    assert parts[1] == b"".join(cache[i].tobytes() for i in (9, 10, 11))


# --- odds and ends ---------------------------------------------------------------------------------------------


def test_disk_usage_counts_every_cache(dataset) -> None:
    records, root, cache_dir = dataset
    assert cache_disk_usage(cache_dir) == 0
    a = ImageCache.build_or_open(records, root, cache_dir, size=16, channels=3, progress=False)
    b = ImageCache.build_or_open(records, root, cache_dir, size=8, channels=1, progress=False)
    meta_bytes = sum((c.path / META_FILE).stat().st_size for c in (a, b))
    assert cache_disk_usage(cache_dir) == a.nbytes + b.nbytes + meta_bytes == 12 * 3 * 256 + 12 * 64 + meta_bytes


def test_empty_records(tmp_path: Path) -> None:
    records = make_records(pd.DataFrame({"path": [], "split": []}))
    cache = ImageCache.build_or_open(records, tmp_path, tmp_path / "c", size=8, channels=3, progress=False)
    assert len(cache) == 0 and cache.array.shape == (0, 3, 8, 8)
    again = ImageCache.build_or_open(records, tmp_path, tmp_path / "c", size=8, channels=3, progress=False)
    assert not again.built
