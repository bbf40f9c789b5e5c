"""``wsi-screen export``: re-export from cells.zarr through the real command line."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cellfactory import ABNORMAL, CLASSES, SLIDE_MPP, SLIDE_SIZE, make_cells

from wsi_screen.cells import CellTable, abnormality_score
from wsi_screen.cli.main import main
from wsi_screen.config import Settings
from wsi_screen.store import CellStoreWriter

FP = "feedface" * 4


def _run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def _store(folder: Path, cells: CellTable, *, settings: Settings | None = None, close: bool = True) -> Path:
    path = folder / "cells.zarr"
    folder.mkdir(parents=True, exist_ok=True)
    w = CellStoreWriter(
        path,
        class_names=CLASSES,
        abnormal_classes=ABNORMAL,
        attrs={
            "slide": {
                "path": "/scans/s1.svs",
                "fingerprint": FP,
                "dimensions": list(SLIDE_SIZE),
                "mpp": SLIDE_MPP,
            },
            "mpp": 0.25,
            "config": (settings or Settings()).to_dict(),
        },
        chunk_cells=1024,
    )
    w.append(cells)
    if close:
        w.close()
    return path


@pytest.fixture(scope="module")
def cells() -> CellTable:
    labels = ["NILM"] * 300 + ["HSIL"] * 12 + ["LSIL"] * 8 + ["ASC-US"] * 10 + ["artifact"] * 20
    p = np.random.default_rng(3).uniform(0.4, 0.99, len(labels))
    return make_cells(labels, p=p, seed=9)


@pytest.fixture
def result(tmp_path: Path, cells: CellTable) -> Path:
    folder = tmp_path / "OUT" / "s1"
    _store(folder, cells)
    return folder


def _features(path: Path) -> list[dict[str, Any]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as fh:  # type: ignore[operator]
        doc = json.load(fh)
    assert doc["type"] == "FeatureCollection"
    return list(doc["features"])


def test_default_export_uses_the_runs_thresholds(
    result: Path, cells: CellTable, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(["export", str(result)], capsys)
    assert code == 0, err
    target = result / "export.geojson"
    feats = _features(target)
    score = abnormality_score(cells.probs, CLASSES, ABNORMAL)
    assert len(feats) == int((score >= 0.5).sum()) > 0
    assert f"exported {len(feats):,} of {len(cells):,} cells to {target}" in out
    scores = [f["properties"]["measurements"]["score"] for f in feats]
    assert scores == sorted(scores, reverse=True)
    assert all(f["properties"]["objectType"] == "detection" for f in feats)
    # Deterministic: a second export is byte-identical.
    first = target.read_bytes()
    assert _run(["export", str(result)], capsys)[0] == 0
    assert target.read_bytes() == first


def test_thresholds_classes_and_cap(
    result: Path, cells: CellTable, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_file = tmp_path / "hsil.geojson"
    args = [
        "export",
        str(result),
        "--min-score",
        "0.8",
        "--classes",
        "HSIL, LSIL",
        "--max-cells",
        "5",
        "-o",
        str(out_file),
    ]
    code, _, err = _run(args, capsys)
    assert code == 0, err
    feats = _features(out_file)
    score = abnormality_score(cells.probs, CLASSES, ABNORMAL)
    labels = np.argmax(cells.probs, axis=1)
    eligible = np.flatnonzero(
        (score >= 0.8) & np.isin(labels, [CLASSES.index("HSIL"), CLASSES.index("LSIL")])
    )
    assert len(feats) == min(5, len(eligible)) > 0
    assert {f["properties"]["classification"]["name"] for f in feats} <= {"HSIL", "LSIL"}
    assert all(f["properties"]["measurements"]["score"] >= 0.8 for f in feats)
    top = eligible[np.argsort(-score[eligible], kind="stable")][:5]
    assert sorted(f["properties"]["measurements"]["cell_index"] for f in feats) == sorted(top.tolist())

    code, _, _ = _run(
        ["export", str(result), "--min-score", "0", "--max-cells", "0", "-o", str(out_file)], capsys
    )
    assert code == 0 and len(_features(out_file)) == len(cells)  # 0 = no cap


def test_csv_export(result: Path, cells: CellTable, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = _run(["export", str(result), "--format", "csv", "--min-score", "0"], capsys)
    assert code == 0, err
    with (result / "export.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == min(len(cells), Settings().output.flag_max_cells)
    assert {"cell_index", "id", "x", "y", "class", "score", "prob_HSIL", "nucleus_area_um2"} <= set(rows[0])


def test_gzip_and_cell_objects(result: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = _run(["export", str(result), "--gzip", "--object-type", "cell"], capsys)
    assert code == 0, err
    path = result / "export.geojson.gz"
    feats = _features(path)
    assert feats and all("nucleusGeometry" in f and f["properties"]["objectType"] == "cell" for f in feats)


def test_store_path_itself_and_run_config(
    tmp_path: Path, cells: CellTable, capsys: pytest.CaptureFixture[str]
) -> None:
    strict = Settings().with_overrides({"output.flag_min_score": 0.95, "output.object_type": "cell"})
    store = _store(tmp_path / "r", cells, settings=strict)
    code, _, err = _run(["export", str(store), "-o", str(tmp_path / "x.geojson")], capsys)
    assert code == 0, err
    feats = _features(tmp_path / "x.geojson")
    assert all(f["properties"]["measurements"]["score"] >= 0.95 for f in feats)
    assert all(f["properties"]["objectType"] == "cell" for f in feats)


def test_one_line_errors(
    tmp_path: Path, result: Path, cells: CellTable, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(["export", str(tmp_path / "nowhere")], capsys)
    assert code == 1 and err.count("\n") == 1 and "does not exist" in err

    (tmp_path / "empty").mkdir()
    code, _, err = _run(["export", str(tmp_path / "empty")], capsys)
    assert code == 1 and err.count("\n") == 1 and "no cells.zarr" in err

    _store(tmp_path / "crashed", cells, close=False)
    code, _, err = _run(["export", str(tmp_path / "crashed")], capsys)
    assert code == 1 and err.count("\n") == 1 and "incomplete" in err

    code, _, err = _run(["export", str(result), "--classes", "HSIL,CIN3"], capsys)
    assert code == 1 and err.count("\n") == 1
    assert "unknown class 'CIN3'" in err and "HSIL" in err

    code, _, err = _run(["export", str(result), "--min-score", "2"], capsys)
    assert code == 2  # click's usage error


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(["export", "--help"], capsys)
    assert code == 0 and "--min-score" in out and "--object-type" in out
