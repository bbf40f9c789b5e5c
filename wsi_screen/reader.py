"""The reader stage: tile windows decoded by a pool of threads, delivered in order, bounded.

OpenSlide, tiffslide and the direct TIFF path release the GIL while decoding, so threads decode in
parallel. Each thread opens its own handle on the slide (no lock contention inside the decoder); on
the direct TIFF path the handles share one decoded-tile cache, so the tiles under the overlapping
halos of neighbouring windows are decoded once (see :class:`wsi_screen.slide.Slide`). At most
``prefetch`` windows are in flight or waiting, which bounds memory whatever the slide size. Windows
come out in the order of the tiles given (grid order, or the bands of :func:`cache_order`), so
results are deterministic however the threads are scheduled. Window memory is recycled once the
consumer has dropped a window (:class:`wsi_screen.buffers.BufferPool`), so a steady stream of windows
does not fault in fresh pages for each.

With ``assemble=False`` (what the pipeline uses) the threads only decode: each window comes as the
decoded tiles it is cut from (:class:`wsi_screen.slide.RegionParts`), and the consumer pastes them
straight into its batch. That is one copy of each window's pixels instead of two (tiles → window →
batch), and it takes the window assembly, memory traffic the raw JPEG decode does not have, off the
reader threads.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
from numpy.typing import NDArray

from wsi_screen.buffers import BufferPool
from wsi_screen.errors import CorruptTileError
from wsi_screen.slide import RegionParts, Slide, ThreadHandles
from wsi_screen.tiling import Tile, TileGrid

__all__ = ["ReaderStats", "WindowRead", "band_columns", "cache_order", "iter_windows"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class WindowRead:
    """One tile's read window: its pixels (None when its tile data could not be decoded)."""

    tile: Tile
    parts: RegionParts | None
    error: str | None
    seconds: float

    @cached_property
    def window(self) -> NDArray[np.uint8] | None:
        """The window as one H×W×3 array (pasted together on first use when read as parts)."""
        return None if self.parts is None else self.parts.to_array()


@dataclass
class ReaderStats:
    """Busy time of the reader threads and how long the consumer waited for them."""

    workers: int = 0
    tiles: int = 0
    unreadable: int = 0
    busy_s: float = 0.0
    wall_s: float = 0.0
    consumer_wait_s: float = 0.0
    megapixels: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, seconds: float, pixels: int, *, failed: bool) -> None:
        with self._lock:
            self.busy_s += seconds
            self.tiles += 1
            self.megapixels += pixels / 1e6
            self.unreadable += int(failed)

    @property
    def idle_fraction(self) -> float:
        """Share of the reader threads' time spent waiting (queue full or no work)."""
        total = self.workers * self.wall_s
        return max(0.0, 1.0 - self.busy_s / total) if total > 0 else 0.0

    def to_dict(self) -> dict[str, float | int]:
        return {
            "workers": self.workers,
            "tiles": self.tiles,
            "unreadable": self.unreadable,
            "busy_s": round(self.busy_s, 4),
            "wall_s": round(self.wall_s, 4),
            "idle_fraction": round(self.idle_fraction, 4),
            "megapixels": round(self.megapixels, 3),
            "megapixels_per_s": round(self.megapixels / self.wall_s, 3) if self.wall_s else 0.0,
        }


def iter_windows(
    slide: Slide,
    tiles: Iterable[Tile],
    *,
    mpp: float,
    workers: int,
    prefetch: int,
    stats: ReaderStats | None = None,
    pool: int | None = None,
    assemble: bool = True,
) -> Iterator[WindowRead]:
    """Read each tile's window (core + halo at ``mpp``) with ``workers`` threads, in order.

    A tile whose data cannot be decoded yields ``parts=None`` (and ``window=None``) and the error
    text; other errors propagate. ``assemble``: the threads paste each window together (``parts``
    is then one array of its own); with False they deliver the decoded tiles under it instead
    (:meth:`Slide.read_region_parts`) for the consumer to paste where it needs them. ``pool``: at
    most this many window buffers are recycled, each once the consumer has dropped its window
    (:class:`~wsi_screen.buffers.BufferPool`; default ``2 × prefetch + 64``: the windows in flight
    plus a consumer's batches; 0: none). Only as many are kept as were alive at once.
    """
    workers = max(1, int(workers))
    prefetch = max(workers, int(prefetch))
    buffers = BufferPool(2 * prefetch + 64 if pool is None else pool)
    stats = stats if stats is not None else ReaderStats()
    stats.workers = workers
    handles = ThreadHandles(slide)
    handle = handles.get

    def read(tile: Tile) -> WindowRead:
        t0 = time.perf_counter()
        loc, size = (tile.read_x, tile.read_y), (tile.read_size, tile.read_size)
        parts: RegionParts | None
        try:
            if assemble:
                out = buffers.take((tile.read_size, tile.read_size, 3))
                parts = RegionParts.from_array(handle().read_region(loc, size, mpp=mpp, out=out))
            else:
                parts = handle().read_region_parts(loc, size, mpp=mpp)
            error = None
        except CorruptTileError as exc:
            parts, error = None, str(exc)
            logger.warning("tile %d (row %d, col %d) unreadable: %s", tile.index, tile.row, tile.col, exc)
        dt = time.perf_counter() - t0
        stats.add(dt, tile.read_size * tile.read_size, failed=parts is None)
        return WindowRead(tile=tile, parts=parts, error=error, seconds=dt)

    start = time.perf_counter()
    pending: deque[Future[WindowRead]] = deque()
    it = iter(tiles)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsi-reader") as executor:
            for tile in it:
                pending.append(executor.submit(read, tile))
                if len(pending) >= prefetch:
                    break
            while pending:
                t0 = time.perf_counter()
                result = pending.popleft().result()
                stats.consumer_wait_s += time.perf_counter() - t0
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(executor.submit(read, nxt))
                yield result
    finally:
        for f in pending:
            f.cancel()
        stats.wall_s = time.perf_counter() - start
        handles.close()


#: Bytes per cached pixel assumed when sizing bands (OpenSlide caches ARGB; the direct path RGB).
_CACHE_BYTES_PER_PX = 4
#: Height of a source tile assumed when sizing bands (level-0 px; scanners write 240–1024).
_SOURCE_TILE_PX = 512


def band_columns(grid: TileGrid, cache_bytes: int) -> int:
    """Grid columns per band such that the source tiles of a band's rows of windows fit the cache.

    Neighbouring rows of read windows share the source tiles under their halos. Read row by row
    across the whole slide, a tile decoded for one row is reused by the next only if the cache holds
    about a row of windows plus two source-tile rows, across the read width; on a wide slide
    (beyond ≈ 20,000–30,000 px for 1280-px windows and a 256 MiB cache) it does not, and those tiles are
    decoded twice. Bands of this many columns keep the working set within ¾ of the cache.
    """
    if cache_bytes <= 0:
        return max(1, grid.cols)
    rows_px = grid.read_size * grid.scale + 2 * _SOURCE_TILE_PX
    band_px = 0.75 * cache_bytes / (_CACHE_BYTES_PER_PX * rows_px)
    return max(2, min(grid.cols, int(band_px // max(1.0, grid.tile_size * grid.scale))))


def cache_order(tiles: Sequence[Tile], *, band_cols: int) -> list[Tile]:
    """``tiles`` in vertical bands of ``band_cols`` grid columns, row-major within each band.

    With ``band_cols`` ≥ the grid's columns this is plain row-major (grid) order.
    """
    band = max(1, int(band_cols))
    return sorted(tiles, key=lambda t: (t.col // band, t.row, t.col))
