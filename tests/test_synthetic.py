"""The built-in synthetic FER data set: counts, AffectNet layout, determinism, labels, landmarks, caching."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fer_lightning.data.synthetic import (
    AFFECTNET_TRAIN_COUNTS,
    META_FILE,
    VA_REGIONS,
    class_counts,
    ensure_synthetic,
    expression_intensity,
    generate_synthetic,
    label_plan,
    render_sample,
    synthetic_dir,
)

PARAMS = {"n_train": 200, "n_val": 16, "image_size": 48, "seed": 3, "label_noise": 0.1}
TINY = {"n_train": 40, "n_val": 8, "image_size": 32, "seed": 1}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("syn") / "data"
    summary = generate_synthetic(out, **PARAMS)
    return out, summary


def read_split(root: Path, split_dir: str) -> dict[int, dict]:
    """Every sample of one split, read back with plain numpy and PIL."""
    ann = root / split_dir / "annotations"
    ids = sorted(int(p.stem) for p in (root / split_dir / "images").iterdir())
    out = {}
    for i in ids:
        out[i] = {
            "exp": np.load(ann / f"{i}_exp.npy"),
            "val": np.load(ann / f"{i}_val.npy"),
            "aro": np.load(ann / f"{i}_aro.npy"),
            "lnd": np.load(ann / f"{i}_lnd.npy"),
        }
    return out


def test_class_counts_match_hand_computation():
    # n=200: 5 per class first, then 160 shared by AffectNet proportions (total 287,651):
    # quotas 41.65 74.77 14.16 7.84 3.55 2.12 13.84 2.09 -> floors sum to 156; the 4 left go to the
    # largest remainders: anger .840, surprise .837, happy .766, neutral .647.
    assert class_counts(200) == {0: 47, 1: 80, 2: 19, 3: 13, 4: 8, 5: 7, 6: 19, 7: 7}
    # At AffectNet's own size (plus the floor) the scaling is exact.
    full = sum(AFFECTNET_TRAIN_COUNTS.values())
    assert full == 287_651
    assert class_counts(full + 40) == {c: n + 5 for c, n in AFFECTNET_TRAIN_COUNTS.items()}
    for n in (40, 41, 199, 1000, 12000, 12345):
        counts = class_counts(n)
        assert sum(counts.values()) == n
        assert min(counts.values()) >= 5
    # Order follows AffectNet: happy > neutral > sad > anger > surprise > fear > disgust > contempt.
    c = class_counts(12000)
    assert c[1] > c[0] > c[2] > c[6] > c[3] > c[4] > c[5] >= c[7]
    with pytest.raises(ValueError, match="n_train=39"):
        class_counts(39)


def test_layout_and_file_formats(dataset):
    root, _ = dataset
    assert sorted(p.name for p in root.iterdir()) == [META_FILE, "train_set", "val_set"]
    n_train, n_val, size = PARAMS["n_train"], PARAMS["n_val"], PARAMS["image_size"]
    for split_dir, ids in (("train_set", range(n_train)), ("val_set", range(n_train, n_train + n_val))):
        images = sorted(p.name for p in (root / split_dir / "images").iterdir())
        assert images == sorted(f"{i}.jpg" for i in ids)
        annotations = sorted(p.name for p in (root / split_dir / "annotations").iterdir())
        assert annotations == sorted(f"{i}_{k}.npy" for i in ids for k in ("exp", "val", "aro", "lnd"))
    for split_dir in ("train_set", "val_set"):
        for i, s in list(read_split(root, split_dir).items())[:30]:
            # AffectNet stores the class id as a numpy string scalar.
            assert s["exp"].shape == () and s["exp"].dtype == np.dtype("<U1") and str(s["exp"]) in "01234567"
            assert s["val"].shape == () and s["val"].dtype == np.float32
            assert s["aro"].shape == () and s["aro"].dtype == np.float32
            assert s["lnd"].shape == (136,) and s["lnd"].dtype == np.float32
            with Image.open(root / split_dir / "images" / f"{i}.jpg") as im:
                assert im.format == "JPEG" and im.mode == "RGB" and im.size == (size, size)


def test_counts_exact_and_val_balanced(dataset):
    root, summary = dataset
    train = read_split(root, "train_set")
    val = read_split(root, "val_set")
    train_counts = np.bincount([int(s["exp"]) for s in train.values()], minlength=8)
    val_counts = np.bincount([int(s["exp"]) for s in val.values()], minlength=8)
    assert train_counts.tolist() == [class_counts(200)[c] for c in range(8)]
    assert val_counts.tolist() == [2] * 8
    assert summary["counts"]["train"] == class_counts(200)
    assert summary["counts"]["val"] == {c: 2 for c in range(8)}


def test_same_params_give_identical_bytes_with_any_worker_count(dataset, tmp_path):
    root, _ = dataset
    again = tmp_path / "again"
    generate_synthetic(again, num_workers=2, **PARAMS)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (again / rel).read_bytes(), rel
    # The seed matters: another seed draws another face for the same index and class.
    a, b = render_sample(3, "train", 0, 1, 48), render_sample(4, "train", 0, 1, 48)
    assert not np.array_equal(a["image"], b["image"]) and not np.array_equal(a["landmarks"], b["landmarks"])


def test_label_noise_written_as_planned(dataset):
    root, summary = dataset
    meta = json.loads((root / META_FILE).read_text())
    true, labels = label_plan(class_counts(200), PARAMS["seed"], "train", PARAMS["label_noise"])
    written = read_split(root, "train_set")
    assert [int(written[i]["exp"]) for i in range(200)] == labels.tolist()
    noisy = {r["id"]: r for r in meta["noisy"]}
    assert sorted(noisy) == np.flatnonzero(true != labels).tolist()
    assert all(r["split"] == "train" and r["true_class"] == true[r["id"]] for r in noisy.values())
    assert summary["n_noisy"] == {"train": len(noisy), "val": 0}
    assert 5 <= len(noisy) <= 40  # 10% of 200


def test_label_noise_fraction_on_a_large_count():
    counts = class_counts(20000)
    true, labels = label_plan(counts, seed=0, split="train", label_noise=0.03)
    flipped = true != labels
    # Binomial(20000, 0.03): sd 0.0012, so +-0.005 is four sd.
    assert abs(flipped.mean() - 0.03) < 0.005
    # Both the faces and the written labels keep the exact class counts.
    assert np.bincount(true, minlength=8).tolist() == [counts[c] for c in range(8)]
    assert np.bincount(labels, minlength=8).tolist() == [counts[c] for c in range(8)]
    # Rare classes are not flooded: each class's flipped share stays near the requested rate.
    for c in range(8):
        assert (flipped[labels == c]).mean() < 0.1, c
    true0, labels0 = label_plan(counts, seed=0, split="train", label_noise=0.0)
    assert (true0 == labels0).all()


def in_region(cls: int, v: float, a: float, tol: float = 1e-6) -> bool:
    """Inside the class's box; tol covers the float32 rounding of the written values."""
    (v_lo, v_hi), (a_lo, a_hi) = VA_REGIONS[cls]
    return v_lo - tol <= v <= v_hi + tol and a_lo - tol <= a <= a_hi + tol


def test_valence_arousal_inside_circle_and_class_region(dataset):
    root, _ = dataset
    meta = json.loads((root / META_FILE).read_text())
    noisy = {r["id"]: r for r in meta["noisy"]}
    for split_dir in ("train_set", "val_set"):
        for i, s in read_split(root, split_dir).items():
            v, a, label = float(s["val"]), float(s["aro"]), int(s["exp"])
            assert v * v + a * a <= 1.0
            if i in noisy:
                # VA belongs to the class the face shows, not to the wrong label.
                assert noisy[i]["true_class"] != label
                assert in_region(noisy[i]["true_class"], v, a)
            else:
                assert in_region(label, v, a), (split_dir, i, label, v, a)


def test_expression_intensity_hand_values():
    # Happy region: v in [0.15, 0.95], a in [-0.2, 0.5]; nearest radius 0.15, farthest 0.99 (circle).
    assert expression_intensity(1, 0.15, 0.0) == pytest.approx(0.3)
    assert expression_intensity(1, 0.57, 0.0) == pytest.approx(0.3 + 0.7 * (0.57 - 0.15) / 0.84)
    assert expression_intensity(1, 0.99, 0.0) == pytest.approx(1.0)
    assert expression_intensity(0, 0.1, 0.1) == 0.0


def test_landmarks_inside_image_in_anatomical_order(dataset):
    root, _ = dataset
    size = PARAMS["image_size"]
    for split_dir in ("train_set", "val_set"):
        for s in read_split(root, split_dir).values():
            pts = s["lnd"].reshape(68, 2)
            assert np.isfinite(pts).all()
            assert pts.min() >= 0 and pts.max() <= size - 1
            left_eye, right_eye = pts[36:42].mean(0), pts[42:48].mean(0)
            # In-plane rotation stays well under 90 degrees, so the image-space order holds.
            assert left_eye[0] < right_eye[0]
            assert max(left_eye[1], right_eye[1]) < pts[30][1] < pts[48:68, 1].mean() < pts[8][1]
            assert pts[17:27, 1].mean() < min(left_eye[1], right_eye[1])


def face_frame(pts: np.ndarray) -> np.ndarray:
    """Landmarks rotated upright and scaled so the eye centres are one unit apart."""
    le, re = pts[36:42].mean(0), pts[42:48].mean(0)
    d = re - le
    ang = np.arctan2(d[1], d[0])
    rot = np.array([[np.cos(-ang), -np.sin(-ang)], [np.sin(-ang), np.cos(-ang)]])
    return (pts - le) @ rot.T / np.hypot(*d)


def test_valence_and_arousal_drive_the_drawn_expression():
    smiles, valences, opens, arousals = [], [], [], []
    for i in range(40):
        s = render_sample(5, "val", i, 1, 64)
        p = face_frame(s["landmarks"])
        # y grows downwards: corners above the lip centre is a smile.
        smiles.append((p[51, 1] + p[57, 1]) / 2 - (p[48, 1] + p[54, 1]) / 2)
        valences.append(s["valence"])
        s = render_sample(5, "val", 1000 + i, 3, 64)
        p = face_frame(s["landmarks"])
        opens.append(p[66, 1] - p[62, 1])
        arousals.append(s["arousal"])
    assert np.corrcoef(smiles, valences)[0, 1] > 0.5
    assert np.corrcoef(opens, arousals)[0, 1] > 0.5
    # And the classes differ: a surprised mouth is open, a happy one smiles more than a sad one.
    sad = [face_frame(render_sample(5, "val", 2000 + i, 2, 64)["landmarks"]) for i in range(40)]
    sad_smiles = [(p[51, 1] + p[57, 1]) / 2 - (p[48, 1] + p[54, 1]) / 2 for p in sad]
    assert np.mean(smiles) > np.mean(sad_smiles) + 0.1
    neutral = [face_frame(render_sample(5, "val", 3000 + i, 0, 64)["landmarks"]) for i in range(40)]
    assert np.mean(opens) > 3 * np.mean([p[66, 1] - p[62, 1] for p in neutral])


def test_bad_parameters_are_rejected_with_their_name(tmp_path):
    with pytest.raises(ValueError, match="n_val=10"):
        generate_synthetic(tmp_path / "a", **{**TINY, "n_val": 10})
    with pytest.raises(ValueError, match="label_noise"):
        generate_synthetic(tmp_path / "b", **{**TINY, "label_noise": 1.5})
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_synthetic(busy, **TINY)
    with pytest.raises(TypeError, match="n_trian"):
        ensure_synthetic(tmp_path, n_trian=10)


def test_cache_folder_depends_on_output_params_only(tmp_path):
    base = synthetic_dir(tmp_path, **TINY)
    assert base.parent == tmp_path and base.name.startswith("synthetic-")
    assert synthetic_dir(tmp_path, **TINY, num_workers=2) == base
    assert synthetic_dir(tmp_path, **{**TINY, "seed": 2}) != base
    # Defaults written out or left out name the same data set.
    assert synthetic_dir(tmp_path) == synthetic_dir(tmp_path, n_train=12000, label_noise=0.03)


def test_ensure_generates_once_then_reuses(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fer_lightning.data.synthetic")
    first = ensure_synthetic(tmp_path, **TINY)
    assert first == synthetic_dir(tmp_path, **TINY)
    assert sum("generating" in r.getMessage() for r in caplog.records) == 1
    assert any("generated" in r.getMessage() and " s " in r.getMessage() for r in caplog.records)
    stamp = (first / META_FILE).stat().st_mtime_ns
    image_stamp = (first / "train_set/images/0.jpg").stat().st_mtime_ns
    caplog.clear()
    second = ensure_synthetic(tmp_path, **TINY)
    assert second == first
    assert not any("generating" in r.getMessage() for r in caplog.records)
    assert (first / META_FILE).stat().st_mtime_ns == stamp
    assert (first / "train_set/images/0.jpg").stat().st_mtime_ns == image_stamp
    assert len(list((first / "train_set/images").iterdir())) == TINY["n_train"]


def test_leftover_temp_folder_is_not_taken_as_complete(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="fer_lightning.data.synthetic")
    final = synthetic_dir(tmp_path, **TINY)
    # An interrupted build: a few files, even a meta file, but still under its temp name.
    leftover = tmp_path / f".{final.name}.tmp-12345-deadbeef"
    (leftover / "train_set/images").mkdir(parents=True)
    (leftover / "train_set/images/0.jpg").write_bytes(b"not a jpeg")
    (leftover / META_FILE).write_text("{}")
    got = ensure_synthetic(tmp_path, **TINY)
    assert got == final
    assert not leftover.exists()
    assert sum("generating" in r.getMessage() for r in caplog.records) == 1
    assert len(list((final / "train_set/images").iterdir())) == TINY["n_train"]
    with Image.open(final / "train_set/images/0.jpg") as im:
        assert im.size == (32, 32)
    # A final-named folder without the meta file was not made by us: rebuilt, not trusted.
    final2 = synthetic_dir(tmp_path, **{**TINY, "seed": 9})
    (final2 / "train_set").mkdir(parents=True)
    assert ensure_synthetic(tmp_path, **{**TINY, "seed": 9}) == final2
    assert (final2 / META_FILE).is_file()


def _ensure_in_child(cache_root: str, log_file: str) -> None:
    handler = logging.FileHandler(log_file)
    logger = logging.getLogger("fer_lightning.data.synthetic")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    path = ensure_synthetic(Path(cache_root), **TINY)
    Path(log_file + ".path").write_text(str(path))


def test_concurrent_processes_build_once(tmp_path):
    cache = tmp_path / "cache"
    ctx = multiprocessing.get_context("fork")
    logs = [str(tmp_path / f"child{i}.log") for i in range(3)]
    procs = [ctx.Process(target=_ensure_in_child, args=(str(cache), log)) for log in logs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    text = "".join(Path(log).read_text() for log in logs)
    assert text.count("generating") == 1
    paths = {Path(log + ".path").read_text() for log in logs}
    assert paths == {str(synthetic_dir(cache, **TINY))}
    built = Path(paths.pop())
    assert sorted(p.name for p in cache.iterdir() if not p.name.endswith(".lock")) == [built.name]
    assert len(os.listdir(built / "val_set/images")) == TINY["n_val"]
