#!/usr/bin/env python
"""Evaluate the default bundles on fresh synthetic slides through the real screening path.

Slides are drawn with other seeds than the training slides of ``pipelines/train_classifier.py``
(specs from ``synthetic_specs(n, seed=--seed)``; training uses seed 1), then screened by
``wsi_screen.pipeline.run_slide`` exactly as ``wsi-screen run`` screens a slide (cell regions, tiles,
Reinhard, U-Net, ownership, crops, classifier, outputs). Every cell of ``cells.zarr`` is matched to the
ground truth (nearest nucleus within one nucleus radius, ``match_detections``):

- **detection recall**: nucleated truth objects found by at least one cell, per class;
- **classification**: the screening metrics (``classification_metrics``) of every detected cell,
  labelled by the object it falls on (detections on no nucleus are ``artifact``), and the accuracy
  on matched cells alone;
- **slides**: the triage and suggested category of each slide, including NILM-only slides and
  slides with only a few abnormal cells.

    flock /tmp/wsi-cpu.lock python pipelines/eval_synthetic.py -o runs/eval-synthetic
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["NILM", "ASC-US", "LSIL", "HSIL", "artifact"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", type=Path, default=ROOT / "runs" / "eval-synthetic")
    p.add_argument("--slides", type=int, default=6, help="abnormal-rich slides for the cell-level figures")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--seed", type=int, default=9, help="spec seed (training used 1)")
    p.add_argument("--model", action="append", default=None, help="classifier bundle(s) (cyto-synth-v1)")
    p.add_argument("--localizer", default=None, help="localization bundle (nuclei-unet-v1)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from wsi_screen.config import load_settings
    from wsi_screen.metrics import classification_metrics, format_metrics_table, write_metrics_report
    from wsi_screen.pipeline import load_models, run_slide
    from wsi_screen.store import read_cells
    from wsi_screen.synth import load_truth, synthesize_slide
    from wsi_screen.train.data import SyntheticSlideSpec, match_detections, synthetic_specs

    overrides: dict[str, Any] = {"runtime.device": args.device}
    if args.model:
        overrides["classification.models"] = args.model
    if args.localizer:
        overrides["localization.model"] = args.localizer
    settings = load_settings(overrides=overrides)
    models = load_models(settings)
    specs = synthetic_specs(args.slides, seed=args.seed, size_px=args.size)
    base = 10_000 * args.seed
    extra = [
        SyntheticSlideSpec(args.slides + i, base + 101 + i, args.size, prep, stain, abn, 0.05)
        for i, (prep, stain, abn) in enumerate(
            [
                ("lbc", "default", {}),
                ("conventional", "blue", {}),
                ("lbc", "pink", {"HSIL": 3}),
                ("lbc", "scanner_b", {"LSIL": 4}),
            ]
        )
    ]
    slides_dir = args.out / "slides"
    screen_dir = args.out / "screened"
    slides_dir.mkdir(parents=True, exist_ok=True)
    y_true: list[str] = []
    probs: list[np.ndarray] = []
    matched_all: list[bool] = []
    truth_total: Counter[str] = Counter()
    truth_found: Counter[str] = Counter()
    split_nuclei = 0
    slide_rows = []
    class_names: list[str] = []
    t_all = time.perf_counter()
    for spec in [*specs, *extra]:
        path = slides_dir / f"eval-{spec.index:02d}-{spec.preparation}-{spec.stain}.tiff"
        if not path.is_file():
            synthesize_slide(
                path,
                size=(spec.size_px, spec.size_px),
                seed=spec.seed,
                abnormal=spec.abnormal,
                preparation=spec.preparation,
                stain=spec.stain,
                blur_fraction=spec.blur_fraction,
                workers=1,
            )
        truth = load_truth(path)
        t0 = time.perf_counter()
        result = run_slide(path, screen_dir, settings=settings, models=models, progress=False)
        seconds = time.perf_counter() - t0
        cells, attrs = read_cells(result.out_dir / "cells.zarr")
        class_names = list(attrs["class_names"])
        labels, obj = match_detections(np.asarray(cells.x), np.asarray(cells.y), truth)
        nucleated = [o for o in truth.objects if o.nucleus_xy is not None]
        found = set(obj[obj >= 0].tolist())
        for o in nucleated:
            truth_total[o.klass] += 1
            truth_found[o.klass] += int(o.id in found)
        split_nuclei += int(len(obj[obj >= 0]) - len(found))
        if spec in specs:  # cell-level figures on the abnormal-rich slides
            y_true += labels.tolist()
            probs.append(np.asarray(cells.probs, np.float64))
            matched_all += (obj >= 0).tolist()
        counts = truth.class_counts()
        s = result.summary
        slide_rows.append(
            {
                "slide": path.name,
                "preparation": spec.preparation,
                "stain": spec.stain,
                "truth_abnormal": {k: counts[k] for k in ("ASC-US", "LSIL", "HSIL") if counts[k]},
                "cells": result.n_cells,
                "triage": s.get("triage"),
                "suggested_category": s.get("suggested_category"),
                "score": s.get("score"),
                "seconds": round(seconds, 1),
            }
        )
        print(f"{path.name}: {result.triage_line()} ({seconds:.0f} s)", flush=True)

    p_all = np.concatenate(probs)
    y = np.array([class_names.index(c) for c in y_true], np.int64)
    abnormal = [c for c in ("ASC-US", "LSIL", "HSIL") if c in class_names]
    metrics = classification_metrics(y, p_all, class_names, abnormal)
    matched = np.array(matched_all, bool)
    pred = np.argmax(p_all, axis=1)
    recall = {
        k: {"n_truth": truth_total[k], "n_found": truth_found[k], "recall": truth_found[k] / truth_total[k]}
        for k in CLASSES
        if truth_total[k]
    }
    n_truth = sum(truth_total.values())
    metrics["synthetic_evaluation"] = {
        "command": " ".join(["python", *(shlex.quote(a) for a in sys.argv)]),
        "models": models.describe(),
        "slides": slide_rows,
        "cell_level_slides": len(specs),
        "detection_recall": {
            "overall": sum(truth_found.values()) / n_truth,
            "n_truth": n_truth,
            "per_class": recall,
            "extra_detections_on_matched_objects": split_nuclei,
        },
        "matched_accuracy": float(np.mean(pred[matched] == y[matched])) if matched.any() else None,
        "n_unmatched_detections": int((~matched).sum()),
        "seconds": round(time.perf_counter() - t_all, 1),
    }
    written = write_metrics_report(
        metrics, args.out / "metrics", title="cyto-synth-v1 on fresh synthetic slides"
    )
    print(format_metrics_table(metrics))
    print("\nDetection recall (nucleated truth objects with ≥ 1 detected cell):")
    print("| class | truth | found | recall |\n|---|---|---|---|")
    for k, r in recall.items():
        print(f"| {k} | {r['n_truth']} | {r['n_found']} | {100 * r['recall']:.1f} % |")
    n_found = sum(truth_found.values())
    print(f"| all | {n_truth} | {n_found} | {100 * n_found / n_truth:.1f} % |")
    print("\n| slide | truth abnormal | cells | triage | suggested | score |\n|---|---|---|---|---|---|")
    for r in slide_rows:
        ab = ", ".join(f"{k} {v}" for k, v in r["truth_abnormal"].items()) or "none (NILM)"
        print(
            f"| {r['slide']} | {ab} | {r['cells']} | {r['triage']} | {r['suggested_category']} | "
            f"{float(r['score'] or 0):.2f} |"
        )
    (args.out / "summary.json").write_text(json.dumps(metrics["synthetic_evaluation"], indent=2) + "\n")
    print(f"\nreport: {written['html']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
