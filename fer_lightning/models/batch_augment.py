"""Training augmentation on the assembled batch, on the model's device (kornia), with per-sample random parameters.

The loader hands over uint8 batches (memmap slices of the image cache); converting, augmenting and normalizing
them here keeps the per-item loader work at a copy, so the cache's speed reaches training (augment.where=batch).
augment.where=loader keeps torchvision's per-item transforms in the loader workers instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fer_lightning.data.transforms import augment_where
from fer_lightning.errors import ConfigError

__all__ = ["BatchAugment", "augment_where"]

# keys of the augment group that describe transforms (where is the placement, not a transform)
TRANSFORM_KEYS: frozenset[str] = frozenset(
    {"hflip", "rotation", "translate", "scale", "brightness", "contrast", "erasing"}
)


def _number(cfg: Mapping[str, Any], key: str, low: float, high: float | None = None) -> float:
    value = cfg.get(key, 0.0)
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not (low <= value and (high is None or value <= high))
    ):
        allowed = f"a number in [{low:g}, {high:g}]" if high is not None else f"a number >= {low:g}"
        raise ConfigError(f"augment.{key}={value!r} is invalid: allowed {allowed}")
    return float(value)


class RandomFlip(nn.Module):
    """Mirror each image with probability p; a mask product, so no host sync (kornia's flip checks on the host)."""

    def __init__(self, p: float):
        super().__init__()
        self.p = float(p)

    def forward(self, x: Tensor) -> Tensor:
        flip = torch.rand(x.shape[0], 1, 1, 1, device=x.device) < self.p
        return torch.where(flip, x.flip(-1), x)


class RandomShift(nn.Module):
    """Shift each image by its own integer (dy, dx) in [-pad, pad], filling with 0: a gather, no resampling and no
    host sync (kornia's slice-mode crop reads the offsets on the host)."""

    def __init__(self, pad: int):
        super().__init__()
        self.pad = int(pad)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.pad
        dy = torch.randint(-p, p + 1, (b, 1, 1, 1), device=x.device)
        dx = torch.randint(-p, p + 1, (b, 1, 1, 1), device=x.device)
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        # out[y, x] = in[y - dy, x - dx]: two gathers (rows, then columns) with per-sample offsets
        rows = (torch.arange(h, device=x.device).view(1, 1, h, 1) + p - dy).expand(b, c, h, w + 2 * p)
        out = padded.gather(2, rows)
        cols = (torch.arange(w, device=x.device).view(1, 1, 1, w) + p - dx).expand(b, c, h, w)
        return out.gather(3, cols)


class BatchAugment(nn.Module):
    """uint8 (B,C,H,W) -> augmented float in [0, 1] (train split only); independent draws per sample.

    Randomness comes from torch's global generator (kornia draws from it), so seed_everything makes a run repeatable.
    Flip and a pure translation (an integer-pixel shift) are our own two sync-free ops; rotation or scale use an affine warp.
    """

    def __init__(self, cfg: Mapping[str, Any], image_size: int):
        super().__init__()
        import kornia.augmentation as K

        unknown = sorted(set(cfg) - TRANSFORM_KEYS - {"where"})
        if unknown:
            raise ConfigError(
                f"augment: unknown key(s) {unknown}; the augment group takes {sorted(TRANSFORM_KEYS | {'where'})}"
            )
        hflip = _number(cfg, "hflip", 0.0, 1.0)
        rotation = _number(cfg, "rotation", 0.0, 180.0)
        translate = _number(cfg, "translate", 0.0, 0.5)
        scale = tuple(float(s) for s in cfg.get("scale", (1.0, 1.0)))
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ConfigError(f"augment.scale={list(scale)} is invalid: allowed [low, high] with 0 < low <= high")
        brightness = _number(cfg, "brightness", 0.0, 1.0)
        contrast = _number(cfg, "contrast", 0.0, 1.0)
        erasing = _number(cfg, "erasing", 0.0, 1.0)
        # flip and shift move whole pixels: run on the uint8 batch (4x less memory traffic), the rest on floats
        exact: list[nn.Module] = []
        steps: list[nn.Module] = []
        if hflip > 0:
            exact.append(RandomFlip(hflip))
        if rotation or scale != (1.0, 1.0):
            steps.append(K.RandomAffine(degrees=rotation, translate=(translate, translate) if translate else None,
                                        scale=scale, p=1.0))  # fmt: skip
        elif translate:
            exact.append(RandomShift(max(1, round(translate * image_size))))
        if brightness or contrast:
            steps.append(K.ColorJiggle(brightness=brightness, contrast=contrast, p=1.0))
        if erasing:
            steps.append(K.RandomErasing(p=erasing))
        self.exact = nn.Sequential(*exact)
        self.steps = nn.Sequential(*steps)

    @property
    def enabled(self) -> bool:
        return len(self.exact) + len(self.steps) > 0

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"BatchAugment expects the loader's uint8 batch, got {images.dtype}")
        x = self.exact(images).float().div_(255.0)
        return self.steps(x).clamp_(0.0, 1.0) if len(self.steps) else x
