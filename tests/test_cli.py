"""The fer-train command as a user runs it: Hydra composes, errors are one clear line, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(args: list[str], cwd: Path, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "FER_ROOT": str(cwd), "PYTHONUNBUFFERED": "1", **(env_extra or {})}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, "-m", "fer_lightning.cli.train", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_cli_trains_and_prints_baseline_and_ui_command(tmp_path, shared_cache):
    res = run_cli(["debug=fast", f"paths.cache_dir={shared_cache}", "trainer.enable_progress_bar=false"], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Imbalanced" in res.stdout  # the matching AffectNet baseline column
    assert "make ui" in res.stdout
    # the default store: SQLite inside <root>/mlruns
    assert (tmp_path / "mlruns" / "mlflow.db").exists()
    assert list((tmp_path / "outputs" / "train").glob("*/checkpoints/last.ckpt"))


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["sampling=smote"], "Could not find 'sampling/smote'"),
        (["loss=class_balanced", "loss.beta=1.5"], "loss.beta"),
        (["data=affectnet", "data.root=/nonexistent/affectnet"], "data.root"),
    ],
)
def test_cli_bad_input_is_one_clear_message(tmp_path, args, needle):
    res = run_cli([*args, "logger=none"], tmp_path)
    assert res.returncode != 0
    assert needle in res.stderr
    if "Could not find" not in needle:
        assert "Traceback" not in res.stderr
        assert res.stderr.strip().splitlines()[-1].startswith("error: ")
