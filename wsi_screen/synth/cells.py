"""Cell kinds (morphology in µm), explicit cell specifications and their exact geometry.

A :class:`CellSpec` says *where* an object lies (level-0 px) and *what* it is; its ``seed`` fixes
everything else (shape, size within the kind's range, texture), so the same spec always renders the
same pixels and has the same ground-truth outline. :func:`cell_geometry` turns a spec into polygons
in level-0 px at a given µm/px. Every outline is a star-shaped polygon around its own centre (or a
buffered polyline for mucus strands); the renderer draws exactly these polygons.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from wsi_screen.synth.stain import DYES

__all__ = [
    "ABNORMAL_CLASSES",
    "CLASS_NAMES",
    "KINDS",
    "CellGeometry",
    "CellSpec",
    "KindSpec",
    "cell_geometry",
    "polygon_area",
]

FloatArray = NDArray[np.float64]

#: Classes of the ground truth (inflammatory cells and debris are ``artifact``).
CLASS_NAMES: tuple[str, ...] = ("NILM", "ASC-US", "LSIL", "HSIL", "artifact")
#: Classes that a layout request can ask for by count (``abnormal={'HSIL': 5}``).
ABNORMAL_CLASSES: tuple[str, ...] = ("ASC-US", "LSIL", "HSIL")

ShapeType = Literal["polygon", "round", "fragment", "strand"]
NucleusShape = Literal["round", "irregular", "lobed", "pyknotic"]

#: Angular resolution of the radial tables used to rasterise star-shaped outlines.
N_ANGLES = 512
#: Mean nucleus diameter of a normal intermediate cell (µm): the reference for "enlarged".
INTERMEDIATE_NUCLEUS_UM = 7.5


@dataclass(frozen=True)
class KindSpec:
    """Morphology of one kind of object; every length is a diameter in µm."""

    name: str
    klass: str
    shape: ShapeType
    cell_diam_um: tuple[float, float]
    nucleus_diam_um: tuple[float, float] | None = None
    #: Nucleus diameter as a fraction of the cell diameter (overrides ``nucleus_diam_um``).
    nc_ratio: tuple[float, float] | None = None
    nucleus_shape: NucleusShape = "round"
    nucleus_irregularity: float = 0.04
    #: Nucleus stain intensity (hyperchromasia), relative to a normal intermediate nucleus.
    nucleus_od: tuple[float, float] = (1.0, 1.1)
    #: Chromatin texture: relative amplitude and grain size (µm).
    chromatin: float = 0.2
    chromatin_um: float = 0.35
    #: Cytoplasm dyes and their probabilities.
    dyes: tuple[tuple[str, float], ...] = (("cyan", 1.0),)
    thickness: tuple[float, float] = (0.8, 1.0)
    elongation: tuple[float, float] = (1.0, 1.4)
    vertices: tuple[int, int] = (5, 9)
    irregularity: float = 0.2
    halo: bool = False
    binucleate_p: float = 0.0
    fold_p: float = 0.0
    #: Largest offset of the nucleus from the cell centre, as a fraction of the cell radius.
    nucleus_offset: float = 0.12
    strand_width_um: tuple[float, float] = (2.0, 6.0)

    @property
    def nominal_radius_um(self) -> float:
        """Mean cell radius (µm), used for spacing when laying cells out."""
        return (self.cell_diam_um[0] + self.cell_diam_um[1]) / 4.0


_ENLARGED = INTERMEDIATE_NUCLEUS_UM

#: The kinds of objects the generator draws.
KINDS: dict[str, KindSpec] = {
    k.name: k
    for k in (
        KindSpec(
            "superficial",
            "NILM",
            "polygon",
            (45.0, 60.0),
            (4.2, 5.6),
            nucleus_shape="pyknotic",
            nucleus_irregularity=0.03,
            nucleus_od=(1.75, 2.05),
            chromatin=0.06,
            dyes=(("pink", 0.45), ("orange", 0.12), ("cyan", 0.43)),
            thickness=(0.45, 0.75),
            elongation=(1.0, 1.8),
            fold_p=0.35,
        ),
        KindSpec(
            "intermediate",
            "NILM",
            "polygon",
            (35.0, 55.0),
            (7.0, 8.4),
            nucleus_od=(0.95, 1.15),
            chromatin=0.22,
            dyes=(("cyan", 0.88), ("pink", 0.12)),
            thickness=(0.6, 0.95),
            elongation=(1.0, 1.75),
            fold_p=0.3,
        ),
        KindSpec(
            "parabasal",
            "NILM",
            "round",
            (16.0, 28.0),
            (8.0, 10.0),
            nucleus_od=(1.0, 1.2),
            chromatin=0.22,
            dyes=(("cyan", 0.9), ("pink", 0.1)),
            thickness=(1.05, 1.35),
            elongation=(1.0, 1.3),
            irregularity=0.06,
            nucleus_offset=0.18,
        ),
        KindSpec(
            "ascus",
            "ASC-US",
            "polygon",
            (35.0, 55.0),
            (_ENLARGED * math.sqrt(2.0), _ENLARGED * math.sqrt(2.5)),
            nucleus_shape="irregular",
            nucleus_irregularity=0.07,
            nucleus_od=(1.15, 1.35),
            chromatin=0.3,
            dyes=(("cyan", 0.6), ("pink", 0.3), ("orange", 0.1)),
            thickness=(0.6, 0.95),
            elongation=(1.0, 1.6),
            fold_p=0.15,
        ),
        KindSpec(
            "koilocyte",
            "LSIL",
            "polygon",
            (38.0, 58.0),
            (_ENLARGED * math.sqrt(2.0), _ENLARGED * math.sqrt(3.0)),
            nucleus_shape="irregular",
            nucleus_irregularity=0.11,
            nucleus_od=(1.3, 1.6),
            chromatin=0.28,
            dyes=(("pink", 0.45), ("orange", 0.2), ("cyan", 0.35)),
            thickness=(0.85, 1.15),
            elongation=(1.0, 1.4),
            halo=True,
            binucleate_p=0.25,
            nucleus_offset=0.08,
        ),
        KindSpec(
            "hsil",
            "HSIL",
            "round",
            (12.0, 20.0),
            nc_ratio=(0.6, 0.78),
            nucleus_shape="irregular",
            nucleus_irregularity=0.16,
            nucleus_od=(1.55, 1.9),
            chromatin=0.45,
            chromatin_um=0.6,
            dyes=(("cyan", 0.75), ("pink", 0.15), ("orange", 0.1)),
            thickness=(1.1, 1.5),
            elongation=(1.0, 1.35),
            irregularity=0.1,
            nucleus_offset=0.1,
        ),
        KindSpec(
            "neutrophil",
            "artifact",
            "round",
            (10.0, 12.0),
            nc_ratio=(0.62, 0.72),
            nucleus_shape="lobed",
            nucleus_od=(1.35, 1.6),
            chromatin=0.08,
            dyes=(("pale", 1.0),),
            thickness=(0.8, 1.1),
            elongation=(1.0, 1.15),
            irregularity=0.05,
            nucleus_offset=0.05,
        ),
        KindSpec(
            "lymphocyte",
            "artifact",
            "round",
            (7.0, 9.0),
            nc_ratio=(0.78, 0.86),
            nucleus_od=(1.55, 1.8),
            chromatin=0.15,
            dyes=(("pale", 1.0),),
            thickness=(0.9, 1.2),
            elongation=(1.0, 1.1),
            irregularity=0.04,
            nucleus_offset=0.06,
        ),
        KindSpec(
            "debris",
            "artifact",
            "fragment",
            (5.0, 30.0),
            dyes=(("debris", 0.5), ("pink", 0.2), ("cyan", 0.15), ("orange", 0.15)),
            thickness=(0.5, 1.3),
            elongation=(1.0, 2.5),
            vertices=(6, 12),
            irregularity=0.45,
            chromatin=0.2,
            chromatin_um=0.8,
        ),
        KindSpec(
            "mucus",
            "artifact",
            "strand",
            (60.0, 260.0),
            dyes=(("mucus", 1.0),),
            thickness=(0.5, 1.0),
            strand_width_um=(2.0, 7.0),
        ),
    )
}


@dataclass(frozen=True)
class CellSpec:
    """One object to draw: its centre in level-0 px, its kind and the seed of its randomness.

    ``size_um`` overrides the cell diameter (mucus: strand length) and ``nucleus_um`` the nucleus
    diameter; ``angle_deg`` the orientation; ``blur_um`` (Gaussian σ) renders it out of focus;
    ``dye`` pins the cytoplasm colour (``cyan``, ``pink``, ``orange``, ``pale``, ``debris``, ``mucus``).
    """

    x: float
    y: float
    kind: str
    seed: int = 0
    size_um: float | None = None
    nucleus_um: float | None = None
    angle_deg: float | None = None
    blur_um: float = 0.0
    dye: str | None = None
    cluster: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown cell kind {self.kind!r}; choose one of: {', '.join(KINDS)}")
        if not (math.isfinite(self.x) and math.isfinite(self.y)):
            raise ValueError(f"cell position must be finite, got ({self.x}, {self.y})")
        if self.size_um is not None and self.size_um <= 0:
            raise ValueError(f"size_um must be positive, got {self.size_um}")
        if self.nucleus_um is not None and self.nucleus_um <= 0:
            raise ValueError(f"nucleus_um must be positive, got {self.nucleus_um}")
        if self.blur_um < 0:
            raise ValueError(f"blur_um must be >= 0, got {self.blur_um}")
        if self.dye is not None and self.dye not in DYES:
            raise ValueError(f"unknown dye {self.dye!r}; choose one of: {', '.join(DYES)}")

    @classmethod
    def from_um(cls, x_um: float, y_um: float, kind: str, *, mpp: float, **options: object) -> CellSpec:
        """A spec whose centre is given in µm from the slide's top-left corner."""
        return cls(x_um / mpp, y_um / mpp, kind, **options)  # type: ignore[arg-type]

    @property
    def klass(self) -> str:
        """Ground-truth class (``NILM``, ``ASC-US``, ``LSIL``, ``HSIL`` or ``artifact``)."""
        return KINDS[self.kind].klass


@dataclass(frozen=True, eq=False)
class CellGeometry:
    """Exact outlines (level-0 px) and drawing parameters of one object."""

    spec: CellSpec
    #: Cell (cytoplasm) outline, (K, 2) x/y in level-0 px.
    cell: FloatArray
    #: Nucleus outlines (the first is the primary nucleus); empty for anucleate objects.
    nuclei: tuple[FloatArray, ...]
    #: Centre of the star-shaped cell outline, level-0 px.
    cell_center: tuple[float, float]
    #: Each nucleus as the union of star-shaped parts (outline, centre); one part unless lobed.
    nucleus_parts: tuple[tuple[tuple[FloatArray, tuple[float, float]], ...], ...]
    #: Koilocyte halo outline (star-shaped around ``halo_center``).
    halo: FloatArray | None = None
    halo_center: tuple[float, float] | None = None
    #: Mucus strand centre line (M, 2) and its half-widths (M,), px.
    strand: FloatArray | None = None
    strand_half_width: FloatArray | None = None
    #: Render window [x0, x1) × [y0, y1) in level-0 px (outline + antialiasing + blur margin).
    bbox: tuple[int, int, int, int] = (0, 0, 0, 0)
    # drawing parameters
    dye_u: float = 0.0
    thickness: float = 1.0
    gradient: tuple[float, float] = (0.0, 0.0)
    nucleus_od: float = 1.0
    folds: tuple[tuple[float, float, float, float, float, float], ...] = field(default=())
    radius_px: float = 1.0

    @property
    def klass(self) -> str:
        return self.spec.klass

    @property
    def kind(self) -> KindSpec:
        return KINDS[self.spec.kind]


def polygon_area(poly: FloatArray) -> float:
    """Area of a simple polygon (shoelace), in squared input units."""
    x, y = poly[:, 0], poly[:, 1]
    return float(0.5 * abs(x[:-1] @ y[1:] - y[:-1] @ x[1:] + x[-1] * y[0] - y[-1] * x[0]))


def polygon_centroid(poly: FloatArray) -> tuple[float, float]:
    """Area centroid of a simple polygon."""
    x, y = poly[:, 0], poly[:, 1]
    xn, yn = np.roll(x, -1), np.roll(y, -1)
    cross = x * yn - xn * y
    a = cross.sum() / 2.0
    if abs(a) < 1e-12:
        return float(x.mean()), float(y.mean())
    return float(((x + xn) * cross).sum() / (6 * a)), float(((y + yn) * cross).sum() / (6 * a))


def _rotate_scale(pts: FloatArray, angle: float, elong: float) -> FloatArray:
    """Stretch by ``elong`` along x (area kept) and rotate by ``angle`` radians."""
    s = math.sqrt(elong)
    m = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    out: FloatArray = (pts * np.array([s, 1.0 / s])) @ m.T
    return out


def _chaikin(poly: FloatArray, iterations: int) -> FloatArray:
    """Corner cutting: rounds the corners of a closed polygon (new points lie on its edges)."""
    for _ in range(iterations):
        nxt = np.roll(poly, -1, axis=0)
        q = 0.75 * poly + 0.25 * nxt
        r = 0.25 * poly + 0.75 * nxt
        poly = np.stack([q, r], axis=1).reshape(-1, 2)
    return poly


def _scale_to_area(poly: FloatArray, area: float) -> FloatArray:
    return poly * math.sqrt(area / max(polygon_area(poly), 1e-12))


def _polygon_shape(rng: np.random.Generator, n: int, irregularity: float, smooth: int) -> FloatArray:
    """Irregular polygon with vertices in angular order around the origin, slightly rounded."""
    jitter = rng.uniform(-0.3, 0.3, size=n)
    angles = (np.arange(n) + jitter) * (2 * math.pi / n) + rng.uniform(0, 2 * math.pi)
    radii = np.clip(1.0 + irregularity * rng.uniform(-1.0, 1.0, size=n), 0.45, None)
    poly = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    return _chaikin(poly, smooth)


def _fourier_shape(rng: np.random.Generator, m: int, irregularity: float, lobes: int = 0) -> FloatArray:
    """Round outline with smooth bumps (``irregularity``) or ``lobes`` deep lobes, m vertices."""
    theta = np.arange(m) * (2 * math.pi / m)
    k = np.arange(2, 7)
    amp = irregularity * rng.normal(0.0, 1.0, size=5) / (k - 0.5)
    phase = rng.uniform(0, 2 * math.pi, size=5)
    r = 1.0 + amp @ np.cos(np.outer(k, theta) + phase[:, None])
    if lobes:
        r += 0.42 * np.cos(lobes * theta + rng.uniform(0, 2 * math.pi))
        r += 0.06 * np.cos((lobes + 1) * theta + rng.uniform(0, 2 * math.pi))
    r = np.clip(r, 0.35, None)
    out = np.empty((m, 2))
    out[:, 0] = r * np.cos(theta)
    out[:, 1] = r * np.sin(theta)
    return out


_THETA = np.arange(N_ANGLES) * (2 * math.pi / N_ANGLES) - math.pi
_COS, _SIN = np.cos(_THETA), np.sin(_THETA)


def radial_table(poly: FloatArray, center: tuple[float, float]) -> FloatArray:
    """Distance from ``center`` to the outline along N_ANGLES directions (+ wrap-around entry).

    ``poly`` must be star-shaped around ``center`` with vertices in angular order.
    """
    p = poly - np.asarray(center)
    phi = np.arctan2(p[:, 1], p[:, 0])
    # Order vertices by angle starting anywhere; each direction hits exactly one edge.
    order = np.argsort(phi)
    p, phi = p[order], phi[order]
    q = np.concatenate([p[1:], p[:1]])
    idx = np.searchsorted(phi, _THETA, side="right") - 1  # edge from vertex idx to idx+1
    idx %= len(p)
    a, b = p[idx], q[idx]
    e = b - a
    denom = _COS * e[:, 1] - _SIN * e[:, 0]
    num = a[:, 0] * e[:, 1] - a[:, 1] * e[:, 0]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(np.abs(denom) > 1e-12, num / denom, np.hypot(a[:, 0], a[:, 1]))
    t = np.clip(t, 0.0, None)
    return np.append(t, t[0])


def _choose_dye(dyes: tuple[tuple[str, float], ...], u: float) -> str:
    """The dye whose cumulative-probability interval contains ``u``."""
    acc = 0.0
    for name, p in dyes:
        acc += p
        if u < acc:
            return name
    return dyes[-1][0]


NucleusParts = tuple[tuple[FloatArray, tuple[float, float]], ...]


def _nucleus(
    rng: np.random.Generator, kind: KindSpec, diam_px: float, center: FloatArray
) -> tuple[FloatArray, NucleusParts]:
    """(outline, parts) of one nucleus of equivalent diameter ``diam_px`` centred near ``center``."""
    if kind.nucleus_shape == "lobed":
        return _lobed_nucleus(rng, diam_px, center)
    irr = kind.nucleus_irregularity * (1.0 + 0.3 * rng.standard_normal())
    shape = _fourier_shape(rng, 40, max(irr, 0.0))
    elong = rng.uniform(1.0, 1.3 if kind.nucleus_shape != "pyknotic" else 1.12)
    shape = _rotate_scale(shape, rng.uniform(0, 2 * math.pi), elong)
    outline = _scale_to_area(shape, math.pi * (diam_px / 2.0) ** 2) + center
    c = (float(center[0]), float(center[1]))
    return outline, ((outline, c),)


def _lobed_nucleus(
    rng: np.random.Generator, span_px: float, center: FloatArray
) -> tuple[FloatArray, NucleusParts]:
    """Segmented (neutrophil) nucleus: 2-5 overlapping round lobes along an arc."""
    from shapely.geometry import Polygon
    from shapely.ops import unary_union

    k = int(rng.choice([2, 3, 3, 3, 4, 4, 5]))
    lobe_d = span_px * rng.uniform(0.42, 0.5)
    step = lobe_d * rng.uniform(0.62, 0.8)  # < diameter: neighbouring lobes overlap
    arc_r = span_px * rng.uniform(0.28, 0.4)
    dtheta = step / arc_r
    start = rng.uniform(0, 2 * math.pi)
    parts: list[tuple[FloatArray, tuple[float, float]]] = []
    polys = []
    for i in range(k):
        a = start + (i - (k - 1) / 2.0) * dtheta
        c = center + arc_r * np.array([math.cos(a), math.sin(a)])
        d = lobe_d * rng.uniform(0.85, 1.15)
        lobe = _rotate_scale(_fourier_shape(rng, 24, 0.04), rng.uniform(0, math.pi), 1.15)
        lobe = _scale_to_area(lobe, math.pi * (d / 2.0) ** 2) + c
        cc = (float(c[0]), float(c[1]))
        parts.append((lobe, cc))
        polys.append(Polygon(lobe))
    union = unary_union(polys)
    if union.geom_type != "Polygon":  # lobes always overlap, but stay safe
        union = union.convex_hull
    outline = np.asarray(union.exterior.coords, dtype=np.float64)[:-1]
    return outline, tuple(parts)


def _strand(
    rng: np.random.Generator, kind: KindSpec, length_px: float, mpp: float, angle: float
) -> tuple[FloatArray, FloatArray]:
    m = 32
    t = np.linspace(-0.5, 0.5, m) * length_px
    wavelength = length_px * rng.uniform(0.35, 1.0)
    amp = length_px * rng.uniform(0.03, 0.12)
    y = amp * np.sin(2 * math.pi * t / wavelength + rng.uniform(0, 2 * math.pi))
    y += np.cumsum(rng.normal(0.0, length_px * 0.004, size=m))
    y -= y.mean()
    line = _rotate_scale(np.stack([t, y], axis=1), angle, 1.0)
    w_lo, w_hi = kind.strand_width_um
    base = rng.uniform(w_lo, w_hi) / mpp / 2.0
    taper = np.sin(np.linspace(0.08, 0.92, m) * math.pi) ** 0.5
    half = base * taper * (1.0 + 0.2 * np.sin(np.linspace(0, rng.uniform(2, 6) * math.pi, m)))
    return line, half


def _strand_outline(line: FloatArray, half: FloatArray) -> FloatArray:
    tangent = np.gradient(line, axis=0)
    tangent /= np.maximum(np.hypot(tangent[:, 0], tangent[:, 1]), 1e-9)[:, None]
    normal = np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)
    left = line + normal * half[:, None]
    right = line - normal * half[:, None]
    return np.concatenate([left, right[::-1]], axis=0)


def cell_geometry(spec: CellSpec, mpp: float) -> CellGeometry:
    """Exact outlines and drawing parameters of ``spec`` at ``mpp`` µm/px (deterministic)."""
    kind = KINDS[spec.kind]
    rng = np.random.default_rng([int(spec.seed) & 0xFFFFFFFF, 0x5E11])
    lo, hi = kind.cell_diam_um
    diam_um = spec.size_um if spec.size_um is not None else float(rng.uniform(lo, hi))
    diam_px = diam_um / mpp
    angle = math.radians(spec.angle_deg) if spec.angle_deg is not None else rng.uniform(0, 2 * math.pi)
    elong = float(rng.uniform(*kind.elongation))
    center = np.array([spec.x, spec.y], dtype=np.float64)
    dye_u = float(rng.uniform())
    thickness = float(rng.uniform(*kind.thickness))
    grad_dir = rng.uniform(0, 2 * math.pi)
    grad_amp = rng.uniform(0.0, 0.22)
    gradient = (grad_amp * math.cos(grad_dir), grad_amp * math.sin(grad_dir))
    blur_px = spec.blur_um / mpp
    pad = 3.0 + 3.0 * blur_px

    if kind.shape == "strand":
        line, half = _strand(rng, kind, diam_px, mpp, angle)
        line = line + center
        outline = _strand_outline(line, half)
        x0, y0 = np.floor(outline.min(axis=0) - pad).astype(int)
        x1, y1 = np.ceil(outline.max(axis=0) + pad).astype(int)
        return CellGeometry(
            spec=spec,
            cell=outline,
            nuclei=(),
            cell_center=(spec.x, spec.y),
            nucleus_parts=(),
            strand=line,
            strand_half_width=half,
            bbox=(int(x0), int(y0), int(x1), int(y1)),
            dye_u=dye_u,
            thickness=thickness,
            gradient=(0.0, 0.0),
            radius_px=diam_px / 2.0,
        )

    area = math.pi * (diam_px / 2.0) ** 2
    if kind.shape == "polygon" or kind.shape == "fragment":
        n = int(rng.integers(kind.vertices[0], kind.vertices[1] + 1))
        shape = _polygon_shape(rng, n, kind.irregularity, smooth=1)
    else:
        shape = _fourier_shape(rng, 48, kind.irregularity)
    shape = _scale_to_area(_rotate_scale(shape, angle, elong), area)
    cell = shape + center
    radius_px = diam_px / 2.0

    nuclei: list[FloatArray] = []
    nucleus_parts: list[NucleusParts] = []
    halo = halo_center = None
    nucleus_od = 1.0
    if kind.nucleus_diam_um is not None or kind.nc_ratio is not None:
        if spec.nucleus_um is not None:
            n_diam_px = spec.nucleus_um / mpp
        elif kind.nc_ratio is not None:
            n_diam_px = diam_px * float(rng.uniform(*kind.nc_ratio))
        else:
            assert kind.nucleus_diam_um is not None
            n_diam_px = float(rng.uniform(*kind.nucleus_diam_um)) / mpp
        nucleus_od = float(rng.uniform(*kind.nucleus_od))
        off_r = rng.uniform(0.0, kind.nucleus_offset) * radius_px
        off_a = rng.uniform(0, 2 * math.pi)
        n_center = center + off_r * np.array([math.cos(off_a), math.sin(off_a)])
        binucleate = rng.uniform() < kind.binucleate_p
        if binucleate:
            sep_a = rng.uniform(0, 2 * math.pi)
            sep = 0.56 * n_diam_px * np.array([math.cos(sep_a), math.sin(sep_a)])
            centers = [n_center - sep, n_center + sep]
        else:
            centers = [n_center]
        for c in centers:
            outline, parts = _nucleus(rng, kind, n_diam_px, c)
            nuclei.append(outline)
            nucleus_parts.append(parts)
        if kind.halo:
            h_diam = diam_px * rng.uniform(0.5, 0.64) + (n_diam_px * 0.6 if binucleate else 0.0)
            h_shape = _fourier_shape(rng, 48, 0.2)
            h_shape = _scale_to_area(
                _rotate_scale(h_shape, rng.uniform(0, 2 * math.pi), rng.uniform(1.0, 1.35)),
                math.pi * (h_diam / 2.0) ** 2,
            )
            # The nucleus sits eccentrically in its halo.
            ecc_a = rng.uniform(0, 2 * math.pi)
            ecc = rng.uniform(0.0, 0.2) * h_diam / 2.0 * np.array([math.cos(ecc_a), math.sin(ecc_a)])
            h_center = n_center + ecc
            halo = h_shape + h_center
            halo_center = (float(h_center[0]), float(h_center[1]))

    folds: list[tuple[float, float, float, float, float, float]] = []
    if rng.uniform() < kind.fold_p:
        for _ in range(int(rng.integers(1, 3))):
            fa = rng.uniform(0, math.pi)
            folds.append(
                (
                    float(spec.x + rng.uniform(-0.45, 0.45) * radius_px),
                    float(spec.y + rng.uniform(-0.45, 0.45) * radius_px),
                    fa,
                    float(rng.uniform(0.3, 0.85) * radius_px),
                    float(rng.uniform(0.5, 1.1) / mpp),
                    float(rng.uniform(0.35, 0.9)),
                )
            )

    every = np.concatenate([cell, *nuclei]) if nuclei else cell  # a nucleus may poke out
    x0, y0 = np.floor(every.min(axis=0) - pad).astype(int)
    x1, y1 = np.ceil(every.max(axis=0) + pad).astype(int)
    return CellGeometry(
        spec=spec,
        cell=cell,
        nuclei=tuple(nuclei),
        cell_center=(spec.x, spec.y),
        nucleus_parts=tuple(nucleus_parts),
        halo=halo,
        halo_center=halo_center,
        bbox=(int(x0), int(y0), int(x1), int(y1)),
        dye_u=dye_u,
        thickness=thickness,
        gradient=gradient,
        nucleus_od=nucleus_od,
        folds=tuple(folds),
        radius_px=radius_px,
    )


def choose_dye(geom: CellGeometry, pink_bias: float) -> str:
    """Cytoplasm dye of ``geom``: pinned by its spec, or drawn from its kind's mix, with
    ``pink_bias`` moving probability from cyan to the eosinophilic dyes (negative: the reverse)."""
    if geom.spec.dye is not None:
        return geom.spec.dye
    probs = dict(geom.kind.dyes)
    eos = [n for n in probs if n in ("pink", "orange")]
    if pink_bias and "cyan" in probs and eos:
        eos_total = sum(probs[n] for n in eos)
        shift = min(max(pink_bias, -eos_total), probs["cyan"])
        probs["cyan"] -= shift
        for n in eos:
            probs[n] += shift * probs[n] / eos_total if eos_total > 0 else shift / len(eos)
    return _choose_dye(tuple(probs.items()), geom.dye_u)
