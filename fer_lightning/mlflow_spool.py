"""A local spool of MLflow logging calls that could not be sent, and `fer-mlflow-sync`, which replays them."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunTag

FORMAT = "fer_lightning.mlflow_spool/1"
SPOOL_NAME = "spool.jsonl"
# client methods whose effect can be replayed later (everything else needs an answer from the server now)
SPOOLED_CALLS = frozenset(
    {"log_batch", "log_metric", "log_param", "set_tag", "delete_tag", "set_terminated", "update_run",
     "log_artifact", "log_artifacts", "log_text", "log_dict"}
)  # fmt: skip
_ENTITIES = {"Metric": Metric, "Param": Param, "RunTag": RunTag}


class SpoolError(ValueError):
    """A spool file that cannot be read or replayed; the message names the file and line."""


def _encode(value: Any) -> Any:
    """JSON form of a logging argument; MLflow entities keep their type so they can be rebuilt."""
    if isinstance(value, Metric):
        return {"__entity__": "Metric", "key": value.key, "value": value.value, "timestamp": value.timestamp,
                "step": value.step}  # fmt: skip
    if isinstance(value, (Param, RunTag)):
        return {"__entity__": type(value).__name__, "key": value.key, "value": value.value}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot keep an MLflow call argument of type {type(value).__name__} in the spool")


def _decode(value: Any) -> Any:
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        kind = value.get("__entity__")
        if kind is not None:
            fields = {k: v for k, v in value.items() if k != "__entity__"}
            return _ENTITIES[kind](**fields)
        return {k: _decode(v) for k, v in value.items()}
    return value


def _count(method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Counter:
    """What one call carries, in the units a user cares about (metric values, params, tags, artifacts)."""
    c: Counter = Counter()
    if method == "log_batch":
        names = ("metrics", "params", "tags")
        for i, name in enumerate(names, start=1):
            value = kwargs.get(name, args[i] if len(args) > i else None)
            c[name] += len(value or ())
    elif method == "log_metric":
        c["metrics"] += 1
    elif method == "log_param":
        c["params"] += 1
    elif method in ("set_tag", "delete_tag"):
        c["tags"] += 1
    elif method in ("set_terminated", "update_run"):
        c["run status"] += 1
    else:
        c["artifacts"] += 1
    return c


class Spool:
    """Append-only JSONL file of logging calls, with copies of the artifact files they name."""

    def __init__(self, directory: str | Path, tracking_uri: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / SPOOL_NAME
        self.tracking_uri = tracking_uri
        self.counts: Counter = Counter()
        self.calls = 0

    def append(self, method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        """Keep one call; artifact files are copied now, since the originals may be temporary."""
        if method not in SPOOLED_CALLS:
            raise SpoolError(f"MLflow call {method} cannot be kept for later (only {sorted(SPOOLED_CALLS)})")
        self.directory.mkdir(parents=True, exist_ok=True)
        args, kwargs = list(args), dict(kwargs)
        if method in ("log_artifact", "log_artifacts"):
            args, kwargs = self._copy_artifact(method, args, kwargs)
        line = {"seq": self.calls, "method": method, "args": _encode(args), "kwargs": _encode(kwargs),
                "spooled_at": time.time()}  # fmt: skip
        new = not self.path.exists()
        with self.path.open("a", encoding="utf-8") as fh:
            if new:
                fh.write(json.dumps({"format": FORMAT, "tracking_uri": self.tracking_uri}) + "\n")
            fh.write(json.dumps(line) + "\n")
        self.calls += 1
        self.counts.update(_count(method, args, kwargs))

    def _copy_artifact(self, method: str, args: list, kwargs: dict) -> tuple[list, dict]:
        key = "local_path" if method == "log_artifact" else "local_dir"
        source = Path(kwargs[key] if key in kwargs else args[1])
        target = self.directory / "artifacts" / str(self.calls) / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
        relative = str(target.relative_to(self.directory))  # relative: the spool folder can be moved as a whole
        if key in kwargs:
            kwargs[key] = relative
        else:
            args[1] = relative
        return args, kwargs

    def summary(self) -> str:
        """'12 metrics, 3 tags, 1 artifacts, 1 run status' for the calls kept so far."""
        return ", ".join(f"{n} {what}" for what, n in sorted(self.counts.items()) if n) or "nothing"


@dataclass
class SpooledCall:
    line: int
    method: str
    args: list
    kwargs: dict


def read_spool(path: str | Path) -> tuple[dict[str, Any], list[SpooledCall]]:
    """The header and the calls of a spool file, with artifact paths made absolute again."""
    path = Path(path)
    if path.is_dir():
        path = path / SPOOL_NAME
    if not path.is_file():
        raise SpoolError(f"{path}: no such spool file (it is written as <run output dir>/mlflow_spool/{SPOOL_NAME})")
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError as err:
        raise SpoolError(f"{path}:1: not a spool header: {err}") from err
    if header.get("format") != FORMAT:
        raise SpoolError(f"{path}:1: expected a header with format {FORMAT!r}, found {lines[0][:200]!r}")
    calls = []
    for number, text in enumerate(lines[1:], start=2):
        if not text.strip():
            continue
        try:
            item = json.loads(text)
            call = SpooledCall(number, item["method"], _decode(item["args"]), _decode(item["kwargs"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            # a crash while appending can leave a torn last line; anything else is damage worth reporting
            if number == len(lines):
                print(f"warning: {path}:{number}: ignoring an incomplete last line ({err})", file=sys.stderr)
                continue
            raise SpoolError(f"{path}:{number}: unreadable spool line: {err}") from err
        if call.method not in SPOOLED_CALLS:
            raise SpoolError(f"{path}:{number}: unknown call {call.method!r}")
        if call.method in ("log_artifact", "log_artifacts"):
            key = "local_path" if call.method == "log_artifact" else "local_dir"
            if key in call.kwargs:
                call.kwargs[key] = str(path.parent / call.kwargs[key])
            else:
                call.args[1] = str(path.parent / call.args[1])
        calls.append(call)
    return header, calls


def _progress_path(spool_path: Path) -> Path:
    return spool_path.with_name(spool_path.name + ".uploaded")


def upload(path: str | Path, tracking_uri: str | None = None) -> tuple[int, int]:
    """Replay a spool into MLflow; returns (calls sent now, calls in the spool). Safe to run again after a stop."""
    from mlflow import MlflowClient

    path = Path(path)
    spool_path = path / SPOOL_NAME if path.is_dir() else path
    header, calls = read_spool(spool_path)
    uri = tracking_uri or header["tracking_uri"]
    progress = _progress_path(spool_path)
    done = int(progress.read_text().strip() or 0) if progress.exists() else 0
    from fer_lightning.mlflow_store import ensure_store

    ensure_store(uri)  # a broken store gets its one line, not MLflow's traceback
    client = MlflowClient(tracking_uri=uri)
    sent = 0
    for index, call in enumerate(calls):
        if index < done:
            continue
        try:
            getattr(client, call.method)(*call.args, **call.kwargs)
        except Exception as err:
            raise SpoolError(
                f"{spool_path}:{call.line}: {call.method} failed against {uri}: {err}. {index} of {len(calls)} calls "
                "are uploaded; run the same command again to continue from here"
            ) from err
        progress.write_text(str(index + 1))  # per call, so that a stop leaves an exact resume point
        sent += 1
    return sent, len(calls)


def upload_command(spool_path: str | Path) -> str:
    """The shell command that uploads a spool (printed to the user at the end of a run)."""
    return f"fer-mlflow-sync {spool_path}"


def main(argv: Sequence[str] | None = None) -> int:
    """fer-mlflow-sync SPOOL [--tracking-uri URI]: send kept MLflow calls once the server is reachable again."""
    parser = argparse.ArgumentParser(
        prog="fer-mlflow-sync",
        description="Upload the MLflow logging calls a run kept locally while its tracking server was unreachable.",
    )
    parser.add_argument("spool", help=f"the spool file ({SPOOL_NAME}) or the mlflow_spool folder holding it")
    parser.add_argument("--tracking-uri", default=None, help="send to this store instead of the one in the spool")
    args = parser.parse_args(argv)
    try:
        sent, total = upload(args.spool, args.tracking_uri)
    except SpoolError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"uploaded {sent} of {total} calls from {args.spool}" + (" (the rest were sent before)" if sent < total else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
