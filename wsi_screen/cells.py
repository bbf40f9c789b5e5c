"""The per-cell table that flows from localization to classification, the Zarr store and the exports.

A :class:`CellTable` is columnar: equal-length numpy arrays, one row per cell, coordinates in level-0
pixels of the slide. Nucleus outlines are ragged, stored flat (``outline_xy``) with CSR offsets
(``outline_offsets``, length N + 1), the layout they also have in ``cells.zarr``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["MORPHOMETRICS", "CellTable", "abnormality_score", "predicted_labels"]

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


def _f32(n: int) -> NDArray[np.float32]:
    return np.zeros(n, dtype=np.float32)


@dataclass
class CellTable:
    """Columnar table of cells. ``probs``/``label``/``score`` stay empty until classification."""

    x: NDArray[np.float64]
    y: NDArray[np.float64]
    tile: NDArray[np.int32]
    detection_score: NDArray[np.float32]
    morphometrics: dict[str, NDArray[np.float32]]
    outline_offsets: NDArray[np.int64]
    outline_xy: NDArray[np.float32]
    probs: NDArray[np.float32] = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def __post_init__(self) -> None:
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
    def empty(cls, n_classes: int = 0) -> CellTable:
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
    ) -> CellTable:
        """Build a table from per-cell values and a list of (K, 2) outline polygons."""
        n = len(x)
        if len(outlines) != n:
            raise ValueError(f"{len(outlines)} outlines for {n} cells")
        lengths = np.array([len(o) for o in outlines], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
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
        )

    @classmethod
    def concat(cls, tables: Iterable[CellTable]) -> CellTable:
        """Row-wise concatenation."""
        parts = [t for t in tables]
        if not parts:
            return cls.empty()
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
        )

    # -- access ----------------------------------------------------------------------------------
    def outline(self, i: int) -> NDArray[np.float32]:
        """The nucleus outline of cell ``i`` as a (K, 2) array of level-0 (x, y)."""
        return self.outline_xy[self.outline_offsets[i] : self.outline_offsets[i + 1]]

    def subset(self, index: NDArray[Any] | Sequence[int]) -> CellTable:
        """Rows ``index`` (integer indices or a boolean mask), in that order."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64)
        outlines = [self.outline(int(i)) for i in idx]
        lengths = np.array([len(o) for o in outlines], dtype=np.int64)
        return CellTable(
            x=self.x[idx],
            y=self.y[idx],
            tile=self.tile[idx],
            detection_score=self.detection_score[idx],
            morphometrics={k: v[idx] for k, v in self.morphometrics.items()},
            outline_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            outline_xy=(np.concatenate(outlines) if len(outlines) else np.zeros((0, 2), np.float32)).astype(
                np.float32
            ),
            probs=self.probs[idx]
            if self.probs.size
            else np.zeros((len(idx), self.probs.shape[1]), np.float32),
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
