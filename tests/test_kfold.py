"""K-fold cross-validation: k child runs on disjoint stratified folds, and the parent's mean/std per metric."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient

from fer_lightning.config import ConfigError
from fer_lightning.data.datamodule import DataConfigError
from fer_lightning.data.records import make_records
from fer_lightning.kfold import fold_records, fold_table
from fer_lightning.train import train


def test_kfold_child_runs_and_parent_aggregates(make_cfg, tmp_path):
    cfg = make_cfg("cv.folds=2", "trainer.limit_val_batches=1.0")
    results = train(cfg)
    client = MlflowClient(tracking_uri=cfg.logger.tracking_uri)
    exp = client.get_experiment_by_name("fer_lightning").experiment_id
    runs = client.search_runs([exp])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(runs) == 3 and len(parents) == 1
    parent = parents[0]
    children = sorted((r for r in runs if r is not parent), key=lambda r: r.data.tags["cv.fold"])
    assert all(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children)
    assert [c.data.tags["cv.fold"] for c in children] == ["1", "2"]
    assert [c.data.params["data.fold.index"] for c in children] == ["0", "1"]
    assert parent.data.tags["cv.folds"] == "2" and parent.info.status == "FINISHED"

    # the parent holds numpy's mean and sample std (ddof=1) of every metric the children logged at the end
    child_keys = set(children[0].data.metrics) & set(children[1].data.metrics)
    keys = sorted(k for k in child_keys if k.startswith(("val/", "test/")))
    assert "val/f1_macro" in keys and "test/accuracy" in keys
    for key in keys:
        values = np.array([c.data.metrics[key] for c in children])
        mean, std = parent.data.metrics[key], parent.data.metrics[f"{key}_std"]
        if np.isnan(values).any():
            assert math.isnan(mean)
            continue
        assert mean == pytest.approx(np.mean(values), abs=1e-12), key
        assert std == pytest.approx(np.std(values, ddof=1), abs=1e-12), key
    assert results["val/f1_macro"] == pytest.approx(parent.data.metrics["val/f1_macro"])
    assert results["folds"] == 2

    # per-fold table artifact
    names = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"cv_folds.csv", "cv_folds.md"} <= names
    table = pd.read_csv(Path(cfg.paths.output_dir) / "cv_folds.csv", index_col="fold")
    assert list(table.index) == ["1", "2", "mean", "std"]
    assert table.loc["1", "val/accuracy"] == pytest.approx(children[0].data.metrics["val/accuracy"])

    # the folds: val sets disjoint, together the whole train+val pool, stratified; test rows untouched
    splits = [pd.read_csv(Path(cfg.paths.output_dir) / f"fold{i}" / "data" / "split.csv") for i in (1, 2)]
    val = [set(s.loc[s.split == "val", "path"]) for s in splits]
    pool = set(splits[0].loc[splits[0].split != "test", "path"])
    assert not (val[0] & val[1]) and val[0] | val[1] == pool and len(pool) == 240
    assert set(splits[0].loc[splits[0].split == "test", "path"]) == set(
        splits[1].loc[splits[1].split == "test", "path"]
    )


def _records(counts: dict[int, int]) -> pd.DataFrame:
    labels = [c for c, n in counts.items() for _ in range(n)]
    n = len(labels)
    split = ["train"] * (n - 4) + ["val"] * 2 + ["test"] * 2
    return make_records(pd.DataFrame({"path": [f"{i}.png" for i in range(n)], "split": split, "expression": labels}))


def test_fold_records_stratified_disjoint_and_seeded():
    records = _records({0: 12, 1: 9, 2: 6})
    folds = [fold_records(records, folds=3, index=i, seed=5) for i in range(3)]
    val = [set(np.flatnonzero(f["split"] == "val")) for f in folds]
    pool = set(np.flatnonzero(records["split"] != "test"))
    assert set.union(*val) == pool and sum(len(v) for v in val) == len(pool)
    for f in folds:
        assert (f["split"] == "test").sum() == 2 and (f["split"][-2:] == "test").all()
        counts = f.loc[f["split"] == "val", "expression"].value_counts()
        pool_counts = records.loc[records["split"] != "test", "expression"].value_counts()
        assert all(abs(counts[c] - pool_counts[c] / 3) < 1 for c in pool_counts.index)  # stratified
    again = fold_records(records, folds=3, index=1, seed=5)
    assert again["split"].equals(folds[1]["split"])
    assert not fold_records(records, folds=3, index=1, seed=6)["split"].equals(folds[1]["split"])


def test_fold_errors_name_the_key(make_cfg):
    with pytest.raises(DataConfigError, match="cv.folds=5"):
        fold_records(_records({0: 12, 1: 3}), folds=5, index=0, seed=0)
    with pytest.raises(DataConfigError, match="data.fold.index=3"):
        fold_records(_records({0: 12, 1: 9}), folds=3, index=3, seed=0)
    with pytest.raises(ConfigError, match="cv.folds"):
        train(make_cfg("cv.folds=1", "logger=none"))


def test_fold_table_mean_and_sample_std():
    table = fold_table([{"a": 1.0, "b": 2.0, "best_checkpoint": "x"}, {"a": 3.0, "b": 2.0}, {"a": 5.0, "b": 5.0}])
    assert list(table.columns) == ["a", "b"]
    assert table.loc["mean", "a"] == 3.0 and table.loc["std", "a"] == pytest.approx(2.0)
    assert table.loc["std", "b"] == pytest.approx(math.sqrt(3.0))


def test_fold_records_keeps_each_group_in_one_fold():
    records = _records({0: 24, 1: 18, 2: 12})  # rows in class blocks: every group g0..g9 has every class
    groups = np.array([f"g{i % 10}" for i in range(len(records))], dtype=object)
    pool = (records["split"] != "test").to_numpy()
    folds = [fold_records(records, folds=3, index=i, seed=5, groups=groups) for i in range(3)]
    val_groups = []
    for f in folds:
        split = f["split"].astype(str).to_numpy()
        train, val = set(groups[split == "train"]), set(groups[split == "val"])
        assert train and val and not train & val  # no group on both sides of a fold
        assert set(f.loc[f["split"] == "val", "expression"]) == {0, 1, 2}
        assert (split[~pool] == "test").all()
        val_groups.append(val)
    assert set.union(*val_groups) == set(groups[pool]) and sum(map(len, val_groups)) == 10
    again = fold_records(records, folds=3, index=1, seed=5, groups=groups)
    assert again["split"].equals(folds[1]["split"])
    with pytest.raises(DataConfigError, match=r"cv.folds=12: .*12 folds need at least 12 groups.*data.group_by"):
        fold_records(records, folds=12, index=0, seed=5, groups=groups)


def test_datamodule_fold_with_group_by(make_cfg, tmp_path):
    from layouts import write_legend_csv

    from fer_lightning.data.datamodule import FERDataModule

    root = tmp_path / "legend"
    write_legend_csv(root, [("neutral", "happiness", "sadness", "surprise")[i % 4] for i in range(84)])
    val_groups = []
    for index in range(2):
        cfg = make_cfg("data=legend_csv", f"data.root={root}", "data.classes=[neutral,happy,sad,surprise]",
                       "data.group_by=annotator", f"+data.fold={{folds:2,index:{index},seed:0}}",
                       "data.leakage.policy=off", "logger=none")  # fmt: skip
        records = FERDataModule(cfg.data, seed=0, cache_dir=cfg.paths.cache_dir).load_records()
        by_split = records.groupby("split", observed=True)["group"].agg(lambda g: set(g.astype(str)))
        assert not by_split["train"] & by_split["val"] and not by_split["val"] & by_split["test"]
        assert not by_split["train"] & by_split["test"]
        val_groups.append(by_split["val"])
    assert not val_groups[0] & val_groups[1]
