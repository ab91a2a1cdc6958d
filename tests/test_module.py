"""FERModule: missing targets are masked (equal to the loss on the valid subset), uint8 input normalized on device."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fer_lightning.models.module import FERModule

NAMES = ["neutral", "happy", "sad"]


def make_module(**kw) -> FERModule:
    torch.manual_seed(0)
    return FERModule(
        class_names=NAMES,
        class_ids=[0, 1, 2],
        backbone={"name": "simple_cnn"},
        image_size=32,
        channels=3,
        class_counts=[10, 5, 2],
        loss={"weighting": "class_balanced", "beta": 0.9, "va": "mse", "va_weight": 0.5},
        **kw,
    )


def batch(expr, val, aro):
    g = torch.Generator().manual_seed(1)
    n = len(expr)
    return {
        "image": torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g),
        "expression": torch.tensor(expr),
        "valence": torch.tensor(val, dtype=torch.float32),
        "arousal": torch.tensor(aro, dtype=torch.float32),
        "index": torch.arange(n),
    }


def test_missing_targets_are_masked_not_invented():
    m = make_module().eval()
    nan = math.nan
    b = batch([0, -1, 2, 1], [0.5, 0.1, nan, -0.3], [0.2, nan, nan, 0.4])
    with torch.no_grad():
        out = m(b["image"])
        parts = m.losses(out, b)
    # expression: weighted CE over rows 0, 2, 3 only (row 1 has no label)
    w = m.expression_loss.weights
    logits, target = out["logits"][[0, 2, 3]], torch.tensor([0, 2, 1])
    expected_ce = F.cross_entropy(logits, target, weight=w)
    assert parts["expression"].item() == pytest.approx(expected_ce.item(), rel=1e-5)
    # valence: rows 0, 1, 3 ; arousal: rows 0, 3 ; mse per column, averaged over the two columns
    va = out["va"]
    mse_v = ((va[[0, 1, 3], 0] - torch.tensor([0.5, 0.1, -0.3])) ** 2).mean()
    mse_a = ((va[[0, 3], 1] - torch.tensor([0.2, 0.4])) ** 2).mean()
    assert parts["va"].item() == pytest.approx(((mse_v + mse_a) / 2).item(), rel=1e-5)
    assert parts["total"].item() == pytest.approx(expected_ce.item() + 0.5 * parts["va"].item(), rel=1e-5)


def test_uint8_input_equals_host_normalized_float():
    m = make_module().eval()
    b = batch([0, 1], [0.0, 0.0], [0.0, 0.0])
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    host = (b["image"].float() / 255 - mean) / std
    with torch.no_grad():
        a, c = m(b["image"]), m(host)
    torch.testing.assert_close(a["logits"], c["logits"])


def test_class_weights_follow_counts_and_checkpoint_keeps_class_order(tmp_path):
    m = make_module()
    w = m.expression_loss.weights
    # effective number weights for counts 10/5/2, beta 0.9, normalized to sum to 3
    raw = torch.tensor([(1 - 0.9) / (1 - 0.9**n) for n in (10, 5, 2)])
    torch.testing.assert_close(w, raw / raw.sum() * 3)
    assert m.hparams.class_names == NAMES
