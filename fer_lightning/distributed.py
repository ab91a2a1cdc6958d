"""Multi-process training: the rank before the trainer exists, which launch combinations work, SLURM ranks.

Lightning's `ddp` strategy starts ranks 1..N-1 by re-running the command line of rank 0 (with Hydra, in the same
run directory). That is right for `fer-train trainer=ddp`, but a multirun's command line holds `-m`, so every
child would start the whole sweep again, and a program that called train() itself (a test, a notebook) would be
re-run whole. Those combinations are refused with a message saying what works instead:
`trainer=ddp_spawn` (ranks are spawned processes, nothing is re-run) or a cluster that starts the ranks itself
(SLURM through `hydra/launcher=slurm`, torchrun).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning_fabric.plugins.environments import LSFEnvironment, SLURMEnvironment, TorchElasticEnvironment
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from fer_lightning.errors import ConfigError

# strategies whose extra ranks are processes spawned or forked from this one (nothing is re-run)
_IN_PROCESS_LAUNCH = ("spawn", "fork", "notebook")
# strategies whose launcher re-runs the command line for every extra rank
_RERUN_LAUNCH = ("ddp", "fsdp", "deepspeed")


def is_rank_zero() -> bool:
    """True in the process of global rank 0 (decided from the launcher's environment, before the trainer exists)."""
    return int(getattr(rank_zero_only, "rank", 0) or 0) == 0


def cluster_starts_ranks() -> bool:
    """True when an external launcher (SLURM's srun, torchrun, LSF's jsrun) started every rank of this job."""
    detectors = (SLURMEnvironment, TorchElasticEnvironment, LSFEnvironment)
    return any(env.detect() for env in detectors)


def _num_processes(trainer_cfg: Mapping[str, Any]) -> int:
    devices = trainer_cfg.get("devices", 1)
    nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, (list, tuple)):
        return len(devices) * nodes
    if isinstance(devices, str) and devices.isdigit():
        return int(devices) * nodes
    return nodes  # "auto"/-1: unknown here; only an explicit ddp-like strategy is then checked


def reruns_command_line(trainer_cfg: Mapping[str, Any]) -> bool:
    """Whether Lightning would start the extra ranks of this trainer config by re-running the command line."""
    strategy = trainer_cfg.get("strategy", "auto")
    if isinstance(strategy, Mapping):
        target = str(strategy.get("_target_", ""))
        start_method = str(strategy.get("start_method", "popen"))
        return target.rsplit(".", 1)[-1] in ("DDPStrategy", "FSDPStrategy", "DeepSpeedStrategy") and (
            start_method == "popen"
        )
    name = str(strategy)
    if any(word in name for word in _IN_PROCESS_LAUNCH):
        return False
    if name.startswith(_RERUN_LAUNCH):
        return _num_processes(trainer_cfg) > 1 or trainer_cfg.get("devices") in ("auto", -1, "-1")
    # strategy=auto with several devices picks ddp
    return name == "auto" and _num_processes(trainer_cfg) > 1


def check_launch(cfg: DictConfig) -> None:
    """Refuse launch combinations that would re-run a sweep (or the calling program) in every rank."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if not reruns_command_line(trainer_cfg) or cluster_starts_ranks():
        return
    strategy = trainer_cfg.get("strategy", "auto")
    if not HydraConfig.initialized():
        raise ConfigError(
            f"trainer.strategy={strategy!r} with {trainer_cfg.get('devices')} devices starts its extra ranks by "
            "re-running the command line, which only works from fer-train; called from Python, use "
            "trainer=ddp_spawn (or run the ranks with torchrun/srun)"
        )
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise ConfigError(
            f"trainer.strategy={strategy!r} in a multirun (-m) would start the whole sweep again in every extra "
            "rank (Lightning re-runs the command line). For local sweeps use trainer=ddp_spawn; on a cluster use "
            "hydra/launcher=slurm, where SLURM starts the ranks"
        )


def trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """Extra Trainer arguments for where we run: under SLURM, its ranks, and no Lightning requeue (submitit owns it)."""
    if not SLURMEnvironment.detect() or cfg.trainer.get("plugins"):
        return {}
    # Lightning's own auto-requeue (SIGUSR1 handler) would be a second owner of requeueing: off. The pre-timeout
    # signal is submitit's (fer_lightning/slurm.py checkpoints first, then lets submitit requeue).
    return {"plugins": [SLURMEnvironment(auto_requeue=False)]}
