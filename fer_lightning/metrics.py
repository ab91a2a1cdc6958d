"""The metric suite: numpy reference functions plus the torchmetrics wrappers used during training.

Every number the project reports comes from `expression_metrics` / `va_metrics`; the torchmetrics classes only
gather predictions across batches and devices and then call them.

Skew-normalized ("norm") variants follow Jeni, Cohn & De la Torre (2013) as reported in the AffectNet paper:
each sample of class c gets weight ``n_max / n_c`` (see `skew_weights`), which is exactly what physically
replicating every class up to the size of the largest one would give.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    cohen_kappa_score,
    f1_score,
    precision_recall_fscore_support,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.metrics import confusion_matrix as _sk_confusion_matrix
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

AGGREGATE_KEYS: tuple[str, ...] = (
    "accuracy",
    "balanced_accuracy",
    "precision_macro",
    "f1_macro",
    "f1_weighted",
    "kappa",
    "alpha",
    "auc",
    "aucpr",
)
VA_DIMENSIONS: tuple[str, ...] = ("valence", "arousal")
VA_KEYS: tuple[str, ...] = tuple(f"{name}_{dim}" for name in ("rmse", "corr", "sagr", "ccc") for dim in VA_DIMENSIONS)
GROUP_METRIC_COLUMNS: tuple[str, ...] = ("accuracy", "precision_macro", "recall_macro", "f1_macro")


# ---------------------------------------------------------------------------------------------------------------
# input checks


def _class_names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
    if class_names is None:
        return [str(i) for i in range(num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} names but there are {num_classes} classes; pass one per class")
    if len(set(names)) != len(names):
        raise ValueError(f"class_names must be unique, got {names}")
    return names


def _as_labels(values: np.ndarray, name: str) -> np.ndarray:
    """Integer labels from an int or integer-valued float array."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    if arr.dtype.kind in "iub":
        return arr.astype(np.int64)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must hold integer class ids; found NaN or fractional values")
        return arr.astype(np.int64)
    raise ValueError(f"{name} must hold integer class ids, got dtype {arr.dtype}")


def _check_expression_inputs(probs: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, K) with K >= 2, got {probs.shape}")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contains NaN or inf; check the model outputs")
    target = _as_labels(target, "target")
    if len(target) != len(probs):
        raise ValueError(f"probs has {len(probs)} rows but target has {len(target)}")
    num_classes = probs.shape[1]
    bad = (target < 0) | (target >= num_classes)
    if bad.any():
        raise ValueError(
            f"target has {int(bad.sum())} value(s) outside [0, {num_classes}), e.g. {int(target[bad][0])}; "
            "drop rows with a missing label (-1) before computing metrics"
        )
    return probs, target


# ---------------------------------------------------------------------------------------------------------------
# numpy reference implementation


def skew_weights(target: np.ndarray) -> np.ndarray:
    """Per-sample weights n_max / n_class: every class present in `target` then carries the same total weight."""
    target = _as_labels(target, "target")
    if target.size == 0:
        return np.zeros(0, dtype=np.float64)
    if target.min() < 0:
        raise ValueError("target has negative class ids; drop rows with a missing label (-1) first")
    counts = np.bincount(target)
    return counts.max() / counts[target].astype(np.float64)


def krippendorff_alpha(coder_a: np.ndarray, coder_b: np.ndarray, sample_weight: np.ndarray | None = None) -> float:
    """Krippendorff's alpha (nominal) for two coders that both coded every unit; a unit of weight w counts w times.

    NaN when there is no variation at all (every value in one category), where alpha is undefined.
    """
    a = _as_labels(coder_a, "coder_a")
    b = _as_labels(coder_b, "coder_b")
    if len(a) != len(b):
        raise ValueError(f"coder_a has {len(a)} values but coder_b has {len(b)}")
    w = np.ones(len(a)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if w.shape != a.shape or not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("sample_weight must be finite, non-negative and of the same length as the codes")
    categories = np.union1d(a, b)
    ia, ib = np.searchsorted(categories, a), np.searchsorted(categories, b)
    # Coincidence matrix: a unit with two values adds the ordered pairs (a, b) and (b, a), each with 1/(m_u - 1) = 1.
    coincidence = np.zeros((len(categories), len(categories)))
    np.add.at(coincidence, (ia, ib), w)
    coincidence = coincidence + coincidence.T
    n_c = coincidence.sum(axis=1)
    n = n_c.sum()
    observed = coincidence.sum() - np.trace(coincidence)
    expected = n_c.sum() ** 2 - np.sum(n_c**2)  # sum over c != k of n_c * n_k
    if expected <= 0:
        return float("nan")
    return float(1.0 - (n - 1.0) * observed / expected)


def _kappa(target: np.ndarray, pred: np.ndarray, weight: np.ndarray | None) -> float:
    # Undefined (0/0) when both raters put everything in one and the same class.
    if len(np.union1d(target, pred)) < 2:
        return float("nan")
    return float(cohen_kappa_score(target, pred, sample_weight=weight))


def _one_vs_rest(probs: np.ndarray, target: np.ndarray, weight: np.ndarray | None) -> tuple[float, float]:
    """Macro ROC AUC and average precision over the classes present in target (and not the only class)."""
    aucs, aps = [], []
    for c in np.unique(target):
        positive = target == c
        if positive.all():
            continue  # a single class has no negatives: AUC undefined
        aucs.append(roc_auc_score(positive, probs[:, c], sample_weight=weight))
        aps.append(average_precision_score(positive, probs[:, c], sample_weight=weight))
    if not aucs:
        return float("nan"), float("nan")
    return float(np.mean(aucs)), float(np.mean(aps))


def _aggregate(probs: np.ndarray, pred: np.ndarray, target: np.ndarray, weight: np.ndarray | None) -> dict[str, float]:
    present = np.unique(target)
    # Macro averages run over the classes present in target: a class the data set lacks has no recall to average.
    kwargs = {"labels": present, "sample_weight": weight, "zero_division": 0}
    auc, aucpr = _one_vs_rest(probs, target, weight)
    return {
        "accuracy": float(accuracy_score(target, pred, sample_weight=weight)),
        "balanced_accuracy": float(recall_score(target, pred, average="macro", **kwargs)),
        "precision_macro": float(precision_score(target, pred, average="macro", **kwargs)),
        "f1_macro": float(f1_score(target, pred, average="macro", **kwargs)),
        "f1_weighted": float(f1_score(target, pred, average="weighted", **kwargs)),
        "kappa": _kappa(target, pred, weight),
        "alpha": krippendorff_alpha(pred, target, weight),
        "auc": auc,
        "aucpr": aucpr,
    }


def _per_class(pred: np.ndarray, target: np.ndarray, names: list[str]) -> dict[str, float]:
    """Precision/recall/F1 per class; NaN where undefined (recall and F1 of a class absent from target)."""
    cm = _sk_confusion_matrix(target, pred, labels=np.arange(len(names))).astype(np.float64)
    out: dict[str, float] = {}
    for c, name in enumerate(names):
        tp, support, predicted = cm[c, c], cm[c, :].sum(), cm[:, c].sum()
        if predicted > 0:
            precision = tp / predicted
        else:
            precision = 0.0 if support > 0 else float("nan")
        recall = tp / support if support > 0 else float("nan")
        f1 = 2 * tp / (support + predicted) if support > 0 else float("nan")
        out[f"precision/{name}"] = float(precision)
        out[f"recall/{name}"] = float(recall)
        out[f"f1/{name}"] = float(f1)
    return out


def expression_metrics(
    probs: np.ndarray, target: np.ndarray, *, class_names: Sequence[str] | None = None
) -> dict[str, float]:
    """All expression metrics (orig and `_norm`) plus per-class precision/recall/F1; NaN where undefined or N=0."""
    probs, target = _check_expression_inputs(probs, target)
    names = _class_names(class_names, probs.shape[1])
    if target.size == 0:
        keys = [*AGGREGATE_KEYS, *(k + "_norm" for k in AGGREGATE_KEYS)]
        keys += [f"{m}/{n}" for n in names for m in ("precision", "recall", "f1")]
        return dict.fromkeys(keys, float("nan"))
    pred = probs.argmax(axis=1)
    out = _aggregate(probs, pred, target, None)
    out.update({f"{k}_norm": v for k, v in _aggregate(probs, pred, target, skew_weights(target)).items()})
    out.update(_per_class(pred, target, names))
    return out


def confusion_matrix(
    probs: np.ndarray, target: np.ndarray, num_classes: int, normalize: str | None = None
) -> np.ndarray:
    """K x K counts (rows = true class, columns = predicted); normalize='true' makes rows sum to 1 (empty rows 0)."""
    probs, target = _check_expression_inputs(probs, target)
    if probs.shape[1] != num_classes:
        raise ValueError(f"probs has {probs.shape[1]} columns but num_classes={num_classes}")
    if normalize not in (None, "true"):
        raise ValueError(f"normalize must be None or 'true', got {normalize!r}")
    cm = _sk_confusion_matrix(target, probs.argmax(axis=1), labels=np.arange(num_classes)).astype(np.int64)
    if normalize is None:
        return cm
    rows = cm.sum(axis=1, keepdims=True)
    return np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)


def _va_column(pred: np.ndarray, target: np.ndarray) -> tuple[float, float, float, float]:
    """RMSE, Pearson correlation, sign agreement and CCC of one dimension; NaN where undefined."""
    nan = float("nan")
    if pred.size == 0:
        return nan, nan, nan, nan
    rmse = float(np.sqrt(np.mean((pred - target) ** 2)))
    sagr = float(np.mean(np.sign(pred) == np.sign(target)))
    mean_p, mean_t = pred.mean(), target.mean()
    var_p, var_t = np.mean((pred - mean_p) ** 2), np.mean((target - mean_t) ** 2)
    cov = np.mean((pred - mean_p) * (target - mean_t))
    # A constant column has no correlation; test exact constancy instead of var == 0 (float noise).
    constant = np.ptp(pred) == 0 or np.ptp(target) == 0
    corr = nan if constant else float(cov / np.sqrt(var_p * var_t))
    denom = var_p + var_t + (mean_p - mean_t) ** 2
    ccc = float(2 * cov / denom) if denom > 0 else nan
    return rmse, corr, sagr, ccc


def va_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """RMSE, CORR, SAGR and CCC for valence and arousal; rows with a NaN target are ignored per column."""
    pred = np.asarray(pred, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != 2 or target.shape != pred.shape:
        raise ValueError(
            f"pred and target must both have shape (N, 2) [valence, arousal], got {pred.shape} and {target.shape}"
        )
    out: dict[str, float] = {}
    for j, dim in enumerate(VA_DIMENSIONS):
        labelled = ~np.isnan(target[:, j])
        p, t = pred[labelled, j], target[labelled, j]
        if not np.all(np.isfinite(p)):
            raise ValueError(f"pred has NaN/inf {dim} where a {dim} target exists; check the model outputs")
        rmse, corr, sagr, ccc = _va_column(p, t)
        out.update({f"rmse_{dim}": rmse, f"corr_{dim}": corr, f"sagr_{dim}": sagr, f"ccc_{dim}": ccc})
    return {k: out[k] for k in VA_KEYS}


def _predicted_labels(pred: np.ndarray) -> np.ndarray:
    arr = np.asarray(pred)
    return arr.argmax(axis=1) if arr.ndim == 2 else _as_labels(arr, "pred")


def _group_row(attribute: str, value: str, pred: np.ndarray, target: np.ndarray) -> dict[str, object]:
    present = np.unique(target)
    p, r, f, _ = precision_recall_fscore_support(target, pred, labels=present, average="macro", zero_division=0)
    return {
        "attribute": attribute,
        "value": value,
        "n": len(target),
        "accuracy": float(np.mean(pred == target)),
        "precision_macro": float(p),
        "recall_macro": float(r),
        "f1_macro": float(f),
    }


def group_metrics(pred: np.ndarray, target: np.ndarray, groups: pd.DataFrame) -> pd.DataFrame:
    """Per group value: n, accuracy, macro precision/recall/F1, plus a `gap` row (max - min) per attribute.

    `pred` is (N,) class ids or (N, K) scores. Rows whose attribute is missing form a `<NA>` group, shown but left
    out of the gap. Macro averages run over the classes present in that group's target.
    """
    pred = _predicted_labels(pred)
    target = _as_labels(target, "target")
    if not (len(pred) == len(target) == len(groups)):
        raise ValueError(
            f"pred ({len(pred)}), target ({len(target)}) and groups ({len(groups)}) must have equal length"
        )
    if len(target) and target.min() < 0:
        raise ValueError("target has negative class ids; drop rows with a missing label (-1) first")
    rows: list[dict[str, object]] = []
    for attribute in groups.columns:
        column = groups[attribute]
        missing = column.isna().to_numpy()
        real: list[dict[str, object]] = []
        for value in pd.unique(column[~missing]):
            mask = (column == value).to_numpy() & ~missing
            real.append(_group_row(str(attribute), str(value), pred[mask], target[mask]))
        rows.extend(real)
        if missing.any():
            rows.append(_group_row(str(attribute), "<NA>", pred[missing], target[missing]))
        gap: dict[str, object] = {"attribute": str(attribute), "value": "gap", "n": pd.NA}
        for metric in GROUP_METRIC_COLUMNS:
            values = [float(row[metric]) for row in real]
            gap[metric] = max(values) - min(values) if values else float("nan")
        rows.append(gap)
    columns = ["attribute", "value", "n", *GROUP_METRIC_COLUMNS]
    table = pd.DataFrame(rows, columns=columns)
    table["n"] = table["n"].astype("Int64")
    return table


# ---------------------------------------------------------------------------------------------------------------
# torchmetrics wrappers


def _to_probs(scores: torch.Tensor) -> torch.Tensor:
    """Probabilities as given, or softmax of logits (anything outside [0, 1] or not summing to 1 per row)."""
    scores = scores.detach().float()
    if scores.numel() == 0:
        return scores
    sums = scores.sum(dim=1)
    is_probs = bool(
        (scores >= 0).all() and (scores <= 1).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-4)
    )
    return scores if is_probs else torch.softmax(scores, dim=1)


def _first_occurrence(index: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Positions of each distinct index once (sorted by index); duplicates must carry the same target."""
    _, first, inverse = np.unique(index, return_index=True, return_inverse=True)
    repeated = target[first][inverse.reshape(-1)]
    same = repeated == target
    if same.ndim > 1:
        same = np.all(same | (np.isnan(repeated) & np.isnan(target)), axis=1)
    if not same.all():
        bad = int(index[~same][0])
        raise ValueError(
            f"sample index {bad} was updated with different targets; the `index` passed to update() must be the "
            "data set row id (unique per sample), not the position in the batch"
        )
    return first


def _gathered(state: list[torch.Tensor] | torch.Tensor) -> np.ndarray | None:
    if isinstance(state, list) and len(state) == 0:
        return None
    return dim_zero_cat(state).cpu().numpy()


class ExpressionMetricSuite(Metric):
    """Gathers probabilities, targets and sample ids (across devices), dedups by id and calls `expression_metrics`."""

    full_state_update = False
    is_differentiable = False
    higher_is_better = True

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.class_names = _class_names(class_names, num_classes)
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, logits_or_probs: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> None:
        """Add a batch; rows with target < 0 (no expression label) are ignored."""
        if logits_or_probs.ndim != 2 or logits_or_probs.shape[1] != self.num_classes:
            raise ValueError(f"expected scores of shape (B, {self.num_classes}), got {tuple(logits_or_probs.shape)}")
        if target.shape != (len(logits_or_probs),) or index.shape != target.shape:
            raise ValueError(
                f"target and index must have shape ({len(logits_or_probs)},), got {tuple(target.shape)} and "
                f"{tuple(index.shape)}"
            )
        keep = target >= 0
        self.probs.append(_to_probs(logits_or_probs[keep]))
        self.target.append(target[keep].long())
        self.index.append(index[keep].long())

    def compute(self) -> dict[str, float]:
        """Metrics over every distinct sample seen; NaN values when nothing was added."""
        probs = _gathered(self.probs)
        if probs is None or len(probs) == 0:
            empty = np.zeros((0, self.num_classes))
            return expression_metrics(empty, np.zeros(0, dtype=np.int64), class_names=self.class_names)
        target = _gathered(self.target).astype(np.int64)
        keep = _first_occurrence(_gathered(self.index).astype(np.int64), target)
        return expression_metrics(probs[keep], target[keep], class_names=self.class_names)

    def samples(self, with_index: bool = False) -> tuple[np.ndarray, ...]:
        """Deduplicated (probs, target[, index]) from every device, sorted by sample index, for figures and reports.

        `index` is the data set row of each sample (what `update` was given), so per-sample reports can join
        the records (paths, group columns) even when only part of the split was evaluated.
        """
        with self.sync_context():
            probs = _gathered(self.probs)
            if probs is None:
                empty = (np.zeros((0, self.num_classes)), np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
                return empty if with_index else empty[:2]
            target = _gathered(self.target).astype(np.int64)
            index = _gathered(self.index).astype(np.int64)
            keep = _first_occurrence(index, target)
        return (probs[keep], target[keep], index[keep]) if with_index else (probs[keep], target[keep])


class VAMetricSuite(Metric):
    """Gathers valence/arousal predictions, targets and sample ids (across devices), dedups, calls `va_metrics`."""

    full_state_update = False
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("pred", default=[], dist_reduce_fx="cat")
        self.add_state("target", default=[], dist_reduce_fx="cat")
        self.add_state("index", default=[], dist_reduce_fx="cat")

    def update(self, pred: torch.Tensor, target: torch.Tensor, index: torch.Tensor) -> None:
        """Add a batch of (B, 2) [valence, arousal]; rows whose targets are both NaN are ignored."""
        if pred.ndim != 2 or pred.shape[1] != 2 or target.shape != pred.shape:
            raise ValueError(
                f"pred and target must have shape (B, 2), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if index.shape != (len(pred),):
            raise ValueError(f"index must have shape ({len(pred)},), got {tuple(index.shape)}")
        keep = ~torch.isnan(target).all(dim=1)
        self.pred.append(pred[keep].detach().float())
        self.target.append(target[keep].detach().float())
        self.index.append(index[keep].long())

    def compute(self) -> dict[str, float]:
        """VA metrics over every distinct sample seen; NaN values when nothing was added."""
        pred = _gathered(self.pred)
        if pred is None or len(pred) == 0:
            return va_metrics(np.zeros((0, 2)), np.zeros((0, 2)))
        target = _gathered(self.target).astype(np.float64)
        keep = _first_occurrence(_gathered(self.index).astype(np.int64), target)
        return va_metrics(pred[keep], target[keep])

    def samples(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Deduplicated (pred, target, index) from every device, sorted by sample index; (N, 2) [valence, arousal]."""
        with self.sync_context():
            pred = _gathered(self.pred)
            if pred is None:
                return np.zeros((0, 2)), np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
            target = _gathered(self.target).astype(np.float64)
            index = _gathered(self.index).astype(np.int64)
            keep = _first_occurrence(index, target)
        return pred[keep].astype(np.float64), target[keep], index[keep]
