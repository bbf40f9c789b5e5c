"""The tile loop: reader threads → device stage → finished cells, over every kept tile of a slide.

Used by screening (:func:`wsi_screen.pipeline.screen_slide`) and by training
(:func:`wsi_screen.train.data.pipeline_crops`), so both see the same tiles in the same order.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen.cell_writer import CellCollector, CellWriter
from wsi_screen.cells import CellTable
from wsi_screen.config import Settings
from wsi_screen.device_stage import BatchResult, TileProcessor
from wsi_screen.progress import progress as progress_bar
from wsi_screen.reader import ReaderStats, band_columns, cache_order, iter_windows
from wsi_screen.slide import RegionParts, Slide
from wsi_screen.tiling import Tile, TileGrid

__all__ = ["ProgressCallback", "TileLoopResult", "run_tiles"]

logger = logging.getLogger(__name__)

#: Called with (tiles done, tiles total) after each tile.
ProgressCallback = Callable[[int, int], None]
#: Called with each batch's tiles and the device stage's result, before its cells are settled.
BatchCallback = Callable[[Sequence[Tile], BatchResult], None]


@dataclass
class TileLoopResult:
    """What :func:`run_tiles` found: every cell once (in the order settled), and per tile its
    status (``store.TILE_*``), focus and the number of cells kept from it; ``stage``: per-stage
    busy/idle figures (``run.json`` ``stages``)."""

    cells: CellTable
    stage: dict[str, Any]
    status: NDArray[np.uint8]
    focus: list[float]
    n_tile_cells: NDArray[np.int64]

    @property
    def n_cells(self) -> int:
        return len(self.cells)


def run_tiles(
    slide: Slide,
    grid: TileGrid,
    processor: TileProcessor,
    *,
    settings: Settings,
    class_names: Sequence[str],
    store_path: Path | None = None,
    abnormal_classes: Sequence[str] = (),
    attrs: Mapping[str, Any] | None = None,
    progress: bool = False,
    on_tile: ProgressCallback | None = None,
    on_batch: BatchCallback | None = None,
) -> TileLoopResult:
    """Reader threads → device stage → finished cells, over every kept tile.

    With ``processor.coverage``, every processed tile's cells go through the resolver, which settles
    each cell once: at once away from shared core edges, in the edge bands once the neighbouring tiles
    are in (or known unreadable); ``n_tile_cells`` counts them by the tile whose version was kept.
    The cells are returned in memory; with ``store_path`` a writer thread also appends them to a
    ``cells.zarr`` there (with ``class_names``, ``abnormal_classes`` and root ``attrs``), closed
    complete with the tile records at the end. Nothing is written without ``store_path``.
    """
    from wsi_screen.store import TILE_DONE, TILE_SKIPPED, TILE_UNREADABLE, CellStoreWriter

    # In bands as wide as the slide reader's tile cache allows (row-major on all but very wide slides).
    band_cols = band_columns(grid, slide.cache_bytes)
    tiles = cache_order(list(grid.tiles(kept_only=True)), band_cols=band_cols)
    coverage = processor.coverage
    status = np.full(grid.n_tiles, TILE_SKIPPED, np.uint8)
    focus = [float("nan")] * grid.n_tiles
    n_tile_cells = np.zeros(grid.n_tiles, np.int64)
    workers = settings.reading.threads
    batch_tiles = max(1, settings.localization.batch_size)
    reader_stats = ReaderStats()
    device_busy = 0.0
    device_timings = dict.fromkeys(("assemble", "normalize", "localize", "crop", "classify"), 0.0)
    writer_block = 0.0
    collector = CellCollector(len(class_names))
    store: CellStoreWriter | None = None
    writer: CellWriter | None = None
    if store_path is not None:
        store = CellStoreWriter(
            store_path,
            class_names=class_names,
            abnormal_classes=abnormal_classes,
            attrs=attrs,
            chunk_cells=settings.output.zarr_chunk_cells,
        )
        writer = CellWriter(store, maxsize=max(2, settings.reading.queue_tiles))
        writer.start()
    bar = progress_bar(len(tiles), enabled=progress, desc=slide.path.name)
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
            if on_batch is not None:
                on_batch([t for t, _ in batch], res)
            for (tile, _), table, f in zip(batch, res.tables, res.focus, strict=True):
                status[tile.index] = TILE_DONE
                focus[tile.index] = f
                emit(table if coverage is None else coverage.add(tile, table))
            batch.clear()

        def emit(table: CellTable) -> None:
            """Queue cells that are final (with coverage: of this tile or of neighbours held back)."""
            nonlocal writer_block
            if not len(table):
                return
            np.add.at(n_tile_cells, np.asarray(table.tile, np.int64), 1)
            collector.put(table)
            if writer is not None:
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
        if writer is not None and store is not None:
            writer.finish()
            store.write_tiles(grid, status, n_tile_cells, np.asarray(focus, np.float32))
            store.close()
    finally:
        bar.close()
        if writer is not None and writer.is_alive():
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
            "busy_s": round(writer.busy_s if writer else 0.0, 4),
            "idle_s": round(writer.idle_s if writer else 0.0, 4),
            "idle_fraction": round(writer.idle_s / loop_s, 4) if loop_s and writer else 0.0,
            "device_blocked_s": round(writer_block, 4),
        },
        "timings": {"tiles": loop_s, **device_timings},
    }
    if math.isfinite(loop_s) and loop_s > 0:
        logger.debug("stages: %s", stage)
    return TileLoopResult(
        cells=collector.table(), stage=stage, status=status, focus=focus, n_tile_cells=n_tile_cells
    )
