#!/usr/bin/env python
"""End-to-end classifier figures through ``run_slide`` on slides of held-out real cells.

    python pipelines/eval_classifier_slides.py --part val --work /tmp/e2e            # the shipped defaults
    python pipelines/eval_classifier_slides.py --part test --classifier cyto-real-v1 --work /tmp/e2e

The slides come from ``pipelines/real_slides.py`` (not the compositor that made the training slides:
RGB 'over' blending, another lattice and glass): ``real-cells-<part>`` (every Herlev cell and
``lbc-cells`` crop of the part, cell footprints labelled by class) and ``real-lbc-<part>`` (the
part's LBC fields: NILM squamous cells and neutrophils). Each is screened with the shipped defaults
(only ``adequacy.min_squamous_cells=0``, as the slides are small, and the models given). A cell is
*flagged* when a detection inside its footprint (for LBC fields: on its nucleus, dilated by 1 µm) has
an abnormality score ≥ ``output.flag_min_score`` — what a reviewer is shown in QuPath.
Per class: cells, detected (any detection), flagged, with Wilson 95 % intervals. ``WORK/e2e-<part>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "pipelines"))
DATA = ROOT.parent / "shared" / "data"
MANIFEST = ROOT / "pipelines" / "splits" / "real.json"


def _rate(k: int, n: int) -> dict[str, Any]:
    from wsi_screen.metrics import wilson_interval

    return {"k": k, "n": n, "rate": (k / n) if n else None, "wilson95": wilson_interval(k, n)}


#: Classes whose cells count as abnormal in the ``all abnormal`` rows.
ABNORMAL = ("ASC-US", "LSIL", "ASC-H", "HSIL", "SCC", "AGC")


def score_cells(
    cells_zarr: Path,
    truth_path: Path,
    *,
    threshold: float,
    labels_key: str,
    sweep: tuple[float, ...] = (),
) -> dict[str, Any]:
    """Per-class flagged fractions of the truth objects (``cells`` footprints or ``nuclei``); with
    ``sweep``, the same fractions at each of those thresholds (``by_threshold``, to choose an export
    threshold on validation slides)."""
    from scipy.ndimage import grey_dilation

    from wsi_screen.cells import abnormality_score
    from wsi_screen.store import read_attrs, read_cells

    table, _ = read_cells(cells_zarr)
    attrs = read_attrs(cells_zarr)
    names = list(attrs["class_names"])
    abnormal = list(attrs["abnormal_classes"])
    score = abnormality_score(np.asarray(table.probs), names, abnormal)
    with np.load(truth_path) as z:
        lab = z[labels_key]
        kinds = [str(k) for k in z["cell_kind" if labels_key == "cells" else "kind"]]
        mpp = float(z["mpp"])
    if labels_key == "nuclei":
        r = max(1, round(1.0 / mpp))
        lab = grey_dilation(lab, footprint=np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= r)
    H, W = lab.shape
    xs = np.clip(np.floor(np.asarray(table.x)).astype(np.int64), 0, W - 1)
    ys = np.clip(np.floor(np.asarray(table.y)).astype(np.int64), 0, H - 1)
    on = lab[ys, xs].astype(np.int64)
    n_obj = len(kinds)
    detected = np.zeros(n_obj, bool)
    flagged = np.zeros(n_obj, bool)
    best = np.zeros(n_obj, np.float64)
    for o, sc in zip(on.tolist(), score.tolist(), strict=True):
        if o > 0:
            detected[o] = True
            best[o] = max(best[o], sc)
            flagged[o] |= sc >= threshold
    out: dict[str, Any] = {"threshold": threshold, "by_class": {}}
    for kind in sorted(set(kinds[1:])):
        ids = [i for i in range(1, n_obj) if kinds[i] == kind]
        out["by_class"][kind] = {
            "objects": len(ids),
            "detected": _rate(int(detected[ids].sum()), len(ids)),
            "flagged": _rate(int(flagged[ids].sum()), len(ids)),
            "best_score_median": float(np.median(best[ids])) if ids else None,
        }
    abnormal = [i for i in range(1, n_obj) if kinds[i] in ABNORMAL]
    if abnormal:
        out["by_class"]["all abnormal"] = {
            "objects": len(abnormal),
            "detected": _rate(int(detected[abnormal].sum()), len(abnormal)),
            "flagged": _rate(int(flagged[abnormal].sum()), len(abnormal)),
            "best_score_median": float(np.median(best[abnormal])),
        }
    by_threshold: dict[str, dict[str, Any]] = {}
    for t in sweep:
        hit = detected & (best >= t)
        row = {}
        for kind in sorted(set(kinds[1:])):
            ids = [i for i in range(1, n_obj) if kinds[i] == kind]
            row[kind] = _rate(int(hit[ids].sum()), len(ids))
        if abnormal:
            row["all abnormal"] = _rate(int(hit[abnormal].sum()), len(abnormal))
        by_threshold[f"{t:.4f}"] = row
    if by_threshold:
        out["by_threshold"] = by_threshold
    out["detections"] = len(score)
    out["detections_on_nothing"] = int((on == 0).sum())
    out["detections_on_nothing_flagged"] = int(((on == 0) & (score >= threshold)).sum())
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    p.add_argument("--part", choices=["val", "test"], default="val")
    p.add_argument(
        "--classifier", nargs="*", default=None, help="classification bundle(s) (default: shipped)"
    )
    p.add_argument("--localizer", default=None, help="localization bundle (default: shipped)")
    p.add_argument("--slides", type=Path, default=None, help="slide folder (default WORK/slides)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument(
        "--sweep",
        type=float,
        nargs="*",
        default=[],
        help="also report flagged fractions at these export thresholds (choose one on --part val)",
    )
    args = p.parse_args(argv)

    import real_slides

    from wsi_screen.config import load_settings
    from wsi_screen.pipeline import load_models, resolve_flag_threshold, run_slide

    slides = args.slides or args.work / "slides"
    overrides: dict[str, Any] = {"adequacy.min_squamous_cells": 0}
    if args.classifier:
        overrides["classification.models"] = list(args.classifier)
    if args.localizer:
        overrides["localization.model"] = args.localizer
    settings = load_settings(overrides=overrides)
    models = load_models(settings)
    settings = resolve_flag_threshold(settings, models.classifier)
    threshold = float(settings.output.flag_min_score or 0.0)
    result: dict[str, Any] = {
        "part": args.part,
        "overrides": overrides,
        "classification": list(settings.classification.models),
        "localization": settings.localization.model,
        "flag_min_score": threshold,
    }
    for kind, key in (("cells", "cells"), ("lbc", "nuclei")):
        path = slides / f"real-{kind}-{args.part}.tiff"
        if not path.is_file():
            real_slides.build(args.data, args.manifest, args.part, slides, which=[kind])
        t0 = time.perf_counter()
        res = run_slide(path, args.work / "runs", settings=settings, models=models, progress=False)
        row = score_cells(
            res.out_dir / "cells.zarr",
            path.with_suffix(".truth.npz"),
            threshold=threshold,
            labels_key=key,
            sweep=tuple(args.sweep),
        )
        summary = json.loads((res.out_dir / "summary.json").read_text())
        row["triage"] = summary["triage"]
        row["suggested_category"] = summary["suggested_category"]
        row["slide_score"] = summary["score"]
        row["seconds"] = round(time.perf_counter() - t0, 1)
        result[kind] = row
        for c, v in row["by_class"].items():
            print(
                f"{kind:5s} {c:10s} n={v['objects']:4d} detected={v['detected']['rate']:.3f} "
                f"flagged={v['flagged']['rate']:.3f}",
                flush=True,
            )
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.work / f"e2e-{args.part}.json"
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
