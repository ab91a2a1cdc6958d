"""Bounded retries on real lock/connection failures, the local spool, and its replay into a real store."""

from __future__ import annotations

import logging
import pickle
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

from fer_lightning import tracking
from fer_lightning.mlflow_retry import (
    ResilientMLFlowLogger,
    RetryingClient,
    TrackingUnavailableError,
    is_transient,
    retry_call,
)
from fer_lightning.mlflow_spool import Spool, SpoolError, read_spool, upload


@pytest.fixture
def dead_uri(monkeypatch) -> str:
    """An http URI where nothing listens; MLflow's own HTTP retries off so each refusal is immediate."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _locked_db(tmp_path: Path) -> sqlite3.Connection:
    db = tmp_path / "locked.db"
    holder = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    holder.execute("create table t (x integer)")
    holder.execute("begin exclusive")  # nobody else may read or write until it ends
    return holder


def test_retry_outlasts_a_real_sqlite_lock(tmp_path):
    holder = _locked_db(tmp_path)
    threading.Timer(0.8, holder.rollback).start()
    attempts = []

    def insert() -> int:
        attempts.append(time.monotonic())
        with sqlite3.connect(tmp_path / "locked.db", timeout=0.05) as conn:  # a short busy timeout of its own
            conn.execute("insert into t values (7)")
        return 1

    assert retry_call(insert, timeout_s=30, what="insert", initial_delay_s=0.05) == 1
    assert len(attempts) >= 2  # the first ones met "database is locked"
    assert sqlite3.connect(tmp_path / "locked.db").execute("select x from t").fetchall() == [(7,)]


def test_retry_gives_up_after_its_budget_and_never_retries_a_real_error(tmp_path):
    holder = _locked_db(tmp_path)
    calls = []

    def insert() -> None:
        calls.append(1)
        with sqlite3.connect(tmp_path / "locked.db", timeout=0.01) as conn:
            conn.execute("insert into t values (1)")

    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        retry_call(insert, timeout_s=0.5, what="insert", initial_delay_s=0.05)
    assert len(calls) >= 2
    holder.rollback()
    calls.clear()

    def bad_sql() -> None:
        calls.append(1)
        with sqlite3.connect(tmp_path / "locked.db") as conn:
            conn.execute("insert into no_such_table values (1)")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        retry_call(bad_sql, timeout_s=30, what="insert")
    assert calls == [1]  # a wrong request is not retried


def test_transient_or_not_on_real_mlflow_failures(dead_uri, mlflow_db):
    with pytest.raises(MlflowException) as refused:
        MlflowClient(tracking_uri=dead_uri).get_experiment_by_name("x")
    assert is_transient(refused.value)
    with pytest.raises(MlflowException) as missing:
        MlflowClient(tracking_uri=mlflow_db).get_run("0" * 32)
    assert not is_transient(missing.value)
    assert is_transient(sqlite3.OperationalError("database is locked"))
    assert not is_transient(ValueError("loss.beta must be in [0, 1)"))


def test_spooled_calls_replay_into_the_run(tmp_path, dead_uri, mlflow_db, caplog):
    store = MlflowClient(tracking_uri=mlflow_db)
    run_id = store.create_run(store.create_experiment("spool")).info.run_id
    spool = Spool(tmp_path / "mlflow_spool", dead_uri)
    client = RetryingClient(MlflowClient(tracking_uri=dead_uri), tracking_uri=dead_uri, timeout_s=0.3, spool=spool)
    artifact = tmp_path / "report.md"
    artifact.write_text("# kept\n")
    t0 = 1_700_000_000_000
    metrics = [Metric("val/f1_macro", 0.25, t0, 0), Metric("val/f1_macro", 0.5, t0 + 1000, 1)]
    assert client.log_batch(run_id, metrics=metrics, params=[Param("loss.beta", "0.99")]) is None
    assert client.offline  # the budget ran out once; later calls go straight to the spool
    caplog.clear()
    client.set_tag(run_id, "sampling", "upsample")
    client.log_artifact(run_id, str(artifact), "reports")
    client.log_metric(run_id, "test/accuracy", 0.75, step=3)
    client.set_terminated(run_id, "FINISHED")
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]  # offline: no second wait per call
    with pytest.raises(MlflowException):
        client.get_run(run_id)  # a read cannot be kept for later: it fails (fast) instead
    artifact.unlink()  # the spool holds its own copy
    assert spool.calls == 5
    assert spool.summary() == "1 artifacts, 3 metrics, 1 params, 1 run status, 1 tags"

    assert upload(spool.path, tracking_uri=mlflow_db) == (5, 5)
    run = store.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"loss.beta": "0.99"}
    assert run.data.tags["sampling"] == "upsample"
    history = store.get_metric_history(run_id, "val/f1_macro")
    assert [(m.step, m.value, m.timestamp) for m in history] == [(0, 0.25, t0), (1, 0.5, t0 + 1000)]
    (acc,) = store.get_metric_history(run_id, "test/accuracy")
    _, calls = read_spool(spool.path)
    assert (acc.step, acc.value, acc.timestamp) == (3, 0.75, calls[3].kwargs["timestamp"])  # the logging time
    assert run.info.end_time == calls[4].kwargs["end_time"]
    local = store.download_artifacts(run_id, "reports/report.md", str(tmp_path / "dl"))
    assert Path(local).read_text() == "# kept\n"
    assert upload(spool.path, tracking_uri=mlflow_db) == (0, 5)  # safe to run again
    assert len(store.get_metric_history(run_id, "val/f1_macro")) == 2


def test_spool_errors_name_the_file_and_line(tmp_path, capsys):
    with pytest.raises(SpoolError, match="no such spool file"):
        read_spool(tmp_path / "missing.jsonl")
    spool = Spool(tmp_path, "sqlite:///x.db")
    spool.append("set_tag", ("r1", "a", "1"), {})
    spool.append("set_tag", ("r1", "b", "2"), {})
    lines = spool.path.read_text().splitlines()
    spool.path.write_text("\n".join([*lines, '{"seq": 2, "meth']) + "\n")  # a crash mid-append
    _, calls = read_spool(spool.path)
    assert [c.args for c in calls] == [["r1", "a", "1"], ["r1", "b", "2"]]
    assert "incomplete last line" in capsys.readouterr().err
    spool.path.write_text("\n".join([lines[0], "not json", lines[2]]) + "\n")
    with pytest.raises(SpoolError, match=r"spool\.jsonl:2: unreadable"):
        read_spool(spool.path)
    with pytest.raises(SpoolError, match="cannot be kept"):
        spool.append("get_run", ("r1",), {})


def test_unreachable_store_at_start_is_one_clear_error(tmp_path, dead_uri):
    cfg = {"tracking_uri": dead_uri, "experiment_name": "x", "retry_timeout_s": 0.3, "spool_dir": str(tmp_path)}
    with pytest.raises(TrackingUnavailableError, match=r"logger\.tracking_uri=http://127\.0\.0\.1:\d+"):
        tracking.make_logger(cfg, run_name="r", tags={})


def test_parallel_experiment_creation_is_not_an_error(mlflow_db):
    first = RetryingClient(MlflowClient(mlflow_db), tracking_uri=mlflow_db, timeout_s=1, spool=None)
    second = RetryingClient(MlflowClient(mlflow_db), tracking_uri=mlflow_db, timeout_s=1, spool=None)
    exp_id = first.create_experiment("shared")
    assert second.create_experiment("shared") == exp_id  # the other job won the race: use its experiment


def test_logger_pickles_for_spawned_processes(tmp_path, mlflow_db):
    logger = ResilientMLFlowLogger(experiment_name="p", tracking_uri=mlflow_db, retry_timeout_s=7, spool_dir=tmp_path)
    clone = pickle.loads(pickle.dumps(logger))
    assert isinstance(clone.client, RetryingClient) and clone.client._timeout_s == 7
    assert clone.client.spool.path == tmp_path / "spool.jsonl"


@pytest.mark.slow
def test_logging_outlasts_an_mlflow_store_locked_longer_than_its_busy_timeout(tmp_path, mlflow_db, caplog):
    # MLflow's SQLite sessions wait 20 s (PRAGMA busy_timeout) before "database is locked"; hold the lock longer
    logger = tracking.make_logger(
        {"tracking_uri": mlflow_db, "experiment_name": "locked", "retry_timeout_s": 60, "spool_dir": str(tmp_path)},
        run_name="r", tags={},
    )  # fmt: skip
    holder = sqlite3.connect(mlflow_db[len("sqlite:///") :], isolation_level=None, check_same_thread=False)
    holder.execute("begin exclusive")
    threading.Timer(23, holder.rollback).start()
    with caplog.at_level(logging.WARNING, logger="fer_lightning.mlflow_retry"):
        logger.log_metrics({"val/f1_macro": 0.5}, step=4)
    assert any("database is locked" in r.getMessage() for r in caplog.records)
    (m,) = MlflowClient(mlflow_db).get_metric_history(logger.run_id, "val/f1_macro")
    assert (m.step, m.value) == (4, 0.5) and not logger.client.offline
