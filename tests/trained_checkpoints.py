"""Real checkpoints for the prediction/export/recipe tests: trained once per session with debug=fast, then reused."""

from __future__ import annotations

from pathlib import Path

from fer_lightning.config_dir import compose_config


def trained_checkpoint(tmp_path_factory, cache_dir: Path, name: str, *overrides: str) -> Path:
    """Best checkpoint of a debug=fast run with `overrides`; the path is remembered under the session's basetemp."""
    from fer_lightning.train import train

    root = tmp_path_factory.getbasetemp() / f"trained_{name}"
    marker = root / "best_checkpoint.txt"
    if marker.is_file():
        return Path(marker.read_text())
    root.mkdir(parents=True, exist_ok=True)
    base = [
        f"paths.root_dir={root}",
        f"paths.output_dir={root / 'out'}",
        f"paths.cache_dir={cache_dir}",
        "logger=none",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "debug=fast",
    ]
    cfg = compose_config("train", [*base, *overrides])
    best = Path(train(cfg)["best_checkpoint"])
    marker.write_text(str(best))
    return best
