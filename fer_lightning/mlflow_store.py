"""A local SQLite MLflow store that is never left half-created, and a one-line answer for one that is broken.

MLflow creates a new SQLite store in place: it creates the tables, then runs ~70 alembic migrations, each
committed on its own. A first run stopped in those seconds (a timeout, Ctrl-C, a killed SLURM job) leaves a
half-migrated file behind that fails every later run with an alembic traceback (`table _alembic_tmp_tags
already exists`). Here a new store is created under a lock file (`<store>.lock`) in a temporary file beside
it (`<store>.tmp-<pid>`) and moved into place (os.replace, atomic) only once it is complete: the store path
holds either nothing or a whole store, whenever the creating process is killed. Parallel first runs wait for
the one that creates it. An existing store is only read (sqlite3, before MLflow opens it); when it is
half-migrated, at another schema revision or not an MLflow store, MlflowStoreError says so in one line with
the command that fixes it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

log = logging.getLogger(__name__)

SQLITE_HEADER = b"SQLite format 3\x00"
TMP_TABLE_PREFIX = "_alembic_tmp_"
# tables whose rows are what a user would lose with the file (experiment 0, "Default", is MLflow's own)
_CONTENT_QUERIES = {
    "runs": "SELECT count(*) FROM {t}",
    "experiments": "SELECT count(*) FROM {t} WHERE experiment_id != 0",
    "registered_models": "SELECT count(*) FROM {t}",
    "trace_info": "SELECT count(*) FROM {t}",
    "logged_models": "SELECT count(*) FROM {t}",
}
LOCK_TIMEOUT_S = 600.0  # creating a store takes seconds; a lock held this long is a stuck process


class MlflowStoreError(RuntimeError):
    """The SQLite store at logger.tracking_uri is broken; the message names the file, the fault and the fix."""


@dataclass(frozen=True)
class StoreState:
    """What inspect() found: kind is "missing", "empty" (no tables: safe to create over) or "healthy"."""

    kind: str
    revision: str | None = None


def sqlite_path(tracking_uri: str) -> Path | None:
    """The file of a `sqlite:///<path>` tracking URI (relative paths from the working directory), else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    path = tracking_uri[len("sqlite:///") :].split("?", 1)[0]
    if not path or path == ":memory:":
        return None
    return Path(path)


@functools.lru_cache(maxsize=1)
def head_revision() -> str:
    """The schema revision this MLflow creates and expects: the head of its packaged alembic migrations."""
    import mlflow
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory(str(Path(mlflow.__file__).parent / "store" / "db_migrations")).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"MLflow's migrations have {len(heads)} heads ({heads}); expected one")
    return heads[0]


@functools.lru_cache(maxsize=1)
def _known_revisions() -> frozenset[str]:
    import mlflow
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory(str(Path(mlflow.__file__).parent / "store" / "db_migrations"))
    return frozenset(script.revision for script in scripts.walk_revisions())


def _mlflow_version() -> str:
    import mlflow

    return mlflow.__version__


def _connect(path: Path) -> sqlite3.Connection:
    """A connection that never creates the file. Not read-only: SQLite must be able to roll back a hot journal
    (a writer killed mid-transaction), which is what any MLflow connection would do first anyway."""
    uri = "file:" + quote(str(path.resolve())) + "?mode=rw"
    return sqlite3.connect(uri, uri=True, timeout=20.0)


def _content(conn: sqlite3.Connection, tables: set[str]) -> int | None:
    """Rows a user would lose with the file (runs, experiments, models, traces), None when unknown."""
    total = 0
    try:
        for table, query in _CONTENT_QUERIES.items():
            for name in (table, TMP_TABLE_PREFIX + table):  # a table mid-migration may hold the rows
                if name in tables:
                    total += int(conn.execute(query.format(t=f'"{name}"')).fetchone()[0])
    except sqlite3.Error:
        return None
    return total


def inspect(path: Path, tracking_uri: str | None = None) -> StoreState:
    """Read (never change) the store at path; raise MlflowStoreError when it is not a whole, current one."""
    uri = tracking_uri or f"sqlite:///{path}"
    if not path.exists():
        return StoreState("missing")
    if path.is_dir():
        raise MlflowStoreError(f"MLflow store {path} is a directory, not a SQLite file; "
                               f"point logger.tracking_uri at a file (sqlite:///{path}/mlflow.db)")  # fmt: skip
    if path.stat().st_size == 0:
        return StoreState("empty")
    q = shlex.quote(str(path))
    move_aside = f"move it aside (mv {q} {q}.bak) or point logger.tracking_uri at another file"
    with open(path, "rb") as fh:
        header = fh.read(len(SQLITE_HEADER))
    if header != SQLITE_HEADER:
        raise MlflowStoreError(f"MLflow store {path} is not a SQLite database (so not an MLflow store): {move_aside}")
    try:
        conn = _connect(path)
    except sqlite3.Error as err:
        raise MlflowStoreError(f"MLflow store {path} cannot be opened ({err}): {move_aside}") from err
    try:
        try:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.OperationalError as err:
            if "locked" in str(err).lower():  # a writer holds it: it is in use, so not ours to judge now
                log.warning("MLflow store %s is locked by another process; not checked", path)
                return StoreState("healthy")
            raise MlflowStoreError(
                f"MLflow store {path} is not a readable SQLite database ({err}): {move_aside}"
            ) from err
        except sqlite3.DatabaseError as err:
            raise MlflowStoreError(
                f"MLflow store {path} is not a readable SQLite database ({err}): {move_aside}"
            ) from err
        if not tables:
            return StoreState("empty")
        content = _content(conn, tables)
        revision = None
        if "alembic_version" in tables:
            try:
                row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
                revision = row[0] if row else None
            except sqlite3.Error:
                revision = None
    finally:
        conn.close()

    head = head_revision()
    leftovers = sorted(t for t in tables if t.startswith(TMP_TABLE_PREFIX))
    remove = f"remove it and run again (a new store is created): rm {q}"
    backup = f"cp {q} {q}.bak"
    if leftovers:
        what = (f"is half-migrated (leftover table{'s' if len(leftovers) > 1 else ''} {', '.join(leftovers)} "
                "from an interrupted MLflow schema migration)")  # fmt: skip
        if content == 0:
            raise MlflowStoreError(f"MLflow store {path} {what} and holds no runs: {remove}")
        sql = "; ".join(_repair_sql(t, tables) for t in leftovers)
        raise MlflowStoreError(f"MLflow store {path} {what}; back it up and repair it: {backup} && "
                               f"sqlite3 {q} {shlex.quote(sql)} && mlflow db upgrade {shlex.quote(uri)}")  # fmt: skip
    if revision is None:
        if "experiments" not in tables:
            raise MlflowStoreError(f"MLflow store {path} is a SQLite database without MLflow's tables (not an "
                                   f"MLflow store): {move_aside}")  # fmt: skip
        what = "is half-created (MLflow tables without a schema revision: its creation was interrupted)"
        if content == 0:
            raise MlflowStoreError(f"MLflow store {path} {what} and holds no runs: {remove}")
        raise MlflowStoreError(f"MLflow store {path} {what} but holds data: {move_aside}")
    if revision == head:
        return StoreState("healthy", revision)
    if revision not in _known_revisions():
        raise MlflowStoreError(f"MLflow store {path} has schema revision {revision}, unknown to MLflow "
                               f"{_mlflow_version()} here (written by a newer MLflow): upgrade mlflow in this "
                               "environment, or point logger.tracking_uri at another store")  # fmt: skip
    what = f"is at MLflow schema revision {revision}, older than {head} that MLflow {_mlflow_version()} needs"
    if content == 0:  # most likely a first run stopped mid-migration: nothing to keep, and upgrade may not cope
        raise MlflowStoreError(f"MLflow store {path} {what}, and holds no runs: {remove}")
    raise MlflowStoreError(f"MLflow store {path} {what}; back it up and upgrade it: {backup} && "
                           f"mlflow db upgrade {shlex.quote(uri)}")  # fmt: skip


def _repair_sql(tmp_table: str, tables: set[str]) -> str:
    """SQL that undoes one interrupted batch migration step, so `mlflow db upgrade` can run it again."""
    original = tmp_table[len(TMP_TABLE_PREFIX) :]
    if original in tables:  # stopped while copying: the original is intact
        return f"DROP TABLE {tmp_table}"
    return f"ALTER TABLE {tmp_table} RENAME TO {original}"  # stopped between dropping the original and renaming


@contextlib.contextmanager
def _locked(lock_path: Path, timeout_s: float) -> Iterator[None]:
    """An exclusive lock on lock_path (released by the OS when the holder dies, SIGKILL included)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: filelock (a torch dependency) does the same with the platform's locks
        from filelock import FileLock, Timeout

        try:
            with FileLock(str(lock_path), timeout=timeout_s):
                yield
        except Timeout as err:
            raise MlflowStoreError(_lock_timeout_message(lock_path, timeout_s)) from err
        return
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + timeout_s
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    log.info("waiting for another process creating the MLflow store (lock %s)", lock_path)
                    waited = True
                if time.monotonic() > deadline:
                    raise MlflowStoreError(_lock_timeout_message(lock_path, timeout_s)) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _lock_timeout_message(lock_path: Path, timeout_s: float) -> str:
    return (f"MLflow store {lock_path.with_suffix('')}: another process has held its creation lock {lock_path} for "
            f"{timeout_s:.0f} s; stop that process (or wait for it) and run again")  # fmt: skip


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        pass
    finally:
        os.close(fd)


def _create(path: Path) -> None:
    """Create and migrate a new store in <path>.tmp-<pid>, then move it onto path (the lock is held)."""
    from mlflow import MlflowClient

    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp_uri = f"sqlite:///{tmp.resolve()}"
    try:
        MlflowClient(tracking_uri=tmp_uri).search_experiments()  # creates the tables and runs every migration
        _release_engine(tmp_uri)
        state = inspect(tmp)
        if state.kind != "healthy":
            raise RuntimeError(f"MLflow left the new store {tmp} {state.kind}")
        _fsync(tmp)
        for suffix in ("-journal", "-wal", "-shm"):  # a stray one beside the target would apply to the new file
            with contextlib.suppress(FileNotFoundError):
                os.remove(f"{path}{suffix}")
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        for leftover in (tmp, Path(f"{tmp}-journal")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
    log.info("created MLflow store %s (schema %s)", path, state.revision)


def _release_engine(tmp_uri: str) -> None:
    """Close MLflow's cached connections to the temporary file (best effort: a private cache of MLflow's)."""
    with contextlib.suppress(Exception):
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        engine = SqlAlchemyStore._engine_map.pop(tmp_uri, None)
        if engine is not None:
            engine.dispose()


def _remove_stale_tmp(path: Path) -> None:
    """Temporary stores of creators that were killed (with the lock held, no creator is alive)."""
    prefix = f"{path.name}.tmp-"
    with os.scandir(path.parent) as entries:
        for entry in entries:
            if entry.name.startswith(prefix) and entry.is_file():
                with contextlib.suppress(FileNotFoundError):
                    os.remove(entry.path)


def ensure_store(tracking_uri: str, *, lock_timeout_s: float = LOCK_TIMEOUT_S) -> bool:
    """Make sure a `sqlite:///` tracking URI names a whole, current MLflow store before MLflow opens it.

    Missing (or empty) stores are created atomically under `<store>.lock`; existing ones are only read and
    raise MlflowStoreError when broken. Other URIs (http, other databases) are left to MLflow. Returns True
    when this call created the store."""
    path = sqlite_path(tracking_uri)
    if path is None:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    if inspect(path, tracking_uri).kind == "healthy":
        return False
    with _locked(path.with_name(path.name + ".lock"), lock_timeout_s):
        if inspect(path, tracking_uri).kind == "healthy":  # another process created it while this one waited
            return False
        _remove_stale_tmp(path)
        _create(path)
    return True
