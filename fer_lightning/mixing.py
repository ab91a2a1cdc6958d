"""Mixup and CutMix for a training batch: mixed images, expression loss mixed by lambda, VA targets mixed linearly.

Mixup (Zhang et al., 2018) blends two images, x = lam * x_i + (1 - lam) * x_perm(i), lam ~ Beta(alpha, alpha).
CutMix (Yun et al., 2019) pastes a box of x_perm(i) into x_i; lam is the fraction of x_i left after clipping the box.
Both are applied to normalized float images (normalization is affine, so mixing before or after it is the same).
The expression loss is lam * L(y_i) + (1 - lam) * L(y_perm(i)), which for cross-entropy equals the loss on the
mixed soft label; valence/arousal targets are mixed linearly (NaN, i.e. missing, if either side is missing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fer_lightning.errors import ConfigError


@dataclass(frozen=True)
class Mix:
    """One draw: partner permutation, mixing weight of the original sample and the CutMix box (None = Mixup)."""

    perm: Tensor
    lam: float
    box: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1), half-open

    @property
    def kind(self) -> str:
        return "mixup" if self.box is None else "cutmix"


def mix_images(images: Tensor, mix: Mix) -> Tensor:
    """Mixed float images: a blend (Mixup) or the partner's pixels inside the box (CutMix)."""
    if not images.is_floating_point():
        raise TypeError("mix_images needs normalized float images; uint8 would wrap around when blended")
    partner = images[mix.perm]
    if mix.box is None:
        return images * mix.lam + partner * (1.0 - mix.lam)
    y0, y1, x0, x1 = mix.box
    out = images.clone()
    out[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
    return out


def mix_targets(values: Tensor, mix: Mix) -> Tensor:
    """Linear mix of regression targets along the batch dimension (NaN stays NaN: a missing side is missing)."""
    return values * mix.lam + values[mix.perm] * (1.0 - mix.lam)


def mixed_expression_loss(
    loss_fn: Callable[[Tensor, Tensor], Tensor], logits: Tensor, target: Tensor, mix: Mix
) -> Tensor:
    """lam * loss(target) + (1 - lam) * loss(partner's target); unlabeled (-1) sides are masked by loss_fn."""
    return mix.lam * loss_fn(logits, target) + (1.0 - mix.lam) * loss_fn(logits, target[mix.perm])


def cutmix_box(height: int, width: int, lam: float, center: tuple[int, int]) -> tuple[tuple[int, int, int, int], float]:
    """Box of area ~(1 - lam) * H * W centred at (cy, cx), clipped to the image; returns it and the exact lam."""
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(height * cut), int(width * cut)
    cy, cx = center
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
    # the pasted area after clipping decides how much of each label the image carries
    exact = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)
    return (y0, y1, x0, x1), exact


class Mixer:
    """Draws a Mix per batch from the config (torch's global RNG, so seed_everything makes runs repeatable)."""

    def __init__(
        self,
        *,
        mixup_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        cutmix_alpha: float = 0.0,
        cutmix_prob: float = 1.0,
    ):
        for key, alpha in (("model.mixup.alpha", mixup_alpha), ("model.cutmix.alpha", cutmix_alpha)):
            if not (isinstance(alpha, int | float) and alpha >= 0):
                raise ConfigError(f"{key}={alpha!r} is invalid: allowed a number >= 0 (0 = off)")
        for key, prob in (("model.mixup.prob", mixup_prob), ("model.cutmix.prob", cutmix_prob)):
            if not (isinstance(prob, int | float) and 0.0 <= prob <= 1.0):
                raise ConfigError(f"{key}={prob!r} is invalid: allowed a probability in [0, 1]")
        self.mixup_alpha, self.mixup_prob = float(mixup_alpha), float(mixup_prob)
        self.cutmix_alpha, self.cutmix_prob = float(cutmix_alpha), float(cutmix_prob)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> Mixer | None:
        """{'mixup': {'alpha', 'prob'}, 'cutmix': {'alpha', 'prob'}} -> a Mixer, or None when both alphas are 0."""
        cfg = cfg or {}
        mixup, cutmix = dict(cfg.get("mixup") or {}), dict(cfg.get("cutmix") or {})
        mixer = cls(
            mixup_alpha=mixup.get("alpha", 0.0),
            mixup_prob=mixup.get("prob", 1.0),
            cutmix_alpha=cutmix.get("alpha", 0.0),
            cutmix_prob=cutmix.get("prob", 1.0),
        )
        return mixer if mixer.enabled else None

    @property
    def enabled(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def draw(self, batch_size: int, height: int, width: int, device: torch.device | str = "cpu") -> Mix | None:
        """A Mix for this batch, or None when the batch stays unmixed.

        When both methods are on, each batch picks one of them (50/50) and applies it with that method's prob.
        """
        if batch_size < 2 or not self.enabled:
            return None
        use_cutmix = self.cutmix_alpha > 0
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(torch.rand(()) < 0.5)
        alpha, prob = (self.cutmix_alpha, self.cutmix_prob) if use_cutmix else (self.mixup_alpha, self.mixup_prob)
        if not bool(torch.rand(()) < prob):
            return None
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        perm = torch.randperm(batch_size, device=device)
        if not use_cutmix:
            return Mix(perm=perm, lam=lam)
        center = (int(torch.randint(height, ())), int(torch.randint(width, ())))
        box, lam = cutmix_box(height, width, lam, center)
        return Mix(perm=perm, lam=lam, box=box)
