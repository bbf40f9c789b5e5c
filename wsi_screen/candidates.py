"""Cell candidates from the U-Net's probability maps: nucleus instances, outlines and morphometrics.

:func:`extract_candidates` is a pure function (numpy in, numpy out) on one map at one resolution:

1. nucleus foreground = ``nucleus ≥ threshold``;
2. seeds = connected blobs of ``marker ≥ marker_threshold`` (the U-Net's nucleus-centre channel);
   blobs closer than ``min_peak_distance_um`` are merged. Without a marker map, seeds are the peaks
   of the foreground's distance transform at least ``min_peak_distance_um`` apart;
3. a marker-controlled watershed on the distance transform splits touching nuclei; foreground
   components without a seed become instances of their own;
4. instances outside ``[min_area_um2, max_area_um2]`` are dropped;
5. per instance (vectorised over the label image): area, centroid, second moments (eccentricity),
   mean probability (detection score) and optical density; the outline polygon (marching squares on
   the lightly smoothed instance mask) gives the perimeter and circularity ``4πA/P²``;
6. with a cell map: cell foreground = ``cell ≥ cell_threshold`` ∪ nuclei, split between the nuclei by a
   watershed on the distance from the nuclei (a geodesic Voronoi partition); cell area and
   N:C ratio (nucleus area / cell area) are NaN when the cell region touches the map border (cut off)
   or when there is no cell map.

Coordinates are continuous map pixels: pixel ``i`` spans ``[i, i + 1)``, so a pixel's centre is at
``i + 0.5``. Optical density is ``-log10(I / 255)`` averaged over the RGB channels (``I ≥ 1``;
:func:`optical_density`, from :mod:`wsi_screen.optical_density`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage

from wsi_screen.cells import MORPHOMETRICS, CellTable
from wsi_screen.optical_density import optical_density

__all__ = ["extract_candidates", "optical_density"]

F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

# Candidates are a CellTable (wsi_screen.cells) in the "map" frame: continuous pixels of the map.


def _seeds_from_marker(marker: F32, threshold: float, min_distance_px: float) -> NDArray[np.int32]:
    """Label image of marker blobs; blobs whose centroids are closer than ``min_distance_px`` merge."""
    labelled, n = ndimage.label(marker >= threshold)
    seeds: NDArray[np.int32] = labelled.astype(np.int32)
    if n < 2 or min_distance_px <= 0:
        return seeds
    # Blob centroids (row, col), summed over the blob pixels only, in raster order: the same sums as
    # ndimage.center_of_mass over the whole map, a fraction of the work on a sparse map.
    sums = _LabelSums(seeds, n)
    count = sums.count()[1:]
    cy = sums.of_values((sums.at // sums.width).astype(np.float64)) / count
    cx = sums.of_values((sums.at % sums.width).astype(np.float64)) / count
    from scipy.spatial import cKDTree

    pairs = cKDTree(np.stack([cx, cy], axis=1)).query_pairs(min_distance_px, output_type="ndarray")
    if len(pairs) == 0:
        return seeds
    # Union-find over the close pairs (few), then relabel in one lookup.
    parent = np.arange(n + 1)

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = int(parent[a])
        return a

    for a, b in pairs + 1:
        ra, rb = find(int(a)), find(int(b))
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    lut = np.array([find(i) for i in range(n + 1)], dtype=np.int32)
    out: NDArray[np.int32] = lut[seeds]
    return out


def _seeds_from_distance(fg: NDArray[np.bool_], dist: F32, min_distance_px: float) -> NDArray[np.int32]:
    from skimage.feature import peak_local_max

    comps, _ = ndimage.label(fg)
    peaks = peak_local_max(  # type: ignore[no-untyped-call]
        dist, min_distance=max(1, round(min_distance_px)), labels=comps, exclude_border=False
    )
    seeds = np.zeros(fg.shape, np.int32)
    seeds[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    return seeds


#: Above this share of a map's pixels, regions are not worth a distance transform each.
_SPARSE_FRACTION = 0.25


def _edt_in(inside: NDArray[np.bool_], regions: NDArray[np.int32], ids: Sequence[int]) -> F32:
    """``ndimage.distance_transform_edt(inside)`` (float32) at the pixels of the ``regions`` labelled
    ``ids``, 0 elsewhere — computed region by region in crops around them when they are sparse.

    Each crop (the region's bounding box plus a margin) gives a pixel its exact distance when that
    distance does not exceed how far the crop reaches beyond the pixel on its sides inside the map:
    a zero pixel outside the crop would be farther. Where it does, the margin doubles (at worst
    the crop becomes the whole map); so does a crop without any zero pixel, where scipy's transform
    measures from outside the array. Same nearest zero pixel, same float: identical values.
    """
    h, w = inside.shape
    boxes = ndimage.find_objects(regions)
    wanted = [i for i in ids if 0 < i <= len(boxes) and boxes[i - 1] is not None]
    area = sum(
        (boxes[i - 1][0].stop - boxes[i - 1][0].start) * (boxes[i - 1][1].stop - boxes[i - 1][1].start)
        for i in wanted
    )
    if area > _SPARSE_FRACTION * h * w:
        full = ndimage.distance_transform_edt(inside).astype(np.float32)
        keep = np.isin(regions, np.asarray(wanted, np.int32))
        return np.where(keep, full, np.float32(0)).astype(np.float32)
    out = np.zeros((h, w), np.float32)
    for i in wanted:
        rows, cols = boxes[i - 1]
        margin = 2
        while True:
            r0, r1 = max(rows.start - margin, 0), min(rows.stop + margin, h)
            c0, c1 = max(cols.start - margin, 0), min(cols.stop + margin, w)
            whole = r0 == 0 and c0 == 0 and r1 == h and c1 == w
            crop = inside[r0:r1, c0:c1]
            if not whole and crop.all():  # no zero pixel in the crop: nothing to measure from yet
                margin *= 2
                continue
            d = ndimage.distance_transform_edt(crop)
            rr, cc = np.nonzero(regions[r0:r1, c0:c1] == i)
            reach = np.full(len(rr), np.inf)
            if r0 > 0:
                reach = np.minimum(reach, rr + 1)
            if c0 > 0:
                reach = np.minimum(reach, cc + 1)
            if r1 < h:
                reach = np.minimum(reach, (r1 - r0) - rr)
            if c1 < w:
                reach = np.minimum(reach, (c1 - c0) - cc)
            vals = d[rr, cc]
            if np.all(vals <= reach):
                out[r0 + rr, c0 + cc] = vals.astype(np.float32)
                break
            margin *= 2
    return out


class _LabelSums:
    """Per-label sums over the labelled pixels of a label image (1..n; 0 is background).

    Only the labelled pixels are visited, in raster order, so each label's sum is the same as a
    ``np.bincount`` over the whole map, at a fraction of the work when the labels are sparse.
    """

    def __init__(self, labels: NDArray[np.int32], n: int) -> None:
        flat = labels.ravel()
        self.at = np.flatnonzero(flat)
        self.labels = flat[self.at]
        self.n = n
        self.width = labels.shape[1]

    def count(self) -> F64:
        """Pixels per label (index 0: 0)."""
        return np.bincount(self.labels, minlength=self.n + 1).astype(np.float64)

    def of(self, values: NDArray[np.generic]) -> F64:
        """Sum of a (H, W) map per label, labels 1..n."""
        v = np.asarray(values).ravel()[self.at].astype(np.float64)
        return self.of_values(v)

    def of_values(self, v: F64) -> F64:
        """Sum per label 1..n of values given per labelled pixel (in :attr:`at` order)."""
        return np.asarray(np.bincount(self.labels, weights=v, minlength=self.n + 1)[1:], np.float64)

    def rows_cols(self) -> tuple[F64, F64]:
        """Pixel-centre row and column of each labelled pixel."""
        return self.at // self.width + 0.5, self.at % self.width + 0.5


#: Gaussian σ (px) smoothing an instance mask before its outline is traced: removes the pixel staircase,
#: so the perimeter of a digitised disc of radius ≥ 5 px is within 2 % of 2πr (area within 3 %).
_OUTLINE_SIGMA_PX = 0.8
#: Outlines keep at most this many vertices.
_OUTLINE_MAX_VERTICES = 64


def _outline(mask: NDArray[np.bool_], r0: int, c0: int) -> tuple[F32, float]:
    """Outline polygon (K, 2) x/y in continuous map px of a binary crop at (r0, c0), and its length."""
    from skimage.measure import find_contours

    pad = 3
    padded = np.pad(mask, pad).astype(np.float32)
    smooth = ndimage.gaussian_filter(padded, _OUTLINE_SIGMA_PX, mode="constant")
    contours = find_contours(  # type: ignore[no-untyped-call]
        smooth if smooth.max() > 0.5 else padded, 0.5
    )
    if not contours:
        return np.zeros((0, 2), np.float32), 0.0
    c = max(contours, key=len)  # (row, col) in padded index space, closed (last == first)
    d = np.diff(c, axis=0)
    length = float(np.hypot(d[:, 0], d[:, 1]).sum())
    c = c[:-1]
    if len(c) > _OUTLINE_MAX_VERTICES:  # even subsampling of a smooth contour (error ≪ 0.1 px)
        c = c[np.linspace(0, len(c), _OUTLINE_MAX_VERTICES, endpoint=False).astype(np.int64)]
    xy = np.empty((len(c), 2), np.float32)
    xy[:, 0] = c[:, 1] + (c0 - pad + 0.5)
    xy[:, 1] = c[:, 0] + (r0 - pad + 0.5)
    return xy, length


def extract_candidates(
    nucleus: NDArray[np.floating],
    *,
    mpp: float,
    marker: NDArray[np.floating] | None = None,
    cell: NDArray[np.floating] | None = None,
    od: NDArray[np.floating] | None = None,
    rgb: NDArray[np.generic] | None = None,
    nucleus_threshold: float = 0.5,
    marker_threshold: float = 0.5,
    cell_threshold: float = 0.5,
    min_area_um2: float = 6.0,
    max_area_um2: float = 450.0,
    min_peak_distance_um: float = 3.0,
    keep_labels: bool = False,
) -> CellTable:
    """Nucleus instances and their morphometrics from probability maps (all ``(H, W)``, one µm/px).

    Args:
        nucleus: nucleus probability map.
        mpp: µm per map pixel.
        marker: nucleus-centre probability (seeds of the split); None: distance-transform peaks.
        cell: cell (cytoplasm) foreground probability, for cell area and N:C ratio; None: NaN.
        od: optical-density map (H, W) for hyperchromasia; or ``rgb`` (H, W, 3) to compute it;
            neither: mean and integrated OD are NaN.
        nucleus_threshold, marker_threshold, cell_threshold: probability cuts.
        min_area_um2, max_area_um2: nucleus size limits.
        min_peak_distance_um: nearest distance of two nuclei's centres.
        keep_labels: also return the instance label image (``label_image``).

    Returns:
        A :class:`~wsi_screen.cells.CellTable` in the ``"map"`` frame (continuous map px) with
        :data:`~wsi_screen.cells.MORPHOMETRICS` columns (float32).
    """
    from skimage.segmentation import watershed

    prob = np.asarray(nucleus, dtype=np.float32)
    if prob.ndim != 2:
        raise ValueError(f"nucleus map must be (H, W), got shape {prob.shape}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    for name, arr in (("marker", marker), ("cell", cell), ("od", od)):
        if arr is not None and np.shape(arr) != prob.shape:
            raise ValueError(f"{name} map has shape {np.shape(arr)}, expected {prob.shape}")
    if rgb is not None and od is None:
        if np.shape(rgb)[:2] != prob.shape:
            raise ValueError(f"rgb has shape {np.shape(rgb)}, expected {prob.shape} + (3,)")
        od = optical_density(rgb)
    px_um2 = mpp * mpp
    min_dist_px = min_peak_distance_um / mpp

    fg = prob >= nucleus_threshold
    if not fg.any():
        return CellTable.empty(frame="map")
    blobs, n_blobs = ndimage.label(fg)
    dist = _edt_in(fg, blobs, range(1, n_blobs + 1))
    if marker is not None:
        seeds = _seeds_from_marker(np.asarray(marker, np.float32), marker_threshold, min_dist_px)
    else:
        seeds = _seeds_from_distance(fg, dist, min_dist_px)
    labels = watershed(-dist, markers=seeds, mask=fg).astype(np.int32)  # type: ignore[no-untyped-call]
    # Foreground components that no seed reached are nuclei of their own.
    rest, n_rest = ndimage.label(fg & (labels == 0))
    if n_rest:
        labels = np.where(rest > 0, rest + labels.max(), labels).astype(np.int32)
    # Compact the label ids to 1..n.
    ids = np.unique(labels[labels > 0])
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.int32)
    labels = lut[labels]
    n = len(ids)

    area_px = _LabelSums(labels, n).count()
    area_um2 = area_px * px_um2
    keep = (area_um2 >= min_area_um2) & (area_um2 <= max_area_um2)
    keep[0] = False
    if not keep.any():
        return CellTable.empty(frame="map")
    # Relabel the kept instances 1..k (the rest becomes background).
    lut = np.zeros(n + 1, np.int32)
    lut[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    labels = lut[labels]
    k = int(keep.sum())
    area_px = area_px[keep]
    area_um2 = area_um2[keep]

    sums = _LabelSums(labels, k)
    rr, cc = sums.rows_cols()
    sx = sums.of_values(cc)
    sy = sums.of_values(rr)
    cx, cy = sx / area_px, sy / area_px
    sxx = sums.of_values(cc * cc) / area_px - cx * cx
    syy = sums.of_values(rr * rr) / area_px - cy * cy
    sxy = sums.of_values(cc * rr) / area_px - cx * cy
    # Eigenvalues of the covariance (+1/12: the second moment of a unit pixel, as regionprops).
    half_tr = (sxx + syy) / 2.0 + 1.0 / 12.0
    disc = np.sqrt(np.maximum(((sxx - syy) / 2.0) ** 2 + sxy * sxy, 0.0))
    l1, l2 = half_tr + disc, np.maximum(half_tr - disc, 0.0)
    eccentricity = np.sqrt(np.clip(1.0 - l2 / np.maximum(l1, 1e-12), 0.0, 1.0))
    score = sums.of(prob) / area_px
    if od is not None:
        od_sum = sums.of(np.asarray(od, np.float32))
        mean_od = od_sum / area_px
        integrated_od = od_sum * px_um2
    else:
        mean_od = integrated_od = np.full(k, np.nan)

    outlines: list[F32] = []
    perimeter_px = np.zeros(k)
    for i, sl in enumerate(ndimage.find_objects(labels)):
        if sl is None:  # cannot happen for 1..k, but stay safe
            outlines.append(np.zeros((0, 2), np.float32))
            continue
        poly, length = _outline(labels[sl] == i + 1, sl[0].start, sl[1].start)
        outlines.append(poly)
        perimeter_px[i] = length
    perimeter_um = perimeter_px * mpp
    with np.errstate(divide="ignore", invalid="ignore"):
        circularity = np.where(perimeter_um > 0, 4.0 * math.pi * area_um2 / perimeter_um**2, np.nan)
    circularity = np.minimum(circularity, 1.0)

    cell_area_um2 = np.full(k, np.nan)
    if cell is not None:
        nuclei = labels > 0
        cell_fg = (np.asarray(cell, np.float32) >= cell_threshold) | nuclei
        # The distance from the nuclei matters only inside cell regions that hold a nucleus (the
        # watershed floods from the nuclei and cannot enter the others).
        regions, _ = ndimage.label(cell_fg)
        relief = _edt_in(~nuclei, regions, np.unique(regions[nuclei]).tolist())
        cells = watershed(relief, markers=labels, mask=cell_fg).astype(np.int32)  # type: ignore[no-untyped-call]
        cell_px = np.bincount(cells.ravel(), minlength=k + 1)[1:].astype(np.float64)
        border = np.concatenate([cells[0], cells[-1], cells[:, 0], cells[:, -1]])
        cut = np.zeros(k + 1, bool)
        cut[np.unique(border)] = True
        cell_area_um2 = np.where(cut[1:], np.nan, cell_px * px_um2)
    with np.errstate(divide="ignore", invalid="ignore"):
        nc_ratio = area_um2 / cell_area_um2

    values = {
        "nucleus_area_um2": area_um2,
        "nucleus_perimeter_um": perimeter_um,
        "nucleus_circularity": circularity,
        "nucleus_eccentricity": eccentricity,
        "nucleus_mean_od": mean_od,
        "nucleus_integrated_od": integrated_od,
        "cell_area_um2": cell_area_um2,
        "nc_ratio": nc_ratio,
    }
    return CellTable.from_rows(
        x=cx.astype(np.float64),
        y=cy.astype(np.float64),
        outlines=outlines,
        detection_score=score.astype(np.float32),
        morphometrics={name: np.asarray(values[name], dtype=np.float32) for name in MORPHOMETRICS},
        frame="map",
        label_image=labels if keep_labels else None,
    )
