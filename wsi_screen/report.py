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
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen import __version__
from wsi_screen.cells import CellTable, abnormality_score
from wsi_screen.geojson import class_color

__all__ = ["build_report", "heatmap_grid", "write_report"]

logger = logging.getLogger(__name__)

ReadCrop = Callable[[float, float, int], NDArray[Any]]

#: Longest side of the thumbnail shown in the report, px.
_THUMB_MAX = 1100
#: Size at which cell crops are encoded, px.
_CROP_PX = 192
#: Heat-map squares whose highest cell score is below this stay transparent.
_HEAT_MIN = 0.25
#: Gallery cells marked on the thumbnail.
_MAX_MARKERS = 24

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
    alpha = np.where(shown, 60 + 170 * np.clip((s - _HEAT_MIN) / (1 - _HEAT_MIN), 0, 1), 0)
    rgba = np.dstack([rgb, alpha]).astype(np.uint8)
    gh, gw = grid.shape
    big = Image.fromarray(rgba, mode="RGBA").resize(
        (max(1, round(gw * square_px)), max(1, round(gh * square_px))), Image.Resampling.NEAREST
    )
    out = np.zeros((size[1], size[0], 4), np.uint8)
    arr = np.asarray(big)[: size[1], : size[0]]
    out[: arr.shape[0], : arr.shape[1]] = arr
    return out


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
    markers = []
    r = max(6.0, 0.012 * max(w, h))
    for cell in top_cells[:_MAX_MARKERS]:
        cx, cy = float(cell["x"]) * px_per_l0, float(cell["y"]) * px_per_l0
        markers.append(
            f'<g><circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r:.1f}" class="mk"/>'
            f'<text x="{cx + r + 2:.1f}" y="{cy - r * 0.3:.1f}" class="mt">{int(cell["rank"])}</text></g>'
        )
    scale_um = _nice_scale_um(w * mpp * 0.2)
    scale_px = scale_um / mpp
    scale_label = f"{scale_um / 1000:g} mm" if scale_um >= 1000 else f"{scale_um:g} µm"
    return (
        '<div class="thumbwrap"><input type="checkbox" id="heat" checked>'
        '<label for="heat" class="toggle">Heat map</label>'
        f'<div class="thumb" style="aspect-ratio:{w}/{h}">'
        f'<img class="base" alt="slide thumbnail" src="{_data_uri(thumb, quality=85)}">'
        f'<img class="heat" alt="" src="{_data_uri(heat, fmt="PNG")}">'
        f'<svg class="marks" viewBox="0 0 {w} {h}" preserveAspectRatio="none">{"".join(markers)}</svg>'
        "</div>"
        '<div class="legend"><span>cell score</span><span>0</span><span class="ramp"></span>'
        '<span class="ramp-end">1</span>'
        f'<span class="scalebar" style="width:{100 * scale_px / w:.2f}%"></span>'
        f"<span>{_e(scale_label)}</span>"
        f"<span class='muted'>squares of {heatmap_um:g} µm show the highest cell score inside "
        f"(clear below {_HEAT_MIN:g})</span></div>"
        "</div>"
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
    return (
        '<figure class="card">'
        f'<div class="crop">{image_html}{svg}<span class="rank">#{int(cell.get("rank", 0))}</span></div>'
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
.thumb{position:relative;width:100%;background:#e2e8f0;border-radius:8px;overflow:hidden}
.thumb img,.thumb svg{position:absolute;inset:0;width:100%;height:100%}
.thumb img.heat{image-rendering:pixelated}
#heat{position:absolute;opacity:0;pointer-events:none}
#heat:not(:checked)~.thumb .heat{display:none}
.toggle{position:absolute;top:8px;right:8px;z-index:2;background:rgba(15,23,42,.75);color:#fff;
 font-size:12px;padding:4px 10px;border-radius:999px;cursor:pointer;user-select:none}
#heat:not(:checked)~.toggle{background:rgba(100,116,139,.75);text-decoration:line-through}
.mk{fill:none;stroke:#0f172a;stroke-width:2.5;vector-effect:non-scaling-stroke}
.mt{font:700 13px system-ui,sans-serif;fill:#0f172a;paint-order:stroke;stroke:#fff;stroke-width:3px}
.legend{display:flex;align-items:center;gap:8px;flex-wrap:wrap;font-size:12px;color:#475569;margin-top:8px}
.ramp{display:inline-block;width:120px;height:10px;border-radius:3px;
 background:linear-gradient(90deg,rgba(255,235,59,.5),#ff9800,#d32f2f)}
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
.crop{position:relative;aspect-ratio:1/1;background:#f8fafc}
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

    # Gallery.
    cards = [_crop_card(c, cells, names, read_crop, slide_mpp, crop_um) for c in top_cells]
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
