"""End to end: a short real training run, read back from MLflow; failures end FAILED; every config smoke-runs."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from fer_lightning.config import ConfigError
from fer_lightning.config_dir import CONF_DIR
from fer_lightning.data.datamodule import DataConfigError
from fer_lightning.losses import ConfigError as LossConfigError
from fer_lightning.train import train


def _client(cfg) -> MlflowClient:
    return MlflowClient(tracking_uri=cfg.logger.tracking_uri)


def _only_run(cfg):
    client = _client(cfg)
    exp = client.get_experiment_by_name(cfg.logger.experiment_name)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def test_short_training_run_is_fully_logged(make_cfg, capsys):
    cfg = make_cfg("sampling=upsample", "loss=class_balanced", "loss.beta=0.99", "trainer.max_epochs=2")
    results = train(cfg)
    client, run = _only_run(cfg)
    assert run.info.status == "FINISHED"
    # params: flat dotted keys, the sweep axes readable as scalars
    p = run.data.params
    assert p["loss.beta"] == "0.99"
    assert p["sampling"] == "upsample" and p["sampling.name"] == "upsample"
    assert p["loss"] == "class_balanced" and p["data.image_size"] == "64"
    # tags carry the chosen groups, the code version and the data fingerprint
    t = run.data.tags
    assert t["sampling"] == "upsample" and t["loss"] == "class_balanced" and t["backbone"] == "simple_cnn"
    assert t["data"] == "synthetic" and len(t["data_fingerprint"]) == 16 and t["git_commit"]
    # metrics per epoch, under stage/name; the returned values are what MLflow holds
    hist = client.get_metric_history(run.info.run_id, "val/f1_macro")
    assert [m.step for m in hist] and len(hist) == 2  # one value per epoch
    for key in ("test/accuracy", "test/f1_macro", "test/balanced_accuracy", "test/kappa", "test/ccc_valence",
                "test/rmse_arousal", "test/sagr_valence", "test/corr_arousal", "train/loss_epoch"):  # fmt: skip
        assert key in run.data.metrics, key
    assert run.data.metrics["test/accuracy"] == pytest.approx(results["test/accuracy"])
    assert 0.0 <= results["test/accuracy"] <= 1.0
    # artifacts: resolved config, data split, baseline table, confusion matrix
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "baseline_comparison.md", "confusion_matrix_test.png", "data"} <= names
    data_files = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/split.csv", "data/data_summary.json", "data/checks.txt"} <= data_files
    # the best checkpoint exists and records the class order and preprocessing
    ckpt = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)
    hp = ckpt["hyper_parameters"]
    assert hp["class_names"] == ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"]
    assert hp["preprocessing"]["image_size"] == 64 and hp["preprocessing"]["channels"] == 3
    assert run.data.tags["best_checkpoint"] == results["best_checkpoint"]
    out = capsys.readouterr().out
    assert "Up-Sampling" in out and "make ui" in out


def test_failed_run_ends_failed_with_what_it_had(make_cfg, tmp_path):
    cfg = make_cfg("data=affectnet", f"data.root={tmp_path / 'no_such_affectnet'}")
    with pytest.raises(DataConfigError, match="data.root"):
        train(cfg)
    _, run = _only_run(cfg)
    assert run.info.status == "FAILED"
    assert run.data.params["data.format"] == "affectnet"  # logged before the failure, kept


@pytest.mark.parametrize(
    ("override", "error", "key"),
    [
        ("loss.beta=1.0", LossConfigError, "loss.beta"),
        ("loss.gamma=-1", LossConfigError, "loss.gamma"),
        ("data.channels=2", ConfigError, "data.channels"),
        ("data.val_fraction=0", ConfigError, "data.val_fraction"),
        ("backbone.freeze_fraction=1.5", ConfigError, "backbone.freeze_fraction"),
    ],
)
def test_invalid_config_refused_at_start_naming_the_key(make_cfg, override, error, key):
    cfg = make_cfg("loss=class_balanced", override, "logger=none")
    with pytest.raises(error, match=key.replace(".", r"\.")):
        train(cfg)


EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
BACKBONES = sorted(p.stem for p in (CONF_DIR / "backbone").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_config_runs(make_cfg, experiment):
    # pretrained=false: ImageNet weights are never downloaded (test_recipes checks the clear error without them)
    cfg = make_cfg(f"experiment={experiment}", "logger=none", "+trainer.fast_dev_run=true", "backbone.pretrained=false")
    results = train(cfg)
    assert "test/accuracy" in results


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_runs(make_cfg, backbone):
    cfg = make_cfg(f"backbone={backbone}", "logger=none", "+trainer.fast_dev_run=true", "data.batch_size=8")
    results = train(cfg)
    assert "test/accuracy" in results
