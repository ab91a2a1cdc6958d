"""The records table: one schema that every format reader returns (see DESIGN.md)."""

from __future__ import annotations

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
BOX_COLUMNS = ("face_x", "face_y", "face_w", "face_h")
REQUIRED_COLUMNS = ("path", "split", "expression", "valence", "arousal", "landmarks", *BOX_COLUMNS)
# AffectNet marks valence/arousal of non-faces with -2.
VA_NONFACE_MARKER = -2.0


def make_records(df: pd.DataFrame) -> pd.DataFrame:
    """Fill missing optional columns and coerce every column to the schema's dtype."""
    df = df.copy()
    if "path" not in df or "split" not in df:
        raise ValueError("a records table needs at least the columns 'path' and 'split'")
    n = len(df)
    if "expression" not in df:
        df["expression"] = pd.array([pd.NA] * n, dtype="Int64")
    for col in ("valence", "arousal", *BOX_COLUMNS):
        if col not in df:
            df[col] = np.nan
    if "landmarks" not in df:
        df["landmarks"] = pd.Series([None] * n, dtype=object, index=df.index)
    df["path"] = df["path"].astype("string")
    df["split"] = pd.Categorical(df["split"].astype(str), categories=list(SPLITS))
    df["expression"] = df["expression"].astype("Int64")
    for col in ("valence", "arousal", *BOX_COLUMNS):
        df[col] = df[col].astype("float32")
    for col in [c for c in df.columns if c.startswith("group_")]:
        df[col] = df[col].astype("category")
    ordered = list(REQUIRED_COLUMNS) + [c for c in df.columns if c not in REQUIRED_COLUMNS]
    return df[ordered].reset_index(drop=True)


def empty_records() -> pd.DataFrame:
    return make_records(pd.DataFrame({"path": [], "split": []}))


def group_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if c.startswith("group_")]
