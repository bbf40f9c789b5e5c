"""Slide triage calibration: review and priority thresholds chosen on diagnosed validation slides.

:func:`calibrate` reads every slide's ``summary.json`` of a batch output (``wsi-screen batch``), joins a
CSV of slide diagnoses (columns ``slide`` and ``diagnosis`` or ``label``; read and normalised by
:mod:`wsi_screen.evaluation`) and chooses, on the slide ranking ``score``:

* ``triage.review_score``, the lowest review threshold that still keeps the targets — by default every
  HSIL+ slide and ≥ 98 % of the ASC-US+ slides *kept* (triage ``review`` or ``priority``; an
  ``unsatisfactory`` slide is not kept) — placed halfway between the abnormal slide it must keep and
  the highest NILM score below it, so that it sets aside as many NILM slides as the targets allow;
* ``triage.priority_score`` (never below the review threshold), placed likewise so that a share of
  the HSIL+ slides (default 90 %) is triaged ``priority``.

The triage of each slide under candidate thresholds is recomputed from its summary with the rules of
:func:`wsi_screen.summary.summarize` (the suggested category, adequacy and abnormal cells do not
depend on the thresholds). It reports the exact one-sided Clopper–Pearson lower bound of each achieved
sensitivity, the slides a lab needs for a wanted bound, the share of NILM slides set aside, the slide
AUROC and the ROC, and writes ``calibration.json``, ``calibration.html`` and ``operating-point.yaml``,
a config file that ``wsi-screen run``/``batch`` take with ``--config``.

:func:`validate_operating_point` measures an existing operating point on another diagnosed batch
screened with the same models (a transfer check; nothing is re-screened). Definitions and the
arithmetic: ``docs/calibration.md``.
"""

from __future__ import annotations

import html
import json
import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from numpy.typing import NDArray

from wsi_screen import __version__
from wsi_screen.config import (
    ModelIdentity,
    OperatingPointFigure,
    OperatingPointSettings,
    OperatingPointTarget,
    Settings,
    TriageSettings,
    load_settings,
)
from wsi_screen.errors import CalibrationError, ConfigError
from wsi_screen.evaluation import (
    LABELS,
    UNSATISFACTORY_LABEL,
    _collect_outputs,
    _Index,
    normalize_label,
    read_labels_csv,
)
from wsi_screen.jsonio import atomic_write_text
from wsi_screen.metrics import (
    binary_auroc,
    clopper_pearson_lower,
    jsonable,
    roc_curve,
    slides_needed,
    wilson_interval,
)

__all__ = [
    "DEFAULT_HIGH_GRADE",
    "DEFAULT_WANTED_BOUNDS",
    "PRESET_FILE",
    "CalibrationBatch",
    "CalibrationSlide",
    "CalibrationTarget",
    "calibrate",
    "calibration_html",
    "format_calibration",
    "load_calibration_batch",
    "parse_high_grade",
    "preset_yaml",
    "simulate_triage",
    "validate_operating_point",
    "write_calibration",
]

logger = logging.getLogger(__name__)

#: Diagnoses counted as HSIL+ (high-grade squamous lesion or worse) unless told otherwise.
DEFAULT_HIGH_GRADE: tuple[str, ...] = ("HSIL", "SCC", "AIS", "ADENOCARCINOMA")
#: Lower bounds for which the slides needed are reported.
DEFAULT_WANTED_BOUNDS: tuple[float, ...] = (0.90, 0.95, 0.98, 0.99)
PRESET_FILE = "operating-point.yaml"
#: Triage settings that define the suggested category and the score: a batch can only be calibrated or
#: validated against settings that share them (the thresholds can be recomputed, these cannot).
SCORE_RULES: tuple[str, ...] = ("confidence", "min_cells", "severity", "top_k")
#: Further triage settings the operating-point preset carries from the calibration batch.
_CARRIED_RULES: tuple[str, ...] = (*SCORE_RULES, "priority_categories", "review_categories")
_TRIAGES: tuple[str, ...] = ("priority", "review", "unsatisfactory", "negative")
_KEPT = frozenset({"priority", "review"})
_SHOW = 5  # unmatched names shown in an error message


@dataclass(frozen=True)
class CalibrationTarget:
    """What the thresholds must reach, and how much evidence calibration asks for."""

    hsil_plus: float = 1.0
    ascus_plus: float = 0.98
    priority: float = 0.9
    confidence: float = 0.95
    min_lower_bound: float = 0.90
    high_grade: tuple[str, ...] = DEFAULT_HIGH_GRADE
    wanted_bounds: tuple[float, ...] = DEFAULT_WANTED_BOUNDS

    def __post_init__(self) -> None:
        for name in ("hsil_plus", "ascus_plus", "priority"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise CalibrationError(f"target {name} must lie in [0, 1], got {v}")
        for name in ("confidence", "min_lower_bound"):
            v = getattr(self, name)
            if not 0.0 < v < 1.0:
                raise CalibrationError(f"{name} must lie in (0, 1), got {v}")
        bad = [b for b in self.wanted_bounds if not 0.0 < b < 1.0]
        if bad:
            raise CalibrationError(f"wanted lower bounds must lie in (0, 1), got {bad}")
        unknown = [g for g in self.high_grade if g not in LABELS or g == "NILM"]
        if unknown or not self.high_grade:
            raise CalibrationError(
                f"high-grade diagnoses must be abnormal Bethesda labels ({', '.join(LABELS[1:])}), "
                f"got {', '.join(unknown) or 'none'}"
            )

    def settings(self) -> OperatingPointTarget:
        """The ``operating_point.target`` section."""
        return OperatingPointTarget(
            hsil_plus=self.hsil_plus,
            ascus_plus=self.ascus_plus,
            priority=self.priority,
            confidence=self.confidence,
            high_grade=list(self.high_grade),
        )


@dataclass(frozen=True)
class CalibrationSlide:
    """What calibration needs of one diagnosed slide (from its ``summary.json``)."""

    slide_id: str
    slide: str
    diagnosis: str
    score: float
    category: str
    n_cells: int
    adequate: bool
    confident_abnormal: int
    max_cell_score: float | None  # highest cell abnormality score; None: not recorded
    triage: str  # as screened
    above: tuple[float, int] | None = None  # (threshold, cells with an abnormality score ≥ it) as screened

    @classmethod
    def from_summary(
        cls, slide_id: str, slide: str, diagnosis: str, s: Mapping[str, Any]
    ) -> CalibrationSlide:
        score = s.get("score")
        abnormal = [str(c) for c in s.get("abnormal_classes") or []]
        confident = ((s.get("class_counts") or {}).get("confident")) or {}
        cells = s.get("abnormal_cells")
        cells = cells if isinstance(cells, Mapping) else {}
        max_cell = cells.get("max_score")
        if max_cell is None:  # summaries written before abnormal_cells: the top cell is the highest
            top = s.get("top_cells") or []
            if top and isinstance(top[0], Mapping):
                max_cell = top[0].get("score")
            elif int(s.get("n_cells") or 0) == 0:
                max_cell = 0.0
        n_conf = cells.get("confident")
        above = None
        if isinstance(cells.get("threshold"), (int, float)) and isinstance(cells.get("above_threshold"), int):
            above = (float(cells["threshold"]), int(cells["above_threshold"]))
        if n_conf is None:
            n_conf = sum(int(confident.get(c, 0)) for c in abnormal)
        return cls(
            slide_id=slide_id,
            slide=slide,
            diagnosis=diagnosis,
            score=float(score) if isinstance(score, (int, float)) else 0.0,
            category=str(s.get("suggested_category") or "NILM"),
            n_cells=int(s.get("n_cells") or 0),
            adequate=bool((s.get("adequacy") or {}).get("adequate", False)),
            confident_abnormal=int(n_conf),
            max_cell_score=float(max_cell) if isinstance(max_cell, (int, float)) else None,
            triage=str(s.get("triage")),
            above=above,
        )


def simulate_triage(slide: CalibrationSlide, triage: TriageSettings) -> str:
    """The triage :func:`~wsi_screen.summary.summarize` gives ``slide`` under ``triage``'s thresholds.

    Valid when ``triage`` shares the batch's :data:`SCORE_RULES` (the category and score are then
    those of the summary).
    """
    if slide.category in triage.priority_categories:
        return "priority"
    if triage.priority_score is not None and slide.score >= triage.priority_score:
        return "priority"
    if slide.category != "NILM" or slide.score >= triage.review_score:
        return "review"
    if slide.n_cells == 0:
        return "unsatisfactory"
    if slide.above is not None and slide.above[0] == triage.inadequate_abnormal_score:
        possible = slide.above[1] > 0  # counted by summarize itself
    else:
        possible = (
            slide.max_cell_score is not None and slide.max_cell_score >= triage.inadequate_abnormal_score
        )
    if not slide.adequate:
        return "review" if slide.confident_abnormal > 0 or possible else "unsatisfactory"
    return "negative"


@dataclass
class CalibrationBatch:
    """The diagnosed slides of a batch output and what they were screened with."""

    batch_dir: Path
    diagnoses_csv: Path
    slides: list[CalibrationSlide]
    models: list[dict[str, Any]]
    rules: dict[str, Any]  # the batch's triage settings (summary.json rules.triage)
    adequacy: dict[str, Any]
    run_models: dict[str, Any]  # localization.model / classification.models as given to the batch
    excluded: list[dict[str, Any]] = field(default_factory=list)


def _few(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOW])
    return shown + (f" and {len(names) - _SHOW} more" if len(names) > _SHOW else "")


def _model_key(models: Sequence[Mapping[str, Any]]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(m.get("task", "")), str(m.get("sha256", ""))) for m in models))


def _model_names(models: Sequence[Mapping[str, Any]]) -> str:
    return " + ".join(f"{m.get('name', '?')} ({str(m.get('sha256', ''))[:12]})" for m in models)


def _read_run_models(folder: Path) -> dict[str, Any] | None:
    try:
        run = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        cfg = run["config"]
        return {
            "localization": {"model": str(cfg["localization"]["model"])},
            "classification": {"models": [str(m) for m in cfg["classification"]["models"]]},
        }
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load_calibration_batch(
    batch_dir: str | Path, diagnoses_csv: str | Path, *, allow_unmatched: bool = False
) -> CalibrationBatch:
    """The diagnosed slides of a batch output, checked for matching names, models and rules.

    Raises :class:`~wsi_screen.errors.CalibrationError` (one line) when diagnoses and slides do not
    match (unless ``allow_unmatched``: then the unmatched ones are left out with a warning), when the
    slides were screened with different models or triage rules, or a summary names no models.
    """
    out_dir, csv_path = Path(batch_dir), Path(diagnoses_csv)
    rows = read_labels_csv(csv_path, label_columns=("diagnosis", "label"))
    outputs = _collect_outputs(out_dir)
    index = _Index(outputs)

    diagnosis: dict[str, tuple[int, str, str | None]] = {}
    no_slide: list[str] = []
    for line, reference, label in rows:
        match = index.match(reference)
        if match is None:
            no_slide.append(reference)
            continue
        previous = diagnosis.get(match.slide_id)
        if previous is not None and previous[2] != label:
            raise CalibrationError(
                f"diagnoses CSV {csv_path}: slide {match.slide_id!r} is {previous[2]!r} on line "
                f"{previous[0]} and {label!r} on line {line}"
            )
        diagnosis[match.slide_id] = (line, reference, label)

    no_diagnosis = [o.slide_id for o in outputs if diagnosis.get(o.slide_id, (0, "", None))[2] is None]
    no_result = [o for o in outputs if o.summary is None and diagnosis.get(o.slide_id, (0, "", None))[2]]
    problems = []
    if no_slide:
        problems.append(f"{len(no_slide)} diagnoses name no slide of the batch: {_few(no_slide)}")
    if no_diagnosis:
        problems.append(f"{len(no_diagnosis)} slides have no diagnosis: {_few(no_diagnosis)}")
    if no_result:
        shown = "; ".join(f"{o.slide_id!r}: {o.problem}" for o in no_result[:_SHOW])
        problems.append(f"{len(no_result)} diagnosed slides have no usable result ({shown})")
    if problems:
        text = "; ".join(problems)
        if not allow_unmatched:
            raise CalibrationError(
                f"the diagnoses in {csv_path} do not match the slides of {out_dir}: {text} (the 'slide' "
                "column holds a slide's file name or id; allow_unmatched uses the matching slides only)"
            )
        logger.warning("left out of the calibration: %s", text)

    excluded: list[dict[str, Any]] = []
    slides: list[CalibrationSlide] = []
    models_by_key: dict[tuple[tuple[str, str], ...], list[str]] = {}
    models_of: dict[tuple[tuple[str, str], ...], list[dict[str, Any]]] = {}
    seen: dict[str, tuple[str, str]] = {}  # score rule → (value as JSON, first slide)
    batch_rules: dict[str, Any] = {}
    adequacy: dict[str, Any] = {}
    run_models: dict[str, Any] | None = None
    run_models_differ = False
    for o in outputs:
        entry = diagnosis.get(o.slide_id)
        if entry is None or entry[2] is None or o.summary is None:
            continue
        label = entry[2]
        if label == UNSATISFACTORY_LABEL:
            excluded.append({"slide": o.slide_id, "diagnosis": label, "reason": "diagnosed unsatisfactory"})
            continue
        s = o.summary
        models = (s.get("versions") or {}).get("models")
        if not isinstance(models, list) or not models or not all(isinstance(m, Mapping) for m in models):
            raise CalibrationError(
                f"summary.json of slide {o.slide_id!r} names no models (versions.models): calibration "
                "needs to know which models scored the slides; screen them with this version of wsi-screen"
            )
        key = _model_key(models)
        models_by_key.setdefault(key, []).append(o.slide_id)
        models_of.setdefault(key, [dict(m) for m in models])
        rules = (s.get("rules") or {}).get("triage")
        if not isinstance(rules, Mapping):
            raise CalibrationError(
                f"summary.json of slide {o.slide_id!r} records no triage rules (rules.triage)"
            )
        for k in SCORE_RULES:
            value = json.dumps(rules.get(k), sort_keys=True)
            first_value, first_slide = seen.setdefault(k, (value, o.slide_id))
            if first_value != value:
                raise CalibrationError(
                    f"the slides of {out_dir} were scored with different triage rules: triage.{k} is "
                    f"{first_value} for slide {first_slide!r} and {value} for {o.slide_id!r}; "
                    "calibrate slides screened with the same settings"
                )
        if not batch_rules:
            batch_rules = dict(rules)
            adequacy = dict((s.get("rules") or {}).get("adequacy") or {})
        folder_models = _read_run_models(out_dir / o.slide_id)
        if folder_models is not None:
            if run_models is None:
                run_models = folder_models
            elif run_models != folder_models:
                run_models_differ = True
        slides.append(CalibrationSlide.from_summary(o.slide_id, o.slide, label, s))

    if len(models_by_key) > 1:
        groups = sorted(models_by_key.items(), key=lambda kv: -len(kv[1]))
        text = "; ".join(
            f"{len(ids)} with {_model_names(models_of[k])} (e.g. {ids[0]!r})" for k, ids in groups[:3]
        )
        raise CalibrationError(
            f"the slides of {out_dir} were screened with different models: {text}; a threshold holds for "
            "one set of models only: calibrate each set apart"
        )
    if not slides:
        raise CalibrationError(f"no diagnosed slide of {out_dir} can be used for calibration")
    return CalibrationBatch(
        batch_dir=out_dir,
        diagnoses_csv=csv_path,
        slides=slides,
        models=next(iter(models_of.values())),
        rules=batch_rules,
        adequacy=adequacy,
        run_models={} if run_models is None or run_models_differ else run_models,
        excluded=excluded,
    )


# -- threshold choice -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Arrays:
    score: NDArray[np.float64]
    nilm: NDArray[np.bool_]
    abnormal: NDArray[np.bool_]
    high: NDArray[np.bool_]
    cat_priority: NDArray[np.bool_]
    always_kept: NDArray[np.bool_]  # kept whatever the thresholds (category, inadequate with abnormal cells)


def _arrays(slides: Sequence[CalibrationSlide], rules: TriageSettings, high_grade: Sequence[str]) -> _Arrays:
    score = np.array([s.score for s in slides], np.float64)
    # A slide kept with the highest thresholds possible is kept whatever they are (kept is monotone).
    top = rules.model_copy(update={"review_score": 1.0 + 1e-9, "priority_score": None})
    return _Arrays(
        score=score,
        nilm=np.array([s.diagnosis == "NILM" for s in slides]),
        abnormal=np.array([s.diagnosis != "NILM" for s in slides]),
        high=np.array([s.diagnosis in high_grade for s in slides]),
        cat_priority=np.array([s.category in rules.priority_categories for s in slides]),
        always_kept=np.array([simulate_triage(s, top) in _KEPT for s in slides]),
    )


def _required(n: int, target: float) -> int:
    return min(n, max(0, math.ceil(target * n - 1e-9)))


def _highest_threshold(
    score: NDArray[np.float64], group: NDArray[np.bool_], fixed: NDArray[np.bool_], target: float
) -> float:
    """Highest threshold that keeps ``target`` of ``group`` (``fixed`` slides are kept anyway); inf: any."""
    need = _required(int(group.sum()), target) - int((group & fixed).sum())
    if need <= 0:
        return math.inf
    free = np.sort(score[group & ~fixed])[::-1]
    return float(free[need - 1])


def _place(
    neg: NDArray[np.float64], pos: NDArray[np.float64], limit: float, floor: float = 0.0
) -> tuple[float, float, float]:
    """A round threshold ``(value, lo, hi)``, halfway between ``lo`` and ``hi``.

    ``lo`` is the highest ``neg`` score below ``limit`` (the last slide set aside when the threshold is
    as high as the targets allow), at least ``floor``; ``hi`` the lowest ``pos`` score above ``lo``, at
    most ``limit`` (the first slide kept by its score). Every threshold in ``(lo, hi]`` sets aside the
    same ``neg`` slides; the middle leaves the widest margin on both sides.
    """
    limit = min(limit, 1.0)
    under = neg[neg < limit]
    lo = max(float(under.max()), floor) if under.size else floor
    over = pos[(pos > lo) & (pos <= limit)]
    hi = float(over.min()) if over.size else limit
    mid = (lo + hi) / 2.0
    for digits in (4, 6):  # rounded down, and clear of the slide at ``hi`` (scores carry 6 digits)
        step = 10.0**-digits
        value = round(math.floor(mid / step + 1e-9) * step, digits)
        if lo < value <= hi - 1e-6 or (value == lo == floor and not under.size):
            return value, lo, hi
    return mid, lo, hi


def _choose(arr: _Arrays, target: CalibrationTarget) -> dict[str, Any]:
    """Review and priority thresholds, each with the interval of thresholds equivalent on this batch."""
    limits = [math.inf]
    if target.hsil_plus > 0 and arr.high.any():
        limits.append(_highest_threshold(arr.score, arr.high, arr.always_kept, target.hsil_plus))
    if target.ascus_plus > 0 and arr.abnormal.any():
        limits.append(_highest_threshold(arr.score, arr.abnormal, arr.always_kept, target.ascus_plus))
    review_max = min(limits)
    free = ~arr.always_kept
    review, review_lo, review_hi = _place(
        arr.score[arr.nilm & free], arr.score[arr.abnormal & free], review_max
    )

    priority: float | None = None
    interval: list[float] | None = None
    priority_max: float | None = None
    reached = True
    if target.priority > 0 and arr.high.any():
        p_max = _highest_threshold(arr.score, arr.high, arr.cat_priority, target.priority)
        if math.isinf(p_max):
            priority = None  # priority by category alone reaches the target
        elif p_max < review:
            priority, reached = review, False
            logger.warning(
                "%.0f %% of the HSIL+ slides in priority would need a priority threshold (%.4f) below the "
                "review threshold (%.4f): priority_score is set to the review threshold",
                100 * target.priority,
                p_max,
                review,
            )
        else:
            free_p = ~arr.cat_priority & (arr.score >= review)
            priority, p_lo, p_hi = _place(
                arr.score[free_p & ~arr.high], arr.score[free_p & arr.high], p_max, floor=review
            )
            priority = max(priority, review)
            interval, priority_max = [p_lo, p_hi], p_max
    return {
        "review_score": review,
        "review_interval": [review_lo, review_hi],
        "review_max": None if math.isinf(review_max) else review_max,
        "priority_score": priority,
        "priority_interval": interval,
        "priority_max": priority_max,
        "priority_reached": reached,
    }


# -- figures --------------------------------------------------------------------------------------------
def _figure(count: int, n: int, confidence: float) -> dict[str, Any]:
    return {
        "n": n,
        "count": count,
        "value": count / n if n else None,
        "lower_bound": clopper_pearson_lower(count, n, confidence=confidence),
    }


def _figures(
    slides: Sequence[CalibrationSlide], triage: TriageSettings, target: CalibrationTarget
) -> dict[str, Any]:
    """Sensitivities, negatives set aside, triage by diagnosis and ranking at ``triage``'s thresholds."""
    arr = _arrays(slides, triage, target.high_grade)
    outcome = [simulate_triage(s, triage) for s in slides]
    kept = np.array([t in _KEPT for t in outcome])
    prio = np.array([t == "priority" for t in outcome])
    negative = np.array([t == "negative" for t in outcome])
    conf = target.confidence
    sensitivity = {
        "hsil_plus": _figure(int((kept & arr.high).sum()), int(arr.high.sum()), conf),
        "ascus_plus": _figure(int((kept & arr.abnormal).sum()), int(arr.abnormal.sum()), conf),
        "priority": _figure(int((prio & arr.high).sum()), int(arr.high.sum()), conf),
    }
    n_nilm = int(arr.nilm.sum())
    aside = int((negative & arr.nilm).sum())
    negatives = _figure(aside, n_nilm, conf)
    negatives["interval95"] = wilson_interval(aside, n_nilm)
    present = [lab for lab in LABELS if any(s.diagnosis == lab for s in slides)]
    by_label = {lab: dict.fromkeys(_TRIAGES, 0) for lab in present}
    for s, t in zip(slides, outcome, strict=True):
        by_label[s.diagnosis][t] += 1
    misses = [
        {
            "slide": s.slide_id,
            "diagnosis": s.diagnosis,
            "score": s.score,
            "triage": t,
            "hsil_plus": s.diagnosis in target.high_grade,
        }
        for s, t in zip(slides, outcome, strict=True)
        if s.diagnosis != "NILM" and t not in _KEPT
    ]
    both = arr.high | arr.nilm
    fpr, tpr, thr = roc_curve(arr.abnormal, arr.score)
    holds = {
        "hsil_plus": target.hsil_plus == 0
        or (sensitivity["hsil_plus"]["value"] or 0.0) >= target.hsil_plus - 1e-12,
        "ascus_plus": target.ascus_plus == 0
        or (sensitivity["ascus_plus"]["value"] or 0.0) >= target.ascus_plus - 1e-12,
        "priority": target.priority == 0
        or (sensitivity["priority"]["value"] or 0.0) >= target.priority - 1e-12,
    }
    return {
        "sensitivity": sensitivity,
        "negatives_set_aside": negatives,
        "holds": holds,
        "workload": {
            "slides": len(slides),
            "kept": int(kept.sum()),
            "priority": int(prio.sum()),
            "negative": int(negative.sum()),
            "unsatisfactory": sum(1 for t in outcome if t == "unsatisfactory"),
            "nilm_priority": int((prio & arr.nilm).sum()),
        },
        "triage_by_diagnosis": by_label,
        "misses": misses,
        "ranking": {
            "n_positive": int(arr.abnormal.sum()),
            "n_negative": n_nilm,
            "auroc": binary_auroc(arr.abnormal, arr.score) if arr.score.size else None,
            "auroc_hsil_plus": binary_auroc(arr.high[both], arr.score[both]) if both.any() else None,
            "roc": {"fpr": fpr, "tpr": tpr, "thresholds": thr},
            "operating_point": {
                "fpr": 1.0 - negatives["value"] if negatives["value"] is not None else None,
                "tpr": sensitivity["ascus_plus"]["value"],
            },
        },
        "outcome": outcome,
    }


def _slides_needed(target: CalibrationTarget, misses: int) -> list[dict[str, Any]]:
    rows = []
    for bound in target.wanted_bounds:
        row: dict[str, Any] = {
            "lower_bound": bound,
            "no_miss": slides_needed(bound, misses=0, confidence=target.confidence),
        }
        if misses:
            row["misses"] = misses
            row["with_misses"] = slides_needed(bound, misses=misses, confidence=target.confidence)
        rows.append(row)
    return rows


def _check_counts(slides: Sequence[CalibrationSlide], target: CalibrationTarget) -> dict[str, Any]:
    """Refuse to calibrate on too few slides per group (one line saying how many and why)."""
    need = slides_needed(target.min_lower_bound, confidence=target.confidence)
    conf = f"{100 * target.confidence:g} %"
    counts = Counter(s.diagnosis for s in slides)
    groups: list[tuple[str, list[str], float]] = [("NILM", ["NILM"], 1.0)]
    if target.hsil_plus > 0:
        groups.append(("HSIL+", list(target.high_grade), target.hsil_plus))
    if target.ascus_plus > 0:
        groups.append(("ASC-US+", [lab for lab in LABELS if lab != "NILM"], target.ascus_plus))
    for name, labels, _ in groups:
        n = sum(counts.get(lab, 0) for lab in labels)
        if n >= need:
            continue
        detail = ", ".join(f"{lab} {counts[lab]}" for lab in labels if counts.get(lab))
        have = f"{n} ({detail})" if detail and len(labels) > 1 else str(n)
        if name == "NILM":
            why = (
                "the review threshold is set against the NILM scores and the share set aside is measured "
                f"on them; calibration asks as many as for the abnormal groups ({need} slides give a "
                f"one-sided {conf} lower bound of {target.min_lower_bound:g} when none is misjudged)"
            )
        else:
            bound = clopper_pearson_lower(n, n, confidence=target.confidence) if n else 0.0
            why = (
                f"even with none missed, {n} slides bound the {name} sensitivity only at ≥ {bound:.3f} "
                f"(one-sided {conf} Clopper–Pearson), and {target.min_lower_bound:g} needs {need}"
            )
        raise CalibrationError(
            f"too few {name} slides to calibrate: {have}, at least {need} needed: {why} "
            "(the target's min_lower_bound sets the bound asked for)"
        )
    return {"needed_per_group": need, "min_lower_bound": target.min_lower_bound}


# -- the two entry points -------------------------------------------------------------------------------
def _base_triage(batch: CalibrationBatch) -> TriageSettings:
    known = set(TriageSettings.model_fields)
    carried = {k: v for k, v in batch.rules.items() if k in _CARRIED_RULES and k in known}
    if "inadequate_abnormal_score" in batch.rules:
        carried["inadequate_abnormal_score"] = batch.rules["inadequate_abnormal_score"]
    try:
        return TriageSettings.model_validate(carried)
    except ValueError as exc:
        raise CalibrationError(
            f"the batch's triage rules are not valid settings of this version: {exc}"
        ) from None


def _slide_rows(
    slides: Sequence[CalibrationSlide], outcome: Sequence[str], high: Sequence[str]
) -> list[dict[str, Any]]:
    rows = [
        {
            "slide_id": s.slide_id,
            "slide": s.slide,
            "diagnosis": s.diagnosis,
            "group": "NILM" if s.diagnosis == "NILM" else ("HSIL+" if s.diagnosis in high else "ASC-US+"),
            "score": s.score,
            "suggested_category": s.category,
            "triage_screened": s.triage,
            "triage": t,
        }
        for s, t in zip(slides, outcome, strict=True)
    ]
    return sorted(rows, key=lambda r: (-r["score"], r["slide_id"]))


def calibrate(
    batch_dir: str | Path,
    diagnoses_csv: str | Path,
    *,
    target: CalibrationTarget | None = None,
    name: str | None = None,
    allow_unmatched: bool = False,
    today: str | None = None,
) -> dict[str, Any]:
    """Choose the triage thresholds of a diagnosed batch; the JSON-ready ``calibration.json`` dict.

    Its ``operating_point`` is a valid :class:`~wsi_screen.config.OperatingPointSettings` and
    ``preset`` the settings ``operating-point.yaml`` holds (see :func:`preset_yaml`).
    """
    target = target or CalibrationTarget()
    batch = load_calibration_batch(batch_dir, diagnoses_csv, allow_unmatched=allow_unmatched)
    minimum = _check_counts(batch.slides, target)
    base = _base_triage(batch)
    arr = _arrays(batch.slides, base, target.high_grade)
    chosen = _choose(arr, target)
    triage = TriageSettings.model_validate(
        base.model_dump()
        | {"review_score": chosen["review_score"], "priority_score": chosen["priority_score"]}
    )
    figures = _figures(batch.slides, triage, target)
    date = today or datetime.now(timezone.utc).date().isoformat()
    op_name = name or f"{batch.batch_dir.resolve().name}-{date}"
    n_slides = dict(Counter(s.diagnosis for s in batch.slides))
    n_slides = {lab: n_slides[lab] for lab in LABELS if lab in n_slides}
    op = OperatingPointSettings(
        calibrated=True,
        name=op_name,
        note=(
            f"calibrated by wsi-screen calibrate on {len(batch.slides)} diagnosed slides of "
            f"{batch.batch_dir.resolve().name}; the figures hold for slides like those and these models"
        ),
        date=date,
        source_batch=str(batch.batch_dir.resolve()),
        diagnoses=str(batch.diagnoses_csv.resolve()),
        review_score=triage.review_score,
        priority_score=triage.priority_score,
        target=target.settings(),
        sensitivity={
            k: OperatingPointFigure.model_validate({x: v[x] for x in ("n", "count", "value", "lower_bound")})
            for k, v in figures["sensitivity"].items()
        },
        negatives_set_aside=OperatingPointFigure.model_validate(
            {x: figures["negatives_set_aside"][x] for x in ("n", "count", "value", "lower_bound")}
        ),
        auroc=_clip01(figures["ranking"]["auroc"]),
        n_slides=n_slides,
        models=[
            ModelIdentity.model_validate({k: m.get(k) for k in ("task", "name", "version", "sha256")})
            for m in batch.models
        ],
        adequacy={k: batch.adequacy[k] for k in ("preparation", "min_squamous_cells") if k in batch.adequacy},
    )
    preset: dict[str, Any] = {}
    preset.update(batch.run_models)
    carried = (*_CARRIED_RULES, "review_score", "priority_score", "inadequate_abnormal_score")
    preset["triage"] = {k: v for k, v in triage.model_dump(mode="json").items() if k in carried}
    preset["operating_point"] = op.model_dump(mode="json", exclude_none=True)
    misses = len(figures["misses"])
    result = {
        "kind": "calibration",
        "wsi_screen_version": __version__,
        "date": date,
        "batch_dir": str(batch.batch_dir),
        "diagnoses_csv": str(batch.diagnoses_csv),
        "target": target.settings().model_dump(mode="json")
        | {"min_lower_bound": target.min_lower_bound, "wanted_bounds": list(target.wanted_bounds)},
        "thresholds": chosen,
        "operating_point": op.model_dump(mode="json", exclude_none=True),
        "preset": preset,
        "minimum": minimum,
        "slides_needed": _slides_needed(target, misses),
        **{k: v for k, v in figures.items() if k != "outcome"},
        "n_slides": n_slides,
        "excluded": batch.excluded,
        "models": batch.models,
        "rules": {"triage": batch.rules, "adequacy": batch.adequacy},
        "slides": _slide_rows(batch.slides, figures["outcome"], target.high_grade),
    }
    for key, ok in figures["holds"].items():
        if not ok:
            logger.warning("the %s target is not reached on the calibration slides", key)
    return jsonable(result)  # type: ignore[no-any-return]


def _clip01(v: Any) -> float | None:
    return None if v is None or not math.isfinite(float(v)) else min(1.0, max(0.0, float(v)))


def validate_operating_point(
    batch_dir: str | Path,
    diagnoses_csv: str | Path,
    preset: str | Path,
    *,
    allow_unmatched: bool = False,
) -> dict[str, Any]:
    """Measure the operating point of a preset (``operating-point.yaml``) on another diagnosed batch.

    The batch must have been screened with the preset's models and score rules; the triage under the
    preset's thresholds is recomputed from the summaries. Returns the ``validation.json`` dict, whose
    ``holds`` says whether each calibrated target is reached on this batch.
    """
    try:
        settings: Settings = load_settings(config=preset)
    except ConfigError as exc:
        raise CalibrationError(f"cannot read the operating point: {exc}") from None
    op = settings.operating_point
    if not op.calibrated or op.target is None:
        raise CalibrationError(f"{preset} holds no calibrated operating point (operating_point.calibrated)")
    batch = load_calibration_batch(batch_dir, diagnoses_csv, allow_unmatched=allow_unmatched)
    if _model_key(batch.models) != _model_key([m.model_dump() for m in op.models]):
        raise CalibrationError(
            f"the slides of {batch.batch_dir} were screened with {_model_names(batch.models)}, but operating "
            f"point {op.name!r} was calibrated with {_model_names([m.model_dump() for m in op.models])}: "
            "its thresholds do not hold for other models"
        )
    for k in SCORE_RULES:
        mine, theirs = getattr(settings.triage, k), batch.rules.get(k)
        if json.dumps(mine, sort_keys=True) != json.dumps(theirs, sort_keys=True):
            raise CalibrationError(
                f"the slides of {batch.batch_dir} were scored with triage.{k} = {theirs!r}, the operating "
                f"point uses {mine!r}: screen the batch with the settings in {preset}"
            )
    t = op.target
    target = CalibrationTarget(
        hsil_plus=t.hsil_plus,
        ascus_plus=t.ascus_plus,
        priority=t.priority,
        confidence=t.confidence,
        high_grade=tuple(t.high_grade),
    )
    figures = _figures(batch.slides, settings.triage, target)
    n_slides = dict(Counter(s.diagnosis for s in batch.slides))
    result = {
        "kind": "validation",
        "wsi_screen_version": __version__,
        "date": datetime.now(timezone.utc).date().isoformat(),
        "batch_dir": str(batch.batch_dir),
        "diagnoses_csv": str(batch.diagnoses_csv),
        "preset": str(preset),
        "target": t.model_dump(mode="json"),
        "thresholds": {
            "review_score": settings.triage.review_score,
            "priority_score": settings.triage.priority_score,
        },
        "operating_point": op.model_dump(mode="json", exclude_none=True),
        "slides_needed": _slides_needed(target, len(figures["misses"])),
        **{k: v for k, v in figures.items() if k != "outcome"},
        "n_slides": {lab: n_slides[lab] for lab in LABELS if lab in n_slides},
        "excluded": batch.excluded,
        "models": batch.models,
        "rules": {"triage": batch.rules, "adequacy": batch.adequacy},
        "slides": _slide_rows(batch.slides, figures["outcome"], target.high_grade),
    }
    return jsonable(result)  # type: ignore[no-any-return]


# -- outputs --------------------------------------------------------------------------------------------
def preset_yaml(result: Mapping[str, Any]) -> str:
    """``operating-point.yaml``: the settings ``wsi-screen run``/``batch --config`` take."""
    op = result["operating_point"]
    head = (
        f"# Operating point {op['name']}: written by `wsi-screen calibrate` (wsi-screen {__version__}) on\n"
        f"# {op['date']} from {op['source_batch']}.\n"
        "# Apply it with:  wsi-screen batch DIR -o OUT --config operating-point.yaml\n"
        "# The triage section carries the batch's score rules with the calibrated thresholds; runs with\n"
        "# other models than those listed under operating_point.models are refused. docs/calibration.md\n"
    )
    return head + yaml.safe_dump(dict(result["preset"]), sort_keys=False, allow_unicode=True, width=100)


def write_calibration(result: Mapping[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``calibration.json``, ``calibration.html`` and ``operating-point.yaml`` (a calibration) or
    ``validation.json`` and ``validation.html`` (a validation); returns ``{kind: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = "calibration" if result["kind"] == "calibration" else "validation"
    written = {"json": out / f"{stem}.json", "html": out / f"{stem}.html"}
    atomic_write_text(
        written["json"], json.dumps(result, indent=2, allow_nan=False, ensure_ascii=False) + "\n"
    )
    atomic_write_text(written["html"], calibration_html(result))
    if result["kind"] == "calibration":
        written["preset"] = out / PRESET_FILE
        atomic_write_text(written["preset"], preset_yaml(result))
        # The preset must load: a broken one would only fail at the next batch.
        load_settings(config=written["preset"])
    return written


def format_calibration(result: Mapping[str, Any]) -> str:
    """A few lines for the terminal."""
    th = result["thresholds"]
    sens = result["sensitivity"]
    neg = result["negatives_set_aside"]
    conf = 100 * float(result["target"].get("confidence", 0.95))
    lines = [
        f"{'calibration' if result['kind'] == 'calibration' else 'validation'} of {result['batch_dir']} "
        f"({sum(result['n_slides'].values())} slides: "
        + ", ".join(f"{k} {v}" for k, v in result["n_slides"].items())
        + ")",
        f"  review_score {th['review_score']}, priority_score {th.get('priority_score')}",
    ]
    names = {"hsil_plus": "HSIL+ kept", "ascus_plus": "ASC-US+ kept", "priority": "HSIL+ in priority"}
    for key, label in names.items():
        f = sens[key]
        if not f["n"]:
            continue
        lb = f["lower_bound"]
        holds = "" if result["holds"].get(key, True) else "  (target NOT reached)"
        lines.append(
            f"  {label:<18} {f['count']}/{f['n']} = {_pct(f['value'])}, one-sided {conf:g} % lower bound "
            f"{_pct(lb)} (target {_pct(result['target'].get(key))}){holds}"
        )
    lines.append(
        f"  NILM set aside     {neg['count']}/{neg['n']} = {_pct(neg['value'])}, one-sided {conf:g} % lower "
        f"bound {_pct(neg['lower_bound'])}"
    )
    auc = result["ranking"]["auroc"]
    lines.append(
        f"  slide AUROC        {auc:.3f}" if isinstance(auc, (int, float)) else "  slide AUROC        –"
    )
    need = ", ".join(f"≥ {r['lower_bound']:g}: {r['no_miss']}" for r in result["slides_needed"])
    lines.append(f"  slides needed with no miss for a lower bound {need}")
    return "\n".join(lines)


def _pct(v: Any) -> str:
    return f"{100 * float(v):.1f} %" if isinstance(v, (int, float)) else "–"


# -- HTML -----------------------------------------------------------------------------------------------
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;margin:2em auto;
 max-width:1040px;color:#1e293b;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.1em;margin-top:1.8em}
table{border-collapse:collapse;margin:.5em 0;font-size:.92em}
th,td{border:1px solid #cbd5e1;padding:.25em .6em;text-align:right}th{background:#f1f5f9}
th.l,td.l{text-align:left}.meta{color:#64748b;font-size:.9em}
.ok{color:#2e7d32;font-weight:600}.bad{color:#b71c1c;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:24px;align-items:flex-start}
svg text{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif}
code,pre{font-size:12px}pre{background:#f8fafc;border:1px solid #e2e8f0;padding:.6em;overflow:auto}
"""
_COLOURS = {"priority": "#b71c1c", "review": "#e65100", "unsatisfactory": "#5d4037", "negative": "#2e7d32"}


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _roc_svg(ranking: Mapping[str, Any], size: int = 340) -> str:
    """The slide ROC (score, ASC-US+ vs NILM) with the operating point, as inline SVG."""
    pad, inner = 44, size - 64
    fpr, tpr = list(ranking["roc"]["fpr"]), list(ranking["roc"]["tpr"])

    def xy(x: float, y: float) -> tuple[float, float]:
        return pad + x * inner, 20 + (1 - y) * inner

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{size}" height="{size}" role="img" '
        f'aria-label="Slide ROC">'
    ]
    parts.append(f'<rect x="{pad}" y="20" width="{inner}" height="{inner}" fill="#fff" stroke="#94a3b8"/>')
    for k in range(1, 5):
        g = k / 5
        x0, _ = xy(g, 0)
        _, y1 = xy(0, g)
        parts.append(f'<line x1="{x0:.1f}" y1="20" x2="{x0:.1f}" y2="{20 + inner}" stroke="#e2e8f0"/>')
        parts.append(f'<line x1="{pad}" y1="{y1:.1f}" x2="{pad + inner}" y2="{y1:.1f}" stroke="#e2e8f0"/>')
    for k in range(0, 6):
        g = k / 5
        x0, _ = xy(g, 0)
        _, y1 = xy(0, g)
        parts.append(
            f'<text x="{x0:.1f}" y="{36 + inner}" font-size="10" text-anchor="middle">{g:.1f}</text>'
        )
        parts.append(f'<text x="{pad - 6}" y="{y1 + 3:.1f}" font-size="10" text-anchor="end">{g:.1f}</text>')
    a, b = xy(0, 0), xy(1, 1)
    parts.append(
        f'<line x1="{a[0]}" y1="{a[1]}" x2="{b[0]}" y2="{b[1]}" stroke="#94a3b8" stroke-dasharray="4 3"/>'
    )
    pts = [xy(float(x), float(y)) for x, y in zip(fpr, tpr, strict=True) if x is not None and y is not None]
    if pts:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#1d4ed8" stroke-width="2"/>')
    op = ranking.get("operating_point") or {}
    if op.get("fpr") is not None and op.get("tpr") is not None:
        x, y = xy(float(op["fpr"]), float(op["tpr"]))
        parts.append(
            f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#b71c1c"><title>operating point: '
            f"{_pct(1 - float(op['fpr']))} of NILM set aside, {_pct(op['tpr'])} of ASC-US+ kept"
            "</title></circle>"
        )
    parts.append(
        f'<text x="{pad + inner / 2}" y="{size - 6}" font-size="11" text-anchor="middle">'
        "1 − share of NILM set aside (false-positive rate)</text>"
    )
    parts.append(
        f'<text x="12" y="{20 + inner / 2}" font-size="11" text-anchor="middle" '
        f'transform="rotate(-90 12 {20 + inner / 2})">ASC-US+ kept (sensitivity)</text>'
    )
    auc = ranking.get("auroc")
    if isinstance(auc, (int, float)):
        parts.append(
            f'<text x="{pad + inner - 8}" y="{20 + inner - 10}" font-size="12" text-anchor="end">'
            f"AUROC {auc:.3f}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def _strip_svg(result: Mapping[str, Any], width: int = 640) -> str:
    """Slide scores per diagnosis (dots coloured by triage) with the thresholds, as inline SVG."""
    slides = result["slides"]
    labels = [lab for lab in LABELS if any(s["diagnosis"] == lab for s in slides)]
    row, left, top = 26, 110, 16
    inner = width - left - 20
    height = top + row * len(labels) + 36
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        'aria-label="Slide scores by diagnosis">'
    ]
    for k in range(0, 11):
        x = left + inner * k / 10
        parts.append(
            f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + row * len(labels)}" stroke="#eef2f7"/>'
        )
        parts.append(
            f'<text x="{x:.1f}" y="{top + row * len(labels) + 14}" font-size="10" '
            f'text-anchor="middle">{k / 10:.1f}</text>'
        )
    for i, lab in enumerate(labels):
        y = top + row * i + row / 2
        parts.append(
            f'<text x="{left - 8}" y="{y + 4:.1f}" font-size="12" text-anchor="end">{_e(lab)}</text>'
        )
        mine = [s for s in slides if s["diagnosis"] == lab]
        for j, s in enumerate(mine):
            jitter = ((j * 7919) % 11 - 5) * 1.6
            x = left + inner * min(1.0, max(0.0, float(s["score"])))
            parts.append(
                f'<circle cx="{x:.1f}" cy="{y + jitter:.1f}" r="3.2" '
                f'fill="{_COLOURS.get(s["triage"], "#475569")}" '
                f'fill-opacity=".8"><title>{_e(s["slide_id"])}: score {float(s["score"]):.4f}, '
                f"{_e(s['triage'])}</title></circle>"
            )
    th = result["thresholds"]
    for key, colour in (("review_score", "#e65100"), ("priority_score", "#b71c1c")):
        v = th.get(key)
        if v is None:
            continue
        x = left + inner * float(v)
        parts.append(
            f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{top + row * len(labels)}" '
            f'stroke="{colour}" stroke-width="1.5" stroke-dasharray="5 3"/>'
        )
        parts.append(
            f'<text x="{x + 3:.1f}" y="{top - 6 + (0 if key == "review_score" else 10)}" '
            f'font-size="10" fill="{colour}">{key.split("_")[0]} {float(v):.4g}</text>'
        )
    parts.append(
        f'<text x="{left + inner / 2}" y="{height - 4}" font-size="11" text-anchor="middle">'
        "slide ranking score</text></svg>"
    )
    return "".join(parts)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    def cell(tag: str, i: int, v: Any) -> str:
        return f"<{tag}{' class=l' if i < left else ''}>{_e(v)}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, v) for i, v in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def calibration_html(result: Mapping[str, Any]) -> str:
    """A self-contained page (no script, no network) for a calibration or validation result."""
    calib = result["kind"] == "calibration"
    op = result["operating_point"]
    th = result["thresholds"]
    target = result["target"]
    conf = 100 * float(target.get("confidence", 0.95))
    title = f"{'Calibration' if calib else 'Validation'} of operating point {op.get('name', '')}"
    sens = result["sensitivity"]
    names = {"hsil_plus": "HSIL+ kept", "ascus_plus": "ASC-US+ kept", "priority": "HSIL+ in priority"}
    rows = []
    for key, label in names.items():
        f = sens[key]
        holds = result["holds"].get(key, True)
        rows.append(
            [
                label,
                _pct(target.get(key)),
                f"{f['count']}/{f['n']}",
                _pct(f["value"]),
                _pct(f["lower_bound"]),
                "yes" if holds else "NO",
            ]
        )
    neg = result["negatives_set_aside"]
    interval = neg.get("interval95")
    iv = f"{_pct(interval[0])}–{_pct(interval[1])}" if interval else "–"
    rows.append(
        ["NILM set aside", "", f"{neg['count']}/{neg['n']}", _pct(neg["value"]), _pct(neg["lower_bound"]), ""]
    )
    point = _table(["", "target", "slides", "achieved", f"one-sided {conf:g} % lower bound", "holds"], rows)
    thr_rows = [
        [
            "review_score",
            th["review_score"],
            _interval(th.get("review_interval")),
            _fmt4(th.get("review_max"), "any (categories reach the targets)"),
        ],
        [
            "priority_score",
            _fmt4(th.get("priority_score"), "none (by category only)"),
            _interval(th.get("priority_interval")),
            _fmt4(th.get("priority_max"), "–"),
        ],
    ]
    thresholds = _table(
        ["setting", "value", "same triage of this batch for", "highest reaching the target"], thr_rows
    )
    by = result["triage_by_diagnosis"]
    by_rows = [[lab, *[c[t] for t in _TRIAGES]] for lab, c in by.items()]
    by_table = _table(["diagnosis", *_TRIAGES], by_rows)
    misses = result["misses"]
    miss_html = (
        _table(
            ["slide", "diagnosis", "score", "triage"],
            [[m["slide"], m["diagnosis"], f"{m['score']:.4f}", m["triage"]] for m in misses],
            left=2,
        )
        if misses
        else "<p>No abnormal slide is set aside or unsatisfactory at this operating point.</p>"
    )
    need_rows = []
    for r in result["slides_needed"]:
        extra = f"{r['with_misses']} (with {r['misses']} missed)" if r.get("misses") else "(none missed)"
        need_rows.append([f"≥ {r['lower_bound']:g}", r["no_miss"], extra])
    need_table = _table(
        ["wanted lower bound", "abnormal slides needed, none missed", "as observed here"], need_rows
    )
    ranking = result["ranking"]
    auc_h = ranking.get("auroc_hsil_plus")
    models = _table(
        ["task", "name", "version", "sha256"],
        [[m.get("task"), m.get("name"), m.get("version"), m.get("sha256")] for m in result["models"]],
        left=4,
    )
    work = result["workload"]
    how = ""
    if calib:
        how = (
            "<h2>Apply it</h2><pre>wsi-screen batch SCANS/ -o OUT/ --config operating-point.yaml</pre>"
            "<p>Runs with other models are refused. Check it on a second diagnosed batch with "
            "<code>wsi-screen calibrate OUT2 --diagnoses d2.csv --validate operating-point.yaml</code>.</p>"
        )
    body = (
        f"<h1>{_e(title)}</h1>"
        f"<p class=meta>batch {_e(result['batch_dir'])} · diagnoses {_e(result['diagnoses_csv'])} · "
        f"{_e(result['date'])} · wsi-screen {_e(result['wsi_screen_version'])}</p>"
        f"<p>{sum(result['n_slides'].values())} diagnosed slides: "
        + _e(", ".join(f"{k} {v}" for k, v in result["n_slides"].items()))
        + f". Kept (review or priority): {work['kept']}; negative: {work['negative']}; unsatisfactory: "
        f"{work['unsatisfactory']}; NILM in priority: {work['nilm_priority']}.</p>"
        f"<h2>Operating point</h2>{point}"
        f"<p class=meta>Sensitivity = share of the group triaged review or priority (unsatisfactory does not "
        f"count as kept). Lower bounds: exact one-sided Clopper–Pearson at {conf:g} %. NILM set aside: "
        f"95 % Wilson interval {iv}. HSIL+ = {_e(', '.join(target.get('high_grade', [])))}.</p>"
        f"<h2>Thresholds</h2>{thresholds}"
        f"<h2>Slide ranking</h2><div class=plots>{_roc_svg(ranking)}{_strip_svg(result)}</div>"
        f"<p>AUROC of the slide score, ASC-US+ vs NILM: <b>{_fmt(ranking.get('auroc'))}</b>; HSIL+ vs NILM: "
        f"<b>{_fmt(auc_h)}</b>. Dots: triage at this operating point (red priority, orange review, brown "
        "unsatisfactory, green negative).</p>"
        f"<h2>Triage by diagnosis</h2>{by_table}"
        f"<h2>Abnormal slides not kept</h2>{miss_html}"
        f"<h2>Slides a lab needs</h2>{need_table}"
        f"<p class=meta>The one-sided {conf:g} % lower bound of a sensitivity measured as k of n slides; "
        "with none missed it is (1 − confidence)^(1/n), so n = ⌈ln(1 − confidence) / ln(bound)⌉.</p>"
        f"{how}<h2>Models</h2>{models}"
    )
    csp = "default-src 'none'; style-src 'unsafe-inline'"
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def _interval(iv: Any) -> str:
    if not iv:
        return "–"
    return f"({float(iv[0]):.4f}, {float(iv[1]):.4f}]"


def _fmt4(v: Any, none: str) -> str:
    return f"{float(v):.6g}" if isinstance(v, (int, float)) else none


def _fmt(v: Any) -> str:
    return f"{float(v):.3f}" if isinstance(v, (int, float)) else "–"


def parse_high_grade(text: str) -> tuple[str, ...]:
    """``HSIL,SCC`` → canonical labels; :class:`CalibrationError` naming an unknown one."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        label = normalize_label(part)
        if label is None or label in ("NILM", UNSATISFACTORY_LABEL):
            raise CalibrationError(f"high_grade: {part!r} is not an abnormal Bethesda diagnosis")
        out.append(label)
    if not out:
        raise CalibrationError("high_grade needs at least one diagnosis")
    return tuple(dict.fromkeys(out))
