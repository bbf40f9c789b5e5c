#!/usr/bin/env python
"""Train the shipped demonstration classifier ``cyto-synth-v1`` on synthetic slides.

Every training crop is cut by the inference path: synthetic slides (``wsi_screen.synth``, several
seeds, stain profiles, LBC and conventional preparations, 8–30 cells of each abnormal class per
slide) are screened by ``TileProcessor(classifier=None, keep_crops=True)`` with the shipped U-Net
``nuclei-unet-v1``; each detected cell is labelled by the ground-truth nucleus it falls on (unmatched
detections are ``artifact``). Splits are by slide. The bundle is written with float16 weights.

    flock /tmp/wsi-cpu.lock python pipelines/train_classifier.py            # ≈ 25 min on 2 CPU cores
    python pipelines/train_classifier.py --slides 6 --max-minutes 2 --out /tmp/quick   # a smoke run

Crops are cached in ``--work/crops`` (default ``runs/cyto-synth-v1/crops``), reused while the
localization bundle and the settings are unchanged.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "wsi_screen" / "models" / "bundles" / "cyto-synth-v1"
#: Object kinds (``wsi_screen.synth.KINDS``; ``none`` = a detection on no nucleus) sampled more often.
HARD_NEGATIVES = ("parabasal", "superficial", "neutrophil", "lymphocyte", "none")

DESCRIPTION = (
    "Demonstration cell classifier (MobileNetV3-small, 224 px crops at 0.25 µm/px) trained only on "
    "synthetic Papanicolaou-stained cells cut by the wsi-screen inference path."
)
INTENDED_USE = (
    "Demonstrating and testing the wsi-screen pipeline end to end (demo slides, CI, benchmarks) and "
    "serving as a template for training a lab's own classifier (`wsi-screen train classifier`)."
)
LIMITATIONS = (
    "Trained on synthetic cells only (wsi_screen.synth): it has never seen a real Pap smear. Not a "
    "clinical model: it must not be used to screen, triage, diagnose or report any patient slide, nor "
    "to estimate the performance of wsi-screen on real slides. Its metrics are measured on synthetic "
    "slides and say nothing about real-world accuracy. Retrain on annotated slides of your own lab "
    "(docs/training.md) before any evaluation on real data."
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=40, help="synthetic training slides (default 40)")
    p.add_argument("--size", type=int, default=4096, help="slide side in px at 0.25 µm/px")
    p.add_argument("--seed", type=int, default=1, help="seed of the slide specs and of training")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="bundle folder")
    p.add_argument(
        "--work", type=Path, default=ROOT / "runs" / "cyto-synth-v1", help="crops cache, checkpoints"
    )
    p.add_argument("--arch", default="mobilenetv3_small_100")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--samples-per-epoch", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--patience", type=int, default=6)
    p.add_argument("--max-minutes", type=float, default=22.0, help="training time limit")
    p.add_argument(
        "--hard-negative-weight",
        type=float,
        default=2.5,
        help="sampling weight of negatives with a small dark nucleus (parabasal and superficial NILM "
        "cells, neutrophils, lymphocytes, detections on no nucleus), which resemble HSIL",
    )
    p.add_argument("--resume", action="store_true")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("PIL", "matplotlib", "wsi_screen.synth", "wsi_screen.tissue"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    import torch

    from wsi_screen.config import load_settings
    from wsi_screen.localize import Localizer
    from wsi_screen.models.bundle import load_bundle
    from wsi_screen.runtime import resolve_device
    from wsi_screen.train.classifier import TrainConfig, train_classifier
    from wsi_screen.train.data import synthetic_crops, synthetic_specs

    t0 = time.perf_counter()
    settings = load_settings()
    device = resolve_device(args.device)
    loc_bundle = load_bundle(settings.localization.model, task="localization")
    localizer = Localizer(loc_bundle, settings=settings.localization, device=device)
    specs = synthetic_specs(args.slides, seed=args.seed, size_px=args.size)
    data = synthetic_crops(
        args.slides,
        cache_dir=args.work / "crops",
        localizer=localizer,
        specs=specs,
        settings=settings,
    )
    t_crops = time.perf_counter() - t0
    print(f"{len(data)} crops from {args.slides} slides in {t_crops / 60:.1f} min: {data.class_counts()}")

    import numpy as np

    kinds = np.array([src.rsplit(":", 1)[-1] for src in data.sources.tolist()])
    hard = np.isin(kinds, list(HARD_NEGATIVES))
    weights = np.where(hard, args.hard_negative_weight, 1.0)
    config = TrainConfig(
        arch=args.arch,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        samples_per_epoch=args.samples_per_epoch,
        patience=args.patience,
        val_fraction=0.15,
        test_fraction=0.15,
        seed=args.seed,
        device=str(device),
        max_minutes=args.max_minutes,
        half=True,
    )
    desc = data.describe()
    desc["slides"] = (
        f"{args.slides} synthetic slides, {args.size}×{args.size} px at 0.25 µm/px (see slide specs)"
    )
    desc["slide_specs"] = [s.to_dict() for s in specs]
    desc["generator"] = "wsi_screen.synth.synthesize_slide"
    desc["crop_seconds"] = round(t_crops, 1)
    desc["sampling"] = (
        f"hard negatives ({', '.join(HARD_NEGATIVES)}: small dark nuclei that resemble HSIL) drawn "
        f"{args.hard_negative_weight:g}× as often; {int(hard.sum())} of {len(data)} crops"
    )
    desc["object_kinds"] = {k: int(v) for k, v in zip(*np.unique(kinds, return_counts=True), strict=True)}
    result = train_classifier(
        data,
        args.out,
        config=config,
        name="cyto-synth-v1",
        class_names=["NILM", "ASC-US", "LSIL", "HSIL", "artifact"],
        abnormal_classes=["ASC-US", "LSIL", "HSIL"],
        work_dir=args.work / "train",
        resume=args.resume,
        description=DESCRIPTION,
        intended_use=INTENDED_USE,
        limitations=LIMITATIONS,
        data_description=desc,
        sample_weights=weights,
    )
    total = time.perf_counter() - t0
    size_mb = result.bundle.weights_path.stat().st_size / 1e6
    summary = {
        "bundle": str(result.out_dir),
        "crops": len(data),
        "class_counts": data.class_counts(),
        "crop_minutes": round(t_crops / 60, 2),
        "train_minutes": round(result.seconds / 60, 2),
        "total_minutes": round(total / 60, 2),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "weights_mb": round(size_mb, 2),
        "test": result.metrics.get("test_headline"),
        "val": result.metrics.get("val_headline"),
        "host": {"platform": platform.platform(), "threads": torch.get_num_threads()},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
