"""fer-train: Hydra entry point around fer_lightning.train.train (thin on purpose)."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from fer_lightning.cli.errors import user_errors
from fer_lightning.config_dir import CONFIG_PATH
from fer_lightning.sweep import exit_code as sweep_exit_code
from fer_lightning.sweep import job_errors

log = logging.getLogger("fer_lightning")


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="train")
def _main(cfg: DictConfig) -> float | None:
    from fer_lightning.train import train

    # in a multirun, job_errors() records a failed job (FAILED child run) and lets the sweep go on
    with job_errors(cfg), user_errors():
        metrics = train(cfg)
        # a sweeper (e.g. Optuna) optimizes the returned value: the model-selection metric
        value = metrics.get(cfg.callbacks.checkpoint.monitor)
        return float(value) if value is not None else None
    return None


def main() -> None:
    _main()
    sys.exit(sweep_exit_code())  # non-zero when a sweep had failed jobs (single runs exit on their own errors)


if __name__ == "__main__":
    sys.exit(main())
