"""Leakage check: exact, perceptual and mirrored copies across splits, against brute force and scipy's DCT."""

from __future__ import annotations

import itertools
import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.fft
from PIL import Image

from fer_lightning.data.leakage import LeakageError, check_leakage, dct_matrix, find_leaks, perceptual_hash
from fer_lightning.data.records import make_records


def _smooth_image(seed: int, side: int = 48) -> Image.Image:
    """A random, face-sized grayscale picture: a coarse random grid upsampled, plus mild noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8))
    fine = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC), dtype=np.float64)
    return Image.fromarray(np.clip(fine + rng.normal(0, 6, fine.shape), 0, 255).astype(np.uint8))


def _records(rows: list[tuple[str, str]]) -> pd.DataFrame:
    return make_records(pd.DataFrame(rows, columns=["path", "split"]))


@pytest.fixture
def distinct(tmp_path: Path) -> tuple[Path, list[tuple[str, str]]]:
    """50 distinct images spread over the three splits."""
    rows = []
    for i in range(50):
        split = ("train", "val", "test")[i % 3]
        path = f"{split}/img{i:02d}.png"
        (tmp_path / split).mkdir(exist_ok=True)
        _smooth_image(i).save(tmp_path / path)
        rows.append((path, split))
    return tmp_path, rows


def test_dct_matrix_matches_scipy() -> None:
    x = np.random.default_rng(0).normal(size=(16, 16))
    m = dct_matrix(16)
    np.testing.assert_allclose(m @ x @ m.T, scipy.fft.dctn(x, norm="ortho"), atol=1e-10)


def test_mirror_hash_equals_hash_of_flipped_image() -> None:
    for seed in range(5):
        img = _smooth_image(seed)
        bits, mirror = perceptual_hash(img)
        flipped_bits, flipped_mirror = perceptual_hash(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
        assert bits.shape == (63,)
        np.testing.assert_array_equal(mirror, flipped_bits)
        np.testing.assert_array_equal(bits, flipped_mirror)
        assert (bits != mirror).sum() > 10  # a random picture is not symmetric


def test_distinct_images_are_not_reported(distinct: tuple[Path, list]) -> None:
    root, rows = distinct
    leaks = find_leaks(_records(rows), root, num_workers=2)
    assert leaks.empty
    assert list(leaks.columns) == ["path_a", "split_a", "path_b", "split_b", "kind", "distance"]


def test_bucketing_finds_the_same_pairs_as_brute_force(distinct: tuple[Path, list]) -> None:
    root, rows = distinct
    hashes = {p: perceptual_hash(Image.open(root / p)) for p, _ in rows}
    split = dict(rows)
    threshold = 24  # loose, so that many pairs qualify and the bands are put to work
    expected = {}
    for (pa, _), (pb, _) in itertools.combinations(rows, 2):
        if split[pa] == split[pb]:
            continue
        (ha, ma), (hb, mb) = hashes[pa], hashes[pb]
        direct = int((ha != hb).sum())
        mirrored = min(int((ha != mb).sum()), int((ma != hb).sum()))
        if direct <= threshold:
            expected[frozenset((pa, pb))] = ("perceptual", direct)
        elif mirrored <= threshold:
            expected[frozenset((pa, pb))] = ("flipped", mirrored)
    assert len(expected) > 20

    leaks = find_leaks(_records(rows), root, hamming=threshold, num_workers=1)
    got = {frozenset((r.path_a, r.path_b)): (r.kind, r.distance) for r in leaks.itertuples()}
    assert got == expected
    order = {"train": 0, "val": 1, "test": 2}
    assert all(order[a] < order[b] for a, b in zip(leaks["split_a"], leaks["split_b"]))


def test_exact_flipped_and_recompressed_copies_are_found(distinct: tuple[Path, list]) -> None:
    root, rows = distinct
    # img01 (val), img02 (test) and img05 (test) leak into train three ways.
    shutil.copyfile(root / "val/img01.png", root / "train/copy_of_01.png")
    Image.open(root / "test/img02.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        root / "train/img02_flipped.png"
    )
    Image.open(root / "test/img05.png").save(root / "train/img05.jpg", quality=90)
    # A copy inside the same split is not leakage.
    shutil.copyfile(root / "train/img00.png", root / "train/copy_of_00.png")
    rows += [
        ("train/copy_of_01.png", "train"),
        ("train/img02_flipped.png", "train"),
        ("train/img05.jpg", "train"),
        ("train/copy_of_00.png", "train"),
    ]

    leaks = find_leaks(_records(rows), root)

    assert leaks[["path_a", "split_a", "path_b", "split_b", "kind"]].values.tolist() == [
        ["train/copy_of_01.png", "train", "val/img01.png", "val", "exact"],
        ["train/img02_flipped.png", "train", "test/img02.png", "test", "flipped"],
        ["train/img05.jpg", "train", "test/img05.png", "test", "perceptual"],
    ]
    assert leaks["distance"].iloc[0] == 0
    assert leaks["distance"].iloc[1] == 0  # 48 -> 16 is an exact 3x3 box average, so mirroring commutes
    assert 0 <= leaks["distance"].iloc[2] <= 4


def test_check_leakage_policies(distinct: tuple[Path, list], caplog: pytest.LogCaptureFixture) -> None:
    root, rows = distinct
    shutil.copyfile(root / "test/img02.png", root / "train/dup.png")
    records = _records(rows + [("train/dup.png", "train")])

    with caplog.at_level(logging.WARNING, logger="fer_lightning.data.leakage"):
        leaks = check_leakage(records, root, policy="warn")
    assert leaks[["path_a", "path_b", "kind"]].values.tolist() == [["train/dup.png", "test/img02.png", "exact"]]
    assert "1 exact train/test" in caplog.text

    with pytest.raises(
        LeakageError, match=r"train/dup\.png \(train\) ~ test/img02\.png \(test\).*data\.leakage\.policy"
    ):
        check_leakage(records, root, policy="error")

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fer_lightning.data.leakage"):
        skipped = check_leakage(records, root, policy="error", max_images=10)
    assert skipped.empty and skipped.attrs["skipped"] is True
    assert "data.leakage.force=true" in caplog.text
    with pytest.raises(LeakageError):
        check_leakage(records, root, policy="error", max_images=10, force=True)

    with pytest.raises(ValueError, match="data.leakage.policy"):
        check_leakage(records, root, policy="drop")


def test_unreadable_image_is_reported_not_compared(
    distinct: tuple[Path, list], caplog: pytest.LogCaptureFixture
) -> None:
    root, rows = distinct
    (root / "test/broken.png").write_bytes(b"not a png")
    with caplog.at_level(logging.WARNING, logger="fer_lightning.data.leakage"):
        leaks = find_leaks(_records(rows + [("test/broken.png", "test")]), root)
    assert leaks.empty
    assert leaks.attrs["unreadable"] == ["test/broken.png"]
    assert "1 images could not be decoded" in caplog.text
