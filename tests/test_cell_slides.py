"""Slides composed of labelled real cells (the classifier's training path) and the 9-class triage."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from cellfactory import make_cells

from wsi_screen.config import Settings
from wsi_screen.summary import summarize
from wsi_screen.train.cell_slides import (
    CellSlide,
    LabelledCell,
    compose_cell_slide,
    foreground_label,
    label_detections,
    paste_layers,
    write_image_slide,
)
from wsi_screen.train.data import load_class_map

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CLASSES9 = ["NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC", "AGC", "organism", "artifact"]
ABNORMAL9 = ["ASC-US", "LSIL", "ASC-H", "HSIL", "SCC", "AGC"]


def _crop(h: int, w: int, *, glass: int, seed: int, cut: bool = False) -> LabelledCell:
    """A crop of glass with a dark disc (a 'cell'), or, with ``cut``, a cell filling the whole box."""
    rng = np.random.default_rng(seed)
    rgb = np.full((h, w, 3), glass, np.float64) + rng.normal(0, 1.5, (h, w, 3))
    yy, xx = np.mgrid[0:h, 0:w]
    r = min(h, w) * (0.8 if cut else 0.3)
    disc = np.hypot(yy - h / 2, xx - w / 2) < r
    rgb[disc] = [120, 140, 170]
    rgb[np.hypot(yy - h / 2, xx - w / 2) < r / 3] = [60, 50, 110]
    img = np.clip(rgb, 0, 255).astype(np.uint8)
    return LabelledCell(f"c{seed}", "HSIL", "test", img, foreground_label(img), 0.25, nucleus_known=False)


def test_foreground_label_finds_the_cell_and_not_the_glass() -> None:
    c = _crop(80, 100, glass=238, seed=1)
    h, w = c.label.shape
    yy, xx = np.mgrid[0:h, 0:w]
    disc = np.hypot(yy - h / 2, xx - w / 2) < 0.3 * 80
    # The mask is the disc up to the morphology's pixel or two at its rim.
    assert (c.label[disc] == 1).mean() > 0.97
    assert (c.label[np.hypot(yy - h / 2, xx - w / 2) > 0.3 * 80 + 3] == 0).all()


def test_a_cell_cut_by_its_box_leaves_no_straight_edge() -> None:
    c = _crop(90, 70, glass=225, seed=2, cut=True)
    assert c.label[0].mean() > 0.5  # the cell touches the box
    contrib, alpha, _, _ = paste_layers(c.rgb, c.label, scale=1.0, rng=np.random.default_rng(0))
    # The outermost row and column of the box add nothing, so no rectangle reaches the slide.
    for edge in (alpha[0], alpha[-1], alpha[:, 0], alpha[:, -1]):
        assert float(edge.max()) == 0.0
    assert float(np.abs(contrib[0]).max()) == 0.0
    assert float(alpha[45, 35]) == 1.0  # the cell's centre is pasted whole


def test_blank_boxes_leave_the_slide_unchanged_whatever_their_size() -> None:
    """The ablation of the paste shortcut: boxes reduced to their own glass, of two very different sizes
    and glass tints, give the same pixels: no box shape, size or seam survives the paste."""
    small = [_crop(40 + i, 44, glass=236, seed=i) for i in range(20)]
    large = [_crop(180 + i, 170, glass=222, seed=100 + i) for i in range(20)]
    a = compose_cell_slide(small, size_px=1024, pitch_um=50, seed=3, blank=True)
    b = compose_cell_slide(large, size_px=1024, pitch_um=50, seed=3, blank=True)
    # float32 rounding of a constant through resize can move a value across a .5 boundary: ≤ 1 level.
    d = np.abs(a.rgb.astype(np.int16) - b.rgb.astype(np.int16))
    assert int(d.max()) <= 1
    assert float((d > 0).mean()) < 1e-4
    full = compose_cell_slide(large, size_px=1024, pitch_um=50, seed=3)
    assert float(np.abs(full.rgb.astype(np.int16) - b.rgb.astype(np.int16)).mean()) > 1.0  # content shows


def test_label_detections_order_of_truth() -> None:
    cells = np.zeros((100, 100), np.uint32)
    nuclei = np.zeros_like(cells)
    background = np.zeros_like(cells)
    cells[10:40, 10:40] = 1  # pasted cell 1 (ASC-H, nucleus unknown)
    cells[50:90, 50:90] = 2  # pasted cell 2 (LSIL), nucleus known
    nuclei[65:75, 65:75] = 2
    background[20:24, 20:24] = 1  # a background nucleus under cell 1's cytoplasm
    truth = CellSlide(
        rgb=np.zeros((0, 0, 3), np.uint8),
        cells=cells,
        nuclei=nuclei,
        background=background,
        klass=["ASC-H", "LSIL"],
        source=["lbc_cells", "herlev"],
        names=["asch/1.jpg", "light/2.jpeg"],
        mpp=0.25,
    )
    x = np.array([30.5, 21.0, 70.0, 55.0, 5.0, 200.0])
    y = np.array([30.5, 21.0, 70.0, 55.0, 5.0, 5.0])
    klass, source, index = label_detections(x, y, truth)
    assert klass == ["ASC-H", "NILM", "LSIL", "LSIL", "", ""]
    assert source == ["lbc_cells", "lbc_nuclei", "herlev", "herlev", "", ""]
    assert index.tolist() == [0, -1, 1, 1, -1, -1]


def test_cell_slide_truth_round_trip_and_tiff(tmp_path: Path) -> None:
    from wsi_screen.slide import open_slide

    cells = [_crop(60, 60, glass=235, seed=i) for i in range(9)]
    cs = compose_cell_slide(cells, size_px=1024, pitch_um=80, seed=0)
    assert len(cs.klass) == 9 and int(cs.cells.max()) == 9
    back = CellSlide.load_truth(cs.save_truth(tmp_path / "t.npz"))
    assert back.klass == cs.klass and np.array_equal(back.cells, cs.cells)
    path = write_image_slide(tmp_path / "s.tiff", cs.rgb, 0.25)
    with open_slide(path) as slide:
        assert slide.dimensions == (1024, 1024)
        assert slide.mpp == pytest.approx(0.25, rel=1e-6)


def test_lbc_cells_class_map_keeps_the_classes_apart() -> None:
    m = load_class_map("lbc-cells-bethesda")
    assert m["ascus"] == "ASC-US" and m["asch"] == "ASC-H"
    assert m["scc"] == "SCC" and m["agc"] == "AGC"
    assert {m[k] for k in ("trichomonas", "candida", "flora", "herps", "actinomyces")} == {"organism"}
    if (DATA / "lbc-cells").is_dir():
        folders = {p.name for p in (DATA / "lbc-cells").iterdir() if p.is_dir()}
        assert folders <= set(m), folders - set(m)


def _table9(labels: list[str], p: float = 0.95, names: list[str] = CLASSES9) -> object:
    t = make_cells(["NILM"] * len(labels))
    probs = np.full((len(labels), len(names)), (1 - p) / (len(names) - 1), np.float32)
    for i, lab in enumerate(labels):
        probs[i, names.index(lab)] = p
    return dataclasses.replace(t, probs=probs)


def _summ9(labels: list[str], names: list[str] = CLASSES9) -> dict[str, object]:
    return summarize(
        _table9(labels, names=names),  # type: ignore[arg-type]
        class_names=names,
        abnormal_classes=ABNORMAL9,
        settings=Settings(),
        cellular_area_mm2=20.0,
        tiles_total=100,
        tiles_unreadable=0,
        tiles_out_of_focus=0,
        timings={},
        versions={},
    )


@pytest.mark.parametrize(
    ("abnormal", "triage", "category"),
    [
        (["SCC"] * 2, "priority", "SCC"),
        (["ASC-H"] * 2, "priority", "ASC-H"),
        (["AGC"] * 2, "priority", "AGC"),
        (["ASC-US"] * 5, "review", "ASC-US"),
        (["LSIL"] * 3, "review", "LSIL"),
    ],
)
def test_nine_class_triage_groups(abnormal: list[str], triage: str, category: str) -> None:
    s = _summ9(["NILM"] * 5200 + abnormal)
    assert s["triage"] == triage
    assert s["suggested_category"] == category


def test_organisms_are_negative_and_reported() -> None:
    s = _summ9(["NILM"] * 5200 + ["organism"] * 30)
    assert s["triage"] == "negative"
    org = s["findings"]["organisms"]  # type: ignore[index]
    assert org["present"] is True and org["confident_cells"] == 30
    assert s["qc"]["flags"] == []  # type: ignore[index]  # organisms are no artifact
    assert s["adequacy"]["squamous_cells"] == 5200  # type: ignore[index]
    none = _summ9(["NILM"] * 5200 + ["organism"] * 2)
    assert none["findings"]["organisms"]["present"] is False  # type: ignore[index]


def _summ10(labels: list[str]) -> dict[str, object]:
    """_summ9 with a 10th class, ``endocervical`` (before ``artifact``)."""
    names = [*CLASSES9[:-1], "endocervical", CLASSES9[-1]]
    return _summ9(labels, names=names)


def test_endocervical_cells_are_negative_not_squamous_and_reported() -> None:
    s = _summ10(["NILM"] * 5200 + ["endocervical"] * 12 + ["artifact"] * 3)
    assert s["triage"] == "negative"
    ec = s["findings"]["endocervical"]  # type: ignore[index]
    assert ec["available"] is True and ec["present"] is True and ec["confident_cells"] == 12
    assert s["adequacy"]["squamous_cells"] == 5200  # type: ignore[index]
    # the artifact fraction counts the 3 artifacts only, not the endocervical cells
    frac = s["qc"]["checks"]["high_artifact_fraction"]["value"]  # type: ignore[index]
    assert frac == pytest.approx(3 / 5215, abs=1e-4)
    few = _summ10(["NILM"] * 5200 + ["endocervical"] * 9)
    assert few["findings"]["endocervical"]["present"] is False  # type: ignore[index]
    # a model without the class: the finding says it is not available
    nine = _summ9(["NILM"] * 5200)
    assert nine["findings"]["endocervical"]["available"] is False  # type: ignore[index]


def test_the_endocervical_class_map_keeps_columnar_cells_apart() -> None:
    plain, ec = load_class_map("herlev-bethesda"), load_class_map("herlev-bethesda-endocervical")
    assert ec["normal_columnar"] == "endocervical" and plain["normal_columnar"] == "NILM"
    assert {k: v for k, v in ec.items() if k != "normal_columnar"} == {
        k: v for k, v in plain.items() if k != "normal_columnar"
    }


def test_the_export_threshold_comes_from_the_classifier_bundle() -> None:
    from wsi_screen.models.bundle import load_bundle
    from wsi_screen.pipeline import FALLBACK_FLAG_SCORE, resolve_flag_threshold

    s = Settings()
    assert s.output.flag_min_score is None
    assert s.classification.models == ["cyto-real-v1"]
    want = load_bundle("cyto-real-v1").config.thresholds["flag_score"]
    assert 0.0 < want < 1.0
    assert resolve_flag_threshold(s).output.flag_min_score == pytest.approx(want)
    explicit = s.with_overrides({"output.flag_min_score": 0.8})
    assert resolve_flag_threshold(explicit).output.flag_min_score == 0.8
    synth = s.with_overrides({"classification.models": ["cyto-synth-v1"]})
    assert "flag_score" not in load_bundle("cyto-synth-v1").config.thresholds
    assert resolve_flag_threshold(synth).output.flag_min_score == FALLBACK_FLAG_SCORE
