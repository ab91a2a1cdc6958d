"""A training DataLoader that Lightning can checkpoint and resume in the middle of an epoch.

TrainLoaderState stores the loader's `state_dict()` in every checkpoint and hands it back through
`load_state_dict()` before training resumes. (Lightning has this built in, but skips the restore when
configure_optimizers has already built the train loader, as the OneCycle schedule's step count does.) The state is (epoch, batches served in it, RNG states at the
moment of the checkpoint). On the first iteration after a resume, if it is the same epoch, the loader fetches and
drops the batches already trained on, then restores the RNG states, so the rest of the epoch gets the same
batches and the same random numbers (augmentation, dropout) as an uninterrupted run would have: with
data.num_workers=0 the resumed run is bitwise the uninterrupted one. With worker processes the batch order is
still exact, but persistent workers carry their random streams across epochs, which a restart cannot replay.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit seed that depends only on (seed, epoch): every epoch's random stream starts from it."""
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(2, np.uint64)[0] >> 1)


def seed_epoch(seed: int, epoch: int) -> None:
    """Reseed torch (CPU and CUDA), numpy and random for an epoch, so the epoch does not depend on what ran before."""
    value = epoch_seed(seed, epoch)
    torch.manual_seed(value)  # also seeds every CUDA device
    np.random.seed(value % 2**32)
    random.seed(value)


def rng_states() -> dict[str, Any]:
    """This process's RNG states as tensors and plain lists (loadable with torch.load(weights_only=True))."""
    np_state = np.random.get_state()
    py_version, py_internal, py_gauss = random.getstate()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *[float(x) for x in np_state[2:]]],
        "python": [py_version, list(py_internal), py_gauss],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what rng_states() returned."""
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumableLoader(DataLoader):
    """DataLoader over a sampler with set_epoch/epoch (EpochSampler) that resumes mid-epoch where it stopped.

    `seed` seeds the loader's own generator per epoch (worker seeds and the iterator's base seed), so starting
    an epoch never draws from the global RNG and worker streams depend only on (seed, epoch).
    """

    def __init__(self, *args: Any, seed: int = 0, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator())
        super().__init__(*args, **kwargs)
        self.seed = int(seed)
        self._served = 0
        self._served_epoch = -1
        self._resume: dict[str, Any] | None = None

    def _epoch(self) -> int:
        return int(getattr(self.sampler, "epoch", 0))

    def __iter__(self) -> Iterator[Any]:
        # lazy: Lightning creates the iterator before it calls set_epoch; nothing may read the sampler until then
        return self._epoch_batches()

    def _epoch_batches(self) -> Iterator[Any]:
        epoch = self._epoch()
        self.generator.manual_seed(epoch_seed(self.seed, epoch))
        batches = super().__iter__()
        resume, self._resume = self._resume, None
        self._served, self._served_epoch = 0, epoch
        if resume is not None and resume["epoch"] == epoch and resume["batches"] > 0:
            # fetch (not just skip indices) so that worker random streams advance as they did before the crash
            for _ in range(resume["batches"]):
                next(batches)
            self._served = resume["batches"]
            set_rng_states(resume["rng"])
        for batch in batches:
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Where the current epoch is: its number, the batches handed out, and the RNG states now."""
        epoch = self._epoch()
        # between epochs the sampler already has the next epoch, of which nothing was served yet
        served = self._served if self._served_epoch == epoch else 0
        return {"epoch": epoch, "batches": served, "rng": rng_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume from state_dict() on the next iteration (ignored if that iteration is another epoch)."""
        missing = {"epoch", "batches", "rng"} - set(state)
        if missing:
            raise ValueError(
                f"train loader state in the checkpoint lacks {sorted(missing)}; not written by this loader"
            )
        self._resume = dict(state)


class TrainLoaderState(Callback):
    """Saves the train loader's position in every checkpoint and gives it back to the loader on resume."""

    KEY = "fer_train_loader"

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        loader = trainer.train_dataloader
        if isinstance(loader, ResumableLoader):
            checkpoint[self.KEY] = loader.state_dict()

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._pending = checkpoint.get(self.KEY)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state, self._pending = self._pending, None
        loader = trainer.train_dataloader
        if state is not None and isinstance(loader, ResumableLoader):
            loader.load_state_dict(state)
