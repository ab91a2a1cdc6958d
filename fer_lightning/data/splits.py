"""Seeded, stratified splits of the records table: hold-out, train/val/test, k-fold and saved splits.

Stratification is by `expression`; rows without a label form one stratum of their own, and a table with no
labels at all is split at random (valence/arousal-only data). A class with too few rows to appear on both
sides of a split is an error (SplitError) naming the class, never a silent fallback.

Groups (data.group_by, see resolve_groups): with `groups` given, every split keeps each group (e.g. a subject) on
one side, stratified where it can be (StratifiedGroupKFold: one fold of round(1/fraction) for a fraction); a
table without labels, or with fewer groups than folds, draws whole groups at random (GroupShuffleSplit), logged.
"""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import (
    GroupShuffleSplit,
    KFold,
    ShuffleSplit,
    StratifiedGroupKFold,
    StratifiedKFold,
    StratifiedShuffleSplit,
)

from fer_lightning.data.records import SPLITS

log = logging.getLogger(__name__)

_NO_LABEL = -1  # stratum of rows without an expression label
GROUP_REGEX_PREFIX = "re:"
GROUP_KEY = "data.group_by"
_GROUP_HELP = (
    f"{GROUP_KEY} takes a records column (e.g. group_subject) or {GROUP_REGEX_PREFIX}<regex> with one capture "
    "group, searched in the file name (the whole relative path when the regex has a /), e.g. re:^(S[0-9]+)_"
)


class SplitError(ValueError):
    """The requested split cannot be made from these records (too few rows per class, bad fractions, ...)."""


def resolve_groups(records: pd.DataFrame, group_by: str) -> np.ndarray:
    """The group (a string) of every row, from data.group_by: a records column, or `re:<regex>` with one capture
    group searched (re.search: anchor it with ^ yourself) in each path's file name, or in the whole relative path
    when the regex contains a '/'. A row without a group (no match, an empty match, a missing value) is an error."""
    spec = str(group_by).strip()
    n = len(records)
    if spec.startswith(GROUP_REGEX_PREFIX):
        pattern = spec[len(GROUP_REGEX_PREFIX) :]
        try:
            rx = re.compile(pattern)
        except re.error as err:
            raise SplitError(f"{GROUP_KEY}={spec!r}: {pattern!r} is not a valid regular expression ({err})") from err
        if rx.groups != 1:
            raise SplitError(
                f"{GROUP_KEY}={spec!r}: the regex needs exactly one capture group (the group's name), it has "
                f"{rx.groups}; e.g. re:^(S[0-9]+)_ makes S010 of anger/S010_004_00000017.png"
            )
        whole = "/" in pattern
        paths = records["path"].astype(str).str.replace("\\", "/", regex=False)
        subjects = paths if whole else paths.str.rsplit("/", n=1).str[-1]
        found = [m.group(1) if (m := rx.search(text)) else None for text in subjects]
        groups = np.array([g if g else None for g in found], dtype=object)
        what = "the relative path (the regex has a /)" if whole else "the file name (the path's last part)"
        problem = f"the regex matches nothing (or an empty group) in {what}"
    else:
        if spec not in records.columns:
            raise SplitError(
                f"{GROUP_KEY}={spec!r}: the records have no column {spec!r} (columns: {list(records.columns)}); "
                f"{_GROUP_HELP}"
            )
        col = records[spec].astype(object)
        missing = col.isna().to_numpy() | (col.astype(str).str.strip() == "").to_numpy()
        groups = np.where(missing, None, col.astype(str).to_numpy(dtype=object))
        problem = f"no value in column {spec!r}"
    bad = np.flatnonzero(pd.isna(groups))
    if len(bad):
        shown = ", ".join(f"row {records.index[i]} {str(records['path'].iloc[i])!r}" for i in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise SplitError(
            f"{GROUP_KEY}={spec!r}: {len(bad)} of {n} rows have no group, {problem}: {shown}{more}; fix "
            f"{GROUP_KEY} so that every row has a group, or remove those rows ({_GROUP_HELP})"
        )
    return groups.astype(object)


def groups_per_split(split: pd.Series | np.ndarray, groups: np.ndarray) -> dict[str, int]:
    """How many distinct groups each split holds."""
    split = np.asarray(pd.Series(split).astype(object))
    return {name: len(set(groups[split == name])) for name in SPLITS if (split == name).any()}


def shared_groups(split: pd.Series | np.ndarray, groups: np.ndarray) -> list[str]:
    """Groups with rows in more than one split, sorted."""
    frame = pd.DataFrame({"split": np.asarray(pd.Series(split).astype(object)), "group": groups}).dropna()
    n_splits = frame.groupby("group")["split"].nunique()
    return sorted(n_splits.index[n_splits > 1].astype(str))


def _log_groups(split: pd.Series | np.ndarray, groups: np.ndarray, what: str) -> None:
    counts = groups_per_split(split, groups)
    log.info("%s: groups (%s) per split: %s", what, GROUP_KEY, ", ".join(f"{k} {v}" for k, v in counts.items()))


def stratified_holdout(
    records: pd.DataFrame,
    *,
    fraction: float,
    seed: int,
    source: str = "train",
    target: str = "val",
    groups: np.ndarray | None = None,
) -> pd.DataFrame:
    """Move a stratified, seeded `fraction` of the `source` rows to `target`; unchanged if `target` has rows.

    `groups` (one per row, see resolve_groups): whole groups move, none is left on both sides."""
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
    strata = _strata(records.iloc[src])
    if groups is None:
        picked = _draw(strata, len(src), n_target, seed, what)
    else:
        picked = _draw_groups(strata, np.asarray(groups, dtype=object)[src], n_target, seed, what, fraction)
    out = records.copy()
    out["split"] = _with_splits(out["split"])
    out.loc[out.index[src[picked]], "split"] = target
    log.info("held out %d of %d %r rows as %r (seed %d)", len(picked), len(src), source, target, seed)
    if groups is not None:
        _log_groups(out["split"], np.asarray(groups, dtype=object), "hold-out")
    return out


def stratified_split(
    records: pd.DataFrame, *, fractions: Mapping[str, float], seed: int, groups: np.ndarray | None = None
) -> pd.DataFrame:
    """Assign every row to train/val/test in the given fractions (for data sets without an official split).

    Row counts are round(fraction * n) for val and test, the rest for train; test is drawn first, then val
    from what is left, each stratified. With `groups`, whole groups are drawn and the counts are approximate.
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
        what = f"drawing {n_take} {name!r} rows of {n}"
        if groups is None:
            picked = _draw(sub, len(remaining), n_take, seed, what)
        else:
            picked = _draw_groups(sub, np.asarray(groups, dtype=object)[remaining], n_take, seed, what)
        assigned[remaining[picked]] = name
        remaining = np.delete(remaining, picked)
    out = records.copy()
    out["split"] = pd.Categorical(assigned, categories=list(SPLITS))
    log.info("split %d rows: %s (seed %d)", n, out["split"].value_counts(sort=False).to_dict(), seed)
    if groups is not None:
        _log_groups(out["split"], np.asarray(groups, dtype=object), "split")
    return out


def kfold_assign(records: pd.DataFrame, *, k: int, seed: int, groups: np.ndarray | None = None) -> np.ndarray:
    """Fold id (0..k-1) for each train row, in table order, stratified by expression.

    `groups` (one per row of `records`): every group lies in one fold (StratifiedGroupKFold)."""
    if k < 2:
        raise SplitError(f"k-fold needs k >= 2, got {k}")
    is_train = (records["split"] == "train").to_numpy()
    train = records.loc[is_train]
    if len(train) < k:
        raise SplitError(f"k-fold with k={k} needs at least {k} train rows, found {len(train)}")
    strata = _strata(train)
    if groups is not None:
        return _kfold_groups(strata, np.asarray(groups, dtype=object)[is_train], k, seed)
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
    """Write the split of every row as a CSV of path,split (and group, when the records have a `group` column:
    data.group_by) so that it can be reused with load_split."""
    dup = records["path"].duplicated(keep=False)
    if dup.any():
        raise SplitError(
            f"cannot save the split to {path}: {int(dup.sum())} rows share a path "
            f"(e.g. {records['path'][dup].iloc[0]!r}); remove duplicates first (data checks)"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records[["path", "split", *(["group"] if "group" in records else [])]].to_csv(path, index=False)


def load_split(records: pd.DataFrame, path: str | Path) -> pd.DataFrame:
    """Set each row's split from a CSV written by save_split; every path must match between the two. Columns
    after path,split (the group of newer files) are not needed: files without them still load."""
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


def _draw_groups(
    strata: np.ndarray | None, groups: np.ndarray, n_take: int, seed: int, what: str, fraction: float | None = None
) -> np.ndarray:
    """Sorted positions of about `n_take` of the rows, whole groups only, stratified by `strata` where it can be.

    For f = n_take / n <= 0.5 one fold of a StratifiedGroupKFold with round(1/f) folds is taken (for f > 0.5 all
    but one of round(1/(1-f))): of the folds, the one that leaves the fewest classes off a side, then the one
    nearest n_take rows. Without labels, or with fewer groups than folds, GroupShuffleSplit draws a fraction f
    of the groups at random. `fraction`, when given, is f (the requested share, before rounding to rows).
    """
    n = len(groups)
    if not 0 < n_take < n:
        raise SplitError(f"{what}: cannot take {n_take} of {n} rows; change the fraction")
    n_groups = len(set(groups))
    if n_groups < 2:
        raise SplitError(
            f"{what}: all {n} rows are in one group ({GROUP_KEY}); a split needs at least 2 groups: "
            f"check {GROUP_KEY} or set it to null"
        )
    if strata is not None:
        _require_groups(strata, groups, 2, what)
    f = n_take / n if fraction is None else fraction
    take_fold = f <= 0.5
    k = max(2, round(1 / f) if take_fold else round(1 / (1 - f)))
    if strata is not None and n_groups >= k:
        with warnings.catch_warnings():  # "least populated class ... less than n_splits": checked above
            warnings.simplefilter("ignore", UserWarning)
            folds = list(
                StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(np.zeros(n), strata, groups)
            )
        target = n_take if take_fold else n - n_take

        def score(i: int) -> tuple[int, int, int]:
            held = folds[i][1]
            return (_missing_sides(strata, held), abs(len(held) - target), i)

        rest, held = folds[min(range(k), key=score)]
        picked = held if take_fold else rest
    else:
        if strata is None:
            log.info("%s: no labels to stratify by: whole groups (%s) drawn at random", what, GROUP_KEY)
        else:
            log.warning(
                "%s: %d groups (%s) are too few for %d stratified folds: whole groups drawn at random, not "
                "stratified (GroupShuffleSplit)",
                what,
                n_groups,
                GROUP_KEY,
                k,
            )
        gss = GroupShuffleSplit(n_splits=1, test_size=f, random_state=seed)
        _, picked = next(gss.split(np.zeros(n), groups=groups))
    if not 0 < len(picked) < n:
        raise SplitError(f"{what}: the groups ({GROUP_KEY}) allow no split of this size; change the fraction")
    if strata is not None:
        _warn_missing(strata, picked, what)
    return np.sort(picked)


def _kfold_groups(strata: np.ndarray | None, groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    what = f"{k}-fold cross-validation with {GROUP_KEY}"
    n_groups = len(set(groups))
    if n_groups < k:
        raise SplitError(
            f"{what}: {k} folds need at least {k} groups, the {len(groups)} rows have {n_groups}; use fewer "
            f"folds (cv.folds) or check {GROUP_KEY}"
        )
    if strata is None:
        log.info("%s: no labels to stratify by: whole groups shuffled into folds", what)
        y = np.zeros(len(groups), dtype=np.int64)
    else:
        _require_groups(strata, groups, k, f"{what} (each fold needs every class)")
        y = strata
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(
            np.zeros(len(groups)), y, groups
        )
        folds = np.full(len(groups), -1, dtype=np.int64)
        for fold, (_, held) in enumerate(splitter):
            folds[held] = fold
    for fold in range(k):
        held = np.flatnonzero(folds == fold)
        if len(held) == 0:
            raise SplitError(f"{what}: fold {fold} got no groups; use fewer folds (cv.folds)")
        if strata is not None:
            _warn_missing(strata, held, f"{what}, fold {fold}")
    log.info("%s: groups per fold: %s", what, ", ".join(str(len(set(groups[folds == f]))) for f in range(k)))
    return folds


def _missing_sides(strata: np.ndarray, picked: np.ndarray) -> int:
    """How many classes are absent from the picked rows or from the rest."""
    inside = np.zeros(len(strata), dtype=bool)
    inside[picked] = True
    present = set(np.unique(strata))
    return len(present - set(np.unique(strata[inside]))) + len(present - set(np.unique(strata[~inside])))


def _warn_missing(strata: np.ndarray, picked: np.ndarray, what: str) -> None:
    inside = np.zeros(len(strata), dtype=bool)
    inside[picked] = True
    for side, mask in (("drawn", inside), ("remaining", ~inside)):
        gone = sorted(set(np.unique(strata)) - set(np.unique(strata[mask])))
        if gone:
            names = ["unlabeled" if c == _NO_LABEL else int(c) for c in gone]
            log.warning(
                "%s: no rows of classes %s on the %s side: their groups (%s) all fell on the other side",
                what,
                names,
                side,
                GROUP_KEY,
            )


def _require_groups(strata: np.ndarray, groups: np.ndarray, minimum: int, what: str) -> None:
    frame = pd.DataFrame({"stratum": strata, "group": groups})
    per_class = frame.groupby("stratum")["group"].nunique()
    few = {("unlabeled" if i == _NO_LABEL else int(i)): int(c) for i, c in per_class.items() if c < minimum}
    if few:
        raise SplitError(
            f"{what}: classes whose rows lie in fewer than {minimum} groups ({GROUP_KEY}) cannot be on every "
            f"side: {few} (groups per class); drop those classes from data.classes, add data or set "
            f"{GROUP_KEY}=null"
        )


def _require_members(strata: np.ndarray, minimum: int, what: str) -> None:
    ids, counts = np.unique(strata, return_counts=True)
    few = {("unlabeled" if i == _NO_LABEL else int(i)): int(c) for i, c in zip(ids, counts) if c < minimum}
    if few:
        raise SplitError(
            f"{what}: classes with fewer than {minimum} rows cannot be stratified: {few} "
            "(rows per class); drop those classes from data.classes or add data"
        )
