"""The fast pipeline gives the same numbers as the plain one: cache vs decode, uint8 + device normalization vs
ToTensor + Normalize, channels_last vs contiguous, bf16-mixed end to end, and no host syncs in the step's logging."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import functional as tvf

from fer_lightning.bench import HostSyncCounter, NaiveDataset, write_jpeg_sample
from fer_lightning.data.cache import ImageCache
from fer_lightning.data.datamodule import FERDataModule
from fer_lightning.data.dataset import FERDataset
from fer_lightning.data.records import make_records
from fer_lightning.data.transforms import normalize_on_device
from fer_lightning.models.module import _MEAN, _STD, FERModule
from fer_lightning.train import train

NAN = float("nan")
BILINEAR = Image.Resampling.BILINEAR
NAMES = ["neutral", "happy", "sad", "surprise", "fear", "disgust", "anger", "contempt"]


def _module(backbone: str = "simple_cnn", size: int = 32, **kwargs) -> FERModule:
    return FERModule(class_names=NAMES, class_ids=list(range(8)), backbone={"name": backbone}, image_size=size,
                     channels=3, loss={"va": "ccc"}, **kwargs)  # fmt: skip


def _batches(n: int, bs: int = 8, size: int = 32, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8, generator=g),
             "expression": torch.randint(0, 8, (bs,), generator=g),
             "valence": torch.rand(bs, generator=g) * 2 - 1, "arousal": torch.rand(bs, generator=g) * 2 - 1,
             "index": torch.arange(bs)} for _ in range(n)]  # fmt: skip


# --- cache vs plain decode, through the dataset -------------------------------------------------------------------


def _mixed_folder(root: Path) -> tuple[pd.DataFrame, list[tuple[int, int, int, int] | None]]:
    """RGB JPEGs, grey PNGs and RGB PNGs, some with an integer face box; small enough that no draft applies."""
    rng = np.random.default_rng(1)
    rows, boxes = [], []
    for i in range(9):
        h, w = 40 + 4 * (i % 3), 44 - 2 * (i % 4)
        arr = (rng.random((h, w, 3)) * 255).astype(np.uint8)
        rel = f"img{i}.{'jpg' if i % 3 == 0 else 'png'}"
        Image.fromarray(arr[:, :, 0] if i % 3 == 1 else arr).save(root / rel)
        box = (3, 5, 30, 28) if i % 2 else None
        boxes.append(box)
        rows.append({"path": rel, "split": "train", "expression": i % 8,
                     **dict(zip(("face_x", "face_y", "face_w", "face_h"), box or (NAN,) * 4))})  # fmt: skip
    return make_records(pd.DataFrame(rows)), boxes


@pytest.mark.parametrize("channels", [3, 1])
def test_cached_items_are_byte_identical_to_plain_decode_and_to_pil(tmp_path: Path, channels: int) -> None:
    root = tmp_path / "data"
    root.mkdir()
    records, boxes = _mixed_folder(root)
    size = 24  # crops are 28-44 px: below 2 x 24, so draft mode does not apply and plain PIL is the reference
    cache = ImageCache.build_or_open(records, root, tmp_path / "cache", size=size, channels=channels, progress=False)
    common = dict(class_index={i: i for i in range(8)}, size=size, channels=channels)
    cached = FERDataset(records, root, image_source=cache, **common)
    plain = FERDataset(records, root, image_source=None, **common)
    for i in range(len(records)):
        a, b = cached[i]["image"], plain[i]["image"]
        assert a.dtype == b.dtype == torch.uint8 and a.shape == (channels, size, size)
        assert torch.equal(a, b), f"row {i}: cache and plain decode differ"
        with Image.open(root / records.loc[i, "path"]) as img:
            img = img.crop((boxes[i][0], boxes[i][1], boxes[i][0] + boxes[i][2], boxes[i][1] + boxes[i][3])) \
                if boxes[i] else img  # fmt: skip
            ref = np.asarray(img.convert("L" if channels == 1 else "RGB").resize((size, size), BILINEAR))
        assert np.array_equal(a.numpy(), ref.reshape(size, size, channels).transpose(2, 0, 1)), f"row {i} vs PIL"
        assert cached[i]["expression"] == plain[i]["expression"] == i % 8


def test_datamodule_with_and_without_cache_serves_identical_items(make_cfg) -> None:
    cfgs = [make_cfg(f"data.cache={flag}", "augment=none", "logger=none") for flag in ("true", "false")]
    modules = []
    for cfg in cfgs:
        dm = FERDataModule(cfg.data, sampling="none", augment={"hflip": 0.0}, seed=0, cache_dir=cfg.paths.cache_dir)
        dm.setup("fit")
        modules.append(dm)
    cached, plain = modules
    assert cached.datasets["val"].image_source is not None and plain.datasets["val"].image_source is None
    for split in ("train", "val"):
        assert len(cached.datasets[split]) == len(plain.datasets[split]) > 0
        for i in range(len(plain.datasets[split])):
            assert torch.equal(cached.datasets[split][i]["image"], plain.datasets[split][i]["image"]), (split, i)


# --- uint8 to the device, normalized there --------------------------------------------------------------------


def test_device_normalization_equals_totensor_normalize(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = [Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)) for _ in range(4)]
    host = torch.stack([tvf.normalize(tvf.to_tensor(im), _MEAN[3], _STD[3]) for im in images])
    uint8 = torch.stack([torch.from_numpy(np.asarray(im).transpose(2, 0, 1).copy()) for im in images])
    device = normalize_on_device(uint8, torch.tensor(_MEAN[3]), torch.tensor(_STD[3]))
    assert device.dtype == torch.float32
    torch.testing.assert_close(device, host, rtol=0, atol=1e-6)
    # a hand value: pixel 255 in channel 0 -> (1 - 0.485) / 0.229
    ones = normalize_on_device(torch.full((1, 3, 1, 1), 255, dtype=torch.uint8), torch.tensor(_MEAN[3]),
                               torch.tensor(_STD[3]))  # fmt: skip
    assert ones[0, 0, 0, 0].item() == pytest.approx((1 - 0.485) / 0.229, abs=1e-6)

    module = _module(size=20).eval()
    with torch.no_grad():
        from_uint8, from_host = module(uint8), module(host)
    for key in from_host:
        torch.testing.assert_close(from_uint8[key], from_host[key], rtol=1e-5, atol=1e-6)


def test_bench_naive_path_and_framework_path_give_the_same_tensors(tmp_path: Path) -> None:
    """fer-bench compares like with like: the naive per-item tensors equal uint8 cache reads normalized on device."""
    paths = write_jpeg_sample(tmp_path / "jpegs", 3, 64, seed=0)
    size = 48  # 64 < 2 x 48: no draft, the same PIL decode and resize on both sides
    records = make_records(pd.DataFrame({"path": [p.name for p in paths], "split": "train", "expression": [0, 1, 2]}))
    cache = ImageCache.build_or_open(records, paths[0].parent, tmp_path / "cache", size=size, channels=3,
                                     progress=False)  # fmt: skip
    fw = FERDataset(records, paths[0].parent, class_index={i: i for i in range(8)}, size=size, channels=3,
                    image_source=cache)  # fmt: skip
    naive = NaiveDataset(paths, [0, 1, 2], size)
    mean, std = torch.tensor(_MEAN[3]), torch.tensor(_STD[3])
    for i in range(3):
        framework = normalize_on_device(fw[i]["image"][None], mean, std)[0]
        torch.testing.assert_close(framework, naive[i][0], rtol=0, atol=1e-6)


# --- channels_last, precision, compile -------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["simple_cnn", "resnet18"])
def test_channels_last_gives_the_same_outputs(backbone: str) -> None:
    torch.manual_seed(0)
    plain = _module(backbone).eval()
    fast = _module(backbone, channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    seen = []
    fast.backbone.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = _batches(1)[0]["image"]
    with torch.no_grad():
        a, b = plain(x), fast(x)
    assert seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    # the checkpoint is layout-free: the same keys and values as the contiguous module's
    assert {k: v.contiguous() for k, v in fast.state_dict().items()}.keys() == plain.state_dict().keys()


def test_compile_keeps_the_state_dict_keys() -> None:
    torch.manual_seed(0)
    module = _module(compile=True)
    assert module.backbone._compiled_call_impl is not None  # compiled lazily, on the first call
    assert module.state_dict().keys() == _module().state_dict().keys()


@pytest.mark.slow
def test_compiled_module_gives_the_same_outputs() -> None:
    torch.manual_seed(0)
    plain = _module().eval()
    compiled = _module(compile=True).eval()
    compiled.load_state_dict(plain.state_dict())
    x = _batches(1)[0]["image"]
    with torch.no_grad():
        a, b = plain(x), compiled(x)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def test_bf16_mixed_on_cpu_runs_the_module_in_bf16(tmp_path: Path) -> None:
    module = _module(optimizer=functools.partial(torch.optim.SGD, lr=0.01))
    dtypes = []
    module.backbone.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    trainer = pl.Trainer(accelerator="cpu", precision="bf16-mixed", max_epochs=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=tmp_path)  # fmt: skip
    before = [p.detach().clone() for p in module.parameters()]
    trainer.fit(module, train_dataloaders=DataLoader(_batches(3), batch_size=None))
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert all(p.dtype == torch.float32 for p in module.parameters())  # master weights stay fp32
    assert any(not torch.equal(a, p) for a, p in zip(before, module.parameters()))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_bf16_mixed_and_channels_last_train_end_to_end(make_cfg) -> None:
    cfg = make_cfg("trainer.precision=bf16-mixed", "model.channels_last=true", "logger=none")
    results = train(cfg)
    metrics = {k: v for k, v in results.items() if isinstance(v, float)}
    assert "val/f1_macro" in metrics and "test/f1_macro" in metrics
    assert all(np.isfinite(v) for v in metrics.values())
    checkpoint = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)
    assert checkpoint["hyper_parameters"]["channels_last"] is True


# --- no host syncs in the step's logging path ------------------------------------------------------------------


def test_training_steps_sync_only_when_lightning_writes_the_logs(tmp_path: Path) -> None:
    """Between logging steps, the module's step and Lightning's per-step logging wait for nothing on the device."""
    counter = HostSyncCounter("cpu")
    module = _module(optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    losses = module.losses

    def losses_apart(*args, **kwargs):  # the losses' own checks are counted apart (see the bench's figures)
        with counter.excluded():
            return losses(*args, **kwargs)

    module.losses = losses_apart
    per_step: dict[int, int] = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                counter.__enter__()
            per_step[batch_idx] = counter.count

        def on_train_epoch_end(self, trainer, pl_module):
            per_step[-1] = counter.count
            counter.__exit__(None, None, None)

    from pytorch_lightning.loggers import CSVLogger

    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=CSVLogger(tmp_path), log_every_n_steps=4,
                         callbacks=[Probe()], enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(_batches(10), batch_size=None))
    steps = [per_step[i + 1] - per_step[i] for i in range(9)] + [per_step[-1] - per_step[9]]
    # Lightning writes the logs after steps 4 and 8 (global steps 3 and 7): one .item() per logged value there
    logged = {3, 7}
    assert all(steps[i] == 0 for i in range(10) if i not in logged), steps
    assert all(steps[i] > 0 for i in logged), steps
    assert counter.ops.keys() == {"item"}
    assert counter.excluded_count == 0  # the losses mask with products and torch.where: no sync either
