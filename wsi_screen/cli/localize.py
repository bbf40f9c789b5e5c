"""``wsi-screen localize``: debug output of the nucleus U-Net (overlays + candidate table)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import click

from wsi_screen.cli.main import cli, common_options, configure_from_context
from wsi_screen.cli.options import config_options, settings_from_options, slide_options

_OWNED = (0, 200, 0)
_HALO = (255, 140, 0)
_CORE = (40, 90, 255)


def _parse_region(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        x, y, w, h = (float(v) for v in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not x,y,w,h (level-0 px)", param_hint="--region") from None
    if w <= 0 or h <= 0:
        raise click.BadParameter("width and height must be positive", param_hint="--region")
    return x, y, w, h


@cli.command("localize", short_help="Run nucleus localization on some tiles and write overlays.")
@click.argument("slide", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for tile overlays (PNG), candidates.csv and summary.json.",
)
@click.option(
    "--max-tiles",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Process at most this many tiles (the most cellular ones).",
)
@click.option("--region", default=None, metavar="X,Y,W,H", help="Only tiles meeting this level-0 region.")
@click.option(
    "--window-mpp",
    type=click.FloatRange(min=0.05, max=20.0),
    default=0.25,
    show_default=True,
    help="µm/px at which tiles are read (the pipeline reads at the classifier's, 0.25).",
)
@click.option("--model", default=None, help="Localization bundle name or folder [default: the settings'].")
@click.option("--device", default=None, help="auto, cpu, cuda, cuda:N or mps [default: the settings'].")
@slide_options
@config_options
@common_options
@click.pass_context
def localize(
    ctx: click.Context,
    slide: Path,
    out_dir: Path,
    max_tiles: int,
    region: str | None,
    window_mpp: float,
    model: str | None,
    device: str | None,
    backend: str | None,
    mpp: float | None,
    preset: str | None,
    config_path: Path | None,
    overrides: tuple[str, ...],
) -> None:
    """Localize nuclei on the most cellular tiles of SLIDE and draw what the U-Net found.

    Each tile's read window is saved as OUT/tile_<index>.png with the core drawn in blue, nuclei the
    tile owns (reported) outlined in green and nuclei seen only in its halo (reported by a neighbour)
    in orange. OUT/candidates.csv lists every candidate (level-0 x, y; owned or not; score;
    morphometrics); OUT/summary.json the settings, stain statistics and timings.
    """
    configure_from_context(ctx)
    import time

    import numpy as np
    import torch
    from PIL import Image, ImageDraw

    from wsi_screen.cells import MORPHOMETRICS
    from wsi_screen.localize import Localizer
    from wsi_screen.models.bundle import load_bundle
    from wsi_screen.pipeline import cell_regions_and_grid
    from wsi_screen.runtime import configure_torch, resolve_device
    from wsi_screen.slide import open_slide
    from wsi_screen.slide_stain import estimate_source_stats
    from wsi_screen.stain import reinhard

    box = _parse_region(region)
    settings = settings_from_options(
        preset,
        config_path,
        overrides,
        {
            "slide.backend": backend,
            "slide.mpp": mpp,
            "localization.model": model,
            "runtime.device": device,
        },
    )
    configure_torch(threads=settings.runtime.torch_threads)
    dev = resolve_device(settings.runtime.device)
    bundle = load_bundle(settings.localization.model, task="localization")
    localizer = Localizer(bundle, settings=settings.localization, device=dev)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {"read": 0.0, "normalize": 0.0, "localize": 0.0}
    rows: list[dict[str, Any]] = []
    with open_slide(slide, backend=settings.slide.backend, mpp=settings.slide.mpp) as s:
        _, grid = cell_regions_and_grid(s, settings, grid_mpp=window_mpp)
        tiles = list(grid.tiles(kept_only=box is None))
        if box is not None:
            x, y, w, h = box
            tiles = [t for t in tiles if t.x0 < x + w and t.x1 > x and t.y0 < y + h and t.y1 > y]
        tiles.sort(key=lambda t: (-t.tissue_fraction, t.index))
        tiles = sorted(tiles[:max_tiles], key=lambda t: t.index)
        target = localizer.stain_target
        source = None
        if settings.stain.enabled and target is not None:
            source = estimate_source_stats(
                s, grid, n_tiles=settings.stain.sample_tiles, mask_glass=settings.stain.mask_glass
            )
        for tile in tiles:
            t0 = time.perf_counter()
            window = s.read_region(
                (tile.read_x, tile.read_y), (tile.read_size, tile.read_size), mpp=window_mpp
            )
            t1 = time.perf_counter()
            batch = torch.from_numpy(np.require(window, requirements=["C", "W"])[None]).to(dev)
            if target is not None and source is not None:
                batch = reinhard(batch, target, source=source)
            t2 = time.perf_counter()
            cands = localizer.localize(batch, window_mpp=window_mpp, halo_px=grid.halo)[0]
            t3 = time.perf_counter()
            timings["read"] += t1 - t0
            timings["normalize"] += t2 - t1
            timings["localize"] += t3 - t2
            lx, ly = tile.to_level0(cands.x, cands.y)
            owned = tile.owns(lx, ly)
            img = Image.fromarray(window)
            draw = ImageDraw.Draw(img)
            draw.rectangle(
                [
                    grid.halo,
                    grid.halo,
                    grid.halo + (tile.x1 - tile.x0) / tile.scale,
                    grid.halo + (tile.y1 - tile.y0) / tile.scale,
                ],
                outline=_CORE,
                width=2,
            )
            for i, poly in enumerate(cands.outlines):
                if len(poly) >= 2:
                    pts = [(float(px), float(py)) for px, py in poly]
                    draw.line([*pts, pts[0]], fill=_OWNED if owned[i] else _HALO, width=2)
            img.save(out_dir / f"tile_{tile.index:05d}.png")
            for i in range(len(cands)):
                row: dict[str, Any] = {
                    "tile": tile.index,
                    "x": round(float(lx[i]), 2),
                    "y": round(float(ly[i]), 2),
                    "owned": int(owned[i]),
                    "window_x": round(float(cands.x[i]), 2),
                    "window_y": round(float(cands.y[i]), 2),
                    "detection_score": round(float(cands.detection_score[i]), 4),
                }
                for k, v in cands.morphometrics.items():
                    row[k] = None if not np.isfinite(v[i]) else round(float(v[i]), 4)
                rows.append(row)
    fields = ["tile", "x", "y", "owned", "window_x", "window_y", "detection_score", *MORPHOMETRICS]
    with (out_dir / "candidates.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    n_owned = sum(r["owned"] for r in rows)
    summary = {
        "slide": str(slide),
        "model": {"name": bundle.name, "sha256": bundle.sha256, "mpp": localizer.mpp},
        "window_mpp": window_mpp,
        "tiles": [t.index for t in tiles],
        "candidates": len(rows),
        "owned": n_owned,
        "stain": {
            "target": None if target is None else target.to_dict(),
            "source": None if source is None else source.to_dict(),
        },
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "device": str(dev),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    click.echo(
        f"{n_owned} nuclei owned ({len(rows)} seen with halos) in {len(tiles)} tiles; "
        f"localize {timings['localize']:.1f} s; overlays and candidates.csv in {out_dir}"
    )
