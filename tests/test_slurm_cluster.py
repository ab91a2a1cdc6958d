"""Real SLURM jobs on the local test cluster: sbatch + srun + gloo, submitit, and the Hydra slurm launcher config."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import slurm_helpers as sh

from fer_lightning.config_dir import CONF_DIR

pytestmark = [pytest.mark.slurm, sh.requires_slurm]

REPO_ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 120

# Runs once per srun task: forms a gloo process group from SLURM's variables alone, as a training job would.
GLOO_WORKER = textwrap.dedent(
    """
    import datetime, json, os, subprocess, sys
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    rank = int(os.environ["SLURM_PROCID"])
    world_size = int(os.environ["SLURM_NTASKS"])
    hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()
    # Every task derives the same rendezvous from the job: first node of the allocation, port from the job id.
    os.environ["MASTER_ADDR"] = hosts[0]
    os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
    summed = torch.tensor([float(rank), 10.0 * (rank + 1)])
    dist.all_reduce(summed)
    peers = [None] * world_size
    dist.all_gather_object(peers, {"rank": rank, "pid": os.getpid()})
    dist.destroy_process_group()
    out = {
        "rank": rank,
        "world_size": world_size,
        "local_id": int(os.environ["SLURM_LOCALID"]),
        "job_id": int(os.environ["SLURM_JOB_ID"]),
        "pid": os.getpid(),
        "sum": summed.tolist(),
        "peers": peers,
    }
    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    """
)


@pytest.fixture(scope="module", autouse=True)
def _cluster_up() -> None:
    sh.require_cluster()


def test_sbatch_srun_two_tasks_gloo_all_reduce(tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(GLOO_WORKER)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    script = tmp_path / "job.sh"
    script.write_text(
        f"#!/bin/bash\nset -euo pipefail\nsrun --kill-on-bad-exit=1 {sys.executable} {worker} {out_dir}\n"
    )
    log = tmp_path / "slurm-%j.out"
    job_id, state = sh.sbatch_and_wait(
        [
            f"--partition={sh.PARTITION}",
            "--nodes=1",
            "--ntasks=2",
            "--time=5",
            f"--chdir={tmp_path}",
            f"--output={log}",
            str(script),
        ],
        timeout=JOB_TIMEOUT_S,
    )
    job_log = sh.read_text(Path(str(log).replace("%j", str(job_id))))
    assert state == "COMPLETED", f"job {job_id} ended {state}; log:\n{job_log}"

    results = {}
    for rank in (0, 1):
        path = out_dir / f"rank{rank}.json"
        assert path.exists(), f"rank {rank} wrote nothing; log:\n{job_log}"
        results[rank] = json.loads(path.read_text())
    for rank, res in results.items():
        assert res["rank"] == rank and res["world_size"] == 2 and res["job_id"] == job_id
        # all_reduce(sum) of [rank, 10 * (rank + 1)] over ranks 0 and 1: [0 + 1, 10 + 20]
        assert res["sum"] == [1.0, 30.0]
        # every rank saw the same two peers, which are the two distinct task processes
        assert res["peers"] == [{"rank": r, "pid": results[r]["pid"]} for r in (0, 1)]
    assert {res["local_id"] for res in results.values()} == {0, 1}
    assert results[0]["pid"] != results[1]["pid"]


def test_submitit_two_tasks_report_their_ranks(tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")

    # Nested so that cloudpickle ships it by value: the job's python cannot import this test module.
    def rank_info(tag: str) -> dict[str, Any]:
        import os

        import submitit as sm

        env = sm.JobEnvironment()
        return {
            "tag": tag,
            "global_rank": env.global_rank,
            "local_rank": env.local_rank,
            "num_tasks": env.num_tasks,
            "num_nodes": env.num_nodes,
            "job_id": env.job_id,
            "pid": os.getpid(),
        }

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition=sh.PARTITION, tasks_per_node=2, nodes=1, timeout_min=5, cpus_per_task=1)
    job = executor.submit(rank_info, "probe")
    results = sh.wait_submitit(job, timeout=JOB_TIMEOUT_S)

    assert len(results) == 2
    assert [r["global_rank"] for r in results] == [0, 1]
    assert sorted(r["local_rank"] for r in results) == [0, 1]
    for r in results:
        assert r["tag"] == "probe" and r["num_tasks"] == 2 and r["num_nodes"] == 1
        assert r["job_id"] == str(job.job_id)
    assert results[0]["pid"] != results[1]["pid"]
    assert sh.wait_job(job.job_id, timeout=30) == "COMPLETED"


def test_submitit_reports_a_killed_job_instead_of_waiting(tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")

    # SIGKILL leaves no result pickle: only sacct (slurmdbd) can tell submitit that the job is over.
    def killed() -> None:
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit", cluster="slurm")
    executor.update_parameters(slurm_partition=sh.PARTITION, tasks_per_node=1, nodes=1, timeout_min=5)
    job = executor.submit(killed)
    assert sh.wait_submitit_done(job, timeout=JOB_TIMEOUT_S) == "FAILED"
    assert job.state == "FAILED"  # submitit's own view, read from sacct
    assert not job.paths.result_pickle.exists()


HYDRA_APP = textwrap.dedent(
    """
    import json, os
    from pathlib import Path

    import hydra
    import submitit

    @hydra.main(version_base="1.3", config_path=".", config_name="probe")
    def main(cfg):
        env = submitit.JobEnvironment()
        out = Path(cfg.out_dir) / f"x{cfg.x}_rank{env.global_rank}.json"
        out.write_text(json.dumps({"x": cfg.x, "rank": env.global_rank, "num_tasks": env.num_tasks,
                                   "job_id": env.job_id, "ntasks_env": int(os.environ["SLURM_NTASKS"])}))

    if __name__ == "__main__":
        main()
    """
)


def test_hydra_slurm_launcher_config_runs_a_sweep(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    job_name = f"fer-probe-{tmp_path.name}"
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    sweep_dir = tmp_path / "multirun"
    (tmp_path / "probe_app.py").write_text(HYDRA_APP)
    (tmp_path / "probe.yaml").write_text(
        textwrap.dedent(
            f"""
            hydra:
              searchpath: ["file://{CONF_DIR}"]
              sweep: {{dir: "{sweep_dir}", subdir: "${{hydra.job.num}}"}}
              job: {{name: {job_name}}}
            trainer: {{num_nodes: 1, devices: 2}}
            out_dir: "{out_dir}"
            x: 0
            """
        )
    )
    cmd = [
        sys.executable,
        "probe_app.py",
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=5",
        "x=1,2",
    ]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=2 * JOB_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        subprocess.run(["scancel", f"--name={job_name}"], timeout=30, check=False)
        raise
    assert proc.returncode == 0, f"hydra multirun failed:\n{proc.stdout}\n{proc.stderr}"

    # two sweep points x two tasks each, every task with its own rank inside its own job
    seen = {}
    for x in (1, 2):
        for rank in (0, 1):
            path = out_dir / f"x{x}_rank{rank}.json"
            assert path.exists(), f"missing {path}; hydra output:\n{proc.stdout}\n{proc.stderr}"
            seen[(x, rank)] = json.loads(path.read_text())
    for (x, rank), rec in seen.items():
        assert rec == {"x": x, "rank": rank, "num_tasks": 2, "job_id": seen[(x, 0)]["job_id"], "ntasks_env": 2}
    assert seen[(1, 0)]["job_id"] != seen[(2, 0)]["job_id"]

    # the YAML keys reached sbatch as the intended flags
    scripts = sorted(sweep_dir.glob(".submitit/*/*_submission.sh"))
    assert scripts, f"no submission script under {sweep_dir}/.submitit"
    flags = dict(re.findall(r"^#SBATCH --([\w-]+)=?(.*)$", scripts[0].read_text(), flags=re.MULTILINE))
    assert flags["partition"] == "debug"
    assert flags["nodes"] == "1"
    assert flags["ntasks-per-node"] == "2"
    assert flags["cpus-per-task"] == "1"
    assert flags["mem"] == "1GB"
    assert flags["time"] == "5"
    assert flags["signal"] == "USR2@120"
    assert flags["job-name"] == job_name
    assert "gpus-per-node" not in flags and "account" not in flags
