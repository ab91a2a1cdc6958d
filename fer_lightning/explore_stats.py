"""The numbers of the data-exploration report: class counts, valence/arousal statistics, KL divergences, image sizes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fer_lightning.baselines import CLASS_COUNTS
from fer_lightning.data.records import SPLITS
from fer_lightning.taxonomy import CANONICAL

ALL = "all"
VA_COLUMNS = ("valence", "arousal")
STAT_COLUMNS = ("n", "max", "min", "mean", "q1", "median", "q3")


def present_splits(records: pd.DataFrame) -> list[str]:
    """The splits that have rows, in train/val/test order."""
    split = records["split"].astype(object).to_numpy()
    return [s for s in SPLITS if (split == s).any()]


def class_counts(records: pd.DataFrame, class_ids: Sequence[int], class_names: Sequence[str]) -> pd.DataFrame:
    """Rows per class (in data.classes order) and split, plus an 'all' column; rows without a label are not counted."""
    split = records["split"].astype(object).to_numpy()
    expr = records["expression"].to_numpy(dtype=np.float64, na_value=np.nan)
    table = pd.DataFrame(
        {s: [int(((split == s) & (expr == cid)).sum()) for cid in class_ids] for s in present_splits(records)},
        index=pd.Index(list(class_names), name="class"),
    )
    table[ALL] = table.sum(axis=1)
    return table


def normalize_counts(counts: pd.DataFrame) -> pd.DataFrame:
    """Each column divided by its total (the class distribution of the split); NaN for an empty split."""
    totals = counts.sum(axis=0).replace(0, np.nan)
    return counts / totals


def imbalance_ratio(counts: pd.DataFrame) -> pd.Series:
    """Largest over smallest class count per column; inf when a class has no rows, NaN for an empty column."""

    def ratio(col: pd.Series) -> float:
        hi, lo = float(col.max()), float(col.min())
        if hi == 0:
            return math.nan
        return math.inf if lo == 0 else hi / lo

    return pd.Series({c: ratio(counts[c]) for c in counts.columns}, name="imbalance_ratio", dtype=float)


def va_valid(records: pd.DataFrame) -> np.ndarray:
    """Rows whose valence and arousal are both finite and inside [-1, 1] (drops NaN and AffectNet's -2 marker)."""
    va = records[list(VA_COLUMNS)].to_numpy(dtype=np.float64)
    return (np.isfinite(va) & (np.abs(va) <= 1.0)).all(axis=1)


def va_statistics(records: pd.DataFrame) -> pd.DataFrame:
    """Per split (and all) and per variable: n, max, min, mean and the quartiles (linear interpolation)."""
    valid = va_valid(records)
    split = records["split"].astype(object).to_numpy()
    rows, index = [], []
    for name in [*present_splits(records), ALL]:
        mask = valid & (split == name) if name != ALL else valid
        for var in VA_COLUMNS:
            x = records[var].to_numpy(dtype=np.float64)[mask]
            if len(x):
                q1, med, q3 = np.percentile(x, [25, 50, 75])
                rows.append((len(x), x.max(), x.min(), x.mean(), q1, med, q3))
            else:
                rows.append((0, *[math.nan] * 6))
            index.append((name, var))
    table = pd.DataFrame(
        rows, columns=list(STAT_COLUMNS), index=pd.MultiIndex.from_tuples(index, names=["split", "variable"])
    )
    table["n"] = table["n"].astype(int)
    return table


def va_excluded(records: pd.DataFrame) -> pd.Series:
    """Rows per split left out of the valence/arousal analyses (missing, the -2 marker, or outside [-1, 1])."""
    invalid = ~va_valid(records)
    split = records["split"].astype(object).to_numpy()
    return pd.Series({s: int((invalid & (split == s)).sum()) for s in present_splits(records)}, dtype=int)


def bin_edges(width: float) -> np.ndarray:
    """Edges of equal bins over [-1, 1]; `width` must divide 2 (e.g. 0.2 -> 10 bins)."""
    n = round(2.0 / width)
    if width <= 0 or n < 1 or not math.isclose(n * width, 2.0, rel_tol=1e-9):
        raise ValueError(f"explore.va_bin: {width} does not divide [-1, 1] into equal bins; use e.g. 0.1, 0.2, 0.25")
    return np.linspace(-1.0, 1.0, n + 1)


def va_histogram2d(valence: np.ndarray, arousal: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Counts[arousal bin, valence bin] over the given edges; bins are [lo, hi) except the last, [lo, 1.0]."""
    counts, _, _ = np.histogram2d(np.asarray(arousal, dtype=np.float64), np.asarray(valence, dtype=np.float64),
                                  bins=[edges, edges])  # fmt: skip
    return counts.astype(np.int64)


def interval_labels(edges: np.ndarray) -> list[str]:
    """'[lo, hi)' for each bin, '[lo, hi]' for the last one (numpy's histogram convention)."""
    last = len(edges) - 2
    return [f"[{lo:.1f}, {hi:.1f}{']' if i == last else ')'}" for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))]


def va_bin_table(records: pd.DataFrame, width: float) -> pd.DataFrame:
    """The 0.2-bin table: arousal bins as rows from +1 down to -1, valence bins as columns from -1 to +1."""
    valid = va_valid(records)
    edges = bin_edges(width)
    counts = va_histogram2d(records["valence"].to_numpy()[valid], records["arousal"].to_numpy()[valid], edges)
    labels = interval_labels(edges)
    table = pd.DataFrame(counts[::-1], index=labels[::-1], columns=labels)
    table.index.name = "arousal \\ valence"
    return table


def smoothed(counts: np.ndarray, epsilon: float) -> np.ndarray:
    """Additive smoothing of a histogram: p_i = (n_i / N + epsilon) / (1 + K * epsilon), K = number of bins."""
    counts = np.asarray(counts, dtype=np.float64).ravel()
    total = counts.sum()
    if total <= 0:
        raise ValueError("cannot smooth an empty histogram")
    return (counts / total + epsilon) / (1.0 + len(counts) * epsilon)


def kl_divergence(p_counts: np.ndarray, q_counts: np.ndarray, epsilon: float) -> float:
    """D(P || Q) = sum_i p_i ln(p_i / q_i) in nats, both histograms smoothed with `smoothed(., epsilon)`."""
    if epsilon <= 0:
        raise ValueError(f"explore.kl_epsilon must be > 0 (it keeps ln(p/q) finite), got {epsilon}")
    p, q = smoothed(p_counts, epsilon), smoothed(q_counts, epsilon)
    return float(np.sum(p * np.log(p / q)))


def split_divergences(
    records: pd.DataFrame, class_ids: Sequence[int], *, va_width: float, epsilon: float
) -> pd.DataFrame:
    """KL divergence of every ordered pair of splits, for the class distribution and the binned VA distribution.

    Columns: P, Q, kl_class, kl_va, and how many bins P fills while Q has none (where the smoothing decides the
    value). NaN where either split has no labelled (or no valid VA) row.
    """
    splits = present_splits(records)
    split = records["split"].astype(object).to_numpy()
    expr = records["expression"].to_numpy(dtype=np.float64, na_value=np.nan)
    valid = va_valid(records)
    edges = bin_edges(va_width)
    class_hist = {s: np.array([((split == s) & (expr == c)).sum() for c in class_ids]) for s in splits}
    va_hist = {
        s: va_histogram2d(records["valence"].to_numpy()[valid & (split == s)],
                          records["arousal"].to_numpy()[valid & (split == s)], edges).ravel()
        for s in splits
    }  # fmt: skip
    rows = []
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            for p, q in ((b, a), (a, b)):
                rows.append({
                    "P": p,
                    "Q": q,
                    "kl_class": _kl_or_nan(class_hist[p], class_hist[q], epsilon),
                    "kl_va": _kl_or_nan(va_hist[p], va_hist[q], epsilon),
                    "class_bins_only_in_P": int(((class_hist[p] > 0) & (class_hist[q] == 0)).sum()),
                    "va_bins_only_in_P": int(((va_hist[p] > 0) & (va_hist[q] == 0)).sum()),
                })  # fmt: skip
    columns = ["P", "Q", "kl_class", "kl_va", "class_bins_only_in_P", "va_bins_only_in_P"]
    table = pd.DataFrame(rows, columns=columns)
    table.index = pd.Index([f"D({r.P} || {r.Q})" for r in table.itertuples()], name="divergence")
    return table


def _kl_or_nan(p: np.ndarray, q: np.ndarray, epsilon: float) -> float:
    return math.nan if p.sum() == 0 or q.sum() == 0 else kl_divergence(p, q, epsilon)


def sample_image_properties(records: pd.DataFrame, root: Path, *, per_split: int | None, seed: int) -> pd.DataFrame:
    """Width, height and mode (from the header) of up to `per_split` seeded random images per split (None: all).

    A file that cannot be opened gets its error in `error` (the checks report says why in more detail).
    """
    rng = np.random.default_rng(seed)
    split = records["split"].astype(object).to_numpy()
    rows = []
    for s in present_splits(records):
        positions = np.flatnonzero(split == s)
        if per_split is not None and len(positions) > per_split:
            positions = np.sort(rng.choice(positions, size=per_split, replace=False))
        for pos in positions:
            rel = str(records["path"].iloc[pos])
            width = height = None
            mode = error = None
            try:
                with Image.open(Path(root) / rel) as im:
                    (width, height), mode = im.size, im.mode
            except Exception as err:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
                error = f"{type(err).__name__}: {err}"
            rows.append((s, rel, width, height, mode, error))
    table = pd.DataFrame(rows, columns=["split", "path", "width", "height", "mode", "error"])
    table["width"] = table["width"].astype("Int64")
    table["height"] = table["height"].astype("Int64")
    return table


def mode_counts(props: pd.DataFrame) -> pd.DataFrame:
    """Images per PIL mode (rows) and split (columns) in the sample."""
    ok = props[props["error"].isna()]
    table = pd.crosstab(ok["mode"], ok["split"]).reindex(columns=[s for s in SPLITS if s in set(ok["split"])])
    table.columns.name = None
    return table


def size_counts(props: pd.DataFrame, top: int = 15) -> pd.DataFrame:
    """The `top` most frequent WxH sizes in the sample with their count per split and share of the sample."""
    ok = props[props["error"].isna()]
    size = ok["width"].astype(str) + "x" + ok["height"].astype(str)
    table = pd.crosstab(size, ok["split"]).reindex(columns=[s for s in SPLITS if s in set(ok["split"])])
    table.columns.name = None
    table[ALL] = table.sum(axis=1)
    table["share"] = table[ALL] / max(len(ok), 1)
    table.index.name = "size"
    return table.sort_values(ALL, ascending=False, kind="stable").head(top)


def paper_count_comparison(records: pd.DataFrame) -> pd.DataFrame:
    """Images per canonical class (all splits) beside the AffectNet paper's counts: difference and missing share."""
    expr = records["expression"].to_numpy(dtype=np.float64, na_value=np.nan)
    ours = [int((expr == cid).sum()) for cid in CANONICAL]
    table = pd.DataFrame(
        {"paper": CLASS_COUNTS.to_numpy(), "this data": ours},
        index=pd.Index(CLASS_COUNTS.index, name="class"),
    )
    table["paper - this"] = table["paper"] - table["this data"]
    table["missing share"] = table["paper - this"] / table["paper"]
    return table
