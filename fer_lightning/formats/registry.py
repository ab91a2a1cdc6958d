"""Find a format reader by its module name and turn what it reads into the records table."""

from __future__ import annotations

import importlib
import inspect
import logging
import pkgutil
from pathlib import Path

import pandas as pd

from fer_lightning.data.records import SPLITS, make_records

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
    _check_options(format, reader, root, options)
    df = reader(root, **options)
    if not isinstance(df, pd.DataFrame):
        raise DataFormatError(f"fer_lightning.formats.{format}.read returned {type(df).__name__}, not a DataFrame")
    if "split" in df:
        # make_records would turn an unknown split name into NaN, silently dropping the rows from every split.
        bad = sorted(set(df["split"].dropna().astype(str)) - set(SPLITS))
        bad += ["<missing>"] if df["split"].isna().any() else []
        if bad:
            raise DataFormatError(f"format {format}: split names {bad} are not one of {list(SPLITS)}")
    records = make_records(df)
    log.info(
        "read %d records from %s (format %s): %s",
        len(records),
        root,
        format,
        records["split"].value_counts(sort=False).to_dict(),
    )
    return records


def _check_options(format: str, reader, root: Path, options: dict) -> None:
    """Name the data.reader option a reader does not take, instead of a TypeError from deep inside."""
    try:
        inspect.signature(reader).bind(root, **options)
    except TypeError as err:
        params = [p for p in inspect.signature(reader).parameters if p != "root"]
        unknown = sorted(set(options) - set(params))
        raise DataFormatError(
            f"data.reader: format {format} does not take {unknown or err}; its options are {params}"
        ) from err
