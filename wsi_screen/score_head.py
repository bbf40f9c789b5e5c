"""A bundle's score head: the abnormality score refitted from the CNN's score and the nucleus.

The classifier sees a 56 µm crop; the localizer measures the nucleus under it (area in µm², optical
density, shape: :data:`wsi_screen.cells.MORPHOMETRICS`). Bethesda grades on exactly those measures
(an ASC-US nucleus is 2.5–3 × an intermediate cell's, HSIL has a high N:C ratio), so a bundle may
carry a *score head*: a logistic regression on ``logit(CNN abnormality score)`` and the transformed,
standardized morphometrics. It replaces the abnormal probability mass of each cell's class
probabilities, keeping the proportions within the abnormal classes and within the others, so
``abnormality_score`` (the summed abnormal probability), the arg-max and every later stage read the
refitted score without knowing the head exists.

Pure numpy: a dozen coefficients, fitted by Newton's method (:func:`fit_logistic`). scikit-learn
would do the same fit, but it is a test extra, not a runtime dependency of the package.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_screen.cells import MORPHOMETRICS

__all__ = ["TRANSFORMS", "ScoreHead", "fit_logistic", "fit_score_head"]

#: How a morphometric enters the regression: ``log`` for sizes and ratios (they are log-normal and
#: their effect is multiplicative), ``identity`` for bounded shape measures.
Transform = Literal["log", "identity"]
TRANSFORMS: tuple[str, ...] = ("log", "identity")
#: The CNN score is clipped to [EPS, 1 − EPS] before its logit (float32 softmax saturates).
EPS = 1e-6


def _logit(p: NDArray[Any]) -> NDArray[np.float64]:
    q = np.clip(np.asarray(p, np.float64), EPS, 1.0 - EPS)
    return np.log(q) - np.log1p(-q)


def _sigmoid(z: NDArray[Any]) -> NDArray[np.float64]:
    z = np.asarray(z, np.float64)
    out: NDArray[np.float64] = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


@dataclass(frozen=True)
class ScoreHead:
    """Logistic regression on ``[logit(score), standardized transformed morphometrics]``.

    ``center`` (the training median of each transformed feature) also replaces a missing (NaN or
    non-positive under ``log``) measurement, so a cell without one is scored as a typical cell.
    """

    features: tuple[str, ...]
    transforms: tuple[str, ...]
    center: tuple[float, ...]
    scale: tuple[float, ...]
    coef_score: float
    coef: tuple[float, ...]
    intercept: float

    def __post_init__(self) -> None:
        n = len(self.features)
        if not n:
            raise ValueError("a score head needs at least one morphometric feature")
        unknown = [f for f in self.features if f not in MORPHOMETRICS]
        if unknown:
            raise ValueError(f"unknown morphometric(s) {unknown}; known: {', '.join(MORPHOMETRICS)}")
        bad = [t for t in self.transforms if t not in TRANSFORMS]
        if bad:
            raise ValueError(f"unknown transform(s) {bad}; known: {', '.join(TRANSFORMS)}")
        for name in ("transforms", "center", "scale", "coef"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"score head: {name} has {len(getattr(self, name))} entries, expected {n}")
        if any(not (s > 0 and math.isfinite(s)) for s in self.scale):
            raise ValueError(f"score head: scale must be positive and finite, got {self.scale}")
        values = (*self.center, *self.coef, self.coef_score, self.intercept)
        if not all(math.isfinite(v) for v in values):
            raise ValueError("score head: every coefficient must be finite")

    # -- (de)serialization (bundle.json → inference.score_head) -----------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "features": list(self.features),
            "transforms": list(self.transforms),
            "center": list(self.center),
            "scale": list(self.scale),
            "coef_score": self.coef_score,
            "coef": list(self.coef),
            "intercept": self.intercept,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ScoreHead:
        keys = {"features", "transforms", "center", "scale", "coef_score", "coef", "intercept"}
        missing = sorted(keys - set(data))
        extra = sorted(set(data) - keys)
        if missing or extra:
            raise ValueError(f"score head: missing keys {missing}, unknown keys {extra}")
        return cls(
            features=tuple(str(f) for f in data["features"]),
            transforms=tuple(str(t) for t in data["transforms"]),
            center=tuple(float(v) for v in data["center"]),
            scale=tuple(float(v) for v in data["scale"]),
            coef_score=float(data["coef_score"]),
            coef=tuple(float(v) for v in data["coef"]),
            intercept=float(data["intercept"]),
        )

    # -- inference -------------------------------------------------------------------------------
    def design(self, morphometrics: Mapping[str, NDArray[Any]], n: int) -> NDArray[np.float64]:
        """The standardized feature matrix (n, F); missing values take the centre (0 after it)."""
        return _design(morphometrics, n, self.features, self.transforms, self.center, self.scale)

    def abnormal_probability(
        self, score: NDArray[Any], morphometrics: Mapping[str, NDArray[Any]]
    ) -> NDArray[np.float64]:
        """The refitted abnormality score of each cell, in (0, 1)."""
        score = np.asarray(score, np.float64)
        x = self.design(morphometrics, len(score))
        z = self.intercept + self.coef_score * _logit(score) + x @ np.asarray(self.coef, np.float64)
        return _sigmoid(z)

    def apply(
        self,
        probs: NDArray[Any],
        abnormal_index: Sequence[int],
        morphometrics: Mapping[str, NDArray[Any]],
    ) -> NDArray[np.float32]:
        """Class probabilities whose abnormal mass is the refitted score.

        Within the abnormal classes, and within the others, the proportions stay; where a group had
        no mass at all, the new mass is shared equally among its classes.
        """
        probs = np.asarray(probs, np.float64)
        k = probs.shape[1]
        abn = np.zeros(k, bool)
        abn[list(abnormal_index)] = True
        if not abn.any() or abn.all():
            raise ValueError("a score head needs abnormal and other classes")
        mass = probs[:, abn].sum(axis=1)
        q = self.abnormal_probability(mass, morphometrics)
        out = np.empty_like(probs)
        for group, new in ((abn, q), (~abn, 1.0 - q)):
            part = probs[:, group]
            total = part.sum(axis=1, keepdims=True)
            share = np.where(total > 0, part / np.where(total > 0, total, 1.0), 1.0 / group.sum())
            out[:, group] = share * new[:, None]
        return out.astype(np.float32)


def _transformed(values: NDArray[Any], transform: str) -> NDArray[np.float64]:
    v = np.asarray(values, np.float64)
    if transform == "log":
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(v > 0, np.log(np.where(v > 0, v, 1.0)), np.nan)
    return v


def _design(
    morphometrics: Mapping[str, NDArray[Any]],
    n: int,
    features: Sequence[str],
    transforms: Sequence[str],
    center: Sequence[float],
    scale: Sequence[float],
) -> NDArray[np.float64]:
    x = np.zeros((n, len(features)), np.float64)
    for j, (name, tr) in enumerate(zip(features, transforms, strict=True)):
        if name not in morphometrics:
            raise KeyError(f"the score head needs the morphometric {name!r}, which the cells lack")
        col = _transformed(morphometrics[name], tr)
        if col.shape != (n,):
            raise ValueError(f"morphometric {name} has shape {col.shape}, expected ({n},)")
        col = np.where(np.isfinite(col), col, center[j])
        x[:, j] = (col - center[j]) / scale[j]
    return x


def fit_logistic(
    x: NDArray[Any],
    y: NDArray[Any],
    *,
    l2: float = 1.0,
    sample_weight: NDArray[Any] | None = None,
    max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[NDArray[np.float64], float]:
    """L2-penalized logistic regression by Newton's method: (coefficients, intercept).

    The penalty ``l2 / 2 · |w|²`` spares the intercept; weights are normalized to mean 1, so ``l2``
    means the same for any sample size. The objective is strictly convex for ``l2 > 0``.
    """
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    n, f = x.shape
    if n == 0 or len(y) != n:
        raise ValueError(f"need as many labels as rows (rows {n}, labels {len(y)})")
    if l2 <= 0:
        raise ValueError(f"l2 must be positive, got {l2}")
    w = np.ones(n) if sample_weight is None else np.asarray(sample_weight, np.float64)
    w = w * (n / w.sum())
    a = np.hstack([np.ones((n, 1)), x])
    beta = np.zeros(f + 1)
    pen = np.full(f + 1, l2)
    pen[0] = 0.0
    for _ in range(max_iter):
        p = _sigmoid(a @ beta)
        grad = a.T @ (w * (p - y)) + pen * beta
        hess = (a * (w * p * (1 - p))[:, None]).T @ a + np.diag(pen) + 1e-12 * np.eye(f + 1)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if float(np.abs(step).max()) < tol:
            break
    return beta[1:].copy(), float(beta[0])


def fit_score_head(
    score: NDArray[Any],
    morphometrics: Mapping[str, NDArray[Any]],
    positive: NDArray[Any],
    *,
    features: Sequence[str],
    transforms: Sequence[str],
    l2: float = 1.0,
    sample_weight: NDArray[Any] | None = None,
) -> ScoreHead:
    """Fit a :class:`ScoreHead` on cells with a CNN ``score``, their morphometrics and a binary truth
    (``positive``: abnormal). Centre and scale are the median and the interquartile range / 1.349
    (a robust standard deviation) of each transformed feature over the fitting cells."""
    score = np.asarray(score, np.float64)
    n = len(score)
    center: list[float] = []
    scale: list[float] = []
    for name, tr in zip(features, transforms, strict=True):
        col = _transformed(morphometrics[name], tr)
        col = col[np.isfinite(col)]
        if len(col) < 2:
            raise ValueError(f"morphometric {name}: fewer than 2 finite values to fit on")
        q25, q50, q75 = np.percentile(col, [25, 50, 75])
        center.append(float(q50))
        spread = float(q75 - q25) / 1.349
        scale.append(spread if spread > 0 else float(np.std(col)) or 1.0)
    x = _design(morphometrics, n, features, transforms, center, scale)
    design = np.hstack([_logit(score)[:, None], x])
    coef, intercept = fit_logistic(design, np.asarray(positive, bool), l2=l2, sample_weight=sample_weight)
    return ScoreHead(
        features=tuple(features),
        transforms=tuple(transforms),
        center=tuple(center),
        scale=tuple(scale),
        coef_score=float(coef[0]),
        coef=tuple(float(c) for c in coef[1:]),
        intercept=intercept,
    )
