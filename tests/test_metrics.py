"""The metric suite against scikit-learn, the krippendorff package, numpy and hand computations."""

from __future__ import annotations

import json
import math
import os
import socket
import warnings

import krippendorff
import numpy as np
import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.preprocessing import label_binarize

from fer_lightning.metrics import (
    AGGREGATE_KEYS,
    VA_KEYS,
    ExpressionMetricSuite,
    VAMetricSuite,
    confusion_matrix,
    expression_metrics,
    group_metrics,
    krippendorff_alpha,
    skew_weights,
    va_metrics,
)


def _scores(target: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
    """Probabilities that lean towards the true class, so metrics are neither trivial nor chance."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(target), num_classes))
    logits[np.arange(len(target)), target] += 1.2
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture
def imbalanced() -> tuple[np.ndarray, np.ndarray]:
    target = np.repeat(np.arange(4), [40, 20, 10, 5])
    return _scores(target, 4, seed=1), target


def _independent_weights(target: np.ndarray) -> np.ndarray:
    """Skew weights written differently from the library: 1 / class frequency, rescaled."""
    classes, counts = np.unique(target, return_counts=True)
    freq = dict(zip(classes.tolist(), counts.tolist()))
    return np.array([1.0 / freq[t] for t in target.tolist()])


def _assert_same(a: dict[str, float], b: dict[str, float]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-12, abs=1e-12, nan_ok=True), k


# --------------------------------------------------------------------------------------------- orig and norm


def test_orig_metrics_match_sklearn(imbalanced):
    probs, target = imbalanced
    pred = probs.argmax(1)
    m = expression_metrics(probs, target)
    assert m["accuracy"] == pytest.approx(accuracy_score(target, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(target, pred))
    assert m["f1_macro"] == pytest.approx(f1_score(target, pred, average="macro"))
    assert m["f1_weighted"] == pytest.approx(f1_score(target, pred, average="weighted"))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(target, pred))
    assert m["auc"] == pytest.approx(roc_auc_score(target, probs, multi_class="ovr", average="macro"))
    onehot = label_binarize(target, classes=range(4))
    assert m["aucpr"] == pytest.approx(average_precision_score(onehot, probs, average="macro"))
    assert 0.3 < m["accuracy"] < 0.95  # the fixture is informative, not degenerate


def test_norm_metrics_match_sklearn_with_sample_weight(imbalanced):
    probs, target = imbalanced
    pred = probs.argmax(1)
    w = _independent_weights(target)
    m = expression_metrics(probs, target)
    assert m["accuracy_norm"] == pytest.approx(accuracy_score(target, pred, sample_weight=w))
    assert m["balanced_accuracy_norm"] == pytest.approx(balanced_accuracy_score(target, pred, sample_weight=w))
    assert m["f1_macro_norm"] == pytest.approx(f1_score(target, pred, average="macro", sample_weight=w))
    assert m["f1_weighted_norm"] == pytest.approx(f1_score(target, pred, average="weighted", sample_weight=w))
    assert m["kappa_norm"] == pytest.approx(cohen_kappa_score(target, pred, sample_weight=w))
    assert m["auc_norm"] == pytest.approx(
        roc_auc_score(target, probs, multi_class="ovr", average="macro", sample_weight=w)
    )
    onehot = label_binarize(target, classes=range(4))
    assert m["aucpr_norm"] == pytest.approx(average_precision_score(onehot, probs, average="macro", sample_weight=w))
    # With equal class weight, accuracy is the mean recall.
    assert m["accuracy_norm"] == pytest.approx(m["balanced_accuracy"])
    # On imbalanced data the two variants differ, so the test above can tell them apart.
    assert m["accuracy_norm"] != pytest.approx(m["accuracy"])


def test_norm_equals_orig_metrics_of_physically_rebalanced_copy():
    target = np.repeat(np.arange(4), [6, 3, 2, 1])
    probs = _scores(target, 4, seed=7)
    repeats = 6 // np.bincount(target)[target]  # every class replicated up to 6 rows
    copy_probs, copy_target = np.repeat(probs, repeats, axis=0), np.repeat(target, repeats)
    assert np.bincount(copy_target).tolist() == [6, 6, 6, 6]
    original, copy = expression_metrics(probs, target), expression_metrics(copy_probs, copy_target)
    for key in AGGREGATE_KEYS:
        assert original[f"{key}_norm"] == pytest.approx(copy[key], rel=1e-12), key


def test_norm_equals_orig_on_balanced_set():
    target = np.repeat(np.arange(3), 7)
    m = expression_metrics(_scores(target, 3, seed=3), target)
    for key in AGGREGATE_KEYS:
        assert m[f"{key}_norm"] == pytest.approx(m[key], rel=1e-12), key


def test_skew_weights_hand_values():
    w = skew_weights(np.array([0, 0, 0, 1, 2, 2]))
    np.testing.assert_allclose(w, [1, 1, 1, 3, 1.5, 1.5])
    assert skew_weights(np.zeros(0, dtype=int)).shape == (0,)


# --------------------------------------------------------------------------------------------- alpha


def test_alpha_matches_krippendorff_package_unweighted():
    rng = np.random.default_rng(5)
    for num_classes in (2, 3, 8):
        truth = rng.integers(0, num_classes, 200)
        pred = np.where(rng.random(200) < 0.6, truth, rng.integers(0, num_classes, 200))
        expected = krippendorff.alpha(reliability_data=np.stack([pred, truth]), level_of_measurement="nominal")
        assert krippendorff_alpha(pred, truth) == pytest.approx(expected, rel=1e-10)
        probs = np.eye(num_classes)[pred] * 0.9 + 0.1 / num_classes
        assert expression_metrics(probs, truth)["alpha"] == pytest.approx(expected, rel=1e-10)


def test_alpha_hand_computation():
    pred, truth = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 1])
    # Coincidences o00=2, o01=o10=1, o11=4; n0=3, n1=5, n=8: alpha = 1 - 7 * 2 / (2 * 3 * 5).
    assert krippendorff_alpha(pred, truth) == pytest.approx(1 - 14 / 30)
    # Weight 2 on the first unit = the unit twice: n0=n1=5, n=10: 1 - 9 * 2 / 50.
    assert krippendorff_alpha(pred, truth, np.array([2.0, 1, 1, 1])) == pytest.approx(1 - 18 / 50)
    replicated = krippendorff.alpha(
        reliability_data=np.array([[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]), level_of_measurement="nominal"
    )
    assert replicated == pytest.approx(1 - 18 / 50)
    # Fractional weights: o00=2, o01=o10=0.5, o11=2; n0=n1=2.5, n=5: 1 - 4 * 1 / 12.5.
    assert krippendorff_alpha(pred, truth, np.array([1.0, 0.5, 0.5, 0.5])) == pytest.approx(1 - 4 / 12.5)


def test_alpha_undefined_without_variation_is_nan():
    assert math.isnan(krippendorff_alpha(np.array([2, 2]), np.array([2, 2])))


# --------------------------------------------------------------------------------------------- per class, edge cases


def test_per_class_match_sklearn_and_absent_class_is_nan():
    target = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    pred = np.array([0, 1, 3, 1, 1, 2, 0, 3])  # class 3 predicted but absent from target
    probs = np.eye(4)[pred] * 0.7 + 0.075
    m = expression_metrics(probs, target, class_names=["neutral", "happy", "sad", "contempt"])
    p, r, f, _ = precision_recall_fscore_support(target, pred, labels=[0, 1, 2], zero_division=0)
    for c, name in enumerate(["neutral", "happy", "sad"]):
        assert m[f"precision/{name}"] == pytest.approx(p[c])
        assert m[f"recall/{name}"] == pytest.approx(r[c])
        assert m[f"f1/{name}"] == pytest.approx(f[c])
    assert m["precision/contempt"] == 0.0  # two predictions, both wrong
    assert math.isnan(m["recall/contempt"]) and math.isnan(m["f1/contempt"])
    # Macro averages run over the classes present in target.
    assert m["f1_macro"] == pytest.approx(f1_score(target, pred, labels=[0, 1, 2], average="macro"))
    assert m["balanced_accuracy"] == pytest.approx(np.mean(r))


def test_absent_class_skipped_in_auc_without_warnings():
    target = np.repeat([0, 1, 2, 3], [8, 5, 4, 3])  # 5 classes, class 4 never occurs
    probs = _scores(target, 5, seed=11)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = expression_metrics(probs, target)
    aucs = [roc_auc_score(target == c, probs[:, c]) for c in range(4)]
    aps = [average_precision_score(target == c, probs[:, c]) for c in range(4)]
    assert m["auc"] == pytest.approx(np.mean(aucs))
    assert m["aucpr"] == pytest.approx(np.mean(aps))
    assert all(np.isfinite(m[k]) for k in AGGREGATE_KEYS)


def test_two_classes():
    target = np.array([0, 0, 0, 0, 1, 1, 1, 0, 1, 0])
    probs = _scores(target, 2, seed=2)
    m = expression_metrics(probs, target)
    assert m["auc"] == pytest.approx(roc_auc_score(target, probs[:, 1]))
    assert m["kappa"] == pytest.approx(cohen_kappa_score(target, probs.argmax(1)))


def test_single_class_target_gives_nan_not_crash():
    probs = np.array([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = expression_metrics(probs, np.array([0, 0, 0]))
    assert m["accuracy"] == pytest.approx(2 / 3)
    assert math.isnan(m["auc"]) and math.isnan(m["aucpr"])
    assert m["kappa"] == pytest.approx(0.0)  # one rater varies: kappa is defined and 0


def test_empty_input_gives_nan_dict():
    m = expression_metrics(np.zeros((0, 3)), np.zeros(0, dtype=int), class_names=["a", "b", "c"])
    assert "accuracy_norm" in m and "f1/c" in m
    assert all(math.isnan(v) for v in m.values())


def test_bad_input_is_rejected_with_a_clear_message():
    probs = np.full((3, 3), 1 / 3)
    with pytest.raises(ValueError, match="missing label"):
        expression_metrics(probs, np.array([0, -1, 2]))
    with pytest.raises(ValueError, match="outside"):
        expression_metrics(probs, np.array([0, 1, 3]))
    with pytest.raises(ValueError, match="rows"):
        expression_metrics(probs, np.array([0, 1]))
    with pytest.raises(ValueError, match="NaN"):
        expression_metrics(np.full((1, 3), np.nan), np.array([0]))
    with pytest.raises(ValueError, match="class_names"):
        expression_metrics(probs, np.array([0, 1, 2]), class_names=["a"])


def test_confusion_matrix_matches_sklearn():
    target = np.array([0, 0, 1, 1, 1, 2])
    probs = np.eye(4)[[0, 1, 1, 1, 0, 2]]
    cm = confusion_matrix(probs, target, 4)
    np.testing.assert_array_equal(cm, sk_confusion_matrix(target, probs.argmax(1), labels=range(4)))
    normed = confusion_matrix(probs, target, 4, normalize="true")
    np.testing.assert_allclose(normed[:3], [[0.5, 0.5, 0, 0], [1 / 3, 2 / 3, 0, 0], [0, 0, 1, 0]])
    np.testing.assert_array_equal(normed[3], [0, 0, 0, 0])  # class without samples: zeros, not NaN
    with pytest.raises(ValueError, match="normalize"):
        confusion_matrix(probs, target, 4, normalize="all")


# --------------------------------------------------------------------------------------------- valence / arousal


def _va_reference(p: np.ndarray, t: np.ndarray) -> tuple[float, float, float, float]:
    rmse = np.sqrt(np.mean((p - t) ** 2))
    corr = np.corrcoef(p, t)[0, 1]
    sagr = np.mean(np.sign(p) == np.sign(t))
    cov = np.cov(p, t, bias=True)[0, 1]
    ccc = 2 * cov / (np.var(p) + np.var(t) + (p.mean() - t.mean()) ** 2)
    return rmse, corr, sagr, ccc


def test_va_metrics_match_numpy_with_nan_masking():
    rng = np.random.default_rng(4)
    target = rng.uniform(-1, 1, size=(30, 2))
    pred = np.clip(target * 0.6 + rng.normal(scale=0.3, size=(30, 2)), -1, 1)
    target[[1, 5, 9], 0] = np.nan  # valence missing on three rows
    target[[2, 5], 1] = np.nan
    m = va_metrics(pred, target)
    assert list(m) == list(VA_KEYS)
    for j, dim in enumerate(("valence", "arousal")):
        ok = ~np.isnan(target[:, j])
        rmse, corr, sagr, ccc = _va_reference(pred[ok, j], target[ok, j])
        assert m[f"rmse_{dim}"] == pytest.approx(rmse)
        assert m[f"corr_{dim}"] == pytest.approx(corr)
        assert m[f"sagr_{dim}"] == pytest.approx(sagr)
        assert m[f"ccc_{dim}"] == pytest.approx(ccc)


def test_va_metrics_hand_values_and_undefined_cases():
    pred = np.array([[0.5, 0.2], [-0.5, np.nan]])  # NaN pred where the target is missing is fine
    target = np.array([[0.5, 0.4], [0.5, np.nan]])
    m = va_metrics(pred, target)
    assert m["rmse_valence"] == pytest.approx(math.sqrt(0.5))
    assert m["sagr_valence"] == pytest.approx(0.5)
    assert math.isnan(m["corr_valence"])  # constant target
    assert m["ccc_valence"] == pytest.approx(0.0)  # cov 0, denominator 0.25 + 0 + 0.25
    assert m["rmse_arousal"] == pytest.approx(0.2) and m["sagr_arousal"] == 1.0
    assert math.isnan(m["corr_arousal"]) and m["ccc_arousal"] == 0.0  # one sample: no covariance
    assert all(math.isnan(v) for v in va_metrics(np.zeros((0, 2)), np.zeros((0, 2))).values())
    with pytest.raises(ValueError, match="valence"):
        va_metrics(np.array([[np.nan, 0.0]]), np.array([[0.1, 0.0]]))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        va_metrics(np.zeros((3, 3)), np.zeros((3, 3)))


# --------------------------------------------------------------------------------------------- torchmetrics suites


def test_expression_suite_equals_numpy_and_ignores_missing_targets():
    torch.manual_seed(0)
    target = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 1, 2, 2, 0])
    logits = torch.randn(12, 3) + 2 * torch.nn.functional.one_hot(target, 3)
    index = torch.arange(12)
    suite = ExpressionMetricSuite(3, class_names=["neutral", "happy", "sad"])
    for rows in (slice(0, 5), slice(5, 12)):
        suite.update(logits[rows], target[rows], index[rows])
    suite.update(torch.randn(2, 3), torch.tensor([-1, -1]), torch.tensor([100, 101]))  # unlabelled: ignored
    expected = expression_metrics(
        torch.softmax(logits, 1).numpy(), target.numpy(), class_names=["neutral", "happy", "sad"]
    )
    _assert_same(suite.compute(), expected)


def test_expression_suite_accepts_probabilities_unchanged():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8], [0.9, 0.1]])
    target = torch.tensor([0, 0, 1, 1])
    suite = ExpressionMetricSuite(2)
    suite.update(probs, target, torch.arange(4))
    _assert_same(suite.compute(), expression_metrics(probs.numpy(), target.numpy()))


def test_expression_suite_dedups_padded_samples():
    torch.manual_seed(1)
    target = torch.tensor([0, 1, 2, 1, 0, 2, 2])
    logits = torch.randn(7, 3)
    expected = expression_metrics(torch.softmax(logits, 1).numpy(), target.numpy())
    # DistributedSampler pads the last rank by repeating samples; the same rows come back a second time.
    rank0, rank1 = ExpressionMetricSuite(3), ExpressionMetricSuite(3)
    rank0.update(logits[0::2], target[0::2], torch.arange(7)[0::2])
    pad = torch.tensor([1, 3, 5, 0])
    rank1.update(logits[pad], target[pad], pad)
    rank0.merge_state(rank1)  # what dist_reduce_fx="cat" does across devices
    _assert_same(rank0.compute(), expected)
    # Without dedup the duplicated sample 0 would change accuracy: the test can tell.
    dup = torch.cat([torch.arange(7), torch.tensor([0])])
    naive = expression_metrics(torch.softmax(logits[dup], 1).numpy(), target[dup].numpy())
    assert any(naive[k] != pytest.approx(expected[k]) for k in AGGREGATE_KEYS)


def test_suite_rejects_index_with_conflicting_targets():
    suite = ExpressionMetricSuite(2)
    suite.update(torch.randn(2, 2), torch.tensor([0, 1]), torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="index"):
        suite.compute()


def test_suites_compute_without_updates_gives_nan():
    with pytest.warns(UserWarning, match="before the ``update``"):
        m = ExpressionMetricSuite(3).compute()
    assert "accuracy" in m and all(math.isnan(v) for v in m.values())
    with pytest.warns(UserWarning, match="before the ``update``"):
        v = VAMetricSuite().compute()
    assert list(v) == list(VA_KEYS) and all(math.isnan(x) for x in v.values())


def test_va_suite_equals_numpy_masks_nan_and_dedups():
    torch.manual_seed(2)
    target = torch.rand(10, 2) * 2 - 1
    target[3, 0] = float("nan")
    target[6] = float("nan")  # no VA label at all: dropped
    pred = torch.rand(10, 2) * 2 - 1
    suite = VAMetricSuite()
    suite.update(pred[:6], target[:6], torch.arange(6))
    suite.update(pred[6:], target[6:], torch.arange(6, 10))
    suite.update(pred[:2], target[:2], torch.arange(2))  # padding repeats
    _assert_same(suite.compute(), va_metrics(pred.numpy(), target.numpy()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(3)
    target = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    logits = torch.randn(7, 3)
    # DistributedSampler with 7 samples on 2 ranks: rank 0 gets 0,2,4,6; rank 1 gets 1,3,5 and pads with 0.
    mine = torch.tensor([0, 2, 4, 6]) if rank == 0 else torch.tensor([1, 3, 5, 0])
    suite = ExpressionMetricSuite(3)
    suite.update(logits[mine], target[mine], mine)
    result = suite.compute()
    if rank == 0:
        expected = expression_metrics(torch.softmax(logits, 1).numpy(), target.numpy())
        with open(out, "w") as f:
            json.dump({"got": result, "expected": expected}, f)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes each import torch and scikit-learn: ~40 s on a small machine
def test_expression_suite_under_real_ddp_matches_single_device(tmp_path):
    out = tmp_path / "result.json"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    data = json.loads(out.read_text())
    _assert_same(data["got"], data["expected"])


# --------------------------------------------------------------------------------------------- group metrics


def test_group_metrics_hand_values():
    target = np.array([0, 0, 1, 1, 0, 1, 1, 1])
    pred = np.array([0, 0, 1, 0, 0, 1, 1, 1])
    groups = pd.DataFrame(
        {
            "group_gender": pd.Categorical(["f", "f", "f", "f", "m", "m", "m", "m"]),
            "group_age": ["y", "y", "o", "o", "y", "y", "o", None],
        }
    )
    table = group_metrics(pred, target, groups)
    rows = {(r.attribute, r.value): r for r in table.itertuples()}
    assert list(table.columns) == ["attribute", "value", "n", "accuracy", "precision_macro", "recall_macro", "f1_macro"]
    # f: target 0,0,1,1 pred 0,0,1,0 -> P = (2/3 + 1)/2, R = (1 + 1/2)/2, F1 = (4/5 + 2/3)/2
    f = rows[("group_gender", "f")]
    assert (f.n, f.accuracy) == (4, 0.75)
    assert (f.precision_macro, f.recall_macro, f.f1_macro) == pytest.approx((5 / 6, 3 / 4, 11 / 15))
    m = rows[("group_gender", "m")]
    assert (m.n, m.accuracy, m.precision_macro, m.recall_macro, m.f1_macro) == (4, 1.0, 1.0, 1.0, 1.0)
    gap = rows[("group_gender", "gap")]
    assert pd.isna(gap.n)
    assert (gap.accuracy, gap.precision_macro, gap.recall_macro, gap.f1_macro) == pytest.approx(
        (0.25, 1 / 6, 0.25, 4 / 15)
    )
    # o: target 1,1,1 pred 1,0,1 -> only class 1 present: P = 1, R = 2/3, F1 = 0.8
    o = rows[("group_age", "o")]
    assert (o.n, o.accuracy) == (3, pytest.approx(2 / 3))
    assert (o.precision_macro, o.recall_macro, o.f1_macro) == pytest.approx((1.0, 2 / 3, 0.8))
    assert rows[("group_age", "y")].accuracy == 1.0
    assert rows[("group_age", "<NA>")].n == 1  # missing attribute: shown, not part of the gap
    age_gap = rows[("group_age", "gap")]
    assert (age_gap.accuracy, age_gap.precision_macro, age_gap.f1_macro) == pytest.approx((1 / 3, 0.0, 0.2))
    # Scores instead of labels give the same table.
    pd.testing.assert_frame_equal(group_metrics(np.eye(2)[pred], target, groups), table)


def test_group_metrics_rejects_length_mismatch():
    with pytest.raises(ValueError, match="equal length"):
        group_metrics(np.array([0, 1]), np.array([0, 1]), pd.DataFrame({"group_age": ["a"]}))


def test_macro_precision_orig_and_norm_match_sklearn(imbalanced):
    from sklearn.metrics import precision_score

    probs, target = imbalanced
    pred = probs.argmax(1)
    m = expression_metrics(probs, target)
    assert m["precision_macro"] == pytest.approx(precision_score(target, pred, average="macro", zero_division=0))
    w = _independent_weights(target)
    expected = precision_score(target, pred, average="macro", sample_weight=w, zero_division=0)
    assert m["precision_macro_norm"] == pytest.approx(expected)
    assert m["precision_macro_norm"] != pytest.approx(m["precision_macro"])


def test_suite_samples_with_index_dedup_and_sorted():
    suite = ExpressionMetricSuite(3)
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.7, 0.2, 0.1]])
    # rows 5 and 2, then row 5 again (a DDP pad) and an unlabelled row 9
    suite.update(probs[:2], torch.tensor([0, 1]), torch.tensor([5, 2]))
    suite.update(probs[2:], torch.tensor([-1, 0]), torch.tensor([9, 5]))
    p, t, i = suite.samples(with_index=True)
    assert i.tolist() == [2, 5] and t.tolist() == [1, 0]
    assert np.allclose(p, probs[[1, 0]].numpy())
    assert len(suite.samples()) == 2
    va = VAMetricSuite()
    va.update(torch.tensor([[0.1, 0.2], [0.3, 0.4]]), torch.tensor([[0.5, float("nan")], [0.0, 0.1]]),
              torch.tensor([7, 3]))  # fmt: skip
    vp, vt, vi = va.samples()
    assert vi.tolist() == [3, 7] and np.allclose(vp, [[0.3, 0.4], [0.1, 0.2]]) and np.isnan(vt[1, 1])
