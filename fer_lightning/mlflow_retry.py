"""MLflow logging that survives a busy SQLite store or an unreachable tracking server.

Every client call is retried with exponential backoff for a bounded time (`logger.retry_timeout_s`) when the
failure is transient ("database is locked", connection refused/reset, timeouts, HTTP 429/503). When the budget
runs out the logger goes offline: training carries on, the calls that can be replayed later are kept in a
local spool (see mlflow_spool.py) and the run's end prints the `fer-mlflow-sync` command that uploads them.
MLflow's own async logging (MLFLOW_ENABLE_ASYNC_LOGGING) only logs and drops a batch that fails, so it is
no substitute for this.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import requests
from mlflow.exceptions import MlflowException
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from fer_lightning.mlflow_spool import SPOOLED_CALLS, Spool, upload_command

log = logging.getLogger(__name__)

T = TypeVar("T")

# MLflow error codes that mean "try again later" rather than "this request is wrong"
TRANSIENT_CODES = frozenset({"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"})
_TRANSIENT_TYPES = (
    requests.exceptions.ConnectionError,
    requests.exceptions.Timeout,
    requests.exceptions.RetryError,  # urllib3 gave up on 429/503 answers
    ConnectionError,
    TimeoutError,
)
_TRANSIENT_TEXT = ("database is locked", "database table is locked", "connection refused", "connection reset")


def is_transient(err: BaseException) -> bool:
    """True for failures that another attempt later may not have (lock contention, the network, overload)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:  # MLflow wraps the cause: walk the whole chain
        seen.add(id(current))
        if isinstance(current, _TRANSIENT_TYPES):
            return True
        if isinstance(current, sqlite3.OperationalError) and "locked" in str(current).lower():
            return True
        if isinstance(current, MlflowException) and current.error_code in TRANSIENT_CODES:
            return True
        if any(text in str(current).lower() for text in _TRANSIENT_TEXT):
            return True
        current = current.__cause__ or current.__context__
    return False


def retry_call(
    fn: Callable[[], T],
    *,
    timeout_s: float,
    what: str,
    initial_delay_s: float = 0.25,
    max_delay_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call fn, retrying transient failures with jittered exponential backoff until timeout_s has passed."""
    deadline = time.monotonic() + timeout_s
    delay = initial_delay_s
    attempt = 1
    while True:
        try:
            return fn()
        except Exception as err:
            remaining = deadline - time.monotonic()
            if not is_transient(err) or remaining <= 0:
                raise
            # jitter spreads parallel jobs apart, so they do not hit a locked SQLite file in lockstep
            pause = min(delay * random.uniform(0.5, 1.5), remaining, max_delay_s)
            log.warning("%s failed (attempt %d: %s); retrying in %.1f s", what, attempt, _short(err), pause)
            sleep(pause)
            delay = min(delay * 2, max_delay_s)
            attempt += 1


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


@contextlib.contextmanager
def _http_limits(tracking_uri: str, timeout_s: float) -> Iterator[None]:
    """Cap MLflow's own HTTP retries (7 with backoff, ~4 minutes) so our bounded budget decides; user settings win."""
    if not tracking_uri.startswith(("http://", "https://")):
        yield
        return
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(5, math.ceil(timeout_s)))}
    added = [key for key in wanted if key not in os.environ]
    os.environ.update({key: wanted[key] for key in added})
    try:
        yield
    finally:
        for key in added:
            os.environ.pop(key, None)


def _pin_time(name: str, args: tuple, kwargs: dict) -> dict:
    """Record now as the time of a spooled call that would otherwise take the time of its upload."""
    now_ms = int(time.time() * 1000)
    if name == "set_terminated" and len(args) < 3 and kwargs.get("end_time") is None:
        return {**kwargs, "end_time": now_ms}
    if name == "log_metric" and len(args) < 4 and kwargs.get("timestamp") is None:
        return {**kwargs, "timestamp": now_ms}
    return kwargs


class RetryingClient:
    """Wraps an MlflowClient: every call is retried; replayable calls are spooled once the store is unreachable."""

    def __init__(self, client: Any, *, tracking_uri: str, timeout_s: float, spool: Spool | None) -> None:
        self._client = client
        self._tracking_uri = tracking_uri
        self._timeout_s = float(timeout_s)
        self.spool = spool
        self.offline_reason: str | None = None

    @property
    def offline(self) -> bool:
        """True once a call ran out of retries: later calls are spooled (or fail fast) instead of waiting again."""
        return self.offline_reason is not None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # keeps copy/pickle from recursing through a half-built object
            raise AttributeError(name)
        target = getattr(self._client, name)
        if not callable(target):
            return target

        def call(*args: Any, **kwargs: Any) -> Any:
            return self._call(name, target, args, kwargs)

        call.__name__ = name
        call.__doc__ = getattr(target, "__doc__", None)
        return call

    def _call(self, name: str, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        spoolable = self.spool is not None and name in SPOOLED_CALLS
        if self.offline and spoolable:
            self.spool.append(name, args, _pin_time(name, args, kwargs))
            return None
        budget = 0.0 if self.offline else self._timeout_s
        try:
            with _http_limits(self._tracking_uri, self._timeout_s):
                return retry_call(lambda: fn(*args, **kwargs), timeout_s=budget, what=f"MLflow {name}")
        except Exception as err:
            if name == "create_experiment" and getattr(err, "error_code", None) == "RESOURCE_ALREADY_EXISTS":
                # a parallel job created it between our lookup and our create: use theirs
                experiment_name = kwargs.get("name", args[0] if args else None)
                return self._call("get_experiment_by_name", self._client.get_experiment_by_name,
                                  (experiment_name,), {}).experiment_id  # fmt: skip
            if not is_transient(err):
                raise
            self._go_offline(name, err)
            if not spoolable:
                raise
        self.spool.append(name, args, _pin_time(name, args, kwargs))
        return None

    def _go_offline(self, name: str, err: BaseException) -> None:
        if self.offline:
            return
        self.offline_reason = f"{name} failed for {self._timeout_s:g} s: {_short(err)}"
        where = f"; keeping what cannot be sent in {self.spool.path}" if self.spool is not None else ""
        log.error("MLflow at %s is unreachable (%s)%s. Training goes on.", self._tracking_uri, self.offline_reason,
                  where)  # fmt: skip


class TrackingUnavailableError(RuntimeError):
    """The tracking store could not be reached to create the run (so there is nothing to keep logging into)."""


class ResilientMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger with bounded retries and a local spool for what could not be sent."""

    def __init__(self, *args: Any, retry_timeout_s: float = 60.0, spool_dir: str | Path | None = None,
                 **kwargs: Any) -> None:  # fmt: skip
        super().__init__(*args, **kwargs)
        spool = Spool(spool_dir, self._tracking_uri) if spool_dir is not None else None
        self._mlflow_client = RetryingClient(
            self._mlflow_client, tracking_uri=self._tracking_uri, timeout_s=retry_timeout_s, spool=spool
        )

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The client; creating the run fails with a clear message when the store stays unreachable."""
        try:
            return super().experiment
        except Exception as err:
            if self._initialized or not is_transient(err):
                raise
            raise TrackingUnavailableError(
                f"cannot reach the MLflow tracking store logger.tracking_uri={self._tracking_uri} (retried for "
                f"{self.client._timeout_s:g} s: {_short(err)}). Start it (e.g. `make mlflow-server`), point "
                "logger.tracking_uri elsewhere, or run without tracking with logger=none"
            ) from err

    @property
    def client(self) -> RetryingClient:
        """The retrying client (also what `.experiment` returns once the run exists)."""
        return self._mlflow_client

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        """Lightning's finalize, which reads the run first; offline, only the final status is spooled."""
        if not self._initialized:
            return
        if not self.client.offline:
            try:
                super().finalize(status)
                return
            except Exception as err:
                if not is_transient(err):
                    raise
        if self.client.spool is not None:
            final = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(status, status)
            self.client.spool.append("set_terminated", (self.run_id, final), {"end_time": int(time.time() * 1000)})

    def unsent_report(self) -> str | None:
        """What could not be sent and the command that uploads it; None when everything arrived."""
        spool = self.client.spool
        if not self.client.offline:
            return None
        if spool is None or spool.calls == 0:
            return (
                f"MLflow at {self._tracking_uri} became unreachable ({self.client.offline_reason}); nothing was kept."
            )
        return (
            f"MLflow at {self._tracking_uri} became unreachable ({self.client.offline_reason}).\n"
            f"Training was not affected; {spool.calls} logging calls ({spool.summary()}) of run {self._run_id} "
            f"are kept in {spool.path}.\n"
            f"Upload them when the server is back:\n  {upload_command(spool.path)}"
        )
