"""fer-predict: Hydra entry point around fer_lightning.predict (thin on purpose)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from fer_lightning.cli.errors import user_errors
from fer_lightning.config_dir import CONFIG_PATH


def require(cfg: DictConfig, *keys: str) -> None:
    """Stop with the missing key's name instead of OmegaConf's MissingMandatoryValue traceback."""
    from fer_lightning.errors import ConfigError

    for key in keys:
        if OmegaConf.is_missing(cfg, key) or cfg.get(key) in (None, ""):
            raise ConfigError(f"{key} is required: e.g. fer-{cfg.task_name} {key}=...")


def resolve_device(name: str) -> str:
    """auto -> cuda when available, else cpu."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def run(cfg: DictConfig) -> Path:
    """Load the checkpoint, predict every input file, write the CSV; returns its path."""
    from fer_lightning.checkpoints import load_checkpoint
    from fer_lightning.face_detect import DetectorSettings
    from fer_lightning.predict import PredictSettings, collect_inputs, predict_files, summarize

    require(cfg, "ckpt_path", "input")
    paths = collect_inputs(str(cfg.input), recursive=bool(cfg.recursive))
    module, hparams = load_checkpoint(cfg.ckpt_path)
    settings = PredictSettings(
        batch_size=int(cfg.batch_size),
        tta=cfg.eval.tta,
        detect_faces=bool(cfg.detect_faces),
        detector=DetectorSettings(**OmegaConf.to_container(cfg.detector, resolve=True)),
        device=resolve_device(str(cfg.device)),
    )
    table = predict_files(module, hparams, paths, settings)
    output = Path(cfg.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(output, index=False, float_format="%.6f")
    counts, problems = summarize(table)
    for line in problems:
        print(line, file=sys.stderr)
    print(f"wrote {len(table)} rows to {output}: {counts}", flush=True)
    return output


@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="predict")
def _main(cfg: DictConfig) -> None:
    with user_errors():
        run(cfg)


def main() -> None:
    _main()


if __name__ == "__main__":
    sys.exit(main())
