"""fer-eval: a checkpoint trained here re-scores to the training run's own test metrics; links, artifacts, bad input."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from eval_helpers import compose_cfg, private_store, write_class_folder
from mlflow import MlflowClient
from PIL import Image
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score

from fer_lightning.evaluate import EvaluationError, evaluate
from fer_lightning.taxonomy import EXPRESSIONS_8
from fer_lightning.train import train

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"confusion_matrix_test.png", "per_class_recall_test.png", "roc_pr_test.png", "va_test.png"}
TABLES = {"baseline_comparison.md", "baseline_comparison.html", "predictions_test.csv", "metrics_test.json"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, shared_cache, mlflow_template_db):
    """One short real training run (full test split) in a private store."""
    root = tmp_path_factory.mktemp("eval_train")
    uri = private_store(root, mlflow_template_db)
    cfg = compose_cfg("train", root, shared_cache, uri, "trainer.limit_test_batches=1.0")
    results = train(cfg)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("fer_lightning").experiment_id])
    return SimpleNamespace(root=root, uri=uri, cache=shared_cache, results=results, run=run, client=client,
                           ckpt=results["best_checkpoint"])  # fmt: skip


def _eval_cfg(trained, out: str, *overrides: str):
    return compose_cfg("eval", trained.root, trained.cache, trained.uri, f"ckpt_path={trained.ckpt}",
                       "trainer.limit_test_batches=1.0", *overrides, out=out)  # fmt: skip


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6


def _eval_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name("fer_lightning").experiment_id
    return client.search_runs([exp], "tags.task = 'eval'")


def test_eval_reproduces_the_training_runs_test_metrics(trained):
    cfg = _eval_cfg(trained, "eval_same")
    metrics = evaluate(cfg)
    logged = {k: v for k, v in trained.run.data.metrics.items() if k.startswith("test/")}
    assert len(logged) > 40 and set(metrics) == set(logged)
    differ = {k: (metrics[k], logged[k]) for k in logged if not _same(metrics[k], logged[k])}
    assert not differ
    assert 0.0 <= metrics["test/accuracy"] <= 1.0 and "test/ccc_valence" in metrics

    # a new MLflow run, linked to the training run by tag, holding the same numbers
    (run,) = _eval_runs(trained.client)
    assert run.data.tags["source_run_id"] == trained.run.info.run_id
    assert run.data.tags["same_data_as_training"] == "true"
    assert run.data.tags["loss"] == "ce" and run.data.params["ckpt_path"] == str(Path(trained.ckpt).resolve())
    assert (run.data.params["loss"], run.data.params["data"]) == ("ce", "synthetic")  # fer-report groups by these
    assert run.info.status == "FINISHED"
    assert all(_same(run.data.metrics[k], v) for k, v in metrics.items())
    names = {a.path for a in trained.client.list_artifacts(run.info.run_id)}
    assert FIGURES | TABLES <= names
    # the training run wrote the same figure/table set at its end
    assert FIGURES | TABLES <= {a.path for a in trained.client.list_artifacts(trained.run.info.run_id)}

    # per-image predictions agree with the metrics under independent implementations (logged values are float32)
    out = Path(cfg.paths.output_dir)
    pred = pd.read_csv(out / "predictions_test.csv")
    assert len(pred) == 80 and pred["path"].str.startswith("val_set/images/").all()
    assert metrics["test/accuracy"] == pytest.approx(accuracy_score(pred["true"], pred["predicted"]), abs=1e-6)
    assert metrics["test/kappa"] == pytest.approx(cohen_kappa_score(pred["true"], pred["predicted"]), abs=1e-6)
    present = sorted(set(pred["true"]))
    f1 = f1_score(pred["true"], pred["predicted"], labels=present, average="macro", zero_division=0)
    assert metrics["test/f1_macro"] == pytest.approx(f1, abs=1e-6)
    p, t = pred["valence_pred"].to_numpy(), pred["valence_true"].to_numpy()
    ccc = 2 * np.cov(p, t, bias=True)[0, 1] / (p.var() + t.var() + (p.mean() - t.mean()) ** 2)
    assert metrics["test/ccc_valence"] == pytest.approx(ccc, abs=1e-5)
    for name in FIGURES:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.width > 200
    md = (out / "baseline_comparison.md").read_text()
    assert "Imbalanced" in md and "AffectNet paper: SVM" in md and f"{metrics['test/accuracy']:.3f}" in md


def test_eval_into_the_training_run(trained):
    before = len(_eval_runs(trained.client))
    metrics = evaluate(_eval_cfg(trained, "eval_into", "eval.into_training_run=true"))
    run = trained.client.get_run(trained.run.info.run_id)
    assert run.info.status == "FINISHED" and len(_eval_runs(trained.client)) == before
    assert run.data.metrics["eval_synthetic/accuracy"] == pytest.approx(metrics["test/accuracy"], abs=1e-6)
    assert run.data.metrics["eval_synthetic/accuracy"] == pytest.approx(trained.results["test/accuracy"], abs=1e-6)
    names = {a.path for a in trained.client.list_artifacts(run.info.run_id, "eval_synthetic")}
    assert "eval_synthetic/confusion_matrix_test.png" in names


def test_cross_dataset_eval_uses_the_checkpoints_preprocessing(trained, tmp_path, capsys):
    # 48x48 grayscale image folders (the data config says channels 1, size 48); the model wants 64x64 RGB
    for i, name in enumerate(EXPRESSIONS_8):
        for split, n in (("train", 2), ("val", 1), ("test", 2)):
            write_class_folder(tmp_path / "folders", split, name, n, seed=i)
    data = ["data=image_folder", f"data.root={tmp_path / 'folders'}", f"data.classes=[{','.join(EXPRESSIONS_8)}]"]
    cfg = _eval_cfg(trained, str(tmp_path / "eval_folders"), *data)
    metrics = evaluate(cfg)
    assert "test/accuracy" in metrics and not any("valence" in k or "arousal" in k for k in metrics)
    assert "valence/arousal metrics skipped" in capsys.readouterr().out
    pred = pd.read_csv(Path(cfg.paths.output_dir) / "predictions_test.csv")
    assert len(pred) == 16 and metrics["test/accuracy"] == pytest.approx(accuracy_score(pred.true, pred.predicted))
    run = max(_eval_runs(trained.client), key=lambda r: r.info.start_time)
    assert run.data.params["data.image_size"] == "64" and run.data.params["data.channels"] == "3"
    assert run.data.tags["same_data_as_training"] == "false"
    # VA metrics demanded from data without valence/arousal: a clear error
    with pytest.raises(EvaluationError, match="no valence/arousal values"):
        evaluate(_eval_cfg(trained, str(tmp_path / "eval_va"), *data, "eval.va=true", "logger=none"))


def test_a_test_only_data_set_is_scored(trained, tmp_path):
    # a release that ships only test/ (nothing to train on, nothing to hold out): evaluation needs no more
    for i, name in enumerate(EXPRESSIONS_8):
        write_class_folder(tmp_path / "only_test", "test", name, 2, seed=10 + i)
    data = ["data=image_folder", f"data.root={tmp_path / 'only_test'}", f"data.classes=[{','.join(EXPRESSIONS_8)}]"]
    cfg = _eval_cfg(trained, str(tmp_path / "eval_only_test"), *data, "logger=none")
    metrics = evaluate(cfg)
    pred = pd.read_csv(Path(cfg.paths.output_dir) / "predictions_test.csv")
    assert len(pred) == 16 and metrics["test/accuracy"] == pytest.approx(accuracy_score(pred.true, pred.predicted))
    # training on the same folder still says what is missing
    from fer_lightning.data.datamodule import DataConfigError, FERDataModule

    dm = FERDataModule({**dict(cfg.data), "classes": list(EXPRESSIONS_8)}, cache_dir=tmp_path / "cache")
    with pytest.raises(DataConfigError, match="no rows in split 'train'"):
        dm.load_records()


def test_bad_checkpoints_and_mismatches_are_clear_errors(trained, tmp_path):
    garbage = tmp_path / "garbage.ckpt"
    garbage.write_bytes(b"not a checkpoint at all" * 10)
    truncated = tmp_path / "truncated.ckpt"
    data = Path(trained.ckpt).read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    cases = [
        (f"ckpt_path={garbage}", "corrupt|cannot be loaded safely"),
        (f"ckpt_path={truncated}", "corrupt"),
        (f"ckpt_path={tmp_path / 'missing.ckpt'}", "does not exist"),
        ("data.classes=[neutral,happy,sad]", r"predicts the classes .* pass data.classes=\[neutral,happy,sad"),
        ("eval.va=maybe", "eval.va"),
    ]
    for override, message in cases:
        with pytest.raises(EvaluationError, match=message):
            evaluate(_eval_cfg(trained, str(tmp_path / "bad"), override, "logger=none"))


def test_cli_reports_a_corrupt_checkpoint_in_one_line(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"\x00garbage")
    env = {**os.environ, "FER_ROOT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run([sys.executable, "-m", "fer_lightning.cli.eval", f"ckpt_path={bad}", "logger=none"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith(f"error: ckpt_path: checkpoint {bad}")
