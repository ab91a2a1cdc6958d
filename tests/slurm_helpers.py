"""Helpers for tests that run jobs on a real SLURM cluster (start one with `sudo bash scripts/slurm-local.sh up`)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

PARTITION = "debug"
# Job states after which a job never runs again (squeue/scontrol spelling).
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
    }
)
SKIP_REASON = "sbatch not on PATH: no SLURM cluster (start one with `sudo bash scripts/slurm-local.sh up`)"
# Set (to the reason) by .ci/run when `scripts/slurm-local.sh up` failed, so the slurm tests skip instead of failing.
SKIP_ENV = "FER_SKIP_SLURM"
_COMMAND_TIMEOUT_S = 30


def skip_reason() -> str | None:
    """Why the slurm tests cannot run here, or None when sbatch is available and the cluster was not ruled out."""
    if os.environ.get(SKIP_ENV):
        return f"{SKIP_ENV}: {os.environ[SKIP_ENV]}"
    if shutil.which("sbatch") is None:
        return SKIP_REASON
    return None


requires_slurm = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def sbatch_available() -> bool:
    """True when the SLURM client (sbatch) is on PATH."""
    return shutil.which("sbatch") is not None


def _run(args: list[str], timeout: float = _COMMAND_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)


def require_cluster(partition: str = PARTITION) -> None:
    """Fail with a how-to message unless `partition` has a node that accepts jobs."""
    proc = _run(["sinfo", "-h", "-p", partition, "-o", "%T"])
    states = proc.stdout.split()
    if proc.returncode != 0 or not any(s.rstrip("*~#") in {"idle", "mixed", "allocated"} for s in states):
        raise AssertionError(
            f"sbatch is on PATH but partition {partition!r} has no usable node (sinfo rc={proc.returncode}, "
            f"states={states}, stderr={proc.stderr.strip()!r}). Start the local cluster with "
            "`sudo bash scripts/slurm-local.sh up`, or deselect these tests with -m 'not slurm'."
        )


def job_state(job_id: int | str) -> str:
    """Current state of a job from the controller (e.g. PENDING, RUNNING, COMPLETED), '' when it is unknown."""
    proc = _run(["scontrol", "-o", "show", "job", str(job_id)])
    match = re.search(r"\bJobState=(\S+)", proc.stdout)
    if match:
        return match.group(1)
    # Finished jobs leave the controller after MinJobAge; accounting (when configured) still knows them.
    proc = _run(["sacct", "-n", "-X", "-P", "-o", "State", "-j", str(job_id)])
    lines = proc.stdout.split()
    return lines[0].split()[0] if proc.returncode == 0 and lines else ""


def cancel_job(job_id: int | str) -> None:
    """Cancel a job; a job that already finished is left as it is."""
    _run(["scancel", str(job_id)])


def wait_job(job_id: int | str, timeout: float, poll_s: float = 1.0) -> str:
    """Poll until the job reaches a terminal state and return it; cancel it and raise TimeoutError after `timeout` s."""
    deadline = time.monotonic() + timeout
    state = ""
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state in TERMINAL_STATES:
            return state
        time.sleep(poll_s)
    cancel_job(job_id)
    raise TimeoutError(
        f"SLURM job {job_id} not finished after {timeout} s (last state {state or 'unknown'!r}); cancelled"
    )


def sbatch(args: list[str]) -> int:
    """Submit `sbatch --parsable *args` and return the job id; raise with sbatch's message when it is refused."""
    proc = _run(["sbatch", "--parsable", *args])
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {' '.join(args)} was refused (rc={proc.returncode}): {proc.stderr.strip()}")
    # --parsable prints "<id>" or "<id>;<cluster>"
    return int(proc.stdout.strip().split(";")[0])


def sbatch_and_wait(args: list[str], timeout: float) -> tuple[int, str]:
    """Submit a batch job and wait for it; return (job id, final state), cancelling it after `timeout` s.

    Polls once a second rather than using `sbatch --wait`, whose back-off (up to 32 s between checks)
    would add half a minute to a job that takes a few seconds.
    """
    job_id = sbatch(args)
    return job_id, wait_job(job_id, timeout)


def wait_submitit_done(job: Any, timeout: float, poll_s: float = 1.0) -> str:
    """Wait until submitit sees the job as finished and return its SLURM state; cancel and raise after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() >= deadline:
            state = job_state(job.job_id)
            job.cancel(check=False)
            hint = ""
            if state in TERMINAL_STATES:
                # submitit learns of a job that died without a result only through sacct.
                hint = " The job ended but submitit did not see it: is accounting (sacct) up? See slurm-local.sh."
            raise TimeoutError(
                f"submitit job {job.job_id} not done after {timeout} s (state {state!r}); cancelled.{hint} "
                f"stderr:\n{job.stderr() or ''}"
            )
        time.sleep(poll_s)
    return job_state(job.job_id)


def wait_submitit(job: Any, timeout: float, poll_s: float = 1.0) -> list[Any]:
    """Wait for a submitit job with a bound, then return its per-task results (raises the job's own error)."""
    wait_submitit_done(job, timeout, poll_s)
    return job.results()


def read_text(path: Path) -> str:
    """File contents for an assertion message, or a note that the file is missing."""
    return path.read_text() if path.exists() else f"<{path} missing>"
