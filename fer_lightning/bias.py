"""Bias analysis: per-group expression metrics and their gaps for the records' `group_*` columns (e.g. age, gender)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from fer_lightning.baselines import format_table
from fer_lightning.data.records import group_columns
from fer_lightning.metrics import GROUP_METRIC_COLUMNS, group_metrics


def bias_table(pred: np.ndarray, target: np.ndarray, records: pd.DataFrame) -> pd.DataFrame | None:
    """Per attribute and value: n, accuracy, macro precision/recall/F1, and a `gap` row (max - min); None when
    `records` (one row per prediction, same order) has no `group_*` column."""
    columns = group_columns(records)
    if not columns:
        return None
    if len(records) != len(target):
        raise ValueError(f"bias_table: {len(records)} records for {len(target)} predictions; pass one row per sample")
    groups = records[columns].reset_index(drop=True)
    # the attribute as the annotator named it: group_age -> age
    groups.columns = [c.removeprefix("group_") for c in columns]
    return group_metrics(pred, target, groups)


def largest_gaps(table: pd.DataFrame) -> list[str]:
    """One line per attribute: the metric with the largest gap and the best and worst groups for it."""
    lines = []
    for attribute, rows in table.groupby("attribute", sort=False):
        real = rows[~rows["value"].isin(["gap", "<NA>"])]
        gap = rows[rows["value"] == "gap"].iloc[0]
        if len(real) < 2:
            lines.append(f"{attribute}: one group only ({', '.join(real['value'])}); no gap to measure")
            continue
        metric = max(GROUP_METRIC_COLUMNS, key=lambda m: -math.inf if pd.isna(gap[m]) else float(gap[m]))
        best, worst = real.loc[real[metric].idxmax()], real.loc[real[metric].idxmin()]
        lines.append(
            f"{attribute}: largest gap {float(gap[metric]):.3f} in {metric} "
            f"({best['value']} {float(best[metric]):.3f} vs {worst['value']} {float(worst[metric]):.3f})"
        )
    return lines


def bias_summary(table: pd.DataFrame) -> str:
    """The bias table as printed text with a line on the largest gap per attribute."""
    shown = table.set_index("attribute")
    return "\n".join(
        [
            "bias analysis: per-group metrics (macro averages over the classes present in each group; "
            "gap = max - min over the groups, missing values left out):",
            format_table(shown),
            *largest_gaps(table),
        ]
    )
