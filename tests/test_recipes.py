"""Training recipes: mixup/cutmix against hand computations, EMA against a hand-computed average, hflip TTA in
evaluation, and the shipped experiment configs (small_gray48, affectnet_resnet50)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from fer_lightning.checkpoints import load_checkpoint, read_checkpoint
from fer_lightning.config import ConfigError
from fer_lightning.ema import EMA, ema_callbacks
from fer_lightning.losses import ExpressionLoss
from fer_lightning.mixing import Mix, Mixer, cutmix_box, mix_images, mix_targets, mixed_expression_loss
from fer_lightning.models.backbones import WeightsNotFoundError
from fer_lightning.models.module import FERModule
from fer_lightning.train import train


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


# ----------------------------------------------------------------------------------------- mixup / cutmix
def test_mixup_blends_images_and_va_targets_by_hand():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 1, 3, 3)).astype(np.float32)
    perm, lam = [2, 0, 3, 1], 0.3
    mix = Mix(perm=torch.tensor(perm), lam=lam)
    got = mix_images(torch.from_numpy(x), mix).numpy()
    np.testing.assert_allclose(got, 0.3 * x + 0.7 * x[perm], rtol=1e-6)
    va = np.array([[0.5, -0.5], [1.0, np.nan], [-1.0, 0.2], [0.0, 0.4]], np.float32)
    mixed = mix_targets(torch.from_numpy(va), mix).numpy()
    # row 1 mixes with row 0: arousal of row 1 is missing, so the mix is missing; row 3 with row 1 likewise
    want = 0.3 * va + 0.7 * va[perm]
    np.testing.assert_allclose(mixed, want, rtol=1e-6)
    assert np.isnan(mixed[1, 1]) and np.isnan(mixed[3, 1]) and mixed[0, 0] == pytest.approx(0.3 * 0.5 + 0.7 * -1.0)
    with pytest.raises(TypeError, match="float"):
        mix_images(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), mix)


def test_cutmix_box_and_lambda_by_hand():
    box, lam = cutmix_box(10, 20, 0.64, center=(5, 10))
    # side fraction sqrt(1 - 0.64) = 0.6: a 6 x 12 box centred at (5, 10); 72 of 200 pixels pasted
    assert box == (2, 8, 4, 16) and lam == pytest.approx(1 - 72 / 200)
    box, lam = cutmix_box(10, 20, 0.64, center=(0, 0))  # clipped at the corner: 3 x 6 pixels
    assert box == (0, 3, 0, 6) and lam == pytest.approx(1 - 18 / 200)
    x = torch.arange(2 * 1 * 10 * 20, dtype=torch.float32).reshape(2, 1, 10, 20)
    mix = Mix(perm=torch.tensor([1, 0]), lam=lam, box=box)
    got = mix_images(x, mix)
    want = x.clone()
    want[0, :, 0:3, 0:6], want[1, :, 0:3, 0:6] = x[1, :, 0:3, 0:6], x[0, :, 0:3, 0:6]
    assert torch.equal(got, want) and mix.kind == "cutmix"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixed_expression_loss_is_cross_entropy_on_the_mixed_soft_label(smoothing):
    rng = np.random.default_rng(1)
    k, lam, perm = 5, 0.35, [3, 2, 0, 5, 1, 4]
    logits = rng.normal(size=(6, k)).astype(np.float32)
    y = np.array([0, 4, 2, 2, 1, 3])
    loss = ExpressionLoss(None, label_smoothing=smoothing)
    mix = Mix(perm=torch.tensor(perm), lam=lam)
    got = float(mixed_expression_loss(loss, torch.from_numpy(logits), torch.from_numpy(y), mix))
    smooth = (1 - smoothing) * np.eye(k)[y] + smoothing / k
    soft = lam * smooth + (1 - lam) * smooth[perm]
    want = float(-(soft * _log_softmax(logits.astype(np.float64))).sum(1).mean())
    assert got == pytest.approx(want, rel=1e-5)


def test_mixed_expression_loss_masks_unlabeled_sides():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(4, 3)).astype(np.float32)
    y, perm, lam = np.array([0, -1, 2, 1]), [1, 2, 3, 0], 0.6
    got = float(
        mixed_expression_loss(
            ExpressionLoss(None), torch.from_numpy(logits), torch.from_numpy(y), Mix(perm=torch.tensor(perm), lam=lam)
        )
    )
    logp = _log_softmax(logits.astype(np.float64))
    ce_a = -np.mean([logp[i, y[i]] for i in range(4) if y[i] >= 0])
    ce_b = -np.mean([logp[i, y[perm][i]] for i in range(4) if y[perm][i] >= 0])
    assert got == pytest.approx(lam * ce_a + (1 - lam) * ce_b, rel=1e-5)


def test_module_losses_mix_labels_and_va_like_the_hand_computation():
    torch.manual_seed(0)
    module = FERModule(
        class_names=["a", "b", "c"], class_ids=[0, 1, 2], backbone={"name": "simple_cnn", "widths": [4, 8]},
        image_size=16, channels=1, loss={"va": "mse", "va_weight": 2.0},
    )  # fmt: skip
    logits = torch.randn(4, 3)
    va_pred = torch.rand(4, 2) * 2 - 1
    batch = {
        "expression": torch.tensor([0, 1, 2, 1]),
        "valence": torch.tensor([0.5, -0.5, 0.0, 1.0]),
        "arousal": torch.tensor([0.1, float("nan"), 0.3, -0.2]),
    }
    mix = Mix(perm=torch.tensor([3, 2, 1, 0]), lam=0.25)
    parts = module.losses({"logits": logits, "va": va_pred}, batch, mix)
    logp = _log_softmax(logits.double().numpy())
    y = batch["expression"].numpy()
    ce = lambda t: -np.mean(logp[np.arange(4), t])  # noqa: E731
    assert float(parts["expression"]) == pytest.approx(0.25 * ce(y) + 0.75 * ce(y[[3, 2, 1, 0]]), rel=1e-5)
    target = np.stack([batch["valence"].numpy(), batch["arousal"].numpy()], 1)
    target = 0.25 * target + 0.75 * target[[3, 2, 1, 0]]
    pred = va_pred.numpy()
    mse = [np.nanmean((pred[:, c] - target[:, c]) ** 2) for c in range(2)]
    assert np.isnan(target[1, 1]) and np.isnan(target[2, 1])  # rows 1 and 2 swap with the NaN arousal
    assert float(parts["va"]) == pytest.approx(np.mean(mse), rel=1e-5)
    assert float(parts["total"]) == pytest.approx(float(parts["expression"]) + 2.0 * np.mean(mse), rel=1e-5)


def test_mixer_draws_by_its_config():
    assert Mixer.from_config(None) is None
    assert Mixer.from_config({"mixup": {"alpha": 0.0}, "cutmix": {"alpha": 0.0}}) is None
    never = Mixer(mixup_alpha=0.4, mixup_prob=0.0)
    assert all(never.draw(8, 12, 12) is None for _ in range(20))
    torch.manual_seed(0)
    mixup = Mixer(mixup_alpha=0.4)
    lams = np.array([mixup.draw(8, 12, 12).lam for _ in range(3000)])
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1))
    assert lams.mean() == pytest.approx(0.5, abs=0.02) and lams.var() == pytest.approx(1 / 7.2, rel=0.1)
    cut = Mixer(cutmix_alpha=1.0)
    for _ in range(50):
        m = cut.draw(8, 12, 16)
        y0, y1, x0, x1 = m.box
        assert m.lam == pytest.approx(1 - (y1 - y0) * (x1 - x0) / (12 * 16))
        assert sorted(m.perm.tolist()) == list(range(8))
    both = Mixer(mixup_alpha=0.2, cutmix_alpha=1.0)
    kinds = [both.draw(8, 12, 12).kind for _ in range(400)]
    assert 150 < kinds.count("cutmix") < 250  # 50/50 between the two
    torch.manual_seed(7)
    first = both.draw(8, 12, 12)
    torch.manual_seed(7)
    again = both.draw(8, 12, 12)
    assert first.lam == again.lam and torch.equal(first.perm, again.perm)  # seeded: repeatable
    assert Mixer(mixup_alpha=1.0).draw(1, 12, 12) is None  # nothing to mix with


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"mixup": {"alpha": -0.1}}, "model.mixup.alpha"),
        ({"cutmix": {"alpha": 1.0, "prob": 1.5}}, "model.cutmix.prob"),
    ],
)
def test_bad_mixing_config_names_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        Mixer.from_config(cfg)


def test_mixing_refuses_landmarks_and_ema_validates():
    with pytest.raises(ConfigError, match="model.landmarks"):
        FERModule(
            class_names=["a", "b"], class_ids=[0, 1], backbone={"name": "simple_cnn", "widths": [4]}, image_size=16,
            channels=1, landmarks=True, mixing={"mixup": {"alpha": 0.2}},
        )  # fmt: skip
    with pytest.raises(ConfigError, match="model.ema.decay"):
        EMA(decay=1.0)
    assert ema_callbacks({"decay": 0.0}) == [] and isinstance(ema_callbacks({"decay": 0.99})[0], EMA)


# ------------------------------------------------------------------------------------------------- EMA
class _Faces(Dataset):
    """Random uint8 grey 'faces' with labels and VA, in the batch format of FERDataset."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
        self.labels = torch.randint(0, 3, (n,), generator=g)
        self.va = torch.rand(n, 2, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "expression": self.labels[i], "valence": self.va[i, 0],
                "arousal": self.va[i, 1], "index": torch.tensor(i)}  # fmt: skip


def _tiny_module(tta: str = "none") -> FERModule:
    return FERModule(
        class_names=["a", "b", "c"], class_ids=[0, 1, 2], backbone={"name": "simple_cnn", "widths": [4, 8]},
        image_size=16, channels=1, tta=tta,
        optimizer=lambda p: torch.optim.SGD(p, lr=0.5),
    )  # fmt: skip


class _Recorder(pl.Callback):
    """The raw (not averaged) floating-point weights after every optimizer step."""

    def __init__(self):
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items() if v.is_floating_point()})


def test_ema_weights_equal_a_hand_computed_average(tmp_path):
    torch.manual_seed(0)
    decay, steps = 0.6, 4
    module = _tiny_module()
    recorder = _Recorder()
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="ema", save_top_k=1, monitor=None)
    # the recorder runs before the EMA callback's update, so it sees each step's raw weights
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[recorder, EMA(decay=decay), ckpt_cb], limit_val_batches=0,
    )  # fmt: skip
    trainer.fit(module, DataLoader(_Faces(4 * steps, seed=1), batch_size=4))
    assert len(recorder.states) == steps
    # EMA_1 = W_1, EMA_t = decay * EMA_{t-1} + (1 - decay) * W_t, over parameters and float buffers (BN statistics)
    expected = dict(recorder.states[0])
    for state in recorder.states[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * state[k] for k in expected}
    raw = recorder.states[-1]
    assert max((raw[k] - expected[k]).abs().max().item() for k in raw) > 1e-3  # the average is not the weights
    after_fit = module.state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(after_fit[k], v, rtol=1e-5, atol=1e-6, msg=k)
    # the checkpoint stores the average as its state_dict (what fer-eval/fer-predict/fer-export load) ...
    path = Path(ckpt_cb.best_model_path or ckpt_cb.last_model_path)
    raw_ckpt = read_checkpoint(path)
    loaded, _ = load_checkpoint(path)
    for k, v in expected.items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)
        torch.testing.assert_close(raw_ckpt["current_model_state"][k], raw[k], msg=k)  # ... and the raw weights
    # trainer.test(ckpt_path=...) after fit (as train() does) evaluates the average, not the raw weights
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    trainer.test(module, DataLoader(_Faces(8, seed=2), batch_size=4), ckpt_path=str(path), weights_only=False)
    for k, v in expected.items():
        torch.testing.assert_close(module.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_hflip_tta_in_the_test_step_averages_the_two_passes():
    torch.manual_seed(0)
    module = _tiny_module(tta="hflip")
    data = _Faces(10, seed=3)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.test(module, DataLoader(data, batch_size=4))
    probs, target = module.eval_predictions["test"]
    module.eval()
    with torch.no_grad():
        plain = module(data.images)["logits"].softmax(1)
        mirror = module(data.images.flip(-1))["logits"].softmax(1)
        va = (module(data.images)["va"] + module(data.images.flip(-1))["va"]) / 2
    np.testing.assert_allclose(probs, ((plain + mirror) / 2).numpy(), atol=1e-6)
    assert np.abs(probs - plain.numpy()).max() > 1e-6
    np.testing.assert_array_equal(target, data.labels.numpy())
    acc = float((torch.from_numpy(probs).argmax(1) == data.labels).float().mean())
    assert trainer.callback_metrics["test/accuracy"].item() == pytest.approx(acc)
    with torch.no_grad():
        out = module.predict_step({"image": data.images}, 0)
    np.testing.assert_allclose(out["probs"].numpy(), probs, atol=1e-6)
    np.testing.assert_allclose(out["va"].numpy(), va.numpy(), atol=1e-6)


# --------------------------------------------------------------------------------------- experiment configs
def test_small_gray48_is_the_promised_recipe(make_cfg):
    cfg = make_cfg("experiment=small_gray48", debug=None)
    assert (cfg.data.image_size, cfg.data.channels) == (48, 1)
    assert cfg.backbone.name == "small_resnet" and cfg.backbone.stem_stride == 2 and cfg.loss.label_smoothing == 0.1
    assert cfg.augment.hflip == 0.5 and cfg.augment.translate > 0 and cfg.augment.rotation == 0
    assert cfg.model.optimizer._target_ == "torch.optim.AdamW" and cfg.model.optimizer.weight_decay > 0
    assert cfg.model.scheduler.factory._target_ == "torch.optim.lr_scheduler.OneCycleLR"
    assert cfg.eval.tta == "hflip"


def test_training_with_mixup_cutmix_and_ema_end_to_end(make_cfg):
    cfg = make_cfg("logger=none", "model.mixup.alpha=0.2", "model.cutmix.alpha=1.0", "model.ema.decay=0.9",
                   "eval.tta=hflip")  # fmt: skip
    results = train(cfg)
    assert 0.0 <= results["test/accuracy"] <= 1.0
    ckpt = read_checkpoint(results["best_checkpoint"])
    hp = ckpt["hyper_parameters"]
    assert hp["mixing"]["mixup"]["alpha"] == 0.2 and hp["mixing"]["cutmix"]["alpha"] == 1.0 and hp["tta"] == "hflip"
    assert "current_model_state" in ckpt  # EMA on: state_dict is the average, the raw weights are kept beside
    k = "head.classifier.weight"
    assert not torch.equal(ckpt["state_dict"][k], ckpt["current_model_state"][k])


def test_affectnet_resnet50_needs_its_weights_and_otherwise_runs(make_cfg, tmp_path, monkeypatch):
    cfg = make_cfg("experiment=affectnet_resnet50", "logger=none", debug=None)
    assert cfg.backbone.name == "resnet50" and cfg.backbone.pretrained is True
    assert (cfg.data.image_size, cfg.data.channels) == (224, 3) and cfg.loss.name == "class_balanced"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    cfg = make_cfg("experiment=affectnet_resnet50", "logger=none", "+trainer.fast_dev_run=true")
    with pytest.raises(WeightsNotFoundError, match=r"nothing is downloaded.*resnet50-11ad3fa6\.pth.*empty_torch_home"):
        train(cfg)
    cfg = make_cfg("experiment=affectnet_resnet50", "logger=none", "+trainer.fast_dev_run=true",
                   "backbone.pretrained=false", "data.batch_size=4")  # fmt: skip
    assert "test/accuracy" in train(cfg)
