"""AffectNet readers (8-labels .npy release and original CSVs) and the format registry, on files in the real layouts."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_lightning.formats import affectnet, affectnet_npy
from fer_lightning.formats.registry import DataFileNotFoundError, DataFormatError, available_formats, read_records


def _jpeg(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


# --------------------------------------------------------------------------- affectnet_npy


def _landmarks_flat(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 224, 136)


# id -> (exp as stored, valence as stored, arousal as stored); the real files hold 0-d strings
NPY_TRAIN = {
    "0": ("1", "0.5", "-0.25"),
    "7": ("0", "0.0", "0.125"),
    "12": ("10", "-2", "-2"),  # non-face: id 10 and the -2 VA marker
    "30": ("8", "0.1", "0.2"),  # "none"
    "41": (6, 0.75, -0.5),  # ints/floats are accepted as well
}
NPY_VAL = {"3": ("2", "-0.5", "0.5"), "5": ("7", "0.25", "0.25")}


def _write_npy_set(root: Path, set_dir: str, samples: dict) -> None:
    ann = root / set_dir / "annotations"
    ann.mkdir(parents=True)
    for k, (sid, (exp, val, aro)) in enumerate(samples.items()):
        _jpeg(root / set_dir / "images" / f"{sid}.jpg", seed=k)
        np.save(ann / f"{sid}_exp.npy", np.array(exp))
        np.save(ann / f"{sid}_val.npy", np.array(val))
        np.save(ann / f"{sid}_aro.npy", np.array(aro))
        np.save(ann / f"{sid}_lnd.npy", _landmarks_flat(int(sid)))


@pytest.fixture
def npy_root(tmp_path: Path) -> Path:
    _write_npy_set(tmp_path, "train_set", NPY_TRAIN)
    _write_npy_set(tmp_path, "val_set", NPY_VAL)
    return tmp_path


def test_npy_reads_values_paths_and_maps_val_set_to_test(npy_root, caplog):
    with caplog.at_level(logging.INFO):
        df = affectnet_npy.read(npy_root)
    # numeric id order, ids 12 (non-face) and 30 ("none") dropped
    assert df["path"].tolist() == [
        "train_set/images/0.jpg",
        "train_set/images/7.jpg",
        "train_set/images/41.jpg",
        "val_set/images/3.jpg",
        "val_set/images/5.jpg",
    ]
    assert df["split"].tolist() == ["train", "train", "train", "test", "test"]
    assert df["expression"].tolist() == [1, 0, 6, 2, 7]
    assert df["label_raw"].tolist() == ["1", "0", "6", "2", "7"]
    np.testing.assert_allclose(df["valence"], [0.5, 0.0, 0.75, -0.5, 0.25])
    np.testing.assert_allclose(df["arousal"], [-0.25, 0.125, -0.5, 0.5, 0.25])
    for sid, lm in zip(["0", "7", "41", "3", "5"], df["landmarks"]):
        assert lm.dtype == np.float32 and lm.shape == (68, 2)
        flat = _landmarks_flat(int(sid))
        np.testing.assert_array_equal(lm[:, 0], flat[0::2].astype(np.float32))  # x, y interleaved
        np.testing.assert_array_equal(lm[:, 1], flat[1::2].astype(np.float32))
    assert "dropped 2 rows" in caplog.text


def test_npy_keeps_non_expression_when_asked(npy_root):
    df = affectnet_npy.read(npy_root, drop_non_expression=False, official_val_split="val")
    assert len(df) == 7
    row = df.set_index("path").loc["train_set/images/12.jpg"]
    assert row["expression"] == 10 and row["valence"] == -2.0 and row["arousal"] == -2.0
    assert set(df.loc[df["path"].str.startswith("val_set"), "split"]) == {"val"}


def test_npy_through_registry_gives_the_records_schema(npy_root):
    rec = read_records("affectnet_npy", npy_root)
    assert str(rec["expression"].dtype) == "Int64"
    assert rec["valence"].dtype == np.float32 and rec["face_x"].isna().all()
    assert list(rec["split"].cat.categories) == ["train", "val", "test"]
    assert rec["split"].value_counts().to_dict() == {"train": 3, "test": 2, "val": 0}


def test_npy_missing_annotation_values_are_nan_and_logged(npy_root, caplog):
    (npy_root / "train_set" / "annotations" / "7_val.npy").unlink()
    (npy_root / "train_set" / "annotations" / "7_lnd.npy").unlink()
    with caplog.at_level(logging.WARNING):
        df = affectnet_npy.read(npy_root).set_index("path")
    assert np.isnan(df.loc["train_set/images/7.jpg", "valence"])
    assert df.loc["train_set/images/7.jpg", "arousal"] == np.float32(0.125)
    assert df.loc["train_set/images/7.jpg", "landmarks"] is None
    assert "1 samples have no _val.npy" in caplog.text and "1 samples have no _lnd.npy" in caplog.text


def test_npy_unknown_label_text_is_kept_for_the_checks(npy_root):
    np.save(npy_root / "train_set" / "annotations" / "0_exp.npy", np.array("happy?"))
    df = affectnet_npy.read(npy_root).set_index("path")
    assert pd.isna(df.loc["train_set/images/0.jpg", "expression"])
    assert df.loc["train_set/images/0.jpg", "label_raw"] == "happy?"


def test_npy_corrupt_file_names_the_file(npy_root):
    bad = npy_root / "val_set" / "annotations" / "5_aro.npy"
    bad.write_bytes(b"not numpy at all")
    with pytest.raises(DataFormatError, match="5_aro.npy"):
        affectnet_npy.read(npy_root)


def test_npy_missing_root_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        affectnet_npy.read(tmp_path / "nope")
    with pytest.raises(DataFileNotFoundError, match="train_set"):
        affectnet_npy.read(tmp_path)
    (tmp_path / "train_set" / "images").mkdir(parents=True)
    with pytest.raises(DataFileNotFoundError, match="annotations"):
        affectnet_npy.read(tmp_path)


def test_npy_many_samples_match_np_load(tmp_path):
    """More samples than one worker chunk: every value equals what np.load reads."""
    samples = {str(i): (str(i % 8), f"{(i % 21) / 10 - 1:.1f}", f"{(i % 5) / 5:.1f}") for i in range(520)}
    ann = tmp_path / "train_set" / "annotations"
    ann.mkdir(parents=True)
    (tmp_path / "train_set" / "images").mkdir()
    for sid, (exp, val, aro) in samples.items():
        np.save(ann / f"{sid}_exp.npy", np.array(exp))
        np.save(ann / f"{sid}_val.npy", np.array(val))
        np.save(ann / f"{sid}_aro.npy", np.array(aro))
        np.save(ann / f"{sid}_lnd.npy", np.arange(136, dtype=np.float64) + int(sid))
    df = affectnet_npy.read(tmp_path, workers=3)
    assert len(df) == 520
    for i in (0, 255, 256, 519):
        row = df.iloc[i]
        assert row["path"] == f"train_set/images/{i}.jpg"
        assert row["expression"] == int(np.load(ann / f"{i}_exp.npy"))
        assert row["valence"] == np.float32(float(np.load(ann / f"{i}_val.npy")))
        np.testing.assert_array_equal(row["landmarks"].reshape(-1), np.load(ann / f"{i}_lnd.npy").astype(np.float32))


# --------------------------------------------------------------------------- affectnet (CSV)

HEADER = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
LM_A = ";".join(f"{v:.2f}" for v in np.linspace(10.5, 200.25, 136))
TRAIN_ROWS = [
    f"689/a.jpg,12,15,180,190,{LM_A},1,0.785714,-0.055556",
    "392/b.png,0,0,100,100,,0,-0.2,0.3",  # no landmarks
    "10/nonface.jpg,1,2,3,4,,10,-2,-2",  # non-face: dropped by default
    "11/none.jpg,1,2,3,4,,8,0.1,0.1",  # "none": dropped by default
]
VAL_ROWS = ["5/c.jpg,3,4,50,60,,6,0.5,0.5"]


def _write_csv_root(root: Path, train_rows=TRAIN_ROWS, val_rows=VAL_ROWS, val_header: bool = True) -> Path:
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "training.csv").write_text("\n".join([HEADER, *train_rows]) + "\n")
    (lists / "validation.csv").write_text("\n".join(([HEADER] if val_header else []) + val_rows) + "\n")
    for row in [*train_rows, *val_rows]:
        _jpeg(root / "Manually_Annotated_Images" / row.split(",")[0])
    return root


def test_csv_reads_box_landmarks_and_drops_non_faces(tmp_path, caplog):
    root = _write_csv_root(tmp_path)
    with caplog.at_level(logging.INFO):
        df = affectnet.read(root)
    assert df["path"].tolist() == [
        "Manually_Annotated_Images/689/a.jpg",
        "Manually_Annotated_Images/392/b.png",
        "Manually_Annotated_Images/5/c.jpg",
    ]
    assert df["split"].tolist() == ["train", "train", "test"]
    assert df["expression"].tolist() == [1, 0, 6]
    assert df["label_raw"].tolist() == ["1", "0", "6"]
    np.testing.assert_array_equal(
        df[["face_x", "face_y", "face_w", "face_h"]].to_numpy(), [[12, 15, 180, 190], [0, 0, 100, 100], [3, 4, 50, 60]]
    )
    np.testing.assert_allclose(df["valence"], [0.785714, -0.2, 0.5], rtol=1e-6)
    np.testing.assert_allclose(df["arousal"], [-0.055556, 0.3, 0.5], rtol=1e-6)
    expected = np.array([float(v) for v in LM_A.split(";")], dtype=np.float32).reshape(68, 2)
    np.testing.assert_array_equal(df["landmarks"][0], expected)
    assert df["landmarks"][0][0].tolist() == [10.5, pytest.approx(11.91, abs=1e-5)]  # first (x, y) pair by hand
    assert df["landmarks"][1] is None and df["landmarks"][2] is None
    assert "dropped 2 rows" in caplog.text and "('train', 8): 1" in caplog.text and "('train', 10): 1" in caplog.text


def test_csv_keeps_non_faces_when_asked(tmp_path):
    df = affectnet.read(_write_csv_root(tmp_path), drop_non_expression=False)
    nonface = df.set_index("path").loc["Manually_Annotated_Images/10/nonface.jpg"]
    assert nonface["expression"] == 10 and nonface["valence"] == -2.0


def test_csv_without_header_row(tmp_path):
    df = affectnet.read(_write_csv_root(tmp_path, val_header=False))
    assert df.loc[df["split"] == "test", "path"].tolist() == ["Manually_Annotated_Images/5/c.jpg"]


def test_csv_fast_landmark_parse_matches_row_by_row(tmp_path):
    rng = np.random.default_rng(3)
    rows, expected = [], []
    for i in range(40):
        n_values = 136 if i % 7 else 134  # every 7th row has a wrong count: kept as read, for the checks
        values = rng.uniform(0, 500, n_values).round(3)
        rows.append(f"d/{i}.jpg,0,0,10,10,{';'.join(map(str, values))},{i % 8},0,0")
        expected.append(np.array(values, dtype=np.float32).reshape(-1, 2))
    df = affectnet.read(_write_csv_root(tmp_path, train_rows=rows), drop_non_expression=False)
    got = df.loc[df["split"] == "train", "landmarks"].tolist()
    assert [g.shape for g in got] == [e.shape for e in expected]
    for g, e in zip(got, expected):
        np.testing.assert_array_equal(g, e)
    assert got[0].shape == (67, 2) and got[1].shape == (68, 2)


def test_csv_landmark_text_error_names_the_line(tmp_path):
    bad = TRAIN_ROWS[0].replace("10.50;", "oops;", 1)  # still 136 values: the fast parse fails as a whole
    root = _write_csv_root(tmp_path, train_rows=[TRAIN_ROWS[1], bad])
    with pytest.raises(DataFormatError, match=r"training.csv line 3: facial_landmarks"):
        affectnet.read(root)


def test_csv_text_in_number_column_names_the_lines(tmp_path):
    root = _write_csv_root(tmp_path, train_rows=[TRAIN_ROWS[1], "x/y.jpg,0,0,10,10,,1,high,0.1"])
    with pytest.raises(DataFormatError, match=r"'valence'.*lines \[3\]"):
        affectnet.read(root)


def test_csv_non_integer_expression_is_left_for_the_checks(tmp_path):
    root = _write_csv_root(tmp_path, train_rows=[TRAIN_ROWS[1], "x/y.jpg,0,0,10,10,,1.5,0.1,0.1"])
    df = affectnet.read(root)
    assert pd.isna(df["expression"][1]) and df["label_raw"][1] == "1.5"


def test_csv_missing_root_csv_and_columns(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.root"):
        affectnet.read(tmp_path / "missing")
    with pytest.raises(DataFileNotFoundError, match=r"training.csv not found"):
        affectnet.read(tmp_path)
    lists = tmp_path / "Manually_Annotated_file_lists"
    lists.mkdir()
    (lists / "training.csv").write_text("subDirectory_filePath,expression\na.jpg,1\n")
    (lists / "validation.csv").write_text(HEADER + "\n" + VAL_ROWS[0] + "\n")
    with pytest.raises(DataFormatError, match=r"training.csv: missing columns \['face_x'") as err:
        affectnet.read(tmp_path)
    assert not isinstance(err.value, FileNotFoundError)
    (lists / "training.csv").write_text("a.jpg,1,2\n")
    with pytest.raises(DataFormatError, match=r"training.csv: no header row and 3 columns on line 1"):
        affectnet.read(tmp_path)


# --------------------------------------------------------------------------- registry


def test_registry_lists_formats_and_rejects_unknown(tmp_path):
    assert {"affectnet", "affectnet_npy"} <= set(available_formats())
    assert "registry" not in available_formats()
    with pytest.raises(DataFormatError, match=r"unknown format 'affectnet_csv'.*affectnet, affectnet_npy"):
        read_records("affectnet_csv", tmp_path)


def test_registry_missing_root_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.root: .*nowhere' does not exist"):
        read_records("affectnet", tmp_path / "nowhere")


def test_registry_passes_options(tmp_path):
    rec = read_records("affectnet", _write_csv_root(tmp_path), drop_non_expression=False, landmarks=False)
    assert len(rec) == 5 and rec["landmarks"].isna().all()
    assert rec["split"].tolist() == ["train"] * 4 + ["test"]


def test_registry_names_an_option_the_reader_does_not_take(tmp_path):
    with pytest.raises(
        DataFormatError,
        match=r"data.reader: format affectnet does not take \['extra_classes'\].*"
        r"'drop_non_expression'",
    ):
        read_records("affectnet", _write_csv_root(tmp_path), extra_classes=["focused"])
