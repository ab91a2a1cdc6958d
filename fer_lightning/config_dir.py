"""Where the configs live (fer_lightning/conf, shipped inside the package) and the one way to compose them.

Every console script's @hydra.main points at CONFIG_PATH, so `--config-dir ./my_conf` and
`hydra.searchpath=[file://./my_conf]` add a user's own config groups on top of the shipped ones. Code that needs a
config outside @hydra.main (the benchmark, the tests) calls compose_config().
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent / "conf"
# what the console scripts hand to @hydra.main: the package, not a checkout's path
CONFIG_PATH = "pkg://fer_lightning.conf"


def compose_config(
    name: str = "train",
    overrides: Sequence[str] = (),
    *,
    config_dir: str | Path | None = None,
    return_hydra_config: bool = False,
) -> DictConfig:
    """Compose conf/<name>.yaml with these overrides, as the console script would (no run, no output dir).

    `config_dir` replaces the shipped directory as the primary one; to add a user's groups on top of the shipped
    configs, pass `hydra.searchpath=[file:///abs/my_conf]` among the overrides instead.
    """
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(Path(config_dir or CONF_DIR).resolve()), version_base="1.3"):
        return compose(name, overrides=list(overrides), return_hydra_config=return_hydra_config)
