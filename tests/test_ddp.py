"""DDP on CPU (gloo): 2 ranks equal 1 process with the same global batch, log one MLflow run; sweeps use ddp_spawn."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from cli_runs import (
    base_overrides,
    max_weight_difference,
    run_train,
    state_dict,
    train_command,
    train_env,
    training_runs,
)
from eval_helpers import private_store
from hydra.core.hydra_config import HydraConfig
from mlflow import MlflowClient

from fer_lightning.config import ConfigError
from fer_lightning.config_dir import compose_config
from fer_lightning.distributed import check_launch, reruns_command_line
from fer_lightning.train import train

# What makes 2 ranks x 16 the same computation as 1 process x 32:
# - EpochSampler gives rank r the positions r, r+2, ... of the one global draw, so step b of the two ranks
#   together sees exactly positions 32b..32b+31, the single process's batch b;
# - DDP averages the two half-batch gradients = the gradient of the mean loss over 32 (cross-entropy and MSE
#   are per-sample means; CCC is not, so loss.va=mse);
# - no BatchNorm (alexnet): on CPU each rank normalizes with its own half batch (SyncBatchNorm is GPU-only);
# - no randomness in the step (no augmentation, no dropout), deterministic kernels, one thread per process;
# - val/test: DistributedSampler halves (24 val -> 12 + 12; 2 x 16 test batches), metrics dedupe by index.
EQUIVALENT = [
    "backbone=alexnet",
    "augment=none",
    "model.head_dropout=0",
    "loss=ce",
    "loss.va=mse",
    "trainer.deterministic=true",
    "seed=3",
    "trainer.max_epochs=2",
]
# only the summation order differs (two half-batch gradients averaged): float32 rounding, far below 1e-4
TOLERANCE = 1e-4
TIMEOUT_S = 300


def _final_metrics(uri: str, run_id: str) -> dict[str, float]:
    metrics = MlflowClient(tracking_uri=uri).get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}


def test_two_rank_ddp_equals_one_process_and_logs_one_run(
    tmp_path, make_cfg, shared_cache, mlflow_template_db, mlflow_db, one_thread
):
    root = tmp_path / "ddp"
    root.mkdir()
    uri = private_store(root, mlflow_template_db)
    overrides = [*base_overrides(root, shared_cache, uri), *EQUIVALENT, "trainer=ddp", "trainer.devices=2"]
    overrides.append("data.batch_size=16")  # per rank: global batch 32
    ddp = subprocess.Popen(
        train_command(*overrides), cwd=root, env=train_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    try:
        # the single-process reference runs meanwhile, in this process
        cfg = make_cfg(*EQUIVALENT, "data.batch_size=32")
        train(cfg)
        output, _ = ddp.communicate(timeout=TIMEOUT_S)
    finally:
        if ddp.poll() is None:
            ddp.kill()
    assert ddp.returncode == 0, output[-8000:]
    assert "Starting with 2 processes" in output and "distributed_backend=gloo" in output

    # exactly one MLflow run although train() ran in both ranks (rank 1 never creates one)
    runs = training_runs(uri)
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["trainer.devices"] == "2" and run.data.params["data.batch_size"] == "16"
    run_dir = Path(run.data.tags["output_dir"])
    assert (run_dir / "train_ddp_process_1.log").exists()  # rank 1 re-ran fer-train in the same run directory

    ref_run = training_runs(mlflow_db)[0]
    ref = _final_metrics(mlflow_db, ref_run.info.run_id)
    got = _final_metrics(uri, run.info.run_id)
    assert "val/f1_macro" in ref and "test/accuracy" in ref and "val/loss" in ref
    assert got.keys() == ref.keys()
    far = {k: (got[k], ref[k]) for k in ref if abs(got[k] - ref[k]) > TOLERANCE}
    assert not far, far

    ddp_ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    ref_ckpt = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ddp_ckpt["global_step"] == ref_ckpt["global_step"] == 6  # 2 epochs x 3 steps of the global batch
    assert max_weight_difference(state_dict(run_dir / "checkpoints" / "last.ckpt"), ref_ckpt["state_dict"]) < TOLERANCE


@pytest.mark.slow  # ~1 min: every fit and test spawns two fresh interpreters
def test_local_sweep_with_ddp_spawn_runs_each_job_once(tmp_path, shared_cache, mlflow_template_db):
    root = tmp_path / "sweep"
    root.mkdir()
    uri = private_store(root, mlflow_template_db)
    overrides = [*base_overrides(root, shared_cache, uri), "trainer=ddp_spawn", "trainer.max_epochs=1", "seed=5"]
    run_train(root, overrides, timeout=TIMEOUT_S, multirun=True)
    # a rank that re-ran the command line would have started the sweep again: more runs than jobs
    runs = training_runs(uri)
    assert [(r.data.tags.get("sweep.job_num"), r.info.status) for r in runs] == [("0", "FINISHED")]
    assert "test/accuracy" in runs[0].data.metrics and runs[0].data.params["trainer.strategy"] == "ddp_spawn"
    assert len(list((root / "multirun").rglob("last.ckpt"))) == 1


@pytest.mark.slow  # the same check as test_ddp_in_a_multirun_is_refused, through the real CLI
def test_local_sweep_with_ddp_is_refused_before_anything_runs(tmp_path, shared_cache, mlflow_template_db):
    root = tmp_path / "refused"
    root.mkdir()
    uri = private_store(root, mlflow_template_db)
    overrides = [*base_overrides(root, shared_cache, uri), "trainer=ddp", "seed=5"]
    proc = subprocess.run(
        train_command(*overrides, multirun=True), cwd=root, env=train_env(root), capture_output=True, text=True,
        timeout=TIMEOUT_S,
    )  # fmt: skip
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output[-4000:]
    assert "would start the whole sweep again" in output and "trainer=ddp_spawn" in output
    assert not list(root.rglob("*.ckpt"))  # refused before any training
    assert "Starting with 2 processes" not in output


def test_ddp_in_a_multirun_is_refused(make_cfg):
    cfg = make_cfg("trainer=ddp", "logger=none")
    hydra_cfg = compose_config("train", ["hydra.mode=MULTIRUN"], return_hydra_config=True)
    HydraConfig.instance().set_config(hydra_cfg)
    try:
        with pytest.raises(ConfigError, match="would start the whole sweep again.*trainer=ddp_spawn"):
            check_launch(cfg)
        check_launch(make_cfg("trainer=ddp_spawn", "logger=none"))  # the working combination passes
    finally:
        HydraConfig.instance().cfg = None


def test_ddp_from_python_is_refused_with_the_alternative(make_cfg):
    cfg = make_cfg("trainer=ddp", "logger=none")
    with pytest.raises(ConfigError, match="trainer=ddp_spawn"):
        train(cfg)


@pytest.mark.parametrize(
    ("trainer_cfg", "reruns"),
    [
        ({"strategy": "ddp", "devices": 2}, True),
        ({"strategy": "ddp", "devices": 1, "num_nodes": 2}, True),
        ({"strategy": "ddp_find_unused_parameters_true", "devices": 4}, True),
        ({"strategy": "ddp_spawn", "devices": 2}, False),
        ({"strategy": "ddp_fork", "devices": 2}, False),
        ({"strategy": "auto", "devices": 2}, True),
        ({"strategy": "auto", "devices": 1}, False),
        ({"strategy": "auto", "devices": "auto"}, False),
        ({"strategy": {"_target_": "pytorch_lightning.strategies.DDPStrategy"}, "devices": 2}, True),
        ({"strategy": {"_target_": "pytorch_lightning.strategies.DDPStrategy", "start_method": "spawn"}}, False),
    ],
)
def test_which_strategies_rerun_the_command_line(trainer_cfg, reruns):
    assert reruns_command_line(trainer_cfg) is reruns
