"""Writers of small data sets in the real on-disk layouts of the supported formats (for tests)."""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# FER2013's own ids (the CSV's `emotion` column)
FER2013_IDS = {"angry": 0, "disgust": 1, "fear": 2, "happy": 3, "sad": 4, "surprise": 5, "neutral": 6}
VIA_HEADER = ["filename", "file_size", "file_attributes", "region_count", "region_id", "region_shape_attributes",
              "region_attributes"]  # fmt: skip


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 48), mode: str = "L") -> Path:
    """Random pixels (distinct per seed, so the leakage check sees no copies) in `mode`, format from the suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels, "RGB").convert(mode).save(path)
    return path


def write_image_folder(root: Path, counts: Mapping[str, Mapping[str, int]], size=(48, 48)) -> dict[str, list[Path]]:
    """root/<split>/<class folder>/<n>.png, `counts[split][folder]` grayscale images each; returns paths per folder."""
    out: dict[str, list[Path]] = {}
    seed = 0
    for split, folders in counts.items():
        for folder, n in folders.items():
            for i in range(n):
                seed += 1
                out.setdefault(f"{split}/{folder}", []).append(write_image(root / split / folder / f"{i:03d}.png", seed,
                                                                           size))  # fmt: skip
    return out


def write_via_metadata(path: Path, rows: Sequence[tuple[str, dict]]) -> Path:
    """A VGG Image Annotator CSV export: one row per file (one region each) with its file_attributes JSON."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(VIA_HEADER)
        for filename, attrs in rows:
            shape = json.dumps({"name": "rect", "x": 1, "y": 1, "width": 10, "height": 10})
            writer.writerow([filename, 100, json.dumps(attrs), 1, 0, shape, "{}"])
    return path


def write_legend_csv(root: Path, labels: Sequence[str], rgb_every: int = 5) -> list[str]:
    """root/images/<i>.jpg (sizes vary, every `rgb_every`-th one RGB) and root/data/legend.csv; returns the names."""
    names = []
    rows = []
    for i, label in enumerate(labels):
        name = f"face_{i:03d}.jpg"
        side = 40 + 3 * (i % 17)
        write_image(root / "images" / name, 1000 + i, (side, side + i % 5), "RGB" if i % rgb_every == 0 else "L")
        rows.append((f"user{i % 7}", name, label))
        names.append(name)
    (root / "data").mkdir(parents=True, exist_ok=True)
    with (root / "data" / "legend.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["user.id", "image", "emotion"])
        writer.writerows(rows)
    return names


def write_fer2013_csv(root: Path, rows: Sequence[tuple[str, str]]) -> Path:
    """root/fer2013.csv from (class name, Usage) pairs, 48x48 random pixels per row."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "fer2013.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["emotion", "pixels", "Usage"])
        for i, (name, usage) in enumerate(rows):
            pixels = np.random.default_rng(5000 + i).integers(0, 256, 48 * 48)
            writer.writerow([FER2013_IDS[name], " ".join(map(str, pixels)), usage])
    return path


def write_affectnet_npy(
    root: Path,
    sets: Mapping[str, Sequence[tuple[int, float, float]]],
    image: Mapping[str, tuple[tuple[int, int], str]] | None = None,
) -> None:
    """AffectNet "8 labels" layout: root/<set>/images/<i>.jpg + annotations/<i>_{exp,val,aro}.npy per sample.

    `sets` maps train_set / val_set to (class id, valence, arousal) per sample; `image` maps a set to the
    ((width, height), mode) of its JPEGs (default 32x32 RGB).
    """
    seed = 9000
    for set_dir, samples in sets.items():
        (root / set_dir / "annotations").mkdir(parents=True, exist_ok=True)
        size, mode = (image or {}).get(set_dir, ((32, 32), "RGB"))
        for i, (cid, valence, arousal) in enumerate(samples):
            seed += 1
            write_image(root / set_dir / "images" / f"{i}.jpg", seed, size, mode)
            ann = root / set_dir / "annotations"
            np.save(ann / f"{i}_exp.npy", np.array(str(cid)))
            np.save(ann / f"{i}_val.npy", np.array(valence, dtype=np.float32))
            np.save(ann / f"{i}_aro.npy", np.array(arousal, dtype=np.float32))
