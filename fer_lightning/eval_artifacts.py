"""The figures and tables of one evaluated split: what a training run's test stage and fer-eval both write."""

from __future__ import annotations

import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pytorch_lightning as pl

from fer_lightning.baselines import baseline_for, baseline_rows, comparison_table, format_table, to_markdown
from fer_lightning.bias import bias_summary, bias_table
from fer_lightning.metrics import AGGREGATE_KEYS, VA_DIMENSIONS, confusion_matrix
from fer_lightning.plots import plot_confusion_matrix, plot_per_class_recall, plot_roc_pr, plot_va

log = logging.getLogger(__name__)

BASELINE_NOTE = (
    "AffectNet paper baselines (AlexNet, 8 classes, AffectNet's validation set); on other data (e.g. the synthetic "
    "set) the comparison shows the scale, not a like-for-like result"
)
# the paper's metrics first, in the paper's order; `_norm` = skew-normalized
_TABLE_METRICS = ("accuracy", "f1_macro", "kappa", "alpha", "auc", "aucpr")


@dataclass
class StageSamples:
    """Deduplicated per-sample outputs of one evaluated split; `index` is the row in that split's records."""

    probs: np.ndarray
    target: np.ndarray
    index: np.ndarray
    va_pred: np.ndarray | None = None
    va_target: np.ndarray | None = None
    va_index: np.ndarray | None = None

    @property
    def has_va(self) -> bool:
        """Whether any sample carries a valence or arousal target."""
        return self.va_target is not None and bool(np.isfinite(self.va_target).any())


class SampleCollector(pl.Callback):
    """Keeps each eval stage's per-sample outputs; runs before the module's own epoch-end hook resets its metrics."""

    def __init__(self) -> None:
        self.samples: dict[str, StageSamples] = {}

    def _collect(self, pl_module: pl.LightningModule, stage: str) -> None:
        # samples() gathers from every device (a collective call, so every rank runs it)
        probs, target, index = pl_module.metrics[stage].samples(with_index=True)
        out = StageSamples(probs=probs, target=target, index=index)
        va = getattr(pl_module, "va_metrics", None)
        if va is not None:
            out.va_pred, out.va_target, out.va_index = va[stage].samples()
        self.samples[stage] = out

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._collect(pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._collect(pl_module, "test")


@dataclass
class EvalReport:
    """What `write_eval_artifacts` wrote and the text to print."""

    paths: list[Path] = field(default_factory=list)
    summary: str = ""
    bias: pd.DataFrame | None = None


def metric_table(metrics: Mapping[str, float], stage: str) -> pd.DataFrame:
    """Aggregate expression metrics as rows with an orig and a norm column."""
    rows = {
        k: (metrics.get(f"{stage}/{k}", math.nan), metrics.get(f"{stage}/{k}_norm", math.nan)) for k in AGGREGATE_KEYS
    }
    table = pd.DataFrame.from_dict(rows, orient="index", columns=["orig", "norm"], dtype=float)
    table.index.name = "metric"
    return table


def va_table(metrics: Mapping[str, float], stage: str) -> pd.DataFrame:
    """RMSE, CORR, SAGR, CCC as rows, valence and arousal as columns."""
    names = ("rmse", "corr", "sagr", "ccc")
    rows = {n: [metrics.get(f"{stage}/{n}_{d}", math.nan) for d in VA_DIMENSIONS] for n in names}
    table = pd.DataFrame.from_dict(rows, orient="index", columns=list(VA_DIMENSIONS), dtype=float)
    table.index.name = "metric"
    return table


def baseline_table(metrics: Mapping[str, float], stage: str, label: str) -> pd.DataFrame:
    """This run as the first row above every published AffectNet baseline row, in the paper's metrics."""
    keys = [f"{stage}/{k}" for k in _TABLE_METRICS] + [f"{stage}/{k}_norm" for k in _TABLE_METRICS]
    keys += [f"{stage}/rmse_{d}" for d in VA_DIMENSIONS]
    run = pd.DataFrame([[float(metrics.get(k, math.nan)) for k in keys]], index=[label], columns=keys)
    table = pd.concat([run, baseline_rows(keys)])
    table.columns = [k.split("/", 1)[1] for k in keys]
    table.index.name = "row"
    return table


def split_records(records: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split in the order its data set serves them (sample index = row position)."""
    return records[(records["split"] == split).to_numpy()].reset_index(drop=True)


def predictions_frame(samples: StageSamples, class_names: Sequence[str], records: pd.DataFrame | None) -> pd.DataFrame:
    """One row per evaluated image: path, true and predicted class, class probabilities, valence/arousal."""
    frame = pd.DataFrame({"index": samples.index})
    frame["true"] = [class_names[t] for t in samples.target]
    frame["predicted"] = [class_names[p] for p in samples.probs.argmax(axis=1)] if len(samples.probs) else []
    for c, name in enumerate(class_names):
        frame[f"prob_{name}"] = samples.probs[:, c]
    if samples.va_index is not None and len(samples.va_index):
        va = pd.DataFrame({"index": samples.va_index})
        for j, dim in enumerate(VA_DIMENSIONS):
            va[f"{dim}_true"], va[f"{dim}_pred"] = samples.va_target[:, j], samples.va_pred[:, j]
        frame = frame.merge(va, on="index", how="outer")  # rows with only one kind of label keep the other empty
    frame = frame.sort_values("index").reset_index(drop=True)
    if records is not None:
        frame.insert(1, "path", records["path"].astype(str).to_numpy()[frame["index"].to_numpy()])
    return frame


def _html_page(title: str, sections: list[tuple[str, pd.DataFrame]]) -> str:
    body = "\n".join(
        f"<h2>{html.escape(heading)}</h2>\n{table.to_html(float_format=lambda v: f'{v:.3f}', na_rep='')}"
        for heading, table in sections
    )
    return (
        f"<!doctype html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif} table{border-collapse:collapse} td,th{padding:2px 8px;"
        "border:1px solid #ccc;text-align:right}</style></head>\n"
        f"<body><h1>{html.escape(title)}</h1>\n<p>{html.escape(BASELINE_NOTE)}</p>\n{body}\n</body></html>\n"
    )


def write_eval_artifacts(
    samples: StageSamples,
    metrics: Mapping[str, float],
    *,
    class_names: Sequence[str],
    folder: Path,
    stage: str = "test",
    records: pd.DataFrame | None = None,
    sampling: str = "none",
    loss: str = "ce",
    title: str = "",
    va: bool | None = None,
) -> EvalReport:
    """Write the figure and table set of one evaluated split into `folder` and return the paths and summary.

    `metrics` are the logged values (`<stage>/<name>`); `records` are the split's rows in sample-index order
    (for paths and `group_*` columns); `va=None` draws valence/arousal when the samples carry VA targets.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = list(class_names)
    title = title or stage
    report = EvalReport()
    if records is not None and len(samples.index) and samples.index.max() >= len(records):
        raise ValueError(f"sample index {samples.index.max()} is outside the {len(records)} {stage} records")

    values = {k: float(v) for k, v in metrics.items() if k.startswith(f"{stage}/")}
    (folder / f"metrics_{stage}.json").write_text(json.dumps(values, indent=2, sort_keys=True, allow_nan=True))
    report.paths.append(folder / f"metrics_{stage}.json")

    show_va = samples.has_va if va is None else va
    sections: list[tuple[str, pd.DataFrame]] = []
    lines = [f"{stage} metrics of {title} ({len(samples.target)} labelled images):"]
    table = metric_table(values, stage)
    sections.append((f"{stage} expression metrics (norm = skew-normalized)", table))
    lines.append(format_table(table))
    if show_va:
        table = va_table(values, stage)
        sections.append((f"{stage} valence/arousal", table))
        lines += ["valence/arousal:", format_table(table)]

    if len(samples.target):
        cm = confusion_matrix(samples.probs, samples.target, len(names))
        report.paths.append(
            plot_confusion_matrix(cm, names, folder / f"confusion_matrix_{stage}.png", title=f"{stage}: {title}")
        )
        support = cm.sum(axis=1)
        recall = np.divide(np.diag(cm), support, out=np.full(len(names), np.nan), where=support > 0)
        report.paths.append(
            plot_per_class_recall(
                recall,
                names,
                folder / f"per_class_recall_{stage}.png",
                support=support,
                title=f"{stage} per-class recall: {title}",
            )  # fmt: skip
        )
        report.paths.append(plot_roc_pr(samples.probs, samples.target, names, folder / f"roc_pr_{stage}.png",
                                        title=f"{stage}: {title}"))  # fmt: skip
    else:
        lines.append(f"no labelled {stage} images: no confusion matrix, recall or ROC/PR figures")
    if show_va and samples.va_pred is not None and len(samples.va_pred):
        report.paths.append(plot_va(samples.va_pred, samples.va_target, folder / f"va_{stage}.png",
                                    title=f"{stage}: {title}"))  # fmt: skip

    report.paths += _baseline_files(values, stage, title, sampling, loss, sections, lines, folder)

    if records is not None:
        frame = predictions_frame(samples, names, records)
        frame.to_csv(folder / f"predictions_{stage}.csv", index=False)
        report.paths.append(folder / f"predictions_{stage}.csv")
        report.bias = bias_table(samples.probs, samples.target, records.iloc[samples.index])
        if report.bias is not None:
            report.bias.to_csv(folder / f"bias_{stage}.csv", index=False)
            (folder / f"bias_{stage}.md").write_text(to_markdown(report.bias.set_index("attribute")) + "\n")
            report.paths += [folder / f"bias_{stage}.csv", folder / f"bias_{stage}.md"]
            sections.append((f"{stage} bias analysis per group", report.bias.set_index("attribute")))
            lines.append(bias_summary(report.bias))

    html_path = folder / "baseline_comparison.html"
    html_path.write_text(_html_page(f"{stage}: {title}", sections))
    report.paths.append(html_path)
    report.summary = "\n".join(lines)
    return report


def _baseline_files(
    values: dict[str, float], stage: str, title: str, sampling: str, loss: str,
    sections: list[tuple[str, pd.DataFrame]], lines: list[str], folder: Path,
) -> list[Path]:  # fmt: skip
    """baseline_comparison.md: the matching paper column with deltas, then this run above every baseline row."""
    md = [f"# {stage}: {title}", "", BASELINE_NOTE, ""]
    try:
        column = baseline_for(sampling, loss)
    except ValueError as err:
        column = None
        note = f"no matching AffectNet baseline column ({err}); every baseline row is listed below"
        md += [note, ""]
        lines.append(note)
    if column is not None:
        table = comparison_table(values, sampling=sampling, loss=loss, prefix=f"{stage}/")
        heading = f"{stage} beside the matching AffectNet baseline ({column}: sampling={sampling}, loss={loss})"
        md += [f"## {heading}", "", to_markdown(table), ""]
        sections.append((heading, table))
        lines += [f"{stage} metrics beside the AffectNet paper's baseline ({BASELINE_NOTE}):", format_table(table)]
    wide = baseline_table(values, stage, "this run")
    md += ["## Beside every AffectNet baseline row", "", to_markdown(wide), ""]
    sections.append(("beside every AffectNet baseline row", wide))
    path = folder / "baseline_comparison.md"
    path.write_text("\n".join(md))
    return [path]
