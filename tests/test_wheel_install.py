"""The framework as an installed library (issue 13): the configs ship inside the package, a wheel installed into a
fresh venv trains from an empty directory, and a user's own config groups (a data set, a backbone) join the shipped
ones through `--config-dir` or `hydra.searchpath` without a fork."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch
from layouts import write_image_folder
from omegaconf import OmegaConf

from fer_lightning.config_dir import CONF_DIR, CONFIG_PATH, compose_config

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300
# what a CPU run in a subprocess needs besides debug=fast: no MLflow, no progress bar
QUIET = ("debug=fast", "logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false")


def _env() -> dict[str, str]:
    """The caller's environment minus whatever would point the subprocess at the checkout or a shared store."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "FER_ROOT", "MLFLOW_TRACKING_URI")}  # fmt: skip
    env.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PIP_NO_INDEX": "1",
                "PIP_DISABLE_PIP_VERSION_CHECK": "1"})  # fmt: skip
    return env


def _run(cmd: list, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)  # fmt: skip
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
    return proc


def _run_dir(root: Path) -> Path:
    (run_dir,) = (root / "outputs" / "train").iterdir()
    return run_dir


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A fresh venv holding only the wheel built from this tree; the dependencies come from the project's venv
    through a .pth path line (not processed as a site dir, so the editable install's finder stays out)."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"  # a copy, so the build leaves nothing (build/, egg-info) in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("fer_lightning", "hydra_plugins"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "-q", "-w", base / "dist"],
         cwd=base)  # fmt: skip
    (wheel,) = (base / "dist").glob("fer_lightning-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"fer_lightning/{p.relative_to(CONF_DIR.parent).as_posix()}" for p in CONF_DIR.rglob("*.yaml")}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert "fer_lightning/conf/__init__.py" in names  # Hydra's pkg:// source needs a package

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base)
    python = venv / "bin" / "python"
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=base).stdout
    deps = sorted({sysconfig.get_paths()[k] for k in ("purelib", "platlib")})
    Path(purelib.strip(), "project_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    # --ignore-installed: pip must not touch the project's editable fer_lightning it sees through the .pth
    _run([python, "-m", "pip", "install", "--no-deps", "--ignore-installed", "--no-warn-script-location", "-q",
          wheel], cwd=base)  # fmt: skip
    where = _run([python, "-c", "import fer_lightning.conf as c, fer_lightning as f; print(f.__file__, c.__file__)"],
                 cwd=base).stdout.split()  # fmt: skip
    assert all(Path(p).is_relative_to(venv) for p in where), where
    assert (venv / "bin" / "fer-train").read_text().splitlines()[0] == f"#!{python}"
    return venv


def _user_configs(project: Path) -> tuple[Path, Path]:
    """A researcher's project: image folders of two classes, my_conf/data/my_set.yaml and my_conf/backbone/my_net.yaml
    (each extending a shipped option of its group)."""
    faces = project / "faces"
    write_image_folder(faces, {"train": {"happy": 12, "sad": 12}, "test": {"happy": 4, "sad": 4}})
    conf = project / "my_conf"
    (conf / "data").mkdir(parents=True)
    (conf / "backbone").mkdir()
    (conf / "data" / "my_set.yaml").write_text(
        f"defaults: [image_folder, _self_]\nname: my_set\nroot: {faces}\nval_fraction: 0.25\n"
    )
    (conf / "backbone" / "my_net.yaml").write_text("defaults: [simple_cnn, _self_]\nwidths: [8, 16, 32]\n")
    return conf, faces


# ------------------------------------------------------------------------------------------ fast checks
def test_one_config_dir_definition():
    # every CLI points @hydra.main at the package, and nothing else spells out where conf/ is
    assert CONF_DIR == Path(__file__).resolve().parents[1] / "fer_lightning" / "conf" and CONF_DIR.is_dir()
    for path in [*(REPO / "fer_lightning").rglob("*.py"), *(REPO / "tests").rglob("*.py")]:
        text = path.read_text()
        assert not re.search(r"^\s*CONF(_DIR)?\s*=", text, re.M) or path.name == "config_dir.py", path
        assert "initialize_config_dir" + "(" not in text or path.name == "config_dir.py", path
    for cli in ("train", "eval", "predict", "export", "report", "explore"):
        assert "config_path=CONFIG_PATH" in (REPO / "fer_lightning" / "cli" / f"{cli}.py").read_text(), cli


def test_compose_config_takes_user_groups_from_the_search_path(tmp_path):
    conf, faces = _user_configs(tmp_path)
    cfg = compose_config("train", [f"hydra.searchpath=[file://{conf}]", "data=my_set", "backbone=my_net",
                                   "paths.root_dir=/x", "paths.output_dir=/x/out"])  # fmt: skip
    assert (cfg.data.name, cfg.data.format, cfg.data.root) == ("my_set", "image_folder", str(faces))
    assert cfg.data.channels == 1  # from the shipped image_folder it extends
    assert (cfg.backbone.name, list(cfg.backbone.widths), cfg.backbone.stem_stride) == ("simple_cnn", [8, 16, 32], 2)
    # the user's folder is searched after the shipped configs: a shipped name still means the shipped file (README)
    (conf / "backbone" / "simple_cnn.yaml").write_text("name: simple_cnn\nwidths: [4]\n")
    cfg = compose_config("train", [f"hydra.searchpath=[file://{conf}]", "paths.root_dir=/x", "paths.output_dir=/x/o"])
    assert cfg.backbone.widths == OmegaConf.load(CONF_DIR / "backbone" / "simple_cnn.yaml").widths != [4]


# ------------------------------------------------------------------------------------------ installed runs
@pytest.mark.slow
def test_installed_wheel_trains_in_an_empty_directory(wheel_venv, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    _run([wheel_venv / "bin" / "fer-train", *QUIET], cwd=work)

    run_dir = _run_dir(work)  # paths.root_dir defaults to the directory it was started from
    assert list((run_dir / "checkpoints").glob("best-*.ckpt"))
    assert (run_dir / "metrics_test.json").is_file() and (work / "data_cache").is_dir()
    sources = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.config_sources
    main = [s for s in sources if s.provider == "main"]
    assert [f"{s.schema}://{s.path}" for s in main] == [CONFIG_PATH]


@pytest.mark.slow
@pytest.mark.parametrize("form", ["config-dir", "searchpath"])
def test_user_data_and_backbone_configs_without_a_fork(wheel_venv, tmp_path, form):
    _user_configs(tmp_path)
    where = ["--config-dir", "my_conf"] if form == "config-dir" else ["hydra.searchpath=[file://my_conf]"]
    _run([wheel_venv / "bin" / "fer-train", *where, "data=my_set", "backbone=my_net", *QUIET], cwd=tmp_path)

    run_dir = _run_dir(tmp_path)
    cfg = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    choices = OmegaConf.load(run_dir / ".hydra" / "hydra.yaml").hydra.runtime.choices
    assert (choices.data, choices.backbone) == ("my_set", "my_net")
    assert (cfg.data.name, cfg.data.root, list(cfg.backbone.widths)) == ("my_set", str(tmp_path / "faces"), [8, 16, 32])
    summary = json.loads((run_dir / "data" / "data_summary.json").read_text())
    assert summary["classes"] == ["happy", "sad"]
    # the trained network is the user's: a first conv of 8 filters on 1 channel, none of the shipped first width
    (best,) = (run_dir / "checkpoints").glob("best-*.ckpt")
    state = torch.load(best, map_location="cpu", weights_only=False)["state_dict"]
    assert any(t.ndim == 4 and tuple(t.shape[:2]) == (8, 1) for t in state.values())
    shipped = OmegaConf.load(CONF_DIR / "backbone" / "simple_cnn.yaml").widths[0]
    assert not any(t.ndim == 4 and t.shape[0] == shipped for t in state.values())
