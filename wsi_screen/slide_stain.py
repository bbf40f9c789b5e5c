"""A slide's Reinhard normalization: source statistics pooled from its tiles, checked against the
models' targets."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from wsi_screen.config import StainSettings
from wsi_screen.slide import Slide
from wsi_screen.tiling import TileGrid

if TYPE_CHECKING:
    from wsi_screen.stain import ReinhardStats, SourceEstimate

__all__ = ["SlideStain", "estimate_source", "estimate_source_stats", "slide_stain"]

logger = logging.getLogger(__name__)


def estimate_source(
    slide: Slide, grid: TileGrid, *, n_tiles: int, mask_glass: bool, size: int = 512
) -> SourceEstimate:
    """Slide-level Reinhard source statistics from ``n_tiles`` kept tiles spread over the slide.

    A centred ``size`` px patch of each sampled tile (the most cellular kept tiles, spread evenly
    over the slide) is read at the grid's µm/px, and
    :func:`~wsi_screen.stain.pooled_source_stats` pools their cell pixels robustly: glass (unless
    ``mask_glass=False``), near-black pixels and large dark regions (scanner fill, black field
    corners, ink, label edges, with a margin) are excluded; patches with too few cell pixels and
    outlier patches are left out. So no dark region can hijack the slide's statistics. ``used``,
    ``sparse`` and ``rejected`` of the result are tile indices; ``stats`` is None when the slide has
    no kept tile or too few cell pixels (all glass, all dark, or greyscale).
    """
    from wsi_screen.stain import SourceEstimate, pooled_source_stats

    kept = list(grid.tiles(kept_only=True))
    if not kept:
        return SourceEstimate(None, 0, (), (), (), 0, 0.0)
    # Most cellular tiles first, then spread evenly over the slide (deterministic).
    kept.sort(key=lambda t: (-t.tissue_fraction, t.index))
    pool = kept[: max(n_tiles * 4, n_tiles)]
    step = max(1, len(pool) // n_tiles)
    chosen = sorted(pool[::step][:n_tiles], key=lambda t: t.index)
    side = min(size, grid.tile_size)
    patches = []
    for t in chosen:
        off = (grid.tile_size - side) / 2 * grid.scale
        patches.append(slide.read_region((t.x0 + off, t.y0 + off), (side, side), mpp=grid.mpp))
    est = pooled_source_stats(np.stack(patches), mask_glass=mask_glass, mpp=grid.mpp)
    ids = [t.index for t in chosen]
    return replace(
        est,
        used=tuple(ids[i] for i in est.used),
        sparse=tuple(ids[i] for i in est.sparse),
        rejected=tuple(ids[i] for i in est.rejected),
    )


def estimate_source_stats(
    slide: Slide, grid: TileGrid, *, n_tiles: int, mask_glass: bool, size: int = 512
) -> ReinhardStats | None:
    """The statistics of :func:`estimate_source` (None: no kept tile, or too few cell pixels)."""
    return estimate_source(slide, grid, n_tiles=n_tiles, mask_glass=mask_glass, size=size).stats


@dataclass
class SlideStain:
    """The Reinhard normalization of one slide: each model's target and the slide's source.

    ``target``: the crops' (the classifier bundle's ``stain_target``); ``localizer_target``: the
    localizer input's (its bundle's); ``source``: the slide's statistics, None when nothing is
    normalized (``stain.enabled`` off, no target, too few cell pixels, or an implausible source);
    ``estimate``: how the source was pooled; ``check``: its plausibility
    (:func:`~wsi_screen.stain.check_source` against the targets, with ``normalized``).
    """

    enabled: bool
    target: ReinhardStats | None
    localizer_target: ReinhardStats | None
    source: ReinhardStats | None
    estimate: SourceEstimate | None = None
    check: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The ``stain`` record of ``cells.zarr`` attributes and ``run.json``."""
        return {
            "enabled": self.enabled,
            "normalized": self.source is not None,
            "target": None if self.target is None else self.target.to_dict(),
            "localizer_target": None if self.localizer_target is None else self.localizer_target.to_dict(),
            "source": None if self.source is None else self.source.to_dict(),
            "estimate": None if self.estimate is None else self.estimate.to_dict(),
            "check": self.check,
        }


def slide_stain(
    slide: Slide,
    grid: TileGrid,
    *,
    settings: StainSettings,
    target: ReinhardStats | None,
    localizer_target: ReinhardStats | None,
) -> SlideStain:
    """Each model's Reinhard target and the slide's source statistics, checked for plausibility.

    With ``settings.enabled`` and a target, the source comes from :func:`estimate_source` (cell
    pixels only, pooled robustly over the sampled tiles). A source far from every target
    (:func:`~wsi_screen.stain.check_source`: beyond the bounds that all real clean Pap images
    measured stay within) is not used: the slide is screened as read, and ``check`` records it
    (the ``stain_implausible`` QC flag of ``summary.json``).
    """
    if not settings.enabled or (target is None and localizer_target is None):
        return SlideStain(enabled=settings.enabled, target=None, localizer_target=None, source=None)
    from wsi_screen.stain import check_source

    est = estimate_source(slide, grid, n_tiles=settings.sample_tiles, mask_glass=settings.mask_glass)
    source, check = est.stats, None
    if source is not None:
        known = [t for t in (target, localizer_target) if t is not None]
        check = {**check_source(source, known), "normalized": True}
        if not check["plausible"]:
            check["normalized"] = False
            logger.warning(
                "%s: implausible stain statistics (%.1f target σ off, σ ×%.2f; pooled from %d of %d "
                "tiles): Reinhard normalization skipped for this slide (QC flag stain_implausible)",
                slide.path.name,
                check["mu_sigmas"],
                math.exp(check["log_sigma_ratio"]),
                len(est.used),
                est.n_images,
            )
            source = None
    return SlideStain(
        enabled=True,
        target=target,
        localizer_target=localizer_target,
        source=source,
        estimate=est,
        check=check,
    )
