"""Predict expressions and valence/arousal for image files with the exact preprocessing stored in a checkpoint.

Every input file gets one row: status `ok` (prediction), `no_face` (face detection found none; nothing is
guessed) or `error` (not an image, unreadable, ...: the message says why).
"""

from __future__ import annotations

import glob
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fer_lightning.checkpoints import preprocessing_of
from fer_lightning.data.images import ImageDecodeError, load_face, to_chw
from fer_lightning.face_detect import DetectorSettings, HaarFaceDetector
from fer_lightning.tta import check_tta, tta_outputs

STATUS_OK, STATUS_NO_FACE, STATUS_ERROR = "ok", "no_face", "error"
BOX_COLUMNS = ("face_x", "face_y", "face_w", "face_h")


class PredictInputError(ValueError):
    """The `input` names nothing to predict on (no such file, empty folder, glob without matches)."""


@dataclass
class PredictSettings:
    """How to run prediction; tta=None uses the checkpoint's own eval.tta."""

    batch_size: int = 64
    tta: str | None = None
    detect_faces: bool = False
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    device: str = "cpu"


def collect_inputs(spec: str | Path, *, recursive: bool = True) -> list[Path]:
    """A file, every file in a folder (sorted; recursive by default) or a glob's matches; never empty."""
    spec = str(spec)
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        pattern = "**/*" if recursive else "*"
        files = sorted(p for p in path.glob(pattern) if p.is_file())
        if not files:
            raise PredictInputError(f"input={spec}: the folder holds no files")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise PredictInputError(f"input={spec}: the pattern matches no files")
        return files
    raise PredictInputError(f"input={spec} does not exist; pass an image file, a folder of images or a glob")


def result_columns(class_names: Sequence[str], detect_faces: bool) -> list[str]:
    """Column order of the predictions table."""
    cols = ["path", "status", "predicted", "confidence", *(f"prob_{n}" for n in class_names), "valence", "arousal"]
    if detect_faces:
        cols += list(BOX_COLUMNS)
    return [*cols, "message"]


def predict_files(
    module: torch.nn.Module,
    hparams: dict[str, Any],
    paths: Sequence[str | Path],
    settings: PredictSettings | None = None,
) -> pd.DataFrame:
    """One row per path (in order): prediction, or the reason there is none."""
    settings = settings or PredictSettings()
    if settings.batch_size < 1:
        raise PredictInputError(f"batch_size={settings.batch_size} is invalid: allowed an integer >= 1")
    tta = check_tta(settings.tta if settings.tta is not None else str(hparams.get("tta", "none")))
    pre = preprocessing_of(hparams)
    class_names = list(hparams["class_names"])
    detector = HaarFaceDetector(settings.detector) if settings.detect_faces else None
    module = module.to(settings.device).eval()
    rows: list[dict[str, Any]] = []
    for batch in _batches(paths, settings.batch_size):
        pending: list[tuple[dict[str, Any], np.ndarray]] = []
        for path in batch:
            row, image = _decode_one(path, pre, detector)
            rows.append(row)
            if image is not None:
                pending.append((row, image))
        if pending:
            _predict_batch(module, [img for _, img in pending], [r for r, _ in pending], class_names, tta, settings)
    return pd.DataFrame(rows, columns=result_columns(class_names, settings.detect_faces))


def _batches(paths: Sequence[str | Path], size: int) -> Iterator[Sequence[str | Path]]:
    for start in range(0, len(paths), size):
        yield paths[start : start + size]


def _decode_one(
    path: str | Path, pre: dict[str, Any], detector: HaarFaceDetector | None
) -> tuple[dict[str, Any], np.ndarray | None]:
    """The row skeleton for `path` and its decoded (C, H, W) uint8 face, or None with the reason in the row."""
    row: dict[str, Any] = {"path": str(path), "status": STATUS_OK, "message": ""}
    box = None
    try:
        if detector is not None:
            box = detector.largest_face(path)
            if box is None:
                row.update(status=STATUS_NO_FACE, message="no face found by the Haar cascade")
                return row, None
            row.update(dict(zip(BOX_COLUMNS, box)))
        image = load_face(
            path,
            size=int(pre["image_size"]),
            channels=int(pre["channels"]),
            box=box,
            draft=bool(pre.get("draft", True)),
        )
    except ImageDecodeError as err:
        row.update(status=STATUS_ERROR, message=_reason(err))
        return row, None
    return row, to_chw(image)


def _reason(err: ImageDecodeError) -> str:
    if "cannot identify image file" in err.reason:
        return "not an image (PIL cannot identify the file format)"
    return err.reason


@torch.no_grad()
def _predict_batch(
    module: torch.nn.Module,
    images: list[np.ndarray],
    rows: list[dict[str, Any]],
    class_names: list[str],
    tta: str,
    settings: PredictSettings,
) -> None:
    batch = torch.from_numpy(np.stack(images)).to(settings.device)
    out = tta_outputs(module, batch, tta)
    probs = out["probs"].cpu().numpy().astype(np.float64)
    va = out["va"].cpu().numpy().astype(np.float64) if "va" in out else None
    for i, row in enumerate(rows):
        k = int(probs[i].argmax())
        row.update(predicted=class_names[k], confidence=float(probs[i, k]))
        row.update({f"prob_{n}": float(p) for n, p in zip(class_names, probs[i])})
        row.update(valence=float(va[i, 0]) if va is not None else math.nan)
        row.update(arousal=float(va[i, 1]) if va is not None else math.nan)


def summarize(table: pd.DataFrame, *, max_listed: int = 20) -> tuple[str, list[str]]:
    """A one-line count per status and the lines listing files without a prediction (for stderr)."""
    counts = table["status"].value_counts()
    line = ", ".join(f"{int(counts.get(s, 0))} {s}" for s in (STATUS_OK, STATUS_NO_FACE, STATUS_ERROR))
    problems = table[table["status"] != STATUS_OK]
    listed = [f"{r.status}: {r.path}: {r.message}" for r in problems.head(max_listed).itertuples()]
    if len(problems) > max_listed:
        listed.append(f"... and {len(problems) - max_listed} more (see the status and message columns)")
    return line, listed
