"""Losses: class weights from counts, the expression loss (weighted CE / focal), VA (CCC or MSE) and landmark losses."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# One ConfigError for the whole package, so the CLI's user-error handler catches loss errors too; re-exported here.
from fer_lightning.errors import ConfigError

LOSS_NAMES: tuple[str, ...] = ("ce", "inverse_frequency", "class_balanced", "focal")
WEIGHT_SCHEMES: tuple[str, ...] = ("none", "ce", "inverse_frequency", "class_balanced")
VA_KINDS: tuple[str, ...] = ("ccc", "mse")


def _check_beta(beta: float) -> None:
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and 0.0 <= beta < 1.0):
        raise ConfigError(f"loss.beta must be in [0, 1) (got {beta!r}); 0.999 or 0.9999 are usual for class_balanced")


def class_weights(
    counts: Sequence[int],
    scheme: str,
    *,
    beta: float = 0.999,
    names: Sequence[str] | None = None,
) -> Tensor | None:
    """Per-class loss weights from training counts, normalized to sum to the number of classes; None for plain CE."""
    if scheme in ("none", "ce"):
        return None
    if scheme not in WEIGHT_SCHEMES:
        raise ConfigError(f"loss.weighting must be one of {', '.join(WEIGHT_SCHEMES)} (got {scheme!r})")
    n = [int(c) for c in counts]
    if not n:
        raise ValueError("class_weights: no class counts given (the training split has no labelled classes)")
    if names is not None and len(names) != len(n):
        raise ValueError(f"class_weights: {len(names)} class names for {len(n)} counts")
    for i, c in enumerate(n):
        if c <= 0:
            label = f"class {i}" + (f" ({names[i]!r})" if names is not None else "")
            raise ConfigError(
                f"{label} has {c} training samples; loss.weighting={scheme} needs every class present in the training "
                "split: remove the class from data.classes or set loss.weighting=none"
            )
    counts64 = torch.tensor(n, dtype=torch.float64)
    if scheme == "inverse_frequency":
        w = 1.0 / counts64
    else:
        _check_beta(beta)
        # Effective number E_n = (1 - beta^n) / (1 - beta); 1 - beta^n = -expm1(n log beta) stays exact for beta
        # near 1, and log1p(-(1 - beta)) is log(beta) without rounding beta first. beta = 0 gives E_n = 1.
        log_beta = math.log1p(-(1.0 - beta)) if beta > 0 else -math.inf
        one_minus_beta_n = -torch.expm1(counts64 * log_beta)
        w = (1.0 - beta) / one_minus_beta_n
    w = w * (len(n) / w.sum())
    return w.to(torch.float32)


MAX_WEIGHT_RATIO = 100.0


def beta_for_ratio(counts: Sequence[int], ratio: float = MAX_WEIGHT_RATIO) -> float | None:
    """The class_balanced beta whose max/min weight equals `ratio`; None when no beta in [0, 1) exceeds it.

    The ratio E(n_max) / E(n_min) of effective numbers grows monotonically from 1 (beta = 0) toward n_max / n_min
    (beta -> 1), so a bisection over log(1 - beta) finds it.
    """
    n = [int(c) for c in counts if int(c) > 0]
    if len(n) < 2 or max(n) / min(n) <= ratio:
        return None
    lo, hi = min(n), max(n)

    def weight_ratio(log10_gap: float) -> float:
        gap = 10.0**log10_gap  # 1 - beta
        log_beta = math.log1p(-gap)
        return math.expm1(hi * log_beta) / math.expm1(lo * log_beta)

    a, b = -12.0, 0.0  # beta = 1 - 1e-12 (ratio near n_max / n_min) .. beta = 0 (ratio 1)
    for _ in range(100):
        mid = (a + b) / 2
        if weight_ratio(mid) > ratio:
            a = mid
        else:
            b = mid
    return 1.0 - 10.0**b


def weight_table(counts: Sequence[int], weights: Tensor | None, names: Sequence[str]) -> str:
    """Per-class training count and loss weight, one line per class, for the start-up log."""
    lines = [f"  {'class':<14} {'train n':>8} {'weight':>9}"]
    for i, (name, c) in enumerate(zip(names, counts)):
        w = 1.0 if weights is None else float(weights[i])
        lines.append(f"  {str(name):<14} {int(c):>8d} {w:>9.4f}")
    return "\n".join(lines)


def weight_ratio_warning(counts: Sequence[int], weights: Tensor | None, scheme: str, beta: float) -> str | None:
    """A warning when the largest class weight exceeds MAX_WEIGHT_RATIO times the smallest, with the capping beta."""
    if weights is None or weights.numel() < 2 or float(weights.min()) <= 0:
        return None
    ratio = float(weights.max() / weights.min())
    if ratio <= MAX_WEIGHT_RATIO:
        return None
    capped = beta_for_ratio(counts, MAX_WEIGHT_RATIO)
    fix = (
        f"loss=class_balanced loss.beta={capped:.6g} caps it at {MAX_WEIGHT_RATIO:g}"
        if capped is not None
        else "a smaller loss.beta lowers it"
    )
    what = f"loss.weighting={scheme}" + (f" with loss.beta={beta:g}" if scheme == "class_balanced" else "")
    return (
        f"{what} gives class weights {ratio:.0f}x apart (max/min): a few rare samples dominate the gradient and "
        f"the training can become unstable; {fix}"
    )


def _check_finite(key: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value)):
        raise ConfigError(f"{key} must be a finite number (got {value!r})")


def validate_loss_config(
    name: str,
    beta: float = 0.999,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
    va_weight: float = 1.0,
    landmark_weight: float = 0.0,
    *,
    weighting: str = "none",
    expression_weight: float = 1.0,
    va: str = "ccc",
) -> None:
    """Reject out-of-range loss settings at start-up with the key's name and the allowed range."""
    if name not in LOSS_NAMES:
        raise ConfigError(f"loss.name must be one of {', '.join(LOSS_NAMES)} (got {name!r})")
    if weighting not in WEIGHT_SCHEMES:
        raise ConfigError(f"loss.weighting must be one of {', '.join(WEIGHT_SCHEMES)} (got {weighting!r})")
    _check_finite("loss.beta", beta)
    _check_beta(beta)
    _check_finite("loss.gamma", gamma)
    if gamma < 0:
        raise ConfigError(
            f"loss.gamma must be >= 0 (got {gamma!r}); 0 is plain cross-entropy, 2 is the usual focal value"
        )
    _check_finite("loss.label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f"loss.label_smoothing must be in [0, 1) (got {label_smoothing!r})")
    for key, value in (
        ("loss.expression_weight", expression_weight),
        ("loss.va_weight", va_weight),
        ("loss.landmark_weight", landmark_weight),
    ):
        _check_finite(key, value)
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (got {value!r}); 0 switches that term off")
    if va not in VA_KINDS:
        raise ConfigError(f"loss.va must be one of {', '.join(VA_KINDS)} (got {va!r})")


class ExpressionLoss(nn.Module):
    """Weighted cross-entropy with optional focal modulation and label smoothing; ignores targets == ignore_index."""

    def __init__(
        self,
        weights: Tensor | None,
        *,
        focal_gamma: float = 0.0,
        label_smoothing: float = 0.0,
        ignore_index: int = -1,
    ):
        super().__init__()
        if focal_gamma < 0:
            raise ConfigError(f"loss.gamma must be >= 0 (got {focal_gamma!r})")
        if not 0.0 <= label_smoothing < 1.0:
            raise ConfigError(f"loss.label_smoothing must be in [0, 1) (got {label_smoothing!r})")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32)
            if weights.ndim != 1 or bool((weights < 0).any()):
                raise ValueError("ExpressionLoss: weights must be a 1-D tensor of non-negative per-class weights")
        # Not persistent: weights come from the training counts, so a checkpoint must not pin them.
        self.register_buffer("weights", weights, persistent=False)
        self.focal_gamma = float(focal_gamma)
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Weighted mean over non-ignored targets: sum_i(w_{y_i} * l_i) / sum_i(w_{y_i}).

        l_i is sample i's whole loss (smoothed cross-entropy, focal-modulated when gamma > 0) and w_{y_i} the weight
        of its target class. The weight scales the sample, never the classes inside the smoothing term: weighting
        those (as F.cross_entropy(weight=..., label_smoothing=...) does) pulls every prediction toward the rare
        classes when the weights differ by orders of magnitude.
        """
        if logits.ndim != 2 or target.shape != logits.shape[:1]:
            raise ValueError(
                f"ExpressionLoss: expected logits (B, C) and target (B,), got {tuple(logits.shape)} "
                f"and {tuple(target.shape)}"
            )
        num_classes = logits.shape[1]
        if self.weights is not None and self.weights.numel() != num_classes:
            raise ValueError(
                f"ExpressionLoss has {self.weights.numel()} class weights but the model outputs "
                f"{num_classes} logits: compute the weights from the same data.classes"
            )
        keep = target != self.ignore_index
        if not self.training:
            # reading the check's result waits for the device, so only outside the training step; there, an
            # out-of-range target still fails in gather (index out of bounds / device-side assert)
            bad = keep & ((target < 0) | (target >= num_classes))
            if bool(bad.any()):
                raise ValueError(
                    f"ExpressionLoss: target {int(target[bad][0])} is outside [0, {num_classes}) and is not "
                    f"ignore_index ({self.ignore_index})"
                )
        # masks as products, never boolean indexing: indexing needs the count on the host (a sync every step)
        y = torch.where(keep, target, torch.zeros_like(target)).long()
        # float32 even under autocast: log-softmax of bf16 logits loses the small probabilities focal needs.
        logp = F.log_softmax(logits.float(), dim=1)
        logp_y = logp.gather(1, y[:, None]).squeeze(1)
        per_sample = -(1.0 - self.label_smoothing) * logp_y
        if self.label_smoothing > 0:
            per_sample = per_sample - (self.label_smoothing / num_classes) * logp.sum(dim=1)
        if self.focal_gamma > 0:
            # 1 - p_t via expm1 is exact when p_t is near 1; the floor keeps pow's gradient finite for gamma < 1.
            one_minus_pt = (-torch.expm1(logp_y)).clamp_min(1e-12)
            per_sample = one_minus_pt.pow(self.focal_gamma) * per_sample
        w_y = keep.to(logp.dtype)
        if self.weights is not None:
            w_y = w_y * self.weights.to(logp.device)[y]
        # an all-ignored batch gives 0 with a gradient path (0 / 1), not NaN
        return (w_y * per_sample).sum() / w_y.sum().clamp_min(torch.finfo(logp.dtype).tiny)


def ccc(pred: Tensor, target: Tensor) -> Tensor:
    """Concordance correlation coefficient of two 1-D tensors with population (1/N) statistics."""
    if pred.shape != target.shape or pred.ndim != 1:
        raise ValueError(
            f"ccc: expected two 1-D tensors of equal length, got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    p = pred.float()
    t = target.float()
    mp, mt = p.mean(), t.mean()
    dp, dt = p - mp, t - mt
    cov = (dp * dt).mean()
    denom = dp.pow(2).mean() + dt.pow(2).mean() + (mp - mt).pow(2)
    # Both constant and equal: 0/0; the floor makes it 0 instead of NaN.
    return 2.0 * cov / denom.clamp_min(1e-12)


def _masked_ccc(p: Tensor, t: Tensor, m: Tensor) -> Tensor:
    """CCC over the rows where m is 1 (population statistics), from sums: no boolean indexing, no host sync."""
    n = m.sum().clamp_min(1.0)
    mp, mt = (p * m).sum() / n, (t * m).sum() / n
    dp, dt = (p - mp) * m, (t - mt) * m
    cov = (dp * dt).sum() / n
    denom = dp.pow(2).sum() / n + dt.pow(2).sum() / n + (mp - mt).pow(2)
    return 2.0 * cov / denom.clamp_min(1e-12)


def va_loss(pred: Tensor, target: Tensor, *, kind: str = "ccc") -> Tensor:
    """Valence/arousal loss over rows whose target is not NaN, per column, averaged over columns that have any.

    Written with masks and sums (torch.where, never boolean indexing) so the training step makes no host sync.
    """
    if kind not in VA_KINDS:
        raise ConfigError(f"loss.va must be one of {', '.join(VA_KINDS)} (got {kind!r})")
    if pred.ndim != 2 or pred.shape != target.shape:
        raise ValueError(
            f"va_loss: expected pred and target of shape (B, 2), got {tuple(pred.shape)} and {tuple(target.shape)}"
        )
    p = pred.float()
    valid = ~torch.isnan(target)
    t = torch.where(valid, target.float(), torch.zeros_like(p))
    m = valid.to(p.dtype)
    terms, present = [], []
    for col in range(p.shape[1]):
        pc, tc, mc = p[:, col], t[:, col], m[:, col]
        n = mc.sum()
        mse = ((pc - tc).pow(2) * mc).sum() / n.clamp_min(1.0)
        if kind == "ccc":
            # one valid row has no variance, so CCC is undefined: MSE still pulls it toward the target
            term = torch.where(n >= 2, 1.0 - _masked_ccc(pc, tc, mc), mse)
        else:
            term = mse
        terms.append(term)
        present.append((n > 0).to(p.dtype))
    terms_t, present_t = torch.stack(terms), torch.stack(present)
    # columns without any target drop out of the mean; no target at all gives 0 with a gradient path
    return (terms_t * present_t).sum() / present_t.sum().clamp_min(1.0) + pred.sum() * 0.0


def landmark_loss(pred: Tensor, target: Tensor, *, beta: float = 0.01) -> Tensor:
    """Smooth-L1 over coordinates whose target is not NaN; beta is in normalized (0-1) image units."""
    if pred.shape != target.shape or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(
            f"landmark_loss: expected pred and target of shape (B, K, 2), got {tuple(pred.shape)} and "
            f"{tuple(target.shape)}"
        )
    valid = ~torch.isnan(target)
    p = pred.float()
    t = torch.where(valid, target.float(), p.detach())
    per = F.smooth_l1_loss(p, t, beta=beta, reduction="none") * valid.to(p.dtype)
    return per.sum() / valid.sum().clamp_min(1).to(p.dtype) + pred.sum() * 0.0
