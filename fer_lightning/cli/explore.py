"""fer-explore: Hydra entry point around fer_lightning.explore.explore (thin on purpose)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from fer_lightning.cli.errors import user_errors

# absolute: a relative config_path resolves as a Python module ("conf") when started as a console script, and fails
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="explore")
def _main(cfg: DictConfig) -> None:
    from fer_lightning.explore import explore

    with user_errors():
        explore(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
