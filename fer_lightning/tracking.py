"""MLflow: the logger, flat params, tags, artifacts, and ending a failed run as FAILED with what it had."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import Param
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import MLFlowLogger

from fer_lightning.mlflow_retry import ResilientMLFlowLogger
from fer_lightning.mlflow_store import ensure_store

log = logging.getLogger(__name__)

# MLflow 3 accepts param values up to 6000 characters
_PARAM_MAX = 6000


def prepare_store(tracking_uri: str) -> None:
    """Before MLflow opens a local SQLite store: create a new one whole (never half-migrated, even when killed
    mid-creation; parallel first runs wait for one creator), or stop with one line (MlflowStoreError) when the
    existing file is half-migrated, at another schema revision or not an MLflow store. See mlflow_store.py."""
    ensure_store(tracking_uri)


def make_logger(
    cfg: Mapping[str, Any], *, run_name: str, tags: Mapping[str, str], run_id: str | None = None
) -> MLFlowLogger | None:
    """The MLflow logger for `logger.*` config, or None when `logger.enabled=false`."""
    if not cfg.get("enabled", True):
        return None
    uri = str(cfg["tracking_uri"])
    prepare_store(uri)
    artifact_location = cfg.get("artifact_location")
    if uri.startswith(("http://", "https://")) and artifact_location and "://" not in str(artifact_location):
        artifact_location = None  # a local path means nothing to a remote server: it serves its own artifact store
    if artifact_location and "://" not in str(artifact_location):
        Path(artifact_location).mkdir(parents=True, exist_ok=True)
        artifact_location = Path(artifact_location).resolve().as_uri()
    logger = ResilientMLFlowLogger(
        experiment_name=str(cfg.get("experiment_name", "fer_lightning")),
        run_name=run_name,
        tracking_uri=uri,
        tags=dict(tags),
        artifact_location=artifact_location,
        run_id=run_id,
        log_model=False,
        retry_timeout_s=float(cfg.get("retry_timeout_s", 60.0)),
        spool_dir=cfg.get("spool_dir"),
    )
    _ = logger.experiment  # create the run now: it exists (and can end FAILED) before anything else happens
    return logger


def flatten(cfg: DictConfig | Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {dotted.key: scalar}; lists become their string form."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out


def log_params(logger: MLFlowLogger, params: Mapping[str, Any]) -> None:
    """Log params with dotted keys (`loss.beta`), in batches of 100 (MLflow's limit per call)."""
    items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        logger.experiment.log_batch(logger.run_id, params=items[start : start + 100])


def log_artifact(logger: MLFlowLogger | None, path: Path, artifact_path: str | None = None) -> None:
    if logger is not None:
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)


def set_tags(logger: MLFlowLogger | None, tags: Mapping[str, Any]) -> None:
    if logger is None:
        return
    for key, value in tags.items():
        logger.experiment.set_tag(logger.run_id, key, str(value))


def end_run(logger: MLFlowLogger | None, status: str) -> None:
    """Mark the run FINISHED or FAILED (idempotent: Lightning may already have finalized it)."""
    if logger is None or logger._run_id is None:
        return
    try:
        logger.experiment.set_terminated(logger.run_id, status)
    except Exception as err:  # the run outcome matters more than a bookkeeping error here
        log.warning("could not mark MLflow run %s %s: %s", logger.run_id, status, err)
    report = logger.unsent_report() if isinstance(logger, ResilientMLFlowLogger) else None
    if report:  # the server went away mid-run: say what is kept locally and how to upload it
        print(report, file=sys.stderr, flush=True)


def git_commit(cwd: Path | None = None) -> str:
    """HEAD's commit (with '-dirty' when the tree has changes), or 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd, capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
