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
