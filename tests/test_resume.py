"""Resume after a crash: SIGKILL a real training twice, resume it, and get the uninterrupted run back exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_runs import (
    base_overrides,
    history,
    max_weight_difference,
    run_train,
    state_dict,
    train_command,
    train_env,
    training_runs,
)
from eval_helpers import private_store
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pytorch_lightning.loggers import MLFlowLogger
from torch.utils.data import Dataset

from fer_lightning.data.resumable import ResumableLoader, rng_states, set_rng_states
from fer_lightning.data.sampling import EpochSampler
from fer_lightning.resume import (
    RUN_FILE,
    ResumeError,
    RunRecord,
    config_key,
    find_auto,
    find_resume_point,
    identity,
    skip_logged_steps,
)
from fer_lightning.train import train

# 4 epochs x 3 steps, last.ckpt after every step; augmentation and head dropout stay on (random streams matter)
RUN = ["seed=11", "trainer.deterministic=true", "trainer.max_epochs=4", "callbacks.checkpoint.every_n_train_steps=1"]
STEPS_PER_EPOCH = 3  # debug=fast: limit_train_batches=3
TIMEOUT_S = 300
# same code, same thread count, same inputs: nothing but bitwise equality is expected
TOLERANCE = 1e-6
# epoch means of the train stage of an interrupted epoch average only the batches after the resume
# (Lightning does not checkpoint its running epoch aggregates)
EPOCH_AGGREGATES = ("train/loss_epoch", "train/loss_expression_epoch", "train/loss_va_epoch", "train/accuracy")


def _checkpoint_info(path: Path) -> dict[str, int]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    return {"epoch": ckpt["epoch"], "step": ckpt["global_step"], "batches": ckpt["fer_train_loader"]["batches"]}


def _logged(uri: str, run_dir: Path, info: dict[str, int]) -> bool:
    """Whether MLflow already has the metrics logged right after this checkpoint (Lightning logs a step's train
    metrics just after the step's checkpoint callbacks; a kill in between would lose them, see resume.py)."""
    run_id = json.loads((run_dir / RUN_FILE).read_text())["run_id"]
    key = "train/loss_epoch" if info["batches"] == STEPS_PER_EPOCH else "train/loss_step"
    try:
        steps = {m.step for m in MlflowClient(tracking_uri=uri).get_metric_history(run_id, key)}
    except MlflowException:  # the run is writing ("database is locked"): ask again
        return False
    return info["step"] - 1 in steps


def _kill_at(proc: subprocess.Popen, root: Path, uri: str, wanted, what: str) -> dict[str, int]:
    """SIGKILL the run once its last.ckpt is one that `wanted` accepts and that step's metrics reached MLflow.

    The run is frozen (SIGSTOP) while its checkpoint is read and when it is killed, so the checkpoint cannot
    change in between; it may have run a step further than that checkpoint, which the resume must repeat
    without logging anything twice. MLflow is only read while the run runs (it may hold the SQLite lock).
    """
    seen, candidate = None, None
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc={proc.returncode}) before {what}:\n{proc.stdout.read()[-6000:]}")
        found = list(root.glob("outputs/*/*/checkpoints/last.ckpt"))
        ready = candidate is not None and _logged(uri, found[0].parents[1], candidate)
        if found and (ready or found[0].stat().st_mtime_ns != seen):
            os.kill(proc.pid, signal.SIGSTOP)
            mtime = found[0].stat().st_mtime_ns
            if mtime == seen and ready:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
                assert proc.returncode == -signal.SIGKILL
                return candidate
            if mtime != seen:
                seen = mtime
                info = _checkpoint_info(found[0])
                candidate = info if wanted(info) else None
            os.kill(proc.pid, signal.SIGCONT)
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"no last.ckpt for {what} within {TIMEOUT_S} s")


def _start(root: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        train_command(*overrides), cwd=root, env=train_env(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip


def test_killed_twice_and_resumed_equals_uninterrupted_run(
    tmp_path, make_cfg, shared_cache, mlflow_template_db, mlflow_db, one_thread
):
    root = tmp_path / "crash"
    uri = private_store(root, mlflow_template_db)
    overrides = [*base_overrides(root, shared_cache, uri), *RUN]

    first = _start(root, overrides)
    try:
        with ThreadPoolExecutor(1) as pool:
            # 1st crash: in the middle of an epoch after the first (the loader resumes mid-epoch, RNG restored)
            wanted = lambda i: i["epoch"] >= 1 and 0 < i["batches"] < STEPS_PER_EPOCH  # noqa: E731
            killing = pool.submit(_kill_at, first, root, uri, wanted, "mid-epoch")
            # meanwhile, the uninterrupted reference in this process
            reference = train(make_cfg(*RUN))
            mid = killing.result()
    finally:
        first.kill()
    run_dir = next(root.glob("outputs/*/*/checkpoints/last.ckpt")).parents[1]
    record = json.loads((run_dir / RUN_FILE).read_text())
    assert record["status"] == "running"  # SIGKILL: nobody closed it

    second = _start(root, [*overrides, f"resume={run_dir}"])
    try:
        # 2nd crash: right after a later epoch's end (resume starts a fresh epoch, reseeded from (seed, epoch))
        end = _kill_at(
            second, root, uri, lambda i: i["batches"] == STEPS_PER_EPOCH and i["epoch"] > mid["epoch"], "epoch end"
        )
    finally:
        second.kill()
    assert end["step"] > mid["step"]
    # the resumed attempt wrote into the first run's directory, not into its own new one
    assert _checkpoint_info(run_dir / "checkpoints" / "last.ckpt") == end
    run_train(root, [*overrides, f"resume={record['run_id']}"], timeout=TIMEOUT_S)  # 3rd attempt: by MLflow run id

    # one MLflow run, continued twice, finished
    runs = training_runs(uri)
    assert len(runs) == 1, [(r.info.run_id, r.info.status) for r in runs]
    run = runs[0]
    assert run.info.run_id == record["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["resume.count"] == "2"
    assert json.loads((run_dir / RUN_FILE).read_text())["status"] == "finished"

    # the final model is the uninterrupted one
    final = run_dir / "checkpoints" / "last.ckpt"
    assert _checkpoint_info(final)["step"] == 4 * STEPS_PER_EPOCH
    ref_final = tmp_path / "out" / "checkpoints" / "last.ckpt"
    assert max_weight_difference(state_dict(final), state_dict(ref_final)) <= TOLERANCE

    # the metric history is the uninterrupted one: no step twice, none missing
    client, ref_client = MlflowClient(tracking_uri=uri), MlflowClient(tracking_uri=mlflow_db)
    ref_run = training_runs(mlflow_db)[0]
    assert set(run.data.metrics) == set(ref_run.data.metrics)
    val = history(client, run.info.run_id, "val/f1_macro")
    assert [s for s, _ in val] == sorted({s for s, _ in val}) and len(val) == 4  # each epoch's value once
    interrupted_epoch_end = (mid["epoch"] + 1) * STEPS_PER_EPOCH - 1  # step of that epoch's train aggregates
    for key in ref_run.data.metrics:
        got = sorted(set(history(client, run.info.run_id, key)))
        want = sorted(set(history(ref_client, ref_run.info.run_id, key)))
        if key in EPOCH_AGGREGATES:
            got = [p for p in got if p[0] != interrupted_epoch_end]
            want = [p for p in want if p[0] != interrupted_epoch_end]
        assert [s for s, _ in got] == [s for s, _ in want], key
        assert np.allclose([v for _, v in got], [v for _, v in want], rtol=0, atol=TOLERANCE), key
    assert run.data.metrics["test/accuracy"] == pytest.approx(reference["test/accuracy"], abs=TOLERANCE)


def test_two_seeded_deterministic_runs_log_identical_metrics(tmp_path, make_cfg, mlflow_db, one_thread):
    results = [train(make_cfg("seed=5", "trainer.deterministic=true", "trainer.max_epochs=2", f"+tags.attempt={i}"))
               for i in range(2)]  # fmt: skip
    client = MlflowClient(tracking_uri=mlflow_db)
    runs = sorted(training_runs(mlflow_db), key=lambda r: r.data.tags["attempt"])
    assert len(runs) == 2 and runs[0].info.run_id != runs[1].info.run_id
    keys = set(runs[0].data.metrics)
    assert keys == set(runs[1].data.metrics) and {"val/f1_macro", "train/loss_step", "test/accuracy"} <= keys
    for key in keys:
        a, b = (sorted(set(history(client, r.info.run_id, key))) for r in runs)
        assert a == b, key  # bitwise equal, every step
    assert results[0]["test/accuracy"] == results[1]["test/accuracy"]


# ----------------------------------------------------------------------------------------- resume targets


def _fake_run(root: Path, name: str, cfg, *, status: str = "running", ckpt: bool = True, mtime: float = 0) -> Path:
    run_dir = root / "outputs" / "train" / name
    (run_dir / "checkpoints").mkdir(parents=True)
    ident = identity(cfg)
    RunRecord("a" * 32, "sqlite:///x.db", "fer_lightning", config_key(ident), ident, status=status).write(
        run_dir / RUN_FILE
    )
    if ckpt:
        last = run_dir / "checkpoints" / "last.ckpt"
        last.write_bytes(b"not read here")
        os.utime(last, (mtime, mtime))
    return run_dir


def test_auto_picks_the_latest_unfinished_run_with_the_same_config(tmp_path, make_cfg):
    cfg = make_cfg("logger=none")
    other = make_cfg("logger=none", "loss=focal")
    _fake_run(tmp_path, "old", cfg, mtime=1000)
    newest = _fake_run(tmp_path, "newest", cfg, mtime=3000)
    _fake_run(tmp_path, "finished", cfg, status="finished", mtime=5000)
    _fake_run(tmp_path, "other-config", other, mtime=6000)
    _fake_run(tmp_path, "no-checkpoint", cfg, ckpt=False)
    key = config_key(identity(cfg))
    assert find_auto(tmp_path, key).run_dir == newest.resolve()
    assert find_auto(tmp_path, key, exclude=newest.resolve()).run_dir.name == "old"
    assert find_auto(tmp_path, config_key(identity(make_cfg("logger=none", "seed=1")))) is None
    # through the config: resume=auto finds the same run; runtime keys (paths, progress bar) do not matter
    point = find_resume_point(make_cfg("logger=none", "resume=auto", "trainer.enable_progress_bar=true"))
    assert point.run_dir == newest.resolve() and point.checkpoint == newest.resolve() / "checkpoints" / "last.ckpt"


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path, make_cfg):
    run_dir = _fake_run(tmp_path, "run", make_cfg("logger=none"))
    with pytest.raises(ResumeError) as err:
        find_resume_point(make_cfg("logger=none", "loss=focal", "seed=9", f"resume={run_dir}"))
    message = str(err.value)
    assert "seed: run had 42, now 9" in message and 'loss.name: run had "ce", now "focal"' in message


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("does/not/exist", "neither an existing run directory"),
        ("0123456789abcdef0123456789abcdef", "no such MLflow run"),
    ],
)
def test_resume_rejects_what_it_cannot_continue(make_cfg, value, match):
    with pytest.raises(ResumeError, match=match):
        find_resume_point(make_cfg(f"resume={value}"))


def test_resume_rejects_a_finished_run_and_a_dir_without_checkpoint(tmp_path, make_cfg):
    cfg = make_cfg("logger=none")
    finished = _fake_run(tmp_path, "finished", cfg, status="finished")
    with pytest.raises(ResumeError, match="already finished"):
        find_resume_point(make_cfg("logger=none", f"resume={finished}"))
    bare = _fake_run(tmp_path, "bare", cfg, ckpt=False)
    with pytest.raises(ResumeError, match="no checkpoints/last.ckpt"):
        find_resume_point(make_cfg("logger=none", f"resume={bare}"))


def test_a_reopened_run_keeps_the_first_value_of_each_metric_step(mlflow_db):
    first = MLFlowLogger(experiment_name="fer_lightning", tracking_uri=mlflow_db)
    for step in range(4):
        first.log_metrics({"train/loss": float(step)}, step=step)
    # a resumed attempt repeats steps 2 and 3 (after the checkpoint, before the crash), then goes on
    resumed = MLFlowLogger(experiment_name="fer_lightning", tracking_uri=mlflow_db, run_id=first.run_id)
    skip_logged_steps(resumed)
    for step in range(2, 6):
        resumed.log_metrics({"train/loss": 10.0 + step, "val/acc": 0.5}, step=step)
    resumed.log_metrics({"train/loss": 99.0}, step=5)  # within the resumed attempt too
    client = MlflowClient(tracking_uri=mlflow_db)
    assert history(client, first.run_id, "train/loss") == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 3.0), (4, 14.0), (5, 15.0)]
    assert history(client, first.run_id, "val/acc") == [(2, 0.5), (3, 0.5), (4, 0.5), (5, 0.5)]


# ------------------------------------------------------------------------------------------- the loader


class _NoisyItems(Dataset):
    """Item i plus a draw from the global torch RNG (like random augmentation)."""

    def __len__(self) -> int:
        return 20

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.tensor([float(i), float(torch.rand(()))])


def _loader(seed: int = 3) -> ResumableLoader:
    labels = np.arange(20) % 4
    return ResumableLoader(_NoisyItems(), batch_size=3, sampler=EpochSampler(labels, "none", seed=seed), seed=seed)


def test_loader_resumes_mid_epoch_with_the_same_batches_and_random_numbers():
    torch.manual_seed(0)
    reference = _loader()
    reference.sampler.set_epoch(2)
    batches, state = [], None
    for i, batch in enumerate(reference):
        batches.append(batch)
        torch.rand(5)  # the training step's own random use (dropout)
        if i == 2:  # a checkpoint at the end of the 3rd step
            state = reference.state_dict()
    assert state["epoch"] == 2 and state["batches"] == 3

    torch.manual_seed(123)  # a restarted process: a different RNG state
    resumed = _loader()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)
    rest = []
    for batch in resumed:
        rest.append(batch)
        torch.rand(5)
    # the 4 remaining batches (20 items / 3 = 7 batches), same items and same "augmentation" draws
    assert len(rest) == 4
    for got, want in zip(rest, batches[3:]):
        assert torch.equal(got, want)
    # the next epoch starts from scratch: the resume state applies to one epoch only
    resumed.sampler.set_epoch(3)
    assert len(list(resumed)) == 7


def test_loader_resume_state_is_ignored_by_another_epoch():
    state = {"epoch": 1, "batches": 5, "rng": rng_states()}
    loader = _loader()
    loader.load_state_dict(state)
    loader.sampler.set_epoch(2)  # Lightning resumes a checkpoint from an epoch's end into the next epoch
    items = torch.cat(list(loader))[:, 0].long().tolist()
    assert sorted(items) == list(range(20))
    assert items == loader.sampler.global_indices().tolist()


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    state = rng_states()
    path = tmp_path / "rng.pt"
    torch.save(state, path)
    want = (torch.rand(3), np.random.rand(3))
    torch.manual_seed(99)
    np.random.seed(99)
    set_rng_states(torch.load(path, weights_only=True))
    got = (torch.rand(3), np.random.rand(3))
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1])
