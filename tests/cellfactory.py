"""Constructed cell tables for the output-stage tests (store, summary, GeoJSON, report, export)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen.cells import MORPHOMETRICS, CellTable

CLASSES = ["NILM", "ASC-US", "LSIL", "HSIL", "artifact"]
ABNORMAL = ["ASC-US", "LSIL", "HSIL"]
SLIDE_MPP = 0.25
SLIDE_SIZE = (20_000, 16_000)


def probs_for(labels: Sequence[str], p: float | Sequence[float] = 0.95) -> NDArray[np.float32]:
    """One row per label: ``p`` on that class, the rest shared equally by the others."""
    n, c = len(labels), len(CLASSES)
    top = np.broadcast_to(np.asarray(p, np.float64), (n,))
    out = np.repeat(((1.0 - top) / (c - 1))[:, None], c, axis=1)
    for i, lab in enumerate(labels):
        out[i, CLASSES.index(lab)] = top[i]
    return out.astype(np.float32)


def ellipse(cx: float, cy: float, rx: float, ry: float, angle: float, k: int = 16) -> NDArray[np.float32]:
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    ca, sa = np.cos(angle), np.sin(angle)
    ex, ey = rx * np.cos(t), ry * np.sin(t)
    return np.stack([cx + ca * ex - sa * ey, cy + sa * ex + ca * ey], axis=1).astype(np.float32)


def make_cells(
    labels: Sequence[str],
    *,
    p: float | Sequence[float] = 0.95,
    seed: int = 0,
    xy: NDArray[Any] | None = None,
    n_vertices: int = 16,
    size: tuple[int, int] = SLIDE_SIZE,
) -> CellTable:
    """Cells with elliptic nucleus outlines, plausible morphometrics and the given predicted classes."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    if xy is None:
        margin = 200
        xy = np.stack(
            [rng.uniform(margin, size[0] - margin, n), rng.uniform(margin, size[1] - margin, n)], axis=1
        )
    xy = np.asarray(xy, np.float64).reshape(n, 2)
    big = np.array([lab in ("HSIL", "LSIL") for lab in labels])
    rx = rng.uniform(14, 22, n) * np.where(big, 1.6, 1.0)
    ry = rx * rng.uniform(0.7, 1.0, n)
    ang = rng.uniform(0, np.pi, n)
    outlines = [ellipse(xy[i, 0], xy[i, 1], rx[i], ry[i], ang[i], n_vertices) for i in range(n)]
    area_um2 = np.pi * rx * ry * SLIDE_MPP**2
    morph = {k: rng.uniform(0.1, 1.0, n) for k in MORPHOMETRICS}
    morph["nucleus_area_um2"] = area_um2
    morph["cell_area_um2"] = area_um2 * rng.uniform(4, 12, n)
    morph["nc_ratio"] = area_um2 / morph["cell_area_um2"]
    return CellTable.from_rows(
        x=xy[:, 0],
        y=xy[:, 1],
        outlines=outlines,
        tile=rng.integers(0, 50, n),
        detection_score=rng.uniform(0.5, 1.0, n),
        morphometrics=morph,
        probs=probs_for(labels, p),
    )
