"""Find a format reader by its module name and turn what it reads into the records table."""

from __future__ import annotations

import importlib
import logging
import pkgutil
from pathlib import Path

import pandas as pd

from fer_lightning.data.records import make_records

log = logging.getLogger(__name__)

# Modules in fer_lightning/formats that are not readers.
_NOT_READERS = frozenset({"registry"})


class DataFormatError(ValueError):
    """The data on disk does not match the layout its reader expects."""


class DataFileNotFoundError(DataFormatError, FileNotFoundError):
    """A file or folder a reader needs is missing; catchable as FileNotFoundError too."""


def available_formats() -> list[str]:
    """Names of the reader modules in fer_lightning/formats (the values `data.format` accepts)."""
    package = importlib.import_module("fer_lightning.formats")
    names = [m.name for m in pkgutil.iter_modules(package.__path__)]
    return sorted(n for n in names if not n.startswith("_") and n not in _NOT_READERS)


def read_records(format: str, root: str | Path, **options) -> pd.DataFrame:
    """Read the data set at `root` with reader module `fer_lightning.formats.<format>` into the records table."""
    available = available_formats()
    if not isinstance(format, str) or format not in available:
        raise DataFormatError(
            f"data.format: unknown format {format!r}; available formats (modules in fer_lightning/formats): "
            f"{', '.join(available)}"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        what = "is not a folder" if root.exists() else "does not exist"
        raise DataFileNotFoundError(f"data.root: {str(root)!r} {what}; set data.root to the {format} data set's folder")
    module = importlib.import_module(f"fer_lightning.formats.{format}")
    reader = getattr(module, "read", None)
    if not callable(reader):
        raise DataFormatError(f"fer_lightning/formats/{format}.py has no read(root, **options) function")
    df = reader(root, **options)
    if not isinstance(df, pd.DataFrame):
        raise DataFormatError(f"fer_lightning.formats.{format}.read returned {type(df).__name__}, not a DataFrame")
    records = make_records(df)
    log.info("read %d records from %s (format %s): %s", len(records), root, format,
             records["split"].value_counts(sort=False).to_dict())
    return records
