"""fer-export: Hydra entry point around fer_lightning.export (thin on purpose)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from fer_lightning.cli.errors import user_errors
from fer_lightning.cli.predict import require
from fer_lightning.config_dir import CONFIG_PATH


def _parity_images(spec: str, hparams: dict) -> np.ndarray:
    """Decode the parity images with the checkpoint's preprocessing; every file must be an image."""
    from fer_lightning.checkpoints import preprocessing_of
    from fer_lightning.data.images import load_face, to_chw
    from fer_lightning.predict import collect_inputs

    pre = preprocessing_of(hparams)
    size, channels, draft = int(pre["image_size"]), int(pre["channels"]), bool(pre.get("draft", True))
    return np.stack([to_chw(load_face(p, size=size, channels=channels, draft=draft)) for p in collect_inputs(spec)])


def run(cfg: DictConfig) -> Path:
    """Load, export, check parity and print the max abs differences; returns the written file."""
    from fer_lightning.checkpoints import load_checkpoint
    from fer_lightning.export import SUFFIX, ExportError, export_and_check
    from fer_lightning.tta import check_tta

    require(cfg, "ckpt_path")
    fmt = str(cfg.format)
    if fmt not in SUFFIX:
        raise ExportError(f"format={fmt!r} is invalid: allowed {' | '.join(SUFFIX)}")
    module, hparams = load_checkpoint(cfg.ckpt_path)
    tta = check_tta(str(cfg.eval.tta if cfg.eval.tta is not None else hparams.get("tta", "none")))
    ckpt = Path(cfg.ckpt_path)
    output = Path(cfg.output) if cfg.output else ckpt.with_suffix(SUFFIX[fmt])
    images = _parity_images(str(cfg.parity_input), hparams) if cfg.parity_input else None
    result = export_and_check(
        module, hparams, output, fmt=fmt, tta=tta, input_dtype=str(cfg.input_dtype), source=str(ckpt),
        images=images, atol=float(cfg.atol),
    )  # fmt: skip
    diffs = ", ".join(f"{k} {v:.3g}" for k, v in result.max_abs_diff.items())
    checker = "onnxruntime" if fmt == "onnx" else "torch.jit.load"
    print(f"wrote {result.path} ({fmt}, tta={tta}, input {cfg.input_dtype} 0..255 NCHW)")
    print(f"parity vs checkpoint on {result.batch_size} images ({checker}): max abs diff {diffs} (atol {cfg.atol:g})")
    return result.path


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="export")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
