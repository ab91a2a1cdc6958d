"""Helpers for the evaluation/report/k-fold/bias tests: compose any config into a private root, write image folders."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from fer_lightning.config_dir import compose_config

VIA_HEADER = "filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,region_attributes\n"


def private_store(root: Path, template_db: Path) -> str:
    """A copy of the pre-migrated MLflow template store under root/mlruns; returns its tracking URI."""
    target = root / "mlruns" / "mlflow.db"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(template_db, target)
    return f"sqlite:///{target}"


def compose_cfg(name: str, root: Path, cache: Path, tracking_uri: str, *overrides: str, out: str = "out") -> DictConfig:
    """Compose conf/<name>.yaml like tests/conftest.py's make_cfg: debug=fast, paths in `root`, a private store."""
    base = [
        f"paths.root_dir={root}",
        f"paths.output_dir={root / out}",
        f"logger.tracking_uri={tracking_uri}",
        f"logger.artifact_location={root / 'mlruns' / 'artifacts'}",
    ]
    if name in ("train", "eval"):
        base += [
            f"paths.cache_dir={cache}",
            "trainer.accelerator=cpu",
            "trainer.enable_progress_bar=false",
            "debug=fast",
        ]
    return compose_config(name, [*base, *overrides])


def write_class_folder(
    root: Path, split: str, class_name: str, n: int, *, attributes: Sequence[dict] | None = None, seed: int = 0,
    size: int = 48, start: int = 0,
) -> list[str]:  # fmt: skip
    """n grayscale noise PNGs in root/split/class_name (plus a VGG Image Annotator CSV when `attributes` is given,
    one file_attributes dict per image); returns the file names."""
    folder = root / split / class_name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = []
    for i in range(n):
        name = f"{class_name}_{start + i:03d}.png"
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(folder / name)
        names.append(name)
    if attributes is not None:
        assert len(attributes) == n
        lines = [VIA_HEADER]
        for name, attrs in zip(names, attributes):
            quoted = json.dumps(attrs).replace('"', '""')
            lines.append(f'{name},{(folder / name).stat().st_size},"{quoted}",0,0,"{{}}","{{}}"\n')
        (folder / "via_metadata.csv").write_text("".join(lines))
    return names
