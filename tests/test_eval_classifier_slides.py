"""pipelines/eval_classifier_slides.py: per-class flagged fractions of truth objects, and the sweep
that chooses an export threshold on validation slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from cellfactory import ABNORMAL, CLASSES, make_cells
from pipeline_scripts import load_pipeline

from wsi_screen.store import CellStoreWriter


def test_score_cells_counts_flagged_objects_and_sweeps_thresholds(tmp_path: Path) -> None:
    ecs = load_pipeline("eval_classifier_slides")
    # Truth: a 100×100 label image with three cell footprints (HSIL, LSIL, NILM squamous).
    lab = np.zeros((100, 100), np.uint32)
    lab[10:30, 10:30], lab[40:60, 40:60], lab[70:90, 70:90] = 1, 2, 3
    kinds = ["", "HSIL", "LSIL", "NILM squamous"]
    np.savez(tmp_path / "t.npz", cells=lab, cell_kind=np.array(kinds), mpp=0.25)
    # Detections: two on the HSIL cell (one called HSIL, one NILM: the cell's best score counts), one
    # on the LSIL cell with its probability spread (LSIL 0.4: score 0.7), one on the NILM cell, one on
    # glass (called HSIL).
    xy = np.array([[20, 20], [25, 25], [50, 50], [80, 80], [5, 95]], np.float64)
    cells = make_cells(["HSIL", "NILM", "LSIL", "NILM", "HSIL"], xy=xy, p=[0.95, 0.95, 0.4, 0.9, 0.9])
    with CellStoreWriter(tmp_path / "c.zarr", class_names=CLASSES, abnormal_classes=ABNORMAL) as w:
        w.append(cells)
    score = cells.probs[:, [CLASSES.index(c) for c in ABNORMAL]].sum(axis=1)
    out = ecs.score_cells(
        tmp_path / "c.zarr",
        tmp_path / "t.npz",
        threshold=0.5,
        labels_key="cells",
        sweep=(0.5, float(score[2]) + 1e-6),
    )
    by = out["by_class"]
    assert by["HSIL"]["flagged"]["k"] == 1 and by["NILM squamous"]["flagged"]["k"] == 0
    assert by["LSIL"]["flagged"]["k"] == int(score[2] >= 0.5)
    assert by["all abnormal"]["objects"] == 2
    assert out["detections_on_nothing"] == 1 and out["detections_on_nothing_flagged"] == 1
    low, high = out["by_threshold"]["0.5000"], out["by_threshold"][f"{float(score[2]) + 1e-6:.4f}"]
    assert low["all abnormal"]["k"] == by["all abnormal"]["flagged"]["k"]  # the same rule at 0.5
    assert high["LSIL"]["k"] == 0 and high["HSIL"]["k"] == 1  # just above the LSIL cell's best score
    assert low["NILM squamous"]["rate"] == pytest.approx(0.0)
