"""Exponential moving average of the weights via Lightning's EMAWeightAveraging, evaluated and saved as the EMA.

Lightning (>= 2.5) keeps the average in a copy of the module, swaps it in for validation, writes it as the
checkpoint's `state_dict` (the raw weights go to `current_model_state`) and copies it into the module when
training ends. One gap is closed here: `trainer.test(ckpt_path=...)` would restore the raw weights from
`current_model_state`, so outside fitting the checkpoint's `state_dict` (the average) is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import EMAWeightAveraging
from pytorch_lightning.trainer.states import TrainerFn

from fer_lightning.errors import ConfigError


class EMA(EMAWeightAveraging):
    """EMA of parameters and buffers: ema = decay * ema + (1 - decay) * w after every optimizer step."""

    def __init__(self, decay: float = 0.999, start_step: int = 0):
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"model.ema.decay={decay!r} is invalid: allowed (0, 1), e.g. 0.999 (0 = off)")
        if start_step < 0:
            raise ConfigError(f"model.ema.start_step={start_step!r} is invalid: allowed an integer >= 0")
        super().__init__(decay=decay, update_starting_at_step=start_step)
        self.decay = decay

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # test/validate/predict: the module already holds the EMA weights from checkpoint["state_dict"]
        if trainer.state.fn != TrainerFn.FITTING:
            return
        super().on_load_checkpoint(trainer, pl_module, checkpoint)


def ema_callbacks(cfg: Mapping[str, Any] | None) -> list[pl.Callback]:
    """[EMA] when model.ema.decay > 0, else [] (decay 0 would make the average equal the weights)."""
    cfg = cfg or {}
    decay = float(cfg.get("decay", 0.0) or 0.0)
    if decay == 0.0:
        return []
    return [EMA(decay=decay, start_step=int(cfg.get("start_step", 0) or 0))]
