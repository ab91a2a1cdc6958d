"""Hydra launcher plugin of fer_lightning: hydra-submitit's SLURM launcher, resources taken from the trainer config.

Hydra accepts launcher classes only from the `hydra_plugins` namespace package, and imports every module in it
when any Hydra app starts: this module stays light and leaves the work to fer_lightning/slurm.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher


class SlurmLauncher(SubmititSlurmLauncher):
    """Sets tasks per node, nodes and GPUs per node from the jobs' trainer.devices/num_nodes/accelerator."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Any:
        from fer_lightning.slurm import sweep_resources

        assert self.config is not None and self.hydra_context is not None
        self.params.update(sweep_resources(self.hydra_context, self.config, job_overrides, self.params))
        return super().launch(job_overrides, initial_job_idx)
