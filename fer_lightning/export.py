"""Export a checkpoint as a self-contained model (ONNX or TorchScript) and check it against the checkpoint.

The exported model takes NCHW images with values 0..255 (uint8, or float32 for ONNX with input_dtype=float32;
TorchScript accepts both), applies the checkpoint's normalization itself and returns class probabilities (softmax,
in the checkpoint's class order) and, when the model has the head, valence/arousal in [-1, 1]. Class names, class
ids, preprocessing and output names travel inside the file: ONNX metadata_props, TorchScript extra files.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fer_lightning.checkpoints import preprocessing_of
from fer_lightning.tta import check_tta, tta_outputs

FORMATS = ("onnx", "torchscript")
INPUT_DTYPES = ("uint8", "float32")
SUFFIX = {"onnx": ".onnx", "torchscript": ".torchscript.pt"}
METADATA_FILE = "fer_metadata.json"  # the TorchScript extra file holding the metadata


class ExportError(RuntimeError):
    """A bad export request, or an exported model that does not match its checkpoint."""


class ExportedFER(nn.Module):
    """Backbone + heads with normalization (and hflip TTA) inside: images 0..255 -> (probabilities, valence_arousal)."""

    def __init__(self, module: nn.Module, mean: Tensor, std: Tensor, tta: str = "none"):
        super().__init__()
        self.backbone, self.head = module.backbone, module.head
        self.register_buffer("mean", mean.float().view(1, -1, 1, 1).clone())
        self.register_buffer("std", std.float().view(1, -1, 1, 1).clone())
        self.hflip = check_tta(tta, "tta") == "hflip"
        self.has_va = getattr(module.head, "va", None) is not None

    def _scores(self, images: Tensor) -> dict[str, Tensor]:
        x = (images.float() / 255.0 - self.mean) / self.std
        return self.head(self.backbone(x))

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        out = tta_outputs(self._scores, images, "hflip" if self.hflip else "none")
        return (out["probs"], out["va"]) if self.has_va else (out["probs"],)


def output_names(has_va: bool) -> list[str]:
    """Names of the exported model's outputs, in order."""
    return ["probabilities", "valence_arousal"] if has_va else ["probabilities"]


def export_metadata(hparams: Mapping[str, Any], *, tta: str, input_dtype: str, source: str) -> dict[str, str]:
    """String key/value metadata stored in the exported file (JSON for the structured values)."""
    pre = preprocessing_of(hparams)
    has_va = bool(hparams.get("va", True))
    return {
        "producer": "fer_lightning",
        "class_names": json.dumps(list(hparams["class_names"])),
        "class_ids": json.dumps([int(i) for i in hparams["class_ids"]]),
        "preprocessing": json.dumps(pre, default=str),
        "input": (
            f"images (N, {pre['channels']}, {pre['image_size']}, {pre['image_size']}) {input_dtype} in 0..255, "
            f"{'grey' if int(pre['channels']) == 1 else 'RGB'}, face already cropped; normalization is inside"
        ),
        "outputs": json.dumps(output_names(has_va)),
        "tta": tta,
        "source_checkpoint": source,
    }


@dataclass
class ExportResult:
    """Where the model went and how far it is from the checkpoint on the parity batch."""

    path: Path
    max_abs_diff: dict[str, float]
    batch_size: int


def export_model(
    module: nn.Module,
    hparams: Mapping[str, Any],
    output: str | Path,
    *,
    fmt: str = "onnx",
    tta: str = "none",
    input_dtype: str = "uint8",
    source: str = "",
    opset: int = 17,
) -> Path:
    """Write `module` (a loaded FERModule) as ONNX or TorchScript with normalization and metadata inside."""
    if fmt not in FORMATS:
        raise ExportError(f"format={fmt!r} is invalid: allowed {' | '.join(FORMATS)}")
    if input_dtype not in INPUT_DTYPES:
        raise ExportError(f"input_dtype={input_dtype!r} is invalid: allowed {' | '.join(INPUT_DTYPES)}")
    pre = preprocessing_of(hparams)
    wrapper = ExportedFER(module.cpu().eval(), module.mean.cpu(), module.std.cpu(), tta).eval()
    c, s = int(pre["channels"]), int(pre["image_size"])
    dtype = torch.uint8 if input_dtype == "uint8" else torch.float32
    example = torch.randint(0, 256, (2, c, s, s), generator=torch.Generator().manual_seed(0)).to(dtype)
    meta = export_metadata(hparams, tta=tta, input_dtype=input_dtype, source=source)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    names = output_names(wrapper.has_va)
    with torch.no_grad():
        if fmt == "onnx":
            _export_onnx(wrapper, example, output, names, meta, opset)
        else:
            _export_torchscript(wrapper, example, output, meta)
    return output


def _export_onnx(
    wrapper: nn.Module, example: Tensor, output: Path, names: list[str], meta: dict[str, str], opset: int
) -> None:
    import onnx

    axes = {n: {0: "batch"} for n in ["images", *names]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter announces its own deprecation
        torch.onnx.export(
            wrapper,
            (example,),
            str(output),
            input_names=["images"],
            output_names=names,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    model = onnx.load(str(output))
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.doc_string = f"fer_lightning expression model; inputs: {meta['input']}; outputs: {meta['outputs']}"
    onnx.checker.check_model(model)
    onnx.save(model, str(output))


def _export_torchscript(wrapper: nn.Module, example: Tensor, output: Path, meta: dict[str, str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated upstream but still the TorchScript format
        traced = torch.jit.trace(wrapper, (example,), check_trace=True)
        torch.jit.save(traced, str(output), _extra_files={METADATA_FILE: json.dumps(meta)})


def read_metadata(path: str | Path) -> dict[str, str]:
    """The metadata stored in an exported .onnx or TorchScript file."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnx

        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    extra = {METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[METADATA_FILE])


def run_exported(path: str | Path, images: np.ndarray) -> list[np.ndarray]:
    """Outputs of an exported model on a NCHW batch (onnxruntime for .onnx, torch.jit.load otherwise)."""
    path = Path(path)
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [np.asarray(o) for o in session.run(None, {session.get_inputs()[0].name: images})]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return [o.numpy() for o in model(torch.from_numpy(images))]


def parity_batch(hparams: Mapping[str, Any], batch_size: int = 5, seed: int = 0) -> np.ndarray:
    """A seeded uint8 NCHW batch: noise plus a black and a white image (the extremes of the input range)."""
    pre = preprocessing_of(hparams)
    c, s = int(pre["channels"]), int(pre["image_size"])
    batch = np.random.default_rng(seed).integers(0, 256, size=(max(batch_size, 3), c, s, s), dtype=np.uint8)
    batch[0], batch[1] = 0, 255
    return batch


def check_parity(
    module: nn.Module, path: str | Path, images: np.ndarray, *, tta: str = "none", input_dtype: str = "uint8"
) -> dict[str, float]:
    """Max |exported - checkpoint| per output on `images` (uint8 NCHW), the checkpoint run through FERModule."""
    with torch.no_grad():
        reference = tta_outputs(module.cpu().eval(), torch.from_numpy(images), tta)
    feed = images if input_dtype == "uint8" else images.astype(np.float32)
    outputs = run_exported(path, feed)
    expected = [reference["probs"].numpy()] + ([reference["va"].numpy()] if "va" in reference else [])
    if len(outputs) != len(expected):
        raise ExportError(f"{path} returns {len(outputs)} outputs, the checkpoint {len(expected)}")
    names = output_names(len(expected) == 2)
    return {n: float(np.abs(o - e).max()) for n, o, e in zip(names, outputs, expected)}


def export_and_check(
    module: nn.Module,
    hparams: Mapping[str, Any],
    output: str | Path,
    *,
    fmt: str = "onnx",
    tta: str = "none",
    input_dtype: str = "uint8",
    source: str = "",
    images: np.ndarray | None = None,
    atol: float = 1e-4,
) -> ExportResult:
    """Export, then compare with the checkpoint on a batch; ExportError when any output differs by more than atol."""
    path = export_model(module, hparams, output, fmt=fmt, tta=tta, input_dtype=input_dtype, source=source)
    batch = parity_batch(hparams) if images is None else images
    diffs = check_parity(module, path, batch, tta=tta, input_dtype=input_dtype)
    worst = max(diffs.values())
    if not worst <= atol:  # also catches NaN
        raise ExportError(
            f"exported model {path} differs from the checkpoint by up to {worst:.3g} (> atol={atol:g}) on "
            f"{len(batch)} images: {diffs}; the export is not faithful, do not use it"
        )
    return ExportResult(path=path, max_abs_diff=diffs, batch_size=len(batch))
