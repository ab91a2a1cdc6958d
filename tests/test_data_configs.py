"""conf/data/{image_folder,legend_csv,fer2013_csv}.yaml end to end: a fixture in the real layout -> train()."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import pandas as pd
import pytest
from layouts import write_fer2013_csv, write_image_folder, write_legend_csv, write_via_metadata

from fer_lightning.data.datamodule import DataConfigError, FERDataModule
from fer_lightning.train import train

FAST = ("logger=none", "+trainer.fast_dev_run=true")


def _summary(cfg) -> dict:
    return json.loads((Path(cfg.paths.output_dir) / "data" / "data_summary.json").read_text())


@pytest.mark.parametrize("name", ["image_folder", "legend_csv", "fer2013_csv"])
def test_data_config_defaults_and_missing_root(make_cfg, name):
    cfg = make_cfg(f"data={name}", "logger=none", debug=None)
    assert cfg.data.format == name and cfg.data.synthetic is None
    # `root: ???` merged onto the synthetic default's null stays null: the data module names the key
    assert cfg.data.root is None
    # only options this format's reader takes (nothing inherited from the synthetic defaults)
    reader = importlib.import_module(f"fer_lightning.formats.{name}").read
    assert set(cfg.data.reader) <= set(inspect.signature(reader).parameters)
    assert (cfg.data.image_size, cfg.data.channels) == {"legend_csv": (96, 1)}.get(name, (48, 1))
    with pytest.raises(DataConfigError, match=r"data\.root"):
        train(cfg)


def test_image_folder_custom_classes_carved_val_and_metadata_issues(make_cfg, tmp_path):
    root = tmp_path / "emotions"
    folders = ("focused", "happy", "neutral", "surprised")
    write_image_folder(root, {"train": {f: 8 for f in folders}, "test": {f: 3 for f in folders}})
    # VIA metadata in one class folder, with a row for an image that is not there
    write_via_metadata(root / "train/happy/metadata.csv",
                       [(f"{i:03d}.png", {"caption": "", "gender": "male" if i % 2 else "female"}) for i in range(8)]
                       + [("gone.png", {"gender": "male"})])  # fmt: skip
    cfg = make_cfg("data=image_folder", f"data.root={root}", "data.extra_classes=[focused]",
                   "data.classes=[focused,happy,neutral,surprise]", "data.val_fraction=0.25", *FAST)  # fmt: skip

    results = train(cfg)

    assert 0.0 <= results["test/accuracy"] <= 1.0
    info = _summary(cfg)
    assert info["classes"] == ["focused", "happy", "neutral", "surprise"]
    assert info["label_mapping"] == {"focused": "focused", "happy": "happy", "neutral": "neutral",
                                     "surprised": "surprise"}  # fmt: skip
    # no val folder: a stratified quarter of train (8 per class) became val
    assert info["counts"]["train"] == dict.fromkeys(info["classes"], 6)
    assert info["counts"]["val"] == dict.fromkeys(info["classes"], 2)
    assert info["counts"]["test"] == dict.fromkeys(info["classes"], 3)
    data_dir = Path(cfg.paths.output_dir) / "data"
    issues = pd.read_csv(data_dir / "metadata_issues.csv")
    assert ("train/happy/gone.png", "metadata row for a file that does not exist") in set(
        zip(issues["path"], issues["reason"])
    )
    # the folders without metadata are reported too: 3 in train, 4 in test
    assert (issues["reason"] == "class folder has no VIA metadata CSV while other class folders have one").sum() == 7
    checks = (data_dir / "checks.txt").read_text()
    assert f"reader metadata issues: {len(issues)}" in checks and "train/happy/gone.png" in checks


LEGEND_SPELLINGS = {
    "anger": ["anger", "ANGER"],
    "surprise": ["surprise", "Surprise"],
    "disgust": ["disgust", "DISGUST"],
    "fear": ["fear", "FEAR"],
    "neutral": ["neutral", "NEUTRAL"],
    "happy": ["happiness", "HAPPINESS"],
    "sad": ["sadness", "SADNESS"],
    "contempt": ["contempt", "CONTEMPT"],
}


def test_legend_csv_mixed_case_split_saved_and_reused(make_cfg, tmp_path):
    root = tmp_path / "emotion_detection"
    labels = [LEGEND_SPELLINGS[c][i % 2] for c in LEGEND_SPELLINGS for i in range(8)]
    names = write_legend_csv(root, labels)
    cfg = make_cfg("data=legend_csv", f"data.root={root}", "seed=1", *FAST)

    train(cfg)

    info = _summary(cfg)
    expected_mapping = {s: c for c, spellings in LEGEND_SPELLINGS.items() for s in spellings}
    assert info["label_mapping"] == expected_mapping
    saved = Path(cfg.paths.output_dir) / "data" / "split.csv"
    split = pd.read_csv(saved)
    assert sorted(split["path"]) == sorted(f"images/{n}" for n in names)
    # 0.7 / 0.15 / 0.15 of 64 rows: round(9.6) = 10 for val and test, stratified so that every class is in each
    assert split["split"].value_counts().to_dict() == {"train": 44, "val": 10, "test": 10}
    for part in ("train", "val", "test"):
        assert all(n > 0 for n in info["counts"][part].values()), (part, info["counts"][part])

    # another seed draws another split, unless the saved one is reused
    def load(*overrides):
        c = make_cfg("data=legend_csv", f"data.root={root}", *overrides, "logger=none")
        return FERDataModule(c.data, seed=int(c.seed), cache_dir=c.paths.cache_dir).load_records()

    def as_dict(records: pd.DataFrame) -> dict[str, str]:
        return dict(zip(records["path"].astype(str), records["split"].astype(str)))

    saved_split = as_dict(split)
    assert as_dict(load("seed=7")) != saved_split
    assert as_dict(load("seed=7", f"data.split_file={saved}")) == saved_split

    cfg2 = make_cfg("data=legend_csv", f"data.root={root}", "seed=7", f"data.split_file={saved}",
                    f"paths.output_dir={tmp_path / 'out2'}", *FAST)  # fmt: skip
    train(cfg2)
    again = pd.read_csv(tmp_path / "out2" / "data" / "split.csv")
    assert as_dict(again) == saved_split

    # a saved split that does not cover the data is refused, naming the setting
    split.iloc[1:].to_csv(tmp_path / "partial.csv", index=False)
    with pytest.raises(DataConfigError, match=r"data\.split_file=.*partial\.csv.*1 records have no saved split"):
        load(f"data.split_file={tmp_path / 'partial.csv'}")


def test_fer2013_csv_ids_mapped_by_name(make_cfg, tmp_path):
    root = tmp_path / "fer2013"
    usages = ["Training"] * 4 + ["PublicTest"] * 2 + ["PrivateTest"] * 2
    write_fer2013_csv(root, [(name, usage) for name in ("angry", "disgust", "fear", "happy", "sad", "surprise",
                                                        "neutral") for usage in usages])  # fmt: skip
    cfg = make_cfg("data=fer2013_csv", f"data.root={root}", *FAST)

    results = train(cfg)

    assert 0.0 <= results["test/accuracy"] <= 1.0
    info = _summary(cfg)
    assert info["label_mapping"] == {"0": "anger", "1": "disgust", "2": "fear", "3": "happy", "4": "sad",
                                     "5": "surprise", "6": "neutral"}  # fmt: skip
    assert info["classes"] == ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger"]
    assert info["counts"] == {
        "train": dict.fromkeys(info["classes"], 4),
        "val": dict.fromkeys(info["classes"], 2),
        "test": dict.fromkeys(info["classes"], 2),
    }
