"""Hydra multirun -> MLflow: one parent run per sweep, one child run per job, a summary table at the end.

The callback runs on_multirun_start/end on the launching host and on_job_start/end in the process that runs
each job (the same process for the basic launcher, a worker for joblib, a cluster node for submitit). Launchers
pickle the callback with the job, so the parent run id travels in the callback's own fields. Each job leaves a
small JSON record in <sweep dir>/.fer_sweep/, which the launching host reads back at the end, whatever the
launcher.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import io
import json
import logging
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

RECORDS_DIR = ".fer_sweep"
DEFAULT_METRICS = ("val/f1_macro", "test/f1_macro", "test/accuracy")


@dataclass
class SweepJob:
    """The sweep job running in this process: what its MLflow run must carry, and how it ended."""

    sweep_id: str
    parent_run_id: str | None
    sweep_dir: str
    num: int
    overrides: list[str]
    seed: str
    run_name: str
    error: str | None = None

    def tags(self) -> dict[str, str]:
        tags = {
            "sweep.id": self.sweep_id,
            "sweep.job_num": str(self.num),
            "sweep.overrides": " ".join(self.overrides),
            "seed": self.seed,
        }
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id  # MLflow's own key: the UI nests the run under it
        return tags


# set by on_job_start in the process running the job; read by train() (tags) and job_errors()
_JOB: SweepJob | None = None
# failed jobs of the last sweep launched from this process (fer-train's exit code)
_LAST_FAILED: int = 0


def job_tags() -> dict[str, str]:
    """MLflow tags for the run of the current sweep job (parent id, sweep id, job number, seed); {} outside sweeps."""
    return _JOB.tags() if _JOB is not None else {}


def job_run_name() -> str | None:
    """The current sweep job's MLflow run name (its values of the swept keys); None outside sweeps."""
    return _JOB.run_name if _JOB is not None else None


def exit_code() -> int:
    """1 when the last sweep started by this process had a failed job, else 0."""
    return 1 if _LAST_FAILED else 0


@contextlib.contextmanager
def job_errors(cfg: DictConfig) -> Iterator[None]:
    """In a sweep job, record a failure (FAILED child run, error tag) and let the sweep go on; else a no-op."""
    job = _JOB
    if job is None:
        yield
        return
    try:
        yield
    except (Exception, SystemExit) as err:
        if isinstance(err, SystemExit) and err.code in (0, None):
            return
        # user_errors() turns a known error into SystemExit(2) after printing it: report the original
        cause = err.__context__ if isinstance(err, SystemExit) and err.__context__ is not None else err
        job.error = f"{type(cause).__name__}: {' '.join(str(cause).split())}"[:1000]
        if cause is err:  # not printed yet; a traceback helps with an unexpected failure
            log.exception("sweep job #%d (%s) failed", job.num, " ".join(job.overrides))
        log.error("sweep job #%d failed: %s; the sweep goes on", job.num, job.error)
        _mark_child_failed(cfg, job)


def _mark_child_failed(cfg: DictConfig, job: SweepJob) -> None:
    """Make sure the job has a FAILED child run carrying the error, even when it failed before creating one."""
    from fer_lightning import tracking

    if not cfg.logger.get("enabled", True):
        return
    try:
        logger_cfg = logger_settings(cfg)
        run = _find_child(logger_cfg, job)
        if run is None:  # it failed before train() opened its run (e.g. a bad config value)
            from fer_lightning.train import default_run_name, group_choices

            choices = group_choices(cfg)
            tags = {**{f"group.{k}": v for k, v in choices.items()}, **choices, **job.tags()}
            logger = tracking.make_logger(logger_cfg, run_name=job.run_name or default_run_name(choices), tags=tags)
            run_id = logger.run_id
        else:
            logger = tracking.make_logger(logger_cfg, run_name="", tags={}, run_id=run.info.run_id)
            run_id = run.info.run_id
        logger.experiment.set_tag(run_id, "sweep.error", job.error or "failed")
        logger.experiment.set_terminated(run_id, "FAILED")
    except Exception as err:  # the job's failure is the news; failing to record it must not hide it
        log.warning("could not record sweep job #%d as a FAILED MLflow run: %s", job.num, err)


def logger_settings(cfg: DictConfig, *, spool_dir: str | None = None) -> dict[str, Any]:
    """The resolved `logger.*` values tracking.make_logger needs (spool_dir overridable for the parent)."""
    lc = cfg.logger
    keys = ("enabled", "tracking_uri", "artifact_location", "experiment_name", "retry_timeout_s")
    out = {k: lc.get(k) for k in keys if k in lc}
    out["spool_dir"] = spool_dir if spool_dir is not None else lc.get("spool_dir")
    return out


def _find_child(logger_cfg: Mapping[str, Any], job: SweepJob) -> Any:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=str(logger_cfg["tracking_uri"]))
    exp = client.get_experiment_by_name(str(logger_cfg.get("experiment_name", "fer_lightning")))
    if exp is None:
        return None
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`sweep.id` = '{job.sweep_id}' and tags.`sweep.job_num` = '{job.num}'",
        max_results=1,
    )
    return runs[0] if runs else None


def parse_override(text: str) -> tuple[str, str]:
    """'+loss.beta=0.9' -> ('loss.beta', '0.9')."""
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def swept_keys(definition: Sequence[str]) -> list[str]:
    """Keys the sweep varies ('loss=ce,focal' and 'x=range(1,4)' are swept, 'debug=fast' is not)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(definition))
    return [o.key_or_group for o in parsed if o.is_sweep_override()]


def varied_keys(overrides: Sequence[Sequence[str]]) -> list[str]:
    """Override keys whose value differs between jobs (all keys when there is a single job)."""
    values: dict[str, set[str]] = {}
    order: list[str] = []
    for job in overrides:
        for text in job:
            key, value = parse_override(text)
            if key not in values:
                values[key] = set()
                order.append(key)
            values[key].add(value)
    if len(overrides) <= 1:
        return order
    present = [{parse_override(t)[0] for t in job} for job in overrides]
    return [k for k in order if len(values[k]) > 1 or any(k not in p for p in present)]


def parent_status(statuses: Sequence[str]) -> str:
    """FAILED when every job failed, else FINISHED (a sweep with some failures still produced results)."""
    return "FAILED" if statuses and all(s != "FINISHED" for s in statuses) else "FINISHED"


@dataclass
class SummaryRow:
    job: int
    run_name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float | None]
    error: str = ""
    run_id: str = ""
    overrides: list[str] = field(default_factory=list)


def to_csv(rows: Sequence[SummaryRow], param_keys: Sequence[str], metric_keys: Sequence[str]) -> str:
    """The summary as CSV (one line per job)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["job", "run_name", "status", *param_keys, *metric_keys, "error", "run_id"])
    for r in rows:
        metrics = ["" if r.metrics.get(k) is None else repr(r.metrics[k]) for k in metric_keys]
        writer.writerow([r.job, r.run_name, r.status, *[r.params.get(k, "") for k in param_keys], *metrics, r.error,
                         r.run_id])  # fmt: skip
    return buf.getvalue()


def to_markdown(rows: Sequence[SummaryRow], param_keys: Sequence[str], metric_keys: Sequence[str]) -> str:
    """The summary as a markdown table (also shown as the parent run's description in the MLflow UI)."""

    def cell(text: Any) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    head = ["job", "run", "status", *param_keys, *metric_keys, "error"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        metrics = ["" if r.metrics.get(k) is None else f"{r.metrics[k]:.4f}" for k in metric_keys]
        values = [r.job, r.run_name, r.status, *[r.params.get(k, "") for k in param_keys], *metrics, r.error[:120]]
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


class MLflowSweepCallback(Callback):
    """Opens the sweep's parent run, tags every job's run as its child, and closes the parent with a summary."""

    def __init__(self, metrics: Sequence[str] = DEFAULT_METRICS) -> None:
        self.metrics = list(metrics)
        self.sweep_id: str | None = None
        self.sweep_dir: str | None = None
        self.parent_run_id: str | None = None
        self.definition: list[str] = []
        self.swept: list[str] = []
        self._logger_cfg: dict[str, Any] | None = None
        self._closed = True

    # ---- launching host ------------------------------------------------------------------------------------
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Open the parent run; remember what each job needs to attach to it."""
        # Hydra sets HydraConfig only per job, but our sweep dir and store paths go through ${hydra:runtime.cwd}
        if not HydraConfig.initialized():
            HydraConfig.instance().set_config(config)
        self.sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        self.sweep_dir = str(Path(str(config.hydra.sweep.dir)).resolve())
        self.definition = [str(o) for o in config.hydra.overrides.task]
        self.swept = swept_keys(self.definition)
        self._closed = False
        atexit.register(self._close_abandoned)
        if not config.logger.get("enabled", True):
            log.info("sweep %s: MLflow is off (logger.enabled=false); the summary goes to %s", self.sweep_id,
                     self.sweep_dir)  # fmt: skip
            return
        from fer_lightning import tracking

        choices = config.hydra.runtime.choices
        tags = {
            "sweep.id": self.sweep_id,
            "sweep.role": "parent",
            "sweep.definition": " ".join(self.definition),
            "sweep.dir": self.sweep_dir,
            "sweep.launcher": str(choices.get("hydra/launcher")),
            "sweep.sweeper": str(choices.get("hydra/sweeper")),
            "git_commit": tracking.git_commit(Path(str(config.paths.root_dir))),
            "mlflow.note.content": f"Sweep `{' '.join(self.definition)}`: running; the summary appears here at the end.",
        }
        self._logger_cfg = logger_settings(config, spool_dir=str(Path(self.sweep_dir) / "mlflow_spool"))
        try:
            logger = tracking.make_logger(self._logger_cfg, run_name=f"sweep {self.sweep_id}", tags=tags)
        except Exception as err:  # Hydra would only warn and go on: say plainly what that means
            log.error("sweep %s: could not open the MLflow parent run (%s); jobs are logged without a parent",
                      self.sweep_id, err)  # fmt: skip
            self._logger_cfg = None
            return
        self.parent_run_id = logger.run_id
        tracking.log_params(logger, {"sweep.definition": " ".join(self.definition), "sweep.dir": self.sweep_dir})
        log.info("sweep %s: MLflow parent run %s at %s", self.sweep_id, self.parent_run_id,
                 self._logger_cfg["tracking_uri"])  # fmt: skip

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        """Write the summary (sweep dir and parent artifacts), end the parent, set fer-train's exit code."""
        self._finish(interrupted=False)

    def _close_abandoned(self) -> None:
        if not self._closed:  # the sweep stopped before on_multirun_end (launcher crash, Ctrl-C)
            with contextlib.suppress(Exception):
                self._finish(interrupted=True)

    def _finish(self, *, interrupted: bool) -> None:
        global _LAST_FAILED
        if self._closed or self.sweep_dir is None:
            return
        self._closed = True
        records = _read_records(Path(self.sweep_dir))
        logger = self._parent_logger()
        children: dict[int, Any] = {}
        if logger is not None:
            try:
                children = self._children(logger)
            except Exception as err:  # the summary from the job records is still worth writing
                log.error("sweep %s: cannot list the child runs (%s); summarizing the job records only",
                          self.sweep_id, err)  # fmt: skip
        rows = self._rows(records, children, logger)
        keys = varied_keys([r.overrides for r in rows])
        failed = [r for r in rows if r.status != "FINISHED"]
        _LAST_FAILED = len(failed)
        markdown, table_csv = to_markdown(rows, keys, self.metrics), to_csv(rows, keys, self.metrics)
        head = f"Sweep {self.sweep_id}: {len(rows)} jobs, {len(failed)} failed" + (
            " (interrupted)" if interrupted else ""
        )
        out = Path(self.sweep_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep_summary.md").write_text(f"# {head}\n\n`{' '.join(self.definition)}`\n\n{markdown}")
        (out / "sweep_summary.csv").write_text(table_csv)
        print(f"\n{head}\n{markdown}summary: {out / 'sweep_summary.md'}", file=sys.stdout, flush=True)
        if logger is not None:
            try:
                self._close_parent(logger, rows, head, markdown, interrupted=interrupted)
            except Exception as err:
                log.error("sweep %s: could not write the summary to parent run %s (%s); it is in %s", self.sweep_id,
                          self.parent_run_id, err, out)  # fmt: skip

    def _close_parent(
        self, logger: Any, rows: list[SummaryRow], head: str, markdown: str, *, interrupted: bool
    ) -> None:
        from fer_lightning import tracking

        out = Path(str(self.sweep_dir))
        for name in ("sweep_summary.md", "sweep_summary.csv", "multirun.yaml"):
            if (out / name).exists():
                tracking.log_artifact(logger, out / name)
        for path in self._leaderboard(logger, out / "report"):
            tracking.log_artifact(logger, path, "report")
        failed = sum(r.status != "FINISHED" for r in rows)
        tags = {"sweep.jobs": len(rows), "sweep.failed": failed, "mlflow.note.content": f"{head}\n\n{markdown}"}
        key = self.metrics[0] if self.metrics else None
        finished = [r for r in rows if r.status == "FINISHED" and key and r.metrics.get(key) is not None]
        if finished:
            best = max(finished, key=lambda r: r.metrics[key])
            tags.update(
                {"sweep.best_run_id": best.run_id, "sweep.best": f"{best.run_name} ({key}={best.metrics[key]:.4f})"}
            )
        tracking.set_tags(logger, tags)
        tracking.end_run(logger, "KILLED" if interrupted else parent_status([r.status for r in rows]))

    def _leaderboard(self, logger: Any, folder: Path) -> list[Path]:
        """fer-report's leaderboard of the finished children (seeds folded into mean +/- std, paper rows beside)."""
        from fer_lightning.report import ReportError, build_report, fetch_runs

        try:
            runs = fetch_runs(logger.experiment, parent_run_id=self.parent_run_id)
            if not len(runs):
                return []
            source = f"the children of sweep {self.sweep_id} (run {self.parent_run_id})"
            return build_report(runs, metrics=self.metrics, folder=folder, source=source).paths
        except ReportError as err:  # e.g. no finished child logged these metrics: the summary table says why
            log.info("sweep %s: no leaderboard (%s)", self.sweep_id, err)
            return []

    def _parent_logger(self) -> Any:
        if self._logger_cfg is None or self.parent_run_id is None:
            return None
        from fer_lightning import tracking

        try:
            return tracking.make_logger(self._logger_cfg, run_name="", tags={}, run_id=self.parent_run_id)
        except Exception as err:
            log.error(
                "sweep %s: cannot reach the parent run %s to close it: %s", self.sweep_id, self.parent_run_id, err
            )
            return None

    def _children(self, logger: Any) -> dict[int, Any]:
        runs = logger.experiment.search_runs(
            [logger.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{self.parent_run_id}'", max_results=50000
        )
        out: dict[int, Any] = {}
        for run in runs:
            num = run.data.tags.get("sweep.job_num")
            if num is not None and num.isdigit():
                out[int(num)] = run
        return out

    def _rows(self, records: dict[int, dict], children: dict[int, Any], logger: Any) -> list[SummaryRow]:
        rows = []
        for num in sorted(set(records) | set(children)):
            rec, run = records.get(num, {}), children.get(num)
            overrides = list(rec.get("overrides") or (run.data.tags.get("sweep.overrides", "").split() if run else []))
            error = rec.get("error") or ""
            if run is None:
                status = "FAILED" if rec.get("status") == "FAILED" else "NO RUN"
                rows.append(SummaryRow(num, "", status, dict(map(parse_override, overrides)), {}, error, "", overrides))
                continue
            status = run.info.status
            if status == "RUNNING" and rec.get("status") != "COMPLETED":
                # the job is over (the launcher returned) but its run was never closed: it died hard
                error = error or "the job ended without closing its run (killed or crashed)"
                status = "FAILED"
                try:
                    logger.experiment.set_tag(run.info.run_id, "sweep.error", error)
                    logger.experiment.set_terminated(run.info.run_id, "FAILED")
                except Exception as err:
                    log.warning("could not mark run %s FAILED: %s", run.info.run_id, err)
            error = error or run.data.tags.get("sweep.error", "")
            metrics = {k: run.data.metrics.get(k) for k in self.metrics}
            rows.append(SummaryRow(num, run.info.run_name or "", status, dict(map(parse_override, overrides)), metrics,
                                   error, run.info.run_id, overrides))  # fmt: skip
        return rows

    # ---- the process running a job ---------------------------------------------------------------------------
    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """Make the sweep known to train() in this process (tags of the child run, error handling)."""
        global _JOB
        if self.sweep_id is None:  # a single run: nothing to attach to
            return
        overrides = [str(o) for o in config.hydra.overrides.task]
        # named by what distinguishes it within the sweep (all its overrides when the sweeper sets the values)
        named = [o for o in overrides if parse_override(o)[0] in self.swept] or overrides
        _JOB = SweepJob(
            sweep_id=self.sweep_id,
            parent_run_id=self.parent_run_id,
            sweep_dir=str(self.sweep_dir),
            num=int(config.hydra.job.num),
            overrides=overrides,
            seed=str(OmegaConf.select(config, "seed", default="")),
            run_name=",".join(named) or f"job {config.hydra.job.num}",
        )

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        """Leave the job's outcome where the launching host finds it, whatever the launcher."""
        global _JOB
        job, _JOB = _JOB, None
        if job is None:
            return
        error = job.error
        if job_return.status == JobStatus.FAILED and error is None:
            err = job_return._return_value
            error = f"{type(err).__name__}: {err}"
        status = "FAILED" if error else "COMPLETED"
        record = {**asdict(job), "status": status, "error": error, "output_dir": str(config.hydra.runtime.output_dir)}
        path = Path(job.sweep_dir) / RECORDS_DIR / f"job_{job.num}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1))
        tmp.replace(path)  # atomic: the host never reads half a record


def _read_records(sweep_dir: Path) -> dict[int, dict]:
    out = {}
    for path in sorted((sweep_dir / RECORDS_DIR).glob("job_*.json")):
        try:
            rec = json.loads(path.read_text())
            out[int(rec["num"])] = rec
        except (OSError, ValueError, KeyError) as err:
            log.warning("sweep record %s is unreadable (%s); that job is reported from MLflow only", path, err)
    return out
