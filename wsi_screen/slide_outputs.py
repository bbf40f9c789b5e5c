"""The outputs of one screened slide: ``qc_regions.png``, ``summary.json``, ``flagged.geojson``,
``report.html`` and ``run.json`` (docs/outputs.md), written into a result folder."""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen import __version__
from wsi_screen.output_layout import FLAGGED, QC_REGIONS, REPORT, RUN, SUMMARY

if TYPE_CHECKING:
    from wsi_screen.pipeline import Screened

__all__ = ["write_slide_outputs"]


def write_slide_outputs(
    folder: Path,
    screened: Screened,
    *,
    arguments: Mapping[str, Any] | None = None,
    t_start: float | None = None,
) -> dict[str, Any]:
    """Write every output of ``screened`` (its slide still open, for the report's crops) into
    ``folder``; returns the ``run.json`` record. ``arguments``: the command line, recorded in
    ``run.json``; ``t_start``: ``time.perf_counter()`` when the slide's screening began."""
    import platform

    import torch

    from wsi_screen.geojson import select_cells, write_geojson
    from wsi_screen.jsonio import write_json
    from wsi_screen.report import build_report, write_report
    from wsi_screen.runtime import cpu_model
    from wsi_screen.summary import write_summary
    from wsi_screen.tissue import qc_thumbnail_png

    t0 = time.perf_counter()
    prepared, settings, models = screened.prepared, screened.settings, screened.models
    slide, regions, grid = prepared.slide, prepared.regions, prepared.grid
    cells, summary, spec = screened.cells, screened.summary, models.class_spec
    slide_info = screened.attrs["slide"]
    (folder / QC_REGIONS).write_bytes(qc_thumbnail_png(regions))
    write_summary(folder / SUMMARY, summary)
    flagged = select_cells(
        cells,
        class_names=spec.names,
        abnormal_classes=spec.abnormal,
        min_score=float(settings.output.flag_min_score or 0.0),
        classes=settings.output.flag_classes or None,
        max_cells=settings.output.flag_max_cells or None,
    )
    write_geojson(
        folder / FLAGGED,
        cells,
        class_names=spec.names,
        abnormal_classes=spec.abnormal,
        slide_id=prepared.fingerprint,
        index=flagged,
        object_type=settings.output.object_type,
        bounds=slide.dimensions,
        slide_mpp=slide.mpp,
        gzip=settings.output.geojson_gzip,
        metadata={"slide": slide_info["name"], "slide_id": screened.slide_id},
    )
    if settings.output.report:

        def read_crop(x: float, y: float, size: int) -> NDArray[np.uint8]:
            side_um = size * slide.mpp
            out_px = max(32, min(256, round(side_um / max(grid.mpp, slide.mpp))))
            m = side_um / out_px
            return slide.read_region((x - size / 2, y - size / 2), (out_px, out_px), mpp=m)

        html = build_report(
            summary=summary,
            cells=cells,
            class_names=spec.names,
            thumbnail=regions.thumbnail,
            thumbnail_mpp=regions.mpp,
            slide_mpp=slide.mpp,
            read_crop=read_crop,
            title=slide.path.name,
            crop_um=settings.output.report_crop_um,
            heatmap_um=settings.output.report_heatmap_um,
            max_gallery=settings.output.top_n,
        )
        write_report(folder / REPORT, html)
    timings = screened.timings
    timings["outputs"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - (t0 if t_start is None else t_start)
    loop = screened.loop
    run_info: dict[str, Any] = {
        "wsi_screen_version": __version__,
        "slide_id": screened.slide_id,
        "slide": slide_info,
        "arguments": dict(arguments or {}),
        "config": settings.to_dict(),
        "versions": screened.versions,
        "models": models.describe(),
        "device": str(models.device),
        "torch_threads": torch.get_num_threads(),
        "grid": grid.to_dict(),
        "cell_regions": regions.summary(),
        "stain": screened.attrs["stain"],
        "n_cells": len(cells),
        "tiles": {
            "total": grid.n_tiles,
            "processed": grid.n_kept,
            "unreadable": screened.tiles_unreadable,
            "out_of_focus": screened.tiles_out_of_focus,
        },
        "timings": {k: round(float(v), 4) for k, v in timings.items()},
        "stages": loop.stage,
        "started": screened.started.isoformat(),
        "finished": datetime.now(timezone.utc).isoformat(),
        "host": {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count()},
    }
    write_json(folder / RUN, run_info)
    return run_info
