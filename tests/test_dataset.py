"""FERDataset items: uint8 images, masked targets, landmarks that follow a horizontal flip."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from PIL import Image

from fer_lightning.data.dataset import FLIP_PERMUTATION, FERDataset
from fer_lightning.data.records import make_records


def _records(tmp_path, n=3):
    rows = []
    for i in range(n):
        arr = np.full((40, 40, 3), 40 * i, np.uint8)
        arr[:, :20] = 255  # left half bright: a flip is visible
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        lm = np.stack([np.linspace(2, 30, 68), np.linspace(5, 35, 68)], 1).astype(np.float32)
        rows.append({"path": f"{i}.png", "split": "train", "expression": [1, 7, pd.NA][i],
                     "valence": [0.5, -2.0, np.nan][i], "arousal": 0.1, "landmarks": lm})  # fmt: skip
    return make_records(pd.DataFrame(rows))


def test_items_are_uint8_with_masked_targets(tmp_path):
    ds = FERDataset(_records(tmp_path), tmp_path, class_index={1: 0, 7: 1}, size=20, channels=3)
    a, b, c = ds[0], ds[1], ds[2]
    assert a["image"].dtype == torch.uint8 and a["image"].shape == (3, 20, 20)
    assert (a["expression"], b["expression"], c["expression"]) == (0, 1, -1)  # missing label -> -1
    assert a["valence"] == 0.5
    assert np.isnan(b["valence"])  # AffectNet's -2 non-face marker is a missing target
    assert np.isnan(c["valence"])
    assert c["index"] == 2


def test_flip_permutation_is_an_involution_that_swaps_eyes():
    assert (FLIP_PERMUTATION[FLIP_PERMUTATION] == np.arange(68)).all()
    assert FLIP_PERMUTATION[36] == 45 and FLIP_PERMUTATION[48] == 54 and FLIP_PERMUTATION[30] == 30


def test_landmarks_follow_the_flip(tmp_path):
    rec = _records(tmp_path, 1)
    plain = FERDataset(rec, tmp_path, class_index={1: 0}, size=40, channels=3, landmarks=True)[0]
    flipped = FERDataset(rec, tmp_path, class_index={1: 0}, size=40, channels=3, landmarks=True, hflip=1.0)[0]
    torch.testing.assert_close(flipped["image"], plain["image"].flip(-1))
    lm, lmf = plain["landmarks"].numpy(), flipped["landmarks"].numpy()
    # point k of the flipped face is the mirror of point FLIP_PERMUTATION[k] of the original, in [0, 1] units
    np.testing.assert_allclose(lmf[:, 0], 1.0 - lm[FLIP_PERMUTATION, 0], atol=1e-6)
    np.testing.assert_allclose(lmf[:, 1], lm[FLIP_PERMUTATION, 1], atol=1e-6)
    # the original landmarks are in pixels of the 40x40 image: [0, 1] units are pixels / 40
    np.testing.assert_allclose(lm[0], np.array([2, 5]) / 40, atol=1e-6)
