"""JPEG tiles as self-contained streams, decoded in batches (libjpeg-turbo on the CPU, nvJPEG on CUDA).

The reference is the direct TIFF path's own decode (tifffile/imagecodecs, libjpeg-turbo): the issue's
bar is within 2 grey levels at most and 0.5 on average; on the CPU the two are the same decoder.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from wsi_screen.jpeg_decode import ADOBE_RGB, decode_streams, tile_stream
from wsi_screen.slide import open_slide

SHARED_JPEG = ["cmu-1-small-region.svs", "small.svs"]  # tiled JPEG, RGB-coded, with JPEGTables


@pytest.fixture(scope="module")
def ycbcr_pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-level tiled TIFF with YCbCr-coded JPEG tiles (4:2:0), shared tables and ragged edges."""
    path = tmp_path_factory.mktemp("ycbcr") / "ycbcr.tiff"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:700, 0:900]
    base = np.stack([xx % 256, yy % 256, (xx * yy) % 251], axis=-1).astype(np.float64)
    base += rng.normal(0, 8, base.shape)
    img = np.clip(base, 0, 255).astype(np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for i, level in enumerate((img, img[::2, ::2].copy())):
            tif.write(
                level,
                tile=(256, 256),
                photometric="ycbcr",
                compression="jpeg",
                compressionargs={"level": 90},
                subsampling=(2, 2),
                resolution=(1e4 / (0.25 * 2**i),) * 2,
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
            )
    return path


def _direct_tiles(slide_path: Path, level: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Every tile of ``level``: the direct path's decode and :func:`decode_streams`'s."""
    from wsi_screen.slide import _DirectTiff

    with open_slide(slide_path) as s:
        tw, th, across, down = s.tile_layout(level)
        indices = list(range(across * down))
        streams = s.jpeg_tile_streams(level, indices)
        got = decode_streams(streams, device=device, tile_size=(tw, th)).cpu().numpy()
        direct = s._direct
        assert isinstance(direct, _DirectTiff)
        lv = direct.levels[level]
        ref = np.stack([direct._decode(lv, i) for i in indices])
    return ref, got


def _check_close(ref: np.ndarray, got: np.ndarray) -> None:
    assert ref.shape == got.shape
    d = np.abs(ref.astype(np.int16) - got.astype(np.int16))
    assert d.max() <= 2, d.max()
    assert d.mean() <= 0.5, d.mean()


@pytest.mark.parametrize("name", SHARED_JPEG)
def test_shared_slides_decode_as_the_direct_path(shared_slides: Path, name: str) -> None:
    with open_slide(shared_slides / name) as s:
        assert 0 in s.direct_levels
    ref, got = _direct_tiles(shared_slides / name, 0, torch.device("cpu"))
    np.testing.assert_array_equal(got, ref)  # the same libjpeg-turbo: identical, not just close


def test_ycbcr_tiles_and_edges(ycbcr_pyramid: Path) -> None:
    with open_slide(ycbcr_pyramid) as s:
        assert s.direct_levels == (0, 1)
        assert s.tile_layout(0) == (256, 256, 4, 3)
    for level in (0, 1):
        ref, got = _direct_tiles(ycbcr_pyramid, level, torch.device("cpu"))
        _check_close(ref, got)


def test_rgb_coded_tiles_need_the_marker(shared_slides: Path) -> None:
    """Without the Adobe segment a decoder takes Aperio's RGB-coded tiles for YCbCr: colours shift."""
    with tifffile.TiffFile(shared_slides / "cmu-1-small-region.svs") as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        fh = tif.filehandle
        fh.seek(int(page.dataoffsets[5]))
        data = fh.read(int(page.databytecounts[5]))
        tables = page.jpegtables
    assert isinstance(tables, bytes)
    ref = decode_streams(
        [tile_stream(data, tables, photometric=2)], device=torch.device("cpu"), tile_size=(240, 240)
    )
    naive = tables[:-2] + data[2:]  # tables spliced in, no colour marker
    wrong = decode_streams([naive], device=torch.device("cpu"), tile_size=(240, 240))
    assert np.abs(ref.numpy().astype(int) - wrong.numpy().astype(int)).mean() > 10
    assert tile_stream(data, tables, photometric=2).count(ADOBE_RGB) == 1
    assert ADOBE_RGB not in tile_stream(data, tables, photometric=6)


def test_stream_errors_and_blank_tiles() -> None:
    with pytest.raises(ValueError, match="not a JPEG stream"):
        tile_stream(b"\x00\x01rest", None, photometric=6)
    with pytest.raises(ValueError, match="JPEGTables"):
        tile_stream(b"\xff\xd8\xff\xd9", b"junk", photometric=6)
    with pytest.raises(ValueError, match="photometric"):
        tile_stream(b"\xff\xd8\xff\xd9", None, photometric=1)
    out = decode_streams([None, None], device=torch.device("cpu"), tile_size=(8, 4))
    assert out.shape == (2, 4, 8, 3) and bool((out == 255).all())


def test_level_errors_name_the_level(shared_slides: Path, tmp_path: Path) -> None:
    with open_slide(shared_slides / "cmu-1-small-region.svs") as s:
        with pytest.raises(ValueError, match="level 1 is not read directly"):
            s.jpeg_tile_streams(1, [0])
        with pytest.raises(ValueError, match="out of range"):
            s.jpeg_tile_streams(0, [10_000])
    raw = tmp_path / "raw.tiff"  # uncompressed tiles: read directly, but not JPEG
    res = (1e4 / 0.25,) * 2
    tifffile.imwrite(
        raw,
        np.zeros((256, 256, 3), np.uint8),
        tile=(128, 128),
        photometric="rgb",
        resolution=res,
        resolutionunit="CENTIMETER",
    )
    with open_slide(raw) as s:
        assert s.direct_levels == (0,)
        with pytest.raises(ValueError, match="not JPEG-compressed"):
            s.jpeg_tile_streams(0, [0])


@pytest.mark.gpu
@pytest.mark.parametrize("name", SHARED_JPEG)
def test_nvjpeg_matches_libjpeg_turbo(shared_slides: Path, ycbcr_pyramid: Path, name: str) -> None:
    """nvJPEG on CUDA: within 2 grey levels at most, 0.5 on average, RGB- and YCbCr-coded tiles."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cuda = torch.device("cuda")
    ref, got = _direct_tiles(shared_slides / name, 0, cuda)
    _check_close(ref, got)
    for level in (0, 1):
        ref, got = _direct_tiles(ycbcr_pyramid, level, cuda)
        _check_close(ref, got)


# -- the reader decoding on the device (reading.jpeg_decoder) ----------------------------------------


def _windows(path: Path, device: torch.device | None) -> tuple[list[np.ndarray], dict[str, int]]:
    """Overlapping windows across tile borders and the slide's ragged edge, at every level."""
    out = []
    with open_slide(path) as s:
        s.set_jpeg_device(device)
        assert s.jpeg_device == device
        for level, (w, h) in enumerate(s.level_dimensions):
            mpp = s.mpp * s.level_downsamples[level]
            ds = s.level_downsamples[level]
            for x, y in ((0, 0), (w // 3, h // 4), (w - 200, h - 150), (w - 100, 10)):
                out.append(s.read_region((int(x * ds), int(y * ds)), (300, 260), mpp=mpp))
        # A region at another resolution (resampled from level 0), as the pipeline reads 0.5 µm/px slides.
        out.append(s.read_region((17, 9), (256, 256), mpp=s.mpp / 2))
        with s.reopen() as other:  # reopened handles share the tile cache, and so the decoder
            assert other.jpeg_device == device
        stats = s.cache_stats()
    return out, stats


@pytest.mark.parametrize("which", ["ycbcr", *SHARED_JPEG])
def test_reader_decodes_on_the_device_as_on_the_cpu(
    which: str, ycbcr_pyramid: Path, request: pytest.FixtureRequest
) -> None:
    """Batched decode (torchvision's libjpeg-turbo here; nvJPEG under the gpu marker) gives the
    pixels of the one-tile-at-a-time path, and decodes each tile once as that path does."""
    path = ycbcr_pyramid if which == "ycbcr" else request.getfixturevalue("shared_slides") / which
    ref, ref_stats = _windows(path, None)
    got, got_stats = _windows(path, torch.device("cpu"))
    assert len(ref) == len(got)
    for a, b in zip(ref, got, strict=True):
        if which == "ycbcr":
            _check_close(a, b)  # 4:2:0 upsampling may differ in the last bit between builds
        else:
            np.testing.assert_array_equal(a, b)
    assert got_stats["misses"] == ref_stats["misses"]


def test_device_decode_falls_back_and_names_a_corrupt_tile(ycbcr_pyramid: Path, tmp_path: Path) -> None:
    """A batch the device decoder rejects is decoded tile by tile on the CPU: the good tiles are
    read, the bad one raises the reader's CorruptTileError naming the tile, as without the device."""
    from wsi_screen.errors import CorruptTileError

    bad = tmp_path / "bad.tiff"
    data = bytearray(ycbcr_pyramid.read_bytes())
    with tifffile.TiffFile(ycbcr_pyramid) as tif:
        page = tif.pages[0]
        assert isinstance(page, tifffile.TiffPage)
        off, n = int(page.dataoffsets[5]), int(page.databytecounts[5])  # row 1, col 1
    data[off + 2 : off + n] = b"\x00" * (n - 2)  # keep the SOI marker, destroy the rest
    bad.write_bytes(bytes(data))
    messages = []
    for device in (None, torch.device("cpu")):
        with open_slide(bad) as s:
            s.set_jpeg_device(device)
            fine = s.read_region((0, 0), (200, 200), mpp=s.mpp)  # tile 0 only
            assert fine.shape == (200, 200, 3)
            with pytest.raises(CorruptTileError) as info:
                s.read_region((200, 200), (200, 200), mpp=s.mpp)  # tiles 0, 1, 4, 5
            messages.append(str(info.value))
            assert "\n" not in messages[-1]
    assert messages[0] == messages[1]


def test_resolve_jpeg_device() -> None:
    from wsi_screen.errors import ConfigError
    from wsi_screen.jpeg_decode import resolve_jpeg_device

    cpu = torch.device("cpu")
    assert resolve_jpeg_device("cpu", cpu) is None
    assert resolve_jpeg_device("auto", cpu) is None  # off CUDA the reader threads' decode is faster
    assert resolve_jpeg_device("device", cpu) == cpu
    with pytest.raises(ConfigError, match=r"reading\.jpeg_decoder must be"):
        resolve_jpeg_device("gpu", cpu)


@pytest.mark.slow
def test_run_with_device_decode_gives_the_same_cells(shared_slides: Path, tmp_path: Path) -> None:
    """``wsi-screen run --set reading.jpeg_decoder=device`` on a real Aperio slide: the same cells."""
    import zarr

    from wsi_screen.cli.main import main

    slide = shared_slides / "cmu-1-small-region.svs"
    arrays = []
    for choice in ("cpu", "device"):
        out = tmp_path / choice
        with pytest.raises(SystemExit) as done:
            main(["run", str(slide), "-o", str(out), "--quiet", "--set", f"reading.jpeg_decoder={choice}"])
        assert done.value.code in (0, None)
        group = zarr.open_group(str(out / slide.stem / "cells.zarr"), mode="r")
        arrays.append({k: np.asarray(group[f"cells/{k}"]) for k in ("x", "y", "probs")})
    assert len(arrays[0]["x"]) > 100
    for k in ("x", "y", "probs"):
        np.testing.assert_array_equal(arrays[0][k], arrays[1][k])


@pytest.mark.gpu
def test_reader_on_cuda_within_the_bar(shared_slides: Path, ycbcr_pyramid: Path) -> None:
    """The reader with nvJPEG: windows within 2 grey levels at most, 0.5 on average, of the CPU's."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    for path in (ycbcr_pyramid, *(shared_slides / n for n in SHARED_JPEG)):
        ref, _ = _windows(path, None)
        got, _ = _windows(path, torch.device("cuda"))
        for a, b in zip(ref, got, strict=True):
            _check_close(a, b)
