"""Stratified hold-out, train/val/test split, k-fold and saved splits, against hand counts."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from realdata import CK48, requires_ckplus48

from fer_lightning.data.records import make_records
from fer_lightning.data.splits import (
    SplitError,
    kfold_assign,
    load_split,
    resolve_groups,
    save_split,
    shared_groups,
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


# ------------------------------------------------------------------------------------------ groups (subjects)
CLASS_DIRS = {0: "neutral", 1: "happy", 2: "sad", 3: "surprise"}


def _subjects(n_subjects: int = 40, seed: int = 0) -> pd.DataFrame:
    """CK+-like: each subject S<id> has 1-4 sequences of 3 frames; a sequence has one class, a subject several."""
    rng = np.random.default_rng(seed)
    rows = []
    for subj in range(1, n_subjects + 1):
        for seq in range(1, int(rng.integers(1, 5)) + 1):
            cls = int(rng.integers(0, 4))
            for frame in range(3):
                name = f"S{subj:03d}_{seq:03d}_{frame:08d}.png"
                rows.append({"path": f"{CLASS_DIRS[cls]}/{name}", "expression": cls, "group_subject": f"S{subj:03d}"})
    return make_records(pd.DataFrame(rows).assign(split="train"))


SUBJECT_RE = "re:^(S[0-9]+)_"


def _sides(out: pd.DataFrame, groups: np.ndarray) -> dict[str, set[str]]:
    split = out["split"].astype(str).to_numpy()
    return {name: set(groups[split == name]) for name in ("train", "val", "test") if (split == name).any()}


def _assert_disjoint(sides: dict[str, set[str]]) -> None:
    names = list(sides)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not sides[a] & sides[b], (a, b, sides[a] & sides[b])


def test_groups_from_a_column_or_a_regex_over_the_file_name():
    rec = _subjects(10)
    by_regex = resolve_groups(rec, SUBJECT_RE)
    assert by_regex[0] == "S001" and by_regex.dtype == object
    np.testing.assert_array_equal(by_regex, resolve_groups(rec, "group_subject"))
    # the regex is searched in the file name; with a / in it, in the whole relative path
    assert set(resolve_groups(rec, "re:_(\\d{3})_")) <= {f"{i:03d}" for i in range(1, 5)}  # sequence ids
    assert set(resolve_groups(rec, "re:^([a-z]+)/")) == set(rec["path"].str.split("/").str[0])  # class folders
    # any column there is works, whatever its dtype
    assert set(resolve_groups(rec, "expression")) <= {"0", "1", "2", "3"}


def test_a_row_without_a_group_is_an_error_naming_row_path_and_key():
    rec = _subjects(10)
    rec.loc[5, "path"] = "happy/subject7.png"
    rec.loc[9, "path"] = "sad/X_001.png"
    with pytest.raises(SplitError) as err:
        resolve_groups(rec, SUBJECT_RE)
    msg = str(err.value)
    assert msg.startswith("data.group_by='re:^(S[0-9]+)_': 2 of ")
    assert "rows have no group, the regex matches nothing (or an empty group) in the file name" in msg
    assert "row 5 'happy/subject7.png', row 9 'sad/X_001.png'" in msg and "re:<regex>" in msg
    rec["group_subject"] = rec["group_subject"].astype(object)
    rec.loc[3, "group_subject"] = None
    with pytest.raises(SplitError, match=r"1 of \d+ rows have no group, no value in column 'group_subject': row 3"):
        resolve_groups(rec, "group_subject")
    with pytest.raises(SplitError, match=r"data.group_by='subject': the records have no column 'subject' \(columns"):
        resolve_groups(rec, "subject")
    with pytest.raises(SplitError, match="exactly one capture group.*it has 2"):
        resolve_groups(rec, "re:^(S)([0-9]+)")
    with pytest.raises(SplitError, match="exactly one capture group.*it has 0"):
        resolve_groups(rec, "re:^S[0-9]+")
    with pytest.raises(SplitError, match="not a valid regular expression"):
        resolve_groups(rec, "re:^(S[0-9]+")


def test_grouped_holdout_keeps_each_subject_on_one_side(caplog):
    rec = _subjects(40)
    groups = resolve_groups(rec, SUBJECT_RE)
    with caplog.at_level(logging.INFO, logger="fer_lightning.data.splits"):
        out = stratified_holdout(rec, fraction=0.2, seed=0, groups=groups)
    sides = _sides(out, groups)
    _assert_disjoint(sides)
    assert sides["train"] | sides["val"] == set(groups)
    share = (out["split"] == "val").mean()
    assert 0.12 < share < 0.28, share  # one fold of 5: about a fifth
    assert set(_counts(out, "val")) == set(_counts(out, "train")) == {0, 1, 2, 3}  # every class on both sides
    assert f"groups (data.group_by) per split: train {len(sides['train'])}, val {len(sides['val'])}" in caplog.text
    assert out["path"].tolist() == rec["path"].tolist()
    # seeded: the same seed draws the same subjects, another seed others
    pd.testing.assert_frame_equal(out, stratified_holdout(rec, fraction=0.2, seed=0, groups=groups))
    other = stratified_holdout(rec, fraction=0.2, seed=1, groups=groups)
    assert _sides(other, groups)["val"] != sides["val"]
    # without groups the same call splits subjects across the sides
    assert shared_groups(stratified_holdout(rec, fraction=0.2, seed=0)["split"], groups)


def test_grouped_three_way_split_keeps_each_subject_in_one_split():
    rec = _subjects(60)
    groups = resolve_groups(rec, "group_subject")
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    out = stratified_split(rec, fractions=fractions, seed=3, groups=groups)
    sides = _sides(out, groups)
    _assert_disjoint(sides)
    assert set.union(*sides.values()) == set(groups) and shared_groups(out["split"], groups) == []
    shares = out["split"].value_counts(normalize=True)
    for name, f in fractions.items():
        assert abs(shares[name] - f) < 0.07, (name, shares[name])
    for name in fractions:
        assert set(_counts(out, name)) == {0, 1, 2, 3}, name
    pd.testing.assert_frame_equal(out, stratified_split(rec, fractions=fractions, seed=3, groups=groups))
    assert not out["split"].equals(stratified_split(rec, fractions=fractions, seed=4, groups=groups)["split"])


def test_grouped_kfold_puts_each_subject_in_one_fold():
    rec = pd.concat([_subjects(50), _records({0: 4}, "test", "t/")], ignore_index=True)
    groups = np.concatenate([resolve_groups(rec.iloc[:-4], SUBJECT_RE), ["T"] * 4]).astype(object)
    folds = kfold_assign(rec, k=5, seed=0, groups=groups)
    train_groups = groups[(rec["split"] == "train").to_numpy()]
    assert folds.shape == train_groups.shape and set(folds.tolist()) == {0, 1, 2, 3, 4}
    per_group = pd.Series(folds).groupby(train_groups).nunique()
    assert (per_group == 1).all()  # no subject in two folds
    train = rec.loc[rec["split"] == "train"].assign(fold=folds)
    sizes = train["fold"].value_counts()
    assert sizes.max() - sizes.min() < 0.1 * len(train), sizes.to_dict()
    for f in range(5):
        assert set(train.loc[train["fold"] == f, "expression"]) == {0, 1, 2, 3}, f
    np.testing.assert_array_equal(folds, kfold_assign(rec, k=5, seed=0, groups=groups))
    assert not np.array_equal(folds, kfold_assign(rec, k=5, seed=1, groups=groups))


def test_grouped_splits_without_labels_draw_whole_groups_at_random(caplog):
    rec = _subjects(30).assign(expression=pd.array([pd.NA] * len(_subjects(30)), dtype="Int64"))
    groups = resolve_groups(rec, SUBJECT_RE)
    with caplog.at_level(logging.INFO, logger="fer_lightning.data.splits"):
        out = stratified_holdout(rec, fraction=0.2, seed=0, groups=groups)
        folds = kfold_assign(rec, k=3, seed=0, groups=groups)
    _assert_disjoint(_sides(out, groups))
    assert 0.1 < (out["split"] == "val").mean() < 0.3
    assert "no labels to stratify by: whole groups (data.group_by) drawn at random" in caplog.text
    assert (pd.Series(folds).groupby(groups).nunique() == 1).all() and set(folds.tolist()) == {0, 1, 2}


def test_grouped_split_with_few_groups_falls_back_to_group_shuffle(caplog):
    rec = _subjects(6)
    groups = resolve_groups(rec, SUBJECT_RE)
    with caplog.at_level(logging.WARNING, logger="fer_lightning.data.splits"):
        out = stratified_holdout(rec, fraction=0.1, seed=0, groups=groups)  # 10 folds, 6 groups
    _assert_disjoint(_sides(out, groups))
    assert "6 groups (data.group_by) are too few for 10 stratified folds" in caplog.text
    assert "GroupShuffleSplit" in caplog.text


def test_grouped_split_errors_name_the_key():
    rec = _subjects(20)
    groups = resolve_groups(rec, SUBJECT_RE)
    lonely = rec.copy()
    lonely.loc[lonely["group_subject"] == "S001", "expression"] = 7  # class 7 lives in one subject only
    with pytest.raises(SplitError, match=r"fewer than 2 groups \(data.group_by\).*\{7: 1\}.*data.group_by=null"):
        stratified_holdout(lonely, fraction=0.2, seed=0, groups=groups)
    with pytest.raises(SplitError, match=r"fewer than 5 groups.*\{7: 1\}"):
        kfold_assign(lonely, k=5, seed=0, groups=groups)
    with pytest.raises(SplitError, match=r"all \d+ rows are in one group \(data.group_by\)"):
        stratified_holdout(rec, fraction=0.2, seed=0, groups=np.array(["one"] * len(rec), dtype=object))
    with pytest.raises(SplitError, match=r"25 folds need at least 25 groups, the \d+ rows have 20; use fewer folds"):
        kfold_assign(rec, k=25, seed=0, groups=groups)


def test_split_file_records_the_group_and_old_files_still_load(tmp_path):
    rec = _subjects(20)
    groups = resolve_groups(rec, SUBJECT_RE)
    out = stratified_holdout(rec, fraction=0.25, seed=0, groups=groups).assign(group=groups)
    path = tmp_path / "split.csv"
    save_split(out, path)
    saved = pd.read_csv(path)
    assert saved.columns.tolist() == ["path", "split", "group"] and saved["group"].tolist() == list(groups)
    loaded = load_split(rec.assign(split="train"), path)
    assert loaded["split"].tolist() == out["split"].tolist()
    # a split.csv from before groups (path,split only) still loads
    saved[["path", "split"]].to_csv(tmp_path / "old.csv", index=False)
    assert load_split(rec, tmp_path / "old.csv")["split"].tolist() == out["split"].tolist()


# ----------------------------------------------------------------------------------------------- real data
CK48_IDS = {"anger": 6, "contempt": 7, "disgust": 5, "fear": 4, "happy": 1, "sadness": 2, "surprise": 3}


@pytest.mark.realdata
@requires_ckplus48
def test_real_ckplus48_subject_disjoint_split_and_folds():
    files = sorted(CK48.glob("*/*.png"))
    rec = make_records(
        pd.DataFrame(
            {
                "path": [f"{f.parent.name}/{f.name}" for f in files],
                "split": "train",
                "expression": [CK48_IDS[f.parent.name] for f in files],
            }
        )
    )
    assert len(rec) == 981
    groups = resolve_groups(rec, SUBJECT_RE)
    assert len(set(groups)) == 118 and groups[0].startswith("S")
    out = stratified_split(rec, fractions={"train": 0.7, "val": 0.15, "test": 0.15}, seed=0, groups=groups)
    sides = _sides(out, groups)
    _assert_disjoint(sides)
    assert sum(map(len, sides.values())) == 118
    shares = out["split"].value_counts(normalize=True)
    assert abs(shares["train"] - 0.7) < 0.08 and abs(shares["test"] - 0.15) < 0.06, shares.to_dict()
    for name in ("train", "val", "test"):
        assert set(_counts(out, name)) == set(CK48_IDS.values()), name
    # the carved hold-out and 5 folds of what is not test
    held = stratified_holdout(out.loc[out["split"] != "test"].assign(split="train"), fraction=0.1, seed=0,
                              groups=groups[(out["split"] != "test").to_numpy()])  # fmt: skip
    assert not shared_groups(held["split"], groups[(out["split"] != "test").to_numpy()])
    pool = out.assign(split=np.where(out["split"] == "test", "test", "train"))
    folds = kfold_assign(pool, k=5, seed=0, groups=groups)
    pool_groups = groups[(pool["split"] == "train").to_numpy()]
    assert (pd.Series(folds).groupby(pool_groups).nunique() == 1).all()
    train = pool.loc[pool["split"] == "train"].assign(fold=folds)
    for f in range(5):
        part = train.loc[train["fold"] == f]
        assert 0.12 < len(part) / len(train) < 0.28, (f, len(part))
        assert set(part["expression"]) == set(CK48_IDS.values()), f


# ------------------------------------------------------------------------------------- through the data module
def _legend_module(make_cfg, tmp_path: Path):
    from layouts import write_legend_csv

    from fer_lightning.data.datamodule import FERDataModule

    root = tmp_path / "legend"
    if not root.exists():
        # 84 images, annotators user0..user6 (i % 7) with 3 images of each of the 4 classes (i % 4) each
        write_legend_csv(root, [("neutral", "happiness", "SADNESS", "surprise")[i % 4] for i in range(84)])

    def build(*overrides: str) -> FERDataModule:
        cfg = make_cfg("data=legend_csv", f"data.root={root}", "data.classes=[neutral,happy,sad,surprise]",
                       "data.leakage.policy=off", "logger=none", *overrides)  # fmt: skip
        return FERDataModule(cfg.data, seed=int(cfg.seed), cache_dir=cfg.paths.cache_dir)

    return build


def test_datamodule_group_by_column_regex_split_file_and_errors(make_cfg, tmp_path, caplog):
    from fer_lightning.data.datamodule import DataConfigError

    build = _legend_module(make_cfg, tmp_path)
    dm = build("data.group_by=annotator")
    dm.records = dm.load_records()
    table = dm.split_table()
    assert table.columns.tolist() == ["path", "split", "group"]
    assert set(table["group"]) == {f"user{i}" for i in range(7)}
    assert shared_groups(table["split"], table["group"].astype(object).to_numpy()) == []
    assert set(table["split"]) == {"train", "val", "test"}
    # data/split.csv carries the group; data.split_file reads it back
    dm.write_artifacts(tmp_path / "data")
    saved = pd.read_csv(tmp_path / "data" / "split.csv")
    assert saved.columns.tolist() == ["path", "split", "group"]
    again = build("data.group_by=annotator", f"data.split_file={tmp_path / 'data' / 'split.csv'}").load_records()
    assert again["split"].tolist() == dm.records["split"].tolist()

    # the regex form, on the file name (images/face_012.jpg -> 1): 9 groups kept apart
    by_name = build('data.group_by="re:^face_0([0-9])"').load_records()
    groups = by_name["group"].astype(object).to_numpy()
    assert len(set(groups)) == 9 and shared_groups(by_name["split"], groups) == []

    # off by default: no group column, and the split artifact is path,split as before
    plain = build()
    plain.records = plain.load_records()
    assert "group" not in plain.records and plain.split_table().columns.tolist() == ["path", "split"]
    # a split file made without groups is used as it is, with a warning naming the groups it splits
    plain.write_artifacts(tmp_path / "plain")
    with caplog.at_level(logging.WARNING, logger="fer_lightning.data.datamodule"):
        build("data.group_by=annotator", f"data.split_file={tmp_path / 'plain' / 'split.csv'}").load_records()
    assert "groups (data.group_by=annotator) have rows in more than one split, e.g. ['user0'" in caplog.text
    assert "drop data.split_file to make a new one" in caplog.text

    with pytest.raises(DataConfigError) as err:
        build('data.group_by="re:^user([0-9]+)"').load_records()
    msg = str(err.value)
    assert "data.group_by='re:^user([0-9]+)': 84 of 84 rows have no group" in msg
    assert "row 0 'images/face_000.jpg'" in msg and "and 79 more" in msg
