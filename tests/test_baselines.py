"""The AffectNet baselines as data, the config -> column mapping, and the comparison tables."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from fer_lightning.baselines import (
    BASELINES,
    CLASS_COUNTS,
    baseline_for,
    baseline_values,
    comparison_table,
    format_table,
    to_markdown,
)
from fer_lightning.metrics import expression_metrics
from fer_lightning.taxonomy import CANONICAL

# Seed 001 appendix A, typed in again row by row (Orig Norm per column) as an independent transcription.
APPENDIX_A = """
accuracy 0.72 0.54 0.68 0.58 0.68 0.57 0.64 0.63 0.60 0.37 0.68 0.48
f1       0.57 0.52 0.56 0.57 0.56 0.55 0.55 0.62 0.37 0.31 0.51 0.45
kappa    0.53 0.46 0.51 0.51 0.52 0.49 0.50 0.57 0.32 0.25 0.46 0.40
alpha    0.52 0.45 0.51 0.51 0.51 0.48 0.50 0.57 0.31 0.22 0.46 0.37
auc      0.85 0.80 0.82 0.85 0.82 0.84 0.86 0.86 0.77 0.70 0.83 0.77
aucpr    0.56 0.55 0.54 0.57 0.55 0.56 0.58 0.64 0.39 0.37 0.52 0.50
"""
COLUMNS = ["Imbalanced", "Down-Sampling", "Up-Sampling", "Weighted-Loss", "SVM", "MS Cognitive"]


def _value(column: str, metric: str, variant: str) -> float:
    row = BASELINES[(BASELINES.column == column) & (BASELINES.metric == metric) & (BASELINES.variant == variant)]
    assert len(row) == 1, (column, metric, variant)
    return float(row["value"].iloc[0])


def test_every_appendix_number_is_in_the_table():
    for line in APPENDIX_A.strip().splitlines():
        metric, *numbers = line.split()
        for i, column in enumerate(COLUMNS):
            assert _value(column, metric, "orig") == float(numbers[2 * i]), (column, metric)
            assert _value(column, metric, "norm") == float(numbers[2 * i + 1]), (column, metric)


def test_table_shape_spot_values_and_source():
    assert list(BASELINES.columns) == ["model", "column", "metric", "variant", "value", "source"]
    assert len(BASELINES) == 6 * 6 * 2 + 2
    assert not BASELINES.duplicated(["column", "metric", "variant"]).any()
    assert _value("Imbalanced", "accuracy", "orig") == 0.72
    assert _value("Weighted-Loss", "f1", "norm") == 0.62
    assert _value("SVM", "alpha", "norm") == 0.22
    assert _value("MS Cognitive", "auc", "orig") == 0.83
    assert _value("Valence/Arousal", "rmse_valence", "orig") == 0.37
    assert _value("Valence/Arousal", "rmse_arousal", "orig") == 0.41
    assert BASELINES["source"].str.contains("Mollahosseini").all()
    assert set(BASELINES.loc[BASELINES.column.isin(COLUMNS[:4]), "model"]) == {"AlexNet CNN"}


def test_class_counts_follow_the_taxonomy():
    assert list(CLASS_COUNTS.index) == [CANONICAL[i] for i in range(11)]
    assert CLASS_COUNTS["neutral"] == 80276 and CLASS_COUNTS["happy"] == 146198
    assert CLASS_COUNTS["contempt"] == 5135 and CLASS_COUNTS["non_face"] == 88895


@pytest.mark.parametrize(
    ("sampling", "loss", "column"),
    [
        ("none", "ce", "Imbalanced"),
        ("none", "inverse_frequency", "Weighted-Loss"),
        ("none", "class_balanced", "Weighted-Loss"),
        ("none", "focal", "Weighted-Loss"),
        ("downsample", "ce", "Down-Sampling"),
        ("downsample", "focal", "Down-Sampling"),
        ("upsample", "ce", "Up-Sampling"),
        ("upsample", "class_balanced", "Up-Sampling"),
    ],
)
def test_baseline_for(sampling, loss, column):
    assert baseline_for(sampling, loss) == column


def test_baseline_for_rejects_unknown_choices():
    with pytest.raises(ValueError, match="sampling"):
        baseline_for("smote", "ce")
    with pytest.raises(ValueError, match="loss"):
        baseline_for("none", "hinge")


def test_baseline_values_wide():
    wide = baseline_values("Up-Sampling")
    assert list(wide.columns) == ["orig", "norm"]
    assert wide.loc["kappa"].tolist() == [0.52, 0.49]
    assert wide.loc["rmse_arousal", "orig"] == 0.41 and math.isnan(wide.loc["rmse_arousal", "norm"])
    with pytest.raises(ValueError, match="unknown baseline column"):
        baseline_values("ResNet")


def test_comparison_table_values_and_deltas():
    metrics = {
        "test/accuracy": 0.75,
        "test/accuracy_norm": 0.50,
        "test/f1_macro": 0.60,
        "test/f1_macro_norm": 0.55,
        "test/rmse_valence": 0.30,
        "val/kappa": 0.99,  # another stage: must not be picked up
    }
    table = comparison_table(metrics, sampling="none", loss="ce")
    assert table.shape == (8, 6)
    assert list(table.index) == ["accuracy", "f1", "kappa", "alpha", "auc", "aucpr", "rmse_valence", "rmse_arousal"]
    assert list(table.columns) == [
        "run orig",
        "run norm",
        "Imbalanced orig",
        "Imbalanced norm",
        "delta orig",
        "delta norm",
    ]
    assert table.loc["accuracy"].tolist() == pytest.approx([0.75, 0.50, 0.72, 0.54, 0.03, -0.04])
    assert table.loc["f1"].tolist() == pytest.approx([0.60, 0.55, 0.57, 0.52, 0.03, 0.03])
    assert table.loc["rmse_valence", "delta orig"] == pytest.approx(-0.07)
    assert table.loc["kappa"].isna().tolist() == [True, True, False, False, True, True]
    assert table.loc["rmse_valence"].isna().tolist() == [False, True, False, True, False, True]


def test_comparison_table_from_expression_metrics_with_prefix():
    target = np.array([0, 0, 0, 1, 1, 2])
    probs = np.eye(3)[[0, 0, 1, 1, 1, 2]] * 0.8 + 0.2 / 3
    metrics = {f"val/{k}": v for k, v in expression_metrics(probs, target).items()}
    table = comparison_table(metrics, sampling="upsample", loss="ce", prefix="val/")
    assert table.loc["f1", "run orig"] == metrics["val/f1_macro"]
    assert table.loc["alpha", "run norm"] == metrics["val/alpha_norm"]
    assert table.loc["auc", "delta norm"] == pytest.approx(metrics["val/auc_norm"] - 0.84)


def test_format_table_aligns_columns():
    table = comparison_table({"test/accuracy": 0.75}, sampling="downsample", loss="ce")
    lines = format_table(table).splitlines()
    assert len(lines) == 2 + 8
    header, accuracy = lines[0], lines[2]
    assert header.startswith("metric") and accuracy.startswith("accuracy")
    # Numbers are right-aligned under their header.
    end = header.index("Down-Sampling orig") + len("Down-Sampling orig")
    assert accuracy[end - 5 : end] == "0.680"
    assert "nan" not in format_table(table)


def test_to_markdown_exact():
    df = pd.DataFrame({"run": [0.5, float("nan")], "name": ["a|b", "c"]}, index=pd.Index(["x", "y"], name="metric"))
    assert to_markdown(df, digits=2) == (
        "| metric | run | name |\n| --- | ---: | --- |\n| x | 0.50 | a\\|b |\n| y |  | c |"
    )


def test_baseline_rows_in_our_metric_names():
    from fer_lightning.baselines import baseline_rows, paper_metric

    assert paper_metric("val/kappa_norm") == ("kappa", "norm") and paper_metric("f1_macro") == ("f1", "orig")
    assert paper_metric("test/ccc_valence") is None
    rows = baseline_rows(["test/accuracy", "test/f1_macro_norm", "test/rmse_valence", "test/ccc_valence"])
    assert len(rows) == 7
    assert rows.loc["AffectNet paper: AlexNet CNN, Weighted-Loss", "test/f1_macro_norm"] == 0.62
    assert rows.loc["AffectNet paper: SVM", "test/accuracy"] == 0.60
    assert rows.loc["AffectNet paper: AlexNet CNN, valence/arousal regression", "test/rmse_valence"] == 0.37
    assert rows["test/ccc_valence"].isna().all() and pd.isna(rows.loc["AffectNet paper: SVM", "test/rmse_valence"])
    # rows that publish none of the metrics are left out
    assert list(baseline_rows(["test/rmse_arousal"]).index) == [
        "AffectNet paper: AlexNet CNN, valence/arousal regression"
    ]
