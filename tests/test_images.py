"""load_face: JPEG draft, face-box crop, every PIL mode, EXIF orientation and unreadable files, on real files."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from fer_lightning.data.images import ImageDecodeError, load_face, resolve_image_path, to_chw

BILINEAR = Image.Resampling.BILINEAR


def smooth_rgb(h: int, w: int) -> np.ndarray:
    """A smooth colour image: low-frequency sine pattern and two ramps."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    r = 128 + 100 * np.sin(2 * np.pi * 2 * xx) * np.cos(2 * np.pi * 1.5 * yy)
    return np.stack([r, 255 * xx, 255 * (1 - yy)], axis=-1).clip(0, 255).astype(np.uint8)


def by_hand(path: Path, size: int, mode: str, crop: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The independent reference: PIL open, crop, convert, bilinear resize."""
    with Image.open(path) as img:
        img = img.crop(crop) if crop else img
        arr = np.asarray(img.convert(mode).resize((size, size), BILINEAR))
    return arr[:, :, None] if arr.ndim == 2 else arr


def uniform(path: Path, mode: str, color, size: tuple[int, int] = (12, 10), **save) -> Path:
    Image.new(mode, size, color).save(path, **save)
    return path


@pytest.fixture
def big_jpeg(tmp_path: Path) -> Path:
    path = tmp_path / "face.jpg"
    Image.fromarray(smooth_rgb(512, 512)).save(path, quality=95)
    return path


# --- JPEG draft ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_draft_close_to_full_decode(big_jpeg: Path, channels: int) -> None:
    drafted = load_face(big_jpeg, size=64, channels=channels, draft=True).astype(int)
    full = load_face(big_jpeg, size=64, channels=channels, draft=False).astype(int)
    diff = np.abs(drafted - full)
    print(f"draft vs full, channels={channels}: mean abs diff {diff.mean():.3f}, max {diff.max()}")
    assert drafted.shape == full.shape == (64, 64, channels)
    assert diff.mean() < 2.0
    # The draft path really decoded differently (reduced DCT scale), otherwise this test shows nothing.
    assert diff.max() > 0


def test_full_decode_is_plain_pil(big_jpeg: Path) -> None:
    np.testing.assert_array_equal(load_face(big_jpeg, size=64, channels=3, draft=False), by_hand(big_jpeg, 64, "RGB"))


def test_small_target_relative_to_crop_does_not_draft(big_jpeg: Path) -> None:
    # Crop 200 px -> 64 px: half-scale decoding would leave 100 px < DRAFT_GAP * 64, so the plain path is taken.
    box = (100.0, 50.0, 200.0, 200.0)
    np.testing.assert_array_equal(
        load_face(big_jpeg, size=64, channels=3, box=box, draft=True),
        load_face(big_jpeg, size=64, channels=3, box=box, draft=False),
    )


def test_draft_with_box_rescales_the_box(big_jpeg: Path) -> None:
    box = (96.0, 160.0, 256.0, 256.0)  # 256 px crop -> 32 px: DCT scale 4
    drafted = load_face(big_jpeg, size=32, channels=3, box=box, draft=True).astype(int)
    full = load_face(big_jpeg, size=32, channels=3, box=box, draft=False).astype(int)
    reference = by_hand(big_jpeg, 32, "RGB", crop=(96, 160, 352, 416)).astype(int)
    np.testing.assert_array_equal(full, reference)
    diff = np.abs(drafted - full)
    print(f"draft vs full with a face box: mean abs diff {diff.mean():.3f}")
    assert diff.mean() < 2.0
    # A box left unscaled would take the wrong region: compare with the crop of the unscaled corner.
    wrong = by_hand(big_jpeg, 32, "RGB", crop=(24, 40, 88, 104)).astype(int)
    assert np.abs(drafted - wrong).mean() > 10


# --- face box --------------------------------------------------------------------------------------------------


def test_box_crop_equals_pil_crop_and_resize(tmp_path: Path) -> None:
    path = tmp_path / "face.png"
    Image.fromarray(smooth_rgb(90, 120)).save(path)
    out = load_face(path, size=24, channels=3, box=(10.0, 20.0, 50.0, 40.0))
    np.testing.assert_array_equal(out, by_hand(path, 24, "RGB", crop=(10, 20, 60, 60)))


def test_box_is_clamped_to_the_image(tmp_path: Path) -> None:
    path = tmp_path / "face.png"
    Image.fromarray(smooth_rgb(90, 120)).save(path)
    out = load_face(path, size=16, channels=1, box=(-10.0, 70.0, 50.0, 50.0))
    np.testing.assert_array_equal(out, by_hand(path, 16, "L", crop=(0, 70, 40, 90)))


@pytest.mark.parametrize("box", [None, (np.nan, np.nan, np.nan, np.nan), (5.0, np.nan, 10.0, 10.0)])
def test_missing_box_means_whole_image(tmp_path: Path, box) -> None:
    path = tmp_path / "face.png"
    Image.fromarray(smooth_rgb(40, 30)).save(path)
    np.testing.assert_array_equal(load_face(path, size=20, channels=3, box=box), by_hand(path, 20, "RGB"))


def test_box_outside_the_image_raises(tmp_path: Path) -> None:
    path = uniform(tmp_path / "face.png", "RGB", (1, 2, 3))
    with pytest.raises(ImageDecodeError, match="face box .* is empty inside the 12x10 image") as info:
        load_face(path, size=8, channels=3, box=(50.0, 0.0, 10.0, 10.0))
    assert info.value.path == str(path)


# --- modes: hand values on uniform images, so the resize cannot blur them --------------------------------------


@pytest.mark.parametrize(
    ("mode", "color", "suffix", "expect_rgb", "expect_l"),
    [
        ("L", 77, "png", (77, 77, 77), 77),
        ("RGB", (200, 100, 50), "png", (200, 100, 50), 124),  # L = .299*200 + .587*100 + .114*50 = 124.2
        ("RGBA", (200, 100, 50, 128), "png", (100, 50, 25), 62),  # on black: c * 128/255; L of (100,50,25)
        ("LA", (200, 64), "png", (50, 50, 50), 50),  # 200 * 64/255 = 50.2
        ("1", 1, "png", (255, 255, 255), 255),
        ("CMYK", (0, 255, 255, 0), "jpg", (255, 0, 0), 76),  # pure red; L = .299*255
    ],
)
def test_mode_converts_to_hand_values(tmp_path: Path, mode, color, suffix, expect_rgb, expect_l) -> None:
    path = uniform(tmp_path / f"img.{suffix}", mode, color, quality=95) if suffix == "jpg" else None
    path = path or uniform(tmp_path / f"img.{suffix}", mode, color)
    with Image.open(path) as img:
        assert img.mode == mode
    tol = 2 if suffix == "jpg" else 0
    rgb = load_face(path, size=8, channels=3).astype(int)
    grey = load_face(path, size=8, channels=1).astype(int)
    assert rgb.shape == (8, 8, 3) and grey.shape == (8, 8, 1)
    assert np.abs(rgb - np.array(expect_rgb)).max() <= tol
    assert np.abs(grey - expect_l).max() <= tol


def test_cmyk_jpeg_matches_pil_conversion(tmp_path: Path) -> None:
    path = uniform(tmp_path / "cmyk.jpg", "CMYK", (0, 128, 255, 64), quality=95)
    np.testing.assert_array_equal(load_face(path, size=6, channels=3), by_hand(path, 6, "RGB"))


def test_palette_png_with_and_without_transparency(tmp_path: Path) -> None:
    idx = np.array([[0, 1, 2, 0]], dtype=np.uint8).repeat(2, axis=0)
    img = Image.fromarray(idx)
    img = img.convert("P") if img.mode != "P" else img
    img.putpalette([10, 20, 30, 200, 0, 0, 0, 255, 0] + [0] * (253 * 3))
    img.save(tmp_path / "p.png")
    img.save(tmp_path / "pt.png", transparency=1)  # index 1 transparent -> black
    with Image.open(tmp_path / "pt.png") as check:
        assert check.mode == "P" and "transparency" in check.info
    plain = load_face(tmp_path / "p.png", size=4, channels=3)
    np.testing.assert_array_equal(plain[0], [[10, 20, 30], [200, 0, 0], [0, 255, 0], [10, 20, 30]])
    transparent = load_face(tmp_path / "pt.png", size=4, channels=3)
    np.testing.assert_array_equal(transparent[0], [[10, 20, 30], [0, 0, 0], [0, 255, 0], [10, 20, 30]])


SIXTEEN = np.array([0, 1000, 32896, 65535], dtype=np.uint16)
# round(v / 257): 65535 -> 255, 32896 = 128 * 257 -> 128, 1000 / 257 = 3.89 -> 4. PIL's own convert clips to 255.
EIGHT = np.array([0, 4, 128, 255], dtype=np.uint8)


def test_sixteen_bit_png_scales_not_clips(tmp_path: Path) -> None:
    path = tmp_path / "depth.png"
    Image.fromarray(np.repeat(SIXTEEN[None, :], 4, axis=0)).save(path)
    with Image.open(path) as img:
        assert img.mode == "I;16"
    grey = load_face(path, size=4, channels=1)[..., 0]
    np.testing.assert_array_equal(grey, np.repeat(EIGHT[None, :], 4, axis=0))
    rgb = load_face(path, size=4, channels=3)
    np.testing.assert_array_equal(rgb, np.repeat(grey[:, :, None], 3, axis=2))


def test_int32_tiff(tmp_path: Path) -> None:
    path = tmp_path / "int.tif"
    Image.fromarray(np.repeat(SIXTEEN[None, :].astype(np.int32), 2, axis=0)).save(path)
    with Image.open(path) as img:
        assert img.mode == "I"
    np.testing.assert_array_equal(load_face(path, size=4, channels=1)[0, :, 0], EIGHT)
    # Outside [0, 65535]: min-max scaled, -1000 -> 0, 99000 -> 255, 49000 -> 127.5 -> 128 (rint: 128 even).
    other = tmp_path / "signed.tif"
    Image.fromarray(np.array([[-1000, 49000, 99000, 99000]], dtype=np.int32)).save(other)
    np.testing.assert_array_equal(load_face(other, size=4, channels=1)[0, :, 0], [0, 128, 255, 255])


def test_float_tiff(tmp_path: Path) -> None:
    path = tmp_path / "float.tif"
    Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)).save(path)
    with Image.open(path) as img:
        assert img.mode == "F"
    # x * 255: 63.75 -> 64, 127.5 -> 128
    np.testing.assert_array_equal(load_face(path, size=4, channels=1)[0, :, 0], [0, 64, 128, 255])


# --- EXIF orientation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["png", "jpg"])
def test_exif_orientation_is_applied_and_box_is_upright(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"rotated.{suffix}"
    img = Image.fromarray(smooth_rgb(60, 100))
    exif = img.getexif()
    exif[0x0112] = 6  # stored landscape, displayed rotated 90 degrees clockwise (portrait 60 x 100)
    img.save(path, exif=exif, **({"quality": 95} if suffix == "jpg" else {}))
    with Image.open(path) as raw:
        upright = ImageOps.exif_transpose(raw)
    assert upright.size == (60, 100)
    whole = load_face(path, size=30, channels=3, draft=False)
    np.testing.assert_array_equal(whole, np.asarray(upright.resize((30, 30), BILINEAR)))
    boxed = load_face(path, size=20, channels=3, box=(10.0, 50.0, 40.0, 40.0), draft=False)
    np.testing.assert_array_equal(boxed, np.asarray(upright.crop((10, 50, 50, 90)).resize((20, 20), BILINEAR)))


def test_exif_orientation_with_draft(tmp_path: Path) -> None:
    path = tmp_path / "rotated_big.jpg"
    img = Image.fromarray(smooth_rgb(400, 640))
    exif = img.getexif()
    exif[0x0112] = 8
    img.save(path, exif=exif, quality=95)
    box = (40.0, 200.0, 320.0, 320.0)  # upright image is 400 x 640
    drafted = load_face(path, size=32, channels=3, box=box, draft=True).astype(int)
    full = load_face(path, size=32, channels=3, box=box, draft=False).astype(int)
    assert np.abs(drafted - full).mean() < 2.0


# --- unreadable files ------------------------------------------------------------------------------------------


def _truncated(tmp_path: Path) -> Path:
    whole = tmp_path / "whole.jpg"
    Image.fromarray(smooth_rgb(256, 256)).save(whole, quality=95)
    path = tmp_path / "truncated.jpg"
    data = whole.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _empty(tmp_path: Path) -> Path:
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    return path


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "nowhere.jpg"


def _junk(tmp_path: Path) -> Path:
    path = tmp_path / "junk.png"
    path.write_bytes(b"not an image at all" * 10)
    return path


@pytest.mark.parametrize("draft", [True, False])
@pytest.mark.parametrize(
    ("make", "reason"),
    [(_truncated, "truncated"), (_empty, "empty file"), (_missing, "file not found"), (_junk, "cannot identify")],
)
def test_unreadable_files_raise_naming_the_path(tmp_path: Path, make, reason: str, draft: bool) -> None:
    path = make(tmp_path)
    with pytest.raises(ImageDecodeError) as info:
        load_face(path, size=32, channels=3, draft=draft)
    assert info.value.path == str(path)
    assert str(path) in str(info.value) and reason in str(info.value)
    assert "data.checks=drop" in str(info.value)


def test_decode_error_survives_pickling(tmp_path: Path) -> None:
    err = pickle.loads(pickle.dumps(ImageDecodeError(tmp_path / "x.jpg", "truncated")))
    assert isinstance(err, ImageDecodeError)
    assert (err.path, err.reason) == (str(tmp_path / "x.jpg"), "truncated")


@pytest.mark.parametrize(("size", "channels"), [(0, 3), (16, 2), (16, 4)])
def test_bad_arguments(tmp_path: Path, size: int, channels: int) -> None:
    path = uniform(tmp_path / "x.png", "RGB", (1, 2, 3))
    with pytest.raises(ValueError, match="size|channels"):
        load_face(path, size=size, channels=channels)


# --- helpers ---------------------------------------------------------------------------------------------------


def test_to_chw_and_resolve(tmp_path: Path) -> None:
    hwc = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    chw = to_chw(hwc)
    assert chw.shape == (4, 2, 3) and chw.flags.c_contiguous
    assert chw[1, 0, 2] == hwc[0, 2, 1]
    assert to_chw(hwc[:, :, 0]).shape == (1, 2, 3)
    assert resolve_image_path(tmp_path, "a/b.jpg") == tmp_path / "a" / "b.jpg"
    assert resolve_image_path(tmp_path, "/abs/c.jpg") == Path("/abs/c.jpg")
