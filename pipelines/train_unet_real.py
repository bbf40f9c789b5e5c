"""Train the real-cell nucleus U-Net on every real source plus synthetic fields.

    flock /tmp/wsi-cpu.lock python pipelines/train_unet_real.py --representation rgb --steps 400 \\
        --name nuclei-unet-v2 -o OUT --checkpoint /tmp/unet-rgb.ckpt --resume   # v2 (resumable)
    flock /tmp/wsi-cpu.lock python pipelines/train_unet_real.py --representation rgb --init nuclei-unet-v2 \\
        --lr 1e-3 --glass-patches 0.25 --steps 600 --threads 2 --checkpoint /tmp/unet-v3.ckpt --resume
        # nuclei-unet-v3, the default: v2 fine-tuned with dark-region glass patches
    python pipelines/train_unet_real.py --steps 40 --herlev-fields 12 --synthetic 4 -o /tmp/u  # smoke run

Data (``../shared/data``, split by the one manifest ``pipelines/splits/real.json``; only its
``train`` part is trained on and its ``val`` part validated on; ``test`` is never read here):

- **herlev_fields**: Herlev cells (every grade, expert masks) and the 128² severe-dysplasia crops
  with fine masks, composed into 256 µm fields (``wsi_screen.train.fields.compose_fields``: pasted by
  their masks in optical density, with neighbours and overlap, on glass or on real LBC fields);
- **lbc_nuclei**: real LBC fields (0.75 µm/px, estimated), rotated copies with black corners included;
- **cnseg**: crowded hyperchromatic groups and single cells (0.33 µm/px, estimated);
- **isbi2014**: greyscale ISBI fields (0.35 µm/px, estimated);
- **synthetic**: fields drawn by ``wsi_screen.synth`` (six stain/scanner profiles) through the
  inference path.

Pixel sizes: see ``wsi_screen.train.fields.SOURCE_MPP`` and docs/models.md. The bundle records the
exact image names of every part, the recipe and the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MANIFEST = ROOT / "pipelines" / "splits" / "real.json"
DEFAULT_OUT = ROOT / "wsi_screen" / "models" / "bundles" / "nuclei-unet-v3"

WEIGHTS = {"herlev_fields": 0.35, "lbc_nuclei": 0.2, "cnseg": 0.15, "isbi2014": 0.1}


def build_sources(args: argparse.Namespace, model_mpp: float) -> list[object]:
    from wsi_screen.train.fields import (
        SOURCE_MPP,
        compose_fields,
        load_herlev_cells,
        load_severe_fine_cells,
        load_source_images,
        read_split_manifest,
        split_names,
    )
    from wsi_screen.train.unet import ImageSource

    m = read_split_manifest(args.manifest)
    parts: dict[str, dict[str, list[object]]] = {}
    for src in ("lbc_nuclei", "cnseg", "isbi2014"):
        parts[src] = {p: load_source_images(args.data, src, split_names(m, src, p)) for p in ("train", "val")}
    fields = {}
    for p, n, seed in (
        ("train", args.herlev_fields, args.seed),
        ("val", args.herlev_val_fields, args.seed + 7919),
    ):
        cells = load_herlev_cells(args.data, split_names(m, "herlev", p))
        cells += load_severe_fine_cells(args.data, split_names(m, "herlev_severe_fine", p))
        # Clean (unrotated) LBC fields of the same part as backgrounds: their nuclei stay labelled.
        bgs = [
            (im, SOURCE_MPP["lbc_nuclei"]) for im in parts["lbc_nuclei"][p] if not im.name.startswith("rot")
        ]
        fields[p] = compose_fields(cells, n_fields=n, mpp=model_mpp, backgrounds=bgs, seed=seed)
    sources = [
        ImageSource(
            name="herlev_fields",
            mpp=model_mpp,
            train=fields["train"],
            val=fields["val"],
            weight=args.weights["herlev_fields"],
        )
    ]
    for src in ("lbc_nuclei", "cnseg", "isbi2014"):
        sources.append(
            ImageSource(
                name=src,
                mpp=SOURCE_MPP[src],
                train=parts[src]["train"],
                val=parts[src]["val"],  # type: ignore[arg-type]
                weight=args.weights[src],
            )
        )
    return sources


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    p.add_argument("--herlev-fields", type=int, default=240, help="composed Herlev training fields")
    p.add_argument("--herlev-val-fields", type=int, default=40)
    p.add_argument("--synthetic", type=int, default=48, help="synthetic 256 µm training fields")
    p.add_argument("--synthetic-val", type=int, default=8)
    p.add_argument("--representation", default="rgb", choices=["od_gray", "rgb"])
    p.add_argument("--model-mpp", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--name", default="nuclei-unet-v3")
    p.add_argument("--checkpoint", type=Path, default=None, help="state file for checkpoint/resume")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint when it exists")
    p.add_argument("--time-budget-min", type=float, default=None, help="stop (resumable) after this long")
    p.add_argument("--lr", type=float, default=None, help="peak AdamW learning rate (default: 2e-3)")
    p.add_argument(
        "--glass-patches",
        type=float,
        default=0.0,
        help="share of crops with a large region filled with dark-region glass (UNetRecipe.glass_patch_p)",
    )
    p.add_argument("--init", default=None, help="start from this localization bundle's weights (fine-tune)")
    p.add_argument(
        "--source-weight",
        action="append",
        default=[],
        metavar="SOURCE=WEIGHT",
        help=f"share of the crops drawn from a real source (default {WEIGHTS}; synthetic: the recipe's)",
    )
    p.add_argument("-o", "--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    args.weights = dict(WEIGHTS)
    for text in args.source_weight:
        name, _, value = text.partition("=")
        if name not in WEIGHTS or not value:
            p.error(f"--source-weight {text!r}: give SOURCE=WEIGHT with SOURCE one of {sorted(WEIGHTS)}")
        try:
            args.weights[name] = float(value)
        except ValueError:
            p.error(f"--source-weight {text!r}: {value!r} is not a number")
        if args.weights[name] < 0:
            p.error(f"--source-weight {text!r}: a weight cannot be negative")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("wsi_screen.synth").setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from wsi_screen.train.fields import SOURCE_MPP
    from wsi_screen.train.unet import TrainingPaused, UNetRecipe, train_unet

    recipe = UNetRecipe(model_mpp=args.model_mpp, representation=args.representation)
    if args.lr is not None:
        recipe = dataclasses.replace(recipe, lr=args.lr)
    if args.glass_patches:
        recipe = dataclasses.replace(recipe, glass_patch_p=args.glass_patches)
    command = " ".join(["python pipelines/train_unet_real.py", *(argv if argv is not None else sys.argv[1:])])
    t0 = time.perf_counter()
    sources = build_sources(args, args.model_mpp)
    try:
        bundle = train_unet(
            None,
            None,
            mpp=args.model_mpp,
            out_dir=args.out,
            sources=sources,  # type: ignore[arg-type]
            batch_size=args.batch_size,
            steps=args.steps,
            synthetic_tiles=args.synthetic,
            synthetic_val_tiles=args.synthetic_val,
            recipe=recipe,
            device=args.device,
            seed=args.seed,
            progress=True,
            name=args.name,
            checkpoint=args.checkpoint,
            resume=args.resume,
            init_from=args.init,
            time_budget_s=None if args.time_budget_min is None else 60 * args.time_budget_min,
            description=(
                "U-Net (segmentation-models-pytorch, timm MobileNetV3-small encoder) finding nuclei in "
                f"Papanicolaou-stained cervical cytology from {args.representation} input at "
                f"{args.model_mpp} µm/px: nucleus, nucleus-centre marker and cell channels. Trained on "
                "real colour nuclei of every grade (Herlev fields, LBC, CNSeg), ISBI 2014 and synthetic "
                "fields."
            ),
            limitations=(
                "Research use. Trained on public benchmark cells (Herlev, CNSeg, Mendeley LBC, ISBI 2014; "
                "pixel sizes of all but Herlev estimated) and synthetic fields, not on whole-slide scans "
                "of a lab's own slides; validate on your own slides (pipelines/eval_localization.py) "
                "before relying on it. See docs/models.md."
            ),
            training_info={
                "command": command,
                "split_manifest": str(
                    args.manifest.relative_to(ROOT) if args.manifest.is_relative_to(ROOT) else args.manifest
                ),
                "source_mpp": SOURCE_MPP,
                "source_weights": {**args.weights, "synthetic": recipe.synthetic_weight},
                "herlev_fields": {"train": args.herlev_fields, "val": args.herlev_val_fields},
            },
        )
    except TrainingPaused as exc:
        print(f"paused: {exc}")
        return 3
    size_mb = bundle.weights_path.stat().st_size / 1e6
    print(f"wrote {bundle.path} ({size_mb:.2f} MB) in {time.perf_counter() - t0:.0f} s")
    print(json.dumps(bundle.config.metrics, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
