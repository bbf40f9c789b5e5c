"""Nucleus detection recall and precision of a localization bundle, through the real pipeline path.

    python pipelines/eval_localization.py --bundle nuclei-unet-v1 --json eval_localization.json

For every evaluation slide: slide file → ``open_slide`` → cell regions + tile grid (1024² tiles at 0.25
µm/px, 32 µm halo, the default settings) → slide-level Reinhard source statistics of the cell pixels,
towards the localizer's own target (``pipeline.slide_stain``, as ``run_slide``) → threaded reader
(``reader.iter_windows``) → the pipeline's device stage (``pipeline.TileProcessor`` without a
classifier: Reinhard → U-Net → candidates → ownership) → level-0 nucleus centres. A detection matches a
true nucleus when its centre lies within one equivalent nucleus radius (√(area/π)) of the true centre;
matching is one-to-one (closest pairs first). Recall = matched true nuclei / true nuclei; precision =
matched detections / detections.

Data:
- **synthetic**: ``--slides-per-profile`` slides of ``--size`` px at 0.25 µm/px for every stain/scanner
  profile of ``wsi_screen.synth.STAIN_PROFILES`` and both preparations (LBC without spot, conventional
  smear), seeds disjoint from training, written as JPEG-compressed pyramidal TIFF;
- **isbi**: held-out ISBI 2014 images (``--isbi-val``, default 36–45), each written as a tiled TIFF with
  ``--isbi-mpp`` µm/px (default 0.35, estimated from nucleus sizes) and read back through OpenSlide.
  A greyscale slide has no colour statistics: ``estimate_source_stats`` returns None and the pipeline
  does not normalize it ("pipeline" row); the "lightness-normalized" row passes the training's
  lightness-only source statistics (``train.unet.grey_source_stats``) to the same device stage.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_ISBI = ROOT.parent / "shared" / "data" / "isbi2014"


def screen_nuclei(
    slide_path: Path,
    *,
    localizer: Any,
    settings: Any,
    device: Any,
    tile_px: int = 1024,
    window_mpp: float = 0.25,
    crop_px: int = 224,
    source: Any = None,
) -> tuple[np.ndarray, dict[str, Any], Any]:
    """Level-0 nucleus centres (N, 2) detected by the pipeline's device stage, and timings."""
    from wsi_screen.cells import CellTable
    from wsi_screen.device_stage import TileProcessor
    from wsi_screen.reader import iter_windows
    from wsi_screen.slide import open_slide
    from wsi_screen.slide_stain import slide_stain
    from wsi_screen.tiling import make_grid
    from wsi_screen.tissue import slide_cell_regions

    t0 = time.perf_counter()
    with open_slide(slide_path) as slide:
        regions = slide_cell_regions(slide, settings.tissue)
        grid = make_grid(
            slide.dimensions,
            slide_mpp=slide.mpp,
            mpp=window_mpp,
            tile_size=tile_px,
            halo_um=settings.tiling.halo_um,
            mask=regions.mask,
            mask_mpp=regions.mpp,
            min_tissue_fraction=settings.tiling.min_tissue_fraction,
        )
        if source is None and settings.stain.enabled:
            # As run_slide: cell-pixel statistics, pooled robustly; an implausible source is not used.
            stain = slide_stain(
                slide, grid, settings=settings.stain, target=None, localizer_target=localizer.stain_target
            )
            source = stain.source
        proc = TileProcessor(
            localizer=localizer,
            classifier=None,
            grid=grid,
            source=source,
            target=localizer.stain_target,
            crop_size=crop_px,
            device=device,
        )
        tables = []
        localize_s = 0.0
        batch_tiles: list[Any] = []
        batch_windows: list[Any] = []

        def flush() -> None:
            nonlocal localize_s
            if batch_tiles:
                res = proc(batch_tiles, batch_windows)
                localize_s += res.timings.get("localize", 0.0)
                tables.extend(res.tables)
                batch_tiles.clear()
                batch_windows.clear()

        for read in iter_windows(slide, grid.tiles(), mpp=window_mpp, workers=2, prefetch=4):
            if read.window is None:
                continue
            batch_tiles.append(read.tile)
            batch_windows.append(read.window)
            if len(batch_tiles) >= settings.localization.batch_size:
                flush()
        flush()
    table = CellTable.concat(tables)
    info = {
        "tiles": grid.n_kept,
        "seconds": round(time.perf_counter() - t0, 2),
        "localize_s": round(localize_s, 2),
        "normalized": source is not None,
    }
    return np.stack([table.x, table.y], axis=1), info, table


def truth_nuclei(
    truth: Any, kinds: list[str] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """True nucleus centres (level-0), radii (px), areas (µm²) and cell areas (µm²) of a synthetic slide.

    ``kinds``, if given, receives the object kind of every nucleus.
    """
    from wsi_screen.synth.cells import polygon_area, polygon_centroid

    xy, r, area, cell = [], [], [], []
    px_um2 = truth.mpp**2
    for o in truth.objects:
        if o.nucleus is None:
            continue
        polys = [o.nucleus, *o.extra_nuclei]
        for p in polys:
            cx, cy = polygon_centroid(p)
            if not (0 <= cx < truth.width and 0 <= cy < truth.height):
                continue
            a = polygon_area(p)
            xy.append((cx, cy))
            r.append(math.sqrt(a / math.pi))
            area.append(a * px_um2)
            cell.append(o.cell_area_um2 / len(polys))
            if kinds is not None:
                kinds.append(o.kind)
    return np.asarray(xy).reshape(-1, 2), np.asarray(r), np.asarray(area), np.asarray(cell)


def eval_synthetic(
    args: argparse.Namespace, localizer: Any, settings: Any, device: Any, work: Path
) -> dict[str, Any]:
    from wsi_screen.synth import STAIN_PROFILES, synthesize_slide
    from wsi_screen.train.unet import match_points, rates

    rows: dict[str, Any] = {}
    total = {"tp": 0, "fp": 0, "fn": 0}
    area_err: list[float] = []
    nc_pairs: list[tuple[float, float]] = []
    speed = {"tiles": 0, "localize_s": 0.0}
    by_kind: dict[str, list[int]] = {}  # kind → [found, total]
    for pi, profile in enumerate(STAIN_PROFILES):
        for prep in ("lbc", "conventional"):
            counts = {"tp": 0, "fp": 0, "fn": 0}
            for k in range(args.slides_per_profile):
                seed = 50_000 + 100 * pi + 10 * (prep == "conventional") + k
                path = work / f"eval-{profile}-{prep}-{k}.tiff"
                res = synthesize_slide(
                    path,
                    size=(args.size, args.size),
                    mpp=0.25,
                    seed=seed,
                    stain=profile,
                    preparation=prep,
                    spot=False,
                    abnormal="HSIL=4,LSIL=3,ASC-US=3",
                    workers=1,
                )
                pred, info, table = screen_nuclei(path, localizer=localizer, settings=settings, device=device)
                speed["tiles"] += info["tiles"]
                speed["localize_s"] += info["localize_s"]
                kinds: list[str] = []
                txy, tr, tarea, tcell = truth_nuclei(res.truth, kinds)
                mp, mt = match_points(pred, txy, tr)
                found = np.zeros(len(txy), bool)
                found[mt] = True
                for kind, hit in zip(kinds, found.tolist(), strict=True):
                    acc = by_kind.setdefault(kind, [0, 0])
                    acc[0] += int(hit)
                    acc[1] += 1
                counts["tp"] += len(mp)
                counts["fp"] += len(pred) - len(mp)
                counts["fn"] += len(txy) - len(mp)
                a_pred = table.morphometrics["nucleus_area_um2"][mp]
                area_err += list(np.abs(a_pred - tarea[mt]) / tarea[mt])
                nc = table.morphometrics["nc_ratio"][mp]
                ok = np.isfinite(nc)
                nc_pairs += list(zip(nc[ok].tolist(), (tarea[mt] / tcell[mt])[ok].tolist(), strict=True))
                path.unlink(missing_ok=True)
                path.with_name(path.stem + ".truth.json").unlink(missing_ok=True)
            rows[f"{profile}/{prep}"] = {**counts, **rates(counts)}
            for key in total:
                total[key] += counts[key]
            print(f"  synthetic {profile}/{prep}: {_fmt(rows[f'{profile}/{prep}'])}", flush=True)
    nc = np.asarray(nc_pairs).reshape(-1, 2)
    return {
        "per_profile": rows,
        "overall": {**total, **rates(total)},
        "recall_by_kind": {
            k: {"found": v[0], "nuclei": v[1], "recall": v[0] / v[1]} for k, v in sorted(by_kind.items())
        },
        "recall_epithelial": _epithelial_recall(by_kind),
        "nucleus_area_rel_error_median": float(np.median(area_err)) if area_err else None,
        "localize_ms_per_1024_tile": round(1000 * speed["localize_s"] / max(speed["tiles"], 1), 1),
        "tiles": speed["tiles"],
        "nc_ratio": {
            "n_measured": len(nc),
            "n_matched": total["tp"],
            "abs_error_median": float(np.median(np.abs(nc[:, 0] - nc[:, 1]))) if len(nc) else None,
            "pearson_r": float(np.corrcoef(nc[:, 0], nc[:, 1])[0, 1]) if len(nc) > 2 else None,
        },
    }


def _epithelial_recall(by_kind: dict[str, list[int]]) -> dict[str, Any]:
    """Recall over the nuclei of squamous and abnormal epithelial cells (not inflammatory cells)."""
    from wsi_screen.synth import KINDS

    found = sum(v[0] for k, v in by_kind.items() if KINDS[k].klass != "artifact")
    total = sum(v[1] for k, v in by_kind.items() if KINDS[k].klass != "artifact")
    return {"found": found, "nuclei": total, "recall": found / total if total else None}


def _write_tiff(path: Path, rgb: np.ndarray, mpp: float) -> None:
    import tifffile

    tifffile.imwrite(
        path,
        rgb,
        photometric="rgb",
        tile=(256, 256),
        compression="zlib",
        resolution=(1e4 / mpp, 1e4 / mpp),
        resolutionunit="CENTIMETER",
    )


def eval_isbi(
    args: argparse.Namespace, localizer: Any, settings: Any, device: Any, work: Path
) -> dict[str, Any]:
    from wsi_screen.stain import DEFAULT_TARGET
    from wsi_screen.train.unet import (
        grey_source_stats,
        label_centres,
        load_annotated_images,
        match_points,
        rates,
    )

    names = [f"{i:02d}" for i in range(args.isbi_val[0], args.isbi_val[1] + 1)]
    images = load_annotated_images(args.isbi / "images", args.isbi / "nuclei", names=names)
    out: dict[str, Any] = {"images": names, "mpp": args.isbi_mpp}
    for mode in ("pipeline", "lightness-normalized"):
        counts = {"tp": 0, "fp": 0, "fn": 0}
        for im in images:
            source = None if mode == "pipeline" else grey_source_stats(im.rgb, DEFAULT_TARGET)
            path = work / f"isbi-{im.name}.tiff"
            _write_tiff(path, im.rgb, args.isbi_mpp)
            pred, _, _ = screen_nuclei(
                path, localizer=localizer, settings=settings, device=device, source=source
            )
            txy, tr = label_centres(im.nuclei)
            mp, _ = match_points(pred, txy, tr)
            counts["tp"] += len(mp)
            counts["fp"] += len(pred) - len(mp)
            counts["fn"] += len(txy) - len(mp)
            path.unlink(missing_ok=True)
        out[mode] = {**counts, **rates(counts)}
        print(f"  isbi ({mode}): {_fmt(out[mode])}", flush=True)
    return out


def bench_coverage(args: argparse.Namespace, localizer: Any, device: Any, work: Path) -> dict[str, Any]:
    """Localize time per 1024² tile: plain tiling (no halo) vs boundary-shifted coverage (32 µm halo).

    Both read the same cores of a synthetic conventional smear at 0.25 µm/px; the coverage windows
    carry a 128 px halo, of which the localizer uses core + ``context_um``. Best of 3 passes.
    """
    import torch

    from wsi_screen.slide import open_slide
    from wsi_screen.stain import glass_mask, lab_stats, reinhard
    from wsi_screen.synth import synthesize_slide

    n = args.bench_tiles
    side = 1024
    cols = math.ceil(math.sqrt(n))
    size = (cols * side + 512, math.ceil(n / cols) * side + 512)
    path = work / "bench.tiff"
    synthesize_slide(path, size=size, seed=7, preparation="conventional", spot=False, workers=1)
    halo = 128
    with open_slide(path) as slide:
        cores = [(256 + (i % cols) * side, 256 + (i // cols) * side) for i in range(n)]
        plain = np.stack([slide.read_region((x, y), (side, side), mpp=0.25) for x, y in cores])
        halo_w = np.stack(
            [
                slide.read_region((x - halo, y - halo), (side + 2 * halo, side + 2 * halo), mpp=0.25)
                for x, y in cores
            ]
        )
    source = lab_stats(plain, mask=glass_mask(plain))
    target = localizer.stain_target
    plain_t = reinhard(torch.from_numpy(plain), target, source=source).to(device)
    halo_t = reinhard(torch.from_numpy(halo_w), target, source=source).to(device)
    out: dict[str, Any] = {"tiles": n, "tile_px": side, "window_mpp": 0.25, "halo_px": halo}
    for name, windows, h in (("plain", plain_t, 0), ("coverage", halo_t, halo)):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in range(n):
                localizer.localize(windows[i : i + 1], window_mpp=0.25, halo_px=h)
            times.append((time.perf_counter() - t0) / n)
        out[f"{name}_ms_per_tile"] = round(1000 * min(times), 1)
    ctx = localizer.context_px(0.25)
    f = localizer.mpp / 0.25
    plain_px = math.ceil(side / f / 32) * 32
    cov_px = math.ceil((side + 2 * min(ctx, halo)) / f / 32) * 32
    out["unet_input_px"] = {"plain": plain_px, "coverage": cov_px}
    out["pixel_ratio"] = round((cov_px / plain_px) ** 2, 3)
    out["time_ratio"] = round(out["coverage_ms_per_tile"] / out["plain_ms_per_tile"], 3)
    print(
        f"  localize per 1024² tile: plain {out['plain_ms_per_tile']} ms, "
        f"coverage {out['coverage_ms_per_tile']} ms "
        f"(×{out['time_ratio']}; U-Net input {plain_px}² vs {cov_px}², ×{out['pixel_ratio']} pixels)"
    )
    return out


HERLEV_GROUPS = {
    "normal": ("normal_superficiel", "normal_intermediate", "normal_columnar"),
    "light_dysplastic": ("light_dysplastic",),
    "moderate_dysplastic": ("moderate_dysplastic",),
    "severe_dysplastic": ("severe_dysplastic",),
    "carcinoma_in_situ": ("carcinoma_in_situ",),
}


def score_slide(
    cells_zarr: Path,
    truth_npz: Path,
    *,
    hit_dilation_um: float = 1.0,
    band_um: float = 6.0,
    min_detection_score: float = 0.0,
) -> dict[str, Any]:
    """Recall per kind, precision, nucleus Dice and edge-band recall of one real-cell slide.

    A true nucleus is found when a detection's centre lies inside its mask dilated by
    ``hit_dilation_um`` (the masks are uncertain by a few pixels); each nucleus takes at most one
    detection and each detection at most one nucleus, so over-detection counts as false positives.
    Dice compares each matched detection's outline with its true mask. Edge band: true nuclei whose
    centre is within ``band_um`` of an inner tile edge of the grid that ``run_slide`` processed.
    """
    from scipy.ndimage import grey_dilation
    from skimage.draw import polygon as draw_polygon
    from skimage.measure import regionprops

    from wsi_screen.store import read_cells, read_tiles

    truth = np.load(truth_npz)
    labels = truth["nuclei"]
    kinds = [str(k) for k in truth["kind"]]
    mpp = float(truth["mpp"])
    cells, _ = read_cells(cells_zarr)
    if min_detection_score > 0:  # what a localizer floor (localization.min_detection_score) would keep
        cells = cells.subset(np.flatnonzero(cells.detection_score >= min_detection_score))
    tiles = read_tiles(cells_zarr)
    r = max(1, round(hit_dilation_um / mpp))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    fp_struct = (yy * yy + xx * xx) <= r * r
    dil = grey_dilation(labels, footprint=fp_struct)
    dil = np.where(labels > 0, labels, dil)
    H, W = labels.shape
    xs = np.clip(np.round(cells.x).astype(np.int64), 0, W - 1)
    ys = np.clip(np.round(cells.y).astype(np.int64), 0, H - 1)
    hit_label = dil[ys, xs]
    n_true = len(kinds) - 1
    owner = np.full(n_true + 1, -1, np.int64)
    # Closest detection to the nucleus centre wins (deterministic one-to-one assignment).
    props = {p.label: p for p in regionprops(labels.astype(np.int64))}
    cent = np.zeros((n_true + 1, 2))
    for lab, p in props.items():
        cent[lab] = (p.centroid[1], p.centroid[0])
    d = np.hypot(cells.x - cent[hit_label, 0], cells.y - cent[hit_label, 1])
    for i in np.argsort(d, kind="stable"):
        lab = int(hit_label[i])
        if lab > 0 and owner[lab] < 0:
            owner[lab] = i
    found = owner[1:] >= 0
    kind_arr = np.asarray(kinds[1:])
    present = np.zeros(n_true, bool)
    for lab in props:
        present[lab - 1] = True
    per_kind: dict[str, list[int]] = {}
    for k, f, pr in zip(kind_arr.tolist(), found.tolist(), present.tolist(), strict=True):
        if not pr:
            continue
        acc = per_kind.setdefault(k, [0, 0])
        acc[0] += int(f)
        acc[1] += 1
    tp = int(found[present].sum())
    n_det = len(cells.x)
    # Dice of matched nuclei: the detection's outline raster against the true mask.
    dices = []
    offs = cells.outline_offsets
    for lab in np.nonzero(owner >= 0)[0]:
        i = int(owner[lab])
        poly = cells.outline_xy[offs[i] : offs[i + 1]]
        p = props[int(lab)]
        y0, x0, y1, x1 = p.bbox
        if len(poly) >= 3:
            y0, x0 = min(y0, int(poly[:, 1].min())), min(x0, int(poly[:, 0].min()))
            y1, x1 = max(y1, int(poly[:, 1].max()) + 1), max(x1, int(poly[:, 0].max()) + 1)
        y0, x0, y1, x1 = max(0, y0), max(0, x0), min(H, y1), min(W, x1)
        true_m = labels[y0:y1, x0:x1] == lab
        pred_m = np.zeros_like(true_m)
        if len(poly) >= 3:
            rr, cc = draw_polygon(poly[:, 1] - y0, poly[:, 0] - x0, shape=pred_m.shape)
            pred_m[rr, cc] = True
        den = true_m.sum() + pred_m.sum()
        dices.append(2.0 * float((true_m & pred_m).sum()) / den if den else 0.0)
    # Edge bands of the processed grid.
    done = tiles["status"] == 1
    inner_x = sorted(set(tiles["x0"][done].tolist()) & set(tiles["x1"][done].tolist()))
    inner_y = sorted(set(tiles["y0"][done].tolist()) & set(tiles["y1"][done].tolist()))
    band_px = band_um / mpp
    dist = np.full(n_true, np.inf)
    for lab in props:
        cx, cy = cent[lab]
        dx = min((abs(cx - v) for v in inner_x), default=np.inf)
        dy = min((abs(cy - v) for v in inner_y), default=np.inf)
        dist[lab - 1] = min(dx, dy)
    in_band = present & (dist <= band_px)
    interior = present & ~in_band
    # Each missed nucleus, to open in QuPath: where it is, how large, how far the nearest detection is
    # (a few µm: merged into a neighbour's detection; far: not detected at all).
    from scipy.spatial import cKDTree

    tree = cKDTree(np.stack([cells.x, cells.y], axis=1)) if n_det else None
    missed = []
    for lab in sorted(props):
        if found[lab - 1]:
            continue
        cx, cy = cent[lab]
        near = float(tree.query([cx, cy])[0]) * mpp if tree is not None else None
        missed.append(
            {
                "kind": kinds[lab],
                "x": round(float(cx), 1),
                "y": round(float(cy), 1),
                "area_um2": round(float(props[lab].area) * mpp * mpp, 1),
                "nearest_detection_um": None if near is None else round(near, 1),
                "edge_band": bool(in_band[lab - 1]),
            }
        )
    from wsi_screen.metrics import wilson_interval

    def rate(k: int, n: int) -> dict[str, Any]:
        return {"found": k, "nuclei": n, "recall": k / n if n else None, "wilson95": wilson_interval(k, n)}

    return {
        "nuclei": int(present.sum()),
        "detections": n_det,
        "tp": tp,
        "recall": tp / max(int(present.sum()), 1),
        "precision": tp / n_det if n_det else None,
        "recall_by_kind": {k: rate(*v) for k, v in sorted(per_kind.items())},
        "dice_median": float(np.median(dices)) if dices else None,
        "dice_mean": float(np.mean(dices)) if dices else None,
        "edge_band": rate(int(found[in_band].sum()), int(in_band.sum())),
        "interior": rate(int(found[interior].sum()), int(interior.sum())),
        "band_um": band_um,
        "missed": missed,
        "found": found.tolist(),
    }


def _herlev_groups(row: dict[str, Any]) -> dict[str, Any]:
    """Herlev recall pooled into the issue's groups (the three normal classes together)."""
    from wsi_screen.metrics import wilson_interval

    pooled = {}
    for g, members in HERLEV_GROUPS.items():
        k = sum(row["recall_by_kind"].get(m, {}).get("found", 0) for m in members)
        n = sum(row["recall_by_kind"].get(m, {}).get("nuclei", 0) for m in members)
        pooled[g] = {
            "found": k,
            "nuclei": n,
            "recall": k / n if n else None,
            "wilson95": wilson_interval(k, n),
        }
    return pooled


def eval_real(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Real-cell slides of one split part (pipelines/real_slides.py) through ``run_slide``, defaults."""
    sys.path.insert(0, str(ROOT / "pipelines"))
    import real_slides

    from wsi_screen.config import load_settings
    from wsi_screen.pipeline import load_models, run_slide

    slides_dir = args.real_slides or work / "real-slides"
    paths = []
    for kind in args.real:
        path = slides_dir / f"real-{kind}-{args.real_part}.tiff"
        if not path.is_file():
            real_slides.build(args.data, args.manifest, args.real_part, slides_dir, which=[kind])
        paths.append((kind, path))
    overrides: dict[str, Any] = {
        "localization.model": args.bundle,
        "adequacy.min_squamous_cells": 0,
        **dict(args.set),
    }
    if args.no_stain:
        overrides["stain.enabled"] = False
    settings = load_settings(overrides=overrides)
    models = load_models(settings)
    out: dict[str, Any] = {"part": args.real_part, "settings_overrides": overrides}
    for kind, path in paths:
        t0 = time.perf_counter()
        res = run_slide(path, work / "runs", settings=settings, models=models, progress=False)
        row = score_slide(res.out_dir / "cells.zarr", path.with_suffix(".truth.npz"))
        row.pop("found")
        row["seconds"] = round(time.perf_counter() - t0, 1)
        if kind == "herlev":
            row["recall_by_group"] = _herlev_groups(row)
        if args.floors:  # what each detection floor would keep of the same run (choose it on val)
            row["floors"] = {}
            for floor in args.floors:
                fr = score_slide(
                    res.out_dir / "cells.zarr", path.with_suffix(".truth.npz"), min_detection_score=floor
                )
                fr.pop("found")
                entry = {k: fr[k] for k in ("recall", "precision", "tp", "detections")}
                if kind == "herlev":
                    entry["recall_by_group"] = _herlev_groups(fr)
                row["floors"][f"{floor:g}"] = entry
        out[kind] = row
        print(
            f"  real {kind} ({args.real_part}): recall {row['recall']:.3f}, precision "
            f"{(row['precision'] or 0):.3f}, dice {row['dice_median']}, edge {row['edge_band']['recall']}, "
            f"interior {row['interior']['recall']} ({row['seconds']} s)",
            flush=True,
        )
        for k, v in row.get("recall_by_group", row["recall_by_kind"]).items():
            print(f"    {k}: {v['found']}/{v['nuclei']} = {v['recall']}", flush=True)
    return out


def _fmt(r: dict[str, Any]) -> str:
    def f(v: Any) -> str:
        return "n/a" if v is None else f"{v:.3f}"

    return (
        f"recall {f(r['recall'])}, precision {f(r['precision'])} (tp {r['tp']}, fp {r['fp']}, fn {r['fn']})"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", default="nuclei-unet-v1", help="bundle name or folder")
    p.add_argument("--isbi", type=Path, default=DEFAULT_ISBI)
    p.add_argument("--isbi-val", type=int, nargs=2, default=(36, 45), metavar=("FIRST", "LAST"))
    p.add_argument("--isbi-mpp", type=float, default=0.35)
    p.add_argument("--slides-per-profile", type=int, default=1)
    p.add_argument("--size", type=int, default=3072, help="synthetic slide side, px at 0.25 µm/px")
    p.add_argument("--skip", choices=["synthetic", "isbi"], action="append", default=[])
    p.add_argument("--bench-tiles", type=int, default=0, help="also time plain vs coverage tiling on N tiles")
    p.add_argument(
        "--no-stain",
        action="store_true",
        help="skip Reinhard normalization (robustness of the input representation alone)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--real",
        nargs="*",
        default=[],
        choices=["herlev", "lbc", "cnseg", "isbi"],
        help="real-cell slides (pipelines/real_slides.py) to screen through run_slide",
    )
    p.add_argument("--real-part", choices=["val", "test"], default="test")
    p.add_argument("--real-slides", type=Path, default=None, help="folder of built real slides (reused)")
    p.add_argument(
        "--floors",
        type=float,
        nargs="*",
        default=[],
        help="also score the real slides as if only detections with mean nucleus probability ≥ each "
        "floor were kept (localization.min_detection_score; choose it on --real-part val)",
    )
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    p.add_argument("--manifest", type=Path, default=ROOT / "pipelines" / "splits" / "real.json")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="a setting for every slide screened (as wsi-screen run --set), e.g. "
        "localization.min_peak_distance_um=2.5; choose it on --real-part val",
    )
    args = p.parse_args(argv)
    from wsi_screen.config import ConfigError, parse_override

    try:
        args.set = [parse_override(text) for text in args.set]
    except ConfigError as exc:
        p.error(f"--set: {exc}")

    import torch

    from wsi_screen.config import load_settings
    from wsi_screen.localize import Localizer
    from wsi_screen.models.bundle import load_bundle
    from wsi_screen.runtime import configure_torch, resolve_device

    configure_torch()
    device = resolve_device(args.device)
    try:  # an unknown key or a bad value: one line naming it, before any slide is read
        settings = load_settings(
            overrides={**dict(args.set), **({"stain.enabled": False} if args.no_stain else {})}
        )
    except ConfigError as exc:
        p.error(f"--set: {exc}")
    bundle = load_bundle(args.bundle, task="localization")
    localizer = Localizer(bundle, settings=settings.localization, device=device)
    result: dict[str, Any] = {
        "command": " ".join(
            ["python pipelines/eval_localization.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "bundle": bundle.name,
        "sha256": bundle.sha256,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "matching": "one-to-one, centre within one equivalent nucleus radius",
        "stain_normalization": not args.no_stain,
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="wsi-eval-") as tmp:
        work = Path(tmp)
        if "synthetic" not in args.skip:
            result["synthetic"] = eval_synthetic(args, localizer, settings, device, work)
            syn = result["synthetic"]
            print(f"synthetic overall: {_fmt(syn['overall'])}")
            epi = syn["recall_epithelial"]
            print(f"  epithelial nuclei: recall {epi['recall']:.3f} ({epi['found']}/{epi['nuclei']})")
            for kind, v in syn["recall_by_kind"].items():
                print(f"  {kind}: recall {v['recall']:.3f} ({v['found']}/{v['nuclei']})")
        if "isbi" not in args.skip:
            if (args.isbi / "images").is_dir():
                result["isbi"] = eval_isbi(args, localizer, settings, device, work)
            else:
                print(f"ISBI data not found at {args.isbi}; skipped", file=sys.stderr)
        if args.real:
            result["real"] = eval_real(args, work)
        if args.bench_tiles:
            result["coverage_benchmark"] = bench_coverage(args, localizer, device, work)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
