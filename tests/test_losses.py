"""Class weights, expression/VA/landmark losses and loss-config validation against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fer_lightning.losses import (
    ConfigError,
    ExpressionLoss,
    beta_for_ratio,
    ccc,
    class_weights,
    landmark_loss,
    va_loss,
    validate_loss_config,
    weight_ratio_warning,
)
from fer_lightning.mixing import Mixer, mix_images, mixed_expression_loss

# Seed 001, appendix B: AffectNet train+val counts and the published normalized class-balanced weights (beta 0.9999).
SEED001_COUNTS = [75374, 134915, 25959, 14590, 6878, 25382]
SEED001_WEIGHTS = [0.802518525, 0.802092228, 0.866721731, 1.045004055, 1.612773364, 0.870890096]


def test_class_balanced_matches_seed001_table():
    w = class_weights(SEED001_COUNTS, "class_balanced", beta=0.9999)
    np.testing.assert_allclose(w.numpy(), SEED001_WEIGHTS, atol=5e-6)
    assert w.sum().item() == pytest.approx(6.0, abs=1e-5)
    assert w.dtype == torch.float32


def test_class_balanced_against_effective_number_formula():
    counts = np.array([10, 20, 70], dtype=np.float64)
    beta = 0.9
    effective = (1 - beta**counts) / (1 - beta)
    expected = (1 / effective) / (1 / effective).sum() * 3
    np.testing.assert_allclose(
        class_weights(counts.astype(int), "class_balanced", beta=beta).numpy(), expected, rtol=1e-6
    )


def test_inverse_frequency_hand_values():
    # 1/10 : 1/20 : 1/70 = 14 : 7 : 2 (times 140), normalized to sum 3.
    w = class_weights([10, 20, 70], "inverse_frequency")
    np.testing.assert_allclose(w.numpy(), [3 * 14 / 23, 3 * 7 / 23, 3 * 2 / 23], rtol=1e-6)


def test_class_balanced_limits():
    counts = [10, 20, 70]
    np.testing.assert_allclose(class_weights(counts, "class_balanced", beta=0.0).numpy(), [1.0, 1.0, 1.0])
    near_one = class_weights(counts, "class_balanced", beta=1 - 1e-9).numpy()
    np.testing.assert_allclose(near_one, class_weights(counts, "inverse_frequency").numpy(), rtol=1e-6)
    # In between, the weights lie strictly between uniform and inverse frequency for the rarest class.
    mid = class_weights(counts, "class_balanced", beta=0.9).numpy()
    assert 1.0 < mid[0] < 3 * 14 / 23


@pytest.mark.parametrize("scheme", ["none", "ce"])
def test_no_weights_for_plain_ce(scheme):
    assert class_weights([1, 2, 3], scheme) is None


def test_class_weights_errors():
    with pytest.raises(ConfigError, match=r"class 2 \('sad'\) has 0 training samples.*loss.weighting=none"):
        class_weights([5, 4, 0], "inverse_frequency", names=["neutral", "happy", "sad"])
    with pytest.raises(ConfigError, match="class 1 has 0"):
        class_weights([5, 0, 3], "class_balanced")
    with pytest.raises(ConfigError, match=r"loss.beta must be in \[0, 1\)"):
        class_weights([5, 4], "class_balanced", beta=1.0)
    with pytest.raises(ConfigError, match="loss.weighting must be one of none, ce, inverse_frequency, class_balanced"):
        class_weights([5, 4], "sqrt")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"beta": 1.0}, r"loss.beta must be in \[0, 1\)"),
        ({"beta": -0.01}, r"loss.beta must be in \[0, 1\)"),
        ({"beta": float("nan")}, "loss.beta must be a finite number"),
        ({"gamma": -0.5}, "loss.gamma must be >= 0"),
        ({"label_smoothing": 1.0}, r"loss.label_smoothing must be in \[0, 1\)"),
        ({"va_weight": -1.0}, "loss.va_weight must be >= 0"),
        ({"landmark_weight": -0.1}, "loss.landmark_weight must be >= 0"),
        ({"expression_weight": -2.0}, "loss.expression_weight must be >= 0"),
        ({"va": "mae"}, "loss.va must be one of ccc, mse"),
        ({"weighting": "sqrt"}, "loss.weighting must be one of none, ce, inverse_frequency, class_balanced"),
        ({"name": "hinge"}, "loss.name must be one of ce, inverse_frequency, class_balanced, focal"),
    ],
)
def test_validate_loss_config_messages(kwargs, message):
    args = {"name": "class_balanced", **kwargs}
    with pytest.raises(ConfigError, match=message):
        validate_loss_config(**args)


def test_config_error_is_the_package_one():
    # The CLI turns fer_lightning.config.ConfigError into a one-line message; loss errors must be that class.
    from fer_lightning.config import ConfigError as PackageConfigError

    assert ConfigError is PackageConfigError and issubclass(ConfigError, ValueError)


def test_validate_loss_config_accepts_valid_values():
    validate_loss_config("focal", 0.0, 2.0, 0.1, 0.0, 1.0, weighting="class_balanced", expression_weight=1.0, va="mse")
    validate_loss_config("class_balanced", beta=0.9999)


def _batch(seed: int = 0, n: int = 16, c: int = 5):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g) * 2
    target = torch.randint(0, c, (n,), generator=g)
    weights = torch.rand(c, generator=g) + 0.2
    return logits, target, weights


@pytest.mark.parametrize(("smoothing", "use_weights"), [(0.0, False), (0.1, False), (0.0, True)])
def test_expression_loss_equals_cross_entropy(smoothing, use_weights):
    # F.cross_entropy agrees except for weights + smoothing, where it weights the classes inside the smoothing term
    # (tested against a hand computation below instead)
    logits, target, weights = _batch()
    target[[1, 4, 9]] = -1
    w = weights if use_weights else None
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = ExpressionLoss(w, label_smoothing=smoothing, ignore_index=-1)(a, target)
    ref = F.cross_entropy(b, target, weight=w, ignore_index=-1, label_smoothing=smoothing)
    ours.backward()
    ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(a.grad[[1, 4, 9]] == 0)


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, target, weights = _batch(1)
    ours = ExpressionLoss(weights, focal_gamma=0.0)(logits, target)
    assert ours.item() == pytest.approx(F.cross_entropy(logits, target, weight=weights).item(), rel=1e-6)


def test_focal_hand_value():
    # Sample 1: logits (2, 0, 0), class 0 -> p = e^2 / (e^2 + 2). Sample 2: logits (0, 1, 0), class 2 -> p = 1/(2 + e).
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    target = torch.tensor([0, 2])
    p1 = math.exp(2) / (math.exp(2) + 2)
    p2 = 1 / (2 + math.e)
    gamma = 2.0
    f1 = (1 - p1) ** gamma * -math.log(p1)
    f2 = (1 - p2) ** gamma * -math.log(p2)
    assert ExpressionLoss(None, focal_gamma=gamma)(logits, target).item() == pytest.approx((f1 + f2) / 2, rel=1e-6)
    alpha = torch.tensor([0.5, 1.0, 3.0])
    weighted = (0.5 * f1 + 3.0 * f2) / (0.5 + 3.0)
    assert ExpressionLoss(alpha, focal_gamma=gamma)(logits, target).item() == pytest.approx(weighted, rel=1e-6)


def test_focal_down_weights_easy_examples():
    logits, target, _ = _batch(2)
    ce = ExpressionLoss(None)(logits, target)
    focal = ExpressionLoss(None, focal_gamma=2.0)(logits, target)
    assert 0 < focal.item() < ce.item()


def test_all_ignored_gives_zero_with_grad():
    logits = torch.randn(4, 3, requires_grad=True)
    loss = ExpressionLoss(torch.ones(3), focal_gamma=2.0)(logits, torch.full((4,), -1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_expression_loss_rejects_bad_input():
    logits, target, _ = _batch(3, c=5)
    with pytest.raises(ValueError, match="4 class weights but the model outputs 5 logits"):
        ExpressionLoss(torch.ones(4))(logits, target)
    target[0] = 7
    # outside the training step the target is checked with a clear message ...
    with pytest.raises(ValueError, match=r"target 7 is outside \[0, 5\)"):
        ExpressionLoss(None).eval()(logits, target)
    # ... inside it the check would cost a host sync per step, and gather still refuses the index
    with pytest.raises(RuntimeError, match="out of bounds"):
        ExpressionLoss(None)(logits, target)
    with pytest.raises(ConfigError, match="loss.gamma"):
        ExpressionLoss(None, focal_gamma=-1.0)


def _ccc_numpy(x: np.ndarray, y: np.ndarray) -> float:
    mx, my = x.mean(), y.mean()
    cov = np.mean((x - mx) * (y - my))
    return 2 * cov / (x.var() + y.var() + (mx - my) ** 2)


def test_ccc_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(0.2, 0.5, 50)
    y = 0.7 * x + rng.normal(-0.1, 0.3, 50)
    got = ccc(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)).item()
    assert got == pytest.approx(_ccc_numpy(x, y), abs=1e-6)
    t = torch.tensor(x, dtype=torch.float32)
    assert ccc(t, t).item() == pytest.approx(1.0, abs=1e-6)
    # A shifted copy is perfectly correlated but not concordant.
    assert ccc(t, t + 0.5).item() == pytest.approx(_ccc_numpy(x, x + 0.5), abs=1e-6)
    assert ccc(t, t + 0.5).item() < 1.0


def test_ccc_of_constant_equal_vectors_is_not_nan():
    assert ccc(torch.zeros(5), torch.zeros(5)).item() == 0.0


def _va_data(seed: int = 0, n: int = 10):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(n, 2, generator=g) * 2 - 1
    target = (pred * 0.5 + torch.randn(n, 2, generator=g) * 0.3).clamp(-1, 1)
    return pred, target


def test_va_loss_ccc_ignores_missing_rows():
    pred, target = _va_data()
    target[[2, 5], :] = float("nan")
    keep = [i for i in range(10) if i not in (2, 5)]
    p = pred.clone().requires_grad_(True)
    loss = va_loss(p, target, kind="ccc")
    pn, tn = pred[keep].numpy().astype(np.float64), target[keep].numpy().astype(np.float64)
    expected = np.mean([1 - _ccc_numpy(pn[:, 0], tn[:, 0]), 1 - _ccc_numpy(pn[:, 1], tn[:, 1])])
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert loss.item() == pytest.approx(va_loss(pred[keep], target[keep]).item(), abs=1e-6)
    loss.backward()
    assert torch.isfinite(p.grad).all()
    assert torch.all(p.grad[[2, 5]] == 0)


def test_va_loss_masks_each_column_separately():
    pred, target = _va_data(1)
    target[1, 0] = float("nan")  # valence missing on row 1 only
    target[3, 1] = float("nan")  # arousal missing on row 3 only
    mv = [i for i in range(10) if i != 1]
    ma = [i for i in range(10) if i != 3]
    pn, tn = pred.numpy().astype(np.float64), target.numpy().astype(np.float64)
    expected = np.mean([1 - _ccc_numpy(pn[mv, 0], tn[mv, 0]), 1 - _ccc_numpy(pn[ma, 1], tn[ma, 1])])
    assert va_loss(pred, target).item() == pytest.approx(expected, abs=1e-5)


def test_va_loss_mse_on_valid_subset():
    pred, target = _va_data(2)
    target[[0, 7], :] = float("nan")
    keep = [i for i in range(10) if i not in (0, 7)]
    expected = ((pred[keep] - target[keep]) ** 2).mean().item()
    assert va_loss(pred, target, kind="mse").item() == pytest.approx(expected, rel=1e-6)


def test_va_loss_falls_back_when_too_few_rows():
    pred = torch.tensor([[0.1, 0.2], [0.3, -0.4], [0.5, 0.6]], requires_grad=True)
    target = torch.tensor([[float("nan")] * 2, [float("nan")] * 2, [0.0, 1.0]])
    # One valid row: CCC is undefined, so MSE on it: ((0.5-0)^2 + (0.6-1)^2) / 2.
    assert va_loss(pred, target).item() == pytest.approx((0.25 + 0.16) / 2, rel=1e-6)
    nothing = va_loss(pred, torch.full((3, 2), float("nan")))
    assert nothing.item() == 0.0
    nothing.backward()
    assert torch.all(pred.grad == 0)


def test_va_loss_rejects_unknown_kind():
    pred, target = _va_data()
    with pytest.raises(ConfigError, match="loss.va must be one of ccc, mse"):
        va_loss(pred, target, kind="l1")


def test_landmark_loss_masks_missing_points():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(3, 68, 2, generator=g, requires_grad=True)
    target = torch.rand(3, 68, 2, generator=g)
    target[1] = float("nan")  # a face without landmarks
    target[0, 10] = float("nan")  # one missing point
    valid = ~torch.isnan(target)
    expected = F.smooth_l1_loss(pred.detach()[valid], target[valid], beta=0.01)
    loss = landmark_loss(pred, target)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(pred.grad).all()
    assert torch.all(pred.grad[1] == 0)


def test_landmark_loss_hand_value_and_empty():
    pred = torch.zeros(1, 68, 2)
    target = torch.full((1, 68, 2), float("nan"))
    target[0, 0] = torch.tensor([0.005, 0.5])
    # smooth-L1, beta 0.01: |d| < beta -> 0.5 d^2 / beta; else |d| - beta / 2.
    expected = (0.5 * 0.005**2 / 0.01 + (0.5 - 0.005)) / 2
    assert landmark_loss(pred, target).item() == pytest.approx(expected, rel=1e-6)
    assert landmark_loss(pred, torch.full((1, 68, 2), float("nan"))).item() == 0.0


# ----------------------------------------------------------------------------------------------------------------
# Class weights scale each sample's whole loss (smoothing and focal included); the mean divides by sum of w_y.


@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_weighted_smoothed_loss_is_w_y_times_unweighted_per_sample(gamma):
    logits, target, weights = _batch(4, n=12, c=4)
    target[[2, 7]] = -1
    eps = 0.1
    keep = target >= 0
    # unweighted smoothed (focal) loss per sample, by hand: (1 - eps) * -log p_y + eps/K * sum_c -log p_c
    logp = torch.log_softmax(logits.double(), 1)
    y = target.clamp_min(0)
    logp_y = logp.gather(1, y[:, None]).squeeze(1)
    per = -(1 - eps) * logp_y - eps / 4 * logp.sum(1)
    per = (1 - logp_y.exp()) ** gamma * per
    w_y = weights.double()[y] * keep
    expected = float((w_y * per).sum() / w_y.sum())
    got = ExpressionLoss(weights, label_smoothing=eps, focal_gamma=gamma)(logits, target).item()
    assert got == pytest.approx(expected, rel=1e-5)
    # per sample: a one-sample batch gives the unweighted loss whatever its weight (w_y / w_y)
    for i in torch.nonzero(keep).flatten()[:3].tolist():
        single = ExpressionLoss(weights, label_smoothing=eps, focal_gamma=gamma)(logits[i : i + 1], target[i : i + 1])
        assert single.item() == pytest.approx(float(per[i]), rel=1e-5)


def test_weighted_smoothed_hand_value():
    # two samples, K = 2: logits (0, 0) and (ln 3, 0) -> p = (1/2, 1/2) and (3/4, 1/4); targets 0 and 1
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    target = torch.tensor([0, 1])
    w = torch.tensor([1.0, 9.0])
    eps = 0.2
    l0 = 0.8 * math.log(2) + 0.1 * (math.log(2) + math.log(2))
    l1 = 0.8 * -math.log(0.25) + 0.1 * (-math.log(0.75) - math.log(0.25))
    expected = (1 * l0 + 9 * l1) / 10
    assert ExpressionLoss(w, label_smoothing=eps)(logits, target).item() == pytest.approx(expected, rel=1e-6)


def _imbalanced_problem(seed: int, n_major: int, n_minor: int):
    """16-dim Gaussians (one 1x4x4 'image' per sample), class 0 the majority, class 1 the rare class."""
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randn(n_major, 1, 4, 4, generator=g) - 0.5, torch.randn(n_minor, 1, 4, 4, generator=g) + 0.5])
    y = torch.cat([torch.zeros(n_major, dtype=torch.long), torch.ones(n_minor, dtype=torch.long)])
    return x, y


def _recalls(loss_fn, *, mixer=None, steps=150):
    """Full-batch training of a linear model on a 500:1 problem; recall of each class on a balanced fresh set."""
    torch.manual_seed(0)
    x, y = _imbalanced_problem(0, 5000, 10)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(steps):
        mix = mixer.draw(len(x), 4, 4) if mixer is not None else None
        inputs = mix_images(x, mix) if mix is not None else x
        logits = model(inputs)
        loss = mixed_expression_loss(loss_fn, logits, y, mix) if mix is not None else loss_fn(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = _imbalanced_problem(1, 2000, 2000)
    with torch.no_grad():
        pred = model(xt).argmax(1)
    return [float((pred[yt == c] == c).float().mean()) for c in (0, 1)]


def _cb_weights():
    return class_weights([5000, 10], "class_balanced", beta=0.9999)


def test_class_balanced_smoothing_keeps_majority_recall():
    weights = _cb_weights()
    assert float(weights[1] / weights[0]) > 300  # the regime where the old formula collapsed
    ce_major, ce_minor = _recalls(ExpressionLoss(None, label_smoothing=0.1))
    cb_major, cb_minor = _recalls(ExpressionLoss(weights, label_smoothing=0.1))
    assert ce_major > 0.95
    assert cb_major > 0.8 and cb_minor > 0.8
    # the class-weighted smoothing term (F.cross_entropy(weight=..., label_smoothing=...)) predicts the rare class
    old_major, old_minor = _recalls(lambda lg, t: F.cross_entropy(lg, t, weight=weights, label_smoothing=0.1))
    assert old_major < 0.2 and old_minor > 0.95


def test_focal_with_class_weights_and_smoothing_keeps_majority_recall():
    major, minor = _recalls(ExpressionLoss(_cb_weights(), label_smoothing=0.1, focal_gamma=2.0))
    assert major > 0.8 and minor > 0.8


@pytest.mark.parametrize("kind", ["mixup", "cutmix"])
def test_mixing_with_class_weights_and_smoothing_keeps_majority_recall(kind):
    mixer = Mixer(mixup_alpha=0.4) if kind == "mixup" else Mixer(cutmix_alpha=1.0)
    major, minor = _recalls(ExpressionLoss(_cb_weights(), label_smoothing=0.1), mixer=mixer)
    assert major > 0.8 and minor > 0.8


def test_beta_for_ratio_caps_the_weight_ratio():
    counts = [6868, 5696, 368, 268, 252, 208, 21, 9]  # seed 002's legend.csv counts
    beta = beta_for_ratio(counts, 100.0)
    w = class_weights(counts, "class_balanced", beta=beta)
    assert float(w.max() / w.min()) == pytest.approx(100.0, rel=1e-6)
    assert beta_for_ratio([100, 50], 100.0) is None  # n_max / n_min = 2: no beta reaches 100


def test_weight_ratio_warning_names_the_capping_beta():
    counts = [6868, 5696, 368, 268, 252, 208, 21, 9]
    w = class_weights(counts, "class_balanced", beta=0.999)
    msg = weight_ratio_warning(counts, w, "class_balanced", 0.999)
    ratio = float(w.max() / w.min())
    assert msg is not None and f"{ratio:.0f}x apart" in msg
    capped = beta_for_ratio(counts, 100.0)
    assert f"loss.beta={capped:.6g}" in msg
    assert (
        weight_ratio_warning(counts, class_weights(counts, "class_balanced", beta=0.9), "class_balanced", 0.9) is None
    )
    assert weight_ratio_warning(counts, None, "none", 0.0) is None
