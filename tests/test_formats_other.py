"""Readers image_folder, legend_csv and fer2013_csv on fixtures written in the real on-disk layouts."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_lightning.formats import fer2013_csv, image_folder, legend_csv
from fer_lightning.formats.registry import DataFormatError, read_records

VIA_HEADER = [
    "filename",
    "file_size",
    "file_attributes",
    "region_count",
    "region_id",
    "region_shape_attributes",
    "region_attributes",
]


def _image(path: Path, seed: int = 0, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=fmt)


def _via_csv(path: Path, rows: list[tuple[str, dict, int]]) -> None:
    """Write VIA's CSV export: one row per region, file attributes as a JSON object."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(VIA_HEADER)
        for filename, attrs, regions in rows:
            for region in range(max(regions, 1)):
                shape = json.dumps({"name": "rect", "x": 1, "y": 2, "width": 5, "height": 5}) if regions else "{}"
                writer.writerow([filename, 123, json.dumps(attrs), regions, region, shape, "{}"])


# ---------------------------------------------------------------- image_folder


def test_image_folder_maps_folder_names_by_name(tmp_path: Path) -> None:
    _image(tmp_path / "train/Angry/a.png")
    _image(tmp_path / "train/happy/b.JPG", fmt="JPEG")
    _image(tmp_path / "train/happy/c.Jpeg", fmt="JPEG")
    _image(tmp_path / "train/focused/d.bmp", fmt="BMP")
    _image(tmp_path / "train/bored/e.png")
    _image(tmp_path / "test/Surprised/f.png")
    _image(tmp_path / "test/fearful/g.png")
    (tmp_path / "train/happy/notes.txt").write_text("not an image")

    df = image_folder.read(tmp_path, extra_classes=("focused",))

    got = dict(zip(df["path"], zip(df["split"], df["expression"], df["label_raw"])))
    assert got == {
        "train/Angry/a.png": ("train", 6, "Angry"),
        "train/happy/b.JPG": ("train", 1, "happy"),
        "train/happy/c.Jpeg": ("train", 1, "happy"),
        "train/focused/d.bmp": ("train", 11, "focused"),
        "train/bored/e.png": ("train", pd.NA, "bored"),
        "test/Surprised/f.png": ("test", 3, "Surprised"),
        "test/fearful/g.png": ("test", 4, "fearful"),
    }
    assert df["expression"].isna().sum() == 1
    # No val folder: the reader returns what exists and leaves carving a val split to the data module.
    assert set(df["split"]) == {"train", "test"}
    assert df.attrs["label_mapping"] == {
        "Angry": "anger",
        "happy": "happy",
        "focused": "focused",
        "Surprised": "surprise",
        "fearful": "fear",
    }
    assert df.attrs["metadata_issues"] == []


def test_image_folder_unknown_folder_without_extra_classes_is_na(tmp_path: Path) -> None:
    _image(tmp_path / "val/focused/a.png")
    _image(tmp_path / "val/neutral/b.png")
    records = read_records("image_folder", tmp_path)
    assert records["expression"].tolist() == [pd.NA, 0]
    assert records["label_raw"].tolist() == ["focused", "neutral"]
    assert records["split"].tolist() == ["val", "val"]


def test_image_folder_via_metadata_groups_and_issues(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    happy = tmp_path / "train/happy"
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        _image(happy / name, seed=i)
    _via_csv(
        happy / "via_region_data.csv",
        [
            ("a.png", {"caption": "", "public_domain": "no", "image_url": "", "gender": "male", "age": "young"}, 2),
            (
                "b.png",
                {"caption": "smiling", "public_domain": "no", "image_url": "", "gender": "female", "age": "old"},
                1,
            ),
            ("missing.png", {"caption": "", "public_domain": "no", "image_url": "", "gender": "male", "age": "old"}, 0),
        ],
    )
    sad = tmp_path / "test/sad"
    _image(sad / "d.png", seed=4)
    # Same metadata under another name; age left empty must stay missing, not become a category "".
    _via_csv(sad / "export_2021.csv", [("d.png", {"caption": "", "gender": "female", "age": ""}, 1)])
    (sad / "scores.csv").write_text("name,score\nd.png,3\n")

    with caplog.at_level(logging.WARNING, logger="fer_lightning.formats.image_folder"):
        df = image_folder.read(tmp_path)

    by_path = df.set_index("path")
    assert sorted(c for c in df.columns if c.startswith("group_")) == ["group_age", "group_gender"]
    assert by_path.loc["train/happy/a.png", ["group_gender", "group_age"]].tolist() == ["male", "young"]
    assert by_path.loc["train/happy/b.png", ["group_gender", "group_age"]].tolist() == ["female", "old"]
    assert by_path.loc["test/sad/d.png", "group_gender"] == "female"
    assert pd.isna(by_path.loc["test/sad/d.png", "group_age"])
    assert pd.isna(by_path.loc["train/happy/c.png", "group_gender"])
    assert "train/happy/missing.png" not in by_path.index

    issues = df.attrs["metadata_issues"]
    assert ("train/happy/missing.png", "metadata row for a file that does not exist") in issues
    assert ("train/happy/c.png", "image has no metadata row") in issues
    assert any(p == "test/sad/scores.csv" and "not VIA metadata" in r for p, r in issues)
    # a.png has two region rows with the same attributes: not a conflict.
    assert len(issues) == 3
    text = caplog.text
    assert "1 x metadata row for a file that does not exist: train/happy/missing.png" in text
    assert "1 x image has no metadata row: train/happy/c.png" in text

    records = read_records("image_folder", tmp_path)
    assert isinstance(records["group_gender"].dtype, pd.CategoricalDtype)
    assert set(records["group_gender"].dropna()) == {"male", "female"}


def test_image_folder_reports_class_folder_without_metadata(tmp_path: Path) -> None:
    _image(tmp_path / "train/happy/a.png")
    _via_csv(tmp_path / "train/happy/meta.csv", [("a.png", {"gender": "male"}, 1)])
    _image(tmp_path / "train/sad/b.png")
    issues = image_folder.read(tmp_path).attrs["metadata_issues"]
    assert issues == [("train/sad", "class folder has no VIA metadata CSV while other class folders have one")]


def test_image_folder_bad_metadata_json_names_file_and_row(tmp_path: Path) -> None:
    _image(tmp_path / "train/happy/a.png")
    with (tmp_path / "train/happy/meta.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(VIA_HEADER)
        writer.writerow(["a.png", 1, "{}", 0, 0, "{}", "{}"])
        writer.writerow(["a.png", 1, "{gender: male", 0, 0, "{}", "{}"])
    with pytest.raises(DataFormatError, match=r"meta\.csv data row 2 \(line 3\)"):
        image_folder.read(tmp_path)


def test_image_folder_layout_errors(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="does not exist"):
        image_folder.read(tmp_path / "nope")
    _image(tmp_path / "images/happy/a.png")
    with pytest.raises(DataFormatError, match=r"no split folder .*\{train,val,test\}/<class name>") as err:
        image_folder.read(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "images" in str(err.value)


def test_image_folder_loose_image_in_split_folder_is_reported(tmp_path: Path) -> None:
    _image(tmp_path / "train/happy/a.png")
    _image(tmp_path / "train/stray.png")
    df = image_folder.read(tmp_path)
    assert df["path"].tolist() == ["train/happy/a.png"]
    assert df.attrs["metadata_issues"] == [("train/stray.png", "image outside a class folder has no label")]


# ---------------------------------------------------------------- legend_csv


LEGEND = [
    ("628", "a.jpg", "HAPPINESS"),
    ("628", "b.jpg", "happiness"),
    ("dwdii", "c.jpg", " Anger "),
    ("dwdii", "d.jpg", "contempt"),
    ("jhamski", "e.jpg", "SADNESS"),
    ("jhamski", "f.jpg", "surprise"),
    ("302", "g.jpg", "fear"),
    ("302", "h.jpg", "disgust"),
    ("302", "i.jpg", "Neutral"),
    ("302", "j.jpg", "boredom"),
]
# Canonical (AffectNet) ids written out by hand.
LEGEND_IDS = [1, 1, 6, 7, 2, 3, 4, 5, 0, pd.NA]


def _legend(root: Path, where: str = "legend.csv", columns: tuple[str, ...] = ("user.id", "image", "emotion")) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    path = root / where
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(LEGEND)


@pytest.mark.parametrize("where", ["legend.csv", "data/legend.csv"])
def test_legend_csv_maps_mixed_case_labels(tmp_path: Path, where: str) -> None:
    _legend(tmp_path, where)
    df = legend_csv.read(tmp_path)
    assert df["expression"].tolist() == LEGEND_IDS
    assert df["label_raw"].tolist() == [row[2] for row in LEGEND]
    assert df["path"].tolist() == [f"images/{row[1]}" for row in LEGEND]
    assert df["annotator"].tolist() == [row[0] for row in LEGEND]
    assert set(df["split"]) == {"train"}
    assert df.attrs["needs_split"] is True
    assert df.attrs["label_mapping"]["HAPPINESS"] == "happy"
    assert df.attrs["label_mapping"]["happiness"] == "happy"
    assert df.attrs["label_mapping"][" Anger "] == "anger"
    assert "boredom" not in df.attrs["label_mapping"]


def test_legend_csv_option_and_errors(tmp_path: Path) -> None:
    _legend(tmp_path, "labels/mine.csv")
    with pytest.raises(DataFormatError, match=r"no legend file .*data/legend\.csv"):
        legend_csv.read(tmp_path)
    records = read_records("legend_csv", tmp_path, legend="labels/mine.csv")
    assert records["expression"].tolist() == LEGEND_IDS
    assert records.attrs["needs_split"] is True  # survives make_records, so the data module sees it
    with pytest.raises(DataFormatError, match="does not exist"):
        legend_csv.read(tmp_path, legend="labels/other.csv")

    bad = tmp_path / "bad"
    _legend(bad, columns=("user", "image", "emotion"))
    with pytest.raises(DataFormatError, match=r"lacks the columns \['user\.id'\]"):
        legend_csv.read(bad)

    no_images = tmp_path / "no_images"
    no_images.mkdir()
    (no_images / "legend.csv").write_text("user.id,image,emotion\n1,a.jpg,fear\n")
    with pytest.raises(DataFormatError, match="image folder .* does not exist"):
        legend_csv.read(no_images)


# ---------------------------------------------------------------- fer2013_csv


# FER2013 id -> canonical id, by name, written out by hand: 0 angry, 1 disgust, 2 fear, 3 happy, 4 sad,
# 5 surprise, 6 neutral versus AffectNet's 0 neutral, 1 happy, 2 sad, 3 surprise, 4 fear, 5 disgust, 6 anger.
FER_TO_CANONICAL = {0: 6, 1: 5, 2: 4, 3: 1, 4: 2, 5: 3, 6: 0}


def _fer_csv(root: Path, n: int = 9, seed: int = 0) -> tuple[np.ndarray, list[int], list[str]]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 48, 48), dtype=np.uint8)
    emotions = [i % 7 for i in range(n)]
    usage = (["Training", "PublicTest", "PrivateTest"] * n)[:n]
    root.mkdir(parents=True, exist_ok=True)
    with (root / "fer2013.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["emotion", "pixels", "Usage"])
        for img, emo, use in zip(images, emotions, usage):
            writer.writerow([emo, " ".join(str(v) for v in img.ravel()), use])
    return images, emotions, usage


def test_fer2013_maps_ids_by_name_and_round_trips_pixels(tmp_path: Path) -> None:
    images, emotions, usage = _fer_csv(tmp_path)
    df = fer2013_csv.read(tmp_path)

    assert df["expression"].tolist() == [FER_TO_CANONICAL[e] for e in emotions]
    assert df.loc[df["label_raw"] == "6", "expression"].unique().tolist() == [0]
    assert df.loc[df["label_raw"] == "0", "expression"].unique().tolist() == [6]
    assert df["split"].tolist() == [{"Training": "train", "PublicTest": "val", "PrivateTest": "test"}[u] for u in usage]
    assert df.attrs["label_mapping"] == {
        "0": "anger",
        "1": "disgust",
        "2": "fear",
        "3": "happy",
        "4": "sad",
        "5": "surprise",
        "6": "neutral",
    }
    for img, path in zip(images, df["path"]):
        assert not Path(path).is_absolute()
        assert path.startswith(".fer_lightning_cache/fer2013-")
        with Image.open(tmp_path / path) as png:
            assert png.mode == "L"
            np.testing.assert_array_equal(np.asarray(png), img)


def test_fer2013_cache_is_reused_and_keyed_by_content(tmp_path: Path) -> None:
    _fer_csv(tmp_path, n=4)
    first = fer2013_csv.read(tmp_path)
    png = tmp_path / first["path"].iloc[0]
    stamp = png.stat().st_mtime_ns
    again = fer2013_csv.read(tmp_path)
    assert again["path"].tolist() == first["path"].tolist()
    assert png.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / ".fer_lightning_cache").iterdir()] == [png.parent.name]

    images, _, _ = _fer_csv(tmp_path, n=4, seed=1)
    changed = fer2013_csv.read(tmp_path)
    assert Path(changed["path"].iloc[0]).parent != Path(first["path"].iloc[0]).parent
    with Image.open(tmp_path / changed["path"].iloc[0]) as img:
        np.testing.assert_array_equal(np.asarray(img), images[0])
    assert len(list((tmp_path / ".fer_lightning_cache").iterdir())) == 2


def test_fer2013_cache_dir_option(tmp_path: Path) -> None:
    root = tmp_path / "data"
    images, _, _ = _fer_csv(root, n=3)
    inside = fer2013_csv.read(root, cache_dir="pngs")
    assert inside["path"].iloc[0].startswith("pngs/fer2013-")
    outside = fer2013_csv.read(root, cache_dir=str(tmp_path / "elsewhere"))
    first = Path(outside["path"].iloc[0])
    assert first.is_absolute() and first.is_relative_to(tmp_path / "elsewhere")
    np.testing.assert_array_equal(np.asarray(Image.open(first)), images[0])


@pytest.mark.parametrize(
    ("row", "pixels", "problem"),
    [
        (3, "1 " * 2303, "has 2303 values"),
        (2, "12.5 " + "1 " * 2303, "not a non-negative integer"),
        (4, "256 " + "1 " * 2303, "above 255"),
        (1, "-1 " + "1 " * 2303, "not a non-negative integer"),
        (5, "", "has 0 values"),
    ],
)
def test_fer2013_bad_pixel_row_names_the_row(tmp_path: Path, row: int, pixels: str, problem: str) -> None:
    _fer_csv(tmp_path, n=6)
    table = pd.read_csv(tmp_path / "fer2013.csv", dtype=str)
    table.loc[row - 1, "pixels"] = pixels.strip()
    table.to_csv(tmp_path / "fer2013.csv", index=False)
    with pytest.raises(DataFormatError, match=rf"data row {row} \(line {row + 1}.*{problem}"):
        fer2013_csv.read(tmp_path)
    # Nothing half-written is left behind for the next run to trust.
    assert list((tmp_path / ".fer_lightning_cache").glob("*")) == []


def test_fer2013_unknown_usage_and_label(tmp_path: Path) -> None:
    _fer_csv(tmp_path, n=3)
    table = pd.read_csv(tmp_path / "fer2013.csv", dtype=str)
    table.loc[1, "emotion"] = "7"
    table.to_csv(tmp_path / "fer2013.csv", index=False)
    df = fer2013_csv.read(tmp_path)
    assert df["expression"].tolist() == [6, pd.NA, 4]
    assert df["label_raw"].tolist() == ["0", "7", "2"]

    table.loc[2, "Usage"] = "Validation"
    table.to_csv(tmp_path / "fer2013.csv", index=False)
    with pytest.raises(DataFormatError, match=r"data row 3 .*Usage 'Validation'"):
        fer2013_csv.read(tmp_path)


def test_fer2013_missing_csv(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"fer2013\.csv does not exist"):
        fer2013_csv.read(tmp_path)
