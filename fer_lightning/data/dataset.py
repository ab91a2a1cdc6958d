"""Records -> items: the uint8 face image plus masked targets (missing targets are NaN / -1, never invented)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2

from fer_lightning.data.images import load_face

MISSING_LABEL = -1

# iBUG 68-point indices swapped by a horizontal flip (the subject's left becomes right).
_FLIP_PAIRS = [(i, 16 - i) for i in range(8)] + [
    (17, 26), (18, 25), (19, 24), (20, 23), (21, 22),
    (31, 35), (32, 34),
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
    (48, 54), (49, 53), (50, 52), (55, 59), (56, 58),
    (60, 64), (61, 63), (65, 67),
]  # fmt: skip
FLIP_PERMUTATION = np.arange(68)
for _a, _b in _FLIP_PAIRS:
    FLIP_PERMUTATION[_a], FLIP_PERMUTATION[_b] = _b, _a


class FERDataset(Dataset):
    """One split of the records table; `image_source` is a preprocessed cache or None (decode per item)."""

    def __init__(
        self,
        records: pd.DataFrame,
        root: Path,
        *,
        class_index: dict[int, int],
        size: int,
        channels: int,
        image_source: Any | None = None,
        draft: bool = True,
        hflip: float = 0.0,
        transform: v2.Transform | None = None,
        landmarks: bool = False,
    ):
        self.root = Path(root)
        self.size, self.channels, self.draft = size, channels, draft
        self.image_source = image_source
        self.hflip, self.transform, self.with_landmarks = hflip, transform, landmarks
        # plain arrays: cheap to index in workers, nothing pandas-specific is pickled per item
        self.paths = records["path"].astype(str).tolist()
        self.boxes = records[["face_x", "face_y", "face_w", "face_h"]].to_numpy(np.float32)
        expr = records["expression"]
        self.labels = np.array(
            [class_index.get(int(e), MISSING_LABEL) if pd.notna(e) else MISSING_LABEL for e in expr], dtype=np.int64
        )
        va = records[["valence", "arousal"]].to_numpy(np.float32)
        # AffectNet's -2 non-face marker (kept when drop_non_expression=false) is a missing target, not a value
        self.va = np.where(np.abs(va) <= 1.0, va, np.nan).astype(np.float32)
        self.landmarks = list(records["landmarks"]) if landmarks else None

    def __len__(self) -> int:
        return len(self.paths)

    def _image(self, i: int) -> torch.Tensor:
        if self.image_source is not None:
            arr = np.asarray(self.image_source[i])
        else:
            box = self.boxes[i]
            arr = load_face(
                self.root / self.paths[i],
                size=self.size,
                channels=self.channels,
                box=None if np.isnan(box).any() else tuple(box.tolist()),
                draft=self.draft,
            ).transpose(2, 0, 1)
        return torch.from_numpy(np.ascontiguousarray(arr))

    def _landmarks(self, i: int) -> np.ndarray:
        """Landmarks in output-image pixels (size x size), NaN when absent."""
        lm = self.landmarks[i]
        if lm is None:
            return np.full((68, 2), np.nan, np.float32)
        lm = np.asarray(lm, np.float32).reshape(68, 2)
        box = self.boxes[i]
        if np.isnan(box).any():
            with Image.open(self.root / self.paths[i]) as im:  # header only: the size
                box = np.array([0, 0, im.width, im.height], np.float32)
        return (lm - box[:2]) / box[2:] * self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self._image(i)
        lm = self._landmarks(i) if self.with_landmarks else None
        if self.hflip and torch.rand(()) < self.hflip:
            image = image.flip(-1)
            if lm is not None:
                lm = lm[FLIP_PERMUTATION].copy()
                lm[:, 0] = self.size - lm[:, 0]
        if self.transform is not None:
            if lm is not None:
                out = self.transform(
                    {
                        "image": tv_tensors.Image(image),
                        "lm": tv_tensors.KeyPoints(torch.from_numpy(lm), canvas_size=(self.size, self.size)),
                    }
                )
                image, lm = out["image"].as_subclass(torch.Tensor), out["lm"].as_subclass(torch.Tensor).numpy()
            else:
                image = self.transform(image)
        item = {
            "image": image,
            "expression": int(self.labels[i]),
            "valence": float(self.va[i, 0]),
            "arousal": float(self.va[i, 1]),
            "index": i,
        }
        if lm is not None:
            item["landmarks"] = torch.as_tensor(lm / self.size, dtype=torch.float32)  # in [0, 1]
        return item
