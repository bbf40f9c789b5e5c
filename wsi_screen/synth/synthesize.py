"""One call from arguments to a synthetic slide + its ground truth (used by ``wsi-screen synth``)."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from wsi_screen.synth.cells import CellSpec
from wsi_screen.synth.layout import PREPARATIONS, Layout, Preparation, make_layout, random_layout
from wsi_screen.synth.stain import StainProfile
from wsi_screen.synth.truth import SlideTruth, TruthObject, truth_path_for
from wsi_screen.synth.writer import SlideFormat, write_slide

__all__ = ["SynthResult", "layout_truth", "synthesize_slide"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SynthResult:
    """What :func:`synthesize_slide` produced."""

    path: Path
    truth_path: Path | None
    layout: Layout = field(repr=False)
    truth: SlideTruth = field(repr=False)
    counts: dict[str, int]
    kind_counts: dict[str, int]
    level_dimensions: tuple[tuple[int, int], ...]
    timings: dict[str, float]


def layout_truth(layout: Layout, slide_name: str = "") -> SlideTruth:
    """The exact ground truth of ``layout`` (object ids = positions in ``layout.cells``)."""
    return SlideTruth(
        slide=slide_name,
        width=layout.width,
        height=layout.height,
        mpp=layout.mpp,
        seed=layout.seed,
        preparation=layout.preparation,
        stain=layout.stain.name,
        spot=layout.spot,
        objects=tuple(TruthObject.from_geometry(i, g, layout.mpp) for i, g in enumerate(layout.geometries)),
    )


def synthesize_slide(
    path: str | os.PathLike[str],
    *,
    size: Sequence[int] = (4096, 4096),
    mpp: float = 0.25,
    seed: int = 0,
    abnormal: Mapping[str, float] | str | None = None,
    preparation: str = "lbc",
    stain: str | StainProfile = "default",
    fmt: str | None = None,
    tile_size: int = 512,
    quality: int = 90,
    blur_fraction: float = 0.05,
    density_per_mm2: float | None = None,
    spot: bool | None = None,
    cells: Iterable[CellSpec] | None = None,
    level_factor: int = 4,
    workers: int | None = None,
    write_truth: bool = True,
) -> SynthResult:
    """Draw a synthetic cervical-cytology slide and write it with its ground truth.

    Args:
        path: output slide (``.tiff``/``.tif``, or ``.svs`` for the Aperio flavour).
        size: (width, height) in level-0 px; ``mpp``: µm per px.
        seed: fixes layout, shapes, textures, stain jitter (same arguments → same bytes).
        abnormal: exact counts or fractions per class, e.g. ``{"HSIL": 5}`` or ``"HSIL=5,LSIL=3"``.
        preparation: ``"lbc"`` or ``"conventional"``; ``spot``: confine LBC to a circle.
        stain: profile name (``default``, ``pale``, ``dark``, ``blue``, ``pink``, ``scanner_b``).
        fmt: ``"tiff"`` or ``"svs"`` (default from the suffix).
        tile_size, quality, level_factor: tiling, JPEG quality and pyramid step.
        blur_fraction: about this fraction of objects lies in out-of-focus regions.
        density_per_mm2: squamous cells per mm² (default depends on ``preparation``).
        cells: an explicit layout instead of a random one (``abnormal``, ``density_per_mm2``,
            ``blur_fraction`` and ``spot`` are then ignored).
        workers: render processes (default: all CPUs for large slides).
        write_truth: also write ``<stem>.truth.json`` beside the slide.
    """
    t0 = time.perf_counter()
    out = Path(path)
    if preparation not in PREPARATIONS:
        raise ValueError(f"unknown preparation {preparation!r}; choose one of: {', '.join(PREPARATIONS)}")
    prep = cast(Preparation, preparation)
    if fmt is not None and fmt not in ("tiff", "svs"):
        raise ValueError(f"fmt must be 'tiff' or 'svs', got {fmt!r}")
    slide_fmt = cast("SlideFormat | None", fmt)
    if cells is not None:
        layout = make_layout(size, cells, mpp=mpp, seed=seed, stain=stain, preparation=prep)
    else:
        layout = random_layout(
            size,
            mpp=mpp,
            seed=seed,
            abnormal=abnormal,
            density_per_mm2=density_per_mm2,
            preparation=prep,
            spot=spot,
            stain=stain,
            blur_fraction=blur_fraction,
        )
    t1 = time.perf_counter()
    _ = layout.geometries  # computed once here; pickled to the workers with the layout
    t2 = time.perf_counter()
    stats = write_slide(
        layout,
        out,
        fmt=slide_fmt,
        tile_size=tile_size,
        quality=quality,
        level_factor=level_factor,
        workers=workers,
    )
    t3 = time.perf_counter()
    truth = layout_truth(layout, out.name)
    truth_path = truth.write(truth_path_for(out)) if write_truth else None
    t4 = time.perf_counter()
    timings = {"layout_s": t1 - t0, "geometry_s": t2 - t1, **stats.timings, "truth_s": t4 - t3}
    timings["total_s"] = t4 - t0
    counts = layout.class_counts()
    logger.info("synthesized %s: %s in %.1f s", out.name, counts, timings["total_s"])
    return SynthResult(
        path=out,
        truth_path=truth_path,
        layout=layout,
        truth=truth,
        counts=counts,
        kind_counts=layout.kind_counts(),
        level_dimensions=stats.level_dimensions,
        timings=timings,
    )
