"""The data checks: each check on real files in tmp_path, and each policy (error, warn, drop)."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fer_lightning.data.checks import DataCheckError, run_checks
from fer_lightning.data.records import make_records

CLASSES = [0, 1, 2, 3, 4, 5, 6, 7]
GOOD_LM = np.zeros((68, 2), dtype=np.float32)


def _jpeg_bytes(seed: int = 0, size: int = 64) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _write(root: Path, rel: str, data: bytes) -> None:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_bytes(data)


def _records(rows: list[dict]) -> pd.DataFrame:
    base = {"split": "train", "expression": 1, "valence": 0.1, "arousal": -0.1, "landmarks": None, "label_raw": "1"}
    df = pd.DataFrame([{**base, **r} for r in rows])
    df["landmarks"] = pd.Series([r.get("landmarks") for r in rows], dtype=object)
    return make_records(df)


@pytest.fixture
def data(tmp_path: Path):
    """A table where rows 0, 1 are fine and every other row has exactly one problem."""
    root = tmp_path / "root"
    for i in (0, 1, 6, 7, 8, 9, 11):
        _write(root, f"img/ok{i}.jpg", _jpeg_bytes(i))
    _write(root, "img/empty.jpg", b"")
    _write(root, "img/garbage.jpg", b"this is not an image")
    _write(root, "img/truncated.jpg", _jpeg_bytes(5)[:40])  # cut inside the header
    (tmp_path / "outside.jpg").write_bytes(_jpeg_bytes(6))
    rows = [
        {"path": "img/ok0.jpg", "landmarks": GOOD_LM},  # 0 fine
        {"path": "img/ok1.jpg", "split": "test"},  # 1 fine
        {"path": "img/missing.jpg"},  # 2 missing_file
        {"path": "img/empty.jpg"},  # 3 empty_file
        {"path": "img/garbage.jpg"},  # 4 undecodable
        {"path": "img/truncated.jpg"},  # 5 undecodable
        {"path": "img/ok6.jpg", "expression": None, "label_raw": "smirk"},  # 6 unknown_label
        {"path": "img/ok7.jpg", "expression": 42, "label_raw": "42"},  # 7 label_outside_taxonomy
        {"path": "img/ok8.jpg", "split": "val", "valence": 1.5},  # 8 va_out_of_range
        {"path": "img/ok9.jpg", "split": "val", "landmarks": np.zeros((67, 2), np.float32)},  # 9 landmarks
        {"path": "../outside.jpg"},  # 10 path_escapes_root
        {"path": "img/ok11.jpg", "split": "val", "expression": None, "label_raw": None},  # 11 null_expression
        {"path": None, "split": "test"},  # 12 null_path
    ]
    return root, _records(rows)


EXPECTED = {
    2: ["missing_file"],
    3: ["empty_file"],
    4: ["undecodable"],
    5: ["undecodable"],
    6: ["unknown_label"],
    7: ["label_outside_taxonomy"],
    8: ["va_out_of_range"],
    9: ["landmarks"],
    10: ["path_escapes_root"],
    11: ["null_expression"],
    12: ["null_path"],
}


def _by_row(report) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for issue in report.issues:
        out.setdefault(issue.row, []).append(issue.check)
    return out


def test_each_check_reports_exactly_its_rows(data):
    root, rec = data
    out, report = run_checks(rec, root, classes=CLASSES, policy="warn")
    assert _by_row(report) == EXPECTED
    assert report.counts == {
        "null_path": 1,
        "path_escapes_root": 1,
        "null_expression": 1,
        "unknown_label": 1,
        "label_outside_taxonomy": 1,
        "va_out_of_range": 1,
        "landmarks": 1,
        "missing_file": 1,
        "empty_file": 1,
        "undecodable": 2,
    }
    assert report.n_rows_in == report.n_rows_out == 13 and len(out) == 13
    reasons = report.to_frame().set_index(["row", "check"])["reason"]
    assert reasons[(9, "landmarks")] == "shape (67, 2), expected (68, 2)"
    assert "'smirk'" in reasons[(6, "unknown_label")]
    assert "42" in reasons[(7, "label_outside_taxonomy")]
    assert reasons[(2, "missing_file")] == "file not found"
    assert report.to_frame().loc[lambda f: f["row"] == 10, "path"].item() == "../outside.jpg"


def test_policy_drop_drops_exactly_the_offending_rows(data, caplog):
    root, rec = data
    with caplog.at_level(logging.WARNING):
        out, report = run_checks(rec, root, classes=CLASSES, policy="drop")
    assert out["path"].tolist() == ["img/ok0.jpg", "img/ok1.jpg"]
    assert out.index.tolist() == [0, 1]
    assert report.collapsed == [] and report.identical_files == []
    assert report.n_rows_out == 2 and report.offending_rows == sorted(EXPECTED)
    assert "dropped 11 rows" in caplog.text


def test_policy_warn_keeps_rows_and_logs_the_report(data, caplog):
    root, rec = data
    with caplog.at_level(logging.WARNING):
        out, _ = run_checks(rec, root, classes=CLASSES, policy="warn")
    pd.testing.assert_frame_equal(out, rec)
    assert "11 of 13 rows have problems" in caplog.text and "row 2: img/missing.jpg: missing_file" in caplog.text


def test_policy_error_lists_first_ten_and_names_the_setting(data):
    root, rec = data
    with pytest.raises(DataCheckError) as err:
        run_checks(rec, root, classes=CLASSES)
    msg = str(err.value)
    assert "11 of 13 rows have problems" in msg
    listed = [line for line in msg.splitlines() if line.startswith("  row ")]
    assert len(listed) == 10 and listed[0] == "  row 2: img/missing.jpg: missing_file: file not found"
    assert "and 1 more" in msg  # 11 issues on 11 rows
    assert "data.checks=warn" in msg and "data.checks=drop" in msg and "error|warn|drop" in msg
    assert "conflicting_label" not in msg  # its hint only comes with such rows
    assert len(err.value.report.issues) == 11


def test_clean_table_passes_unchanged(data):
    root, rec = data
    clean = rec.iloc[:2]
    out, report = run_checks(clean, root, classes=CLASSES)
    assert report.issues == [] and report.counts == {} and len(out) == 2
    assert "all 2 rows passed" in report.to_text()


def test_truncated_pixel_data_needs_full_decode(tmp_path):
    data = _jpeg_bytes(1)
    _write(tmp_path, "cut.jpg", data[: len(data) - 200])  # header intact, scan data cut
    rec = _records([{"path": "cut.jpg"}])
    _, header = run_checks(rec, tmp_path, classes=CLASSES, policy="warn", decode="header")
    _, full = run_checks(rec, tmp_path, classes=CLASSES, policy="warn", decode="full")
    _, none = run_checks(rec, tmp_path, classes=CLASSES, policy="warn", decode="none")
    assert header.issues == [] and none.issues == []
    assert [(i.row, i.check) for i in full.issues] == [(0, "undecodable")]
    assert "truncated" in full.issues[0].reason


def test_decode_none_still_finds_missing_and_empty(tmp_path):
    _write(tmp_path, "garbage.jpg", b"abc")
    _write(tmp_path, "empty.jpg", b"")
    rec = _records([{"path": "garbage.jpg"}, {"path": "empty.jpg"}, {"path": "gone.jpg"}])
    _, report = run_checks(rec, tmp_path, classes=CLASSES, policy="warn", decode="none")
    assert [(i.row, i.check) for i in report.issues] == [(1, "empty_file"), (2, "missing_file")]


def test_va_marker_is_a_note_unless_va_is_trained(tmp_path):
    for i in range(4):
        _write(tmp_path, f"a{i}.jpg", _jpeg_bytes(i))
    rec = _records(
        [
            {"path": "a0.jpg", "valence": -2.0, "arousal": -2.0},
            {"path": "a1.jpg", "split": "test"},
            {"path": "a2.jpg", "split": "val", "valence": None, "arousal": 0.3},
            {"path": "a3.jpg", "split": "val", "valence": -1.0001},
        ]
    )
    _, report = run_checks(rec.iloc[[0, 1, 3]], tmp_path, classes=CLASSES, policy="warn")
    assert [(i.row, i.check) for i in report.issues] == [(3, "va_out_of_range")]
    assert report.notes == {"va_nonface_marker": 1}
    _, trained = run_checks(rec.iloc[[0, 1, 2]], tmp_path, classes=CLASSES, policy="warn", va_required=True)
    assert [(i.row, i.check) for i in trained.issues] == [(0, "va_nonface_marker"), (2, "va_missing")]
    assert trained.notes == {}


def test_canonical_class_outside_subset_is_not_an_error(tmp_path):
    for i in range(3):
        _write(tmp_path, f"a{i}.jpg", _jpeg_bytes(i))
    rec = _records(
        [
            {"path": "a0.jpg", "expression": 7},
            {"path": "a1.jpg", "expression": 1, "split": "test"},
            {"path": "a2.jpg", "expression": 11, "split": "val"},
        ]
    )
    _, report = run_checks(rec, tmp_path, classes=[0, 1], policy="warn")
    assert [(i.row, i.check) for i in report.issues] == [(2, "label_outside_taxonomy")]
    assert report.notes == {"label_not_in_classes": 1}
    # a data-set specific class (id 11) known to the taxonomy is fine
    _, with_extra = run_checks(rec, tmp_path, classes=[0, 1], policy="warn", known_ids=[*range(11), 11])
    assert with_extra.issues == [] and with_extra.notes == {"label_not_in_classes": 2}


def test_label_checks_skipped_when_no_classes_are_trained(tmp_path):
    _write(tmp_path, "a.jpg", _jpeg_bytes())
    rec = _records([{"path": "a.jpg", "expression": None, "label_raw": None}])
    _, report = run_checks(rec, tmp_path, classes=[], policy="error")
    assert report.issues == []


def test_bad_landmark_kinds(tmp_path):
    _write(tmp_path, "a.jpg", _jpeg_bytes())
    nan_lm = GOOD_LM.copy()
    nan_lm[3, 1] = np.nan
    rec = _records(
        [
            {"path": "a.jpg", "landmarks": GOOD_LM},
            {"path": "a.jpg", "split": "val", "landmarks": nan_lm},
            {"path": "a.jpg", "split": "test", "landmarks": np.zeros(136, np.float32)},
        ]
    )
    _, report = run_checks(rec, tmp_path, classes=CLASSES, policy="warn")
    assert [(i.row, i.reason) for i in report.issues] == [
        (1, "non-finite coordinates"),
        (2, "shape (136,), expected (68, 2)"),
    ]


def test_absolute_path_inside_root_is_fine_outside_is_not(tmp_path):
    root = tmp_path / "r"
    _write(root, "a.jpg", _jpeg_bytes())
    _write(tmp_path, "b.jpg", _jpeg_bytes())
    rec = _records(
        [
            {"path": str(root / "a.jpg")},
            {"path": str(tmp_path / "b.jpg"), "split": "test"},
            {"path": "sub/../../b.jpg", "split": "val"},
            {"path": "sub/../a.jpg", "split": "val"},
        ]
    )
    _, report = run_checks(rec, root, classes=CLASSES, policy="warn")
    assert [(i.row, i.check) for i in report.issues] == [(1, "path_escapes_root"), (2, "path_escapes_root")]


def test_many_files_through_the_thread_pool(tmp_path):
    """More files than one worker chunk; the missing ones are found wherever they fall."""
    data = _jpeg_bytes(0, size=8)
    rows = []
    for i in range(700):
        if i % 97 != 5:
            _write(tmp_path, f"f/{i}.jpg", data)
        rows.append({"path": f"f/{i}.jpg"})
    _, report = run_checks(_records(rows), tmp_path, classes=CLASSES, policy="warn", workers=4)
    assert [i.row for i in report.issues] == [i for i in range(700) if i % 97 == 5]


def test_bad_settings_and_schema(data):
    root, rec = data
    with pytest.raises(ValueError, match=r"data.checks: 'ignore' is not one of error\|warn\|drop"):
        run_checks(rec, root, classes=CLASSES, policy="ignore")
    with pytest.raises(ValueError, match="decode"):
        run_checks(rec, root, classes=CLASSES, decode="pixels")
    with pytest.raises(DataCheckError, match=r"missing columns \['landmarks'\]"):
        run_checks(rec.drop(columns="landmarks"), root, classes=CLASSES)
    wrong = rec.assign(expression=rec["expression"].astype("float64"))
    with pytest.raises(DataCheckError, match="expression is float64, expected Int64"):
        run_checks(wrong, root, classes=CLASSES)


def test_report_text_truncates(data):
    root, rec = data
    _, report = run_checks(rec, root, classes=CLASSES, policy="warn")
    text = report.to_text(max_rows=3)
    assert text.count("\n  row ") == 3 and "and 8 more" in text


# ------------------------------------------------------------------------------------------------- duplicates
def _legend_like(root: Path) -> pd.DataFrame:
    """10 distinct images, then 8 rows that repeat an earlier row (same image, label and split), as in a
    legend.csv listing some images twice; plus rows that look alike but are other samples."""
    for i in range(10):
        _write(root, f"images/{i}.jpg", _jpeg_bytes(i))
    rows = [{"path": f"images/{i}.jpg", "expression": i % 3, "label_raw": ["neutral", "HAPPINESS", "sadness"][i % 3]}
            for i in range(10)]  # fmt: skip
    repeats = [0, 1, 2, 3, 3, 4, 5, 9]  # image 3 three times
    rows += [dict(rows[i]) for i in repeats]
    rows[12]["path"] = "images/./2.jpg"  # the same file, spelled differently
    rows[13]["label_raw"] = "Neutral"  # another spelling of the same class: the same label
    rows += [
        {**rows[6], "split": "test"},  # 18: same file and label in another split: a leak, not a repeat
        {**rows[7], "face_x": 1.0, "face_y": 1.0, "face_w": 20.0, "face_h": 20.0},  # 19: another face box
    ]
    return _records(rows)


COLLAPSED = [(10, 0), (11, 1), (12, 2), (13, 3), (14, 3), (15, 4), (16, 5), (17, 9)]


@pytest.mark.parametrize("policy", ["error", "warn", "drop"])
def test_exact_duplicate_rows_are_collapsed_whatever_the_policy(tmp_path, caplog, policy):
    rec = _legend_like(tmp_path)
    with caplog.at_level(logging.WARNING):
        out, report = run_checks(rec, tmp_path, classes=CLASSES, policy=policy)
    assert [(row, kept) for row, kept, _ in report.collapsed] == COLLAPSED
    assert report.collapsed[2] == (12, 2, "images/./2.jpg")
    assert report.issues == [] and report.n_rows_in == 20 and report.n_rows_out == 12
    assert out["path"].tolist() == [*(f"images/{i}.jpg" for i in range(10)), "images/6.jpg", "images/7.jpg"]
    assert out["split"].tolist() == ["train"] * 10 + ["test", "train"]
    text = report.to_text()
    assert "collapsed 8 exact duplicate rows (same file, face box, label and split as an earlier row" in text
    assert "  row 10: images/0.jpg: same as row 0" in text and "  row 17: images/9.jpg: same as row 9" in text
    assert "rows kept: 12 of 20" in text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "collapsed 8 exact duplicate rows" in warnings[0].getMessage()
    assert "row 13: images/3.jpg: same as row 3" in warnings[0].getMessage()


def test_collapsed_rows_are_listed_up_to_max_rows(tmp_path):
    _, report = run_checks(_legend_like(tmp_path), tmp_path, classes=CLASSES)
    text = report.to_text(max_rows=3)
    assert text.count("same as row") == 3 and "  and 5 more" in text


def _conflicts(root: Path) -> pd.DataFrame:
    for name in ("a", "b", "c"):
        _write(root, f"img/{name}.jpg", _jpeg_bytes(ord(name)))
    no_va = {"valence": np.float32("nan"), "arousal": np.float32("nan")}
    return _records(
        [
            {"path": "img/a.jpg", "expression": 1, "label_raw": "happy"},  # 0 a: happy ...
            {"path": "img/b.jpg", "expression": 1, "label_raw": "happy"},  # 1 fine
            {"path": "img/a.jpg", "expression": 2, "label_raw": "sad"},  # 2 ... and sad
            {"path": "img/c.jpg", "expression": 3, "label_raw": "surprise"},  # 3 c: surprise (train) ...
            {"path": "img/c.jpg", "expression": 3, "label_raw": "surprise", "split": "test"},  # 4 (test) ...
            {"path": "img/c.jpg", "expression": 4, "label_raw": "fear", "split": "val"},  # 5 ... and fear
            {"path": "img/a.jpg", "expression": 2, "label_raw": "sad"},  # 6 repeats row 2: collapsed first
        ]
    ).assign(**no_va)


def test_conflicting_labels_are_an_error_naming_file_rows_labels_and_key(tmp_path):
    with pytest.raises(DataCheckError) as err:
        run_checks(_conflicts(tmp_path), tmp_path, classes=CLASSES)
    msg = str(err.value)
    assert "5 of 7 rows have problems (conflicting_label: 5)" in msg
    assert (
        "  row 0: img/a.jpg: conflicting_label: 2 rows of this file have different labels: "
        "row 0 (train): happy (class 1); row 2 (train): sad (class 2)"
    ) in msg
    assert "row 3 (train): surprise (class 3); row 4 (test): surprise (class 3); row 5 (val): fear (class 4)" in msg
    assert "data.checks=warn keeps the rows with the label of the file's first row" in msg
    assert "data.checks=drop drops every row of such a file" in msg
    report = err.value.report
    assert [(i.row, i.check) for i in report.issues] == [(r, "conflicting_label") for r in (0, 2, 3, 4, 5)]
    assert [(row, kept) for row, kept, _ in report.collapsed] == [(6, 2)]


def test_conflicting_labels_warn_keeps_the_first_label_drop_drops_the_file(tmp_path, caplog):
    rec = _conflicts(tmp_path)
    with caplog.at_level(logging.WARNING):
        warned, report = run_checks(rec, tmp_path, classes=CLASSES, policy="warn")
    # a: row 0 (happy) stays, row 2 (sad) goes; c: rows 3 and 4 (surprise, train and test) stay, row 5 (fear) goes
    assert warned["path"].tolist() == ["img/a.jpg", "img/b.jpg", "img/c.jpg", "img/c.jpg"]
    assert warned["expression"].tolist() == [1, 1, 3, 3] and warned["split"].tolist() == ["train"] * 3 + ["test"]
    assert report.n_rows_out == 4 and report.counts == {"conflicting_label": 5}
    assert "except 2 rows with another label than their file's first row" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        dropped, report = run_checks(rec, tmp_path, classes=CLASSES, policy="drop")
    assert dropped["path"].tolist() == ["img/b.jpg"] and report.n_rows_out == 1
    assert "dropped 5 rows, 5 of them rows of files with conflicting labels" in caplog.text
    assert "collapsed 1 exact duplicate rows" in caplog.text


def _bmp_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, "BMP")
    return buf.getvalue()


@pytest.mark.parametrize("prefix", [None, 8])
def test_byte_identical_files_are_a_note_not_an_error(tmp_path, monkeypatch, prefix):
    """As in AffectNet's validation set: 7 byte-identical pairs under different names, 3 with other labels.

    prefix=8: the BMP headers agree, so files whose first bytes agree are then hashed whole."""
    import fer_lightning.data.checks as checks

    if prefix is not None:
        monkeypatch.setattr(checks, "HASH_PREFIX_BYTES", prefix)

    rows = []
    for i in range(7):
        data = _bmp_bytes(i)  # every BMP has the same size: only the hash tells them apart
        _write(tmp_path, f"val/{i}.bmp", data)
        _write(tmp_path, f"val/copy_{i}.bmp", data)
        rows.append({"path": f"val/{i}.bmp", "expression": 1, "label_raw": None})
        rows.append({"path": f"val/copy_{i}.bmp", "expression": 2 if i in (1, 4, 5) else 1, "label_raw": None})
    for i in range(7, 10):
        _write(tmp_path, f"val/{i}.bmp", _bmp_bytes(i))
        rows.append({"path": f"val/{i}.bmp", "label_raw": None})
    _write(tmp_path, "val/big.jpg", _jpeg_bytes(0, size=32))  # a size no other file has: never hashed
    rows.append({"path": "val/big.jpg", "label_raw": None})
    hashed, whole = [], []
    digest = checks._digest

    def counting(path, limit=None):
        (hashed if limit is not None else whole).append(path)
        return digest(path, limit)

    monkeypatch.setattr(checks, "_digest", counting)

    out, report = run_checks(_records(rows), tmp_path, classes=CLASSES, policy="error")

    assert report.issues == [] and len(out) == 18
    assert len(hashed) == 17 and not any(p.endswith("big.jpg") for p in hashed)
    assert len(whole) == (0 if prefix is None else 17)  # the 246-byte BMPs fit in the default prefix
    pairs = [(p.first, p.other, p.same_label) for p in report.identical_files]
    assert pairs == [(f"val/{i}.bmp", f"val/copy_{i}.bmp", i not in (1, 4, 5)) for i in range(7)]
    text = report.to_text()
    assert "byte-identical files under different names: 7 pairs, 3 with different labels" in text
    listed = [line for line in text.splitlines() if line.startswith("  val/")]
    va = "valence 0.1, arousal -0.1"
    assert listed[0] == f"  val/1.bmp (happy (class 1), {va}) = val/copy_1.bmp (sad (class 2), {va}): different labels"
    assert [line.endswith("different labels") for line in listed] == [True] * 3 + [False] * 4
    # no file is read beyond its header without decoding, so decode=none does not look for them
    hashed.clear()
    whole.clear()
    _, none = run_checks(_records(rows), tmp_path, classes=CLASSES, decode="none")
    assert none.identical_files == [] and hashed == whole == []
    # above the size cap nothing is hashed
    monkeypatch.setattr(checks, "HASH_MAX_BYTES", 100)
    _, capped = run_checks(_records(rows), tmp_path, classes=CLASSES)
    assert capped.identical_files == [] and hashed == whole == []


def test_legend_csv_with_repeated_rows_loads_under_the_default_policy(make_cfg, tmp_path):
    """Issue 10: a legend.csv in which 8 rows repeat an earlier row stopped under data.checks=error."""
    from layouts import write_legend_csv

    from fer_lightning.data.datamodule import FERDataModule

    root = tmp_path / "legend"
    write_legend_csv(root, [("neutral", "happiness", "sadness", "surprise")[i % 4] for i in range(40)])
    legend = root / "data" / "legend.csv"
    lines = legend.read_text().splitlines()
    legend.write_text("\n".join([*lines, *(lines[1 + i] for i in (0, 1, 2, 3, 3, 10, 20, 39))]) + "\n")
    cfg = make_cfg("data=legend_csv", f"data.root={root}", "data.classes=[neutral,happy,sad,surprise]",
                   "data.leakage.policy=off", "logger=none")  # fmt: skip
    assert cfg.data.checks == "error"
    dm = FERDataModule(cfg.data, seed=0, cache_dir=cfg.paths.cache_dir)
    dm.records = dm.load_records()
    assert len(dm.records) == 40 and not dm.records["path"].duplicated().any()
    report = dm.check_report
    assert report.issues == [] and (report.n_rows_in, report.n_rows_out) == (48, 40)
    assert [(row, kept) for row, kept, _ in report.collapsed] == [
        (40, 0), (41, 1), (42, 2), (43, 3), (44, 3), (45, 10), (46, 20), (47, 39)
    ]  # fmt: skip
    dm.write_artifacts(tmp_path / "data")
    text = (tmp_path / "data" / "checks.txt").read_text()
    assert "collapsed 8 exact duplicate rows" in text and "  row 47: images/face_039.jpg: same as row 39" in text
