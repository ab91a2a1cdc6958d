"""Learning-rate schedules that torch does not ship as one class."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(
    optimizer: torch.optim.Optimizer, total_steps: int, *, warmup_fraction: float = 0.05, min_factor: float = 0.01
) -> LambdaLR:
    """Linear warm-up from ~0 over warmup_fraction of the steps, then cosine decay to min_factor x the base lr."""
    if not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(f"model.scheduler.factory.warmup_fraction must be in [0, 1), got {warmup_fraction}")
    warmup = max(1, int(round(warmup_fraction * total_steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
