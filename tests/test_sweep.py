"""`fer-train -m` as a user runs it: one MLflow parent per sweep, child runs per job, failures, parallel jobs."""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from omegaconf import OmegaConf

from fer_lightning import tracking
from fer_lightning.sweep import SummaryRow, parent_status, swept_keys, to_csv, to_markdown, varied_keys


def run_sweep(args: list[str], tmp_path: Path, shared_cache: Path, mlflow_db: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "FER_ROOT": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    base = [
        "debug=fast", f"paths.cache_dir={shared_cache}", f"logger.tracking_uri={mlflow_db}",
        f"logger.artifact_location={tmp_path / 'mlruns' / 'artifacts'}", "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]  # fmt: skip
    return subprocess.run(
        [sys.executable, "-m", "fer_lightning.cli.train", "-m", *base, *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip


def sweep_runs(mlflow_db: str):
    """(client, parent run, children by job number) of the one sweep in the store."""
    client = MlflowClient(tracking_uri=mlflow_db)
    runs = client.search_runs([client.get_experiment_by_name("fer_lightning").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1
    children = {int(r.data.tags["sweep.job_num"]): r for r in runs if r not in parents}
    assert len(children) == len(runs) - 1
    return client, parents[0], children


def summary_rows(client: MlflowClient, parent, tmp_path: Path) -> list[dict[str, str]]:
    local = client.download_artifacts(parent.info.run_id, "sweep_summary.csv", str(tmp_path / "dl"))
    return list(csv.DictReader(io.StringIO(Path(local).read_text())))


def test_failed_job_is_a_failed_child_and_the_sweep_goes_on(tmp_path, shared_cache, mlflow_db):
    # job 0 is refused at start-up (a config value), job 1 trains: the failure must not stop the sweep
    res = run_sweep(["data.val_fraction=0,0.25"], tmp_path, shared_cache, mlflow_db)
    assert res.returncode == 1, res.stderr[-3000:]  # a sweep with a failed job says so in its exit code
    assert "error: data.val_fraction=0 is invalid" in res.stderr and "Traceback" not in res.stderr
    assert "2 jobs, 1 failed" in res.stdout
    client, parent, children = sweep_runs(mlflow_db)
    assert sorted(children) == [0, 1]
    sweep_id = parent.data.tags["sweep.id"]
    sweep_dir = Path(parent.data.tags["sweep.dir"])
    assert sweep_dir.is_dir() and sweep_dir.parent.parent == tmp_path / "multirun"
    assert "data.val_fraction=0,0.25" in parent.data.tags["sweep.definition"]
    assert parent.info.status == "FINISHED" and parent.data.tags["sweep.failed"] == "1"
    for num, run in children.items():
        t = run.data.tags
        assert t["mlflow.parentRunId"] == parent.info.run_id and t["sweep.id"] == sweep_id
        assert t["sweep.job_num"] == str(num) and t["seed"] == "42"
        assert t["sampling"] == "none" and t["loss"] == "ce" and t["backbone"] == "simple_cnn"
    failed, ok = children[0], children[1]
    assert failed.info.run_name == "data.val_fraction=0" and ok.info.run_name == "data.val_fraction=0.25"
    assert failed.info.status == "FAILED" and "data.val_fraction" in failed.data.tags["sweep.error"]
    assert ok.info.status == "FINISHED" and ok.data.params["data.val_fraction"] == "0.25"
    # the parent's summary lists both, with the child's own MLflow values
    rows = summary_rows(client, parent, tmp_path)
    assert [(r["job"], r["status"], r["data.val_fraction"]) for r in rows] == [("0", "FAILED", "0"),
                                                                              ("1", "FINISHED", "0.25")]  # fmt: skip
    assert rows[0]["val/f1_macro"] == "" and "ConfigError" in rows[0]["error"]
    for key in ("val/f1_macro", "test/f1_macro", "test/accuracy"):
        assert float(rows[1][key]) == ok.data.metrics[key]
    assert rows[1]["run_id"] == ok.info.run_id
    assert (sweep_dir / "sweep_summary.md").read_text().count("FAILED") == 1
    # fer-report's leaderboard of the finished children rides along
    assert {"report/leaderboard.md", "report/leaderboard.csv"} <= {
        a.path for a in client.list_artifacts(parent.info.run_id, "report")
    }
    board = list(csv.DictReader(io.StringIO((sweep_dir / "report" / "leaderboard.csv").read_text())))
    (ours,) = [r for r in board if r["kind"] == "run"]
    assert float(ours["val/f1_macro mean"]) == pytest.approx(ok.data.metrics["val/f1_macro"])
    assert "| 0 | data.val_fraction=0 | FAILED |" in parent.data.tags["mlflow.note.content"]


def test_four_parallel_jobs_on_one_sqlite_store_lose_nothing(tmp_path, shared_cache, mlflow_db):
    res = run_sweep(
        ["hydra/launcher=joblib", "hydra.launcher.n_jobs=4", "seed=1,2,3,4", "trainer.max_epochs=2"],
        tmp_path, shared_cache, mlflow_db,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    client, parent, children = sweep_runs(mlflow_db)
    assert sorted(children) == [0, 1, 2, 3] and parent.data.tags["sweep.launcher"] == "joblib"
    runs = list(children.values())
    assert max(r.info.start_time for r in runs) < min(r.info.end_time for r in runs), "the jobs did not overlap"
    sweep_dir = Path(parent.data.tags["sweep.dir"])
    metric_keys, param_keys = set(runs[0].data.metrics), set(runs[0].data.params)
    for num, run in children.items():
        assert run.info.status == "FINISHED" and run.data.tags["seed"] == str(num + 1)
        # every param the job meant to log arrived, with its value (Lightning adds the module's hparams)
        job_cfg = OmegaConf.load(sweep_dir / str(num) / "config.yaml")
        choices = OmegaConf.load(sweep_dir / str(num) / ".hydra" / "hydra.yaml").hydra.runtime.choices
        expected = {k: str(v) for k, v in tracking.flatten(job_cfg).items()}
        expected.update({g: str(choices[g]) for g in ("data", "sampling", "loss", "backbone", "augment", "trainer")})
        assert {k: run.data.params.get(k) for k in expected} == expected
        assert set(run.data.params) == param_keys and len(param_keys) > len(expected)
        # and every metric, with its whole history: 2 epochs x 3 train batches (log_every_n_steps=1)
        assert set(run.data.metrics) == metric_keys and "test/accuracy" in metric_keys
        val = client.get_metric_history(run.info.run_id, "val/f1_macro")
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss_step")]
        assert len(val) == 2 and len(steps) == 6 and len(set(steps)) == 6
    rows = summary_rows(client, parent, tmp_path)
    assert [(r["seed"], r["status"]) for r in rows] == [("1", "FINISHED"), ("2", "FINISHED"), ("3", "FINISHED"),
                                                        ("4", "FINISHED")]  # fmt: skip
    assert parent.info.status == "FINISHED"


def _row(job: int, status: str, f1: float | None, overrides: list[str]) -> SummaryRow:
    return SummaryRow(job, f"run{job}", status, dict(o.split("=") for o in overrides), {"val/f1_macro": f1},
                      "boom | bad" if status == "FAILED" else "", f"id{job}", overrides)  # fmt: skip


def test_summary_tables_and_parent_status():
    rows = [_row(0, "FINISHED", 0.5, ["loss=ce", "seed=1"]), _row(1, "FAILED", None, ["loss=focal", "seed=1"])]
    keys = varied_keys([r.overrides for r in rows])
    assert keys == ["loss"]  # seed is the same for both jobs
    parsed = list(csv.reader(io.StringIO(to_csv(rows, keys, ["val/f1_macro"]))))
    assert parsed == [["job", "run_name", "status", "loss", "val/f1_macro", "error", "run_id"],
                      ["0", "run0", "FINISHED", "ce", "0.5", "", "id0"],
                      ["1", "run1", "FAILED", "focal", "", "boom | bad", "id1"]]  # fmt: skip
    md = to_markdown(rows, keys, ["val/f1_macro"]).splitlines()
    assert md[0] == "| job | run | status | loss | val/f1_macro | error |"
    assert md[2] == "| 0 | run0 | FINISHED | ce | 0.5000 |  |" and md[3].endswith("| boom \\| bad |")
    assert parent_status(["FINISHED", "FAILED"]) == "FINISHED"
    assert parent_status(["FAILED", "FAILED"]) == "FAILED" and parent_status([]) == "FINISHED"
    assert swept_keys(["sampling=none,upsample", "loss=ce", "loss.beta=range(1,3)", "+x=1"]) == ["sampling",
                                                                                                  "loss.beta"]  # fmt: skip
