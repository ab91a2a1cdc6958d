"""A short training on the real CK+48 images, as a user runs it: subject-disjoint split, numbers checked by sklearn."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from realdata import CK48, CK48_SUBJECT, requires_ckplus48
from sklearn.metrics import accuracy_score, f1_score

from fer_lightning.train import train

pytestmark = [pytest.mark.realdata, requires_ckplus48]


def test_short_training_on_ckplus48_keeps_subjects_apart_and_learns(make_cfg, tmp_path):
    cfg = make_cfg(
        "experiment=small_gray48",
        "data=image_folder",
        f"data.root={CK48}",
        f'data.group_by="{CK48_SUBJECT}"',
        "data.leakage.policy=off",
        "trainer.max_epochs=6",
        "eval.tta=none",
        debug=None,
    )
    results = train(cfg)

    split = pd.read_csv(tmp_path / "out" / "data" / "split.csv")
    assert len(split) == 981 and {"path", "split", "group"} <= set(split.columns)
    subjects = split["path"].map(lambda p: re.match(r"^(S\d+)_", p.rsplit("/", 1)[-1]).group(1))
    assert (subjects == split["group"].astype(str)).all()
    sides = split.groupby("group")["split"].nunique()
    assert sides.max() == 1, f"subjects on two sides: {list(sides[sides > 1].index)}"
    assert split["group"].nunique() == 118

    preds = pd.read_csv(next((tmp_path / "out").rglob("predictions_test.csv")))
    test_paths = set(split.loc[split["split"] == "test", "path"])
    assert set(preds["path"]) == test_paths
    assert results["test/accuracy"] == pytest.approx(accuracy_score(preds["true"], preds["predicted"]), abs=1e-6)
    assert results["test/f1_macro"] == pytest.approx(
        f1_score(preds["true"], preds["predicted"], average="macro"), abs=1e-6
    )
    # 7 classes, the largest (surprise) a quarter of the set: six short epochs are well above that
    assert results["test/accuracy"] > 0.4
