"""Slide access: real vendor files, broken files, level selection and resampling."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_screen.errors import (
    CorruptSlideError,
    CorruptTileError,
    MissingMppError,
    SlideNotFoundError,
    SlideTooLargeError,
    UnsupportedSlideError,
    WsiScreenError,
)
from wsi_screen.slide import open_slide, slide_fingerprint

# (file, backend) -> expected metadata or error type, for every file in ../shared/data/slides.
GOOD = {
    ("cmu-1-small-region.svs", "openslide"): ((2220, 2967), 1, 0.499, "aperio", 20.0),
    ("cmu-1-small-region.svs", "tiffslide"): ((2220, 2967), 1, 0.499, "aperio", 20.0),
    ("small.svs", "openslide"): ((16, 16), 1, 0.499, "aperio", 20.0),
    ("small.svs", "tiffslide"): ((16, 16), 1, 0.499, "aperio", 20.0),
    ("boxes_0.dcm", "openslide"): ((16, 16), 1, 0.499, "dicom", 20.0),
    ("boxes_1.dcm", "openslide"): ((16, 16), 1, 0.499, "dicom", 20.0),
}
BAD = {
    ("broken.svs", "openslide"): UnsupportedSlideError,
    ("broken.svs", "tiffslide"): UnsupportedSlideError,
    ("unreadable.svs", "openslide"): CorruptTileError,
    ("unreadable.svs", "tiffslide"): CorruptTileError,
    ("unopenable.tiff", "openslide"): UnsupportedSlideError,
    ("unopenable.tiff", "tiffslide"): UnsupportedSlideError,
    ("kidney-48-5-strip.tif", "openslide"): UnsupportedSlideError,
    ("kidney-48-5-strip.tif", "tiffslide"): MissingMppError,
    ("boxes.tiff", "openslide"): MissingMppError,  # 72 dpi default → 352.8 µm/px: implausible
    ("boxes.tiff", "tiffslide"): MissingMppError,
    ("boxes_0.dcm", "tiffslide"): UnsupportedSlideError,
    ("boxes_1.dcm", "tiffslide"): UnsupportedSlideError,
}


def test_every_shared_slide_is_covered(shared_slides: Path) -> None:
    names = {p.name for p in shared_slides.iterdir()}
    covered = {name for name, _ in GOOD} | {name for name, _ in BAD}
    assert names == covered


@pytest.mark.parametrize(("name", "backend"), sorted(GOOD))
def test_real_slide_metadata(shared_slides: Path, name: str, backend: str) -> None:
    dims, levels, mpp, vendor, power = GOOD[(name, backend)]
    with open_slide(shared_slides / name, backend=backend) as s:  # type: ignore[arg-type]
        assert s.dimensions == dims
        assert s.level_count == levels
        assert s.mpp == pytest.approx(mpp)
        assert s.info.mpp_source == "metadata"
        assert s.vendor == vendor
        assert s.objective_power == power
        assert "thumbnail" in s.associated_image_names
        thumb = s.associated_image("thumbnail")
        assert thumb.ndim == 3 and thumb.shape[2] == 3 and thumb.dtype == np.uint8
        region = s.read_region((0, 0), (32, 32), mpp=s.mpp)
        assert region.shape == (32, 32, 3)


@pytest.mark.parametrize(("name", "backend"), sorted(BAD))
def test_broken_files_raise_the_right_error(shared_slides: Path, name: str, backend: str) -> None:
    expected = BAD[(name, backend)]
    with pytest.raises(expected) as info:
        open_slide(shared_slides / name, backend=backend)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    assert name in message
    if expected is MissingMppError:
        assert "slide.mpp" in message


def test_mpp_override_opens_slide_without_usable_mpp(shared_slides: Path) -> None:
    with open_slide(shared_slides / "boxes.tiff", mpp=0.5) as s:
        assert s.mpp == 0.5
        assert s.info.mpp_source == "override"
        assert s.level_count == 4
        assert s.best_level(0.5) == 0
        assert s.best_level(1.0) == 1
        assert s.best_level(2.2) == 2  # level 2 (↓4.016 → 2.008 µm/px) is finer than 2.2: allowed
        assert s.best_level(2.0) == 1  # ↓4.016 would be coarser than asked: not allowed


def test_missing_path_and_errors_inherit_builtins(tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError) as info:
        open_slide(tmp_path / "nope.svs")
    assert isinstance(info.value, FileNotFoundError)
    assert issubclass(UnsupportedSlideError, ValueError)
    assert issubclass(CorruptSlideError, OSError)
    assert issubclass(CorruptTileError, CorruptSlideError)
    assert issubclass(MissingMppError, ValueError)
    for exc in (SlideNotFoundError, UnsupportedSlideError, CorruptSlideError, MissingMppError):
        assert issubclass(exc, WsiScreenError)


def test_truncated_aperio_file_is_reported_as_corrupt(shared_slides: Path, tmp_path: Path) -> None:
    src = shared_slides / "cmu-1-small-region.svs"
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    for backend in ("openslide", "tiffslide"):
        with pytest.raises(CorruptSlideError, match="truncated"):
            open_slide(truncated, backend=backend)  # type: ignore[arg-type]


def test_folder_is_not_a_slide(tmp_path: Path) -> None:
    (tmp_path / "companion").mkdir()
    (tmp_path / "companion" / "Data0000.dat").write_bytes(b"x" * 10)
    with pytest.raises(UnsupportedSlideError, match="folder"):
        open_slide(tmp_path / "companion")


def test_dicom_series_folder_opens(shared_slides: Path, tmp_path: Path) -> None:
    series = tmp_path / "series"
    series.mkdir()
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        shutil.copy(shared_slides / name, series / name)
    with open_slide(series) as s:
        assert s.vendor == "dicom"
        assert s.dimensions == (16, 16)


def test_fingerprint_depends_on_content_not_name(shared_slides: Path, tmp_path: Path) -> None:
    a = tmp_path / "a.svs"
    b = tmp_path / "b.svs"
    shutil.copy(shared_slides / "small.svs", a)
    shutil.copy(shared_slides / "small.svs", b)
    assert slide_fingerprint(a) == slide_fingerprint(b)
    data = bytearray(b.read_bytes())
    data[-1] ^= 0xFF
    b.write_bytes(bytes(data))
    assert slide_fingerprint(a) != slide_fingerprint(b)


# -- a pyramid we build ourselves ---------------------------------------------------------------


@pytest.fixture(scope="module")
def gradient_pyramid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-level tiled TIFF (2048² at 0.25 µm/px) of a smooth gradient, uncompressed."""
    path = tmp_path_factory.mktemp("pyr") / "gradient.tiff"
    yy, xx = np.mgrid[0:2048, 0:2048]
    base = np.stack([(xx // 8) % 256, (yy // 8) % 256, ((xx + yy) // 16) % 256], axis=-1).astype(np.uint8)
    with tifffile.TiffWriter(path) as tif:
        level = base
        for i in range(4):
            res = 1e4 / (0.25 * 2**i)  # pixels per cm
            tif.write(
                level,
                tile=(256, 256),
                photometric="rgb",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=1 if i else 0,
            )
            level = level.reshape(level.shape[0] // 2, 2, level.shape[1] // 2, 2, 3).mean((1, 3))
            level = level.astype(np.uint8)
    return path


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_own_pyramid_levels_and_resampling(gradient_pyramid: Path, backend: str) -> None:
    with open_slide(gradient_pyramid, backend=backend) as s:  # type: ignore[arg-type]
        assert s.mpp == pytest.approx(0.25)
        assert s.level_count == 4
        assert s.level_downsamples == pytest.approx((1, 2, 4, 8))
        assert [s.best_level(m) for m in (0.25, 0.4, 0.5, 0.9, 1.0, 2.0, 8.0)] == [0, 0, 1, 1, 2, 3, 3]
        # Reading at a coarser mpp equals reading the matching level directly.
        direct = s.read_level((512, 512), 2, (64, 64))
        via_mpp = s.read_region((512, 512), (64, 64), mpp=1.0)
        np.testing.assert_array_equal(direct, via_mpp)
        # Resampling between levels keeps the physical geometry: the 0.5 µm/px view of a region
        # matches the 2×-block-mean of the 0.25 µm/px view of the same region (smooth image).
        fine = s.read_region((100, 100), (256, 256), mpp=0.25).astype(np.float32)
        coarse = s.read_region((100, 100), (128, 128), mpp=0.5, level=0).astype(np.float32)
        pooled = fine.reshape(128, 2, 128, 2, 3).mean((1, 3))
        assert np.abs(coarse - pooled)[4:-4, 4:-4].mean() < 2.0
        # Outside the slide is white glass.
        outside = s.read_region((2040, 2040), (32, 32), mpp=0.25)
        assert (outside[16:, 16:] == 255).all()


def test_backends_agree_on_own_pyramid(gradient_pyramid: Path) -> None:
    with open_slide(gradient_pyramid) as a, open_slide(gradient_pyramid, backend="tiffslide") as b:
        for mpp in (0.25, 0.37, 0.5, 1.3):
            ra = a.read_region((333.5, 777.25), (200, 150), mpp=mpp)
            rb = b.read_region((333.5, 777.25), (200, 150), mpp=mpp)
            np.testing.assert_array_equal(ra, rb)


def test_thumbnail_is_blockwise_and_complete(gradient_pyramid: Path) -> None:
    with open_slide(gradient_pyramid) as s:
        thumb = s.thumbnail(mpp=4.0, block=50)
        assert thumb.shape == (128, 128, 3)
        ref = s.read_region((0, 0), (128, 128), mpp=4.0)
        assert np.abs(thumb.astype(int) - ref.astype(int)).max() <= 1


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize("mpp", [2.0, 2.5])  # a level read one to one, and a resampled one
def test_thumbnail_threads_give_the_same_pixels(gradient_pyramid: Path, backend: str, mpp: float) -> None:
    with open_slide(gradient_pyramid, backend=backend) as s:  # type: ignore[arg-type]
        one = s.thumbnail(mpp=mpp, block=40)
        for workers in (2, 5):
            np.testing.assert_array_equal(s.thumbnail(mpp=mpp, block=40, workers=workers), one)
        assert one.shape == (round(2048 * 0.25 / mpp), round(2048 * 0.25 / mpp), 3)
        with pytest.raises(ValueError, match="workers"):
            s.thumbnail(mpp=mpp, workers=0)


def test_thumbnail_threads_on_an_aperio_slide(shared_slides: Path) -> None:
    """JPEG tiles through the direct path (one to one) and resampled, 1 thread against 3."""
    with open_slide(shared_slides / "cmu-1-small-region.svs") as s:
        assert s.direct_levels == (0,)
        for mpp in (0.499, 4.0):
            one = s.thumbnail(mpp=mpp, block=256)
            np.testing.assert_array_equal(s.thumbnail(mpp=mpp, block=256, workers=3), one)


def test_too_large_dimensions_refused(gradient_pyramid: Path) -> None:
    with pytest.raises(SlideTooLargeError, match="2048"):
        open_slide(gradient_pyramid, max_dimension=1000)


def test_implausible_mpp_override_refused(gradient_pyramid: Path) -> None:
    with pytest.raises(MissingMppError, match=r"slide\.mpp"):
        open_slide(gradient_pyramid, mpp=0.0001)
