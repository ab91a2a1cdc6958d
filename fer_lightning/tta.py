"""Test-time augmentation: average class probabilities (and valence/arousal) over an image and its mirror."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from fer_lightning.errors import ConfigError

TTA_MODES = ("none", "hflip")

Forward = Callable[[Tensor], dict[str, Tensor]]


def check_tta(mode: str, key: str = "eval.tta") -> str:
    """The mode, or a ConfigError naming `key` and the allowed values."""
    if mode not in TTA_MODES:
        raise ConfigError(f"{key}={mode!r} is invalid: allowed {' | '.join(TTA_MODES)}")
    return mode


def tta_outputs(
    forward: Forward, images: Tensor, mode: str = "none", first: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """{'probs': (B, C) softmax, 'va': (B, 2) when the model has it}, averaged over the TTA views.

    `first` is forward(images) when the caller already has it (saves one pass).
    """
    check_tta(mode)
    outs = [first if first is not None else forward(images)]
    if mode == "hflip":
        # a face's expression and valence/arousal do not change in a mirror; NCHW width is the last axis
        outs.append(forward(torch.flip(images, dims=(-1,))))
    result = {"probs": torch.stack([o["logits"].float().softmax(1) for o in outs]).mean(0)}
    if "va" in outs[0]:
        result["va"] = torch.stack([o["va"].float() for o in outs]).mean(0)
    return result
