"""Face boxes for raw photos: OpenCV's shipped Haar cascade (frontal faces), the largest face wins.

Boxes are (x, y, w, h) in the pixel coordinates `load_face` crops in: the full-resolution image after EXIF
orientation. The cascade file ships inside opencv-python-headless (cv2.data.haarcascades); nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from fer_lightning.data.images import ImageDecodeError, to_8bit

CASCADE = "haarcascade_frontalface_default.xml"


class FaceDetectorError(RuntimeError):
    """OpenCV or its cascade file is not available."""


@dataclass(frozen=True)
class DetectorSettings:
    """detectMultiScale parameters; min_size is a fraction of the shorter image side."""

    scale_factor: float = 1.1
    min_neighbors: int = 5
    min_size: float = 0.1
    margin: float = 0.0  # grow the detected box by this fraction of its side on every edge


class HaarFaceDetector:
    """Detects frontal faces with OpenCV's Haar cascade; `largest_face(path)` -> box or None."""

    def __init__(self, settings: DetectorSettings | None = None):
        try:
            import cv2
        except ImportError as err:
            raise FaceDetectorError(
                "detect_faces=true needs OpenCV: pip install 'opencv-python-headless>=4.8,<5'"
            ) from err
        if not hasattr(cv2, "CascadeClassifier"):
            # OpenCV 5 moved the Haar cascades out of the main package
            raise FaceDetectorError(
                f"OpenCV {cv2.__version__} has no CascadeClassifier: install 'opencv-python-headless>=4.8,<5'"
            )
        path = Path(cv2.data.haarcascades) / CASCADE
        self.classifier = cv2.CascadeClassifier(str(path))
        if self.classifier.empty():
            raise FaceDetectorError(f"cannot load the Haar cascade {path}; reinstall opencv-python-headless")
        self.settings = settings or DetectorSettings()
        self._cv2 = cv2

    def detect(self, gray: np.ndarray) -> list[tuple[int, int, int, int]]:
        """All face boxes (x, y, w, h) in a 2-D uint8 image."""
        s = self.settings
        side = max(int(min(gray.shape[:2]) * s.min_size), 20)
        # histogram equalization makes the cascade's fixed Haar thresholds work under dim or flat lighting
        faces = self.classifier.detectMultiScale(
            self._cv2.equalizeHist(gray),
            scaleFactor=s.scale_factor,
            minNeighbors=s.min_neighbors,
            minSize=(side, side),
        )
        return [tuple(int(v) for v in f) for f in faces]

    def largest_face(self, path: str | Path) -> tuple[float, float, float, float] | None:
        """Box of the largest face in the image file (grown by the margin, clamped to the image), or None."""
        gray = upright_gray(path)
        faces = self.detect(gray)
        if not faces:
            return None
        x, y, w, h = max(faces, key=lambda f: f[2] * f[3])
        return grow_box((x, y, w, h), self.settings.margin, width=gray.shape[1], height=gray.shape[0])


def grow_box(
    box: tuple[float, float, float, float], margin: float, *, width: int, height: int
) -> tuple[float, float, float, float]:
    """(x, y, w, h) grown by `margin` * side on each edge, then clamped to the image."""
    x, y, w, h = box
    x0, y0 = max(x - margin * w, 0.0), max(y - margin * h, 0.0)
    x1, y1 = min(x + w + margin * w, float(width)), min(y + h + margin * h, float(height))
    return float(x0), float(y0), float(x1 - x0), float(y1 - y0)


def upright_gray(path: str | Path) -> np.ndarray:
    """The full image as 2-D uint8 grey after EXIF orientation, by the same mode policy as load_face."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            return np.asarray(to_8bit(img, 1, path), dtype=np.uint8)
    except ImageDecodeError:
        raise
    except Exception as e:  # PIL raises a zoo (OSError, SyntaxError, ValueError, ...)
        raise ImageDecodeError(path, f"{type(e).__name__}: {e}") from e
