"""Training on SLURM: trainer resources -> sbatch resources, and a 2-task DDP run preempted, requeued and resumed."""

from __future__ import annotations

import json
import re
import subprocess
import time

import pytest
import slurm_helpers as sh
from cli_runs import base_overrides, history, train_command, train_env, training_runs
from eval_helpers import private_store
from mlflow import MlflowClient

from fer_lightning.config import ConfigError
from fer_lightning.config_dir import compose_config
from fer_lightning.resume import RUN_FILE, RunSession
from fer_lightning.slurm import Requeued, job_resources, requeue_in

EPOCHS = 5
STEPS_PER_EPOCH = 3  # debug=fast
TIMEOUT_S = 420


# ------------------------------------------------------------------------------- resources (no cluster)


def test_launcher_config_follows_the_trainer_config():
    cfg = compose_config(
        "train",
        ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=3",
         "paths.root_dir=/tmp/x", "paths.output_dir=/tmp/x/o"],
        return_hydra_config=True,
    )  # fmt: skip
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.fer_lightning_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == 4 and launcher.nodes == 3 and launcher.gpus_per_node is None
    assert launcher.signal_delay_s == 120 and launcher.max_num_timeout == 3


@pytest.mark.parametrize(
    ("trainer", "params", "expected"),
    [
        ({"accelerator": "gpu", "devices": 4, "num_nodes": 2}, {"tasks_per_node": 4, "gpus_per_node": None},
         {"tasks_per_node": 4, "nodes": 2, "gpus_per_node": 4}),
        ({"accelerator": "cuda", "devices": 2, "num_nodes": 1}, {"tasks_per_node": 2, "gpus_per_node": 8},
         {"tasks_per_node": 2, "nodes": 1}),  # an explicit gpus_per_node is kept
        ({"accelerator": "cpu", "devices": 2, "num_nodes": 1}, {"tasks_per_node": 2, "gpus_per_node": None},
         {"tasks_per_node": 2, "nodes": 1}),
        ({"accelerator": "auto", "devices": "3", "num_nodes": 1}, {"tasks_per_node": 3, "gpus_per_node": None},
         {"tasks_per_node": 3, "nodes": 1}),
    ],
)  # fmt: skip
def test_job_resources_one_task_per_device(trainer, params, expected):
    assert job_resources([trainer, dict(trainer)], params) == expected


@pytest.mark.parametrize(
    ("trainers", "params", "match"),
    [
        ([{"devices": 2}, {"devices": 4}], {}, "vary across this sweep"),
        ([{"devices": "auto"}], {}, r"trainer.devices='auto'"),
        ([{"devices": [0, 1]}], {}, r"trainer.devices=\[0, 1\]"),
        ([{"devices": 2}], {"tasks_per_node": 4}, "tasks_per_node=4 but trainer.devices=2"),
    ],
)
def test_job_resources_refuse_what_slurm_cannot_allocate(trainers, params, match):
    with pytest.raises(ConfigError, match=match):
        job_resources(trainers, params)


def test_a_requeue_hidden_by_a_teardown_error_still_ends_as_a_requeue(make_cfg):
    run = RunSession(make_cfg("logger=none"))
    run.attach(None)
    requeue = Requeued("requeued")
    try:
        try:
            raise requeue
        except Requeued:
            raise RuntimeError("gloo: Connection closed by peer")  # noqa: B904 (as a DDP teardown does)
    except RuntimeError as err:
        with pytest.raises(Requeued) as raised:
            run.close(None, err)
    assert raised.value is requeue
    assert json.loads((run.output_dir / RUN_FILE).read_text())["status"] == "requeued"
    assert requeue_in(ValueError("x")) is None


# ------------------------------------------------------------------------------ on the local cluster


def _wait_for(what: str, found, timeout: float, proc: subprocess.Popen):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        if proc.poll() is not None:
            raise AssertionError(f"fer-train ended (rc={proc.returncode}) before {what}:\n{proc.stdout.read()[-6000:]}")
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _requeued_and_held(job_id: int) -> bool:
    line = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], capture_output=True, text=True).stdout
    return "Restarts=1" in line and "JobState=PENDING" in line


@pytest.mark.slurm
@sh.requires_slurm
def test_ddp_training_on_slurm_is_preempted_requeued_and_resumed_into_its_run(
    tmp_path, shared_cache, mlflow_template_db
):
    sh.require_cluster()
    uri = private_store(tmp_path, mlflow_template_db)
    job_name = f"fer-train-{tmp_path.name}"
    overrides = [
        *base_overrides(tmp_path, shared_cache, uri),
        "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=2", f"trainer.max_epochs={EPOCHS}",
        "callbacks.checkpoint.every_n_train_steps=1", "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10",
        f"hydra.job.name={job_name}",
    ]  # fmt: skip
    proc = subprocess.Popen(
        train_command(*overrides, multirun=True), cwd=tmp_path, env=train_env(tmp_path), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        ckpt = _wait_for(
            "the job's first last.ckpt",
            lambda: next(iter(tmp_path.glob("multirun/*/*/0/checkpoints/last.ckpt")), None),
            TIMEOUT_S,
            proc,
        )
        job_dir = ckpt.parents[1]
        job_id = int(next(job_dir.parent.glob(".submitit/*/")).name)
        # SLURM's pre-timeout signal (what --signal=USR2@signal_delay_s sends), to every task of the job
        subprocess.run(["scancel", "--signal=USR2", str(job_id)], check=True, timeout=30)
        _wait_for("the requeue", lambda: _requeued_and_held(job_id), 120, proc)
        # slurmctld holds a requeued job back for ~2 minutes (BeginTime); release it now (test bed only)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
        output, _ = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:  # the test failed or timed out: leave nothing running
            proc.kill()
            subprocess.run(["scancel", f"--name={job_name}"], timeout=30, check=False)
    assert proc.returncode == 0, output[-6000:]
    logs = "\n".join(p.read_text() for p in job_dir.parent.glob(f".submitit/{job_id}/*_log.*"))
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs  # two ranks, from SLURM
    assert "for requeue" in logs and "resuming" in logs

    # one MLflow run across both attempts, finished, with every step and epoch once
    runs = training_runs(uri)
    assert len(runs) == 1, [(r.info.run_name, r.info.status) for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and "sweep.error" not in run.data.tags
    assert run.data.tags["resume.count"] == "1" and run.data.tags["resume.reason"] == "SLURM requeue #1"
    assert run.data.params["trainer.devices"] == "2" and run.data.tags["output_dir"] == str(job_dir)
    client = MlflowClient(tracking_uri=uri)
    val_steps = [s for s, _ in history(client, run.info.run_id, "val/f1_macro")]
    assert val_steps == [(e + 1) * STEPS_PER_EPOCH - 1 for e in range(EPOCHS)]
    train_steps = [s for s, _ in history(client, run.info.run_id, "train/loss_step")]
    assert train_steps == list(range(EPOCHS * STEPS_PER_EPOCH))
    assert 0.0 <= run.data.metrics["test/accuracy"] <= 1.0
    record = json.loads((job_dir / RUN_FILE).read_text())
    assert record["status"] == "finished" and record["resumes"] == 1 and record["run_id"] == run.info.run_id

    # the trainer's resources reached sbatch as one task per rank, no GPUs asked on this CPU cluster
    script = next(job_dir.parent.glob(f".submitit/{job_id}/*_submission.sh")).read_text()
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", script, flags=re.MULTILINE))
    assert flags["ntasks-per-node"] == "2" and flags["nodes"] == "1" and flags["signal"] == "USR2@120"
    assert "gpus-per-node" not in flags
    assert sh.wait_job(job_id, timeout=60) == "COMPLETED"
