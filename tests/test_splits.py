"""Stratified hold-out, train/val/test split, k-fold and saved splits, against hand counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fer_lightning.data.records import make_records
from fer_lightning.data.splits import (
    SplitError,
    kfold_assign,
    load_split,
    save_split,
    stratified_holdout,
    stratified_split,
)


def _records(class_counts: dict[int | None, int], split: str = "train", prefix: str = "") -> pd.DataFrame:
    labels = [c for c, n in class_counts.items() for _ in range(n)]
    # interleave the classes so that a split by position alone would not be stratified by accident
    order = np.random.default_rng(123).permutation(len(labels))
    labels = [labels[i] for i in order]
    return make_records(
        pd.DataFrame(
            {
                "path": [f"{prefix}img/{i}.jpg" for i in range(len(labels))],
                "split": split,
                "expression": pd.array(labels, dtype="Int64"),
            }
        )
    )


def _counts(df: pd.DataFrame, split: str) -> dict[int, int]:
    return df.loc[df["split"] == split, "expression"].value_counts().sort_index().to_dict()


def test_holdout_is_stratified_with_hand_counts():
    rec = pd.concat([_records({0: 50, 1: 30, 2: 20}), _records({0: 5, 1: 5}, "test", "t/")], ignore_index=True)
    out = stratified_holdout(rec, fraction=0.2, seed=0)
    assert _counts(out, "val") == {0: 10, 1: 6, 2: 4}
    assert _counts(out, "train") == {0: 40, 1: 24, 2: 16}
    assert _counts(out, "test") == {0: 5, 1: 5}  # other splits untouched
    moved = out["split"] == "val"
    assert (rec.loc[moved, "split"] == "train").all()
    assert out["path"].tolist() == rec["path"].tolist()  # rows stay in place, only the split changes
    assert list(out["split"].cat.categories) == ["train", "val", "test"]


def test_holdout_is_deterministic_per_seed():
    rec = _records({0: 50, 1: 30, 2: 20})
    a = stratified_holdout(rec, fraction=0.2, seed=7)
    b = stratified_holdout(rec, fraction=0.2, seed=7)
    c = stratified_holdout(rec, fraction=0.2, seed=8)
    pd.testing.assert_frame_equal(a, b)
    assert not a["split"].equals(c["split"])
    assert _counts(c, "val") == {0: 10, 1: 6, 2: 4}


def test_holdout_leaves_existing_target_alone():
    rec = pd.concat([_records({0: 10, 1: 10}), _records({0: 2, 1: 2}, "val", "v/")], ignore_index=True)
    assert stratified_holdout(rec, fraction=0.5, seed=0) is rec


def test_holdout_unlabeled_rows_form_their_own_stratum():
    out = stratified_holdout(_records({0: 20, 1: 20, None: 10}), fraction=0.1, seed=3)
    val = out.loc[out["split"] == "val", "expression"]
    assert val.isna().sum() == 1 and val.value_counts().to_dict() == {0: 2, 1: 2}


def test_holdout_without_any_label_is_random_with_the_right_size():
    out = stratified_holdout(_records({None: 30}), fraction=0.2, seed=0)
    assert (out["split"] == "val").sum() == 6


def test_holdout_too_few_members_is_a_clear_error():
    with pytest.raises(SplitError, match=r"fewer than 2 rows.*\{2: 1\}.*data.classes"):
        stratified_holdout(_records({0: 20, 1: 20, 2: 1}), fraction=0.2, seed=0)
    with pytest.raises(SplitError, match="cannot hold one of each of the 3 classes"):
        stratified_holdout(_records({0: 20, 1: 20, 2: 2}), fraction=0.04, seed=0)
    with pytest.raises(SplitError, match=r"fraction must be in \(0, 1\)"):
        stratified_holdout(_records({0: 20, 1: 20}), fraction=1.0, seed=0)
    with pytest.raises(SplitError, match="no rows in split 'train'"):
        stratified_holdout(_records({0: 20, 1: 20}, "test"), fraction=0.1, seed=0)


def test_stratified_split_hand_counts_and_no_overlap():
    rec = _records({0: 100, 1: 60, 2: 40}, split="test")  # the old split column is ignored
    out = stratified_split(rec, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    assert _counts(out, "test") == {0: 20, 1: 12, 2: 8}
    assert _counts(out, "val") == {0: 20, 1: 12, 2: 8}
    assert _counts(out, "train") == {0: 60, 1: 36, 2: 24}
    per_split = [set(out.loc[out["split"] == s, "path"]) for s in ("train", "val", "test")]
    assert sum(map(len, per_split)) == 200 and len(set.union(*per_split)) == 200
    again = stratified_split(rec, fractions={"train": 0.6, "val": 0.2, "test": 0.2}, seed=1)
    pd.testing.assert_frame_equal(out, again)


def test_stratified_split_two_way_and_bad_fractions():
    out = stratified_split(_records({0: 30, 1: 10}), fractions={"train": 0.75, "test": 0.25}, seed=0)
    assert _counts(out, "test") == {0: 8, 1: 2} and _counts(out, "train") == {0: 22, 1: 8}
    assert (out["split"] == "val").sum() == 0
    with pytest.raises(SplitError, match="sum to 1"):
        stratified_split(out, fractions={"train": 0.5, "test": 0.2}, seed=0)
    with pytest.raises(SplitError, match=r"unknown split names \['holdout'\]"):
        stratified_split(out, fractions={"train": 0.5, "holdout": 0.5}, seed=0)


def test_kfold_covers_each_train_row_once_and_is_stratified():
    rec = pd.concat([_records({0: 50, 1: 30, 2: 20}), _records({0: 7}, "test", "t/")], ignore_index=True)
    folds = kfold_assign(rec, k=5, seed=0)
    assert folds.shape == (100,) and set(folds.tolist()) == {0, 1, 2, 3, 4}
    train = rec.loc[rec["split"] == "train"].assign(fold=folds)
    for f in range(5):
        assert train.loc[train["fold"] == f, "expression"].value_counts().sort_index().to_dict() == {0: 10, 1: 6, 2: 4}
    np.testing.assert_array_equal(folds, kfold_assign(rec, k=5, seed=0))
    assert not np.array_equal(folds, kfold_assign(rec, k=5, seed=1))


def test_kfold_errors():
    with pytest.raises(SplitError, match=r"fewer than 5 rows.*\{1: 3\}"):
        kfold_assign(_records({0: 20, 1: 3}), k=5, seed=0)
    with pytest.raises(SplitError, match="k >= 2"):
        kfold_assign(_records({0: 20, 1: 20}), k=1, seed=0)


def test_save_and_load_split_round_trip(tmp_path):
    rec = stratified_holdout(_records({0: 20, 1: 20}), fraction=0.25, seed=0)
    path = tmp_path / "splits" / "split.csv"
    save_split(rec, path)
    assert pd.read_csv(path).columns.tolist() == ["path", "split"]
    fresh = rec.assign(split="train")
    loaded = load_split(fresh.iloc[::-1], path)  # row order does not matter
    assert loaded.sort_index()["split"].tolist() == rec["split"].tolist()


def test_load_split_rejects_mismatched_paths(tmp_path):
    rec = _records({0: 5, 1: 5})
    path = tmp_path / "split.csv"
    save_split(rec, path)
    with pytest.raises(SplitError, match=r"1 saved paths are not in the records \(e.g. \['img/9.jpg'\]\)"):
        load_split(rec.iloc[:9], path)
    extra = pd.concat([rec, _records({0: 1}, prefix="new/")], ignore_index=True)
    with pytest.raises(SplitError, match=r"1 records have no saved split \(e.g. \['new/img/0.jpg'\]\)"):
        load_split(extra, path)
    (tmp_path / "bad.csv").write_text("path,split\nimg/0.jpg,holdout\n")
    with pytest.raises(SplitError, match="unknown split names"):
        load_split(rec, tmp_path / "bad.csv")
    with pytest.raises(SplitError, match="share a path"):
        save_split(pd.concat([rec, rec.iloc[:1]]), tmp_path / "dup.csv")
