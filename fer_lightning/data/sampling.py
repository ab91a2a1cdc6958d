"""Per-epoch index draws for the three sampling strategies, split across DDP ranks without overlap."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

STRATEGIES = ("none", "downsample", "upsample")


def draw_epoch(labels: np.ndarray, strategy: str, rng: np.random.Generator) -> np.ndarray:
    """One epoch's indices (shuffled) for a strategy; rows with a missing label (< 0) are only kept by 'none'."""
    if strategy not in STRATEGIES:
        raise ValueError(f"sampling.name: {strategy!r} is not one of {STRATEGIES}")
    if strategy == "none":
        return rng.permutation(len(labels))
    classes = np.unique(labels[labels >= 0])
    if len(classes) == 0:
        raise ValueError(f"sampling={strategy} needs expression labels, and the training split has none")
    per_class = [np.flatnonzero(labels == c) for c in classes]
    counts = [len(ix) for ix in per_class]
    if strategy == "downsample":
        target = min(counts)
        parts = [rng.choice(ix, size=target, replace=False) for ix in per_class]
    else:
        target = max(counts)
        parts = [rng.choice(ix, size=target, replace=True) for ix in per_class]
    return rng.permutation(np.concatenate(parts))


class EpochSampler(Sampler[int]):
    """Draws a fresh epoch per `set_epoch` from (seed, epoch) and hands each rank a disjoint slice.

    Every rank computes the same global draw, pads it to a multiple of the world size (repeating its head,
    as torch's DistributedSampler does) and takes every world_size-th index from its rank on: within an
    epoch no index is given to two ranks beyond the repeats the strategy itself draws and that padding.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        strategy: str = "none",
        *,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        self.labels = np.asarray(labels, dtype=np.int64)
        if strategy not in STRATEGIES:
            raise ValueError(f"sampling.name: {strategy!r} is not one of {STRATEGIES}")
        self.strategy = strategy
        self.seed = int(seed)
        if num_replicas is None or rank is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            num_replicas = dist.get_world_size() if ready else 1
            rank = dist.get_rank() if ready else 0
        self.num_replicas = int(num_replicas)
        self.rank = int(rank)
        self.epoch = 0
        # epoch length is fixed by the strategy, so it is known before the first draw
        self.total = len(draw_epoch(self.labels, strategy, np.random.default_rng(0)))
        self.per_rank = math.ceil(self.total / self.num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_indices(self) -> np.ndarray:
        """This epoch's draw over all ranks, padded to a multiple of the world size."""
        rng = np.random.default_rng([self.seed, self.epoch])
        idx = draw_epoch(self.labels, self.strategy, rng)
        pad = self.per_rank * self.num_replicas - len(idx)
        if pad:
            idx = np.concatenate([idx, idx[:pad]])
        return idx

    def __iter__(self) -> Iterator[int]:
        return iter(self.global_indices()[self.rank :: self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.per_rank
