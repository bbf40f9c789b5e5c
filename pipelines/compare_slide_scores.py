"""Compare candidate slide scores on a screened cohort (issue 15, item 2).

    python pipelines/compare_slide_scores.py COHORT/batch --diagnoses COHORT/diagnoses.csv -o scores.json

Reads every diagnosed slide's ``cells.zarr`` of a ``wsi-screen batch`` output (class probabilities of
every cell) and scores each slide several ways (:func:`wsi_screen.evaluation.candidate_slide_scores`):
top-k means (k = 1, 3, 10) of the abnormality score and of the severity score, cells above a cell
threshold per 1,000 cells, and severity-weighted counts per 1,000 cells (weights: the batch's
``triage.severity``), each with and without the cells whose top class is ``artifact``; plus the
shipped ``summary.json`` score for reference. For each score: the slide AUROC (abnormal vs NILM,
ties count one half; also HSIL+ vs NILM) and the share of NILM slides set aside at 100 % sensitivity
(threshold = the lowest abnormal slide's score; ties kept). Also the tail (p99, p99.9, max) of the cell
scores on the NILM slides, where a slide score with rare abnormal cells has to live.

With ``--cohort DIR`` (a real-cell cohort of ``build_cohorts.py``, whose ``truth/*.truth.npz`` hold
the pasted cells' footprints and names) it also breaks the cells down by the truth cell each detection
lies in (:func:`cells_by_truth_type`: Herlev class folder, ``lbc-cells`` folder, ``lbc_field_nucleus``
for a background field's nucleus, ``unmatched`` for none), on the NILM and on the abnormal slides: how
many detections, the share flagged (abnormality score ≥ the batch's ``output.flag_min_score``) and
their tail. That says which NILM cells carry the false flags.

Writes the JSON (``-o``, default ``BATCH_OUT/slide-scores.json``) and prints a table, best first (most
NILM set aside at full sensitivity, then AUROC). Slides diagnosed ``unsatisfactory`` are left out;
slides triaged unsatisfactory are scored (the comparison is of the ranking, not of adequacy).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TOP_K = (1, 3, 10)
DEFAULT_THRESHOLDS = (0.3, 0.5, 0.7, 0.9)
SHIPPED = "summary.score"


def load_cohort_cells(batch_dir: Path, diagnoses: Path) -> list[dict[str, Any]]:
    """Every diagnosed slide of a batch output: ``slide_id``, ``diagnosis``, ``probs``, ``class_names``,
    ``abnormal_classes``, ``severity`` (the batch's), ``summary_score`` and ``triage``."""
    from wsi_screen.config import TriageSettings
    from wsi_screen.evaluation import (
        UNSATISFACTORY_LABEL,
        EvaluationError,
        _collect_outputs,
        _Index,
        read_labels_csv,
    )
    from wsi_screen.store import read_attrs, read_column

    rows = read_labels_csv(diagnoses, label_columns=("diagnosis", "label"))
    outputs = _collect_outputs(batch_dir)
    index = _Index(outputs)
    label_of: dict[str, str] = {}
    unmatched = []
    for _, reference, label in rows:
        o = index.match(reference)
        if o is None:
            unmatched.append(reference)
        elif label is not None:
            label_of[o.slide_id] = label
    if unmatched:
        raise EvaluationError(
            f"{len(unmatched)} diagnoses name no slide of {batch_dir}: {', '.join(unmatched[:5])}"
        )
    default_severity = TriageSettings().severity
    slides = []
    for o in outputs:
        label = label_of.get(o.slide_id)
        if label is None or label == UNSATISFACTORY_LABEL:
            continue
        store = batch_dir / o.slide_id / "cells.zarr"
        attrs = read_attrs(store)
        names = [str(c) for c in attrs["class_names"]]
        probs = np.asarray(read_column(store, "probs"), np.float32).reshape(-1, len(names))
        summary = o.summary or {}
        rules = ((summary.get("rules") or {}).get("triage")) or {}
        severity = rules.get("severity") if isinstance(rules.get("severity"), Mapping) else None
        score = summary.get("score")
        slides.append(
            {
                "slide_id": o.slide_id,
                "diagnosis": label,
                "probs": probs,
                "class_names": names,
                "abnormal_classes": [str(c) for c in attrs["abnormal_classes"]],
                "severity": dict(severity or default_severity),
                "summary_score": float(score) if isinstance(score, (int, float)) else None,
                "triage": summary.get("triage"),
            }
        )
    if not slides:
        raise EvaluationError(f"no diagnosed slide of {batch_dir} has a cells.zarr to score")
    return slides


def compare(
    slides: Sequence[Mapping[str, Any]],
    *,
    top_k: Sequence[int] = DEFAULT_TOP_K,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    high_grade: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every candidate score of every slide, and per score the slide AUROC and the NILM share set
    aside at 100 % sensitivity; the NILM slides' cell-score tail. ``slides`` as
    :func:`load_cohort_cells` returns them (``summary_score`` may be missing)."""
    from wsi_screen.evaluation import (
        HSIL_PLUS_LABELS,
        candidate_slide_scores,
        score_tail,
        set_aside_at_full_sensitivity,
    )
    from wsi_screen.metrics import binary_auroc, jsonable
    from wsi_screen.summary import severity_scores

    hg = frozenset(high_grade) if high_grade is not None else HSIL_PLUS_LABELS
    per_slide: list[dict[str, float]] = []
    nilm_cells: dict[str, list[np.ndarray]] = {
        "abnormality": [],
        "no_artifact/abnormality": [],
        "severity": [],
    }
    has_artifact = False
    for s in slides:
        names, abn = list(s["class_names"]), list(s["abnormal_classes"])
        probs = np.asarray(s["probs"], np.float64)
        scores = candidate_slide_scores(probs, names, abn, s["severity"], top_k=top_k, thresholds=thresholds)
        if s.get("summary_score") is not None:
            scores = {SHIPPED: float(s["summary_score"]), **scores}
        per_slide.append(scores)
        has_artifact = has_artifact or "artifact" in names
        if s["diagnosis"] == "NILM" and probs.shape[0]:
            idx = [names.index(c) for c in abn]
            a = np.clip(probs[:, idx].sum(axis=1), 0.0, 1.0)
            nilm_cells["abnormality"].append(a)
            if "artifact" in names:
                a = a[np.argmax(probs, axis=1) != names.index("artifact")]
            nilm_cells["no_artifact/abnormality"].append(a)
            nilm_cells["severity"].append(severity_scores(probs, names, abn, s["severity"]))
    keys = [k for k in per_slide[0] if all(k in p for p in per_slide)]
    y = np.array([s["diagnosis"] != "NILM" for s in slides], bool)
    hp = np.array([s["diagnosis"] in hg for s in slides], bool)
    both = hp | ~y
    table = []
    for k in keys:
        v = np.array([p[k] for p in per_slide], np.float64)
        aside = set_aside_at_full_sensitivity(v, y)
        aside_hp = set_aside_at_full_sensitivity(v[both], hp[both])
        table.append(
            {
                "score": k,
                "auroc": binary_auroc(y, v),
                "auroc_hsil_plus": binary_auroc(hp[both], v[both]) if both.any() else None,
                "set_aside_100": aside,
                "set_aside_100_hsil_plus": aside_hp,
            }
        )
    table.sort(
        key=lambda r: (
            -(r["set_aside_100"]["fraction"] or 0.0),
            -(r["auroc"] if r["auroc"] == r["auroc"] else 0.0),
            r["score"],
        )
    )
    tail = {k: score_tail(np.concatenate(v) if v else np.zeros(0)) for k, v in nilm_cells.items()}
    counts: dict[str, int] = {}
    for s in slides:
        counts[s["diagnosis"]] = counts.get(s["diagnosis"], 0) + 1
    result = {
        "kind": "slide_score_comparison",
        "n_slides": len(slides),
        "n_abnormal": int(y.sum()),
        "n_nilm": int((~y).sum()),
        "n_hsil_plus": int(hp.sum()),
        "diagnoses": counts,
        "top_k": list(top_k),
        "thresholds": list(thresholds),
        "artifact_class": has_artifact,
        "scores": table,
        "nilm_cell_tail": tail,
        "slides": [
            {
                "slide_id": s["slide_id"],
                "diagnosis": s["diagnosis"],
                "triage": s.get("triage"),
                "n_cells": int(np.asarray(s["probs"]).shape[0]),
                "scores": p,
            }
            for s, p in zip(slides, per_slide, strict=True)
        ],
    }
    return jsonable(result)  # type: ignore[no-any-return]


UNMATCHED = "unmatched"
FIELD_NUCLEUS = "lbc_field_nucleus"


def cells_by_truth_type(
    batch_dir: Path, cohort_dir: Path, slides: Sequence[Mapping[str, Any]], threshold: float | None = None
) -> dict[str, Any]:
    """Detections of every slide grouped by the truth cell they lie in, on NILM and abnormal slides.

    A detection's level-0 centre is looked up in its slide's ``truth/<slide_id>.truth.npz``: inside a
    pasted cell's footprint (``cells``), its type is the first folder of that cell's name (Herlev class,
    ``lbc-cells`` class or organism); else inside a background field's nucleus
    (``background``) it is ``lbc_field_nucleus``; else ``unmatched``. ``threshold``: the flag
    threshold (default: the batch's ``output.flag_min_score``). Per group and type: ``n`` detections,
    ``flagged`` share with abnormality score ≥ threshold, and the score tail.
    """
    from wsi_screen.cells import abnormality_score
    from wsi_screen.errors import WsiScreenError
    from wsi_screen.evaluation import score_tail
    from wsi_screen.store import read_attrs, read_column

    groups: dict[str, dict[str, list[np.ndarray]]] = {"nilm_slides": {}, "abnormal_slides": {}}
    for s in slides:
        truth_path = cohort_dir / "truth" / f"{s['slide_id']}.truth.npz"
        if not truth_path.is_file():
            raise WsiScreenError(f"{truth_path} not found: --cohort must be the cohort of this batch")
        with np.load(truth_path) as t:
            if "names" not in t.files:
                raise WsiScreenError(f"{truth_path} has no cell names (a real-cell paste cohort is needed)")
            cells, background, names = t["cells"], t["background"], [str(n) for n in t["names"]]
        store = batch_dir / str(s["slide_id"]) / "cells.zarr"
        if threshold is None:
            threshold = float(read_attrs(store)["config"]["output"]["flag_min_score"])
        x = np.asarray(read_column(store, "x"), np.float64)
        y = np.asarray(read_column(store, "y"), np.float64)
        # the score the GeoJSON export flags by (float32, as in cells.zarr)
        score = abnormality_score(np.asarray(s["probs"]), s["class_names"], s["abnormal_classes"])
        xi = np.clip(np.floor(x).astype(np.int64), 0, cells.shape[1] - 1)
        yi = np.clip(np.floor(y).astype(np.int64), 0, cells.shape[0] - 1)
        lab = cells[yi, xi].astype(np.int64)
        in_bg = background[yi, xi] > 0
        kinds = np.array(
            [
                names[v - 1].split("/", 1)[0] if v else (FIELD_NUCLEUS if b else UNMATCHED)
                for v, b in zip(lab, in_bg, strict=True)
            ],
            dtype=object,
        )
        g = groups["nilm_slides" if s["diagnosis"] == "NILM" else "abnormal_slides"]
        for k in set(kinds.tolist()):
            g.setdefault(k, []).append(score[kinds == k])
    out: dict[str, Any] = {"flag_threshold": threshold}
    for name, g in groups.items():
        table = {}
        for k in sorted(g):
            v = np.concatenate(g[k])
            table[k] = {"flagged": float(np.mean(v >= threshold)), **score_tail(v)}
        out[name] = table
    return out


def _f(v: Any, fmt: str = ".3f") -> str:
    return format(float(v), fmt) if isinstance(v, (int, float)) and v == v else "–"


def format_table(result: Mapping[str, Any]) -> str:
    """The comparison as a plain-text table (best first)."""
    lines = [
        f"{result['n_slides']} slides: {result['n_abnormal']} abnormal ({result['n_hsil_plus']} HSIL+), "
        f"{result['n_nilm']} NILM"
        + ("" if result["artifact_class"] else "; the model has no artifact class (no_artifact = all)"),
        "",
        f"{'score':<36} {'AUROC':>6} {'HSIL+':>6} {'NILM set aside @100%':>21} {'threshold':>10} "
        f"{'(HSIL+ @100%)':>14}",
    ]
    for r in result["scores"]:
        a, h = r["set_aside_100"], r["set_aside_100_hsil_plus"]
        shown = f"{a['n_set_aside']}/{a['n_negative']} = {_f(a['fraction'], '.1%')}"
        lines.append(
            f"{r['score']:<36} {_f(r['auroc']):>6} {_f(r['auroc_hsil_plus']):>6} {shown:>21} "
            f"{_f(a['threshold'], '.4g'):>10} {_f(h['fraction'], '.1%'):>14}"
        )
    lines += ["", "cell scores on the NILM slides (pooled):"]
    for k, t in result["nilm_cell_tail"].items():
        lines.append(
            f"  {k:<26} n {t['n']:>8}  p99 {_f(t['p99'], '.4f')}  p99.9 {_f(t['p99.9'], '.4f')}  "
            f"max {_f(t['max'], '.4f')}"
        )
    by = result.get("cells_by_truth_type")
    if by:
        lines += [
            "",
            f"detections by truth cell type (flagged: abnormality ≥ {_f(by['flag_threshold'], '.4g')}):",
        ]
        for group in ("nilm_slides", "abnormal_slides"):
            for k, t in by[group].items():
                lines.append(
                    f"  {group:<16} {k:<22} n {t['n']:>7}  flagged {_f(t['flagged'], '.1%'):>6}  "
                    f"p99 {_f(t['p99'], '.3f')}  p99.9 {_f(t['p99.9'], '.3f')}"
                )
    return "\n".join(lines)


def _numbers(text: str, kind: type) -> list[Any]:
    return [kind(t) for t in text.split(",") if t.strip()]


def main(argv: list[str] | None = None) -> int:
    from wsi_screen.calibration import parse_high_grade
    from wsi_screen.errors import WsiScreenError

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("batch_out", type=Path, help="output folder of `wsi-screen batch`")
    p.add_argument("--diagnoses", type=Path, required=True, help="CSV: slide,diagnosis")
    p.add_argument("--top-k", default=",".join(map(str, DEFAULT_TOP_K)))
    p.add_argument("--thresholds", default=",".join(map(str, DEFAULT_THRESHOLDS)), help="cell thresholds")
    p.add_argument(
        "--high-grade", default=None, help="HSIL+ diagnoses (default: ASC-H, HSIL, AGC, AIS, SCC…)"
    )
    p.add_argument(
        "--cohort", type=Path, default=None, help="real-cell cohort folder: cells by truth cell type"
    )
    p.add_argument("-o", "--out", type=Path, default=None, help="JSON (default BATCH_OUT/slide-scores.json)")
    args = p.parse_args(argv)
    try:
        top_k = _numbers(args.top_k, int)
        thresholds = _numbers(args.thresholds, float)
        if not top_k or min(top_k) < 1 or not thresholds:
            p.error("--top-k needs integers ≥ 1 and --thresholds at least one value")
        hg = parse_high_grade(args.high_grade) if args.high_grade else None
        slides = load_cohort_cells(args.batch_out, args.diagnoses)
        result = compare(slides, top_k=top_k, thresholds=thresholds, high_grade=hg)
        if args.cohort is not None:
            result["cells_by_truth_type"] = cells_by_truth_type(args.batch_out, args.cohort, slides)
    except (WsiScreenError, ValueError) as exc:
        print(f"compare_slide_scores: error: {exc}", file=sys.stderr)
        return 2
    result["batch_dir"] = str(args.batch_out)
    result["diagnoses_csv"] = str(args.diagnoses)
    out = args.out or args.batch_out / "slide-scores.json"
    out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(format_table(result))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
