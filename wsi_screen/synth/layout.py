"""Layouts: which objects lie where on a synthetic slide.

:func:`random_layout` draws a plausible preparation (LBC spot or conventional smear) with exactly the
requested numbers of abnormal cells; :func:`make_layout` wraps explicit :class:`CellSpec` lists (tests
place cells on tile edges this way). Both give a :class:`Layout`, which the renderer and the writer
draw identically.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, get_args

import numpy as np

from wsi_screen.synth.cells import (
    ABNORMAL_CLASSES,
    CLASS_NAMES,
    KINDS,
    CellGeometry,
    CellSpec,
    cell_geometry,
)
from wsi_screen.synth.stain import STAIN_PROFILES, StainProfile, get_stain_profile

__all__ = [
    "Layout",
    "Preparation",
    "make_layout",
    "parse_abnormal",
    "random_layout",
]

Preparation = Literal["lbc", "conventional"]
PREPARATIONS: tuple[str, ...] = get_args(Preparation)

#: Squamous cells per mm² of preparation area (a 40× field of 256 µm holds ~15 LBC cells).
DEFAULT_DENSITY_PER_MM2 = {"lbc": 220.0, "conventional": 380.0}
_NILM_MIX = (("superficial", 0.3), ("intermediate", 0.63), ("parabasal", 0.07))
_ABNORMAL_KIND = {"ASC-US": "ascus", "LSIL": "koilocyte", "HSIL": "hsil"}
_DEFAULTS = {
    #               inflammation, debris, mucus, cluster_fraction, spacing
    "lbc": (0.15, 0.05, 0.004, 0.08, 0.78),
    "conventional": (0.35, 0.10, 0.02, 0.2, 0.5),
}

#: Streak parameters of a conventional smear: angle (rad), period (px), phase, period, phase, OD.
Streaks = tuple[float, float, float, float, float, float]


@dataclass(frozen=True)
class Layout:
    """Everything needed to draw a slide: size, µm/px, objects, stain and background parameters."""

    width: int
    height: int
    mpp: float
    cells: tuple[CellSpec, ...]
    seed: int = 0
    stain: StainProfile = field(default_factory=lambda: STAIN_PROFILES["default"])
    preparation: Preparation = "lbc"
    #: LBC spot circle (centre x, centre y, radius) in level-0 px, or None.
    spot: tuple[float, float, float] | None = None
    streaks: Streaks | None = None
    #: Out-of-focus discs (centre x, centre y, radius) in level-0 px (informational).
    blur_regions: tuple[tuple[float, float, float], ...] = ()

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"slide size must be positive, got {self.width}×{self.height}")
        if not 0.01 <= self.mpp <= 50.0:
            raise ValueError(f"mpp must be a plausible µm/px (0.01–50), got {self.mpp}")
        if self.preparation not in PREPARATIONS:
            raise ValueError(
                f"unknown preparation {self.preparation!r}; choose one of: {', '.join(PREPARATIONS)}"
            )

    @cached_property
    def geometries(self) -> tuple[CellGeometry, ...]:
        """Exact geometry of every object (index = object id)."""
        return tuple(cell_geometry(c, self.mpp) for c in self.cells)

    def class_counts(self) -> dict[str, int]:
        """Number of objects per ground-truth class (every class present, maybe 0)."""
        counts = Counter(c.klass for c in self.cells)
        return {k: counts.get(k, 0) for k in CLASS_NAMES}

    def kind_counts(self) -> dict[str, int]:
        """Number of objects per kind (every kind present, maybe 0)."""
        counts = Counter(c.kind for c in self.cells)
        return {k: counts.get(k, 0) for k in KINDS}


def _check_size(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2:
        raise ValueError(f"size must be (width, height), got {size!r}")
    w, h = int(size[0]), int(size[1])
    if w <= 0 or h <= 0:
        raise ValueError(f"slide size must be positive, got {w}×{h}")
    return w, h


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, stream])


def _streaks(seed: int, mpp: float) -> Streaks:
    rng = _rng(seed, 0x57)
    return (
        float(rng.normal(0.0, 0.25)),
        float(rng.uniform(250.0, 700.0) / mpp),
        float(rng.uniform(0, 2 * math.pi)),
        float(rng.uniform(90.0, 220.0) / mpp),
        float(rng.uniform(0, 2 * math.pi)),
        float(rng.uniform(0.04, 0.08)),
    )


def make_layout(
    size: Sequence[int],
    cells: Iterable[CellSpec],
    *,
    mpp: float = 0.25,
    seed: int = 0,
    stain: str | StainProfile = "default",
    stain_jitter: float = 0.0,
    preparation: Preparation = "lbc",
    spot: tuple[float, float, float] | None = None,
) -> Layout:
    """A layout of exactly ``cells`` (ids in the given order) on a ``size`` = (width, height) slide."""
    w, h = _check_size(size)
    profile = get_stain_profile(stain).jittered(_rng(seed, 0x5A), stain_jitter)
    return Layout(
        width=w,
        height=h,
        mpp=float(mpp),
        cells=tuple(cells),
        seed=int(seed),
        stain=profile,
        preparation=preparation,
        spot=spot,
        streaks=_streaks(seed, mpp) if preparation == "conventional" else None,
    )


_ALIASES = {re.sub(r"[^a-z]", "", k.lower()): k for k in ABNORMAL_CLASSES}


def parse_abnormal(text: str) -> dict[str, int | float]:
    """Parse ``"HSIL=5,LSIL=3"`` (counts) or ``"HSIL=0.01"`` (fractions of squamous cells).

    Class names are case-insensitive (``ascus`` = ``ASC-US``). Raises ValueError naming the bad part.
    """
    out: dict[str, int | float] = {}
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        if part.count("=") != 1:
            raise ValueError(f"bad abnormal-cell request {part!r}: expected CLASS=COUNT, e.g. HSIL=5")
        name, value = (s.strip() for s in part.split("="))
        key = _ALIASES.get(re.sub(r"[^a-z]", "", name.lower()))
        if key is None:
            raise ValueError(f"unknown class {name!r} in {part!r}; choose from {', '.join(ABNORMAL_CLASSES)}")
        if key in out:
            raise ValueError(f"class {key} given twice (in {part!r})")
        number = _parse_number(value)
        if number is None:
            raise ValueError(f"bad count {value!r} in {part!r}: give a whole number or a fraction in [0, 1)")
        if number < 0:
            raise ValueError(f"negative count {value!r} in {part!r}")
        out[key] = number
    return out


def _parse_number(text: str) -> int | float | None:
    """An int, a float in [0, 1), a negative number (reported by the caller), or None."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return None
    if not math.isfinite(number) or number >= 1.0:
        return None
    return number


def _resolve_abnormal(abnormal: Mapping[str, float] | str | None, n_squamous: int) -> dict[str, int]:
    if abnormal is None:
        return {}
    req = parse_abnormal(abnormal) if isinstance(abnormal, str) else dict(abnormal)
    out: dict[str, int] = {}
    for name, value in req.items():
        if name not in ABNORMAL_CLASSES:
            raise ValueError(f"unknown abnormal class {name!r}; choose from {', '.join(ABNORMAL_CLASSES)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"bad count {value!r} for {name}: give a count or a fraction in [0, 1)")
        if isinstance(value, int) or (float(value).is_integer() and value >= 1):
            out[name] = int(value)
        elif value < 1:
            out[name] = round(float(value) * n_squamous)
        else:
            raise ValueError(f"bad count {value!r} for {name}: give a count or a fraction in [0, 1)")
    return out


class _Placer:
    """Rejection sampling of centres with a minimum spacing between "exclusive" objects."""

    def __init__(
        self,
        rng: np.random.Generator,
        size: tuple[int, int],
        spot: tuple[float, float, float] | None,
        streaks: Streaks | None,
        spacing: float,
        cell_px: float,
    ) -> None:
        self.rng, self.size, self.spot, self.streaks = rng, size, spot, streaks
        self.spacing, self.cell = spacing, cell_px
        self.grid: dict[tuple[int, int], list[tuple[float, float, float]]] = {}

    def _density(self, x: float, y: float) -> float:
        if self.streaks is None:
            return 1.0
        angle, p1, ph1, p2, ph2, _ = self.streaks
        u = -x * math.sin(angle) + y * math.cos(angle)
        s = 1.4 + math.sin(2 * math.pi * u / p1 + ph1) + 0.6 * math.sin(2 * math.pi * u / p2 + ph2)
        return min(max(s / 3.0, 0.03), 1.0)

    def candidate(self, margin: float) -> tuple[float, float]:
        """A point of the preparation area, following the smear's streaks if any."""
        w, h = self.size
        for _ in range(100):
            if self.spot is not None:
                cx, cy, r = self.spot
                rr = max(r - margin, 1.0) * math.sqrt(self.rng.uniform())
                a = self.rng.uniform(0, 2 * math.pi)
                x, y = cx + rr * math.cos(a), cy + rr * math.sin(a)
            else:
                x, y = self.rng.uniform(0, w), self.rng.uniform(0, h)
            if self.rng.uniform() < self._density(x, y):
                break
        return float(min(max(x, 0.0), w - 1e-3)), float(min(max(y, 0.0), h - 1e-3))

    def free(self, x: float, y: float, r: float) -> bool:
        gx, gy = int(x // self.cell), int(y // self.cell)
        for i in (gx - 1, gx, gx + 1):
            for j in (gy - 1, gy, gy + 1):
                for ox, oy, orad in self.grid.get((i, j), ()):
                    if (ox - x) ** 2 + (oy - y) ** 2 < (self.spacing * (r + orad)) ** 2:
                        return False
        return True

    def add(self, x: float, y: float, r: float) -> None:
        self.grid.setdefault((int(x // self.cell), int(y // self.cell)), []).append((x, y, r))

    def place(self, r: float, *, exclusive: bool, tries: int = 30) -> tuple[float, float]:
        x, y = self.candidate(r)
        if exclusive:
            for _ in range(tries):
                if self.free(x, y, r):
                    break
                x, y = self.candidate(r)
            self.add(x, y, r)
        return x, y


def _groups(rng: np.random.Generator, n: int, fraction: float, lo: int, hi: int) -> list[int]:
    """Split ``n`` objects into group sizes: about ``fraction`` in groups of lo..hi, rest singles."""
    sizes: list[int] = []
    grouped = round(n * fraction) if n >= lo else 0
    while grouped >= lo:
        k = min(int(rng.integers(lo, hi + 1)), grouped)
        sizes.append(k)
        grouped -= k
    singles = n - sum(sizes)
    return sizes + [1] * singles


def random_layout(
    size: Sequence[int],
    *,
    mpp: float = 0.25,
    seed: int = 0,
    abnormal: Mapping[str, float] | str | None = None,
    density_per_mm2: float | None = None,
    preparation: Preparation = "lbc",
    spot: bool | None = None,
    stain: str | StainProfile = "default",
    stain_jitter: float = 0.05,
    blur_fraction: float = 0.05,
    inflammation: float | None = None,
    debris: float | None = None,
    cluster_fraction: float | None = None,
) -> Layout:
    """A random but plausible preparation on a ``size`` = (width, height) px slide.

    Args:
        mpp: µm per level-0 pixel.
        seed: fixes everything (the same arguments give the same layout).
        abnormal: exact numbers (``{'HSIL': 5}``) or fractions of the squamous cells
            (``{'LSIL': 0.01}``), or the string form of :func:`parse_abnormal`.
        density_per_mm2: squamous cells per mm² of preparation (default 220 LBC, 380 smear).
        preparation: ``"lbc"`` (even, sparse, in a circular spot) or ``"conventional"`` (streaky,
            denser, more overlap, inflammation and mucus, over the whole slide).
        spot: confine an LBC preparation to a central circle (default: True for LBC).
        stain: stain profile name (see ``STAIN_PROFILES``) or a profile; ``stain_jitter`` perturbs it.
        blur_fraction: about this fraction of the objects lies in out-of-focus discs.
        inflammation, debris: neutrophils / debris fragments per squamous cell.
        cluster_fraction: fraction of intermediate cells in overlapping groups.
    """
    w, h = _check_size(size)
    if preparation not in PREPARATIONS:
        raise ValueError(f"unknown preparation {preparation!r}; choose one of: {', '.join(PREPARATIONS)}")
    if not 0.0 <= blur_fraction <= 1.0:
        raise ValueError(f"blur_fraction must be in [0, 1], got {blur_fraction}")
    d_infl, d_debris, d_mucus, d_cluster, spacing = _DEFAULTS[preparation]
    inflammation = d_infl if inflammation is None else inflammation
    debris = d_debris if debris is None else debris
    cluster_fraction = d_cluster if cluster_fraction is None else cluster_fraction
    density = DEFAULT_DENSITY_PER_MM2[preparation] if density_per_mm2 is None else density_per_mm2
    if density < 0 or inflammation < 0 or debris < 0 or not 0 <= cluster_fraction <= 1:
        raise ValueError("density_per_mm2, inflammation and debris must be >= 0, cluster_fraction in [0, 1]")

    rng = _rng(seed, 0x1A)
    profile = get_stain_profile(stain).jittered(_rng(seed, 0x5A), stain_jitter)
    use_spot = (preparation == "lbc") if spot is None else bool(spot)
    spot_circle = (w / 2.0, h / 2.0, 0.46 * min(w, h)) if use_spot else None
    streaks = _streaks(seed, mpp) if preparation == "conventional" else None
    px_area_um2 = mpp * mpp
    if spot_circle is not None:
        area_mm2 = math.pi * spot_circle[2] ** 2 * px_area_um2 / 1e6
    else:
        area_mm2 = w * h * px_area_um2 / 1e6
    n_squamous = round(density * area_mm2)
    abn = _resolve_abnormal(abnormal, n_squamous)
    n_nilm = max(n_squamous - sum(abn.values()), 0)

    # What to place: (kind, group size, exclusive?)
    nilm_kinds = [k for k, _ in _NILM_MIX]
    nilm_p = np.array([p for _, p in _NILM_MIX])
    nilm_counts = rng.multinomial(n_nilm, nilm_p / nilm_p.sum())
    plan: list[tuple[str, int, bool]] = []
    for kind, n in zip(nilm_kinds, nilm_counts, strict=True):
        frac = cluster_fraction if kind == "intermediate" else cluster_fraction / 3
        plan += [(kind, g, True) for g in _groups(rng, int(n), frac, 3, 7)]
    for klass in ABNORMAL_CLASSES:
        n = abn.get(klass, 0)
        frac = 0.4 if klass == "HSIL" else 0.0
        plan += [(_ABNORMAL_KIND[klass], g, True) for g in _groups(rng, n, frac, 3, 7)]
    n_neut = round(inflammation * n_squamous)
    plan += [("neutrophil", g, False) for g in _groups(rng, n_neut, 0.5, 3, 12)]
    plan += [("lymphocyte", 1, False)] * round(0.12 * n_neut)
    plan += [("debris", 1, False)] * round(debris * n_squamous)
    plan += [("mucus", 1, False)] * round(d_mucus * n_squamous)
    shuffled: list[int] = rng.permutation(len(plan)).tolist()
    # Big exclusive objects first, so the spacing constraint can still be met.
    order = sorted(shuffled, key=lambda i: (not plan[i][2], -KINDS[plan[i][0]].nominal_radius_um))

    max_r = max(k.nominal_radius_um for k in KINDS.values() if k.shape != "strand") / mpp
    placer = _Placer(rng, (w, h), spot_circle, streaks, spacing, 2 * max_r)
    placed: list[tuple[float, float, str, int | None]] = []
    cluster_id = 0
    for i in order:
        kind, group, exclusive = plan[i]
        r = KINDS[kind].nominal_radius_um / mpp
        if kind == "mucus":
            r = 10.0 / mpp
        if group == 1:
            x, y = placer.place(r, exclusive=exclusive)
            placed.append((x, y, kind, None))
            continue
        spread = r * (0.9 if exclusive else 1.2) * math.sqrt(group) / 1.6
        gx, gy = placer.place(r + spread, exclusive=exclusive)
        for _ in range(group):
            x = float(np.clip(gx + rng.normal(0.0, spread), 0.0, w - 1e-3))
            y = float(np.clip(gy + rng.normal(0.0, spread), 0.0, h - 1e-3))
            placed.append((x, y, kind, cluster_id))
        cluster_id += 1

    # Out-of-focus discs covering about blur_fraction of the preparation.
    blur_regions: list[tuple[float, float, float]] = []
    target = blur_fraction * area_mm2 * 1e6 / px_area_um2
    covered = 0.0
    r_cap = 0.3 * min(w, h)
    while covered < target and blur_fraction > 0:
        rb = min(rng.uniform(100.0, 350.0) / mpp, r_cap)
        bx, by = placer.candidate(0.0)
        blur_regions.append((bx, by, rb))
        covered += math.pi * rb * rb
    blur_max = [float(rng.uniform(1.5, 3.0)) for _ in blur_regions]

    placed.sort(key=lambda p: (p[1], p[0]))
    seeds = rng.integers(0, 2**31 - 1, size=len(placed))
    cells: list[CellSpec] = []
    for (x, y, kind, cluster), s in zip(placed, seeds, strict=True):
        blur = 0.0
        for (bx, by, rb), bm in zip(blur_regions, blur_max, strict=True):
            d2 = ((x - bx) ** 2 + (y - by) ** 2) / (rb * rb)
            if d2 < 1.0:
                blur = max(blur, bm * math.sqrt(1.0 - d2))
        blur = round(blur, 3) if blur >= 0.6 else 0.0
        cells.append(CellSpec(x, y, kind, seed=int(s), blur_um=blur, cluster=cluster))
    return Layout(
        width=w,
        height=h,
        mpp=float(mpp),
        cells=tuple(cells),
        seed=int(seed),
        stain=profile,
        preparation=preparation,
        spot=spot_circle,
        streaks=streaks,
        blur_regions=tuple(blur_regions),
    )
