"""fer-train: Hydra entry point around fer_lightning.train.train (thin on purpose)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from fer_lightning.cli.errors import user_errors

log = logging.getLogger("fer_lightning")


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from fer_lightning.train import train

    with user_errors():
        metrics = train(cfg)
    # a sweeper (e.g. Optuna) optimizes the returned value: the model-selection metric
    value = metrics.get(cfg.callbacks.checkpoint.monitor)
    return float(value) if value is not None else None


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
