"""Screening metrics over a prediction table, grouped data splits, plots and a metrics report.

Pure numpy: scikit-learn is only used by the tests, to check these functions against it. Every rate
comes with the counts behind it, and :func:`classification_metrics` returns a JSON-serialisable dict in
which an undefined value (a rate with an empty denominator, an AUROC without positives or negatives) is
``None``, never NaN. The exact definitions are in ``docs/training.md`` (section "Metrics").

The numeric helpers (:func:`binary_auroc`, :func:`precision_recall_f1`, ...) return NaN where a value is
undefined; the dicts turn it into ``None``.

matplotlib is imported lazily inside the plotting functions and drawn on an Agg canvas (no pyplot, no
global backend change), so importing this module stays cheap.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "DEFAULT_ECE_BINS",
    "GroupedSplit",
    "accuracy",
    "binary_auroc",
    "binary_counts",
    "classification_metrics",
    "clopper_pearson_interval",
    "clopper_pearson_lower",
    "confusion_matrix",
    "expected_calibration_error",
    "format_metrics_table",
    "grouped_kfold",
    "grouped_split",
    "headline_metrics",
    "jsonable",
    "one_vs_rest_auroc",
    "plot_confusion_matrix",
    "plot_reliability",
    "plot_roc",
    "precision_recall_f1",
    "reliability_bins",
    "roc_curve",
    "slides_needed",
    "wilson_interval",
    "write_metrics_report",
]

logger = logging.getLogger(__name__)

#: Equal-width confidence bins of the expected calibration error (Guo et al., 2017, use 15).
DEFAULT_ECE_BINS = 15

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]


# -- small helpers --------------------------------------------------------------------------------------
def _labels(y: ArrayLike, n_classes: int | None = None, name: str = "y_true") -> IntArray:
    arr = np.asarray(y)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if (
        arr.size
        and not np.issubdtype(arr.dtype, np.integer)
        and (not np.issubdtype(arr.dtype, np.floating) or not np.all(np.mod(arr, 1) == 0))
    ):
        raise ValueError(f"{name} must hold integer class indices")
    out = arr.astype(np.int64)
    if n_classes is not None and out.size and (out.min() < 0 or out.max() >= n_classes):
        raise ValueError(f"{name} holds class indices outside 0..{n_classes - 1}")
    return out


def _scores(s: ArrayLike, n: int, name: str = "scores") -> FloatArray:
    arr = np.asarray(s, dtype=np.float64)
    if arr.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} holds NaN or infinite values")
    return arr


def _ratio(num: float, den: float) -> float:
    """``num / den``, NaN when ``den`` is 0."""
    return float(num) / float(den) if den else math.nan


def jsonable(obj: Any) -> Any:
    """``obj`` with numpy types turned into Python ones and NaN/±inf into ``None`` (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


# -- multi-class ----------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, *, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """Wilson score interval of a binomial proportion (default: two-sided 95 %); None when ``n`` is 0.

    Unlike the normal approximation it stays inside [0, 1] and is sensible at 0 or ``n`` successes
    (e.g. 20 of 20 gives [0.839, 1.0]).
    """
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if n == 0:
        return None
    p = successes / n
    den = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_binomial(successes: int, n: int, confidence: float) -> None:
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got successes={successes}, n={n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")


def clopper_pearson_lower(successes: int, n: int, *, confidence: float = 0.95) -> float | None:
    """Exact one-sided Clopper–Pearson lower bound of a binomial proportion; None when ``n`` is 0.

    The largest ``p`` with ``P(X ≥ successes | n, p) ≤ 1 − confidence``: the ``1 − confidence`` quantile
    of Beta(successes, n − successes + 1), and 0 at no successes. With ``n`` of ``n`` it is
    ``(1 − confidence) ** (1 / n)`` (59 of 59 at 95 %: 0.9505).
    """
    _check_binomial(successes, n, confidence)
    if n == 0:
        return None
    if successes == 0:
        return 0.0
    if successes == n:  # closed form, exact to the last bit
        return float((1.0 - confidence) ** (1.0 / n))
    from scipy.stats import beta

    return float(beta.ppf(1.0 - confidence, successes, n - successes + 1))


def clopper_pearson_interval(
    successes: int, n: int, *, confidence: float = 0.95
) -> tuple[float, float] | None:
    """Exact two-sided Clopper–Pearson interval (``confidence`` in total); None when ``n`` is 0."""
    _check_binomial(successes, n, confidence)
    if n == 0:
        return None
    from scipy.stats import beta

    a = (1.0 - confidence) / 2.0
    lo = 0.0 if successes == 0 else float(beta.ppf(a, successes, n - successes + 1))
    hi = 1.0 if successes == n else float(beta.ppf(1.0 - a, successes + 1, n - successes))
    return lo, hi


def slides_needed(lower_bound: float, *, misses: int = 0, confidence: float = 0.95) -> int:
    """Smallest ``n`` whose one-sided Clopper–Pearson lower bound, ``n − misses`` of ``n``, ≥ ``lower_bound``.

    With no miss this solves ``(1 − confidence) ** (1 / n) ≥ lower_bound``:
    ``n = ⌈ln(1 − confidence) / ln(lower_bound)⌉`` (95 % confidence: 59 slides for 0.95, 149 for 0.98,
    299 for 0.99). Each allowed miss needs more slides; the bound grows with ``n`` at a fixed number of
    misses, so the smallest ``n`` is found by bisection.
    """
    if not 0.0 < lower_bound < 1.0:
        raise ValueError(f"lower_bound must lie in (0, 1), got {lower_bound}")
    if misses < 0:
        raise ValueError(f"misses must be ≥ 0, got {misses}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")

    def ok(n: int) -> bool:
        bound = clopper_pearson_lower(n - misses, n, confidence=confidence)
        return bound is not None and bound >= lower_bound

    lo = misses + 1
    if misses == 0:
        guess = max(1, math.ceil(math.log(1.0 - confidence) / math.log(lower_bound)))
        lo = max(1, guess - 2)  # float rounding: the exact answer is within a step of the formula
    if ok(lo):
        return lo
    hi = max(lo + 1, 2 * lo)
    while not ok(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:  # invariant: not ok(lo), ok(hi)
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of samples whose predicted class equals the true class."""
    t, p = _labels(y_true), _labels(y_pred, name="y_pred")
    if t.shape != p.shape or not t.size:
        raise ValueError("y_true and y_pred must be non-empty and of equal length")
    return float(np.mean(t == p))


def confusion_matrix(y_true: ArrayLike, y_pred: ArrayLike, n_classes: int) -> IntArray:
    """C×C counts; row = true class, column = predicted class."""
    t, p = _labels(y_true, n_classes), _labels(y_pred, n_classes, "y_pred")
    if t.shape != p.shape:
        raise ValueError("y_true and y_pred must have equal length")
    flat = np.bincount(t * n_classes + p, minlength=n_classes * n_classes)
    return flat.reshape(n_classes, n_classes).astype(np.int64)


def precision_recall_f1(cm: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray, IntArray]:
    """Per-class precision, recall, F1 and support from a confusion matrix (rows = truth).

    precision = TP / (TP + FP) (NaN when the class is never predicted), recall = TP / (TP + FN) (NaN when
    it has no support), F1 = 2·TP / (2·TP + FP + FN) (NaN when the class is neither true nor predicted).
    """
    m = np.asarray(cm, dtype=np.int64)
    tp = np.diag(m).astype(np.float64)
    predicted = m.sum(axis=0).astype(np.float64)
    support = m.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(support > 0, tp / support, np.nan)
        denom = predicted + support  # = 2TP + FP + FN
        f1 = np.where(denom > 0, 2 * tp / denom, np.nan)
    return precision, recall, f1, support.astype(np.int64)


def _average_ranks(x: FloatArray) -> FloatArray:
    """1-based ranks of ``x``; tied values share the mean of their ranks."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts).astype(np.float64)
    return (ends - (counts - 1) / 2.0)[inverse.reshape(-1)]


def binary_auroc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve (Mann–Whitney U / (P·N), ties count one half); NaN without P or N."""
    y = np.asarray(y_true).astype(bool).reshape(-1)
    s = _scores(scores, y.size)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    u = float(ranks[y].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def one_vs_rest_auroc(y_true: ArrayLike, probs: ArrayLike) -> FloatArray:
    """Per-class AUROC of ``probs[:, k]`` for class k vs all others (NaN where undefined)."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be N×C, got shape {p.shape}")
    t = _labels(y_true, p.shape[1])
    return np.array([binary_auroc(t == k, p[:, k]) for k in range(p.shape[1])], dtype=np.float64)


def roc_curve(y_true: ArrayLike, scores: ArrayLike) -> tuple[FloatArray, FloatArray, FloatArray]:
    """ROC points ``(fpr, tpr, thresholds)``; a sample is positive when ``score >= threshold``.

    Thresholds are the distinct scores in decreasing order, preceded by ``+inf`` (nothing positive,
    the point (0, 0)). Rates are NaN when there are no positives or no negatives.
    """
    y = np.asarray(y_true).astype(bool).reshape(-1)
    s = _scores(scores, y.size)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order]
    last_of_run = np.r_[np.nonzero(np.diff(s_sorted))[0], y.size - 1] if y.size else np.zeros(0, np.int64)
    tps = np.cumsum(y_sorted)[last_of_run].astype(np.float64)
    fps = (last_of_run + 1) - tps
    n_pos, n_neg = float(y.sum()), float(y.size - y.sum())
    tps, fps = np.r_[0.0, tps], np.r_[0.0, fps]
    fpr = fps / n_neg if n_neg else np.full_like(fps, np.nan)
    tpr = tps / n_pos if n_pos else np.full_like(tps, np.nan)
    thresholds = np.r_[np.inf, s_sorted[last_of_run]]
    return fpr, tpr, thresholds


def binary_counts(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, Any]:
    """Counts and rates of a binary decision (positive = True).

    Keys: ``tp fp tn fn n_positive n_negative sensitivity specificity ppv npv accuracy`` (rates are
    ``None`` when undefined).
    """
    t = np.asarray(y_true).astype(bool).reshape(-1)
    p = np.asarray(y_pred).astype(bool).reshape(-1)
    if t.shape != p.shape:
        raise ValueError("y_true and y_pred must have equal length")
    tp, fp = int(np.sum(t & p)), int(np.sum(~t & p))
    fn, tn = int(np.sum(t & ~p)), int(np.sum(~t & ~p))
    out: dict[str, Any] = {
        "n": int(t.size),
        "n_positive": tp + fn,
        "n_negative": tn + fp,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
        "sensitivity": _ratio(tp, tp + fn),
        "specificity": _ratio(tn, tn + fp),
        "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn),
        "accuracy": _ratio(tp + tn, t.size),
    }
    return jsonable(out)  # type: ignore[no-any-return]


# -- calibration ----------------------------------------------------------------------------------------
def reliability_bins(
    confidences: ArrayLike, correct: ArrayLike, n_bins: int = DEFAULT_ECE_BINS
) -> dict[str, Any]:
    """Reliability-curve data and calibration errors over ``n_bins`` equal-width bins of [0, 1].

    Bin b covers (b/n, (b+1)/n]; a confidence of exactly 0 falls in the first bin. ECE = Σ_b (n_b / N)
    · |accuracy_b − confidence_b|; MCE = max_b over non-empty bins of the same gap.

    Keys: ``n_bins n ece mce mean_confidence accuracy bins`` where each bin is
    ``{lower, upper, count, n_correct, confidence, accuracy, gap}`` (``None`` in empty bins).
    """
    if n_bins < 1:
        raise ValueError("n_bins must be ≥ 1")
    c = np.asarray(confidences, dtype=np.float64).reshape(-1)
    ok = np.asarray(correct).astype(bool).reshape(-1)
    if c.shape != ok.shape or not c.size:
        raise ValueError("confidences and correct must be non-empty and of equal length")
    if not np.all(np.isfinite(c)) or c.min() < 0.0 or c.max() > 1.0 + 1e-9:
        raise ValueError("confidences must lie in [0, 1]")
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.searchsorted(edges, c, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    n_correct = np.bincount(idx, weights=ok.astype(np.float64), minlength=n_bins)
    conf_sum = np.bincount(idx, weights=c, minlength=n_bins)
    bins: list[dict[str, Any]] = []
    ece = 0.0
    mce = 0.0
    for b in range(n_bins):
        entry: dict[str, Any] = {
            "lower": float(edges[b]),
            "upper": float(edges[b + 1]),
            "count": int(count[b]),
            "n_correct": round(float(n_correct[b])),
            "confidence": None,
            "accuracy": None,
            "gap": None,
        }
        if count[b]:
            acc_b = n_correct[b] / count[b]
            conf_b = conf_sum[b] / count[b]
            gap = abs(acc_b - conf_b)
            ece += count[b] / c.size * gap
            mce = max(mce, gap)
            entry.update(confidence=float(conf_b), accuracy=float(acc_b), gap=float(gap))
        bins.append(entry)
    return {
        "n_bins": int(n_bins),
        "n": int(c.size),
        "ece": float(ece),
        "mce": float(mce),
        "mean_confidence": float(c.mean()),
        "accuracy": float(ok.mean()),
        "bins": bins,
    }


def expected_calibration_error(
    confidences: ArrayLike, correct: ArrayLike, n_bins: int = DEFAULT_ECE_BINS
) -> float:
    """Expected calibration error (see :func:`reliability_bins`)."""
    return float(reliability_bins(confidences, correct, n_bins)["ece"])


# -- the prediction table -------------------------------------------------------------------------------
def classification_metrics(
    y_true: ArrayLike,
    probs: ArrayLike,
    class_names: Sequence[str],
    abnormal_classes: Sequence[str],
    *,
    normal_class: str = "NILM",
    hsil_class: str = "HSIL",
    review_threshold: float = 0.5,
    n_bins: int = DEFAULT_ECE_BINS,
) -> dict[str, Any]:
    """Every screening metric of a prediction table, as a JSON-serialisable dict (``None``, never NaN).

    ``y_true`` holds class indices into ``class_names``; ``probs`` is N×C. The prediction is the argmax
    (first class on ties). Top-level keys:

    - ``kind`` (``"classification"``), ``n``, ``class_names``, ``abnormal_classes``, ``normal_class``,
      ``hsil_class``
    - ``accuracy``, ``n_correct``, ``macro_f1``, ``weighted_f1``, ``macro_auroc``
    - ``per_class``: ``{name: {support, predicted, tp, fp, fn, precision, recall, f1, auroc}}``
    - ``confusion_matrix``: C×C counts, row = truth, column = prediction
    - ``hsil``: ``{n_true, n_detected, recall, n_called_normal, under_call_rate}`` (HSIL→NILM)
    - ``needs_review``: :func:`binary_counts` of "any abnormal class" at the argmax, plus ``auroc`` of
      the summed abnormal probability and ``at_threshold`` (the same counts for
      ``score >= review_threshold``, with ``threshold``)
    - ``calibration``: :func:`reliability_bins` of the top-label confidence
    """
    names = [str(c) for c in class_names]
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(names):
        raise ValueError(f"probs must be N×{len(names)} (one column per class name), got shape {p.shape}")
    if not p.shape[0]:
        raise ValueError("the prediction table is empty")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs holds NaN or infinite values")
    if len(set(names)) != len(names):
        raise ValueError(f"class names are not unique: {names}")
    unknown = [c for c in abnormal_classes if c not in names]
    if unknown:
        raise ValueError(f"abnormal classes {unknown} are not among the class names {names}")
    n_classes = len(names)
    t = _labels(y_true, n_classes)
    if t.size != p.shape[0]:
        raise ValueError(f"y_true has {t.size} rows but probs has {p.shape[0]}")
    pred = np.argmax(p, axis=1).astype(np.int64)

    cm = confusion_matrix(t, pred, n_classes)
    precision, recall, f1, support = precision_recall_f1(cm)
    aurocs = one_vs_rest_auroc(t, p)
    defined_f1 = f1[~np.isnan(f1)]
    weighted = float(np.sum(np.nan_to_num(f1) * support) / support.sum())
    defined_auc = aurocs[~np.isnan(aurocs)]
    per_class = {
        name: {
            "support": int(support[k]),
            "predicted": int(cm[:, k].sum()),
            "tp": int(cm[k, k]),
            "fp": int(cm[:, k].sum() - cm[k, k]),
            "fn": int(cm[k, :].sum() - cm[k, k]),
            "precision": precision[k],
            "recall": recall[k],
            "f1": f1[k],
            "auroc": aurocs[k],
        }
        for k, name in enumerate(names)
    }

    hsil: dict[str, Any] = {
        "n_true": 0,
        "n_detected": 0,
        "recall": None,
        "n_called_normal": 0,
        "under_call_rate": None,
    }
    if hsil_class in names:
        h = names.index(hsil_class)
        n_true = int(support[h])
        n_normal = int(cm[h, names.index(normal_class)]) if normal_class in names else 0
        hsil.update(
            n_true=n_true,
            n_detected=int(cm[h, h]),
            recall=_ratio(cm[h, h], n_true),
            n_called_normal=n_normal,
            under_call_rate=_ratio(n_normal, n_true) if normal_class in names else math.nan,
        )

    abnormal_idx = np.array([names.index(c) for c in abnormal_classes], dtype=np.int64)
    is_abnormal = np.isin(t, abnormal_idx)
    score = p[:, abnormal_idx].sum(axis=1) if abnormal_idx.size else np.zeros(t.size)
    review = binary_counts(is_abnormal, np.isin(pred, abnormal_idx))
    review["auroc"] = binary_auroc(is_abnormal, score)
    review["at_threshold"] = {"threshold": float(review_threshold)} | binary_counts(
        is_abnormal, score >= review_threshold
    )

    top = np.max(p, axis=1)
    calibration = reliability_bins(np.clip(top, 0.0, 1.0), pred == t, n_bins)

    result: dict[str, Any] = {
        "kind": "classification",
        "n": int(t.size),
        "class_names": names,
        "abnormal_classes": list(abnormal_classes),
        "normal_class": normal_class,
        "hsil_class": hsil_class,
        "accuracy": float(np.mean(pred == t)),
        "n_correct": int(np.sum(pred == t)),
        "macro_f1": float(defined_f1.mean()) if defined_f1.size else None,
        "weighted_f1": weighted,
        "macro_auroc": float(defined_auc.mean()) if defined_auc.size else None,
        "per_class": per_class,
        "confusion_matrix": cm,
        "hsil": hsil,
        "needs_review": review,
        "calibration": calibration,
    }
    return jsonable(result)  # type: ignore[no-any-return]


def headline_metrics(metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The headline figures of :func:`classification_metrics` as one flat dict (for logging)."""
    review = metrics["needs_review"]
    return {
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "weighted_f1": metrics["weighted_f1"],
        "macro_auroc": metrics["macro_auroc"],
        "hsil_recall": metrics["hsil"]["recall"],
        "hsil_to_nilm_rate": metrics["hsil"]["under_call_rate"],
        "review_sensitivity": review["sensitivity"],
        "review_specificity": review["specificity"],
        "review_auroc": review["auroc"],
        "binary_accuracy": review["accuracy"],
        "ece": metrics["calibration"]["ece"],
    }


# -- grouped splits -------------------------------------------------------------------------------------
class GroupedSplit(NamedTuple):
    """Sorted sample indices of each split; every group lies in exactly one of them."""

    train: NDArray[np.intp]
    val: NDArray[np.intp]
    test: NDArray[np.intp]


def _group_table(groups: ArrayLike, labels: ArrayLike | None) -> tuple[NDArray[np.intp], NDArray[np.float64]]:
    """Group index of each sample, and the G×L per-label sample counts of each group."""
    g = np.asarray(groups)
    if g.ndim != 1 or not g.size:
        raise ValueError("groups must be a non-empty 1-D sequence")
    _, g_idx = np.unique(g.astype(str) if g.dtype == object else g, return_inverse=True)
    g_idx = g_idx.reshape(-1).astype(np.intp)
    if labels is None:
        l_idx = np.zeros(g.size, dtype=np.intp)
    else:
        lab = np.asarray(labels)
        if lab.shape != g.shape:
            raise ValueError(f"labels has shape {lab.shape}, groups {g.shape}")
        _, l_idx = np.unique(lab.astype(str) if lab.dtype == object else lab, return_inverse=True)
        l_idx = l_idx.reshape(-1).astype(np.intp)
    table = np.zeros((int(g_idx.max()) + 1, int(l_idx.max()) + 1), dtype=np.float64)
    np.add.at(table, (g_idx, l_idx), 1.0)
    return g_idx, table


def _assign_groups(table: NDArray[np.float64], fractions: Sequence[float], seed: int) -> NDArray[np.intp]:
    """Greedy assignment of groups to splits whose per-label and total counts approach the fractions.

    Groups are visited largest first (random order among equal sizes, from ``seed``); each goes to the
    split where it most reduces Σ_labels (count − fraction·total)² / total, with the total sample count
    as one more "label" so that sizes balance too. A split with a positive fraction that ends up empty
    takes the smallest group of the split holding the most groups.
    """
    rng = np.random.default_rng(seed)
    n_groups = table.shape[0]
    full = np.concatenate([table, table.sum(axis=1, keepdims=True)], axis=1)
    totals = full.sum(axis=0)
    frac = np.asarray(fractions, dtype=np.float64)
    active = np.nonzero(frac > 0)[0]
    target = frac[:, None] * totals[None, :]
    counts = np.zeros((frac.size, full.shape[1]))
    assign = np.full(n_groups, -1, dtype=np.intp)
    perm = rng.permutation(n_groups)
    order = perm[np.argsort(-full[perm, -1], kind="stable")]
    for gi in order:
        row = full[gi]
        # Δcost of adding `row` to split s, up to a term equal for all s.
        delta = ((counts[active] - target[active]) * row / totals).sum(axis=1)
        best = active[int(np.argmin(np.round(delta, 12)))]
        assign[gi] = best
        counts[best] += row
    for s in active:
        if not np.any(assign == s) and n_groups >= active.size:
            n_per = np.bincount(assign, minlength=frac.size)
            donor = int(np.argmax(n_per))
            members = np.nonzero(assign == donor)[0]
            assign[members[np.argmin(full[members, -1])]] = s
    return assign


def grouped_kfold(
    groups: ArrayLike,
    n_splits: int,
    *,
    seed: int,
    stratify_labels: ArrayLike | None = None,
) -> list[tuple[NDArray[np.intp], NDArray[np.intp]]]:
    """``n_splits`` folds as ``(train_indices, test_indices)``; no group in two test folds.

    Every sample is in exactly one test fold. With ``stratify_labels`` the folds' label proportions
    are balanced as far as the groups allow; deterministic for a given ``seed``.
    """
    if n_splits < 2:
        raise ValueError("n_splits must be ≥ 2")
    g_idx, table = _group_table(groups, stratify_labels)
    if table.shape[0] < n_splits:
        raise ValueError(f"{table.shape[0]} groups cannot fill {n_splits} folds")
    fold_of_group = _assign_groups(table, [1.0 / n_splits] * n_splits, seed)
    fold = fold_of_group[g_idx]
    all_idx = np.arange(g_idx.size, dtype=np.intp)
    return [(all_idx[fold != k], all_idx[fold == k]) for k in range(n_splits)]


def grouped_split(
    groups: ArrayLike,
    *,
    val_fraction: float,
    test_fraction: float,
    seed: int,
    labels: ArrayLike | None = None,
) -> GroupedSplit:
    """Train/val/test indices with every group in exactly one split, sized by sample fractions.

    With ``labels`` the label proportions of the splits are balanced as far as the groups allow. A split
    with a positive fraction gets at least one group when there are enough groups. Deterministic for a
    given ``seed``.
    """
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0):
        raise ValueError("val_fraction and test_fraction must lie in [0, 1)")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError("val_fraction + test_fraction must be < 1 (something must be left to train on)")
    g_idx, table = _group_table(groups, labels)
    fractions = [1.0 - val_fraction - test_fraction, val_fraction, test_fraction]
    split = _assign_groups(table, fractions, seed)[g_idx]
    all_idx = np.arange(g_idx.size, dtype=np.intp)
    return GroupedSplit(all_idx[split == 0], all_idx[split == 1], all_idx[split == 2])


# -- plots ----------------------------------------------------------------------------------------------
def _new_figure(width: float, height: float, nrows: int = 1, **kw: Any) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, **kw)
    return fig, axes


def plot_confusion_matrix(
    cm: ArrayLike, class_names: Sequence[str], path: str | Path, *, title: str | None = None
) -> Path:
    """PNG of a confusion matrix (rows = truth); cells show the count and the row percentage."""
    m = np.asarray(cm, dtype=np.int64)
    n = m.shape[0]
    if m.shape != (n, n) or n != len(class_names):
        raise ValueError(f"cm must be {len(class_names)}×{len(class_names)}, got {m.shape}")
    rows = m.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        norm = np.where(rows > 0, m / np.maximum(rows, 1), 0.0)
    size = 1.6 + 0.95 * n
    fig, ax = _new_figure(size + 0.8, size)
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    for i in range(n):
        for j in range(n):
            pct = f"{100 * norm[i, j]:.1f}%" if rows[i, 0] else "–"
            ax.text(
                j,
                i,
                f"{m[i, j]:,}\n{pct}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.55 else "black",
            )
    ax.set_xticks(range(n), [str(c) for c in class_names], rotation=35, ha="right")
    ax.set_yticks(range(n), [f"{c} (n={int(rows[i, 0]):,})" for i, c in enumerate(class_names)])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "Confusion matrix (row %)")
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def plot_reliability(bins: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """PNG reliability diagram of :func:`reliability_bins` data (ECE in the title) over a histogram."""
    entries = list(bins["bins"])
    lower = np.array([b["lower"] for b in entries])
    width = np.array([b["upper"] - b["lower"] for b in entries])
    counts = np.array([b["count"] for b in entries])
    acc = np.array([np.nan if b["accuracy"] is None else b["accuracy"] for b in entries])
    conf = np.array([np.nan if b["confidence"] is None else b["confidence"] for b in entries])
    fig, (ax, hist) = _new_figure(5.2, 6.2, nrows=2, sharex=True, gridspec_kw={"height_ratios": [3, 1.2]})
    filled = counts > 0
    left, w = lower[filled], width[filled]
    ax.bar(left, acc[filled], width=w, align="edge", color="#4c72b0", edgecolor="white", label="accuracy")
    gap_style = {"color": "#dd8452", "alpha": 0.45, "edgecolor": "#dd8452", "hatch": "//"}
    gap = np.abs(acc - conf)[filled]
    bottom = np.minimum(acc, conf)[filled]
    ax.bar(left, gap, bottom=bottom, width=w, align="edge", label="gap to confidence", **gap_style)
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfect calibration")
    ax.set_ylim(0, 1)
    ax.set_xlim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ece = bins.get("ece")
    ece_txt = "n/a" if ece is None else f"{100 * float(ece):.2f}%"
    ax.set_title(title or f"Reliability (top-label), ECE = {ece_txt}, {len(entries)} bins")
    hist.bar(lower, counts, width=width, align="edge", color="#8c8c8c", edgecolor="white")
    mean_conf = bins.get("mean_confidence")
    if mean_conf is not None:
        hist.axvline(float(mean_conf), color="#c44e52", lw=1.2, label="mean confidence")
        hist.legend(loc="upper left", fontsize=8)
    hist.set_xlabel("confidence (max probability)")
    hist.set_ylabel("samples")
    out = Path(path)
    fig.savefig(out, format="png")
    return out


def plot_roc(
    roc: Mapping[str, Any],
    path: str | Path,
    *,
    title: str | None = None,
    points: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """PNG ROC curve of ``roc = {"fpr": [...], "tpr": [...], "auroc": float | None}``.

    ``points`` marks named operating points as ``{label: (fpr, tpr)}``.
    """
    fpr = np.array([np.nan if v is None else v for v in roc["fpr"]], dtype=np.float64)
    tpr = np.array([np.nan if v is None else v for v in roc["tpr"]], dtype=np.float64)
    fig, ax = _new_figure(5.0, 5.0)
    ax.plot([0, 1], [0, 1], "--", color="gray", lw=1)
    auc = roc.get("auroc")
    auc_txt = "n/a" if auc is None else f"{float(auc):.3f}"
    ax.plot(fpr, tpr, color="#4c72b0", lw=2, label=f"AUROC = {auc_txt}")
    colors = ("#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860")
    for i, (label, (x, y)) in enumerate((points or {}).items()):
        ax.plot([x], [y], marker="osD^v"[i % 5], color=colors[i % 5], ms=7, ls="none", label=label)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("1 − specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title or "ROC")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_aspect("equal")
    out = Path(path)
    fig.savefig(out, format="png")
    return out


# -- tables and the report ------------------------------------------------------------------------------
class _Table(NamedTuple):
    title: str
    header: list[str]
    rows: list[list[str]]
    left: int = 1  # how many leading columns are text (left-aligned)


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * float(v):.1f}%"


def _num(v: Any) -> str:
    return "–" if v is None else f"{float(v):.3f}"


def _frac(num: Any, den: Any) -> str:
    return f"{int(num):,}/{int(den):,}"


def _rate(value: Any, num: Any, den: Any) -> str:
    return f"{_pct(value)} ({_frac(num, den)})"


def _binary_row(name: str, b: Mapping[str, Any]) -> list[str]:
    return [
        name,
        f"{_pct(b['sensitivity'])} ({_frac(b['tp'], b['tp'] + b['fn'])})",
        f"{_pct(b['specificity'])} ({_frac(b['tn'], b['tn'] + b['fp'])})",
        f"{_pct(b['ppv'])} ({_frac(b['tp'], b['tp'] + b['fp'])})",
        f"{_pct(b['npv'])} ({_frac(b['tn'], b['tn'] + b['fn'])})",
        f"{_pct(b['accuracy'])} ({_frac(b['tp'] + b['tn'], b['n'])})",
    ]


_BINARY_HEADER = ["decision", "sensitivity", "specificity", "PPV", "NPV", "accuracy"]


def _classification_tables(m: Mapping[str, Any]) -> list[_Table]:
    hsil, review, cal = m["hsil"], m["needs_review"], m["calibration"]
    head = [
        ["samples", f"{m['n']:,}"],
        ["accuracy", _rate(m["accuracy"], m["n_correct"], m["n"])],
        ["macro F1", _num(m["macro_f1"])],
        ["weighted F1", _num(m["weighted_f1"])],
        ["macro AUROC (one-vs-rest)", _num(m["macro_auroc"])],
        [f"{m['hsil_class']} recall", _rate(hsil["recall"], hsil["n_detected"], hsil["n_true"])],
        [
            f"{m['hsil_class']}→{m['normal_class']} under-call",
            _rate(hsil["under_call_rate"], hsil["n_called_normal"], hsil["n_true"]),
        ],
        ["needs review: sensitivity", _rate(review["sensitivity"], review["tp"], review["n_positive"])],
        ["needs review: specificity", _rate(review["specificity"], review["tn"], review["n_negative"])],
        ["needs review: AUROC", _num(review["auroc"])],
        ["binary accuracy", _pct(review["accuracy"])],
        [f"ECE ({cal['n_bins']} bins)", _pct(cal["ece"])],
    ]
    per_class = [
        [
            name,
            f"{c['support']:,}",
            f"{c['predicted']:,}",
            _pct(c["precision"]),
            _pct(c["recall"]),
            _num(c["f1"]),
            _num(c["auroc"]),
        ]
        for name, c in m["per_class"].items()
    ]
    names = list(m["class_names"])
    cm_rows = [[f"{names[i]}"] + [f"{v:,}" for v in row] for i, row in enumerate(m["confusion_matrix"])]
    thr = review["at_threshold"]
    return [
        _Table("Headline", ["metric", "value"], head),
        _Table(
            "Per class",
            ["class", "support", "predicted", "precision", "recall", "F1", "AUROC"],
            per_class,
        ),
        _Table("Confusion matrix (rows = truth, columns = prediction)", ["true \\ pred", *names], cm_rows),
        _Table(
            f"Needs review (abnormal = {', '.join(m['abnormal_classes'])})",
            _BINARY_HEADER,
            [
                _binary_row("argmax is abnormal", review),
                _binary_row(f"abnormal prob ≥ {thr['threshold']:g}", thr),
            ],
        ),
    ]


def _slide_tables(m: Mapping[str, Any]) -> list[_Table]:
    tri, rank = m["triage"], m["ranking"]
    aside = m["set_aside"]
    hp = aside.get("hsil_plus_100", {})
    hpt = tri["hsil_plus"]
    counts = f"{m['n_labelled']:,} / {m['n_outputs']:,} / {m['n_evaluated']:,}"
    head = [
        ["slides labelled / with output / evaluated", counts],
        ["unsatisfactory (not in the rates)", f"{m['unsatisfactory']['n']:,}"],
        ["triage sensitivity (abnormal in review)", _rate(tri["sensitivity"], tri["tp"], tri["n_positive"])],
        ["triage specificity (NILM negative)", _rate(tri["specificity"], tri["tn"], tri["n_negative"])],
        ["HSIL+ in review", _rate(hpt["sensitivity"], hpt["n_review"], hpt["n"])],
        ["score AUROC (abnormal vs NILM)", _num(rank["auroc"])],
        ["score AUROC (HSIL+ vs NILM)", _num(rank["auroc_hsil_plus"])],
        [
            "no further review, all HSIL+ kept",
            _rate(hp.get("fraction"), hp.get("n_set_aside", 0), hp.get("n_slides", 0)),
        ],
        ["missing output / missing label", f"{len(m['missing_output']):,} / {len(m['missing_label']):,}"],
    ]
    aside_rows = []
    for key, a in aside.items():
        aside_rows.append(
            [
                key,
                "–" if a.get("threshold") is None else f"{a['threshold']:.4g}",
                _rate(a.get("fraction"), a.get("n_set_aside", 0), a.get("n_slides", 0)),
                _rate(a.get("nilm_fraction"), a.get("n_nilm_set_aside", 0), a.get("n_nilm", 0)),
                f"{_pct(a.get('sensitivity'))}",
                f"{a.get('n_abnormal_set_aside', 0):,}",
                f"{a.get('n_hsil_plus_set_aside', 0):,}",
            ]
        )
    states = ["negative", "review", "priority", "unsatisfactory"]
    by_label = [
        [label, *[f"{counts.get(s, 0):,}" for s in states]] for label, counts in m["triage_by_label"].items()
    ]
    tables = [
        _Table("Headline", ["metric", "value"], head),
        _Table("Triage (positive = review or priority)", _BINARY_HEADER, [_binary_row("triage", tri)]),
        _Table(
            "Set aside as 'no further review' (score strictly below the threshold)",
            [
                "keeping",
                "threshold",
                "slides set aside",
                "NILM set aside",
                "sensitivity",
                "abnormal set aside",
                "HSIL+ set aside",
            ],
            aside_rows,
        ),
        _Table("Triage by label", ["label", *states], by_label),
    ]
    problems = [[d.get("slide", ""), d.get("label") or "", d.get("reason", "")] for d in m["missing_output"]]
    problems += [[d.get("slide", ""), "", d.get("reason", "")] for d in m["missing_label"]]
    if problems:
        tables.append(_Table("Not evaluated", ["slide", "label", "reason"], problems, left=3))
    return tables


def _tables(metrics: Mapping[str, Any]) -> list[_Table]:
    kind = metrics.get("kind")
    if kind == "classification":
        return _classification_tables(metrics)
    if kind == "slide_evaluation":
        return _slide_tables(metrics)
    raise ValueError(f"unknown metrics kind {kind!r}")


def _text_table(table: _Table) -> str:
    rows = [table.header, *table.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(table.header))]
    lines = [table.title]
    for j, row in enumerate(rows):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  " + "  ".join(cells).rstrip())
        if j == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_metrics_table(metrics: Mapping[str, Any]) -> str:
    """Plain-text tables of a metrics dict (cell-level or slide-level) for a terminal."""
    return "\n\n".join(_text_table(t) for t in _tables(metrics))


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:980px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th.l,td.l{text-align:left}th{background:#f3f3f3}
img{max-width:100%;border:1px solid #eee}.meta{color:#666;font-size:.85em}
"""


def _html_table(table: _Table) -> str:
    def cell(tag: str, i: int, text: str) -> str:
        cls = ' class="l"' if i < table.left else ""
        return f"<{tag}{cls}>{html.escape(text)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(table.header))
    body = "".join(
        "<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in table.rows
    )
    return f"<h2>{html.escape(table.title)}</h2>\n<table><tr>{head}</tr>{body}</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<h2>{html.escape(alt)}</h2>\n<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _evaluation_notes(data: Mapping[str, Any]) -> list[str]:
    """How a cell-level evaluation's data reached the model (``evaluation`` of ``evaluate_bundles``)."""
    ev = data.get("evaluation") or {}
    notes = []
    sc = ev.get("screened_cells")
    if sc:
        notes.append(
            f"{sc['n']:,} cells of crop folders were pasted into slides and cut as screening cuts them; "
            f"{sc['detected']:,} were found by the localizer (the others count as negative calls; per "
            "class: "
            + ", ".join(f"{c} {k}/{n}" for c, (k, n) in (sc.get("detected_by_class") or {}).items())
            + "). A cell is scored by its most abnormal detection."
        )
    pooled = ev.get("pooled_into") or {}
    if pooled:
        notes.append(
            "Bundle classes absent from the data counted as present ones: "
            + ", ".join(f"{a} as {b}" for a, b in pooled.items())
            + "."
        )
    return notes


def write_metrics_report(metrics: Mapping[str, Any], out_dir: str | Path, *, title: str) -> dict[str, Path]:
    """Write ``metrics.json``, the plots and a self-contained ``report.html`` into ``out_dir``.

    Cell-level metrics get ``confusion_matrix.png`` and ``reliability.png``; slide-level evaluations
    (:func:`wsi_screen.evaluation.evaluate_slides`) get ``roc.png``. Returns ``{name: path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = jsonable(metrics)
    written: dict[str, Path] = {"json": out / "metrics.json"}
    written["json"].write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    images: list[tuple[Path, str]] = []
    if data.get("kind") == "classification":
        written["confusion_matrix"] = plot_confusion_matrix(
            data["confusion_matrix"], data["class_names"], out / "confusion_matrix.png"
        )
        images.append((written["confusion_matrix"], "Confusion matrix"))
        written["reliability"] = plot_reliability(data["calibration"], out / "reliability.png")
        images.append((written["reliability"], "Calibration (reliability diagram)"))
    elif data.get("kind") == "slide_evaluation":
        roc = dict(data["ranking"]["roc"], auroc=data["ranking"]["auroc"])
        points: dict[str, tuple[float, float]] = {}
        tri = data["triage"]
        if tri["sensitivity"] is not None and tri["specificity"] is not None:
            points["triage decision"] = (1.0 - tri["specificity"], tri["sensitivity"])
        hp = data["set_aside"]["hsil_plus_100"]
        if hp["nilm_fraction"] is not None and hp["sensitivity"] is not None:
            label = f"all HSIL+ kept ({_pct(hp['fraction'])} set aside)"
            points[label] = (1.0 - hp["nilm_fraction"], hp["sensitivity"])
        if roc["fpr"] and None not in roc["fpr"] and None not in roc["tpr"]:
            written["roc"] = plot_roc(
                roc, out / "roc.png", title="Slide ranking score: abnormal vs NILM", points=points
            )
            images.append((written["roc"], "ROC of the slide score"))
        else:
            logger.warning("no ROC plot: the evaluated slides lack abnormal or NILM slides")
    tables = _tables(data)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        _html_table(tables[0]),
        *[_img(p, alt) for p, alt in images],
        *[_html_table(t) for t in tables[1:]],
        *[f'<p class="meta">{html.escape(n)}</p>' for n in _evaluation_notes(data)],
        '<p class="meta">Definitions: docs/training.md, section "Metrics". Raw numbers: metrics.json.</p>',
        "</body></html>",
    ]
    written["html"] = out / "report.html"
    written["html"].write_text("\n".join(parts) + "\n", encoding="utf-8")
    return written
