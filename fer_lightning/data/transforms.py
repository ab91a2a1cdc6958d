"""Training-split augmentation on uint8 CHW tensors (torchvision transforms v2); eval splits get none."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import v2

from fer_lightning.errors import ConfigError

WHERE_CHOICES: tuple[str, ...] = ("batch", "loader")


def augment_where(cfg: Mapping[str, Any] | None) -> str:
    """augment.where, checked: batch (the default: the module augments the batch on its device) or loader."""
    where = str((cfg or {}).get("where", "batch"))
    if where not in WHERE_CHOICES:
        raise ConfigError(f"augment.where={where!r} is not one of {', '.join(WHERE_CHOICES)}")
    return where


def build_train_transform(cfg: Mapping[str, Any]) -> v2.Transform | None:
    """Compose the per-item augmentation (augment.where=loader) from the `augment` group; None when all is off."""
    steps: list[v2.Transform] = []
    if float(cfg.get("hflip", 0.0)) > 0:
        steps.append(v2.RandomHorizontalFlip(p=float(cfg["hflip"])))
    rotation = float(cfg.get("rotation", 0.0))
    translate = float(cfg.get("translate", 0.0))
    scale = tuple(float(s) for s in cfg.get("scale", (1.0, 1.0)))
    if rotation or translate or scale != (1.0, 1.0):
        steps.append(v2.RandomAffine(degrees=rotation, translate=(translate, translate), scale=scale))
    brightness, contrast = float(cfg.get("brightness", 0.0)), float(cfg.get("contrast", 0.0))
    if brightness or contrast:
        steps.append(v2.ColorJitter(brightness=brightness, contrast=contrast))
    if float(cfg.get("erasing", 0.0)) > 0:
        steps.append(v2.RandomErasing(p=float(cfg["erasing"])))
    if not steps:
        return None
    return v2.Compose(steps)


def normalize_on_device(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B,C,H,W) -> normalized float on the images' device; batches travel as uint8 (4x less to copy)."""
    x = images.float().div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
