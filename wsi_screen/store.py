"""``cells.zarr``: every cell of a slide and the tile grid that produced them (Zarr v3).

Layout (the public contract, see ``docs/outputs.md``)::

    cells.zarr/                 root attrs: class_names, abnormal_classes, models, mpp, slide,
      cells/                                wsi_screen_version, config, schema_version, complete
        x, y                    float64 (N,)    cell centre, level-0 px
        probs                   float32 (N, C)  class probabilities
        label                   int16   (N,)    arg-max class index
        score                   float32 (N,)    abnormality score in [0, 1]
        tile                    int32   (N,)    index of the owning tile (row * cols + col)
        detection_score         float32 (N,)
        <morphometric>          float32 (N,)    one array per column, units in the name
        outline_offsets         int64   (N+1,)  CSR offsets into outline_xy
        outline_xy              float32 (M, 2)  nucleus outline vertices, level-0 px
      tiles/                    attrs: the grid scalars (TileGrid.to_dict())
        x0, y0, x1, y1          int64   (T,)    tile cores, level-0 px, half-open
        row, col                int32   (T,)
        tissue_fraction         float32 (T,)
        keep                    bool    (T,)
        status                  uint8   (T,)    0 skipped, 1 done, 2 unreadable
        n_cells                 int64   (T,)
        focus                   float32 (T,)    sharpness figure, NaN where not computed

:class:`CellStoreWriter` appends cells incrementally: rows are buffered per array and written as
whole chunks (resize, then slice assignment), so memory stays bounded by about one chunk per array
whatever the slide size, and each chunk is encoded once. ``complete`` is set only by
:meth:`CellStoreWriter.close`; readers refuse a store without it (a crashed run).
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import DTypeLike, NDArray

from wsi_screen import __version__
from wsi_screen.cells import MORPHOMETRICS, CellTable, abnormality_score, predicted_labels
from wsi_screen.errors import WsiScreenError

if TYPE_CHECKING:
    from wsi_screen.tiling import TileGrid

__all__ = [
    "SCHEMA_VERSION",
    "TILE_DONE",
    "TILE_SKIPPED",
    "TILE_UNREADABLE",
    "CellStoreWriter",
    "IncompleteStoreError",
    "StoreError",
    "read_attrs",
    "read_cells",
    "read_column",
    "read_tiles",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

TILE_SKIPPED = 0
TILE_DONE = 1
TILE_UNREADABLE = 2

#: Root attributes the writer owns; callers cannot pass them in ``attrs``.
_RESERVED_ATTRS = ("class_names", "abnormal_classes", "schema_version", "complete")
#: Outline vertices per chunk, relative to cells per chunk (a nucleus outline has ~16-64 vertices).
_VERTICES_PER_CELL_CHUNK = 32
_TILE_CHUNK = 65536


class StoreError(WsiScreenError, OSError):
    """``cells.zarr`` is missing, unreadable or not a wsi-screen cell store."""


class IncompleteStoreError(StoreError):
    """``cells.zarr`` was never closed (the run crashed or is still writing)."""


class _Column:
    """One growing 1-D or 2-D array, written in whole chunks from a buffer."""

    def __init__(self, array: Any, chunk: int) -> None:
        self.array = array
        self.chunk = chunk
        self.written = int(array.shape[0])
        self.parts: list[NDArray[Any]] = []
        self.pending = 0

    def add(self, values: NDArray[Any]) -> None:
        if len(values):
            self.parts.append(values)
            self.pending += len(values)

    def flush(self, *, final: bool = False) -> None:
        n = self.pending if final else (self.pending // self.chunk) * self.chunk
        if n == 0:
            return
        data = self.parts[0] if len(self.parts) == 1 else np.concatenate(self.parts)
        head, rest = data[:n], data[n:]
        start = self.written
        self.array.resize((start + n, *self.array.shape[1:]))
        self.array[start : start + n] = head
        self.written += n
        self.parts = [rest] if len(rest) else []
        self.pending = len(rest)


def _json_safe(value: Any) -> Any:
    """Make ``value`` storable as Zarr (JSON) attributes: numpy scalars, tuples, paths, NaN → None."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, np.generic):
        return _json_safe(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


class CellStoreWriter:
    """Write ``cells.zarr`` incrementally.

    Args:
        path: the ``cells.zarr`` folder to create.
        class_names: classifier class names (columns of ``probs``).
        abnormal_classes: the classes summed into ``score``.
        attrs: further root attributes: ``models``, ``mpp``, ``slide`` (``path``, ``fingerprint``,
            ``dimensions``, ``mpp``, ``vendor``), ``config`` ... (``wsi_screen_version`` defaults to
            this package's version).
        chunk_cells: rows per chunk.
        overwrite: replace an existing store at ``path`` (otherwise that is an error).

    Use as a context manager, or call :meth:`close`; a store that was not closed stays marked
    incomplete.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        class_names: Sequence[str],
        abnormal_classes: Sequence[str],
        attrs: Mapping[str, Any] | None = None,
        chunk_cells: int = 65536,
        overwrite: bool = False,
    ) -> None:
        import zarr
        from zarr.codecs import ZstdCodec

        if chunk_cells < 1:
            raise ValueError(f"chunk_cells must be ≥ 1, got {chunk_cells}")
        if not class_names:
            raise ValueError("class_names must not be empty")
        unknown = [c for c in abnormal_classes if c not in class_names]
        if unknown:
            raise ValueError(f"abnormal classes {unknown} are not among {list(class_names)}")
        attrs = dict(attrs or {})
        clash = [k for k in _RESERVED_ATTRS if k in attrs]
        if clash:
            raise ValueError(f"attrs may not set {clash}: the writer owns them")
        self.path = Path(path)
        if self.path.exists():
            if not overwrite:
                raise StoreError(f"{self.path} already exists (pass overwrite=True to replace it)")
            shutil.rmtree(self.path) if self.path.is_dir() else self.path.unlink()
        self.class_names = [str(c) for c in class_names]
        self.abnormal_classes = [str(c) for c in abnormal_classes]
        self.chunk_cells = int(chunk_cells)
        self._root = zarr.open_group(self.path, mode="w", zarr_format=3)
        self._compressor = ZstdCodec(level=3)
        root_attrs: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "complete": False,
            "class_names": self.class_names,
            "abnormal_classes": self.abnormal_classes,
            "wsi_screen_version": __version__,
            "models": [],
            "mpp": None,
            "slide": {},
            "config": {},
        }
        root_attrs.update(_json_safe(attrs))
        self._root.attrs.update(root_attrs)
        self._cells = self._root.create_group("cells")
        self._columns: dict[str, _Column] = {}
        self._morph_names: list[str] | None = None
        self._n_cells = 0
        self._n_vertices = 0
        self._tile_counts = np.zeros(0, np.int64)
        self._tiles_written = False
        self._closed = False

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> CellStoreWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            logger.warning("cell store %s left incomplete after an error", self.path)

    # -- writing ---------------------------------------------------------------------------------
    @property
    def n_cells(self) -> int:
        """Cells appended so far."""
        return self._n_cells

    def _create(self, name: str, dtype: DTypeLike, width: int | None, chunk: int) -> None:
        shape: tuple[int, ...] = (0,) if width is None else (0, width)
        chunks: tuple[int, ...] = (chunk,) if width is None else (chunk, max(width, 1))
        array = self._cells.create_array(
            name, shape=shape, dtype=dtype, chunks=chunks, fill_value=0, compressors=self._compressor
        )
        self._columns[name] = _Column(array, chunk)

    def _init_columns(self, morph_names: Sequence[str]) -> None:
        c = self.chunk_cells
        n_classes = len(self.class_names)
        self._create("x", np.float64, None, c)
        self._create("y", np.float64, None, c)
        self._create("probs", np.float32, n_classes, c)
        self._create("label", np.int16, None, c)
        self._create("score", np.float32, None, c)
        self._create("tile", np.int32, None, c)
        self._create("detection_score", np.float32, None, c)
        for name in morph_names:
            self._create(name, np.float32, None, c)
        self._create("outline_offsets", np.int64, None, c)
        self._create("outline_xy", np.float32, 2, c * _VERTICES_PER_CELL_CHUNK)
        self._columns["outline_offsets"].add(np.zeros(1, np.int64))
        self._morph_names = list(morph_names)

    def append(self, table: CellTable) -> None:
        """Append classified cells (``table.probs`` must be N × len(class_names))."""
        if self._closed:
            raise RuntimeError("cell store is closed")
        if table.frame != "level0":
            raise ValueError(f"cells.zarr holds level-0 cells, got a table in the {table.frame} frame")
        n = len(table)
        n_classes = len(self.class_names)
        if table.probs.shape != (n, n_classes):
            raise ValueError(f"probs must be {n}×{n_classes} (classified cells), got {table.probs.shape}")
        reserved = {"x", "y", "probs", "label", "score", "tile", "detection_score"}
        reserved |= {"outline_offsets", "outline_xy"}
        bad = sorted(set(table.morphometrics) & reserved)
        if bad:
            raise ValueError(f"morphometric names {bad} clash with fixed cells.zarr arrays")
        if self._morph_names is None:
            self._init_columns(list(table.morphometrics))
        assert self._morph_names is not None
        if set(table.morphometrics) != set(self._morph_names):
            raise ValueError(
                f"morphometrics {sorted(table.morphometrics)} differ from the store's "
                f"{sorted(self._morph_names)}"
            )
        if n == 0:
            return
        probs = np.ascontiguousarray(table.probs, dtype=np.float32)
        cols = self._columns
        cols["x"].add(np.asarray(table.x, np.float64))
        cols["y"].add(np.asarray(table.y, np.float64))
        cols["probs"].add(probs)
        cols["label"].add(predicted_labels(probs))
        cols["score"].add(abnormality_score(probs, self.class_names, self.abnormal_classes))
        cols["tile"].add(np.asarray(table.tile, np.int32))
        cols["detection_score"].add(np.asarray(table.detection_score, np.float32))
        for name in self._morph_names:
            cols[name].add(np.asarray(table.morphometrics[name], np.float32))
        offsets = np.asarray(table.outline_offsets, np.int64)
        cols["outline_offsets"].add(offsets[1:] - offsets[0] + self._n_vertices)
        cols["outline_xy"].add(np.ascontiguousarray(table.outline_xy, dtype=np.float32))
        self._n_cells += n
        self._n_vertices += int(offsets[-1] - offsets[0])
        tiles = np.asarray(table.tile, np.int64)
        tiles = tiles[tiles >= 0]
        if len(tiles):
            counts = np.bincount(tiles)
            if len(counts) > len(self._tile_counts):
                self._tile_counts = np.pad(self._tile_counts, (0, len(counts) - len(self._tile_counts)))
            self._tile_counts[: len(counts)] += counts
        for col in cols.values():
            col.flush()

    def write_tiles(
        self,
        grid: TileGrid,
        status: NDArray[Any],
        n_cells: NDArray[Any] | None = None,
        focus: NDArray[Any] | None = None,
    ) -> None:
        """Record the tile grid: per-tile status (0 skipped, 1 done, 2 unreadable), cells and focus.

        Per-tile arrays may be (rows, cols) or flat in row-major order. ``n_cells`` defaults to the
        cells appended per tile index; ``focus`` to NaN.
        """
        n_tiles = grid.n_tiles

        def flat(values: NDArray[Any] | None, name: str, dtype: DTypeLike, fill: Any) -> NDArray[Any]:
            if values is None:
                return np.full(n_tiles, fill, dtype=dtype)
            arr = np.asarray(values).reshape(-1)
            if arr.shape != (n_tiles,):
                raise ValueError(f"{name} has {arr.size} values for a grid of {n_tiles} tiles")
            return arr.astype(dtype)

        status_arr = flat(status, "status", np.uint8, TILE_SKIPPED)
        if not np.isin(status_arr, (TILE_SKIPPED, TILE_DONE, TILE_UNREADABLE)).all():
            raise ValueError("tile status must be 0 (skipped), 1 (done) or 2 (unreadable)")
        if n_cells is None:
            counts = np.zeros(n_tiles, np.int64)
            m = min(n_tiles, len(self._tile_counts))
            counts[:m] = self._tile_counts[:m]
            n_cells_arr = counts
        else:
            n_cells_arr = flat(n_cells, "n_cells", np.int64, 0)
        focus_arr = flat(focus, "focus", np.float32, np.nan)
        rows, cols = np.divmod(np.arange(n_tiles, dtype=np.int64), max(grid.cols, 1))
        xs, ys = np.asarray(grid.xs, np.int64), np.asarray(grid.ys, np.int64)
        data: dict[str, NDArray[Any]] = {
            "x0": xs[cols],
            "y0": ys[rows],
            "x1": xs[cols + 1],
            "y1": ys[rows + 1],
            "row": rows.astype(np.int32),
            "col": cols.astype(np.int32),
            "tissue_fraction": np.asarray(grid.tissue_fraction, np.float32).reshape(-1),
            "keep": np.asarray(grid.keep, bool).reshape(-1),
            "status": status_arr,
            "n_cells": n_cells_arr,
            "focus": focus_arr,
        }
        self._write_tile_arrays(data, _json_safe(grid.to_dict()))

    def _write_tile_arrays(self, data: Mapping[str, NDArray[Any]], attrs: Mapping[str, Any]) -> None:
        if "tiles" in self._root:
            del self._root["tiles"]
        group = self._root.create_group("tiles")
        n = len(next(iter(data.values())))
        chunk = max(1, min(_TILE_CHUNK, n))
        for name, values in data.items():
            arr = group.create_array(
                name, shape=values.shape, dtype=values.dtype, chunks=(chunk,), compressors=self._compressor
            )
            if n:
                arr[:] = values
        group.attrs.update(dict(attrs))
        self._tiles_written = True

    def close(self) -> None:
        """Flush the buffers, write attributes and mark the store complete."""
        if self._closed:
            return
        if self._morph_names is None:
            self._init_columns(MORPHOMETRICS)
        assert self._morph_names is not None
        for col in self._columns.values():
            col.flush(final=True)
        if not self._tiles_written:
            logger.debug("no tile grid written to %s; storing an empty tiles group", self.path)
            empty: dict[str, NDArray[Any]] = {
                k: np.zeros(0, dt)
                for k, dt in (
                    ("x0", np.int64),
                    ("y0", np.int64),
                    ("x1", np.int64),
                    ("y1", np.int64),
                    ("row", np.int32),
                    ("col", np.int32),
                    ("tissue_fraction", np.float32),
                    ("keep", bool),
                    ("status", np.uint8),
                    ("n_cells", np.int64),
                    ("focus", np.float32),
                )
            }
            self._write_tile_arrays(empty, {"n_tiles": 0})
        self._cells.attrs.update(
            {
                "n_cells": self._n_cells,
                "n_vertices": self._n_vertices,
                "morphometrics": self._morph_names,
                "coordinates": "level-0 pixels, origin top-left",
            }
        )
        self._root.attrs["complete"] = True
        self._closed = True
        logger.debug("wrote %d cells to %s", self._n_cells, self.path)


# -- reading ---------------------------------------------------------------------------------------
def _open(path: str | Path, *, allow_incomplete: bool) -> Any:
    import zarr

    p = Path(path)
    if not p.exists():
        raise StoreError(f"no cell store at {p}")
    try:
        root = zarr.open_group(p, mode="r")
    except Exception as exc:  # zarr raises several types for a folder that is not a group
        raise StoreError(f"{p} is not a Zarr group ({type(exc).__name__}: {exc})") from None
    attrs = root.attrs.asdict()
    if "schema_version" not in attrs or "cells" not in root:
        raise StoreError(f"{p} is not a wsi-screen cells.zarr (no schema_version or cells group)")
    if int(str(attrs["schema_version"])) > SCHEMA_VERSION:
        raise StoreError(
            f"{p} has schema version {attrs['schema_version']}; this wsi-screen reads up to "
            f"{SCHEMA_VERSION} (upgrade wsi-screen)"
        )
    if not attrs.get("complete", False) and not allow_incomplete:
        raise IncompleteStoreError(
            f"{p} is incomplete (the run that wrote it did not finish); rerun the slide"
        )
    return root


def read_attrs(path: str | Path, *, allow_incomplete: bool = False) -> dict[str, Any]:
    """The root attributes of ``cells.zarr``."""
    return dict(_open(path, allow_incomplete=allow_incomplete).attrs.asdict())


def read_column(path: str | Path, name: str, *, allow_incomplete: bool = False) -> NDArray[Any]:
    """One array of the ``cells`` group (e.g. ``score``), without reading the others."""
    cells = _open(path, allow_incomplete=allow_incomplete)["cells"]
    if name not in cells:
        raise StoreError(f"{path} has no cells/{name} array")
    return np.asarray(cells[name][:])


def read_cells(path: str | Path, *, allow_incomplete: bool = False) -> tuple[CellTable, dict[str, Any]]:
    """Read every cell back as a :class:`CellTable`, with the root attributes."""
    root = _open(path, allow_incomplete=allow_incomplete)
    attrs = dict(root.attrs.asdict())
    cells = root["cells"]
    cattrs = cells.attrs.asdict()
    if "morphometrics" in cattrs:
        morph_names = list(cattrs["morphometrics"])
    else:  # an incomplete store: every 1-D float32 array that is not a fixed column
        fixed = {"x", "y", "probs", "label", "score", "tile", "detection_score"}
        fixed |= {"outline_offsets", "outline_xy"}
        morph_names = sorted(k for k in cells.array_keys() if k not in fixed)
    n_classes = len(attrs.get("class_names", []))
    if "x" not in cells:  # an incomplete store that never received a cell
        return CellTable.empty(n_classes), attrs
    row_arrays = ["x", "y", "probs", "tile", "detection_score", *morph_names]
    n = min(int(cells[k].shape[0]) for k in row_arrays)
    # An incomplete store may hold fewer offsets or vertices than rows: keep the whole cells.
    n = min(n, int(cells["outline_offsets"].shape[0]) - 1)
    offsets = np.asarray(cells["outline_offsets"][: n + 1], np.int64) if n > 0 else np.zeros(1, np.int64)
    n_vertices = int(cells["outline_xy"].shape[0])
    if n > 0 and offsets[-1] > n_vertices:
        n = int(np.searchsorted(offsets, n_vertices, side="right")) - 1
        offsets = offsets[: n + 1]
    n = max(n, 0)

    def get(name: str) -> NDArray[Any]:
        return np.asarray(cells[name][:n])

    table = CellTable(
        x=get("x"),
        y=get("y"),
        tile=get("tile"),
        detection_score=get("detection_score"),
        morphometrics={k: get(k) for k in morph_names},
        outline_offsets=offsets,
        outline_xy=np.asarray(cells["outline_xy"][: int(offsets[-1])]).reshape(-1, 2),
        probs=np.asarray(cells["probs"][:n]).reshape(n, n_classes),
    )
    return table, attrs


def read_tiles(path: str | Path, *, allow_incomplete: bool = False) -> dict[str, Any]:
    """The ``tiles`` group: each array by name, plus ``"grid"`` with the grid scalars."""
    root = _open(path, allow_incomplete=allow_incomplete)
    if "tiles" not in root:
        raise StoreError(f"{path} has no tiles group")
    group = root["tiles"]
    out: dict[str, Any] = {name: np.asarray(group[name][:]) for name in group.array_keys()}
    out["grid"] = dict(group.attrs.asdict())
    return out
