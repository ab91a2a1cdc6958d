"""data=image_folder on data sets as published: VIA metadata in its real forms, the classes of a folder set
(data.classes=auto, data-set classes, explicit lists), and folder layouts with and without split folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import pytest
from layouts import write_image
from realdata import CK48, requires_ckplus48

from fer_lightning.data.checks import DataCheckError, run_checks
from fer_lightning.data.datamodule import DataConfigError, FERDataModule
from fer_lightning.data.records import make_records
from fer_lightning.formats import image_folder
from fer_lightning.formats.registry import DataFileNotFoundError, DataFormatError, read_records
from fer_lightning.taxonomy import FIRST_EXTRA_ID

# Byte for byte as found in a published release: a per-class-folder CSV named after the class, file_attributes a
# Python dict literal (single quotes), and the plain columns age,gender after VIA's own.
VIA_LITERAL = (
    b"filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,region_attributes,age,gender\n"
    b"im2.png,1468,\"{'caption': '', 'public_domain': 'no', 'image_url': '', 'gender': 'male', 'age': 'young'}\","
    b"0,0,{},{},young,male\n"
)
# ... and in another class folder of the same release, VIA's own JSON export.
VIA_JSON = (
    b"filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,region_attributes\n"
    b'im450.png,1707,"{""gender"":""male"",""age"":""young""}",0,0,{},{}\n'
)
VIA_HEADER = b"filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,region_attributes"
CK48_COUNTS = {"anger": 135, "contempt": 54, "disgust": 177, "fear": 75, "happy": 207, "sadness": 84, "surprise": 249}


def _published_via_set(root: Path) -> None:
    write_image(root / "train/surprised/im2.png", 1)
    write_image(root / "train/happy/im450.png", 2)
    (root / "train/surprised/surprised_test.csv").write_bytes(VIA_LITERAL)
    (root / "train/happy/happy_train.csv").write_bytes(VIA_JSON)


def _folders(root: Path, counts: dict[str, int], split: str | None = None, seed: int = 0) -> None:
    """root/[split/]<class>/<i>.png, distinct random pixels per image."""
    for k, (folder, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / (split or "") / folder / f"{i:03d}.png", seed + 100 * k + i, size=(24, 24))


def _dm(make_cfg, root: Path, *overrides: str) -> FERDataModule:
    cfg = make_cfg("data=image_folder", f"data.root={root}", "data.leakage.policy=off", *overrides)
    return FERDataModule(cfg.data, seed=int(cfg.seed), cache_dir=cfg.paths.cache_dir)


def _counts(records: pd.DataFrame, dm: FERDataModule) -> dict[str, dict[str, int]]:
    return {
        split: {n: int(((records["split"] == split) & (records["expression"] == c)).sum())
                for c, n in zip(dm.class_ids, dm.class_names)}
        for split in ("train", "val", "test")
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ VIA metadata
def test_via_python_literal_and_json_forms_in_one_data_set(tmp_path: Path) -> None:
    _published_via_set(tmp_path)
    df = image_folder.read(tmp_path)
    by_path = df.set_index("path")
    assert sorted(c for c in df.columns if c.startswith("group_")) == ["group_age", "group_gender"]
    assert by_path.loc["train/surprised/im2.png", ["group_age", "group_gender", "expression"]].tolist() == [
        "young", "male", 3,
    ]  # fmt: skip
    assert by_path.loc["train/happy/im450.png", ["group_age", "group_gender", "expression"]].tolist() == [
        "young", "male", 1,
    ]  # fmt: skip
    # the plain age,gender columns agree with file_attributes: one group column each, and no issue
    assert df.attrs["metadata_issues"] == []
    assert df.attrs["class_folders"] == ["happy", "surprised"]


def test_via_plain_column_disagreeing_with_file_attributes_is_reported(tmp_path: Path, caplog) -> None:
    _published_via_set(tmp_path)
    disagreeing = VIA_LITERAL.replace(b",young,male\n", b",young,female\n")
    (tmp_path / "train/surprised/surprised_test.csv").write_bytes(disagreeing)
    with caplog.at_level(logging.WARNING, logger="fer_lightning.formats.image_folder"):
        df = image_folder.read(tmp_path)
    assert df.attrs["metadata_issues"] == [
        (
            "train/surprised/im2.png",
            "metadata disagreement: surprised_test.csv data row 1 (line 2): gender: file_attributes 'male', "
            "column gender 'female'; kept the file_attributes value",
        )
    ]
    assert df.set_index("path").loc["train/surprised/im2.png", "group_gender"] == "male"
    assert (
        "1 x metadata disagreement: train/surprised/im2.png (surprised_test.csv data row 1 (line 2): gender: "
        "file_attributes 'male', column gender 'female'; kept the file_attributes value)"
    ) in caplog.text


def test_via_plain_columns_alone_become_group_columns(tmp_path: Path) -> None:
    write_image(tmp_path / "test/happy/a.png", 1)
    write_image(tmp_path / "test/happy/b.png", 2)
    (tmp_path / "test/happy/labels.csv").write_bytes(
        VIA_HEADER + b",Skin Tone,age\n"
        b"a.png,10,{},0,0,{},{},dark,old\n"
        b"b.png,10,\"{'age': 'young'}\",0,0,{},{}, ,young\n"
    )
    df = image_folder.read(tmp_path).set_index("path")
    assert df.loc["test/happy/a.png", ["group_age", "group_skin_tone"]].tolist() == ["old", "dark"]
    assert df.loc["test/happy/b.png", "group_age"] == "young"
    assert pd.isna(df.loc["test/happy/b.png", "group_skin_tone"])  # a blank cell is missing, not a category " "


@pytest.mark.parametrize(
    ("row", "column", "problem"),
    [
        (b"a.png,1,{gender: male,0,0,{},{}", "file_attributes", "neither a JSON object nor a Python dict literal"),
        (b"a.png,1,{},0,0,{},\"['male']\"", "region_attributes", "must be a dict"),
        # a Python expression is not a literal: refused, never evaluated
        (b"a.png,1,{},0,0,\"__import__('os').getcwd()\",{}", "region_shape_attributes", "neither a JSON object"),
    ],
)
def test_via_cell_that_is_no_dict_names_file_row_column_and_fix(tmp_path: Path, row, column, problem) -> None:
    write_image(tmp_path / "train/happy/a.png", 1)
    (tmp_path / "train/happy/meta.csv").write_bytes(VIA_HEADER + b"\na.png,1,{},0,0,{},{}\n" + row + b"\n")
    with pytest.raises(DataFormatError) as err:
        image_folder.read(tmp_path)
    msg = str(err.value)
    assert f"{tmp_path / 'train/happy/meta.csv'} data row 2 (line 3), column {column}: {problem}" in msg
    assert "fix that cell" in msg


# ------------------------------------------------------------------------------------------ layouts
def test_class_folders_at_the_root_are_read_as_one_set_to_split(tmp_path: Path) -> None:
    _folders(tmp_path, {"anger": 2, "sadness": 1, "focused": 1})
    write_image(tmp_path / "stray.png", 99)
    (tmp_path / ".cache").mkdir()
    records = read_records("image_folder", tmp_path)
    assert dict(zip(records["path"], records["expression"])) == {
        "anger/000.png": 6, "anger/001.png": 6, "sadness/000.png": 2, "focused/000.png": pd.NA,
    }  # fmt: skip
    assert set(records["split"]) == {"train"}
    assert records.attrs["needs_split"] is True
    assert records.attrs["class_folders"] == ["anger", "focused", "sadness"]
    assert records.attrs["metadata_issues"] == [("stray.png", "image outside a class folder has no label")]


def test_split_folders_beside_class_folders_is_an_error_naming_both(tmp_path: Path) -> None:
    _folders(tmp_path, {"happy": 1}, split="train")
    _folders(tmp_path, {"sad": 1, "anger": 1})
    with pytest.raises(DataFormatError) as err:
        image_folder.read(tmp_path)
    assert "mixes split folders ['train'] with class folders ['anger', 'sad']" in str(err.value)


def test_a_wrapper_folder_is_not_entered(tmp_path: Path) -> None:
    _folders(tmp_path / "CK+48", {"happy": 1, "sadness": 1})
    with pytest.raises(DataFileNotFoundError) as err:
        image_folder.read(tmp_path)
    msg = str(err.value)
    assert "no split folder (train, val or test) and no class folder with images" in msg
    assert "folders found: ['CK+48']" in msg and f"data.root={tmp_path / 'CK+48'}" in msg


# ------------------------------------------------------------------------------------------ classes
def test_auto_classes_are_the_folders_found_canonical_first_then_extras_by_name(make_cfg, tmp_path, caplog):
    counts = {"focused": 4, "Happy": 4, "sadness": 4, "bored": 4, "surprised": 4}
    _folders(tmp_path, counts, "train")
    _folders(tmp_path, counts, "test", seed=1000)
    dm = _dm(make_cfg, tmp_path, "data.val_fraction=0.25")
    with pytest.raises(DataConfigError, match=r"known only after reading"):
        _ = dm.class_ids
    with caplog.at_level(logging.INFO, logger="fer_lightning.data.datamodule"):
        records = dm.load_records()
    assert dm.class_names == ["happy", "sad", "surprise", "bored", "focused"]
    assert dm.class_ids == [1, 2, 3, FIRST_EXTRA_ID, FIRST_EXTRA_ID + 1]
    assert "data-set classes beyond the taxonomy: ['bored', 'focused']" in caplog.text
    assert dm.label_mapping == {"Happy": "happy", "sadness": "sad", "surprised": "surprise", "focused": "focused",
                                "bored": "bored"}  # fmt: skip
    # no val folder: a stratified quarter of train became val
    assert _counts(records, dm) == {"train": dict.fromkeys(dm.class_names, 3), "val": dict.fromkeys(dm.class_names, 1),
                                    "test": dict.fromkeys(dm.class_names, 4)}  # fmt: skip
    assert records["expression"].notna().all()


def test_declared_extra_classes_keep_their_ids_found_ones_follow(make_cfg, tmp_path):
    _folders(tmp_path, {"focused": 3, "bored": 3, "neutral": 3}, "train")
    _folders(tmp_path, {"focused": 1, "bored": 1, "neutral": 1}, "val", seed=500)
    dm = _dm(make_cfg, tmp_path, "data.extra_classes=[focused]")
    dm.load_records()
    assert dict(zip(dm.class_names, dm.class_ids)) == {"neutral": 0, "bored": 12, "focused": 11}
    assert dm.class_names == ["neutral", "bored", "focused"]


def test_explicit_classes_restrict_order_and_warn_what_they_drop(make_cfg, tmp_path, caplog):
    counts = {"focused": 3, "happy": 3, "sadness": 2, "bored": 1}
    _folders(tmp_path, counts, "train")
    _folders(tmp_path, counts, "val", seed=700)
    # focused is a found folder: no data.extra_classes needed to name it
    dm = _dm(make_cfg, tmp_path, "data.classes=[happy,focused]")
    with caplog.at_level(logging.WARNING, logger="fer_lightning.data.datamodule"):
        records = dm.load_records()
    assert dm.class_names == ["happy", "focused"]
    assert dm.class_ids == [1, FIRST_EXTRA_ID + 1]  # bored 11, focused 12: found classes by name
    assert _counts(records, dm) == {"train": {"happy": 3, "focused": 3}, "val": {"happy": 3, "focused": 3},
                                    "test": {"happy": 0, "focused": 0}}  # fmt: skip
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "outside data.classes" in r.getMessage()]
    assert len(warned) == 1
    message = warned[0].getMessage()
    assert message.startswith(
        "dropped 6 rows of classes outside data.classes=[happy,focused]: {'sad': 4, 'bored': 2}; to train on a "
        "class, add it to data.classes"
    )


def test_explicit_class_that_is_neither_found_nor_declared_is_refused(make_cfg, tmp_path):
    _folders(tmp_path, {"happy": 2, "sad": 2}, "train")
    dm = _dm(make_cfg, tmp_path, "data.classes=[happy,focused]")
    with pytest.raises(DataConfigError) as err:
        dm.load_records()
    msg = str(err.value)
    assert "data.classes: unknown class 'focused'" in msg and "data.extra_classes" in msg
    assert f"class labels found in {tmp_path}: ['happy', 'sad']" in msg


def test_a_class_without_training_samples_is_refused_at_start_up(make_cfg, tmp_path):
    _folders(tmp_path, {"happy": 3, "sad": 3}, "train")
    _folders(tmp_path, {"happy": 1, "sad": 1}, "val", seed=200)
    _folders(tmp_path, {"happy": 1, "sad": 1, "contempt": 2}, "test", seed=300)
    with pytest.raises(DataConfigError) as err:
        _dm(make_cfg, tmp_path).load_records()
    assert str(err.value).startswith(
        f"classes ['contempt'] have no training sample after the split of {tmp_path} (train counts "
    )
    assert "add training images of them (data.classes=auto took every class found)" in str(err.value)
    # the remedy never drops a class of the data set
    assert "data.classes=[" not in str(err.value)
    # an explicit list naming a class the data lacks (CK+ has no neutral): refused, pointing at auto
    with pytest.raises(DataConfigError, match=r"classes \['neutral'\] have no training sample.*data\.classes=auto"):
        _dm(make_cfg, tmp_path, "data.classes=[neutral,happy,sad]").load_records()


def test_class_folders_without_split_folders_are_split_by_fractions(make_cfg, tmp_path):
    _folders(tmp_path, {"anger": 10, "happy": 10, "surprise": 10})
    dm = _dm(make_cfg, tmp_path, "data.split_fractions={train: 0.6, val: 0.2, test: 0.2}")
    records = dm.load_records()
    assert dm.class_names == ["happy", "surprise", "anger"]
    assert _counts(records, dm) == {
        "train": dict.fromkeys(dm.class_names, 6), "val": dict.fromkeys(dm.class_names, 2),
        "test": dict.fromkeys(dm.class_names, 2),
    }  # fmt: skip


def test_unknown_label_error_names_the_keys_that_keep_the_class(tmp_path):
    for i, name in enumerate(["a.png", "b.png", "c.png"]):
        write_image(tmp_path / name, i)
    table = {"path": ["a.png", "b.png", "c.png"], "split": "train", "expression": [1, None, 2],
             "label_raw": ["happy", "focused", "sad"]}  # fmt: skip
    rec = make_records(pd.DataFrame(table))
    with pytest.raises(DataCheckError) as err:
        run_checks(rec, tmp_path, classes=[1, 2])
    msg = str(err.value)
    assert "label 'focused' maps to no class" in msg
    assert "data.classes=auto" in msg and "data.extra_classes=[focused]" in msg and "data.classes=[...]" in msg
    assert "data.checks=drop" not in msg  # dropping a class is no fix
    # with other problems too, the policy advice comes for those
    rec.loc[2, "path"] = "missing.png"
    with pytest.raises(DataCheckError) as err:
        run_checks(rec, tmp_path, classes=[1, 2])
    assert "for the other problems: fix the data, or set data.checks=warn" in str(err.value)


def test_train_with_auto_classes_on_class_folders(make_cfg, tmp_path):
    from fer_lightning.train import train

    _folders(tmp_path / "set", {"happy": 6, "sadness": 6, "focused": 6})
    cfg = make_cfg("data=image_folder", f"data.root={tmp_path / 'set'}", "logger=none", "+trainer.fast_dev_run=true")
    results = train(cfg)
    assert 0.0 <= results["test/accuracy"] <= 1.0
    info = json.loads((Path(cfg.paths.output_dir) / "data" / "data_summary.json").read_text())
    assert info["classes"] == ["happy", "sad", "focused"]
    assert info["class_ids"] == [1, 2, FIRST_EXTRA_ID]


# ------------------------------------------------------------------------------------------ real data
@pytest.mark.realdata
@requires_ckplus48
def test_real_ckplus48_folder_as_published(make_cfg, tmp_path):
    records = read_records("image_folder", CK48)
    assert records["label_raw"].value_counts().to_dict() == CK48_COUNTS
    assert set(records["split"]) == {"train"} and records.attrs["needs_split"] is True
    assert records["expression"].notna().all()

    dm = _dm(make_cfg, CK48)
    split = dm.load_records()
    assert dm.class_names == ["happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"]
    assert dm.class_ids == [1, 2, 3, 4, 5, 6, 7]
    counts = _counts(split, dm)
    total = {n: sum(counts[s][n] for s in counts) for n in dm.class_names}
    assert total == {"happy": 207, "sad": 84, "surprise": 249, "fear": 75, "disgust": 177, "anger": 135,
                     "contempt": 54}  # fmt: skip
    assert {s: sum(c.values()) for s, c in counts.items()} == {"train": 687, "val": 147, "test": 147}
    assert all(n > 0 for n in counts["train"].values())
