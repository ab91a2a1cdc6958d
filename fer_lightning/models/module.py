"""FERModule: backbone + expression head + valence/arousal head (+ landmarks), losses and metrics per stage."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from fer_lightning.data.transforms import normalize_on_device
from fer_lightning.errors import ConfigError
from fer_lightning.losses import ExpressionLoss, class_weights, landmark_loss, va_loss
from fer_lightning.metrics import ExpressionMetricSuite, VAMetricSuite
from fer_lightning.mixing import Mix, Mixer, mix_images, mix_targets, mixed_expression_loss
from fer_lightning.models.backbones import build_backbone
from fer_lightning.models.batch_augment import BatchAugment, augment_where
from fer_lightning.models.heads import MultiTaskHead
from fer_lightning.tta import check_tta, tta_outputs

# ImageNet statistics for 3 channels; their luminance mean for grayscale
_MEAN = {3: (0.485, 0.456, 0.406), 1: (0.449,)}
_STD = {3: (0.229, 0.224, 0.225), 1: (0.226,)}


class FERModule(pl.LightningModule):
    """Multi-task FER model; every constructor argument is saved with the checkpoint (class order included)."""

    def __init__(
        self,
        *,
        class_names: Sequence[str],
        class_ids: Sequence[int],
        backbone: Mapping[str, Any],
        image_size: int,
        channels: int,
        class_counts: Sequence[int] | None = None,
        loss: Mapping[str, Any] | None = None,
        va: bool = True,
        landmarks: bool = False,
        head_dropout: float = 0.0,
        head_hidden: int = 0,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        scheduler_interval: str = "step",
        preprocessing: Mapping[str, Any] | None = None,
        mixing: Mapping[str, Any] | None = None,
        tta: str = "none",
        channels_last: bool = False,
        compile: bool = False,
        augment: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "scheduler"])
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.num_classes = len(class_names)
        loss = dict(loss or {})
        self.loss_cfg = loss
        self.mixer = Mixer.from_config(mixing)
        if self.mixer is not None and landmarks:
            raise ConfigError("model.mixup/model.cutmix cannot be combined with model.landmarks=true: a mixed image "
                              "has no landmarks; set the alphas to 0 or model.landmarks=false")  # fmt: skip
        # train-split augmentation on the batch (augment.where=batch); None when it runs in the loader or is off
        self.batch_augment = None
        if augment is not None and augment_where(augment) == "batch":
            batch_augment = BatchAugment(augment, image_size)
            if batch_augment.enabled and landmarks:
                raise ConfigError("augment.where=batch moves the images but not their landmarks; with "
                                  "model.landmarks=true set augment.where=loader (flips and shifts landmarks too)")  # fmt: skip
            self.batch_augment = batch_augment if batch_augment.enabled else None
        # settable after loading (fer-eval / fer-predict eval.tta=...)
        self.tta = check_tta(tta)
        bb = dict(backbone)
        self.backbone, feat_dim = build_backbone(bb.pop("name"), in_channels=channels, image_size=image_size, **bb)
        self.head = MultiTaskHead(
            feat_dim, self.num_classes, va=va, landmarks=landmarks, dropout=head_dropout, hidden=head_hidden
        )
        weights = None
        if class_counts is not None:
            weights = class_weights(
                class_counts, loss.get("weighting", "none"), beta=float(loss.get("beta", 0.0)), names=class_names
            )
        self.expression_loss = ExpressionLoss(
            weights,
            focal_gamma=float(loss.get("gamma", 0.0)),
            label_smoothing=float(loss.get("label_smoothing", 0.0)),
        )
        self.register_buffer("mean", torch.tensor(_MEAN[channels]), persistent=False)
        self.register_buffer("std", torch.tensor(_STD[channels]), persistent=False)
        self.metrics = nn.ModuleDict(
            {stage: ExpressionMetricSuite(self.num_classes, class_names=list(class_names)) for stage in ("val", "test")}
        )
        # the last epoch's deduplicated (probs, target) per stage, for the confusion matrix and reports
        self.eval_predictions: dict[str, tuple] = {}
        self.va_metrics = nn.ModuleDict({stage: VAMetricSuite() for stage in ("val", "test")}) if va else None
        # the train-stage running accuracy is the only per-step metric: cheap and kept on the device
        self.register_buffer("_train_correct", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("_train_seen", torch.zeros((), dtype=torch.long), persistent=False)
        # NHWC weights (and inputs, see forward): what cuDNN's fast mixed-precision convolutions want
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.to(memory_format=torch.channels_last)
        if compile:
            # compiles __call__ in place: the state-dict keys (and so the checkpoints) stay those of the plain module
            self.backbone.compile()

    # --------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 or float (B,C,H,W) images -> dict of logits, va, landmarks."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)  # on uint8, before it is 4x larger
        x = normalize_on_device(images, self.mean, self.std) if images.dtype == torch.uint8 else images
        return self.head(self.backbone(x))

    def losses(
        self, out: dict[str, torch.Tensor], batch: Mapping[str, torch.Tensor], mix: Mix | None = None
    ) -> dict[str, torch.Tensor]:
        """Each task's loss with missing targets masked (label -1, NaN valence/arousal/landmarks); `mix` mixes them."""
        if mix is None:
            parts = {"expression": self.expression_loss(out["logits"], batch["expression"])}
        else:
            parts = {"expression": mixed_expression_loss(self.expression_loss, out["logits"], batch["expression"], mix)}
        total = parts["expression"]
        if "va" in out:
            target = torch.stack([batch["valence"], batch["arousal"]], dim=1).to(out["va"].dtype)
            if mix is not None:
                target = mix_targets(target, mix)
            parts["va"] = va_loss(out["va"], target, kind=self.loss_cfg.get("va", "ccc"))
            total = total + float(self.loss_cfg.get("va_weight", 1.0)) * parts["va"]
        if "landmarks" in out and "landmarks" in batch:
            parts["landmarks"] = landmark_loss(out["landmarks"], batch["landmarks"])
            total = total + float(self.loss_cfg.get("landmark_weight", 0.0)) * parts["landmarks"]
        parts["total"] = total
        return parts

    # ----------------------------------------------------------------- steps
    def augment_batch(self, images: torch.Tensor) -> torch.Tensor:
        """The training split's augmentation on the uint8 batch (augment.where=batch): normalized float out; the
        batch unchanged when augmentation runs in the loader or is off."""
        if self.batch_augment is None:
            return images
        x = self.batch_augment(images)  # float in [0, 1]
        return x.sub_(self.mean.view(1, -1, 1, 1)).div_(self.std.view(1, -1, 1, 1))

    def training_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images = self.augment_batch(batch["image"])
        mix = self.mixer.draw(images.shape[0], *images.shape[-2:], device=images.device) if self.mixer else None
        if mix is not None:
            if images.dtype == torch.uint8:
                images = normalize_on_device(images, self.mean, self.std)
            images = mix_images(images, mix)
        out = self(images)
        parts = self.losses(out, batch, mix)
        valid = batch["expression"] >= 0
        # a mask product, not boolean indexing: indexing needs the count on the host, a device sync every step
        self._train_correct += ((out["logits"].argmax(1) == batch["expression"]) & valid).sum()
        self._train_seen += valid.sum()
        bs = batch["image"].shape[0]
        for name, value in parts.items():
            # on_step logs are device tensors reduced only when Lightning writes them (every log_every_n_steps)
            self.log(f"train/loss_{name}" if name != "total" else "train/loss", value, on_step=True, on_epoch=True,
                     batch_size=bs)  # fmt: skip
        return parts["total"]

    def on_train_epoch_end(self) -> None:
        seen = self.all_gather(self._train_seen).sum().clamp(min=1)
        self.log("train/accuracy", self.all_gather(self._train_correct).sum().float() / seen, rank_zero_only=True)
        self._train_correct.zero_()
        self._train_seen.zero_()

    def _eval_step(self, stage: str, batch: Mapping[str, torch.Tensor]) -> None:
        out = self(batch["image"])
        parts = self.losses(out, batch)
        self.log(f"{stage}/loss", parts["total"], on_epoch=True, sync_dist=True, batch_size=batch["image"].shape[0])
        # metrics on the test-time-augmented outputs (eval.tta); the loss stays that of the plain pass
        pred = tta_outputs(self, batch["image"], self.tta, first=out)
        self.metrics[stage].update(pred["probs"], batch["expression"], batch["index"])
        if self.va_metrics is not None and "va" in pred:
            target = torch.stack([batch["valence"], batch["arousal"]], dim=1)
            self.va_metrics[stage].update(pred["va"], target.float(), batch["index"])

    def validation_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def test_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def _eval_epoch_end(self, stage: str) -> None:
        self.eval_predictions[stage] = self.metrics[stage].samples()
        values = dict(self.metrics[stage].compute())
        if self.va_metrics is not None:
            values.update(self.va_metrics[stage].compute())
        self.metrics[stage].reset()
        if self.va_metrics is not None:
            self.va_metrics[stage].reset()
        # compute() already gathered every rank's samples, so each rank holds the same values
        for name, value in values.items():
            self.log(f"{stage}/{name}", float(value), sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: Mapping[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        return tta_outputs(self, batch["image"], self.tta)

    # ------------------------------------------------------------ optimizers
    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        factory = self.optimizer_factory or (lambda p: torch.optim.AdamW(p, lr=1e-3))
        optimizer = factory(params)
        if self.scheduler_factory is None:
            return optimizer
        interval = self.hparams.scheduler_interval
        kwargs = {}
        if _accepts(self.scheduler_factory, "total_steps"):
            kwargs["total_steps"] = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = self.scheduler_factory(optimizer, **kwargs)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}


def _accepts(factory: Callable[..., Any], name: str) -> bool:
    """Whether a (partial) scheduler factory takes `name` and it is not already bound."""
    import functools
    import inspect

    func = factory.func if isinstance(factory, functools.partial) else factory
    bound = factory.keywords if isinstance(factory, functools.partial) else {}
    try:
        return name in inspect.signature(func).parameters and name not in bound
    except (TypeError, ValueError):
        return False
