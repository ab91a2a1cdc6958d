"""fer-report on real runs in a temporary MLflow store: rows, seed aggregates, baselines, heatmap, selection, errors."""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from eval_helpers import compose_cfg, private_store
from mlflow import MlflowClient
from PIL import Image

from fer_lightning.report import ReportError, Runs, build_report, heatmap_table, report, varied_params
from fer_lightning.train import train

METRICS = ["test/f1_macro", "test/accuracy", "test/kappa"]


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory, shared_cache, mlflow_template_db):
    """Two seeds of loss=ce and one run of loss=focal, all real short trainings in one private store."""
    root = tmp_path_factory.mktemp("report")
    uri = private_store(root, mlflow_template_db)
    for i, overrides in enumerate([("loss=ce", "seed=1"), ("loss=ce", "seed=2"), ("loss=focal", "seed=1")]):
        train(compose_cfg("train", root, shared_cache, uri, *overrides, out=f"run{i}"))
    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("fer_lightning").experiment_id])
    assert len(runs) == 3
    return SimpleNamespace(root=root, uri=uri, client=client, runs=runs)


def _report_cfg(three_runs, out: Path, *overrides: str):
    metrics = f"report.metrics=[{','.join(METRICS)}]"
    return compose_cfg("report", three_runs.root, Path(), three_runs.uri, metrics, *overrides, out=str(out))


def test_report_rows_seed_aggregates_and_baselines(three_runs, tmp_path, capsys):
    result = report(_report_cfg(three_runs, tmp_path / "rep"))
    assert result.params == ["loss"]  # loss.name, loss.gamma, loss.weighting... split the runs the same way
    board = result.board
    runs = board[board["kind"] == "run"].set_index("loss")
    assert sorted(runs.index) == ["ce", "focal"]
    assert (runs.loc["ce", "n_seeds"], runs.loc["ce", "seeds"]) == (2, "1,2")
    assert (runs.loc["focal", "n_seeds"], runs.loc["focal", "seeds"]) == (1, "1")
    for loss in ("ce", "focal"):
        logged = [r.data.metrics for r in three_runs.runs if r.data.params["loss"] == loss]
        for m in METRICS:
            values = [x[m] for x in logged]
            assert runs.loc[loss, f"{m} mean"] == pytest.approx(statistics.mean(values), abs=1e-12)
            if len(values) > 1:
                assert runs.loc[loss, f"{m} std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
            else:
                assert np.isnan(runs.loc[loss, f"{m} std"])
    # the paper's six expression rows interleaved, everything ranked by the first metric (best first)
    paper = board[board["kind"] == "AffectNet paper"]
    assert len(paper) == 6 and "AffectNet paper: AlexNet CNN, Weighted-Loss" in set(paper["label"])
    assert paper.set_index("label").loc["AffectNet paper: SVM", "test/accuracy mean"] == 0.60
    ranked = board["test/f1_macro mean"].to_numpy()
    assert np.all(np.diff(ranked) <= 0)

    md = (tmp_path / "rep" / "leaderboard.md").read_text()
    ce = runs.loc["ce"]
    assert f"{ce['test/f1_macro mean']:.3f} ± {ce['test/f1_macro std']:.3f}" in md
    assert "| loss | n_seeds |" in md and "AffectNet paper: MS Cognitive" in md
    csv = pd.read_csv(tmp_path / "rep" / "leaderboard.csv")
    assert np.allclose(csv["test/accuracy mean"], board["test/accuracy mean"])
    with Image.open(tmp_path / "rep" / "leaderboard.png") as im:
        assert im.format == "PNG"
    assert not (tmp_path / "rep" / "heatmap.png").exists()  # one varied param: no heatmap
    assert "± " in capsys.readouterr().out


def test_report_filter_and_parent_run_selection(three_runs, tmp_path):
    focal = report(
        _report_cfg(three_runs, tmp_path / "f", "report.filter=\"params.loss = 'focal'\"", "report.baselines=false")
    )
    assert focal.params == [] and len(focal.board) == 1 and focal.board.loc[0, "n_seeds"] == 1
    # a sweep's parent run: its children are found by the mlflow.parentRunId tag
    client = three_runs.client
    parent = client.create_run(three_runs.runs[0].info.experiment_id, run_name="sweep")
    ce_ids = [r.info.run_id for r in three_runs.runs if r.data.params["loss"] == "ce"]
    for run_id in ce_ids:
        client.set_tag(run_id, "mlflow.parentRunId", parent.info.run_id)
    children = report(_report_cfg(three_runs, tmp_path / "p", f"report.parent_run_id={parent.info.run_id}"))
    rows = children.board[children.board["kind"] == "run"]
    assert len(rows) == 1 and rows.iloc[0]["n_seeds"] == 2 and set(rows.iloc[0]["run_ids"].split(",")) == set(ce_ids)


def _grid_runs() -> Runs:
    """Eight runs: sampling x loss.beta, two seeds each, with run-specific params that must not count as varied."""
    rows, values = [], []
    for s, sampling in enumerate(["none", "upsample"]):
        for b, beta in enumerate(["0.9", "0.999"]):
            for seed in ("1", "2"):
                rows.append({"sampling": sampling, "sampling.name": sampling, "loss": "class_balanced",
                             "loss.beta": beta, "seed": seed, "paths.output_dir": f"/o/{len(rows)}",
                             "backbone/name": "simple_cnn", "class_counts": f"[{seed}]"})  # fmt: skip
                values.append(0.1 * s + 0.01 * b + (0.001 if seed == "2" else 0.0))
    ids = pd.Index([f"r{i}" for i in range(len(rows))], name="run_id")
    info = pd.DataFrame({"run_name": [f"run{i}" for i in range(len(rows))], "status": "FINISHED"}, index=ids)
    return Runs(info, pd.DataFrame(rows, index=ids), pd.DataFrame({"test/f1_macro": values}, index=ids))


def test_varied_params_heatmap_of_two_params(tmp_path):
    runs = _grid_runs()
    assert varied_params(runs.params) == ["sampling", "loss.beta"]
    mean, count = heatmap_table(runs, "sampling", "loss.beta", "test/f1_macro")
    expected = [[0.0005, 0.0105], [0.1005, 0.1105]]
    assert np.allclose(mean.to_numpy(), expected) and (count.to_numpy() == 2).all()
    result = build_report(runs, metrics=["test/f1_macro"], folder=tmp_path, baselines=False)
    assert list(result.board["label"]) == ["sampling=upsample, loss.beta=0.999", "sampling=upsample, loss.beta=0.9",
                                           "sampling=none, loss.beta=0.999", "sampling=none, loss.beta=0.9"]  # fmt: skip
    assert result.board["test/f1_macro std"].to_numpy() == pytest.approx([np.std([0, 0.001], ddof=1)] * 4)
    assert np.allclose(pd.read_csv(tmp_path / "heatmap.csv", index_col=0).to_numpy(), expected)
    with Image.open(tmp_path / "heatmap.png") as im:
        assert im.format == "PNG"


def test_report_errors_name_the_key(three_runs, tmp_path):
    with pytest.raises(ReportError, match=r"report.experiment='nope' does not exist.*fer_lightning"):
        report(_report_cfg(three_runs, tmp_path, "report.experiment=nope"))
    with pytest.raises(ReportError, match="report.sort_by"):
        report(_report_cfg(three_runs, tmp_path, "report.sort_by=test/auc"))
    with pytest.raises(ReportError, match="report.filter"):
        report(_report_cfg(three_runs, tmp_path, "report.filter='params.loss === x'"))
    with pytest.raises(ReportError, match="none|no finished run"):
        report(_report_cfg(three_runs, tmp_path, "report.metrics=[test/not_a_metric]"))


@pytest.mark.slow  # the same user_errors() path as fer-eval's CLI test, which runs by default
def test_cli_unknown_experiment_is_one_line(three_runs, tmp_path):
    env = {**os.environ, "FER_ROOT": str(tmp_path)}
    env.pop("MLFLOW_TRACKING_URI", None)
    res = subprocess.run([sys.executable, "-m", "fer_lightning.cli.report", f"logger.tracking_uri={three_runs.uri}",
                          "report.experiment=nope"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("error: report.experiment='nope' does not exist")
