"""Grouped cross-validation of the localizer recipe over every Herlev cell, through ``run_slide``.

    flock /tmp/wsi-cpu.lock python pipelines/cv_localization.py --work /tmp/cv-loc --threads 2
    python pipelines/cv_localization.py --work /tmp/cv-loc --stages summary --json results.json

Herlev has 39–69 cells per normal class in ``../shared``: its test part alone (110 cells) leaves
intervals of ± 0.1–0.25 per class. Here every Herlev cell is held out once. For each of ``--folds``
folds (:func:`wsi_screen.train.fields.fold_manifest`: Herlev groups hashed into folds, the
severe-fine crops with their group; every other source keeps its committed split):

1. ``manifest``: ``WORK/fold-K/manifest.json``;
2. ``stage1``: the shipped ``nuclei-unet-v2`` recipe from scratch (``train_unet_real.py
   --representation rgb``, ``--stage1-steps``, lr 2·10⁻³), on the fold's training part only;
3. ``stage2``: the ``nuclei-unet-v3`` recipe from stage 1 (lr 10⁻³, dark-region glass patches 0.25,
   ``--stage2-steps``);
4. ``eval``: the fold's held-out Herlev cells built into a slide by ``pipelines/real_slides.py``
   (another compositor than training's) and screened through ``run_slide`` with the shipped settings
   and detection floor (``pipelines/eval_localization.py``: a nucleus is found when a detection's
   centre lies inside its mask dilated by 1 µm, one-to-one).

``summary`` pools the folds: found / nuclei per Herlev class and per issue group, Wilson 95 %
intervals, precision of the pooled slides. Every stage is skipped when its output exists, and
training resumes from its checkpoint (``--time-budget-min`` pauses a stage, resumable), so the run can
be interrupted at any point. The fold models are measuring instruments: none is shipped.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "pipelines"))

DATA = ROOT.parent / "shared" / "data"
MANIFEST = ROOT / "pipelines" / "splits" / "real.json"
STAGES = ("manifest", "stage1", "stage2", "eval", "summary")
#: the shipped detection floor of ``nuclei-unet-v2``/``v3`` (``thresholds.detection``)
DETECTION_FLOOR = 0.7

logger = logging.getLogger("cv_localization")


def fold_dir(work: Path, fold: int) -> Path:
    return work / f"fold-{fold}"


def write_fold_manifest(args: argparse.Namespace, fold: int) -> Path:
    from wsi_screen.train.fields import fold_manifest, read_split_manifest

    path = fold_dir(args.work, fold) / "manifest.json"
    if not path.is_file():
        m = fold_manifest(
            read_split_manifest(args.manifest), folds=args.folds, fold=fold, val_fraction=args.val_fraction
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(m, indent=1) + "\n")
    return path


def train_stage(args: argparse.Namespace, fold: int, stage: str) -> bool:
    """Train one stage of one fold; False when it paused on its time budget (resumable)."""
    import train_unet_real

    d = fold_dir(args.work, fold)
    out = d / stage
    if (out / "bundle.json").is_file():
        return True
    argv = [
        "--data",
        str(args.data),
        "--manifest",
        str(d / "manifest.json"),
        "--representation",
        "rgb",
        "--seed",
        str(args.seed),
        "--name",
        f"cv-fold{fold}-{stage}",
        "--checkpoint",
        str(d / f"{stage}.ckpt"),
        "--resume",
        "-o",
        str(out),
    ]
    if stage == "stage1":
        argv += ["--steps", str(args.stage1_steps)]
    else:
        argv += ["--steps", str(args.stage2_steps), "--init", str(d / "stage1"), "--lr", "1e-3"]
        argv += ["--glass-patches", "0.25"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    if args.time_budget_min:
        argv += ["--time-budget-min", str(args.time_budget_min)]
    logger.info("fold %d %s: train_unet_real.py %s", fold, stage, " ".join(argv))
    rc = train_unet_real.main(argv)
    if rc not in (0, 3):
        raise SystemExit(f"fold {fold} {stage}: training failed (exit {rc})")
    return rc == 0


def eval_fold(args: argparse.Namespace, fold: int) -> None:
    import eval_localization

    d = fold_dir(args.work, fold)
    out = d / "eval.json"
    if out.is_file():
        return
    argv = [
        "--bundle",
        str(d / "stage2"),
        "--skip",
        "synthetic",
        "--skip",
        "isbi",
        "--real",
        "herlev",
        "--real-part",
        "test",
        "--real-slides",
        str(d / "slides"),
        "--data",
        str(args.data),
        "--manifest",
        str(d / "manifest.json"),
        "--set",
        f"localization.min_detection_score={DETECTION_FLOOR}",
        "--json",
        str(out),
    ]
    logger.info("fold %d eval: eval_localization.py %s", fold, " ".join(argv))
    rc = eval_localization.main(argv)
    if rc != 0:
        raise SystemExit(f"fold {fold} eval: failed (exit {rc})")


def summarize(work: Path, folds: int) -> dict[str, Any]:
    """Pool the folds' run_slide figures: per class and per issue group, with Wilson intervals."""
    from wsi_screen.metrics import wilson_interval

    per_fold = {}
    kinds: dict[str, list[int]] = {}
    groups: dict[str, list[int]] = {}
    bands: dict[str, list[int]] = {}
    tp = detections = 0
    for fold in range(folds):
        path = fold_dir(work, fold) / "eval.json"
        if not path.is_file():
            raise SystemExit(f"fold {fold} has no {path}: run its stages first")
        row = json.loads(path.read_text())["real"]["herlev"]
        bundle = json.loads((fold_dir(work, fold) / "stage2" / "bundle.json").read_text())
        manifest = fold_dir(work, fold) / "manifest.json"
        per_fold[str(fold)] = {
            "recall": row["recall"],
            "precision": row["precision"],
            "nuclei": row["nuclei"],
            "detections": row["detections"],
            "tp": row["tp"],
            "dice_median": row["dice_median"],
            "recall_by_group": row["recall_by_group"],
            "training_steps": bundle["training"].get("steps"),
            "herlev_cells": json.loads(manifest.read_text())["counts"]["herlev"],
        }
        tp += row["tp"]
        detections += row["detections"]
        for src, acc in (
            (row["recall_by_kind"], kinds),
            (row["recall_by_group"], groups),
            ({b: row[b] for b in ("edge_band", "interior")}, bands),
        ):
            for k, v in src.items():
                a = acc.setdefault(k, [0, 0])
                a[0] += v["found"]
                a[1] += v["nuclei"]

    def pooled(acc: dict[str, list[int]]) -> dict[str, Any]:
        return {
            k: {"found": f, "nuclei": n, "recall": f / n if n else None, "wilson95": wilson_interval(f, n)}
            for k, (f, n) in sorted(acc.items())
        }

    nuclei = sum(n for _, n in kinds.values())
    return {
        "folds": folds,
        "detection_floor": DETECTION_FLOOR,
        "matching": "detection centre inside the nucleus mask dilated by 1 µm, one-to-one (run_slide)",
        "pooled": {
            "recall": tp / nuclei if nuclei else None,
            "recall_wilson95": wilson_interval(tp, nuclei),
            "precision": tp / detections if detections else None,
            "tp": tp,
            "detections": detections,
            "nuclei": nuclei,
        },
        "tile_edges": pooled(bands),
        "recall_by_group": pooled(groups),
        "recall_by_kind": pooled(kinds),
        "per_fold": per_fold,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="fold manifests, bundles, slides, results")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    p.add_argument("--folds", type=int, default=3)
    p.add_argument("--fold", type=int, action="append", default=None, help="run only this fold (repeatable)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of the other folds' groups in val")
    p.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    p.add_argument("--stage1-steps", type=int, default=400, help="v2's recipe: 400 steps from scratch")
    p.add_argument("--stage2-steps", type=int, default=600, help="v3's recipe: 600 steps of fine-tuning")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--time-budget-min", type=float, default=None, help="pause each training stage after this")
    p.add_argument("--json", type=Path, default=None, help="write the summary here too")
    args = p.parse_args(argv)
    if args.folds < 2:
        p.error(f"--folds {args.folds}: a cross-validation needs at least 2 folds")
    folds = args.fold if args.fold else list(range(args.folds))
    bad = [f for f in folds if not 0 <= f < args.folds]
    if bad:
        p.error(f"--fold {bad[0]}: give a fold in 0..{args.folds - 1}")
    if not (args.data / "herlev").is_dir():
        p.error(f"--data {args.data}: no herlev/ folder there (the shared real data)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for fold in folds:
        if set(args.stages) - {"summary"}:
            write_fold_manifest(args, fold)
        for stage in ("stage1", "stage2"):
            if stage in args.stages and not train_stage(args, fold, stage):
                print(f"fold {fold} {stage} paused on its time budget; run again to resume")
                return 3
        if "eval" in args.stages:
            eval_fold(args, fold)
    if "summary" in args.stages:
        summary = summarize(args.work, args.folds)
        summary["seconds_this_call"] = round(time.perf_counter() - t0, 1)
        text = json.dumps(summary, indent=2) + "\n"
        (args.work / "summary.json").write_text(text)
        if args.json:
            args.json.write_text(text)
        for k, v in summary["recall_by_group"].items():
            lo, hi = v["wilson95"] or (None, None)
            print(f"{k}: {v['found']}/{v['nuclei']} = {v['recall']:.3f} [{lo:.3f}, {hi:.3f}]")
        pooled = summary["pooled"]
        print(f"pooled: recall {pooled['recall']:.3f}, precision {pooled['precision']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
