"""fer-export: ONNX (run by onnxruntime) and TorchScript match the checkpoint; normalization and metadata inside."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from trained_checkpoints import trained_checkpoint

from fer_lightning.checkpoints import load_checkpoint
from fer_lightning.export import (
    ExportError,
    check_parity,
    export_and_check,
    export_model,
    parity_batch,
    read_metadata,
    run_exported,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory, shared_cache):
    path = trained_checkpoint(tmp_path_factory, shared_cache, "rgb")
    module, hp = load_checkpoint(path)
    return path, module, hp


def _reference(module, images: np.ndarray, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """Softmax and VA of the checkpoint on uint8 images, normalized here by hand from the stored mean/std."""
    mean = np.asarray(module.hparams.preprocessing["mean"], np.float32)[None, :, None, None]
    std = np.asarray(module.hparams.preprocessing["std"], np.float32)[None, :, None, None]
    views = [images] + ([images[..., ::-1]] if tta == "hflip" else [])
    probs, va = [], []
    with torch.no_grad():
        for v in views:
            x = torch.from_numpy(((v.astype(np.float32) / 255.0 - mean) / std).copy())
            out = module.head(module.backbone(x))
            probs.append(out["logits"].softmax(1).numpy())
            va.append(out["va"].numpy())
    return np.mean(probs, 0), np.mean(va, 0)


@pytest.mark.parametrize("input_dtype", ["uint8", "float32"])
def test_onnx_matches_checkpoint_under_onnxruntime(loaded, tmp_path, input_dtype):
    ckpt, module, hp = loaded
    result = export_and_check(module, hp, tmp_path / "m.onnx", fmt="onnx", input_dtype=input_dtype, source=str(ckpt))
    assert max(result.max_abs_diff.values()) < 1e-4 and result.batch_size == 5
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == f"tensor({'uint8' if input_dtype == 'uint8' else 'float'})"
    assert [o.name for o in session.get_outputs()] == ["probabilities", "valence_arousal"]
    # any batch size (dynamic axis), compared with a normalization computed independently here
    for n in (1, 7):
        images = np.random.default_rng(n).integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)
        probs, va = session.run(None, {"images": images.astype(input_dtype)})
        want_p, want_va = _reference(module, images)
        np.testing.assert_allclose(probs, want_p, atol=1e-5)
        np.testing.assert_allclose(va, want_va, atol=1e-5)
        np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    meta = {p.key: p.value for p in onnx.load(str(result.path)).metadata_props}
    assert json.loads(meta["class_names"]) == hp["class_names"]
    assert json.loads(meta["class_ids"]) == hp["class_ids"]
    assert json.loads(meta["preprocessing"])["mean"] == hp["preprocessing"]["mean"]
    assert json.loads(meta["outputs"]) == ["probabilities", "valence_arousal"]
    assert meta["source_checkpoint"] == str(ckpt) and meta["tta"] == "none"


def test_torchscript_matches_checkpoint_and_carries_metadata(loaded, tmp_path):
    ckpt, module, hp = loaded
    result = export_and_check(module, hp, tmp_path / "m.torchscript.pt", fmt="torchscript", source=str(ckpt))
    assert max(result.max_abs_diff.values()) < 1e-4
    images = np.random.default_rng(5).integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    want_p, want_va = _reference(module, images)
    # uint8 and float 0..255 input give the same answer
    for feed in (images, images.astype(np.float32)):
        probs, va = run_exported(result.path, feed)
        np.testing.assert_allclose(probs, want_p, atol=1e-5)
        np.testing.assert_allclose(va, want_va, atol=1e-5)
    extra = {"fer_metadata.json": ""}
    torch.jit.load(str(result.path), _extra_files=extra)
    meta = json.loads(extra["fer_metadata.json"])
    assert json.loads(meta["class_names"]) == hp["class_names"]
    assert read_metadata(result.path) == meta


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_hflip_tta_is_baked_into_the_export(loaded, tmp_path, fmt):
    _, module, hp = loaded
    name = "tta.onnx" if fmt == "onnx" else "tta.torchscript.pt"
    path = export_and_check(module, hp, tmp_path / name, fmt=fmt, tta="hflip").path
    images = parity_batch(hp, batch_size=6, seed=9)
    probs, va = run_exported(path, images)
    want_p, want_va = _reference(module, images, tta="hflip")
    np.testing.assert_allclose(probs, want_p, atol=1e-5)
    np.testing.assert_allclose(va, want_va, atol=1e-5)
    assert np.abs(probs - _reference(module, images)[0]).max() > 1e-6  # differs from the plain pass
    assert read_metadata(path)["tta"] == "hflip"


def test_parity_check_catches_a_model_that_differs(loaded, tmp_path):
    _, module, hp = loaded
    path = export_model(module, hp, tmp_path / "m.onnx", fmt="onnx")
    other, _ = load_checkpoint(loaded[0])
    with torch.no_grad():
        other.head.classifier.bias.add_(torch.linspace(-1, 1, other.head.classifier.bias.numel()))
    diffs = check_parity(other, path, parity_batch(hp))
    assert diffs["probabilities"] > 1e-3 and diffs["valence_arousal"] < 1e-5
    with pytest.raises(ExportError, match="format='tflite' is invalid"):
        export_model(module, hp, tmp_path / "m.tflite", fmt="tflite")


def test_cli_prints_the_parity_and_writes_next_to_the_checkpoint(loaded, tmp_path, capsys):
    from fer_lightning.cli.export import run
    from fer_lightning.config_dir import compose_config

    ckpt, _, _ = loaded
    local = tmp_path / "best.ckpt"
    local.write_bytes(Path(ckpt).read_bytes())
    cfg = compose_config("export", [f"ckpt_path={local}", "format=onnx"])
    path = run(cfg)
    assert path == tmp_path / "best.onnx" and path.is_file()
    out = capsys.readouterr().out
    assert "parity vs checkpoint on 5 images (onnxruntime): max abs diff probabilities" in out
