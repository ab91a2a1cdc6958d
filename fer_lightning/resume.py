"""Resume after a crash: `resume=<run dir> | <MLflow run id> | auto`, and requeued SLURM jobs, continue a run.

Every run leaves `run.json` in its run directory: its MLflow run id and store, the identity of its config and
its status. Resuming continues `<run dir>/checkpoints/last.ckpt` (epoch, step, optimizer, scheduler, callbacks,
the train loader's position and RNG states) in the same run directory and the same MLflow run.

- `resume=<dir>`: a run directory (or its checkpoints folder, or the last.ckpt in it).
- `resume=<32 hex digits>`: an MLflow run id; its `output_dir` tag names the run directory.
- `resume=auto`: the most recent unfinished run under <root>/outputs and <root>/multirun with a last.ckpt and the
  same config; a new run when there is none.
- a requeued SLURM job (SLURM_RESTART_COUNT > 0) resumes its own run directory, if it has a last.ckpt.

The config must be the one of the run (same overrides), except for keys that do not change the result
(RUNTIME_KEYS). MLflow keeps the first value logged for a (metric, step): steps logged after the checkpoint and
before the crash are not logged twice. Lightning sends a step's (an epoch's) train metrics just after that
step's (epoch's) checkpoint callbacks, so a kill in those few milliseconds loses that one step's train metrics;
validation metrics are sent before the epoch's checkpoint and are never lost.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from fer_lightning import distributed, tracking
from fer_lightning.errors import ConfigError
from fer_lightning.last_checkpoint import LAST_NAME

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CHECKPOINT_DIR = "checkpoints"
# keys that may differ between a run and its resume: where things are, how they are shown, how often to save
RUNTIME_KEYS = (
    "paths",
    "resume",
    "run_name",
    "tags",
    "logger.tracking_uri",
    "logger.artifact_location",
    "logger.spool_dir",
    "logger.retry_timeout_s",
    "data.num_workers",
    "trainer.enable_progress_bar",
    "callbacks.checkpoint.every_n_train_steps",
    "callbacks.checkpoint.train_time_interval",
)
_RUN_ID = re.compile(r"[0-9a-f]{32}")


class ResumeError(ConfigError):
    """The run named by `resume` cannot be continued; the message says why and what to do."""


@dataclass
class RunRecord:
    """Contents of run.json."""

    run_id: str | None
    tracking_uri: str | None
    experiment_name: str | None
    config_key: str
    config: dict[str, str]
    status: str = "running"
    resumes: int = 0
    updated: float = field(default_factory=time.time)

    @classmethod
    def read(cls, path: Path) -> RunRecord:
        try:
            data = json.loads(path.read_text())
            return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})
        except (OSError, ValueError, TypeError) as err:
            raise ResumeError(f"resume: cannot read {path} ({err}); is it a fer-train run directory?") from err

    def write(self, path: Path) -> None:
        self.updated = time.time()
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True))
        os.replace(tmp, path)


def _is_runtime(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in RUNTIME_KEYS)


def _leaf_keys(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, Mapping) and node:
        return [k for name, value in node.items() for k in _leaf_keys(value, f"{prefix}{name}.")]
    return [prefix[:-1]]


def identity(cfg: DictConfig) -> dict[str, str]:
    """The config as flat `key: json value`, without RUNTIME_KEYS: what must match for a resume."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    out = {}
    for key in _leaf_keys(raw):
        if _is_runtime(key):
            continue  # never resolved: paths may refer to Hydra's runtime, absent outside fer-train
        value = OmegaConf.select(cfg, key)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        out[key] = json.dumps(value, sort_keys=True, default=str)
    return out


def config_key(ident: Mapping[str, str]) -> str:
    """Short hash of identity(): equal keys mean a run can be resumed with this config."""
    import hashlib

    return hashlib.sha256(json.dumps(dict(ident), sort_keys=True).encode()).hexdigest()[:16]


def config_differences(run: Mapping[str, str], now: Mapping[str, str], limit: int = 8) -> list[str]:
    """`key: run had X, now Y` for every identity key that differs (at most `limit`, then a count)."""
    keys = sorted(k for k in set(run) | set(now) if run.get(k) != now.get(k))
    lines = [f"{k}: run had {run.get(k, '(absent)')}, now {now.get(k, '(absent)')}" for k in keys[:limit]]
    if len(keys) > limit:
        lines.append(f"... and {len(keys) - limit} more")
    return lines


@dataclass
class ResumePoint:
    """A run to continue: its directory, checkpoint and record, and why it was chosen."""

    run_dir: Path
    record: RunRecord
    reason: str

    @property
    def checkpoint(self) -> Path:
        """The run's last.ckpt."""
        return self.run_dir / CHECKPOINT_DIR / LAST_NAME


def slurm_restart_count() -> int:
    """How often SLURM has requeued this job (0 outside SLURM)."""
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    except ValueError:
        return 0


def _point_from_dir(path: Path, reason: str) -> ResumePoint:
    path = path.resolve()
    if path.is_file():  # .../checkpoints/last.ckpt
        path = path.parent
    if path.name == CHECKPOINT_DIR and not (path / RUN_FILE).exists():
        path = path.parent
    record_path = path / RUN_FILE
    if not record_path.exists():
        raise ResumeError(f"resume={path}: no {RUN_FILE} there; pass a fer-train run directory (outputs/train/...)")
    point = ResumePoint(path, RunRecord.read(record_path), reason)
    if not point.checkpoint.exists():
        raise ResumeError(
            f"resume={path}: no {CHECKPOINT_DIR}/{LAST_NAME} (the run stopped before its first checkpoint, or ran "
            "with callbacks.checkpoint.save_last=false); start it again without resume"
        )
    return point


def _point_from_run_id(cfg: DictConfig, run_id: str) -> ResumePoint:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = str(cfg.logger.tracking_uri)
    from fer_lightning.mlflow_store import ensure_store

    ensure_store(uri)  # a broken store gets its one line, not MLflow's traceback
    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as err:
        raise ResumeError(f"resume={run_id}: no such MLflow run in {uri} (logger.tracking_uri)") from err
    run_dir = run.data.tags.get("output_dir")
    if not run_dir:
        raise ResumeError(f"resume={run_id}: the run has no output_dir tag (not started by fer-train?)")
    if not Path(run_dir).exists():
        raise ResumeError(f"resume={run_id}: its run directory {run_dir} is gone; nothing to resume from")
    return _point_from_dir(Path(run_dir), f"resume={run_id}")


def find_auto(root: Path, key: str, exclude: Path | None = None) -> ResumePoint | None:
    """The most recently checkpointed unfinished run under root/outputs and root/multirun with this config key."""
    best: tuple[float, ResumePoint] | None = None
    for top in ("outputs", "multirun"):
        if not (root / top).is_dir():
            continue
        for record_path in (root / top).rglob(RUN_FILE):
            run_dir = record_path.parent.resolve()
            ckpt = run_dir / CHECKPOINT_DIR / LAST_NAME
            if run_dir == exclude or not ckpt.exists():
                continue
            try:
                record = RunRecord.read(record_path)
            except ResumeError as err:
                log.warning("resume=auto: skipping %s", err)
                continue
            if record.config_key != key or record.status == "finished":
                continue
            mtime = ckpt.stat().st_mtime
            if best is None or mtime > best[0]:
                best = (mtime, ResumePoint(run_dir, record, "resume=auto"))
    return best[1] if best else None


def find_resume_point(cfg: DictConfig) -> ResumePoint | None:
    """The run that `cfg.resume` (or a SLURM requeue) asks to continue; None for a new run."""
    value = cfg.get("resume")
    output_dir = Path(str(cfg.paths.output_dir)).resolve()
    ident = identity(cfg)
    if value in (None, "", False):
        restarts = slurm_restart_count()
        if restarts and (output_dir / CHECKPOINT_DIR / LAST_NAME).exists() and (output_dir / RUN_FILE).exists():
            point = _point_from_dir(output_dir, f"SLURM requeue #{restarts}")
        else:
            return None
    elif str(value) == "auto":
        point = find_auto(Path(str(cfg.paths.root_dir)), config_key(ident), exclude=output_dir)
        if point is None:
            log.info("resume=auto: no unfinished run with this config and a last.ckpt; starting a new run")
            return None
    elif Path(os.path.expanduser(str(value))).exists():
        point = _point_from_dir(Path(os.path.expanduser(str(value))), f"resume={value}")
    elif _RUN_ID.fullmatch(str(value)):
        point = _point_from_run_id(cfg, str(value))
    else:
        raise ResumeError(
            f"resume={value!r} is neither an existing run directory, an MLflow run id (32 hex digits) nor 'auto'"
        )
    _check(point, cfg, ident)
    return point


def _check(point: ResumePoint, cfg: DictConfig, ident: Mapping[str, str]) -> None:
    record = point.record
    if record.status == "finished":
        raise ResumeError(
            f"{point.reason}: run {point.run_dir} already finished; resume continues interrupted runs only"
        )
    diff = config_differences(record.config, ident)
    if diff:
        overrides = point.run_dir / ".hydra" / "overrides.yaml"
        hint = f" (its overrides are in {overrides})" if overrides.exists() else ""
        raise ResumeError(
            f"{point.reason}: the config differs from the run's; pass the run's overrides{hint}:\n  "
            + "\n  ".join(diff)
        )
    uri = str(cfg.logger.tracking_uri) if cfg.logger.get("enabled", True) else None
    if record.run_id and uri and record.tracking_uri and uri != record.tracking_uri:
        raise ResumeError(
            f"{point.reason}: MLflow run {record.run_id} lives in {record.tracking_uri}, but logger.tracking_uri is "
            f"{uri}; pass logger.tracking_uri={record.tracking_uri}"
        )


class _SkipLoggedSteps:
    """Wraps a logger's log_metrics so that a (metric, step) the run already has is not logged again."""

    def __init__(self, logger: Any, seen: dict[str, set[int]]) -> None:
        self.logger = logger
        self.seen = seen

    def __call__(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        fresh = {k: v for k, v in metrics.items() if step is None or step not in self.seen.get(k, ())}
        for key in fresh:
            if step is not None:
                self.seen.setdefault(key, set()).add(step)
        if fresh:
            type(self.logger).log_metrics(self.logger, fresh, step)


def logged_steps(client: Any, run_id: str) -> dict[str, set[int]]:
    """Every metric of a run with the steps it has values for."""
    run = client.get_run(run_id)
    return {key: {m.step for m in client.get_metric_history(run_id, key)} for key in run.data.metrics}


def skip_logged_steps(logger: Any) -> None:
    """From now on the logger drops every (metric, step) its MLflow run already has (the first value stays)."""
    logger.log_metrics = _SkipLoggedSteps(logger, logged_steps(logger.experiment, logger.run_id))


class RunSession:
    """One training run's identity on disk and in MLflow: new, or resumed from a ResumePoint."""

    def __init__(self, cfg: DictConfig) -> None:
        distributed.check_launch(cfg)
        self.point = find_resume_point(cfg)
        self.rank_zero = distributed.is_rank_zero()
        self.identity = identity(cfg)
        if self.point is not None:
            cfg = copy.deepcopy(cfg)
            cfg.paths.output_dir = str(self.point.run_dir)  # continue in the run's own directory
            log.info("%s: resuming %s from %s", self.point.reason, self.point.run_dir, self.point.checkpoint)
        self.cfg = cfg
        self.output_dir = Path(str(cfg.paths.output_dir))
        self.record: RunRecord | None = None

    @property
    def resuming(self) -> bool:
        """True when this run continues an earlier one."""
        return self.point is not None

    @property
    def run_id(self) -> str | None:
        """The MLflow run to log into (None: create a new one)."""
        return self.point.record.run_id if self.point is not None else None

    @property
    def ckpt_path(self) -> str | None:
        """The checkpoint for trainer.fit(ckpt_path=...)."""
        return str(self.point.checkpoint) if self.point is not None else None

    def attach(self, logger: Any) -> None:
        """Write run.json (rank 0) and, when resuming, reopen the MLflow run without duplicate metric steps."""
        if not self.rank_zero:
            return
        lcfg = self.cfg.logger
        run_id = logger.run_id if logger is not None else None
        if self.point is not None:
            self.record = self.point.record
            self.record.resumes += 1
            self.record.status = "running"
        else:
            self.record = RunRecord(
                run_id=run_id,
                tracking_uri=str(lcfg.tracking_uri) if logger is not None else None,
                experiment_name=str(lcfg.get("experiment_name")) if logger is not None else None,
                config_key=config_key(self.identity),
                config=self.identity,
            )
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.record.write(self.output_dir / RUN_FILE)
        if logger is None:
            return
        tracking.set_tags(logger, {"output_dir": str(self.output_dir.resolve())})
        if self.point is not None:
            client = logger.experiment
            client.update_run(run_id, status="RUNNING")
            tracking.set_tags(
                logger,
                {"resume.count": self.record.resumes, "resume.reason": self.point.reason,
                 "resume.checkpoint": str(self.point.checkpoint)},
            )  # fmt: skip
            skip_logged_steps(logger)

    def callbacks(self, checkpoint_dir: Path) -> list[Any]:
        """last.ckpt writer, per-epoch reseeding, and preemption handling on SLURM."""
        from fer_lightning.data.resumable import TrainLoaderState
        from fer_lightning.last_checkpoint import EpochReseed, LastCheckpoint
        from fer_lightning.slurm import preemption_callbacks

        cb = self.cfg.callbacks.checkpoint
        out: list[Any] = [EpochReseed(int(self.cfg.seed)), TrainLoaderState()]
        last = None
        if cb.get("save_last", True):
            last = LastCheckpoint(
                checkpoint_dir,
                every_n_train_steps=cb.get("every_n_train_steps"),
                train_time_interval_s=cb.get("train_time_interval"),
            )
            out.append(last)
        return out + preemption_callbacks(last)

    def trainer_kwargs(self) -> dict[str, Any]:
        """Extra pl.Trainer arguments (SLURM ranks without Lightning's own requeue)."""
        return distributed.trainer_kwargs(self.cfg)

    def close(self, logger: Any, error: BaseException | None) -> None:
        """End the MLflow run and run.json: FINISHED, FAILED, or KILLED when the SLURM job was requeued.

        A requeue must end the process as a requeue even when the shutdown raised something else on the way
        (a rank whose peer already left gets a gloo "connection closed" in teardown): the Requeued is raised
        again, or a sweep would record the job as failed and submitit would report this attempt's result.
        """
        from fer_lightning.slurm import requeue_in

        requeued = requeue_in(error)
        if error is None:
            status, state = "FINISHED", "finished"
        elif requeued is not None:
            status, state = "KILLED", "requeued"
        else:
            status, state = "FAILED", "failed"
        if self.rank_zero and self.record is not None:
            self.record.status = state
            self.record.write(self.output_dir / RUN_FILE)
        tracking.end_run(logger, status)
        if requeued is not None and requeued is not error:
            raise requeued
