"""Training-split augmentation on uint8 CHW tensors (torchvision transforms v2); eval splits get none."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torchvision.transforms import v2


def build_train_transform(cfg: Mapping[str, Any]) -> v2.Transform | None:
    """Compose the augmentation from the `augment` config group; None when everything is off."""
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
    if not steps:
        return None
    return v2.Compose(steps)


def normalize_on_device(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (B,C,H,W) -> normalized float on the images' device; batches travel as uint8 (4x less to copy)."""
    x = images.float().div_(255.0)
    return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))
