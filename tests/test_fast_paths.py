"""The performance paths give the same results as the straightforward ones.

- Direct TIFF tile reading (``Slide(direct=True)``) returns exactly the backends' pixels, decodes each
  tile once for overlapping windows read by several threads, and reports corrupt tiles as such.
- The device stage's vectorised outline mapping and focus measure equal the per-cell / per-tile loops.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import torch

from wsi_screen.cells import CellTable
from wsi_screen.errors import CorruptTileError
from wsi_screen.reader import iter_windows
from wsi_screen.slide import Slide
from wsi_screen.tiling import make_grid


@pytest.fixture(scope="module")
def jpeg_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsi_screen.synth import synthesize_slide

    path = tmp_path_factory.mktemp("direct") / "s.tiff"
    synthesize_slide(path, size=(2300, 1900), seed=3, tile_size=256, workers=1, write_truth=False)
    return path


def _regions(slide: Slide, n: int, seed: int) -> list[tuple[tuple[float, float], tuple[int, int], float]]:
    rng = np.random.default_rng(seed)
    w, h = slide.dimensions
    out = []
    for _ in range(n):
        loc = (float(rng.uniform(-300, w)), float(rng.uniform(-300, h)))
        size = (int(rng.integers(1, 700)), int(rng.integers(1, 700)))
        out.append((loc, size, slide.mpp * float(rng.choice([1.0, 1.37, 2.0, 4.3]))))
    return out


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_direct_path_equals_backend(jpeg_slide: Path, backend: str) -> None:
    with (
        Slide(jpeg_slide, backend=backend) as fast,  # type: ignore[arg-type]
        Slide(jpeg_slide, backend=backend, direct=False) as ref,  # type: ignore[arg-type]
    ):
        assert fast.direct_levels == tuple(range(fast.level_count))
        assert ref.direct_levels == ()
        for level, (w, h) in enumerate(fast.level_dimensions):
            np.testing.assert_array_equal(
                fast.read_level((0, 0), level, (w, h)), ref.read_level((0, 0), level, (w, h))
            )
        for loc, size, mpp in _regions(fast, 40, seed=1):
            np.testing.assert_array_equal(
                fast.read_region(loc, size, mpp=mpp), ref.read_region(loc, size, mpp=mpp)
            )


def test_direct_path_on_real_aperio_and_uncompressed_tiff(shared_slides: Path, tmp_path: Path) -> None:
    svs = shared_slides / "cmu-1-small-region.svs"  # JPEG with shared tables, YCbCr
    flat = tmp_path / "flat.tiff"  # uncompressed tiles
    tifffile.imwrite(
        flat,
        np.random.default_rng(0).integers(0, 256, (600, 700, 3), dtype=np.uint8),
        tile=(256, 256),
        photometric="rgb",
        resolution=(40000, 40000),
        resolutionunit="CENTIMETER",
    )
    for path in (svs, flat):
        with Slide(path) as fast, Slide(path, direct=False) as ref:
            assert fast.direct_levels == (0,)
            w, h = fast.dimensions
            np.testing.assert_array_equal(
                fast.read_level((0, 0), 0, (w, h)), ref.read_level((0, 0), 0, (w, h))
            )
            for loc, size, mpp in _regions(fast, 20, seed=2):
                np.testing.assert_array_equal(
                    fast.read_region(loc, size, mpp=mpp), ref.read_region(loc, size, mpp=mpp)
                )


def test_overlapping_windows_decode_each_tile_once(jpeg_slide: Path) -> None:
    with Slide(jpeg_slide) as slide:
        grid = make_grid(slide.dimensions, slide_mpp=slide.mpp, mpp=slide.mpp, tile_size=512, halo_um=32.0)
        tiles = list(grid.tiles())
        reads = list(iter_windows(slide, tiles, mpp=slide.mpp, workers=3, prefetch=6))
        assert [r.tile.index for r in reads] == [t.index for t in tiles]
        stats = slide.cache_stats()
        with Slide(jpeg_slide, direct=False) as ref:
            for r in reads[:6]:
                t = r.tile
                np.testing.assert_array_equal(
                    r.window, ref.read_region((t.read_x, t.read_y), (t.read_size,) * 2, mpp=slide.mpp)
                )
    with tifffile.TiffFile(jpeg_slide) as tif:
        n_tiles = len(tif.pages[0].dataoffsets)
    # Every level-0 tile is touched (halos overlap), and decoded exactly once by all threads together.
    assert stats["misses"] == n_tiles
    assert stats["hits"] > 0


def _with_corrupt_tile(src: Path, dst: Path, index: int) -> tuple[int, int]:
    """Copy ``src`` to ``dst`` with level-0 tile ``index`` keeping its SOI marker and losing everything
    else; returns the tile width and the tiles across."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tif:
        page: Any = tif.pages[0]
        off, n = int(page.dataoffsets[index]), int(page.databytecounts[index])
        tw = int(page.tilewidth)
        across = -(-int(page.imagewidth) // tw)
    data[off + 2 : off + n] = b"\x00" * (n - 2)
    dst.write_bytes(bytes(data))
    return tw, across


def test_corrupt_tile_is_reported_and_others_still_read(jpeg_slide: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tiff"
    tw, across = _with_corrupt_tile(jpeg_slide, bad, 5)
    with Slide(bad) as slide:
        row, col = divmod(5, across)
        with pytest.raises(CorruptTileError, match="corrupt tile data"):
            slide.read_level((col * tw + 3, row * tw + 3), 0, (10, 10))
        ok = slide.read_level((0, 0), 0, (tw, tw))
        with Slide(jpeg_slide) as good:
            np.testing.assert_array_equal(ok, good.read_level((0, 0), 0, (tw, tw)))


def test_shared_file_handle_is_closed_with_the_last_slide(jpeg_slide: Path) -> None:
    slide = Slide(jpeg_slide)
    direct = slide._direct
    assert direct is not None
    child = slide.reopen()
    assert child._direct is direct
    slide.close()
    os.fstat(direct._fd)  # still open: the child uses it
    assert child.read_level((0, 0), 0, (8, 8)).shape == (8, 8, 3)
    child.close()
    with pytest.raises(OSError):
        os.fstat(direct._fd)


def test_to_level0_matches_per_cell_mapping() -> None:
    from wsi_screen.cells import MORPHOMETRICS

    grid = make_grid((5000, 5000), slide_mpp=0.25, mpp=0.5, tile_size=512, halo_um=32.0)
    tile = grid.tile(1, 2)
    rng = np.random.default_rng(0)
    n = 40
    outlines = [rng.uniform(0, 640, (int(rng.integers(3, 20)), 2)).astype(np.float32) for _ in range(n)]
    c = CellTable.from_rows(
        x=rng.uniform(0, grid.read_size, n),
        y=rng.uniform(0, grid.read_size, n),
        detection_score=rng.uniform(0, 1, n).astype(np.float32),
        morphometrics={k: rng.uniform(0, 9, n).astype(np.float32) for k in MORPHOMETRICS},
        outlines=outlines,
        frame="window",
    )
    lx, ly = tile.to_level0(c.x, c.y)
    own = np.flatnonzero(tile.owns(lx, ly))
    assert 0 < len(own) < n
    got = c.subset(own).to_level0(tile)
    polys = []
    for i in own:
        poly = np.asarray(c.outlines[i], np.float64)
        px, py = tile.to_level0(poly[:, 0], poly[:, 1])
        polys.append(np.stack([px, py], axis=1).astype(np.float32))
    ref = CellTable.from_rows(
        x=lx[own],
        y=ly[own],
        outlines=polys,
        tile=tile.index,
        detection_score=np.asarray(c.detection_score)[own],
        morphometrics={k: np.asarray(v)[own] for k, v in c.morphometrics.items()},
    )
    for name, col in ref.columns().items():
        np.testing.assert_array_equal(got.columns()[name], col, err_msg=name)
    np.testing.assert_array_equal(got.outline_offsets, ref.outline_offsets)
    np.testing.assert_array_equal(got.outline_xy, ref.outline_xy)
    empty = c.subset(own[:0]).to_level0(tile)
    assert len(empty) == 0 and empty.outline_xy.shape == (0, 2)


def _focus_bands(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Core, fine blur and coarse blur of one tile (core plus margin), float64, with scipy."""
    from scipy.ndimage import uniform_filter

    from wsi_screen.focus import (
        FOCUS_COARSE_BOXES,
        FOCUS_DOWNSAMPLE,
        FOCUS_FINE_BOXES,
        FOCUS_MARGIN,
    )

    d = FOCUS_DOWNSAMPLE
    g = rgb[..., 1].astype(np.float64)
    g = g.reshape(g.shape[0] // d, d, g.shape[1] // d, d).mean(axis=(1, 3))
    b1 = g
    for k in FOCUS_FINE_BOXES:
        b1 = uniform_filter(b1, k, mode="nearest")
    b2 = b1
    for k in FOCUS_COARSE_BOXES:
        b2 = uniform_filter(b2, k, mode="nearest")
    m = FOCUS_MARGIN // d  # drop the border, where the filters saw padding
    core, b1, b2 = (a[m:-m, m:-m] for a in (g, b1, b2))
    return core, b1, b2


def _focus_reference(rgb: np.ndarray, edge: float = 2.0) -> float:
    """The focus ratio of one tile (core plus margin), written as a per-tile loop with scipy."""
    core, b1, b2 = _focus_bands(rgb)
    mid = np.abs(b1 - b2)
    sel = mid > edge
    if sel.mean() < 0.002:
        return float("nan")
    return float(np.abs(core - b1)[sel].sum() / mid[sel].sum())


def _focus_interval(rgb: np.ndarray, edge: float = 2.0) -> tuple[float, float]:
    """Where the float32 focus ratio of a tile can lie, for any summation order or kernel.

    Grey levels are ≥ 0 and ≤ ``top``, so every mean has a relative error ≤ the sum of its inputs'
    and its own: the 2×2 mean γ3 (÷4 is exact), a k×k mean (k² − 1 additions and a division) k² u.
    So the core is within 3u·top, the fine blur (two 3×3) within 21u·top and the coarse one (two
    5×5 more) within 71u·top of exact. A pixel whose mid band is within its error of ``edge`` may or
    may not be selected; the sums of the non-negative terms (n of them, in any order) are within γ_n,
    and the division within u. All the terms are computed exactly in float64 here.
    """
    core, b1, b2 = _focus_bands(rgb)
    u, top = 2.0**-24, float(core.max())
    d_core, d_b1, d_b2 = 3 * u * top, 21 * u * top, 71 * u * top
    mid, fine = np.abs(b1 - b2), np.abs(core - b1)
    d_mid, d_fine = 1.01 * (d_b1 + d_b2), 1.01 * (d_core + d_b1)  # 1 %: second-order terms
    surely, maybe = mid > edge + d_mid, mid > edge - d_mid
    g = mid.size * u / (1 - mid.size * u)
    num_lo = np.maximum(fine - d_fine, 0)[surely].sum() * (1 - g)
    num_hi = (fine + d_fine)[maybe].sum() * (1 + g)
    den_lo, den_hi = (mid - d_mid)[surely].sum() * (1 - g), (mid + d_mid)[maybe].sum() * (1 + g)
    return num_lo / den_hi * (1 - 2 * u), num_hi / den_lo * (1 + 2 * u)


def test_focus_matches_per_tile_reference_and_falls_with_blur() -> None:
    from scipy.ndimage import gaussian_filter

    from wsi_screen.focus import FOCUS_MARGIN, tile_focus

    rng = np.random.default_rng(0)
    side = 200 + 2 * FOCUS_MARGIN
    sharp = np.full((side, side), 230.0)
    for _ in range(60):  # dark, sharp-edged "nuclei" with fine chromatin texture
        y, x = rng.integers(12, side - 12, 2)
        sharp[y - 8 : y + 8, x - 6 : x + 6] = rng.uniform(40, 140, (16, 12))
    grey = np.stack(
        [
            sharp,
            gaussian_filter(sharp, 4.0),  # out of focus (σ 1 µm at 0.25 µm/px)
            np.full((side, side), 250.0),  # glass only: no edges
            np.where(rng.random((side, side)) < 0.5, sharp, sharp * 0.6),  # mixed pale and dark stain
        ]
    )
    rgb = np.repeat(grey[..., None], 3, axis=3).astype(np.float32)
    rgb[..., 0] += 10.0  # only the green channel counts
    got = tile_focus(torch.from_numpy(rgb), FOCUS_MARGIN)
    ref = [_focus_reference(t) for t in rgb]
    for value, tile, exact in zip(got, rgb, ref, strict=True):
        if np.isnan(exact):
            assert np.isnan(value)
            continue
        lo, hi = _focus_interval(tile)  # ±0.15 % around the exact ratio (measured error: 1e-7)
        assert lo <= exact <= hi and lo <= value <= hi, (value, exact, lo, hi)
    assert np.isnan(got[2])
    assert got[1] < 0.65 < got[0]  # blur takes the ratio below the default triage.min_focus
    # A smaller margin is padded, not refused; the figure barely changes.
    inner = torch.from_numpy(rgb[:1, 4:-4, 4:-4])
    assert tile_focus(inner, FOCUS_MARGIN - 4)[0] == pytest.approx(got[0], rel=0.1)


def test_bands_keep_row_major_order_unless_the_slide_is_wider_than_the_cache() -> None:
    from wsi_screen.reader import band_columns, cache_order
    from wsi_screen.slide import DEFAULT_CACHE_BYTES

    narrow = make_grid((20_000, 20_000), slide_mpp=0.25, mpp=0.25, tile_size=1024, halo_um=32.0)
    assert band_columns(narrow, DEFAULT_CACHE_BYTES) == narrow.cols
    tiles = list(narrow.tiles())
    assert cache_order(tiles, band_cols=narrow.cols) == tiles
    wide = make_grid((100_000, 5_000), slide_mpp=0.25, mpp=0.25, tile_size=1024, halo_um=32.0)
    band = band_columns(wide, DEFAULT_CACHE_BYTES)
    assert 2 <= band < wide.cols
    # Working set of a band: its windows' rows across the band, within ¾ of the cache.
    assert band * 1024 * (wide.read_size + 1024) * 4 <= 0.75 * DEFAULT_CACHE_BYTES
    ordered = cache_order(list(wide.tiles()), band_cols=band)
    assert sorted(t.index for t in ordered) == list(range(wide.n_tiles))
    assert [t.col for t in ordered[: band + 1]] == [*range(band), 0]  # next row of the first band
    assert band_columns(wide, 0) == wide.cols


def test_read_region_fills_a_given_array(jpeg_slide: Path) -> None:
    with Slide(jpeg_slide) as slide:
        for loc, size, mpp in [((10, 20), (300, 200), slide.mpp), ((-50, 1800), (300, 200), slide.mpp)] + [
            (loc, size, mpp) for loc, size, mpp in _regions(slide, 10, seed=4)
        ]:
            out = np.zeros((size[1], size[0], 3), np.uint8)
            got = slide.read_region(loc, size, mpp=mpp, out=out)
            assert got is out
            np.testing.assert_array_equal(out, slide.read_region(loc, size, mpp=mpp))
        with pytest.raises(ValueError, match="out must be"):
            slide.read_region((0, 0), (30, 20), mpp=slide.mpp, out=np.zeros((30, 20, 3), np.uint8))


def test_recycled_windows_are_never_overwritten_while_held(jpeg_slide: Path) -> None:
    """Windows kept by the consumer stay intact while later ones reuse dropped windows' memory (with a
    tile cache of a few tiles, so tiles are also evicted while other threads copy them)."""
    with Slide(jpeg_slide, cache_bytes=12 * 256 * 256 * 3) as slide, Slide(jpeg_slide, direct=False) as ref:
        grid = make_grid(slide.dimensions, slide_mpp=slide.mpp, mpp=slide.mpp, tile_size=256, halo_um=16.0)
        tiles = list(grid.tiles())
        kept = {}
        for n, r in enumerate(iter_windows(slide, tiles, mpp=slide.mpp, workers=3, prefetch=3, pool=6)):
            if n % 3 == 0:
                kept[r.tile.index] = (r.tile, r.window)  # held to the end; the others are dropped
        assert len(kept) > 6  # more than the pool holds: some kept windows are plain arrays
        for tile, window in kept.values():
            expected = ref.read_region((tile.read_x, tile.read_y), (tile.read_size,) * 2, mpp=slide.mpp)
            np.testing.assert_array_equal(window, expected)


def _grid_regions(slide: Slide, n: int, seed: int) -> list[tuple[tuple[int, int], tuple[int, int], float]]:
    """Regions on each level's pixel grid at that level's µm/px (served as decoded tiles), some of
    them reaching past the slide's edges."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        level = int(rng.integers(0, slide.level_count))
        ds = round(slide.level_downsamples[level])
        lw, lh = slide.level_dimensions[level]
        lx, ly = int(rng.integers(-200, lw)), int(rng.integers(-200, lh))
        size = (int(rng.integers(1, 900)), int(rng.integers(1, 900)))
        out.append(((lx * ds, ly * ds), size, slide.mpp * slide.level_downsamples[level]))
    return out


def test_region_parts_paste_to_exactly_read_region(jpeg_slide: Path, shared_slides: Path) -> None:
    """Pasting a region's pieces (decoded tiles on the level grid, else one resampled array) gives
    exactly read_region's pixels: level edges, partial edge tiles, outside the slide (white), JPEG
    tables (the real Aperio SVS), and into a strided slot of a larger array."""
    for path in (jpeg_slide, shared_slides / "cmu-1-small-region.svs"):
        with Slide(path) as slide, Slide(path, direct=False) as ref:
            on_grid = _grid_regions(slide, 40, seed=5)
            off_grid = [(loc, size, mpp) for loc, size, mpp in _regions(slide, 10, seed=6)]
            for loc, size, mpp in on_grid + off_grid:
                parts = slide.read_region_parts(loc, size, mpp=mpp)
                expected = ref.read_region(loc, size, mpp=mpp)
                assert parts.shape == expected.shape
                np.testing.assert_array_equal(parts.to_array(), expected)
                slot = np.zeros((size[1] + 4, size[0] + 6, 3), np.uint8)[2:-2, 3:-3]
                np.testing.assert_array_equal(parts.paste_into(slot), expected)
            # On the grid the pieces are the cached tiles themselves: nothing was copied.
            loc, size, mpp = (0, 0), (700, 600), slide.mpp
            parts = slide.read_region_parts(loc, size, mpp=mpp)
            assert not parts.owned and parts.covered and len(parts.pieces) > 1
            cached = slide._direct.cache._items.values() if slide._direct is not None else []
            assert all(any(np.shares_memory(a, t) for t in cached) for a, _, _ in parts.pieces)
            # Off the grid (resampled) the region is one array of its own.
            resampled = slide.read_region_parts((0.5, 0), (300, 200), mpp=slide.mpp * 1.37)
            assert resampled.owned and resampled.to_array() is resampled.pieces[0][0]


def test_windows_read_as_parts_equal_assembled_windows(jpeg_slide: Path) -> None:
    with Slide(jpeg_slide) as a, Slide(jpeg_slide) as b:
        grid = make_grid(a.dimensions, slide_mpp=a.mpp, mpp=a.mpp, tile_size=512, halo_um=32.0)
        tiles = list(grid.tiles())
        as_parts = list(iter_windows(a, tiles, mpp=a.mpp, workers=3, prefetch=6, assemble=False))
        whole = list(iter_windows(b, tiles, mpp=b.mpp, workers=3, prefetch=6))
        decodes = a.cache_stats()["misses"]
    with tifffile.TiffFile(jpeg_slide) as tif:
        n_tiles = len(tif.pages[0].dataoffsets)
    assert decodes == n_tiles  # the threads still decode each tile once
    assert [r.tile.index for r in as_parts] == [t.index for t in tiles]
    for p, w in zip(as_parts, whole, strict=True):
        assert p.parts is not None and not p.parts.owned
        assert w.parts is not None and w.parts.owned
        np.testing.assert_array_equal(p.window, w.window)


def test_unreadable_tile_read_as_parts_is_reported(jpeg_slide: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.tiff"
    _with_corrupt_tile(jpeg_slide, bad, 0)
    with Slide(bad) as slide:
        grid = make_grid(slide.dimensions, slide_mpp=slide.mpp, mpp=slide.mpp, tile_size=512, halo_um=32.0)
        reads = list(iter_windows(slide, grid.tiles(), mpp=slide.mpp, workers=2, prefetch=4, assemble=False))
    first = reads[0]
    assert first.parts is None and first.window is None
    assert first.error is not None and "corrupt tile data" in first.error
    assert all(r.parts is not None for r in reads if r.tile.read_x >= 256 or r.tile.read_y >= 256)


def test_assemble_batch_pastes_parts_and_arrays_alike(jpeg_slide: Path) -> None:
    from wsi_screen.buffers import BufferPool
    from wsi_screen.device_stage import assemble_batch

    with Slide(jpeg_slide) as slide:
        locs = [(0, 0), (384, 256), (-64, 1700), (2000, 100)]
        parts = [slide.read_region_parts(loc, (400, 400), mpp=slide.mpp) for loc in locs]
        arrays = [slide.read_region(loc, (400, 400), mpp=slide.mpp) for loc in locs]
    expected = np.stack(arrays)
    mixed = [parts[0], arrays[1], parts[2], arrays[3]]
    pool = BufferPool(2)
    for windows in (parts, arrays, mixed):
        got = assemble_batch(windows, pool=pool)
        assert got.dtype == torch.uint8 and tuple(got.shape) == expected.shape
        np.testing.assert_array_equal(got.numpy(), expected)
    assert pool.reused > 0  # batch memory recycled once the previous batch was dropped
    with pytest.raises(ValueError, match="one size"):
        assemble_batch([arrays[0], arrays[1][:300]])
    with pytest.raises(ValueError, match="no windows"):
        assemble_batch([])


@pytest.mark.gpu
def test_pinned_batch_reaches_the_gpu_intact(jpeg_slide: Path) -> None:
    """On CUDA the batch is pasted into pinned memory and copied non-blocking; batches made one after
    another (pinned memory reused by torch's caching host allocator) all arrive intact."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from wsi_screen.device_stage import assemble_batch

    with Slide(jpeg_slide) as slide:
        regions = [[(x, y) for x in (0, 512, 1024)] for y in (0, 256, 768, 1280)]
        batches = [
            [slide.read_region_parts(loc, (512, 512), mpp=slide.mpp) for loc in row] for row in regions
        ]
        expected = [np.stack([p.to_array() for p in b]) for b in batches]
    on_gpu = []
    for b in batches:
        x = assemble_batch(b, pinned=True)
        assert x.is_pinned()
        on_gpu.append(x.to("cuda", non_blocking=True))
    torch.cuda.synchronize()
    for got, want in zip(on_gpu, expected, strict=True):
        np.testing.assert_array_equal(got.cpu().numpy(), want)


def _tiny_classifier_bundle(tmp_path: Path, name: str) -> Any:
    """A randomly initialised 3-class MobileNetV3 bundle on 64² crops (seeded)."""
    from wsi_screen.models.bundle import BundleConfig, load_bundle, save_bundle
    from wsi_screen.models.registry import create_model

    torch.manual_seed(0)
    cfg = BundleConfig(
        name=name,
        task="classification",
        architecture="mobilenetv3_small_050",
        input_size=64,
        mpp=0.25,
        class_names=["NILM", "LSIL", "HSIL"],
        abnormal_classes=["LSIL", "HSIL"],
    )
    return load_bundle(save_bundle(create_model(cfg.architecture, num_classes=3), cfg, tmp_path / "b").path)


def test_padded_classifier_batches_give_the_same_probabilities(tmp_path: Path) -> None:
    """Padding forward batches to a few fixed sizes (the CUDA default, against cuDNN re-tuning every
    new batch size) changes no crop's probabilities and returns exactly one row per crop."""
    from wsi_screen.classify import CellClassifier

    bundle = _tiny_classifier_bundle(tmp_path, "pad")
    cpu = torch.device("cpu")
    plain = CellClassifier([bundle], device=cpu, batch_size=64)
    padded = CellClassifier([bundle], device=cpu, batch_size=64, pad_batches=True)
    assert not plain.pad_batches and padded.pad_batches
    crops = torch.randint(
        0, 256, (150, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1)
    )
    for n in (1, 5, 33, 64, 150):  # chunks of 1 → 32, 5 → 32, 33 → 64, 22 → 32 rows
        got, want = padded.predict(crops[:n]), plain.predict(crops[:n])
        assert got.shape == (n, 3)
        # Rows are independent in eval mode; another batch size may only pick other kernels (another
        # summation order). |Δp| ≤ ½ max|Δlogit| (softmax Jacobian), and a float32 forward pass
        # rounds by ≲ λ√ΣK·u of its O(1) activations (probabilistic bound, Higham & Mary 2019; ΣK =
        # 4766 over 54 layers, λ = 10: 4e-5), of which the logits are ≤ 0.1: |Δp| ≲ 4e-6 (measured
        # ≤ 3e-8 on AVX-512, AVX2 and MKL's non-Intel path). Padding leaking into rows moves p by ≫ 1e-3.
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5)


def test_test_time_augmentation_averages_the_dihedral_views(tmp_path: Path) -> None:
    """tta=8 averages the 8 flips/rotations: the result is the mean of the plain predictions of the
    8 transformed crops, hence the same for a crop and its rotated or flipped copy; tta=1 is the plain
    path; other counts are refused (by the classifier and by the settings)."""
    from pydantic import ValidationError

    from wsi_screen.classify import TTA_VIEWS, CellClassifier
    from wsi_screen.config import ClassificationSettings

    bundle = _tiny_classifier_bundle(tmp_path, "tta")
    cpu = torch.device("cpu")
    plain = CellClassifier([bundle], device=cpu, batch_size=64)
    tta = CellClassifier([bundle], device=cpu, batch_size=64, tta=8)
    crops = torch.randint(
        0, 256, (6, 64, 64, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    views = [torch.rot90(crops, k, dims=(1, 2)) for k in range(4)]  # channels-last: H, W are dims 1, 2
    views += [torch.flip(v, dims=(2,)) for v in views]
    want = torch.stack([plain.predict(v.contiguous()) for v in views]).mean(dim=0)
    got = tta.predict(crops)
    # Same arithmetic up to the order of 8 summands and other kernels per layout (|Δp| ≲ 4e-6, as above).
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(tta.predict(views[5].contiguous()).numpy(), got.numpy(), rtol=0, atol=1e-5)
    assert float((plain.predict(crops) - got).abs().max()) > 1e-4  # the views really differ
    assert sorted(TTA_VIEWS) == [1, 2, 4, 8] and all(len(v) == k for k, v in TTA_VIEWS.items())
    with pytest.raises(ValueError, match="tta must be one of"):
        CellClassifier([bundle], device=cpu, tta=3)
    with pytest.raises(ValidationError):
        ClassificationSettings(tta=3)  # type: ignore[arg-type]
