"""fer-eval: Hydra entry point around fer_lightning.evaluate.evaluate (thin on purpose)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from fer_lightning.cli.errors import user_errors
from fer_lightning.config_dir import CONFIG_PATH


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="eval")
def _main(cfg: DictConfig) -> None:
    from fer_lightning.evaluate import evaluate

    with user_errors():
        evaluate(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
