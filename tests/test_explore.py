"""fer-explore: the report's numbers against hand computations, its MLflow run, and its rendering in a browser."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from layouts import write_affectnet_npy, write_image, write_image_folder, write_via_metadata
from mlflow import MlflowClient
from scipy.stats import entropy

from fer_lightning import explore_stats as st
from fer_lightning.config import ConfigError
from fer_lightning.config_dir import compose_config
from fer_lightning.data.datamodule import FERDataModule
from fer_lightning.data.records import make_records
from fer_lightning.explore import ExploreOptions, explore, write_report

ROOT = Path(__file__).resolve().parents[1]
EPS = 1e-6  # explore.kl_epsilon's default in conf/explore.yaml

# The fixture: classes neutral/happy/sad, one (valence, arousal) point per class, and one val sample on the
# corner (1.0, -1.0) so the closed right edge of the last bin is exercised.
POINT = {0: (0.1, 0.1), 1: (0.7, 0.3), 2: (-0.5, -0.3)}
TRAIN = [0] * 4 + [1] * 6 + [2] * 2
VAL = [0, 1, 2, 2, 2]
EDGE = (2, 1.0, -1.0)


def _affectnet_fixture(root: Path) -> None:
    train = [(c, *POINT[c]) for c in TRAIN]
    val = [(c, *POINT[c]) for c in VAL] + [EDGE]
    write_affectnet_npy(root, {"train_set": train, "val_set": val},
                        image={"train_set": ((32, 32), "RGB"), "val_set": ((40, 30), "L")})  # fmt: skip


def _compose(tmp: Path, store: str, *overrides: str):
    base = [
        f"paths.root_dir={tmp}",
        f"paths.output_dir={tmp / 'out'}",
        f"paths.cache_dir={tmp / 'cache'}",
        f"logger.tracking_uri={store}",
        f"logger.artifact_location={tmp / 'mlruns' / 'artifacts'}",
    ]
    return compose_config("explore", [*base, *overrides])


AFFECTNET_OVERRIDES = ("data=affectnet_npy", "data.reader.official_val_split=val", "data.classes=[neutral,happy,sad]",
                       "explore.image_sample=null")  # fmt: skip


@pytest.fixture(scope="module")
def explored(tmp_path_factory, mlflow_template_db):
    """One explore run over the AffectNet-layout fixture, logged to a private SQLite store."""
    tmp = tmp_path_factory.mktemp("explore")
    _affectnet_fixture(tmp / "affectnet")
    db = tmp / "mlruns" / "mlflow.db"
    db.parent.mkdir(parents=True)
    shutil.copy(mlflow_template_db, db)
    cfg = _compose(tmp, f"sqlite:///{db}", f"data.root={tmp / 'affectnet'}", *AFFECTNET_OVERRIDES)
    summary = explore(cfg)
    return cfg, summary, Path(summary["report"])


# ----------------------------------------------------------- reading the HTML back
class _Tables(HTMLParser):
    """Cell texts of every <table id=...>, row by row."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._id = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._id = a.get("id")
            self.tables[self._id] = []
        elif tag == "tr" and self._id is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []
        elif tag == "img":
            self.images.append(a.get("src", ""))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self._id].append(self._row)
            self._row = None
        elif tag == "table":
            self._id = None


def _parse(path: Path) -> _Tables:
    parser = _Tables()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def _value(text: str) -> float | str:
    try:
        return float(text) if text else math.nan
    except ValueError:
        return text


def _grid(rows: list[list[str]]) -> dict[str, dict[str, float | str]]:
    """{row label: {column: value}} of a table written with its index (first row = column names)."""
    header = rows[0]
    out = {}
    for row in rows[1:]:
        if len(row) == len(header) and any(row[1:]):
            out[row[0]] = {h: _value(v) for h, v in zip(header[1:], row[1:])}
    return out


def _records(rows: list[list[str]]) -> list[dict[str, str]]:
    """Rows of a table written without its index."""
    return [dict(zip(rows[0], r)) for r in rows[1:]]


# ---------------------------------------------------------------- hand values
def _kl(p_counts, q_counts, eps=EPS) -> float:
    p = np.asarray(p_counts, float) / np.sum(p_counts)
    q = np.asarray(q_counts, float) / np.sum(q_counts)
    p, q = (p + eps) / (1 + len(p) * eps), (q + eps) / (1 + len(q) * eps)
    return float(np.sum(p * np.log(p / q)))


def _va_bins(samples) -> np.ndarray:
    """Hand-placed 10x10 histogram [arousal bin, valence bin] of 0.2 bins over [-1, 1]."""
    cell = {0: (5, 5), 1: (6, 8), 2: (3, 2)}  # (arousal bin, valence bin) of POINT
    hist = np.zeros((10, 10))
    for c in samples:
        hist[cell[c]] += 1
    return hist


def test_class_counts_shares_and_imbalance_match_hand_values(explored):
    _, summary, report = explored
    tables = _parse(report).tables
    counts = _grid(tables["class_counts"])
    assert counts["neutral"] == {"train": 4, "val": 1, "all": 5}
    assert counts["happy"] == {"train": 6, "val": 1, "all": 7}
    assert counts["sad"] == {"train": 2, "val": 4, "all": 6}
    shares = _grid(tables["class_shares"])
    assert shares["neutral"]["train"] == pytest.approx(4 / 12, abs=1e-6)
    assert shares["happy"]["train"] == pytest.approx(6 / 12, abs=1e-6)
    assert shares["sad"]["val"] == pytest.approx(4 / 6, abs=1e-6)
    assert shares["sad"]["all"] == pytest.approx(6 / 18, abs=1e-6)
    ratio = _grid(tables["imbalance_ratio"])["max / min"]
    assert ratio == {"train": pytest.approx(6 / 2), "val": pytest.approx(4 / 1), "all": pytest.approx(7 / 5)}
    assert summary["imbalance_ratio"]["val"] == pytest.approx(4.0)
    assert summary["class_counts"]["train"] == {"neutral": 4, "happy": 6, "sad": 2}


def test_kl_divergence_both_directions_with_the_stated_smoothing(explored):
    _, summary, report = explored
    html = report.read_text()
    assert "eps = 1e-06" in html and "nats" in html  # the smoothing is stated beside the numbers
    kl = _grid(_parse(report).tables["kl_divergence"])
    # class distributions (neutral, happy, sad): train (4, 6, 2), val (1, 1, 4); K = 3
    d_tv, d_vt = _kl([4, 6, 2], [1, 1, 4]), _kl([1, 1, 4], [4, 6, 2])
    assert kl["D(train || val)"]["KL classes"] == pytest.approx(d_tv, rel=1e-5)
    assert kl["D(val || train)"]["KL classes"] == pytest.approx(d_vt, rel=1e-5)
    assert d_tv != pytest.approx(d_vt, rel=1e-3)  # the two directions differ on this fixture
    # unsmoothed by hand: 1/3 ln 2 + 1/2 ln 3 + 1/6 ln(1/4); the smoothing moves it by < 1e-4
    assert d_tv == pytest.approx(np.log(2) / 3 + np.log(3) / 2 + np.log(0.25) / 6, abs=1e-4)
    # an independent implementation of the same smoothed sum
    p = (np.array([4, 6, 2]) / 12 + EPS) / (1 + 3 * EPS)
    q = (np.array([1, 1, 4]) / 6 + EPS) / (1 + 3 * EPS)
    assert d_tv == pytest.approx(entropy(p, q), rel=1e-9)
    # VA distributions over 10 x 10 bins of 0.2 (K = 100); the corner sample fills a bin train leaves empty
    train_va = _va_bins(TRAIN)
    val_va = _va_bins(VAL)
    val_va[0, 9] += 1  # (valence 1.0, arousal -1.0): last valence bin, first arousal bin
    assert kl["D(train || val)"]["KL VA (0.2 bins)"] == pytest.approx(_kl(train_va.ravel(), val_va.ravel()), rel=1e-5)
    assert kl["D(val || train)"]["KL VA (0.2 bins)"] == pytest.approx(_kl(val_va.ravel(), train_va.ravel()), rel=1e-5)
    assert kl["D(val || train)"]["VA bins only in P"] == 1 and kl["D(train || val)"]["VA bins only in P"] == 0
    by_pair = {(r["P"], r["Q"]): r for r in summary["kl"]}
    assert by_pair[("train", "val")]["kl_class"] == pytest.approx(d_tv, rel=1e-9)


def test_va_statistics_bins_and_images_match_hand_values(explored):
    _, _, report = explored
    tables = _parse(report).tables
    stats = {(r["split"], r["variable"]): r for r in _records(tables["va_statistics"])}
    # train valence: -0.5 x2, 0.1 x4, 0.7 x6 -> quartiles at positions 2.75, 5.5, 8.25 of 12 sorted values
    train_v = {k: float(v) for k, v in stats[("train", "valence")].items() if k not in ("split", "variable")}
    assert train_v == pytest.approx({"n": 12, "max": 0.7, "min": -0.5, "mean": 0.3, "q1": 0.1, "median": 0.4,
                                     "q3": 0.7}, abs=1e-6)  # fmt: skip
    # val valence: -0.5 x3, 0.1, 0.7, 1.0
    val_v = {k: float(v) for k, v in stats[("val", "valence")].items() if k not in ("split", "variable")}
    assert val_v == pytest.approx({"n": 6, "max": 1.0, "min": -0.5, "mean": 0.05, "q1": -0.5, "median": -0.2,
                                   "q3": 0.55}, abs=1e-6)  # fmt: skip
    assert float(stats[("all", "arousal")]["min"]) == pytest.approx(-1.0)
    bins = _grid(tables["va_bins_all"])
    assert bins["[0.0, 0.2)"]["[0.0, 0.2)"] == 5  # neutral: 4 train + 1 val
    assert bins["[0.2, 0.4)"]["[0.6, 0.8)"] == 7  # happy
    assert bins["[-0.4, -0.2)"]["[-0.6, -0.4)"] == 5  # sad at (-0.5, -0.3)
    assert bins["[-1.0, -0.8)"]["[0.8, 1.0]"] == 1  # the corner lands in the closed last valence bin
    assert sum(sum(v for v in row.values()) for row in bins.values()) == 18
    assert _grid(tables["va_bins_val"])["[-1.0, -0.8)"]["[0.8, 1.0]"] == 1
    # every image opened (explore.image_sample=null): train 32x32 RGB, val 40x30 grayscale
    modes = _grid(tables["image_modes"])
    assert modes["RGB"]["train"] == 12 and modes["L"]["val"] == 6
    sizes = _grid(tables["image_sizes"])
    assert sizes["32x32"]["train"] == 12 and sizes["40x30"]["val"] == 6 and sizes["40x30"]["train"] == 0
    # AffectNet format: class counts against the paper's (happy: 146,198)
    paper = _grid(tables["paper_counts"])
    assert paper["happy"]["paper"] == 146198 and paper["happy"]["this data"] == 7
    assert paper["happy"]["paper - this"] == 146191
    assert paper["happy"]["missing share"] == pytest.approx(146191 / 146198, rel=1e-5)
    assert paper["contempt"]["this data"] == 0


def test_explore_run_in_mlflow_with_report_and_data_artifacts(explored):
    cfg, summary, report = explored
    client = MlflowClient(tracking_uri=cfg.logger.tracking_uri)
    exp = client.get_experiment_by_name(cfg.logger.experiment_name)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_id == summary["run_id"] and run.info.status == "FINISHED"
    assert run.data.tags["run_type"] == "explore" and run.data.tags["data"] == "affectnet_npy"
    assert len(run.data.tags["data_fingerprint"]) == 16
    assert run.data.params["data.format"] == "affectnet_npy" and run.data.params["explore.va_bin"] == "0.2"
    assert run.data.metrics["explore/kl_class_train_val"] == pytest.approx(_kl([4, 6, 2], [1, 1, 4]), rel=1e-6)
    assert run.data.metrics["explore/imbalance_ratio_train"] == pytest.approx(3.0)
    explore_files = {a.path for a in client.list_artifacts(run.info.run_id, "explore")}
    assert {"explore/report.html", "explore/figures", "explore/explore_summary.json"} <= explore_files
    figures = {a.path for a in client.list_artifacts(run.info.run_id, "explore/figures")}
    assert {f"explore/figures/{Path(p).name}" for p in summary["figures"]} == figures
    assert "explore/figures/va_heatmap_classes.png" in figures
    data_files = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/checks.txt", "data/split.csv", "data/data_summary.json"} <= data_files
    saved = json.loads((report.parent / "explore_summary.json").read_text())
    assert saved["class_counts"] == summary["class_counts"]


# ------------------------------------------------------------------ browser
def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


_PROBE = """<script>window.addEventListener("load", () => {
  const r = [...document.images].map(i => i.complete && i.naturalWidth > 0 ? i.naturalWidth : 0);
  const p = document.createElement("pre"); p.id = "img-probe"; p.textContent = JSON.stringify(r);
  document.body.appendChild(p);
});</script>"""


def _rendered_widths(report: Path, tmp: Path) -> list[int]:
    """Open a copy of the report (next to the original, so relative links resolve) in headless Chromium."""
    probe = report.with_name("probe_" + report.name)
    probe.write_text(report.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp / 'chromium-profile'}",
           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    probe.unlink()
    assert res.returncode == 0, res.stderr[-2000:]
    start = res.stdout.index('<pre id="img-probe">') + len('<pre id="img-probe">')
    return json.loads(res.stdout[start : res.stdout.index("</pre>", start)])


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium not installed (make install-system installs it)")
def test_report_figures_render_in_headless_chromium(explored, tmp_path):
    cfg, summary, report = explored
    parsed = _parse(report)
    assert len(parsed.images) == len(summary["figures"]) >= 7
    assert all(src.startswith("data:image/png;base64,") for src in parsed.images)  # opens without network
    widths = _rendered_widths(report, tmp_path)
    assert len(widths) == len(summary["figures"]) and all(w > 0 for w in widths), widths

    # the same report with figures linked relatively (explore.embed_figures=false)
    dm = FERDataModule(cfg.data, seed=int(cfg.seed), cache_dir=cfg.paths.cache_dir)
    dm.records = dm.load_records()
    linked = write_report(dm, ExploreOptions(embed_figures=False, image_sample=3), tmp_path / "linked",
                          title="linked", data_name="affectnet_npy")  # fmt: skip
    report2 = Path(linked["report"])
    srcs = _parse(report2).images
    assert srcs and all(s.startswith("figures/") and (report2.parent / s).is_file() for s in srcs)
    widths = _rendered_widths(report2, tmp_path)
    assert len(widths) == len(srcs) and all(w > 0 for w in widths), widths


# ------------------------------------------------------------ stats, units
def test_counts_skip_unlabelled_rows_and_an_empty_class_gives_inf():
    records = make_records(pd.DataFrame({
        "path": [f"{i}.png" for i in range(7)],
        "split": ["train"] * 5 + ["test"] * 2,
        "expression": pd.array([0, 0, 1, pd.NA, 0, 1, 1], dtype="Int64"),
    }))  # fmt: skip
    counts = st.class_counts(records, [0, 1, 2], ["neutral", "happy", "sad"])
    assert counts.to_dict() == {"train": {"neutral": 3, "happy": 1, "sad": 0},
                                "test": {"neutral": 0, "happy": 2, "sad": 0},
                                "all": {"neutral": 3, "happy": 3, "sad": 0}}  # fmt: skip
    assert st.normalize_counts(counts)["train"].tolist() == pytest.approx([0.75, 0.25, 0.0])
    assert st.imbalance_ratio(counts).to_dict() == {"train": math.inf, "test": math.inf, "all": math.inf}
    assert st.imbalance_ratio(counts.loc[["neutral", "happy"]])["train"] == pytest.approx(3.0)


def test_kl_smoothing_and_bin_validation():
    # identical distributions: 0; an empty Q bin stays finite thanks to eps
    assert st.kl_divergence([1, 2, 3], [2, 4, 6], 1e-6) == pytest.approx(0.0, abs=1e-12)
    p = (np.array([0.5, 0.5]) + 1e-3) / (1 + 2e-3)
    q = (np.array([1.0, 0.0]) + 1e-3) / (1 + 2e-3)
    assert st.kl_divergence([5, 5], [3, 0], 1e-3) == pytest.approx(entropy(p, q), rel=1e-12)
    with pytest.raises(ValueError, match="kl_epsilon"):
        st.kl_divergence([1], [1], 0.0)
    with pytest.raises(ValueError, match="explore.va_bin"):
        st.bin_edges(0.3)
    assert st.interval_labels(st.bin_edges(0.5)) == ["[-1.0, -0.5)", "[-0.5, 0.0)", "[0.0, 0.5)", "[0.5, 1.0]"]
    with pytest.raises(ConfigError, match=r"explore\.va_bin"):
        ExploreOptions.from_config({"va_bin": 0.3})
    with pytest.raises(ConfigError, match=r"explore: unknown keys \['bins'\]"):
        ExploreOptions.from_config({"bins": 3})


def test_image_sample_is_capped_per_split_and_reports_unreadable_files(tmp_path):
    for i in range(6):
        write_image(tmp_path / f"train/{i}.png", i, (20 + i, 10), "RGB")
    (tmp_path / "test").mkdir()
    (tmp_path / "test/broken.png").write_bytes(b"not an image at all")
    write_image(tmp_path / "test/ok.png", 99, (8, 8), "I;16")
    records = make_records(pd.DataFrame({
        "path": [f"train/{i}.png" for i in range(6)] + ["test/broken.png", "test/ok.png"],
        "split": ["train"] * 6 + ["test"] * 2,
    }))  # fmt: skip
    props = st.sample_image_properties(records, tmp_path, per_split=4, seed=0)
    assert (props["split"] == "train").sum() == 4 and (props["split"] == "test").sum() == 2
    train = props[props["split"] == "train"]
    assert all(w == 20 + int(Path(p).stem) for p, w in zip(train["path"], train["width"]))
    broken = props.set_index("path").loc["test/broken.png"]
    assert pd.isna(broken["mode"]) and "UnidentifiedImageError" in broken["error"]
    assert props.set_index("path").loc["test/ok.png", "mode"] == "I;16"
    assert st.mode_counts(props).to_dict() == {"train": {"I;16": 0, "RGB": 4}, "test": {"I;16": 1, "RGB": 0}}


# ------------------------------------------------------------------ the CLI
def _run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FER_ROOT": str(cwd), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "fer_lightning.cli.explore", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_cli_reports_a_data_set_without_valence_arousal(tmp_path):
    root = tmp_path / "faces"
    write_image_folder(root, {"train": {"happy": 3, "sad": 2}, "val": {"happy": 1, "sad": 1}}, size=(24, 24))
    (root / "train/happy/empty.png").write_bytes(b"")  # kept under explore's data.checks=warn, and reported
    write_via_metadata(root / "train/sad/meta.csv", [("000.png", {"gender": "male"}), ("gone.png", {"age": "old"})])
    res = _run_cli(["data=image_folder", f"data.root={root}", "data.classes=[happy,sad]", "logger=none",
                    "explore.embed_figures=false"], tmp_path)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("data-exploration report: "))
    report = Path(line.split(": ", 1)[1])
    assert report.is_file() and report.is_relative_to(tmp_path / "outputs" / "explore")
    parsed = _parse(report)
    assert _grid(parsed.tables["check_counts"]) == {"empty_file": {"rows": 1}}
    issues = {(r["path"], r["reason"]) for r in _records(parsed.tables["metadata_issues"])}
    assert ("train/sad/gone.png", "metadata row for a file that does not exist") in issues
    assert [r["path"] for r in _records(parsed.tables["image_errors"])] == ["train/happy/empty.png"]
    assert _grid(parsed.tables["class_counts"])["happy"] == {"train": 4, "val": 1, "all": 5}
    assert _grid(parsed.tables["imbalance_ratio"])["max / min"]["train"] == pytest.approx(2.0)
    assert "no valence/arousal annotations" in report.read_text()
    assert "paper_counts" not in parsed.tables  # not an AffectNet format
    assert _grid(parsed.tables["image_modes"])["L"] == {"train": 5, "val": 2}
