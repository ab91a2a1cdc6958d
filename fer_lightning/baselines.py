"""The AffectNet paper's published baselines as data, and the table that sets a run's metrics beside them.

`BASELINES` is a long (tidy) table, one row per published number, with columns
``model, column, metric, variant, value, source``:

- ``column`` is the paper's column: ``Imbalanced``, ``Down-Sampling``, ``Up-Sampling``, ``Weighted-Loss`` (the
  AlexNet CNN trained four ways), ``SVM``, ``MS Cognitive``, and ``Valence/Arousal`` for the regression CNN;
- ``metric`` is one of ``accuracy, f1, kappa, alpha, auc, aucpr, rmse_valence, rmse_arousal``;
- ``variant`` is ``orig`` (as measured) or ``norm`` (skew-normalized, see `fer_lightning.metrics`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

from fer_lightning.taxonomy import CANONICAL

SOURCE = (
    "Mollahosseini, Hasani & Mahoor, 'AffectNet: A Database for Facial Expression, Valence, and Arousal Computing "
    "in the Wild', IEEE Transactions on Affective Computing 10(1), 2019 (arXiv:1708.03985, 2017); "
    "expression baselines as reproduced in seed 001 appendix A"
)
VA_SOURCE = (
    "Mollahosseini, Hasani & Mahoor, IEEE TAC 2019, valence/arousal baseline (AlexNet regression); "
    "not in seed 001; the values (RMSE 0.37 valence, 0.41 arousal, journal version) are as given in the core issue "
    "and were not checked against the paper here"
)

EXPRESSION_METRICS: tuple[str, ...] = ("accuracy", "f1", "kappa", "alpha", "auc", "aucpr")
VA_METRICS: tuple[str, ...] = ("rmse_valence", "rmse_arousal")
CNN_COLUMNS: tuple[str, ...] = ("Imbalanced", "Down-Sampling", "Up-Sampling", "Weighted-Loss")
VA_COLUMN = "Valence/Arousal"

# (orig, norm) per column, rows in EXPRESSION_METRICS order: accuracy, F1, kappa, alpha, AUC, AUCPR.
# fmt: off
_EXPRESSION_TABLE: dict[tuple[str, str], tuple[tuple[float, float], ...]] = {
    ("AlexNet CNN", "Imbalanced"):    ((0.72, 0.54), (0.57, 0.52), (0.53, 0.46), (0.52, 0.45), (0.85, 0.80), (0.56, 0.55)),
    ("AlexNet CNN", "Down-Sampling"): ((0.68, 0.58), (0.56, 0.57), (0.51, 0.51), (0.51, 0.51), (0.82, 0.85), (0.54, 0.57)),
    ("AlexNet CNN", "Up-Sampling"):   ((0.68, 0.57), (0.56, 0.55), (0.52, 0.49), (0.51, 0.48), (0.82, 0.84), (0.55, 0.56)),
    ("AlexNet CNN", "Weighted-Loss"): ((0.64, 0.63), (0.55, 0.62), (0.50, 0.57), (0.50, 0.57), (0.86, 0.86), (0.58, 0.64)),
    ("SVM", "SVM"):                   ((0.60, 0.37), (0.37, 0.31), (0.32, 0.25), (0.31, 0.22), (0.77, 0.70), (0.39, 0.37)),
    ("MS Cognitive", "MS Cognitive"): ((0.68, 0.48), (0.51, 0.45), (0.46, 0.40), (0.46, 0.37), (0.83, 0.77), (0.52, 0.50)),
}
# fmt: on
_VA_TABLE: dict[str, float] = {"rmse_valence": 0.37, "rmse_arousal": 0.41}


def _build() -> pd.DataFrame:
    rows = []
    for (model, column), values in _EXPRESSION_TABLE.items():
        for metric, (orig, norm) in zip(EXPRESSION_METRICS, values, strict=True):
            rows.append((model, column, metric, "orig", orig, SOURCE))
            rows.append((model, column, metric, "norm", norm, SOURCE))
    for metric, value in _VA_TABLE.items():
        rows.append(("AlexNet CNN", VA_COLUMN, metric, "orig", value, VA_SOURCE))
    return pd.DataFrame(rows, columns=["model", "column", "metric", "variant", "value", "source"])


BASELINES: pd.DataFrame = _build()

# Manually annotated images per category in AffectNet (paper's table, as in seed 001 table 1), canonical names.
CLASS_COUNTS: pd.Series = pd.Series(
    [80276, 146198, 29487, 16288, 8191, 5264, 28130, 5135, 35322, 13163, 88895],
    index=[CANONICAL[i] for i in range(11)],
    name="images",
    dtype="int64",
)

SAMPLING_CHOICES: tuple[str, ...] = ("none", "downsample", "upsample")
LOSS_CHOICES: tuple[str, ...] = ("ce", "inverse_frequency", "class_balanced", "focal")


def baseline_for(sampling: str, loss: str) -> str:
    """The paper's CNN column that matches the framework's `sampling` and `loss` config choices."""
    if sampling not in SAMPLING_CHOICES:
        raise ValueError(f"sampling: {sampling!r} has no AffectNet baseline; choose one of {list(SAMPLING_CHOICES)}")
    if loss not in LOSS_CHOICES:
        raise ValueError(f"loss: {loss!r} has no AffectNet baseline; choose one of {list(LOSS_CHOICES)}")
    if sampling == "downsample":
        return "Down-Sampling"
    if sampling == "upsample":
        return "Up-Sampling"
    return "Imbalanced" if loss == "ce" else "Weighted-Loss"


def baseline_values(column: str) -> pd.DataFrame:
    """One paper column as a metric x (orig, norm) table; rmse rows come from the valence/arousal baseline."""
    known = sorted(set(BASELINES["column"]) - {VA_COLUMN})
    if column not in known:
        raise ValueError(f"unknown baseline column {column!r}; known: {known}")
    rows = BASELINES[BASELINES["column"].isin([column, VA_COLUMN])]
    wide = rows.pivot(index="metric", columns="variant", values="value")
    return wide.reindex(index=[*EXPRESSION_METRICS, *VA_METRICS], columns=["orig", "norm"])


def comparison_table(metrics: dict[str, float], *, sampling: str, loss: str, prefix: str = "test/") -> pd.DataFrame:
    """This run's metrics next to the matching paper column, with deltas (run - baseline); NaN where missing."""
    column = baseline_for(sampling, loss)
    base = baseline_values(column)
    # The paper's F1 is the class-averaged F1: our f1_macro.
    keys = {m: ("f1_macro" if m == "f1" else m) for m in (*EXPRESSION_METRICS, *VA_METRICS)}
    run_orig = [float(metrics.get(f"{prefix}{keys[m]}", math.nan)) for m in base.index]
    run_norm = [
        float(metrics.get(f"{prefix}{keys[m]}_norm", math.nan)) if m in EXPRESSION_METRICS else math.nan
        for m in base.index
    ]
    table = pd.DataFrame(
        {
            "run orig": run_orig,
            "run norm": run_norm,
            f"{column} orig": base["orig"].to_numpy(dtype=float),
            f"{column} norm": base["norm"].to_numpy(dtype=float),
        },
        index=pd.Index(base.index, name="metric"),
    )
    table["delta orig"] = table["run orig"] - table[f"{column} orig"]
    table["delta norm"] = table["run norm"] - table[f"{column} norm"]
    return table


def _cell(value: object, digits: int) -> str:
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def _cells(df: pd.DataFrame, digits: int) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, body cells (index first) and whether each column is numeric (right-aligned)."""
    header = [str(df.index.name or ""), *(str(c) for c in df.columns)]
    body = [
        [_cell(idx, digits), *(_cell(v, digits) for v in row)] for idx, row in zip(df.index, df.itertuples(index=False))
    ]
    numeric = [False, *(pd.api.types.is_numeric_dtype(df[c]) for c in df.columns)]
    return header, body, numeric


def format_table(df: pd.DataFrame, digits: int = 3) -> str:
    """Fixed-width text table (index as the first column, NaN blank) for printing."""
    header, body, numeric = _cells(df, digits)
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in body)])


def to_markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """GitHub-flavoured markdown table (index as the first column, NaN blank)."""
    header, body, numeric = _cells(df, digits)

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    align = "| " + " | ".join("---:" if num else "---" for num in numeric) + " |"
    return "\n".join([line(header), align, *(line(r) for r in body)])


# our metric name (without the stage prefix) -> (paper metric, variant); F1 in the paper is the class-averaged F1
_PAPER_KEYS: dict[str, tuple[str, str]] = {
    **{("f1_macro" if m == "f1" else m): (m, "orig") for m in EXPRESSION_METRICS},
    **{("f1_macro" if m == "f1" else m) + "_norm": (m, "norm") for m in EXPRESSION_METRICS},
    **{m: (m, "orig") for m in VA_METRICS},
}


def paper_metric(key: str) -> tuple[str, str] | None:
    """(paper metric, variant) that our metric `key` (e.g. `test/f1_macro_norm`) corresponds to, or None."""
    return _PAPER_KEYS.get(key.rsplit("/", 1)[-1])


def baseline_label(model: str, column: str) -> str:
    """Row label of one published baseline, e.g. `AffectNet paper: AlexNet CNN, Weighted-Loss`."""
    if column == VA_COLUMN:
        return f"AffectNet paper: {model}, valence/arousal regression"
    return f"AffectNet paper: {model}" + ("" if column == model else f", {column}")


def baseline_rows(metrics: Sequence[str]) -> pd.DataFrame:
    """The paper's rows in our metric names: index = row label, one column per key of `metrics` (NaN = not
    published). Rows that publish none of `metrics` are left out."""
    table = BASELINES.set_index(["model", "column", "metric", "variant"])["value"]
    rows: dict[str, dict[str, float]] = {}
    for model, column in dict.fromkeys(zip(BASELINES["model"], BASELINES["column"])):
        values = {}
        for key in metrics:
            paper = paper_metric(key)
            values[key] = float(table.get((model, column, *paper), math.nan)) if paper else math.nan
        if any(not math.isnan(v) for v in values.values()):
            rows[baseline_label(model, column)] = values
    out = pd.DataFrame.from_dict(rows, orient="index", columns=list(metrics), dtype=float)
    out.index.name = "row"
    return out
