"""CellTable: the coordinate-frame tag, per-row outlines, subsets and frame changes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cellfactory import ABNORMAL, CLASSES, make_cells

from wsi_screen.cells import FRAMES, MORPHOMETRICS, CellTable
from wsi_screen.store import CellStoreWriter
from wsi_screen.tiling import make_grid


def _table(n: int = 12, *, frame: str = "window", seed: int = 0) -> CellTable:
    rng = np.random.default_rng(seed)
    outlines = [rng.uniform(0, 600, (int(rng.integers(0, 9)), 2)).astype(np.float32) for _ in range(n)]
    return CellTable.from_rows(
        x=rng.uniform(0, 600, n),
        y=rng.uniform(0, 600, n),
        outlines=outlines,
        detection_score=rng.uniform(0, 1, n),
        morphometrics={k: rng.uniform(0, 9, n) for k in MORPHOMETRICS},
        frame=frame,  # type: ignore[arg-type]
    )


def test_frames_and_default() -> None:
    assert FRAMES == ("map", "window", "level0")
    assert CellTable.empty().frame == "level0"
    assert CellTable.empty(frame="map").frame == "map"
    assert _table(frame="map").frame == "map"
    with pytest.raises(ValueError, match="frame must be one of map, window, level0"):
        _table(frame="tile")


def test_outlines_view_is_per_row() -> None:
    t = _table()
    views = t.outlines
    assert len(views) == len(t)
    for i, poly in enumerate(views):
        np.testing.assert_array_equal(poly, t.outline(i))
        np.testing.assert_array_equal(views[i], t.outline(i))
        assert poly.dtype == np.float32 and poly.shape[1] == 2
    np.testing.assert_array_equal(views[-1], t.outline(len(t) - 1))
    assert [len(p) for p in views[2:5]] == [len(t.outline(i)) for i in range(2, 5)]
    with pytest.raises(IndexError):
        views[len(t)]
    assert list(CellTable.empty().outlines) == []


def test_subset_matches_rows() -> None:
    t = _table(20)
    for index in ([3, 0, 7, 7, 19], np.arange(20) % 3 == 0, np.zeros(0, np.int64)):
        s = t.subset(index)
        rows = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index, np.int64)
        assert len(s) == len(rows) and s.frame == "window"
        np.testing.assert_array_equal(s.x, t.x[rows])
        for j, i in enumerate(rows):
            np.testing.assert_array_equal(s.outline(j), t.outline(int(i)))
        assert s.outline_xy.dtype == np.float32 and s.outline_offsets.dtype == np.int64


def test_to_level0_changes_the_frame() -> None:
    grid = make_grid((5000, 5000), slide_mpp=0.25, mpp=0.5, tile_size=512, halo_um=32.0)
    tile = grid.tile(1, 2)
    w = _table()
    level0 = w.to_level0(tile)
    assert level0.frame == "level0" and w.frame == "window"
    assert (level0.tile == tile.index).all()
    lx, ly = tile.to_level0(w.x, w.y)
    np.testing.assert_array_equal(level0.x, lx)
    np.testing.assert_array_equal(level0.y, ly)
    with pytest.raises(ValueError, match="level0 frame"):
        level0.to_level0(tile)
    moved = w.transformed(scale=tile.scale, offset_x=tile.read_x, offset_y=tile.read_y, frame="level0")
    assert moved.frame == "level0"
    np.testing.assert_array_equal(moved.x, lx)
    np.testing.assert_array_equal(moved.outline_xy, level0.outline_xy)


def test_concat_refuses_mixed_frames() -> None:
    both = CellTable.concat([_table(frame="window"), _table(frame="window", seed=1)])
    assert both.frame == "window" and len(both) == 24
    with pytest.raises(ValueError, match="different frames: window and level0"):
        CellTable.concat([_table(frame="level0"), _table(frame="window")])


def test_store_refuses_non_level0_tables(tmp_path: Path) -> None:
    cells = make_cells(["NILM", "HSIL"])
    with CellStoreWriter(tmp_path / "c.zarr", class_names=CLASSES, abnormal_classes=ABNORMAL) as w:
        for frame in ("map", "window"):
            other = cells.transformed(scale=1.0, offset_x=0.0, offset_y=0.0, frame=frame)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match=f"level-0 cells, got a table in the {frame} frame"):
                w.append(other)
        w.append(cells)
        assert w.n_cells == 2
