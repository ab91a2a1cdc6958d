"""The SQLite MLflow store is created whole or not at all (SIGKILL at any moment, parallel first runs), and a
broken existing store stops the run with one line naming the file, the fault and the fix."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_runs import base_overrides, train_command, train_env
from mlflow import MlflowClient

from fer_lightning.mlflow_store import MlflowStoreError, _known_revisions, ensure_store, head_revision, inspect

ROOT = Path(__file__).resolve().parents[1]


def _uri(path: Path) -> str:
    return f"sqlite:///{path}"


def _store_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}*"))


def _wait_for_any(paths_of, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not paths_of():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"child exited {proc.returncode} before creating the store")
        if time.monotonic() > deadline:
            raise AssertionError("the store was never started")
        time.sleep(0.002)


def _sigkill(proc: subprocess.Popen) -> int:
    with_signal = proc.poll() is None
    if with_signal:
        proc.send_signal(signal.SIGKILL)
    return proc.wait(timeout=30) if with_signal else proc.returncode


def _copy(src: Path, dst: Path) -> Path:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dst)
    return dst


@pytest.fixture(scope="module")
def populated_db(tmp_path_factory, mlflow_template_db) -> Path:
    """The migrated template with one experiment and one finished run in it (a store with something to lose)."""
    path = _copy(mlflow_template_db, tmp_path_factory.mktemp("populated") / "mlflow.db")
    client = MlflowClient(tracking_uri=_uri(path))
    run = client.create_run(client.create_experiment("kept"), run_name="kept-run")
    client.log_metric(run.info.run_id, "m", 1.0)
    client.set_terminated(run.info.run_id, "FINISHED")
    return path


def _execute(path: Path, *sql: str) -> None:
    conn = sqlite3.connect(path)
    for statement in sql:
        conn.execute(statement)
    conn.commit()
    conn.close()


def _message(uri: str) -> str:
    with pytest.raises(MlflowStoreError) as info:
        ensure_store(uri)
    message = str(info.value)
    assert "\n" not in message
    return message


# the child is a first run: the real creation code, killed from outside
_CHILD = "import sys; from fer_lightning.mlflow_store import ensure_store; print(ensure_store(sys.argv[1]))"


@pytest.mark.parametrize("delay", [0.0, 0.2, 0.7])
def test_sigkill_during_creation_leaves_nothing_or_a_whole_store(tmp_path, delay):
    target = tmp_path / "mlruns" / "mlflow.db"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, _uri(target)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    _wait_for_any(lambda: target.parent.is_dir() and _store_files(target), proc=proc)
    time.sleep(delay)
    rc = _sigkill(proc)
    if delay <= 0.2:  # creation takes over a second: these kills land mid-creation (tables or migrations)
        assert rc == -signal.SIGKILL
    assert inspect(target).kind in ("missing", "healthy")  # never a half-created file at the store's path
    ensure_store(_uri(target))  # the run after it
    assert inspect(target).kind == "healthy"
    assert inspect(target).revision == head_revision()
    # the killed creator's temporary store is gone; only the store and its lock file stay
    assert [p.name for p in _store_files(target)] == ["mlflow.db", "mlflow.db.lock"]
    assert [e.name for e in MlflowClient(tracking_uri=_uri(target)).search_experiments()] == ["Default"]


def test_leftover_alembic_tmp_table_stops_training_with_one_line(tmp_path, shared_cache, mlflow_template_db, capsys):
    """train() under the CLI's user_errors(), as fer-train runs it: the message and exit 2, before any training."""
    from eval_helpers import compose_cfg

    from fer_lightning.cli.errors import user_errors
    from fer_lightning.train import train

    target = _copy(mlflow_template_db, tmp_path / "mlruns" / "mlflow.db")
    _execute(target, "CREATE TABLE _alembic_tmp_tags (key VARCHAR(250), value VARCHAR(5000))")
    before = target.read_bytes()
    cfg = compose_cfg("train", tmp_path, shared_cache, _uri(target))
    capsys.readouterr()
    with pytest.raises(SystemExit) as info, user_errors():
        train(cfg)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "OperationalError" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: MLflow store {target} is half-migrated (leftover table _alembic_tmp_tags from an interrupted "
        f"MLflow schema migration) and holds no runs: remove it and run again (a new store is created): rm {target}"
    )
    assert target.read_bytes() == before  # only read
    assert not list(tmp_path.rglob("*.ckpt"))  # stopped before training


def test_real_first_run_killed_mid_creation_then_run_again(tmp_path, shared_cache):
    """fer-train itself: killed 0.3 s after its store's first file appears (mid-migration, where MLflow creating the
    store in place left `_alembic_tmp_*` tables behind), then run again to the end."""
    target = tmp_path / "mlruns" / "mlflow.db"
    overrides = [*base_overrides(tmp_path, shared_cache, _uri(target)), "trainer.limit_val_batches=1"]
    env = train_env(tmp_path)
    proc = subprocess.Popen(train_command(*overrides), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    _wait_for_any(lambda: target.parent.is_dir() and _store_files(target), timeout=120, proc=proc)
    time.sleep(0.3)
    assert _sigkill(proc) == -signal.SIGKILL
    # nothing at the store's path (on a slow machine; a fast one may have finished it): never half a store
    assert inspect(target).kind in ("missing", "healthy")

    done = subprocess.run(train_command(*overrides), cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    assert [p.name for p in _store_files(target)] == ["mlflow.db", "mlflow.db.lock"]  # the killed one's temp file: gone
    client = MlflowClient(tracking_uri=_uri(target))
    runs = client.search_runs([client.get_experiment_by_name("fer_lightning").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]


_PARALLEL_CHILD = """
import sys, time
from pathlib import Path
from mlflow import MlflowClient
from fer_lightning.mlflow_store import ensure_store
uri, go, i = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
Path(f"{go}-ready-{i}").touch()
while not go.exists():
    time.sleep(0.005)
created = ensure_store(uri)  # what fer-train's tracking.make_logger does first
client = MlflowClient(tracking_uri=uri)
run = client.create_run("0", run_name=f"first-{i}")
client.log_metric(run.info.run_id, "m", float(i))
client.set_terminated(run.info.run_id, "FINISHED")
print("created" if created else "waited")
"""


def test_four_parallel_first_runs_share_one_new_store(tmp_path):
    target = tmp_path / "mlruns" / "mlflow.db"
    go = tmp_path / "go"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", _PARALLEL_CHILD, _uri(target), str(go), str(i)],
                         cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(4)
    ]  # fmt: skip
    # all imported, then released together: they ask for the new store at the same moment
    _wait_for_any(lambda: len(list(tmp_path.glob("go-ready-*"))) == 4, timeout=120)
    go.touch()
    results = [p.communicate(timeout=180) for p in procs]
    for proc, (_out, err) in zip(procs, results):
        assert proc.returncode == 0, err[-3000:]
    assert sorted(out.strip().splitlines()[-1] for out, _ in results) == ["created", "waited", "waited", "waited"]
    runs = MlflowClient(tracking_uri=_uri(target)).search_runs(["0"])
    assert sorted(r.info.run_name for r in runs) == [f"first-{i}" for i in range(4)]
    assert {r.info.status for r in runs} == {"FINISHED"}


def test_leftover_tmp_table_in_a_store_with_runs_names_the_repair(tmp_path, populated_db):
    target = _copy(populated_db, tmp_path / "mlflow.db")
    _execute(target, "CREATE TABLE _alembic_tmp_params AS SELECT * FROM params")
    message = _message(_uri(target))
    assert message.startswith(f"MLflow store {target} is half-migrated (leftover table _alembic_tmp_params")
    assert (
        f"back it up and repair it: cp {target} {target}.bak && sqlite3 {target} 'DROP TABLE _alembic_tmp_params'"
        in message
    )
    assert message.endswith(f"&& mlflow db upgrade sqlite:///{target}")
    _execute(target, "DROP TABLE _alembic_tmp_params")  # the repair (the store is at head: nothing to upgrade)
    assert ensure_store(_uri(target)) is False
    # interrupted between dropping the original and renaming the copy: rename it back
    _execute(target, "CREATE TABLE _alembic_tmp_params AS SELECT * FROM params", "DROP TABLE params")
    assert "'ALTER TABLE _alembic_tmp_params RENAME TO params'" in _message(_uri(target))


def _older_revision() -> str:
    import mlflow
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(Path(mlflow.__file__).parent / "store" / "db_migrations"))
    return scripts.get_revision(head_revision()).down_revision


def test_broken_or_foreign_stores_each_get_their_one_line(tmp_path, mlflow_template_db, populated_db):
    old = _older_revision()
    assert old in _known_revisions()
    cases = {
        "old-empty": (mlflow_template_db, [f"UPDATE alembic_version SET version_num = '{old}'"],
                      f"is at MLflow schema revision {old}, older than {head_revision()}", "holds no runs: remove"),
        "old-runs": (populated_db, [f"UPDATE alembic_version SET version_num = '{old}'"],
                     f"is at MLflow schema revision {old}", "back it up and upgrade it: cp "),
        "newer": (populated_db, ["UPDATE alembic_version SET version_num = 'ffffffffffff'"],
                  "schema revision ffffffffffff, unknown to MLflow", "upgrade mlflow in this environment"),
        "half-created": (mlflow_template_db, ["DROP TABLE alembic_version"], "is half-created", "rm "),
    }  # fmt: skip
    for name, (src, sql, what, fix) in cases.items():
        target = _copy(src, tmp_path / name / "mlflow.db")
        _execute(target, *sql)
        message = _message(_uri(target))
        assert message.startswith(f"MLflow store {target} "), message
        assert what in message and fix in message, message
    assert _message(f"sqlite:///{tmp_path / 'old-runs' / 'mlflow.db'}").endswith(
        f"mlflow db upgrade sqlite:///{tmp_path / 'old-runs' / 'mlflow.db'}"
    )

    foreign = tmp_path / "foreign.db"
    _execute(foreign, "CREATE TABLE notes (x TEXT)", "INSERT INTO notes VALUES ('mine')")
    assert "without MLflow's tables (not an MLflow store): move it aside (mv " in _message(_uri(foreign))
    garbage = tmp_path / "garbage.db"
    garbage.write_text("not a database\n")
    assert f"{garbage} is not a SQLite database" in _message(_uri(garbage))
    assert foreign.read_bytes() and garbage.read_text() == "not a database\n"


def test_healthy_store_is_only_read_and_empty_file_is_created(tmp_path, populated_db):
    target = _copy(populated_db, tmp_path / "mlflow.db")
    digest, mtime = hashlib.sha256(target.read_bytes()).hexdigest(), target.stat().st_mtime_ns
    assert ensure_store(_uri(target)) is False
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest and target.stat().st_mtime_ns == mtime
    assert [p.name for p in _store_files(target)] == ["mlflow.db"]  # not even a lock file for a healthy store

    empty = tmp_path / "sub" / "empty.db"
    empty.parent.mkdir()
    empty.touch()  # e.g. left by `sqlite3 file .quit`: nothing in it to lose
    assert ensure_store(_uri(empty)) is True
    assert inspect(empty).kind == "healthy"
    for uri in ("http://127.0.0.1:1", "sqlite://", "sqlite:///:memory:", "postgresql://u@h/db"):
        assert ensure_store(uri) is False  # not a local SQLite file: MLflow's business
