"""The augment config group composes the training transform it names (torchvision v2, uint8 CHW in and out)."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from torchvision.transforms import v2

from fer_lightning.config_dir import CONF_DIR
from fer_lightning.data.transforms import build_train_transform, normalize_on_device


def _group(option: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "augment" / f"{option}.yaml"))


def test_each_augment_option_composes_what_it_names():
    assert build_train_transform(_group("none")) is None
    basic = build_train_transform(_group("basic"))
    assert [type(t) for t in basic.transforms] == [v2.RandomHorizontalFlip, v2.RandomAffine]
    affine = basic.transforms[1]
    assert affine.degrees == [0.0, 0.0] and affine.translate == (0.06, 0.06) and affine.scale == (1.0, 1.0)
    strong = build_train_transform(_group("strong"))
    assert [type(t) for t in strong.transforms] == [v2.RandomHorizontalFlip, v2.RandomAffine, v2.ColorJitter]
    assert strong.transforms[1].degrees == [-10.0, 10.0]


def test_flip_and_shift_move_pixels_as_asked():
    torch.manual_seed(0)
    x = torch.arange(3 * 8 * 8, dtype=torch.int32).remainder(256).to(torch.uint8).reshape(3, 8, 8)
    flipped = build_train_transform({"hflip": 1.0})(x)
    assert flipped.dtype == torch.uint8 and torch.equal(flipped, x.flip(-1))
    # translate 0.25 of 8 px: every output is the input shifted by a whole number of pixels in [-2, 2] per axis
    # (nearest interpolation), with zeros where it came from outside
    shift = build_train_transform({"translate": 0.25})
    for _ in range(20):
        y = shift(x)
        matches = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.zeros_like(x)
                ys, yd = slice(max(0, -dy), 8 - max(0, dy)), slice(max(0, dy), 8 - max(0, -dy))
                xs, xd = slice(max(0, -dx), 8 - max(0, dx)), slice(max(0, dx), 8 - max(0, -dx))
                ref[:, yd, xd] = x[:, ys, xs]
                matches.append(torch.equal(y, ref))
        assert any(matches)


def test_normalize_on_device_matches_hand_formula():
    x = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    out = normalize_on_device(x, torch.tensor([0.5]), torch.tensor([0.25]))
    expected = (torch.tensor([[0.0, 1.0], [0.2, 0.4]]) - 0.5) / 0.25
    assert torch.allclose(out[0, 0], expected)
