"""FERDataModule: records -> checked, split, cached, sampled data loaders for one data config."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, DistributedSampler

from fer_lightning.data.checks import CheckReport, run_checks
from fer_lightning.data.dataset import FERDataset
from fer_lightning.data.records import SPLITS
from fer_lightning.data.resumable import ResumableLoader
from fer_lightning.data.sampling import EpochSampler
from fer_lightning.data.transforms import augment_where, build_train_transform
from fer_lightning.taxonomy import AUTO_CLASSES, FIRST_EXTRA_ID, Taxonomy, class_order, is_auto, normalize_name

log = logging.getLogger(__name__)


class DataConfigError(ValueError):
    """A data setting that cannot work; the message names the config key."""


def resolve_num_workers(value: Any, *, light_items: bool = False) -> int:
    """`auto` -> no worker processes when items are cache slices with nothing to do per item (light_items), else
    one worker per spare core (at most 8); otherwise the given count."""
    if value in (None, "auto"):
        if light_items:
            return 0  # a worker would only copy memmap slices and pickle them back: slower than doing it here
        return max(0, min(8, (os.cpu_count() or 1) - 1))
    n = int(value)
    if n < 0:
        raise DataConfigError(f"data.num_workers must be >= 0 or 'auto', got {value!r}")
    return n


class FERDataModule(pl.LightningDataModule):
    """Reads a data set through its format reader and serves train/val/test with the chosen sampling."""

    def __init__(
        self,
        data: Mapping[str, Any],
        *,
        sampling: str = "none",
        augment: Mapping[str, Any] | None = None,
        seed: int = 0,
        cache_dir: str | Path = "data_cache",
        landmarks: bool = False,
        test_only: bool = False,
    ):
        """test_only: evaluation of the test split alone (fer-eval); a data set that ships only a test split (no
        train rows to hold a validation split out of) is then accepted as it is."""
        super().__init__()
        self.cfg = OmegaConf.to_container(data, resolve=True) if isinstance(data, DictConfig) else dict(data)
        self.sampling = sampling
        self.augment = dict(augment or {})
        self.seed = int(seed)
        self.cache_dir = Path(cache_dir)
        self.landmarks = landmarks
        self.test_only = bool(test_only)
        self.taxonomy = Taxonomy(self.cfg.get("extra_classes") or ())
        # data.classes=auto, or a list naming data-set classes (e.g. a class folder `focused`): resolved after
        # reading (load_records), when the data set's classes are known
        self._class_ids: list[int] | None = None
        self.class_names: list[str] = []
        classes = self.cfg.get("classes", AUTO_CLASSES)
        if not is_auto(classes) and not self._unknown_class_names(classes):
            self._set_classes(self._resolve_listed(classes))
        self.num_workers = resolve_num_workers(
            self.cfg.get("num_workers", "auto"),
            light_items=bool(self.cfg.get("cache", True)) and augment_where(self.augment) == "batch",
        )
        self.records: pd.DataFrame | None = None
        self.check_report: CheckReport | None = None
        self.label_mapping: dict[str, str] = {}
        self.leaks: pd.DataFrame | None = None
        # (path, reason) pairs a reader reports about its metadata files (e.g. VIA rows for missing images)
        self.metadata_issues: list[tuple[str, str]] = []
        self.datasets: dict[str, FERDataset] = {}
        self.root: Path | None = None

    # ----------------------------------------------------------------- classes
    @property
    def class_ids(self) -> list[int]:
        """Model classes as taxonomy ids, in output order (known after load_records for data.classes=auto)."""
        if self._class_ids is None:
            raise DataConfigError(
                f"data.classes={self.cfg.get('classes')}: the classes are known only after reading the data set; "
                "call load_records() or setup() first"
            )
        return self._class_ids

    @class_ids.setter
    def class_ids(self, ids: list[int]) -> None:
        self._set_classes(list(ids))

    def _set_classes(self, ids: list[int]) -> None:
        self._class_ids = [int(c) for c in ids]
        self.class_names = [self.taxonomy.name_of(c) for c in self._class_ids]

    def _unknown_class_names(self, classes: Any) -> list[str]:
        if isinstance(classes, str):
            return []  # not a list: resolve_classes names the problem
        return [
            str(c)
            for c in classes
            if not isinstance(c, int) and not str(c).isdigit() and self.taxonomy.id_of(str(c)) is None
        ]

    def _resolve_listed(self, classes: Any, found: list[str] | None = None) -> list[int]:
        try:
            return self.taxonomy.resolve_classes(classes)
        except ValueError as err:
            where = "" if found is None else f"; class labels found in {self.root}: {found}"
            raise DataConfigError(f"{err}{where}") from err

    def _resolve_classes(self, records: pd.DataFrame) -> pd.DataFrame:
        """Classes from what was read: class folders outside the taxonomy become data-set classes (ids from
        FIRST_EXTRA_ID, sorted by name, after data.extra_classes'), then data.classes=auto takes every class
        found (canonical ids ascending, then data-set classes by name) and a list is resolved in its order."""
        classes = self.cfg.get("classes", AUTO_CLASSES)
        declared = list(self.cfg.get("extra_classes") or ())
        folders = set(records.attrs.get("class_folders") or ())
        unmapped = records["expression"].isna() & records["label_raw"].notna() if "label_raw" in records else None
        new: list[str] = []
        if unmapped is not None and unmapped.any() and folders:
            names = {normalize_name(r) for r in records.loc[unmapped, "label_raw"].astype(str) if r in folders}
            new = sorted(names)
        if new:
            self.taxonomy = Taxonomy([*declared, *new])
            ids = [self.taxonomy.id_of(str(r)) for r in records.loc[unmapped, "label_raw"]]
            records = records.copy()
            records.loc[unmapped, "expression"] = pd.array(ids, dtype="Int64")
            for raw in records.loc[unmapped, "label_raw"].dropna().unique():
                if self.taxonomy.id_of(str(raw)) is not None:
                    self.label_mapping[str(raw)] = self.taxonomy.name_of(self.taxonomy.id_of(str(raw)))
        present = {int(c) for c in records["expression"].dropna().unique()} & set(self.taxonomy.id_to_name)
        found = [self.taxonomy.name_of(c) for c in class_order(self.taxonomy, present)]
        if is_auto(classes):
            ids = class_order(self.taxonomy, present)
            if len(ids) < 2:
                raise DataConfigError(
                    f"data.classes=auto: {self.root} has {len(ids)} class(es) with images ({found}); at least 2 are "
                    "needed: point data.root at the folder holding the class folders (or split folders)"
                )
            self._set_classes(ids)
            extra = [n for c, n in zip(self.class_ids, self.class_names) if c >= FIRST_EXTRA_ID]
            log.info(
                "data.classes=auto: %d classes found in %s: %s%s",
                len(ids),
                self.root,
                self.class_names,
                f" (data-set classes beyond the taxonomy: {extra}, ids from {FIRST_EXTRA_ID} by name)" if extra else "",
            )
        elif self._class_ids is None or new:
            self._set_classes(self._resolve_listed(classes, found))
        return records

    def _check_classes_trained(self, records: pd.DataFrame) -> None:
        """Every model class needs training samples: a class no train row carries could never be learnt."""
        if self.test_only:
            return
        train = records.loc[(records["split"] == "train").to_numpy(), "expression"]
        counts = {n: int((train == c).sum()) for c, n in zip(self.class_ids, self.class_names)}
        empty = [n for n, k in counts.items() if k == 0]
        if not empty:
            return
        if is_auto(self.cfg.get("classes")):
            fix = "add training images of them (data.classes=auto took every class found)"
        else:
            fix = (
                "data.classes=auto takes the classes the data set has; or add training images of them "
                "(data.classes lists classes the model must output)"
            )
        raise DataConfigError(
            f"classes {empty} have no training sample after the split of {self.root} (train counts {counts}): "
            f"a class without training samples cannot be learnt; {fix}"
        )

    # ----------------------------------------------------------------- records
    def resolve_root(self) -> Path:
        """The data root; the synthetic data set is generated (once, cached by its parameters) here."""
        synth = self.cfg.get("synthetic")
        root = self.cfg.get("root")
        if synth and root in (None, ""):
            from fer_lightning.data.synthetic import ensure_synthetic

            return ensure_synthetic(self.cache_dir, **dict(synth))
        if root in (None, "", "???"):
            raise DataConfigError("data.root is not set: pass data.root=/path/to/your/data set")
        root = Path(os.path.expanduser(str(root)))
        if not root.exists():
            raise DataConfigError(f"data.root={root} does not exist: point data.root at the data set's folder")
        return root

    def load_records(self) -> pd.DataFrame:
        """Read, subset, split and check the records (everything that can fail before training starts)."""
        from fer_lightning.formats.registry import read_records

        self.root = self.resolve_root()
        reader_opts = dict(self.cfg.get("reader") or {})
        if self.cfg.get("extra_classes"):
            if not reader_accepts(self.cfg["format"], "extra_classes"):
                raise DataConfigError(
                    f"data.extra_classes is set, but format {self.cfg['format']} has a fixed label set; remove it"
                )
            reader_opts["extra_classes"] = list(self.cfg["extra_classes"])
        records = read_records(self.cfg["format"], self.root, **reader_opts)
        self.label_mapping = dict(records.attrs.get("label_mapping", {}))
        needs_split = bool(records.attrs.get("needs_split", False))
        self.metadata_issues = [tuple(i) for i in records.attrs.get("metadata_issues", [])]
        records = self._resolve_classes(records)
        records = self._subset_classes(records)
        # checks before splitting: the split (made or loaded) only ever sees rows that passed them
        records, self.check_report = run_checks(
            records,
            self.root,
            classes=self.class_ids,
            known_ids=list(self.taxonomy.id_to_name),
            policy=str(self.cfg.get("checks", "error")),
            decode=str(self.cfg.get("checks_decode", "header")),
        )
        records = self._with_groups(records)
        split_file = self.cfg.get("split_file")
        if split_file:
            records = self._load_split(records, split_file)
        elif needs_split or not self.test_only or (records["split"] == "train").any():
            # as in training (same seed and fractions -> same rows, same data fingerprint); only a data set that
            # ships a test split alone (test_only evaluation) is left as it is
            records = self._split(records, needs_split)
        if self.cfg.get("fold"):
            from fer_lightning.kfold import fold_records

            # k-fold cross-validation (cv.folds, set by kfold.run_kfold): one fold of train+val is val
            records = fold_records(records, **dict(self.cfg["fold"]), groups=self._groups(records))
        for split in () if self.test_only else ("train", "val"):
            if not (records["split"] == split).any():
                raise DataConfigError(
                    f"the {split} split is empty after reading {self.root} (format {self.cfg['format']}, "
                    f"classes {self.class_names}); check data.root, data.classes and data.checks"
                )
        self._check_classes_trained(records)
        if not (records["split"] == "test").any():
            log.warning("data set %s has no test split: the test stage is skipped", self.root)
        self._check_leakage(records)
        return records

    def _subset_classes(self, records: pd.DataFrame) -> pd.DataFrame:
        expr = records["expression"]
        # canonical classes left out of data.classes are filtered here; ids outside the taxonomy stay for the checks
        outside = expr.notna() & expr.isin(list(self.taxonomy.id_to_name)) & ~expr.isin(self.class_ids)
        if outside.any():
            dropped = records.loc[outside, "expression"].map(lambda c: self.taxonomy.name_of(int(c))).value_counts()
            policy = self.cfg.get("other_classes", "drop")
            if policy == "error":
                first = records.loc[outside, "path"].head(5).tolist()
                raise DataConfigError(
                    f"{int(outside.sum())} rows carry labels outside data.classes={self.class_names} "
                    f"({dict(dropped)}; first: {first}); add them to data.classes or set data.other_classes=drop"
                )
            log.warning(
                "dropped %d rows of classes outside data.classes=[%s]: %s; to train on a class, add it to "
                "data.classes (data.classes=auto takes every class found)",
                int(outside.sum()),
                ",".join(self.class_names),
                {str(k): int(v) for k, v in dropped.items()},
            )
            records = records.loc[~outside].reset_index(drop=True)
        return records

    def _with_groups(self, records: pd.DataFrame) -> pd.DataFrame:
        """data.group_by set: each row's group in a `group` column (kept apart by every split, in split.csv)."""
        group_by = self.cfg.get("group_by")
        if group_by in (None, ""):
            return records
        from fer_lightning.data.splits import SplitError, resolve_groups

        try:
            groups = resolve_groups(records, str(group_by))
        except SplitError as err:
            raise DataConfigError(f"{err} (data set {self.root})") from err
        log.info("data.group_by=%s: %d groups among %d rows", group_by, len(set(groups)), len(records))
        return records.assign(group=pd.Categorical(groups))

    def _groups(self, records: pd.DataFrame):
        if self.cfg.get("group_by") in (None, "") or "group" not in records:
            return None
        return records["group"].astype(object).to_numpy()

    def _warn_shared_groups(self, records: pd.DataFrame, source: str) -> None:
        groups = self._groups(records)
        if groups is None:
            return
        from fer_lightning.data.splits import shared_groups

        shared = shared_groups(records["split"], groups)
        if shared:
            log.warning(
                "%d groups (data.group_by=%s) have rows in more than one split, e.g. %s: %s was made without "
                "them (only the splits made here keep groups apart: drop data.split_file to make a new one; a data "
                "set's own train/test split is kept as it is)",
                len(shared),
                self.cfg.get("group_by"),
                shared[:5],
                source,
            )

    def _split(self, records: pd.DataFrame, needs_split: bool) -> pd.DataFrame:
        from fer_lightning.data.splits import SplitError, stratified_holdout, stratified_split

        groups = self._groups(records)
        try:
            if needs_split:
                fractions = dict(self.cfg.get("split_fractions") or {"train": 0.7, "val": 0.15, "test": 0.15})
                return stratified_split(records, fractions=fractions, seed=self.seed, groups=groups)
            if not (records["split"] == "val").any():
                fraction = float(self.cfg.get("val_fraction", 0.1))
                records = stratified_holdout(
                    records, fraction=fraction, seed=self.seed, source="train", target="val", groups=groups
                )
        except SplitError as err:
            key = "data.split_fractions" if needs_split else "data.val_fraction"
            raise DataConfigError(f"cannot split {self.root} ({key}, seed {self.seed}): {err}") from err
        self._warn_shared_groups(records, "the data set's own split")
        return records

    def _load_split(self, records: pd.DataFrame, split_file: str) -> pd.DataFrame:
        from fer_lightning.data.splits import SplitError, load_split

        path = Path(os.path.expanduser(str(split_file)))
        try:
            records = load_split(records, path)
        except SplitError as err:
            raise DataConfigError(f"data.split_file={path}: {err}") from err
        log.info("split read from %s: %s", path, records["split"].value_counts(sort=False).to_dict())
        self._warn_shared_groups(records, f"data.split_file={path}")
        return records

    def _check_leakage(self, records: pd.DataFrame) -> None:
        leak_cfg = dict(self.cfg.get("leakage") or {})
        if leak_cfg.get("policy", "warn") == "off":
            return
        from fer_lightning.data.leakage import check_leakage

        self.leaks = check_leakage(
            records,
            self.root,
            policy=str(leak_cfg.get("policy", "warn")),
            max_images=int(leak_cfg.get("max_images", 50000)),
            force=bool(leak_cfg.get("force", False)),
        )

    # ------------------------------------------------------------- lightning
    def prepare_data(self) -> None:
        """Nothing here: generation and caches use file locks, so every rank may build or wait in setup."""

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        if self.records is None:
            self.records = self.load_records()
        class_index = {cid: i for i, cid in enumerate(self.class_ids)}
        # augment.where=batch: the module augments the assembled batch on its device; the loader only copies
        in_loader = augment_where(self.augment) == "loader"
        size, channels = int(self.cfg["image_size"]), int(self.cfg["channels"])
        for split in SPLITS:
            part = self.records[self.records["split"] == split].reset_index(drop=True)
            if part.empty:
                continue
            source = None
            if self.cfg.get("cache", True):
                from fer_lightning.data.cache import ImageCache

                source = ImageCache.build_or_open(
                    part,
                    self.root,
                    self.cache_dir / "images",
                    size=size,
                    channels=channels,
                    num_workers=self.num_workers,
                    draft=bool(self.cfg.get("draft", True)),
                )
            train = split == "train"
            self.datasets[split] = FERDataset(
                part,
                self.root,
                class_index=class_index,
                size=size,
                channels=channels,
                image_source=source,
                draft=bool(self.cfg.get("draft", True)),
                hflip=float(self.augment.get("hflip", 0.0)) if train and in_loader else 0.0,
                transform=build_train_transform({**self.augment, "hflip": 0.0}) if train and in_loader else None,
                landmarks=self.landmarks,
            )

    def class_counts(self) -> list[int]:
        """Training-split count per model class, in output order (what loss weights are computed from)."""
        labels = self.datasets["train"].labels
        return [int((labels == i).sum()) for i in range(len(self.class_ids))]

    def _loader(self, split: str, sampler=None, shuffle: bool = False, loader_cls=DataLoader, **extra) -> DataLoader:
        return loader_cls(
            self.datasets[split],
            batch_size=int(self.cfg["batch_size"]),
            sampler=sampler,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
            **extra,
        )

    def _world(self) -> tuple[int, int]:
        if self.trainer is not None:
            return self.trainer.world_size, self.trainer.global_rank
        return 1, 0

    def train_dataloader(self) -> DataLoader:
        world, rank = self._world()
        sampler = EpochSampler(
            self.datasets["train"].labels, self.sampling, seed=self.seed, num_replicas=world, rank=rank
        )
        # resumable mid-epoch: Lightning checkpoints its position and RNG states (data/resumable.py)
        return self._loader("train", sampler=sampler, loader_cls=ResumableLoader, seed=self.seed)

    def _eval_loader(self, split: str) -> DataLoader:
        world, rank = self._world()
        # DistributedSampler pads by repeating samples; the metrics deduplicate by item index
        sampler = (
            DistributedSampler(self.datasets[split], num_replicas=world, rank=rank, shuffle=False)
            if world > 1
            else None
        )
        return self._loader(split, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")

    # ---------------------------------------------------------- run records
    def split_table(self) -> pd.DataFrame:
        """path -> split (and group with data.group_by) as used by this run (logged as an artifact so the split
        can be reused)."""
        return self.records[["path", "split", *(["group"] if self._groups(self.records) is not None else [])]].copy()

    def summary(self) -> dict[str, Any]:
        counts = {
            split: {
                name: int(((self.records["split"] == split) & (self.records["expression"] == cid)).sum())
                for cid, name in zip(self.class_ids, self.class_names)
            }
            for split in SPLITS
        }
        return {"root": str(self.root), "classes": self.class_names, "class_ids": self.class_ids, "counts": counts}

    def write_artifacts(self, folder: Path) -> list[Path]:
        """Split file, checks report, label mapping and counts, for MLflow."""
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        split_path = folder / "split.csv"
        self.split_table().to_csv(split_path, index=False)
        out.append(split_path)
        info = {**self.summary(), "label_mapping": self.label_mapping}
        info_path = folder / "data_summary.json"
        info_path.write_text(json.dumps(info, indent=2, default=str))
        out.append(info_path)
        if self.check_report is not None:
            report_path = folder / "checks.txt"
            text = self.check_report.to_text(max_rows=50)
            if self.metadata_issues:
                text += f"\nreader metadata issues: {len(self.metadata_issues)} (all in metadata_issues.csv)\n"
                text += "\n".join(f"  {path}: {reason}" for path, reason in self.metadata_issues[:50])
            report_path.write_text(text)
            out.append(report_path)
        if self.metadata_issues:
            issues_path = folder / "metadata_issues.csv"
            pd.DataFrame(self.metadata_issues, columns=["path", "reason"]).to_csv(issues_path, index=False)
            out.append(issues_path)
        if self.leaks is not None and len(self.leaks):
            leak_path = folder / "leakage.csv"
            self.leaks.to_csv(leak_path, index=False)
            out.append(leak_path)
        return out


def reader_accepts(format_name: str, option: str) -> bool:
    """Whether the format's reader takes a keyword option (e.g. extra_classes)."""
    import importlib
    import inspect

    module = importlib.import_module(f"fer_lightning.formats.{format_name}")
    return option in inspect.signature(module.read).parameters
