"""Bias analysis: per-group metrics and gaps from VIA metadata (group_* columns), in training and in fer-eval."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from eval_helpers import compose_cfg, private_store, write_class_folder
from mlflow import MlflowClient
from sklearn.metrics import precision_recall_fscore_support

from fer_lightning.bias import bias_summary, bias_table, largest_gaps
from fer_lightning.evaluate import evaluate
from fer_lightning.train import train

CLASSES = ["neutral", "happy", "sad"]
# test images per class folder, with their VIA file attributes (the last sad image has no gender)
TEST_GROUPS = {
    "neutral": [{"age": "old", "gender": "male"}, {"age": "old", "gender": "female"}],
    "happy": [{"age": "young", "gender": "male"}, {"age": "young", "gender": "male"},
              {"age": "young", "gender": "female"}, {"age": "old", "gender": "female"}],
    "sad": [{"age": "young", "gender": "female"}, {"age": "old"}],
}  # fmt: skip
# A model that always answers "happy", by hand: (accuracy, macro precision, macro recall, macro F1) per group, with
# the macro averages over the classes present in the group (precision of a never-predicted class is 0).
EXPECTED = {
    ("age", "young"): (3 / 4, (3 / 4 + 0) / 2, (1 + 0) / 2, (6 / 7 + 0) / 2),  # happy x3, sad x1
    ("age", "old"): (1 / 4, (1 / 4) / 3, 1 / 3, (2 / 5) / 3),  # neutral x2, happy x1, sad x1
    ("gender", "male"): (2 / 3, (2 / 3) / 2, 1 / 2, (4 / 5) / 2),  # happy x2, neutral x1
    ("gender", "female"): (2 / 4, (2 / 4) / 3, 1 / 3, (2 / 3) / 3),  # neutral, happy x2, sad
    ("gender", "<NA>"): (0.0, 0.0, 0.0, 0.0),  # sad x1
}


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, shared_cache, mlflow_template_db):
    """An image-folder data set with VIA metadata on the test images, and a short training run on it."""
    root = tmp_path_factory.mktemp("bias")
    data_root = root / "faces"
    for i, name in enumerate(CLASSES):
        write_class_folder(data_root, "train", name, 6, seed=10 + i)
        write_class_folder(data_root, "val", name, 2, seed=20 + i)
        write_class_folder(data_root, "test", name, len(TEST_GROUPS[name]), attributes=TEST_GROUPS[name], seed=30 + i)
    uri = private_store(root, mlflow_template_db)
    data = ["data=image_folder", f"data.root={data_root}", f"data.classes=[{','.join(CLASSES)}]"]
    cfg = compose_cfg("train", root, shared_cache, uri, *data, "trainer.limit_test_batches=1.0")
    results = train(cfg)
    return SimpleNamespace(root=root, data_root=data_root, uri=uri, cache=shared_cache, data=data, results=results,
                           out=Path(cfg.paths.output_dir))  # fmt: skip


def _via_metadata(data_root: Path) -> dict[str, dict[str, str]]:
    """test/<class>/<file> -> attributes, parsed straight from the CSV files (not through the reader)."""
    out = {}
    for path in sorted((data_root / "test").glob("*/via_metadata.csv")):
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                out[f"test/{path.parent.name}/{row['filename']}"] = json.loads(row["file_attributes"])
    return out


def test_training_report_has_a_bias_table_matching_sklearn(folder_run, capsys):
    table = pd.read_csv(folder_run.out / "bias_test.csv", keep_default_na=False)
    pred = pd.read_csv(folder_run.out / "predictions_test.csv")
    meta = _via_metadata(folder_run.data_root)
    assert sorted(pred["path"]) == sorted(meta)
    for attribute in ("age", "gender"):
        values = pred["path"].map(lambda p, a=attribute: meta[p].get(a, "<NA>"))
        for value in sorted(set(values)):
            sub = pred[values == value]
            present = sorted(set(sub["true"]))
            p, r, f, _ = precision_recall_fscore_support(sub["true"], sub["predicted"], labels=present,
                                                         average="macro", zero_division=0)  # fmt: skip
            row = table[(table.attribute == attribute) & (table.value == value)].iloc[0]
            assert int(row.n) == len(sub)
            assert row.accuracy == pytest.approx(np.mean(sub["true"] == sub["predicted"]))
            assert (row.precision_macro, row.recall_macro, row.f1_macro) == pytest.approx((p, r, f))
    client = MlflowClient(tracking_uri=folder_run.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fer_lightning").experiment_id])
    assert {"bias_test.csv", "bias_test.md"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_eval_bias_table_of_a_model_with_known_outcomes(folder_run, tmp_path, capsys):
    # make the trained model answer "happy" for every image: outcomes per group are then known by hand
    ckpt = torch.load(folder_run.results["best_checkpoint"], map_location="cpu", weights_only=True)
    happy = ckpt["hyper_parameters"]["class_names"].index("happy")
    ckpt["state_dict"]["head.classifier.weight"].zero_()
    ckpt["state_dict"]["head.classifier.bias"].copy_(torch.where(torch.arange(3) == happy, 5.0, -5.0))
    path = tmp_path / "always_happy.ckpt"
    torch.save(ckpt, path)
    cfg = compose_cfg("eval", folder_run.root, folder_run.cache, folder_run.uri, f"ckpt_path={path}",
                      *folder_run.data, "trainer.limit_test_batches=1.0", "logger=none", out=str(tmp_path / "eval"))  # fmt: skip
    metrics = evaluate(cfg)
    assert metrics["test/accuracy"] == pytest.approx(4 / 8)
    table = pd.read_csv(tmp_path / "eval" / "bias_test.csv", keep_default_na=False)
    for (attribute, value), expected in EXPECTED.items():
        row = table[(table.attribute == attribute) & (table.value == value)].iloc[0]
        got = (row.accuracy, row.precision_macro, row.recall_macro, row.f1_macro)
        assert got == pytest.approx(expected), (attribute, value)
    gaps = table[table.value == "gap"].set_index("attribute")
    young, old = EXPECTED[("age", "young")], EXPECTED[("age", "old")]
    assert tuple(gaps.loc["age", ["accuracy", "precision_macro", "recall_macro", "f1_macro"]]) == pytest.approx(
        tuple(a - b for a, b in zip(young, old))
    )
    male, female = EXPECTED[("gender", "male")], EXPECTED[("gender", "female")]  # the <NA> group is not in the gap
    assert gaps.loc["gender", "accuracy"] == pytest.approx(male[0] - female[0])
    out = capsys.readouterr().out
    assert "bias analysis" in out and "age: largest gap 0.500 in accuracy (young 0.750 vs old 0.250)" in out


def test_bias_table_without_groups_and_bad_lengths():
    records = pd.DataFrame({"path": ["a", "b"], "split": ["test", "test"]})
    assert bias_table(np.array([0, 1]), np.array([0, 1]), records) is None
    records["group_age"] = pd.Categorical(["young", "young"])
    with pytest.raises(ValueError, match="one row per sample"):
        bias_table(np.array([0, 1, 1]), np.array([0, 1, 1]), records)
    table = bias_table(np.array([0, 1]), np.array([0, 0]), records)
    assert largest_gaps(table) == ["age: one group only (young); no gap to measure"]
    assert "bias analysis" in bias_summary(table)
