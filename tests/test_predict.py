"""fer-predict on real files from a checkpoint trained here: odd image modes and sizes, non-images, face detection, TTA.

Every expected probability comes from an independent decode with PIL/numpy fed straight into the model.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw, ImageFilter
from trained_checkpoints import trained_checkpoint

from fer_lightning.checkpoints import CheckpointError, load_checkpoint, read_checkpoint
from fer_lightning.face_detect import DetectorSettings, HaarFaceDetector, grow_box
from fer_lightning.predict import PredictInputError, PredictSettings, collect_inputs, predict_files, summarize

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rgb_ckpt(tmp_path_factory, shared_cache) -> Path:
    return trained_checkpoint(tmp_path_factory, shared_cache, "rgb")


@pytest.fixture(scope="module")
def gray_ckpt(tmp_path_factory, shared_cache) -> Path:
    return trained_checkpoint(tmp_path_factory, shared_cache, "small_gray48", "experiment=small_gray48")


def _probs(module, arrays: list[np.ndarray], tta: str = "none") -> np.ndarray:
    """Softmax of the model on (H, W, C) uint8 arrays; hflip = mean with the mirrored pass, computed here."""
    x = torch.from_numpy(np.stack([a.transpose(2, 0, 1) for a in arrays]).copy())
    with torch.no_grad():
        p = module(x)["logits"].softmax(1)
        if tta == "hflip":
            p = (p + module(x.flip(-1))["logits"].softmax(1)) / 2
    return p.numpy()


def _rgb(img: Image.Image, size: int) -> np.ndarray:
    return np.asarray(img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))


def cartoon_face(size: int = 200) -> Image.Image:
    """A drawn frontal face (head oval, eyes, brows, nose, mouth) that OpenCV's default Haar cascade detects."""
    im = Image.new("L", (size, size), 60)
    d = ImageDraw.Draw(im)
    c = size // 2
    d.ellipse([c - 60, c - 80, c + 60, c + 80], fill=190)
    for s in (-1, 1):
        ex = c + s * 25
        d.ellipse([ex - 12, c - 22, ex + 12, c - 10], fill=40)
        d.rectangle([ex - 16, c - 34, ex + 16, c - 29], fill=70)
    d.polygon([(c, c - 10), (c - 8, c + 18), (c + 8, c + 18)], fill=150)
    d.ellipse([c - 22, c + 32, c + 22, c + 42], fill=60)
    return im.filter(ImageFilter.GaussianBlur(2))


def test_odd_modes_and_sizes_use_the_checkpoints_preprocessing(rgb_ckpt, tmp_path):
    module, hp = load_checkpoint(rgb_ckpt)
    size = hp["preprocessing"]["image_size"]
    assert hp["preprocessing"]["channels"] == 3 and size == 64
    rng = np.random.default_rng(0)
    d = tmp_path / "in"
    d.mkdir()
    expected: dict[str, np.ndarray] = {}
    # RGBA with a real alpha ramp: composited on black, round(c * a / 255)
    rgba = rng.integers(0, 256, (80, 100, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 100, dtype=np.uint8)[None, :]
    Image.fromarray(rgba).save(d / "rgba.png")
    comp = np.rint(rgba[..., :3].astype(np.float64) * rgba[..., 3:4] / 255.0).astype(np.uint8)
    expected["rgba.png"] = _rgb(Image.fromarray(comp), size)
    # 8-bit grey
    grey = rng.integers(0, 256, (50, 70), dtype=np.uint8)
    Image.fromarray(grey).save(d / "grey.png")
    expected["grey.png"] = _rgb(Image.fromarray(grey), size)
    # 16-bit grey PNG: v -> round(v / 257)
    g16 = rng.integers(0, 65536, (60, 60), dtype=np.uint16)
    Image.fromarray(g16).save(d / "grey16.png")
    assert Image.open(d / "grey16.png").mode.startswith("I")
    expected["grey16.png"] = _rgb(Image.fromarray(np.rint(g16 / 257.0).astype(np.uint8)), size)
    # CMYK JPEG: whatever libjpeg decodes, converted to RGB by PIL
    cmyk = Image.frombytes("CMYK", (70, 90), rng.integers(0, 256, (90, 70, 4), dtype=np.uint8).tobytes())
    cmyk.save(d / "cmyk.jpg", quality=95)
    with Image.open(d / "cmyk.jpg") as im:
        assert im.mode == "CMYK"
        expected["cmyk.jpg"] = _rgb(im, size)
    # big (no JPEG draft for PNG) and tiny (3x2 upscaled)
    yy, xx = np.mgrid[0:1200, 0:1600]
    big = np.stack([(xx % 256), (yy % 256), ((xx + yy) // 11 % 256)], -1).astype(np.uint8)
    Image.fromarray(big).save(d / "big.png")
    expected["big.png"] = _rgb(Image.fromarray(big), size)
    tiny = rng.integers(0, 256, (2, 3, 3), dtype=np.uint8)
    Image.fromarray(tiny).save(d / "tiny.png")
    expected["tiny.png"] = _rgb(Image.fromarray(tiny), size)
    # EXIF orientation 6 (rotate 90 degrees clockwise to view): the model sees the upright face
    side = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6
    side.save(d / "exif.jpg", quality=95, exif=exif)
    with Image.open(d / "exif.jpg") as im:
        expected["exif.jpg"] = _rgb(im.transpose(Image.Transpose.ROTATE_270), size)

    table = predict_files(module, hp, collect_inputs(d), PredictSettings(batch_size=3, tta="none"))
    assert list(table["path"]) == [str(p) for p in sorted(d.iterdir())]
    assert (table["status"] == "ok").all(), table[["path", "status", "message"]]
    names = hp["class_names"]
    got = table[[f"prob_{n}" for n in names]].to_numpy()
    want = _probs(module, [expected[Path(p).name] for p in table["path"]])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert list(table["predicted"]) == [names[i] for i in want.argmax(1)]
    np.testing.assert_allclose(table["confidence"], want.max(1), atol=1e-6)
    # valence/arousal from the same forward pass, in [-1, 1]
    with torch.no_grad():
        x = torch.from_numpy(np.stack([expected[Path(p).name].transpose(2, 0, 1) for p in table["path"]]).copy())
        va = module(x)["va"].numpy()
    np.testing.assert_allclose(table[["valence", "arousal"]].to_numpy(), va, atol=1e-5)


def test_grey_checkpoint_converts_rgb_input_and_uses_its_stored_tta(gray_ckpt, tmp_path):
    module, hp = load_checkpoint(gray_ckpt)
    assert hp["channels"] == 1 and hp["tta"] == "hflip"
    size = hp["preprocessing"]["image_size"]
    rgb = np.random.default_rng(1).integers(0, 256, (70, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "face.png")
    table = predict_files(module, hp, [tmp_path / "face.png"])  # tta=None: the checkpoint's hflip
    grey = np.asarray(Image.fromarray(rgb).convert("L").resize((size, size), Image.Resampling.BILINEAR))[..., None]
    want = _probs(module, [grey], tta="hflip")
    got = table[[f"prob_{n}" for n in hp["class_names"]]].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    # and the plain pass differs, so the check above could fail
    assert np.abs(_probs(module, [grey]) - want).max() > 1e-6


def test_tta_hflip_is_the_mean_of_the_two_passes(rgb_ckpt, tmp_path):
    module, hp = load_checkpoint(rgb_ckpt)
    rng = np.random.default_rng(2)
    arrays = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    paths = []
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    cols = [f"prob_{n}" for n in hp["class_names"]]
    plain = predict_files(module, hp, paths, PredictSettings(tta="none"))[cols].to_numpy()
    tta = predict_files(module, hp, paths, PredictSettings(tta="hflip"))[cols].to_numpy()
    mirrored = _probs(module, [a[:, ::-1] for a in arrays])
    np.testing.assert_allclose(plain, _probs(module, arrays), atol=1e-5)
    np.testing.assert_allclose(tta, (plain + mirrored) / 2, atol=1e-5)
    assert np.abs(tta - plain).max() > 1e-6
    np.testing.assert_allclose(tta.sum(1), 1.0, atol=1e-5)


def test_non_images_are_reported_not_raised(rgb_ckpt, tmp_path):
    module, hp = load_checkpoint(rgb_ckpt)
    d = tmp_path / "mixed"
    (d / "sub").mkdir(parents=True)
    Image.fromarray(np.full((30, 30, 3), 120, np.uint8)).save(d / "sub" / "ok.png")
    (d / "notes.txt").write_text("not a picture\n")
    (d / "empty.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.full((30, 30, 3), 9, np.uint8)).save(buf, "PNG")
    (d / "truncated.png").write_bytes(buf.getvalue()[:60])
    table = predict_files(module, hp, collect_inputs(d)).set_index("path")
    assert table.loc[str(d / "sub" / "ok.png"), "status"] == "ok"
    for name in ("notes.txt", "empty.jpg", "truncated.png"):
        row = table.loc[str(d / name)]
        assert row["status"] == "error" and row["message"], name
        assert np.isnan(row["prob_happy"]) and pd.isna(row["predicted"])
    assert "not an image" in table.loc[str(d / "notes.txt"), "message"]
    assert "empty" in table.loc[str(d / "empty.jpg"), "message"]
    counts, listed = summarize(table.reset_index())
    assert counts == "1 ok, 0 no_face, 3 error"
    assert len(listed) == 3 and any("notes.txt" in line for line in listed)


def test_face_detection_crops_the_largest_face_and_reports_faceless_images(rgb_ckpt, tmp_path):
    module, hp = load_checkpoint(rgb_ckpt)
    size = hp["preprocessing"]["image_size"]
    photo = Image.new("L", (400, 300), 60)
    photo.paste(cartoon_face(), (150, 60))  # face centre at (250, 160)
    small = cartoon_face().resize((100, 100))
    photo.paste(small, (10, 10))  # a smaller second face: the larger one wins
    photo.convert("RGB").save(tmp_path / "photo.png")
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(
        tmp_path / "noise.png"
    )
    Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(tmp_path / "flat.png")
    table = predict_files(
        module, hp, collect_inputs(tmp_path), PredictSettings(detect_faces=True, tta="none")
    ).set_index("path")
    for name in ("noise.png", "flat.png"):
        assert table.loc[str(tmp_path / name), "status"] == "no_face"
        assert np.isnan(table.loc[str(tmp_path / name), "prob_happy"])
    row = table.loc[str(tmp_path / "photo.png")]
    assert row["status"] == "ok"
    x, y, w, h = (float(row[k]) for k in ("face_x", "face_y", "face_w", "face_h"))
    assert abs(x + w / 2 - 250) <= 6 and abs(y + h / 2 - 160) <= 6 and 120 <= w <= 200
    crop = Image.open(tmp_path / "photo.png").crop((int(x), int(y), int(x + w), int(y + h)))
    want = _probs(module, [_rgb(crop, size)])
    np.testing.assert_allclose(row[[f"prob_{n}" for n in hp["class_names"]]].to_numpy(float), want[0], atol=1e-5)
    # the margin grows the box on every edge and stays inside the image
    assert grow_box((10, 20, 100, 50), 0.1, width=400, height=300) == pytest.approx((0.0, 15.0, 120.0, 60.0))
    det = HaarFaceDetector(DetectorSettings(margin=0.25))
    gx, gy, gw, gh = det.largest_face(tmp_path / "photo.png")
    assert gw == pytest.approx(min(1.5 * w, 400 - gx)) and gx == pytest.approx(x - 0.25 * w)


def test_collect_inputs_file_folder_glob_and_missing(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("a/1.png", "a/2.jpg", "3.png"):
        (tmp_path / name).write_bytes(b"x")
    assert collect_inputs(tmp_path / "3.png") == [tmp_path / "3.png"]
    assert collect_inputs(tmp_path) == [tmp_path / "3.png", tmp_path / "a/1.png", tmp_path / "a/2.jpg"]
    assert collect_inputs(tmp_path, recursive=False) == [tmp_path / "3.png"]
    assert collect_inputs(str(tmp_path / "**" / "*.png")) == [tmp_path / "3.png", tmp_path / "a/1.png"]
    with pytest.raises(PredictInputError, match="matches no files"):
        collect_inputs(str(tmp_path / "*.gif"))
    with pytest.raises(PredictInputError, match="does not exist"):
        collect_inputs(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PredictInputError, match="holds no files"):
        collect_inputs(tmp_path / "empty")


def test_checkpoint_loading_is_safe_and_clear(rgb_ckpt, tmp_path):
    ckpt = read_checkpoint(rgb_ckpt)
    # stored normalization, not today's defaults, is what the loaded module applies
    ckpt["hyper_parameters"]["preprocessing"]["mean"] = [0.5, 0.25, 0.125]
    torch.save(ckpt, tmp_path / "custom_mean.ckpt")
    module, _ = load_checkpoint(tmp_path / "custom_mean.ckpt")
    assert module.mean.tolist() == [0.5, 0.25, 0.125] and not module.training
    data = Path(rgb_ckpt).read_bytes()
    (tmp_path / "truncated.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match=r"truncated\.ckpt is corrupt or truncated"):
        load_checkpoint(tmp_path / "truncated.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 1}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not a fer_lightning checkpoint.*class_names"):
        load_checkpoint(tmp_path / "other.ckpt")
    torch.save({"state_dict": {}, "hyper_parameters": {}, "obj": Path("x")}, tmp_path / "unsafe.ckpt")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(tmp_path / "unsafe.ckpt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("FER_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "fer_lightning.cli.predict", *args, f"hydra.run.dir={cwd / 'hydra'}"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_cli_writes_the_csv_and_lists_problems_on_stderr(rgb_ckpt, tmp_path):
    d = tmp_path / "photos"
    d.mkdir()
    photo = Image.new("L", (300, 300), 60)
    photo.paste(cartoon_face(), (50, 50))
    photo.save(d / "face.png")
    Image.fromarray(np.full((80, 80), 128, np.uint8)).save(d / "blank.png")
    (d / "readme.md").write_text("# not an image")
    res = _cli([f"ckpt_path={rgb_ckpt}", f"input={d}", "output=out/preds.csv", "detect_faces=true"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert "wrote 3 rows" in res.stdout and "1 ok, 1 no_face, 1 error" in res.stdout
    assert f"no_face: {d / 'blank.png'}" in res.stderr and f"error: {d / 'readme.md'}: not an image" in res.stderr
    table = pd.read_csv(tmp_path / "out" / "preds.csv")
    _, hp = load_checkpoint(rgb_ckpt)
    assert list(table.columns) == [
        "path", "status", "predicted", "confidence", *(f"prob_{n}" for n in hp["class_names"]),
        "valence", "arousal", "face_x", "face_y", "face_w", "face_h", "message",
    ]  # fmt: skip
    assert list(table["status"]) == ["no_face", "ok", "error"]
    ok = table[table["status"] == "ok"].iloc[0]
    assert ok["predicted"] in hp["class_names"]
    assert sum(ok[f"prob_{n}"] for n in hp["class_names"]) == pytest.approx(1.0, abs=1e-5)


def _predict_cfg(*overrides: str):
    from fer_lightning.config_dir import compose_config

    return compose_config("predict", overrides)


def test_bad_checkpoint_and_missing_keys_are_one_line_exit_2(tmp_path, capsys):
    from fer_lightning.cli.errors import user_errors
    from fer_lightning.cli.predict import run

    (tmp_path / "broken.ckpt").write_bytes(b"PK\x03\x04 definitely not a zip")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "x.png")
    os.environ.pop("FER_DEBUG", None)
    cases = [
        ([f"ckpt_path={tmp_path / 'broken.ckpt'}", f"input={tmp_path / 'x.png'}"], "broken.ckpt is corrupt"),
        ([f"input={tmp_path / 'x.png'}"], "ckpt_path is required"),
        ([f"ckpt_path={tmp_path / 'broken.ckpt'}", f"input={tmp_path / 'none' / '*.png'}"], "matches no files"),
    ]
    for overrides, message in cases:
        with pytest.raises(SystemExit) as exc, user_errors():
            run(_predict_cfg(*overrides))
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
