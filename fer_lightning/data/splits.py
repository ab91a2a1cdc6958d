"""Seeded, stratified splits of the records table: hold-out, train/val/test, k-fold and saved splits.

Stratification is by `expression`; rows without a label form one stratum of their own, and a table with no
labels at all is split at random (valence/arousal-only data). A class with too few rows to appear on both
sides of a split is an error (SplitError) naming the class, never a silent fallback.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import KFold, ShuffleSplit, StratifiedKFold, StratifiedShuffleSplit

from fer_lightning.data.records import SPLITS

log = logging.getLogger(__name__)

_NO_LABEL = -1  # stratum of rows without an expression label


class SplitError(ValueError):
    """The requested split cannot be made from these records (too few rows per class, bad fractions, ...)."""


def stratified_holdout(
    records: pd.DataFrame, *, fraction: float, seed: int, source: str = "train", target: str = "val"
) -> pd.DataFrame:
    """Move a stratified, seeded `fraction` of the `source` rows to `target`; unchanged if `target` has rows."""
    _check_split_name(target, "target")
    if not 0.0 < fraction < 1.0:
        raise SplitError(f"hold-out fraction must be in (0, 1), got {fraction}")
    split = records["split"].astype(object).to_numpy()
    if (split == target).any():
        log.info(
            "split %r already has %d rows; no hold-out carved from %r", target, int((split == target).sum()), source
        )
        return records
    src = np.flatnonzero(split == source)
    if len(src) == 0:
        raise SplitError(f"no rows in split {source!r} to hold {target!r} out of")
    n_target = math.ceil(fraction * len(src))
    what = f"holding {fraction:g} of {source!r} out as {target!r}"
    picked = _draw(_strata(records.iloc[src]), len(src), n_target, seed, what)
    out = records.copy()
    out["split"] = _with_splits(out["split"])
    out.loc[out.index[src[picked]], "split"] = target
    log.info("held out %d of %d %r rows as %r (seed %d)", len(picked), len(src), source, target, seed)
    return out


def stratified_split(records: pd.DataFrame, *, fractions: Mapping[str, float], seed: int) -> pd.DataFrame:
    """Assign every row to train/val/test in the given fractions (for data sets without an official split).

    Row counts are round(fraction * n) for val and test, the rest for train; test is drawn first, then val
    from what is left, each stratified.
    """
    unknown = sorted(set(fractions) - set(SPLITS))
    if unknown:
        raise SplitError(f"split fractions: unknown split names {unknown}; use {list(SPLITS)}")
    if any(f < 0 for f in fractions.values()) or not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
        raise SplitError(f"split fractions must be >= 0 and sum to 1, got {dict(fractions)}")
    if fractions.get("train", 0.0) <= 0:
        raise SplitError(f"split fractions: train needs a fraction above 0, got {dict(fractions)}")
    n = len(records)
    assigned = np.full(n, "train", dtype=object)
    remaining = np.arange(n)
    strata = _strata(records)
    for name in ("test", "val"):
        n_take = round(fractions.get(name, 0.0) * n)
        if n_take == 0:
            continue
        sub = None if strata is None else strata[remaining]
        picked = _draw(sub, len(remaining), n_take, seed, f"drawing {n_take} {name!r} rows of {n}")
        assigned[remaining[picked]] = name
        remaining = np.delete(remaining, picked)
    out = records.copy()
    out["split"] = pd.Categorical(assigned, categories=list(SPLITS))
    log.info("split %d rows: %s (seed %d)", n, out["split"].value_counts(sort=False).to_dict(), seed)
    return out


def kfold_assign(records: pd.DataFrame, *, k: int, seed: int) -> np.ndarray:
    """Fold id (0..k-1) for each train row, in table order, stratified by expression."""
    if k < 2:
        raise SplitError(f"k-fold needs k >= 2, got {k}")
    train = records.loc[(records["split"] == "train").to_numpy()]
    if len(train) < k:
        raise SplitError(f"k-fold with k={k} needs at least {k} train rows, found {len(train)}")
    strata = _strata(train)
    if strata is None:
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(train)))
    else:
        _require_members(strata, k, f"{k}-fold cross-validation (each fold needs every class)")
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(len(train)), strata)
    folds = np.full(len(train), -1, dtype=np.int64)
    for fold, (_, held) in enumerate(splitter):
        folds[held] = fold
    return folds


def save_split(records: pd.DataFrame, path: str | Path) -> None:
    """Write the split of every row as a CSV of path,split so that it can be reused with load_split."""
    dup = records["path"].duplicated(keep=False)
    if dup.any():
        raise SplitError(
            f"cannot save the split to {path}: {int(dup.sum())} rows share a path "
            f"(e.g. {records['path'][dup].iloc[0]!r}); remove duplicates first (data checks)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records[["path", "split"]].to_csv(path, index=False)


def load_split(records: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Set each row's split from a CSV written by save_split; every path must match between the two."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"saved split {path} not found")
    saved = pd.read_csv(path, dtype=str, keep_default_na=False)
    if list(saved.columns[:2]) != ["path", "split"]:
        raise SplitError(
            f"{path}: expected the columns path,split (as written by save_split), found {list(saved.columns)}"
        )
    bad_names = sorted(set(saved["split"]) - set(SPLITS))
    if bad_names:
        raise SplitError(f"{path}: unknown split names {bad_names}; expected {list(SPLITS)}")
    if saved["path"].duplicated().any():
        raise SplitError(f"{path}: path {saved['path'][saved['path'].duplicated()].iloc[0]!r} is listed twice")
    mapping = dict(zip(saved["path"], saved["split"]))
    record_paths = records["path"].astype(str)
    unknown = sorted(set(mapping) - set(record_paths))
    if unknown:
        raise SplitError(
            f"{path}: {len(unknown)} saved paths are not in the records (e.g. {unknown[:3]}); "
            "the split was saved for other data (data.root, data.format or class filter changed?)"
        )
    new = record_paths.map(mapping)
    if new.isna().any():
        missing = record_paths[new.isna()].tolist()
        raise SplitError(
            f"{path}: {len(missing)} records have no saved split (e.g. {missing[:3]}); "
            "the data changed since the split was saved: save a new split"
        )
    out = records.copy()
    out["split"] = pd.Categorical(new.to_numpy(dtype=object), categories=list(SPLITS))
    return out


def _check_split_name(name: str, what: str) -> None:
    if name not in SPLITS:
        raise SplitError(f"{what} split {name!r} is not one of {list(SPLITS)}")


def _with_splits(col: pd.Series) -> pd.Categorical:
    return pd.Categorical(col.astype(object), categories=list(SPLITS))


def _strata(records: pd.DataFrame) -> np.ndarray | None:
    """Expression ids with unlabeled rows as their own stratum; None when no row has a label."""
    expr = records["expression"]
    if expr.isna().all():
        return None
    return expr.fillna(_NO_LABEL).to_numpy(dtype=np.int64)


def _draw(strata: np.ndarray | None, n: int, n_take: int, seed: int, what: str) -> np.ndarray:
    """Sorted positions of `n_take` of `n` rows, stratified by `strata` (random when None)."""
    if not 0 < n_take < n:
        raise SplitError(f"{what}: cannot take {n_take} of {n} rows; change the fraction")
    if strata is None:
        _, picked = next(ShuffleSplit(n_splits=1, test_size=n_take, random_state=seed).split(np.zeros(n)))
        return np.sort(picked)
    _require_members(strata, 2, what)
    n_classes = len(np.unique(strata))
    if min(n_take, n - n_take) < n_classes:
        raise SplitError(
            f"{what}: {min(n_take, n - n_take)} rows on the smaller side cannot hold one of each of the "
            f"{n_classes} classes; change the fraction or use fewer classes (data.classes)"
        )
    sss = StratifiedShuffleSplit(n_splits=1, test_size=n_take, random_state=seed)
    _, picked = next(sss.split(np.zeros(n), strata))
    return np.sort(picked)


def _require_members(strata: np.ndarray, minimum: int, what: str) -> None:
    ids, counts = np.unique(strata, return_counts=True)
    few = {("unlabeled" if i == _NO_LABEL else int(i)): int(c) for i, c in zip(ids, counts) if c < minimum}
    if few:
        raise SplitError(
            f"{what}: classes with fewer than {minimum} rows cannot be stratified: {few} "
            "(rows per class); drop those classes from data.classes or add data"
        )
