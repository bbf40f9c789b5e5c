"""Throughput of wsi-screen against the physical limit (JPEG decode) and a peer (WSInfer), one command.

    python pipelines/benchmark.py --out bench/                       # 20,000² slide at 0.25 µm/px
    python pipelines/benchmark.py --size 8192 --out bench/           # smaller
    python pipelines/benchmark.py --quick --out /tmp/bench-quick     # CI: 3072² slide, every part once
    python pipelines/benchmark.py --device cuda --classifier-arch resnet50 --out bench-gpu/

On a shared machine take the measurement under the CPU lock: ``flock /tmp/wsi-cpu.lock python ...``.

In one run on one machine it

1. synthesizes a slide (:func:`wsi_screen.synth.synthesize_slide`: tiled JPEG pyramidal TIFF, 512-px
   tiles) and builds the pipeline's tile grid over its cell regions;
2. **raw decode** (the physical limit): the compressed bytes of every TIFF tile that a kept read window
   touches, decoded with ``imagecodecs.jpeg8_decode`` (libjpeg-turbo) in a pool of all cores;
3. **reader**: ``iter_windows`` over the kept tiles with all cores: the direct TIFF path as the
   pipeline reads (``direct``: decoded tiles, pasted into the batch by the device stage), the same
   with the threads assembling whole windows (``direct-windows``), and both backends without the
   direct path; MP/s counts the same slide pixels as the raw decode (so the ratio is the share of
   the physical limit reached), window MP/s counts what the reader delivers (halos included);
4. **stages** in isolation on the same windows: assemble (the batch from the decoded tiles),
   normalize, localize (U-Net forward and candidate extraction), crop (ownership, outlines and
   cutting), classify, write (Zarr appends);
5. **end to end**: :func:`wsi_screen.pipeline.run_slide`, with the per-stage busy/idle figures of its
   ``run.json``;
6. **peer**: WSInfer 0.6 patch classification with the same classifier backbone (a local TorchScript
   export) on the same device, via ``pipelines/wsinfer_peer.py`` in a separate virtual environment
   (``pipelines/setup_wsinfer_peer.sh``); skipped, with the reason, when that is not installed.

Writes ``OUT/benchmark.json`` and ``OUT/benchmark.md`` (the table of ``docs/performance.md``).
Models: the shipped bundles named in the settings; ``--stand-in-models`` (implied by ``--quick`` when
the bundles are missing) builds randomly initialised bundles of the same kinds instead, which time the
same arithmetic but find arbitrary cells.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from wsi_screen.runtime import cpu_model

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_VERSION = 1
DEFAULT_WSINFER_PYTHON = Path("/tmp/wsinfer-venv/bin/python")
#: Every figure the harness must produce (``--quick`` asserts them; tests check the JSON against this).
REQUIRED: dict[str, tuple[str, ...]] = {
    "raw_decode": ("tiles", "megapixels", "workers", "seconds", "mp_per_s"),
    "device_decode": ("tiles", "megapixels", "device", "seconds", "mp_per_s", "decoder"),
    "reader": ("mp_per_s", "window_mp_per_s", "tiles_per_s", "seconds", "decodes", "ratio_to_raw"),
    "stages": ("read", "assemble", "normalize", "localize", "crop", "classify", "write"),
    "end_to_end": (
        "seconds",
        "tiles_seconds",
        "cells",
        "cells_per_s",
        "slides_per_hour",
        "mp_per_s",
        "ratio_to_raw",
        "stages",
        "idle",
    ),
    "peer": ("name", "status"),
}


# -- environment ----------------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def hardware(device: Any) -> dict[str, Any]:
    import imagecodecs
    import openslide
    import torch

    from wsi_screen.runtime import cpu_count

    mem_gib = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gib = round(pages / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    gpu = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "cuda": torch.version.cuda,
        }
    return {
        "cpu": cpu_model(),
        "cores": cpu_count(),
        "logical_cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": gpu,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "load_average": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "versions": {
            "python": platform.python_version(),
            "wsi_screen": _version("wsi-screen"),
            "torch": torch.__version__,
            "timm": _version("timm"),
            "numpy": np.__version__,
            "openslide": openslide.__library_version__,
            "openslide_python": _version("openslide-python"),
            "tiffslide": _version("tiffslide"),
            "tifffile": _version("tifffile"),
            "imagecodecs": imagecodecs.__version__,
            "libjpeg_turbo": _call(getattr(imagecodecs, "jpeg8_version", None)),
            "zarr": _version("zarr"),
        },
    }


def _call(fn: Callable[[], Any] | None) -> Any:
    try:
        return fn() if fn is not None else None
    except Exception:
        return None


def _sync(device: Any) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: Any, repeats: int) -> tuple[float, Any]:
    """Median seconds of ``repeats`` calls (after one warm-up call) and the last result."""
    out = fn()
    _sync(device)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _rate(n: float, seconds: float) -> float:
    return round(n / seconds, 3) if seconds > 0 else 0.0


# -- slide, grid and the tissue tiles -------------------------------------------------------------


def make_slide(out: Path, size: int, mpp: float, seed: int) -> tuple[Path, dict[str, Any]]:
    """The synthetic benchmark slide (reused when one with the same parameters is there)."""
    from wsi_screen.synth import synthesize_slide

    path = out / f"bench-{size}-s{seed}.tiff"
    stamp = path.with_suffix(".json")
    abnormal = "HSIL=20,LSIL=20,ASC-US=10"
    params: dict[str, Any] = {"size": size, "mpp": mpp, "seed": seed, "abnormal": abnormal}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("params") == params:
        return path, json.loads(stamp.read_text())
    t0 = time.perf_counter()
    res = synthesize_slide(path, size=(size, size), mpp=mpp, seed=seed, abnormal=abnormal)
    info = {
        "params": params,
        "path": str(path),
        "file_mib": round(path.stat().st_size / 2**20, 1),
        "level_dimensions": [list(d) for d in res.level_dimensions],
        "truth_counts": res.counts,
        "synthesis_s": round(time.perf_counter() - t0, 2),
    }
    stamp.write_text(json.dumps(info, indent=2))
    return path, info


def tissue_tiff_tiles(path: Path, tiles: Sequence[Any], level: int) -> tuple[Any, list[int]]:
    """The TIFF page of ``level`` and the indices of its tiles that the tiles' read windows touch."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page: Any = tif.pages[level]
    tw, th = int(page.tilewidth), int(page.tilelength)
    ncol = math.ceil(int(page.imagewidth) / tw)
    nrow = math.ceil(int(page.imagelength) / th)
    need: set[int] = set()
    for t in tiles:
        x0, y0 = math.floor(t.read_x), math.floor(t.read_y)
        x1 = math.ceil(t.read_x + t.read_size * t.scale)
        y1 = math.ceil(t.read_y + t.read_size * t.scale)
        for r in range(max(0, y0 // th), min(nrow, (y1 - 1) // th + 1)):
            for c in range(max(0, x0 // tw), min(ncol, (x1 - 1) // tw + 1)):
                need.add(r * ncol + c)
    return page, sorted(need)


# -- 2. raw decode -----------------------------------------------------------------------------------


def bench_raw_decode(
    path: Path, page: Any, indices: Sequence[int], workers: int, repeats: int
) -> dict[str, Any]:
    """libjpeg-turbo decode of the tiles' compressed bytes (read beforehand) with ``workers`` threads."""
    import imagecodecs

    tables = page.jpegtables
    if int(page.compression) != 7:
        raise SystemExit(f"{path.name}: level 0 is not JPEG-compressed (compression {page.compression})")
    colorspace = "YCBCR" if int(page.photometric) == 6 else "RGB"
    with path.open("rb") as fh:
        blobs = []
        for i in indices:
            fh.seek(int(page.dataoffsets[i]))
            blobs.append(fh.read(int(page.databytecounts[i])))

    def decode(blob: bytes) -> int:
        return int(
            imagecodecs.jpeg8_decode(blob, tables=tables, colorspace=colorspace, outcolorspace="RGB").size
        )

    mp = len(indices) * int(page.tilewidth) * int(page.tilelength) / 1e6
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(decode, blobs))  # warm-up
        times = []
        for _ in range(max(1, repeats)):
            t0 = time.perf_counter()
            list(pool.map(decode, blobs))
            times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    return {
        "tiles": len(indices),
        "tile_size": [int(page.tilewidth), int(page.tilelength)],
        "megapixels": round(mp, 3),
        "compressed_mib": round(sum(len(b) for b in blobs) / 2**20, 2),
        "workers": workers,
        "seconds": round(sec, 4),
        "seconds_all": [round(t, 4) for t in times],
        "mp_per_s": _rate(mp, sec),
        "mp_per_s_best": _rate(mp, min(times)),
        "decoder": "imagecodecs.jpeg8_decode (libjpeg-turbo), ThreadPoolExecutor",
    }


def bench_device_decode(
    path: Path, level: int, indices: Sequence[int], device: Any, repeats: int, *, batch: int = 256
) -> dict[str, Any]:
    """Batched decode of the same tiles with torchvision (``wsi_screen.jpeg_decode``): nvJPEG on
    CUDA — the GPU decode limit next to the CPU one —, libjpeg-turbo in one thread elsewhere.
    Streams are read (and made self-contained) beforehand; each batch ends on the device."""
    from wsi_screen.jpeg_decode import decode_streams, decoder_name
    from wsi_screen.slide import open_slide

    with open_slide(path) as slide:
        tw, th, _, _ = slide.tile_layout(level)
        streams = slide.jpeg_tile_streams(level, indices)
    chunks = [streams[i : i + batch] for i in range(0, len(streams), batch)]

    def decode_all() -> None:
        for chunk in chunks:
            decode_streams(chunk, device=device, tile_size=(tw, th))
        _sync(device)

    decode_all()  # warm-up (nvJPEG handles, allocator)
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        decode_all()
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    mp = len(indices) * tw * th / 1e6
    return {
        "tiles": len(indices),
        "megapixels": round(mp, 3),
        "batch": batch,
        "device": str(device),
        "seconds": round(sec, 4),
        "seconds_all": [round(t, 4) for t in times],
        "mp_per_s": _rate(mp, sec),
        "decoder": decoder_name(device),
    }


# -- 3. reader ----------------------------------------------------------------------------------------


def bench_reader(
    path: Path,
    tiles: Sequence[Any],
    *,
    mpp: float,
    workers: int,
    prefetch: int,
    backend: str,
    direct: bool,
    assemble: bool,
    repeats: int,
    slide_mp: float,
    raw_mp_per_s: float,
    jpeg_device: Any = None,
) -> dict[str, Any]:
    """``iter_windows`` over ``tiles`` with a fresh slide (cold tile cache) per repeat.

    ``assemble``: the reader threads paste whole windows (else they deliver the decoded tiles under
    each window, as the pipeline reads, and the consumer here drops them). ``jpeg_device``: the
    threads decode each window's tiles in one batch there (``Slide.set_jpeg_device``; nvJPEG on CUDA).
    """
    from wsi_screen.reader import ReaderStats, iter_windows
    from wsi_screen.slide import Slide

    runs = []
    for _ in range(max(1, repeats)):
        with Slide(path, backend=backend, direct=direct) as slide:  # type: ignore[arg-type]
            slide.set_jpeg_device(jpeg_device)
            stats = ReaderStats()
            t0 = time.perf_counter()
            n = 0
            for read in iter_windows(
                slide, tiles, mpp=mpp, workers=workers, prefetch=prefetch, stats=stats, assemble=assemble
            ):
                n += read.parts is not None
            sec = time.perf_counter() - t0
            runs.append((sec, stats, slide.cache_stats(), slide.direct_levels))
    runs.sort(key=lambda r: r[0])
    sec, stats, cache, levels = runs[len(runs) // 2]
    mp_s = _rate(slide_mp, sec)
    return {
        "backend": backend,
        "direct": bool(direct and levels),
        "jpeg_device": None if jpeg_device is None else str(jpeg_device),
        "assembled_windows": assemble,
        "workers": workers,
        "tiles": len(tiles),
        "seconds": round(sec, 4),
        "seconds_all": [round(r[0], 4) for r in runs],
        "mp_per_s": mp_s,
        "window_mp_per_s": _rate(stats.megapixels, sec),
        "tiles_per_s": _rate(len(tiles), sec),
        "decodes": cache["misses"] if levels else None,
        "cache_hits": cache["hits"] if levels else None,
        "idle_fraction": round(stats.idle_fraction, 4),
        "ratio_to_raw": round(mp_s / raw_mp_per_s, 4) if raw_mp_per_s else None,
    }


# -- models ---------------------------------------------------------------------------------------------


_STAND_IN_TARGET = ((8.9, -0.05, -0.02), (0.45, 0.06, 0.03))


def stand_in_localizer(out: Path) -> Path:
    """A randomly initialised localization bundle (smp-unet on optical density, 0.5 µm/px)."""
    import torch

    from wsi_screen.models.bundle import BundleConfig, StainTarget, save_bundle
    from wsi_screen.models.registry import create_model

    torch.manual_seed(0)
    unet = create_model("smp-unet", num_classes=3, in_chans=1)
    cfg = BundleConfig(
        name="standin-unet",
        task="localization",
        description="benchmark stand-in: random weights",
        architecture="smp-unet",
        in_channels=1,
        input_representation="od_gray",
        input_size=512,
        mpp=0.5,
        mean=[0.2],
        std=[0.2],
        class_names=["nucleus", "marker", "cell"],
        stain_target=StainTarget(mu=_STAND_IN_TARGET[0], sigma=_STAND_IN_TARGET[1]),
        inference={"context_um": 24.0},
    )
    return save_bundle(unet, cfg, out / "standin-unet").path


def stand_in_classifier(out: Path, *, arch: str, input_size: int = 224) -> Path:
    """A randomly initialised classification bundle of ``arch`` with the synthetic slides' classes."""
    import torch

    from wsi_screen.models.bundle import BundleConfig, StainTarget, save_bundle
    from wsi_screen.models.registry import create_model
    from wsi_screen.synth import ABNORMAL_CLASSES, CLASS_NAMES

    torch.manual_seed(0)
    model = create_model(arch, num_classes=len(CLASS_NAMES), in_chans=3)
    cfg = BundleConfig(
        name="standin-classifier",
        task="classification",
        description="benchmark stand-in: random weights",
        architecture=arch,
        input_size=input_size,
        mpp=0.25,
        class_names=list(CLASS_NAMES),
        abnormal_classes=list(ABNORMAL_CLASSES),
        stain_target=StainTarget(mu=_STAND_IN_TARGET[0], sigma=_STAND_IN_TARGET[1]),
    )
    return save_bundle(model, cfg, out / "standin-classifier").path


def resolve_models(args: argparse.Namespace, work: Path) -> tuple[Any, dict[str, Any]]:
    """Settings with the models to benchmark, and a note on where they came from.

    A bundle that cannot be loaded (not shipped yet), or every bundle with ``--stand-in-models``, is
    replaced by a randomly initialised one of the same kind: same arithmetic, arbitrary cells.
    """
    from wsi_screen.config import load_settings
    from wsi_screen.errors import WsiScreenError
    from wsi_screen.models.bundle import load_bundle

    settings = load_settings()
    names = {
        "localizer": args.localizer or settings.localization.model,
        "classifier": args.classifier or settings.classification.models[0],
    }
    note: dict[str, Any] = {"stand_in": [], "reasons": {}}
    for role, task in (("localizer", "localization"), ("classifier", "classification")):
        reason = "--stand-in-models" if args.stand_in_models else None
        if reason is None:
            try:
                load_bundle(names[role], task=task, verify=False)  # type: ignore[arg-type]
            except WsiScreenError as exc:
                reason = str(exc)
        if reason is not None:
            if role == "localizer":
                names[role] = str(stand_in_localizer(work / "models"))
            else:
                arch = args.stand_in_arch
                names[role] = str(stand_in_classifier(work / "models", arch=arch))
                note["classifier_arch"] = arch
            note["stand_in"].append(role)
            note["reasons"][role] = reason
            print(f"[benchmark] {role}: random-weight stand-in ({reason})", flush=True)
    note.update(names)
    overrides: dict[str, Any] = {
        "localization.model": names["localizer"],
        "classification.models": [names["classifier"]],
        "output.report": not args.no_report,
    }
    if args.workers:
        overrides["reading.workers"] = args.workers
    if args.classify_batch:
        overrides["classification.batch_size"] = args.classify_batch
    if args.localize_batch:
        overrides["localization.batch_size"] = args.localize_batch
    if args.candidates:
        overrides["localization.candidates"] = args.candidates
    return settings.with_overrides(overrides), note


# -- 4. stages in isolation ---------------------------------------------------------------------------------


def bench_stages(
    slide_path: Path,
    settings: Any,
    models: Any,
    grid: Any,
    tiles: Sequence[Any],
    *,
    n_windows: int,
    repeats: int,
    min_crops: int,
    write_cells: int,
    work: Path,
    reader_figures: dict[str, Any],
) -> dict[str, Any]:
    """Each device stage (and the writer) timed alone on the same ``n_windows`` windows."""
    import torch

    from wsi_screen.cells import CellTable
    from wsi_screen.classify import cut_crops
    from wsi_screen.device_stage import TileProcessor
    from wsi_screen.slide import open_slide
    from wsi_screen.slide_stain import estimate_source_stats
    from wsi_screen.stain import ReinhardStats
    from wsi_screen.store import CellStoreWriter

    dev = models.device
    classifier, localizer = models.classifier, models.localizer
    sample = list(tiles)[:n_windows]
    with open_slide(slide_path, backend=settings.slide.backend) as slide:
        parts = [
            slide.read_region_parts((t.read_x, t.read_y), (t.read_size, t.read_size), mpp=grid.mpp)
            for t in sample
        ]
        target = classifier.bundles[0].config.stain_target
        tstats = None if target is None else ReinhardStats(mu=target.mu, sigma=target.sigma)
        source = estimate_source_stats(
            slide, grid, n_tiles=settings.stain.sample_tiles, mask_glass=settings.stain.mask_glass
        )
    proc = TileProcessor(
        localizer=localizer,
        classifier=classifier,
        grid=grid,
        source=source,
        target=tstats,
        crop_size=classifier.input_size,
        device=dev,
    )
    b = len(sample)
    mp = b * grid.read_size**2 / 1e6
    out: dict[str, Any] = {"windows": b, "window_px": grid.read_size, "device": str(dev)}
    out["read"] = {
        "source": "reader benchmark (direct path, all cores)",
        "tiles_per_s": reader_figures["tiles_per_s"],
        "mp_per_s": reader_figures["window_mp_per_s"],
    }
    # assemble: the device stage pasting the decoded tiles into its batch, in the pipeline's batch
    # size, next to what it replaced (stacking windows the reader threads had assembled).
    bt = max(1, settings.localization.batch_size)
    windows = [p.to_array() for p in parts]

    def paste() -> Any:
        return [proc.assemble(parts[s : s + bt]) for s in range(0, b, bt)]

    def stack() -> Any:
        return [torch.from_numpy(np.stack(windows[s : s + bt])) for s in range(0, b, bt)]

    sec_paste, _ = _timed(paste, dev, repeats)
    sec_stack, _ = _timed(stack, dev, repeats)
    out["assemble"] = {
        "seconds": round(sec_paste, 4),
        "tiles_per_s": _rate(b, sec_paste),
        "mp_per_s": _rate(mp, sec_paste),
        "stack_assembled_windows_s": round(sec_stack, 4),
        "batch_tiles": bt,
    }
    x = proc.assemble(parts).to(dev)

    sec, norm = _timed(lambda: proc.normalize(x), dev, repeats)
    out["normalize"] = {"seconds": round(sec, 4), "tiles_per_s": _rate(b, sec), "mp_per_s": _rate(mp, sec)}

    def localize() -> Any:
        return localizer.localize(norm, window_mpp=grid.mpp, halo_px=grid.halo)

    # The U-Net alone on what localize() feeds it: the core plus the model's context (not the whole halo).
    trim = grid.halo - min(grid.halo, localizer.context_px(grid.mpp))
    side = int(norm.shape[1])
    unet_in = norm[:, trim : side - trim, trim : side - trim] if trim else norm

    def forward() -> Any:
        return localizer.predict(unet_in, window_mpp=grid.mpp)

    sec_fwd, _ = _timed(forward, dev, repeats)
    sec_loc, cands = _timed(localize, dev, repeats)
    n_cand = sum(len(c) for c in cands)
    out["localize"] = {
        "seconds": round(sec_loc, 4),
        "tiles_per_s": _rate(b, sec_loc),
        "mp_per_s": _rate(mp, sec_loc),
        "unet_forward_s": round(sec_fwd, 4),
        "unet_input_px": side - 2 * trim,
        "unet_tiles_per_s": _rate(b, sec_fwd),
        "candidates_s": round(max(0.0, sec_loc - sec_fwd), 4),
        "candidates": n_cand,
        "batch_tiles": localizer.batch_size,
    }

    # crop: what the device stage does between localize and classify (ownership, outlines, cutting).
    def own_and_cut() -> tuple[list[CellTable], Any]:
        tables, ti, cx, cy = [], [], [], []
        for i, (tile, c) in enumerate(zip(sample, cands, strict=True)):
            lx, ly = tile.to_level0(c.x, c.y)
            own = np.flatnonzero(tile.owns(lx, ly))
            tables.append(c.subset(own).to_level0(tile))
            ti.append(np.full(len(own), i, np.int64))
            cx.append(np.floor(np.asarray(c.x)[own]).astype(np.int64))
            cy.append(np.floor(np.asarray(c.y)[own]).astype(np.int64))
        t = torch.from_numpy(np.concatenate(ti))
        crops = cut_crops(
            norm,
            t,
            torch.from_numpy(np.concatenate(cx)),
            torch.from_numpy(np.concatenate(cy)),
            proc.crop_size,
        )
        return tables, crops

    sec_crop, (tables, crops) = _timed(own_and_cut, dev, repeats)
    n_cells = int(crops.shape[0])
    out["crop"] = {
        "seconds": round(sec_crop, 4),
        "cells": n_cells,
        "crops_per_s": _rate(n_cells, sec_crop),
        "tiles_per_s": _rate(b, sec_crop),
    }
    # Cutting alone at a fixed, realistic count (independent of what the localizer found).
    rng = np.random.default_rng(0)
    n_fix = max(min_crops, n_cells)
    half = proc.crop_size // 2
    ti_f = torch.from_numpy(rng.integers(0, b, n_fix))
    cx_f = torch.from_numpy(rng.integers(grid.halo, grid.halo + grid.tile_size, n_fix))
    cy_f = torch.from_numpy(rng.integers(grid.halo, grid.halo + grid.tile_size, n_fix))
    sec_cut, crops_f = _timed(lambda: cut_crops(norm, ti_f, cx_f, cy_f, proc.crop_size), dev, repeats)
    out["crop"].update(
        {"cut_only_crops": n_fix, "cut_only_crops_per_s": _rate(n_fix, sec_cut), "crop_half": half}
    )

    sec_cls, _ = _timed(lambda: classifier.predict(crops_f), dev, repeats)
    out["classify"] = {
        "seconds": round(sec_cls, 4),
        "crops": n_fix,
        "crops_per_s": _rate(n_fix, sec_cls),
        "batch": classifier.batch_size,
        "models": classifier.names,
        "architecture": [bb.config.architecture for bb in classifier.bundles],
        "dtype": "bfloat16 autocast" if dev.type == "cuda" else "float32",
    }

    # write: the tables of the sample, classified (random probabilities), appended to a fresh store.
    k = len(classifier.class_names)
    done = [t.with_probs(rng.dirichlet(np.ones(k), len(t)).astype(np.float32)) for t in tables]
    reps = max(1, math.ceil(write_cells / max(1, sum(len(t) for t in done))))

    def write() -> int:
        store_path = work / "write-bench.zarr"
        shutil.rmtree(store_path, ignore_errors=True)
        w = CellStoreWriter(
            store_path,
            class_names=classifier.class_names,
            abnormal_classes=classifier.abnormal_classes,
            chunk_cells=settings.output.zarr_chunk_cells,
        )
        n = 0
        for _ in range(reps):
            for t in done:
                w.append(t)
                n += len(t)
        w.close()
        return n

    sec_w, n_w = _timed(write, dev, max(1, repeats // 2))
    out["write"] = {
        "seconds": round(sec_w, 4),
        "cells": n_w,
        "cells_per_s": _rate(n_w, sec_w),
        "tables": reps * len(done),
    }

    # The device stage as the pipeline runs it (one batch of the localization batch size at a time).
    def device_stage() -> int:
        n = 0
        for s in range(0, b, bt):
            res = proc(sample[s : s + bt], parts[s : s + bt])
            n += sum(len(t) for t in res.tables)
        return n

    sec_dev, n_dev = _timed(device_stage, dev, max(1, repeats // 2))
    out["device_stage"] = {
        "seconds": round(sec_dev, 4),
        "tiles_per_s": _rate(b, sec_dev),
        "cells": n_dev,
        "cells_per_s": _rate(n_dev, sec_dev),
    }
    return out


def bench_classifier_arch(
    arch: str, device: Any, *, input_size: int, batch: int, n: int, repeats: int
) -> dict[str, Any]:
    """Crops/s of a randomly initialised ``arch`` (e.g. the GPU goal's resnet50) as the pipeline runs it."""
    import torch

    from wsi_screen.classify import CellClassifier
    from wsi_screen.models.bundle import BundleConfig, save_bundle
    from wsi_screen.models.registry import create_model

    with tempfile.TemporaryDirectory() as tmp:
        model = create_model(arch, num_classes=5, in_chans=3)
        cfg = BundleConfig(
            name=f"bench-{arch}".replace("/", "-"),
            task="classification",
            architecture=arch,
            input_size=input_size,
            mpp=0.25,
            class_names=["a", "b", "c", "d", "e"],
        )
        bundle = save_bundle(model, cfg, Path(tmp) / "b")
        clf = CellClassifier([bundle], device=device, batch_size=batch)
        crops = torch.randint(0, 256, (n, input_size, input_size, 3), dtype=torch.uint8)
        if device.type == "cuda":
            crops = crops.pin_memory()
        sec, _ = _timed(lambda: clf.predict(crops), device, repeats)
    return {
        "architecture": arch,
        "crops": n,
        "batch": batch,
        "seconds": round(sec, 4),
        "crops_per_s": _rate(n, sec),
        "dtype": "bfloat16 autocast" if device.type == "cuda" else "float32",
        "device": str(device),
    }


def bench_variants(models: Any, grid: Any, *, repeats: int, crops: int) -> dict[str, Any]:
    """Forward passes of the U-Net and the classifier under execution variants (what helps on this device).

    ``eager fp32 channels_last`` is what the pipeline does today; the others are candidates: NCHW
    memory layout, bf16 autocast (the GPU default; on CPUs with AMX/AVX-512-BF16 it may pay too) and
    ``torch.compile`` (its compile time is reported separately).
    """
    import torch

    dev = models.device
    out: dict[str, Any] = {}
    loc = models.localizer
    clf = models.classifier
    side = grid.tile_size // max(1, round(loc.mpp / grid.mpp)) + 2 * round(loc.context_um / loc.mpp)
    side = -(-side // 32) * 32
    nets = {
        "unet": (loc.model, torch.randn(max(1, loc.batch_size), loc.bundle.config.in_channels, side, side)),
        "classifier": (
            clf._models[0],
            torch.randn(min(crops, clf.batch_size), 3, clf.input_size, clf.input_size),
        ),
    }
    for name, (net, x) in nets.items():
        x = x.to(dev)
        rows: dict[str, Any] = {"input": list(x.shape)}

        def run(model: Any, inp: Any, autocast: bool) -> Any:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=autocast):
                return model(inp)

        cl = x.contiguous(memory_format=torch.channels_last)
        base = net.to(memory_format=torch.channels_last)
        cases: list[tuple[str, Any, Any, bool]] = [
            ("eager fp32 channels_last", base, cl, False),
            ("eager bf16 autocast channels_last", base, cl, True),
        ]
        for label, model, inp, ac in cases:
            sec, _ = _timed(partial(run, model, inp, ac), dev, repeats)
            rows[label] = {"seconds": round(sec, 4), "items_per_s": _rate(x.shape[0], sec)}
        contig = net.to(memory_format=torch.contiguous_format)
        sec, _ = _timed(partial(run, contig, x.contiguous(), False), dev, repeats)
        rows["eager fp32 contiguous"] = {"seconds": round(sec, 4), "items_per_s": _rate(x.shape[0], sec)}
        net.to(memory_format=torch.channels_last)
        try:
            compiled = torch.compile(net)
            t0 = time.perf_counter()
            run(compiled, cl, False)
            _sync(dev)
            compile_s = time.perf_counter() - t0
            sec, _ = _timed(partial(run, compiled, cl, False), dev, repeats)
            rows["torch.compile fp32 channels_last"] = {
                "seconds": round(sec, 4),
                "items_per_s": _rate(x.shape[0], sec),
                "compile_s": round(compile_s, 1),
            }
        except Exception as exc:  # inductor needs a C++ compiler; report rather than fail
            rows["torch.compile fp32 channels_last"] = {"error": " ".join(str(exc).split())[:200]}
        out[name] = rows
    return out


# -- 5. end to end -------------------------------------------------------------------------------------------


def bench_end_to_end(
    slide_path: Path, settings: Any, models: Any, work: Path, *, slide_mp: float, raw_mp_per_s: float
) -> dict[str, Any]:
    from wsi_screen.pipeline import run_slide

    out_root = work / "run"
    shutil.rmtree(out_root, ignore_errors=True)
    t0 = time.perf_counter()
    res = run_slide(slide_path, out_root, settings=settings, models=models, progress=False)
    wall = time.perf_counter() - t0
    run = json.loads((res.out_dir / "run.json").read_text())
    stages = run["stages"]
    timings = run["timings"]
    total = float(timings.get("total", wall))
    loop = float(timings.get("tiles", total))
    tiles = int(run["tiles"]["processed"])
    mp_s = _rate(slide_mp, total)
    reader, device, writer = stages["reader"], stages["device"], stages["writer"]
    return {
        "seconds": round(total, 3),
        "tiles_seconds": round(loop, 3),
        "tiles": tiles,
        "tiles_per_s": _rate(tiles, loop),
        "cells": int(res.n_cells),
        "cells_per_s": _rate(res.n_cells, total),
        "cells_per_s_tiles": _rate(res.n_cells, loop),
        "slides_per_hour": round(3600.0 / total, 2) if total > 0 else 0.0,
        "mp_per_s": mp_s,
        "ratio_to_raw": round(mp_s / raw_mp_per_s, 4) if raw_mp_per_s else None,
        "timings": timings,
        "stages": stages,
        "idle": {
            "device_waiting_for_reader": device.get("idle_fraction"),
            "reader_threads": reader.get("idle_fraction"),
            "writer": writer.get("idle_fraction"),
            "device_blocked_by_writer_s": writer.get("device_blocked_s"),
        },
        "triage": res.summary.get("triage"),
        "out_dir": str(res.out_dir),
    }


def profile_end_to_end(slide_path: Path, settings: Any, models: Any, work: Path, out: Path) -> dict[str, Any]:
    """One more ``run_slide`` under ``torch.profiler`` (CPU, and CUDA when the models are there).

    Writes ``out/trace.json.gz`` (open it in Perfetto or chrome://tracing: one row per thread, the
    device stage's ``wsi_screen.*`` ranges on the main thread) and ``out/top_ops.txt``; returns the
    ``wsi_screen.*`` ranges and the heaviest operators. Not timed: the profiler slows the run down.
    """
    import gzip

    import torch
    from torch.profiler import ProfilerActivity, profile

    from wsi_screen.pipeline import run_slide

    out.mkdir(parents=True, exist_ok=True)
    on_cuda = models.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    out_root = work / "run-profiled"
    shutil.rmtree(out_root, ignore_errors=True)
    with profile(activities=activities, record_shapes=False) as prof:
        run_slide(slide_path, out_root, settings=settings, models=models, progress=False)
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    with trace.open("rb") as src, gzip.open(str(trace) + ".gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    trace.unlink()
    sort = "self_cuda_time_total" if on_cuda else "self_cpu_time_total"
    averages = prof.key_averages()
    (out / "top_ops.txt").write_text(averages.table(sort_by=sort, row_limit=40) + "\n")

    def row(e: Any) -> dict[str, Any]:
        r = {"name": e.key, "calls": int(e.count), "cpu_total_ms": round(e.cpu_time_total / 1e3, 2)}
        r["self_cpu_ms"] = round(e.self_cpu_time_total / 1e3, 2)
        if on_cuda:
            r["device_total_ms"] = round(getattr(e, "device_time_total", 0.0) / 1e3, 2)
            r["self_device_ms"] = round(getattr(e, "self_device_time_total", 0.0) / 1e3, 2)
        return r

    ranges = [row(e) for e in averages if e.key.startswith("wsi_screen.")]
    ops = sorted(
        (e for e in averages if not e.key.startswith("wsi_screen.")),
        key=lambda e: getattr(e, "self_device_time_total", 0.0) if on_cuda else e.self_cpu_time_total,
        reverse=True,
    )
    return {
        "trace": str(trace) + ".gz",
        "activities": [a.name for a in activities],
        "ranges": sorted(ranges, key=lambda r: r["cpu_total_ms"], reverse=True),
        "top_ops": [row(e) for e in ops[:15]],
        "torch": torch.__version__,
    }


# -- 6. peer: WSInfer ----------------------------------------------------------------------------------------


def bench_peer(
    args: argparse.Namespace, slide_path: Path, models: Any, work: Path, device: Any
) -> dict[str, Any]:
    """WSInfer 0.6 with the classifier's backbone exported to TorchScript, in its own environment."""
    import torch

    peer: dict[str, Any] = {"name": "WSInfer 0.6", "status": "unavailable"}
    python = Path(args.wsinfer_python)
    if args.no_peer:
        peer["reason"] = "--no-peer"
        return peer
    if not python.is_file():
        peer["reason"] = (
            f"no WSInfer environment at {python}; create it with `bash pipelines/setup_wsinfer_peer.sh` "
            "(or pass --wsinfer-python)"
        )
        return peer
    clf = models.classifier
    bundle = clf.bundles[0]
    cfg = bundle.config
    peer_dir = work / "wsinfer"
    shutil.rmtree(peer_dir, ignore_errors=True)
    (peer_dir / "slides").mkdir(parents=True)
    os.symlink(slide_path.resolve(), peer_dir / "slides" / slide_path.name)
    model = bundle.build_model(device="cpu").eval()
    example = torch.zeros(1, 3, cfg.input_size, cfg.input_size)
    with torch.no_grad():
        scripted = torch.jit.trace(model, example, check_trace=False)  # type: ignore[no-untyped-call]
    scripted.save(str(peer_dir / "model.pt"))
    config = {
        "spec_version": "1.0",
        "architecture": cfg.architecture,
        "num_classes": len(cfg.class_names),
        "class_names": list(cfg.class_names),
        "patch_size_pixels": cfg.input_size,
        "spacing_um_px": cfg.mpp,
        "transform": [
            {"name": "ToTensor"},
            {"name": "Normalize", "arguments": {"mean": list(cfg.mean), "std": list(cfg.std)}},
        ],
    }
    (peer_dir / "config.json").write_text(json.dumps(config, indent=2))
    cmd = [
        str(python),
        str(ROOT / "pipelines" / "wsinfer_peer.py"),
        "--slides",
        str(peer_dir / "slides"),
        "--model",
        str(peer_dir / "model.pt"),
        "--config",
        str(peer_dir / "config.json"),
        "--results",
        str(peer_dir / "results"),
        "--out",
        str(peer_dir / "peer.json"),
        "--batch-size",
        str(args.peer_batch),
        "--num-workers",
        str(args.peer_workers),
        "--device",
        device.type,
    ]
    env = {**os.environ, "PYTHONNOUSERSITE": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("PYTHONPATH", None)
    peer["command"] = " ".join(shlex.quote(c) for c in cmd)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, env=env, timeout=args.peer_timeout, check=False
        )
    except subprocess.TimeoutExpired:
        peer.update(status="failed", reason=f"timed out after {args.peer_timeout} s")
        return peer
    peer["wall_s"] = round(time.perf_counter() - t0, 2)
    result_file = peer_dir / "peer.json"
    if proc.returncode != 0 or not result_file.is_file():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-6:]
        peer.update(status="failed", reason=f"exit {proc.returncode}: " + " | ".join(tail))
        return peer
    peer.update(json.loads(result_file.read_text()))
    peer["status"] = "ok"
    peer["backbone"] = cfg.architecture
    return peer


# -- report --------------------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(r: dict[str, Any]) -> str:
    hw, v = r["hardware"], r["hardware"]["versions"]
    raw = r["raw_decode"]
    gpu = f" ({hw['gpu']['name']})" if hw.get("gpu") else ", no GPU"
    models = f"{r['models']['localizer']} + {r['models']['classifier']}"
    if r["models"]["stand_in"]:
        models += f" ({' and '.join(r['models']['stand_in'])}: random-weight stand-ins)"
    lines = [
        f"Command: `{r['command']}`",
        "",
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, {hw['memory_gib']} GiB, device `{hw['device']}`{gpu}; "
        f"load average at start {hw.get('load_average')}.",
        f"Versions: Python {v['python']}, torch {v['torch']}, timm {v['timm']}, OpenSlide {v['openslide']} "
        f"(openslide-python {v['openslide_python']}), tiffslide {v['tiffslide']}, tifffile {v['tifffile']}, "
        f"imagecodecs {v['imagecodecs']} ({v['libjpeg_turbo']}), zarr {v['zarr']}.",
        f"Slide: synthetic {r['slide']['params']['size']:,}² px at {r['slide']['params']['mpp']} µm/px, "
        f"512-px JPEG tiles ({r['slide']['file_mib']} MiB); {r['grid']['kept']} of {r['grid']['tiles']} "
        f"tiles of {r['grid']['tile_size']} px (+{r['grid']['halo']} px halo) kept; "
        f"{raw['tiles']} TIFF tiles ({raw['megapixels']:.0f} MP) under their read windows. Models: {models}.",
        "",
        "| figure | value | notes |",
        "|---|---:|---|",
    ]

    def row(figure: str, value: str, note: str = "") -> None:
        lines.append(f"| {figure} | {value} | {note} |")

    row(
        f"raw JPEG decode (libjpeg-turbo, {raw['workers']} threads)",
        f"{_fmt(raw['mp_per_s'])} MP/s",
        f"{raw['tiles']} tiles, median of {len(raw['seconds_all'])}",
    )
    dd = r.get("device_decode")
    if dd:
        row(
            f"batched JPEG decode on `{dd['device']}` ({dd['decoder']}, batches of {dd['batch']})",
            f"{_fmt(dd['mp_per_s'])} MP/s",
            f"{dd['tiles']} tiles, median of {len(dd['seconds_all'])}; the pipeline's reader uses it on "
            "CUDA (`reading.jpeg_decoder`, row `direct-device`)",
        )
    for key, label in (
        ("direct", "direct TIFF path, as the pipeline reads on the CPU (decoded tiles)"),
        ("direct-device", "direct TIFF path, each window's tiles decoded in one batch on the device"),
        ("direct-windows", "direct TIFF path, threads assembling windows"),
        ("openslide", "OpenSlide"),
        ("tiffslide", "tiffslide"),
    ):
        x = r["readers"].get(key)
        if x:
            row(
                f"reader `iter_windows`, {label} ({x['workers']} threads)",
                f"{_fmt(x['mp_per_s'])} MP/s (**{x['ratio_to_raw']:.0%}** of raw)",
                f"{_fmt(x['window_mp_per_s'])} window MP/s, {_fmt(x['tiles_per_s'])} tiles/s, "
                f"{_fmt(x['decodes'])} tile decodes",
            )
    if r.get("reader_only"):
        return "\n".join(lines) + "\n"
    st, e2e, peer = r["stages"], r["end_to_end"], r["peer"]
    loc, crop, cls = st["localize"], st["crop"], st["classify"]
    asm = st["assemble"]
    row(
        f"assemble (decoded tiles → batch, device thread, batches of {asm['batch_tiles']})",
        f"{_fmt(asm['tiles_per_s'])} tiles/s",
        f"{_fmt(asm['mp_per_s'])} window MP/s; stacking assembled windows instead: "
        f"{_fmt(asm['stack_assembled_windows_s'], 3)} s vs {_fmt(asm['seconds'], 3)} s",
    )
    row(
        f"normalize (Reinhard, {st['device']})",
        f"{_fmt(st['normalize']['tiles_per_s'])} tiles/s",
        f"{_fmt(st['normalize']['mp_per_s'])} MP/s",
    )
    row(
        "localize (U-Net + candidates)",
        f"{_fmt(loc['tiles_per_s'], 2)} tiles/s",
        f"U-Net alone {_fmt(loc['unet_tiles_per_s'], 2)} tiles/s; candidates "
        f"{_fmt(loc['candidates_s'], 2)} s for {loc['candidates']} nuclei in {st['windows']} tiles "
        + (
            f"(torch, batched on {st['device']})"
            if r["settings"].get("candidate_path") == "torch"
            else f"({r['settings'].get('candidate_workers') or 'no'} candidate processes)"
        ),
    )
    row(
        "crop (ownership, outlines, cut)",
        f"{_fmt(crop['crops_per_s'])} cells/s",
        f"cutting alone {_fmt(crop['cut_only_crops_per_s'])} crops/s",
    )
    row(
        f"classify ({', '.join(cls['architecture'])}, {cls['dtype']}, batch {cls['batch']})",
        f"{_fmt(cls['crops_per_s'])} crops/s",
        f"{cls['crops']} crops",
    )
    row(
        "write (Zarr appends)",
        f"{_fmt(st['write']['cells_per_s'], 0)} cells/s",
        f"{st['write']['cells']} cells",
    )
    row(
        f"device stage as run (batches of {r['settings']['localize_batch']})",
        f"{_fmt(st['device_stage']['tiles_per_s'], 2)} tiles/s",
        f"{_fmt(st['device_stage']['cells_per_s'])} cells/s",
    )
    for extra in r.get("classifier_arch", []):
        row(
            f"classify {extra['architecture']} (random weights, {extra['dtype']}, batch {extra['batch']})",
            f"{_fmt(extra['crops_per_s'])} crops/s",
            f"{extra['crops']} crops",
        )
    idle = e2e["idle"]
    row(
        "**end to end** `run_slide`",
        f"{_fmt(e2e['seconds'], 2)} s",
        f"{_fmt(e2e['tiles_seconds'], 2)} s in the tile loop; {e2e['cells']:,} cells",
    )
    row("cells/s · slides/hour", f"{_fmt(e2e['cells_per_s'])} · {_fmt(e2e['slides_per_hour'])}", "this slide")
    row(
        "end to end vs raw decode",
        f"{_fmt(e2e['mp_per_s'])} MP/s ({e2e['ratio_to_raw']:.1%})",
        "slide MP / total s",
    )
    row(
        "idle: device waiting for readers",
        f"{idle['device_waiting_for_reader']:.1%}",
        f"reader threads idle {idle['reader_threads']:.1%}, writer idle {idle['writer']:.1%}, "
        f"device blocked by writer {idle['device_blocked_by_writer_s']} s",
    )
    prof = r.get("profile")
    if prof:
        unit = "self_device_ms" if "CUDA" in prof["activities"] else "self_cpu_ms"
        parts = ", ".join(
            f"{x['name'].removeprefix('wsi_screen.')} {x['cpu_total_ms']:.0f}" for x in prof["ranges"]
        )
        heavy = ", ".join(f"`{x['name']}` {x[unit]:.0f}" for x in prof["top_ops"][:5])
        row(
            "torch.profiler (one more run, not timed)",
            f"ranges (ms, CPU total): {parts or 'none'}",
            f"heaviest operators ({unit}): {heavy}; `{prof['trace']}`",
        )
    if peer.get("status") == "ok":
        row(
            f"peer: WSInfer {peer.get('wsinfer_version')} ({peer.get('backbone')}, {peer.get('device')})",
            f"{_fmt(peer['patches_per_s'])} patches/s",
            f"{_fmt(peer['mp_per_s'])} MP/s; {peer['patches']} patches of {peer['patch_px']}²; "
            f"patching {_fmt(peer['patching_s'], 2)} s, inference {_fmt(peer['inference_s'], 2)} s",
        )
    else:
        row("peer: WSInfer 0.6", str(peer.get("status")), str(peer.get("reason", "")).replace("|", "/"))
    return "\n".join(lines) + "\n"


# -- main ----------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=20_000, help="slide side in px (default 20,000)")
    p.add_argument("--mpp", type=float, default=0.25, help="slide µm/px (default 0.25)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=Path("bench"), help="output folder (slide, JSON, markdown)")
    p.add_argument("--quick", action="store_true", help="CI: a 3072² slide, one repeat, every part")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--workers", type=int, default=0, help="reader/decode threads (0 = all cores)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per micro-benchmark (median)")
    p.add_argument(
        "--stage-windows", type=int, default=8, help="windows for the stage micro-benchmarks (≥ one batch)"
    )
    p.add_argument("--min-crops", type=int, default=512, help="crops for the classify/cut micro-benchmarks")
    p.add_argument("--write-cells", type=int, default=50_000, help="cells for the write micro-benchmark")
    p.add_argument("--localizer", help="localization bundle (default: the settings')")
    p.add_argument("--classifier", help="classification bundle (default: the settings')")
    p.add_argument(
        "--stand-in-models", action="store_true", help="random-weight bundles instead of shipped ones"
    )
    p.add_argument(
        "--classifier-arch",
        action="append",
        default=None,
        help="also time this timm architecture as classifier (random weights), e.g. resnet50; repeatable",
    )
    p.add_argument(
        "--stand-in-arch",
        default="mobilenetv3_small_100",
        help="architecture of a stand-in classifier (the training default)",
    )
    p.add_argument(
        "--arch-crops",
        type=int,
        default=0,
        help="crops per --classifier-arch pass (0: 8192 on CUDA, else 64)",
    )
    p.add_argument("--classify-batch", type=int, default=0, help="classifier batch (0 = settings')")
    p.add_argument("--localize-batch", type=int, default=0, help="tiles per device batch (0 = settings')")
    p.add_argument(
        "--candidates",
        choices=["auto", "cpu", "torch"],
        help="candidate extraction path (localization.candidates; default: the settings')",
    )
    p.add_argument("--variants", action="store_true", help="also time layout/bf16/torch.compile variants")
    p.add_argument("--no-report", action="store_true", help="skip report.html in the end-to-end run")
    p.add_argument(
        "--backends",
        default="direct,direct-windows,openslide,tiffslide",
        help="reader variants to time (direct: as the pipeline reads on the CPU; direct-device: the same "
        "with each window's tiles decoded in one batch on --device, added on CUDA; direct-windows: "
        "threads paste windows)",
    )
    p.add_argument(
        "--reader-only", action="store_true", help="only the raw decode and the readers (steps 1-3)"
    )
    p.add_argument("--no-peer", action="store_true", help="skip WSInfer")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also run run_slide once under torch.profiler: OUT/profile/trace.json.gz and top_ops.txt",
    )
    p.add_argument("--wsinfer-python", default=str(DEFAULT_WSINFER_PYTHON), help="python of the WSInfer venv")
    p.add_argument(
        "--peer-size", type=int, default=0, help="peer on a slide of this side (0 = the same slide)"
    )
    p.add_argument("--peer-batch", type=int, default=32)
    p.add_argument("--peer-workers", type=int, default=0, help="WSInfer DataLoader workers (0 = all cores)")
    p.add_argument("--peer-timeout", type=int, default=3600)
    args = p.parse_args(argv)
    if args.quick:
        if "--size" not in (argv if argv is not None else sys.argv[1:]):
            args.size = 3072
        args.repeats = 1
        args.stage_windows = min(args.stage_windows, 4)
        args.min_crops = min(args.min_crops, 64)
        args.write_cells = min(args.write_cells, 2000)
        args.peer_timeout = min(args.peer_timeout, 600)
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    import torch

    from wsi_screen.jpeg_decode import resolve_jpeg_device
    from wsi_screen.pipeline import load_models
    from wsi_screen.reader import band_columns, cache_order
    from wsi_screen.runtime import configure_torch, cpu_count, limit_heap_growth, resolve_device
    from wsi_screen.slide import DEFAULT_CACHE_BYTES, open_slide
    from wsi_screen.tiling import make_grid
    from wsi_screen.tissue import slide_cell_regions

    argv_list = list(argv) if argv is not None else sys.argv[1:]
    command = "python pipelines/benchmark.py " + " ".join(shlex.quote(a) for a in argv_list)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    workers = args.workers or cpu_count()
    heap_tuning = limit_heap_growth()  # as run_slide and batch runs (load_models), before any timing
    configure_torch(threads=0)
    device = resolve_device(args.device)
    t_start = time.perf_counter()
    report: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "command": command, "quick": bool(args.quick)}
    report["hardware"] = hardware(device)
    if device.type != "cuda":
        report["gpu_note"] = (
            "no GPU on this machine: GPU figures could not be measured. Goals on an H100: classifier "
            "≥ 10,000 crops/s (ResNet50, bf16), U-Net ≥ 1,000 tiles/s, ≥ 600 slides/hour for a "
            "5-gigapixel slide; run `python pipelines/benchmark.py --device cuda --classifier-arch resnet50` "
            "there."
        )
    print(f"[benchmark] slide {args.size}² at {args.mpp} µm/px", flush=True)
    slide_path, slide_info = make_slide(out, args.size, args.mpp, args.seed)
    report["slide"] = slide_info

    settings, model_note = resolve_models(args, work)
    report["models"] = model_note
    models = load_models(settings, device=device)
    with open_slide(slide_path, backend=settings.slide.backend) as slide:
        regions = slide_cell_regions(slide, settings.tissue, workers=settings.reading.threads)
        grid = make_grid(
            slide.dimensions,
            slide_mpp=slide.mpp,
            mpp=models.classifier.mpp,
            tile_size=settings.tiling.tile_size_px,
            halo_um=settings.tiling.halo_um,
            mask=regions.mask,
            mask_mpp=regions.mpp,
            min_tissue_fraction=settings.tiling.min_tissue_fraction,
        )
        level = slide.best_level(grid.mpp)
    tiles = list(grid.tiles(kept_only=True))
    report["grid"] = {
        "tiles": grid.n_tiles,
        "kept": len(tiles),
        "tile_size": grid.tile_size,
        "halo": grid.halo,
        "read_size": grid.read_size,
        "mpp": grid.mpp,
        "level": level,
    }
    report["settings"] = {
        "reader_workers": workers,
        "queue_tiles": settings.reading.queue_tiles,
        "localize_batch": settings.localization.batch_size,
        "candidate_workers": models.localizer.candidate_workers,
        "candidate_path": models.localizer.candidate_path,
        "jpeg_decoder": str(
            resolve_jpeg_device(settings.reading.jpeg_decoder, device) or "cpu (reader threads)"
        ),
        "classify_batch": settings.classification.batch_size,
        "heap_tuning": heap_tuning,
    }

    print(f"[benchmark] raw decode of the tissue tiles ({len(tiles)} windows)", flush=True)
    page, indices = tissue_tiff_tiles(slide_path, tiles, level)
    raw = bench_raw_decode(slide_path, page, indices, workers, max(args.repeats, 3))
    report["raw_decode"] = raw
    slide_mp = raw["megapixels"]
    print(f"[benchmark] batched decode on {device} (torchvision)", flush=True)
    report["device_decode"] = bench_device_decode(slide_path, level, indices, device, max(args.repeats, 3))

    # The readers take the tiles in the pipeline's order: cache-sized bands on a wide slide.
    read_order = cache_order(tiles, band_cols=band_columns(grid, DEFAULT_CACHE_BYTES))
    readers: dict[str, Any] = {}
    variants = [v.strip() for v in args.backends.split(",") if v.strip()]
    if device.type == "cuda" and "direct-device" not in variants:
        variants.insert(1, "direct-device")  # the pipeline's reader with nvJPEG (reading.jpeg_decoder)
    for variant in variants:
        direct = variant in ("direct", "direct-windows", "direct-device")
        backend = settings.slide.backend if direct else variant
        print(f"[benchmark] reader: {variant}", flush=True)
        readers[variant] = bench_reader(
            slide_path,
            read_order,
            mpp=grid.mpp,
            workers=workers,
            prefetch=settings.reading.queue_tiles,
            backend=backend,
            direct=direct,
            assemble=variant != "direct",
            repeats=args.repeats,
            slide_mp=slide_mp,
            raw_mp_per_s=raw["mp_per_s"],
            jpeg_device=device if variant == "direct-device" else None,
        )
    report["readers"] = readers
    report["reader"] = readers.get("direct") or next(iter(readers.values()))
    if args.reader_only:
        report["reader_only"] = True
        report["benchmark_s"] = round(time.perf_counter() - t_start, 1)
        (out / "benchmark.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
        (out / "benchmark.md").write_text(markdown(report))
        print((out / "benchmark.md").read_text())
        return report

    print("[benchmark] stages in isolation", flush=True)
    report["stages"] = bench_stages(
        slide_path,
        settings,
        models,
        grid,
        tiles,
        n_windows=max(args.stage_windows, settings.localization.batch_size),  # at least one full batch
        repeats=args.repeats,
        min_crops=args.min_crops,
        write_cells=args.write_cells,
        work=work,
        reader_figures=report["reader"],
    )
    extra_archs = list(args.classifier_arch or [])
    report["classifier_arch"] = []
    for arch in extra_archs:
        print(f"[benchmark] classifier architecture {arch}", flush=True)
        n = args.arch_crops or (8192 if device.type == "cuda" and not args.quick else 64)
        batch = args.classify_batch or (512 if device.type == "cuda" else 64)
        report["classifier_arch"].append(
            bench_classifier_arch(
                arch, device, input_size=models.classifier.input_size, batch=batch, n=n, repeats=args.repeats
            )
        )

    if args.variants:
        print("[benchmark] execution variants (layout, bf16, torch.compile)", flush=True)
        report["variants"] = bench_variants(models, grid, repeats=args.repeats, crops=args.min_crops)

    print("[benchmark] end to end (run_slide)", flush=True)
    report["end_to_end"] = bench_end_to_end(
        slide_path, settings, models, work, slide_mp=slide_mp, raw_mp_per_s=raw["mp_per_s"]
    )

    if args.profile:
        print("[benchmark] end to end once more under torch.profiler", flush=True)
        report["profile"] = profile_end_to_end(slide_path, settings, models, work, out / "profile")

    print("[benchmark] peer (WSInfer)", flush=True)
    peer_slide = slide_path
    if args.peer_size and args.peer_size != args.size:
        peer_slide, _ = make_slide(out, args.peer_size, args.mpp, args.seed)
    report["peer"] = bench_peer(args, peer_slide, models, work, device)
    report["peer"]["slide_px"] = args.peer_size or args.size
    report["benchmark_s"] = round(time.perf_counter() - t_start, 1)
    report["torch_threads"] = torch.get_num_threads()

    check(report)
    (out / "benchmark.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "benchmark.md").write_text(markdown(report))
    print((out / "benchmark.md").read_text())
    return report


def check(report: dict[str, Any]) -> None:
    """Every required figure is there (the harness's own correctness, not the figures' values)."""
    missing = []
    for section, keys in REQUIRED.items():
        if section not in report:
            missing.append(section)
            continue
        missing += [f"{section}.{k}" for k in keys if k not in report[section]]
    if missing:
        raise SystemExit(f"benchmark is missing figures: {', '.join(missing)}")


if __name__ == "__main__":
    main()
