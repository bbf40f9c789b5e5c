"""Candidate extraction from probability maps: splitting, physical sizes, limits, outlines, OD, N:C."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from wsi_screen.candidates import extract_candidates, optical_density
from wsi_screen.cells import MORPHOMETRICS

H = W = 160
YY, XX = np.mgrid[0:H, 0:W] + 0.5  # pixel centres in continuous coordinates


def disc(cx: float, cy: float, r: float) -> np.ndarray:
    return (XX - cx) ** 2 + (YY - cy) ** 2 <= r * r


def ellipse(cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((XX - cx) / a) ** 2 + ((YY - cy) / b) ** 2 <= 1.0


def shoelace(poly: np.ndarray) -> float:
    x, y = poly[:, 0].astype(np.float64), poly[:, 1].astype(np.float64)
    return 0.5 * abs(float(x @ np.roll(y, -1) - y @ np.roll(x, -1)))


def test_columns_and_empty_map() -> None:
    c = extract_candidates(np.zeros((32, 32), np.float32), mpp=0.5)
    assert len(c) == 0 and tuple(c.morphometrics) == MORPHOMETRICS
    c = extract_candidates(disc(40, 40, 8).astype(np.float32), mpp=0.5)
    assert tuple(c.morphometrics) == MORPHOMETRICS
    assert all(v.dtype == np.float32 and len(v) == 1 for v in c.morphometrics.values())


@pytest.mark.parametrize("with_marker", [True, False], ids=["marker", "distance-peaks"])
def test_two_touching_discs_are_split(with_marker: bool) -> None:
    a, b = disc(60, 80, 14), disc(86, 80, 14)  # centres 26 px apart, radius 14: they overlap
    mask = (a | b).astype(np.float32)
    assert ndimage.label(mask > 0)[1] == 1  # one connected blob
    marker = (disc(60, 80, 5) | disc(86, 80, 5)).astype(np.float32) if with_marker else None
    c = extract_candidates(mask, mpp=0.5, marker=marker, min_peak_distance_um=3.0)
    assert len(c) == 2
    order = np.argsort(c.x)
    np.testing.assert_allclose(c.x[order], [60, 86], atol=1.5)
    np.testing.assert_allclose(c.y[order], [80, 80], atol=0.5)
    # The split line runs between the centres: each half is close to half the union.
    areas = c.morphometrics["nucleus_area_um2"] / 0.25
    np.testing.assert_allclose(areas, (a | b).sum() / 2, rtol=0.05)


def test_close_markers_merge_by_min_peak_distance() -> None:
    mask = disc(80, 80, 12).astype(np.float32)
    marker = (disc(76, 80, 2) | disc(84, 80, 2)).astype(np.float32)  # two blobs 8 px = 4 µm apart
    assert len(extract_candidates(mask, mpp=0.5, marker=marker, min_peak_distance_um=6.0)) == 1
    assert len(extract_candidates(mask, mpp=0.5, marker=marker, min_peak_distance_um=2.0)) == 2


@pytest.mark.parametrize("mpp", [0.25, 0.5, 1.0])
def test_sizes_in_physical_units(mpp: float) -> None:
    mask = disc(80, 80, 20)
    c = extract_candidates(mask.astype(np.float32), mpp=mpp, min_area_um2=0.0, max_area_um2=1e6)
    area = float(c.morphometrics["nucleus_area_um2"][0])
    assert area == pytest.approx(mask.sum() * mpp * mpp, rel=1e-6)
    assert area == pytest.approx(math.pi * (20 * mpp) ** 2, rel=0.02)
    assert float(c.morphometrics["nucleus_perimeter_um"][0]) == pytest.approx(
        2 * math.pi * 20 * mpp, rel=0.03
    )
    assert float(c.morphometrics["nucleus_circularity"][0]) > 0.95
    assert float(c.morphometrics["nucleus_eccentricity"][0]) < 0.1
    assert (c.x[0], c.y[0]) == pytest.approx((80.0, 80.0), abs=0.01)


def test_size_limits() -> None:
    mpp = 0.5
    small, mid, big = disc(20, 20, 2.5), disc(70, 70, 8), disc(120, 120, 30)
    probs = (small | mid | big).astype(np.float32)
    c = extract_candidates(probs, mpp=mpp, min_area_um2=6.0, max_area_um2=450.0)
    # small: ~20 px = 5 µm² < 6; big: ~2,830 px = 707 µm² > 450
    assert small.sum() * mpp**2 < 6.0 and big.sum() * mpp**2 > 450.0
    assert len(c) == 1 and c.x[0] == pytest.approx(70.0, abs=0.01)
    c = extract_candidates(probs, mpp=mpp, min_area_um2=0.0, max_area_um2=1000.0)
    assert len(c) == 3


def test_outline_polygon_matches_mask() -> None:
    mask = ellipse(80, 70, 24, 12)
    c = extract_candidates(mask.astype(np.float32), mpp=0.5, keep_labels=True)
    poly = c.outlines[0]
    assert poly.dtype == np.float32 and poly.ndim == 2 and poly.shape[1] == 2 and 8 <= len(poly) <= 64
    assert shoelace(poly) == pytest.approx(mask.sum(), rel=0.04)
    # The outline hugs the mask boundary: every vertex within a pixel of the ellipse.
    r = np.hypot((poly[:, 0] - 80) / 24, (poly[:, 1] - 70) / 12)
    assert np.all(np.abs(r - 1.0) < 1.0 / 12 + 0.05)
    assert float(c.morphometrics["nucleus_eccentricity"][0]) == pytest.approx(math.sqrt(1 - 0.25), abs=0.03)
    lab = c.label_image
    assert lab is not None and int(lab.max()) == 1 and int((lab > 0).sum()) == int(mask.sum())


def test_optical_density_and_hyperchromasia() -> None:
    rgb = np.full((H, W, 3), 240, np.uint8)
    nuc = disc(80, 80, 10)
    rgb[nuc] = (60, 50, 120)
    expected = float(np.mean(-np.log10(np.array([60, 50, 120]) / 255.0)))
    assert optical_density(rgb)[80, 80] == pytest.approx(expected, rel=1e-5)
    c = extract_candidates(nuc.astype(np.float32), mpp=0.5, rgb=rgb)
    assert float(c.morphometrics["nucleus_mean_od"][0]) == pytest.approx(expected, rel=1e-4)
    area = float(c.morphometrics["nucleus_area_um2"][0])
    assert float(c.morphometrics["nucleus_integrated_od"][0]) == pytest.approx(expected * area, rel=1e-4)
    c = extract_candidates(nuc.astype(np.float32), mpp=0.5)
    assert np.isnan(c.morphometrics["nucleus_mean_od"][0])


def test_cell_area_and_nc_ratio() -> None:
    nuc = disc(60, 80, 8) | disc(110, 80, 8)
    cells = disc(60, 80, 24) | disc(110, 80, 24)  # two touching cells
    c = extract_candidates(nuc.astype(np.float32), mpp=0.5, cell=cells.astype(np.float32))
    assert len(c) == 2
    cell_area = c.morphometrics["cell_area_um2"]
    assert np.all(np.isfinite(cell_area))
    np.testing.assert_allclose(cell_area.sum(), cells.sum() * 0.25, rtol=1e-6)
    np.testing.assert_allclose(cell_area, cells.sum() * 0.25 / 2, rtol=0.05)
    np.testing.assert_allclose(
        c.morphometrics["nc_ratio"], c.morphometrics["nucleus_area_um2"] / cell_area, rtol=1e-5
    )
    # A cell cut by the map border has no reliable area.
    edge = extract_candidates(
        disc(20, 80, 6).astype(np.float32), mpp=0.5, cell=disc(12, 80, 20).astype(np.float32)
    )
    assert np.isnan(edge.morphometrics["cell_area_um2"][0]) and np.isnan(edge.morphometrics["nc_ratio"][0])
    no_cell = extract_candidates(nuc.astype(np.float32), mpp=0.5)
    assert np.all(np.isnan(no_cell.morphometrics["nc_ratio"]))


def test_detection_score_is_mean_probability() -> None:
    probs = np.where(disc(80, 80, 10), 0.8, 0.1).astype(np.float32)
    c = extract_candidates(probs, mpp=0.5)
    assert float(c.detection_score[0]) == pytest.approx(0.8, abs=1e-6)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="shape"):
        extract_candidates(np.zeros((8, 8), np.float32), mpp=0.5, marker=np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="mpp"):
        extract_candidates(np.zeros((8, 8), np.float32), mpp=0.0)
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        extract_candidates(np.zeros((2, 8, 8), np.float32), mpp=0.5)


def test_region_distance_transforms_equal_the_whole_map_one() -> None:
    """``_edt_in`` computes the distance transform in crops around the wanted regions; at their
    pixels it equals scipy's whole-map transform exactly, also where the nearest zero pixel lies
    outside a region's box (the crop grows), at map edges, and on dense maps (one whole-map pass)."""
    from scipy import ndimage

    from wsi_screen.candidates import _edt_in

    rng = np.random.default_rng(11)
    for trial in range(30):
        h, w = (int(v) for v in rng.integers(20, 160, 2))
        noise = ndimage.gaussian_filter(rng.random((h, w)), float(rng.uniform(1.5, 5.0)))
        cut = np.quantile(noise, float(rng.uniform(0.05, 0.95)))
        inside = noise > cut
        if trial % 2:  # the relief case: distance from sparse targets, wanted in wide regions
            inside = ~(noise > np.quantile(noise, 0.97))
        regions, n = ndimage.label(noise > np.quantile(noise, float(rng.uniform(0.3, 0.9))))
        ids = [i for i in range(1, n + 1) if rng.random() < 0.7]
        got = _edt_in(inside, regions, ids)
        full = ndimage.distance_transform_edt(inside).astype(np.float32)
        want = np.where(np.isin(regions, ids), full, np.float32(0))
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_label_sums_equal_whole_map_bincounts() -> None:
    from wsi_screen.candidates import _LabelSums

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 6, (37, 53)).astype(np.int32)
    labels[rng.random(labels.shape) < 0.8] = 0  # sparse, as nuclei are
    values = rng.random(labels.shape).astype(np.float32)
    sums = _LabelSums(labels, 5)
    want = np.bincount(labels.ravel(), weights=values.astype(np.float64).ravel(), minlength=6)
    np.testing.assert_array_equal(sums.of(values), want[1:])
    np.testing.assert_array_equal(sums.count()[1:], np.bincount(labels.ravel(), minlength=6)[1:])
    rows, cols = sums.rows_cols()
    rr, cc = np.nonzero(labels)
    np.testing.assert_array_equal(rows, rr + 0.5)
    np.testing.assert_array_equal(cols, cc + 0.5)
