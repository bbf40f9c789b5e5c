"""Screening metrics: hand-computed values on a constructed table, agreement with scikit-learn, splits."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsi_screen.metrics import (
    accuracy,
    binary_auroc,
    classification_metrics,
    confusion_matrix,
    expected_calibration_error,
    format_metrics_table,
    grouped_kfold,
    grouped_split,
    headline_metrics,
    one_vs_rest_auroc,
    plot_confusion_matrix,
    plot_reliability,
    plot_roc,
    precision_recall_f1,
    reliability_bins,
    roc_curve,
    write_metrics_report,
)

NAMES = ["NILM", "LSIL", "HSIL", "artifact"]
ABNORMAL = ["LSIL", "HSIL"]
# fmt: off
Y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3])
P = np.array([
    #  NILM  LSIL  HSIL  art      truth     argmax    abnormal score (LSIL + HSIL)
    [0.7, 0.1, 0.1, 0.1],  # 0  NILM      NILM      0.2
    [0.6, 0.3, 0.0, 0.1],  # 1  NILM      NILM      0.3
    [0.2, 0.6, 0.1, 0.1],  # 2  NILM      LSIL      0.7
    [0.1, 0.8, 0.1, 0.0],  # 3  LSIL      LSIL      0.9
    [0.5, 0.4, 0.0, 0.1],  # 4  LSIL      NILM      0.4
    [0.0, 0.1, 0.9, 0.0],  # 5  HSIL      HSIL      1.0
    [0.1, 0.3, 0.6, 0.0],  # 6  HSIL      HSIL      0.9
    [0.6, 0.0, 0.3, 0.1],  # 7  HSIL      NILM      0.3   (the HSIL→NILM under-call)
    [0.1, 0.5, 0.4, 0.0],  # 8  HSIL      LSIL      0.9
    [0.2, 0.0, 0.0, 0.8],  # 9  artifact  artifact  0.0
])
# fmt: on


@pytest.fixture(scope="module")
def hand() -> dict[str, Any]:
    return classification_metrics(Y, P, NAMES, ABNORMAL, review_threshold=0.35, n_bins=10)


def test_hand_confusion_and_accuracy(hand: dict[str, Any]) -> None:
    # rows = truth, columns = prediction (NILM, LSIL, HSIL, artifact), read off the table above
    assert hand["confusion_matrix"] == [[2, 1, 0, 0], [1, 1, 0, 0], [1, 1, 2, 0], [0, 0, 0, 1]]
    # correct = diagonal = 2 + 1 + 2 + 1 = 6 of 10
    assert hand["n_correct"] == 6
    assert hand["accuracy"] == pytest.approx(0.6)
    assert hand["n"] == 10


def test_hand_per_class(hand: dict[str, Any]) -> None:
    pc = hand["per_class"]
    # NILM: TP 2, predicted 4 (column sum 2+1+1+0), support 3 → P 2/4, R 2/3, F1 2·2/(4+3) = 4/7
    assert (pc["NILM"]["tp"], pc["NILM"]["fp"], pc["NILM"]["fn"]) == (2, 2, 1)
    assert pc["NILM"]["precision"] == pytest.approx(0.5)
    assert pc["NILM"]["recall"] == pytest.approx(2 / 3)
    assert pc["NILM"]["f1"] == pytest.approx(4 / 7)
    # LSIL: TP 1, predicted 3, support 2 → P 1/3, R 1/2, F1 2/(3+2) = 0.4
    assert pc["LSIL"]["precision"] == pytest.approx(1 / 3)
    assert pc["LSIL"]["recall"] == pytest.approx(0.5)
    assert pc["LSIL"]["f1"] == pytest.approx(0.4)
    # HSIL: TP 2, predicted 2, support 4 → P 1, R 1/2, F1 4/(2+4) = 2/3
    assert pc["HSIL"]["precision"] == pytest.approx(1.0)
    assert pc["HSIL"]["recall"] == pytest.approx(0.5)
    assert pc["HSIL"]["f1"] == pytest.approx(2 / 3)
    assert pc["HSIL"]["support"] == 4 and pc["HSIL"]["predicted"] == 2
    # artifact: 1 of 1, predicted once → all 1
    assert pc["artifact"]["f1"] == pytest.approx(1.0)
    # macro F1 = (4/7 + 0.4 + 2/3 + 1) / 4 = 0.659524
    assert hand["macro_f1"] == pytest.approx((4 / 7 + 0.4 + 2 / 3 + 1) / 4)
    assert hand["macro_f1"] == pytest.approx(0.6595238, abs=1e-6)
    # weighted F1 = (3·4/7 + 2·0.4 + 4·2/3 + 1·1) / 10 = 0.618095
    assert hand["weighted_f1"] == pytest.approx(0.6180952, abs=1e-6)


def test_hand_auroc(hand: dict[str, Any]) -> None:
    pc = hand["per_class"]
    # NILM column, positives 0.7, 0.6, 0.2 vs negatives 0.1 0.5 0.0 0.1 0.6 0.1 0.2:
    # 0.7 beats 7; 0.6 beats 6 and ties 1 (6.5); 0.2 beats 4 and ties 1 (4.5) → 18 / (3·7) = 6/7
    assert pc["NILM"]["auroc"] == pytest.approx(6 / 7)
    # LSIL column, positives 0.8, 0.4 vs 0.1 0.3 0.6 0.1 0.3 0.0 0.5 0.0: 8 + 6 = 14 / 16
    assert pc["LSIL"]["auroc"] == pytest.approx(0.875)
    # HSIL: positives 0.9 0.6 0.3 0.4 all above the negatives (≤ 0.1) → 1; artifact 0.8 vs ≤ 0.1 → 1
    assert pc["HSIL"]["auroc"] == pytest.approx(1.0)
    assert pc["artifact"]["auroc"] == pytest.approx(1.0)
    # macro = (6/7 + 0.875 + 1 + 1) / 4 = 0.933036
    assert hand["macro_auroc"] == pytest.approx(0.9330357, abs=1e-6)


def test_hand_hsil(hand: dict[str, Any]) -> None:
    # true HSIL rows 5..8: predicted HSIL, HSIL, NILM, LSIL → recall 2/4, under-call (→NILM) 1/4
    assert hand["hsil"] == {
        "n_true": 4,
        "n_detected": 2,
        "recall": pytest.approx(0.5),
        "n_called_normal": 1,
        "under_call_rate": pytest.approx(0.25),
    }


def test_hand_needs_review(hand: dict[str, Any]) -> None:
    r = hand["needs_review"]
    # truth abnormal = rows 3..8 (6), negative = rows 0, 1, 2, 9 (artifact counts as negative)
    # argmax abnormal = rows 2, 3, 5, 6, 8 → TP 4 (3,5,6,8), FP 1 (2), FN 2 (4,7), TN 3 (0,1,9)
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (4, 1, 2, 3)
    assert (r["n_positive"], r["n_negative"]) == (6, 4)
    assert r["sensitivity"] == pytest.approx(4 / 6)
    assert r["specificity"] == pytest.approx(3 / 4)
    assert r["ppv"] == pytest.approx(4 / 5)
    assert r["npv"] == pytest.approx(3 / 5)
    assert r["accuracy"] == pytest.approx(7 / 10)
    # scores: positives 0.9 0.4 1.0 0.9 0.3 0.9, negatives 0.2 0.3 0.7 0.0
    # 0.9 ×3 beat 4 each (12), 0.4 beats 3, 1.0 beats 4, 0.3 beats 2 + ties 1 (2.5) → 21.5 / 24
    assert r["auroc"] == pytest.approx(21.5 / 24)
    # at score ≥ 0.35 row 4 (0.4) becomes positive too → TP 5, FN 1, FP 1, TN 3
    t = r["at_threshold"]
    assert t["threshold"] == 0.35
    assert (t["tp"], t["fp"], t["fn"], t["tn"]) == (5, 1, 1, 3)
    assert t["sensitivity"] == pytest.approx(5 / 6)
    assert t["ppv"] == pytest.approx(5 / 6)
    assert t["npv"] == pytest.approx(3 / 4)
    assert t["accuracy"] == pytest.approx(0.8)


def test_hand_calibration(hand: dict[str, Any]) -> None:
    cal = hand["calibration"]
    # top-label confidence and correctness per row:
    # 0.7 ✓, 0.6 ✓, 0.6 ✗, 0.8 ✓, 0.5 ✗, 0.9 ✓, 0.6 ✓, 0.6 ✗, 0.5 ✗, 0.8 ✓
    # 10 bins of (b/10, (b+1)/10]:
    #   (0.4, 0.5]: 2 samples, 0 correct, |0 - 0.5| = 0.5
    #   (0.5, 0.6]: 4 samples, 2 correct, |0.5 - 0.6| = 0.1
    #   (0.6, 0.7]: 1 sample, 1 correct, |1 - 0.7| = 0.3
    #   (0.7, 0.8]: 2 samples, 2 correct, |1 - 0.8| = 0.2
    #   (0.8, 0.9]: 1 sample, 1 correct, |1 - 0.9| = 0.1
    # ECE = (2·0.5 + 4·0.1 + 1·0.3 + 2·0.2 + 1·0.1) / 10 = 2.2 / 10 = 0.22; MCE = 0.5
    assert cal["n_bins"] == 10
    assert cal["ece"] == pytest.approx(0.22)
    assert cal["mce"] == pytest.approx(0.5)
    counts = [b["count"] for b in cal["bins"]]
    assert counts == [0, 0, 0, 0, 2, 4, 1, 2, 1, 0]
    assert cal["bins"][5]["accuracy"] == pytest.approx(0.5)
    assert cal["bins"][5]["confidence"] == pytest.approx(0.6)
    assert cal["bins"][0]["accuracy"] is None  # empty bin
    assert cal["mean_confidence"] == pytest.approx(6.6 / 10)


def test_hand_headline_and_json(hand: dict[str, Any]) -> None:
    text = json.dumps(hand, allow_nan=False)  # strict JSON: no NaN anywhere
    assert json.loads(text) == hand
    head = headline_metrics(hand)
    assert head["hsil_recall"] == pytest.approx(0.5)
    assert head["hsil_to_nilm_rate"] == pytest.approx(0.25)
    assert head["binary_accuracy"] == pytest.approx(0.7)
    assert head["ece"] == pytest.approx(0.22)
    table = format_metrics_table(hand)
    assert "50.0% (2/4)" in table  # HSIL recall with its counts
    assert "HSIL→NILM under-call" in table and "25.0% (1/4)" in table
    assert "macro F1" in table and "0.660" in table


def test_undefined_values_are_null() -> None:
    # HSIL never true, never predicted; NILM never predicted.
    y = np.array([1, 1, 0, 0])
    p = np.array([[0.1, 0.9, 0.0], [0.2, 0.8, 0.0], [0.3, 0.7, 0.0], [0.4, 0.6, 0.0]])
    m = classification_metrics(y, p, ["NILM", "LSIL", "HSIL"], ["LSIL", "HSIL"])
    json.dumps(m, allow_nan=False)
    assert m["per_class"]["HSIL"]["auroc"] is None  # no positives
    assert m["per_class"]["HSIL"]["f1"] is None  # neither true nor predicted
    assert m["per_class"]["NILM"]["precision"] is None  # never predicted
    assert m["per_class"]["NILM"]["f1"] == 0.0
    assert m["hsil"]["recall"] is None and m["hsil"]["under_call_rate"] is None
    # macro F1 over the classes that occur (NILM 0, LSIL 2·2/(4+2)): (0 + 2/3) / 2
    assert m["macro_f1"] == pytest.approx(1 / 3)
    # macro AUROC over the defined ones only: NILM (0.3, 0.4 vs 0.1, 0.2 → 1), LSIL (0.9, 0.8 vs 0.7, 0.6 → 1)
    assert m["macro_auroc"] == pytest.approx(1.0)
    assert m["needs_review"]["specificity"] == 0.0


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="N×4"):
        classification_metrics(Y, P[:, :3], NAMES, ABNORMAL)
    with pytest.raises(ValueError, match="not among"):
        classification_metrics(Y, P, NAMES, ["ASC-US"])
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(np.r_[Y[:-1], 7], P, NAMES, ABNORMAL)
    with pytest.raises(ValueError, match="empty"):
        classification_metrics(np.zeros(0, int), np.zeros((0, 4)), NAMES, ABNORMAL)


# -- agreement with scikit-learn -------------------------------------------------------------------------
def _random_table(seed: int, n: int = 300, c: int = 5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    logits = rng.normal(size=(n, c))
    logits[np.arange(n), y] += rng.uniform(0, 2)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    if seed % 2:  # coarse probabilities: many ties
        p = np.round(p, 1)
    return y, p


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_sklearn(seed: int) -> None:
    skm = pytest.importorskip("sklearn.metrics")
    y, p = _random_table(seed)
    c = p.shape[1]
    pred = p.argmax(axis=1)
    names = [f"c{k}" for k in range(c)]
    m = classification_metrics(y, p, names, names[1:3])
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert accuracy(y, pred) == pytest.approx(skm.accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["weighted_f1"] == pytest.approx(skm.f1_score(y, pred, average="weighted"))
    cm = confusion_matrix(y, pred, c)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, pred, labels=range(c)))
    assert m["confusion_matrix"] == cm.tolist()
    prec, rec, f1, support = precision_recall_f1(cm)
    sk_p, sk_r, sk_f, sk_s = skm.precision_recall_fscore_support(
        y, pred, labels=range(c), zero_division=np.nan
    )
    np.testing.assert_allclose(prec, sk_p, equal_nan=True)
    np.testing.assert_allclose(rec, sk_r, equal_nan=True)
    np.testing.assert_allclose(f1, sk_f, equal_nan=True)
    np.testing.assert_array_equal(support, sk_s)
    aucs = one_vs_rest_auroc(y, p)
    for k in range(c):
        assert aucs[k] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]))
        assert m["per_class"][names[k]]["auroc"] == pytest.approx(aucs[k])
    if seed % 2 == 0:  # sklearn's multi-class AUROC wants rows summing to 1
        assert m["macro_auroc"] == pytest.approx(skm.roc_auc_score(y, p, multi_class="ovr"))
    is_abn = np.isin(y, [1, 2])
    score = p[:, 1] + p[:, 2]
    assert m["needs_review"]["auroc"] == pytest.approx(skm.roc_auc_score(is_abn, score))
    assert m["needs_review"]["sensitivity"] == pytest.approx(skm.recall_score(is_abn, np.isin(pred, [1, 2])))
    assert m["needs_review"]["ppv"] == pytest.approx(skm.precision_score(is_abn, np.isin(pred, [1, 2])))


@pytest.mark.parametrize("seed", range(4))
def test_roc_curve_agrees_with_sklearn(seed: int) -> None:
    skm = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.3
    s = np.round(rng.random(200) + 0.4 * y, 1)  # ties
    fpr, tpr, thr = roc_curve(y, s)
    sk_fpr, sk_tpr, sk_thr = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert np.isinf(thr[0])
    # trapezoidal area under the points equals the rank-based AUROC
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert binary_auroc(y, s) == pytest.approx(area)


def test_auroc_undefined_and_degenerate() -> None:
    assert math.isnan(binary_auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(binary_auroc([0, 0], [0.1, 0.2]))
    assert binary_auroc([0, 1], [0.5, 0.5]) == 0.5
    assert binary_auroc([0, 1], [0.2, 0.1]) == 0.0
    with pytest.raises(ValueError, match="NaN"):
        binary_auroc([0, 1], [0.2, np.nan])


# -- calibration ----------------------------------------------------------------------------------------
def test_ece_perfectly_calibrated() -> None:
    # 10 samples at 0.8 with 8 correct and 5 at 0.6 with 3 correct: accuracy = confidence in each bin
    conf = np.r_[np.full(10, 0.8), np.full(5, 0.6)]
    correct = np.r_[np.ones(8), np.zeros(2), np.ones(3), np.zeros(2)].astype(bool)
    assert expected_calibration_error(conf, correct) == pytest.approx(0.0, abs=1e-12)
    assert reliability_bins(conf, correct)["mce"] == pytest.approx(0.0, abs=1e-12)


def test_ece_overconfident() -> None:
    # every sample claims 0.9 but only 6 of 10 are right: ECE = |0.6 - 0.9| = 0.3
    conf = np.full(10, 0.9)
    correct = np.arange(10) < 6
    assert expected_calibration_error(conf, correct) == pytest.approx(0.3)
    # two populations: 0.95 with 50 % right (gap 0.45) and 0.55 with 55 % right (gap 0) → 0.225
    conf = np.r_[np.full(20, 0.95), np.full(20, 0.55)]
    correct = np.r_[np.arange(20) < 10, np.arange(20) < 11]
    assert expected_calibration_error(conf, correct, n_bins=10) == pytest.approx(0.225)


def test_ece_bin_edges() -> None:
    bins = reliability_bins([0.0, 0.1, 1.0], [True, False, True], n_bins=10)
    counts = [b["count"] for b in bins["bins"]]
    assert counts[0] == 2  # 0.0 and 0.1 both in (0, 0.1] (0 joins the first bin)
    assert counts[-1] == 1
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        reliability_bins([1.5], [True])


# -- grouped splits -------------------------------------------------------------------------------------
def _groups(seed: int = 0, n_groups: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 9, n_groups)
    groups = np.repeat([f"patient-{i:03d}" for i in range(n_groups)], sizes)
    group_label = rng.choice(3, n_groups, p=[0.6, 0.3, 0.1])
    labels = np.repeat(group_label, sizes)
    perm = rng.permutation(groups.size)
    return groups[perm], labels[perm]


def test_grouped_kfold_partitions_by_group() -> None:
    groups, labels = _groups()
    folds = grouped_kfold(groups, 5, seed=3, stratify_labels=labels)
    assert len(folds) == 5
    test_all = np.concatenate([te for _, te in folds])
    np.testing.assert_array_equal(np.sort(test_all), np.arange(groups.size))  # each sample once
    seen: dict[str, int] = {}
    for k, (train, test) in enumerate(folds):
        assert test.size > 0
        np.testing.assert_array_equal(np.sort(np.r_[train, test]), np.arange(groups.size))
        assert not set(groups[train]) & set(groups[test])
        for g in set(groups[test]):
            assert seen.setdefault(g, k) == k  # a group is in one test fold only
    # balanced sizes and label proportions (as far as whole groups allow)
    sizes = np.array([te.size for _, te in folds])
    assert sizes.max() - sizes.min() <= 10
    for lab in range(3):
        per_fold = np.array([np.sum(labels[te] == lab) for _, te in folds])
        assert per_fold.min() > 0
        assert per_fold.max() - per_fold.min() <= 10


def test_grouped_kfold_is_deterministic() -> None:
    groups, labels = _groups(1)
    a = grouped_kfold(groups, 4, seed=7, stratify_labels=labels)
    b = grouped_kfold(groups, 4, seed=7, stratify_labels=labels)
    for (tr_a, te_a), (tr_b, te_b) in zip(a, b, strict=True):
        np.testing.assert_array_equal(te_a, te_b)
        np.testing.assert_array_equal(tr_a, tr_b)
    c = grouped_kfold(groups, 4, seed=8, stratify_labels=labels)
    assert any(not np.array_equal(x[1], y[1]) for x, y in zip(a, c, strict=True))


def test_grouped_kfold_few_groups() -> None:
    groups = np.array(["a", "a", "b", "c", "c", "c"])
    folds = grouped_kfold(groups, 3, seed=0, stratify_labels=[0, 0, 1, 0, 0, 0])
    assert sorted(tuple(sorted(set(groups[te]))) for _, te in folds) == [("a",), ("b",), ("c",)]
    with pytest.raises(ValueError, match="groups"):
        grouped_kfold(groups, 4, seed=0)


def test_grouped_split() -> None:
    groups, labels = _groups(2, n_groups=120)
    split = grouped_split(groups, val_fraction=0.15, test_fraction=0.2, seed=0, labels=labels)
    parts = [split.train, split.val, split.test]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(groups.size))
    sets = [set(groups[p]) for p in parts]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    n = groups.size
    assert split.val.size / n == pytest.approx(0.15, abs=0.04)
    assert split.test.size / n == pytest.approx(0.2, abs=0.04)
    for lab in range(3):  # every label in every split, roughly in proportion
        total = np.sum(labels == lab)
        assert np.sum(labels[split.test] == lab) / total == pytest.approx(0.2, abs=0.1)
        assert np.sum(labels[split.val] == lab) > 0
    again = grouped_split(groups, val_fraction=0.15, test_fraction=0.2, seed=0, labels=labels)
    for x, y in zip(split, again, strict=True):
        np.testing.assert_array_equal(x, y)
    other = grouped_split(groups, val_fraction=0.15, test_fraction=0.2, seed=1, labels=labels)
    assert not np.array_equal(other.test, split.test)


def test_grouped_split_small_and_invalid() -> None:
    groups = ["a", "b", "c", "c", "c", "c"]
    train, val, test = grouped_split(groups, val_fraction=0.1, test_fraction=0.1, seed=0)
    assert len(val) > 0 and len(test) > 0 and len(train) > 0  # a positive fraction is never empty
    _, val0, test0 = grouped_split(groups, val_fraction=0.0, test_fraction=0.3, seed=0)
    assert len(val0) == 0 and len(test0) > 0
    with pytest.raises(ValueError):
        grouped_split(groups, val_fraction=0.5, test_fraction=0.5, seed=0)


# -- plots and the report -------------------------------------------------------------------------------
def _png_size(path: Path) -> tuple[int, int]:
    from PIL import Image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        return im.size


def test_plots(tmp_path: Path, hand: dict[str, Any]) -> None:
    w, h = _png_size(plot_confusion_matrix(hand["confusion_matrix"], NAMES, tmp_path / "cm.png"))
    assert w > 300 and h > 300
    w, h = _png_size(plot_reliability(hand["calibration"], tmp_path / "rel.png"))
    assert w > 300 and h > 300
    fpr, tpr, _ = roc_curve(Y >= 1, P[:, 1] + P[:, 2])
    _png_size(
        plot_roc({"fpr": fpr, "tpr": tpr, "auroc": 0.9}, tmp_path / "roc.png", points={"x": (0.2, 0.8)})
    )
    with pytest.raises(ValueError):
        plot_confusion_matrix([[1, 2], [3, 4]], NAMES, tmp_path / "bad.png")


def test_write_metrics_report(tmp_path: Path) -> None:
    names = ["NILM", "LSIL", "HSIL", "<b>art</b>"]
    m = classification_metrics(Y, P, names, ABNORMAL)
    written = write_metrics_report(m, tmp_path / "rep", title="Model <x> & co")
    assert set(written) == {"json", "confusion_matrix", "reliability", "html"}

    def no_constants(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    assert json.loads(written["json"].read_text(), parse_constant=no_constants) == m
    page = written["html"].read_text()
    assert page.count("data:image/png;base64,") == 2
    assert "Model &lt;x&gt; &amp; co" in page and "<b>art</b>" not in page
    assert "&lt;b&gt;art&lt;/b&gt;" in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
