"""QuPath GeoJSON/CSV export: validity, conventions, determinism."""

from __future__ import annotations

import csv
import gzip
import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import shapely
from cellfactory import ABNORMAL, CLASSES, SLIDE_MPP, SLIDE_SIZE, ellipse, make_cells, probs_for
from shapely.geometry import shape

from wsi_screen.cells import MORPHOMETRICS, CellTable
from wsi_screen.errors import WsiScreenError
from wsi_screen.geojson import (
    CLASS_COLORS,
    ExportError,
    cell_id,
    cells_to_features,
    class_color,
    select_cells,
    write_csv,
    write_geojson,
)

W, H = SLIDE_SIZE
FP = "0123456789abcdef" * 2


def _strict_loads(text: str) -> Any:
    def bad(token: str) -> None:
        raise ValueError(f"non-standard JSON constant {token}")

    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def awkward() -> CellTable:
    """Regular cells plus a bow-tie outline, a degenerate one, an empty one and one over the edge."""
    regular = make_cells(["HSIL", "LSIL", "NILM", "ASC-US", "artifact", "HSIL"], seed=4)
    outlines = [
        np.array([[100, 100], [140, 140], [140, 100], [100, 140]], np.float32),  # self-intersecting
        np.array([[500, 500], [520, 520], [540, 540]], np.float32),  # collinear: no area
        np.zeros((0, 2), np.float32),  # no outline at all
        ellipse(5, 300, 30, 20, 0.3),  # crosses x = 0
        ellipse(W - 4, H - 4, 25, 25, 0.0),  # crosses the bottom-right corner
    ]
    xy = [(120, 120), (520, 520), (900, 900), (5, 300), (W - 4, H - 4)]
    morph = {k: np.full(5, 1.0) for k in MORPHOMETRICS}
    morph["nucleus_area_um2"] = np.array([40.0, 30.0, 50.0, np.nan, 60.0])
    morph["nc_ratio"] = np.array([0.2, np.nan, 0.3, 0.4, 0.5])
    odd = CellTable.from_rows(
        x=[p[0] for p in xy],
        y=[p[1] for p in xy],
        outlines=outlines,
        morphometrics=morph,
        detection_score=[0.9, 0.9, np.nan, 0.9, 0.9],
        probs=probs_for(["HSIL", "LSIL", "HSIL", "ASC-US", "HSIL"]),
    )
    return CellTable.concat([regular, odd])


def features(cells: CellTable, **kw: Any) -> list[dict[str, Any]]:
    args: dict[str, Any] = {
        "class_names": CLASSES,
        "abnormal_classes": ABNORMAL,
        "slide_id": FP,
        "bounds": SLIDE_SIZE,
        "slide_mpp": SLIDE_MPP,
    }
    args.update(kw)
    return list(cells_to_features(cells, **args))


def _check_polygon(geom: dict[str, Any]) -> Any:
    assert geom["type"] == "Polygon"
    for ring in geom["coordinates"]:
        assert len(ring) >= 4 and ring[0] == ring[-1]  # closed ring, as JTS requires
        for x, y in ring:
            assert round(x, 2) == x and round(y, 2) == y
    poly = shape(geom)
    assert poly.is_valid, shapely.is_valid_reason(poly)
    assert poly.area > 0
    assert shapely.box(0, 0, W, H).covers(poly)
    return poly


def test_every_geometry_is_valid_and_inside_the_slide(awkward: CellTable) -> None:
    feats = features(awkward)
    assert len(feats) == len(awkward)  # nothing silently lost
    for f in feats:
        assert list(f) == ["type", "id", "geometry", "properties"]  # QuPath's own key order
        assert f["type"] == "Feature"
        _check_polygon(f["geometry"])
        assert "nucleusGeometry" not in f
        assert f["properties"]["objectType"] == "detection"
    by_index = {f["properties"]["measurements"]["cell_index"]: f for f in feats}
    # The bow-tie was repaired into one valid polygon near the original.
    bowtie = shape(by_index[6]["geometry"])
    assert shapely.box(99, 99, 141, 141).covers(bowtie)
    # Degenerate and missing outlines become circles around the cell centre.
    for i, (x, y) in ((7, (520, 520)), (8, (900, 900))):
        poly = shape(by_index[i]["geometry"])
        assert poly.contains(shapely.Point(x, y))
    # The nucleus area gives the circle's size (50 µm² ≈ 3.99 µm radius ≈ 16 px at 0.25 µm/px).
    assert shape(by_index[8]["geometry"]).area * SLIDE_MPP**2 == pytest.approx(50.0, rel=0.05)
    # Clipped at the slide edge.
    assert shape(by_index[9]["geometry"]).bounds[0] == 0.0
    assert shape(by_index[10]["geometry"]).bounds[2] == W


def test_classification_and_measurements(awkward: CellTable) -> None:
    for f in features(awkward):
        props = f["properties"]
        cls = props["classification"]
        assert set(cls) == {"name", "color"}  # QuPath needs both to use the colour
        assert cls["name"] in CLASSES
        assert tuple(cls["color"]) == CLASS_COLORS[cls["name"]]
        m = props["measurements"]
        assert all(isinstance(v, (int, float)) and np.isfinite(v) for v in m.values())
        assert {f"prob_{c}" for c in CLASSES} | {"score", "cell_index"} <= set(m)
        probs = [m[f"prob_{c}"] for c in CLASSES]
        assert cls["name"] == CLASSES[int(np.argmax(probs))]
        assert m["score"] == pytest.approx(sum(m[f"prob_{c}"] for c in ABNORMAL), abs=1e-5)
    m = {
        f["properties"]["measurements"]["cell_index"]: f["properties"]["measurements"]
        for f in features(awkward)
    }
    assert "nc_ratio" not in m[7] and "nucleus_area_um2" not in m[9]  # NaN left out
    assert "detection_score" not in m[8]
    assert m[0]["nucleus_area_um2"] > 0


def test_ids_are_deterministic_unique_uuids(awkward: CellTable) -> None:
    a, b = features(awkward), features(awkward)
    ids = [f["id"] for f in a]
    assert ids == [f["id"] for f in b]
    assert len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text)
        assert u.version == 5 and str(u) == text
    other = [f["id"] for f in features(awkward, slide_id="another-slide")]
    assert not set(ids) & set(other)
    # The id is the cell's, not its position in the export.
    sub = features(awkward, index=[3, 0])
    assert [f["id"] for f in sub] == [cell_id(FP, 3), cell_id(FP, 0)] == [ids[3], ids[0]]


def test_cell_object_type_has_nucleus_geometry(awkward: CellTable) -> None:
    for f in features(awkward, object_type="cell"):
        assert list(f) == ["type", "id", "geometry", "nucleusGeometry", "properties"]
        assert f["properties"]["objectType"] == "cell"
        cell = _check_polygon(f["geometry"])
        nucleus = _check_polygon(f["nucleusGeometry"])
        assert cell.buffer(0.02).covers(nucleus)
    first = features(awkward, object_type="cell", index=[0])[0]
    area_px = awkward.morphometrics["cell_area_um2"][0] / SLIDE_MPP**2
    assert shape(first["geometry"]).area == pytest.approx(area_px, rel=0.05)
    with pytest.raises(ExportError):
        features(awkward, object_type="annotation")


def test_select_cells() -> None:
    labels = ["NILM"] * 5 + ["HSIL", "LSIL", "ASC-US", "HSIL", "artifact"]
    p = [0.99, 0.9, 0.8, 0.7, 0.6, 0.9, 0.8, 0.7, 0.95, 0.9]
    cells = make_cells(labels, p=p)
    kw: dict[str, Any] = {"class_names": CLASSES, "abnormal_classes": ABNORMAL}
    idx = select_cells(cells, min_score=0.5, **kw)
    np.testing.assert_array_equal(idx, [8, 5, 6, 7])  # highest score first
    np.testing.assert_array_equal(select_cells(cells, min_score=0.5, classes=["HSIL"], **kw), [8, 5])
    np.testing.assert_array_equal(select_cells(cells, min_score=0.5, max_cells=2, **kw), [8, 5])
    assert len(select_cells(cells, min_score=0.0, **kw)) == 10
    assert len(select_cells(cells, min_score=0.0, max_cells=0, **kw)) == 0
    with pytest.raises(ExportError, match="unknown class 'CIN3'") as err:
        select_cells(cells, min_score=0.5, classes=["CIN3"], **kw)
    assert isinstance(err.value, WsiScreenError)
    with pytest.raises(ExportError, match="min score"):
        select_cells(cells, min_score=1.5, **kw)


def test_write_geojson_plain_and_gz(tmp_path: Path, awkward: CellTable) -> None:
    kw: dict[str, Any] = {
        "class_names": CLASSES,
        "abnormal_classes": ABNORMAL,
        "slide_id": FP,
        "bounds": SLIDE_SIZE,
        "slide_mpp": SLIDE_MPP,
    }
    idx = select_cells(awkward, class_names=CLASSES, abnormal_classes=ABNORMAL, min_score=0.5)
    path, n = write_geojson(
        tmp_path / "flagged.geojson", awkward, index=idx, metadata={"min_score": 0.5}, **kw
    )
    assert path.name == "flagged.geojson" and n == len(idx) > 0
    doc = _strict_loads(path.read_text(encoding="utf-8"))
    assert doc["type"] == "FeatureCollection" and len(doc["features"]) == n
    assert doc["wsi_screen"]["min_score"] == 0.5
    assert [f["properties"]["measurements"]["cell_index"] for f in doc["features"]] == idx.tolist()

    gz_path, n_gz = write_geojson(tmp_path / "flagged.geojson", awkward, index=idx, gzip=True, **kw)
    assert gz_path.name == "flagged.geojson.gz" and n_gz == n
    with gzip.open(gz_path, "rt", encoding="utf-8") as fh:
        assert _strict_loads(fh.read())["features"] == doc["features"]
    again, _ = write_geojson(tmp_path / "again.geojson.gz", awkward, index=idx, **kw)  # gz from the suffix
    assert again.read_bytes() == gz_path.read_bytes()  # byte-identical: no timestamp inside
    assert not list(tmp_path.glob(".*.tmp"))

    empty, n0 = write_geojson(tmp_path / "none.geojson", awkward, index=[], **kw)
    assert n0 == 0 and _strict_loads(empty.read_text())["features"] == []


def test_write_csv(tmp_path: Path, awkward: CellTable) -> None:
    path, n = write_csv(
        tmp_path / "cells.csv", awkward, class_names=CLASSES, abnormal_classes=ABNORMAL, slide_id=FP
    )
    assert n == len(awkward)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n
    assert list(rows[0])[:6] == ["cell_index", "id", "x", "y", "class", "score"]
    assert rows[7]["nc_ratio"] == "" and rows[8]["detection_score"] == ""
    assert rows[3]["id"] == cell_id(FP, 3)
    assert float(rows[0]["x"]) == pytest.approx(awkward.x[0], abs=0.01)
    assert rows[0]["class"] == "HSIL"
    gz, _ = write_csv(
        tmp_path / "c.csv",
        awkward,
        class_names=CLASSES,
        abnormal_classes=ABNORMAL,
        slide_id=FP,
        index=[1],
        gzip=True,
    )
    with gzip.open(gz, "rt") as fh:
        assert len(list(csv.reader(fh))) == 2


def test_class_colours_are_fixed() -> None:
    assert class_color("HSIL") == CLASS_COLORS["HSIL"]
    assert class_color("CIN3") == class_color("CIN3")
    assert all(0 <= c <= 255 for c in class_color("something else"))
    assert len({CLASS_COLORS[c] for c in CLASSES}) == len(CLASSES)


def test_rounding_to_the_grid_never_breaks_validity() -> None:
    # Tiny jagged stars (radius ≈ 0.03 px): rounding their vertices to 0.01 px collapses or
    # self-intersects many of them; every exported geometry must still be a valid polygon.
    rng = np.random.default_rng(5)
    n, k = 300, 9
    t = np.linspace(0, 2 * np.pi, k, endpoint=False)
    outlines = []
    for _ in range(n):
        r = rng.uniform(0.005, 0.05, k)
        c = rng.uniform(50, 150, 2)
        outlines.append(np.stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)], axis=1))
    cells = CellTable.from_rows(
        x=[o[:, 0].mean() for o in outlines],
        y=[o[:, 1].mean() for o in outlines],
        outlines=outlines,
        probs=probs_for(["HSIL"] * n),
    )
    feats = features(cells)
    assert len(feats) == n
    for f in feats:
        _check_polygon(f["geometry"])
