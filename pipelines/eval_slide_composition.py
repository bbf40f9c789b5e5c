#!/usr/bin/env python
"""Does what else lies on a slide change how the default models see a cell? Herlev cells of one part
of the split manifest, screened three ways through the pipeline (``wsi_screen.train.pasted``).

    python pipelines/eval_slide_composition.py --part test -o pipelines/results/slide-composition.json

Compositions (the same cells, the classifier's training compositor, the same seed):

``glass``
    the part's Herlev cells alone on glass (what ``wsi-screen evaluate --cut pipeline`` does with a
    Herlev crop folder);
``fields``
    the same cells over real LBC fields of the part (``lbc-nuclei``, unrotated copies), as in the
    classifier's training slides;
``mixed``
    the part's Herlev cells and ``lbc-cells`` crops together over those fields (the training slides'
    full design).

For each: the share of Herlev cells found by the localizer, the per-cell needs-review AUROC (a cell
scored by its most abnormal detection; a missed cell as a negative call), and per Herlev class the
share flagged at the classifier's export threshold (``thresholds.flag_score``) and the top classes.
Slide-level Reinhard statistics come from what the slide holds, so the three differ only in that and
in the crowding.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "pipelines"))

COMPOSITIONS = ("glass", "fields", "mixed")


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["val", "test"], default="val")
    p.add_argument("--compositions", nargs="+", choices=COMPOSITIONS, default=list(COMPOSITIONS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classifier", default=None, help="classification bundle (default: the shipped one)")
    p.add_argument("-o", "--output", type=Path, required=True)
    args = p.parse_args(argv)

    import train_classifier_real as tcr

    from wsi_screen.cells import abnormality_score
    from wsi_screen.config import load_settings
    from wsi_screen.pipeline import load_models, resolve_flag_threshold
    from wsi_screen.stain import ReinhardStats
    from wsi_screen.train.cell_slides import load_labelled_cells
    from wsi_screen.train.data import load_class_map
    from wsi_screen.train.fields import read_split_manifest, split_names
    from wsi_screen.train.pasted import screen_cells

    ns = argparse.Namespace(data=tcr.DATA, manifest=tcr.MANIFEST)
    manifest = read_split_manifest(tcr.MANIFEST)
    herlev = load_labelled_cells(
        tcr.DATA, "herlev", split_names(manifest, "herlev", args.part), load_class_map("herlev-bethesda")
    )
    overrides = {"classification.models": [args.classifier]} if args.classifier else {}
    settings = load_settings(overrides=overrides)
    models = load_models(settings)
    settings = resolve_flag_threshold(settings, models.classifier)
    flag = float(settings.output.flag_min_score or 0.5)
    clf = models.classifier
    st = clf.bundles[0].config.stain_target
    target = None if st is None else ReinhardStats(st.mu, st.sigma)
    out: dict[str, Any] = {
        "part": args.part,
        "models": models.describe(),
        "flag_min_score": flag,
        "seed": args.seed,
    }
    for comp in args.compositions:
        cells = list(herlev)
        if comp == "mixed":
            lbc = load_labelled_cells(
                tcr.DATA,
                "lbc_cells",
                split_names(manifest, "lbc_cells", args.part),
                load_class_map("lbc-cells-bethesda"),
            )
            cells += lbc
        backgrounds = tcr.part_backgrounds(ns, args.part) if comp in ("fields", "mixed") else []
        res = screen_cells(
            cells,
            [c.name for c in cells],
            classifier=clf,
            localizer=models.localizer,
            settings=settings,
            target=target,
            seed=args.seed,
            backgrounds=backgrounds,
            progress=False,
        )
        is_herlev = np.array([c.source == "herlev" for c in cells])
        score = abnormality_score(res.probs, clf.class_names, clf.abnormal_classes)[is_herlev]
        labels = np.array(res.labels)[is_herlev]
        folder = np.array([c.name.split("/", 1)[0] for c in cells])[is_herlev]
        top = np.array(clf.class_names)[res.probs[is_herlev].argmax(axis=1)]
        positive = np.isin(labels, clf.abnormal_classes)
        entry: dict[str, Any] = {
            "herlev_cells": int(is_herlev.sum()),
            "found": float(res.detected[is_herlev].mean()),
            "needs_review_auroc": _auroc(score, positive),
            "by_class": {},
        }
        for f in sorted(set(folder.tolist())):
            m = folder == f
            names, counts = np.unique(top[m], return_counts=True)
            entry["by_class"][f] = {
                "cells": int(m.sum()),
                "found": float(res.detected[is_herlev][m].mean()),
                "flagged": float((score[m] >= flag).mean()),
                "top_classes": {str(a): int(b) for a, b in zip(names, counts, strict=True)},
            }
        out[comp] = entry
        print(
            f"{comp:7s} found {entry['found']:.3f} AUROC {entry['needs_review_auroc']:.3f} "
            + " ".join(f"{k[:12]}={v['flagged']:.2f}" for k, v in entry["by_class"].items()),
            flush=True,
        )
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
