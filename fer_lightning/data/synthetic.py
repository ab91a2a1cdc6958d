"""A built-in synthetic FER data set: procedurally drawn faces written in AffectNet's "8 labels" layout.

Layout (as in the real AffectNet release)::

    <out>/train_set/images/{N}.jpg
    <out>/train_set/annotations/{N}_exp.npy   0-d '<U1' string array, the class id
    <out>/train_set/annotations/{N}_val.npy   0-d float32
    <out>/train_set/annotations/{N}_aro.npy   0-d float32
    <out>/train_set/annotations/{N}_lnd.npy   (136,) float32, 68 (x, y) iBUG points in pixels
    <out>/val_set/...                         same
    <out>/synthetic.json                      parameters, counts, the noisy-label samples (written last)

Every image is drawn from its own RNG seeded by (seed, split, index), so the output does not depend on
``num_workers`` and two runs with the same parameters give byte-identical files.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger(__name__)

# Bump whenever the drawn images or the annotations change, so cached copies are rebuilt.
GENERATOR_VERSION = 1
META_FILE = "synthetic.json"
SPLIT_DIRS = {"train": "train_set", "val": "val_set"}
_SPLIT_CODE = {"train": 0, "val": 1}
NUM_CLASSES = 8

# AffectNet 8-class training-set counts (Mollahosseini et al., 2017, Table 4, manually annotated train set).
AFFECTNET_TRAIN_COUNTS: dict[int, int] = {
    0: 74_874,  # neutral
    1: 134_415,  # happy
    2: 25_459,  # sad
    3: 14_090,  # surprise
    4: 6_378,  # fear
    5: 3_803,  # disgust
    6: 24_882,  # anger
    7: 3_750,  # contempt
}
# Every class keeps at least this many training images, however small n_train is.
MIN_PER_CLASS = 5

# Per-class box ((valence lo, hi), (arousal lo, hi)), intersected with the unit circle; placed after the
# per-category valence-arousal scatter in the AffectNet paper (Fig. 7).
VA_REGIONS: dict[int, tuple[tuple[float, float], tuple[float, float]]] = {
    0: ((-0.15, 0.15), (-0.15, 0.15)),
    1: ((0.15, 0.95), (-0.2, 0.5)),
    2: ((-0.9, -0.2), (-0.6, 0.1)),
    3: ((-0.1, 0.5), (0.3, 0.95)),
    4: ((-0.9, -0.2), (0.4, 0.95)),
    5: ((-0.85, -0.3), (0.0, 0.5)),
    6: ((-0.9, -0.3), (0.45, 0.95)),
    7: ((-0.5, -0.05), (-0.2, 0.35)),
}
_VA_MAX_RADIUS = 0.99

# Expression parameters; each class moves some of them away from the identity's resting face.
_PARAMS = (
    "brow_raise",  # + both brows up
    "brow_tilt",  # + inner ends up (sad, fear), - inner ends down (anger)
    "brow_squeeze",  # + inner ends pulled together and down
    "brow_asym",  # + the brow on the smirking side raised
    "eye_open",  # + wider, - narrower
    "eye_squint",  # + lower lid raised
    "mouth_open",  # + jaw drop / lips apart
    "mouth_width",  # + corners pulled outwards
    "mouth_curve",  # + corners up (smile), - corners down
    "mouth_asym",  # + one corner raised (side chosen per image)
    "upper_lip_raise",  # + upper lip lifted
    "lip_press",  # + thin pressed lips
    "nose_wrinkle",  # + wrinkle lines on the nose, nostrils raised
    "teeth",  # + teeth visible when the mouth is open
    "folds",  # + nasolabial folds drawn
    "forehead_lines",  # + horizontal forehead lines
)
_P = {name: i for i, name in enumerate(_PARAMS)}
# Full-intensity deltas per class. Neighbouring classes share features on purpose (fear ~ surprise,
# disgust ~ anger, contempt ~ neutral/happy) so that the minority classes are genuinely confusable.
_CLASS_DELTAS: dict[int, dict[str, float]] = {
    0: {},
    1: {"mouth_curve": 0.9, "mouth_width": 0.25, "eye_squint": 0.45, "teeth": 0.8, "folds": 0.8, "mouth_open": 0.3},
    2: {"brow_tilt": 0.7, "mouth_curve": -0.7, "eye_open": -0.3, "mouth_width": -0.1, "brow_raise": 0.1},
    3: {"brow_raise": 1.0, "eye_open": 0.8, "mouth_open": 1.0, "mouth_width": -0.25, "forehead_lines": 0.9},
    4: {
        "brow_raise": 0.55,
        "brow_tilt": 0.5,
        "brow_squeeze": 0.35,
        "eye_open": 0.7,
        "mouth_open": 0.45,
        "mouth_width": 0.3,
        "mouth_curve": -0.25,
        "teeth": 0.4,
        "forehead_lines": 0.5,
    },
    5: {
        "nose_wrinkle": 1.0,
        "upper_lip_raise": 0.8,
        "brow_raise": -0.35,
        "brow_squeeze": 0.3,
        "eye_squint": 0.5,
        "mouth_curve": -0.35,
        "mouth_asym": 0.2,
        "teeth": 0.5,
        "mouth_open": 0.15,
    },
    6: {
        "brow_raise": -0.5,
        "brow_tilt": -0.8,
        "brow_squeeze": 0.7,
        "eye_open": 0.1,
        "lip_press": 0.8,
        "mouth_width": -0.15,
        "mouth_curve": -0.2,
        "nose_wrinkle": 0.3,
    },
    7: {"mouth_asym": 1.0, "brow_asym": 0.8, "mouth_curve": 0.1, "eye_open": -0.15, "lip_press": 0.3},
}


_PRESENT_ONLY = (
    "brow_asym",
    "nose_wrinkle",
    "teeth",
    "folds",
    "forehead_lines",
    "mouth_asym",
    "upper_lip_raise",
    "lip_press",
)


@dataclass(frozen=True)
class _Difficulty:
    """Nuisance strengths; tuned so that a small CNN is clearly above chance and clearly below perfect."""

    expression_jitter: float = 0.22  # sd of per-image noise on every expression parameter
    resting_jitter: float = 0.15  # sd of the identity's resting face (some people look sad at rest)
    rotation_deg: float = 18.0
    scale: tuple[float, float] = (0.27, 0.35)  # face half-width as a fraction of the image size
    shift: float = 0.08
    p_glasses: float = 0.2
    p_sunglasses: float = 0.06
    p_bar: float = 0.12
    p_gray: float = 0.1
    blur_max: float = 1.2
    noise_max: float = 12.0
    light_max: float = 0.6


_DIFF = _Difficulty()
_SS = 2  # draw at twice the size and downsample: cheap anti-aliasing


def class_counts(n_train: int) -> dict[int, int]:
    """Training images per class: AffectNet's proportions scaled to n_train (largest remainder), each >= MIN_PER_CLASS."""
    if n_train < MIN_PER_CLASS * NUM_CLASSES:
        raise ValueError(f"n_train={n_train} is too small: need at least {MIN_PER_CLASS * NUM_CLASSES} (8 classes)")
    total = sum(AFFECTNET_TRAIN_COUNTS.values())
    counts = {c: MIN_PER_CLASS for c in AFFECTNET_TRAIN_COUNTS}
    # The floor is given out first; the rest follows AffectNet's proportions by largest remainder.
    rest = n_train - MIN_PER_CLASS * NUM_CLASSES
    # Integer arithmetic: quota = rest * n / total exactly, as whole part and remainder.
    remainders = {}
    for c, n in AFFECTNET_TRAIN_COUNTS.items():
        whole, remainders[c] = divmod(rest * n, total)
        counts[c] += whole
    left = n_train - sum(counts.values())
    # Ties broken by class id so the result is deterministic.
    for c in sorted(remainders, key=lambda c: (-remainders[c], c))[:left]:
        counts[c] += 1
    return counts


def val_counts(n_val: int) -> dict[int, int]:
    """Validation images per class: balanced, n_val / 8 each."""
    if n_val <= 0 or n_val % NUM_CLASSES:
        raise ValueError(f"n_val={n_val} must be a positive multiple of {NUM_CLASSES} (the val set is balanced)")
    return {c: n_val // NUM_CLASSES for c in range(NUM_CLASSES)}


def sample_va(rng: np.random.Generator, cls: int) -> tuple[float, float]:
    """Draw (valence, arousal) uniformly from the class's region inside the unit circle."""
    (v_lo, v_hi), (a_lo, a_hi) = VA_REGIONS[cls]
    for _ in range(1000):
        v, a = rng.uniform(v_lo, v_hi), rng.uniform(a_lo, a_hi)
        if v * v + a * a <= _VA_MAX_RADIUS**2:
            return float(v), float(a)
    raise RuntimeError(f"VA region of class {cls} does not meet the unit circle: {VA_REGIONS[cls]}")


def _radius_range(cls: int) -> tuple[float, float]:
    (v_lo, v_hi), (a_lo, a_hi) = VA_REGIONS[cls]
    near = math.hypot(min(max(0.0, v_lo), v_hi), min(max(0.0, a_lo), a_hi))
    far = min(_VA_MAX_RADIUS, math.hypot(max(abs(v_lo), abs(v_hi)), max(abs(a_lo), abs(a_hi))))
    return near, far


def expression_intensity(cls: int, valence: float, arousal: float) -> float:
    """How pronounced the expression is drawn: 0 for neutral, 0.3..1 growing with distance from (0, 0)."""
    if cls == 0:
        return 0.0
    near, far = _radius_range(cls)
    t = (math.hypot(valence, arousal) - near) / max(far - near, 1e-6)
    return 0.3 + 0.7 * min(max(t, 0.0), 1.0)


# ---------------------------------------------------------------- geometry (canonical face frame)
# x to the image right, y down, unit = half the face width; the face centre is the origin.


def _expression_vector(rng: np.random.Generator, cls: int, valence: float, arousal: float) -> np.ndarray:
    p = rng.normal(0.0, _DIFF.resting_jitter, len(_PARAMS))
    # Features that only exist when present (lines, teeth, asymmetry) have no resting offset.
    for name in _PRESENT_ONLY:
        p[_P[name]] = 0.0
    p[_P["mouth_open"]] = abs(p[_P["mouth_open"]]) * 0.3
    k = expression_intensity(cls, valence, arousal)
    for name, delta in _CLASS_DELTAS[cls].items():
        p[_P[name]] += k * delta
    # Valence and arousal also act directly, so they can be read from the face within a class.
    p[_P["mouth_curve"]] += 0.3 * valence
    p[_P["eye_open"]] += 0.3 * arousal
    p[_P["brow_raise"]] += 0.15 * arousal
    p += rng.normal(0.0, _DIFF.expression_jitter, len(_PARAMS)) * (0.5 + 0.5 * k)
    return p


def _face_geometry(rng: np.random.Generator, p: np.ndarray) -> tuple[np.ndarray, dict[str, object]]:
    """68 canonical landmarks plus the extra shapes needed to draw the face."""
    g = {name: float(p[i]) for name, i in _P.items()}
    fw = rng.uniform(0.9, 1.08)  # face width
    fh = rng.uniform(1.25, 1.45)  # face height (chin distance)
    eye_dx = rng.uniform(0.36, 0.44)
    eye_y = rng.uniform(-0.3, -0.2)
    eye_w = rng.uniform(0.16, 0.21)
    brow_y = eye_y - rng.uniform(0.24, 0.32)
    mouth_y = rng.uniform(0.58, 0.7)
    mouth_w = rng.uniform(0.27, 0.36) * (1.0 + 0.3 * g["mouth_width"])
    nose_y = rng.uniform(0.22, 0.3)
    asym_side = 1.0 if rng.random() < 0.5 else -1.0
    pts = np.zeros((68, 2))

    jaw_drop = 0.18 * max(g["mouth_open"], 0.0)
    t = np.linspace(math.pi + 0.25, -0.25, 17)
    pts[0:17, 0] = fw * np.cos(t)
    pts[0:17, 1] = fh * np.sin(t) + jaw_drop * np.clip(np.sin(t), 0, None) ** 2

    u = np.linspace(0.0, 1.0, 5)  # outer -> inner
    inner_x = 0.12 + 0.06 * (1.0 - g["brow_squeeze"])
    bx = -(eye_dx + eye_w + 0.12) + (eye_dx + eye_w + 0.12 - inner_x) * u
    by = (
        brow_y
        - 0.06 * np.sin(math.pi * (0.2 + 0.7 * u))
        - 0.2 * g["brow_raise"]
        - 0.25 * g["brow_tilt"] * (u - 0.3)
        + 0.08 * g["brow_squeeze"] * u
    )
    lift = 0.15 * max(g["brow_asym"], 0.0)
    pts[17:22] = np.stack([bx, by - (lift if asym_side < 0 else 0.0)], 1)
    pts[22:27] = np.stack([-bx[::-1], by[::-1] - (lift if asym_side > 0 else 0.0)], 1)

    pts[27:31, 0] = 0.0
    pts[27:31, 1] = np.linspace(eye_y - 0.02, nose_y - 0.04, 4)
    wr = max(g["nose_wrinkle"], 0.0)
    nx = np.array([-1.0, -0.5, 0.0, 0.5, 1.0]) * (0.15 + 0.04 * wr)
    pts[31:36, 0] = nx
    pts[31:36, 1] = nose_y - 0.04 * wr + np.array([0.0, 0.02, 0.035, 0.02, 0.0])

    up = 0.08 * max(1.0 + g["eye_open"], 0.1)
    low = 0.05 * max(1.0 + 0.6 * g["eye_open"], 0.1) * max(1.0 - 0.7 * g["eye_squint"], 0.15)
    for side, idx in ((-1.0, (36, 37, 38, 39, 40, 41)), (1.0, (45, 44, 43, 42, 47, 46))):
        # Listed outer corner, upper outer, upper inner, inner corner, lower inner, lower outer.
        cx = side * eye_dx
        outer, inner = cx + side * eye_w, cx - side * eye_w
        xs = [outer, cx + side * eye_w / 3, cx - side * eye_w / 3, inner, cx - side * eye_w / 3, cx + side * eye_w / 3]
        ys = [eye_y, eye_y - up, eye_y - up, eye_y + 0.005, eye_y + low, eye_y + low]
        pts[list(idx)] = np.stack([xs, ys], 1)

    gap = 0.35 * max(g["mouth_open"], 0.0)
    th_up = 0.05 * max(1.0 - 0.7 * g["lip_press"], 0.25)
    th_low = 0.065 * max(1.0 - 0.7 * g["lip_press"], 0.25)
    curve = 0.2 * g["mouth_curve"]
    asym = 0.22 * max(g["mouth_asym"], 0.0)
    ulr = 0.06 * max(g["upper_lip_raise"], 0.0)

    def line(x: np.ndarray) -> np.ndarray:
        r = x / mouth_w
        return mouth_y - curve * r**2 - asym * np.clip(asym_side * r, 0, None) ** 2

    def shape(x: np.ndarray) -> np.ndarray:
        return np.sqrt(np.clip(1.0 - (x / mouth_w) ** 2, 0.0, None))

    xo = np.array([-1.0, -0.66, -0.33, 0.0, 0.33, 0.66, 1.0]) * mouth_w
    cupid = np.array([0, 0.9, 1.0, 0.75, 1.0, 0.9, 0])
    upper_outer = line(xo) - (gap / 2 + ulr) * shape(xo) - th_up * cupid
    pts[48:55] = np.stack([xo, upper_outer], 1)
    xl = np.array([0.66, 0.33, 0.0, -0.33, -0.66]) * mouth_w
    pts[55:60] = np.stack([xl, line(xl) + gap / 2 * shape(xl) + th_low * shape(xl) ** 0.5], 1)
    xi = np.array([-0.9, -0.4, 0.0, 0.4, 0.9]) * mouth_w
    pts[60:65] = np.stack([xi, line(xi) - (gap / 2 + ulr * 0.8) * shape(xi)], 1)
    xil = np.array([0.4, 0.0, -0.4]) * mouth_w
    pts[65:68] = np.stack([xil, line(xil) + gap / 2 * shape(xil)], 1)

    tt = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    outline = np.stack([fw * np.cos(tt), fh * np.sin(tt) + jaw_drop * np.clip(np.sin(tt), 0, None) ** 2], 1)
    outline[:, 1] = np.where(outline[:, 1] < 0, outline[:, 1] * 1.05, outline[:, 1])
    extra = {
        "outline": outline,
        "fw": fw,
        "fh": fh,
        "eye_dx": eye_dx,
        "eye_y": eye_y,
        "eye_w": eye_w,
        "up": up,
        "low": low,
        "gap": gap,
        "g": g,
        "brow_y": brow_y,
        "nose_y": nose_y,
        "mouth_y": mouth_y,
        "mouth_w": mouth_w,
        "asym_side": asym_side,
    }
    return pts, extra


# ---------------------------------------------------------------- rendering


def _skin(rng: np.random.Generator) -> tuple[int, int, int]:
    # From dark to light skin along a warm axis.
    t = rng.uniform(0.0, 1.0)
    base = np.array([70, 45, 30]) + t * np.array([180, 160, 145])
    return tuple(int(c) for c in np.clip(base + rng.normal(0, 8, 3), 0, 255))


def _shade(color: tuple[int, int, int], f: float, add: tuple[int, int, int] = (0, 0, 0)) -> tuple[int, int, int]:
    return tuple(int(min(max(c * f + a, 0), 255)) for c, a in zip(color, add))


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    # Textured at the output size and upsampled: the face is what needs the finer drawing grid.
    cells = int(rng.integers(2, 7))
    low = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
    img = Image.fromarray(low, "RGB").resize((size, size), Image.BILINEAR)
    kind = rng.random()
    if kind < 0.35:  # stripes
        arr = np.asarray(img, dtype=np.float32)
        period = rng.uniform(4, 20)
        ang = rng.uniform(0, math.pi)
        yy, xx = _grid(size)
        wave = np.sin((xx * math.cos(ang) + yy * math.sin(ang)) * (2 * math.pi * size / period))
        arr += (wave * rng.uniform(10, 45))[..., None]
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    elif kind < 0.65:  # speckle
        noise = rng.standard_normal((size, size, 1), dtype=np.float32) * rng.uniform(8, 30)
        arr = np.asarray(img, dtype=np.float32) + noise
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    # Nearest-neighbour up and box-filter down leave the background pixels exactly as drawn.
    return img.resize((size * _SS, size * _SS), Image.NEAREST)


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates scaled to [-0.5, 0.5), as (y, x)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size - 0.5
    return yy, xx


class _Frame:
    """Similarity transform from the canonical face frame to drawing pixels."""

    def __init__(self, scale: float, angle: float, cx: float, cy: float):
        c, s = math.cos(angle), math.sin(angle)
        self.m = np.array([[c, -s], [s, c]]) * scale
        self.t = np.array([cx, cy])
        self.scale = scale

    def __call__(self, p: np.ndarray) -> list[float]:
        """Flat [x0, y0, x1, y1, ...] as PIL's drawing calls take it."""
        return (np.asarray(p, dtype=np.float64).reshape(-1, 2) @ self.m.T + self.t).ravel().tolist()

    def arr(self, p: np.ndarray) -> np.ndarray:
        return np.asarray(p, dtype=np.float64).reshape(-1, 2) @ self.m.T + self.t


def _ellipse(cx: float, cy: float, rx: float, ry: float, n: int = 20) -> np.ndarray:
    t = np.linspace(0, 2 * math.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _place(rng: np.random.Generator, pts: np.ndarray, size: int) -> _Frame:
    """Draw a head pose and shrink/shift it until every landmark lies inside the image."""
    big = size * _SS
    scale = rng.uniform(*_DIFF.scale) * big
    angle = math.radians(rng.uniform(-_DIFF.rotation_deg, _DIFF.rotation_deg))
    cx = big / 2 + rng.uniform(-_DIFF.shift, _DIFF.shift) * big
    cy = big * 0.47 + rng.uniform(-_DIFF.shift, _DIFF.shift) * big
    frame = _Frame(scale, angle, cx, cy)
    margin = 1.5 * _SS
    q = frame.arr(pts)
    span = (q.max(0) - q.min(0)).max()
    if span > big - 2 * margin:
        frame = _Frame(scale * (big - 2 * margin) / span, angle, cx, cy)
        q = frame.arr(pts)
    lo, hi = q.min(0), q.max(0)
    shift = np.clip(margin - lo, 0, None) - np.clip(hi - (big - margin), 0, None)
    frame.t = frame.t + shift
    return frame


def _draw_face(draw: ImageDraw.ImageDraw, rng: np.random.Generator, f: _Frame, pts: np.ndarray, ex: dict) -> None:
    g = ex["g"]
    skin = _skin(rng)
    hair = tuple(int(c) for c in rng.uniform(10, 110) * np.array([1.0, 0.8, 0.6]) + rng.normal(0, 6, 3))
    line_w = max(1, int(round(f.scale * 0.03)))
    dark = _shade(skin, 0.55)

    # Neck and shoulders, then head and hair.
    fw, fh = ex["fw"], ex["fh"]
    cloth = tuple(int(c) for c in rng.uniform(0, 255, 3))
    draw.polygon(f(np.array([[-2.2, 3.4], [-1.6, 1.9], [1.6, 1.9], [2.2, 3.4]])), fill=cloth)
    draw.polygon(f(np.array([[-0.45, 0.9], [0.45, 0.9], [0.5, 2.1], [-0.5, 2.1]])), fill=_shade(skin, 0.85))
    if rng.random() < 0.85:
        draw.polygon(f(_ellipse(0, -0.25, fw * 1.12, fh * 0.95, 32)), fill=hair)
    draw.polygon(f(ex["outline"]), fill=skin)
    # Ears.
    for side in (-1, 1):
        draw.polygon(f(_ellipse(side * fw * 0.98, ex["eye_y"] + 0.15, 0.12, 0.22, 12)), fill=_shade(skin, 0.92))
    if rng.random() < 0.6:  # fringe
        draw.polygon(f(_ellipse(0, -fh * 0.95, fw * 0.9, 0.3 + rng.uniform(0, 0.15), 24)), fill=hair)

    # Forehead lines (surprise, fear), glabella lines (anger), nasolabial folds (happy, disgust).
    if g["forehead_lines"] > 0.25:
        n = 2 + int(g["forehead_lines"] > 0.7)
        for k in range(n):
            y = ex["brow_y"] - 0.2 - 0.1 * k
            draw.line(f(np.array([[-0.4, y], [0.0, y - 0.03], [0.4, y]])), fill=_shade(skin, 0.8), width=line_w)
    if g["brow_squeeze"] > 0.35:
        for side in (-0.05, 0.05):
            draw.line(f(np.array([[side, ex["brow_y"] - 0.05], [side, ex["brow_y"] + 0.1]])), fill=dark, width=line_w)
    sides = ((31, 48), (35, 54))
    if g["folds"] <= 0.25 and g["nose_wrinkle"] <= 0.4 and g["mouth_asym"] > 0.4:
        # A one-sided smirk creases only the raised side.
        sides = sides[1:] if ex["asym_side"] > 0 else sides[:1]
    if g["folds"] > 0.25 or g["nose_wrinkle"] > 0.4 or g["mouth_asym"] > 0.4:
        for a, b in sides:
            start = pts[a] + np.array([np.sign(pts[a][0]) * 0.05, -0.03])
            end = pts[b] + np.array([np.sign(pts[b][0]) * 0.08, 0.02])
            draw.line(
                f(np.stack([start, (start + end) / 2 + [np.sign(pts[a][0]) * 0.06, 0], end])), fill=dark, width=line_w
            )

    # Eyes: sclera, iris, lid line.
    sclera = _shade((235, 232, 225), rng.uniform(0.85, 1.0))
    iris = tuple(int(c) for c in rng.uniform(20, 120) * np.array([1.0, 0.85, 0.6]))
    for idx in ((36, 37, 38, 39, 40, 41), (42, 43, 44, 45, 46, 47)):
        eye = pts[list(idx)]
        draw.polygon(f(eye), fill=sclera)
        c = eye.mean(0)
        r = min(ex["eye_w"] * 0.45, (ex["up"] + ex["low"]) * 0.5)
        draw.polygon(f(_ellipse(c[0], c[1], r, r, 12)), fill=iris)
        draw.line(f(eye[[0, 1, 2, 3]]), fill=hair, width=line_w)

    brow_w = max(1, int(round(f.scale * rng.uniform(0.05, 0.09))))
    draw.line(f(pts[17:22]), fill=hair, width=brow_w, joint="curve")
    draw.line(f(pts[22:27]), fill=hair, width=brow_w, joint="curve")

    # Nose: bridge shading, base, wrinkles.
    draw.line(f(pts[[27, 28, 29, 30]] + [0.04, 0]), fill=_shade(skin, 0.8), width=line_w)
    draw.line(f(pts[31:36]), fill=dark, width=line_w)
    if g["nose_wrinkle"] > 0.3:
        for k in range(2 + int(g["nose_wrinkle"] > 0.8)):
            y = pts[28][1] + 0.05 * k
            draw.line(f(np.array([[-0.09, y + 0.02], [0.0, y], [0.09, y + 0.02]])), fill=dark, width=line_w)

    # Mouth: lips, cavity, teeth.
    lip = _shade(skin, 0.78, (35, -5, -5))
    draw.polygon(f(pts[48:60]), fill=lip)
    inner = pts[60:68]
    if ex["gap"] > 0.02:
        draw.polygon(f(inner), fill=(45, 15, 20))
        if g["teeth"] > 0.3:
            upper = pts[60:65]
            depth = min(ex["gap"] * 0.5, 0.07) * min(g["teeth"], 1.2)
            teeth = np.concatenate([upper, (upper + [0, depth])[::-1]])
            draw.polygon(f(teeth), fill=(235, 230, 215))
    else:
        draw.line(f(np.concatenate([pts[[48]], pts[60:65], pts[[54]]])), fill=_shade(lip, 0.6), width=line_w)


def _draw_occluders(draw: ImageDraw.ImageDraw, rng: np.random.Generator, f: _Frame, pts: np.ndarray, ex: dict) -> None:
    r = rng.random()
    if r < _DIFF.p_glasses + _DIFF.p_sunglasses:
        frame_col = tuple(int(c) for c in rng.uniform(0, 200, 3))
        width = max(1, int(round(f.scale * 0.04)))
        sun = r < _DIFF.p_sunglasses
        for idx in ((36, 39), (42, 45)):
            c = pts[list(idx)].mean(0)
            lens = f(_ellipse(c[0], c[1] + 0.02, ex["eye_w"] * 1.5, 0.15, 16))
            draw.polygon(lens, fill=(20, 20, 25) if sun else None, outline=frame_col, width=width)
        draw.line(f(np.array([pts[39] + [0.05, -0.03], pts[42] + [-0.05, -0.03]])), fill=frame_col, width=width)
    if rng.random() < _DIFF.p_bar:
        # A hand or a bar across a random part of the face.
        colour = _shade(_skin(rng), 1.0) if rng.random() < 0.5 else tuple(int(c) for c in rng.uniform(0, 255, 3))
        cy = rng.uniform(-0.6, 1.2)
        ang = rng.uniform(-0.6, 0.6)
        half_h = rng.uniform(0.12, 0.3)
        c, s = math.cos(ang), math.sin(ang)
        corners = np.array([[-1.5, -half_h], [1.5, -half_h], [1.5, half_h], [-1.5, half_h]])
        corners = corners @ np.array([[c, -s], [s, c]]).T + [rng.uniform(-0.8, 0.8), cy]
        draw.polygon(f(corners), fill=colour)


def render_sample(seed: int, split: str, index: int, true_cls: int, size: int) -> dict:
    """Draw one face showing `true_cls`; returns the image (uint8 HxWx3), VA, landmarks and JPEG quality."""
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], index])
    valence, arousal = sample_va(rng, true_cls)
    p = _expression_vector(rng, true_cls, valence, arousal)
    pts, ex = _face_geometry(rng, p)
    frame = _place(rng, pts, size)
    img = _background(rng, size)
    draw = ImageDraw.Draw(img)
    _draw_face(draw, rng, frame, pts, ex)
    _draw_occluders(draw, rng, frame, pts, ex)
    img = img.reduce(_SS)
    blur = rng.uniform(0, _DIFF.blur_max)
    if blur > 0.4:
        # One box pass: a third of GaussianBlur's cost (three box passes), and blur is all we need.
        img = img.filter(ImageFilter.BoxBlur(blur))
    arr = np.asarray(img, dtype=np.float32)
    # Lighting: a linear gradient in a random direction plus global gain.
    phi = rng.uniform(0, 2 * math.pi)
    yy, xx = _grid(size)
    light = rng.uniform(0.75, 1.2) * (1.0 + rng.uniform(0, _DIFF.light_max) * (xx * math.cos(phi) + yy * math.sin(phi)))
    # Luminance noise only: one channel is a third of the cost and looks the same after JPEG.
    noise = rng.standard_normal((size, size, 1), dtype=np.float32) * rng.uniform(0, _DIFF.noise_max)
    arr = arr * light[..., None] + noise
    if rng.random() < _DIFF.p_gray:
        arr[:] = arr.mean(2, keepdims=True)
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    # Pixel centres at integer coordinates in both the drawing and the output image.
    landmarks = (frame.arr(pts) + 0.5) / _SS - 0.5
    return {
        "image": arr,
        "valence": valence,
        "arousal": arousal,
        "landmarks": landmarks.astype(np.float32),
        "quality": int(rng.integers(75, 96)),
    }


# ---------------------------------------------------------------- writing


@functools.lru_cache(maxsize=16)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _save_npy(path: Path, arr: np.ndarray) -> None:
    """Same bytes as np.save (format 1.0) with the header built once per dtype and shape: 68k small files add up."""
    with open(path, "wb") as fh:
        fh.write(_npy_header(np.lib.format.dtype_to_descr(arr.dtype), arr.shape) + arr.tobytes(order="C"))


def _write_one(task: tuple) -> None:
    out, split, file_id, index, true_cls, label, seed, size = task
    s = render_sample(seed, split, index, true_cls, size)
    root = Path(out) / SPLIT_DIRS[split]
    Image.fromarray(s["image"], "RGB").save(root / "images" / f"{file_id}.jpg", quality=s["quality"])
    ann = root / "annotations"
    _save_npy(ann / f"{file_id}_exp.npy", np.array(str(label)))
    _save_npy(ann / f"{file_id}_val.npy", np.array(s["valence"], dtype=np.float32))
    _save_npy(ann / f"{file_id}_aro.npy", np.array(s["arousal"], dtype=np.float32))
    _save_npy(ann / f"{file_id}_lnd.npy", s["landmarks"].reshape(-1))


def label_plan(counts: dict[int, int], seed: int, split: str, label_noise: float) -> tuple[np.ndarray, np.ndarray]:
    """Per index: the class the face shows and the label written; both have exactly `counts` per class.

    About `label_noise` of the samples get another class's label. The wrong labels are the noisy samples'
    own labels passed round among them, so every class loses and gains about the same share (a uniform flip
    would bury the rare classes under flips from the common ones) and the written counts stay exact.
    """
    true = np.repeat(np.arange(NUM_CLASSES), [counts.get(c, 0) for c in range(NUM_CLASSES)])
    rng = np.random.default_rng([seed, _SPLIT_CODE[split], 2**40])
    rng.shuffle(true)  # file ids carry no class information
    labels = true.copy()
    noisy = np.flatnonzero(rng.random(len(true)) < label_noise)
    if len(noisy) > 1:
        # Group the noisy samples by class and hand each the label of the sample `shift` places on;
        # with shift = the largest group, no one keeps its own class unless one class is over half the pool.
        order = noisy[np.lexsort((rng.random(len(noisy)), true[noisy]))]
        shift = int(np.bincount(true[order]).max())
        labels[order] = true[np.roll(order, -shift)]
    return true, labels


def generate_synthetic(
    out: Path,
    *,
    n_train: int = 12000,
    n_val: int = 1600,
    image_size: int = 96,
    seed: int = 0,
    label_noise: float = 0.03,
    num_workers: int = 0,
) -> dict:
    """Write the synthetic data set into `out` (new or empty folder); returns counts and the noisy-label tally."""
    out = Path(out)
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise={label_noise} must be in [0, 1)")
    if image_size < 32:
        raise ValueError(f"image_size={image_size} is too small: use at least 32 pixels")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty: generate the synthetic data set into a new or empty folder")
    counts = {"train": class_counts(n_train), "val": val_counts(n_val)}
    started = time.perf_counter()
    tasks = []
    noisy = []
    file_id = 0
    for split in ("train", "val"):
        for sub in ("images", "annotations"):
            (out / SPLIT_DIRS[split] / sub).mkdir(parents=True, exist_ok=True)
        # The val set stays clean: it measures the model, not the noise.
        true, labels = label_plan(counts[split], seed, split, label_noise if split == "train" else 0.0)
        for index, (t, lab) in enumerate(zip(true.tolist(), labels.tolist())):
            # Ids are unique across the splits, as in AffectNet.
            tasks.append((str(out), split, file_id, index, t, lab, seed, image_size))
            if t != lab:
                noisy.append({"split": split, "id": file_id, "label": lab, "true_class": t})
            file_id += 1
    if num_workers > 1:
        with multiprocessing.get_context("fork").Pool(num_workers) as pool:
            pool.map(_write_one, tasks, chunksize=64)
    else:
        for t in tasks:
            _write_one(t)
    meta = {
        "generator_version": GENERATOR_VERSION,
        "params": {
            "n_train": n_train,
            "n_val": n_val,
            "image_size": image_size,
            "seed": seed,
            "label_noise": label_noise,
        },
        "counts": {split: {str(c): n for c, n in cs.items()} for split, cs in counts.items()},
        "noisy": noisy,
    }
    # Written last: its presence marks a finished build.
    (out / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True))
    seconds = time.perf_counter() - started
    return {
        "out": str(out),
        "counts": counts,
        "n_noisy": {split: sum(1 for r in noisy if r["split"] == split) for split in SPLIT_DIRS},
        "seconds": seconds,
    }


# ---------------------------------------------------------------- cache


def _normalized_params(params: dict) -> dict:
    defaults = {"n_train": 12000, "n_val": 1600, "image_size": 96, "seed": 0, "label_noise": 0.03}
    unknown = sorted(set(params) - set(defaults) - {"num_workers"})
    if unknown:
        raise TypeError(f"ensure_synthetic: unknown parameter(s) {unknown}; allowed: {sorted(defaults)} + num_workers")
    merged = {**defaults, **{k: v for k, v in params.items() if k != "num_workers"}}
    return {k: (float(v) if k == "label_noise" else int(v)) for k, v in merged.items()}


def synthetic_dir(cache_root: Path, **params) -> Path:
    """The cache folder for these parameters (it need not exist yet)."""
    norm = _normalized_params(params)
    key = json.dumps({**norm, "generator_version": GENERATOR_VERSION}, sort_keys=True)
    return Path(cache_root) / f"synthetic-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_synthetic(cache_root: Path, **params) -> Path:
    """Return the cached synthetic data set for `params`, generating it once (process-safe, atomic)."""
    final = synthetic_dir(cache_root, **params)
    if (final / META_FILE).is_file():
        return final
    cache_root = Path(cache_root)
    cache_root.mkdir(parents=True, exist_ok=True)
    lock_path = cache_root / f".{final.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # others wait here, then find the finished folder
        try:
            if (final / META_FILE).is_file():
                return final
            if final.exists():
                log.warning("%s has no %s (not built by this generator); rebuilding it", final, META_FILE)
                shutil.rmtree(final)
            # Only the lock holder builds, so any temp folder left now is from an interrupted build.
            for stale in cache_root.glob(f".{final.name}.tmp-*"):
                log.warning("removing %s, left over from an interrupted build", stale)
                shutil.rmtree(stale)
            tmp = cache_root / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            norm = _normalized_params(params)
            log.info("generating synthetic FER data set %s with %s", final, norm)
            started = time.perf_counter()
            generate_synthetic(tmp, num_workers=int(params.get("num_workers", 0)), **norm)
            os.rename(tmp, final)
            log.info(
                "generated %d train + %d val images in %.1f s at %s",
                norm["n_train"],
                norm["n_val"],
                time.perf_counter() - started,
                final,
            )
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final
