"""Decode one face image: open, (JPEG draft), EXIF orientation, face-box crop, mode conversion, resize.

This is the only place that turns an image file into pixels; the cache and the dataset both call `load_face`.

Policy (also part of the cache fingerprint through `DECODE_POLICY`):
- The face box (x, y, w, h) is in pixel coordinates of the full-resolution image after EXIF orientation
  (what an image viewer or OpenCV's imread shows). It is clamped to the image; any NaN means the whole image.
  Crop coordinates are rounded to whole pixels, and nothing outside the box leaks into the result.
- Alpha (RGBA, LA, P with transparency) is composited on black, so transparent pixels are black whatever
  colour data they hide.
- 16-bit grey ('I;16*', and 'I' with values in [0, 65535]) maps v -> round(v / 257), so 65535 -> 255 exactly;
  other 'I' ranges and 'F' images outside [0, 1] / [0, 255] are min-max scaled to [0, 255] per image.
- The crop is resized to (size, size) with PIL's bilinear filter, which widens its support when shrinking
  (antialiased). The aspect ratio is not kept: face boxes are expected to be roughly square.
- JPEG draft: when the crop is at least `DRAFT_GAP` times larger than the target, libjpeg decodes at 1/2, 1/4
  or 1/8 scale (DCT scaling), keeping the decoded crop >= DRAFT_GAP * size before the final resize.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps

# Decoded crop must stay >= DRAFT_GAP * size (as PIL's thumbnail). Measured on a 512px JPEG: mean |draft - full|
# is ~0.2 grey levels (smooth) and ~0.6 (noisy texture) with 2, but up to 2.5 with 1.
DRAFT_GAP = 2.0

DECODE_POLICY: dict[str, Any] = {
    "box": "upright-pixels,clamp,round,nan=whole",
    "alpha": "composite-black",
    "int16": "div257",
    "resample": "bilinear-antialias",
    "exif": "transpose",
    "draft_gap": DRAFT_GAP,
}

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
# EXIF orientations 5-8 swap width and height.
_SWAPS_AXES = (5, 6, 7, 8)


class ImageDecodeError(RuntimeError):
    """An image file that cannot be turned into pixels (missing, empty, truncated, undecodable, bad box)."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"cannot decode image {self.path}: {reason}. Fix or remove the file, or set data.checks=drop "
            "to exclude unreadable files before training."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the exception picklable across multiprocessing workers despite the two-argument constructor.
        return (type(self), (self.path, self.reason))


def resolve_image_path(root: str | Path, path: str | Path) -> Path:
    """Join a records `path` to the data root (absolute paths are kept as they are)."""
    p = Path(path)
    return p if p.is_absolute() else Path(root) / p


def load_face(
    path: str | Path,
    *,
    size: int,
    channels: int,
    box: tuple[float, float, float, float] | None = None,
    draft: bool = True,
) -> np.ndarray:
    """Decode `path`, crop the face box, convert to L/RGB and resize: uint8 array (size, size, channels)."""
    if not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    path = Path(path)
    if not path.is_file():
        raise ImageDecodeError(path, "file not found" if not path.exists() else "not a regular file")
    if path.stat().st_size == 0:
        raise ImageDecodeError(path, "empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            out = _decode(img, path, size=int(size), channels=channels, box=box, draft=draft)
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises a zoo (OSError, SyntaxError, ValueError, struct.error, ...)
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}") from e
    arr = np.asarray(out, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return arr


def to_chw(arr: np.ndarray) -> np.ndarray:
    """(H, W, C) or (H, W) -> contiguous (C, H, W)."""
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def _decode(
    img: Image.Image, path: Path, *, size: int, channels: int, box: tuple[float, ...] | None, draft: bool
) -> Image.Image:
    orientation = int(img.getexif().get(ExifTags.Base.Orientation, 1) or 1)
    raw_w, raw_h = img.size
    up_w, up_h = (raw_h, raw_w) if orientation in _SWAPS_AXES else (raw_w, raw_h)
    x0, y0, x1, y1 = _clamp_box(box, up_w, up_h, path)

    scale = 1  # one decoded pixel covers scale x scale original pixels
    if draft and img.format == "JPEG":
        scale = _draft_scale(min(x1 - x0, y1 - y0), size)
        if scale > 1:
            # Requesting (W // s, H // s) makes PIL pick exactly DCT scale s; 'L' decodes only the Y channel.
            drafted = img.draft("L" if channels == 1 else "RGB", (raw_w // scale, raw_h // scale))
            # draft() returns the decoded region in drafted pixels, (0, 0, W / s, H / s), or None if not applied.
            scale = 1 if drafted is None else round(raw_w / drafted[1][2])
    img.load()
    if orientation != 1:
        img = ImageOps.exif_transpose(img)

    crop = tuple(_round_half_up(v / scale) for v in (x0, y0, x1, y1))
    cx0, cy0 = min(crop[0], img.size[0] - 1), min(crop[1], img.size[1] - 1)
    cx1, cy1 = max(min(crop[2], img.size[0]), cx0 + 1), max(min(crop[3], img.size[1]), cy0 + 1)
    if (cx0, cy0, cx1, cy1) != (0, 0, *img.size):
        img = img.crop((cx0, cy0, cx1, cy1))
    img = to_8bit(img, channels, path)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return img


def _clamp_box(box: tuple[float, ...] | None, width: int, height: int, path: Path) -> tuple[float, float, float, float]:
    """Face box (x, y, w, h) -> corners clamped to the image; None or any NaN -> the whole image."""
    if box is None or any(v is None or math.isnan(float(v)) for v in box):
        return 0.0, 0.0, float(width), float(height)
    if len(box) != 4:
        raise ValueError(f"face box must be (x, y, w, h), got {box!r}")
    x, y, w, h = (float(v) for v in box)
    x0, y0 = max(x, 0.0), max(y, 0.0)
    x1, y1 = min(x + w, float(width)), min(y + h, float(height))
    if x1 - x0 < 1.0 or y1 - y0 < 1.0:
        raise ImageDecodeError(
            path, f"face box (x={x:g}, y={y:g}, w={w:g}, h={h:g}) is empty inside the {width}x{height} image"
        )
    return x0, y0, x1, y1


def _draft_scale(crop_side: float, size: int) -> int:
    """Largest JPEG DCT scale (8, 4, 2) that keeps the decoded crop >= DRAFT_GAP * size, else 1."""
    for s in (8, 4, 2):
        if crop_side / s >= DRAFT_GAP * size:
            return s
    return 1


def _round_half_up(v: float) -> int:
    return int(math.floor(v + 0.5))


def to_8bit(img: Image.Image, channels: int, path: Path) -> Image.Image:
    """Convert any PIL mode to 'L' (channels=1) or 'RGB' (channels=3) by one chain chosen from the mode."""
    mode = img.mode
    if mode in _SIXTEEN_BIT or mode == "I":
        img = Image.fromarray(_int_to_u8(np.asarray(img)))
    elif mode == "F":
        img = Image.fromarray(_float_to_u8(np.asarray(img)))
    elif mode == "1":
        img = img.convert("L")
    elif mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("PA", "RGBa"):
        img = img.convert("RGBA")
    elif mode == "La":
        img = img.convert("LA")
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        try:  # CMYK, YCbCr, RGBX, HSV, ...: PIL's own conversion to RGB
            img = img.convert("RGB")
        except ValueError as e:
            raise ImageDecodeError(path, f"unsupported image mode {mode!r}") from e
    if img.mode in ("RGBA", "LA"):
        img = _composite_on_black(img)
    target = "L" if channels == 1 else "RGB"
    return img if img.mode == target else img.convert(target)


def _int_to_u8(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 65535:
        # 257 * 255 = 65535, so the full 16-bit range lands on the full 8-bit range; v/257 never ties at .5.
        return np.rint(a / 257.0).astype(np.uint8)
    return _minmax_u8(a, lo, hi)


def _float_to_u8(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0 and hi <= 1:
        return np.rint(a * 255.0).astype(np.uint8)
    if lo >= 0 and hi <= 255:
        return np.rint(a).astype(np.uint8)
    return _minmax_u8(a, lo, hi)


def _minmax_u8(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _composite_on_black(img: Image.Image) -> Image.Image:
    a = np.asarray(img).astype(np.uint32)
    color, alpha = a[..., :-1], a[..., -1:]
    out = ((color * alpha + 127) // 255).astype(np.uint8)  # round(c * alpha / 255)
    return Image.fromarray(out[..., 0] if img.mode == "LA" else out)
