"""Screen one slide: prepare it, run the tile loop, then (for :func:`run_slide`) write its outputs.

Stages and threads::

    prepare_slide                 tile loop (wsi_screen.tile_loop)                        outputs
    cell regions, tile grid,      reader threads ──► device stage ──► writer thread       summary, GeoJSON,
    stain statistics              (read_region)      (device_stage)   (cell_writer)       report, run.json
                                                                                          (slide_outputs)

:func:`screen_open_slide` holds the screening of an open slide (prepare, tile loop, summary) and
writes nothing unless given a ``cells.zarr`` path; :func:`run_slide` adds the outputs, written into a
temporary sibling directory that is renamed to ``OUT/<slide-id>`` only when complete
(:mod:`wsi_screen.output_layout`), so a crash never leaves a half result that looks finished.
Memory is bounded by the queue sizes (``reading.queue_tiles``, the device batch and the writer
queue) and the cell table, not by the slide's pixels.

The names of the stage modules are re-exported here for callers of the earlier single module.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_screen.cells import CellTable
from wsi_screen.config import Settings
from wsi_screen.device_stage import DARK_FILL_RGB, BatchResult, TileProcessor, assemble_batch
from wsi_screen.errors import CorruptSlideError
from wsi_screen.jpeg_decode import decoder_name, resolve_jpeg_device
from wsi_screen.models.loaded import (
    FALLBACK_FLAG_SCORE,
    ClassSpec,
    Models,
    load_models,
    resolve_flag_threshold,
)
from wsi_screen.slide import Slide, open_slide
from wsi_screen.slide_stain import SlideStain, estimate_source, estimate_source_stats, slide_stain
from wsi_screen.tile_loop import ProgressCallback, TileLoopResult
from wsi_screen.tiling import TileGrid, make_grid

if TYPE_CHECKING:
    from wsi_screen.stain import ReinhardStats
    from wsi_screen.tissue import CellRegions

__all__ = [
    "DARK_FILL_RGB",
    "FALLBACK_FLAG_SCORE",
    "BatchResult",
    "ClassSpec",
    "Models",
    "PreparedSlide",
    "Screened",
    "SlideResult",
    "SlideStain",
    "TileProcessor",
    "assemble_batch",
    "cell_regions_and_grid",
    "estimate_source",
    "estimate_source_stats",
    "load_models",
    "prepare_slide",
    "resolve_flag_threshold",
    "run_slide",
    "screen_open_slide",
    "slide_id_for",
    "slide_stain",
]

logger = logging.getLogger(__name__)

_SLIDE_ID_BAD = re.compile(r"[^A-Za-z0-9._-]+")


def slide_id_for(path: str | os.PathLike[str]) -> str:
    """A safe folder name for a slide: its file stem with anything but ``[A-Za-z0-9._-]`` replaced.

    Never empty, never starts with a dot, never contains a path separator, at most 96 characters.
    """
    p = Path(path)
    stem = p.name if p.is_dir() else p.stem
    if stem.lower().endswith((".ome",)):
        stem = stem[:-4]
    text = _SLIDE_ID_BAD.sub("_", stem).strip("._-")[:96]
    return text or "slide"


# -- prepare ----------------------------------------------------------------------------------------


@dataclass
class PreparedSlide:
    """An open slide made ready for the tile loop: its cell regions, tile grid and stain."""

    slide: Slide
    regions: CellRegions
    grid: TileGrid
    stain: SlideStain
    fingerprint: str

    def info(self) -> dict[str, Any]:
        """The ``slide`` record of ``cells.zarr``, ``summary.json`` and ``run.json``."""
        slide = self.slide
        return {
            "path": str(slide.path.resolve()),
            "name": slide.path.name,
            "fingerprint": self.fingerprint,
            "dimensions": list(slide.dimensions),
            "mpp": slide.mpp,
            "mpp_source": slide.info.mpp_source,
            "vendor": slide.vendor,
            "objective_power": slide.objective_power,
            "backend": slide.backend,
        }


def cell_regions_and_grid(
    slide: Slide, settings: Settings, *, grid_mpp: float
) -> tuple[CellRegions, TileGrid]:
    """The slide's cell regions (``tissue``) and its tile grid at ``grid_mpp`` over them (``tiling``)."""
    from wsi_screen.tissue import slide_cell_regions

    regions = slide_cell_regions(slide, settings.tissue, workers=settings.reading.threads)
    grid = make_grid(
        slide.dimensions,
        slide_mpp=slide.mpp,
        mpp=grid_mpp,
        tile_size=settings.tiling.tile_size_px,
        halo_um=settings.tiling.halo_um,
        mask=regions.mask,
        mask_mpp=regions.mpp,
        min_tissue_fraction=settings.tiling.min_tissue_fraction,
    )
    return regions, grid


def prepare_slide(
    slide: Slide,
    settings: Settings,
    *,
    grid_mpp: float,
    target: ReinhardStats | None,
    localizer_target: ReinhardStats | None,
    fingerprint: str | None = None,
    timings: dict[str, Any] | None = None,
) -> PreparedSlide:
    """Cell regions (``tissue``), the tile grid at ``grid_mpp`` (``tiling``) and the slide's Reinhard
    source statistics towards each model's target (``stain``, :func:`slide_stain`).

    ``fingerprint``: the slide's, when already computed (:meth:`Slide.fingerprint`); ``timings``:
    when given, gets ``cell_regions`` and ``stain_stats`` (seconds).
    """
    fingerprint = fingerprint or slide.fingerprint()
    t0 = time.perf_counter()
    regions, grid = cell_regions_and_grid(slide, settings, grid_mpp=grid_mpp)
    t1 = time.perf_counter()
    stain = slide_stain(
        slide, grid, settings=settings.stain, target=target, localizer_target=localizer_target
    )
    if timings is not None:
        timings["cell_regions"] = t1 - t0
        timings["stain_stats"] = time.perf_counter() - t1
    return PreparedSlide(slide=slide, regions=regions, grid=grid, stain=stain, fingerprint=fingerprint)


# -- screen an open slide -----------------------------------------------------------------------------


@dataclass
class Screened:
    """One open slide screened (:func:`screen_open_slide`): its cells, summary and records."""

    slide_id: str
    prepared: PreparedSlide
    models: Models
    settings: Settings
    loop: TileLoopResult
    summary: dict[str, Any]
    #: The root attributes of ``cells.zarr`` (models, µm/px, slide, config, stain).
    attrs: dict[str, Any]
    tiles_unreadable: int
    tiles_out_of_focus: int
    versions: dict[str, str]
    timings: dict[str, Any] = field(default_factory=dict)
    started: datetime = field(default_factory=lambda: datetime.now(timezone.utc))

    @property
    def cells(self) -> CellTable:
        return self.loop.cells


def screen_open_slide(
    slide: Slide,
    *,
    settings: Settings,
    models: Models,
    slide_id: str,
    store_path: Path | None = None,
    progress: bool = False,
    on_tile: ProgressCallback | None = None,
    fingerprint: str | None = None,
    timings: dict[str, Any] | None = None,
) -> Screened:
    """Prepare ``slide``, screen every kept tile and summarize it; nothing is written unless
    ``store_path`` names the ``cells.zarr`` to write.

    ``settings`` must have a resolved ``output.flag_min_score`` (:func:`resolve_flag_threshold`).
    ``fingerprint``: the slide's, when already computed; ``timings``: the seconds measured so far
    (``load_models``, ``open``), continued here.
    """
    from wsi_screen.localize import CoverageResolver
    from wsi_screen.store import TILE_UNREADABLE
    from wsi_screen.summary import summarize
    from wsi_screen.tile_loop import run_tiles

    started = datetime.now(timezone.utc)
    timings = dict(timings or {})
    jpeg_device = resolve_jpeg_device(settings.reading.jpeg_decoder, models.device)
    if jpeg_device is not None and slide.jpeg_device != jpeg_device:
        logger.info(
            "%s: JPEG tiles decoded on %s (%s)", slide.path.name, jpeg_device, decoder_name(jpeg_device)
        )
    slide.set_jpeg_device(jpeg_device)
    prepared = prepare_slide(
        slide,
        settings,
        grid_mpp=models.grid_mpp,
        target=models.stain_target,
        localizer_target=models.localizer_stain_target,
        fingerprint=fingerprint,
        timings=timings,
    )
    grid, stain = prepared.grid, prepared.stain
    spec = models.class_spec
    processor = TileProcessor(
        localizer=models.localizer,
        classifier=models.classifier,
        grid=grid,
        source=stain.source,
        target=stain.target,
        localizer_target=stain.localizer_target,
        fill_dark=settings.stain.fill_dark_regions,
        crop_size=models.crop_size,
        device=models.device,
        coverage=CoverageResolver(grid),
    )
    slide_info = prepared.info()
    attrs = {
        "models": models.describe(),
        "mpp": grid.mpp,
        "slide": slide_info,
        "config": settings.to_dict(),
        "stain": stain.to_dict(),
    }
    loop = run_tiles(
        slide,
        grid,
        processor,
        settings=settings,
        class_names=spec.names,
        abnormal_classes=spec.abnormal,
        store_path=store_path,
        attrs=attrs,
        progress=progress,
        on_tile=on_tile,
    )
    timings.update(loop.stage.pop("timings"))
    n_processed = grid.n_kept
    n_unreadable = int((loop.status == TILE_UNREADABLE).sum())
    if n_processed and n_unreadable / n_processed > settings.reading.max_unreadable_fraction:
        raise CorruptSlideError(
            f"{slide.path.name}: {n_unreadable} of {n_processed} tiles could not be decoded "
            f"(limit {settings.reading.max_unreadable_fraction:.0%}, reading.max_unreadable_fraction)"
        )
    focus = np.asarray(loop.focus, np.float32)
    out_of_focus = int(np.sum(focus[np.isfinite(focus)] < settings.triage.min_focus))
    versions = _versions()
    summary = summarize(
        loop.cells,
        class_names=spec.names,
        abnormal_classes=spec.abnormal,
        settings=settings,
        cellular_area_mm2=prepared.regions.area_um2 / 1e6,
        tiles_total=n_processed,
        tiles_unreadable=n_unreadable,
        tiles_out_of_focus=out_of_focus,
        timings={k: round(float(v), 4) for k, v in timings.items()},
        versions={**versions, "models": models.describe()},
        extra={"slide_id": slide_id, "slide": slide_info},
        stain_check=stain.check,
    )
    return Screened(
        slide_id=slide_id,
        prepared=prepared,
        models=models,
        settings=settings,
        loop=loop,
        summary=summary,
        attrs=attrs,
        tiles_unreadable=n_unreadable,
        tiles_out_of_focus=out_of_focus,
        versions=versions,
        timings=timings,
        started=started,
    )


def _versions() -> dict[str, str]:
    import importlib.metadata as md
    import platform

    from wsi_screen import __version__

    out = {"wsi_screen": __version__, "python": platform.python_version()}
    for pkg in (
        "torch",
        "timm",
        "segmentation-models-pytorch",
        "openslide-python",
        "openslide-bin",
        "tiffslide",
        "zarr",
        "numpy",
        "scikit-image",
    ):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


# -- one slide, with its outputs ------------------------------------------------------------------------


@dataclass
class SlideResult:
    """The outcome of :func:`run_slide`."""

    slide_id: str
    out_dir: Path
    summary: dict[str, Any]
    n_cells: int
    timings: dict[str, Any]

    def triage_line(self) -> str:
        """One line for the terminal: triage, category, score, cells."""
        s = self.summary
        triage = str(s.get("triage", "?")).upper()
        return (
            f"{self.slide_id}: {triage} — suggested {s.get('suggested_category')}, "
            f"score {float(s.get('score') or 0.0):.3f}, {self.n_cells:,} cells"
        )


def run_slide(
    slide_path: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    *,
    settings: Settings,
    models: Models | None = None,
    slide_id: str | None = None,
    progress: bool = True,
    arguments: Mapping[str, Any] | None = None,
    on_tile: ProgressCallback | None = None,
) -> SlideResult:
    """Screen one slide and write ``OUT/<slide-id>/`` atomically.

    Args:
        slide_path: the slide (or DICOM series folder).
        out_root: the output root ``OUT``.
        settings: resolved settings.
        models: loaded models (loaded from ``settings`` when None; pass them to reuse across slides).
        slide_id: folder name (default: :func:`slide_id_for`).
        progress: show a progress bar (or log lines when not on a terminal).
        arguments: the command-line arguments, recorded in ``run.json``.
        on_tile: called with (tiles done, tiles total) after each batch.
    """
    result, _ = screen_and_write(
        slide_path,
        out_root,
        settings=settings,
        models=models,
        slide_id=slide_id,
        progress=progress,
        arguments=arguments,
        on_tile=on_tile,
    )
    if result is None:  # screen_and_write writes whenever it is given an output root
        raise RuntimeError("run_slide: no result folder was written")
    return result


def screen_and_write(
    slide_path: str | os.PathLike[str],
    out_root: str | os.PathLike[str] | None,
    *,
    settings: Settings,
    models: Models | None = None,
    slide_id: str | None = None,
    progress: bool = True,
    arguments: Mapping[str, Any] | None = None,
    on_tile: ProgressCallback | None = None,
) -> tuple[SlideResult | None, Screened]:
    """:func:`screen_open_slide` on the slide at ``slide_path``; with ``out_root``, its outputs
    written and published as :func:`run_slide` does (without, nothing is written)."""
    from wsi_screen.output_layout import CELLS, atomic_dir, publish
    from wsi_screen.slide_outputs import write_slide_outputs

    t_start = time.perf_counter()
    timings: dict[str, Any] = {}
    sid = slide_id or slide_id_for(slide_path)
    if models is None:
        t0 = time.perf_counter()
        models = load_models(settings)
        timings["load_models"] = time.perf_counter() - t0
    settings = resolve_flag_threshold(settings, models.classifier)

    t0 = time.perf_counter()
    slide = open_slide(slide_path, backend=settings.slide.backend, mpp=settings.slide.mpp)
    tmp = None if out_root is None else atomic_dir(Path(out_root), sid)
    try:
        with slide:
            fingerprint = slide.fingerprint()
            timings["open"] = time.perf_counter() - t0
            screened = screen_open_slide(
                slide,
                settings=settings,
                models=models,
                slide_id=sid,
                store_path=None if tmp is None else tmp / CELLS,
                progress=progress,
                on_tile=on_tile,
                fingerprint=fingerprint,
                timings=timings,
            )
            if tmp is None:
                screened.timings["total"] = time.perf_counter() - t_start
                return None, screened
            run_info = write_slide_outputs(tmp, screened, arguments=arguments, t_start=t_start)
        final = tmp.parent / sid
        publish(tmp, final)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = SlideResult(
        slide_id=sid,
        out_dir=final,
        summary=screened.summary,
        n_cells=len(screened.cells),
        timings=run_info["timings"],
    )
    logger.info("%s in %.1f s", result.triage_line(), screened.timings["total"])
    return result, screened
