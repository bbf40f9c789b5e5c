"""The reader stage: tile windows decoded by a pool of threads, delivered in order, bounded.

OpenSlide and tiffslide release the GIL while decoding, so threads decode in parallel. Each thread
opens its own handle on the slide (no lock contention inside the decoder). At most ``prefetch``
windows are in flight or waiting, which bounds memory whatever the slide size. Windows come out in
grid order, so results are deterministic however the threads are scheduled.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from wsi_screen.errors import CorruptTileError
from wsi_screen.slide import Slide
from wsi_screen.tiling import Tile

__all__ = ["ReaderStats", "WindowRead", "iter_windows"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WindowRead:
    """One tile's read window (None when its tile data could not be decoded)."""

    tile: Tile
    window: NDArray[np.uint8] | None
    error: str | None
    seconds: float


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
) -> Iterator[WindowRead]:
    """Read each tile's window (core + halo at ``mpp``) with ``workers`` threads, in order.

    A tile whose data cannot be decoded yields ``window=None`` and the error text; other errors
    propagate.
    """
    workers = max(1, int(workers))
    prefetch = max(workers, int(prefetch))
    stats = stats if stats is not None else ReaderStats()
    stats.workers = workers
    local = threading.local()
    handles: list[Slide] = []
    handles_lock = threading.Lock()

    def handle() -> Slide:
        h: Slide | None = getattr(local, "slide", None)
        if h is None:
            h = slide.reopen()
            local.slide = h
            with handles_lock:
                handles.append(h)
        return h

    def read(tile: Tile) -> WindowRead:
        t0 = time.perf_counter()
        try:
            window = handle().read_region(
                (tile.read_x, tile.read_y), (tile.read_size, tile.read_size), mpp=mpp
            )
            error = None
        except CorruptTileError as exc:
            window, error = None, str(exc)
            logger.warning("tile %d (row %d, col %d) unreadable: %s", tile.index, tile.row, tile.col, exc)
        dt = time.perf_counter() - t0
        stats.add(dt, tile.read_size * tile.read_size, failed=window is None)
        return WindowRead(tile=tile, window=window, error=error, seconds=dt)

    start = time.perf_counter()
    pending: deque[Future[WindowRead]] = deque()
    it = iter(tiles)
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="wsi-reader") as pool:
            for tile in it:
                pending.append(pool.submit(read, tile))
                if len(pending) >= prefetch:
                    break
            while pending:
                t0 = time.perf_counter()
                result = pending.popleft().result()
                stats.consumer_wait_s += time.perf_counter() - t0
                nxt = next(it, None)
                if nxt is not None:
                    pending.append(pool.submit(read, nxt))
                yield result
    finally:
        for f in pending:
            f.cancel()
        stats.wall_s = time.perf_counter() - start
        for h in handles:
            h.close()
