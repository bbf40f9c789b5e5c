"""Cell-region ("tissue") detection on a low-resolution thumbnail, tuned for cytology.

Histology tools threshold saturation with Otsu. That fails on cytology: cells are sparse on bright
glass, pale cyanophilic cytoplasm is barely saturated, and an LBC monolayer covers a few percent of
the glass, so Otsu splits the glass itself. Instead we

1. estimate the glass colour (the bright mode of the thumbnail) and its noise;
2. compute per-pixel optical density relative to the glass, ``OD = -log10(I / I_glass)`` (not the
   pipeline's ``-log10(I / 255)`` of :mod:`wsi_screen.optical_density`: a thumbnail's glass is rarely
   at 255, and its colour cast must not count as density), and keep pixels whose strongest channel
   exceeds ``max(od_threshold, noise_factor × glass noise)`` — pale cytoplasm is absorbing in at
   least one channel even when it is not saturated;
3. exclude ink and label: large blobs of very dark pixels (OD ≥ ``pen_od`` in their strongest
   channel: black, blue or green marker), with a margin, and large darkish regions (OD ≥
   ``label_od``) touching the thumbnail border (label edges, slide edges);
4. close small gaps (``closing_um``), drop specks smaller than ``min_object_area_um2`` (a lymphocyte
   is kept), and dilate by ``margin_um`` so the borders of cells are not cut;
5. for LBC (``lbc_spot: auto``) fit the circular spot and drop what lies outside it, when the cells
   do form a spot.

All parameters are in µm or µm² and converted with the thumbnail's µm/px.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage as ndi

from wsi_screen.config import TissueSettings

__all__ = ["CellRegions", "detect_cell_regions", "qc_thumbnail_png", "slide_cell_regions"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CellRegions:
    """The result of cell-region detection."""

    mask: NDArray[np.bool_]
    mpp: float
    thumbnail: NDArray[np.uint8]
    glass_rgb: tuple[float, float, float]
    od_threshold: float
    excluded: NDArray[np.bool_]
    spot: tuple[float, float, float] | None  # (cx, cy, r) in thumbnail px

    @property
    def area_um2(self) -> float:
        """Cellular area in µm²."""
        return float(self.mask.sum()) * self.mpp * self.mpp

    @property
    def fraction(self) -> float:
        """Fraction of the slide area that is cellular."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-friendly figures (for run.json and ``wsi-screen tiles``)."""
        return {
            "thumbnail_mpp": self.mpp,
            "thumbnail_size": [int(self.mask.shape[1]), int(self.mask.shape[0])],
            "cellular_area_mm2": self.area_um2 / 1e6,
            "cellular_fraction": self.fraction,
            "glass_rgb": [round(c, 1) for c in self.glass_rgb],
            "od_threshold": self.od_threshold,
            "excluded_area_mm2": float(self.excluded.sum()) * self.mpp**2 / 1e6,
            "lbc_spot_px": None if self.spot is None else [round(v, 1) for v in self.spot],
        }


def _disk(radius_px: float) -> NDArray[np.bool_]:
    r = max(0, math.ceil(radius_px - 1e-9))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return np.asarray(xx * xx + yy * yy <= radius_px * radius_px + 1e-9)


def _glass_estimate(rgb: NDArray[np.float32]) -> tuple[NDArray[np.float32], float]:
    """Glass colour (median of the brightest half) and its noise in OD units (robust sigma)."""
    brightness = rgb.mean(axis=2)
    bright = rgb[brightness >= np.percentile(brightness, 50)]
    glass = np.median(bright, axis=0).astype(np.float32)
    glass = np.maximum(glass, 1.0)
    od = -np.log10(np.clip(bright, 1.0, None) / glass).max(axis=1)
    mad = float(np.median(np.abs(od - np.median(od))))
    return glass, 1.4826 * mad


def _fit_spot(mask: NDArray[np.bool_]) -> tuple[float, float, float] | None:
    """Circle (cx, cy, r) holding 98 % of the cells, when the cells form one round spot."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 50:
        return None
    cx, cy = float(np.median(xs)), float(np.median(ys))
    dist = np.hypot(xs - cx, ys - cy)
    r = float(np.percentile(dist, 98))
    h, w = mask.shape
    # Only a spot if it sits inside the slide and the cells fill a good part of it.
    inside = cx - r > -0.05 * w and cx + r < 1.05 * w and cy - r > -0.05 * h and cy + r < 1.05 * h
    fill = len(xs) / (math.pi * r * r) if r > 0 else 0.0
    circle_frac = math.pi * r * r / (h * w)
    if inside and fill > 0.15 and circle_frac < 0.8:
        return cx, cy, r
    return None


def detect_cell_regions(
    thumbnail: NDArray[np.uint8], *, mpp: float, settings: TissueSettings | None = None
) -> CellRegions:
    """Detect cellular regions on an RGB thumbnail at ``mpp`` µm/px (pure function)."""
    s = settings or TissueSettings()
    if thumbnail.ndim != 3 or thumbnail.shape[2] != 3:
        raise ValueError(f"thumbnail must be H×W×3 RGB, got shape {thumbnail.shape}")
    if mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    rgb = thumbnail.astype(np.float32)
    glass, noise = _glass_estimate(rgb)
    od = -np.log10(np.clip(rgb, 1.0, None) / glass)
    od_max = od.max(axis=2)
    threshold = max(s.od_threshold, s.noise_factor * noise)
    cellular = od_max > threshold

    px_area = mpp * mpp
    # Ink (large very dark blobs anywhere) and label / slide edges (large darkish blobs touching the
    # border of the thumbnail).
    excluded = np.zeros(od_max.shape, dtype=bool)
    for dark, border_only in ((od_max > s.pen_od, False), (od_max > s.label_od, True)):
        if not dark.any():
            continue
        labels, n = ndi.label(dark)
        sizes = ndi.sum_labels(dark, labels, index=np.arange(1, n + 1))
        big = np.flatnonzero(sizes * px_area >= s.pen_min_area_um2) + 1
        if border_only:
            border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
            big = np.intersect1d(big, border[border > 0])
        if len(big):
            excluded |= np.isin(labels, big)
    if excluded.any() and s.pen_margin_um > 0:
        excluded = ndi.binary_dilation(excluded, structure=_disk(s.pen_margin_um / mpp))
    cellular &= ~excluded

    if s.closing_um > 0:
        se = _disk(s.closing_um / mpp)
        pad = se.shape[0]
        padded = np.pad(cellular, pad)
        cellular = ndi.binary_closing(padded, structure=se)[pad:-pad, pad:-pad]
    if s.min_object_area_um2 > 0 and cellular.any():
        labels, n = ndi.label(cellular)
        sizes = ndi.sum_labels(cellular, labels, index=np.arange(1, n + 1))
        keep = np.flatnonzero(sizes * px_area >= s.min_object_area_um2) + 1
        cellular = np.isin(labels, keep)
    spot = _fit_spot(cellular) if s.lbc_spot == "auto" else None
    if spot is not None:
        cx, cy, r = spot
        yy, xx = np.ogrid[: cellular.shape[0], : cellular.shape[1]]
        cellular &= (xx - cx) ** 2 + (yy - cy) ** 2 <= (r * 1.03 + s.margin_um / mpp) ** 2
    if s.margin_um > 0 and cellular.any():
        cellular = ndi.binary_dilation(cellular, structure=_disk(s.margin_um / mpp))
    cellular &= ~excluded
    return CellRegions(
        mask=np.asarray(cellular, dtype=bool),
        mpp=float(mpp),
        thumbnail=thumbnail,
        glass_rgb=(float(glass[0]), float(glass[1]), float(glass[2])),
        od_threshold=float(threshold),
        excluded=np.asarray(excluded, dtype=bool),
        spot=spot,
    )


def slide_cell_regions(
    slide: Any, settings: TissueSettings | None = None, *, workers: int = 1
) -> CellRegions:
    """Read a thumbnail of ``slide`` (a :class:`~wsi_screen.slide.Slide`) and detect cell regions.

    ``workers``: reader threads for the thumbnail (:meth:`~wsi_screen.slide.Slide.thumbnail`).
    """
    s = settings or TissueSettings()
    mpp = max(s.thumbnail_mpp, slide.mpp)
    thumb = slide.thumbnail(mpp=mpp, workers=workers)
    regions = detect_cell_regions(thumb, mpp=mpp, settings=s)
    logger.info(
        "cell regions: %.2f mm² (%.1f %% of the slide), threshold OD %.3f",
        regions.area_um2 / 1e6,
        100 * regions.fraction,
        regions.od_threshold,
    )
    return regions


def qc_thumbnail_png(regions: CellRegions, *, max_side: int = 2048) -> bytes:
    """PNG of the thumbnail with the cell-region outline (green) and excluded ink/label (red)."""
    img = regions.thumbnail.copy()
    edge = regions.mask & ~ndi.binary_erosion(regions.mask, iterations=1, border_value=0)
    edge = ndi.binary_dilation(edge, iterations=1 if max(img.shape[:2]) < 1500 else 2)
    ex_edge = regions.excluded & ~ndi.binary_erosion(regions.excluded, iterations=1, border_value=0)
    img[ex_edge] = (220, 30, 30)
    img[edge] = (20, 200, 60)
    pil = Image.fromarray(img)
    if max(pil.size) > max_side:
        f = max_side / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * f)), max(1, round(pil.height * f))), Image.Resampling.BOX)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", optimize=False)
    return buf.getvalue()
