"""evaluate(cfg): score a fer-train checkpoint on a data set's test split, write the figures/tables, log to MLflow."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
from hydra.utils import instantiate
from mlflow import MlflowClient
from mlflow.entities import Run
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from fer_lightning import tracking
from fer_lightning.baselines import LOSS_CHOICES, SAMPLING_CHOICES
from fer_lightning.checkpoints import CheckpointError, load_checkpoint
from fer_lightning.data.datamodule import FERDataModule
from fer_lightning.errors import ConfigError
from fer_lightning.eval_artifacts import SampleCollector, StageSamples, split_records, write_eval_artifacts
from fer_lightning.metrics import VA_KEYS
from fer_lightning.taxonomy import FIRST_EXTRA_ID, Taxonomy, is_auto, normalize_name
from fer_lightning.tta import check_tta

log = logging.getLogger(__name__)

VA_CHOICES = ("auto", True, False)
# the training run's group choices (tags and params) copied onto its evaluation run, so reports group them alike
_COPIED_KEYS = ("sampling", "loss", "backbone", "augment", "experiment", "git_commit")


class EvaluationError(ConfigError):
    """The checkpoint and data cannot be evaluated together; the message names the config key to change."""


def _ckpt_path(cfg: DictConfig) -> Path:
    value = cfg.get("ckpt_path")
    if value in (None, "", "???"):
        raise EvaluationError("ckpt_path is not set: pass ckpt_path=/path/to/a/checkpoint.ckpt written by fer-train")
    return Path(str(value)).expanduser().resolve()


def _va_mode(cfg: DictConfig) -> str | bool:
    value = cfg.eval.get("va", "auto")
    if value not in VA_CHOICES or (isinstance(value, str) and value != "auto"):
        raise EvaluationError(f"eval.va={value!r} is invalid: allowed auto | true | false")
    return value


def find_source_run(client: MlflowClient, ckpt_path: Path) -> Run | None:
    """The training run that wrote `ckpt_path`: its `best_checkpoint` tag, else its output folder (the parent of
    `checkpoints/`) as the `paths.output_dir` param; the newest run when several match."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return None
    filters = [f"tags.best_checkpoint = '{ckpt_path}'"]
    if ckpt_path.parent.name == "checkpoints":
        filters.append(f"params.`paths.output_dir` = '{ckpt_path.parent.parent}'")
    # MLflow's filter strings have no escape for a quote inside a value: such paths are found by run id only
    for filter_string in (f for f in filters if f.count("'") == 2):
        runs = [
            r
            for r in client.search_runs(experiments, filter_string, order_by=["attributes.start_time DESC"])
            if r.data.tags.get("task") != "eval"
        ]
        if len(runs) > 1:
            log.warning("%d MLflow runs match checkpoint %s (%s); linking the newest, %s", len(runs), ckpt_path,
                        filter_string, runs[0].info.run_id)  # fmt: skip
        if runs:
            return runs[0]
    return None


def _check_classes(data_cfg: dict[str, Any], hparams: dict[str, Any], ckpt_path: Path) -> None:
    """The data config must name the classes the checkpoint predicts (any order): a model scores only its classes.

    Compared by name: a data-set class found in the folders (data.classes=auto) has no fixed id across data sets.
    """
    ckpt = list(hparams["class_names"])
    if is_auto(data_cfg.get("classes")):
        return  # the checkpoint's classes are used, and the data module refuses a class it cannot find
    try:
        taxonomy = Taxonomy(data_cfg.get("extra_classes") or ())
    except ValueError as err:
        raise EvaluationError(str(err)) from err
    given = []
    for c in data_cfg["classes"]:
        cid = int(c) if isinstance(c, int) or str(c).isdigit() else taxonomy.id_of(str(c))
        given.append(taxonomy.name_of(cid) if cid in taxonomy.id_to_name else normalize_name(c))
    if sorted(given) != sorted(ckpt):
        extra = [n for i, n in zip(hparams["class_ids"], ckpt) if i >= FIRST_EXTRA_ID]
        fix = f"data.classes=[{','.join(ckpt)}]" + (f" data.extra_classes=[{','.join(extra)}]" if extra else "")
        raise EvaluationError(
            f"checkpoint {ckpt_path} predicts the classes {ckpt} but data.classes gives "
            f"{given}; a model can only be scored on its own classes: pass {fix} (or data.classes=auto) if the "
            "data set carries those labels, or evaluate a checkpoint trained on this class set"
        )


def build_eval_datamodule(cfg: DictConfig, hparams: dict[str, Any], seed: int) -> FERDataModule:
    """The data module for the test split, with the checkpoint's input size, channels and class order."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    _check_classes(data, hparams, Path(str(cfg.ckpt_path)))
    # by name, in the checkpoint's output order (ids of data-set classes depend on the folders found)
    data["classes"] = list(hparams["class_names"])
    pre = hparams.get("preprocessing") or {}
    # the model's input contract, not the data config's defaults
    data["image_size"] = int(pre.get("image_size", hparams["image_size"]))
    data["channels"] = int(pre.get("channels", hparams["channels"]))
    if "draft" in pre:
        data["draft"] = bool(pre["draft"])
    return FERDataModule(
        data, seed=seed, cache_dir=cfg.paths.cache_dir, landmarks=bool(hparams.get("landmarks")), test_only=True
    )


def _load_test_records(dm: FERDataModule, cfg: DictConfig, va_mode: str | bool, has_va_head: bool) -> pd.DataFrame:
    """Read and check the data set; keep only the test split (only its image cache is built)."""
    records = dm.load_records()
    test = split_records(records, "test")
    where = f"data={cfg.data.get('name', cfg.data.format)} (root {dm.root})"
    if test.empty:
        raise EvaluationError(f"{where} has no test split to evaluate on; use a data set with a test split")
    if test["expression"].isna().all() and not (va_mode is not False and has_va_head):
        raise EvaluationError(f"{where}: the test split has no expression labels of the checkpoint's classes")
    if va_mode is True:
        if not has_va_head:
            raise EvaluationError(
                "eval.va=true but the checkpoint has no valence/arousal head (trained with model.va=false); "
                "set eval.va=false or evaluate a checkpoint with the head"
            )
        if not test[["valence", "arousal"]].notna().any().any():
            raise EvaluationError(
                f"eval.va=true but {where}: the test split has no valence/arousal values, so there are no VA "
                "metrics to compute; use a data set with valence/arousal or set eval.va=auto"
            )
    dm.records = records[(records["split"] == "test").to_numpy()].reset_index(drop=True)
    return records


def _source_info(cfg: DictConfig, ckpt_path: Path) -> tuple[MlflowClient | None, Run | None]:
    if not cfg.logger.get("enabled", True):
        return None, None
    tracking.prepare_store(str(cfg.logger.tracking_uri))
    client = MlflowClient(tracking_uri=str(cfg.logger.tracking_uri))
    explicit = cfg.eval.get("source_run_id")
    if explicit:
        try:
            return client, client.get_run(str(explicit))
        except Exception as err:  # MLflow raises its own RestException/MlflowException kinds
            raise EvaluationError(
                f"eval.source_run_id={explicit}: no such run in {cfg.logger.tracking_uri} ({err})"
            ) from err
    return client, find_source_run(client, ckpt_path)


def _seed(cfg: DictConfig, source: Run | None) -> int:
    if cfg.get("seed") is not None:
        return int(cfg.seed)
    if source is not None and "seed" in source.data.params:
        return int(source.data.params["seed"])
    return 42  # fer-train's default seed


def _choice(source: Run | None, key: str, allowed: tuple[str, ...], default: str) -> str:
    value = source.data.params.get(key) if source is not None else None
    return value if value in allowed else default


def _logger(cfg: DictConfig, source: Run | None, ckpt_path: Path, data_name: str) -> tuple[Any, str, str | None]:
    """(MLflow logger, metric prefix, artifact sub-folder): a new linked run, or the training run itself."""
    into = bool(cfg.eval.get("into_training_run", False))
    if into and source is None:
        raise EvaluationError(
            f"eval.into_training_run=true but no MLflow run in {cfg.logger.tracking_uri} wrote {ckpt_path}; "
            "pass eval.source_run_id=<run id> or drop eval.into_training_run"
        )
    prefix = cfg.eval.get("metric_prefix") or (f"eval_{data_name}" if into else "test")
    if into:
        logger = tracking.make_logger(cfg.logger, run_name="", tags={}, run_id=source.info.run_id)
        return logger, prefix, prefix
    tags = {"task": "eval", "source_checkpoint": str(ckpt_path), "data": data_name, "eval.tta": str(cfg.eval.tta)}
    if source is not None:
        tags["source_run_id"] = source.info.run_id
        tags.update({k: source.data.tags[k] for k in _COPIED_KEYS if k in source.data.tags})
    tags.update({str(k): str(v) for k, v in (cfg.get("tags") or {}).items()})
    base = source.info.run_name if source is not None else ckpt_path.stem
    logger = tracking.make_logger(cfg.logger, run_name=cfg.get("run_name") or f"eval-{base}-{data_name}", tags=tags)
    return logger, prefix, None


def _test(
    cfg: DictConfig, module: Any, dm: FERDataModule, output_dir: Path, va_mode: str | bool
) -> tuple[StageSamples, dict[str, float], list[str]]:
    """Run the test stage (DDP-safe metric suites); (samples, test/* metrics, notes) with VA keys dropped if unused."""
    dm.setup("test")
    collector = SampleCollector()
    trainer = instantiate(cfg.trainer, logger=False, callbacks=[collector], enable_checkpointing=False,
                          default_root_dir=str(output_dir))  # fmt: skip
    trainer.test(module, datamodule=dm, verbose=False)
    samples = collector.samples["test"]
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    has_va_head = module.va_metrics is not None
    notes = []
    if not (has_va_head and va_mode is not False and samples.has_va):
        metrics = {k: v for k, v in metrics.items() if k.removeprefix("test/") not in VA_KEYS}
        if has_va_head and va_mode == "auto":
            notes.append("valence/arousal metrics skipped: the test split has no valence/arousal values")
    return samples, metrics, notes


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Evaluate `cfg.ckpt_path` on `cfg.data`'s test split; returns the metrics as `test/<name>`."""
    ckpt_path = _ckpt_path(cfg)
    va_mode = _va_mode(cfg)
    try:
        module, hparams = load_checkpoint(ckpt_path)
    except CheckpointError as err:
        raise EvaluationError(f"ckpt_path: {err}") from err
    module.tta = check_tta(str(cfg.eval.tta))
    client, source = _source_info(cfg, ckpt_path)
    dm = build_eval_datamodule(cfg, hparams, _seed(cfg, source))
    data_name = str(cfg.data.get("name") or cfg.data.format)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # under DDP every rank runs this function: the metrics are gathered on all, one rank writes and logs
    is_zero = rank_zero_only.rank == 0
    logger, prefix, artifact_dir = (None, "test", None)
    if client is not None and is_zero:
        logger, prefix, artifact_dir = _logger(cfg, source, ckpt_path, data_name)
    into = artifact_dir is not None
    try:
        if logger is not None and not into:
            # the training run's group choices too, so fer-report groups evaluations like trainings
            groups = {k: source.data.params[k] for k in _COPIED_KEYS if source and k in source.data.params}
            tracking.log_params(logger, {"ckpt_path": str(ckpt_path), **groups, "data": data_name,
                                         **tracking.flatten(cfg.eval, "eval."), **tracking.flatten(dm.cfg, "data."),
                                         "seed": dm.seed})  # fmt: skip
        records = _load_test_records(dm, cfg, va_mode, module.va_metrics is not None)
        if source is not None and logger is not None and not into:
            from fer_lightning.train import data_fingerprint

            # the same data as the training run when the split table hashes the same (data_fingerprint in train.py)
            same = data_fingerprint(SimpleNamespace(records=records)) == source.data.tags.get("data_fingerprint")
            tracking.set_tags(logger, {"same_data_as_training": str(same).lower()})
        samples, metrics, notes = _test(cfg, module, dm, output_dir, va_mode)
        if is_zero:
            report = write_eval_artifacts(
                samples, metrics, class_names=hparams["class_names"], folder=output_dir, stage="test",
                records=split_records(records, "test"),
                sampling=_choice(source, "sampling", SAMPLING_CHOICES, "none"),
                loss=_choice(source, "loss", LOSS_CHOICES, str((hparams.get("loss") or {}).get("name", "ce"))),
                title=f"{ckpt_path.name} on {data_name}", va=any(k.endswith(VA_KEYS) for k in metrics),
            )  # fmt: skip
        if logger is not None:
            logger.log_metrics({f"{prefix}/{k.removeprefix('test/')}": v for k, v in metrics.items()}, step=0)
            for path in report.paths:
                tracking.log_artifact(logger, path, artifact_dir)
    except BaseException:
        if not into:  # a failed evaluation must not mark the training run FAILED
            tracking.end_run(logger, "FAILED")
        raise
    if not into:
        tracking.end_run(logger, "FINISHED")
    if is_zero:
        _print_summary(cfg, report.summary, notes, logger, source, into, prefix)
    return metrics


def _print_summary(cfg, summary: str, notes: list[str], logger, source: Run | None, into: bool, prefix: str) -> None:
    lines = ["", summary, *notes]
    if logger is not None:
        uri = str(cfg.logger.tracking_uri)
        if into:
            lines.append(f"logged into training run {logger.run_id} as {prefix}/* at {uri}")
        else:
            link = f", linked to training run {source.info.run_id} (tag source_run_id)" if source else (
                " (no training run found for this checkpoint: no source_run_id tag)")  # fmt: skip
            lines.append(f"MLflow run {logger.run_id} in experiment '{cfg.logger.experiment_name}'{link} at {uri}")
    print("\n".join(lines), file=sys.stdout, flush=True)
