"""SLURM: the Hydra launcher that turns trainer resources into sbatch resources, and preemption handling.

Resources: one SLURM task per rank. `trainer.devices` becomes tasks per node (and GPUs per node when
`trainer.accelerator` is gpu/cuda), `trainer.num_nodes` the node count, so the allocation is exactly what
Lightning's SLURMEnvironment checks (SLURM_NTASKS_PER_NODE == devices, SLURM_NNODES == num_nodes) and the ranks
come from srun, not from Lightning's launcher.

Requeue has one owner: submitit (through hydra-submitit-launcher). SLURM sends the pre-timeout signal
(`--signal=USR2@signal_delay_s`) to every task; submitit's handler would requeue at once, wherever training is.
Inside training we defer it to the next step boundary: all ranks agree there, last.ckpt is written, and then
submitit's own handler runs (it re-pickles the job, counts timeouts against max_num_timeout, calls
`scontrol requeue`). The requeued job runs the same Hydra job in the same directory and resumes from that
checkpoint into the same MLflow run (fer_lightning/resume.py). Lightning's auto-requeue is switched off.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback, Checkpoint

from fer_lightning.errors import ConfigError
from fer_lightning.last_checkpoint import LastCheckpoint, validation_follows

log = logging.getLogger(__name__)

GPU_ACCELERATORS = ("gpu", "cuda")


class Requeued(BaseException):
    """This process ends because its SLURM job was requeued after a checkpoint.

    A BaseException (like SystemExit) so that no `except Exception` on the way (Hydra's job runner, submitit's
    result writer, a sweep's error recorder) mistakes it for the job's failure or result.
    """


def requeue_in(error: BaseException | None) -> Requeued | None:
    """The Requeued behind an exception (itself, or what it was raised while handling), if any."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, Requeued):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def job_resources(trainer_cfgs: Sequence[Any], params: dict[str, Any]) -> dict[str, Any]:
    """sbatch resources (tasks_per_node, nodes, gpus_per_node) for the jobs' trainer configs; one set per launch."""
    found = {}
    for t in trainer_cfgs:
        values = (str(t.get("accelerator", "auto")), t.get("devices", 1), int(t.get("num_nodes", 1) or 1))
        found.setdefault(repr(values), values)
    if len(found) > 1:
        raise ConfigError(
            f"trainer.accelerator/devices/num_nodes vary across this sweep ({', '.join(sorted(found))}), but one "
            "hydra/launcher=slurm launch requests one set of SLURM resources: run one sweep per setting"
        )
    accelerator, devices, nodes = next(iter(found.values()))
    if isinstance(devices, str) and devices.isdigit():
        devices = int(devices)
    if not isinstance(devices, int) or isinstance(devices, bool) or devices < 1:
        raise ConfigError(
            f"trainer.devices={devices!r} cannot become SLURM tasks: with hydra/launcher=slurm give the number of "
            "processes (GPUs, or CPU ranks) per node, e.g. trainer.devices=4"
        )
    tasks = params.get("tasks_per_node")
    if tasks is not None and int(tasks) != devices:
        raise ConfigError(
            f"hydra.launcher.tasks_per_node={tasks} but trainer.devices={devices}: Lightning needs one SLURM task "
            "per device; set trainer.devices (tasks_per_node follows it)"
        )
    out: dict[str, Any] = {"tasks_per_node": devices, "nodes": nodes}
    if params.get("gpus_per_node") is None and accelerator in GPU_ACCELERATORS:
        out["gpus_per_node"] = devices
    elif params.get("gpus_per_node") is None and accelerator == "auto":
        log.warning(
            "trainer.accelerator=auto: no GPUs are requested from SLURM. For GPU jobs set trainer.accelerator=gpu "
            "(one GPU per task is then requested) or hydra.launcher.gpus_per_node"
        )
    return out


def sweep_resources(
    hydra_context: Any, config: Any, job_overrides: Sequence[Sequence[str]], params: dict[str, Any]
) -> dict[str, Any]:
    """job_resources() over the trainer configs of every job of a sweep (composed as the jobs will be)."""
    loader = hydra_context.config_loader
    trainers = [
        OmegaConf.to_container(loader.load_sweep_config(config, list(o)).trainer, resolve=True) for o in job_overrides
    ]
    return job_resources(trainers, params)


def _preempt_signal() -> signal.Signals:
    # submitit's choice of signal (its sbatch --signal flag and its handler both use it)
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def in_submitit_slurm_job() -> bool:
    """True inside a task that submitit started on SLURM (and so has submitit's requeue handler)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


class RequeueOnPreemption(Checkpoint):
    """Defers submitit's pre-timeout/preemption handler to a training step boundary and checkpoints first.

    A Checkpoint callback, so that Lightning runs it after ModelCheckpoint and LastCheckpoint at an epoch's end.
    """

    def __init__(self, last: LastCheckpoint) -> None:
        self.last = last
        self.signum = _preempt_signal()
        self.requested = False
        self._training = False
        self._checkpoint: Path | None = None
        self._submitit_handler: Any = None
        self._install()

    def _install(self) -> None:
        current = signal.getsignal(self.signum)
        if not callable(current) or threading.current_thread() is not threading.main_thread():
            log.warning("no submitit handler for %s in this process: preemption will not checkpoint", self.signum.name)
            return
        self._submitit_handler = current
        signal.signal(self.signum, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.warning("received %s (SLURM pre-timeout/preemption)", signal.Signals(signum).name)
        self.requested = True
        if not self._training:
            # not in a training step loop (data setup, test stage): let submitit act as it would on its own
            self._run_submitit_handler(frame)

    def _run_submitit_handler(self, frame: Any = None) -> None:
        if self._submitit_handler is None:
            return
        try:
            self._submitit_handler(self.signum, frame)
        except SystemExit as exit_:
            # submitit requeued the job and ends the process; end it as a requeue, not as a failed job
            raise Requeued("SLURM job requeued by submitit after the pre-timeout signal") from exit_

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._training = True

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._training = False

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not validation_follows(trainer, batch_idx):  # else wait for the epoch end (see validation_follows)
            self._checkpoint_if_requested(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._checkpoint_if_requested(trainer)

    # the requeue waits for the next hook, so that Lightning first logs the checkpointed step's (epoch's) metrics
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._requeue_if_checkpointed(trainer)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._requeue_if_checkpointed(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._requeue_if_checkpointed(trainer)
        self._training = False

    def _checkpoint_if_requested(self, trainer: pl.Trainer) -> None:
        # every rank got the signal, but not at the same step: agree (any rank) before anyone saves
        if self._checkpoint is not None or not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self._checkpoint = self.last.save(trainer)
        log.warning(
            "checkpointed %s at epoch %d, step %d for requeue", self._checkpoint, trainer.current_epoch,
            trainer.global_step,
        )  # fmt: skip

    def _requeue_if_checkpointed(self, trainer: pl.Trainer) -> None:
        if self._checkpoint is None:
            return
        self._training = False
        if trainer.is_global_zero:
            self._run_submitit_handler()
        raise Requeued(f"SLURM job requeued; it resumes from {self._checkpoint}")


def preemption_callbacks(last: LastCheckpoint | None) -> list[Callback]:
    """[RequeueOnPreemption] inside a submitit SLURM job with last.ckpt enabled, else []."""
    if last is None or not in_submitit_slurm_job():
        return []
    return [RequeueOnPreemption(last)]
