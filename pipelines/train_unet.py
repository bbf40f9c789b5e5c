"""Train the shipped nucleus U-Net ``nuclei-unet-v1`` on ISBI 2014 + synthetic slides.

    flock /tmp/wsi-cpu.lock python pipelines/train_unet.py                  # the shipped recipe
    python pipelines/train_unet.py --steps 150 --synthetic 48 -o /tmp/u     # a quick comparison run
    python pipelines/train_unet.py --representation rgb --model-mpp 0.25 ...

Data: ISBI 2014 images 01–35 (``--isbi``; real Pap cells, greyscale, nucleus label images and cell
masks; 36–45 are held out for validation) at ``--isbi-mpp`` µm/px, and ``--synthetic`` synthetic
256 µm fields (six stain/scanner profiles, LBC and conventional) read through the inference path.

ISBI 2014 does not state its pixel size. Its median nucleus area is 266 px² and its median cell area
14,300 px². A normal intermediate squamous cell's nucleus is about 35 µm² (the Bethesda reference
for "enlarged" nuclei) and superficial/intermediate cells are about 1,600–2,000 µm²; both put the
pixel size at 0.33–0.37 µm/px, so 0.35 µm/px is used (scale augmentation of ±15 % covers the
uncertainty).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ISBI = ROOT.parent / "shared" / "data" / "isbi2014"
DEFAULT_OUT = ROOT / "wsi_screen" / "models" / "bundles" / "nuclei-unet-v1"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isbi", type=Path, default=DEFAULT_ISBI)
    p.add_argument("--isbi-mpp", type=float, default=0.35)
    p.add_argument("--val", type=int, nargs=2, default=(36, 45), metavar=("FIRST", "LAST"))
    p.add_argument("--synthetic", type=int, default=96, help="synthetic 256 µm training fields")
    p.add_argument("--synthetic-val", type=int, default=8, help="synthetic validation fields")
    p.add_argument("--representation", default="od_gray", choices=["od_gray", "rgb"])
    p.add_argument("--model-mpp", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="total steps instead of epochs (quick runs)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default="nuclei-unet-v1")
    p.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("wsi_screen.synth",):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from wsi_screen.train.unet import UNetRecipe, train_unet

    recipe = UNetRecipe(model_mpp=args.model_mpp, representation=args.representation)
    command = " ".join(["python pipelines/train_unet.py", *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    bundle = train_unet(
        args.isbi / "images",
        args.isbi / "nuclei",
        cytoplasm_dir=args.isbi / "cytoplasm",
        mpp=args.isbi_mpp,
        out_dir=args.out,
        val_names=[f"{i:02d}" for i in range(args.val[0], args.val[1] + 1)],
        epochs=args.epochs,
        batch_size=args.batch_size,
        steps=args.steps,
        synthetic_tiles=args.synthetic,
        synthetic_val_tiles=args.synthetic_val,
        recipe=recipe,
        device=args.device,
        seed=args.seed,
        progress=True,
        name=args.name,
        description="U-Net (segmentation-models-pytorch, timm MobileNetV3-small encoder) finding nuclei in "
        "Papanicolaou-stained cervical cytology: nucleus, nucleus-centre marker and cell channels.",
        limitations="Trained on 35 greyscale ISBI 2014 images (pixel size estimated, not stated) and "
        "synthetic slides; not validated on real colour whole-slide scans of Pap smears. See docs/models.md.",
        training_info={
            "command": command,
            "isbi_mpp_estimate": "median nucleus 266 px² ≈ 35 µm² and median cell 14,300 px² ≈ "
            "1,600–2,000 µm² → 0.33–0.37 µm/px; 0.35 used",
        },
    )
    size_mb = bundle.weights_path.stat().st_size / 1e6
    print(f"wrote {bundle.path} ({size_mb:.2f} MB) in {time.perf_counter() - t0:.0f} s")
    print(json.dumps(bundle.config.metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
