"""train(cfg): compose data, model, trainer and MLflow from one config, fit, test, report; importable and testable."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint

from fer_lightning import sweep, tracking
from fer_lightning.config import validate_config
from fer_lightning.data.datamodule import FERDataModule
from fer_lightning.ema import ema_callbacks
from fer_lightning.eval_artifacts import SampleCollector, split_records, write_eval_artifacts
from fer_lightning.losses import weight_ratio_warning, weight_table
from fer_lightning.models.module import _MEAN, _STD, FERModule
from fer_lightning.resume import RunSession

log = logging.getLogger(__name__)

GROUPS = ("data", "sampling", "loss", "backbone", "augment", "trainer", "experiment")


def group_choices(cfg: DictConfig) -> dict[str, str]:
    """The option chosen in each config group (Hydra's record when available, else the configs' names)."""
    if HydraConfig.initialized():
        choices = HydraConfig.get().runtime.choices
        return {g: str(choices.get(g)) for g in GROUPS if choices.get(g) is not None}
    return {
        "data": str(cfg.data.get("name", cfg.data.format)),
        "sampling": str(cfg.sampling.name),
        "loss": str(cfg.loss.name),
        "backbone": str(cfg.backbone.name),
    }


def default_run_name(choices: dict[str, str]) -> str:
    overrides = ""
    if HydraConfig.initialized():
        overrides = HydraConfig.get().job.override_dirname
    base = f"{choices.get('backbone')}-{choices.get('sampling')}-{choices.get('loss')}"
    return f"{base}[{overrides}]" if overrides else base


def data_fingerprint(dm: FERDataModule) -> str:
    """Hash of what was trained on: every path, split and label (not the pixels)."""
    rec = dm.records
    h = hashlib.sha256()
    for col in ("path", "split", "expression"):
        h.update(rec[col].astype(str).str.cat(sep="\n").encode())
    return h.hexdigest()[:16]


def build_module(cfg: DictConfig, dm: FERDataModule) -> FERModule:
    channels, size = int(cfg.data.channels), int(cfg.data.image_size)
    module = FERModule(
        class_names=dm.class_names,
        class_ids=dm.class_ids,
        backbone=OmegaConf.to_container(cfg.backbone, resolve=True),
        image_size=size,
        channels=channels,
        class_counts=dm.class_counts(),
        loss=OmegaConf.to_container(cfg.loss, resolve=True),
        va=bool(cfg.model.va),
        landmarks=bool(cfg.model.landmarks),
        head_dropout=float(cfg.model.head_dropout),
        head_hidden=int(cfg.model.head_hidden),
        optimizer=instantiate(cfg.model.optimizer),
        scheduler=instantiate(cfg.model.scheduler.factory) if cfg.model.scheduler.factory else None,
        scheduler_interval=str(cfg.model.scheduler.interval),
        mixing={k: OmegaConf.to_container(cfg.model[k], resolve=True) for k in ("mixup", "cutmix") if k in cfg.model},
        tta=str(cfg.eval.tta),
        channels_last=bool(cfg.model.get("channels_last", False)),
        compile=bool(cfg.model.get("compile", False)),
        augment=OmegaConf.to_container(cfg.augment, resolve=True),
        preprocessing={
            "image_size": size,
            "channels": channels,
            "mean": list(_MEAN[channels]),
            "std": list(_STD[channels]),
            "face_crop": "box when the records have one, else the whole image",
            "resize": "bilinear, antialiased, to image_size x image_size",
            "draft": bool(cfg.data.get("draft", True)),
        },
    )
    _log_class_weights(cfg, dm, module)
    return module


def _log_class_weights(cfg: DictConfig, dm: FERDataModule, module: FERModule) -> None:
    """The per-class weight table at start-up, and a warning when the weights are more than 100x apart."""
    counts, weights = dm.class_counts(), module.expression_loss.weights
    scheme = str(cfg.loss.get("weighting", "none"))
    log.info("class weights (loss.weighting=%s):\n%s", scheme, weight_table(counts, weights, dm.class_names))
    warning = weight_ratio_warning(counts, weights, scheme, float(cfg.loss.get("beta", 0.0)))
    if warning:
        log.warning(warning)


def build_callbacks(cfg: DictConfig, ckpt_dir: Path) -> tuple[ModelCheckpoint, list[pl.Callback]]:
    cb = cfg.callbacks
    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="best-epoch{epoch:02d}",
        auto_insert_metric_name=False,
        monitor=cb.checkpoint.monitor,
        mode=cb.checkpoint.mode,
        save_last=False,  # last.ckpt (what a resume continues) is written by resume.RunSession's callbacks
        save_top_k=1,
    )
    callbacks: list[pl.Callback] = [checkpoint, *ema_callbacks(cfg.model.get("ema"))]
    if cb.early_stopping.get("patience") is not None:
        callbacks.append(
            EarlyStopping(
                monitor=cb.early_stopping.monitor, mode=cb.early_stopping.mode, patience=int(cb.early_stopping.patience)
            )
        )
    if cfg.logger.get("enabled", True):
        callbacks.append(LearningRateMonitor(logging_interval="epoch"))
    return checkpoint, callbacks


def train(cfg: DictConfig) -> dict[str, float]:
    """Train and test one configuration; returns the final metrics (val at the best epoch, test, best ckpt)."""
    validate_config(cfg)
    if (cfg.get("cv") or {}).get("folds"):
        from fer_lightning.kfold import run_kfold

        return run_kfold(cfg)  # k child runs, each back through train() with its fold
    run = RunSession(cfg)  # a new run, or one to continue: resume=..., a requeued SLURM job (resume.py)
    cfg = run.cfg
    choices = group_choices(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    root_dir = Path(cfg.paths.root_dir)
    tags = {**{f"group.{k}": v for k, v in choices.items()}, **choices, "git_commit": tracking.git_commit(root_dir)}
    tags.update(sweep.job_tags())  # in a multirun: parent run, sweep id, job number, seed
    # explicit tags win: a k-fold child names its own parent (the fold set's run, itself a child of the sweep)
    tags.update({str(k): str(v) for k, v in (cfg.get("tags") or {}).items()})
    # the logger (and its run) exists before seeding and before data loading, so any failure is recorded
    run_name = cfg.run_name or sweep.job_run_name() or default_run_name(choices)
    logger = tracking.make_logger(cfg.logger, run_name=run_name, tags=tags, run_id=run.run_id)
    try:
        run.attach(logger)
        pl.seed_everything(int(cfg.seed), workers=True)
        if logger is not None and run.rank_zero and not run.resuming:
            tracking.log_params(logger, {**tracking.flatten(cfg), **choices, "seed": cfg.seed})
            config_path = output_dir / "config.yaml"
            config_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
            tracking.log_artifact(logger, config_path)
        dm = FERDataModule(
            cfg.data,
            sampling=str(cfg.sampling.name),
            augment=OmegaConf.to_container(cfg.augment, resolve=True),
            seed=int(cfg.seed),
            cache_dir=cfg.paths.cache_dir,
            landmarks=bool(cfg.model.landmarks),
        )
        dm.setup("fit")  # reading, checks and caches run here, before the trainer starts
        for path in dm.write_artifacts(output_dir / "data") if run.rank_zero else []:
            tracking.log_artifact(logger, path, "data")
        tracking.set_tags(logger, {"data_fingerprint": data_fingerprint(dm), "data_root": dm.root})
        if dm.check_report is not None:
            log.info("data checks:\n%s", dm.check_report.to_text(max_rows=10))
        module = build_module(cfg, dm)
        checkpoint, callbacks = build_callbacks(cfg, output_dir / "checkpoints")
        collector = SampleCollector()  # per-sample outputs of the val/test stages, for the report's figures
        callbacks.append(collector)
        callbacks += run.callbacks(output_dir / "checkpoints")  # last.ckpt, epoch reseeding, SLURM preemption
        trainer: pl.Trainer = instantiate(
            cfg.trainer, logger=logger if logger is not None else False, callbacks=callbacks,
            default_root_dir=str(output_dir), **run.trainer_kwargs(),
        )  # fmt: skip
        trainer.fit(module, datamodule=dm, ckpt_path=run.ckpt_path, weights_only=False)
        results = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        best = checkpoint.best_model_path or checkpoint.last_model_path
        if "test" in dm.datasets:
            trainer.test(module, datamodule=dm, ckpt_path=best or None, weights_only=False)
            results.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})
        results["best_checkpoint"] = best
        if trainer.is_global_zero:
            _report(cfg, logger, module, dm, results, output_dir, choices, best, collector)
    except BaseException as err:
        run.close(logger, err)  # FAILED, or KILLED when SLURM requeued the job
        raise
    run.close(logger, None)
    return results


def _report(
    cfg: DictConfig,
    logger: Any,
    module: FERModule,
    dm: FERDataModule,
    results: dict[str, Any],
    output_dir: Path,
    choices: dict[str, str],
    best: str,
    collector: SampleCollector,
) -> None:
    """Artifacts (figures, tables beside the AffectNet baselines, bias table) and the closing printout."""
    tracking.set_tags(logger, {"best_checkpoint": best})
    stage = "test" if any(k.startswith("test/") for k in results) else "val"
    lines = [""]
    samples = collector.samples.get(stage)
    if samples is not None:
        # the same figure/table set as fer-eval (fer_lightning/eval_artifacts.py)
        numeric = {k: v for k, v in results.items() if isinstance(v, float)}
        report = write_eval_artifacts(
            samples, numeric, class_names=dm.class_names, folder=output_dir, stage=stage,
            records=split_records(dm.records, stage), sampling=choices.get("sampling", "none"), loss=str(cfg.loss.name),
            title=cfg.run_name or default_run_name(choices),
        )  # fmt: skip
        for path in report.paths:
            tracking.log_artifact(logger, path)
        lines.append(report.summary)
    lines.append(f"best checkpoint: {best}")
    if logger is not None:
        uri = str(cfg.logger.tracking_uri)
        lines.append(f"MLflow run {logger.run_id} in experiment '{cfg.logger.experiment_name}' at {uri}")
        if uri.startswith("sqlite:"):
            lines.append(f"open the MLflow UI:  make ui   (or: mlflow ui --backend-store-uri {uri})")
    print("\n".join(lines), file=sys.stdout, flush=True)
