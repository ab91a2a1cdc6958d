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
    for i in range(2):
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
        {"path": "img/ok0.jpg", "expression": None, "label_raw": "smirk"},  # 6 unknown_label (+ duplicate)
        {"path": "img/ok1.jpg", "expression": 42, "label_raw": "42"},  # 7 label_outside_taxonomy
        {"path": "img/ok1.jpg", "split": "val", "valence": 1.5},  # 8 va_out_of_range
        {"path": "img/./ok1.jpg", "split": "val", "landmarks": np.zeros((67, 2), np.float32)},  # 9 landmarks + dup
        {"path": "../outside.jpg"},  # 10 path_escapes_root
        {"path": "img/ok0.jpg", "split": "val", "expression": None, "label_raw": None},  # 11 null_expression
        {"path": None, "split": "test"},  # 12 null_path
    ]
    return root, _records(rows)


EXPECTED = {
    2: ["missing_file"],
    3: ["empty_file"],
    4: ["undecodable"],
    5: ["undecodable"],
    6: ["duplicate", "unknown_label"],
    7: ["label_outside_taxonomy"],
    8: ["va_out_of_range"],
    9: ["duplicate", "landmarks"],
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
        "duplicate": 2,
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
    assert reasons[(6, "duplicate")] == "same file as row 0 in split train"
    assert reasons[(9, "duplicate")] == "same file as row 8 in split val"  # img/./ok1.jpg is img/ok1.jpg
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
    assert "and 3 more" in msg  # 13 issues on 11 rows
    assert "data.checks=warn" in msg and "data.checks=drop" in msg and "error|warn|drop" in msg
    assert len(err.value.report.issues) == 13


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
    _write(tmp_path, "a.jpg", _jpeg_bytes())
    rec = _records(
        [
            {"path": "a.jpg", "valence": -2.0, "arousal": -2.0},
            {"path": "a.jpg", "split": "test"},
            {"path": "a.jpg", "split": "val", "valence": None, "arousal": 0.3},
            {"path": "a.jpg", "split": "val", "valence": -1.0001},
        ]
    )
    _, report = run_checks(rec.iloc[[0, 1, 3]], tmp_path, classes=CLASSES, policy="warn")
    assert [(i.row, i.check) for i in report.issues] == [(3, "va_out_of_range")]
    assert report.notes == {"va_nonface_marker": 1}
    _, trained = run_checks(rec.iloc[[0, 1, 2]], tmp_path, classes=CLASSES, policy="warn", va_required=True)
    assert [(i.row, i.check) for i in trained.issues] == [(0, "va_nonface_marker"), (2, "va_missing")]
    assert trained.notes == {}


def test_canonical_class_outside_subset_is_not_an_error(tmp_path):
    _write(tmp_path, "a.jpg", _jpeg_bytes())
    rec = _records(
        [
            {"path": "a.jpg", "expression": 7},
            {"path": "a.jpg", "expression": 1, "split": "test"},
            {"path": "a.jpg", "expression": 11, "split": "val"},
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
    assert text.count("\n  row ") == 3 and "and 10 more" in text
