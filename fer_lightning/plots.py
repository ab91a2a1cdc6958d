"""PNG figures: confusion matrix, per-class recall, ROC/PR curves, valence/arousal, leaderboard, heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def plot_confusion_matrix(cm: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """Row-normalized confusion matrix (recall on the diagonal) with the counts in each cell."""
    cm = np.asarray(cm, dtype=float)
    norm = cm / np.clip(cm.sum(axis=1, keepdims=True), 1, None)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * k, 0.8 + 0.7 * k))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{norm[i, j]:.2f}\n{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if norm[i, j] > 0.5 else "black")  # fmt: skip
    ax.set_title(title or "confusion matrix (row-normalized)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _save(fig: plt.Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_per_class_recall(
    recall: Sequence[float], class_names: Sequence[str], path: Path, support: Sequence[int] | None = None,
    title: str = "",
) -> Path:  # fmt: skip
    """Recall of each class as bars (NaN, a class absent from the data, drawn as an empty slot), support below."""
    recall = np.asarray(recall, dtype=float)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.5 + 0.7 * k, 3.6))
    ax.bar(range(k), np.nan_to_num(recall, nan=0.0), color="tab:blue")
    labels = [f"{n}\n(n={int(s)})" for n, s in zip(class_names, support)] if support is not None else list(class_names)
    ax.set_xticks(range(k), labels, rotation=45 if k > 6 else 0, ha="right" if k > 6 else "center", fontsize=8)
    for i, r in enumerate(recall):
        ax.text(i, 0.01 if np.isnan(r) else r + 0.01, "n/a" if np.isnan(r) else f"{r:.2f}", ha="center", fontsize=7)
    ax.axhline(np.nanmean(recall) if np.isfinite(recall).any() else 0.0, color="gray", ls="--", lw=1,
               label="mean (balanced accuracy)")  # fmt: skip
    ax.set_ylim(0, 1.08)
    ax.set_ylabel("recall")
    ax.legend(loc="upper right", fontsize=7)
    ax.set_title(title or "per-class recall")
    return _save(fig, path)


def plot_roc_pr(probs: np.ndarray, target: np.ndarray, class_names: Sequence[str], path: Path, title: str = "") -> Path:
    """One-vs-rest ROC and precision-recall curves per class (classes absent from `target` are left out)."""
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    probs, target = np.asarray(probs, dtype=float), np.asarray(target)
    fig, (ax_roc, ax_pr) = plt.subplots(1, 2, figsize=(11, 4.6))
    colors = plt.get_cmap("tab10" if len(class_names) <= 10 else "tab20")
    for c, name in enumerate(class_names):
        positive = target == c
        if not positive.any() or positive.all():
            continue  # no positives or no negatives: the curve is undefined
        fpr, tpr, _ = roc_curve(positive, probs[:, c])
        precision, recall, _ = precision_recall_curve(positive, probs[:, c])
        ax_roc.plot(fpr, tpr, color=colors(c), lw=1.2, label=f"{name} ({auc(fpr, tpr):.2f})")
        ax_pr.plot(recall, precision, color=colors(c), lw=1.2, label=f"{name} (prior {positive.mean():.2f})")
    ax_roc.plot([0, 1], [0, 1], color="gray", ls=":", lw=1)
    ax_roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one vs rest), AUC in legend",
               xlim=(0, 1), ylim=(0, 1.01))  # fmt: skip
    ax_pr.set(xlabel="recall", ylabel="precision", title="precision-recall (one vs rest)", xlim=(0, 1), ylim=(0, 1.01))
    for ax in (ax_roc, ax_pr):
        ax.legend(fontsize=7, loc="lower right" if ax is ax_roc else "upper right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_va(pred: np.ndarray, target: np.ndarray, path: Path, title: str = "") -> Path:
    """Predicted vs true valence and arousal: a 2-D histogram (a scatter for small sets) with the identity line."""
    from fer_lightning.metrics import VA_DIMENSIONS, va_metrics

    pred, target = np.asarray(pred, dtype=float), np.asarray(target, dtype=float)
    stats = va_metrics(pred, target)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    for j, (ax, dim) in enumerate(zip(axes, VA_DIMENSIONS)):
        labelled = ~np.isnan(target[:, j])
        t, p = target[labelled, j], pred[labelled, j]
        if len(t) > 2000:
            _, _, _, im = ax.hist2d(t, p, bins=40, range=[[-1, 1], [-1, 1]], cmap="viridis", cmin=1)
            fig.colorbar(im, ax=ax, fraction=0.046, label="images")
        else:
            ax.scatter(t, p, s=8, alpha=0.5, color="tab:blue", edgecolors="none")
        ax.plot([-1, 1], [-1, 1], color="gray", ls="--", lw=1)
        ax.set(xlim=(-1.05, 1.05), ylim=(-1.05, 1.05), xlabel=f"true {dim}", ylabel=f"predicted {dim}", aspect="equal")
        ax.set_title(f"{dim}: n={len(t)}  CCC {stats[f'ccc_{dim}']:.3f}  RMSE {stats[f'rmse_{dim}']:.3f}", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_leaderboard(
    labels: Sequence[str], values: Sequence[float], path: Path, *, errors: Sequence[float] | None = None,
    baseline: Sequence[bool] | None = None, metric: str = "", title: str = "",
) -> Path:  # fmt: skip
    """Horizontal bars of one metric per row (best first as given), with std error bars; baseline rows in gray."""
    values = np.asarray(values, dtype=float)
    n = len(labels)
    is_base = np.zeros(n, dtype=bool) if baseline is None else np.asarray(baseline, dtype=bool)
    err = None if errors is None else np.nan_to_num(np.asarray(errors, dtype=float), nan=0.0)
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.32 * n))
    y = np.arange(n)[::-1]  # first row on top
    colors = np.where(is_base, "lightgray", "tab:blue")
    ax.barh(y, np.nan_to_num(values, nan=0.0), xerr=err, color=colors, edgecolor="black", lw=0.4, capsize=2)
    ax.set_yticks(y, labels, fontsize=7)
    for yi, v in zip(y, values):
        ax.text(0 if np.isnan(v) else v, yi, " n/a" if np.isnan(v) else f" {v:.3f}", va="center", fontsize=7)
    ax.set_xlabel(metric)
    ax.set_title(title or f"leaderboard: {metric} (gray: AffectNet paper baselines)", fontsize=10)
    return _save(fig, path)


def plot_heatmap(
    values: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str], path: Path, *, row_name: str = "",
    col_name: str = "", title: str = "", annotations: np.ndarray | None = None,
) -> Path:  # fmt: skip
    """A table of numbers as a colored grid (NaN blank), each cell annotated with its value or `annotations`."""
    values = np.asarray(values, dtype=float)
    r, c = values.shape
    fig, ax = plt.subplots(figsize=(2.0 + 1.3 * c, 1.4 + 0.6 * r))
    im = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_xticks(range(c), col_labels, rotation=30 if c > 4 else 0, ha="right" if c > 4 else "center")
    ax.set_yticks(range(r), row_labels)
    ax.set_xlabel(col_name)
    ax.set_ylabel(row_name)
    finite = values[np.isfinite(values)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(r):
        for j in range(c):
            if np.isfinite(values[i, j]):
                text = str(annotations[i, j]) if annotations is not None else f"{values[i, j]:.3f}"
                ax.text(j, i, text, ha="center", va="center", fontsize=8,
                        color="black" if values[i, j] > middle else "white")  # fmt: skip
    fig.colorbar(im, ax=ax, fraction=0.046)
    ax.set_title(title)
    return _save(fig, path)
