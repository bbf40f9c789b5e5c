"""Rasterise a :class:`~wsi_screen.synth.layout.Layout` into RGB pixels.

Image model (transmitted light)::

    rgb = glass_rgb * column_gain(x) * row_gain(y) * film(x, y) * exp(-sum of object OD) + noise

(``film``: the streaky background of a conventional smear, 1 for LBC), followed by the scanner
response (a per-channel LUT). Every object is drawn into a small patch over
its own bounding box, from its own seed, and every background term is a function of absolute
level-0 coordinates, so a region renders to exactly the same pixels whether it is drawn alone or as
part of a larger one (this is what lets the writer render a slide strip by strip, in parallel).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from PIL import Image
from scipy import ndimage

from wsi_screen.synth.cells import N_ANGLES, CellGeometry, choose_dye, radial_table
from wsi_screen.synth.stain import StainProfile

if TYPE_CHECKING:
    from wsi_screen.synth.layout import Layout

__all__ = ["Renderer", "cell_transmission", "render_region"]

F32 = NDArray[np.float32]
#: Period (px) of the tileable sensor-noise texture (prime, so it does not align with tiles).
_NOISE_PERIOD = 509
#: Internal block size: regions are drawn in blocks of at most this many rows × columns.
BLOCK_H, BLOCK_W = 512, 2048
_TWO_PI = 2 * math.pi


def _coords(start: int, stop: int, origin: float) -> F32:
    """Pixel-centre coordinates relative to ``origin`` (pixel i covers [i, i+1))."""
    return (np.arange(start, stop, dtype=np.float64) + 0.5 - origin).astype(np.float32)


#: Angular bins of the nearest-bin radius lookup (0.003 rad: < 0.1 px error at 60 µm radius).
_FINE_ANGLES = 2048
_FINE_THETA = np.arange(_FINE_ANGLES + 1) * (N_ANGLES / _FINE_ANGLES)


def _fine_table(radii: NDArray[np.float64]) -> F32:
    """Upsample a radial table to _FINE_ANGLES bins (linear in angle)."""
    return np.asarray(np.interp(_FINE_THETA, np.arange(N_ANGLES + 1), radii), dtype=np.float32)


def _radial_sd(radii: NDArray[np.float64], dx: F32, dy: F32) -> F32:
    """Signed radial distance (px, > 0 inside) to a star-shaped outline given by its radii table."""
    ddx, ddy = dx[None, :], dy[:, None]
    u = np.arctan2(ddy, ddx)
    u *= np.float32(_FINE_ANGLES / _TWO_PI)
    u += np.float32(_FINE_ANGLES / 2 + 0.5)
    idx = u.astype(np.int32)
    r = _fine_table(radii)[idx]
    rho = ddx * ddx + ddy * ddy
    np.sqrt(rho, out=rho)
    r -= rho
    return r


def _grain(rng: np.random.Generator, h: int, w: int, sigma_px: float) -> F32:
    """Unit-variance granular texture (Gaussian-filtered white noise), for small patches."""
    white = rng.standard_normal((h, w)).astype(np.float32)
    if sigma_px < 0.3:
        return white
    out: F32 = ndimage.gaussian_filter(white, sigma_px, mode="reflect")
    out *= np.float32(2.0 * math.sqrt(math.pi) * sigma_px)
    return out


def _strand_distance(
    line: NDArray[np.float64], half: NDArray[np.float64], dx: F32, dy: F32, reach: float
) -> F32:
    """Signed distance (px, > 0 inside) to a polyline with varying half-width.

    Only pixels within ``reach`` px of a segment get their true distance; others stay at -reach.
    """
    best = np.full((dy.size, dx.size), -np.float32(reach), dtype=np.float32)
    for i in range(len(line) - 1):
        (ax, ay), (bx, by) = line[i], line[i + 1]
        pad = max(half[i], half[i + 1]) + reach
        c0 = int(np.searchsorted(dx, min(ax, bx) - pad))
        c1 = int(np.searchsorted(dx, max(ax, bx) + pad, side="right"))
        r0 = int(np.searchsorted(dy, min(ay, by) - pad))
        r1 = int(np.searchsorted(dy, max(ay, by) + pad, side="right"))
        if c1 <= c0 or r1 <= r0:
            continue
        px = dx[None, c0:c1] - np.float32(ax)
        py = dy[r0:r1, None] - np.float32(ay)
        ex, ey = np.float32(bx - ax), np.float32(by - ay)
        ll = max(float(ex * ex + ey * ey), 1e-9)
        t = np.clip((px * ex + py * ey) * np.float32(1.0 / ll), 0.0, 1.0)
        hw = np.float32(half[i]) + t * np.float32(half[i + 1] - half[i])
        qx, qy = px - t * ex, py - t * ey
        d = hw - np.sqrt(qx * qx + qy * qy)
        np.maximum(best[r0:r1, c0:c1], d, out=best[r0:r1, c0:c1])
    return best


def _box_blur(arr: F32, sigma: float) -> F32:
    """Gaussian-like blur (σ px) of a 2-D field: three box filters of matching variance per axis."""
    width = max(round(math.sqrt(12.0 * sigma * sigma / 3.0 + 1.0)), 1)
    if width < 2:
        return arr
    for axis in (0, 1):
        for _ in range(3):
            arr = ndimage.uniform_filter1d(arr, width, axis=axis, mode="constant")
    return arr


def _cytoplasm_noise(rng: np.random.Generator, h: int, w: int, mpp: float, fine: float) -> F32:
    """Slow undulation (~5 µm, amplitude 0.07) plus fine grain (~0.8 µm, amplitude ``fine``)."""
    s = max(0.8 / mpp, 1.0)
    gh, gw = math.ceil(h / s) + 3, math.ceil(w / s) + 3
    grid = rng.standard_normal((gh, gw)).astype(np.float32) * np.float32(fine * 1.6)
    k = 5.0 / 0.8
    ch, cw = math.ceil(gh / k) + 3, math.ceil(gw / k) + 3
    coarse = rng.standard_normal((ch, cw)).astype(np.float32) * np.float32(0.07 * 1.6)
    up = Image.fromarray(coarse, mode="F").resize((round(cw * k), round(ch * k)), Image.Resampling.BILINEAR)
    off = round(k)
    grid += np.asarray(up, dtype=np.float32)[off : off + gh, off : off + gw]
    if s <= 1.0:
        return grid[:h, :w]
    big = Image.fromarray(grid, mode="F").resize((round(gw * s), round(gh * s)), Image.Resampling.BICUBIC)
    o = round(s)
    return np.asarray(big, dtype=np.float32)[o : o + h, o : o + w]


def cell_optical_density(geom: CellGeometry, profile: StainProfile, mpp: float) -> F32:
    """The OD patch (h, w, 3) of one object over its bounding box ``geom.bbox``."""
    x0, y0, x1, y1 = geom.bbox
    h, w = y1 - y0, x1 - x0
    kind = geom.kind
    rng = np.random.default_rng([int(geom.spec.seed) & 0xFFFFFFFF, 0x7E47])
    cx, cy = geom.cell_center
    dx, dy = _coords(x0, x1, cx), _coords(y0, y1, cy)
    if geom.strand is not None:
        assert geom.strand_half_width is not None
        line = geom.strand - np.array([cx, cy])
        sd = _strand_distance(line, geom.strand_half_width, dx, dy, 4.0 + 3.0 * geom.spec.blur_um / mpp)
    else:
        sd = _radial_sd(radial_table(geom.cell, (cx, cy)), dx, dy)
    cover = np.clip(sd + np.float32(0.5), 0.0, 1.0)

    # Cytoplasm thickness: mean, linear gradient, slow undulation, fine grain, thin darker border.
    r = np.float32(max(geom.radius_px, 1.0))
    gx, gy = geom.gradient
    t = (np.float32(gx) / r) * dx[None, :] + (np.float32(gy) / r) * dy[:, None]
    t += np.float32(1.0)
    t += _cytoplasm_noise(rng, h, w, mpp, kind.chromatin if kind.shape == "fragment" else 0.05)
    t += np.float32(0.3) * np.exp(-np.maximum(sd, 0.0) / np.float32(0.6 / mpp))
    for fx, fy, fa, half_len, width, strength in geom.folds:
        # A keratin fold: a dark ridge along a chord, drawn only in its own window.
        ca, sa = math.cos(fa), math.sin(fa)
        ext_x = abs(ca) * half_len + 3 * width
        ext_y = abs(sa) * half_len + 3 * width
        c0 = max(math.floor(fx - ext_x) - x0, 0)
        c1 = min(math.ceil(fx + ext_x) - x0, w)
        r0 = max(math.floor(fy - ext_y) - y0, 0)
        r1 = min(math.ceil(fy + ext_y) - y0, h)
        if c1 <= c0 or r1 <= r0:
            continue
        px = dx[None, c0:c1] + np.float32(cx - fx)
        py = dy[r0:r1, None] + np.float32(cy - fy)
        along = px * np.float32(ca) + py * np.float32(sa)
        across = py * np.float32(ca) - px * np.float32(sa)
        window = np.clip(1.0 - (along / np.float32(half_len)) ** 2, 0.0, None)
        window *= np.exp(-((across / np.float32(width)) ** 2))
        t[r0:r1, c0:c1] += np.float32(strength) * window
    if geom.halo is not None and geom.halo_center is not None:
        hdx = dx + np.float32(cx - geom.halo_center[0])
        hdy = dy + np.float32(cy - geom.halo_center[1])
        hsd = _radial_sd(radial_table(geom.halo, geom.halo_center), hdx, hdy)
        inside = np.clip(hsd + np.float32(0.5), 0.0, 1.0)
        rim_w = np.float32(1.4 / mpp)
        rim = np.exp(-((np.minimum(hsd, 0.0) / rim_w) ** 2)) * (np.float32(1.0) - inside)
        t = t * (np.float32(1.0) - np.float32(0.86) * inside) + np.float32(0.35) * rim
    t *= cover
    t *= np.float32(geom.thickness)

    # Out of focus: blur the two scalar fields (thickness here, nuclear density below).
    sigma = geom.spec.blur_um / mpp
    if sigma > 0:
        t = _box_blur(t, sigma)
    dye = profile.dye(choose_dye(geom, profile.pink_bias))
    od: F32 = t[:, :, None] * dye[None, None, :]

    if geom.nuclei:
        nuc_vec = profile.dye("nucleus") * np.float32(geom.nucleus_od)
        pyknotic = kind.nucleus_shape == "pyknotic"
        for outline, parts in zip(geom.nuclei, geom.nucleus_parts, strict=True):
            nx0 = max(math.floor(outline[:, 0].min()) - 2, x0)
            nx1 = min(math.ceil(outline[:, 0].max()) + 3, x1)
            ny0 = max(math.floor(outline[:, 1].min()) - 2, y0)
            ny1 = min(math.ceil(outline[:, 1].max()) + 3, y1)
            nsd: F32 | None = None
            mean_r = 0.0
            for part, (pcx, pcy) in parts:
                radii = radial_table(part, (pcx, pcy))
                mean_r += float(radii.mean()) / len(parts)
                psd = _radial_sd(radii, _coords(nx0, nx1, pcx), _coords(ny0, ny1, pcy))
                nsd = psd if nsd is None else np.maximum(nsd, psd)
            assert nsd is not None
            ncov = np.clip(nsd + np.float32(0.5), 0.0, 1.0)
            nh, nw = ny1 - ny0, nx1 - nx0
            dens = _grain(rng, nh, nw, kind.chromatin_um / mpp)
            dens *= np.float32(kind.chromatin)
            dens += np.float32(1.0)
            if kind.chromatin >= 0.4:  # coarse chromatin clumps (HSIL)
                clumps = _grain(rng, nh, nw, 1.3 * kind.chromatin_um / mpp)
                dens += np.float32(0.4) * np.clip(clumps - np.float32(0.5), 0.0, None)
            if not pyknotic:
                # crisp, darker nuclear membrane and a slightly paler (vesicular) centre
                dens += np.float32(0.3) * np.exp(-np.maximum(nsd, 0.0) / np.float32(0.35 / mpp))
                dens -= np.float32(0.12) * np.clip(nsd / np.float32(max(mean_r, 1.0)), 0.0, 1.0)
            dens = np.clip(dens, np.float32(0.25), None) * ncov
            if sigma > 0:
                pad = math.ceil(3 * sigma) + 1
                wx0, wx1 = max(nx0 - pad, x0), min(nx1 + pad, x1)
                wy0, wy1 = max(ny0 - pad, y0), min(ny1 + pad, y1)
                padded = np.zeros((wy1 - wy0, wx1 - wx0), dtype=np.float32)
                padded[ny0 - wy0 : ny1 - wy0, nx0 - wx0 : nx1 - wx0] = dens
                dens = _box_blur(padded, sigma)
                nx0, nx1, ny0, ny1 = wx0, wx1, wy0, wy1
            sl = (slice(ny0 - y0, ny1 - y0), slice(nx0 - x0, nx1 - x0))
            od[sl] += dens[:, :, None] * nuc_vec[None, None, :]
    return od


def cell_transmission(geom: CellGeometry, profile: StainProfile, mpp: float) -> F32:
    """Fraction of light (h, w, 3) one object transmits over its bounding box ``geom.bbox``."""
    od = cell_optical_density(geom, profile, mpp)
    np.negative(od, out=od)
    return np.exp(od, out=od)


class Renderer:
    """Draws any region of a layout. Build one per layout and reuse it for many regions
    (:func:`render_region` builds a throwaway one per call)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.mpp = layout.mpp
        self.profile = layout.stain
        self.geometries = layout.geometries
        if self.geometries:
            self._bboxes = np.array([g.bbox for g in self.geometries], dtype=np.int64)
        else:
            self._bboxes = np.zeros((0, 4), dtype=np.int64)
        rng = np.random.default_rng([int(layout.seed) & 0xFFFFFFFF, 0xB6])
        # Line-scan style illumination: a slowly varying gain per column (along the sensor, with
        # faint stripes) times a slowly varying gain per row (along the scan).
        self._col_gain = _gain_profile(rng, layout.width, 150.0 / self.mpp, 0.008, stripes=True)
        self._row_gain = _gain_profile(rng, layout.height, 300.0 / self.mpp, 0.006, stripes=False)
        glass = np.asarray(self.profile.glass_rgb, dtype=np.float32)
        self._col_rgb = self._col_gain[:, None] * glass[None, :]  # (width, 3)
        self._noise = _noise_texture(int(layout.seed), float(self.profile.noise_sigma))
        self._lut = None if self.profile.is_identity_scanner else self.profile.scanner_lut()
        self._streaks = layout.streaks
        self._film = self.profile.dye("mucus") * np.float32(0.6)

    def cells_in(self, x0: int, y0: int, x1: int, y1: int) -> NDArray[np.int64]:
        """Indices (ascending) of the objects whose render window meets [x0, x1) × [y0, y1)."""
        b = self._bboxes
        hit = (b[:, 0] < x1) & (b[:, 2] > x0) & (b[:, 1] < y1) & (b[:, 3] > y0)
        return np.flatnonzero(hit)

    def transmission(self, index: int, cache: dict[int, F32] | None = None) -> F32:
        """Transmission patch of object ``index`` (from ``cache`` when there)."""
        if cache is not None and index in cache:
            return cache[index]
        patch = cell_transmission(self.geometries[index], self.profile, self.mpp)
        if cache is not None:
            cache[index] = patch
        return patch

    def _film_transmission(self, x0: int, y0: int, w: int, h: int) -> F32:
        """Streaky protein/mucus film of a conventional smear, as transmission (h, w, 3).

        The film thickness is ``amount * (1.4 + sin(k1 u + p1) + 0.6 sin(k2 u + p2))`` across the
        streaks (u = y cos a - x sin a); each sine splits exactly into two outer products of row and
        column terms, so no per-pixel trigonometry is needed.
        """
        assert self._streaks is not None
        angle, period1, phase1, period2, phase2, amount = self._streaks
        ca, sa = math.cos(angle), math.sin(angle)
        xs = np.arange(x0, x0 + w, dtype=np.float64)
        ys = np.arange(y0, y0 + h, dtype=np.float64)
        film = np.full((h, w), 1.4 * amount, dtype=np.float32)
        for period, phase, weight in ((period1, phase1, 1.0), (period2, phase2, 0.6)):
            k = _TWO_PI / period
            row = k * ca * ys + phase
            col = k * sa * xs
            f = amount * weight
            film += np.outer((f * np.sin(row)).astype(np.float32), np.cos(col).astype(np.float32))
            film -= np.outer((f * np.cos(row)).astype(np.float32), np.sin(col).astype(np.float32))
        trans: F32 = np.float32(1.0) - film[:, :, None] * self._film[None, None, :]
        return trans

    def _render_block(
        self,
        out: NDArray[np.uint8],
        origin: tuple[int, int],
        x0: int,
        y0: int,
        w: int,
        h: int,
        cache: dict[int, F32],
    ) -> None:
        x1, y1 = x0 + w, y0 + h
        # Columns/rows outside the slide continue the edge gain.
        cols = np.clip(np.arange(x0, x1), 0, self.layout.width - 1)
        rows = np.clip(np.arange(y0, y1), 0, self.layout.height - 1)
        if x0 >= 0 and x1 <= self.layout.width:
            col_rgb = self._col_rgb[x0:x1]
        else:
            col_rgb = self._col_rgb[cols]
        img = self._row_gain[rows][:, None, None] * col_rgb[None, :, :]
        if self._streaks is not None:
            img *= self._film_transmission(x0, y0, w, h)
        for i in self.cells_in(x0, y0, x1, y1):
            idx = int(i)
            patch = self.transmission(idx, cache)
            bx0, by0, bx1, by1 = self.geometries[idx].bbox
            ix0, iy0 = max(bx0, x0), max(by0, y0)
            ix1, iy1 = min(bx1, x1), min(by1, y1)
            img[iy0 - y0 : iy1 - y0, ix0 - x0 : ix1 - x0] *= patch[
                iy0 - by0 : iy1 - by0, ix0 - bx0 : ix1 - bx0
            ]
        ny, nx = y0 % _NOISE_PERIOD, x0 % _NOISE_PERIOD
        img += self._noise[ny : ny + h, nx : nx + w]
        np.clip(img, 0.0, 255.0, out=img)
        ox, oy = origin
        block = out[y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        block[...] = img  # float → uint8 truncation (the noise carries the +0.5)
        if self._lut is not None:
            for c in range(3):
                block[:, :, c] = self._lut[c][block[:, :, c]]

    def render(
        self, x0: int, y0: int, w: int, h: int, *, cache: dict[int, F32] | None = None
    ) -> NDArray[np.uint8]:
        """RGB uint8 (h, w, 3) of the level-0 region at (x0, y0).

        ``cache`` keeps transmission patches of objects between calls (the writer passes one per
        strip); without it a cache lives for this call only.
        """
        x0, y0, w, h = int(x0), int(y0), int(w), int(h)
        if w <= 0 or h <= 0:
            raise ValueError(f"region size must be positive, got {w}×{h}")
        out = np.empty((h, w, 3), dtype=np.uint8)
        local: dict[int, F32] = {} if cache is None else cache
        # Column bands outermost: an object is drawn once, then dropped once the bands pass it.
        for bx in range(x0, x0 + w, BLOCK_W):
            bw = min(BLOCK_W, x0 + w - bx)
            for by in range(y0, y0 + h, BLOCK_H):
                bh = min(BLOCK_H, y0 + h - by)
                self._render_block(out, (x0, y0), bx, by, bw, bh, local)
            if cache is None:
                limit = bx + bw
                for k in [k for k in local if self.geometries[k].bbox[2] <= limit]:
                    del local[k]
        return out


@functools.lru_cache(maxsize=4)
def _noise_texture(seed: int, sigma: float) -> F32:
    """Sensor noise: a tileable texture (period _NOISE_PERIOD), pre-tiled so that any block is a
    slice (no gathers); +0.5 makes the final float→uint8 truncation round to nearest. Read-only."""
    rng = np.random.default_rng([seed & 0xFFFFFFFF, 0x4E])
    tex = rng.standard_normal((_NOISE_PERIOD, _NOISE_PERIOD, 3))
    tex = ndimage.gaussian_filter(tex, (0.5, 0.5, 0), mode="wrap")
    tex *= sigma / tex.std()
    reps = (math.ceil(BLOCK_H / _NOISE_PERIOD) + 1, math.ceil(BLOCK_W / _NOISE_PERIOD) + 1, 1)
    tiled = np.tile(tex, reps)[: _NOISE_PERIOD + BLOCK_H, : _NOISE_PERIOD + BLOCK_W]
    out = (tiled + 0.5).astype(np.float32)
    out.flags.writeable = False
    return out


def _gain_profile(
    rng: np.random.Generator, n: int, scale_px: float, amount: float, *, stripes: bool
) -> NDArray[np.float32]:
    """1-D gain (≈1 ± amount) along ``n`` pixels: smooth noise, plus faint stripes if asked."""
    knots = math.ceil(n / scale_px) + 4
    coarse = ndimage.gaussian_filter1d(rng.standard_normal(knots), 1.0, mode="wrap")
    coarse -= coarse.mean()
    coarse *= amount / max(float(coarse.std()), 1e-9)
    pos = (np.arange(n) + 0.5) / scale_px + 1.5
    gain = 1.0 + np.interp(pos, np.arange(knots), coarse)
    if stripes:
        period = rng.uniform(800.0, 1200.0)
        gain += 0.003 * np.sin(np.arange(n) * (_TWO_PI / period) + rng.uniform(0, _TWO_PI))
    return np.asarray(gain, dtype=np.float32)


def render_region(layout: Layout, x0: int, y0: int, w: int, h: int) -> NDArray[np.uint8]:
    """Level-0 RGB pixels (h, w, 3) of a region of ``layout``, exactly as the writer draws them."""
    return Renderer(layout).render(x0, y0, w, h)
