"""report.html: escaping of hostile strings, self-containment, content."""

from __future__ import annotations

import base64
import io
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

from wsi_screen.cells import CellTable
from wsi_screen.config import Settings
from wsi_screen.report import build_report, heatmap_grid, write_report
from wsi_screen.summary import summarize

HOSTILE = "<script>alert('pwned')</script>\"><img src=x onerror=alert(1)>"
THUMB_MPP = 16.0


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.title = ""
        self._in_title = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        self._in_title = tag == "title"

    def handle_endtag(self, tag: str) -> None:
        self._in_title = False

    def handle_data(self, data: str) -> None:
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
    assert page.count('<figure class="card">') == 5
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
