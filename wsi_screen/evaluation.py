"""Slide-level evaluation of a batch output directory against a CSV of slide diagnoses.

:func:`evaluate_slides` reads ``OUT/<slide-id>/summary.json`` of every screened slide (listed in
``OUT/batch.csv`` when present, else found by scanning ``OUT/*/summary.json``), matches them with a
labels CSV (columns ``slide`` and ``label``) and reports the figures screening systems are judged by:
sensitivity/specificity of the triage decision, the ROC of the ranking score and the fraction of slides
that could be set aside as "no further review" while keeping every HSIL+ slide in review. Definitions:
``docs/training.md``, section "Metrics".
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath, PureWindowsPath
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from wsi_screen.errors import WsiScreenError
from wsi_screen.metrics import binary_auroc, binary_counts, jsonable, roc_curve
from wsi_screen.summary import ranking_score, severity_scores

__all__ = [
    "ABNORMAL_LABELS",
    "HSIL_PLUS_LABELS",
    "LABELS",
    "EvaluationError",
    "EvaluationInputNotFoundError",
    "candidate_slide_scores",
    "evaluate_slides",
    "normalize_label",
    "read_labels_csv",
    "score_tail",
    "set_aside_at_full_sensitivity",
]

logger = logging.getLogger(__name__)

#: Slide diagnoses understood in a labels CSV, in order of severity (``UNSATISFACTORY`` is excluded).
LABELS: tuple[str, ...] = ("NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "AGC", "AIS", "SCC", "ADENOCARCINOMA")
ABNORMAL_LABELS = frozenset(LABELS[1:])
#: High-grade or worse: the slides a screening system must never set aside.
HSIL_PLUS_LABELS = frozenset({"ASC-H", "HSIL", "AGC", "AIS", "SCC", "ADENOCARCINOMA"})
UNSATISFACTORY_LABEL = "UNSATISFACTORY"

_ALIASES: dict[str, str] = {
    "NILM": "NILM",
    "NEGATIVE": "NILM",
    "NEG": "NILM",
    "NORMAL": "NILM",
    "ASCUS": "ASC-US",
    "ASCH": "ASC-H",
    "LSIL": "LSIL",
    "HSIL": "HSIL",
    "AGC": "AGC",
    "AGCNOS": "AGC",
    "AGCFN": "AGC",
    "AGUS": "AGC",
    "AIS": "AIS",
    "SCC": "SCC",
    "ADENOCARCINOMA": "ADENOCARCINOMA",
    "ADC": "ADENOCARCINOMA",
    "UNSATISFACTORY": UNSATISFACTORY_LABEL,
    "UNSAT": UNSATISFACTORY_LABEL,
}
_TRIAGE = ("negative", "review", "priority", "unsatisfactory")
_POSITIVE_TRIAGE = frozenset({"review", "priority"})


class EvaluationError(WsiScreenError, ValueError):
    """The inputs of an evaluation (labels CSV, batch output directory) are missing or malformed."""


class EvaluationInputNotFoundError(EvaluationError, FileNotFoundError):
    """The labels CSV or the batch output directory does not exist."""


def normalize_label(text: str) -> str | None:
    """The canonical Bethesda label of ``text`` (case, spaces, ``-``/``_`` ignored); ``None`` if unknown."""
    key = re.sub(r"[^A-Z0-9]", "", text.upper())
    return _ALIASES.get(key)


def _group(label: str) -> str:
    if label == "NILM":
        return "NILM"
    return "HSIL+" if label in HSIL_PLUS_LABELS else "low-grade"


def _names(text: str) -> list[str]:
    """Keys a slide reference may match: itself, its file name, and that name without suffixes."""
    text = text.strip()
    name = PureWindowsPath(text).name if "\\" in text else PurePath(text).name
    keys = [text, name, name.split(".", 1)[0] if not name.startswith(".") else name]
    stem = PurePath(name).stem
    keys.append(stem)
    return list(dict.fromkeys(k for k in keys if k))


# -- inputs ---------------------------------------------------------------------------------------------
def _read_csv(path: Path, what: str) -> tuple[list[str], list[dict[str, str]]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise EvaluationError(f"{what} {path} is not a UTF-8 text file") from None
    except OSError as exc:
        raise EvaluationError(f"cannot read {what} {path}: {exc.strerror or exc}") from None
    if not text.strip():
        raise EvaluationError(f"{what} {path} is empty")
    try:
        dialect: Any = csv.Sniffer().sniff(text[:4096], delimiters=",;\t")
    except csv.Error:
        dialect = csv.excel
    try:
        reader = csv.DictReader(io.StringIO(text), dialect=dialect)
        fields = [(f or "").strip().lower() for f in (reader.fieldnames or [])]
        reader.fieldnames = fields
        rows = [
            {k: (v or "").strip() if isinstance(v, str) else "" for k, v in row.items() if k is not None}
            for row in reader
        ]
    except csv.Error as exc:
        raise EvaluationError(f"{what} {path} is not a valid CSV file: {exc}") from None
    return fields, rows


def read_labels_csv(
    path: str | Path, *, label_columns: Sequence[str] = ("label",)
) -> list[tuple[int, str, str | None]]:
    """Rows ``(line, slide, label)`` of a labels CSV; ``label`` canonical, ``None`` when the cell is empty.

    The label is read from the first of ``label_columns`` the CSV has. Raises :class:`EvaluationError`
    naming a missing column or an unknown label.
    """
    p = Path(path)
    if not p.is_file():
        raise EvaluationInputNotFoundError(f"labels CSV {p} does not exist")
    fields, rows = _read_csv(p, "labels CSV")
    found = ", ".join(f for f in fields if f) or "none"
    wanted = " or ".join(f"'{c}'" for c in label_columns)
    label_column = next((c for c in label_columns if c in fields), None)
    for shown, present in (("'slide'", "slide" in fields), (wanted, label_column is not None)):
        if not present:
            raise EvaluationError(
                f"labels CSV {p} has no {shown} column (found: {found}); "
                f"it needs a header row with 'slide' and {wanted}"
            )
    column = label_column or label_columns[0]
    out: list[tuple[int, str, str | None]] = []
    for i, row in enumerate(rows, start=2):
        slide, raw = row.get("slide", ""), row.get(column, "")
        if not slide and not raw:
            continue
        if not slide:
            raise EvaluationError(f"labels CSV {p} line {i}: empty 'slide' for label {raw!r}")
        label = normalize_label(raw) if raw else None
        if raw and label is None:
            known = ", ".join((*LABELS, UNSATISFACTORY_LABEL))
            raise EvaluationError(f"labels CSV {p} line {i}: unknown label {raw!r} (known: {known})")
        out.append((i, slide, label))
    if not out:
        raise EvaluationError(f"labels CSV {p} has no rows")
    return out


@dataclass
class _Output:
    slide_id: str
    slide: str
    status: str
    error: str
    summary: dict[str, Any] | None
    problem: str | None  # why the output cannot be used


def _load_summary(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if not path.is_file():
        return None, "no summary.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return None, f"unreadable summary.json ({exc})"
    if not isinstance(data, dict):
        return None, "summary.json is not a JSON object"
    triage = data.get("triage")
    if triage not in _TRIAGE:
        return None, f"summary.json has triage {triage!r}, expected one of {', '.join(_TRIAGE)}"
    score = data.get("score")
    if triage != "unsatisfactory" and (
        not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score)
    ):
        return None, f"summary.json has no usable score ({score!r})"
    return data, None


def _collect_outputs(out_dir: Path) -> list[_Output]:
    if not out_dir.is_dir():
        raise EvaluationInputNotFoundError(f"batch output directory {out_dir} does not exist")
    outputs: dict[str, _Output] = {}
    batch_csv = out_dir / "batch.csv"
    if batch_csv.is_file():
        fields, rows = _read_csv(batch_csv, "batch table")
        if "slide_id" not in fields:
            logger.warning(
                "%s has no 'slide_id' column; scanning %s/*/summary.json instead", batch_csv, out_dir
            )
        else:
            for row in rows:
                sid = row.get("slide_id", "")
                if not sid or sid in outputs:
                    continue
                summary, problem = _load_summary(out_dir / sid / "summary.json")
                status = row.get("status", "")
                err = row.get("error", "")
                if summary is None and (status or err):
                    problem = f"{problem}; batch status {status or '?'}" + (f": {err}" if err else "")
                outputs[sid] = _Output(sid, row.get("slide", "") or sid, status, err, summary, problem)
    for d in sorted(out_dir.iterdir()):
        if d.name in outputs or d.name.startswith(".") or not (d / "summary.json").is_file():
            continue
        summary, problem = _load_summary(d / "summary.json")
        slide = summary.get("slide") if summary else None
        outputs[d.name] = _Output(
            d.name, slide if isinstance(slide, str) else d.name, "", "", summary, problem
        )
    if not outputs:
        raise EvaluationError(
            f"no slide results in {out_dir}: expected {out_dir}/<slide-id>/summary.json or a batch.csv "
            "(written by `wsi-screen batch DIR -o OUT`)"
        )
    return list(outputs.values())


class _Index:
    """Finds the output a labels-CSV ``slide`` refers to: by slide id, then file name, then stem."""

    def __init__(self, outputs: Sequence[_Output]) -> None:
        self._names = [(o, {o.slide_id, *_names(o.slide)}) for o in outputs]
        self._folded = [(o, {n.casefold() for n in names}) for o, names in self._names]

    def match(self, reference: str) -> _Output | None:
        keys = _names(reference)
        for table, fold in ((self._names, False), (self._folded, True)):
            for key in keys:
                k = key.casefold() if fold else key
                hits = [o for o, names in table if k in names]
                ids = sorted({o.slide_id for o in hits})
                if len(ids) > 1:
                    raise EvaluationError(
                        f"labels CSV slide {reference!r} matches several outputs: {', '.join(ids)}"
                    )
                if hits:
                    return hits[0]
        return None


# -- figures --------------------------------------------------------------------------------------------
def _set_aside(
    score: np.ndarray[Any, Any],
    keep: np.ndarray[Any, Any],
    abnormal: np.ndarray[Any, Any],
    hsil_plus: np.ndarray[Any, Any],
    nilm: np.ndarray[Any, Any],
    target: float,
    keeping: str,
) -> dict[str, Any]:
    """Slides scoring strictly below the highest threshold that keeps ``target`` of the ``keep`` slides."""
    n_keep = int(keep.sum())
    entry: dict[str, Any] = {
        "keeping": keeping,
        "target_sensitivity": target,
        "threshold": None,
        "n_slides": int(score.size),
        "n_set_aside": 0,
        "fraction": None,
        "n_nilm": int(nilm.sum()),
        "n_nilm_set_aside": 0,
        "nilm_fraction": None,
        "n_abnormal": int(abnormal.sum()),
        "n_abnormal_set_aside": 0,
        "sensitivity": None,
        "n_hsil_plus": int(hsil_plus.sum()),
        "n_hsil_plus_set_aside": 0,
        "hsil_plus_sensitivity": None,
    }
    if n_keep == 0:
        return entry
    k = max(1, math.ceil(target * n_keep - 1e-9))
    threshold = float(np.sort(score[keep])[::-1][k - 1])
    aside = score < threshold
    entry.update(
        threshold=threshold,
        n_set_aside=int(aside.sum()),
        fraction=float(aside.mean()),
        n_nilm_set_aside=int((aside & nilm).sum()),
        nilm_fraction=float((aside & nilm).sum() / nilm.sum()) if nilm.any() else None,
        n_abnormal_set_aside=int((aside & abnormal).sum()),
        sensitivity=float((~aside & abnormal).sum() / abnormal.sum()) if abnormal.any() else None,
        n_hsil_plus_set_aside=int((aside & hsil_plus).sum()),
        hsil_plus_sensitivity=float((~aside & hsil_plus).sum() / hsil_plus.sum())
        if hsil_plus.any()
        else None,
    )
    return entry


def evaluate_slides(batch_out_dir: str | Path, labels_csv: str | Path) -> dict[str, Any]:
    """Slide-level screening figures of a batch output directory against a labels CSV.

    Returns a JSON-serialisable dict (``None`` where undefined) with keys ``kind``
    (``"slide_evaluation"``), ``batch_dir``, ``labels_csv``, ``n_labelled``, ``n_outputs``,
    ``n_evaluated``, ``counts_by_label``, ``triage`` (:func:`~wsi_screen.metrics.binary_counts` of
    review/priority vs abnormal, plus ``hsil_plus``), ``triage_by_label``, ``category_by_label``,
    ``ranking`` (``auroc``, ``auroc_hsil_plus``, ``n_positive``, ``n_negative``, ``roc``), ``set_aside``
    (``hsil_plus_100``, ``abnormal_100``, ``abnormal_95``), ``unsatisfactory``, ``missing_output``,
    ``missing_label``, ``excluded`` and ``slides``.
    """
    out_dir, labels_path = Path(batch_out_dir), Path(labels_csv)
    rows = read_labels_csv(labels_path)
    outputs = _collect_outputs(out_dir)

    labels: dict[str, tuple[int, str, str | None]] = {}  # slide_id → (line, reference, label)
    missing_output: list[dict[str, Any]] = []
    index = _Index(outputs)
    for line, reference, label in rows:
        match = index.match(reference)
        if match is None:
            missing_output.append({"slide": reference, "label": label, "reason": "no output in the batch"})
            continue
        previous = labels.get(match.slide_id)
        if previous is not None and previous[2] != label:
            raise EvaluationError(
                f"labels CSV {labels_path}: slide {match.slide_id!r} has label {previous[2]!r} on line "
                f"{previous[0]} and {label!r} on line {line}"
            )
        labels[match.slide_id] = (line, reference, label)

    missing_label: list[dict[str, Any]] = []
    excluded: list[dict[str, Any]] = []
    evaluated: list[dict[str, Any]] = []
    for o in outputs:
        entry = labels.get(o.slide_id)
        if entry is None or entry[2] is None:
            reason = "no row in the labels CSV" if entry is None else f"empty label (line {entry[0]})"
            if o.summary is None:
                reason += f"; no usable output ({o.problem})"
            missing_label.append({"slide": o.slide_id, "reason": reason})
            continue
        label = entry[2]
        if o.summary is None:
            missing_output.append({"slide": o.slide_id, "label": label, "reason": o.problem})
            continue
        if label == UNSATISFACTORY_LABEL:
            excluded.append({"slide": o.slide_id, "label": label, "reason": "labelled unsatisfactory"})
            continue
        score = o.summary.get("score")
        evaluated.append(
            {
                "slide_id": o.slide_id,
                "slide": o.slide,
                "label": label,
                "group": _group(label),
                "triage": o.summary["triage"],
                "score": float(score) if isinstance(score, (int, float)) else None,
                "suggested_category": o.summary.get("suggested_category"),
            }
        )
    if not evaluated and not excluded:
        example_label = rows[0][1]
        example_out = outputs[0].slide_id
        raise EvaluationError(
            f"no labelled slide has a usable output in {out_dir} (labels name e.g. {example_label!r}, "
            f"outputs are e.g. {example_out!r}); the 'slide' column must hold the slide file name or id"
        )

    satisfactory = [s for s in evaluated if s["triage"] != "unsatisfactory"]
    unsat = [s for s in evaluated if s["triage"] == "unsatisfactory"]
    present = [lab for lab in LABELS if any(s["label"] == lab for s in evaluated)]

    abnormal = np.array([s["label"] != "NILM" for s in satisfactory], dtype=bool)
    hsil_plus = np.array([s["group"] == "HSIL+" for s in satisfactory], dtype=bool)
    nilm = ~abnormal
    positive = np.array([s["triage"] in _POSITIVE_TRIAGE for s in satisfactory], dtype=bool)
    score = np.array([s["score"] for s in satisfactory], dtype=np.float64)

    triage = binary_counts(abnormal, positive)
    n_hp = int(hsil_plus.sum())
    triage["hsil_plus"] = {
        "n": n_hp,
        "n_review": int((positive & hsil_plus).sum()),
        "n_priority": sum(1 for s in satisfactory if s["group"] == "HSIL+" and s["triage"] == "priority"),
        "sensitivity": float((positive & hsil_plus).sum() / n_hp) if n_hp else None,
    }

    fpr, tpr, thr = roc_curve(abnormal, score) if score.size else (np.zeros(0),) * 3
    both = hsil_plus | nilm
    ranking = {
        "n_positive": int(abnormal.sum()),
        "n_negative": int(nilm.sum()),
        "auroc": binary_auroc(abnormal, score) if score.size else None,
        "auroc_hsil_plus": binary_auroc(hsil_plus[both], score[both]) if both.any() else None,
        "roc": {"fpr": fpr, "tpr": tpr, "thresholds": thr},
    }
    set_aside = {
        "hsil_plus_100": _set_aside(score, hsil_plus, abnormal, hsil_plus, nilm, 1.0, "HSIL+"),
        "abnormal_100": _set_aside(score, abnormal, abnormal, hsil_plus, nilm, 1.0, "abnormal"),
        "abnormal_95": _set_aside(score, abnormal, abnormal, hsil_plus, nilm, 0.95, "abnormal"),
    }

    triage_by_label = {lab: {t: 0 for t in _TRIAGE} for lab in present}
    category_by_label: dict[str, dict[str, int]] = {lab: {} for lab in present}
    for s in evaluated:
        triage_by_label[s["label"]][s["triage"]] += 1
        cat = str(s["suggested_category"])
        category_by_label[s["label"]][cat] = category_by_label[s["label"]].get(cat, 0) + 1
    unsat_by_label: dict[str, int] = {}
    for s in unsat:
        unsat_by_label[s["label"]] = unsat_by_label.get(s["label"], 0) + 1

    if missing_output or missing_label:
        logger.warning(
            "%d labelled slide(s) without a usable output and %d output(s) without a label are not evaluated",
            len(missing_output),
            len(missing_label),
        )
    result: dict[str, Any] = {
        "kind": "slide_evaluation",
        "batch_dir": str(out_dir),
        "labels_csv": str(labels_path),
        "n_labelled": sum(1 for r in rows if r[2] is not None),
        "n_outputs": sum(1 for o in outputs if o.summary is not None),
        "n_evaluated": len(evaluated),
        "n_satisfactory": len(satisfactory),
        "counts_by_label": {lab: sum(1 for s in evaluated if s["label"] == lab) for lab in present},
        "triage": triage,
        "triage_by_label": triage_by_label,
        "category_by_label": category_by_label,
        "ranking": ranking,
        "set_aside": set_aside,
        "unsatisfactory": {
            "n": len(unsat),
            "by_label": unsat_by_label,
            "slides": [s["slide_id"] for s in unsat],
        },
        "missing_output": missing_output,
        "missing_label": missing_label,
        "excluded": excluded,
        "slides": sorted(evaluated, key=lambda s: (-(s["score"] or 0.0), s["slide_id"])),
    }
    return jsonable(result)  # type: ignore[no-any-return]


# -- candidate slide scores (pipelines/compare_slide_scores.py) -----------------------------------------
def candidate_slide_scores(
    probs: NDArray[Any],
    class_names: Sequence[str],
    abnormal_classes: Sequence[str],
    severity: Mapping[str, float],
    *,
    top_k: Sequence[int] = (1, 3, 10),
    thresholds: Sequence[float] = (0.5, 0.7, 0.9),
    exclude_class: str | None = "artifact",
) -> dict[str, float]:
    """Candidate slide scores of one slide's cells (``probs`` N × C), for choosing the slide score.

    With ``a`` each cell's abnormality score (summed abnormal-class probability, ``cells.zarr``
    ``score``) and ``s`` its severity score (``Σ_c severity[c] · p_c``, as ``summary.json``):

    * ``top{k}_mean``: mean of the ``k`` highest ``a`` (missing cells count as 0);
    * ``top{k}_severity``: the same of ``s`` (``top10_severity`` is the shipped ranking score with
      the shipped ``top_k``);
    * ``per1000_ge{t}``: cells with ``a ≥ t`` per 1,000 cells of the slide;
    * ``severity_per1000_ge{t}``: ``Σ s`` over the cells with ``a ≥ t``, per 1,000 cells.

    Each also as ``no_<exclude_class>/<name>``: computed without the cells whose top class is
    ``exclude_class`` (the denominator then counts the remaining cells); when the model has no such
    class the two are equal.
    """
    p = np.asarray(probs, np.float64)
    names = [str(c) for c in class_names]
    if p.ndim != 2 or p.shape[1] != len(names):
        raise ValueError(f"probs must be N×{len(names)}, got shape {p.shape}")
    out: dict[str, float] = {}
    variants: list[tuple[str, NDArray[np.bool_]]] = [("", np.ones(p.shape[0], bool))]
    if exclude_class is not None:
        keep = np.ones(p.shape[0], bool)
        if exclude_class in names and p.shape[0]:
            keep = np.argmax(p, axis=1) != names.index(exclude_class)
        variants.append((f"no_{exclude_class}/", keep))
    for prefix, keep in variants:
        q = p[keep]
        idx = [names.index(c) for c in abnormal_classes]
        a = np.clip(q[:, idx].sum(axis=1), 0.0, 1.0) if idx else np.zeros(q.shape[0])
        s = severity_scores(q, names, list(abnormal_classes), severity).astype(np.float64)
        n = q.shape[0]
        for k in top_k:
            out[f"{prefix}top{k}_mean"] = ranking_score(a, k)
            out[f"{prefix}top{k}_severity"] = ranking_score(s, k)
        for t in thresholds:
            above = a >= t
            out[f"{prefix}per1000_ge{t:g}"] = 1000.0 * float(above.sum()) / n if n else 0.0
            out[f"{prefix}severity_per1000_ge{t:g}"] = 1000.0 * float(s[above].sum()) / n if n else 0.0
    return out


def set_aside_at_full_sensitivity(scores: ArrayLike, abnormal: ArrayLike) -> dict[str, Any]:
    """Negatives set aside by the highest threshold that keeps every abnormal slide.

    The threshold is the lowest abnormal slide score; a slide is set aside when its score is strictly
    below it (ties are kept). Returns ``threshold``, ``n_negative``, ``n_set_aside`` and ``fraction``
    (``None`` without abnormal or negative slides).
    """
    s = np.asarray(scores, np.float64).reshape(-1)
    y = np.asarray(abnormal).astype(bool).reshape(-1)
    if s.shape != y.shape:
        raise ValueError(f"scores and abnormal differ in length: {s.size} vs {y.size}")
    n_neg = int((~y).sum())
    if not y.any() or n_neg == 0:
        return {"threshold": None, "n_negative": n_neg, "n_set_aside": 0, "fraction": None}
    threshold = float(s[y].min())
    aside = int((s[~y] < threshold).sum())
    return {"threshold": threshold, "n_negative": n_neg, "n_set_aside": aside, "fraction": aside / n_neg}


def score_tail(
    values: ArrayLike, quantiles: Sequence[float] = (0.99, 0.999)
) -> dict[str, int | float | None]:
    """``p99``, ``p99.9`` … (linear interpolation) and ``max`` of ``values``, plus their count ``n``."""
    v = np.asarray(values, np.float64).reshape(-1)
    v = v[np.isfinite(v)]
    out: dict[str, int | float | None] = {"n": int(v.size)}
    for q in quantiles:
        out[f"p{100 * q:g}"] = float(np.quantile(v, q)) if v.size else None
    out["max"] = float(v.max()) if v.size else None
    return out
