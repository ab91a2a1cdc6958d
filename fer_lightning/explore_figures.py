"""PNG figures of the data-exploration report (blue for counts, orange for shares, as in the AffectNet notebook)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import LogNorm, Normalize, TwoSlopeNorm  # noqa: E402

COUNT_COLOR = "tab:blue"
SHARE_COLOR = "tab:orange"
DPI = 100


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _unit_circle(ax: plt.Axes) -> None:
    t = np.linspace(0, 2 * np.pi, 361)
    ax.plot(np.cos(t), np.sin(t), color="0.3", lw=0.8)
    ax.axhline(0, color="0.3", lw=0.6, ls=":")
    ax.axvline(0, color="0.3", lw=0.6, ls=":")
    ax.set_xlim(-1.05, 1.05)
    ax.set_ylim(-1.05, 1.05)
    ax.set_aspect("equal")
    ax.set_xlabel("valence")
    ax.set_ylabel("arousal")


def _heat(ax: plt.Axes, counts: np.ndarray, norm: Normalize, cmap: str = "viridis"):
    """counts[arousal bin, valence bin] over [-1, 1]^2; empty bins stay white in log scale."""
    shown = np.where(counts > 0, counts, np.nan) if isinstance(norm, LogNorm) else counts
    im = ax.imshow(shown, origin="lower", extent=(-1, 1, -1, 1), norm=norm, cmap=cmap, interpolation="nearest")
    _unit_circle(ax)
    return im


def class_bars(counts: pd.DataFrame, shares: pd.DataFrame, path: Path) -> Path:
    """Per split: class counts (blue) and class shares (orange)."""
    splits = list(counts.columns)
    fig, axes = plt.subplots(2, len(splits), figsize=(3.2 * len(splits), 6.0), squeeze=False)
    for j, split in enumerate(splits):
        for i, (table, color, label) in enumerate(((counts, COUNT_COLOR, "images"), (shares, SHARE_COLOR, "share"))):
            ax = axes[i, j]
            ax.bar(range(len(table)), table[split].fillna(0).to_numpy(), color=color)
            ax.set_xticks(range(len(table)), list(table.index), rotation=60, ha="right", fontsize=8)
            ax.set_title(f"{split}: {label}", fontsize=10)
    return _save(fig, path)


def va_histograms(values: Mapping[str, pd.DataFrame], path: Path, bins: int = 40) -> Path:
    """Valence and arousal histograms per split (share of the split per bin, so sizes compare)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    edges = np.linspace(-1, 1, bins + 1)
    for ax, var in zip(axes, ("valence", "arousal")):
        for split, frame in values.items():
            x = frame[var].to_numpy(dtype=np.float64)
            if len(x):
                ax.hist(x, bins=edges, weights=np.full(len(x), 1.0 / len(x)), histtype="step", lw=1.5,
                        label=f"{split} (n={len(x)})")  # fmt: skip
        ax.set_xlabel(var)
        ax.set_ylabel("share of the split")
        ax.legend(fontsize=8)
    return _save(fig, path)


def va_heatmap_linear_log(counts: np.ndarray, path: Path, title: str) -> Path:
    """The 2D valence/arousal histogram on the unit circle, in linear and in log colour scale."""
    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.6))
    vmax = max(int(counts.max()), 1)
    for ax, norm, scale in ((axes[0], Normalize(0, vmax), "linear"), (axes[1], LogNorm(1, max(vmax, 2)), "log")):
        im = _heat(ax, counts, norm)
        ax.set_title(f"{title} ({scale} scale)", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, label="images per bin")
    return _save(fig, path)


def va_heatmap_grid(panels: Mapping[str, np.ndarray], path: Path, title: str, ncols: int = 4) -> Path:
    """One log-scale heatmap per panel (split or class) with a shared colour range."""
    names = list(panels)
    ncols = min(ncols, len(names))
    nrows = math.ceil(len(names) / ncols)
    vmax = max([int(c.max()) for c in panels.values()] + [2])
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.3 * nrows + 0.4), squeeze=False)
    norm = LogNorm(1, vmax)
    im = None
    for k, ax in enumerate(axes.ravel()):
        if k >= len(names):
            ax.axis("off")
            continue
        im = _heat(ax, panels[names[k]], norm)
        ax.set_title(f"{names[k]} (n={int(panels[names[k]].sum())})", fontsize=9)
        if k % ncols:
            ax.set_ylabel("")
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.02, label="images per bin (log)")
    fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def va_share_difference(a: np.ndarray, b: np.ndarray, names: Sequence[str], path: Path) -> Path:
    """Share of split a minus share of split b per bin: blue where a has relatively more, red where b has."""
    diff = a / max(a.sum(), 1) - b / max(b.sum(), 1)
    lim = max(float(np.abs(diff).max()), 1e-9)
    fig, ax = plt.subplots(figsize=(5.4, 4.6))
    im = _heat(ax, diff, TwoSlopeNorm(0.0, -lim, lim), cmap="RdBu")
    ax.set_title(f"share({names[0]}) - share({names[1]}): blue = more {names[0]}, red = more {names[1]}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    return _save(fig, path)


def image_size_plots(props: pd.DataFrame, path: Path) -> Path:
    """Width, height and aspect-ratio histograms of the sampled images, per split."""
    ok = props[props["error"].isna()]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    for split, part in ok.groupby("split", observed=True, sort=False):
        w = part["width"].to_numpy(dtype=np.float64)
        h = part["height"].to_numpy(dtype=np.float64)
        for ax, x in zip(axes, (w, h, w / h)):
            ax.hist(x, bins=30, histtype="step", lw=1.5, label=f"{split} (n={len(x)})", color=None)
    for ax, label in zip(axes, ("width (px)", "height (px)", "aspect ratio (w / h)")):
        ax.set_xlabel(label)
        ax.set_ylabel("images")
        ax.legend(fontsize=8)
    return _save(fig, path)


def paper_comparison_bars(table: pd.DataFrame, path: Path) -> Path:
    """Images per class against the AffectNet paper (blue) and the share missing relative to it (orange)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    x = np.arange(len(table))
    axes[0].bar(x - 0.2, table["paper"], width=0.4, color="0.6", label="paper")
    axes[0].bar(x + 0.2, table["this data"], width=0.4, color=COUNT_COLOR, label="this data")
    axes[0].legend(fontsize=8)
    axes[0].set_ylabel("images")
    axes[1].bar(x, table["missing share"], color=SHARE_COLOR)
    axes[1].set_ylabel("(paper - this) / paper")
    for ax in axes:
        ax.set_xticks(x, list(table.index), rotation=60, ha="right", fontsize=8)
    return _save(fig, path)
