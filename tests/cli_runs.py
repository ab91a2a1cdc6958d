"""Helpers for tests that run `python -m fer_lightning.cli.train` as a real subprocess and read MLflow back."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from mlflow import MlflowClient

EXPERIMENT = "fer_lightning"


def train_command(*overrides: str, multirun: bool = False) -> list[str]:
    """The fer-train command line (through `python -m`, so the test's interpreter and package are used)."""
    return [sys.executable, "-m", "fer_lightning.cli.train", *(["-m"] if multirun else []), *overrides]


def base_overrides(root: Path, cache_dir: Path, tracking_uri: str) -> list[str]:
    """Overrides every subprocess run shares: everything under `root`, tiny data (debug=fast), CPU, quiet."""
    return [
        "debug=fast",
        f"paths.cache_dir={cache_dir}",
        f"logger.tracking_uri={tracking_uri}",
        f"logger.artifact_location={root / 'mlruns' / 'artifacts'}",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    ]


def train_env(root: Path) -> dict[str, str]:
    """Environment of a subprocess run: FER_ROOT in tmp, one thread per process (2 shared cores, reproducible sums)."""
    env = dict(os.environ)
    env.update({"FER_ROOT": str(root), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "FER_DEBUG": "1"})
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def run_train(
    root: Path, overrides: Sequence[str], timeout: float, multirun: bool = False
) -> subprocess.CompletedProcess:
    """Run fer-train to the end (bounded) and return it; raises with its output when it fails."""
    proc = subprocess.run(
        train_command(*overrides, multirun=multirun),
        cwd=root, env=train_env(root), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"fer-train exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def training_runs(tracking_uri: str) -> list[Any]:
    """Every MLflow run of the experiment except sweep parent runs (the runs that trained)."""
    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        return []
    runs = client.search_runs([exp.experiment_id])
    return [r for r in runs if r.data.tags.get("sweep.role") != "parent"]


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    """A metric's (step, value) pairs, sorted."""
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a Lightning checkpoint."""
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def max_weight_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest absolute difference over all tensors (the key sets must be equal)."""
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)
