"""End to end through ``wsi-screen run``: a real Aperio slide and synthetic slides with and without HSIL.

These run the shipped bundles on the CPU (a few seconds per slide) and check the output contract of
``docs/outputs.md`` on real files, not on constructed tables.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely.geometry
import zarr

from wsi_screen.cli.main import main
from wsi_screen.models.registry import list_bundles
from wsi_screen.synth import synthesize_slide

pytestmark = pytest.mark.slow

TRIAGE = {"negative", "review", "priority", "unsatisfactory"}


def _need_bundles() -> None:
    missing = {"nuclei-unet-v1", "cyto-synth-v1"} - set(list_bundles())
    if missing:
        pytest.skip(f"shipped bundles missing: {sorted(missing)}")


def _run(slide: Path, out: Path, *extra: str) -> dict[str, Any]:
    code: object = 0
    try:
        main(["run", str(slide), "-o", str(out), "--quiet", *extra])
    except SystemExit as exc:
        code = exc.code
    assert code in (0, None), f"wsi-screen run exited with {code}"
    folder = out / slide.stem
    for name in ("cells.zarr", "summary.json", "flagged.geojson", "report.html", "run.json"):
        assert (folder / name).exists(), name
    summary: dict[str, Any] = json.loads((folder / "summary.json").read_text())
    return summary


def test_run_on_real_aperio_slide(shared_slides: Path, tmp_path: Path) -> None:
    _need_bundles()
    slide = shared_slides / "cmu-1-small-region.svs"
    summary = _run(slide, tmp_path)
    folder = tmp_path / slide.stem
    assert summary["triage"] in TRIAGE
    n_cells = sum(summary["class_counts"]["predicted"].values())
    assert n_cells > 100  # a 2220×2967 px H&E region at 0.5 µm/px is full of nuclei

    group = zarr.open_group(str(folder / "cells.zarr"), mode="r")
    x, y = np.asarray(group["cells/x"]), np.asarray(group["cells/y"])
    assert len(x) == n_cells
    # Level-0 pixel coordinates of the 2220×2967 slide, not model pixels.
    assert x.min() >= 0 and x.max() < 2220 and y.min() >= 0 and y.max() < 2967
    attrs = dict(group.attrs)
    assert attrs["mpp"] == pytest.approx(0.25)  # the models' resolution
    assert attrs["slide"]["mpp"] == pytest.approx(0.499, abs=0.01)  # the slide's level 0
    assert attrs["complete"] is True
    probs = np.asarray(group["cells/probs"])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-3)

    features = json.loads((folder / "flagged.geojson").read_text())["features"]
    bounds = shapely.geometry.box(0, 0, 2220, 2967)
    for f in features:
        geom = shapely.geometry.shape(f["geometry"])
        assert geom.is_valid and bounds.contains(geom)

    run = json.loads((folder / "run.json").read_text())
    assert run["slide"]["mpp"] == pytest.approx(0.499, abs=0.01) and run["slide"]["vendor"] == "aperio"
    assert summary["n_cells"] == n_cells


def test_hsil_slide_ranks_above_a_negative_one(tmp_path: Path) -> None:
    _need_bundles()
    scores = {}
    for name, abnormal in (("negative", None), ("hsil", "HSIL=12")):
        slide = tmp_path / f"{name}.tiff"
        synthesize_slide(slide, size=(3072, 3072), seed=21, abnormal=abnormal, write_truth=False)
        summary = _run(slide, tmp_path / "out")
        scores[name] = summary
    assert scores["hsil"]["score"] > scores["negative"]["score"]
    assert scores["hsil"]["triage"] == "priority"
    assert scores["hsil"]["suggested_category"] == "HSIL"
    assert scores["hsil"]["class_counts"]["predicted"]["HSIL"] >= 6
