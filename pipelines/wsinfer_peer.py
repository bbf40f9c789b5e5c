"""Drive WSInfer 0.6 (the peer of ``pipelines/benchmark.py``) on a folder of slides and time it.

Runs in WSInfer's own virtual environment (``pipelines/setup_wsinfer_peer.sh``), never in the
project's: ``/tmp/wsinfer-venv/bin/python pipelines/wsinfer_peer.py --slides DIR --model model.pt
--config config.json --results RES --out peer.json``.

It calls WSInfer's library functions exactly as ``wsinfer run --config ... --model-path ...`` does
(tissue segmentation and patching, then ``run_inference``), but without importing ``wsinfer.cli``:
that module asks the Hugging Face hub for WSInfer's model registry at import time, which fails on a
machine without internet. The model is a local TorchScript file, so nothing is downloaded.
Writes timings and throughput (patches/s, MP/s) as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slides", type=Path, required=True, help="folder holding only the slide(s)")
    p.add_argument("--model", type=Path, required=True, help="TorchScript model (.pt)")
    p.add_argument("--config", type=Path, required=True, help="WSInfer model configuration JSON")
    p.add_argument("--results", type=Path, required=True, help="WSInfer results folder")
    p.add_argument("--out", type=Path, required=True, help="timings JSON")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers (0 = all cores)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (WSInfer picks CUDA whenever it is there)")
    p.add_argument(
        "--seg-min-object-size-um2",
        type=float,
        default=400.0,
        help="WSInfer's smallest tissue object (its default, 200² µm², suits histology and drops every "
        "isolated cytology cell; 400 µm² keeps single cells)",
    )
    p.add_argument("--seg-binary-threshold", type=int, default=7, help="WSInfer's saturation threshold")
    args = p.parse_args()
    if args.device == "cpu":
        os.environ["WSINFER_FORCE_CPU"] = "1"

    import h5py
    import torch
    import wsinfer
    from wsinfer.modellib.models import LocalModelTorchScript
    from wsinfer.modellib.run_inference import run_inference
    from wsinfer.patchlib import segment_and_patch_directory_of_slides
    from wsinfer_zoo.client import ModelConfiguration

    workers = args.num_workers or len(os.sched_getaffinity(0))
    config = ModelConfiguration.from_dict(json.loads(args.config.read_text()))
    model = LocalModelTorchScript(config=config, model_path=str(args.model))
    args.results.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    segment_and_patch_directory_of_slides(
        wsi_dir=args.slides,
        save_dir=args.results,
        patch_size_px=config.patch_size_pixels,
        patch_spacing_um_px=config.spacing_um_px,
        binary_threshold=args.seg_binary_threshold,
        min_object_size_um2=args.seg_min_object_size_um2,
    )
    t1 = time.perf_counter()
    patches = 0
    patch_px = 0
    for h5 in sorted((args.results / "patches").glob("*.h5")):
        with h5py.File(h5, "r") as f:
            coords = f["/coords"]
            patches += int(coords.shape[0])
            patch_px = int(coords.attrs.get("patch_size", config.patch_size_pixels))
    if patches == 0:
        raise SystemExit("WSInfer found no tissue patches in the slide(s)")
    failed_patching, failed_inference = run_inference(
        wsi_dir=args.slides,
        results_dir=args.results,
        model_info=model,
        batch_size=args.batch_size,
        num_workers=workers,
        speedup=False,
    )
    t2 = time.perf_counter()
    if failed_patching or failed_inference:
        raise SystemExit(f"WSInfer failed: patching {failed_patching}, inference {failed_inference}")
    inference_s = t2 - t1
    result = {
        "wsinfer_version": wsinfer.__version__,
        "torch": torch.__version__,
        "device": "cuda" if (args.device != "cpu" and torch.cuda.is_available()) else "cpu",
        "batch_size": args.batch_size,
        "num_workers": workers,
        "patches": patches,
        "patch_px": patch_px,
        "patching_s": round(t1 - t0, 3),
        "inference_s": round(inference_s, 3),
        "total_s": round(t2 - t0, 3),
        "patches_per_s": round(patches / inference_s, 3),
        "mp_per_s": round(patches * patch_px * patch_px / 1e6 / inference_s, 3),
        "segmentation": {
            "binary_threshold": args.seg_binary_threshold,
            "min_object_size_um2": args.seg_min_object_size_um2,
        },
        "note": "inference = WSInfer's DataLoader (OpenSlide read_region per patch, ToTensor, Normalize) "
        "and the TorchScript forward, as in `wsinfer run`",
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
