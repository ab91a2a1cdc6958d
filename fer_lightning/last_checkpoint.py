"""last.ckpt, the point a crashed or preempted run resumes from, and per-epoch reseeding that makes resumes exact.

LastCheckpoint writes <run dir>/checkpoints/last.ckpt at the end of every training epoch (after validation and
the best-model checkpoint, so that epoch's bookkeeping is in it), every `every_n_train_steps` optimizer steps and every
`train_time_interval_s` seconds, and whenever asked (preemption). It writes to a temporary name and renames, so a
kill in the middle of a save leaves the previous last.ckpt intact.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, Checkpoint

from fer_lightning.data.resumable import seed_epoch
from fer_lightning.errors import ConfigError

log = logging.getLogger(__name__)

LAST_NAME = "last.ckpt"


class LastCheckpoint(Checkpoint):
    """Keeps `dirpath/last.ckpt` current: at epoch end, by steps, by wall time, and on request (`save`)."""

    def __init__(
        self, dirpath: str | Path, *, every_n_train_steps: int | None = None, train_time_interval_s: float | None = None
    ) -> None:
        if every_n_train_steps is not None and int(every_n_train_steps) < 1:
            raise ConfigError(
                f"callbacks.checkpoint.every_n_train_steps={every_n_train_steps!r} is invalid: allowed null or >= 1"
            )
        if train_time_interval_s is not None and float(train_time_interval_s) <= 0:
            raise ConfigError(
                f"callbacks.checkpoint.train_time_interval={train_time_interval_s!r} is invalid: allowed null or "
                "a number of seconds > 0"
            )
        self.dirpath = Path(dirpath)
        self.every_n_train_steps = int(every_n_train_steps) if every_n_train_steps else None
        self.train_time_interval_s = float(train_time_interval_s) if train_time_interval_s else None
        self._last_save = time.monotonic()
        self._saved_step = -1

    @property
    def path(self) -> Path:
        """Where last.ckpt is written."""
        return self.dirpath / LAST_NAME

    @property
    def state_key(self) -> str:
        """One instance per trainer: a fixed key (the settings may change between a run and its resume)."""
        return "LastCheckpoint"

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._last_save = time.monotonic()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._skip(trainer) or trainer.global_step == self._saved_step or validation_follows(trainer, batch_idx):
            return
        due = self.every_n_train_steps is not None and trainer.global_step % self.every_n_train_steps == 0
        if self.train_time_interval_s is not None:
            late = time.monotonic() - self._last_save >= self.train_time_interval_s
            # every rank must take the same decision, or some would wait alone in the save's barrier
            due = due or trainer.strategy.reduce_boolean_decision(late, all=False)
        if due:
            self.save(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the epoch's validation and after ModelCheckpoint (Lightning runs checkpoint callbacks last, in
        # order), so the best-model bookkeeping of this epoch is in last.ckpt. (Lightning cannot resume a
        # checkpoint taken at the next epoch's start, which would also hold the epoch's logged train metrics.)
        if not self._skip(trainer):
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> Path:
        """Write last.ckpt now (every rank must call this at the same point: it is a collective)."""
        partial = self.path.with_name(LAST_NAME + ".partial")
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            os.replace(partial, self.path)
        self._last_save = time.monotonic()
        self._saved_step = trainer.global_step
        log.debug("wrote %s at epoch %d, step %d", self.path, trainer.current_epoch, trainer.global_step)
        return self.path

    @staticmethod
    def _skip(trainer: pl.Trainer) -> bool:
        return trainer.sanity_checking or bool(trainer.fast_dev_run)


def validation_follows(trainer: pl.Trainer, batch_idx: int) -> bool:
    """True after an epoch's last batch or before a mid-epoch validation: no checkpoint may be taken there.

    Lightning resumes a checkpoint taken at that point as if the validation after it had run (it is skipped,
    and at an epoch's end so is the epoch's end), so such saves wait for the epoch end / the next batch.
    """
    done = batch_idx + 1
    if done >= trainer.num_training_batches:
        return True
    every = getattr(trainer, "val_check_batch", None)
    return isinstance(every, int) and every > 0 and done % every == 0


class EpochReseed(Callback):
    """Reseeds every RNG at each training epoch's start from (seed, epoch).

    An epoch's augmentation and dropout then depend only on the seed and the epoch number, not on what ran
    before it (validation, a sanity check, a restart), so resuming from an epoch-end checkpoint reproduces the
    uninterrupted run. Mid-epoch resumes restore the saved RNG states instead (data/resumable.py).
    """

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed_epoch(self.seed, trainer.current_epoch)
