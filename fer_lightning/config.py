"""Start-up validation of the composed config: bad values stop the run with the key and the allowed range."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from fer_lightning.data.sampling import STRATEGIES
from fer_lightning.errors import ConfigError

CHECK_POLICIES = ("error", "warn", "drop")
CHECK_DECODES = ("none", "header", "full")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: allowed {allowed}")


def validate_config(cfg: DictConfig) -> None:
    """Check the values the code cannot recover from later (types are checked by use)."""
    from fer_lightning.losses import validate_loss_config

    data = cfg.data
    _require(int(data.image_size) >= 16, "data.image_size", data.image_size, "an integer >= 16")
    _require(int(data.channels) in (1, 3), "data.channels", data.channels, "1 (grayscale) or 3 (RGB)")
    _require(int(data.batch_size) >= 1, "data.batch_size", data.batch_size, "an integer >= 1")
    _require(0.0 < float(data.val_fraction) < 1.0, "data.val_fraction", data.val_fraction, "a fraction in (0, 1)")
    _require(data.checks in CHECK_POLICIES, "data.checks", data.checks, " | ".join(CHECK_POLICIES))
    _require(data.checks_decode in CHECK_DECODES, "data.checks_decode", data.checks_decode, " | ".join(CHECK_DECODES))
    _require(cfg.sampling.name in STRATEGIES, "sampling.name", cfg.sampling.name, " | ".join(STRATEGIES))
    ff = float(cfg.backbone.get("freeze_fraction", 0.0))
    _require(0.0 <= ff < 1.0, "backbone.freeze_fraction", ff, "a fraction in [0, 1)")
    loss = cfg.loss
    validate_loss_config(
        name=loss.name,
        weighting=loss.weighting,
        beta=float(loss.beta),
        gamma=float(loss.gamma),
        label_smoothing=float(loss.label_smoothing),
        va=loss.va,
        va_weight=float(loss.va_weight),
        landmark_weight=float(loss.landmark_weight),
    )
    _require(cfg.eval.tta in ("none", "hflip"), "eval.tta", cfg.eval.tta, "none | hflip")
