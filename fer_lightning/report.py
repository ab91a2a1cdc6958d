"""fer-report: a leaderboard of MLflow runs (varied params as columns, seeds as mean +/- std) beside the paper's rows."""

from __future__ import annotations

import fnmatch
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient
from omegaconf import DictConfig, OmegaConf

from fer_lightning.baselines import baseline_rows, to_markdown
from fer_lightning.errors import ConfigError
from fer_lightning.mlflow_store import ensure_store
from fer_lightning.plots import plot_heatmap, plot_leaderboard

log = logging.getLogger(__name__)

# params that say where or how a run was executed, not what was trained
DEFAULT_IGNORE: tuple[str, ...] = (
    "paths.*", "logger.*", "hydra.*", "tags.*", "run_name", "task_name", "cv.seed", "data.num_workers",
    "trainer.enable_progress_bar", "trainer.enable_model_summary", "trainer.log_every_n_steps",
)  # fmt: skip
# fer-train logs each config group's choice under the group's name (`loss`), the rest as dotted keys; keys with
# '/' or other bare names are Lightning's copy of the model's hyper-parameters, which repeat the config
GROUP_PARAMS: tuple[str, ...] = ("data", "sampling", "loss", "backbone", "augment", "trainer", "experiment")


class ReportError(ConfigError):
    """The runs to report cannot be found or compared; the message names the report.* key to change."""


@dataclass
class Runs:
    """Runs as three aligned tables indexed by run id: info (name, status, tags), params (str) and metrics."""

    info: pd.DataFrame
    params: pd.DataFrame
    metrics: pd.DataFrame

    def __len__(self) -> int:
        return len(self.info)

    def subset(self, ids: Sequence[str]) -> Runs:
        """The runs with these ids, in this order."""
        ids = list(ids)
        return Runs(self.info.loc[ids], self.params.loc[ids], self.metrics.loc[ids])


def runs_from_mlflow(mlflow_runs: Sequence) -> Runs:
    """Runs from `mlflow.entities.Run` objects (latest value of each metric)."""
    ids = [r.info.run_id for r in mlflow_runs]
    info = pd.DataFrame(
        {
            "run_name": [r.info.run_name for r in mlflow_runs],
            "status": [r.info.status for r in mlflow_runs],
            "start_time": [r.info.start_time for r in mlflow_runs],
            "tags": [dict(r.data.tags) for r in mlflow_runs],
        },
        index=pd.Index(ids, name="run_id"),
    )
    params = pd.DataFrame([dict(r.data.params) for r in mlflow_runs], index=info.index, dtype=object)
    metrics = pd.DataFrame([dict(r.data.metrics) for r in mlflow_runs], index=info.index, dtype=float)
    return Runs(info, params, metrics)


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string, max_results=1000, page_token=token,
                                  order_by=["attributes.start_time ASC"])  # fmt: skip
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def fetch_runs(
    client: MlflowClient, *, experiment: str | None = None, parent_run_id: str | None = None,
    filter_string: str | None = None, status: str | None = "FINISHED", include_eval: bool = False,
) -> Runs:  # fmt: skip
    """Runs of a sweep's parent (its children), or of an experiment, narrowed by an MLflow filter and status.

    In experiment mode k-fold children (tag `cv.fold`; their parent carries the mean) and fer-eval runs (tag
    task=eval, unless `include_eval`) are left out.
    """
    filters = [filter_string] if filter_string else []  # MLflow filters are AND-joined clauses, no parentheses
    if status:
        filters.append(f"attributes.status = '{status}'")
    if parent_run_id:
        try:
            parent = client.get_run(parent_run_id)
        except Exception as err:  # MLflow's exception kinds differ per store
            raise ReportError(f"report.parent_run_id={parent_run_id}: no such run ({err})") from err
        experiment_ids = [parent.info.experiment_id]
        filters.append(f"tags.mlflow.parentRunId = '{parent_run_id}'")
    else:
        if not experiment:
            raise ReportError("nothing to report: set report.experiment, report.parent_run_id or report.filter")
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ReportError(f"report.experiment={experiment!r} does not exist; experiments in the store: {names}")
        experiment_ids = [found.experiment_id]
    try:
        found_runs = _search(client, experiment_ids, " and ".join(filters))
    except Exception as err:  # a malformed filter string
        raise ReportError(f"report.filter={filter_string!r} was refused by MLflow: {err}") from err
    if not parent_run_id:
        found_runs = [
            r for r in found_runs
            if "cv.fold" not in r.data.tags and (include_eval or r.data.tags.get("task") != "eval")
        ]  # fmt: skip
    return runs_from_mlflow(found_runs)


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in ignore)


def varied_params(
    params: pd.DataFrame, *, ignore: Sequence[str] = DEFAULT_IGNORE, seed_param: str = "seed"
) -> list[str]:
    """Config params whose value differs across runs (seed excluded); of params that split the runs identically
    (e.g. `loss` and `loss.name`) only the shortest name is kept."""
    candidates = [
        k for k in params.columns
        if k != seed_param and (k in GROUP_PARAMS or ("." in k and "/" not in k)) and not _ignored(k, ignore)
    ]  # fmt: skip
    by_partition: dict[tuple[int, ...], str] = {}
    for key in sorted(candidates, key=lambda k: (len(k), k)):
        values = params[key].astype(object).where(params[key].notna(), "<unset>")
        codes = tuple(pd.factorize(values)[0].tolist())
        if len(set(codes)) > 1:
            by_partition.setdefault(codes, key)
    return sorted(by_partition.values(), key=lambda k: (k not in GROUP_PARAMS, k))


def _sort_value(value: object) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, math.nan, str(value))


def leaderboard(runs: Runs, metrics: Sequence[str], params: Sequence[str], seed_param: str = "seed") -> pd.DataFrame:
    """One row per distinct setting of `params`: n_seeds, n_runs, seeds, run ids, mean and std (ddof=1) per metric."""
    keys = runs.params.reindex(columns=list(params)).astype(object)
    keys = keys.where(keys.notna(), "<unset>")
    values = runs.metrics.reindex(columns=list(metrics)).astype(float)
    seeds = runs.params[seed_param] if seed_param in runs.params else pd.Series("", index=runs.params.index)
    rows = []
    groups = keys.groupby(list(params), sort=False, dropna=False).groups if params else {(): keys.index}
    for setting, ids in groups.items():
        setting = setting if isinstance(setting, tuple) else (setting,)
        ids = list(ids)
        row: dict[str, object] = dict(zip(params, setting))
        names = runs.info.loc[ids, "run_name"].astype(str).tolist()
        row["label"] = ", ".join(f"{p}={v}" for p, v in zip(params, setting)) or names[0]
        row["kind"] = "run"
        seed_values = sorted({str(s) for s in seeds.loc[ids].dropna()}, key=_sort_value)
        # a rerun with the same seed is one more run, not one more seed
        row["n_seeds"] = len(seed_values) or len(ids)
        row["n_runs"] = len(ids)
        row["seeds"] = ",".join(seed_values)
        row["run_ids"] = ",".join(ids)
        for m in metrics:
            column = values.loc[ids, m].to_numpy(dtype=float)
            row[f"{m} mean"] = float(np.mean(column)) if len(column) else math.nan
            row[f"{m} std"] = float(np.std(column, ddof=1)) if len(column) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def with_baselines(board: pd.DataFrame, metrics: Sequence[str], sort_by: str, ascending: bool) -> pd.DataFrame:
    """The leaderboard with the AffectNet paper's rows added, sorted by `sort_by` (NaN last)."""
    paper = baseline_rows(metrics)
    rows = pd.DataFrame(
        {"label": paper.index, "kind": "AffectNet paper", **{f"{m} mean": paper[m].to_numpy() for m in metrics}}
    )
    rows = rows[rows[[f"{m} mean" for m in metrics]].notna().any(axis=1)]
    both = pd.concat([board, rows], ignore_index=True) if len(rows) else board.copy()
    return both.sort_values(f"{sort_by} mean", ascending=ascending, na_position="last", kind="stable").reset_index(
        drop=True
    )


def _cell(mean: float, std: float, n: int) -> str:
    if math.isnan(mean):
        return ""
    return f"{mean:.3f} ± {std:.3f}" if n > 1 and not math.isnan(std) else f"{mean:.3f}"


def markdown(board: pd.DataFrame, metrics: Sequence[str], params: Sequence[str]) -> str:
    """The leaderboard as a markdown table: params, n_seeds, `mean ± std` per metric (a single run: its value)."""
    n = board["n_runs"].fillna(0).astype(int).tolist()
    seeds = board["n_seeds"].fillna(0).astype(int).tolist()
    shown = pd.DataFrame({"row": board["label"].astype(str)})
    for p in params:
        shown[p] = board[p].where(board["kind"] == "run", "").fillna("").astype(str)
    shown["n_seeds"] = [(str(k) + (f" ({r} runs)" if r != k else "")) if r else "" for k, r in zip(seeds, n)]
    for m in metrics:
        stds = board[f"{m} std"] if f"{m} std" in board else pd.Series(math.nan, index=board.index)
        shown[m] = [_cell(float(mu), float(sd), k) for mu, sd, k in zip(board[f"{m} mean"], stds, n)]
    shown.index = pd.RangeIndex(1, len(shown) + 1, name="#")
    return to_markdown(shown)


def heatmap_table(runs: Runs, row_param: str, col_param: str, metric: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(mean, number of runs) of `metric` for each (row_param, col_param) value pair, values in natural order."""
    for key in (row_param, col_param):
        if key not in runs.params:
            raise ReportError(f"report.heatmap: param {key!r} is not logged by these runs")
    frame = pd.DataFrame(
        {
            "row": runs.params[row_param].astype(object).fillna("<unset>"),
            "col": runs.params[col_param].astype(object).fillna("<unset>"),
            "value": runs.metrics[metric] if metric in runs.metrics else math.nan,
        }
    )
    mean = frame.pivot_table(index="row", columns="col", values="value", aggfunc="mean", dropna=False)
    count = frame.pivot_table(index="row", columns="col", values="value", aggfunc="count", dropna=False)
    rows = sorted(frame["row"].unique(), key=_sort_value)
    cols = sorted(frame["col"].unique(), key=_sort_value)
    mean = mean.reindex(index=rows, columns=cols)
    count = count.reindex(index=rows, columns=cols).fillna(0).astype(int)
    mean.index.name, mean.columns.name = row_param, col_param
    return mean, count


@dataclass
class ReportResult:
    """The leaderboard (with baseline rows), the varied params and the files written."""

    board: pd.DataFrame
    params: list[str]
    paths: list[Path] = field(default_factory=list)
    text: str = ""


def build_report(
    runs: Runs, *, metrics: Sequence[str], folder: Path, sort_by: str | None = None, ascending: bool | None = None,
    params: Sequence[str] | None = None, ignore: Sequence[str] = DEFAULT_IGNORE, seed_param: str = "seed",
    baselines: bool = True, heatmap: Sequence[str] | None = None, source: str = "",
) -> ReportResult:  # fmt: skip
    """Write leaderboard.{md,csv,png} (and heatmap.png) into `folder` for these runs."""
    metrics = list(metrics)
    if not metrics:
        raise ReportError("report.metrics is empty: name at least one metric, e.g. [test/f1_macro]")
    sort_by = sort_by or metrics[0]
    if sort_by not in metrics:
        raise ReportError(f"report.sort_by={sort_by!r} is not one of report.metrics={metrics}")
    if ascending is None:
        ascending = any(word in sort_by for word in ("rmse", "loss"))  # errors: lower is better
    has_metric = runs.metrics.reindex(columns=metrics).notna().any(axis=1)
    skipped = [str(n) for n in runs.info.loc[~has_metric, "run_name"]]
    runs = runs.subset(list(has_metric[has_metric].index))
    if not len(runs):
        raise ReportError(f"no finished run logged any of {metrics} ({source}); check report.metrics and the selection")
    params = list(params) if params is not None else varied_params(runs.params, ignore=ignore, seed_param=seed_param)
    board = leaderboard(runs, metrics, params, seed_param)
    board = with_baselines(board, metrics, sort_by, ascending) if baselines else board.sort_values(
        f"{sort_by} mean", ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)  # fmt: skip
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    result = ReportResult(board=board, params=params)

    csv_path = folder / "leaderboard.csv"
    board.to_csv(csv_path, index=False)
    table = markdown(board, metrics, params)
    notes = [
        f"{len(runs)} runs from {source}; varied params: {', '.join(params) or 'none'}.",
        "Runs that differ only in the seed are one row: mean ± sample std (ddof=1) over its runs (n_seeds).",
    ]
    if baselines:
        notes.append("AffectNet paper rows: published numbers on AffectNet (8 classes), for scale.")
    if skipped:
        notes.append(f"Left out (none of the metrics logged): {', '.join(skipped)}.")
    md_path = folder / "leaderboard.md"
    md_path.write_text("# Leaderboard\n\n" + "\n".join(notes) + "\n\n" + table + "\n")
    png_path = plot_leaderboard(
        board["label"].astype(str).tolist(), board[f"{sort_by} mean"].to_numpy(dtype=float), folder / "leaderboard.png",
        errors=board[f"{sort_by} std"].to_numpy(dtype=float) if f"{sort_by} std" in board else None,
        baseline=(board["kind"] != "run").tolist(), metric=sort_by,
    )  # fmt: skip
    result.paths = [md_path, csv_path, png_path]

    pair = list(heatmap) if heatmap else (params if len(params) == 2 else [])
    if pair:
        if len(pair) != 2:
            raise ReportError(f"report.heatmap needs two params [rows, columns], got {pair}")
        mean, count = heatmap_table(runs, pair[0], pair[1], sort_by)
        cells = [
            [f"{v:.3f}" + (f"\n(n={c})" if c > 1 else "") for v, c in zip(values, counts)]
            for values, counts in zip(mean.to_numpy(dtype=float), count.to_numpy())
        ]
        heat_path = plot_heatmap(
            mean.to_numpy(dtype=float), [str(v) for v in mean.index], [str(v) for v in mean.columns],
            folder / "heatmap.png", row_name=pair[0], col_name=pair[1], annotations=np.array(cells, dtype=object),
            title=f"{sort_by} (mean over runs)",
        )  # fmt: skip
        mean.to_csv(folder / "heatmap.csv")
        result.paths += [heat_path, folder / "heatmap.csv"]
    result.text = "\n".join([*notes, "", table])
    return result


def _listed(rc: DictConfig, key: str) -> list[str] | None:
    value = rc.get(key)
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return [str(v) for v in OmegaConf.to_container(value, resolve=True)]


def report(cfg: DictConfig) -> ReportResult:
    """fer-report: select runs as `cfg.report` says, write the leaderboard files, print the table."""
    rc = cfg.report
    ensure_store(str(cfg.logger.tracking_uri))  # a broken store gets its one line, not MLflow's traceback
    client = MlflowClient(tracking_uri=str(cfg.logger.tracking_uri))
    runs = fetch_runs(
        client, experiment=rc.get("experiment"), parent_run_id=rc.get("parent_run_id"),
        filter_string=rc.get("filter"), status=rc.get("status"), include_eval=bool(rc.get("include_eval", False)),
    )  # fmt: skip
    source = (
        f"the children of run {rc.parent_run_id}" if rc.get("parent_run_id") else f"experiment '{rc.experiment}'"
    ) + (f" matching {rc.filter!r}" if rc.get("filter") else "")
    if not len(runs):
        raise ReportError(f"no runs found in {source} (status {rc.get('status')}) at {cfg.logger.tracking_uri}")
    result = build_report(
        runs, metrics=_listed(rc, "metrics") or [], folder=Path(str(rc.output_dir)), sort_by=rc.get("sort_by"),
        ascending=rc.get("ascending"), params=_listed(rc, "params"), ignore=_listed(rc, "ignore_params") or DEFAULT_IGNORE,
        seed_param=str(rc.get("seed_param", "seed")), baselines=bool(rc.get("baselines", True)),
        heatmap=_listed(rc, "heatmap"), source=source,
    )  # fmt: skip
    lines = ["", result.text, "", "written: " + ", ".join(str(p) for p in result.paths)]
    print("\n".join(lines), file=sys.stdout, flush=True)
    return result
