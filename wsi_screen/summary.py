"""Slide-level triage: ``summary.json`` from the per-cell predictions (a pure function).

The rules, each threshold coming from :class:`~wsi_screen.config.TriageSettings` and
:class:`~wsi_screen.config.AdequacySettings` (see ``docs/outputs.md`` for the full explanation):

* a cell is **confident** when its arg-max probability is at least ``triage.confidence``;
* **suggested category**: the most severe category (by ``triage.severity``) among those in
  ``triage.min_cells`` with at least that many confident cells, else ``NILM``;
* **score** (ranking, in [0, 1]): each cell's *severity score* is the severity-weighted sum of its
  abnormal-class probabilities, ``s = Σ_c severity[c] · p_c``; the slide score is the mean of the
  ``triage.top_k`` highest cell severity scores, counting missing cells as 0 when the slide has fewer
  than ``top_k`` cells. Adding a cell can never lower it;
* **adequacy**: well-preserved squamous cells = cells not predicted as ``adequacy.exclude_classes``
  whose top probability is at least ``adequacy.min_confidence``, against
  ``adequacy.min_squamous_cells`` (5,000 LBC, 8,000 conventional);
* **triage**: ``priority`` for a category in ``triage.priority_categories`` or a score ≥
  ``triage.priority_score`` (when set); ``review`` for any other abnormal category or a score ≥
  ``triage.review_score``; otherwise ``unsatisfactory`` when the slide has no cells or is inadequate
  without a confident abnormal cell and without any cell whose abnormality score reaches
  ``triage.inadequate_abnormal_score`` (Bethesda: a specimen with abnormal cells is never
  unsatisfactory — such slides go to ``review``); otherwise ``negative``. ``triage_rule`` names the
  rule that decided;
* **operating point**: ``settings.operating_point`` (calibrated by ``wsi-screen calibrate``, or the
  uncalibrated defaults, said so) is copied into the summary.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen.cells import CellTable, abnormality_score, predicted_labels
from wsi_screen.config import Settings

__all__ = [
    "NEGATIVE_CATEGORY",
    "SUMMARY_SCHEMA_VERSION",
    "TRIAGE_LEVELS",
    "ranking_score",
    "severity_scores",
    "summarize",
    "top_cell_indices",
    "write_summary",
]

logger = logging.getLogger(__name__)

SUMMARY_SCHEMA_VERSION = 1
NEGATIVE_CATEGORY = "NILM"
#: Triage outcomes, most urgent first.
TRIAGE_LEVELS = ("priority", "review", "unsatisfactory", "negative")


#: The class of organisms (NILM under Bethesda): a slide finding, not an abnormal cell.
ORGANISM_CLASS = "organism"
#: The class of normal endocervical (columnar) cells: NILM, not squamous; their presence is the
#: transformation-zone component of the Bethesda adequacy statement.
ENDOCERVICAL_CLASS = "endocervical"
#: Excluded classes that are real, well-preserved NILM cells rather than artifacts.
_NOT_ARTIFACT = (ORGANISM_CLASS, ENDOCERVICAL_CLASS)


def _finite(value: float, ndigits: int = 6) -> float | None:
    v = float(value)
    return round(v, ndigits) if math.isfinite(v) else None


def severity_scores(
    probs: NDArray[Any],
    class_names: Sequence[str],
    abnormal_classes: Sequence[str],
    severity: Mapping[str, float],
) -> NDArray[np.float32]:
    """Per-cell severity score ``Σ_c severity[c] · p_c`` over the abnormal classes (unlisted: 1.0)."""
    names = list(class_names)
    n = probs.shape[0]
    out = np.zeros(n, np.float64)
    for c in abnormal_classes:
        if c not in names:
            raise ValueError(f"abnormal class {c!r} is not among {names}")
        out += float(severity.get(c, 1.0)) * probs[:, names.index(c)].astype(np.float64)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def ranking_score(cell_scores: NDArray[Any], top_k: int) -> float:
    """Mean of the ``top_k`` highest cell scores, missing cells counting as 0 (monotone in cells)."""
    if top_k < 1:
        raise ValueError(f"top_k must be ≥ 1, got {top_k}")
    values = np.asarray(cell_scores, np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0
    k = min(top_k, values.size)
    top = np.partition(values, values.size - k)[values.size - k :]
    return float(np.clip(top.sum() / top_k, 0.0, 1.0))


def top_cell_indices(
    score: NDArray[Any], n: int, *, tiebreak: NDArray[Any] | None = None
) -> NDArray[np.int64]:
    """Indices of the ``n`` highest scores, highest first (ties: ``tiebreak`` desc, then index)."""
    m = len(score)
    if n <= 0 or m == 0:
        return np.zeros(0, np.int64)
    s = np.nan_to_num(np.asarray(score, np.float64), nan=-1.0)
    if n < m:
        # Candidates: everything at or above the n-th largest score (keeps ties for the sort below).
        kth = np.partition(s, m - n)[m - n]
        cand = np.flatnonzero(s >= kth)
    else:
        cand = np.arange(m)
    tb = np.zeros(len(cand)) if tiebreak is None else -np.asarray(tiebreak, np.float64)[cand]
    order = np.lexsort((cand, tb, -s[cand]))
    return cand[order][:n].astype(np.int64)


def _category(
    confident: Mapping[str, int], min_cells: Mapping[str, int], severity: Mapping[str, float]
) -> str:
    supported = [c for c, need in min_cells.items() if confident.get(c, 0) >= need]
    if not supported:
        return NEGATIVE_CATEGORY
    order = list(min_cells)
    # Most severe first; equal severities keep the order given in min_cells.
    return max(supported, key=lambda c: (float(severity.get(c, 1.0)), -order.index(c)))


def _check(
    flagged: bool, value: float | None, op: str, threshold: float, unit: str, message: str
) -> dict[str, Any]:
    """One QC check: flagged when ``value op threshold`` (``op`` is ``<`` or ``>``)."""
    return {
        "flagged": bool(flagged),
        "value": value,
        "threshold": threshold,
        "unit": unit,
        "rule": f"flagged if {op} {threshold:g} {unit}",
        "message": message,
    }


def _stain_check(check: Mapping[str, Any]) -> dict[str, Any]:
    """The ``stain_implausible`` QC check from :func:`wsi_screen.stain.check_source`'s result."""
    bounds = check.get("bounds") or {}
    flagged = not bool(check.get("plausible", True))
    skipped = not bool(check.get("normalized", not flagged))
    spread = math.exp(float(check.get("log_sigma_ratio", 0.0)))
    spread_max = math.exp(float(bounds.get("log_sigma_ratio", 0.0)))
    message = (
        f"the slide's stain statistics (its cell pixels, lαβ) are far from every stain the models "
        f"know: means {float(check.get('mu_sigmas', 0.0)):.1f} target σ off (plausible ≤ "
        f"{float(bounds.get('mu_sigmas', 0.0)):g}), spread ×{spread:.2f} (plausible ×{spread_max:.3g} "
        "either way). "
        + ("Reinhard normalization was skipped for this slide. " if skipped else "")
        + "Check the slide for ink, scanner fill or an unusual stain before trusting the result"
    )
    out = _check(
        flagged,
        _finite(float(check.get("distance", 0.0)), 4),
        ">",
        1.0,
        "× the plausible distance",
        message,
    )
    out["normalized"] = not skipped
    return out


def summarize(
    cells: CellTable,
    *,
    class_names: Sequence[str],
    abnormal_classes: Sequence[str],
    settings: Settings,
    cellular_area_mm2: float,
    tiles_total: int,
    tiles_unreadable: int,
    tiles_out_of_focus: int,
    timings: Mapping[str, Any],
    versions: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    stain_check: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build the ``summary.json`` dictionary of one slide (strict JSON: no NaN).

    Args:
        cells: the classified cells (``probs`` N × len(class_names)).
        class_names: classifier classes.
        abnormal_classes: classes that make a cell abnormal (summed into the cell ``score``).
        settings: resolved settings (``triage``, ``adequacy`` and ``output.top_n`` are used).
        cellular_area_mm2: cellular area found on the thumbnail.
        tiles_total: tiles processed (kept by the tissue mask).
        tiles_unreadable: of those, tiles that could not be decoded.
        tiles_out_of_focus: of those, tiles judged out of focus.
        timings: seconds per stage, copied as is.
        versions: package and model versions, copied as is.
        extra: further top-level keys (e.g. ``slide``, ``slide_id``); may not replace computed keys.
        stain_check: the plausibility of the slide's stain source statistics
            (:func:`wsi_screen.stain.check_source`, with ``normalized``: whether Reinhard ran); adds
            the ``stain_implausible`` QC check.
    """
    tri, ade = settings.triage, settings.adequacy
    names = [str(c) for c in class_names]
    n = len(cells)
    probs = np.asarray(cells.probs, np.float32)
    if probs.shape != (n, len(names)):
        raise ValueError(f"cells.probs must be {n}×{len(names)}, got {probs.shape}")
    missing = [c for c in abnormal_classes if c not in names]
    if missing:
        raise ValueError(f"abnormal classes {missing} are not among {names}")
    if min(tiles_total, tiles_unreadable, tiles_out_of_focus) < 0:
        raise ValueError("tile counts must be ≥ 0")

    labels = predicted_labels(probs)
    top_prob = probs.max(axis=1) if n else np.zeros(0, np.float32)
    score = abnormality_score(probs, names, list(abnormal_classes))
    sev = severity_scores(probs, names, list(abnormal_classes), tri.severity)
    confident_mask = top_prob >= tri.confidence

    predicted = np.bincount(labels, minlength=len(names)) if n else np.zeros(len(names), np.int64)
    confident = (
        np.bincount(labels[confident_mask], minlength=len(names)) if n else np.zeros(len(names), np.int64)
    )
    predicted_counts = {c: int(predicted[i]) for i, c in enumerate(names)}
    confident_counts = {c: int(confident[i]) for i, c in enumerate(names)}

    # -- category and score -------------------------------------------------------------------------
    min_cells = {c: k for c, k in tri.min_cells.items() if c in names}
    ignored = sorted(set(tri.min_cells) - set(min_cells))
    if ignored:
        logger.debug("triage.min_cells classes %s are not among the model's classes", ignored)
    category = _category(confident_counts, min_cells, tri.severity)
    slide_score = ranking_score(sev, tri.top_k)
    n_confident_abnormal = sum(confident_counts[c] for c in abnormal_classes)
    # Low-confidence abnormal cells too keep an inadequate slide out of "unsatisfactory".
    max_cell_score = float(np.max(score)) if n else 0.0
    n_possible_abnormal = int(np.count_nonzero(score >= tri.inadequate_abnormal_score)) if n else 0

    # -- adequacy ----------------------------------------------------------------------------------
    excluded = [c for c in ade.exclude_classes if c in names]
    excluded_idx = [names.index(c) for c in excluded]
    is_excluded = np.isin(labels, excluded_idx) if n else np.zeros(0, bool)
    squamous = int(np.count_nonzero(~is_excluded & (top_prob >= ade.min_confidence)))
    adequate = n > 0 and squamous >= ade.min_squamous_cells
    adequacy = {
        "preparation": ade.preparation,
        "squamous_cells": squamous,
        "threshold": ade.min_squamous_cells,
        "adequate": bool(adequate),
        "min_confidence": ade.min_confidence,
        "excluded_classes": excluded,
    }

    # -- QC ---------------------------------------------------------------------------------------
    # Organisms and endocervical cells are excluded from the squamous count but are no artifact: the
    # artifact fraction counts the other excluded classes.
    artifact_like = [names.index(c) for c in excluded if c not in _NOT_ARTIFACT]
    artifact_fraction = float(np.isin(labels, artifact_like).mean()) if n else None
    oof = tiles_out_of_focus / tiles_total if tiles_total else 0.0
    unread = tiles_unreadable / tiles_total if tiles_total else 0.0
    checks = {
        "no_cells": _check(n == 0, n, "<", 1, "cells", "no cells were found"),
        "low_cellular_area": _check(
            cellular_area_mm2 < tri.min_cellular_area_mm2,
            _finite(cellular_area_mm2, 4),
            "<",
            tri.min_cellular_area_mm2,
            "mm²",
            "little cellular material was found on the slide",
        ),
        "high_artifact_fraction": _check(
            artifact_fraction is not None and artifact_fraction > tri.max_artifact_fraction,
            None if artifact_fraction is None else round(artifact_fraction, 4),
            ">",
            tri.max_artifact_fraction,
            "fraction of cells",
            "many cells are predicted as "
            + (", ".join(c for c in excluded if c not in _NOT_ARTIFACT) or "artifact"),
        ),
        "out_of_focus_tiles": _check(
            oof > tri.max_out_of_focus_fraction,
            round(oof, 4),
            ">",
            tri.max_out_of_focus_fraction,
            "fraction of tiles",
            f"{tiles_out_of_focus} of {tiles_total} processed tiles are out of focus",
        ),
        "unreadable_tiles": _check(
            unread > tri.max_unreadable_fraction,
            round(unread, 4),
            ">",
            tri.max_unreadable_fraction,
            "fraction of tiles",
            f"{tiles_unreadable} of {tiles_total} processed tiles could not be read",
        ),
    }
    if stain_check is not None:
        checks["stain_implausible"] = _stain_check(stain_check)
    qc = {"flags": [k for k, v in checks.items() if v["flagged"]], "checks": checks}

    # -- triage -----------------------------------------------------------------------------------
    if category in tri.priority_categories:
        triage, rule = "priority", "priority_category"
        reason = f"{confident_counts[category]} confident {category} cells (≥ {min_cells[category]})"
    elif tri.priority_score is not None and slide_score >= tri.priority_score:
        triage, rule = "priority", "priority_score"
        reason = f"ranking score {slide_score:.3f} ≥ {tri.priority_score} (triage.priority_score)"
    elif category != NEGATIVE_CATEGORY:
        triage, rule = "review", "review_category"
        reason = f"{confident_counts[category]} confident {category} cells (≥ {min_cells[category]})"
    elif slide_score >= tri.review_score:
        triage, rule = "review", "review_score"
        reason = f"ranking score {slide_score:.3f} ≥ {tri.review_score}"
    elif n == 0:
        triage, rule = "unsatisfactory", "no_cells"
        reason = "no cells were found"
    elif not adequate and n_confident_abnormal == 0 and n_possible_abnormal == 0:
        triage, rule = "unsatisfactory", "inadequate"
        reason = (
            f"{squamous} well-preserved squamous cells < {ade.min_squamous_cells} "
            f"(adequacy.min_squamous_cells) and no abnormal cells: none confident, highest cell "
            f"abnormality score {max_cell_score:.3f} < {tri.inadequate_abnormal_score} "
            "(triage.inadequate_abnormal_score)"
        )
    elif not adequate:
        triage, rule = "review", "inadequate_abnormal"
        reason = (
            f"{squamous} well-preserved squamous cells < {ade.min_squamous_cells}, but "
            f"{n_confident_abnormal} confident abnormal cells and {n_possible_abnormal} cells with an "
            f"abnormality score ≥ {tri.inadequate_abnormal_score} (never unsatisfactory with abnormal cells)"
        )
    else:
        triage, rule = "negative", "negative"
        reason = f"no category supported and ranking score {slide_score:.3f} < {tri.review_score}"
    if triage in ("priority", "review") and not adequate:
        reason += "; specimen below the adequacy threshold"

    # -- findings (NILM: reported, never a reason for review) ---------------------------------------
    def finding(cls: str, threshold: int, note: str) -> dict[str, Any]:
        n_cls = int(confident_counts.get(cls, 0))
        return {
            "available": cls in names,
            "confident_cells": n_cls,
            "present": bool(cls in names and n_cls >= threshold),
            "threshold": threshold,
            "note": note,
        }

    organisms = finding(
        ORGANISM_CLASS,
        tri.min_organism_cells,
        "organisms (trichomonas, candida, shift in flora, herpes, actinomyces) are NILM",
    )
    endocervical = finding(
        ENDOCERVICAL_CLASS,
        tri.min_endocervical_cells,
        "normal endocervical cells are NILM; present = the transformation-zone component of the "
        "Bethesda adequacy statement (>= threshold well-preserved cells)",
    )

    # -- top cells --------------------------------------------------------------------------------
    top = top_cell_indices(score, settings.output.top_n, tiebreak=sev)
    morph_names = list(cells.morphometrics)
    top_cells = []
    for rank, i in enumerate(top.tolist(), start=1):
        top_cells.append(
            {
                "rank": rank,
                "index": int(i),
                "x": round(float(cells.x[i]), 2),
                "y": round(float(cells.y[i]), 2),
                "class": names[int(labels[i])],
                "confident": bool(confident_mask[i]),
                "score": _finite(score[i], 4),
                "severity_score": _finite(sev[i], 4),
                "probs": {c: _finite(probs[i, j], 4) for j, c in enumerate(names)},
                "tile": int(cells.tile[i]),
                "morphometrics": {k: _finite(cells.morphometrics[k][i], 4) for k in morph_names},
            }
        )

    summary: dict[str, Any] = {
        "schema_version": SUMMARY_SCHEMA_VERSION,
        "triage": triage,
        "triage_reason": reason,
        "triage_rule": rule,
        "suggested_category": category,
        "score": round(slide_score, 6),
        "n_cells": n,
        "class_names": names,
        "abnormal_classes": list(abnormal_classes),
        "class_counts": {"predicted": predicted_counts, "confident": confident_counts},
        "abnormal_cells": {
            "confident": int(n_confident_abnormal),
            "max_score": _finite(max_cell_score, 6),
            "threshold": tri.inadequate_abnormal_score,
            "above_threshold": n_possible_abnormal,
        },
        "adequacy": adequacy,
        "qc": qc,
        "findings": {"organisms": organisms, "endocervical": endocervical},
        "cellular_area_mm2": _finite(cellular_area_mm2, 4),
        "tiles": {
            "processed": int(tiles_total),
            "unreadable": int(tiles_unreadable),
            "out_of_focus": int(tiles_out_of_focus),
        },
        "rules": {"triage": settings.triage.model_dump(mode="json"), "adequacy": ade.model_dump(mode="json")},
        "operating_point": settings.operating_point.describe(settings.triage),
        "top_cells": top_cells,
        "timings": dict(timings),
        "versions": dict(versions),
    }
    for key, value in (extra or {}).items():
        if key in summary:
            raise ValueError(f"extra key {key!r} would replace a computed summary key")
        summary[key] = value
    return summary


def write_summary(path: str | Path, summary: Mapping[str, Any]) -> Path:
    """Write ``summary.json`` (strict JSON: NaN/Infinity are an error) via a temporary sibling."""
    from wsi_screen.jsonio import write_json

    return write_json(path, summary, ensure_ascii=False, default=None)
