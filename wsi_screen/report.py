"""``report.html``: one self-contained page per slide for the reviewer.

Everything is inline: images are base64 ``data:`` URIs, the CSS is in a ``<style>`` element, there is
no script and no font or image from the network (a Content-Security-Policy forbids both, so even a
mistake cannot make the page call out). Every string that comes from outside (slide names, class
names, versions, ...) is HTML-escaped: a file named ``<script>….svs`` shows as text.
"""

from __future__ import annotations

import base64
import html as _html
import io
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen import __version__
from wsi_screen.cells import CellTable, abnormality_score
from wsi_screen.geojson import class_color

__all__ = [
    "MarkerLabel",
    "build_report",
    "heatmap_grid",
    "layout_marker_labels",
    "overview_width_px",
    "write_report",
]

logger = logging.getLogger(__name__)

ReadCrop = Callable[[float, float, int], NDArray[Any]]

#: Longest side of the thumbnail shown in the report, px.
_THUMB_MAX = 1100
#: Size at which cell crops are encoded, px.
_CROP_PX = 192
#: Heat-map squares whose highest cell score is below this stay transparent.
_HEAT_MIN = 0.25
#: Most opaque a heat-map square gets (its highest score 1): the slide stays visible under it.
_HEAT_MAX_ALPHA = 0.40
#: Least opaque a shown square gets (score at ``_HEAT_MIN``).
_HEAT_MIN_ALPHA = 0.12
#: Gallery cells marked on the thumbnail (the gallery's default size, output.top_n).
_MAX_MARKERS = 48

_TRIAGE_STYLE = {
    "priority": ("#b71c1c", "Priority review"),
    "review": ("#e65100", "Review"),
    "negative": ("#2e7d32", "Negative"),
    "unsatisfactory": ("#5d4037", "Unsatisfactory"),
}


def _e(value: Any) -> str:
    """HTML-escape anything (quotes too, so it is also safe in attribute values)."""
    return _html.escape(str(value), quote=True)


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "–"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{digits}g}"
    return str(value)


def _data_uri(image: NDArray[Any], *, fmt: str = "JPEG", quality: int = 88) -> str:
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    mode = "RGBA" if arr.ndim == 3 and arr.shape[2] == 4 else "RGB"
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    img = Image.fromarray(arr[..., :4] if mode == "RGBA" else arr[..., :3], mode=mode)
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, format="PNG", optimize=True)
        mime = "image/png"
    else:
        img.convert("RGB").save(buf, format="JPEG", quality=quality, optimize=True)
        mime = "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


# -- heat map --------------------------------------------------------------------------------------
def heatmap_grid(
    x: NDArray[Any],
    y: NDArray[Any],
    score: NDArray[Any],
    *,
    shape: tuple[int, int],
    px_per_level0: float,
    square_px: float,
) -> NDArray[np.float32]:
    """Max cell score per square of ``square_px`` thumbnail pixels (NaN where there is no cell).

    ``shape`` is the thumbnail (height, width); ``px_per_level0`` maps level-0 to thumbnail pixels.
    """
    h, w = shape
    gh, gw = max(1, math.ceil(h / square_px)), max(1, math.ceil(w / square_px))
    grid = np.full((gh, gw), -1.0, np.float32)
    if len(x):
        col = np.floor(np.asarray(x, np.float64) * px_per_level0 / square_px).astype(np.int64)
        row = np.floor(np.asarray(y, np.float64) * px_per_level0 / square_px).astype(np.int64)
        ok = (col >= 0) & (col < gw) & (row >= 0) & (row < gh) & np.isfinite(score)
        np.maximum.at(grid, (row[ok], col[ok]), np.asarray(score, np.float32)[ok])
    grid[grid < 0] = np.nan
    return grid


def _heat_rgba(grid: NDArray[np.float32], size: tuple[int, int], square_px: float) -> NDArray[np.uint8]:
    """Colour the grid (yellow → orange → red, transparent where low or empty) at ``size`` (w, h)."""
    from PIL import Image

    s = np.nan_to_num(grid, nan=0.0)
    stops = np.array([[255, 235, 59], [255, 152, 0], [211, 47, 47]], np.float32)
    t = np.clip(s, 0.0, 1.0) * 2.0
    lo = np.minimum(np.floor(t).astype(np.int64), 1)
    frac = (t - lo)[..., None]
    rgb = stops[lo] * (1 - frac) + stops[lo + 1] * frac
    shown = (s >= _HEAT_MIN) & np.isfinite(grid)
    ramp = np.clip((s - _HEAT_MIN) / (1 - _HEAT_MIN), 0, 1)
    alpha = np.where(shown, 255 * (_HEAT_MIN_ALPHA + (_HEAT_MAX_ALPHA - _HEAT_MIN_ALPHA) * ramp), 0)
    rgba = np.dstack([rgb, alpha]).astype(np.uint8)
    gh, gw = grid.shape
    big = Image.fromarray(rgba, mode="RGBA").resize(
        (max(1, round(gw * square_px)), max(1, round(gh * square_px))), Image.Resampling.NEAREST
    )
    out = np.zeros((size[1], size[0], 4), np.uint8)
    arr = np.asarray(big)[: size[1], : size[0]]
    out[: arr.shape[0], : arr.shape[1]] = arr
    return out


# -- marker labels ---------------------------------------------------------------------------------
#: Page geometry of ``_CSS`` that decides how wide the overview is shown (see overview_width_px).
_PAGE_MAX_PX = 1280
_PAGE_PAD_PX = 24
_GRID_ONE_COLUMN_PX = 900  # at or below this viewport width the grid is one column
_GRID_GAP_PX = 20
_GRID_LEFT_FR, _GRID_RIGHT_FR = 1.5, 1.0
_PANEL_PAD_PX = 18
_PANEL_BORDER_PX = 1
#: Label layouts, one per range of displayed overview width (min px, layout px): the layout is made
#: for ``layout px`` and, being drawn in the overview's own pixels, scales with the image, so it holds
#: (no label overlaps another) at any width; the ranges only keep the text between ~9 and ~19 px.
#: A CSS container query shows the layout of the overview's current width (the page shows it at
#: 230–820 px; wider when the page is zoomed out or the layout changes).
_LABEL_TIERS: tuple[tuple[float, float], ...] = ((900.0, 900.0), (600.0, 600.0), (400.0, 400.0), (0.0, 300.0))
#: Label text size and marker radius at the layout width, px.
_LABEL_FONT_PX = 12.0
_MARKER_PX = 7.0
#: Ranks on one line of a clustered label (at most this many characters).
_LABEL_LINE_CHARS = 14


def overview_width_px(viewport_px: float) -> float:
    """Width (CSS px) at which the page shows the slide overview in a viewport ``viewport_px`` wide.

    Mirrors ``_CSS``: the page is at most 1280 px wide with 24 px padding; above 900 px the overview is
    the wider (1.5 fr of 2.5) of two columns 20 px apart, at or below it the only one; the panel has
    18 px padding and a 1 px border.
    """
    inner = min(float(viewport_px), _PAGE_MAX_PX) - 2 * _PAGE_PAD_PX
    if viewport_px > _GRID_ONE_COLUMN_PX:
        inner = (inner - _GRID_GAP_PX) * _GRID_LEFT_FR / (_GRID_LEFT_FR + _GRID_RIGHT_FR)
    return max(1.0, inner - 2 * (_PANEL_PAD_PX + _PANEL_BORDER_PX))


@dataclass(frozen=True)
class MarkerLabel:
    """One label of the overview, in overview (thumbnail) pixels.

    ``lines`` are the ranks it names, line by line (one rank unless close markers were clustered);
    ``box`` is (x0, y0, x1, y1); ``anchor`` is the marker, or the centre of the clustered markers,
    and ``radius`` reaches every marker of the cluster; ``leader`` is the line from the markers to the
    box, None when the box is next to them.
    """

    lines: tuple[tuple[int, ...], ...]
    box: tuple[float, float, float, float]
    anchor: tuple[float, float]
    radius: float
    leader: tuple[float, float, float, float] | None

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(r for line in self.lines for r in line)


def _label_lines(ranks: Sequence[int]) -> tuple[tuple[int, ...], ...]:
    lines: list[list[int]] = [[]]
    for r in sorted(ranks):
        if lines[-1] and len(_line_text([*lines[-1], r])) > _LABEL_LINE_CHARS:
            lines.append([])
        lines[-1].append(r)
    return tuple(tuple(line) for line in lines)


def _label_metrics(font_px: float) -> tuple[float, float, float]:
    """(horizontal padding, vertical padding, line height) of a label, px."""
    return 0.35 * font_px, 0.18 * font_px, 1.2 * font_px


def _line_text(line: Sequence[int]) -> str:
    return ", ".join(map(str, line))


def _text_em(text: str) -> float:
    """Width of ``text`` in bold sans-serif, em (digits 0.6, comma and space 0.3); the SVG text gets it
    as its textLength, so a font a little wider or narrower still fills exactly its box."""
    return sum(0.6 if ch.isdigit() else 0.3 for ch in text)


def _label_size(lines: Sequence[Sequence[int]], font_px: float) -> tuple[float, float]:
    pad_x, pad_y, line_h = _label_metrics(font_px)
    text_w = max(_text_em(_line_text(line)) for line in lines) * font_px
    return text_w + 2 * pad_x, len(lines) * line_h + 2 * pad_y


def _directions(n: int = 16) -> NDArray[np.float64]:
    """Unit vectors, right first, then the diagonals and the rest (a reader looks right, then up)."""
    order = [0, 2, 14, 4, 12, 6, 10, 8, 1, 15, 3, 13, 5, 11, 7, 9]
    ang = np.array([-2 * math.pi * k / n for k in order[:n]])
    return np.stack([np.cos(ang), np.sin(ang)], axis=1)


def layout_marker_labels(
    markers: Sequence[tuple[int, float, float]],
    *,
    size: tuple[int, int],
    display_width: float,
    font_px: float = _LABEL_FONT_PX,
    marker_px: float = _MARKER_PX,
) -> list[MarkerLabel]:
    """Place one label per marker, or per cluster of close markers, so that no two labels overlap.

    Args:
        markers: (rank, x, y) in overview pixels.
        size: the overview's (width, height) in pixels.
        display_width: the width the overview is shown at, px; ``font_px`` and ``marker_px`` (the
            text size and the marker radius) are at that width.

    Markers closer than a marker's diameter (or the text size) share one label ("7, 16, 18", on
    several lines when long). Labels are placed greedily, best rank first, on rings of candidate
    positions around their markers (right, the diagonals, above, ..., then farther out with a leader
    line), inside the overview, off the other labels and, where possible, off the other markers. A
    label with no free position is merged with its nearest neighbour and the placement starts over,
    so it always ends (at worst in one label). Returns the labels in overview pixels, best rank first.
    """
    w, h = max(1, int(size[0])), max(1, int(size[1]))
    if not markers or display_width <= 0:
        return []
    s = display_width / w
    W, H = w * s, h * s
    ranks = [int(m[0]) for m in markers]
    pts = np.array([[min(max(float(m[1]), 0.0), w) * s, min(max(float(m[2]), 0.0), h) * s] for m in markers])
    n = len(ranks)

    # Clusters of markers closer than merge_px (single linkage).
    merge_px = max(2 * marker_px, font_px)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    d = np.hypot(pts[:, None, 0] - pts[None, :, 0], pts[:, None, 1] - pts[None, :, 1])
    for i, j in zip(*np.nonzero(np.triu(d < merge_px, 1)), strict=True):
        parent[find(int(i))] = find(int(j))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    clusters = sorted(groups.values(), key=lambda g: min(ranks[i] for i in g))

    dirs = _directions()
    gap = 2.0
    step = 0.9 * font_px
    rings = 1 + int(8 * font_px / step)
    circles = np.column_stack([pts, np.full(n, marker_px)])

    def place(cluster: list[int], placed: list[tuple[float, float, float, float]]) -> MarkerLabel | None:
        c = pts[cluster].mean(axis=0)
        radius = float(np.max(np.hypot(*(pts[cluster] - c).T))) + marker_px
        lines = _label_lines([ranks[i] for i in cluster])
        bw, bh = _label_size(lines, font_px)
        g = radius + gap + step * np.arange(rings)[:, None, None]  # (rings, 1, 1)
        u = dirs[None, :, :]  # (1, dirs, 2)
        sgn = np.clip(u * math.sqrt(2), -1, 1)
        half = np.array([bw / 2, bh / 2])
        centre = (c + g * u + sgn * half).reshape(-1, 2)
        ring = np.repeat(np.arange(rings), len(dirs)).astype(np.float64)
        order = np.tile(np.arange(len(dirs)), rings).astype(np.float64)
        boxes = np.column_stack([centre - half, centre + half])
        ok = (boxes[:, 0] >= 1) & (boxes[:, 1] >= 1) & (boxes[:, 2] <= W - 1) & (boxes[:, 3] <= H - 1)
        if placed:
            p = np.asarray(placed)
            hit = (
                (boxes[:, None, 0] < p[None, :, 2] + 1)
                & (boxes[:, None, 2] > p[None, :, 0] - 1)
                & (boxes[:, None, 1] < p[None, :, 3] + 1)
                & (boxes[:, None, 3] > p[None, :, 1] - 1)
            )
            ok &= ~hit.any(axis=1)
        if not ok.any():
            return None
        # Markers a box would cover (its own cluster's too): nearest point of the box to each circle.
        nx = np.clip(circles[None, :, 0], boxes[:, None, 0], boxes[:, None, 2])
        ny = np.clip(circles[None, :, 1], boxes[:, None, 1], boxes[:, None, 3])
        covered = (np.hypot(nx - circles[None, :, 0], ny - circles[None, :, 1]) < circles[None, :, 2]).sum(1)
        cost = ring * step + 0.05 * order + 4 * font_px * covered
        k = int(np.argmin(np.where(ok, cost, np.inf)))
        x0, y0, x1, y1 = (float(v) for v in boxes[k])
        leader = None
        if ring[k] > 0:
            bx, by = min(max(c[0], x0), x1), min(max(c[1], y0), y1)
            dist = math.hypot(bx - c[0], by - c[1])
            if dist > radius + 1:
                sx, sy = c[0] + (bx - c[0]) * radius / dist, c[1] + (by - c[1]) * radius / dist
                leader = (sx / s, sy / s, bx / s, by / s)
        return MarkerLabel(
            lines=lines,
            box=(x0 / s, y0 / s, x1 / s, y1 / s),
            anchor=(float(c[0]) / s, float(c[1]) / s),
            radius=radius / s,
            leader=leader,
        )

    while True:
        placed: list[tuple[float, float, float, float]] = []
        labels: list[MarkerLabel] = []
        failed = -1
        for ci, cluster in enumerate(clusters):
            label = place(cluster, placed)
            if label is None:
                failed = ci
                break
            labels.append(label)
            x0, y0, x1, y1 = label.box
            placed.append((x0 * s, y0 * s, x1 * s, y1 * s))
        if failed < 0:
            return labels
        if len(clusters) == 1:  # one label larger than the overview: top left, alone
            lines = _label_lines(ranks)
            bw, bh = _label_size(lines, font_px)
            c = pts.mean(axis=0)
            radius = float(np.max(np.hypot(*(pts - c).T))) + marker_px
            return [
                MarkerLabel(
                    lines=lines,
                    box=(0.0, 0.0, bw / s, bh / s),
                    anchor=(float(c[0]) / s, float(c[1]) / s),
                    radius=radius / s,
                    leader=None,
                )
            ]
        # Merge the cluster that found no room with its nearest neighbour (centre to centre).
        bad = clusters[failed]
        cb = pts[bad].mean(axis=0)
        others = [k for k in range(len(clusters)) if k != failed]
        near = min(others, key=lambda k: float(np.hypot(*(pts[clusters[k]].mean(axis=0) - cb))))
        merged = clusters[near] + bad
        clusters = [cl for k, cl in enumerate(clusters) if k not in (failed, near)] + [merged]
        clusters.sort(key=lambda g: min(ranks[i] for i in g))


# -- pieces ----------------------------------------------------------------------------------------
def _kv_table(rows: Sequence[tuple[str, str]], *, cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="{cls}">{body}</table>'


def _short(value: Any) -> str:
    """Escaped scalar; long hashes are shortened (the full value stays in the tooltip)."""
    text = str(value)
    if len(text) > 24 and all(ch in "0123456789abcdefABCDEF" for ch in text):
        return f'<code title="{_e(text)}">{_e(text[:12])}…</code>'
    if isinstance(value, float):
        return _e(_fmt(value, 4))
    return _e(text)


def _value_html(value: Any) -> str:
    if isinstance(value, Mapping):
        return " · ".join(f"{_e(k)} {_value_html(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        if any(isinstance(v, (Mapping, list, tuple)) for v in value):
            return "<br>".join(_value_html(v) for v in value)
        return _e(", ".join(str(v) for v in value))
    return _short(value)


def _flat_rows(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    """Escaped (key, value-html) rows of a nested mapping (nested mappings become "a › b" keys)."""
    rows: list[tuple[str, str]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows += _flat_rows(value, f"{name} › ")
        else:
            rows.append((_e(name), _value_html(value)))
    return rows


def _class_badge(name: str) -> str:
    r, g, b = class_color(name)
    text = "#111" if (0.299 * r + 0.587 * g + 0.114 * b) > 160 else "#fff"
    return f'<span class="cls" style="background:rgb({r},{g},{b});color:{text}">{_e(name)}</span>'


def _prob_bars(probs: Mapping[str, Any], class_names: Sequence[str]) -> str:
    out = []
    for c in class_names:
        p = probs.get(c)
        v = float(p) if isinstance(p, (int, float)) and math.isfinite(float(p)) else 0.0
        r, g, b = class_color(c)
        out.append(
            f'<div class="pb"><span class="pl">{_e(c)}</span><span class="pt">'
            f'<span style="width:{100 * v:.1f}%;background:rgb({r},{g},{b})"></span></span>'
            f'<span class="pv">{v:.2f}</span></div>'
        )
    return "".join(out)


def _thumbnail_section(
    thumbnail: NDArray[Any],
    thumbnail_mpp: float,
    slide_mpp: float,
    cells: CellTable,
    score: NDArray[np.float32],
    top_cells: Sequence[Mapping[str, Any]],
    heatmap_um: float,
) -> str:
    from PIL import Image

    thumb = np.asarray(thumbnail)
    if thumb.ndim != 3 or thumb.shape[0] == 0 or thumb.shape[1] == 0:
        return '<div class="empty">No thumbnail</div>'
    thumb = thumb[..., :3].astype(np.uint8)
    h, w = thumb.shape[:2]
    f = min(1.0, _THUMB_MAX / max(h, w))
    if f < 1.0:
        w, h = max(1, round(w * f)), max(1, round(h * f))
        thumb = np.asarray(Image.fromarray(thumb).resize((w, h), Image.Resampling.LANCZOS))
    mpp = thumbnail_mpp / f  # µm per displayed pixel
    px_per_l0 = slide_mpp / mpp
    square = max(heatmap_um / mpp, 2.0)
    grid = heatmap_grid(cells.x, cells.y, score, shape=(h, w), px_per_level0=px_per_l0, square_px=square)
    heat = _heat_rgba(grid, (w, h), square)
    marks_svg = _markers_svg(top_cells[:_MAX_MARKERS], (w, h), px_per_l0)
    scale_um = _nice_scale_um(w * mpp * 0.2)
    scale_px = scale_um / mpp
    scale_label = f"{scale_um / 1000:g} mm" if scale_um >= 1000 else f"{scale_um:g} µm"
    # Drawn in this order, each over the last: the slide, the translucent heat map, the markers.
    return (
        '<div class="thumbwrap"><input type="checkbox" id="heat" checked>'
        '<label for="heat" class="toggle" title="Show or hide the heat map">Heat map</label>'
        '<span class="muted hint">click a marker for its cell below, a cell\'s crop for its marker</span>'
        f'<div class="thumb" style="aspect-ratio:{w}/{h}">'
        f'<img class="base" alt="slide thumbnail" src="{_data_uri(thumb, quality=85)}">'
        f'<img class="heat" alt="" src="{_data_uri(heat, fmt="PNG")}">'
        f'<svg class="marks" viewBox="0 0 {w} {h}" preserveAspectRatio="none">{marks_svg}</svg>'
        "</div>"
        '<div class="legend"><span>cell score</span><span>0</span><span class="ramp"></span>'
        '<span class="ramp-end">1</span>'
        f'<span class="scalebar" style="width:{100 * scale_px / w:.2f}%"></span>'
        f"<span>{_e(scale_label)}</span>"
        f"<span class='muted'>squares of {heatmap_um:g} µm show the highest cell score inside "
        f"(clear below {_HEAT_MIN:g}, at most {100 * _HEAT_MAX_ALPHA:g} % opaque)</span></div>"
        "</div>"
    )


def _markers_svg(cells: Sequence[Mapping[str, Any]], size: tuple[int, int], px_per_l0: float) -> str:
    """The marker circles (one per cell) and, per width range, a layer of labels that never overlap."""
    w, h = size
    if not cells:
        return ""
    ref_px = 600.0
    r = _MARKER_PX * w / ref_px  # overview px; shown at _MARKER_PX when the overview is 600 px wide
    markers: list[tuple[int, float, float]] = []
    circles = []
    for k, cell in enumerate(cells):
        rank = int(cell.get("rank", k + 1))
        cx = min(max(float(cell["x"]) * px_per_l0, 0.0), float(w))
        cy = min(max(float(cell["y"]) * px_per_l0, 0.0), float(h))
        markers.append((rank, cx, cy))
        score = cell.get("score")
        tip = f"#{rank} {cell.get('class', '?')}" + (
            f" · score {float(score):.3f}" if isinstance(score, (int, float)) else ""
        )
        circles.append(
            f'<a href="#cell-{rank}"><circle id="marker-{rank}" class="mk" cx="{cx:.2f}" cy="{cy:.2f}" '
            f'r="{r:.2f}"><title>{_e(tip)}</title></circle></a>'
        )
    layers = []
    for i, (lo, ref) in enumerate(_LABEL_TIERS):
        hi = _LABEL_TIERS[i - 1][0] if i else math.inf
        labels = layout_marker_labels(
            markers, size=size, display_width=ref, font_px=_LABEL_FONT_PX, marker_px=_MARKER_PX * ref / ref_px
        )
        layers.append(_labels_svg(labels, i, lo, hi, ref, ref / w))
    return f'<g class="mks">{"".join(circles)}</g>{"".join(layers)}'


def _labels_svg(
    labels: Sequence[MarkerLabel], tier: int, lo: float, hi: float, layout_px: float, scale: float
) -> str:
    """One layer of labels (overview px), shown while the overview is ``lo``–``hi`` px wide.

    ``scale``: displayed px per overview px at ``layout_px``, the width the layout was made for.
    """
    pad_x, pad_y, line_h = (v / scale for v in _label_metrics(_LABEL_FONT_PX))
    font = _LABEL_FONT_PX / scale
    rings, leaders, boxes = [], [], []
    for lab in labels:
        x0, y0, x1, y1 = lab.box
        if len(lab.ranks) > 1:
            ax, ay = lab.anchor
            rings.append(f'<circle class="ring" cx="{ax:.2f}" cy="{ay:.2f}" r="{lab.radius:.2f}"/>')
        if lab.leader is not None:
            lx0, ly0, lx1, ly1 = lab.leader
            leaders.append(f'<line class="ld" x1="{lx0:.2f}" y1="{ly0:.2f}" x2="{lx1:.2f}" y2="{ly1:.2f}"/>')
        text = []
        for j, line in enumerate(lab.lines):
            text_w = _text_em(_line_text(line)) * font
            links = ", ".join(f'<a href="#cell-{r}">{r}</a>' for r in line)
            baseline = y0 + pad_y + j * line_h + (line_h + 0.72 * font) / 2
            text.append(
                f'<text class="mt" x="{x0 + pad_x:.2f}" y="{baseline:.2f}" font-size="{font:.2f}" '
                f'textLength="{text_w:.2f}" lengthAdjust="spacingAndGlyphs">{links}</text>'
            )
        boxes.append(
            f'<g class="lab" data-ranks="{" ".join(map(str, lab.ranks))}">'
            f'<rect class="lb" x="{x0:.2f}" y="{y0:.2f}" width="{x1 - x0:.2f}" height="{y1 - y0:.2f}" '
            f'rx="{0.25 * font:.2f}"/>{"".join(text)}</g>'
        )
    max_attr = "" if math.isinf(hi) else f' data-max-px="{hi:g}"'
    return (
        f'<g class="lay lay{tier}" data-min-px="{lo:g}"{max_attr} data-layout-px="{layout_px:g}" '
        f'data-font-px="{_LABEL_FONT_PX:g}">{"".join(rings)}{"".join(leaders)}{"".join(boxes)}</g>'
    )


def _nice_scale_um(target: float) -> float:
    if target <= 0 or not math.isfinite(target):
        return 1000.0
    exp = 10 ** math.floor(math.log10(target))
    for m in (5, 2, 1):
        if m * exp <= target:
            return float(m * exp)
    return float(exp)


def _crop_card(
    cell: Mapping[str, Any],
    cells: CellTable,
    class_names: Sequence[str],
    read_crop: ReadCrop | None,
    slide_mpp: float,
    crop_um: float,
    marked: bool = True,
) -> str:
    from PIL import Image

    i = int(cell["index"])
    x, y = float(cell["x"]), float(cell["y"])
    size = max(8, round(crop_um / slide_mpp))
    x0, y0 = x - size / 2, y - size / 2
    image_html = '<div class="noimg">no image</div>'
    if read_crop is not None:
        try:
            crop = np.asarray(read_crop(x, y, size))
            if crop.ndim == 3 and crop.shape[0] > 0 and crop.shape[1] > 0:
                img = Image.fromarray(crop[..., :3].astype(np.uint8)).resize(
                    (_CROP_PX, _CROP_PX), Image.Resampling.LANCZOS
                )
                image_html = f'<img alt="cell {i}" src="{_data_uri(np.asarray(img))}">'
        except Exception as exc:  # a crop failing must not lose the report
            logger.warning("could not read the crop of cell %d at (%.0f, %.0f): %s", i, x, y, exc)
    outline = ""
    if 0 <= i < len(cells):
        pts = cells.outline(i)
        pts = pts[np.isfinite(pts).all(axis=1)] if len(pts) else pts
        if len(pts) >= 3:
            points = " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)
            outline = f'<polygon points="{points}" class="ol"/>'
    svg = (
        f'<svg class="olsvg" viewBox="{x0:.1f} {y0:.1f} {size} {size}" preserveAspectRatio="none">'
        f"{outline}</svg>"
    )
    cls = str(cell.get("class", "?"))
    score = cell.get("score")
    score_txt = f"{float(score):.3f}" if isinstance(score, (int, float)) else "–"
    morph = cell.get("morphometrics") or {}
    extra = []
    for key, label, unit in (("nucleus_area_um2", "nucleus", "µm²"), ("nc_ratio", "N/C", "")):
        v = morph.get(key)
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            extra.append(f"{label} {float(v):.3g}{(' ' + unit) if unit else ''}")
    conf = "" if cell.get("confident", True) else ' <span class="muted">(low confidence)</span>'
    rank = int(cell.get("rank", 0))
    crop_html = f'{image_html}{svg}<span class="rank">#{rank}</span>'
    if marked:
        tip = "Show on the slide overview"
        crop_html = f'<a class="crop" href="#marker-{rank}" title="{tip}">{crop_html}</a>'
    else:
        crop_html = f'<div class="crop">{crop_html}</div>'
    return (
        f'<figure class="card" id="cell-{rank}">'
        f"{crop_html}"
        f"<figcaption><div class='ch'>{_class_badge(cls)}{conf}"
        f'<span class="score">score <b>{_e(score_txt)}</b></span></div>'
        f"{_prob_bars(cell.get('probs') or {}, class_names)}"
        f'<div class="coords">x {x:,.0f} · y {y:,.0f} px'
        f"{(' · ' + _e(' · '.join(extra))) if extra else ''}</div></figcaption></figure>"
    )


_CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;
 color:#1e293b;background:#f1f5f9}
.wrap{max-width:1280px;margin:0 auto;padding:24px}
header.top{background:#0f172a;color:#f8fafc;border-radius:12px;padding:20px 24px;display:flex;
 flex-wrap:wrap;gap:16px 32px;align-items:center;justify-content:space-between}
header.top h1{margin:0;font-size:20px;font-weight:600;word-break:break-all}
header.top .sub{color:#94a3b8;font-size:13px;margin-top:4px;word-break:break-all}
.badge{display:inline-block;padding:6px 14px;border-radius:999px;font-weight:700;letter-spacing:.04em;
 text-transform:uppercase;font-size:13px;color:#fff}
.stats{display:flex;gap:28px;flex-wrap:wrap}
.stat .v{font-size:22px;font-weight:700;color:#fff}
.stat .l{font-size:11px;text-transform:uppercase;letter-spacing:.06em;color:#94a3b8}
.reason{margin:12px 2px 0;color:#334155}
.grid{display:grid;grid-template-columns:minmax(0,1.5fr) minmax(0,1fr);gap:20px;margin-top:20px}
@media (max-width:900px){.grid{grid-template-columns:1fr}}
section.panel{background:#fff;border:1px solid #e2e8f0;border-radius:12px;padding:16px 18px;
 box-shadow:0 1px 2px rgba(15,23,42,.05)}
section.panel+section.panel{margin-top:20px}
h2{font-size:13px;text-transform:uppercase;letter-spacing:.07em;color:#475569;margin:0 0 12px}
.thumbwrap{position:relative}
.thumb{position:relative;width:100%;background:#e2e8f0;border-radius:8px;overflow:hidden;
 container-type:inline-size;margin-top:8px}
.thumb img,.thumb svg{position:absolute;inset:0;width:100%;height:100%}
.thumb img.heat{image-rendering:pixelated}
#heat{position:absolute;opacity:0;width:1px;height:1px}
#heat:not(:checked)~.thumb .heat{display:none}
.toggle{display:inline-block;background:#b71c1c;color:#fff;font-size:12px;padding:3px 10px;
 border-radius:999px;cursor:pointer;user-select:none}
.toggle::before{content:"\\2713\\a0"}
#heat:not(:checked)~.toggle{background:#64748b}
#heat:not(:checked)~.toggle::before{content:""}
#heat:focus-visible~.toggle{outline:2px solid #00e5ff;outline-offset:2px}
.hint{font-size:12px;margin-left:10px}
.mk{fill:rgba(255,255,255,.01);stroke:#0f172a;stroke-width:2;vector-effect:non-scaling-stroke}
.mk:target{stroke:#00b8d4;stroke-width:4}
.ring{fill:none;stroke:#0f172a;stroke-width:1;stroke-dasharray:3 2;vector-effect:non-scaling-stroke}
.ld{stroke:#0f172a;stroke-width:1.2;vector-effect:non-scaling-stroke}
.lb{fill:rgba(255,255,255,.92);stroke:#0f172a;stroke-width:1;vector-effect:non-scaling-stroke}
.mt{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Arial,sans-serif;font-weight:700;fill:#0f172a}
.mt a:hover{fill:#b71c1c;text-decoration:underline}
.legend{display:flex;align-items:center;gap:8px;flex-wrap:wrap;font-size:12px;color:#475569;margin-top:8px}
.ramp{display:inline-block;width:120px;height:10px;border-radius:3px;
 background:linear-gradient(90deg,rgba(255,235,59,.12),rgba(255,152,0,.26),rgba(211,47,47,.4))}
.ramp-end{margin-right:16px}
.scalebar{display:inline-block;height:4px;background:#0f172a;min-width:20px;max-width:200px}
.muted{color:#64748b}
table{border-collapse:collapse;width:100%}
table.kv th{text-align:left;font-weight:500;color:#475569;padding:4px 8px 4px 0;vertical-align:top;
 width:42%;word-break:break-word}
table.kv td{padding:4px 0;word-break:break-word}
table.counts th,table.counts td{padding:5px 6px;border-bottom:1px solid #f1f5f9;text-align:right}
table.counts th:first-child,table.counts td:first-child{text-align:left}
table.counts thead th{font-size:11px;text-transform:uppercase;letter-spacing:.05em;color:#64748b}
.bar{display:inline-block;height:8px;border-radius:2px;vertical-align:middle}
.cls{display:inline-block;padding:1px 8px;border-radius:4px;font-size:12px;font-weight:600}
.meter{height:10px;background:#e2e8f0;border-radius:5px;overflow:hidden;margin:8px 0 4px}
.meter span{display:block;height:100%}
.ok{color:#2e7d32;font-weight:600}.bad{color:#b71c1c;font-weight:600}
ul.qc{list-style:none;margin:0;padding:0}
ul.qc li{display:flex;gap:10px;padding:6px 0;border-bottom:1px solid #f1f5f9;align-items:baseline}
ul.qc li:last-child{border:0}
.dot{flex:none;width:9px;height:9px;border-radius:50%;display:inline-block;transform:translateY(-1px)}
.qcname{font-weight:600;min-width:170px}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:14px}
figure.card{margin:0;background:#fff;border:1px solid #e2e8f0;border-radius:10px;overflow:hidden}
figure.card:target{outline:3px solid #00b8d4;outline-offset:1px}
.crop{position:relative;display:block;aspect-ratio:1/1;background:#f8fafc}
.crop img,.crop svg{position:absolute;inset:0;width:100%;height:100%}
.ol{fill:none;stroke:#00e5ff;stroke-width:1.6;vector-effect:non-scaling-stroke;stroke-opacity:.95}
.rank{position:absolute;top:6px;left:6px;background:rgba(15,23,42,.8);color:#fff;font-size:11px;
 font-weight:700;padding:1px 7px;border-radius:999px}
.noimg{position:absolute;inset:0;display:flex;align-items:center;justify-content:center;color:#94a3b8;
 font-size:12px}
figcaption{padding:8px 10px 10px}
.ch{display:flex;justify-content:space-between;align-items:center;margin-bottom:6px;gap:6px}
.score{font-size:12px;color:#475569}
.pb{display:flex;align-items:center;gap:6px;font-size:11px;color:#475569;line-height:1.6}
.pl{width:52px;flex:none;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.pt{flex:1;height:6px;background:#f1f5f9;border-radius:3px;overflow:hidden}
.pt span{display:block;height:100%}
.pv{width:30px;text-align:right;font-variant-numeric:tabular-nums}
.coords{font-size:11px;color:#64748b;margin-top:6px;font-variant-numeric:tabular-nums}
.empty{padding:24px;color:#64748b;text-align:center}
code{font-size:12px;word-break:break-all}
footer{margin:24px 0 8px;color:#64748b;font-size:12px;text-align:center}
"""
# Which label layer shows at which overview width: container queries on .thumb (a browser without
# them shows the widest layout, smaller but still without overlaps).
_CSS += ".lay{display:none}.lay0{display:inline}\n" + "".join(
    f"@container (max-width:{_LABEL_TIERS[i - 1][0] - 0.02:g}px)"
    f"{{.lay{i - 1}{{display:none}}.lay{i}{{display:inline}}}}\n"
    for i in range(1, len(_LABEL_TIERS))
)


_UNSAT_RULES = {
    "no_cells": "no cells were found on the slide",
    "inadequate": (
        "the specimen is below the adequacy threshold and no cell looks abnormal, not even with low "
        "confidence (small test slides need an explicit adequacy.min_squamous_cells override)"
    ),
}


def _unsatisfactory_html(summary: Mapping[str, Any]) -> str:
    """The prominent box that says which rule made the slide unsatisfactory."""
    rule = str(summary.get("triage_rule") or "")
    what = _UNSAT_RULES.get(rule, "")
    reason = summary.get("triage_reason") or "no reason recorded"
    rule_txt = f"rule <code>{_e(rule)}</code>: {_e(what)}. " if rule else ""
    return (
        '<div class="unsat" style="margin:12px 0 0;padding:12px 16px;border-radius:10px;'
        'background:#efebe9;border:2px solid #5d4037;color:#3e2723">'
        f"<b>Unsatisfactory for evaluation</b> — {rule_txt}<b>Why:</b> {_e(reason)}</div>"
    )


def _operating_point_html(op: Any) -> str:
    """The operating point that produced the triage, and the figures it was validated with."""
    if not isinstance(op, Mapping):
        return '<div class="muted">No operating point recorded (summary written by an older version).</div>'
    name = _e(op.get("name", "–"))
    if not op.get("calibrated"):
        return (
            f'<div><span class="bad">Uncalibrated</span> — <code>{name}</code></div>'
            f'<div class="muted">{_e(op.get("note", ""))}</div>'
        )
    rows = [("name", f"<code>{name}</code>"), ("date", _e(op.get("date", "–")))]
    rows.append(("source batch", _e(op.get("source_batch", "–"))))
    rows.append(("review score ≥", _e(_fmt(op.get("review_score")))))
    if op.get("priority_score") is not None:
        rows.append(("priority score ≥", _e(_fmt(op.get("priority_score")))))
    labels = {"hsil_plus": "HSIL+ kept", "ascus_plus": "ASC-US+ kept", "priority": "HSIL+ priority"}
    target = op.get("target") or {}
    conf = target.get("confidence", 0.95)
    for key, fig in (op.get("sensitivity") or {}).items():
        if not isinstance(fig, Mapping):
            continue
        lb = fig.get("lower_bound")
        lb_txt = ""
        if lb is not None:
            lb_txt = f" (≥ {100 * float(lb):.1f} % with {100 * float(conf):g} % confidence)"
        want = target.get(key)
        want_txt = f", target {100 * float(want):g} %" if isinstance(want, (int, float)) else ""
        rows.append(
            (
                _e(labels.get(key, key)),
                _e(f"{fig.get('count')}/{fig.get('n')}{lb_txt}{want_txt}"),
            )
        )
    neg = op.get("negatives_set_aside") or {}
    if neg:
        rows.append(("NILM set aside", _e(f"{_fig_pct(neg)} ({neg.get('count')}/{neg.get('n')})")))
    if op.get("auroc") is not None:
        rows.append(("slide AUROC", _e(_fmt(op.get("auroc")))))
    status = (
        '<div><span class="ok">Calibrated</span></div>'
        if op.get("applies", True)
        else f'<div><span class="bad">Does not apply</span> — {_e(op.get("note", ""))}</div>'
    )
    return status + _kv_table(rows)


def _fig_pct(fig: Mapping[str, Any]) -> str:
    """``value`` of an operating-point figure as a percentage."""
    v = fig.get("value")
    return f"{100 * float(v):.1f} %" if isinstance(v, (int, float)) else "–"


def build_report(
    *,
    summary: Mapping[str, Any],
    cells: CellTable,
    class_names: Sequence[str],
    thumbnail: NDArray[Any],
    thumbnail_mpp: float,
    slide_mpp: float,
    read_crop: ReadCrop | None,
    title: str,
    crop_um: float = 40.0,
    heatmap_um: float = 250.0,
    max_gallery: int = 48,
) -> str:
    """Render ``report.html`` (a string) for one slide.

    Args:
        summary: the slide summary (:func:`wsi_screen.summary.summarize`).
        cells: every cell (for the heat map and the outlines of the gallery cells).
        class_names: classifier classes.
        thumbnail: RGB thumbnail of the whole slide at ``thumbnail_mpp`` µm/px.
        slide_mpp: level-0 µm/px.
        read_crop: ``read_crop(x, y, size)`` returns an RGB image of the level-0 square of side
            ``size`` px centred on (x, y), at any resolution; None: no crops.
        title: shown at the top (usually the slide name); escaped.
        crop_um: side of each gallery crop, µm.
        heatmap_um: side of a heat-map square, µm.
        max_gallery: most cells shown in the gallery (the summary's ``top_cells`` in order).
    """
    if thumbnail_mpp <= 0 or slide_mpp <= 0:
        raise ValueError(f"µm/px must be positive, got thumbnail {thumbnail_mpp}, slide {slide_mpp}")
    names = [str(c) for c in class_names]
    abnormal = [c for c in summary.get("abnormal_classes", []) if c in names]
    n = len(cells)
    if n and cells.probs.shape == (n, len(names)):
        score = abnormality_score(cells.probs, names, abnormal)
    else:
        score = np.zeros(n, np.float32)
    top_cells = list(summary.get("top_cells") or [])[: max(0, max_gallery)]

    triage = str(summary.get("triage", "unknown"))
    colour, triage_label = _TRIAGE_STYLE.get(triage, ("#475569", triage))
    category = summary.get("suggested_category", "–")
    slide_score = summary.get("score")
    score_txt = f"{float(slide_score):.3f}" if isinstance(slide_score, (int, float)) else "–"
    n_cells = summary.get("n_cells", n)
    slide_info = summary.get("slide")
    subtitle_bits = []
    if isinstance(slide_info, Mapping) and slide_info.get("path"):
        subtitle_bits.append(str(slide_info["path"]))
    elif isinstance(slide_info, str):
        subtitle_bits.append(slide_info)
    subtitle_bits.append(f"{slide_mpp:.3g} µm/px")

    header = (
        '<header class="top"><div>'
        f"<h1>{_e(title)}</h1><div class='sub'>{_e(' · '.join(subtitle_bits))}</div></div>"
        '<div class="stats">'
        f'<div class="stat"><div class="l">Triage</div><div><span class="badge" '
        f'style="background:{colour}">{_e(triage_label)}</span></div></div>'
        f'<div class="stat"><div class="l">Suggested category</div><div class="v">{_e(category)}</div></div>'
        f'<div class="stat"><div class="l">Score</div><div class="v">{_e(score_txt)}</div></div>'
        f'<div class="stat"><div class="l">Cells</div><div class="v">{_e(_fmt(n_cells))}</div></div>'
        "</div></header>"
    )
    reason = summary.get("triage_reason")
    reason_html = f'<p class="reason"><b>Why:</b> {_e(reason)}</p>' if reason else ""
    if triage == "unsatisfactory":
        reason_html = _unsatisfactory_html(summary)

    thumb_html = _thumbnail_section(thumbnail, thumbnail_mpp, slide_mpp, cells, score, top_cells, heatmap_um)

    # Class counts.
    counts = summary.get("class_counts") or {}
    predicted = counts.get("predicted") or {}
    confident = counts.get("confident") or {}
    total = max(1, sum(int(v) for v in predicted.values()))
    rows = []
    for c in names:
        p, q = int(predicted.get(c, 0)), int(confident.get(c, 0))
        r, g, b = class_color(c)
        width = 60 * p / total
        rows.append(
            f"<tr><td>{_class_badge(c)}</td><td>{p:,}</td><td>{q:,}</td>"
            f'<td><span class="bar" style="width:{width:.1f}px;background:rgb({r},{g},{b})"></span> '
            f"{100 * p / total:.1f}%</td></tr>"
        )
    counts_html = (
        '<table class="counts"><thead><tr><th>Class</th><th>Predicted</th><th>Confident</th>'
        f"<th>Share</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )

    # Adequacy.
    ade = summary.get("adequacy") or {}
    sq, thr = ade.get("squamous_cells"), ade.get("threshold")
    adequate = bool(ade.get("adequate"))
    frac = min(1.0, float(sq) / float(thr)) if isinstance(sq, int) and isinstance(thr, int) and thr else 1.0
    excluded_txt = ", ".join(str(c) for c in ade.get("excluded_classes", [])) or "–"
    adequacy_html = (
        f'<div><span class="{"ok" if adequate else "bad"}">{"Adequate" if adequate else "Below threshold"}'
        f"</span> — {_e(_fmt(sq))} well-preserved squamous cells of {_e(_fmt(thr))} needed "
        f"({_e(ade.get('preparation', '–'))})</div>"
        f'<div class="meter"><span style="width:{100 * frac:.1f}%;background:'
        f'{"#2e7d32" if adequate else "#e65100"}"></span></div>'
        f'<div class="muted">Counts cells not predicted as {_e(excluded_txt)}'
        f" with top probability ≥ {_e(_fmt(ade.get('min_confidence')))}.</div>"
    )

    # QC.
    qc = (summary.get("qc") or {}).get("checks") or {}
    qc_items = []
    for name, check in qc.items():
        if not isinstance(check, Mapping):
            continue
        flagged = bool(check.get("flagged"))
        dot = "#b71c1c" if flagged else "#2e7d32"
        value = check.get("value")
        unit = str(check.get("unit", ""))
        threshold = check.get("threshold")
        if unit.startswith("fraction of ") and isinstance(threshold, (int, float)):
            what = unit.removeprefix("fraction of ")
            shown = f"{100 * float(value):.1f} % of {what}" if isinstance(value, (int, float)) else "–"
            op = ">" if ">" in str(check.get("rule", ">")) else "<"
            detail = f"{_e(shown)} · flagged if {op} {_e(f'{100 * float(threshold):g}')} %"
        else:
            rule = check.get("rule") or f"limit {_fmt(threshold)}"
            detail = f"{_e(_fmt(value))} {_e(unit)} · {_e(rule)}"
        msg = f" — {_e(check.get('message', ''))}" if flagged else ""
        qc_items.append(
            f'<li><span class="dot" style="background:{dot}"></span>'
            f'<span class="qcname">{_e(name.replace("_", " "))}</span>'
            f'<span class="muted">{detail}{msg}</span></li>'
        )
    qc_html = (
        f'<ul class="qc">{"".join(qc_items)}</ul>' if qc_items else '<div class="muted">No QC data</div>'
    )

    findings = summary.get("findings") or {}
    for key, what, present, absent in (
        ("organisms", "organism", "Organisms present", "No organism finding"),
        (
            "endocervical",
            "endocervical",
            "Transformation-zone component present",
            "No transformation-zone component",
        ),
    ):
        f = findings.get(key) or {}
        if f.get("available"):
            n_txt = _e(_fmt(f.get("confident_cells", 0)))
            txt = (
                f"{present}: {n_txt} confident {what} cells (NILM; not a reason for review)"
                if f.get("present")
                else f"{absent} ({n_txt} confident {what} cells, {_e(_fmt(f.get('threshold')))} needed)"
            )
            qc_html += f'<div class="muted">{txt}</div>'

    op_html = _operating_point_html(summary.get("operating_point"))

    # Gallery.
    cards = [
        _crop_card(c, cells, names, read_crop, slide_mpp, crop_um, marked=k < _MAX_MARKERS)
        for k, c in enumerate(top_cells)
    ]
    gallery_html = (
        f'<div class="gallery">{"".join(cards)}</div>'
        if cards
        else '<div class="empty">No cells to show.</div>'
    )

    # Provenance.
    versions = summary.get("versions") or {}
    timings = summary.get("timings") or {}
    prov_rows = _flat_rows(versions) if isinstance(versions, Mapping) else []
    timing_rows = []
    if isinstance(timings, Mapping):
        for k, v in timings.items():
            val = f"{float(v):.1f} s" if isinstance(v, (int, float)) else str(v)
            timing_rows.append((_e(k), _e(val)))
    tiles = summary.get("tiles") or {}
    tile_rows = [(_e(k.replace("_", " ")), _e(_fmt(v))) for k, v in tiles.items()] if tiles else []
    area = summary.get("cellular_area_mm2")
    if area is not None:
        tile_rows.append(("cellular area", _e(f"{_fmt(area)} mm²")))

    prov_html = (
        '<div class="grid" style="margin-top:0">'
        f"<div><h2>Models &amp; versions</h2>{_kv_table(prov_rows) if prov_rows else '<p class=muted>–</p>'}"
        "</div>"
        f"<div><h2>Timings</h2>{_kv_table(timing_rows) if timing_rows else '<p class=muted>–</p>'}"
        f"<h2 style='margin-top:16px'>Slide</h2>{_kv_table(tile_rows) if tile_rows else ''}</div>"
        "</div>"
    )

    gallery_note = (
        f"{len(top_cells)} highest-scoring cells, {crop_um:g} µm crops; nucleus outline in cyan; "
        "coordinates are level-0 pixels (as in QuPath)."
    )
    body = (
        f'<div class="wrap">{header}{reason_html}'
        '<div class="grid">'
        f'<section class="panel"><h2>Slide overview</h2>{thumb_html}</section>'
        "<div>"
        f'<section class="panel"><h2>Class counts</h2>{counts_html}</section>'
        f'<section class="panel"><h2>Adequacy</h2>{adequacy_html}</section>'
        f'<section class="panel"><h2>Quality control</h2>{qc_html}</section>'
        f'<section class="panel"><h2>Operating point</h2>{op_html}</section>'
        "</div></div>"
        f'<section class="panel" style="margin-top:20px"><h2>Flagged cells</h2>'
        f'<p class="muted" style="margin-top:-6px">{_e(gallery_note)}</p>{gallery_html}</section>'
        f'<section class="panel" style="margin-top:20px">{prov_html}</section>'
        f"<footer>wsi-screen {_e(__version__)} · decision support for cytology screening: every slide "
        "still needs review by a qualified cytotechnologist or pathologist.</footer>"
        "</div>"
    )
    csp = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} — wsi-screen report</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>\n"
    )


def write_report(path: str | Path, html: str) -> Path:
    """Write the report (UTF-8) through a temporary sibling file, then rename."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    tmp.write_text(html, encoding="utf-8")
    os.replace(tmp, p)
    return p
