#!/usr/bin/env python
"""Does the nucleus-mask input channel help? The same classifier trained with and without it.

Crops of synthetic slides are cut by the inference path with the nucleus-mask channel
(``synthetic_crops(mask_channel=True)``: the shipped U-Net ``nuclei-unet-v1`` finds the nuclei, the
mask is rasterized from its outlines). Two classifiers are then trained with the same recipe, seed and
slide-grouped split: one on the RGB channels of those crops (``rgb``), one on all four (``rgb+mask``).
Their test-split metrics are written to ``--work/compare.json`` and printed as a table.

    flock /tmp/wsi-cpu.lock python pipelines/compare_mask_channel.py      # ≈ 20 min on 2 CPU cores

The RGB crops are exactly the crops an ``rgb`` bundle would be trained on, so the comparison isolates
the channel. Results and their limits are reported in docs/models.md ("Nucleus mask as an input
channel").
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["NILM", "ASC-US", "LSIL", "HSIL", "artifact"]
ABNORMAL = ["ASC-US", "LSIL", "HSIL"]
HEADLINE = (
    "accuracy",
    "macro_f1",
    "hsil_recall",
    "hsil_to_nilm_rate",
    "review_sensitivity",
    "review_specificity",
    "review_auroc",
    "ece",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=int, default=24, help="synthetic slides (default 24)")
    p.add_argument("--size", type=int, default=4096, help="slide side in px at 0.25 µm/px")
    p.add_argument("--seed", type=int, nargs="+", default=[1], help="seeds of training (one run each)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "mask-channel", help="crops cache, runs")
    p.add_argument("--arch", default="mobilenetv3_small_100")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--samples-per-epoch", type=int, default=2048)
    p.add_argument("--max-minutes", type=float, default=7.0, help="training time limit per model")
    p.add_argument("--device", default="cpu")
    p.add_argument("--retrain", action="store_true", help="retrain runs whose bundle already exists")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("PIL", "matplotlib", "wsi_screen.synth", "wsi_screen.tissue"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from wsi_screen.config import load_settings
    from wsi_screen.localize import Localizer
    from wsi_screen.models.bundle import load_bundle
    from wsi_screen.runtime import resolve_device
    from wsi_screen.train.classifier import TrainConfig, train_classifier
    from wsi_screen.train.data import CropSet, synthetic_crops, synthetic_specs

    t0 = time.perf_counter()
    settings = load_settings()
    device = resolve_device(args.device)
    localizer = Localizer(
        load_bundle(settings.localization.model, task="localization"),
        settings=settings.localization,
        device=device,
    )
    data = synthetic_crops(
        args.slides,
        cache_dir=args.work / "crops",
        localizer=localizer,
        specs=synthetic_specs(args.slides, seed=100, size_px=args.size),
        settings=settings,
        mask_channel=True,
    )
    crop_minutes = (time.perf_counter() - t0) / 60
    rgb = CropSet(
        crops=data.crops[..., :3],
        labels=data.labels,
        groups=data.groups,
        class_names=data.class_names,
        mpp=data.mpp,
        sources=data.sources,
        info=dict(data.info),
    )
    mask_share = float((data.crops[..., 3] > 0).mean())
    centre_on_mask = float((data.crops[:, 112, 112, 3] > 0).mean())
    runs: list[dict[str, Any]] = []
    for seed in args.seed:
        for name, cs in (("rgb", rgb), ("rgb+mask", data)):
            cfg = TrainConfig(
                arch=args.arch,
                epochs=args.epochs,
                batch_size=64,
                lr=3e-3,
                samples_per_epoch=args.samples_per_epoch,
                patience=args.epochs,
                val_fraction=0.15,
                test_fraction=0.2,
                seed=seed,
                device=str(device),
                max_minutes=args.max_minutes,
            )
            tag = f"{name.replace('+', '-')}-seed{seed}"
            out = args.work / "bundles" / tag
            done = out / "bundle.json"
            if done.is_file() and not args.retrain:  # a finished run of the same recipe: reuse it
                bcfg = json.loads(done.read_text())
                metrics = bcfg["metrics"]
                best_epoch = bcfg["training"]["best_epoch"]
                minutes = bcfg["training"]["train_seconds"] / 60
            else:
                result = train_classifier(
                    cs,
                    out,
                    config=cfg,
                    name=f"compare-{tag}",
                    class_names=CLASSES,
                    abnormal_classes=ABNORMAL,
                    work_dir=args.work / "train" / tag,
                    progress=False,
                )
                metrics, best_epoch, minutes = result.metrics, result.best_epoch, result.seconds / 60
            test = metrics["test"]
            runs.append(
                {
                    "representation": name,
                    "seed": seed,
                    "n_test": test["n"],
                    "best_epoch": best_epoch,
                    "train_minutes": round(minutes, 2),
                    **{k: metrics["test_headline"].get(k) for k in HEADLINE},
                    "artifact_recall": test["per_class"]["artifact"]["recall"],
                    "artifact_as_hsil": _confusion(test, "artifact", "HSIL"),
                }
            )
    summary = {
        "slides": args.slides,
        "slide_px": args.size,
        "crops": len(data),
        "class_counts": data.class_counts(),
        "mask_pixel_share": round(mask_share, 4),
        "crop_centre_on_mask": round(centre_on_mask, 4),
        "crop_minutes": round(crop_minutes, 2),
        "recipe": {
            "arch": args.arch,
            "epochs": args.epochs,
            "samples_per_epoch": args.samples_per_epoch,
            "max_minutes": args.max_minutes,
            "split": "by slide: 65 / 15 / 20 %",
        },
        "runs": runs,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    args.work.mkdir(parents=True, exist_ok=True)
    (args.work / "compare.json").write_text(json.dumps(summary, indent=2) + "\n")
    cols = ["representation", "seed", *HEADLINE, "artifact_recall", "artifact_as_hsil"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in runs:
        print("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    for rep in ("rgb", "rgb+mask"):
        mine = [r for r in runs if r["representation"] == rep]
        print(
            f"{rep}: mean over {len(mine)} seeds: "
            + ", ".join(f"{k} {np.mean([r[k] for r in mine]):.3f} ± {np.std([r[k] for r in mine]):.3f}"
                        for k in ("accuracy", "macro_f1", "hsil_recall", "review_sensitivity",
                                  "review_specificity", "artifact_recall"))
        )  # fmt: skip
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    return 0


def _confusion(split: dict[str, Any], truth: str, pred: str) -> float | None:
    """Share of ``truth`` cells called ``pred`` in a metrics split (None when absent)."""
    cm = split.get("confusion_matrix")
    names = list(split.get("class_names", []))
    if not cm or truth not in names or pred not in names:
        return None
    row = cm[names.index(truth)]
    total = sum(row)
    return round(row[names.index(pred)] / total, 4) if total else None


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    raise SystemExit(main())
