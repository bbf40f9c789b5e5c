"""Candidate extraction in torch, batched over maps on any device: the device path of
:mod:`wsi_screen.candidates`.

:func:`extract_candidates_torch` takes (B, H, W) probability maps where the U-Net left them (CPU or
CUDA) and returns, per map, the ``"map"``-frame :class:`~wsi_screen.cells.CellTable` that
:func:`~wsi_screen.candidates.extract_candidates` returns for it: same columns, units, coordinates
and order. It works on flat lists of the set pixels of all maps at once (batch-major raster order;
pixels of different maps are never neighbours):

1. nucleus foreground = ``nucleus ≥ threshold``;
2. connected components (4-connected, scipy's default): min-label propagation along the pixel graph's
   edges with hooking and pointer jumping (Shiloach–Vishkin style, no union-find); each pixel ends
   with the index of its component's first pixel in raster order, so ids and their order are scipy's;
3. seeds = components of ``marker ≥ marker_threshold``; those whose centroids lie within
   ``min_peak_distance_um`` merge (pairwise distances per map; the pairs' components by the same
   propagation). Without a marker: :func:`skimage.feature.peak_local_max`'s maxima of the distance
   transform (window maxima within each component, its rule for flat components, its greedy
   spacing as a parallel fixpoint), one seed each;
4. splitting: the marker watershed on ``-distance``. The exact Euclidean distance transform of the
   foreground (separable: row distances by cumulative max/min, then a min over row offsets; squared
   distances are integers) orders the flood. :func:`_flood` reproduces the priority queue of
   :func:`skimage.segmentation.watershed` in parallel rounds — every queued pixel of a priority
   pops at once, the queue's first-in-first-out tie-break kept by an age per pixel — so the split
   lines are the CPU path's except where seeds tie (scikit-image pops equal seeds in heap order).
   Rounds go by level over the whole batch on the CPU, per component on an accelerator (fewer
   sequential steps; the same labels). Foreground no seed reaches becomes instances of its own (its
   components);
5. per-nucleus sums (area, centroid, second moments, probability, optical density) with
   ``index_add`` in float64; the size limits;
6. cells: the nuclei flood the cell foreground in order of the distance from the nuclei, in levels
   of :data:`_CELL_LEVEL_STEP_PX` (the CPU path floods by the exact distance: cell areas agree
   less closely than nuclei);
7. outlines and perimeters: for the kept nuclei only (size limits and ``min_detection_score``), on
   the CPU from each nucleus's crop, with the CPU path's code; everything else crosses to the host
   in one copy per batch.

Agreement with the CPU path is tested in ``tests/test_candidates_torch.py``; the measured figures are
in ``docs/performance.md`` (*Candidate extraction in torch*).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from wsi_screen.candidates import _outline
from wsi_screen.cells import MORPHOMETRICS, CellTable

__all__ = ["extract_candidates_torch"]

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

#: Width of one level of the cell flood (distance from the nuclei, map px).
_CELL_LEVEL_STEP_PX = 0.5
#: Distances beyond this (µm) from the nuclei are one level: the cells' flood goes on breadth-first.
_CELL_DISTANCE_CAP_UM = 32.0
#: Pairwise centroid distances are computed for at most this many pairs at a time.
_PAIR_CHUNK = 1 << 24

#: skimage's order of a pixel's 4-neighbours (raveled offsets ascending).
_NEIGHBOURS_4 = ((-1, 0), (0, -1), (0, 1), (1, 0))


class _Pixels:
    """The set pixels of a (B, H, W) mask as a flat list in batch-major raster order."""

    def __init__(self, mask: Tensor) -> None:
        b, h, w = (int(v) for v in mask.shape)
        self.shape = (b, h, w)
        flat = mask.reshape(-1)
        self.pos = torch.nonzero(flat).squeeze(1)  # sorted ascending
        self.n = int(self.pos.numel())
        self.inv = torch.full((flat.numel(),), -1, dtype=torch.int64, device=mask.device)
        self.inv[self.pos] = torch.arange(self.n, device=mask.device)
        hw = h * w
        self.image = self.pos // hw
        self.row = (self.pos % hw) // w
        self.col = self.pos % w

    def neighbours(self, offsets: Sequence[tuple[int, int]]) -> Tensor:
        """(len(offsets), n) index of each pixel's neighbour in the set, or its own index."""
        _, h, w = self.shape
        own = torch.arange(self.n, device=self.pos.device)
        out = []
        for dr, dc in offsets:
            r, c = self.row + dr, self.col + dc
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            q = torch.where(inside, self.pos + dr * w + dc, 0)
            j = torch.where(inside, self.inv[q], -1)
            out.append(torch.where(j >= 0, j, own))
        return torch.stack(out) if out else own[None]

    def edges(self, connectivity: int = 4) -> tuple[Tensor, Tensor]:
        """Each edge between neighbouring set pixels once, as index pairs (u, v)."""
        fwd = [(1, 0), (0, 1)] + ([(1, 1), (1, -1)] if connectivity == 8 else [])
        nb = self.neighbours(fwd)
        own = torch.arange(self.n, device=self.pos.device).expand_as(nb)
        real = nb != own
        return own[real], nb[real]


def _components(n: int, u: Tensor, v: Tensor) -> Tensor:
    """Connected components of the graph on ``n`` nodes with edges (u, v): the smallest node index of
    each node's component (hooking of the roots + pointer jumping until nothing changes)."""
    lab = torch.arange(n, device=u.device)
    if n == 0 or u.numel() == 0:
        return lab
    while True:
        lu, lv = lab[u], lab[v]
        m = torch.minimum(lu, lv)
        new = lab.clone()
        new.scatter_reduce_(0, lu, m, reduce="amin")
        new.scatter_reduce_(0, lv, m, reduce="amin")
        new = new[new]
        new = new[new]
        if torch.equal(new, lab):
            return lab
        lab = new


def _component_ids(n: int, u: Tensor, v: Tensor) -> Tensor:
    """Component id of each node, 0.. in the order of the components' first nodes."""
    _, ids = torch.unique(_components(n, u, v), return_inverse=True)
    out: Tensor = ids
    return out


#: Flood schedule (see :func:`_flood`): None = per component on accelerators, by level on the CPU.
PACED: bool | None = None


def _paced(device: torch.device) -> bool:
    return device.type != "cpu" if PACED is None else PACED


class _Queue:
    """The labels of a flood and the age order of its priority queue (see :func:`_flood`)."""

    def __init__(self, nb: Tensor, labels: Tensor) -> None:
        n = int(labels.numel())
        self.k = k = int(nb.shape[0])
        self.nb = nb
        self.labels = labels.clone()
        self.lbits = max(1, int(labels.max()).bit_length()) if n else 1
        if (n * k + k).bit_length() + self.lbits > 62:
            raise ValueError(f"too many pixels ({n}) or labels for one flood")
        dev = labels.device
        self.seeds = torch.nonzero(labels > 0).squeeze(1)
        self.count = int(self.seeds.numel())
        # base: (age · k) << lbits | label, so that base + (direction << lbits) orders the pushes.
        self.base = torch.zeros_like(labels)
        self.base[self.seeds] = ((torch.arange(self.count, device=dev) * k) << self.lbits) | labels[
            self.seeds
        ]
        self.step = torch.arange(k, device=dev)[:, None] << self.lbits
        self.never = torch.iinfo(torch.int64).max
        self.best = torch.full_like(labels, self.never)

    def pop(self, src: Tensor) -> Tensor:
        """Pop the pixels ``src`` (all of one priority per component): their unlabelled neighbours take
        the label of the oldest of them; returns those new pixels in the order the queue pushes them."""
        to = self.nb[:, src]
        free = torch.nonzero(self.labels[to] == 0, as_tuple=True)
        if free[0].numel() == 0:
            return free[0]
        to, key = to[free], (self.base[src] + self.step)[free]
        self.best.scatter_reduce_(0, to, key, reduce="amin")
        won = key == self.best[to]  # one entry per newly labelled pixel
        key, at = torch.sort(key[won])
        new = to[won][at]
        self.best[new] = self.never
        self.labels[new] = key & ((1 << self.lbits) - 1)
        m = int(new.numel())
        age = self.count + torch.arange(m, device=new.device)
        self.base[new] = ((age * self.k) << self.lbits) | self.labels[new]
        self.count += m
        return new


def _flood(nb: Tensor, labels: Tensor, value: Tensor, comp: Tensor | None = None) -> Tensor:
    """Marker watershed on the pixel graph ``nb``: labels (1..n, 0 = none) flood in priority order.

    The priority queue of :func:`skimage.segmentation.watershed` (no compactness, no watershed line),
    popped in parallel. Seeds are queued with their ``value`` (higher pops first); a pixel is labelled
    when a neighbour pops, and queued with ``min(value, the neighbour's priority)``. The queue's
    tie-break, first in first out, is kept with an age per pixel: a pixel offered several labels at
    once takes that of the oldest neighbour, and new pixels are aged in the order the queue pushes
    them (their parent's age, then the neighbour order of ``nb``). Seeds are aged in raster order
    (scikit-image pops equal seeds in heap order: the one difference).

    Two schedules, the same labels: without ``comp``, a level (value) at a time for all pixels — a
    level's pops are the labelled pixels of that value, then, round after round, the pixels they
    label whose value is at least the level (cheap rounds: the fewest tensor operations on the CPU);
    with ``comp`` (component ids ≥ 0), every component pops its own highest priority each round, so
    the number of rounds is that of the deepest component, not the sum over the levels of a batch
    (the fewest sequential steps: for an accelerator).
    """
    if labels.numel() == 0 or not bool((labels > 0).any()):
        return labels
    q = _Queue(nb, labels)
    rounds = 0
    if comp is None:
        order = torch.argsort(value, descending=True, stable=True)
        levels, sizes = torch.unique_consecutive(value[order], return_counts=True)
        ends = torch.cumsum(sizes, 0).tolist()
        for level, start, end in zip(levels.tolist(), [0, *ends[:-1]], ends, strict=True):
            seg = order[start:end]
            src = seg[q.labels[seg] > 0]
            while src.numel():
                rounds += 1
                new = q.pop(src)
                src = new[value[new] >= level]  # queued at this level: they pop next
    else:
        pending, prio = q.seeds, value[q.seeds]
        top = torch.empty(int(comp.max()) + 1, dtype=value.dtype, device=value.device)
        while pending.numel():
            rounds += 1
            c = comp[pending]
            level = top.fill_(torch.iinfo(value.dtype).min).scatter_reduce_(0, c, prio, reduce="amax")
            pop = prio == level[c]
            new = q.pop(pending[pop])
            pending = torch.cat([pending[~pop], new])
            prio = torch.cat([prio[~pop], torch.minimum(value[new], level[comp[new]])])
    logger.debug("flood of %d px from %d seeds: %d rounds", int(labels.numel()), q.seeds.numel(), rounds)
    return q.labels


def _edt2(inside: Tensor, cap: int) -> Tensor:
    """Squared Euclidean distance (int64, map px²) of each ``inside`` pixel of (B, H, W) maps to the
    nearest pixel that is not, exact up to ``cap``; farther ones get ``(cap + 1)²``. Only pixels of the
    map count (scipy's convention); 0 outside."""
    _, h, w = (int(v) for v in inside.shape)
    far = cap + 1
    col = torch.arange(w, device=inside.device, dtype=torch.int64)
    zero = ~inside
    left = torch.where(zero, col, -(w + far)).cummax(dim=-1).values
    right = torch.where(zero, col, 2 * w + far).flip(-1).cummin(dim=-1).values.flip(-1)
    g = torch.minimum(col - left, right - col).clamp(max=far)
    g2 = (g * g).to(torch.int32)
    d2 = g2.clone()
    worst = int(d2.max()) if d2.numel() else 0
    for o in range(1, min(far, h)):
        if o * o >= worst:  # no row farther away can give a smaller distance
            break
        oo = o * o
        below, above = d2[:, o:], d2[:, :-o]
        torch.minimum(below, g2[:, :-o] + oo, out=below)
        torch.minimum(above, g2[:, o:] + oo, out=above)
        if o % 4 == 0:
            worst = int(d2.max())
    d2 = torch.where(d2 > cap * cap, far * far, d2)
    return torch.where(inside, d2, 0).to(torch.int64)


def _close_pairs(image: Tensor, x: Tensor, y: Tensor, radius: float, n_images: int) -> tuple[Tensor, Tensor]:
    """Index pairs (i < j) of points of the same image within ``radius`` (points sorted by image)."""
    dev = x.device
    k = int(x.numel())
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    if k < 2:
        return empty, empty
    counts = torch.bincount(image, minlength=n_images)
    starts = torch.cumsum(counts, 0) - counts
    kmax = int(counts.max())
    local = torch.arange(k, device=dev) - starts[image]
    px = torch.full((n_images, kmax), math.nan, dtype=torch.float64, device=dev)
    py = px.clone()
    px[image, local] = x
    py[image, local] = y
    step = max(1, _PAIR_CHUNK // max(1, kmax * kmax))
    upper = torch.ones(kmax, kmax, dtype=torch.bool, device=dev).triu(1)
    us, vs = [], []
    for s in range(0, n_images, step):
        cx, cy = px[s : s + step], py[s : s + step]
        d2 = (cx[:, :, None] - cx[:, None, :]) ** 2 + (cy[:, :, None] - cy[:, None, :]) ** 2
        bi, a, c = torch.nonzero((d2 <= radius * radius) & upper, as_tuple=True)
        base = starts[bi + s]
        us.append(base + a)
        vs.append(base + c)
    return torch.cat(us), torch.cat(vs)


def _seeds(pix: _Pixels, connectivity: int, min_distance_px: float, n_images: int) -> Tensor:
    """Seed of each pixel of ``pix``: the flat position of its (merged) blob's first pixel."""
    u, v = pix.edges(connectivity)
    roots, blob = torch.unique(_components(pix.n, u, v), return_inverse=True)
    k = int(roots.numel())
    if k >= 2 and min_distance_px > 0:
        # Blob centroids (row, col), merged when closer than min_distance_px (transitively).
        count = torch.bincount(blob, minlength=k).to(torch.float64)
        cy = torch.zeros(k, dtype=torch.float64, device=blob.device).index_add_(
            0, blob, pix.row.to(torch.float64)
        )
        cx = torch.zeros_like(cy).index_add_(0, blob, pix.col.to(torch.float64))
        i, j = _close_pairs(pix.image[roots], cx / count, cy / count, min_distance_px, n_images)
        group = _components(k, i, j)
    else:
        group = torch.arange(k, device=blob.device)
    return pix.pos[roots[group[blob]]]


def _window_pairs(pix: _Pixels, src: Tensor, dst: Tensor, reach: int) -> tuple[Tensor, Tensor]:
    """Pairs (i, j) of pixels ``src[i]`` and ``dst[j]`` (indices into ``pix``), different pixels within
    Chebyshev distance ``reach`` of each other."""
    b, h, w = pix.shape
    dev = pix.pos.device
    at = torch.full((b * h * w,), -1, dtype=torch.int64, device=dev)
    at[pix.pos[dst]] = torch.arange(int(dst.numel()), device=dev)
    row, col, pos = pix.row[src], pix.col[src], pix.pos[src]
    us, vs = [], []
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            if dy == 0 and dx == 0:
                continue
            r, c = row + dy, col + dx
            inside = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            j = torch.where(inside, at[torch.where(inside, pos + dy * w + dx, 0)], -1)
            i = torch.nonzero(j >= 0).squeeze(1)
            us.append(i)
            vs.append(j[i])
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    return (torch.cat(us), torch.cat(vs)) if us else (empty, empty)


def _peak_seeds(fg: _Pixels, nb4: Tensor, comp: Tensor, d2: Tensor, r: int) -> Tensor:
    """Seed key (map · H·W + rank in the map) of each foreground pixel, -1 where none: the maxima of
    ``skimage.feature.peak_local_max(distance, min_distance=r, labels=components,
    exclude_border=False)``, one seed per peak, ranked as the CPU path numbers them. ``comp``: the
    foreground's component ids, 0.. in raster order."""
    b, h, w = fg.shape
    hw = h * w
    dev = d2.device
    # Local maxima in a (2r+1)² window among the pixels of the same component.
    dmap = torch.zeros(b * hw, dtype=torch.float32, device=dev)
    dmap[fg.pos] = d2.to(torch.float32)  # exact: integers below 2^24
    pool = torch.nn.functional.max_pool2d(dmap.view(b, 1, h, w), 2 * r + 1, stride=1, padding=r)
    peak = pool.reshape(-1)[fg.pos] == dmap[fg.pos]
    # Where another component lies within the window, its larger distances may not count: check those.
    ids = torch.full((b * hw,), -1.0, dtype=torch.float32, device=dev)
    ids[fg.pos] = comp.to(torch.float32)
    hi = torch.nn.functional.max_pool2d(ids.view(b, 1, h, w), 2 * r + 1, stride=1, padding=r)
    lo_src = torch.where(ids < 0, float(comp.numel() + 1), ids)
    lo = -torch.nn.functional.max_pool2d(-lo_src.view(b, 1, h, w), 2 * r + 1, stride=1, padding=r)
    mixed = torch.nonzero(~peak & (hi.reshape(-1)[fg.pos] != lo.reshape(-1)[fg.pos])).squeeze(1)
    if mixed.numel():
        i, j = _window_pairs(fg, mixed, torch.arange(fg.n, device=dev), r)
        i = mixed[i]
        same = comp[i] == comp[j]
        own = d2.clone().scatter_reduce(0, i[same], d2[j[same]], reduce="amax")
        peak[mixed] = own[mixed] <= d2[mixed]
    # A component whose every pixel is a maximum has none, but for its pixels an opening removes.
    n = int(comp.max()) + 1
    flat = torch.bincount(comp, minlength=n) == torch.bincount(comp[peak], minlength=n)
    if bool(flat.any()):
        eroded = (nb4 != torch.arange(fg.n, device=dev)).all(0)
        opened = eroded | eroded[nb4].any(0)
        peak = torch.where(flat[comp], ~opened, peak)
    cand = torch.nonzero(peak).squeeze(1)
    if cand.numel() == 0:
        return torch.full_like(fg.pos, -1)
    # Rank: by component, then distance (largest first), then raster order; keep a peak unless a
    # kept one of higher rank lies closer than r (Chebyshev), as skimage's ensure_spacing does.
    rank_of = cand[torch.argsort(d2[cand], descending=True, stable=True)]
    rank_of = rank_of[torch.argsort(comp[rank_of], stable=True)]
    rank = torch.empty(fg.n, dtype=torch.int64, device=dev)
    rank[rank_of] = torch.arange(int(rank_of.numel()), device=dev)
    i, j = _window_pairs(fg, cand, cand, r - 1)
    i, j = cand[i], cand[j]
    up = (comp[i] == comp[j]) & (rank[j] < rank[i])
    i, j = i[up], j[up]
    state = torch.zeros(fg.n, dtype=torch.int64, device=dev)  # of the candidates: 0 open, 1 kept, 2 not
    while True:
        hit = torch.zeros_like(state).scatter_reduce(0, i, (state[j] == 1).long(), reduce="amax")
        state = torch.where((state == 0) & (hit > 0), 2, state)
        wait = torch.zeros_like(state).scatter_reduce(0, i, (state[j] != 2).long(), reduce="amax")
        done = (state[cand] == 0) & (wait[cand] == 0)
        state[cand[done]] = 1
        if not bool((state[cand] == 0).any()):
            break
    kept = rank_of[state[rank_of] == 1]  # in rank order
    image = fg.image[kept]
    first = torch.searchsorted(image, torch.arange(b, device=dev))
    key = torch.full_like(fg.pos, -1)
    key[kept] = image * hw + torch.arange(int(kept.numel()), device=dev) - first[image]
    return key


def _as_maps(
    name: str, value: Tensor | NDArray[np.generic] | None, device: torch.device | None
) -> Tensor | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray) and not value.flags.writeable:
        value = value.copy()  # torch cannot wrap a read-only array
    t = torch.as_tensor(value, device=device)
    if t.ndim == 2:
        t = t[None]
    if t.ndim != 3:
        raise ValueError(f"{name} maps must be (B, H, W) or (H, W), got shape {tuple(t.shape)}")
    return t.to(torch.float32)


def extract_candidates_torch(
    nucleus: Tensor | NDArray[np.floating],
    *,
    mpp: float,
    marker: Tensor | NDArray[np.floating] | None = None,
    cell: Tensor | NDArray[np.floating] | None = None,
    od: Tensor | NDArray[np.floating] | None = None,
    nucleus_threshold: float = 0.5,
    marker_threshold: float = 0.5,
    cell_threshold: float = 0.5,
    min_area_um2: float = 6.0,
    max_area_um2: float = 450.0,
    min_peak_distance_um: float = 3.0,
    min_detection_score: float = 0.0,
    keep_labels: bool = False,
) -> list[CellTable]:
    """Nucleus instances and morphometrics of each of B maps, on the maps' device.

    Args:
        nucleus: (B, H, W) (or one (H, W)) nucleus probability maps, a tensor on any device or an array.
        mpp: µm per map pixel.
        marker, cell, od: maps of the same shape (see :func:`~wsi_screen.candidates.extract_candidates`);
            ``od`` is the optical density (compute it from RGB with
            :func:`~wsi_screen.candidates.optical_density`).
        nucleus_threshold, marker_threshold, cell_threshold, min_area_um2, max_area_um2,
            min_peak_distance_um: as for the CPU path.
        min_detection_score: drop nuclei whose mean nucleus probability is below this before their
            outlines are traced (what ``Localizer`` does after the CPU path); cell areas are those of
            the CPU path, where every nucleus within the size limits claims its cell.
        keep_labels: also return each map's instance label image (``label_image``; the nuclei within
            the size limits).

    Returns:
        One :class:`~wsi_screen.cells.CellTable` per map, in order, in the ``"map"`` frame.
    """
    if not math.isfinite(mpp) or mpp <= 0:
        raise ValueError(f"mpp must be positive, got {mpp}")
    prob = _as_maps("nucleus", nucleus, None)
    if prob is None:
        raise ValueError("nucleus maps are required")
    dev = prob.device
    maps = {name: _as_maps(name, arr, dev) for name, arr in (("marker", marker), ("cell", cell), ("od", od))}
    for name, t in maps.items():
        if t is not None and t.shape != prob.shape:
            raise ValueError(f"{name} maps have shape {tuple(t.shape)}, expected {tuple(prob.shape)}")
    with torch.inference_mode():
        return _extract(
            prob,
            maps["marker"],
            maps["cell"],
            maps["od"],
            mpp=float(mpp),
            nucleus_threshold=nucleus_threshold,
            marker_threshold=marker_threshold,
            cell_threshold=cell_threshold,
            min_area_um2=min_area_um2,
            max_area_um2=max_area_um2,
            min_peak_distance_um=min_peak_distance_um,
            min_detection_score=min_detection_score,
            keep_labels=keep_labels,
        )


def _extract(
    prob: Tensor,
    marker: Tensor | None,
    cell: Tensor | None,
    od: Tensor | None,
    *,
    mpp: float,
    nucleus_threshold: float,
    marker_threshold: float,
    cell_threshold: float,
    min_area_um2: float,
    max_area_um2: float,
    min_peak_distance_um: float,
    min_detection_score: float,
    keep_labels: bool,
) -> list[CellTable]:
    b, h, w = (int(v) for v in prob.shape)
    hw = h * w
    dev = prob.device
    px_um2 = mpp * mpp
    min_dist_px = min_peak_distance_um / mpp
    f64 = torch.float64

    fg_mask = prob >= nucleus_threshold
    fg = _Pixels(fg_mask)
    if fg.n == 0:
        return [CellTable.empty(frame="map") for _ in range(b)]
    nb4 = fg.neighbours(_NEIGHBOURS_4)
    u, v = fg.edges(4)
    paced = _paced(dev)
    comp = _component_ids(fg.n, u, v) if paced else None
    # The foreground's distance transform, exact up to the largest nucleus kept (and then some).
    cap = math.ceil(2.0 * math.sqrt(max_area_um2 / math.pi) / mpp) + 2
    d2 = _edt2(fg_mask, cap).reshape(-1)[fg.pos]

    # Seed key of each foreground pixel (-1: none): map · H·W + the seed's rank in the CPU path's
    # numbering (marker seeds: the raster position of their first pixel).
    if marker is not None:
        mk = _Pixels(marker >= marker_threshold)
        seed_of_marker = _seeds(mk, 4, min_dist_px, b)
        if mk.n:
            at = mk.inv[fg.pos]
            seed = torch.where(at >= 0, seed_of_marker[at.clamp(min=0)], -1)
        else:
            seed = torch.full_like(fg.pos, -1)
    else:
        if comp is None:
            comp = _component_ids(fg.n, u, v)
        seed = _peak_seeds(fg, nb4, comp, d2, max(1, round(min_dist_px)))
    seed_pos, seed_id = torch.unique(seed, return_inverse=True)  # seed_pos[0] == -1 if any unseeded
    seed_id = torch.where(seed >= 0, seed_id + int(seed_pos[0] >= 0), 0)
    if int(seed_pos[0]) >= 0:
        seed_pos = torch.cat([seed_pos.new_full((1,), -1), seed_pos])

    # Marker watershed on -distance (the squared distance orders it the same).
    lab = _flood(nb4, seed_id, d2, comp if paced else None)  # 1..n: index into seed_pos
    # Foreground no seed reached: components of their own.
    rest = lab == 0
    both = rest[u] & rest[v]
    rest_root = fg.pos[_components(fg.n, u[both], v[both])]
    # Instance keys sorted as the CPU path numbers them: per map, seeded ones by their seed's raster
    # position, then the unseeded ones by their first pixel.
    key = fg.image * (2 * hw) + torch.where(rest, hw + rest_root % hw, seed_pos[lab] % hw)
    uniq, inst = torch.unique(key, return_inverse=True)
    k = int(uniq.numel())
    inst_image = uniq // (2 * hw)

    area_px = torch.bincount(inst, minlength=k)
    area = area_px.to(f64) * px_um2
    keep = (area >= min_area_um2) & (area <= max_area_um2)
    kidx = torch.cumsum(keep, 0) - 1  # index among the kept instances
    n_kept = int(keep.sum())
    if n_kept == 0:
        return [CellTable.empty(frame="map") for _ in range(b)]
    kept_px = keep[inst]
    ki = kidx[inst[kept_px]]
    pos_k = fg.pos[kept_px]
    rr = fg.row[kept_px].to(f64) + 0.5
    cc = fg.col[kept_px].to(f64) + 0.5
    cols = [
        torch.ones_like(rr),
        cc,
        rr,
        cc * cc,
        rr * rr,
        cc * rr,
        prob.reshape(-1)[pos_k].to(f64),
        od.reshape(-1)[pos_k].to(f64) if od is not None else torch.zeros_like(rr),
    ]
    sums = torch.zeros(n_kept, len(cols), dtype=f64, device=dev).index_add_(0, ki, torch.stack(cols, 1))
    image_k = inst_image[keep]
    first = torch.searchsorted(image_k, torch.arange(b + 1, device=dev))
    local = torch.arange(n_kept, device=dev) - first[image_k] + 1  # 1..k per map
    big = torch.iinfo(torch.int64).max
    box = torch.stack(
        [
            torch.full((n_kept,), big, device=dev).scatter_reduce(0, ki, fg.row[kept_px], reduce="amin"),
            torch.full((n_kept,), -1, device=dev).scatter_reduce(0, ki, fg.row[kept_px], reduce="amax"),
            torch.full((n_kept,), big, device=dev).scatter_reduce(0, ki, fg.col[kept_px], reduce="amin"),
            torch.full((n_kept,), -1, device=dev).scatter_reduce(0, ki, fg.col[kept_px], reduce="amax"),
        ],
        1,
    )
    labels = torch.zeros(b * hw, dtype=torch.int32, device=dev)
    labels[pos_k] = local[ki].to(torch.int32)

    cell_stats = None
    if cell is not None:
        cell_stats = _cells(cell, cell_threshold, labels.view(b, h, w), pos_k, ki, n_kept, mpp)

    # One copy to the host.
    sums_np = sums.cpu().numpy()
    box_np = box.cpu().numpy()
    counts = (first[1:] - first[:-1]).cpu().numpy()
    labels_np = labels.view(b, h, w).cpu().numpy()
    cell_np = None if cell_stats is None else cell_stats.cpu().numpy()
    return _finish(
        sums_np,
        box_np,
        counts,
        labels_np,
        cell_np,
        mpp=mpp,
        has_od=od is not None,
        min_detection_score=min_detection_score,
        keep_labels=keep_labels,
    )


def _cells(
    cell: Tensor, threshold: float, labels: Tensor, pos_k: Tensor, ki: Tensor, n_kept: int, mpp: float
) -> Tensor:
    """(n_kept, 2) float64: cell pixels of each kept nucleus and whether its cell touches the map border."""
    b, h, w = (int(v) for v in labels.shape)
    nuclei = labels > 0
    cm = _Pixels((cell >= threshold) | nuclei)
    nuc_lab = torch.zeros(b * h * w, dtype=torch.int64, device=cell.device)
    nuc_lab[pos_k] = ki + 1
    start = nuc_lab[cm.pos]
    cap = max(1, math.ceil(_CELL_DISTANCE_CAP_UM / mpp))
    dist = _edt2(~nuclei, cap).reshape(-1)[cm.pos].to(torch.float64).sqrt()
    top = math.ceil((cap + 1) / _CELL_LEVEL_STEP_PX)
    level = torch.floor(dist / _CELL_LEVEL_STEP_PX).to(torch.int64).clamp(max=top)
    comp = _component_ids(cm.n, *cm.edges(4)) if _paced(cell.device) else None
    lab = _flood(cm.neighbours(_NEIGHBOURS_4), start, top - level, comp)
    got = lab > 0
    idx = lab[got] - 1
    px = torch.zeros(n_kept, dtype=torch.float64, device=cell.device).index_add_(
        0, idx, torch.ones_like(idx, dtype=torch.float64)
    )
    r, c = cm.row[got], cm.col[got]
    edge = ((r == 0) | (r == h - 1) | (c == 0) | (c == w - 1)).to(torch.float64)
    cut = torch.zeros(n_kept, dtype=torch.float64, device=cell.device).scatter_reduce(
        0, idx, edge, reduce="amax"
    )
    return torch.stack([px, cut], 1)


def _finish(
    sums: NDArray[np.float64],
    box: NDArray[np.int64],
    counts: NDArray[np.int64],
    labels: NDArray[np.int32],
    cells: NDArray[np.float64] | None,
    *,
    mpp: float,
    has_od: bool,
    min_detection_score: float,
    keep_labels: bool,
) -> list[CellTable]:
    """The CPU path's formulas on the per-nucleus sums, per map; outlines of the kept nuclei."""
    px_um2 = mpp * mpp
    area_px = sums[:, 0]
    area_um2 = area_px * px_um2
    cx, cy = sums[:, 1] / area_px, sums[:, 2] / area_px
    sxx = sums[:, 3] / area_px - cx * cx
    syy = sums[:, 4] / area_px - cy * cy
    sxy = sums[:, 5] / area_px - cx * cy
    half_tr = (sxx + syy) / 2.0 + 1.0 / 12.0
    disc = np.sqrt(np.maximum(((sxx - syy) / 2.0) ** 2 + sxy * sxy, 0.0))
    l1, l2 = half_tr + disc, np.maximum(half_tr - disc, 0.0)
    eccentricity = np.sqrt(np.clip(1.0 - l2 / np.maximum(l1, 1e-12), 0.0, 1.0))
    score = sums[:, 6] / area_px
    if has_od:
        mean_od, integrated_od = sums[:, 7] / area_px, sums[:, 7] * px_um2
    else:
        mean_od = integrated_od = np.full(len(area_px), np.nan)
    if cells is not None:
        cell_area_um2 = np.where(cells[:, 1] > 0, np.nan, cells[:, 0] * px_um2)
    else:
        cell_area_um2 = np.full(len(area_px), np.nan)
    with np.errstate(divide="ignore", invalid="ignore"):
        nc_ratio = area_um2 / cell_area_um2
    select = score >= min_detection_score
    out: list[CellTable] = []
    start = 0
    for i, n in enumerate(counts.tolist()):
        base = start
        idx = np.arange(start, start + n)
        start += n
        idx = idx[select[idx]]
        if len(idx) == 0:
            out.append(CellTable.empty(frame="map"))
            continue
        outlines: list[NDArray[np.float32]] = []
        perimeter_px = np.zeros(len(idx))
        for j, g in enumerate(idx):
            r0, r1, c0, c1 = (int(v) for v in box[g])
            crop = labels[i, r0 : r1 + 1, c0 : c1 + 1] == g - base + 1
            poly, length = _outline(crop, r0, c0)
            outlines.append(poly)
            perimeter_px[j] = length
        perimeter_um = perimeter_px * mpp
        with np.errstate(divide="ignore", invalid="ignore"):
            circularity = np.where(perimeter_um > 0, 4.0 * math.pi * area_um2[idx] / perimeter_um**2, np.nan)
        values = {
            "nucleus_area_um2": area_um2[idx],
            "nucleus_perimeter_um": perimeter_um,
            "nucleus_circularity": np.minimum(circularity, 1.0),
            "nucleus_eccentricity": eccentricity[idx],
            "nucleus_mean_od": mean_od[idx],
            "nucleus_integrated_od": integrated_od[idx],
            "cell_area_um2": cell_area_um2[idx],
            "nc_ratio": nc_ratio[idx],
        }
        out.append(
            CellTable.from_rows(
                x=cx[idx].astype(np.float64),
                y=cy[idx].astype(np.float64),
                outlines=outlines,
                detection_score=score[idx].astype(np.float32),
                morphometrics={name: np.asarray(values[name], dtype=np.float32) for name in MORPHOMETRICS},
                frame="map",
                label_image=labels[i].copy() if keep_labels else None,
            )
        )
    return out
