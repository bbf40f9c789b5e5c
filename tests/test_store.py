"""cells.zarr: schema, incremental writes, round trips, incomplete stores."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from cellfactory import ABNORMAL, CLASSES, make_cells

from wsi_screen.cells import MORPHOMETRICS, CellTable, abnormality_score
from wsi_screen.errors import WsiScreenError
from wsi_screen.store import (
    SCHEMA_VERSION,
    TILE_DONE,
    TILE_SKIPPED,
    TILE_UNREADABLE,
    CellStoreWriter,
    IncompleteStoreError,
    StoreError,
    read_attrs,
    read_cells,
    read_column,
    read_tiles,
)
from wsi_screen.tiling import make_grid

ATTRS = {
    "models": [
        {"task": "localization", "name": "nuclei-unet-v1", "sha256": "a" * 64},
        {"task": "classification", "name": "cyto-synth-v1", "sha256": "b" * 64},
    ],
    "mpp": np.float64(0.25),
    "slide": {"path": Path("/x/s.svs"), "fingerprint": "f" * 32, "dimensions": (20000, 16000), "mpp": 0.25},
    "config": {"triage": {"confidence": 0.7}},
}


def _labels(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [CLASSES[i] for i in rng.integers(0, len(CLASSES), n)]


def _write(path: Path, tables: list[CellTable], chunk: int = 64) -> None:
    with CellStoreWriter(
        path, class_names=CLASSES, abnormal_classes=ABNORMAL, attrs=ATTRS, chunk_cells=chunk
    ) as w:
        for t in tables:
            w.append(t)


def test_schema_arrays_dtypes_and_attributes(tmp_path: Path) -> None:
    cells = make_cells(_labels(150), seed=1)
    path = tmp_path / "cells.zarr"
    grid = make_grid((2000, 1500), slide_mpp=0.25, mpp=0.5, tile_size=256)
    with CellStoreWriter(
        path, class_names=CLASSES, abnormal_classes=ABNORMAL, attrs=ATTRS, chunk_cells=64
    ) as w:
        w.append(cells)
        status = np.full((grid.rows, grid.cols), TILE_DONE)
        w.write_tiles(grid, status)

    meta = json.loads((path / "zarr.json").read_text())
    assert meta["zarr_format"] == 3 and meta["node_type"] == "group"
    root = zarr.open_group(path, mode="r")
    attrs = root.attrs.asdict()
    assert attrs["complete"] is True
    assert attrs["schema_version"] == SCHEMA_VERSION
    assert attrs["class_names"] == CLASSES and attrs["abnormal_classes"] == ABNORMAL
    assert attrs["models"][1]["sha256"] == "b" * 64
    assert attrs["mpp"] == 0.25 and attrs["slide"]["dimensions"] == [20000, 16000]
    assert attrs["slide"]["path"] == "/x/s.svs"
    assert attrs["wsi_screen_version"] and attrs["config"]["triage"]["confidence"] == 0.7

    g = root["cells"]
    n, m = 150, len(cells.outline_xy)
    expected = {
        "x": ((n,), np.float64),
        "y": ((n,), np.float64),
        "probs": ((n, len(CLASSES)), np.float32),
        "label": ((n,), np.int16),
        "score": ((n,), np.float32),
        "tile": ((n,), np.int32),
        "detection_score": ((n,), np.float32),
        "outline_offsets": ((n + 1,), np.int64),
        "outline_xy": ((m, 2), np.float32),
        **{k: ((n,), np.float32) for k in MORPHOMETRICS},
    }
    assert set(g.array_keys()) == set(expected)
    for name, (shape, dtype) in expected.items():
        assert g[name].shape == shape, name
        assert g[name].dtype == dtype, name
    assert g["x"].chunks == (64,)
    assert g.attrs["n_cells"] == n and g.attrs["morphometrics"] == list(MORPHOMETRICS)
    np.testing.assert_array_equal(g["label"][:], np.argmax(cells.probs, axis=1))
    np.testing.assert_allclose(g["score"][:], abnormality_score(cells.probs, CLASSES, ABNORMAL))
    assert ((g["score"][:] >= 0) & (g["score"][:] <= 1)).all()

    t = root["tiles"]
    assert t["status"].dtype == np.uint8 and t["focus"].dtype == np.float32
    assert t["x0"].dtype == np.int64 and t["keep"].dtype == bool
    assert t["x0"].shape == (grid.n_tiles,)
    assert t.attrs["rows"] == grid.rows and t.attrs["cols"] == grid.cols and t.attrs["mpp"] == 0.5


def test_incremental_odd_appends_equal_one_big_write(tmp_path: Path) -> None:
    sizes = [1, 63, 64, 130, 0, 7, 200, 65]
    tables = [make_cells(_labels(k, seed=i), seed=100 + i) for i, k in enumerate(sizes)]
    _write(tmp_path / "parts.zarr", tables)
    _write(tmp_path / "whole.zarr", [CellTable.concat(tables)])
    a = zarr.open_group(tmp_path / "parts.zarr", mode="r")["cells"]
    b = zarr.open_group(tmp_path / "whole.zarr", mode="r")["cells"]
    assert set(a.array_keys()) == set(b.array_keys())
    for name in a.array_keys():
        np.testing.assert_array_equal(a[name][:], b[name][:], err_msg=name)
    assert a["x"].shape == (sum(sizes),)

    back, _ = read_cells(tmp_path / "parts.zarr")
    whole = CellTable.concat(tables)
    np.testing.assert_array_equal(back.x, whole.x)
    np.testing.assert_array_equal(back.outline_offsets, whole.outline_offsets)
    np.testing.assert_array_equal(back.outline_xy, whole.outline_xy)
    np.testing.assert_array_equal(back.probs, whole.probs)
    for k in MORPHOMETRICS:
        np.testing.assert_array_equal(back.morphometrics[k], whole.morphometrics[k])
    for i in (0, 1, 64, 400, len(whole) - 1):
        np.testing.assert_array_equal(back.outline(i), whole.outline(i))


def test_buffers_stay_below_one_chunk(tmp_path: Path) -> None:
    chunk = 128
    with CellStoreWriter(
        tmp_path / "c.zarr", class_names=CLASSES, abnormal_classes=ABNORMAL, chunk_cells=chunk
    ) as w:
        for i in range(12):
            w.append(make_cells(_labels(97, seed=i), seed=i))
            pending = {k: c.pending for k, c in w._columns.items()}
            assert pending["x"] < chunk and pending["probs"] < chunk
            assert pending["outline_xy"] < w._columns["outline_xy"].chunk
        assert w.n_cells == 12 * 97


def test_round_trip_and_column_reads(tmp_path: Path) -> None:
    cells = make_cells(_labels(300), seed=3)
    path = tmp_path / "cells.zarr"
    _write(path, [cells], chunk=1024)
    back, attrs = read_cells(path)
    assert len(back) == 300 and attrs["complete"] is True
    np.testing.assert_array_equal(back.y, cells.y)
    np.testing.assert_array_equal(back.tile, cells.tile)
    np.testing.assert_array_equal(back.detection_score, cells.detection_score)
    np.testing.assert_array_equal(
        read_column(path, "score"), abnormality_score(cells.probs, CLASSES, ABNORMAL)
    )
    assert read_attrs(path)["slide"]["fingerprint"] == "f" * 32
    with pytest.raises(StoreError, match="no cells/nope"):
        read_column(path, "nope")


def test_empty_store_reads_back_empty(tmp_path: Path) -> None:
    path = tmp_path / "cells.zarr"
    CellStoreWriter(path, class_names=CLASSES, abnormal_classes=ABNORMAL).close()
    back, attrs = read_cells(path)
    assert len(back) == 0 and back.probs.shape == (0, len(CLASSES))
    assert set(back.morphometrics) == set(MORPHOMETRICS)
    assert attrs["complete"] is True
    assert read_tiles(path)["status"].shape == (0,)


def test_incomplete_store_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "cells.zarr"
    w = CellStoreWriter(path, class_names=CLASSES, abnormal_classes=ABNORMAL, chunk_cells=64)
    cells = make_cells(_labels(200), seed=5)
    w.append(cells)  # whole chunks are on disk, the rest is buffered; never closed
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        read_cells(path)
    assert isinstance(IncompleteStoreError("x"), WsiScreenError)
    partial, attrs = read_cells(path, allow_incomplete=True)
    assert attrs["complete"] is False
    # Whole cells only: a prefix of what was appended.
    assert 0 < len(partial) < 200
    np.testing.assert_array_equal(partial.x, cells.x[: len(partial)])
    np.testing.assert_array_equal(partial.outline_xy, cells.outline_xy[: len(partial.outline_xy)])
    empty_path = tmp_path / "never.zarr"
    CellStoreWriter(empty_path, class_names=CLASSES, abnormal_classes=ABNORMAL)
    assert len(read_cells(empty_path, allow_incomplete=True)[0]) == 0

    crashed = tmp_path / "crashed.zarr"

    def crash() -> None:
        with CellStoreWriter(crashed, class_names=CLASSES, abnormal_classes=ABNORMAL) as w2:
            w2.append(make_cells(_labels(10)))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        crash()
    assert read_attrs(crashed, allow_incomplete=True)["complete"] is False
    with pytest.raises(IncompleteStoreError):
        read_attrs(crashed)


def test_missing_or_foreign_paths(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no cell store"):
        read_cells(tmp_path / "absent.zarr")
    (tmp_path / "plain").mkdir()
    with pytest.raises(StoreError):
        read_cells(tmp_path / "plain")
    other = zarr.open_group(tmp_path / "other.zarr", mode="w", zarr_format=3)
    other.attrs["x"] = 1
    with pytest.raises(StoreError, match="not a wsi-screen"):
        read_cells(tmp_path / "other.zarr")
    _write(tmp_path / "exists.zarr", [])
    with pytest.raises(StoreError, match="already exists"):
        CellStoreWriter(tmp_path / "exists.zarr", class_names=CLASSES, abnormal_classes=ABNORMAL)
    CellStoreWriter(
        tmp_path / "exists.zarr", class_names=CLASSES, abnormal_classes=ABNORMAL, overwrite=True
    ).close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "cells.zarr"
    _write(path, [make_cells(_labels(5))])
    zarr.open_group(path, mode="r+").attrs["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(StoreError, match="upgrade"):
        read_cells(path)


def test_bad_input_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="abnormal classes"):
        CellStoreWriter(tmp_path / "a.zarr", class_names=CLASSES, abnormal_classes=["CIN3"])
    with pytest.raises(ValueError, match="owns"):
        CellStoreWriter(
            tmp_path / "b.zarr", class_names=CLASSES, abnormal_classes=[], attrs={"complete": True}
        )
    w = CellStoreWriter(tmp_path / "c.zarr", class_names=CLASSES, abnormal_classes=ABNORMAL)
    cells = make_cells(_labels(4))
    with pytest.raises(ValueError, match="probs"):
        w.append(cells.with_probs(np.ones((4, 3), np.float32) / 3))
    w.append(cells)
    fewer = CellTable(
        **{**cells.__dict__, "morphometrics": {"nucleus_area_um2": cells.morphometrics["nucleus_area_um2"]}}
    )
    with pytest.raises(ValueError, match="morphometrics"):
        w.append(fewer)
    w.close()
    with pytest.raises(RuntimeError, match="closed"):
        w.append(cells)


def test_tiles_group(tmp_path: Path) -> None:
    grid = make_grid((3000, 2000), slide_mpp=0.25, mpp=0.5, tile_size=512)  # 3 × 2 tiles
    assert (grid.rows, grid.cols) == (2, 3)
    # Cells in tiles 0, 0, 4 and 5.
    cells = make_cells(["NILM", "HSIL", "LSIL", "NILM"], seed=2)
    cells.tile[:] = [0, 0, 4, 5]
    status = np.array([TILE_DONE, TILE_SKIPPED, TILE_DONE, TILE_DONE, TILE_DONE, TILE_UNREADABLE])
    focus = np.array([[1.5, np.nan, 2.0], [3.0, 0.2, np.nan]])
    path = tmp_path / "cells.zarr"
    with CellStoreWriter(path, class_names=CLASSES, abnormal_classes=ABNORMAL) as w:
        w.append(cells)
        w.write_tiles(grid, status, focus=focus)
    tiles = read_tiles(path)
    np.testing.assert_array_equal(tiles["n_cells"], [2, 0, 0, 0, 1, 1])
    np.testing.assert_array_equal(tiles["status"], status)
    np.testing.assert_array_equal(tiles["row"], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(tiles["col"], [0, 1, 2, 0, 1, 2])
    np.testing.assert_array_equal(tiles["x0"], [0, 1024, 2048, 0, 1024, 2048])
    np.testing.assert_array_equal(tiles["x1"], [1024, 2048, 3000, 1024, 2048, 3000])
    np.testing.assert_array_equal(tiles["y1"], [1024, 1024, 1024, 2000, 2000, 2000])
    assert np.isnan(tiles["focus"][1]) and tiles["focus"][3] == pytest.approx(3.0)
    assert tiles["grid"] == grid.to_dict()

    w2 = CellStoreWriter(tmp_path / "d.zarr", class_names=CLASSES, abnormal_classes=ABNORMAL)
    with pytest.raises(ValueError, match="status"):
        w2.write_tiles(grid, np.full(6, 7))
    with pytest.raises(ValueError, match="6 tiles"):
        w2.write_tiles(grid, np.ones(5))
    w2.write_tiles(grid, np.ones(6), n_cells=np.arange(6))
    w2.close()
    np.testing.assert_array_equal(read_tiles(tmp_path / "d.zarr")["n_cells"], np.arange(6))
    assert np.isnan(read_tiles(tmp_path / "d.zarr")["focus"]).all()


@pytest.mark.slow
def test_million_cell_round_trip(tmp_path: Path) -> None:
    n, k, parts = 1_000_000, 8, 16
    rng = np.random.default_rng(0)
    ang = np.linspace(0, 2 * np.pi, k, endpoint=False)
    tables = []
    for _ in range(parts):
        m = n // parts
        cx, cy = rng.uniform(0, 1e5, m), rng.uniform(0, 1e5, m)
        xy = np.stack([cx[:, None] + 6 * np.cos(ang), cy[:, None] + 6 * np.sin(ang)], -1)
        tables.append(
            CellTable(
                x=cx,
                y=cy,
                tile=rng.integers(0, 4000, m).astype(np.int32),
                detection_score=rng.random(m).astype(np.float32),
                morphometrics={name: rng.random(m).astype(np.float32) for name in MORPHOMETRICS},
                outline_offsets=np.arange(m + 1, dtype=np.int64) * k,
                outline_xy=xy.reshape(-1, 2).astype(np.float32),
                probs=rng.dirichlet(np.ones(len(CLASSES)), m).astype(np.float32),
            )
        )
    path = tmp_path / "cells.zarr"
    t0 = time.perf_counter()
    _write(path, tables, chunk=65536)
    t1 = time.perf_counter()
    back, _ = read_cells(path)
    t2 = time.perf_counter()
    assert len(back) == n
    whole = CellTable.concat(tables)
    np.testing.assert_array_equal(back.x, whole.x)
    np.testing.assert_array_equal(back.probs, whole.probs)
    np.testing.assert_array_equal(back.outline_xy, whole.outline_xy)
    np.testing.assert_array_equal(back.outline_offsets, whole.outline_offsets)
    # Generous bounds (a loaded 2-core CI box): the point is "seconds", not minutes.
    assert t1 - t0 < 30, f"writing 1M cells took {t1 - t0:.1f} s"
    assert t2 - t1 < 15, f"reading 1M cells took {t2 - t1:.1f} s"
