"""K-fold cross-validation (cv.folds=k): k child training runs under one MLflow parent run with mean/std per metric."""

from __future__ import annotations

import copy
import logging
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, open_dict

from fer_lightning import sweep, tracking
from fer_lightning.baselines import format_table, to_markdown
from fer_lightning.data.datamodule import DataConfigError
from fer_lightning.data.records import SPLITS
from fer_lightning.data.splits import SplitError, groups_per_split, kfold_assign
from fer_lightning.errors import ConfigError

log = logging.getLogger(__name__)

# the per-fold columns printed and in cv_folds.md (seed 004's table: macro P/R/F1 and accuracy); the CSV has all
TABLE_METRICS: tuple[str, ...] = (
    "val/accuracy",
    "val/precision_macro",
    "val/balanced_accuracy",
    "val/f1_macro",
    "val/f1_macro_norm",
    "val/kappa",
    "test/accuracy",
    "test/f1_macro",
    "test/f1_macro_norm",
)


def fold_records(
    records: pd.DataFrame, *, folds: int, index: int, seed: int, groups: np.ndarray | None = None
) -> pd.DataFrame:
    """Fold `index` of a stratified, seeded `folds`-fold split of the train+val rows as val, the rest as train.

    Test rows keep their split. A val split the data set shipped (or the hold-out carved from train) joins the
    pool: in cross-validation each fold takes the val role in turn. `groups` (one per row, data.group_by): each
    group lies in one fold, so never on both the train and the val side.
    """
    if not 0 <= int(index) < int(folds):
        raise DataConfigError(f"data.fold.index={index} is outside 0..{int(folds) - 1} for {folds} folds")
    pool = records["split"].isin(["train", "val"]).to_numpy()
    merged = records.copy()
    merged["split"] = pd.Categorical(np.where(pool, "train", records["split"].astype(object)), categories=list(SPLITS))
    try:
        assign = kfold_assign(merged, k=int(folds), seed=int(seed), groups=groups)
    except SplitError as err:
        raise DataConfigError(f"cv.folds={folds}: {err}") from err
    split = merged["split"].astype(object).to_numpy().copy()
    split[np.flatnonzero(pool)[assign == int(index)]] = "val"
    out = records.copy()
    out["split"] = pd.Categorical(split, categories=list(SPLITS))
    log.info(
        "fold %d of %d (seed %s): %s", int(index) + 1, folds, seed, out["split"].value_counts(sort=False).to_dict()
    )
    if groups is not None:
        counts = groups_per_split(out["split"], np.asarray(groups, dtype=object))
        log.info("fold %d of %d: groups (data.group_by) per split: %s", int(index) + 1, folds, counts)
    return out


def fold_table(results: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per fold (1..k) of every numeric metric, then `mean` and `std` rows (sample std, ddof=1)."""
    rows = [
        {k: float(v) for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)} for r in results
    ]
    table = pd.DataFrame(rows, index=pd.Index(range(1, len(rows) + 1), name="fold"))
    table = table[sorted(table.columns)]
    values = table.to_numpy(dtype=float)
    table.loc["mean"] = np.mean(values, axis=0)
    table.loc["std"] = np.std(values, axis=0, ddof=1) if len(rows) > 1 else math.nan
    return table


def _validate(cfg: DictConfig) -> int:
    folds = cfg.cv.folds
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ConfigError(f"cv.folds={folds!r} is invalid: allowed 0/null (off) or an integer >= 2")
    return folds


def _fold_cfg(cfg: DictConfig, fold: int, folds: int, name: str, parent_id: str | None) -> DictConfig:
    child = copy.deepcopy(cfg)
    with open_dict(child):
        child.cv.folds = 0  # the child trains once
        child.data.fold = {"folds": folds, "index": fold, "seed": int(cfg.cv.seed)}
        child.run_name = f"{name}-fold{fold + 1}"
        child.paths.output_dir = str(Path(cfg.paths.output_dir) / f"fold{fold + 1}")
        tags = {str(k): str(v) for k, v in (cfg.get("tags") or {}).items()}
        tags.update({"cv.fold": str(fold + 1), "cv.folds": str(folds)})
        if parent_id is not None:
            tags["mlflow.parentRunId"] = parent_id  # MLflow shows the folds nested under the parent
        child.tags = tags
    return child


def run_kfold(cfg: DictConfig) -> dict[str, float]:
    """Train cfg.cv.folds models, one per fold; the parent run gets each metric's mean (same key) and `<key>_std`."""
    from fer_lightning.train import default_run_name, group_choices, train

    folds = _validate(cfg)
    choices = group_choices(cfg)
    name = cfg.run_name or sweep.job_run_name() or default_run_name(choices)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tags = {**{f"group.{k}": v for k, v in choices.items()}, **choices, "cv.folds": str(folds),
            "git_commit": tracking.git_commit(Path(cfg.paths.root_dir))}  # fmt: skip
    tags.update(sweep.job_tags())  # in a multirun the fold set's run is a child of the sweep's run
    tags.update({str(k): str(v) for k, v in (cfg.get("tags") or {}).items()})
    parent = tracking.make_logger(cfg.logger, run_name=f"{name}-cv{folds}", tags=tags)
    try:
        if parent is not None:
            tracking.log_params(parent, {**tracking.flatten(cfg), **choices, "seed": cfg.seed})
        results = []
        for fold in range(folds):
            log.info("cross-validation: fold %d of %d", fold + 1, folds)
            results.append(train(_fold_cfg(cfg, fold, folds, name, parent.run_id if parent else None)))
        table = fold_table(results)
        paths = _write_table(table, output_dir)
        summary = {k: float(v) for k, v in table.loc["mean"].items()}
        summary.update({f"{k}_std": float(v) for k, v in table.loc["std"].items()})
        if parent is not None:
            parent.log_metrics(summary, step=0)
            for path in paths:
                tracking.log_artifact(parent, path)
    except BaseException:
        tracking.end_run(parent, "FAILED")
        raise
    tracking.end_run(parent, "FINISHED")
    _print(table, folds, parent, cfg)
    return {**summary, "folds": float(folds)}


def _shown(table: pd.DataFrame) -> pd.DataFrame:
    return table[[c for c in TABLE_METRICS if c in table.columns]]


def _write_table(table: pd.DataFrame, folder: Path) -> list[Path]:
    csv_path, md_path = folder / "cv_folds.csv", folder / "cv_folds.md"
    table.to_csv(csv_path)
    md_path.write_text(
        f"# {len(table) - 2}-fold cross-validation\n\nval = the held-out fold, test = the common test split; "
        "std is the sample standard deviation (ddof=1) over the folds. Every metric is in cv_folds.csv.\n\n"
        + to_markdown(_shown(table).rename(index=str), digits=4)
        + "\n"
    )
    return [csv_path, md_path]


def _print(table: pd.DataFrame, folds: int, parent: Any, cfg: DictConfig) -> None:
    lines = ["", f"{folds}-fold cross-validation (val = held-out fold; std over folds, ddof=1):",
             format_table(_shown(table).rename(index=str), digits=4)]  # fmt: skip
    if parent is not None:
        lines.append(f"MLflow parent run {parent.run_id} (folds as child runs) at {cfg.logger.tracking_uri}")
    print("\n".join(lines), file=sys.stdout, flush=True)
