"""Screen one slide: the staged pipeline from slide file to ``OUT/<slide-id>/``.

Stages and threads::

    reader threads ──(bounded, in order)──► device stage ──(bounded queue)──► writer thread
    read_region at the model µm/px          Reinhard → U-Net → candidates     cells.zarr appends
    (core + halo windows)                   → ownership → crops → classifier
                                            → coverage (edge bands settled)

Memory is bounded by the queue sizes (``reading.queue_tiles``, the device batch and the writer
queue), not by the slide. Every output is written into a temporary sibling directory that is renamed
to ``OUT/<slide-id>`` only when complete, so a crash never leaves a half result that looks finished.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import queue
import re
import shutil
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_screen import __version__
from wsi_screen.buffers import BufferPool
from wsi_screen.cells import CellTable
from wsi_screen.config import Settings, StainSettings
from wsi_screen.errors import ConfigError, CorruptSlideError
from wsi_screen.reader import ReaderStats, band_columns, cache_order, iter_windows
from wsi_screen.slide import RegionParts, Slide, open_slide
from wsi_screen.tiling import Tile, TileGrid, make_grid

if TYPE_CHECKING:
    import torch

    from wsi_screen.classify import CellClassifier
    from wsi_screen.localize import CoverageResolver, Localizer
    from wsi_screen.stain import ReinhardStats, SourceEstimate
    from wsi_screen.tissue import CellRegions

__all__ = [
    "Models",
    "SlideResult",
    "SlideStain",
    "TileProcessor",
    "assemble_batch",
    "estimate_source",
    "estimate_source_stats",
    "load_models",
    "run_slide",
    "slide_id_for",
    "slide_stain",
]

logger = logging.getLogger(__name__)

_SLIDE_ID_BAD = re.compile(r"[^A-Za-z0-9._-]+")
ProgressCallback = Callable[[int, int], None]


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


# -- models -----------------------------------------------------------------------------------------


@dataclass
class Models:
    """The loaded localization and classification models, and the device they run on."""

    localizer: Localizer
    classifier: CellClassifier
    device: torch.device

    def describe(self) -> list[dict[str, Any]]:
        """Names, versions and sha256 of every model (for ``run.json`` and ``cells.zarr``)."""
        out = [
            {
                "task": "localization",
                "name": self.localizer.bundle.name,
                "version": self.localizer.bundle.config.version,
                "sha256": self.localizer.bundle.sha256,
            }
        ]
        out += [
            {"task": "classification", "name": b.name, "version": b.config.version, "sha256": b.sha256}
            for b in self.classifier.bundles
        ]
        return out


#: The export threshold when neither the settings nor the classifier bundle name one.
FALLBACK_FLAG_SCORE = 0.5


def resolve_flag_threshold(settings: Settings, classifier: Any = None) -> Settings:
    """Settings whose ``output.flag_min_score`` is a number: the setting when given, else the first
    classifier bundle's ``thresholds.flag_score`` (chosen on its validation data), else 0.5.

    ``classifier``: the loaded :class:`~wsi_screen.classify.CellClassifier`; None reads the first
    bundle of ``classification.models`` (a batch resolves before hashing its settings, so that a
    result's recorded settings and the batch's resume key agree).
    """
    if settings.output.flag_min_score is not None:
        return settings
    if classifier is None:
        from wsi_screen.models.bundle import load_bundle

        bundles = [load_bundle(settings.classification.models[0], task="classification")]
    else:
        bundles = getattr(classifier, "bundles", None) or []
    value = FALLBACK_FLAG_SCORE
    if bundles:
        value = float(bundles[0].config.thresholds.get("flag_score", FALLBACK_FLAG_SCORE))
    return settings.with_overrides({"output.flag_min_score": value})


def load_models(settings: Settings, *, device: torch.device | None = None) -> Models:
    """Load the bundles named in ``settings`` onto the device (``runtime.device``)."""
    from wsi_screen.classify import CellClassifier
    from wsi_screen.localize import Localizer
    from wsi_screen.models.bundle import load_bundle
    from wsi_screen.runtime import configure_torch, limit_heap_growth, resolve_device

    limit_heap_growth()
    configure_torch(threads=settings.runtime.torch_threads)
    dev = device if device is not None else resolve_device(settings.runtime.device)
    loc_bundle = load_bundle(settings.localization.model, task="localization")
    cls_bundles = [load_bundle(m, task="classification") for m in settings.classification.models]
    settings.operating_point.check_models(  # a calibrated preset holds for its models only
        [{"task": "localization", "name": loc_bundle.name, "sha256": loc_bundle.sha256}]
        + [{"task": "classification", "name": b.name, "sha256": b.sha256} for b in cls_bundles]
    )
    bf16 = settings.runtime.cpu_bf16
    localizer = Localizer(loc_bundle, settings=settings.localization, device=dev, cpu_bf16=bf16)
    classifier = CellClassifier(
        cls_bundles, device=dev, batch_size=settings.classification.batch_size, cpu_bf16=bf16
    )
    if classifier.needs_mask:
        for b in cls_bundles:
            trained_with = _mask_localizers(b.config.training.get("data", {}))
            if trained_with and loc_bundle.name not in trained_with:
                logger.warning(
                    "%s was trained on nucleus masks of %s, but this run localizes with %s: its mask "
                    "channel may differ from what it learned",
                    b.name,
                    " / ".join(sorted(trained_with)),
                    loc_bundle.name,
                )
    logger.info(
        "models on %s: localization %s, classification %s",
        dev,
        loc_bundle.name,
        " + ".join(classifier.names),
    )
    return Models(localizer=localizer, classifier=classifier, device=dev)


def _mask_localizers(data: Any) -> set[str]:
    """Names of the localization bundles that made a training set's crops (``training.data``)."""
    if not isinstance(data, Mapping):
        return set()
    found = set()
    loc = data.get("localization")
    if isinstance(loc, Mapping) and isinstance(loc.get("name"), str):
        found.add(str(loc["name"]))
    for part in data.get("parts", []) or []:
        found |= _mask_localizers(part)
    return found


# -- stain statistics ---------------------------------------------------------------------------------


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


# -- device stage ---------------------------------------------------------------------------------

#: What the localizer sees instead of a large dark region (``TileProcessor(fill_dark=True)``): glass.
DARK_FILL_RGB = (242, 242, 242)


@dataclass
class BatchResult:
    """What the device stage returns for a batch of tiles."""

    tables: list[CellTable]
    focus: list[float]
    crops: torch.Tensor | None = None  # (N, S, S, 3 or 4) uint8, when ``keep_crops``
    timings: dict[str, float] = field(default_factory=dict)


#: The focus measure works on the green channel averaged over 2×2 pixels (0.5 µm/px at the default
#: 0.25 µm/px): defocus that matters for screening (σ ≳ 1 µm) still removes its fine band, at a
#: quarter of the pixels.
FOCUS_DOWNSAMPLE = 2
#: Box filters (px at the reduced resolution, applied in turn) of the fine and of the coarse blur:
#: σ² = 2 · (3² − 1) / 12 ≈ 1.33 px² and 1.33 + 2 · (5² − 1) / 12 ≈ 5.33 px² (σ ≈ 1.15 and 2.3 px).
FOCUS_FINE_BOXES = (3, 3)
FOCUS_COARSE_BOXES = (5, 5)
#: Full-resolution pixels the focus measure needs around the core (the coarse blur's radius).
FOCUS_MARGIN = FOCUS_DOWNSAMPLE * sum(k // 2 for k in FOCUS_FINE_BOXES + FOCUS_COARSE_BOXES)


def _box_blur(img: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Box filters of ``sizes`` in turn on (N, 1, H, W); valid part only (shrinks by Σ k // 2)."""
    import torch

    for k in sizes:
        img = torch.nn.functional.avg_pool2d(img, k, stride=1)
    return img


def _focus(img: torch.Tensor, margin: int, *, edge: float = 2.0, min_fraction: float = 0.002) -> list[float]:
    """Per tile: a stain- and content-independent sharpness ratio (NaN where too few edges).

    ``img`` is (B, H, W) grey levels or (B, H, W, 3) RGB (0–255; the green channel is used) of the
    tile cores plus ``margin`` pixels on every side (:data:`FOCUS_MARGIN` is enough; a smaller margin
    is padded). The image is averaged over 2×2 pixels; then, with G1 its fine blur (σ ≈ 1.15 px) and
    G2 its coarse blur (σ ≈ 2.3 px), over the pixels where the mid band ``|G1 − G2|`` exceeds ``edge``
    grey levels (edges of nuclei and cytoplasm), the measure is mean ``|I − G1|`` over mean
    ``|G1 − G2|``: fine detail relative to the coarser edge contrast. Defocus removes the fine band
    first, so the ratio falls (calibration: docs/outputs.md); unlike the variance of the Laplacian it
    hardly depends on how much or how dark the material is.
    """
    import torch

    g = (img[..., 1] if img.ndim == 4 else img).float()[:, None]
    if margin < FOCUS_MARGIN:  # too little context around the core: replicate its border
        pad = FOCUS_MARGIN - margin
        g = torch.nn.functional.pad(g, (pad, pad, pad, pad), mode="replicate")
        margin = FOCUS_MARGIN
    d, m = FOCUS_DOWNSAMPLE, FOCUS_MARGIN
    h, w = int(g.shape[2]) - 2 * margin, int(g.shape[3]) - 2 * margin
    g = g[:, :, margin - m : margin + h + m, margin - m : margin + w + m]
    x = torch.nn.functional.avg_pool2d(g, d, ceil_mode=False) if d > 1 else g
    mr = m // d  # margin at the reduced resolution
    hr, wr = int(x.shape[2]) - 2 * mr, int(x.shape[3]) - 2 * mr
    f = sum(k // 2 for k in FOCUS_FINE_BOXES)
    b1 = _box_blur(x, FOCUS_FINE_BOXES)
    b2 = _box_blur(b1, FOCUS_COARSE_BOXES)[:, 0, :hr, :wr]
    core = x[:, 0, mr : mr + hr, mr : mr + wr]
    b1 = b1[:, 0, mr - f : mr - f + hr, mr - f : mr - f + wr]
    mid = (b1 - b2).abs().flatten(1)
    fine = (core - b1).abs().flatten(1)
    sel = mid > edge
    n = sel.sum(dim=1).float()
    num = torch.where(sel, fine, 0.0).sum(dim=1)
    den = torch.where(sel, mid, 0.0).sum(dim=1)
    ratio = num / den.clamp(min=1e-6)
    ok = n >= max(1.0, min_fraction * sel.shape[1])
    return [v if good else float("nan") for v, good in zip(ratio.tolist(), ok.tolist(), strict=True)]


def assemble_batch(
    windows: Sequence[NDArray[np.uint8] | RegionParts],
    *,
    pinned: bool = False,
    pool: BufferPool | None = None,
) -> torch.Tensor:
    """The windows as one N×H×W×3 uint8 tensor, each pixel copied once.

    Windows read as parts (:class:`~wsi_screen.slide.RegionParts`: the decoded tiles under them)
    are pasted straight into their slot. ``pinned``: in page-locked memory from torch's caching
    host allocator (for a non-blocking copy to CUDA); otherwise over ``pool`` memory when given.
    """
    import torch

    if not windows:
        raise ValueError("no windows to assemble")
    shape = tuple(int(v) for v in windows[0].shape)
    if len(shape) != 3 or shape[2] != 3 or any(tuple(w.shape) != shape for w in windows):
        got = [tuple(w.shape) for w in windows]
        raise ValueError(f"windows must all be H×W×3 of one size, got {got}")
    n = len(windows)
    if pinned:
        x = torch.empty((n, *shape), dtype=torch.uint8, pin_memory=True)
        buf: NDArray[np.uint8] = x.numpy()
    else:
        buf = pool.take((n, *shape)) if pool is not None else np.empty((n, *shape), np.uint8)
        x = torch.from_numpy(buf)
    for i, w in enumerate(windows):
        if isinstance(w, RegionParts):
            w.paste_into(buf[i])
        else:
            buf[i] = w
    return x


class TileProcessor:
    """Device stage for a batch of windows: normalize → localize → own → crop → classify.

    Also used by training, so that crops seen in training and in screening come from the same code.
    Each model sees the Reinhard normalization of its own bundle: the localizer's input goes to
    ``localizer_target``, the crops to ``target`` (the classifier's), both from the slide's ``source``
    statistics; the windows are normalized once when the two targets are equal (every shipped
    bundle has :data:`~wsi_screen.stain.DEFAULT_TARGET`), twice when they differ. ``source=None``
    normalizes nothing; a target of None leaves that model's input as read.
    """

    def __init__(
        self,
        *,
        localizer: Localizer,
        classifier: CellClassifier | None,
        grid: TileGrid,
        source: ReinhardStats | None,
        target: ReinhardStats | None,
        crop_size: int,
        device: torch.device,
        localizer_target: ReinhardStats | Literal["own"] | None = "own",
        fill_dark: bool = True,
        keep_crops: bool = False,
        mask_channel: bool | None = None,
        coverage: CoverageResolver | None = None,
    ) -> None:
        """``target``: the Reinhard target of the crops (the classifier bundle's ``stain_target``);
        ``localizer_target``: that of the localizer's input (``"own"``: the localizer bundle's,
        :attr:`Localizer.stain_target`; ``target`` for a stand-in localizer without one).
        ``fill_dark``: the localizer sees glass instead of large dark regions
        (:func:`~wsi_screen.stain.dark_region_mask`: scanner fill, black field corners, ink):
        they hold no cells, and the U-Net's squeeze-excitation pools over its whole input, so a
        dark region changes what it finds everywhere in the window (``stain.fill_dark_regions``).

        ``mask_channel``: add the nucleus-mask channel to the crops (default: when the classifier
        needs it, :attr:`CellClassifier.needs_mask`).

        ``coverage``: the slide's :class:`~wsi_screen.localize.CoverageResolver`. With it, each tile
        keeps the candidates :meth:`~wsi_screen.localize.CoverageResolver.candidates_mask` selects (its
        core grown by the edge band on shared edges) and the caller passes every tile's table to
        :meth:`~wsi_screen.localize.CoverageResolver.add`, which reports each cell exactly once
        (:func:`run_slide` does). Without it each tile keeps what its core owns (``Tile.owns``): a cell
        whose centre the tiles of an edge estimate on each other's side is then lost, or counted twice."""
        if 2 * grid.halo < crop_size:
            raise ConfigError(
                f"tiling.halo_um gives a halo of {grid.halo} px, less than half a {crop_size} px crop: "
                f"set tiling.halo_um ≥ {crop_size / 2 * grid.mpp:g}"
            )
        self.localizer = localizer
        self.classifier = classifier
        self.grid = grid
        self.source = source
        self.target = target
        self.localizer_target: ReinhardStats | None = (
            getattr(localizer, "stain_target", target) if localizer_target == "own" else localizer_target
        )
        self.fill_dark = bool(fill_dark)
        self.crop_size = int(crop_size)
        self.device = device
        self.keep_crops = keep_crops
        self.coverage = coverage
        self.mask_channel = bool(classifier.needs_mask if classifier is not None else False)
        if mask_channel is not None:
            if classifier is not None and bool(mask_channel) != classifier.needs_mask:
                raise ConfigError(
                    f"classifier {' + '.join(classifier.names)} takes {classifier.input_representation} "
                    f"crops; mask_channel={mask_channel} contradicts it"
                )
            self.mask_channel = bool(mask_channel)
        # Batch memory (CPU) reused once a batch's tensors are gone; CUDA batches come from torch's
        # caching pinned-memory allocator instead.
        self._batches = BufferPool(4)

    def assemble(self, windows: Sequence[NDArray[np.uint8] | RegionParts]) -> torch.Tensor:
        """The batch tensor of ``windows`` for this stage's device (:func:`assemble_batch`)."""
        return assemble_batch(windows, pinned=self.device.type == "cuda", pool=self._batches)

    def normalize(self, windows: torch.Tensor) -> torch.Tensor:
        """The localizer's input: Reinhard towards ``localizer_target`` (or pass through)."""
        return self.normalize_both(windows)[0]

    def normalize_both(self, windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(localizer input, crop source): each towards its model's target, from the slide's source.

        One Reinhard pass (the same tensor twice) when the targets are equal; none without a source.
        With ``fill_dark``, large dark regions of the windows are glass in the localizer's input.
        """
        import torch

        from wsi_screen.stain import dark_region_mask, reinhard

        def to(target: ReinhardStats | None) -> torch.Tensor:
            if target is None or self.source is None:
                return windows
            return reinhard(windows, target, source=self.source)

        loc = to(self.localizer_target)
        crops = loc if self.target == self.localizer_target else to(self.target)
        if self.fill_dark:
            dark = dark_region_mask(windows, mpp=self.grid.mpp, isolated=False)
            if bool(dark.any()):
                glass = torch.tensor(DARK_FILL_RGB, dtype=torch.uint8, device=loc.device)
                loc = torch.where(dark[..., None], glass, loc)
        return loc, crops

    def __call__(
        self, tiles: Sequence[Tile], windows: Sequence[NDArray[np.uint8] | RegionParts]
    ) -> BatchResult:
        """Screen a batch of windows (arrays, or the decoded tiles under them) of ``tiles``."""
        import torch

        from wsi_screen.classify import cut_crops, cut_mask_crops

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        x = self.assemble(windows)
        ta = time.perf_counter()
        timings["assemble"] = ta - t0
        t0 = ta
        x = x.to(self.device, non_blocking=self.device.type == "cuda")
        loc_in, norm = self.normalize_both(x)
        # Focus needs the grey level of the core and a small margin only.
        m = max(self.grid.halo - FOCUS_MARGIN, 0)
        core = norm[:, m : norm.shape[1] - m, m : norm.shape[2] - m] if m else norm
        focus = _focus(core, min(self.grid.halo, FOCUS_MARGIN))
        t1 = time.perf_counter()
        timings["normalize"] = t1 - t0
        cands = self.localizer.localize(loc_in, window_mpp=self.grid.mpp, halo_px=self.grid.halo)
        t2 = time.perf_counter()
        timings["localize"] = t2 - t1

        tables: list[CellTable] = []
        tile_idx: list[NDArray[np.int64]] = []
        cxs: list[NDArray[np.int64]] = []
        cys: list[NDArray[np.int64]] = []
        for b, (tile, c) in enumerate(zip(tiles, cands, strict=True)):
            lx, ly = tile.to_level0(c.x, c.y)
            keep = tile.owns(lx, ly) if self.coverage is None else self.coverage.candidates_mask(tile, lx, ly)
            own = np.flatnonzero(keep)
            tables.append(_owned_table(tile, c, own, lx, ly))
            tile_idx.append(np.full(len(own), b, np.int64))
            cxs.append(np.floor(np.asarray(c.x)[own]).astype(np.int64))
            cys.append(np.floor(np.asarray(c.y)[own]).astype(np.int64))
        ti = torch.from_numpy(np.concatenate(tile_idx)) if tile_idx else torch.zeros(0, dtype=torch.long)
        cx_t = torch.from_numpy(np.concatenate(cxs)) if cxs else ti
        cy_t = torch.from_numpy(np.concatenate(cys)) if cys else ti
        crops = cut_crops(norm, ti, cx_t, cy_t, self.crop_size)
        if self.mask_channel:
            hw = (int(norm.shape[1]), int(norm.shape[2]))
            mask = cut_mask_crops(
                [c.outlines for c in cands], hw, ti, cx_t, cy_t, self.crop_size, device=norm.device
            )
            crops = torch.cat([crops, mask], dim=3)
        t3 = time.perf_counter()
        timings["crop"] = t3 - t2
        if self.classifier is not None:
            probs = self.classifier.predict(crops).float().cpu().numpy()
            start = 0
            for i, t in enumerate(tables):
                tables[i] = t.with_probs(probs[start : start + len(t)])
                start += len(t)
        timings["classify"] = time.perf_counter() - t3
        return BatchResult(
            tables=tables, focus=focus, crops=crops if self.keep_crops else None, timings=timings
        )


def _owned_table(
    tile: Tile, c: Any, own: NDArray[np.intp], lx: NDArray[np.float64], ly: NDArray[np.float64]
) -> CellTable:
    """The cells of ``c`` at ``own`` as a table in level-0 px (all outlines mapped at once)."""
    from wsi_screen.cells import MORPHOMETRICS

    n = len(own)
    polys = [np.asarray(c.outlines[i]).reshape(-1, 2) for i in own]
    lengths = np.fromiter((len(q) for q in polys), np.int64, count=n)
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    xy = np.concatenate(polys).astype(np.float64) if n else np.zeros((0, 2), np.float64)
    px, py = tile.to_level0(xy[:, 0], xy[:, 1])
    outline_xy = np.empty((len(xy), 2), np.float32)
    outline_xy[:, 0] = px
    outline_xy[:, 1] = py
    morph = {k: np.zeros(n, np.float32) for k in MORPHOMETRICS}
    morph.update({k: np.asarray(v, np.float32)[own] for k, v in c.morphometrics.items()})
    return CellTable(
        x=np.asarray(lx[own], np.float64),
        y=np.asarray(ly[own], np.float64),
        tile=np.full(n, tile.index, np.int32),
        detection_score=np.asarray(c.detection_score, np.float32)[own],
        morphometrics=morph,
        outline_offsets=offsets,
        outline_xy=outline_xy,
        probs=np.zeros((n, 0), np.float32),
    )


# -- writer stage -----------------------------------------------------------------------------------


class _Writer(threading.Thread):
    """Appends finished tiles' cells to the store from a bounded queue (off the critical path)."""

    def __init__(self, store: Any, maxsize: int) -> None:
        super().__init__(name="wsi-writer", daemon=True)
        self.store = store
        self.queue: queue.Queue[CellTable | None] = queue.Queue(maxsize=maxsize)
        self.busy_s = 0.0
        self.idle_s = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        while True:
            t0 = time.perf_counter()
            item = self.queue.get()
            t1 = time.perf_counter()
            self.idle_s += t1 - t0
            if item is None:
                return
            if self.error is not None:
                continue
            try:
                self.store.append(item)
            except BaseException as exc:
                self.error = exc
            self.busy_s += time.perf_counter() - t1

    def put(self, table: CellTable) -> float:
        """Queue a table; returns the seconds the caller was blocked (queue full)."""
        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        self.queue.put(table)
        return time.perf_counter() - t0

    def finish(self) -> None:
        self.queue.put(None)
        self.join()
        if self.error is not None:
            raise self.error


# -- one slide ------------------------------------------------------------------------------------


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


def _versions() -> dict[str, str]:
    import importlib.metadata as md

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


def _progress(total: int, *, enabled: bool, desc: str) -> Any:
    """A tqdm bar on a terminal; otherwise a logger that reports every 10 %."""
    from tqdm.auto import tqdm

    if enabled and sys.stderr.isatty():
        return tqdm(total=total, desc=desc, unit="tile", dynamic_ncols=True, leave=False)

    class _LogProgress:
        def __init__(self) -> None:
            self.n = 0
            self.next = 0.1

        def update(self, k: int) -> None:
            self.n += k
            if enabled and total and self.n / total >= self.next:
                logger.info("%s: %d/%d tiles (%.0f %%)", desc, self.n, total, 100 * self.n / total)
                while self.n / total >= self.next:
                    self.next += 0.1

        def close(self) -> None:
            return None

    return _LogProgress()


def _atomic_dir(out_root: Path, slide_id: str) -> Path:
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".{slide_id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp dir into place, replacing an older result."""
    old: Path | None = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default, allow_nan=False) + "\n")


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
    import torch

    from wsi_screen.geojson import select_cells, write_geojson
    from wsi_screen.localize import CoverageResolver
    from wsi_screen.report import build_report, write_report
    from wsi_screen.runtime import cpu_model
    from wsi_screen.store import TILE_UNREADABLE, read_cells
    from wsi_screen.summary import summarize, write_summary
    from wsi_screen.tissue import qc_thumbnail_png, slide_cell_regions

    t_start = time.perf_counter()
    started = datetime.now(timezone.utc)
    timings: dict[str, Any] = {}
    sid = slide_id or slide_id_for(slide_path)
    out_root = Path(out_root)
    if models is None:
        t0 = time.perf_counter()
        models = load_models(settings)
        timings["load_models"] = time.perf_counter() - t0
    classifier = models.classifier
    localizer = models.localizer
    settings = resolve_flag_threshold(settings, classifier)

    t0 = time.perf_counter()
    slide = open_slide(slide_path, backend=settings.slide.backend, mpp=settings.slide.mpp)
    tmp = _atomic_dir(out_root, sid)
    try:
        with slide:
            fingerprint = slide.fingerprint()
            timings["open"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            regions: CellRegions = slide_cell_regions(slide, settings.tissue)
            grid = make_grid(
                slide.dimensions,
                slide_mpp=slide.mpp,
                mpp=classifier.mpp,
                tile_size=settings.tiling.tile_size_px,
                halo_um=settings.tiling.halo_um,
                mask=regions.mask,
                mask_mpp=regions.mpp,
                min_tissue_fraction=settings.tiling.min_tissue_fraction,
            )
            timings["cell_regions"] = time.perf_counter() - t0
            (tmp / "qc_regions.png").write_bytes(qc_thumbnail_png(regions))

            t0 = time.perf_counter()
            # Each model gets the normalization of its own bundle (one pass when the targets agree).
            from wsi_screen.stain import ReinhardStats

            cls = classifier.bundles[0].config.stain_target
            stain = slide_stain(
                slide,
                grid,
                settings=settings.stain,
                target=None if cls is None else ReinhardStats(mu=cls.mu, sigma=cls.sigma),
                localizer_target=localizer.stain_target,
            )
            timings["stain_stats"] = time.perf_counter() - t0

            processor = TileProcessor(
                localizer=localizer,
                classifier=classifier,
                grid=grid,
                source=stain.source,
                target=stain.target,
                localizer_target=stain.localizer_target,
                fill_dark=settings.stain.fill_dark_regions,
                crop_size=classifier.input_size,
                device=models.device,
                coverage=CoverageResolver(grid),
            )
            slide_info = {
                "path": str(Path(slide_path).resolve()),
                "name": Path(slide_path).name,
                "fingerprint": fingerprint,
                "dimensions": list(slide.dimensions),
                "mpp": slide.mpp,
                "mpp_source": slide.info.mpp_source,
                "vendor": slide.vendor,
                "objective_power": slide.objective_power,
                "backend": slide.backend,
            }
            attrs = {
                "models": models.describe(),
                "mpp": grid.mpp,
                "slide": slide_info,
                "config": settings.to_dict(),
                "stain": stain.to_dict(),
            }
            n_cells, stage, status, focus, _n_tile_cells = _run_tiles(
                slide,
                grid,
                processor,
                store_path=tmp / "cells.zarr",
                class_names=classifier.class_names,
                abnormal_classes=classifier.abnormal_classes,
                attrs=attrs,
                settings=settings,
                progress=progress,
                on_tile=on_tile,
            )
            timings.update(stage.pop("timings"))
            n_processed = grid.n_kept
            n_unreadable = int((status == TILE_UNREADABLE).sum())
            if n_processed and n_unreadable / n_processed > settings.reading.max_unreadable_fraction:
                raise CorruptSlideError(
                    f"{Path(slide_path).name}: {n_unreadable} of {n_processed} tiles could not be decoded "
                    f"(limit {settings.reading.max_unreadable_fraction:.0%}, reading.max_unreadable_fraction)"
                )

            t0 = time.perf_counter()
            cells, _ = read_cells(tmp / "cells.zarr")
            focus_arr = np.asarray(focus, np.float32)
            out_of_focus = int(np.sum(focus_arr[np.isfinite(focus_arr)] < settings.triage.min_focus))
            timings_all = {k: round(float(v), 4) for k, v in timings.items()}
            versions = _versions()
            summary = summarize(
                cells,
                class_names=classifier.class_names,
                abnormal_classes=classifier.abnormal_classes,
                settings=settings,
                cellular_area_mm2=regions.area_um2 / 1e6,
                tiles_total=n_processed,
                tiles_unreadable=n_unreadable,
                tiles_out_of_focus=out_of_focus,
                timings=timings_all,
                versions={**versions, "models": models.describe()},
                extra={"slide_id": sid, "slide": slide_info},
                stain_check=stain.check,
            )
            write_summary(tmp / "summary.json", summary)
            flagged = select_cells(
                cells,
                class_names=classifier.class_names,
                abnormal_classes=classifier.abnormal_classes,
                min_score=(
                    FALLBACK_FLAG_SCORE
                    if settings.output.flag_min_score is None
                    else settings.output.flag_min_score
                ),
                classes=settings.output.flag_classes or None,
                max_cells=settings.output.flag_max_cells or None,
            )
            write_geojson(
                tmp / "flagged.geojson",
                cells,
                class_names=classifier.class_names,
                abnormal_classes=classifier.abnormal_classes,
                slide_id=fingerprint,
                index=flagged,
                object_type=settings.output.object_type,
                bounds=slide.dimensions,
                slide_mpp=slide.mpp,
                gzip=settings.output.geojson_gzip,
                metadata={"slide": slide_info["name"], "slide_id": sid},
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
                    class_names=classifier.class_names,
                    thumbnail=regions.thumbnail,
                    thumbnail_mpp=regions.mpp,
                    slide_mpp=slide.mpp,
                    read_crop=read_crop,
                    title=Path(slide_path).name,
                    crop_um=settings.output.report_crop_um,
                    heatmap_um=settings.output.report_heatmap_um,
                    max_gallery=settings.output.top_n,
                )
                write_report(tmp / "report.html", html)
            timings["outputs"] = time.perf_counter() - t0
            timings["total"] = time.perf_counter() - t_start
            run_info: dict[str, Any] = {
                "wsi_screen_version": __version__,
                "slide_id": sid,
                "slide": slide_info,
                "arguments": dict(arguments or {}),
                "config": settings.to_dict(),
                "versions": versions,
                "models": models.describe(),
                "device": str(models.device),
                "torch_threads": torch.get_num_threads(),
                "grid": grid.to_dict(),
                "cell_regions": regions.summary(),
                "stain": attrs["stain"],
                "n_cells": n_cells,
                "tiles": {
                    "total": grid.n_tiles,
                    "processed": n_processed,
                    "unreadable": n_unreadable,
                    "out_of_focus": out_of_focus,
                },
                "timings": {k: round(float(v), 4) for k, v in timings.items()},
                "stages": stage,
                "started": started.isoformat(),
                "finished": datetime.now(timezone.utc).isoformat(),
                "host": {"platform": platform.platform(), "cpu": cpu_model(), "cpu_count": os.cpu_count()},
            }
            _write_json(tmp / "run.json", run_info)
        final = out_root / sid
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result = SlideResult(
        slide_id=sid, out_dir=final, summary=summary, n_cells=n_cells, timings=run_info["timings"]
    )
    logger.info("%s in %.1f s", result.triage_line(), timings["total"])
    return result


def _run_tiles(
    slide: Slide,
    grid: TileGrid,
    processor: TileProcessor,
    *,
    store_path: Path,
    class_names: Sequence[str],
    abnormal_classes: Sequence[str],
    attrs: Mapping[str, Any],
    settings: Settings,
    progress: bool,
    on_tile: ProgressCallback | None,
) -> tuple[int, dict[str, Any], NDArray[np.uint8], list[float], NDArray[np.int64]]:
    """Reader threads → device stage → writer thread over every kept tile.

    With ``processor.coverage``, every processed tile's cells go through the resolver, which writes
    each cell once: at once away from shared core edges, in the edge bands once the neighbouring tiles
    are in (or known unreadable); ``n_tile_cells`` counts them by the tile whose version was kept.
    """
    from wsi_screen.runtime import cpu_count
    from wsi_screen.store import TILE_DONE, TILE_SKIPPED, TILE_UNREADABLE, CellStoreWriter

    # In bands as wide as the slide reader's tile cache allows (row-major on all but very wide slides).
    band_cols = band_columns(grid, slide.cache_bytes)
    tiles = cache_order(list(grid.tiles(kept_only=True)), band_cols=band_cols)
    coverage = processor.coverage
    status = np.full(grid.n_tiles, TILE_SKIPPED, np.uint8)
    focus = [float("nan")] * grid.n_tiles
    n_tile_cells = np.zeros(grid.n_tiles, np.int64)
    workers = settings.reading.workers or cpu_count()
    batch_tiles = max(1, settings.localization.batch_size)
    reader_stats = ReaderStats()
    device_busy = 0.0
    device_timings = dict.fromkeys(("assemble", "normalize", "localize", "crop", "classify"), 0.0)
    writer_block = 0.0
    n_cells = 0
    store = CellStoreWriter(
        store_path,
        class_names=class_names,
        abnormal_classes=abnormal_classes,
        attrs=attrs,
        chunk_cells=settings.output.zarr_chunk_cells,
    )
    writer = _Writer(store, maxsize=max(2, settings.reading.queue_tiles))
    writer.start()
    bar = _progress(len(tiles), enabled=progress, desc=slide.path.name)
    t_loop = time.perf_counter()
    done = 0
    try:
        batch: list[tuple[Tile, RegionParts]] = []

        def flush() -> None:
            nonlocal device_busy
            if not batch:
                return
            t0 = time.perf_counter()
            res = processor([t for t, _ in batch], [w for _, w in batch])
            device_busy += time.perf_counter() - t0
            for key, value in res.timings.items():
                device_timings[key] = device_timings.get(key, 0.0) + value
            for (tile, _), table, f in zip(batch, res.tables, res.focus, strict=True):
                status[tile.index] = TILE_DONE
                focus[tile.index] = f
                emit(table if coverage is None else coverage.add(tile, table))
            batch.clear()

        def emit(table: CellTable) -> None:
            """Queue cells that are final (with coverage: of this tile or of neighbours held back)."""
            nonlocal writer_block, n_cells
            if not len(table):
                return
            np.add.at(n_tile_cells, np.asarray(table.tile, np.int64), 1)
            n_cells += len(table)
            writer_block += writer.put(table)

        for read in iter_windows(
            slide,
            tiles,
            mpp=grid.mpp,
            workers=workers,
            prefetch=settings.reading.queue_tiles,
            stats=reader_stats,
            assemble=False,  # the device stage pastes the decoded tiles straight into its batch
        ):
            if read.parts is None:
                status[read.tile.index] = TILE_UNREADABLE
                if coverage is not None:  # its neighbours' edge cells no longer wait for it
                    emit(coverage.skip(read.tile))
            else:
                batch.append((read.tile, read.parts))
            if len(batch) >= batch_tiles:
                flush()
            done += 1
            bar.update(1)
            if on_tile is not None:
                on_tile(done, len(tiles))
        flush()
        if coverage is not None:
            emit(coverage.finish())
        writer.finish()
        store.write_tiles(grid, status, n_tile_cells, np.asarray(focus, np.float32))
        store.close()
    finally:
        bar.close()
        if writer.is_alive():
            writer.finish()
    loop_s = time.perf_counter() - t_loop
    device_idle = reader_stats.consumer_wait_s
    stage = {
        "reader": {**reader_stats.to_dict(), "band_columns": band_cols},
        "device": {
            "busy_s": round(device_busy, 4),
            "waiting_for_reader_s": round(device_idle, 4),
            "idle_fraction": round(device_idle / loop_s, 4) if loop_s else 0.0,
            "tiles_per_s": round(len(tiles) / loop_s, 3) if loop_s else 0.0,
            "batch_tiles": batch_tiles,
            **{f"{k}_s": round(v, 4) for k, v in device_timings.items()},
        },
        "writer": {
            "busy_s": round(writer.busy_s, 4),
            "idle_s": round(writer.idle_s, 4),
            "idle_fraction": round(writer.idle_s / loop_s, 4) if loop_s else 0.0,
            "device_blocked_s": round(writer_block, 4),
        },
        "timings": {"tiles": loop_s, **device_timings},
    }
    if math.isfinite(loop_s) and loop_s > 0:
        logger.debug("stages: %s", stage)
    return n_cells, stage, status, focus, n_tile_cells
