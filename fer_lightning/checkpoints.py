"""Load a trained FERModule from a Lightning checkpoint safely (weights_only=True) with clear errors."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file that is missing, corrupt, or not a fer_lightning training checkpoint."""


# the constructor arguments every fer_lightning checkpoint carries; anything less is another program's file
REQUIRED_HPARAMS = ("class_names", "class_ids", "backbone", "image_size", "channels")


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The raw checkpoint dict, unpickled with weights_only=True (no arbitrary code runs on load)."""
    path = Path(path)
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise CheckpointError(f"checkpoint {path} {what}; pass ckpt_path=<a .ckpt written by fer-train>")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the run that wrote it may have crashed")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a corrupt file raises anything from KeyError to OSError
        first = (str(err).splitlines() or [""])[0]
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():
            # weights_only refuses objects beyond tensors and plain containers: say so rather than unpickle them
            raise CheckpointError(
                f"checkpoint {path} holds objects that cannot be loaded safely (torch.load(weights_only=True) "
                "refused them); it was not written by fer-train, or by an incompatible version"
            ) from err
        raise CheckpointError(
            f"checkpoint {path} is corrupt or truncated, or not a PyTorch file ({type(err).__name__}: {first}); "
            "copy it again or retrain"
        ) from err
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no 'state_dict'); pass a .ckpt from fer-train")
    hparams = ckpt.get("hyper_parameters")
    missing = [k for k in REQUIRED_HPARAMS if not isinstance(hparams, Mapping) or k not in hparams]
    if missing:
        raise CheckpointError(
            f"{path} is not a fer_lightning checkpoint: its hyper_parameters lack {', '.join(missing)}"
        )
    return dict(ckpt)


def load_checkpoint(path: str | Path) -> tuple[Any, dict[str, Any]]:
    """(FERModule in eval mode on the CPU, its hyper-parameters) from a fer-train checkpoint."""
    from fer_lightning.models.module import FERModule

    ckpt = read_checkpoint(path)
    hparams = dict(ckpt["hyper_parameters"])
    kwargs = dict(hparams)
    # the state dict below holds every weight, so a pretrained backbone must not look for its hub file again
    kwargs["backbone"] = {**dict(hparams["backbone"]), "pretrained": False, "weights_path": None}
    try:
        module = FERModule(**kwargs)
    except TypeError as err:
        raise CheckpointError(
            f"checkpoint {path} was written by another version of FERModule ({err}); load it with that version"
        ) from err
    result = module.load_state_dict(ckpt["state_dict"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"checkpoint {path} does not fit the model its hyper-parameters describe: "
            f"{len(result.missing_keys)} missing keys (e.g. {', '.join(result.missing_keys[:3]) or '-'}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {', '.join(result.unexpected_keys[:3]) or '-'})"
        )
    apply_preprocessing(module, hparams)
    module.eval()
    return module, hparams


def apply_preprocessing(module: torch.nn.Module, hparams: Mapping[str, Any]) -> None:
    """Use the normalization stored with the checkpoint (not today's defaults) for uint8 input."""
    pre = hparams.get("preprocessing") or {}
    channels = int(hparams["channels"])
    for key in ("mean", "std"):
        if pre.get(key) is None:
            continue
        values = torch.tensor([float(v) for v in pre[key]], dtype=torch.float32)
        if values.numel() != channels:
            raise CheckpointError(f"checkpoint preprocessing.{key} has {values.numel()} values for {channels} channels")
        getattr(module, key).copy_(values)


def preprocessing_of(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """The input contract of a checkpoint: size, channels, mean, std, draft decoding (with safe defaults)."""
    pre = dict(hparams.get("preprocessing") or {})
    pre.setdefault("image_size", int(hparams["image_size"]))
    pre.setdefault("channels", int(hparams["channels"]))
    pre.setdefault("draft", True)
    return pre
