"""Nucleus localization: the U-Net stage of the pipeline.

:class:`Localizer` takes Reinhard-normalized read windows (core + halo, channels-last uint8 on the
device), runs the U-Net at the bundle's µm/px on the core plus the context the model needs
(``inference.context_um``), and turns the probability maps into candidates with coordinates in
**window pixels at the window's µm/px** (continuous: pixel ``i`` spans ``[i, i + 1)``), ready for
``Tile.to_level0``: tile by tile on the CPU (:func:`wsi_screen.candidates.extract_candidates`), or the
whole batch on the U-Net's device (:func:`wsi_screen.candidates_torch.extract_candidates_torch`),
as ``localization.candidates`` says (:func:`resolve_candidate_path`).

Ownership: neighbouring tiles see a nucleus on their shared core edge with slightly different centres,
so ``Tile.owns`` applied by each tile alone can report it twice or never. :class:`CoverageResolver`
applies the ownership rule away from core edges and settles the edge bands with the neighbours'
results, so every cell is reported exactly once; :func:`wsi_screen.pipeline.run_slide` and the
training crop path (``wsi_screen.train.data``) settle every slide's cells with it
(``tests/test_coverage.py``).

Input representations (``bundle.input_representation``; :func:`model_input` is shared with training):

- ``od_gray``: one channel, the optical density ``-log10(I / 255)`` averaged over R, G and B
  (:mod:`wsi_screen.optical_density`), computed at the window's resolution and then averaged down to
  the model's;
- ``rgb``: the three channels scaled to [0, 1], averaged down.

Both are standardized with the bundle's ``mean`` / ``std``. Downsampling by a whole factor (0.25 →
0.5 µm/px) is an exact box average; other ratios use antialiased bilinear resampling.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import weakref
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_screen.candidates import extract_candidates
from wsi_screen.cells import CellTable
from wsi_screen.errors import BundleError
from wsi_screen.optical_density import optical_density_torch
from wsi_screen.runtime import autocast_context

if TYPE_CHECKING:
    import torch

    from wsi_screen.config import LocalizationSettings
    from wsi_screen.models.bundle import ModelBundle
    from wsi_screen.slide import Slide
    from wsi_screen.stain import ReinhardStats
    from wsi_screen.tiling import Tile, TileGrid

__all__ = [
    "CHANNELS",
    "REPRESENTATIONS",
    "CoverageResolver",
    "Localizer",
    "localize_region",
    "model_input",
    "resolve_candidate_path",
]

logger = logging.getLogger(__name__)

#: Output channels of a localization bundle, in order (``class_names``); only ``nucleus`` is required.
CHANNELS: tuple[str, ...] = ("nucleus", "marker", "cell")
#: Input representations and their number of channels.
REPRESENTATIONS: dict[str, int] = {"od_gray": 1, "rgb": 3}
#: Model inputs are padded to a multiple of this (the U-Net's output stride).
_STRIDE = 32
#: Default context around a tile core when a bundle does not state one (µm).
_DEFAULT_CONTEXT_UM = 24.0


def _whole_factor(factor: float) -> int | None:
    k = round(factor)
    return k if k >= 1 and abs(factor - k) < 1e-6 else None


def model_input(
    windows: torch.Tensor,
    *,
    representation: str,
    factor: float,
    pad_to: int = _STRIDE,
) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
    """Model features of uint8 RGB windows at ``1 / factor`` of their resolution.

    Args:
        windows: (B, H, W, 3) uint8, channels-last, any device.
        representation: ``od_gray`` or ``rgb`` (see the module docstring).
        factor: model µm/px ÷ window µm/px (2 for 0.25 → 0.5 µm/px).
        pad_to: pad the output (bottom/right, with glass) to a multiple of this.

    Returns:
        features (B, C, h, w) float32 (not yet standardized), optical density (B, h, w) float32 on the
        same grid, and the (y, x) size of one model pixel in window pixels.
    """
    import torch
    from torch.nn import functional as F

    if representation not in REPRESENTATIONS:
        raise BundleError(
            f"unknown input representation {representation!r}; known: {', '.join(REPRESENTATIONS)}"
        )
    if windows.ndim != 4 or windows.shape[-1] != 3 or windows.dtype != torch.uint8:
        raise ValueError(f"windows must be (B, H, W, 3) uint8, got {tuple(windows.shape)} {windows.dtype}")
    if factor <= 0:
        raise ValueError(f"factor must be positive, got {factor}")
    h, w = int(windows.shape[1]), int(windows.shape[2])
    k = _whole_factor(factor)
    x = windows.permute(0, 3, 1, 2)
    if k is not None:
        ph, pw = (-h) % (k * pad_to), (-w) % (k * pad_to)
        if ph or pw:  # glass beyond the window: exact box averages, sizes a multiple of the stride
            x = F.pad(x, (0, pw, 0, ph), value=255)
    x = x.float()
    od = optical_density_torch(x)
    feats = od if representation == "od_gray" else x / 255.0
    both = torch.cat([feats, od], dim=1)
    if k is not None:
        if k > 1:
            both = F.avg_pool2d(both, k)
        step = (float(k), float(k))
    else:
        oh, ow = max(1, round(h / factor)), max(1, round(w / factor))
        both = F.interpolate(both, size=(oh, ow), mode="bilinear", antialias=True, align_corners=False)
        step = (h / oh, w / ow)
        ph, pw = (-oh) % pad_to, (-ow) % pad_to
        if ph or pw:
            glass = torch.zeros(both.shape[1], device=both.device)
            if representation == "rgb":
                glass[:3] = 1.0
            both = F.pad(both - glass[:, None, None], (0, pw, 0, ph)) + glass[:, None, None]
    return both[:, :-1], both[:, -1], step


class Localizer:
    """The U-Net of a localization bundle, ready to run on batches of normalized windows."""

    def __init__(
        self,
        bundle: ModelBundle,
        *,
        settings: LocalizationSettings,
        device: torch.device,
        cpu_bf16: bool = False,
    ) -> None:
        """``cpu_bf16``: run the U-Net under bf16 autocast on the CPU too (``runtime.cpu_bf16``)."""
        import torch

        from wsi_screen.stain import ReinhardStats

        cfg = bundle.config
        if cfg.task != "localization":
            raise BundleError(f"bundle {cfg.name} is a {cfg.task} model, not a localization model")
        rep = cfg.input_representation
        if rep not in REPRESENTATIONS:
            known = ", ".join(REPRESENTATIONS)
            raise BundleError(f"bundle {cfg.name}: unknown input_representation {rep!r}; known: {known}")
        if cfg.in_channels != REPRESENTATIONS[rep]:
            raise BundleError(
                f"bundle {cfg.name}: {rep} input has {REPRESENTATIONS[rep]} channels, "
                f"the bundle says {cfg.in_channels}"
            )
        unknown = [c for c in cfg.class_names if c not in CHANNELS]
        if "nucleus" not in cfg.class_names or unknown:
            raise BundleError(
                f"bundle {cfg.name}: output channels {cfg.class_names} must include 'nucleus' and be "
                f"among {list(CHANNELS)}"
            )
        self.bundle = bundle
        self.settings = settings
        self.device = device
        self.mpp = float(cfg.mpp)
        self.representation = rep
        self.channels: list[str] = list(cfg.class_names)
        self.stain_target: ReinhardStats | None = (
            None
            if cfg.stain_target is None
            else ReinhardStats(mu=cfg.stain_target.mu, sigma=cfg.stain_target.sigma)
        )
        self.context_um = float(cfg.inference.get("context_um", _DEFAULT_CONTEXT_UM))
        th = cfg.thresholds
        self.thresholds = {
            "nucleus": float(
                settings.threshold if settings.threshold is not None else th.get("nucleus", 0.5)
            ),
            "marker": float(th.get("marker", 0.5)),
            "cell": float(th.get("cell", 0.5)),
            "detection": float(
                settings.min_detection_score
                if settings.min_detection_score is not None
                else th.get("detection", 0.0)
            ),
        }
        self.batch_size = int(settings.batch_size)
        self.cpu_bf16 = bool(cpu_bf16)
        self.candidate_path = resolve_candidate_path(settings.candidates, device)
        self.candidate_workers = (
            resolve_candidate_workers(settings.candidate_workers, device, batch_size=self.batch_size)
            if self.candidate_path == "cpu"
            else 0
        )
        if self.candidate_path == "torch" and settings.candidate_workers:
            logger.info("localization.candidate_workers is ignored: candidates are extracted on %s", device)
        if self.candidate_workers and multiprocessing.current_process().daemon:
            logger.info(
                "candidates are extracted in the device thread: this is a daemonic process (e.g. a "
                "Dask worker), which cannot start the candidate processes"
            )
            self.candidate_workers = 0
        self._pool: ProcessPoolExecutor | None = None
        model = bundle.build_model(device=device)
        if device.type not in ("mps",):
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self._mean = torch.tensor(cfg.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self._std = torch.tensor(cfg.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __repr__(self) -> str:
        return f"Localizer({self.bundle.name!r}, mpp={self.mpp}, device={self.device})"

    # -- the model -------------------------------------------------------------------------------
    def _forward(
        self, windows: torch.Tensor, window_mpp: float
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float]]:
        """Probabilities (B, K, h, w) and OD (B, h, w), float32 on the device, and the model step."""
        import torch

        if window_mpp <= 0:
            raise ValueError(f"window_mpp must be positive, got {window_mpp}")
        factor = self.mpp / float(window_mpp)
        probs: list[torch.Tensor] = []
        ods: list[torch.Tensor] = []
        step = (factor, factor)
        with torch.inference_mode(), autocast_context(self.device, cpu_bf16=self.cpu_bf16):
            for s in range(0, int(windows.shape[0]), self.batch_size):
                chunk = windows[s : s + self.batch_size].to(self.device, non_blocking=True)
                feats, od, step = model_input(chunk, representation=self.representation, factor=factor)
                x = (feats - self._mean) / self._std
                if self.device.type != "mps":
                    x = x.contiguous(memory_format=torch.channels_last)
                probs.append(torch.sigmoid(self.model(x).float()))
                ods.append(od)
        return torch.cat(probs), torch.cat(ods), step

    def predict(self, windows: torch.Tensor, *, window_mpp: float) -> torch.Tensor:
        """Probability maps (B, K, h, w) float32 of whole windows at the model's µm/px.

        Channel ``k`` is ``self.channels[k]``; model pixel ``j`` covers window pixels
        ``[j·f, (j+1)·f)`` with ``f = self.mpp / window_mpp`` (the maps may extend past the window
        by the padding to a multiple of 32 model pixels).
        """
        probs, _, _ = self._forward(windows, window_mpp)
        return probs

    def context_px(self, window_mpp: float) -> int:
        """Context around a core the model needs, in window pixels."""
        return math.ceil(self.context_um / window_mpp - 1e-9)

    def localize(self, windows: torch.Tensor, *, window_mpp: float, halo_px: int) -> list[CellTable]:
        """Candidates of each window (B, H, W, 3) uint8, normalized, read with ``halo_px`` of halo.

        The U-Net runs on the core plus ``min(halo_px, context)`` window pixels on each side; the
        returned tables are in the ``"window"`` frame (continuous px of the full window). Candidates in
        the halo are returned too: the caller settles which tile reports each (:class:`CoverageResolver`).
        """
        if windows.ndim != 4 or windows.shape[-1] != 3:
            raise ValueError(f"windows must be (B, H, W, 3), got shape {tuple(windows.shape)}")
        b, h, w, _ = (int(v) for v in windows.shape)
        if halo_px < 0 or 2 * halo_px >= min(h, w):
            raise ValueError(f"halo_px={halo_px} does not fit a {h}×{w} window")
        if b == 0:
            return []
        trim = halo_px - min(halo_px, self.context_px(window_mpp))
        crop = windows[:, trim : h - trim, trim : w - trim] if trim else windows
        probs_t, od_t, (sy, sx) = self._forward(crop, window_mpp)
        map_mpp = float(window_mpp) * (sy + sx) / 2.0
        ch = {name: i for i, name in enumerate(self.channels)}
        s = self.settings
        floor = self.thresholds["detection"]
        if self.candidate_path == "torch":
            from wsi_screen.candidates_torch import extract_candidates_torch

            found = extract_candidates_torch(
                probs_t[:, ch["nucleus"]],
                mpp=map_mpp,
                marker=probs_t[:, ch["marker"]] if "marker" in ch else None,
                cell=probs_t[:, ch["cell"]] if "cell" in ch else None,
                od=od_t,
                nucleus_threshold=self.thresholds["nucleus"],
                marker_threshold=self.thresholds["marker"],
                cell_threshold=self.thresholds["cell"],
                min_area_um2=s.min_nucleus_area_um2,
                max_area_um2=s.max_nucleus_area_um2,
                min_peak_distance_um=s.min_peak_distance_um,
                min_detection_score=floor,  # no outlines for the nuclei dropped below
            )
            return [_to_window(c, sx=sx, sy=sy, offset=float(trim)) for c in found]
        probs = probs_t.cpu().numpy()
        ods = od_t.cpu().numpy()
        jobs = [
            {
                "nucleus": probs[i, ch["nucleus"]],
                "mpp": map_mpp,
                "marker": probs[i, ch["marker"]] if "marker" in ch else None,
                "cell": probs[i, ch["cell"]] if "cell" in ch else None,
                "od": ods[i],
                "nucleus_threshold": self.thresholds["nucleus"],
                "marker_threshold": self.thresholds["marker"],
                "cell_threshold": self.thresholds["cell"],
                "min_area_um2": s.min_nucleus_area_um2,
                "max_area_um2": s.max_nucleus_area_um2,
                "min_peak_distance_um": s.min_peak_distance_um,
            }
            for i in range(b)
        ]
        out = [_to_window(c, sx=sx, sy=sy, offset=float(trim)) for c in self._extract(jobs)]
        if floor > 0:  # nuclei whose mean nucleus probability is low are mostly debris and cytoplasm
            out = [c.subset(c.detection_score >= floor) for c in out]
        return out

    def _extract(self, jobs: list[dict[str, Any]]) -> list[CellTable]:
        """:func:`extract_candidates` of each job, in order: in this thread, or spread over the
        candidate processes (``localization.candidate_workers``) when there are several jobs."""
        if self.candidate_workers == 0 or len(jobs) < 2:
            return [extract_candidates(**job) for job in jobs]
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")  # never fork a process holding CUDA or threads
            self._pool = ProcessPoolExecutor(max_workers=self.candidate_workers, mp_context=ctx)
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
            logger.debug("candidate extraction in %d processes", self.candidate_workers)
        try:
            return list(self._pool.map(_extract_job, jobs))
        except BrokenProcessPool as exc:
            self._pool = None
            raise RuntimeError(
                "a candidate-extraction process died (out of memory, or a script that screens slides "
                'without `if __name__ == "__main__":`); guard the script, or set '
                "localization.candidate_workers to fewer processes (0: extract in the device thread)"
            ) from exc

    def close(self) -> None:
        """Stop the candidate processes, if any were started (they start again when needed)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def resolve_candidate_path(requested: str, device: torch.device) -> Literal["cpu", "torch"]:
    """``cpu`` or ``torch`` for ``localization.candidates`` on ``device``.

    ``auto``: the torch path on CUDA, where the maps stay on the device and a batch is extracted at
    once (the CPU path held GPU runs far below the U-Net's speed); the CPU path elsewhere, where it is
    faster than the same torch code on the CPU (figures in ``docs/performance.md``, *GPU* and
    *Candidate extraction in torch*).
    """
    if requested == "auto":
        return "torch" if device.type == "cuda" else "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "torch":
        return "torch"
    raise ValueError(f"localization.candidates must be auto, cpu or torch, got {requested!r}")


def resolve_candidate_workers(requested: int | None, device: torch.device, *, batch_size: int) -> int:
    """Candidate processes for ``localization.candidate_workers`` on ``device`` (0: none).

    Automatic (None): on an accelerator the device thread would otherwise spend most of its time in
    CPU-bound candidate extraction, one tile after another, so every core but the device thread's
    extracts in parallel — no more processes than a device batch has tiles (``batch_size``), since
    that is all the work there is at a time; on the CPU the U-Net's own threads already use every core.
    """
    from wsi_screen.runtime import cpu_count

    if requested is not None:
        return int(requested)
    workers = min(cpu_count() - 1, int(batch_size))
    return workers if device.type != "cpu" and workers >= 2 else 0


def _extract_job(job: dict[str, Any]) -> CellTable:
    """One tile's candidates in a candidate process (a top-level function, so it pickles)."""
    return extract_candidates(**job)


def _to_window(c: CellTable, *, sx: float, sy: float, offset: float) -> CellTable:
    """Map a ``"map"`` table (a crop starting ``offset`` window px in) to the ``"window"`` frame."""
    scale = np.array([sx, sy], np.float32)
    return CellTable(
        x=offset + sx * c.x,
        y=offset + sy * c.y,
        tile=c.tile,
        detection_score=c.detection_score,
        morphometrics=c.morphometrics,
        outline_offsets=c.outline_offsets,
        outline_xy=np.float32(offset) + scale * c.outline_xy,
        probs=c.probs,
        frame="window",
    )


def localize_region(
    slide: Slide,
    x0: float,
    y0: float,
    w: float,
    h: float,
    *,
    localizer: Localizer,
    window_mpp: float | None = None,
    source: ReinhardStats | None = None,
    normalize: bool = True,
) -> CellTable:
    """Localize the nuclei of one level-0 region in a single window (no tiling).

    The region is read at ``window_mpp`` (default: the localizer's µm/px) with the model's context
    around it, normalized towards the bundle's stain target with ``source`` statistics (default: the
    region's own, glass masked), and localized at once. Returns the candidates whose centre lies in
    ``[x0, x0 + w) × [y0, y0 + h)``, a ``"level0"`` table (coordinates and outlines in level-0 px).
    Memory grows with the region: meant for tests, debugging and small regions.
    """
    import torch

    from wsi_screen.stain import glass_mask, lab_stats, reinhard

    mpp = float(window_mpp if window_mpp is not None else localizer.mpp)
    scale = mpp / slide.mpp  # level-0 px per window px
    margin = localizer.context_px(mpp)
    ww = math.ceil(w / scale - 1e-9) + 2 * margin
    wh = math.ceil(h / scale - 1e-9) + 2 * margin
    rx, ry = x0 - margin * scale, y0 - margin * scale
    window = slide.read_region((rx, ry), (ww, wh), mpp=mpp)
    batch = torch.from_numpy(np.require(window, requirements=["C", "W"])[None]).to(localizer.device)
    target = localizer.stain_target
    if normalize and target is not None:
        if source is None:
            glass = glass_mask(batch)
            if not bool(glass.all()):
                source = lab_stats(batch, mask=glass)
        if source is not None:
            batch = reinhard(batch, target, source=source)
    cands = localizer.localize(batch, window_mpp=mpp, halo_px=margin)[0]
    level0 = cands.transformed(scale=scale, offset_x=rx, offset_y=ry, frame="level0")
    inside = (level0.x >= x0) & (level0.x < x0 + w) & (level0.y >= y0) & (level0.y < y0 + h)
    return level0.subset(inside)


class CoverageResolver:
    """Exactly-once reporting of cells across tiles, even where tiles disagree at their core edges.

    Two tiles see a nucleus on their shared core edge through their halos, but their estimates of its
    centre differ slightly (different context, different resampling phase), so the plain ownership
    rule (``Tile.owns`` on each tile's own estimate) can give such a nucleus to both tiles or to
    neither. No rule applied by each tile alone can avoid that; this resolver settles it with the
    neighbours' results. With ``m`` = ``margin_um`` and ``d`` = ``merge_um`` (``2m > d``):

    - a cell in its tile's core, at least ``m`` from every core edge shared with another tile, is
      final at once (the plain rule); those within ``m + d`` of such an edge are also remembered;
    - a cell within ``m`` of a shared edge (either side) is held back until every tile that could
      also have seen it has been added. Remembered and held cells of different tiles closer than ``d``
      are then one cell: the version of one tile is kept — the tile that already reported it, else
      the tile owning the group's mean position, else the lowest-index tile;
    - anything else is another tile's.

    Memory is bounded: only cells near the edges of tiles whose neighbours are still to come are
    held. Usage (tables in level-0 px with ``tile`` set)::

        resolver = CoverageResolver(grid)
        for tile, cands in ...:                              # any order
            x, y = tile.to_level0(cands.x, cands.y)
            keep = resolver.candidates_mask(tile, x, y)      # instead of tile.owns(x, y)
            table = ...                                      # those cells, classified
            write(resolver.add(tile, table))
        write(resolver.finish())         # call resolver.skip(tile) for tiles that never come
    """

    def __init__(
        self,
        grid: TileGrid,
        *,
        margin_um: float = 3.0,
        merge_um: float = 3.0,
        tiles: Sequence[Tile] | None = None,
    ) -> None:
        if margin_um <= 0 or merge_um <= 0 or 2 * margin_um <= merge_um:
            raise ValueError(f"need 0 < merge_um < 2 × margin_um, got margin {margin_um}, merge {merge_um}")
        self.grid = grid
        self.margin = margin_um / grid.slide_mpp  # level-0 px
        self.merge = merge_um / grid.slide_mpp
        expected = tiles if tiles is not None else list(grid.tiles(kept_only=True))
        self._expected = {t.index for t in expected}
        self._done: set[int] = set()
        # Held cells: (table rows, alive mask, already-reported flags, involved tiles per row).
        self._groups: list[tuple[CellTable, NDArray[np.bool_], NDArray[np.bool_], list[frozenset[int]]]] = []

    @property
    def n_pending(self) -> int:
        """Cells held back (not yet reported), waiting for neighbouring tiles."""
        return int(sum(int((alive & ~done).sum()) for _, alive, done, _ in self._groups))

    def _shared(self, tile: Tile) -> tuple[bool, bool, bool, bool]:
        """Whether the left, right, top and bottom neighbours of ``tile`` will be processed."""
        cols, idx = self.grid.cols, tile.index
        exp = self._expected
        return (
            tile.col > 0 and idx - 1 in exp,
            tile.col < cols - 1 and idx + 1 in exp,
            tile.row > 0 and idx - cols in exp,
            tile.row < self.grid.rows - 1 and idx + cols in exp,
        )

    def _involved_tiles(self, x: float, y: float) -> frozenset[int]:
        reach = self.margin + self.merge
        xs, ys = self.grid.xs, self.grid.ys
        c0 = max(int(np.searchsorted(xs, x - reach, side="right")) - 1, 0)
        c1 = min(int(np.searchsorted(xs, x + reach, side="right")) - 1, self.grid.cols - 1)
        r0 = max(int(np.searchsorted(ys, y - reach, side="right")) - 1, 0)
        r1 = min(int(np.searchsorted(ys, y + reach, side="right")) - 1, self.grid.rows - 1)
        cols = self.grid.cols
        return frozenset(
            r * cols + c
            for r in range(r0, r1 + 1)
            for c in range(c0, c1 + 1)
            if r * cols + c in self._expected
        )

    def _box(self, tile: Tile, grow: float) -> tuple[float, float, float, float]:
        """The core moved outwards by ``grow`` (inwards if negative) on its shared edges only; on the
        slide's own border it is unbounded (a centre estimated just outside the slide stays its tile's)."""
        left, right, top, bottom = self._shared(tile)
        inf = math.inf
        return (
            -inf if tile.col == 0 else tile.x0 - (grow if left else 0.0),
            inf if tile.col == self.grid.cols - 1 else tile.x1 + (grow if right else 0.0),
            -inf if tile.row == 0 else tile.y0 - (grow if top else 0.0),
            inf if tile.row == self.grid.rows - 1 else tile.y1 + (grow if bottom else 0.0),
        )

    def candidates_mask(
        self, tile: Tile, x: NDArray[np.floating[Any]], y: NDArray[np.floating[Any]]
    ) -> NDArray[np.bool_]:
        """Which level-0 points ``tile`` may have to report: its core grown by the margin on shared edges.

        Cut crops and classify only these (a few percent more than ``Tile.owns``); pass them to :meth:`add`.
        """
        x0, x1, y0, y1 = self._box(tile, self.margin)
        xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
        out: NDArray[np.bool_] = (xa >= x0) & (xa < x1) & (ya >= y0) & (ya < y1)
        return out

    def add(self, tile: Tile, table: CellTable) -> CellTable:
        """The cells ``tile`` saw (level-0 px; at least those of :meth:`candidates_mask`); returns the
        cells that are now final."""
        x, y = np.asarray(table.x, np.float64), np.asarray(table.y, np.float64)

        def inside(box: tuple[float, float, float, float]) -> NDArray[np.bool_]:
            x0, x1, y0, y1 = box
            out: NDArray[np.bool_] = (x >= x0) & (x < x1) & (y >= y0) & (y < y1)
            return out

        interior = inside(self._box(tile, -self.margin))
        deep = inside(self._box(tile, -(self.margin + self.merge)))
        band = inside(self._box(tile, self.margin)) & ~interior
        remember = interior & ~deep
        held = band | remember
        if held.any():
            rows = table.subset(np.flatnonzero(held))
            involved = [self._involved_tiles(float(a), float(b)) for a, b in zip(rows.x, rows.y, strict=True)]
            self._groups.append((rows, np.ones(len(rows), bool), remember[held].copy(), involved))
        self._done.add(tile.index)
        return CellTable.concat([table.subset(np.flatnonzero(interior)), self._release(final=False)])

    def skip(self, tile: Tile) -> CellTable:
        """A tile that will never be added (unreadable); returns the cells that are now final."""
        self._expected.discard(tile.index)
        for _, _, _, involved in self._groups:
            for i, s in enumerate(involved):
                involved[i] = s - {tile.index}
        return self._release(final=False)

    def finish(self) -> CellTable:
        """Resolve and return every cell still held back (call once, after the last tile)."""
        return self._release(final=True)

    def _release(self, *, final: bool) -> CellTable:
        from scipy.sparse import coo_matrix
        from scipy.sparse.csgraph import connected_components
        from scipy.spatial import cKDTree

        refs = [(g, int(i)) for g, (_, alive, _, _) in enumerate(self._groups) for i in np.flatnonzero(alive)]
        if not refs:
            return CellTable.empty()
        xs = np.array([self._groups[g][0].x[i] for g, i in refs])
        ys = np.array([self._groups[g][0].y[i] for g, i in refs])
        tiles = np.array([int(self._groups[g][0].tile[i]) for g, i in refs])
        reported = np.array([bool(self._groups[g][2][i]) for g, i in refs])
        ready = np.array([final or self._groups[g][3][i] <= self._done for g, i in refs])
        n = len(refs)
        pairs = cKDTree(np.stack([xs, ys], 1)).query_pairs(self.merge, output_type="ndarray")
        if len(pairs):
            pairs = pairs[tiles[pairs[:, 0]] != tiles[pairs[:, 1]]]  # one tile's cells stay distinct
        graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n))
        _, comp = connected_components(graph, directed=False)
        keep: dict[int, list[int]] = {}
        for k in np.unique(comp):
            members = np.flatnonzero(comp == k)
            if not ready[members].all():
                continue
            member_tiles = tiles[members]
            if reported[members].any():
                winner = int(member_tiles[reported[members]][0])
            else:
                orow, ocol = self.grid.owner(xs[members].mean(), ys[members].mean())
                owner = int(orow) * self.grid.cols + int(ocol)
                winner = owner if (member_tiles == owner).any() else int(member_tiles.min())
            for j in members:
                g, i = refs[j]
                self._groups[g][1][i] = False
                if tiles[j] == winner and not reported[j]:
                    keep.setdefault(g, []).append(i)
        out = [self._groups[g][0].subset(idx) for g, idx in sorted(keep.items())]
        self._groups = [grp for grp in self._groups if grp[1].any()]
        return CellTable.concat(out) if out else CellTable.empty()
