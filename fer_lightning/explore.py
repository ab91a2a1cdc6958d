"""explore(cfg): the data-exploration report of one data config (HTML + PNGs), logged to MLflow as an explore run.

The analyses follow the AffectNet data-exploration notebook: sanity summary, class counts per split, valence and
arousal statistics and histograms, the 2D histogram on the unit circle, per-class conditional heatmaps, image
sizes and modes, and KL divergences between splits; for AffectNet, class counts against the paper's.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import DictConfig, OmegaConf

from fer_lightning import explore_figures as figs
from fer_lightning import explore_html as h
from fer_lightning import explore_stats as st
from fer_lightning import tracking
from fer_lightning.data.datamodule import FERDataModule
from fer_lightning.errors import ConfigError

log = logging.getLogger(__name__)

AFFECTNET_FORMATS = ("affectnet", "affectnet_npy")
REPORT_NAME = "report.html"


@dataclass(frozen=True)
class ExploreOptions:
    """The `explore.*` settings; `from_config` rejects bad values naming the key."""

    # images per split whose header is read for the size/mode statistics; None = every image, 0 = none
    image_sample: int | None = 2500
    # bin width of the valence/arousal table and of the binned distribution the KL divergence compares
    va_bin: float = 0.2
    # bins per axis of the 2D valence/arousal heatmaps
    heatmap_bins: int = 40
    # additive smoothing of both distributions before the KL divergence (see explore_stats.smoothed)
    kl_epsilon: float = 1e-6
    # figures as data URIs inside the HTML (one file that opens anywhere) or as relative links to figures/
    embed_figures: bool = True
    # AffectNet paper comparison: auto (for AffectNet formats), true or false
    paper_counts: str = "auto"
    # issues listed in the sanity summary (all of them are in the data/ artifacts)
    max_issues: int = 50

    @classmethod
    def from_config(cls, cfg: Any) -> ExploreOptions:
        values = dict(OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else (cfg or {}))
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"explore: unknown keys {unknown}; known: {sorted(cls.__dataclass_fields__)}")
        opts = cls(**values)
        sample = opts.image_sample
        _require(sample is None or (isinstance(sample, int) and sample >= 0), "explore.image_sample", sample,
                 "an integer >= 0 (0 skips the image statistics) or null (every image)")  # fmt: skip
        try:
            st.bin_edges(float(opts.va_bin))
        except ValueError:
            _require(
                False,
                "explore.va_bin",
                opts.va_bin,
                "a width that divides [-1, 1] into equal bins (0.1, 0.2, 0.25, ...)",
            )
        _require(int(opts.heatmap_bins) >= 2, "explore.heatmap_bins", opts.heatmap_bins, "an integer >= 2")
        _require(0 < float(opts.kl_epsilon) < 0.01, "explore.kl_epsilon", opts.kl_epsilon, "a number in (0, 0.01)")
        _require(str(opts.paper_counts).lower() in ("auto", "true", "false"), "explore.paper_counts",
                 opts.paper_counts, "auto | true | false")  # fmt: skip
        _require(int(opts.max_issues) >= 0, "explore.max_issues", opts.max_issues, "an integer >= 0")
        return opts


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: allowed {allowed}")


def kl_smoothing_text(epsilon: float) -> str:
    """The smoothing statement printed beside every KL divergence."""
    return (
        f"KL divergence D(P || Q) = sum_i p_i ln(p_i / q_i), in nats (natural logarithm). Both histograms are "
        f"smoothed additively before the sum: p_i = (n_i / N + eps) / (1 + K eps) with eps = {epsilon:g} and K the "
        "number of bins (classes, or valence x arousal bins), so that a bin empty in Q gives a large but finite "
        "term. The class distribution counts labelled rows of data.classes; the VA distribution counts rows with "
        "valence and arousal inside [-1, 1]."
    )


def data_choice(cfg: DictConfig) -> str:
    """The data config's name (the option chosen in the data group when Hydra composed the config)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("data")
        if choice:
            return str(choice)
    return str(cfg.data.get("name") or cfg.data.format)


def explore(cfg: DictConfig) -> dict[str, Any]:
    """Read and check the data as training would, write the report, log it as an MLflow run tagged run_type=explore."""
    opts = ExploreOptions.from_config(cfg.get("explore"))
    name = data_choice(cfg)
    out_dir = Path(cfg.paths.output_dir)
    root_dir = Path(cfg.paths.root_dir)
    tags = {"run_type": "explore", "data": name, "group.data": name, "git_commit": tracking.git_commit(root_dir)}
    tags.update({str(k): str(v) for k, v in (cfg.get("tags") or {}).items()})
    logger = tracking.make_logger(cfg.logger, run_name=cfg.get("run_name") or f"explore-{name}", tags=tags)
    try:
        if logger is not None:
            params = {**tracking.flatten(cfg.data, prefix="data."), **tracking.flatten(asdict(opts), prefix="explore.")}
            tracking.log_params(logger, {**params, "seed": cfg.seed})
        dm = FERDataModule(cfg.data, seed=int(cfg.seed), cache_dir=cfg.paths.cache_dir)
        dm.records = dm.load_records()
        summary = write_report(dm, opts, out_dir / "explore", title=f"Data exploration: {name}", data_name=name)
        data_files = dm.write_artifacts(out_dir / "data")
        if logger is not None:
            from fer_lightning.train import data_fingerprint

            tracking.set_tags(logger, {"data_fingerprint": data_fingerprint(dm), "data_root": dm.root})
            logger.experiment.log_artifacts(logger.run_id, str(out_dir / "explore"), "explore")
            for path in data_files:
                tracking.log_artifact(logger, path, "data")
            _log_metrics(logger, summary)
            summary["run_id"] = logger.run_id
    except BaseException:
        tracking.end_run(logger, "FAILED")
        raise
    tracking.end_run(logger, "FINISHED")
    print(f"data-exploration report: {summary['report']}", file=sys.stdout, flush=True)
    if logger is not None:
        print(f"MLflow run {logger.run_id} (run_type=explore) in experiment '{cfg.logger.experiment_name}' at "
              f"{cfg.logger.tracking_uri}", file=sys.stdout, flush=True)  # fmt: skip
    return summary


def _log_metrics(logger: Any, summary: dict[str, Any]) -> None:
    from mlflow.entities import Metric

    values = {f"explore/rows_{s}": n for s, n in summary["rows"].items()}
    values.update({f"explore/imbalance_ratio_{s}": r for s, r in summary["imbalance_ratio"].items()})
    for row in summary["kl"]:
        values[f"explore/kl_class_{row['P']}_{row['Q']}"] = row["kl_class"]
        values[f"explore/kl_va_{row['P']}_{row['Q']}"] = row["kl_va"]
    # MLflow refuses non-numbers; inf/NaN stay in the report and explore_summary.json
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, 0) for k, v in values.items() if v is not None and math.isfinite(float(v))]
    logger.experiment.log_batch(logger.run_id, metrics=metrics)


def write_report(
    dm: FERDataModule, opts: ExploreOptions, report_dir: Path, *, title: str, data_name: str
) -> dict[str, Any]:
    """Write report.html, figures/*.png and explore_summary.json for the data module's checked records."""
    records = dm.records
    report_dir.mkdir(parents=True, exist_ok=True)
    fig_dir = report_dir / "figures"
    builder = _Report(report_dir, fig_dir, opts.embed_figures)
    summary: dict[str, Any] = {"data": data_name, "format": dm.cfg["format"], "root": str(dm.root)}
    summary["rows"] = {s: int((records["split"] == s).sum()) for s in st.present_splits(records)}

    builder.section("overview", "Overview", _overview(dm, data_name, summary["rows"]))
    builder.section("sanity", "Sanity summary", _sanity(dm, opts))
    counts = st.class_counts(records, dm.class_ids, dm.class_names)
    shares = st.normalize_counts(counts)
    ratio = st.imbalance_ratio(counts)
    summary.update(class_counts=_nested(counts), class_shares=_nested(shares), imbalance_ratio=_flat(ratio))
    builder.section("classes", "Classes per split", _classes(builder, records, counts, shares, ratio))
    if _paper_counts_wanted(opts, dm):
        table = st.paper_count_comparison(records)
        summary["paper_comparison"] = _nested(table.T)
        builder.section("paper", "Class counts against the AffectNet paper", _paper(builder, dm, table))
    va_summary = _va_sections(builder, records, dm, opts)
    summary["va_statistics"] = va_summary
    divergences = st.split_divergences(records, dm.class_ids, va_width=opts.va_bin, epsilon=opts.kl_epsilon)
    summary["kl"] = [{k: _scalar(v) for k, v in row.items()} for row in divergences.to_dict("records")]
    summary["kl_smoothing"] = kl_smoothing_text(opts.kl_epsilon)
    builder.section("divergence", "KL divergence between splits", _divergence(divergences, opts))
    builder.section("images", "Image sizes and modes", _images(builder, dm, opts, summary))

    report = report_dir / REPORT_NAME
    report.write_text(h.page(title, builder.sections), encoding="utf-8")
    summary["report"] = str(report)
    summary["figures"] = [str(p) for p in builder.figures]
    (report_dir / "explore_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    log.info("wrote the data-exploration report %s (%d figures)", report, len(builder.figures))
    return summary


class _Report:
    """Collects the sections and the figures of one report."""

    def __init__(self, report_dir: Path, fig_dir: Path, embed: bool):
        self.report_dir, self.fig_dir, self.embed = report_dir, fig_dir, embed
        self.sections: list[tuple[str, str, str]] = []
        self.figures: list[Path] = []

    def section(self, anchor: str, heading: str, body: str) -> None:
        self.sections.append((anchor, heading, body))

    def figure(self, path: Path, alt: str) -> str:
        self.figures.append(path)
        return h.figure(path, self.report_dir, alt, self.embed)


# ------------------------------------------------------------------ sections
def _overview(dm: FERDataModule, data_name: str, rows: dict[str, int]) -> str:
    facts = pd.DataFrame(
        {
            "value": [
                data_name, dm.cfg["format"], str(dm.root), ", ".join(f"{s}: {n}" for s, n in rows.items()),
                ", ".join(dm.class_names), str(dm.cfg.get("checks", "error")), str(dm.seed),
                datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            ]
        },
        index=pd.Index(["data config", "format", "root", "rows per split", "classes (data.classes)",
                        "checks policy (data.checks)", "seed", "generated"], name="item"),
    )  # fmt: skip
    text = (
        "The records are read, filtered to data.classes, split and checked exactly as a training run with the same "
        "data config and seed does, so the numbers below describe what training sees."
    )
    return h.paragraph(text) + h.table(facts, "overview")


def _sanity(dm: FERDataModule, opts: ExploreOptions) -> str:
    records = dm.records
    parts = []
    if dm.check_report is not None:
        rep = dm.check_report
        parts.append(h.paragraph(
            f"The checks (data.checks={dm.cfg.get('checks', 'error')}, data.checks_decode="
            f"{dm.cfg.get('checks_decode', 'header')}) looked at {rep.n_rows_in} rows and kept {rep.n_rows_out}."
        ))  # fmt: skip
        parts.append(h.pre(rep.to_text(max_rows=opts.max_issues)))
        if rep.counts:
            per_check = pd.DataFrame({"rows": pd.Series(rep.counts, dtype=int)})
            per_check.index.name = "check"
            parts.append(h.table(per_check, "check_counts", "problems per check"))
    columns = pd.DataFrame(
        {
            "dtype": [str(records[c].dtype) for c in records.columns],
            "non-null": [int(records[c].notna().sum()) for c in records.columns],
            "null": [int(records[c].isna().sum()) for c in records.columns],
        },
        index=pd.Index(list(records.columns), name="column"),
    )
    parts.append(h.table(columns, "columns", "columns, dtypes and nulls (landmarks/box/VA are null when absent)"))
    if dm.label_mapping:
        mapping = pd.DataFrame({"canonical class": pd.Series(dm.label_mapping, dtype=str)})
        mapping.index.name = "label in the data"
        parts.append(h.table(mapping, "label_mapping", "label mapping used (data-set label -> canonical class)"))
    if dm.metadata_issues:
        issues = pd.DataFrame(dm.metadata_issues[: opts.max_issues], columns=["path", "reason"])
        parts.append(h.paragraph(f"The reader reported {len(dm.metadata_issues)} metadata issues "
                                 f"(all in data/metadata_issues.csv):"))  # fmt: skip
        parts.append(h.table(issues, "metadata_issues", index=False))
    if dm.leaks is not None and len(dm.leaks):
        kinds = dm.leaks["kind"].value_counts().rename("pairs").to_frame()
        parts.append(h.paragraph(f"The leakage check found {len(dm.leaks)} image pairs shared between splits "
                                 "(all in data/leakage.csv):"))  # fmt: skip
        parts.append(h.table(kinds, "leakage_kinds"))
        parts.append(h.table(dm.leaks.head(opts.max_issues), "leakage", index=False))
    elif dm.leaks is not None:
        parts.append(h.paragraph("The leakage check found no image shared between splits."))
    return "".join(parts)


def _classes(builder: _Report, records: pd.DataFrame, counts: pd.DataFrame, shares: pd.DataFrame,
             ratio: pd.Series) -> str:  # fmt: skip
    unlabeled = int(records["expression"].isna().sum())
    parts = [
        h.paragraph("Counts of data.classes per split (absolute), their shares of the split (normalized), and the "
                    "imbalance ratio: the largest class count over the smallest (inf when a class has no rows)."),
        h.table(counts, "class_counts", "images per class and split"),
        h.table(shares, "class_shares", "share of each class within its split"),
        h.table(ratio.to_frame().T.rename(index={"imbalance_ratio": "max / min"}), "imbalance_ratio",
                "imbalance ratio (max class count / min class count)"),
    ]  # fmt: skip
    if unlabeled:
        parts.append(h.paragraph(f"{unlabeled} rows have no label (kept by data.checks=warn) and are not counted.",
                                 note=True))  # fmt: skip
    if counts.to_numpy().sum():
        path = figs.class_bars(counts, shares, builder.fig_dir / "class_counts.png")
        parts.append(builder.figure(path, "images per class and split, absolute and normalized"))
    return "".join(parts)


def _paper_counts_wanted(opts: ExploreOptions, dm: FERDataModule) -> bool:
    setting = str(opts.paper_counts).lower()
    return setting == "true" or (setting == "auto" and dm.cfg["format"] in AFFECTNET_FORMATS)


def _paper(builder: _Report, dm: FERDataModule, table: pd.DataFrame) -> str:
    outside = [n for n in table.index if n not in dm.class_names]
    text = ("Manually annotated images per category in the AffectNet paper (Mollahosseini et al., 2017) against "
            "this data (all splits together). Missing share = (paper - this) / paper.")  # fmt: skip
    parts = [h.paragraph(text), h.table(table, "paper_counts", "AffectNet paper vs this data")]
    if outside:
        parts.append(h.paragraph(f"Classes outside data.classes are counted as 0 here: {', '.join(outside)}.",
                                 note=True))  # fmt: skip
    if dm.cfg.get("synthetic") and dm.cfg.get("root") in (None, ""):
        parts.append(h.paragraph("This is the built-in synthetic data in AffectNet's layout, not AffectNet: the "
                                 "comparison shows the scale only.", note=True))  # fmt: skip
    path = figs.paper_comparison_bars(table, builder.fig_dir / "paper_counts.png")
    parts.append(builder.figure(path, "class counts against the AffectNet paper"))
    return "".join(parts)


def _va_sections(builder: _Report, records: pd.DataFrame, dm: FERDataModule, opts: ExploreOptions) -> list[dict]:
    """Valence/arousal statistics, histograms, heatmaps and the bin tables (one section each)."""
    valid = st.va_valid(records)
    if not valid.any():
        builder.section(
            "va",
            "Valence and arousal",
            h.paragraph("This data set has no valence/arousal annotations: the VA analyses are skipped."),
        )
        return []
    split = records["split"].astype(object).to_numpy()
    splits = st.present_splits(records)
    stats = st.va_statistics(records)
    excluded = st.va_excluded(records)
    parts = [
        h.paragraph("Statistics of the rows with valence and arousal inside [-1, 1]; quartiles by linear "
                    "interpolation."),
        h.table(stats.reset_index(), "va_statistics", "valence/arousal statistics per split", index=False),
    ]  # fmt: skip
    if excluded.sum():
        parts.append(h.paragraph("Rows left out (missing values, the -2 non-face marker, or outside [-1, 1]): "
                                 + ", ".join(f"{s}: {n}" for s, n in excluded.items()), note=True))  # fmt: skip
    va = {s: records.loc[valid & (split == s), ["valence", "arousal"]] for s in splits}
    parts.append(builder.figure(figs.va_histograms(va, builder.fig_dir / "va_histograms.png"),
                                "valence and arousal histograms per split"))  # fmt: skip
    builder.section("va", "Valence and arousal", "".join(parts))

    fine = np.linspace(-1, 1, int(opts.heatmap_bins) + 1)

    def hist(mask: np.ndarray) -> np.ndarray:
        return st.va_histogram2d(records["valence"].to_numpy()[mask], records["arousal"].to_numpy()[mask], fine)

    all_counts = hist(valid)
    parts = [
        h.paragraph(f"2D histogram of valence (x) and arousal (y), {opts.heatmap_bins} x {opts.heatmap_bins} bins "
                    "over [-1, 1], with the unit circle; linear and log colour scale (empty bins white in log)."),
        builder.figure(figs.va_heatmap_linear_log(all_counts, builder.fig_dir / "va_heatmap.png", "all splits"),
                       "valence/arousal 2D histogram, linear and log scale"),
    ]  # fmt: skip
    per_split = {s: hist(valid & (split == s)) for s in splits}
    if len(per_split) > 1:
        parts.append(builder.figure(
            figs.va_heatmap_grid(per_split, builder.fig_dir / "va_heatmap_splits.png", "per split (log scale)"),
            "valence/arousal 2D histogram per split"))  # fmt: skip
        for other in splits[1:]:
            if per_split[splits[0]].sum() and per_split[other].sum():
                path = figs.va_share_difference(
                    per_split[splits[0]],
                    per_split[other],
                    (splits[0], other),
                    builder.fig_dir / f"va_share_difference_{splits[0]}_{other}.png",
                )
                parts.append(builder.figure(path, f"share difference {splits[0]} - {other}"))
    builder.section("va_heatmap", "Valence/arousal on the unit circle", "".join(parts))

    parts = [h.paragraph(f"Images per {opts.va_bin:g} x {opts.va_bin:g} bin (arousal rows from +1 down, valence "
                         "columns from -1); bins are [lo, hi) except the last, which includes +1.")]  # fmt: skip
    parts.append(h.table(st.va_bin_table(records, opts.va_bin), "va_bins_all", "all splits"))
    for s in splits:
        parts.append(h.table(st.va_bin_table(records[split == s], opts.va_bin), f"va_bins_{s}", s))
    builder.section("va_bins", f"Valence/arousal {opts.va_bin:g}-bin tables", "".join(parts))

    expr = records["expression"].to_numpy(dtype=np.float64, na_value=np.nan)
    by_class = {n: hist(valid & (expr == c)) for c, n in zip(dm.class_ids, dm.class_names)}
    if any(c.sum() for c in by_class.values()):
        path = figs.va_heatmap_grid(by_class, builder.fig_dir / "va_heatmap_classes.png",
                                    "valence/arousal per class (all splits, shared log scale)")  # fmt: skip
        body = h.paragraph("Where each class lies on the unit circle: the valence/arousal histogram conditioned on "
                           "the class, all splits together, one shared log colour scale.") + builder.figure(
            path, "valence/arousal heatmap per class")  # fmt: skip
        builder.section("va_classes", "Valence/arousal per class", body)
    return [{k: _scalar(v) for k, v in row.items()} for row in stats.reset_index().to_dict("records")]


def _divergence(table: pd.DataFrame, opts: ExploreOptions) -> str:
    if table.empty:
        return h.paragraph("Only one split has rows: there is nothing to compare.")
    if table["kl_va"].isna().all():  # no valence/arousal in this data set
        table = table.drop(columns=["kl_va", "va_bins_only_in_P"])
    shown = table.rename(columns={"kl_class": "KL classes", "kl_va": f"KL VA ({opts.va_bin:g} bins)",
                                  "class_bins_only_in_P": "classes only in P",
                                  "va_bins_only_in_P": "VA bins only in P"})  # fmt: skip
    return (
        h.paragraph(kl_smoothing_text(opts.kl_epsilon))
        + h.paragraph("KL divergence is not symmetric: D(P || Q) is the expected extra surprise of modelling data "
                      "drawn from P with Q. Both directions are listed; 'only in P' counts the bins P fills and Q "
                      "leaves empty, whose terms the smoothing decides.", note=True)
        + h.table(shown, "kl_divergence", "KL divergence between splits (nats)")
    )  # fmt: skip


def _images(builder: _Report, dm: FERDataModule, opts: ExploreOptions, summary: dict[str, Any]) -> str:
    if opts.image_sample == 0:
        return h.paragraph("Skipped (explore.image_sample=0).")
    props = st.sample_image_properties(dm.records, dm.root, per_split=opts.image_sample, seed=dm.seed)
    n_ok = int(props["error"].isna().sum())
    what = "every image" if opts.image_sample is None else f"up to {opts.image_sample} images per split"
    summary["image_sample"] = {"opened": n_ok, "unreadable": int(len(props) - n_ok)}
    parts = [
        h.paragraph(
            f"Headers of {what} (seeded random sample, {len(props)} images) were read; sizes are of "
            "the image files, before any face crop (explore.image_sample sets the sample size)."
        )
    ]
    if n_ok:
        modes = st.mode_counts(props)
        summary["image_modes"] = _nested(modes)
        parts.append(h.table(modes, "image_modes", "images per PIL mode (L = grayscale, RGB, RGBA, CMYK, I;16, ...)"))
        parts.append(h.table(st.size_counts(props), "image_sizes", "most frequent sizes (width x height)"))
        parts.append(builder.figure(figs.image_size_plots(props, builder.fig_dir / "image_sizes.png"),
                                    "image width, height and aspect ratio"))  # fmt: skip
    bad = props[props["error"].notna()]
    if len(bad):
        parts.append(h.paragraph(f"{len(bad)} sampled files could not be opened:", note=True))
        parts.append(h.table(bad[["split", "path", "error"]].head(opts.max_issues), "image_errors", index=False))
    return "".join(parts)


# ------------------------------------------------------------------- helpers
def _scalar(value: Any) -> Any:
    """JSON-friendly: numpy numbers to Python, inf to 'inf', NaN to None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return value


def _flat(series: pd.Series) -> dict[str, Any]:
    return {str(k): _scalar(v) for k, v in series.items()}


def _nested(table: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """{column: {row: value}}."""
    return {str(c): {str(i): _scalar(v) for i, v in table[c].items()} for c in table.columns}
