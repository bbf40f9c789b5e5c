"""The one per-cell table of the pipeline: candidates of a U-Net map, of a tile window, and the cells
of a slide that flow to classification, the Zarr store and the exports.

A :class:`CellTable` is columnar: equal-length numpy arrays, one row per cell. Nucleus outlines are
ragged, stored flat (``outline_xy``, M × 2 float32 (x, y)) with CSR offsets (``outline_offsets``,
length N + 1), the layout they also have in ``cells.zarr``; :attr:`CellTable.outlines` gives them
per row without copying.

Every table says in which coordinate frame its ``x``/``y`` and outlines are (:attr:`CellTable.frame`,
one of :data:`FRAMES`); coordinates are continuous in each (pixel ``i`` spans ``[i, i + 1)``):

- ``"map"``: pixels of the U-Net's output probability map, at the model's µm/px, from the corner of
  the crop the U-Net saw (:func:`wsi_screen.candidates.extract_candidates` and
  :func:`wsi_screen.candidates_torch.extract_candidates_torch` return these);
- ``"window"``: pixels of a tile's read window (core + halo) at the tile grid's µm/px
  (``TileGrid.mpp``), what ``Localizer.localize`` returns and ``Tile.to_level0`` maps
  (:meth:`CellTable.to_level0`);
- ``"level0"``: level-0 pixels of the slide, the frame of ``cells.zarr``, the exports and
  :class:`~wsi_screen.localize.CoverageResolver`.

Tables of different frames never mix: :meth:`CellTable.concat` refuses them, and the cell store
accepts level-0 tables only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from itertools import pairwise
from typing import Any, Literal, Protocol, overload

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "FRAMES",
    "MORPHOMETRICS",
    "CellTable",
    "Frame",
    "Outlines",
    "abnormality_score",
    "predicted_labels",
]

#: Morphometric columns (float32), measured by localization; units in the names.
MORPHOMETRICS: tuple[str, ...] = (
    "nucleus_area_um2",
    "nucleus_perimeter_um",
    "nucleus_circularity",
    "nucleus_eccentricity",
    "nucleus_mean_od",
    "nucleus_integrated_od",
    "cell_area_um2",
    "nc_ratio",
)

#: The coordinate frame of a table (see the module documentation).
Frame = Literal["map", "window", "level0"]
#: Every frame, from the U-Net's map to the slide.
FRAMES: tuple[Frame, ...] = ("map", "window", "level0")


def _f32(n: int) -> NDArray[np.float32]:
    return np.zeros(n, dtype=np.float32)


class _Placed(Protocol):
    """What :meth:`CellTable.to_level0` needs of a tile (:class:`wsi_screen.tiling.Tile`)."""

    @property
    def index(self) -> int: ...

    def to_level0(self, px: Any, py: Any) -> tuple[NDArray[np.float64], NDArray[np.float64]]: ...


class Outlines(Sequence[NDArray[np.float32]]):
    """The outlines of a table per row: ``outlines[i]`` is row ``i``'s (K, 2) float32 polygon of (x, y),
    a view into the table's flat ``outline_xy`` (nothing is copied)."""

    __slots__ = ("_offsets", "_xy")

    def __init__(self, xy: NDArray[np.float32], offsets: NDArray[np.int64]) -> None:
        self._xy = xy
        self._offsets = offsets

    def __len__(self) -> int:
        return len(self._offsets) - 1

    @overload
    def __getitem__(self, i: int) -> NDArray[np.float32]: ...

    @overload
    def __getitem__(self, i: slice) -> list[NDArray[np.float32]]: ...

    def __getitem__(self, i: int | slice) -> NDArray[np.float32] | list[NDArray[np.float32]]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        j = int(i) + n if i < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"outline {i} of {n}")
        return self._xy[self._offsets[j] : self._offsets[j + 1]]

    def __iter__(self) -> Iterator[NDArray[np.float32]]:
        bounds = self._offsets.tolist()
        xy = self._xy
        for a, b in pairwise(bounds):
            yield xy[a:b]


@dataclass
class CellTable:
    """Columnar table of cells in one coordinate :attr:`frame`.

    ``probs`` stays empty until classification; ``tile`` is the grid index of the tile a cell came from
    (0 before a table is placed on the slide); ``label_image`` is the instance label image of the map
    a ``"map"`` table was extracted from, when asked for (pixel value ``i + 1`` is row ``i``, 0 is
    background; the other methods drop it, since their rows no longer match it).
    """

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    tile: NDArray[np.int32]
    detection_score: NDArray[np.float32]
    morphometrics: dict[str, NDArray[np.float32]]
    outline_offsets: NDArray[np.int64]
    outline_xy: NDArray[np.float32]
    probs: NDArray[np.float32] = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    frame: Frame = "level0"
    label_image: NDArray[np.int32] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.frame not in FRAMES:
            raise ValueError(f"frame must be one of {', '.join(FRAMES)}, got {self.frame!r}")
        n = len(self.x)
        for name in ("y", "tile", "detection_score"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"column {name} has {len(getattr(self, name))} rows, expected {n}")
        for name, col in self.morphometrics.items():
            if len(col) != n:
                raise ValueError(f"morphometric {name} has {len(col)} rows, expected {n}")
        if len(self.outline_offsets) != n + 1:
            raise ValueError(f"outline_offsets must have {n + 1} entries, got {len(self.outline_offsets)}")
        if self.outline_xy.ndim != 2 or self.outline_xy.shape[1] != 2:
            raise ValueError(f"outline_xy must be M×2, got {self.outline_xy.shape}")
        if int(self.outline_offsets[-1]) != len(self.outline_xy):
            raise ValueError("outline_offsets[-1] must equal len(outline_xy)")
        if self.probs.size and self.probs.shape[0] != n:
            raise ValueError(f"probs has {self.probs.shape[0]} rows, expected {n}")

    def __len__(self) -> int:
        return len(self.x)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def empty(cls, n_classes: int = 0, *, frame: Frame = "level0") -> CellTable:
        """A table with no rows."""
        return cls(
            x=np.zeros(0, np.float64),
            y=np.zeros(0, np.float64),
            tile=np.zeros(0, np.int32),
            detection_score=_f32(0),
            morphometrics={k: _f32(0) for k in MORPHOMETRICS},
            outline_offsets=np.zeros(1, np.int64),
            outline_xy=np.zeros((0, 2), np.float32),
            probs=np.zeros((0, n_classes), np.float32),
            frame=frame,
        )

    @classmethod
    def from_rows(
        cls,
        *,
        x: Sequence[float] | NDArray[Any],
        y: Sequence[float] | NDArray[Any],
        outlines: Sequence[NDArray[Any]],
        tile: Sequence[int] | NDArray[Any] | int = 0,
        detection_score: Sequence[float] | NDArray[Any] | None = None,
        morphometrics: Mapping[str, Sequence[float] | NDArray[Any]] | None = None,
        probs: NDArray[Any] | None = None,
        frame: Frame = "level0",
        label_image: NDArray[np.int32] | None = None,
    ) -> CellTable:
        """Build a table from per-cell values and a list of (K, 2) outline polygons (flattened once)."""
        n = len(x)
        if len(outlines) != n:
            raise ValueError(f"{len(outlines)} outlines for {n} cells")
        lengths = np.fromiter((len(o) for o in outlines), np.int64, count=n)
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        xy = (
            np.concatenate([np.asarray(o, np.float32).reshape(-1, 2) for o in outlines])
            if n
            else np.zeros((0, 2), np.float32)
        )
        morph = {k: _f32(n) for k in MORPHOMETRICS}
        for k, v in (morphometrics or {}).items():
            morph[k] = np.asarray(v, dtype=np.float32)
        tiles = np.full(n, tile, np.int32) if isinstance(tile, int) else np.asarray(tile, np.int32)
        return cls(
            x=np.asarray(x, np.float64),
            y=np.asarray(y, np.float64),
            tile=tiles,
            detection_score=(
                np.ones(n, np.float32) if detection_score is None else np.asarray(detection_score, np.float32)
            ),
            morphometrics=morph,
            outline_offsets=offsets,
            outline_xy=xy,
            probs=np.zeros((n, 0), np.float32) if probs is None else np.asarray(probs, np.float32),
            frame=frame,
            label_image=label_image,
        )

    @classmethod
    def concat(cls, tables: Iterable[CellTable]) -> CellTable:
        """Row-wise concatenation of tables of one frame (no tables: an empty level-0 table)."""
        parts = [t for t in tables]
        if not parts:
            return cls.empty()
        frames = sorted({t.frame for t in parts}, key=FRAMES.index)
        if len(frames) > 1:
            raise ValueError(f"cannot concatenate cell tables of different frames: {' and '.join(frames)}")
        keys = sorted(set().union(*(t.morphometrics for t in parts)))
        offsets = [np.zeros(1, np.int64)]
        base = 0
        for t in parts:
            offsets.append(t.outline_offsets[1:] + base)
            base += len(t.outline_xy)
        probs_parts = [t.probs for t in parts if len(t)]
        width = max((p.shape[1] for p in probs_parts), default=0)
        return cls(
            x=np.concatenate([t.x for t in parts]),
            y=np.concatenate([t.y for t in parts]),
            tile=np.concatenate([t.tile for t in parts]),
            detection_score=np.concatenate([t.detection_score for t in parts]),
            morphometrics={
                k: np.concatenate(
                    [t.morphometrics.get(k, np.full(len(t), np.nan, np.float32)) for t in parts]
                )
                for k in keys
            },
            outline_offsets=np.concatenate(offsets),
            outline_xy=np.concatenate([t.outline_xy for t in parts]),
            probs=(
                np.concatenate([p for p in probs_parts])
                if width
                else np.zeros((sum(map(len, parts)), 0), np.float32)
            ),
            frame=frames[0],
        )

    # -- access ----------------------------------------------------------------------------------
    @property
    def outlines(self) -> Outlines:
        """The nucleus outlines per row (views into ``outline_xy``): ``outlines[i]`` is :meth:`outline`."""
        return Outlines(self.outline_xy, self.outline_offsets)

    def outline(self, i: int) -> NDArray[np.float32]:
        """The nucleus outline of cell ``i`` as a (K, 2) array of (x, y) in the table's frame."""
        return self.outline_xy[self.outline_offsets[i] : self.outline_offsets[i + 1]]

    def subset(self, index: NDArray[Any] | Sequence[int]) -> CellTable:
        """Rows ``index`` (integer indices or a boolean mask), in that order, in the same frame."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        starts = self.outline_offsets[:-1][idx]
        lengths = self.outline_offsets[1:][idx] - starts
        offsets = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        # Vertex j of the new table is vertex starts[row] + (j - offsets[row]) of this one.
        at = np.repeat(starts - offsets[:-1], lengths) + np.arange(int(offsets[-1]), dtype=np.int64)
        return CellTable(
            x=self.x[idx],
            y=self.y[idx],
            tile=self.tile[idx],
            detection_score=self.detection_score[idx],
            morphometrics={k: v[idx] for k, v in self.morphometrics.items()},
            outline_offsets=offsets,
            outline_xy=self.outline_xy[at].astype(np.float32),
            probs=self.probs[idx]
            if self.probs.size
            else np.zeros((len(idx), self.probs.shape[1]), np.float32),
            frame=self.frame,
        )

    def transformed(self, *, scale: float, offset_x: float, offset_y: float, frame: Frame) -> CellTable:
        """A copy in ``frame`` with coordinates ``offset + scale · (x, y)`` (outlines too, computed in
        float64 and stored as float32); the other columns are shared."""
        off = np.array([offset_x, offset_y], np.float64)
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(
            x=offset_x + scale * self.x,
            y=offset_y + scale * self.y,
            outline_xy=(off + scale * self.outline_xy.astype(np.float64)).astype(np.float32),
            frame=frame,
            label_image=None,
        )
        return CellTable(**values)

    def to_level0(self, tile: _Placed) -> CellTable:
        """This ``"window"`` table of ``tile`` in level-0 px (``tile.to_level0``), ``tile`` set to the
        tile's index; morphometrics the table lacks are 0."""
        if self.frame != "window":
            raise ValueError(f"to_level0 maps a window-frame table, this one is in the {self.frame} frame")
        n = len(self)
        lx, ly = tile.to_level0(self.x, self.y)
        xy = self.outline_xy.astype(np.float64)
        px, py = tile.to_level0(xy[:, 0], xy[:, 1])
        outline_xy = np.empty((len(xy), 2), np.float32)
        outline_xy[:, 0] = px
        outline_xy[:, 1] = py
        morph = {k: np.zeros(n, np.float32) for k in MORPHOMETRICS}
        morph.update({k: np.asarray(v, np.float32) for k, v in self.morphometrics.items()})
        return CellTable(
            x=np.asarray(lx, np.float64),
            y=np.asarray(ly, np.float64),
            tile=np.full(n, tile.index, np.int32),
            detection_score=np.asarray(self.detection_score, np.float32),
            morphometrics=morph,
            outline_offsets=np.asarray(self.outline_offsets, np.int64),
            outline_xy=outline_xy,
            probs=self.probs if self.probs.size else np.zeros((n, self.probs.shape[1]), np.float32),
            frame="level0",
        )

    def with_probs(self, probs: NDArray[Any]) -> CellTable:
        """A copy sharing all columns, with class probabilities set."""
        probs = np.asarray(probs, np.float32)
        if probs.ndim != 2 or probs.shape[0] != len(self):
            raise ValueError(f"probs must be {len(self)}×C, got {probs.shape}")
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["probs"] = probs
        return CellTable(**values)

    def columns(self) -> dict[str, NDArray[Any]]:
        """Every fixed-length column by name (morphometrics flattened in)."""
        cols: dict[str, NDArray[Any]] = {
            "x": self.x,
            "y": self.y,
            "tile": self.tile,
            "detection_score": self.detection_score,
        }
        cols.update(self.morphometrics)
        return cols


def predicted_labels(probs: NDArray[Any]) -> NDArray[np.int16]:
    """Arg-max class index of each row (``label`` in ``cells.zarr``)."""
    if probs.shape[0] == 0:
        return np.zeros(0, np.int16)
    return np.asarray(np.argmax(probs, axis=1), dtype=np.int16)


def abnormality_score(
    probs: NDArray[Any], class_names: Sequence[str], abnormal_classes: Sequence[str]
) -> NDArray[np.float32]:
    """Per-cell abnormality score in [0, 1]: the summed probability of the abnormal classes."""
    missing = [c for c in abnormal_classes if c not in class_names]
    if missing:
        raise ValueError(f"abnormal classes {missing} are not among {list(class_names)}")
    idx = [list(class_names).index(c) for c in abnormal_classes]
    if not idx or probs.shape[0] == 0:
        return np.zeros(probs.shape[0], np.float32)
    score: NDArray[np.float32] = np.clip(probs[:, idx].sum(axis=1), 0.0, 1.0).astype(np.float32)
    return score
