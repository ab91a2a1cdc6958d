"""A real `mlflow server` as the tracking target: a short training logs to it; losing it mid-run loses nothing."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from fer_lightning.config_dir import compose_config
from fer_lightning.mlflow_spool import SPOOL_NAME, read_spool
from fer_lightning.mlflow_spool import main as sync_main
from fer_lightning.train import train

ROOT = Path(__file__).resolve().parents[1]
MLFLOW = Path(sys.executable).parent / "mlflow"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow server` on a loopback port with a SQLite backend and served artifacts, in its own process group."""

    def __init__(self, workdir: Path, template_db: Path) -> None:
        self.workdir = workdir
        self.db = workdir / "server.db"
        self.artifacts = workdir / "served_artifacts"
        self.db.write_bytes(template_db.read_bytes())  # pre-migrated: start-up skips the schema migration
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 180.0) -> None:
        log = (self.workdir / "server.log").open("a")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no background job runner
        self.proc = subprocess.Popen(
            [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.db}", "--artifacts-destination", str(self.artifacts)],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"mlflow server did not answer /health within {timeout_s} s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the server and its workers (the whole process group we started), forcibly if they linger."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        try:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        with_group_gone = time.monotonic() + 10
        while time.monotonic() < with_group_gone:  # uvicorn's worker is in the group too
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            os.killpg(self.proc.pid, signal.SIGKILL)
            time.sleep(0.1)
        self.proc = None

    def log_tail(self) -> str:
        return (self.workdir / "server.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory, mlflow_template_db):
    srv = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), mlflow_template_db)
    srv.start()
    yield srv
    srv.stop()


def _only_run(client: MlflowClient, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    return runs[0]


def test_tracking_uri_env_var_selects_the_server(monkeypatch):
    # the documented switch: MLFLOW_TRACKING_URI=http://... (no logger.* override) becomes logger.tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    cfg = compose_config("train", ["paths.root_dir=/somewhere", "paths.output_dir=/somewhere/out"])
    assert cfg.logger.tracking_uri == "http://127.0.0.1:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    cfg = compose_config("train", ["paths.root_dir=/somewhere", "paths.output_dir=/somewhere/out"])
    assert cfg.logger.tracking_uri == "sqlite:////somewhere/mlruns/mlflow.db"


def test_short_training_logs_to_a_real_tracking_server(server, make_cfg, tmp_path):
    cfg = make_cfg(f"logger.tracking_uri={server.uri}", "logger.experiment_name=served", "loss=focal",
                   "trainer.max_epochs=2")  # fmt: skip
    results = train(cfg)
    client = MlflowClient(tracking_uri=server.uri)
    run = _only_run(client, "served")
    assert run.info.status == "FINISHED"
    assert run.data.params["loss"] == "focal" and run.data.params["loss.gamma"] == str(cfg.loss.gamma)
    assert run.data.tags["loss"] == "focal"
    assert run.data.metrics["test/accuracy"] == pytest.approx(results["test/accuracy"])
    assert len(client.get_metric_history(run.info.run_id, "val/f1_macro")) == 2
    # artifacts go through the server (mlflow-artifacts:/), not to the client's local artifact_location
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "confusion_matrix_test.png"} <= names
    served = list(server.artifacts.rglob("config.yaml"))
    assert len(served) == 1 and served[0].read_text() == (Path(cfg.paths.output_dir) / "config.yaml").read_text()
    assert not (tmp_path / "mlruns" / "artifacts").exists() or not any((tmp_path / "mlruns" / "artifacts").iterdir())
    assert not (Path(cfg.paths.output_dir) / "mlflow_spool").exists()  # nothing had to be kept back


class _KillWhenCheckpointed(threading.Thread):
    """Kills the server (SIGKILL, like a crash) once epoch 0 is validated (its best checkpoint exists)."""

    def __init__(self, server: MlflowServer, ckpt_dir: Path) -> None:
        super().__init__(daemon=True)
        self.server, self.ckpt_dir, self.stop_event, self.killed = server, ckpt_dir, threading.Event(), False

    def run(self) -> None:
        while not self.stop_event.is_set():
            if any(self.ckpt_dir.glob("best-epoch*.ckpt")):
                self.server.stop(signal.SIGKILL)
                self.killed = True
                return
            time.sleep(0.02)


def test_server_lost_mid_run_training_goes_on_and_the_spool_uploads(server, make_cfg, capsys):
    cfg = make_cfg(f"logger.tracking_uri={server.uri}", "logger.experiment_name=outage", "trainer.max_epochs=3",
                   "logger.retry_timeout_s=2")  # fmt: skip
    client = MlflowClient(tracking_uri=server.uri)
    out = Path(cfg.paths.output_dir)
    killer = _KillWhenCheckpointed(server, out / "checkpoints")
    killer.start()
    try:
        results = train(cfg)  # must not raise although the server is gone from epoch 1 on
    finally:
        killer.stop_event.set()
        killer.join(timeout=30)
    assert killer.killed, "the server should have been stopped after the first epoch"
    # training finished and kept its checkpoints
    assert 0.0 <= results["test/accuracy"] <= 1.0
    assert (out / "checkpoints" / "last.ckpt").exists() and Path(results["best_checkpoint"]).exists()
    # the end of the run says what is kept and how to upload it
    spool_path = out / "mlflow_spool" / SPOOL_NAME
    err = capsys.readouterr().err
    assert f"fer-mlflow-sync {spool_path}" in err and "became unreachable" in err
    header, calls = read_spool(spool_path)
    assert header["tracking_uri"] == server.uri
    methods = [c.method for c in calls]
    assert "log_artifact" in methods and methods[-1] == "set_terminated" and calls[-1].args[1] == "FINISHED"
    batches = [c for c in calls if c.method == "log_batch"]
    spooled_metrics = {m.key for c in batches for m in c.kwargs.get("metrics", c.args[1:2] and c.args[1])}
    assert {"test/accuracy", "val/f1_macro"} <= spooled_metrics

    server.start()
    run_id = _only_run(client, "outage").info.run_id
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING" and "test/accuracy" not in run.data.metrics
    assert 1 <= len(client.get_metric_history(run_id, "val/f1_macro")) < 3  # epoch 0 arrived, the rest did not

    assert sync_main([str(spool_path)]) == 0  # what `fer-mlflow-sync <spool>` runs
    assert f"uploaded {len(calls)} of {len(calls)} calls" in capsys.readouterr().out
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["test/accuracy"] == pytest.approx(results["test/accuracy"])
    history = client.get_metric_history(run_id, "val/f1_macro")
    assert sorted(m.step for m in history) == sorted({m.step for m in history}) and len(history) == 3
    names = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.yaml", "confusion_matrix_test.png", "baseline_comparison.md"} <= names
    # a second upload sends nothing twice
    assert sync_main([str(spool_path)]) == 0
    assert f"uploaded 0 of {len(calls)} calls" in capsys.readouterr().out
    assert len(client.get_metric_history(run_id, "val/f1_macro")) == 3
    assert json.loads(spool_path.read_text().splitlines()[0])["format"].startswith("fer_lightning.mlflow_spool")
