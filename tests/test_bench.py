"""fer-bench: options, the host-sync counter, the synthetic AffectNet files, and a tiny end-to-end run (no timings)."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fer_lightning.bench import (
    BenchConfig,
    BenchConfigError,
    HostSyncCounter,
    link_tree,
    parse_overrides,
    rows_label,
    write_affectnet_csvs,
    write_jpeg_sample,
)
from fer_lightning.cli.bench import main
from fer_lightning.formats.registry import read_records

# --- options --------------------------------------------------------------------------------------------------


def test_key_value_options_are_typed_and_checked() -> None:
    cfg = parse_overrides(["output=x/y.json", "n_images=32", "sections=data,train", "train_overrides=backbone=a b=c"])
    assert (cfg.output, cfg.n_images, cfg.sections, cfg.train_overrides) == ("x/y.json", 32, "data,train",
                                                                             "backbone=a b=c")  # fmt: skip
    assert cfg.batch_size == BenchConfig.batch_size  # untouched keys keep their defaults
    cases = [
        (["nimages=3"], "unknown key 'nimages'"),
        (["n_images=many"], "n_images='many' is not an integer"),
        (["n_images"], "not key=value"),
        (["sections=data,gpu"], "sections='data,gpu'"),
        (["growth_n=10"], "growth_n=10 must be >= 80"),
        (["rss_rows=10k"], "rss_rows='10k'"),
        (["device=tpu"], "device='tpu'"),
        (["batch_size=0"], "batch_size=0 must be >= 1"),
    ]
    for args, message in cases:
        with pytest.raises(BenchConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            parse_overrides(args)


def test_rows_label() -> None:
    assert [rows_label(n) for n in (10_000, 100_000, 300_000, 2500, 200)] == ["10k", "100k", "300k", "2500", "200"]


def test_cli_rejects_a_bad_key_with_exit_2(capsys) -> None:
    assert main(["colour=blue"]) == 2
    assert "unknown key 'colour'" in capsys.readouterr().err
    assert main(["--help"]) == 0
    assert "output=bench-results/latest.json" in capsys.readouterr().out


# --- host-sync counter ----------------------------------------------------------------------------------------


def test_host_sync_counter_counts_what_waits_for_the_device() -> None:
    x = torch.arange(-3.0, 5.0)
    with HostSyncCounter("cpu") as counter:
        y = (x * 2 + 1).relu().sum()  # no sync: stays a tensor
        z = x.argmax()
    assert counter.count == 0
    with HostSyncCounter("cpu") as counter:
        y.item()
        bool((x > 0).any())
        x[x > 0]  # boolean mask: the result's size must be read back
        float(z)
        x.tolist()
        with counter.excluded():
            x.nonzero()
    assert counter.count == 5
    assert counter.ops == {"item": 1, "__bool__": 1, "__getitem__": 1, "__float__": 1, "tolist": 1}
    assert counter.excluded_count == 1


def test_host_sync_counter_ignores_the_optimizers_host_step_counter() -> None:
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.AdamW([p], lr=0.1, foreach=False)
    p.grad = torch.ones(3)
    with HostSyncCounter("cpu") as counter:
        opt.step()  # AdamW reads its step counter with .item(): a host tensor on a GPU too
        p.sum().item()
    assert counter.count == 1


# --- synthetic files ------------------------------------------------------------------------------------------


def test_synthetic_affectnet_csvs_read_back_through_the_real_reader(tmp_path: Path) -> None:
    sources = write_jpeg_sample(tmp_path / "src", 3, 32, seed=0)
    assert all(p.stat().st_size > 0 for p in sources)
    rel = link_tree(sources, tmp_path / "images", 150)
    assert len(set(rel)) == 150 and all((tmp_path / "images" / r).is_file() for r in rel)
    assert (tmp_path / "images" / rel[3]).read_bytes() == sources[0].read_bytes()  # links, in turn
    n_train, n_val = write_affectnet_csvs(tmp_path / "root", tmp_path / "images", rel, seed=1)
    assert (n_train, n_val) == (148, 2)
    lists = tmp_path / "root" / "Manually_Annotated_file_lists"
    with open(lists / "training.csv") as f:
        raw = list(csv.DictReader(f))
    with open(lists / "validation.csv") as f:
        raw += list(csv.DictReader(f))
    assert len(raw) == 150
    assert len(raw[0]["facial_landmarks"].split(";")) == 136
    kept = [r for r in raw if int(r["expression"]) < 8]
    assert all(float(r["valence"]) == -2.0 for r in raw if r["expression"] == "10")  # AffectNet's non-face marker
    records = read_records("affectnet", tmp_path / "root")
    assert len(records) == len(kept)  # ids 8-10 dropped by the reader
    assert sorted(records["path"]) == sorted("Manually_Annotated_Images/" + r["subDirectory_filePath"] for r in kept)
    assert records["expression"].value_counts().to_dict() == {
        int(k): v for k, v in zip(*np.unique([r["expression"] for r in kept], return_counts=True))
    }
    assert (records["split"] == "test").sum() == sum(1 for r in raw[-2:] if int(r["expression"]) < 8)
    assert records["landmarks"].map(lambda a: a.shape == (68, 2)).all()


def test_link_tree_copies_sources_past_the_link_cap(tmp_path: Path, monkeypatch) -> None:
    import fer_lightning.bench as bench

    monkeypatch.setattr(bench, "_MAX_LINKS", 4)  # a small cap stands in for ext4's 65,000
    monkeypatch.setattr(bench, "_FOLDER_SIZE", 5)
    source = write_jpeg_sample(tmp_path / "src", 1, 16, seed=0)
    rel = link_tree(source, tmp_path / "tree", 12)
    links = [os.stat(tmp_path / "tree" / r).st_nlink for r in rel]
    assert len(set(rel)) == 12 and max(links) <= 6  # each folder of 5 links to its own copy (5 + the copy itself)
    assert sorted({r.split("/")[0] for r in rel}) == ["0", "1", "2"]


# --- end to end, tiny -----------------------------------------------------------------------------------------

TINY = [
    "n_images=12",
    "source_size=64",
    "image_size=32",
    "batch_size=4",
    "warm_epochs=1",
    "workers=1",
    "train_steps=2",
    "train_warmup=1",
    "train_repeats=1",
    "growth_n=80",
    "rss_rows=300",
    "train_overrides=backbone=simple_cnn +backbone.widths=[4,4,4,4] data.image_size=16 data.batch_size=32 "
    "data.num_workers=0",
]

EXPECTED = [
    "data_naive_1w_img_s", "data_naive_all_img_s", "data_cold_1w_img_s", "data_cold_all_img_s",
    "data_warm_1w_img_s", "data_warm_all_img_s", "data_warm_augment_1w_img_s", "data_warm_augment_strong_1w_img_s",
    "data_warm_1w_host_normalize_img_s",
    "data_speedup_warm_vs_naive", "data_speedup_warm_vs_naive_host_normalize",
    "data_speedup_warm_vs_naive_all", "data_speedup_cold_vs_naive", "data_speedup_cold_vs_naive_all", "cache_mb",
    "jpeg_mb", "train_step_ms_lightning", "train_step_ms_plain", "lightning_overhead_pct",
    "train_step_ms_lightning_cpu_32", "host_syncs_per_step", "host_syncs_per_step_outside_losses",
    "epoch_time_s_n", "epoch_time_s_2n", "epoch_time_s_4n", "epoch_time_linearity_2n", "epoch_time_linearity",
    "peak_rss_mb_300", "records_read_300_s", "records_read_300_rows_per_s", "records_checks_300_s",
    "records_checks_300_rows_per_s", "datamodule_setup_300_s", "rss_baseline_mb", "bench_seconds",
    "small_gray48_train_img_s_1x48", "small_gray48_train_img_s_3x48", "small_gray48_train_img_s_1x64",
    "small_gray48_1ch_vs_3ch_speed", "data_warm_batch_augment_1w_img_s", "data_warm_batch_augment_strong_1w_img_s",
    "data_speedup_warm_batch_augment_vs_naive",
]  # fmt: skip


def test_tiny_bench_writes_every_figure(tmp_path: Path, capsys) -> None:
    out = tmp_path / "res" / "latest.json"
    assert main([f"output={out}", f"workdir={tmp_path / 'work'}", *TINY]) == 0
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    missing = [k for k in EXPECTED if k not in res]
    assert not missing, missing
    assert all(math.isfinite(res[k]) for k in EXPECTED)
    assert res["data_speedup_warm_vs_naive"] == pytest.approx(res["data_warm_1w_img_s"] / res["data_naive_1w_img_s"])
    assert res["data_speedup_cold_vs_naive"] == pytest.approx(res["data_cold_1w_img_s"] / res["data_naive_1w_img_s"])
    assert res["lightning_overhead_pct"] == pytest.approx(
        (res["train_step_ms_lightning"] / res["train_step_ms_plain"] - 1) * 100
    )
    assert res["data_speedup_warm_batch_augment_vs_naive"] == pytest.approx(
        res["data_warm_batch_augment_1w_img_s"] / res["data_naive_1w_img_s"]
    )
    assert res["small_gray48_1ch_vs_3ch_speed"] == pytest.approx(
        res["small_gray48_train_img_s_1x48"] / res["small_gray48_train_img_s_3x48"]
    )
    grow = res["details"]["growth"]
    n, t = grow["train_samples"], grow["later_epoch_s"]
    assert n[1] >= 1.8 * n[0] and n[2] >= 3.6 * n[0]  # about N, 2N, 4N
    assert res["epoch_time_linearity"] == pytest.approx((t[2] / n[2]) / (t[0] / n[0]))
    records = res["details"]["records"]["300"]
    assert records["rows"] == 300 and 0 < records["records"] < 300  # AffectNet's non-expression rows dropped
    assert res["records_read_300_rows_per_s"] == pytest.approx(300 / records["read_s"])
    # the module's logging path makes no sync; the losses' boolean masks do (reported, not hidden)
    assert res["host_syncs_per_step_outside_losses"] == 0
    assert res["host_syncs_per_step"] >= res["host_syncs_per_step_outside_losses"]
    m = res["machine"]
    assert m["cpu_count"] == os.cpu_count() and m["torch"] == torch.__version__ and m["gpu"] is None
    for key, goal in res["targets"].items():
        assert goal["value"] == res[key]
    assert res["targets"]["data_speedup_warm_vs_naive"]["pass"] == (res["data_speedup_warm_vs_naive"] >= 10)
    markdown = out.with_suffix(".md").read_text()
    assert all(f"`{k}`" in markdown for k in EXPECTED)
    assert "data_speedup_warm_vs_naive" in printed and str(out) in printed
    assert (tmp_path / "work" / "jpegs").is_dir()  # workdir= keeps the files
