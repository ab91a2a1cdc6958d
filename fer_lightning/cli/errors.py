"""Turn known user-facing errors into one clear message and exit code 2 instead of a traceback."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

log = logging.getLogger("fer_lightning")


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is the answer to the user (bad config, bad data, missing weights)."""
    from fer_lightning.bench import BenchConfigError
    from fer_lightning.checkpoints import CheckpointError
    from fer_lightning.data.checks import DataCheckError
    from fer_lightning.data.datamodule import DataConfigError
    from fer_lightning.data.images import ImageDecodeError
    from fer_lightning.data.leakage import LeakageError
    from fer_lightning.data.splits import SplitError
    from fer_lightning.errors import ConfigError
    from fer_lightning.export import ExportError
    from fer_lightning.face_detect import FaceDetectorError
    from fer_lightning.formats.registry import DataFormatError
    from fer_lightning.mlflow_retry import TrackingUnavailableError
    from fer_lightning.mlflow_spool import SpoolError
    from fer_lightning.mlflow_store import MlflowStoreError
    from fer_lightning.models.backbones import WeightsMismatchError, WeightsNotFoundError
    from fer_lightning.predict import PredictInputError

    return (ConfigError, DataCheckError, DataConfigError, DataFormatError, ImageDecodeError, WeightsNotFoundError,
            WeightsMismatchError, SplitError, LeakageError, CheckpointError, PredictInputError, FaceDetectorError,
            ExportError, BenchConfigError, SpoolError, TrackingUnavailableError, MlflowStoreError)  # fmt: skip


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print `error: <message>` and exit 2 for user errors; FER_DEBUG=1 shows the traceback as well."""
    try:
        yield
    except user_error_types() as err:
        if os.environ.get("FER_DEBUG"):
            raise
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
