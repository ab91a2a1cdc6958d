"""fer-report: Hydra entry point around fer_lightning.report.report (thin on purpose)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fer_lightning.cli.errors import user_errors

# absolute, so the console script finds conf/ from any working directory
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="report")
def _main(cfg: DictConfig) -> None:
    from fer_lightning.report import report

    with user_errors():
        report(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
