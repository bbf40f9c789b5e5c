#!/usr/bin/env python
"""Calibrate the per-tile focus measure (``triage.min_focus``) on synthetic slides with known blur.

Draws LBC slides of three stain profiles with no, the default (5 %) and large (50 %) out-of-focus
regions (``synthesize_slide(blur_fraction=...)``), reads every tile window as the pipeline does
(cell-region-free grid at 0.25 µm/px, slide-level glass-masked Reinhard towards ``DEFAULT_TARGET``),
computes ``focus.tile_focus`` on each core and relates it to the generator's truth: the fraction of the
tile's cells that were drawn out of focus. Prints the range of the measure on tiles whose cells are all
sharp and on tiles whose cells are (almost) all blurred, and writes every tile's figures as JSON.

    python pipelines/calibrate_focus.py --out /tmp/focus-cal        # ≈ 2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from wsi_screen import focus as focus_qc
from wsi_screen.focus import FOCUS_MARGIN
from wsi_screen.slide import open_slide
from wsi_screen.stain import DEFAULT_TARGET, glass_mask, lab_stats, reinhard
from wsi_screen.synth import synthesize_slide
from wsi_screen.tiling import make_grid

BLUR = {"sharp": 0.0, "default": 0.05, "blurred": 0.5}
STAINS = ("default", "pale", "dark")


def tile_focus(
    path: Path, truth_path: Path, mpp: float = 0.25, halo_um: float = 28.0
) -> list[dict[str, float]]:
    """Focus and truth blur fraction of every tile of one synthetic slide."""
    objects = json.loads(truth_path.read_text())["objects"]
    with open_slide(path) as slide:
        grid = make_grid(slide.dimensions, slide_mpp=slide.mpp, mpp=mpp, halo_um=halo_um)
        tiles = list(grid.tiles())
        windows = [
            slide.read_region((t.read_x, t.read_y), (t.read_size, t.read_size), mpp=mpp) for t in tiles
        ]
    x = torch.from_numpy(np.stack(windows))
    norm = reinhard(x, DEFAULT_TARGET, source=lab_stats(x, mask=glass_mask(x)))
    m = grid.halo - FOCUS_MARGIN
    focus = focus_qc.tile_focus(norm[:, m:-m, m:-m], FOCUS_MARGIN)
    rows = []
    for t, f in zip(tiles, focus, strict=True):
        inside = [o for o in objects if t.x0 <= o["x"] < t.x1 and t.y0 <= o["y"] < t.y1]
        blurred = float(np.mean([bool(o.get("blurred", False)) for o in inside])) if inside else float("nan")
        rows.append({"tile": t.index, "cells": len(inside), "blurred_fraction": blurred, "focus": f})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/focus-calibration"))
    p.add_argument("--size", type=int, default=4096, help="slide side, px at 0.25 µm/px")
    p.add_argument("--seed", type=int, default=3)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, object]] = []
    for name, blur in BLUR.items():
        for stain in STAINS:
            path = args.out / f"focus-{name}-{stain}.tiff"
            if not path.exists():
                synthesize_slide(
                    path, size=(args.size, args.size), seed=args.seed, stain=stain, blur_fraction=blur
                )
            for r in tile_focus(path, path.with_suffix(".truth.json")):
                rows.append({"slide": path.name, "stain": stain, "blur_fraction": blur, **r})
    (args.out / "focus_calibration.json").write_text(json.dumps(rows, indent=1))
    a = np.array([(r["blurred_fraction"], r["focus"]) for r in rows], dtype=np.float64)
    ok = np.isfinite(a[:, 1]) & np.isfinite(a[:, 0])
    sharp, blurred = a[ok & (a[:, 0] == 0.0), 1], a[ok & (a[:, 0] >= 0.95), 1]
    print(
        f"tiles with every cell sharp: n={len(sharp)}, focus {sharp.min():.3f}–{sharp.max():.3f} "
        f"(10th percentile {np.percentile(sharp, 10):.3f})"
    )
    if len(blurred):
        print(
            f"tiles with >= 95 % of cells blurred: n={len(blurred)}, "
            f"focus {blurred.min():.3f}–{blurred.max():.3f}"
        )
    print(f"tiles without edges (NaN): {int((~np.isfinite(a[:, 1])).sum())} of {len(a)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
