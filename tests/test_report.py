"""report.html: escaping of hostile strings, self-containment, content, the overview's layout."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cellfactory import ABNORMAL, CLASSES, SLIDE_MPP, SLIDE_SIZE, make_cells
from PIL import Image

from wsi_screen import report as report_module
from wsi_screen.cells import CellTable
from wsi_screen.config import Settings
from wsi_screen.report import (
    build_report,
    heatmap_grid,
    layout_marker_labels,
    overview_width_px,
    write_report,
)
from wsi_screen.summary import summarize

HOSTILE = "<script>alert('pwned')</script>\"><img src=x onerror=alert(1)>"
THUMB_MPP = 16.0


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.style = ""
        self._in_style = False
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"
        self._in_style = tag == "style"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = self._in_style = False

    def handle_data(self, data: str) -> None:
        if self._in_style:
            self.style += data
            return
        self.text.append(data)
        if self._in_title:
            self.title += data


@pytest.fixture(scope="module")
def cells() -> CellTable:
    labels = ["NILM"] * 400 + ["HSIL"] * 6 + ["LSIL"] * 4 + ["artifact"] * 20
    return make_cells(labels, seed=11)


@pytest.fixture(scope="module")
def summary(cells: CellTable) -> dict[str, Any]:
    return summarize(
        cells,
        class_names=CLASSES,
        abnormal_classes=ABNORMAL,
        settings=Settings(),
        cellular_area_mm2=3.2,
        tiles_total=40,
        tiles_unreadable=1,
        tiles_out_of_focus=0,
        timings={"total": 4.2, HOSTILE: 1.0},
        versions={"wsi_screen": "0.1.0", "models": [{"name": HOSTILE, "sha256": "ab" * 32}]},
        extra={"slide": {"path": f"/scans/{HOSTILE}.svs"}},
    )


def _thumb() -> np.ndarray:
    w, h = (round(s * SLIDE_MPP / THUMB_MPP) for s in SLIDE_SIZE)
    rng = np.random.default_rng(0)
    return (235 - rng.integers(0, 30, (h, w, 3))).astype(np.uint8)


def _crop(x: float, y: float, size: int) -> np.ndarray:
    return np.full((size, size, 3), (200, 150, 190), np.uint8)


def _build(summary: dict[str, Any], cells: CellTable, **kw: Any) -> str:
    args: dict[str, Any] = {
        "summary": summary,
        "cells": cells,
        "class_names": CLASSES,
        "thumbnail": _thumb(),
        "thumbnail_mpp": THUMB_MPP,
        "slide_mpp": SLIDE_MPP,
        "read_crop": _crop,
        "title": HOSTILE,
    }
    args.update(kw)
    return build_report(**args)


def test_hostile_strings_are_escaped(summary: dict[str, Any], cells: CellTable) -> None:
    page = _build(summary, cells)
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    parsed = _Collector()
    parsed.feed(page)
    tags = {t for t, _ in parsed.tags}
    assert not tags & {"script", "iframe", "object", "embed", "link", "base", "form"}
    for tag, attrs in parsed.tags:
        assert not any(name.startswith("on") for name in attrs), (tag, attrs)
        if tag == "img":
            assert (attrs.get("src") or "").startswith("data:image/"), attrs
    # The title survives as text, exactly.
    assert HOSTILE in parsed.title
    assert sum(HOSTILE in t for t in parsed.text) >= 3  # title, header, slide path, models, timings


def test_report_is_self_contained(summary: dict[str, Any], cells: CellTable) -> None:
    page = _build(summary, cells)
    assert "http://" not in page and "https://" not in page
    assert not re.search(r"(src|href)\s*=\s*[\"']?(?!data:)[a-z]+:", page, re.I)
    assert "@import" not in page and "url(" not in page
    assert "Content-Security-Policy" in page and "default-src 'none'" in page
    uris = re.findall(r'src="data:image/(png|jpeg);base64,([A-Za-z0-9+/=]+)"', page)
    assert len(uris) >= 3
    for _, payload in uris:
        Image.open(io.BytesIO(base64.b64decode(payload))).verify()


def test_content(summary: dict[str, Any], cells: CellTable) -> None:
    calls: list[tuple[float, float, int]] = []

    def crop(x: float, y: float, size: int) -> np.ndarray:
        calls.append((x, y, size))
        return _crop(x, y, size)

    page = _build(summary, cells, read_crop=crop, max_gallery=5, crop_um=40.0)
    assert summary["triage"] == "priority"
    assert "Priority review" in page and ">HSIL<" in page
    assert f"{summary['score']:.3f}" in page
    assert page.count('<figure class="card"') == 5
    assert len(calls) == 5 and {c[2] for c in calls} == {round(40.0 / SLIDE_MPP)}
    top = summary["top_cells"][0]
    assert calls[0][:2] == (top["x"], top["y"])
    assert "<polygon" in page  # nucleus outlines
    for c in CLASSES:
        assert f">{c}<" in page
    assert "unreadable tiles" in page and "Adequacy" in page.replace("ADEQUACY", "Adequacy")


def test_no_crops_and_failing_crops(
    summary: dict[str, Any], cells: CellTable, caplog: pytest.LogCaptureFixture
) -> None:
    page = _build(summary, cells, read_crop=None, max_gallery=4)
    assert page.count("no image") == 4

    def broken(x: float, y: float, size: int) -> np.ndarray:
        raise OSError("tile is corrupt")

    page = _build(summary, cells, read_crop=broken, max_gallery=3)
    assert page.count("no image") == 3
    assert "tile is corrupt" in caplog.text


def test_empty_slide_renders() -> None:
    empty = CellTable.empty(len(CLASSES))
    s = summarize(
        empty,
        class_names=CLASSES,
        abnormal_classes=ABNORMAL,
        settings=Settings(),
        cellular_area_mm2=0.0,
        tiles_total=0,
        tiles_unreadable=0,
        tiles_out_of_focus=0,
        timings={},
        versions={},
    )
    page = build_report(
        summary=s,
        cells=empty,
        class_names=CLASSES,
        thumbnail=np.zeros((0, 0, 3), np.uint8),
        thumbnail_mpp=THUMB_MPP,
        slide_mpp=SLIDE_MPP,
        read_crop=None,
        title="empty",
    )
    assert "Unsatisfactory" in page and "No cells to show" in page


def test_heatmap_grid() -> None:
    x = np.array([10.0, 30.0, 410.0, 5000.0])
    y = np.array([10.0, 20.0, 10.0, 5000.0])
    score = np.array([0.2, 0.9, 0.5, 1.0], np.float32)
    # level-0 → thumbnail: ×0.1; squares of 20 thumbnail px = 200 level-0 px.
    grid = heatmap_grid(x, y, score, shape=(40, 60), px_per_level0=0.1, square_px=20)
    assert grid.shape == (2, 3)
    assert grid[0, 0] == pytest.approx(0.9) and grid[0, 2] == pytest.approx(0.5)
    assert np.isnan(grid[1, 1]) and np.isnan(grid[0, 1])  # the cell at 5000 is outside the thumbnail


def test_write_report(tmp_path: Path, summary: dict[str, Any], cells: CellTable) -> None:
    path = write_report(tmp_path / "report.html", _build(summary, cells, max_gallery=2))
    assert path.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_renders_in_headless_chromium(tmp_path: Path, summary: dict[str, Any], cells: CellTable) -> None:
    page = write_report(tmp_path / "report.html", _build(summary, cells, max_gallery=8))
    shot = tmp_path / "r.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={shot}",
            "--window-size=1200,1600",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (1600, 1200)
    assert img.std() > 20  # not a blank page
    # The dark header band is drawn at the top.
    assert img[40:80, 100:1100].mean() < 80


# -- the slide overview: slide under a translucent heat map, labels that never overlap ---------------
#: Viewport widths the overview must stay legible at (issue 18), and two more: the overview shown at
#: those widths itself, and a phone.
VIEWPORTS = (1400.0, 800.0)
Box = tuple[float, float, float, float]


class _Overview(HTMLParser):
    """The overview's SVG as drawn: its viewBox, marker circles and, per layer, label boxes and text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.size = (0.0, 0.0)
        self.markers: dict[str, tuple[float, float, float]] = {}  # id → (cx, cy, r)
        self.marker_links: dict[str, str] = {}  # marker id → href of its link
        self.layers: list[dict[str, Any]] = []
        self.cards: dict[str, str | None] = {}  # card id → href of its crop's link
        self.ids: set[str] = set()
        self.rank_links: list[str] = []  # hrefs inside the labels
        self.order: list[str] = []  # "base", "heat", "svg" in document order
        self.heat_src = ""
        self._groups: list[str] = []  # open <g> elements: "lay", "lab" or ""
        self._layer: dict[str, Any] | None = None
        self._label: dict[str, Any] | None = None
        self._href: str | None = None
        self._card: str | None = None

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs_list}
        cls = a.get("class", "").split()
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img" and "base" in cls:
            self.order.append("base")
        elif tag == "img" and "heat" in cls:
            self.order.append("heat")
            self.heat_src = a["src"]
        elif tag == "svg" and "marks" in cls:
            self.order.append("svg")
            _, _, w, h = (float(v) for v in a["viewbox"].split())
            self.size = (w, h)
        elif tag == "figure" and "card" in cls:
            self._card = a["id"]
            self.cards[a["id"]] = None
        elif tag == "a":
            self._href = a.get("href")
            if "crop" in cls and self._card is not None:
                self.cards[self._card] = a.get("href")
            if self._label is not None and self._href:
                self.rank_links.append(self._href)
        elif tag == "circle" and "mk" in cls:
            self.markers[a["id"]] = (float(a["cx"]), float(a["cy"]), float(a["r"]))
            self.marker_links[a["id"]] = self._href or ""
        elif tag == "g" and "lay" in cls:
            self._layer = {
                "min": float(a["data-min-px"]),
                "max": float(a.get("data-max-px", "inf")),
                "classes": cls,
                "labels": [],
            }
            self.layers.append(self._layer)
        elif tag == "g" and "lab" in cls and self._layer is not None:
            self._label = {"ranks": a["data-ranks"].split(), "texts": []}
            self._layer["labels"].append(self._label)
        elif tag == "rect" and self._label is not None:
            self._label["box"] = (
                float(a["x"]),
                float(a["y"]),
                float(a["x"]) + float(a["width"]),
                float(a["y"]) + float(a["height"]),
            )
        elif tag == "text" and self._label is not None:
            self._label["texts"].append(
                (float(a["x"]), float(a["y"]), float(a["font-size"]), float(a["textlength"]))
            )
        if tag == "g":
            self._groups.append("lab" if "lab" in cls else "lay" if "lay" in cls else "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "g" and self._groups:
            kind = self._groups.pop()
            if kind == "lab":
                self._label = None
            elif kind == "lay":
                self._layer = None
        elif tag == "a":
            self._href = None
        elif tag == "figure":
            self._card = None


def _parse_overview(page: str) -> _Overview:
    ov = _Overview()
    ov.feed(page)
    return ov


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _check_labels_at(ov: _Overview, display_w: float, marked: set[str]) -> None:
    """The labels the page shows when its overview is ``display_w`` px wide: legible, none overlapping."""
    w, h = ov.size
    scale = display_w / w
    shown = [lay for lay in ov.layers if lay["min"] <= display_w < lay["max"]]
    assert len(shown) == 1, (display_w, [(lay["min"], lay["max"]) for lay in ov.layers])
    labels = shown[0]["labels"]
    boxes = [tuple(v * scale for v in lab["box"]) for lab in labels]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            assert not _overlap(boxes[i], boxes[j]), (display_w, labels[i]["ranks"], labels[j]["ranks"])
    for lab, box in zip(labels, boxes, strict=True):
        assert box[0] >= 0 and box[1] >= 0 and box[2] <= w * scale + 1e-6 and box[3] <= h * scale + 1e-6
        for x, y, font, length in lab["texts"]:
            assert 9.0 <= font * scale <= 20.0, (display_w, font * scale)  # legible, not shouting
            assert lab["box"][0] <= x and x + length <= lab["box"][2] + 1e-6  # the text fits its box
            assert lab["box"][1] < y <= lab["box"][3]
    named = [r for lab in labels for r in lab["ranks"]]
    assert sorted(named) == sorted(marked) and len(set(named)) == len(named)  # every marker once


def _check_overview(page: str, n_gallery: int) -> _Overview:
    ov = _parse_overview(page)
    # The slide is drawn first, then the heat map over it, then the markers.
    assert ov.order == ["base", "heat", "svg"]
    # The heat map is translucent (≤ 40 %) everywhere, and a click on the "Heat map" toggle hides it.
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(ov.heat_src.split(",", 1)[1]))))
    assert heat.shape[2] == 4 and 0 < int(heat[..., 3].max()) <= round(0.4 * 255)
    parsed = _Collector()
    parsed.feed(page)
    assert ("input", {"type": "checkbox", "id": "heat", "checked": None}) in parsed.tags
    assert any(t == "label" and a.get("for") == "heat" for t, a in parsed.tags)
    assert "#heat:not(:checked)~.thumb .heat{display:none}" in parsed.style
    assert not re.search(r"\.heat[^{]*\{[^}]*opacity", parsed.style)  # nothing makes it more opaque
    # One marker per gallery cell (up to 48), each linking to its card; each crop links to its marker.
    marked = {m.removeprefix("marker-") for m in ov.markers}
    assert len(ov.markers) == min(n_gallery, 48) == len(marked)
    assert len(ov.cards) == n_gallery
    for mid, href in ov.marker_links.items():
        assert href == "#cell-" + mid.removeprefix("marker-") and href[1:] in ov.cards
    for cid, href in ov.cards.items():
        rank = cid.removeprefix("cell-")
        if rank in marked:
            assert href == f"#marker-{rank}" and href[1:] in ov.ids
        else:
            assert href is None
    assert ov.rank_links and all(h[1:] in ov.cards for h in ov.rank_links)
    # Labels: no two overlap, whatever layer the page shows, at 1400 and 800 px viewports (and at
    # overview widths of 1400 and 800 px, and on a phone).
    widths = [overview_width_px(v) for v in VIEWPORTS] + [*VIEWPORTS, overview_width_px(375)]
    for display_w in widths:
        _check_labels_at(ov, display_w, marked)
    # The container queries of the page switch layers at the layers' own widths.
    for lay in ov.layers[1:]:
        i = int(lay["classes"][1].removeprefix("lay"))
        assert f"@container (max-width:{lay['max'] - 0.02:g}px){{.lay{i - 1}{{display:none}}.lay{i}" in (
            parsed.style
        )
    return ov


def test_overview_width_mirrors_the_css() -> None:
    css = report_module._CSS
    assert ".wrap{max-width:1280px;margin:0 auto;padding:24px}" in css
    assert "grid-template-columns:minmax(0,1.5fr) minmax(0,1fr);gap:20px" in css
    assert "@media (max-width:900px){.grid{grid-template-columns:1fr}}" in css
    assert "border:1px solid #e2e8f0;border-radius:12px;padding:16px 18px" in css
    assert overview_width_px(1400) == pytest.approx((1232 - 20) * 0.6 - 38)
    assert overview_width_px(800) == pytest.approx(800 - 48 - 38)
    assert overview_width_px(901) < overview_width_px(900)


def test_overview_of_the_fixture_slide(summary: dict[str, Any], cells: CellTable) -> None:
    _check_overview(_build(summary, cells), len(summary["top_cells"]))


@pytest.fixture(scope="module")
def clustered() -> tuple[dict[str, Any], CellTable]:
    """A slide whose flagged cells crowd: 25 HSIL in 70 µm at the top right corner of the slide (a
    field's edge), 20 LSIL within 200 µm, 3 ASC-US apart, and normal cells everywhere."""
    rng = np.random.default_rng(5)
    n_hsil, n_lsil, n_ascus, n_nilm = 25, 20, 3, 300
    xy = np.concatenate(
        [
            np.column_stack([rng.uniform(19_700, 19_990, n_hsil), rng.uniform(10, 290, n_hsil)]),
            np.column_stack([rng.uniform(8_000, 8_800, n_lsil), rng.uniform(15_200, 15_990, n_lsil)]),
            np.array([[3000.0, 3000.0], [3010.0, 3400.0], [9000.0, 400.0]]),
            np.column_stack([rng.uniform(0, 20_000, n_nilm), rng.uniform(0, 16_000, n_nilm)]),
        ]
    )
    labels = ["HSIL"] * n_hsil + ["LSIL"] * n_lsil + ["ASC-US"] * n_ascus + ["NILM"] * n_nilm
    p = np.concatenate([rng.uniform(0.6, 0.99, n_hsil + n_lsil + n_ascus), np.full(n_nilm, 0.95)])
    cells = make_cells(labels, p=p, seed=3, xy=xy)
    summary = summarize(
        cells,
        class_names=CLASSES,
        abnormal_classes=ABNORMAL,
        settings=Settings(),
        cellular_area_mm2=3.2,
        tiles_total=40,
        tiles_unreadable=0,
        tiles_out_of_focus=0,
        timings={},
        versions={},
    )
    return summary, cells


def test_overview_with_clustered_cells(clustered: tuple[dict[str, Any], CellTable]) -> None:
    summary, cells = clustered
    top = summary["top_cells"]
    assert len(top) == 48
    page = _build(summary, cells)
    ov = _check_overview(page, 48)
    # The markers really do crowd: drawn as before (a label at each marker) most would overlap.
    w = ov.size[0]
    scale = overview_width_px(1400) / w
    xy = np.array([m[:2] for m in ov.markers.values()]) * scale
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    np.fill_diagonal(d, np.inf)
    assert (d.min(axis=1) < 10).sum() >= 30
    # Close markers share a label ("1, 4, 9, …"); the slide's corner cells are all named.
    layer = next(lay for lay in ov.layers if lay["min"] <= overview_width_px(1400) < lay["max"])
    assert any(len(lab["ranks"]) > 1 for lab in layer["labels"])
    assert len(layer["labels"]) < 48


@pytest.mark.parametrize("seed", range(6))
def test_layout_marker_labels_never_overlap(seed: int) -> None:
    rng = np.random.default_rng(seed)
    w, h = [(1100, 800), (312, 250), (384, 384), (200, 900), (1100, 120), (60, 60)][seed]
    n = 48
    # Half spread out, half in two tight clumps (one at an edge).
    k = n // 4
    xy = np.concatenate(
        [
            rng.uniform((0, 0), (w, h), (n - 2 * k, 2)),
            rng.uniform((w - 4, 0), (w, 6), (k, 2)),
            rng.uniform((w * 0.4, h * 0.4), (w * 0.45, h * 0.45), (k, 2)),
        ]
    )
    markers = [(r + 1, float(x), float(y)) for r, (x, y) in enumerate(xy)]
    for display_w in (overview_width_px(1400), overview_width_px(800), 600.0, 400.0, 300.0):
        labels = layout_marker_labels(markers, size=(w, h), display_width=display_w)
        assert sorted(r for lab in labels for r in lab.ranks) == list(range(1, n + 1))
        for i, a in enumerate(labels):
            for b in labels[i + 1 :]:
                assert not _overlap(a.box, b.box), (display_w, a.ranks, b.ranks)
        if len(labels) > 1:  # a single label can be larger than a tiny overview
            for lab in labels:
                x0, y0, x1, y1 = lab.box
                assert x0 >= 0 and y0 >= 0 and x1 <= w and y1 <= h
    assert layout_marker_labels([], size=(w, h), display_width=600) == []
    one = layout_marker_labels([(7, w / 2, h / 2)], size=(w, h), display_width=600)
    assert len(one) == 1 and one[0].ranks == (7,) and one[0].leader is None


@pytest.mark.slow
def test_overview_of_the_demo_slide(tmp_path: Path) -> None:
    """``wsi-screen demo``'s report: the slide under the heat map, no overlapping labels."""
    from wsi_screen.cli.main import main
    from wsi_screen.models.registry import list_bundles

    if {"nuclei-unet-v1", "cyto-synth-v1"} - set(list_bundles()):
        pytest.skip("shipped bundles missing")
    code: object = 0
    try:
        main(["demo", "-o", str(tmp_path), "--quiet"])
    except SystemExit as exc:
        code = exc.code
    assert code in (0, None)
    page = (tmp_path / "demo-slide" / "report.html").read_text(encoding="utf-8")
    summary = json.loads((tmp_path / "demo-slide" / "summary.json").read_text(encoding="utf-8"))
    _check_overview(page, len(summary["top_cells"]))


def test_unsatisfactory_slide_says_which_rule() -> None:
    cells = make_cells(["NILM"] * 300, seed=3)
    s = summarize(
        cells,
        class_names=CLASSES,
        abnormal_classes=ABNORMAL,
        settings=Settings(),
        cellular_area_mm2=2.0,
        tiles_total=4,
        tiles_unreadable=0,
        tiles_out_of_focus=0,
        timings={},
        versions={},
    )
    assert s["triage"] == "unsatisfactory"
    page = _build(s, cells)
    assert "Unsatisfactory for evaluation" in page
    assert "<code>inadequate</code>" in page and "adequacy.min_squamous_cells" in page
    assert "300 well-preserved squamous cells &lt; 5000" in page


def test_operating_point_panel(summary: dict[str, Any], cells: CellTable) -> None:
    page = _build(summary, cells)
    assert "Operating point" in page and "Uncalibrated" in page and "uncalibrated defaults" in page
    op = {
        "calibrated": True,
        "name": "lab-a-2025",
        "date": "2025-01-02",
        "source_batch": "/data/val",
        "review_score": 0.21,
        "priority_score": 0.6,
        "target": {"hsil_plus": 1.0, "ascus_plus": 0.98, "priority": 0.9, "confidence": 0.95},
        "sensitivity": {"hsil_plus": {"n": 59, "count": 59, "value": 1.0, "lower_bound": 0.9505}},
        "negatives_set_aside": {"n": 80, "count": 40, "value": 0.5, "lower_bound": 0.4},
        "auroc": 0.97,
        "applies": True,
    }
    page = _build({**summary, "operating_point": op}, cells)
    assert "lab-a-2025" in page and "Calibrated" in page
    assert "59/59 (≥ 95.0 % with 95 % confidence), target 100 %" in page
    assert "50.0 % (40/80)" in page
    moved = {**op, "applies": False, "note": "thresholds differ"}
    page = _build({**summary, "operating_point": moved}, cells)
    assert "Does not apply" in page and "thresholds differ" in page
