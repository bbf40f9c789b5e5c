"""The tile grid and the geometry of boundary-shifted coverage.

The slide is cut into non-overlapping tile *cores* of ``tile_size`` pixels at the model's µm/px. Core
boundaries are integer level-0 coordinates (``xs``, ``ys``), so the cores partition the slide exactly:
every level-0 pixel belongs to exactly one core, whatever the ratio of slide and model resolution.

**Boundary-shifted coverage.** Each tile is read with a *halo* of context on every side (the read
window), so a nucleus cut by a core edge is seen whole by the tile on either side. Detections are
made on the whole window, then kept only by the tile whose core contains the detection's centre
(half-open intervals ``[x0, x1) × [y0, y1)``): a cell on an edge or a corner is found by every tile
that sees it but reported by exactly one. The halo must exceed the largest nucleus radius plus the
model's context, and half the classifier crop, so that edge cells also get full crops.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["Tile", "TileGrid", "boundaries", "make_grid", "tissue_fractions"]


def boundaries(length: int, step: float) -> NDArray[np.int64]:
    """Integer cut points ``0 = b0 < b1 < … < bn = length`` every ``step`` level-0 pixels."""
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    n = max(1, math.ceil(length / step - 1e-9))
    cuts = np.round(np.arange(n + 1, dtype=np.float64) * step).astype(np.int64)
    cuts[-1] = length
    return np.unique(np.clip(cuts, 0, length))


@dataclass(frozen=True)
class Tile:
    """One tile of the grid: its core (owned area) and its read window (core plus halo)."""

    index: int
    row: int
    col: int
    x0: int
    y0: int
    x1: int
    y1: int
    tissue_fraction: float
    keep: bool
    #: level-0 position of the read window's top-left pixel (fractional)
    read_x: float
    read_y: float
    #: read window side in pixels at the model µm/px (``tile_size + 2 * halo``)
    read_size: int
    #: level-0 pixels per model pixel
    scale: float

    @property
    def core(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) in level-0 pixels, half-open."""
        return self.x0, self.y0, self.x1, self.y1

    def to_level0(self, px: ArrayLike, py: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Map continuous window coordinates (model px; pixel ``i`` spans ``[i, i+1)``) to level-0.

        Index-based positions (e.g. a ``regionprops`` centroid) need ``+ 0.5`` first.
        """
        x = self.read_x + np.asarray(px, dtype=np.float64) * self.scale
        y = self.read_y + np.asarray(py, dtype=np.float64) * self.scale
        return x, y

    def to_window(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        """Map level-0 coordinates to window pixel coordinates (inverse of :meth:`to_level0`)."""
        px = (np.asarray(x, dtype=np.float64) - self.read_x) / self.scale
        py = (np.asarray(y, dtype=np.float64) - self.read_y) / self.scale
        return px, py

    def owns(self, x: ArrayLike, y: ArrayLike) -> NDArray[np.bool_]:
        """Whether level-0 points fall in this tile's core (the ownership rule)."""
        xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        return (xa >= self.x0) & (xa < self.x1) & (ya >= self.y0) & (ya < self.y1)


@dataclass(frozen=True)
class TileGrid:
    """The grid of tiles over a slide at the model's resolution."""

    width: int
    height: int
    slide_mpp: float
    mpp: float
    tile_size: int
    halo: int
    xs: NDArray[np.int64]
    ys: NDArray[np.int64]
    tissue_fraction: NDArray[np.float32]
    keep: NDArray[np.bool_]

    @property
    def scale(self) -> float:
        """Level-0 pixels per model pixel."""
        return self.mpp / self.slide_mpp

    @property
    def rows(self) -> int:
        return len(self.ys) - 1

    @property
    def cols(self) -> int:
        return len(self.xs) - 1

    @property
    def n_tiles(self) -> int:
        return self.rows * self.cols

    @property
    def n_kept(self) -> int:
        return int(self.keep.sum())

    @property
    def read_size(self) -> int:
        """Read-window side in model pixels."""
        return self.tile_size + 2 * self.halo

    def tile(self, row: int, col: int) -> Tile:
        """The tile at (row, col)."""
        if not (0 <= row < self.rows and 0 <= col < self.cols):
            raise IndexError(f"tile ({row}, {col}) outside the {self.rows}×{self.cols} grid")
        x0, x1 = int(self.xs[col]), int(self.xs[col + 1])
        y0, y1 = int(self.ys[row]), int(self.ys[row + 1])
        s = self.scale
        return Tile(
            index=row * self.cols + col,
            row=row,
            col=col,
            x0=x0,
            y0=y0,
            x1=x1,
            y1=y1,
            tissue_fraction=float(self.tissue_fraction[row, col]),
            keep=bool(self.keep[row, col]),
            read_x=x0 - self.halo * s,
            read_y=y0 - self.halo * s,
            read_size=self.read_size,
            scale=s,
        )

    def tiles(self, *, kept_only: bool = True) -> Iterator[Tile]:
        """Tiles in row-major order (the order that reuses a slide reader's tile cache best)."""
        for r in range(self.rows):
            for c in range(self.cols):
                if not kept_only or self.keep[r, c]:
                    yield self.tile(r, c)

    def owner(self, x: ArrayLike, y: ArrayLike) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """(row, col) of the core owning each level-0 point; -1 outside the slide."""
        xa, ya = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        col = np.searchsorted(self.xs, xa, side="right") - 1
        row = np.searchsorted(self.ys, ya, side="right") - 1
        bad = (xa < 0) | (ya < 0) | (xa >= self.width) | (ya >= self.height)
        col = np.where(bad, -1, col)
        row = np.where(bad, -1, row)
        return row.astype(np.int64), col.astype(np.int64)

    def to_dict(self) -> dict[str, Any]:
        """Scalars of the grid (the arrays go to ``cells.zarr/tiles``)."""
        return {
            "width": self.width,
            "height": self.height,
            "slide_mpp": self.slide_mpp,
            "mpp": self.mpp,
            "tile_size": self.tile_size,
            "halo": self.halo,
            "rows": self.rows,
            "cols": self.cols,
            "n_tiles": self.n_tiles,
            "n_kept": self.n_kept,
        }


def tissue_fractions(
    mask: NDArray[np.bool_], mask_mpp: float, slide_mpp: float, xs: NDArray[np.int64], ys: NDArray[np.int64]
) -> NDArray[np.float32]:
    """Fraction of each core covered by ``mask`` (a thumbnail mask at ``mask_mpp`` µm/px)."""
    factor = slide_mpp / mask_mpp  # mask pixels per level-0 pixel
    h, w = mask.shape
    integral = np.zeros((h + 1, w + 1), dtype=np.int64)
    integral[1:, 1:] = np.cumsum(np.cumsum(mask.astype(np.int64), axis=0), axis=1)
    mx = np.clip(np.round(xs * factor).astype(np.int64), 0, w)
    my = np.clip(np.round(ys * factor).astype(np.int64), 0, h)
    x0, x1 = mx[:-1][None, :], mx[1:][None, :]
    y0, y1 = my[:-1][:, None], my[1:][:, None]
    # Cores smaller than one mask pixel still sample the mask pixel they fall in.
    x1 = np.maximum(x1, np.minimum(x0 + 1, w))
    y1 = np.maximum(y1, np.minimum(y0 + 1, h))
    area = (x1 - x0) * (y1 - y0)
    covered = integral[y1, x1] - integral[y0, x1] - integral[y1, x0] + integral[y0, x0]
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(area > 0, covered / np.maximum(area, 1), 0.0)
    return frac.astype(np.float32)


def make_grid(
    dimensions: tuple[int, int],
    *,
    slide_mpp: float,
    mpp: float,
    tile_size: int = 1024,
    halo_um: float = 32.0,
    mask: NDArray[np.bool_] | None = None,
    mask_mpp: float | None = None,
    min_tissue_fraction: float = 0.0,
) -> TileGrid:
    """Build the tile grid of a slide.

    Args:
        dimensions: level-0 (width, height) in pixels.
        slide_mpp: level-0 µm/px of the slide.
        mpp: µm/px at which the models run (tiles are ``tile_size`` px there).
        tile_size: core side in model pixels.
        halo_um: context read around each core, in µm (rounded up to whole model pixels).
        mask: cell-region mask from :mod:`wsi_screen.tissue` (None: every tile is kept).
        mask_mpp: µm/px of ``mask``.
        min_tissue_fraction: tiles whose core has less cellular area are skipped.
    """
    width, height = int(dimensions[0]), int(dimensions[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"slide dimensions must be positive, got {width}×{height}")
    if slide_mpp <= 0 or mpp <= 0:
        raise ValueError(f"µm/px must be positive, got slide_mpp={slide_mpp}, mpp={mpp}")
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if halo_um < 0:
        raise ValueError(f"halo_um must be ≥ 0, got {halo_um}")
    scale = mpp / slide_mpp
    step = tile_size * scale
    xs, ys = boundaries(width, step), boundaries(height, step)
    halo = math.ceil(halo_um / mpp - 1e-9)
    if mask is not None:
        if mask_mpp is None:
            raise ValueError("mask_mpp is required with a mask")
        frac = tissue_fractions(mask, mask_mpp, slide_mpp, xs, ys)
    else:
        frac = np.ones((len(ys) - 1, len(xs) - 1), dtype=np.float32)
    keep = frac >= min_tissue_fraction
    if mask is not None:
        keep &= frac > 0
    return TileGrid(
        width=width,
        height=height,
        slide_mpp=float(slide_mpp),
        mpp=float(mpp),
        tile_size=int(tile_size),
        halo=halo,
        xs=xs,
        ys=ys,
        tissue_fraction=frac,
        keep=keep,
    )
