"""Batched training augmentation (augment.where=batch): per-sample draws, pixel values checked by hand, config errors."""

from __future__ import annotations

import pytest
import torch

from fer_lightning.config import ConfigError
from fer_lightning.data.datamodule import resolve_num_workers
from fer_lightning.data.transforms import augment_where
from fer_lightning.models.batch_augment import BatchAugment


def _images(n: int = 32, c: int = 1, size: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    # values 1..255 so that the zero fill of a shift is told apart from image content
    return torch.randint(1, 256, (n, c, size, size), dtype=torch.uint8, generator=g)


def test_no_transform_gives_the_image_in_unit_range():
    x = _images()
    aug = BatchAugment({"hflip": 0.0, "translate": 0.0}, 16)
    assert not aug.enabled
    torch.testing.assert_close(aug(x), x.float() / 255)


def test_flip_with_p_one_mirrors_every_image():
    x = _images(c=3)
    out = BatchAugment({"hflip": 1.0}, 16)(x)
    torch.testing.assert_close(out, torch.flip(x, dims=[-1]).float() / 255)


def test_flip_with_p_half_mirrors_some_images_per_sample():
    torch.manual_seed(1)
    x = _images(n=64)
    out = BatchAugment({"hflip": 0.5}, 16)(x)
    ref, mirrored = x.float() / 255, torch.flip(x, dims=[-1]).float() / 255
    same = [(out[i] == ref[i]).all().item() for i in range(64)]
    flipped = [(out[i] == mirrored[i]).all().item() for i in range(64)]
    assert all(a or b for a, b in zip(same, flipped))
    assert 15 < sum(flipped) < 49  # independent draws, about half


def _shift_of(out: torch.Tensor, ref: torch.Tensor, pad: int) -> tuple[int, int] | None:
    """The integer (dy, dx) for which out is ref shifted with zero fill, or None."""
    size = ref.shape[-1]
    for dy in range(-pad, pad + 1):
        for dx in range(-pad, pad + 1):
            expected = torch.zeros_like(ref)
            ys, yd = (slice(0, size - dy), slice(dy, size)) if dy >= 0 else (slice(-dy, size), slice(0, size + dy))
            xs, xd = (slice(0, size - dx), slice(dx, size)) if dx >= 0 else (slice(-dx, size), slice(0, size + dx))
            expected[..., yd, xd] = ref[..., ys, xs]
            if torch.equal(out, expected):
                return dy, dx
    return None


def test_translate_is_an_integer_shift_with_zero_fill_drawn_per_sample():
    torch.manual_seed(2)
    x = _images(n=24)
    out = BatchAugment({"translate": 0.125}, 16)(x)  # 0.125 * 16 = 2 pixels at most
    ref = x.float() / 255
    shifts = [_shift_of(out[i], ref[i], 2) for i in range(24)]
    assert all(s is not None for s in shifts), shifts
    assert len(set(shifts)) > 3  # not one shift for the whole batch


def test_draws_repeat_under_the_same_seed():
    x = _images()
    aug = BatchAugment({"hflip": 0.5, "rotation": 10, "translate": 0.1, "scale": [0.9, 1.1]}, 16)
    torch.manual_seed(5)
    a = aug(x)
    torch.manual_seed(5)
    b = aug(x)
    torch.manual_seed(6)
    c = aug(x)
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0 and a.max() <= 1


def test_strong_preset_runs_with_erasing_and_jitter():
    torch.manual_seed(0)
    x = _images(c=3)
    cfg = {"hflip": 0.5, "rotation": 10, "translate": 0.08, "scale": [0.9, 1.1], "brightness": 0.2,
           "contrast": 0.2, "erasing": 1.0}  # fmt: skip
    out = BatchAugment(cfg, 16)(x)
    assert out.shape == x.shape and out.dtype == torch.float32
    assert not torch.equal(out, x.float() / 255)


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"hflip": 1.5}, r"augment.hflip=1.5 is invalid"),
        ({"translate": "x"}, r"augment.translate='x' is invalid"),
        ({"scale": [1.1, 0.9]}, r"augment.scale"),
        ({"blur": 0.3}, r"unknown key\(s\) \['blur'\]"),
    ],
)
def test_bad_values_name_the_key(cfg, match):
    with pytest.raises(ConfigError, match=match):
        BatchAugment(cfg, 16)


def test_where_is_checked_and_defaults_to_batch():
    assert augment_where({}) == "batch"
    assert augment_where({"where": "loader"}) == "loader"
    with pytest.raises(ConfigError, match=r"augment.where='gpu' is not one of batch, loader"):
        augment_where({"where": "gpu"})


def test_auto_workers_are_none_for_cache_slices():
    assert resolve_num_workers("auto", light_items=True) == 0
    assert resolve_num_workers(3, light_items=True) == 3
