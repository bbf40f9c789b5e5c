"""Boundary-shifted coverage: nuclei exactly on tile edges and corners are found once, never twice.

A synthetic slide (1024² px at 0.25 µm/px) holds cells whose nuclei are centred exactly on the edges and
corners of a grid of 256-px tile cores. Localization runs tile by tile — each tile read with a 32 µm
halo, its candidates settled by :class:`~wsi_screen.localize.CoverageResolver` — and on the whole region
at once (``localize_region``). Both must give the same nuclei (within one nucleus radius), every true
nucleus exactly once, and the nuclei on edges must be seen by several tiles (so the resolver, not luck,
is what removes the duplicates).

Tiles disagree slightly about the centre of a nucleus on their shared edge, so ``Tile.owns`` applied
by each tile to its own estimate can report such a nucleus twice or not at all (it does, on this
slide). The resolver applies the ownership rule away from core edges and settles the edge bands with the
neighbouring tiles' results; it is tested here on the model's real outputs, through ``run_slide`` on a
slide with nuclei on every edge and the corner of its 2×2 tiles (``test_run_slide_*``) and, in
``test_resolver_*``, on hand-made disagreeing estimates.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_screen.cells import CellTable
from wsi_screen.config import LocalizationSettings
from wsi_screen.localize import (
    CoverageResolver,
    Localizer,
    localize_region,
)
from wsi_screen.models import load_bundle
from wsi_screen.slide import open_slide
from wsi_screen.stain import glass_mask, lab_stats, reinhard
from wsi_screen.synth import CellSpec, synthesize_slide
from wsi_screen.synth.cells import cell_geometry, polygon_area, polygon_centroid
from wsi_screen.tiling import Tile, TileGrid, make_grid

MPP = 0.25
SIZE = 1024
TILE = 256
HALO_UM = 32.0
#: (nucleus centre x, y, kind, seed): corners and edges of the 256-px grid, and one interior cell.
PLACEMENTS = [
    (256.0, 256.0, "intermediate", 11),  # corner of 4 tiles
    (512.0, 512.0, "hsil", 12),  # corner
    (768.0, 256.0, "parabasal", 13),  # corner
    (256.0, 768.0, "superficial", 14),  # corner
    (768.0, 768.0, "intermediate", 15),  # corner
    (512.0, 150.0, "parabasal", 16),  # vertical edge
    (150.0, 512.0, "intermediate", 17),  # horizontal edge
    (900.0, 512.0, "hsil", 18),  # horizontal edge
    (512.0, 880.0, "intermediate", 19),  # vertical edge
    (384.0, 640.0, "parabasal", 20),  # inside a core
]


def _size_um(kind: str) -> float | None:
    """Squamous cells a little smaller than usual (38 µm) so that neighbours do not pile up."""
    return 38.0 if kind in ("intermediate", "superficial") else None


def _specs() -> list[CellSpec]:
    """Cells placed so that their (first) nucleus's centroid is exactly at the wanted point."""
    specs = []
    for x, y, kind, seed in PLACEMENTS:
        probe = cell_geometry(CellSpec(0.0, 0.0, kind, seed=seed, size_um=_size_um(kind)), MPP)
        dx, dy = polygon_centroid(probe.nuclei[0])
        specs.append(CellSpec(x - dx, y - dy, kind, seed=seed, size_um=_size_um(kind)))
    return specs


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("coverage") / "edges.tiff"
    res = synthesize_slide(
        path, size=(SIZE, SIZE), mpp=MPP, cells=_specs(), seed=5, stain="default", workers=1
    )
    for obj, (x, y, _, _) in zip(res.truth.objects, PLACEMENTS, strict=True):
        assert obj.nucleus_xy == pytest.approx((x, y), abs=1e-6)
    return path


@pytest.fixture(scope="module")
def localizer() -> Localizer:
    bundle = load_bundle("nuclei-unet-v1", task="localization")
    return Localizer(bundle, settings=LocalizationSettings(), device=torch.device("cpu"))


def _truth() -> tuple[np.ndarray, np.ndarray]:
    xy = np.array([(x, y) for x, y, _, _ in PLACEMENTS])
    radii = []
    for x, y, kind, seed in PLACEMENTS:
        geom = cell_geometry(CellSpec(x, y, kind, seed=seed, size_um=_size_um(kind)), MPP)
        radii.append(math.sqrt(polygon_area(geom.nuclei[0]) / math.pi))
    return xy, np.array(radii)


def test_boundary_shifted_coverage(slide_path: Path, localizer: Localizer) -> None:
    with open_slide(slide_path) as slide:
        grid = make_grid(slide.dimensions, slide_mpp=slide.mpp, mpp=MPP, tile_size=TILE, halo_um=HALO_UM)
        assert grid.rows == grid.cols == 4 and grid.halo == 128
        whole_img = slide.read_region((0, 0), (SIZE, SIZE), mpp=MPP)
        source = lab_stats(whole_img, mask=glass_mask(whole_img))  # one slide-level statistic
        target = localizer.stain_target
        assert target is not None
        tiles = list(grid.tiles(kept_only=False))
        windows = torch.from_numpy(
            np.stack(
                [slide.read_region((t.read_x, t.read_y), (t.read_size, t.read_size), mpp=MPP) for t in tiles]
            )
        )
        cands = localizer.localize(
            reinhard(windows, target, source=source), window_mpp=MPP, halo_px=grid.halo
        )
        whole = localize_region(slide, 0, 0, SIZE, SIZE, localizer=localizer, window_mpp=MPP, source=source)

    tables: list[CellTable] = []
    for tile, c in zip(tiles, cands, strict=True):
        lx, _ = tile.to_level0(c.x, c.y)
        level0 = c.transformed(scale=tile.scale, offset_x=tile.read_x, offset_y=tile.read_y, frame="level0")
        np.testing.assert_allclose(level0.x, lx)
        tables.append(
            CellTable.from_rows(
                x=level0.x,
                y=level0.y,
                outlines=level0.outlines,
                tile=tile.index,
                detection_score=level0.detection_score,
                morphometrics=level0.morphometrics,
            )
        )
    seen = CellTable.concat(tables)  # every tile's candidates, before coverage
    resolver = CoverageResolver(grid, tiles=tiles)
    for tile, table in zip(tiles, tables, strict=True):  # pre-filtering changes nothing
        keep = resolver.candidates_mask(tile, table.x, table.y)
        assert keep.sum() >= tile.owns(table.x, table.y).sum()
        tables[tile.index] = table.subset(np.flatnonzero(keep))
    results = []
    for order in (list(range(len(tiles))), list(reversed(range(len(tiles))))):
        resolver = CoverageResolver(grid, tiles=tiles)
        parts = [resolver.add(tiles[i], tables[i]) for i in order]
        parts.append(resolver.finish())
        assert resolver.n_pending == 0
        results.append(CellTable.concat(parts))
    a, b = results
    key_a = sorted(zip(a.x.round(6).tolist(), a.y.round(6).tolist(), strict=True))
    assert key_a == sorted(zip(b.x.round(6).tolist(), b.y.round(6).tolist(), strict=True))  # order-free
    tiled = CellTable.from_rows(
        x=a.x,
        y=a.y,
        detection_score=a.detection_score,
        morphometrics=a.morphometrics,
        outlines=[a.outline(i) for i in range(len(a))],
    )
    truth_xy, radii = _truth()

    def near(c: CellTable, k: int) -> int:
        return int((np.hypot(c.x - truth_xy[k, 0], c.y - truth_xy[k, 1]) <= radii[k]).sum())

    for k, (x, y, kind, _) in enumerate(PLACEMENTS):
        on_x, on_y = x % TILE == 0, y % TILE == 0
        assert near(tiled, k) == 1, f"{kind} nucleus at ({x}, {y}): {near(tiled, k)} owned detections"
        assert near(whole, k) == 1, f"{kind} nucleus at ({x}, {y}) missed by the whole-region pass"
        # Seen by both tiles of an edge and all four tiles of a corner (before ownership).
        assert near(seen, k) >= (4 if on_x and on_y else 2 if on_x or on_y else 1)

    # The tiled result and the whole-region result are the same set of nuclei.
    assert len(tiled) == len(whole)
    d = np.hypot(tiled.x[:, None] - whole.x[None, :], tiled.y[:, None] - whole.y[None, :])
    r_min = float(radii.min())
    assert np.all(d.min(axis=1) <= r_min) and np.all(d.min(axis=0) <= r_min)
    # Zero duplicates: no two owned detections closer than the smallest nucleus radius.
    dd = np.hypot(tiled.x[:, None] - tiled.x[None, :], tiled.y[:, None] - tiled.y[None, :])
    assert np.all(dd[np.triu_indices(len(tiled), 1)] > r_min)
    # Morphometrics agree (same nucleus, same pixels at the model's resolution, up to resampling).
    order = d.argmin(axis=1)
    a_t = tiled.morphometrics["nucleus_area_um2"]
    a_w = whole.morphometrics["nucleus_area_um2"][order]
    np.testing.assert_allclose(a_t, a_w, rtol=0.15)


#: run_slide on a 1024² slide of 2×2 tiles of 512² (the default 32 µm halo and 24 µm context): (nucleus
#: centre x, y, kind) on the corner, twice on each of the four half-edges and in two interiors. The edge
#: nuclei sit up to 1.1 px off the edge, where the tiles' own estimates of their centres (which err by up
#: to 1 px and differ between tiles by up to 0.2 px) fall on the edge: with ``Tile.owns`` alone (as
#: measured when this test was written), run_slide loses the nucleus at (511.73, 654) — each of tiles 2
#: and 3 puts its centre on the other's side — and reports the one at (150, 511.73) twice (tile 0: y =
#: 511.75, tile 2: y = 512.01).
RUN_PLACEMENTS = [
    (513.069, 511.184, "hsil"),  # the corner of all four tiles
    (511.291, 150.0, "parabasal"),  # vertical edge, tiles 0 | 1
    (512.331, 370.0, "intermediate"),
    (511.728, 654.0, "hsil"),  # vertical edge, tiles 2 | 3
    (511.972, 874.0, "parabasal"),
    (150.0, 511.729, "intermediate"),  # horizontal edge, tiles 0 / 2
    (370.0, 511.311, "parabasal"),
    (654.0, 512.174, "parabasal"),  # horizontal edge, tiles 1 / 3
    (874.0, 511.176, "intermediate"),
    (250.0, 250.0, "intermediate"),  # interiors
    (780.0, 780.0, "parabasal"),
]


def test_run_slide_reports_every_edge_and_corner_nucleus_once(tmp_path: Path) -> None:
    from wsi_screen.config import load_settings
    from wsi_screen.pipeline import load_models, run_slide
    from wsi_screen.store import read_cells, read_tiles

    specs = []
    for i, (x, y, kind) in enumerate(RUN_PLACEMENTS):
        size = _size_um(kind)
        probe = cell_geometry(CellSpec(0.0, 0.0, kind, seed=30 + i, size_um=size), MPP)
        dx, dy = polygon_centroid(probe.nuclei[0])
        specs.append(CellSpec(x - dx, y - dy, kind, seed=30 + i, size_um=size))
    path = tmp_path / "edges.tiff"
    synthesize_slide(path, size=(1024, 1024), mpp=MPP, cells=specs, seed=3, stain="default", workers=1)
    settings = load_settings(overrides={"tiling": {"tile_size_px": 512}, "output": {"report": False}})
    models = load_models(settings)
    result = run_slide(path, tmp_path / "out", settings=settings, models=models, progress=False)

    cells, _ = read_cells(result.out_dir / "cells.zarr")
    tiles = read_tiles(result.out_dir / "cells.zarr")
    assert (tiles["status"] == 1).all() and len(tiles["status"]) == 4  # all four tiles screened
    truth = np.array([(x, y) for x, y, _ in RUN_PLACEMENTS])
    d = np.hypot(cells.x[:, None] - truth[None, :, 0], cells.y[:, None] - truth[None, :, 1])
    per_nucleus = (d <= 2.0 / MPP).sum(axis=0).tolist()  # detections within 2 µm of each true centre
    assert per_nucleus == [1] * len(RUN_PLACEMENTS), list(zip(RUN_PLACEMENTS, per_nucleus, strict=True))
    assert len(cells) == len(RUN_PLACEMENTS)  # nothing else, no duplicates
    # Each cell is counted for the tile whose version was kept, one of the tiles whose window holds it.
    assert int(np.asarray(tiles["n_cells"]).sum()) == len(cells) == result.n_cells
    grid = make_grid((1024, 1024), slide_mpp=MPP, mpp=MPP, tile_size=512, halo_um=settings.tiling.halo_um)
    for k in range(len(cells)):
        t = grid.tile(int(cells.tile[k]) // grid.cols, int(cells.tile[k]) % grid.cols)
        px, py = t.to_window(cells.x[k], cells.y[k])
        assert 0 <= px < t.read_size and 0 <= py < t.read_size


def test_context_is_within_the_overhead_budget(localizer: Localizer) -> None:
    """The U-Net sees core + context: ≤ 1.5× the pixels of plain tiling for the pipeline's 1024² tiles."""
    window_mpp, core = 0.25, 1024
    factor = localizer.mpp / window_mpp
    ctx = localizer.context_px(window_mpp)
    plain = math.ceil(core / factor / 32) * 32
    covered = math.ceil((core + 2 * ctx) / factor / 32) * 32
    assert localizer.context_um >= 20.0  # ≥ largest nucleus radius (12 µm at 450 µm²) + receptive field
    assert (covered / plain) ** 2 <= 1.5


# -- the resolver on hand-made estimates ---------------------------------------------------------------


def _grid2() -> TileGrid:
    return make_grid((512, 512), slide_mpp=0.25, mpp=0.25, tile_size=256, halo_um=16.0)


def _table(tile: Tile, pts: list[tuple[float, float]]) -> CellTable:
    sq = np.array([[-2, -2], [2, -2], [2, 2], [-2, 2]], np.float32)
    return CellTable.from_rows(
        x=[p[0] for p in pts],
        y=[p[1] for p in pts],
        outlines=[sq + np.asarray(p, np.float32) for p in pts],
        tile=tile.index,
    )


def _resolve(grid: TileGrid, seen: dict[int, list[tuple[float, float]]], order: list[int]) -> CellTable:
    tiles = {t.index: t for t in grid.tiles(kept_only=False)}
    r = CoverageResolver(grid, margin_um=3.0, merge_um=3.0)
    parts = [r.add(tiles[i], _table(tiles[i], seen.get(i, []))) for i in order]
    parts.append(r.finish())
    return CellTable.concat(parts)


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 1, 0, 2]])
def test_resolver_settles_disagreeing_tiles(order: list[int]) -> None:
    grid = _grid2()  # cores [0,256) and [256,512) in x and y: tiles 0 1 / 2 3
    seen = {
        # a corner nucleus, estimated on the "wrong" side by every tile (plain ownership loses it)
        0: [(256.3, 256.2), (100.0, 100.0), (255.6, 40.0)],
        1: [(255.8, 256.1), (256.4, 40.1)],  # ... and an edge nucleus estimated on both sides
        2: [(256.1, 255.7)],
        3: [(255.9, 255.8), (300.0, 300.0)],
    }
    out = _resolve(grid, seen, order)
    got = sorted(zip(out.x.tolist(), out.y.tolist(), strict=True))
    assert len(got) == 4  # corner, edge, and the two interior nuclei: each exactly once
    assert (100.0, 100.0) in got and (300.0, 300.0) in got
    corner = [p for p in got if abs(p[0] - 256) < 2 and abs(p[1] - 256) < 2]
    edge = [p for p in got if abs(p[1] - 40) < 2]
    assert len(corner) == 1 and len(edge) == 1
    # The kept version is the one of the tile owning the mean position of the four estimates.
    mean = np.mean([(256.3, 256.2), (255.8, 256.1), (256.1, 255.7), (255.9, 255.8)], axis=0)
    row, col = grid.owner(mean[0], mean[1])
    k = int(np.flatnonzero((np.abs(out.x - 256) < 2) & (np.abs(out.y - 256) < 2))[0])
    assert int(out.tile[k]) == int(row) * grid.cols + int(col)


def test_resolver_keeps_single_detections_and_close_distinct_nuclei() -> None:
    grid = _grid2()
    seen = {
        0: [(257.5, 128.0)],  # seen only by tile 0, in tile 1's core: still reported once
        1: [(258.0, 244.0)],
        2: [(200.0, 257.0), (200.0, 250.0)],  # 7 px apart, one tile: two nuclei
        3: [],
    }
    out = _resolve(grid, seen, [0, 1, 2, 3])
    assert len(out) == 4
    # two nuclei of the same tile closer than merge_um stay two
    seen = {0: [(255.0, 100.0), (255.0, 104.0)], 1: [(255.2, 100.1)]}
    out = _resolve(grid, seen, [0, 1, 2, 3])
    assert len(out) == 2


def test_resolver_streams_and_skips() -> None:
    grid = _grid2()
    tiles = list(grid.tiles(kept_only=False))
    r = CoverageResolver(grid)
    first = r.add(tiles[0], _table(tiles[0], [(100.0, 100.0), (255.0, 100.0)]))
    assert len(first) == 1 and r.n_pending == 1  # the edge nucleus waits for tile 1
    assert len(r.add(tiles[1], _table(tiles[1], [(255.3, 100.2)]))) == 1 and r.n_pending == 0
    assert len(r.add(tiles[2], _table(tiles[2], [(100.0, 257.0)]))) == 1  # tiles 0 and 2 are done
    held = r.add(tiles[2], _table(tiles[2], [(250.0, 257.0)]))  # near the corner: tile 3 may see it
    assert len(held) == 0 and r.n_pending == 1
    released = r.skip(tiles[3])  # tile 3 will never come
    assert len(released) == 1 and r.n_pending == 0 and len(r.finish()) == 0


@pytest.mark.parametrize("jitter_px", [0.2, 1.0])
def test_resolver_reports_every_cell_once_on_a_large_grid(jitter_px: float) -> None:
    """15,000 cells on 10×10 tiles; every tile sees the cells of its window with its own estimate error."""
    grid = make_grid((10240, 10240), slide_mpp=0.25, mpp=0.25, tile_size=1024, halo_um=32.0)
    rng = np.random.default_rng(1)
    n = 15_000
    cx, cy = rng.uniform(0, 10240, n), rng.uniform(0, 10240, n)
    tiles = list(grid.tiles())
    r = CoverageResolver(grid)
    parts = []
    for t in rng.permutation(len(tiles)).tolist():
        tile = tiles[t]
        sel = np.flatnonzero(
            (cx >= tile.read_x)
            & (cx < tile.read_x + tile.read_size)
            & (cy >= tile.read_y)
            & (cy < tile.read_y + tile.read_size)
        )
        x = np.clip(cx[sel] + rng.normal(0, jitter_px, len(sel)), 0, 10239.99)
        y = np.clip(cy[sel] + rng.normal(0, jitter_px, len(sel)), 0, 10239.99)
        parts.append(
            r.add(
                tile, CellTable.from_rows(x=x, y=y, outlines=[np.zeros((3, 2))] * len(sel), tile=tile.index)
            )
        )
        assert r.n_pending < 1500  # bounded: only edge bands wait
    parts.append(r.finish())
    out = CellTable.concat(parts)
    assert len(out) == n
