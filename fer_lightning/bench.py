"""fer-bench: the framework's data path, training step and growth measured side by side with the naive way.

Every figure is a ratio of two measurements taken in the same run on the same machine, so that it means
something on a busy or slow machine. Sections (all by default):

- data:    images/s of the naive per-item path (open, PIL convert, resize, ToTensor, Normalize every epoch) against
           this framework's first epoch (cache build + reads) and later epochs (uint8 cache reads + collate, the
           uint8 batch on the device; normalized there on a GPU, and also timed with a host-side normalization),
           with one process and with all workers, on synthetic 256x256 JPEGs.
- train:   a FERModule step under Lightning against a plain PyTorch loop doing the same work on the same batches
           (same module, optimizer, loss, uint8 -> float normalization); on a GPU also precision/channels_last
           variants and how well the cached data path feeds the model. Host syncs per step are counted as well.
- growth:  training-epoch time at N, 2N, 4N samples through the real FERDataModule, per sample (1.0 = linear).
- records: peak memory above the interpreter's baseline, in a fresh process each, for AffectNet CSVs of 10k, 100k
           and 300k rows read and checked and turned into the data module's datasets; read and check times.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode
from torch.utils.data import DataLoader, Dataset

from fer_lightning.config_dir import CONF_DIR, compose_config

SECTIONS = ("data", "train", "growth", "records")
# ImageNet statistics, as the naive scripts and this framework both use them
_MEAN, _STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# AffectNet's manually annotated images per class id 0..10 (Mollahosseini et al. 2017, Table 1), for the CSVs
_AFFECTNET_COUNTS = (80276, 146198, 29487, 16288, 8191, 5264, 28130, 5135, 35322, 13163, 88895)
_NON_FACE_ID = 10
# AffectNet's validation.csv is ~1.3% of its rows
_VALIDATION_SHARE = 1 / 75
# image files per folder of the generated trees, and hard links per file (ext4 allows 65,000)
_FOLDER_SIZE = 1000
_MAX_LINKS = 10_000


class BenchConfigError(ValueError):
    """A bad fer-bench option; the message names the key and what it accepts."""


@dataclasses.dataclass
class BenchConfig:
    """Every fer-bench option (set as key=value on the command line)."""

    output: str = "bench-results/latest.json"
    sections: str = ",".join(SECTIONS)
    device: str = "auto"
    threads: int = 1
    workers: int = 0
    seed: int = 0
    workdir: str = ""
    n_images: int = 1024
    source_size: int = 256
    image_size: int = 224
    batch_size: int = 64
    warm_epochs: int = 3
    train_overrides: str = "backbone=simple_cnn +backbone.widths=[8,16,32,64] data.image_size=64 data.batch_size=64"
    gpu_overrides: str = "backbone=resnet50 data.image_size=224 data.batch_size=128"
    train_steps: int = 15
    train_warmup: int = 3
    train_repeats: int = 5
    growth_n: int = 512
    rss_rows: str = "10000,100000,300000"
    checks_decode: str = "none"


HELP = {
    "output": "JSON file to write; a markdown twin is written next to it (.md)",
    "sections": f"comma-separated subset of {','.join(SECTIONS)}",
    "device": "auto | cpu | cuda (auto = cuda when available)",
    "threads": "torch intra-op threads in this process (0 = torch's default); 1 keeps a shared machine's figures steady",
    "workers": "the 'all workers' count for data loading and cache building (0 = one per CPU core)",
    "seed": "seed of the synthetic images, labels and batches",
    "workdir": "folder for the synthetic files (empty = a temporary folder, removed afterwards)",
    "n_images": "JPEGs in the synthetic sample (data section; the growth section links to them)",
    "source_size": "side of the synthetic JPEGs in pixels (AffectNet-like: 256)",
    "image_size": "model input side for the data section (224 = this framework's AffectNet config)",
    "batch_size": "batch size of the data section",
    "warm_epochs": "later epochs timed per warm variant (the median is reported)",
    "train_overrides": "fer-train config overrides for the train and growth sections (CPU)",
    "gpu_overrides": "fer-train config overrides for the train section on a GPU",
    "train_steps": "timed steps per training run",
    "train_warmup": "untimed steps before them",
    "train_repeats": "runs of each of Lightning and the plain loop, interleaved (medians are compared)",
    "growth_n": "N of the growth section: epochs of about N, 2N and 4N training samples",
    "rss_rows": "comma-separated CSV row counts of the records section",
    "checks_decode": "decode mode of the timed checks: none (stat only) | header | full",
}


# ----------------------------------------------------------------------------------------------- options
def parse_overrides(args: Sequence[str]) -> BenchConfig:
    """`key=value` arguments -> BenchConfig; unknown keys and bad values raise BenchConfigError naming the key."""
    fields = {f.name: f for f in dataclasses.fields(BenchConfig)}
    values: dict[str, Any] = {}
    for arg in args:
        key, sep, raw = arg.partition("=")
        key = key.strip().lstrip("+")
        if not sep:
            raise BenchConfigError(f"argument {arg!r} is not key=value; keys: {', '.join(fields)}")
        if key not in fields:
            raise BenchConfigError(f"unknown key {key!r}; fer-bench takes: {', '.join(fields)} (see fer-bench --help)")
        default = fields[key].default
        if isinstance(default, int):
            try:
                values[key] = int(raw)
            except ValueError:
                raise BenchConfigError(f"{key}={raw!r} is not an integer") from None
        else:
            values[key] = raw
    cfg = BenchConfig(**values)
    validate(cfg)
    return cfg


def validate(cfg: BenchConfig) -> None:
    """Reject values the bench cannot run with, naming the key."""
    unknown = set(section_list(cfg)) - set(SECTIONS)
    if unknown or not section_list(cfg):
        raise BenchConfigError(f"sections={cfg.sections!r}: choose from {','.join(SECTIONS)}")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise BenchConfigError(f"device={cfg.device!r}: auto | cpu | cuda")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise BenchConfigError("device=cuda but torch sees no CUDA GPU; use device=cpu or auto")
    if cfg.checks_decode not in ("none", "header", "full"):
        raise BenchConfigError(f"checks_decode={cfg.checks_decode!r}: none | header | full")
    positive = ("n_images", "source_size", "image_size", "batch_size", "warm_epochs", "train_steps", "train_repeats",
                "growth_n")  # fmt: skip
    for key in positive:
        if getattr(cfg, key) < 1:
            raise BenchConfigError(f"{key}={getattr(cfg, key)} must be >= 1")
    if cfg.growth_n < 80:
        raise BenchConfigError(f"growth_n={cfg.growth_n} must be >= 80: the val hold-out needs a sample of every class")
    for key in ("threads", "workers", "train_warmup"):
        if getattr(cfg, key) < 0:
            raise BenchConfigError(f"{key}={getattr(cfg, key)} must be >= 0")
    try:
        rows = row_counts(cfg)
    except ValueError:
        raise BenchConfigError(f"rss_rows={cfg.rss_rows!r}: comma-separated positive integers") from None
    if not rows or min(rows) < 100:
        raise BenchConfigError(f"rss_rows={cfg.rss_rows!r}: comma-separated integers >= 100")


def section_list(cfg: BenchConfig) -> list[str]:
    return [s.strip() for s in cfg.sections.split(",") if s.strip()]


def row_counts(cfg: BenchConfig) -> list[int]:
    return [int(v) for v in cfg.rss_rows.split(",") if v.strip()]


def usage() -> str:
    """The --help text: every key with its default and meaning."""
    lines = ["usage: fer-bench [key=value ...]   e.g. fer-bench output=bench-results/latest.json n_images=512", ""]
    for f in dataclasses.fields(BenchConfig):
        lines.append(f"  {f.name}={f.default}")
        lines.append(f"      {HELP[f.name]}")
    return "\n".join(lines)


def rows_label(n: int) -> str:
    """10000 -> '10k', 300000 -> '300k', 2500 -> '2500' (the suffix of the per-size JSON keys)."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


# ----------------------------------------------------------------------------------------------- machine
def machine_info(device: torch.device) -> dict[str, Any]:
    """CPU, GPU and library versions of this run."""
    import PIL
    import pytorch_lightning as pl
    import torchvision

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "gpu": gpu,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m_start": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "torchvision": torchvision.__version__,
        "pytorch_lightning": pl.__version__,
        "numpy": np.__version__,
        "pandas": pd.__version__,
        "pillow": PIL.__version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_clock(device: torch.device) -> Callable[[], float]:
    """The clock of the train and growth sections: wall time on a GPU; on the CPU, this process's CPU time.

    Single-process CPU work measured in CPU time does not count the time other programs hold the cores, so the
    Lightning/plain and N/2N/4N ratios hold on a busy machine (the data section, which times worker processes
    too, uses wall time).
    """
    return time.perf_counter if device.type == "cuda" else time.process_time


def _clock_name(device: torch.device) -> str:
    return "wall" if device.type == "cuda" else "process CPU time"


# ------------------------------------------------------------------------------------------ host syncs
_SYNC_OPS = frozenset({"item", "__bool__", "__float__", "__int__", "__index__", "tolist", "nonzero", "masked_select",
                       "unique", "unique_consecutive", "__repr__", "__format__", "numpy", "cpu"})  # fmt: skip


class HostSyncCounter(TorchFunctionMode):
    """Counts tensor operations that make the host wait for the device: item/bool/float, boolean-mask indexing, ...

    On a GPU an op on a host (CPU) tensor waits for nothing and is not counted. On the CPU every such op is counted
    (it would wait on a GPU), except those torch.optim makes on its step counters, which stay on the host on a GPU.
    `count` and `ops` hold what happened outside `excluded()` blocks, `excluded_count` what happened inside them.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        super().__init__()
        self.device = torch.device(device)
        self.count = 0
        self.excluded_count = 0
        self.ops: Counter[str] = Counter()
        self._excluded = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
        if self._syncs(func, args):
            if self._excluded:
                self.excluded_count += 1
            else:
                self.count += 1
                self.ops[getattr(func, "__name__", str(func))] += 1
        return func(*args, **(kwargs or {}))

    @contextmanager
    def excluded(self) -> Iterator[None]:
        """Tally the syncs inside this block apart (in excluded_count)."""
        self._excluded += 1
        try:
            yield
        finally:
            self._excluded -= 1

    def _syncs(self, func: Callable, args: tuple) -> bool:
        name = getattr(func, "__name__", "")
        tensor = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if tensor is None:
            return False
        if name == "__getitem__":
            index = args[1] if len(args) > 1 else None
            parts = index if isinstance(index, tuple) else (index,)
            if not any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts):
                return False
        elif name not in _SYNC_OPS:
            return False
        if self.device.type != "cpu":
            return tensor.device.type != "cpu"
        return not _called_from_optimizer()


def _called_from_optimizer() -> bool:
    # the op's direct caller (frames: this, _syncs, __torch_function__, caller), not any frame up the stack:
    # Lightning runs the whole training step inside optimizer.step(closure)
    caller = sys._getframe(3)
    return caller.f_globals.get("__name__", "").startswith("torch.optim")


# ------------------------------------------------------------------------------------- synthetic files
def write_jpeg_sample(folder: Path, n: int, size: int, seed: int) -> list[Path]:
    """n photo-like size x size JPEGs (smooth colour fields + sensor noise, quality 90, ~20-40 kB at 256 px)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        rng = np.random.default_rng((seed, i))
        low = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(low).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
        noisy = base + rng.normal(0.0, 6.0, (size, size, 1)).astype(np.float32)
        path = folder / f"{i:06d}.jpg"
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def link_tree(sources: Sequence[Path], folder: Path, n: int) -> list[str]:
    """n distinct file names in folders of 1000 under `folder`, hard-linked to the sources in turn (relative paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    # ext4 caps the links to one file at 65,000: past that, each folder links to its own copy of the sources
    local = math.ceil(n / len(sources)) > _MAX_LINKS
    rel = []
    for i in range(n):
        sub = folder / str(i // _FOLDER_SIZE)
        if i % _FOLDER_SIZE == 0:
            sub.mkdir(exist_ok=True)
        k = i % len(sources)
        source = sources[k]
        if local:
            source = sub / f"source{k}{sources[k].suffix}"
            if not source.exists():
                shutil.copyfile(sources[k], source)
        name = f"{i:040x}{sources[k].suffix}"
        os.link(source, sub / name)
        rel.append(f"{sub.name}/{name}")
    return rel


def write_affectnet_csvs(
    root: Path, images: Path, rel_paths: Sequence[str], seed: int, *, non_expression: bool = True
) -> tuple[int, int]:
    """training.csv / validation.csv in AffectNet's layout for these image paths; returns their row counts.

    Labels follow AffectNet's class frequencies, with its none/uncertain/non-face rows (which the reader drops)
    unless `non_expression` is False.
    """
    rng = np.random.default_rng(seed)
    n = len(rel_paths)
    probs = np.asarray(_AFFECTNET_COUNTS if non_expression else _AFFECTNET_COUNTS[:8], dtype=np.float64)
    expr = rng.choice(len(probs), size=n, p=probs / probs.sum())
    # three of each expression class first, so that small tables can still be split stratified
    expr[: min(n, 24)] = np.arange(min(n, 24)) % 8
    va = rng.uniform(-1.0, 1.0, (n, 2))
    va[expr == _NON_FACE_ID] = -2.0  # AffectNet's non-face marker
    xy = rng.integers(0, 40, (n, 2))
    side = rng.integers(150, 216, n)
    templates = []
    for _ in range(64):  # landmark strings as long as AffectNet's (136 numbers, 2 decimals)
        pts = rng.uniform(20.0, 230.0, 136)
        templates.append(";".join(f"{v:.2f}" for v in pts))
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal"
    lines = [
        f"{p},{xy[i, 0]},{xy[i, 1]},{side[i]},{side[i]},{templates[i % 64]},{expr[i]},{va[i, 0]:.6f},{va[i, 1]:.6f}"
        for i, p in enumerate(rel_paths)
    ]
    n_val = max(1, round(n * _VALIDATION_SHARE))
    lists = root / "Manually_Annotated_file_lists"
    lists.mkdir(parents=True, exist_ok=True)
    (lists / "training.csv").write_text("\n".join([header, *lines[: n - n_val]]) + "\n")
    (lists / "validation.csv").write_text("\n".join([header, *lines[n - n_val :]]) + "\n")
    link = root / "Manually_Annotated_Images"
    if not link.exists():
        link.symlink_to(images.resolve(), target_is_directory=True)
    return n - n_val, n_val


# ------------------------------------------------------------------------------------------ configs
def compose_train_config(work: Path, overrides: Sequence[str]):  # -> DictConfig
    """The real fer-train config (conf/train.yaml) with these overrides, paths inside `work`, no MLflow run."""
    base = [f"paths.root_dir={work}", f"paths.output_dir={work / 'out'}", f"paths.cache_dir={work / 'cache'}",
            "logger=none"]  # fmt: skip
    return compose_config("train", [*base, *overrides])


@dataclasses.dataclass
class _Classes:
    """What build_module needs from a data module, for a model trained on in-memory batches."""

    class_names: list[str]
    class_ids: list[int]

    def class_counts(self) -> list[int]:
        return [_AFFECTNET_COUNTS[c] if c < len(_AFFECTNET_COUNTS) else 1 for c in self.class_ids]


def _classes(cfg) -> _Classes:  # noqa: ANN001 - DictConfig
    from fer_lightning.taxonomy import Taxonomy

    tax = Taxonomy(cfg.data.get("extra_classes") or ())
    ids = tax.resolve_classes(cfg.data.classes)
    return _Classes([tax.name_of(c) for c in ids], ids)


# ---------------------------------------------------------------------------------------- 1. data path
class NaiveDataset(Dataset):
    """The per-item path of the reports: open, convert, resize, ToTensor, Normalize, every item of every epoch."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], size: int):
        from torchvision.transforms import functional as tf

        self.paths, self.labels, self.size, self._tf = [str(p) for p in paths], list(labels), size, tf

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = Image.open(self.paths[i]).convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        x = self._tf.normalize(self._tf.to_tensor(img), _MEAN, _STD)
        return x, self.labels[i]


def _loader(ds: Dataset, batch_size: int, workers: int, device: torch.device, seed: int) -> DataLoader:
    # the data module's loader settings: persistent workers, pinned memory on a GPU
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed),
                      num_workers=workers, persistent_workers=workers > 0, pin_memory=device.type == "cuda")  # fmt: skip


def _epoch_seconds(loader: DataLoader, consume: Callable[[Any], Any], device: torch.device) -> float:
    start = time.perf_counter()
    for batch in loader:
        consume(batch)
    _sync(device)
    return time.perf_counter() - start


def bench_data(cfg: BenchConfig, sample: list[Path], work: Path, device: torch.device, log: Callable) -> dict:
    """Section 1: images/s naive vs cold (cache build) vs warm (cache reads), one process and all workers."""
    from omegaconf import OmegaConf

    from fer_lightning.data.cache import ImageCache
    from fer_lightning.data.dataset import FERDataset
    from fer_lightning.data.records import make_records
    from fer_lightning.data.transforms import build_train_transform, normalize_on_device

    n, size, bs, workers = len(sample), cfg.image_size, cfg.batch_size, all_workers(cfg)
    labels = np.random.default_rng(cfg.seed).integers(0, 8, n)
    records = make_records(pd.DataFrame({"path": [p.name for p in sample], "split": "train", "expression": labels}))
    root = sample[0].parent
    mean = torch.tensor(_MEAN, device=device)
    std = torch.tensor(_STD, device=device)

    def framework_batch(batch: dict) -> torch.Tensor:
        # The uint8 batch goes to the device and FERModule.forward normalizes it there: on a GPU that costs the
        # host nothing; on a CPU it is the model's compute (timed in the train section on both sides of that
        # comparison) and data_warm_1w_host_normalize_img_s counts it in here.
        images = batch["image"].to(device, non_blocking=True)
        return normalize_on_device(images, mean, std) if device.type == "cuda" else images

    def framework_batch_normalized(batch: dict) -> torch.Tensor:
        return normalize_on_device(batch["image"].to(device, non_blocking=True), mean, std)

    def naive_batch(batch: tuple) -> torch.Tensor:
        return batch[0].to(device, non_blocking=True)

    def dataset(source: Any, transform: Any = None) -> FERDataset:
        return FERDataset(records, root, class_index={i: i for i in range(8)}, size=size, channels=3,
                          image_source=source, transform=transform)  # fmt: skip

    def build(cache_dir: Path, nw: int) -> tuple[ImageCache, float]:
        start = time.perf_counter()
        cache = ImageCache.build_or_open(records, root, cache_dir, size=size, channels=3, num_workers=nw,
                                         progress=False)  # fmt: skip
        return cache, time.perf_counter() - start

    def timed_epochs(loader: DataLoader, consume: Callable, epochs: int, skip_first: bool) -> list[float]:
        times = [_epoch_seconds(loader, consume, device) for _ in range(epochs + int(skip_first))]
        return times[int(skip_first) :]

    naive = NaiveDataset(sample, labels.tolist(), size)
    t: dict[str, float] = {}
    t["naive_1w"] = timed_epochs(_loader(naive, bs, 0, device, cfg.seed), naive_batch, 1, False)[0]
    log(f"[data] naive, 1 process: {n / t['naive_1w']:.0f} img/s")
    # with workers, later epochs reuse persistent workers: the timed epoch is the second
    t["naive_all"] = timed_epochs(_loader(naive, bs, workers, device, cfg.seed), naive_batch, 1, True)[0]
    log(f"[data] naive, {workers} workers: {n / t['naive_all']:.0f} img/s")

    cache, build_1w = build(work / "cache_1w", 0)
    t["cold_1w"] = build_1w + _epoch_seconds(_loader(dataset(cache), bs, 0, device, cfg.seed), framework_batch, device)
    log(f"[data] framework first epoch (cache build + read), 1 process: {n / t['cold_1w']:.0f} img/s")
    cache_all, build_all = build(work / "cache_all", workers)
    t["cold_all"] = build_all + _epoch_seconds(
        _loader(dataset(cache_all), bs, workers, device, cfg.seed), framework_batch, device
    )
    log(f"[data] framework first epoch, {workers} workers: {n / t['cold_all']:.0f} img/s")

    warm_1w = timed_epochs(_loader(dataset(cache), bs, 0, device, cfg.seed), framework_batch, cfg.warm_epochs, False)
    warm_all = timed_epochs(_loader(dataset(cache), bs, workers, device, cfg.seed), framework_batch, cfg.warm_epochs,
                            True)  # fmt: skip
    t["warm_1w"], t["warm_all"] = statistics.median(warm_1w), statistics.median(warm_all)
    t["warm_norm_1w"] = statistics.median(
        timed_epochs(
            _loader(dataset(cache), bs, 0, device, cfg.seed), framework_batch_normalized, cfg.warm_epochs, False
        )  # fmt: skip
    )
    log(f"[data] framework later epochs: {n / t['warm_1w']:.0f} img/s (1 process), "
        f"{n / t['warm_all']:.0f} img/s ({workers} workers)")  # fmt: skip
    # per-item augmentation cost: the default (flip + shift) and augment=strong (+ rotation, scale, colour)
    for key, option in (("warm_aug_1w", "basic"), ("warm_aug_strong_1w", "strong")):
        augment = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "augment" / f"{option}.yaml"))
        aug_ds = dataset(cache, build_train_transform(augment))
        t[key] = timed_epochs(_loader(aug_ds, bs, 0, device, cfg.seed), framework_batch, 1, False)[0]

    # the default path (augment.where=batch): cache reads, then augmentation and normalization on the batch
    from fer_lightning.models.batch_augment import BatchAugment

    for key, option in (("warm_batch_aug_1w", "basic"), ("warm_batch_aug_strong_1w", "strong")):
        augment = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "augment" / f"{option}.yaml"))
        batch_aug = BatchAugment(augment, size)

        def augmented(batch: dict, batch_aug: BatchAugment = batch_aug) -> torch.Tensor:
            x = batch_aug(batch["image"].to(device, non_blocking=True))
            return x.sub_(mean.view(1, -1, 1, 1)).div_(std.view(1, -1, 1, 1))

        t[key] = statistics.median(
            timed_epochs(_loader(dataset(cache), bs, 0, device, cfg.seed), augmented, cfg.warm_epochs, False)
        )
    log(f"[data] framework later epochs with the default augmentation on the batch: {n / t['warm_batch_aug_1w']:.0f} "
        f"img/s (1 process)")  # fmt: skip

    rate = {k: n / v for k, v in t.items()}
    figures = {
        "data_warm_batch_augment_1w_img_s": rate["warm_batch_aug_1w"],
        "data_warm_batch_augment_strong_1w_img_s": rate["warm_batch_aug_strong_1w"],
        "data_speedup_warm_batch_augment_vs_naive": rate["warm_batch_aug_1w"] / rate["naive_1w"],
        "data_naive_1w_img_s": rate["naive_1w"],
        "data_naive_all_img_s": rate["naive_all"],
        "data_cold_1w_img_s": rate["cold_1w"],
        "data_cold_all_img_s": rate["cold_all"],
        "data_warm_1w_img_s": rate["warm_1w"],
        "data_warm_all_img_s": rate["warm_all"],
        "data_warm_augment_1w_img_s": rate["warm_aug_1w"],
        "data_warm_augment_strong_1w_img_s": rate["warm_aug_strong_1w"],
        "data_warm_1w_host_normalize_img_s": rate["warm_norm_1w"],
        "data_speedup_warm_vs_naive": rate["warm_1w"] / rate["naive_1w"],
        "data_speedup_warm_vs_naive_all": rate["warm_all"] / rate["naive_all"],
        "data_speedup_warm_vs_naive_host_normalize": rate["warm_norm_1w"] / rate["naive_1w"],
        "data_speedup_cold_vs_naive": rate["cold_1w"] / rate["naive_1w"],
        "data_speedup_cold_vs_naive_all": rate["cold_all"] / rate["naive_all"],
        "data_workers": float(workers),
        "cache_mb": cache.nbytes / 2**20,
        "jpeg_mb": sum(p.stat().st_size for p in sample) / 2**20,
    }
    details = {"epoch_seconds": t, "warm_1w_epochs": warm_1w, "warm_all_epochs": warm_all,
               "cache_build_seconds": {"1w": build_1w, "all": build_all}, "images": n, "image_size": size}  # fmt: skip
    return {"figures": figures, "details": details}


def all_workers(cfg: BenchConfig) -> int:
    return cfg.workers or os.cpu_count() or 1


# ------------------------------------------------------------------------------------ 2. training step
class StepTimer(pl.Callback):
    """Wall time from the start of step `warmup` to the end of the epoch (the device synchronized at both ends)."""

    def __init__(self, warmup: int, device: torch.device):
        self.warmup, self.device, self.clock = warmup, device, step_clock(device)
        self.start: float | None = None
        self.end: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        if batch_idx == self.warmup:
            _sync(self.device)
            self.start = self.clock()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        _sync(self.device)
        self.end = self.clock()


class EpochTimer(pl.Callback):
    """Wall time of every training epoch (the device synchronized at both ends)."""

    def __init__(self, device: torch.device):
        self.device, self.clock = device, step_clock(device)
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: ANN001
        _sync(self.device)
        self._start = self.clock()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
        _sync(self.device)
        self.times.append(self.clock() - self._start)


def _batches(n: int, batch_size: int, image_size: int, num_classes: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8, generator=g),
            "expression": torch.randint(0, num_classes, (batch_size,), generator=g),
            "valence": torch.rand(batch_size, generator=g) * 2 - 1,
            "arousal": torch.rand(batch_size, generator=g) * 2 - 1,
            "index": torch.arange(i * batch_size, (i + 1) * batch_size),
        }
        for i in range(n)
    ]


def _autocast(device: torch.device, precision: str):  # noqa: ANN202
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return nullcontext()


def plain_loop_seconds(module: Any, loader: DataLoader, device: torch.device, warmup: int, precision: str) -> float:
    """A hand-written loop over the same batches: forward, the module's losses, backward, optimizer step."""
    model = module.to(device)
    model.train()
    optimizer = model.configure_optimizers()
    scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
    clock = step_clock(device)
    start = None
    for i, batch in enumerate(loader):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if i == warmup:
            _sync(device)
            start = clock()
        with _autocast(device, precision):
            # the same work as FERModule.training_step: batch augmentation, forward, losses
            loss = model.losses(model(model.augment_batch(batch["image"])), batch)["total"]
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
    _sync(device)
    return clock() - start


def lightning_seconds(module: Any, loader: DataLoader, tcfg: Any, device: torch.device, warmup: int,
                      precision: str, logdir: Path) -> float:  # fmt: skip
    """The same module and batches through the configured pl.Trainer (CSV logger, no checkpoints, no validation).

    Lightning writes the logs at least once in the timed steps (every log_every_n_steps, or every `timed` steps
    if that is fewer), so that the logging cost is in the figure.
    """
    from hydra.utils import instantiate
    from pytorch_lightning.loggers import CSVLogger

    timer = StepTimer(warmup, device)
    log_every = min(int(tcfg.log_every_n_steps), len(loader) - warmup)
    trainer = instantiate(tcfg, accelerator=device.type, devices=1, precision=precision, max_epochs=1,
                          limit_train_batches=len(loader), limit_val_batches=0, num_sanity_val_steps=0,
                          logger=CSVLogger(str(logdir)), log_every_n_steps=log_every, callbacks=[timer],
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=str(logdir))  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    return timer.end - timer.start


def count_host_syncs(module: Any, loader: DataLoader, tcfg: Any, device: torch.device, logdir: Path) -> dict:
    """Host syncs per training step between logging steps under Lightning, all code and outside the losses."""
    from hydra.utils import instantiate
    from pytorch_lightning.loggers import CSVLogger

    counter = HostSyncCounter(device)
    losses = module.losses

    def losses_apart(*args: Any, **kwargs: Any) -> Any:
        with counter.excluded():
            return losses(*args, **kwargs)

    module.losses = losses_apart

    class Window(pl.Callback):
        """Counts from the second step's start to the epoch's end (the first step sets things up)."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
            if batch_idx == 1:
                counter.__enter__()

        def on_train_epoch_end(self, trainer, pl_module) -> None:  # noqa: ANN001
            counter.__exit__(None, None, None)

    trainer = instantiate(tcfg, accelerator=device.type, devices=1, max_epochs=1, limit_train_batches=len(loader),
                          limit_val_batches=0, num_sanity_val_steps=0, logger=CSVLogger(str(logdir)),
                          log_every_n_steps=len(loader) + 1, callbacks=[Window()], enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False,
                          default_root_dir=str(logdir))  # fmt: skip
    trainer.fit(module, train_dataloaders=loader)
    del module.losses
    steps = len(loader) - 1
    return {"all": (counter.count + counter.excluded_count) / steps, "outside_losses": counter.count / steps,
            "ops_outside_losses": dict(counter.ops)}  # fmt: skip


def bench_train_step(cfg: BenchConfig, work: Path, device: torch.device, log: Callable) -> dict:
    """Section 2: Lightning vs a plain loop, same module/batches/optimizer; precision and channels_last on a GPU."""
    from omegaconf import OmegaConf

    from fer_lightning.train import build_module

    cuda = device.type == "cuda"
    overrides = (cfg.gpu_overrides if cuda else cfg.train_overrides).split()
    variants = [("32-true", False), ("bf16-mixed", False), ("bf16-mixed", True), ("16-mixed", True)] if cuda else [
        ("32-true", False)]  # fmt: skip
    figures: dict[str, float] = {}
    details: dict[str, Any] = {"overrides": overrides}
    for precision, channels_last in variants:
        tcfg = compose_train_config(work, [*overrides, "model/scheduler=none", f"model.channels_last={channels_last}"])
        size, bs = int(tcfg.data.image_size), int(tcfg.data.batch_size)
        classes = _classes(tcfg)
        template = build_module(tcfg, classes)
        batches = _batches(cfg.train_warmup + cfg.train_steps, bs, size, len(classes.class_ids), cfg.seed)
        loader = DataLoader(batches, batch_size=None)
        light, plain = [], []
        for r in range(cfg.train_repeats):
            # interleaved, order alternating, so that a busy spell on the machine hits both alike
            runs = ("lightning", "plain") if r % 2 == 0 else ("plain", "lightning")
            for kind in runs:
                module = copy.deepcopy(template)
                if kind == "lightning":
                    light.append(lightning_seconds(module, loader, tcfg.trainer, device, cfg.train_warmup, precision,
                                                   work / "lightning_logs"))  # fmt: skip
                else:
                    plain.append(plain_loop_seconds(module, loader, device, cfg.train_warmup, precision))
        tag = f"{device.type}_{precision.split('-')[0]}{'_cl' if channels_last else ''}"
        ms_l = statistics.median(light) / cfg.train_steps * 1000
        ms_p = statistics.median(plain) / cfg.train_steps * 1000
        figures[f"train_step_ms_lightning_{tag}"] = ms_l
        figures[f"train_step_ms_plain_{tag}"] = ms_p
        figures[f"lightning_overhead_pct_{tag}"] = (ms_l / ms_p - 1) * 100
        details[tag] = {"lightning_s": light, "plain_s": plain, "image_size": size, "batch_size": bs,
                        "backbone": OmegaConf.to_container(tcfg.backbone), "clock": _clock_name(device)}  # fmt: skip
        log(f"[train] {tag}: Lightning {ms_l:.1f} ms/step, plain loop {ms_p:.1f} ms/step "
            f"({(ms_l / ms_p - 1) * 100:+.1f}%)")  # fmt: skip
    head = f"{device.type}_32"
    figures["train_step_ms_lightning"] = figures[f"train_step_ms_lightning_{head}"]
    figures["train_step_ms_plain"] = figures[f"train_step_ms_plain_{head}"]
    figures["lightning_overhead_pct"] = figures[f"lightning_overhead_pct_{head}"]
    if cuda:
        figures["bf16_speedup_plain"] = (
            figures["train_step_ms_plain_cuda_32"] / figures["train_step_ms_plain_cuda_bf16"]
        )
        figures["channels_last_speedup_bf16_plain"] = (
            figures["train_step_ms_plain_cuda_bf16"] / figures["train_step_ms_plain_cuda_bf16_cl"]
        )

    tcfg = compose_train_config(work, [*overrides, "model/scheduler=none"])
    classes = _classes(tcfg)
    batches = _batches(12, int(tcfg.data.batch_size), int(tcfg.data.image_size), len(classes.class_ids), cfg.seed)
    syncs = count_host_syncs(build_module(tcfg, classes), DataLoader(batches, batch_size=None), tcfg.trainer, device,
                             work / "lightning_logs")  # fmt: skip
    figures["host_syncs_per_step"] = syncs["all"]
    figures["host_syncs_per_step_outside_losses"] = syncs["outside_losses"]
    details["host_syncs"] = syncs
    log(f"[train] host syncs per step: {syncs['all']:.1f} in all, "
        f"{syncs['outside_losses']:.1f} outside the losses")  # fmt: skip
    return {"figures": figures, "details": details}


# the grayscale 48 px recipe (FER2013-style data) against the same network on 3 channels and on 64 px
CHANNEL_CASES: tuple[tuple[int, int], ...] = ((1, 48), (3, 48), (1, 64))


def bench_channels(cfg: BenchConfig, work: Path, device: torch.device, log: Callable) -> dict:
    """experiment=small_gray48's model, plain-loop training images/s on 1x48, 3x48 and 1x64 input, interleaved."""
    from fer_lightning.train import build_module

    models, loaders = {}, {}
    for ch, size in CHANNEL_CASES:
        tcfg = compose_train_config(work, ["experiment=small_gray48", "model.scheduler.factory=null",
                                           f"data.channels={ch}", f"data.image_size={size}"])  # fmt: skip
        classes = _classes(tcfg)
        bs = int(tcfg.data.batch_size)
        batches = _batches(cfg.train_warmup + cfg.train_steps, bs, size, len(classes.class_ids), cfg.seed)
        for b in batches:
            b["image"] = b["image"][:, :ch].contiguous()
        models[(ch, size)] = build_module(tcfg, classes)
        loaders[(ch, size)] = (DataLoader(batches, batch_size=None), bs)
    seconds: dict[tuple[int, int], list[float]] = {k: [] for k in models}
    for r in range(cfg.train_repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for key in order:
            loader, _ = loaders[key]
            seconds[key].append(plain_loop_seconds(copy.deepcopy(models[key]), loader, device, cfg.train_warmup,
                                                   "32-true"))  # fmt: skip
    figures: dict[str, float] = {}
    for (ch, size), secs in seconds.items():
        figures[f"small_gray48_train_img_s_{ch}x{size}"] = (
            loaders[(ch, size)][1] * cfg.train_steps / statistics.median(secs)
        )
    figures["small_gray48_1ch_vs_3ch_speed"] = (
        figures["small_gray48_train_img_s_1x48"] / figures["small_gray48_train_img_s_3x48"]
    )
    log("[train] small_gray48 images/s: " + ", ".join(f"{k.rsplit('_', 1)[1]} {v:.0f}" for k, v in figures.items()
                                                     if k.startswith("small_gray48_train")))  # fmt: skip
    return {"figures": figures, "details": {str(k): v for k, v in seconds.items()}}


def bench_gpu_feed(cfg: BenchConfig, sample: list[Path], work: Path, device: torch.device, log: Callable) -> dict:
    """GPU only: a training epoch fed by the cached data path vs the same steps on device-resident batches."""
    from hydra.utils import instantiate

    from fer_lightning.data.cache import ImageCache
    from fer_lightning.data.dataset import FERDataset
    from fer_lightning.data.records import make_records
    from fer_lightning.train import build_module

    overrides = [*cfg.gpu_overrides.split(), "model/scheduler=none", "trainer.precision=bf16-mixed",
                 "model.channels_last=true"]  # fmt: skip
    tcfg = compose_train_config(work, overrides)
    size, bs = int(tcfg.data.image_size), int(tcfg.data.batch_size)
    classes = _classes(tcfg)
    labels = np.random.default_rng(cfg.seed).integers(0, len(classes.class_ids), len(sample))
    records = make_records(pd.DataFrame({"path": [p.name for p in sample], "split": "train", "expression": labels}))
    root = sample[0].parent
    cache = ImageCache.build_or_open(records, root, work / "cache_gpu", size=size, channels=3,
                                     num_workers=all_workers(cfg), progress=False)  # fmt: skip
    ds = FERDataset(records, root, class_index={i: i for i in range(len(classes.class_ids))}, size=size, channels=3,
                    image_source=cache)  # fmt: skip
    fed_loader = _loader(ds, bs, all_workers(cfg), device, cfg.seed)
    resident = [{k: v.to(device) for k, v in b.items()}
                for b in _batches(len(fed_loader), bs, size, len(classes.class_ids), cfg.seed)]  # fmt: skip

    def epoch_time(loader: Any) -> float:
        timer = EpochTimer(device)
        trainer = instantiate(tcfg.trainer, accelerator="cuda", devices=1, max_epochs=3, limit_val_batches=0,
                              num_sanity_val_steps=0, logger=False, callbacks=[timer], enable_checkpointing=False,
                              enable_progress_bar=False, default_root_dir=str(work / "pl"))  # fmt: skip
        trainer.fit(build_module(tcfg, classes), train_dataloaders=loader)
        return statistics.median(timer.times[1:])

    fed = epoch_time(fed_loader)
    compute = epoch_time(DataLoader(resident, batch_size=None))
    log(f"[gpu] epoch fed by the cache {fed:.2f} s vs device-resident batches {compute:.2f} s")
    return {"figures": {"gpu_fed_fraction": compute / fed}, "details": {"fed_s": fed, "resident_s": compute,
                                                                        "overrides": overrides}}  # fmt: skip


# ------------------------------------------------------------------------------------------- 3. growth
def bench_growth(cfg: BenchConfig, sample: list[Path], work: Path, device: torch.device, log: Callable) -> dict:
    """Section 3a: later-epoch time through FERDataModule + FERModule + Trainer at about N, 2N and 4N samples.

    Three epochs each; the figure is the faster of epochs 2 and 3 (the one least disturbed by other load).

    On the CPU the data is loaded in the main process (data.num_workers=0), so that the process's CPU time (see
    step_clock) holds the whole epoch's work.
    """
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from fer_lightning.data.datamodule import FERDataModule
    from fer_lightning.train import build_module

    images = work / "growth_images"
    in_process = ["data.num_workers=0"] if device.type == "cpu" else []
    val_fraction = float(compose_train_config(work, []).data.val_fraction)
    sizes, seconds, firsts = [], [], []
    for k in (1, 2, 4):
        root = work / f"growth_{k}n"
        # training.csv rows such that about k*N stay in train after the val hold-out and validation.csv
        rows = math.ceil(k * cfg.growth_n / (1 - val_fraction) / (1 - _VALIDATION_SHARE))
        rel = link_tree(sample, images / f"{k}n", rows)
        write_affectnet_csvs(root, images / f"{k}n", rel, cfg.seed, non_expression=False)
        tcfg = compose_train_config(work, [*cfg.train_overrides.split(), "data=affectnet", f"data.root={root}",
                                           "data.checks_decode=none", "data.leakage.policy=off", *in_process])  # fmt: skip
        dm = FERDataModule(tcfg.data, sampling=str(tcfg.sampling.name),
                           augment=OmegaConf.to_container(tcfg.augment, resolve=True), seed=int(tcfg.seed),
                           cache_dir=work / "growth_cache")  # fmt: skip
        dm.setup("fit")
        timer = EpochTimer(device)
        trainer = instantiate(tcfg.trainer, accelerator=device.type, devices=1, max_epochs=3, limit_val_batches=0,
                              num_sanity_val_steps=0, logger=False, callbacks=[timer], enable_checkpointing=False,
                              enable_progress_bar=False, default_root_dir=str(work / "pl"))  # fmt: skip
        trainer.fit(build_module(tcfg, dm), datamodule=dm)
        n_train = len(dm.datasets["train"])
        sizes.append(n_train)
        seconds.append(min(timer.times[1:]))
        firsts.append(timer.times[0])
        log(f"[growth] {n_train} training samples: later epochs {', '.join(f'{t:.2f}' for t in timer.times[1:])} s")
    per_sample = [t / n for t, n in zip(seconds, sizes)]
    figures = {
        "epoch_time_s_n": seconds[0],
        "epoch_time_s_2n": seconds[1],
        "epoch_time_s_4n": seconds[2],
        "epoch_time_linearity_2n": per_sample[1] / per_sample[0],
        "epoch_time_linearity": per_sample[2] / per_sample[0],
    }
    details = {"train_samples": sizes, "later_epoch_s": seconds, "first_epoch_s": firsts,
               "overrides": [*cfg.train_overrides.split(), *in_process], "clock": _clock_name(device)}  # fmt: skip
    return {"figures": figures, "details": details}


# ------------------------------------------------------------------------------------------ 3b. records
_CHILD = """
import json, sys
from fer_lightning.bench import records_child
print(json.dumps(records_child(**json.loads(sys.argv[1]))))
"""


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} line in /proc/self/status: the records section needs Linux")


def _reset_peak_rss() -> bool:
    """Start the kernel's peak-RSS mark (VmHWM) afresh at the current RSS; False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _records_pass(data: dict, root: str, cache_dir: str) -> dict[str, float]:
    """FERDataModule.setup on this root (read, split, checks, datasets) and one epoch of sampler indices, timed."""
    import fer_lightning.data.datamodule as datamodule
    import fer_lightning.formats.registry as registry

    # the setup's reading and checking are timed where the data module calls them, in one pass
    seconds: Counter[str] = Counter()
    originals = {"read": (registry, "read_records"), "checks": (datamodule, "run_checks")}

    def timed(name: str, fn: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += time.perf_counter() - start

        return call

    saved = {name: getattr(module, attr) for name, (module, attr) in originals.items()}
    for name, (module, attr) in originals.items():
        setattr(module, attr, timed(name, saved[name]))
    try:
        dm = datamodule.FERDataModule({**data, "root": root}, sampling="none", augment={}, seed=0,
                                      cache_dir=cache_dir)  # fmt: skip
        start = time.perf_counter()
        dm.setup("fit")
        epoch = list(dm.train_dataloader().sampler)
        setup_s = time.perf_counter() - start
    finally:
        for name, (module, attr) in originals.items():
            setattr(module, attr, saved[name])
    if set(seconds) != set(originals):
        raise RuntimeError(f"records section: FERDataModule.setup did not call {set(originals) - set(seconds)}; "
                           "update fer_lightning/bench.py to time what it calls now")  # fmt: skip
    return {"records": len(dm.records), "read_s": seconds["read"], "checks_s": seconds["checks"],
            "setup_s": setup_s, "train_samples": len(dm.datasets["train"]), "epoch_indices": len(epoch)}  # fmt: skip


def records_child(data: dict, warmup_root: str, cache_dir: str) -> dict:
    """In a fresh process: the data module's setup on these records; times and peak RSS above the baseline.

    A pass over a small table first imports what the steps import on first use, so the baseline holds all code.
    """
    import gc

    _records_pass(data, warmup_root, cache_dir)
    gc.collect()
    baseline = _status_mb("VmRSS")
    reset = _reset_peak_rss()
    out = _records_pass(data, data["root"], cache_dir)
    peak = _status_mb("VmHWM") if reset else _lifetime_peak_rss_mb()
    return {**out, "baseline_mb": baseline, "peak_mb": peak, "peak_reset": reset}


def _lifetime_peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB on Linux


def bench_records(cfg: BenchConfig, work: Path, log: Callable) -> dict:
    """Section 3b: AffectNet CSVs of each row count, each read, checked and set up in its own fresh process."""
    from omegaconf import OmegaConf

    counts = row_counts(cfg)
    sources = write_jpeg_sample(work / "records_source", 1, 64, cfg.seed)
    images = work / "records_images"
    rel = link_tree(sources, images, max(counts))
    warmup = work / "records_warmup"
    write_affectnet_csvs(warmup, images, rel[:200], cfg.seed)
    figures: dict[str, float] = {}
    details: dict[str, Any] = {}
    for n in counts:
        root = work / f"records_{n}"
        write_affectnet_csvs(root, images, rel[:n], cfg.seed)
        tcfg = compose_train_config(work, ["data=affectnet", f"data.root={root}", "data.cache=false",
                                           f"data.checks_decode={cfg.checks_decode}", "data.leakage.policy=off",
                                           "data.num_workers=0"])  # fmt: skip
        args = {"data": OmegaConf.to_container(tcfg.data, resolve=True), "warmup_root": str(warmup),
                "cache_dir": str(work / "records_cache")}  # fmt: skip
        proc = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"records section, {n} rows: the child process failed:\n{proc.stderr[-3000:]}")
        out = {"rows": n, **json.loads(proc.stdout.strip().splitlines()[-1])}
        label = rows_label(n)
        figures[f"peak_rss_mb_{label}"] = out["peak_mb"] - out["baseline_mb"]
        details[label] = out
        log(f"[records] {n} rows: read {out['read_s']:.1f} s, checks {out['checks_s']:.1f} s, "
            f"setup {out['setup_s']:.1f} s, peak {out['peak_mb'] - out['baseline_mb']:.0f} MB above "
            f"{out['baseline_mb']:.0f} MB")  # fmt: skip
    label = rows_label(max(counts))
    big = details[label]
    figures.update({
        f"records_read_{label}_s": big["read_s"],
        f"records_read_{label}_rows_per_s": big["rows"] / big["read_s"],
        f"records_checks_{label}_s": big["checks_s"],
        f"records_checks_{label}_rows_per_s": big["records"] / big["checks_s"],
        f"datamodule_setup_{label}_s": big["setup_s"],
        "rss_baseline_mb": big["baseline_mb"],
    })  # fmt: skip
    return {"figures": figures, "details": details}


# ----------------------------------------------------------------------------------------- the report
def targets(results: dict[str, Any], cfg: BenchConfig) -> dict[str, dict[str, Any]]:
    """The issue's targets next to the figures that exist in this run: {figure: {target, value, pass}}."""
    big = rows_label(max(row_counts(cfg)))
    checks: list[tuple[str, str, Callable[[float], bool]]] = [
        ("data_speedup_warm_vs_naive", ">= 10", lambda v: v >= 10),
        ("data_speedup_warm_batch_augment_vs_naive", ">= 10", lambda v: v >= 10),
        ("lightning_overhead_pct", "<= 5", lambda v: v <= 5),
        ("epoch_time_linearity_2n", "1 +- 0.10", lambda v: abs(v - 1) <= 0.10),
        ("epoch_time_linearity", "1 +- 0.10", lambda v: abs(v - 1) <= 0.10),
        (f"peak_rss_mb_{big}", "< 500", lambda v: v < 500),
        ("host_syncs_per_step_outside_losses", "0", lambda v: v == 0),
        ("host_syncs_per_step", "0", lambda v: v == 0),
        ("gpu_fed_fraction", ">= 0.90", lambda v: v >= 0.90),
    ]
    return {key: {"target": text, "value": results[key], "pass": bool(ok(results[key]))}
            for key, text, ok in checks if key in results}  # fmt: skip


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the chosen sections, write the JSON and its markdown twin, and return the results."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    validate(cfg)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sections = section_list(cfg)
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="fer-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"machine": machine_info(device), "config": dataclasses.asdict(cfg)}
    details: dict[str, Any] = {}
    start = time.perf_counter()
    try:
        sample: list[Path] = []
        if {"data", "growth"} & set(sections) or device.type == "cuda":
            sample = write_jpeg_sample(work / "jpegs", cfg.n_images, cfg.source_size, cfg.seed)
        parts: list[tuple[str, Callable[[], dict]]] = []
        if "data" in sections:
            parts.append(("data", lambda: bench_data(cfg, sample, work, device, log)))
        if "train" in sections:
            parts.append(("train", lambda: bench_train_step(cfg, work, device, log)))
            parts.append(("channels", lambda: bench_channels(cfg, work, device, log)))
            if device.type == "cuda":
                parts.append(("gpu_feed", lambda: bench_gpu_feed(cfg, sample, work, device, log)))
        if "growth" in sections:
            parts.append(("growth", lambda: bench_growth(cfg, sample, work, device, log)))
        if "records" in sections:
            parts.append(("records", lambda: bench_records(cfg, work, log)))
        for name, part in parts:
            t0 = time.perf_counter()
            out = part()
            results.update(out["figures"])
            details[name] = {**out["details"], "section_seconds": time.perf_counter() - t0}
    finally:
        if not cfg.workdir:
            shutil.rmtree(work, ignore_errors=True)
    results["bench_seconds"] = time.perf_counter() - start
    results["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    results["targets"] = targets(results, cfg)
    results["details"] = details
    write_results(results, Path(cfg.output))
    return results


def figure_keys(results: dict[str, Any]) -> list[str]:
    """The top-level numeric figures (everything but the machine, config, targets and details blocks)."""
    return [k for k, v in results.items() if isinstance(v, int | float) and not isinstance(v, bool)]


def write_results(results: dict[str, Any], output: Path) -> tuple[Path, Path]:
    """The JSON and, beside it, the markdown twin (same name, .md)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=2, default=str) + "\n")
    md = output.with_suffix(".md")
    md.write_text(to_markdown(results))
    return output, md


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def to_table(results: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """(figure, value, target, pass/miss) rows."""
    goals = results.get("targets", {})
    rows = []
    for key in figure_keys(results):
        goal = goals.get(key)
        rows.append((key, _fmt(float(results[key])), goal["target"] if goal else "",
                     ("pass" if goal["pass"] else "miss") if goal else ""))  # fmt: skip
    return rows


def format_table(results: dict[str, Any]) -> str:
    """Plain-text table of every figure with its target and pass/miss (information, not asserted)."""
    rows = [("figure", "value", "target", ""), *to_table(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    m = results["machine"]
    head = (f"fer-bench on {m['cpu_count']} CPUs ({m['cpu_model']}), GPU: {m['gpu'] or 'none'}, torch {m['torch']}, "
            f"Lightning {m['pytorch_lightning']}, Python {m['python']}; load {m['load_avg_1m_start']} -> "
            f"{m.get('load_avg_1m_end')}")  # fmt: skip
    body = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join([head, *body])


def to_markdown(results: dict[str, Any]) -> str:
    """The markdown twin of the JSON: machine, then one table row per figure."""
    m = results["machine"]
    lines = [
        "# fer-bench results",
        "",
        f"- machine: {m['cpu_count']} CPUs ({m['cpu_model']}), GPU: {m['gpu'] or 'none'}, load average "
        f"{m['load_avg_1m_start']} -> {m.get('load_avg_1m_end')}",
        f"- software: Python {m['python']}, torch {m['torch']}, torchvision {m['torchvision']}, pytorch_lightning "
        f"{m['pytorch_lightning']}, numpy {m['numpy']}, pandas {m['pandas']}, Pillow {m['pillow']}",
        f"- date: {m['date']}; run time {results.get('bench_seconds', float('nan')):.0f} s",
        "- clocks: data section wall time; train and growth sections wall time on a GPU, this process's CPU time on "
        "a CPU (not counting other programs' load); every ratio compares two measurements of this run",
        "- command: `"
        + " ".join(["fer-bench", *(f"{k}={v}" for k, v in results["config"].items() if v != getattr(BenchConfig, k))])
        + "`",
        "",
        "| figure | value | target | |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| `{k}` | {v} | {t} | {p} |" for k, v, t, p in to_table(results)]
    return "\n".join(lines) + "\n"
