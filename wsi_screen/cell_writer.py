"""Where the tile loop puts finished cells: the writer thread that appends them to ``cells.zarr``,
and an in-memory sink for screening without writing."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

from wsi_screen.cells import CellTable

__all__ = ["CellCollector", "CellWriter"]


class CellWriter(threading.Thread):
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


class CellCollector:
    """The finished cells in memory, in the order they came: one :class:`CellTable` at the end."""

    def __init__(self, n_classes: int) -> None:
        self.n_classes = int(n_classes)
        self._tables: list[CellTable] = []

    def put(self, table: CellTable) -> None:
        self._tables.append(table)

    def table(self) -> CellTable:
        """Every cell put, as one table whose morphometrics keep the first table's column order
        (the order ``cells.zarr`` stores them in)."""
        tables = [t for t in self._tables if len(t)]
        if not tables:
            return CellTable.empty(self.n_classes)
        out = CellTable.concat(tables)
        order = list(tables[0].morphometrics)
        order += [k for k in out.morphometrics if k not in order]
        out.morphometrics = {k: out.morphometrics[k] for k in order}
        return out
