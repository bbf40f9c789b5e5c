"""Tile grid geometry and the boundary-shifted coverage ownership rule."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wsi_screen.tiling import boundaries, make_grid, tissue_fractions


@given(
    width=st.integers(1, 50_000),
    height=st.integers(1, 50_000),
    slide_mpp=st.floats(0.1, 1.0),
    tile=st.sampled_from([256, 512, 1024]),
)
@settings(max_examples=200, deadline=None)
def test_cores_partition_the_slide(width: int, height: int, slide_mpp: float, tile: int) -> None:
    grid = make_grid((width, height), slide_mpp=slide_mpp, mpp=0.25, tile_size=tile)
    for cuts, length in ((grid.xs, width), (grid.ys, height)):
        assert cuts[0] == 0 and cuts[-1] == length
        assert np.all(np.diff(cuts) > 0)
        # Cores are tile_size model pixels wide (±1 level-0 px of rounding), except the last.
        step = tile * 0.25 / slide_mpp
        assert np.all(np.abs(np.diff(cuts)[:-1] - step) <= 1.0)
        assert np.diff(cuts)[-1] <= step + 1.0
    assert grid.n_tiles == grid.rows * grid.cols
    # As few tiles as cover the slide: one fewer would leave more than a rounding pixel uncovered.
    step = tile * 0.25 / slide_mpp
    for n, length in ((grid.cols, width), (grid.rows, height)):
        assert (n - 1) * step < length - 0.5 <= n * step


def test_every_level0_pixel_owned_by_exactly_one_core() -> None:
    width, height = 3001, 2333
    grid = make_grid((width, height), slide_mpp=0.499, mpp=0.25, tile_size=512)
    owners = np.zeros((height, width), dtype=np.int32)
    for t in grid.tiles(kept_only=False):
        owners[t.y0 : t.y1, t.x0 : t.x1] += 1
    assert owners.min() == 1 and owners.max() == 1
    # owner() agrees with the cores, and tile.owns() with owner().
    rng = np.random.default_rng(0)
    x = rng.uniform(0, width, 5000)
    y = rng.uniform(0, height, 5000)
    rows, cols = grid.owner(x, y)
    for t in grid.tiles(kept_only=False):
        mine = (rows == t.row) & (cols == t.col)
        np.testing.assert_array_equal(mine, t.owns(x, y))


def test_points_on_edges_and_corners_have_one_owner() -> None:
    grid = make_grid((4096, 4096), slide_mpp=0.25, mpp=0.25, tile_size=1024)
    edge_points = [(1024.0, 500.0), (500.0, 2048.0), (1024.0, 1024.0), (3072.0, 3072.0), (0.0, 0.0)]
    for x, y in edge_points:
        n = sum(bool(t.owns(x, y)) for t in grid.tiles(kept_only=False))
        assert n == 1, (x, y)
    # Half-open rule: a point exactly on a boundary belongs to the tile to its right/below.
    rows, cols = grid.owner([1024.0], [1024.0])
    assert (rows[0], cols[0]) == (1, 1)
    assert grid.owner([4096.0], [10.0])[1][0] == -1


def test_read_window_contains_core_with_halo() -> None:
    grid = make_grid((5000, 4000), slide_mpp=0.5, mpp=0.25, tile_size=1024, halo_um=32.0)
    assert grid.halo == 128
    assert grid.read_size == 1280
    for t in grid.tiles(kept_only=False):
        wx0, wy0 = t.to_level0(0, 0)
        wx1, wy1 = t.to_level0(t.read_size, t.read_size)
        halo0 = grid.halo * grid.scale
        assert wx0 <= t.x0 - halo0 + 1e-9 and wy0 <= t.y0 - halo0 + 1e-9
        assert wx1 >= t.x1 + halo0 - 1.0 and wy1 >= t.y1 + halo0 - 1.0
        # Round trip of the window mapping.
        px, py = t.to_window(*t.to_level0(37.5, 900.25))
        assert px == pytest.approx(37.5) and py == pytest.approx(900.25)


def test_tissue_fraction_and_keep_decision() -> None:
    # Mask at 4 µm/px over a 4096² slide at 0.25 µm/px: 256² mask; cells only in the left half.
    mask = np.zeros((256, 256), dtype=bool)
    mask[:, :128] = True
    mask[10, 200] = True  # one speck in the right half
    grid = make_grid(
        (4096, 4096),
        slide_mpp=0.25,
        mpp=0.25,
        tile_size=1024,
        mask=mask,
        mask_mpp=4.0,
        min_tissue_fraction=0.01,
    )
    assert grid.tissue_fraction.shape == (4, 4)
    np.testing.assert_allclose(grid.tissue_fraction[:, :2], 1.0)
    np.testing.assert_allclose(grid.tissue_fraction[1:, 2:], 0.0)
    assert 0 < grid.tissue_fraction[0, 3] < 0.01
    assert grid.keep[:, :2].all() and not grid.keep[:, 2:].any()
    assert grid.n_kept == 8


def test_tissue_fractions_match_brute_force() -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((97, 131)) > 0.7
    xs = boundaries(131 * 8, 8 * 20.3)
    ys = boundaries(97 * 8, 8 * 20.3)
    frac = tissue_fractions(mask, 2.0, 0.25, xs, ys)
    for r in range(len(ys) - 1):
        for c in range(len(xs) - 1):
            x0, x1 = round(xs[c] / 8), round(xs[c + 1] / 8)
            y0, y1 = round(ys[r] / 8), round(ys[r + 1] / 8)
            assert frac[r, c] == pytest.approx(mask[y0:y1, x0:x1].mean(), abs=1e-6)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        make_grid((0, 10), slide_mpp=0.25, mpp=0.25)
    with pytest.raises(ValueError, match="mask_mpp"):
        make_grid((10, 10), slide_mpp=0.25, mpp=0.25, mask=np.ones((2, 2), bool))
    with pytest.raises(IndexError):
        make_grid((10, 10), slide_mpp=0.25, mpp=0.25).tile(5, 0)
