"""The device stage: a batch of tile windows → normalize → localize → own → crop → classify.

Also used by training, so that the crops seen in training and in screening come from the same code.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_screen.buffers import BufferPool
from wsi_screen.cells import CellTable
from wsi_screen.errors import ConfigError
from wsi_screen.focus import FOCUS_MARGIN, tile_focus
from wsi_screen.slide import RegionParts
from wsi_screen.tiling import Tile, TileGrid

if TYPE_CHECKING:
    import torch

    from wsi_screen.classify import CellClassifier
    from wsi_screen.localize import CoverageResolver, Localizer
    from wsi_screen.stain import ReinhardStats

__all__ = ["DARK_FILL_RGB", "BatchResult", "TileProcessor", "assemble_batch"]


#: What the localizer sees instead of a large dark region (``TileProcessor(fill_dark=True)``): glass.
DARK_FILL_RGB = (242, 242, 242)


@dataclass
class BatchResult:
    """What the device stage returns for a batch of tiles."""

    tables: list[CellTable]
    focus: list[float]
    crops: torch.Tensor | None = None  # (N, S, S, 3 or 4) uint8, when ``keep_crops``
    timings: dict[str, float] = field(default_factory=dict)


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
        from torch.profiler import record_function  # named ranges in a torch.profiler trace

        from wsi_screen.classify import cut_crops, cut_mask_crops

        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with record_function("wsi_screen.assemble"):
            x = self.assemble(windows)
        ta = time.perf_counter()
        timings["assemble"] = ta - t0
        t0 = ta
        with record_function("wsi_screen.normalize"):
            x = x.to(self.device, non_blocking=self.device.type == "cuda")
            loc_in, norm = self.normalize_both(x)
            # Focus needs the grey level of the core and a small margin only.
            m = max(self.grid.halo - FOCUS_MARGIN, 0)
            core = norm[:, m : norm.shape[1] - m, m : norm.shape[2] - m] if m else norm
            focus = tile_focus(core, min(self.grid.halo, FOCUS_MARGIN))
        t1 = time.perf_counter()
        timings["normalize"] = t1 - t0
        with record_function("wsi_screen.localize"):
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
            tables.append(c.subset(own).to_level0(tile))  # all outlines mapped at once
            tile_idx.append(np.full(len(own), b, np.int64))
            cxs.append(np.floor(np.asarray(c.x)[own]).astype(np.int64))
            cys.append(np.floor(np.asarray(c.y)[own]).astype(np.int64))
        ti = torch.from_numpy(np.concatenate(tile_idx)) if tile_idx else torch.zeros(0, dtype=torch.long)
        cx_t = torch.from_numpy(np.concatenate(cxs)) if cxs else ti
        cy_t = torch.from_numpy(np.concatenate(cys)) if cys else ti
        with record_function("wsi_screen.crop"):
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
            with record_function("wsi_screen.classify"):
                morph = {
                    f: np.concatenate([t.morphometrics[f] for t in tables])
                    if tables
                    else np.zeros(0, np.float32)
                    for f in self.classifier.morphometrics
                }
                probs = self.classifier.predict(crops, morphometrics=morph).float().cpu().numpy()
            start = 0
            for i, t in enumerate(tables):
                tables[i] = t.with_probs(probs[start : start + len(t)])
                start += len(t)
        timings["classify"] = time.perf_counter() - t3
        return BatchResult(
            tables=tables, focus=focus, crops=crops if self.keep_crops else None, timings=timings
        )
