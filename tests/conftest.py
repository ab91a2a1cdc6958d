"""Shared fixtures: the real Hydra config composed once per test and shrunk to seconds (debug=fast)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from fer_lightning.config_dir import compose_config

# two cores shared with data workers: keep torch from oversubscribing them
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One data cache for the session, so the tiny synthetic data set is generated once."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow SQLite store: creating one costs ~10 s, copying it costs nothing."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def one_thread():
    """In-process runs with one thread, like the subprocesses of the DDP/resume tests (OMP_NUM_THREADS=1): the
    same float summation order, so their metrics can be compared with in-process runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def mlflow_db(tmp_path: Path, mlflow_template_db: Path) -> str:
    """Tracking URI of a private SQLite store in tmp_path/mlruns, copied from the migrated template."""
    target = tmp_path / "mlruns" / "mlflow.db"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(mlflow_template_db, target)
    return f"sqlite:///{target}"


@pytest.fixture
def make_cfg(tmp_path: Path, shared_cache: Path, mlflow_db: str) -> Callable[..., DictConfig]:
    """Compose conf/train.yaml with debug=fast, paths in tmp_path and a private SQLite MLflow store."""

    def _make(*overrides: str, debug: str | None = "fast") -> DictConfig:
        base = [
            f"paths.root_dir={tmp_path}",
            f"paths.output_dir={tmp_path / 'out'}",
            f"paths.cache_dir={shared_cache}",
            f"logger.tracking_uri={mlflow_db}",
            f"logger.artifact_location={tmp_path / 'mlruns' / 'artifacts'}",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
        ]
        if debug:
            base.append(f"debug={debug}")
        return compose_config("train", [*base, *overrides])

    return _make
