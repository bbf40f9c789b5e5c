"""Slide cohorts (pipelines/build_cohorts.py) and candidate slide scores (pipelines/compare_slide_scores.py,
wsi_screen.evaluation.candidate_slide_scores)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
from cellfactory import ABNORMAL, CLASSES, make_cells
from pipeline_scripts import load_pipeline

from wsi_screen.config import load_settings, parse_override
from wsi_screen.evaluation import (
    candidate_slide_scores,
    read_labels_csv,
    score_tail,
    set_aside_at_full_sensitivity,
)
from wsi_screen.metrics import binary_auroc


# -- cohort design ---------------------------------------------------------------------------------------
def test_abnormal_range_follows_the_design() -> None:
    bc = load_pipeline("build_cohorts")
    assert bc.abnormal_range(2000) == (3, 30, True)  # 0.1 % = 2 < 3; 2 % = 40 > 30
    assert bc.abnormal_range(500) == (3, 10, True)
    assert bc.abnormal_range(20_000) == (20, 30, True)
    assert bc.abnormal_range(60) == (3, 3, False)  # a smoke-run slide cannot meet 0.1–2 %


def test_plan_cohort_counts_and_diagnoses() -> None:
    bc = load_pipeline("build_cohorts")
    plans = bc.plan_cohort(30, 30, 2000, bc.SYNTHETIC_DIAGNOSES, seed=3)
    neg = [p for p in plans if p.diagnosis == "NILM"]
    abn = [p for p in plans if p.diagnosis != "NILM"]
    assert len(neg) == 30 and all(p.n_abnormal == 0 for p in neg)
    assert len(abn) == 30 and all(3 <= p.n_abnormal <= 30 for p in abn)
    assert {p.diagnosis for p in abn} == {"ASC-US", "LSIL", "HSIL"}
    assert sum(p.diagnosis == "HSIL" for p in abn) == 10
    assert len({p.seed for p in plans}) == len(plans)
    assert plans == bc.plan_cohort(30, 30, 2000, bc.SYNTHETIC_DIAGNOSES, seed=3)  # reproducible


def test_draw_nilm_keeps_the_columnar_share() -> None:
    bc = load_pipeline("build_cohorts")

    class Cell:
        def __init__(self, name: str) -> None:
            self.name = name

    pool = [Cell(f"normal_columnar/{i}.bmp") for i in range(17)]
    pool += [Cell(f"normal_intermediate/{i}.bmp") for i in range(11)]
    pool += [Cell(f"normal_superficiel/{i}.bmp") for i in range(9)]
    rng = np.random.default_rng(0)
    cells, n_col = bc.draw_nilm(rng, pool, 2000, 0.02)
    assert len(cells) == 2000 and n_col == 40
    assert sum(c.name.startswith("normal_columnar/") for c in cells) == 40
    # every squamous crop is used before any is repeated: 1960 draws over 20 crops, 98 each
    names = [c.name for c in cells if not c.name.startswith("normal_columnar/")]
    assert sorted(set(names.count(n) for n in names)) == [98]
    # in pool proportions (the old design) the columnar cells are 17 of 37
    cells, n_col = bc.draw_nilm(rng, pool, 3700, None)
    assert n_col == 1700 == sum(c.name.startswith("normal_columnar/") for c in cells)
    _, n_col = bc.draw_nilm(rng, [c for c in pool if "columnar" not in c.name], 100, 0.5)
    assert n_col == 0  # no columnar cell in the pool: all squamous
    with pytest.raises(SystemExit, match="no squamous"):
        bc.draw_nilm(rng, pool[:17], 10, 0.02)


def test_columnar_share_option() -> None:
    bc = load_pipeline("build_cohorts")
    assert bc._share("pool") is None and bc._share("0.05") == 0.05
    with pytest.raises(Exception, match="share in"):
        bc._share("1.5")


def test_tiny_real_cohort_builds(shared_data: Path, tmp_path: Path) -> None:
    """Real cells of the validation part: one NILM and one abnormal slide, 2 % endocervical NILM."""
    bc = load_pipeline("build_cohorts")
    out = tmp_path / "real"
    design = ["--kind", "real", "--part", "val", "--negatives", "1", "--abnormals", "1", "--cells", "100"]
    bc.main([*design, "--data", str(shared_data), "-o", str(out)])
    cohort = json.loads((out / "cohort.json").read_text())
    assert cohort["columnar_share"] == 0.02 and cohort["nilm_columnar_pool"] > 0
    neg, abn = sorted(cohort["slides"], key=lambda r: r["diagnosis"] != "NILM")
    assert neg["diagnosis"] == "NILM" and neg["n_abnormal"] == 0
    assert abn["diagnosis"] != "NILM" and abn["n_abnormal"] >= 3
    for r in (neg, abn):
        assert r["objects"]["NILM_columnar"] == round(0.02 * r["objects"]["NILM"])
        truth = np.load(out / "truth" / f"{Path(r['slide']).stem}.truth.npz")
        names = [str(n) for n in truth["names"]]
        assert len(names) == r["n_cells"] + r["objects"].get("organism", 0)
        assert sum(n.startswith("normal_columnar/") for n in names) == r["objects"]["NILM_columnar"]
    assert (out / "slides" / neg["slide"]).is_file() and (out / "diagnoses.csv").is_file()


def test_tiny_synthetic_cohort_builds(tmp_path: Path) -> None:
    bc = load_pipeline("build_cohorts")
    out = tmp_path / "cohort"
    assert (
        bc.main(
            [
                *("--kind", "synthetic", "--profile", "pink", "--negatives", "2", "--abnormals", "2"),
                *("--cells", "20", "--seed", "1", "-o", str(out)),
            ]
        )
        == 0
    )
    slides = sorted(p.name for p in (out / "slides").iterdir())
    assert slides == ["abn-000.tiff", "abn-001.tiff", "neg-000.tiff", "neg-001.tiff"]
    assert sorted(p.name for p in (out / "truth").iterdir()) == [
        s.replace(".tiff", ".truth.json") for s in slides
    ]
    cohort = json.loads((out / "cohort.json").read_text())
    assert cohort["kind"] == "synthetic" and cohort["profile"] == "pink" and cohort["preparation"] == "lbc"
    assert cohort["n_negative"] == 2 and cohort["n_abnormal"] == 2 and cohort["seed"] == 1
    assert 1024 <= cohort["slides"][0]["size_px"][0] <= 2048
    # the diagnoses CSV is what `wsi-screen calibrate --diagnoses` reads
    rows = read_labels_csv(out / "diagnoses.csv", label_columns=("diagnosis", "label"))
    by_slide = {slide: label for _, slide, label in rows}
    assert set(by_slide) == set(slides)
    records = {r["slide"]: r for r in cohort["slides"]}
    for name, label in by_slide.items():
        r = records[name]
        assert label == r["diagnosis"]
        assert (label == "NILM") == (r["n_abnormal"] == 0)
        if label != "NILM":
            assert r["abnormal"] == {label: r["n_abnormal"]}
            assert r["prevalence"] == pytest.approx(r["n_abnormal"] / r["n_cells"])
    # the explicit adequacy override matches the design and is a real setting
    override = cohort["adequacy_override"]
    assert list(override) == ["adequacy.min_squamous_cells"]
    fewest = min(r["n_cells"] for r in cohort["slides"])
    assert override["adequacy.min_squamous_cells"] == fewest // 2
    key, value = parse_override(f"adequacy.min_squamous_cells={override['adequacy.min_squamous_cells']}")
    assert load_settings(overrides={key: value}).adequacy.min_squamous_cells == value
    cmd = shlex.split(cohort["batch_command"])
    assert cmd[:5] == ["wsi-screen", "batch", str(out / "slides"), "-o", str(out / "batch")]
    assert cmd[5:] == ["--set", f"adequacy.min_squamous_cells={value}"]
    assert cohort["design_within_bounds"] is False  # 20 cells: a smoke run, and it says so


def test_conventional_cohort_uses_the_conventional_preset(tmp_path: Path) -> None:
    bc = load_pipeline("build_cohorts")
    c = bc.build_synthetic(
        tmp_path,
        profile="scanner_b",
        preparation="conventional",
        n_negatives=1,
        n_abnormals=0,
        n_cells=20,
        seed=0,
        adequacy_fraction=0.5,
    )
    assert c["preset"] == "conventional"
    assert "--preset conventional --set adequacy.min_squamous_cells=" in c["batch_command"]


# -- candidate slide scores --------------------------------------------------------------------------
NAMES = ["NILM", "ASC-US", "HSIL", "artifact"]
SEVERITY = {"ASC-US": 0.5, "HSIL": 1.0}


def test_candidate_slide_scores_by_hand() -> None:
    probs = np.array(
        [
            [0.9, 0.1, 0.0, 0.0],  # a = 0.1, s = 0.05
            [0.2, 0.6, 0.2, 0.0],  # a = 0.8, s = 0.5
            [0.0, 0.0, 1.0, 0.0],  # a = 1.0, s = 1.0
            [0.1, 0.0, 0.3, 0.6],  # a = 0.3, s = 0.3, top class artifact
        ]
    )
    s = candidate_slide_scores(
        probs, NAMES, ["ASC-US", "HSIL"], SEVERITY, top_k=(1, 3, 10), thresholds=(0.5,)
    )
    assert s["top1_mean"] == pytest.approx(1.0)
    assert s["top3_mean"] == pytest.approx((1.0 + 0.8 + 0.3) / 3)
    assert s["top10_mean"] == pytest.approx((1.0 + 0.8 + 0.3 + 0.1) / 10)  # missing cells count 0
    assert s["top3_severity"] == pytest.approx((1.0 + 0.5 + 0.3) / 3)
    assert s["per1000_ge0.5"] == pytest.approx(1000 * 2 / 4)
    assert s["severity_per1000_ge0.5"] == pytest.approx(1000 * 1.5 / 4)
    # without the artifact cell: 3 cells left
    assert s["no_artifact/top3_mean"] == pytest.approx((1.0 + 0.8 + 0.1) / 3)
    assert s["no_artifact/per1000_ge0.5"] == pytest.approx(1000 * 2 / 3)
    assert s["no_artifact/severity_per1000_ge0.5"] == pytest.approx(1000 * 1.5 / 3)
    empty = candidate_slide_scores(np.zeros((0, 4)), NAMES, ["ASC-US", "HSIL"], SEVERITY)
    assert all(v == 0.0 for v in empty.values())


def test_set_aside_and_auroc_by_hand() -> None:
    scores = [0.1, 0.2, 0.5, 0.6, 0.5, 0.9]
    abnormal = [False, False, False, False, True, True]
    r = set_aside_at_full_sensitivity(scores, abnormal)
    # threshold = lowest abnormal score 0.5; strictly below: 0.1, 0.2 (the NILM tie at 0.5 is kept)
    assert r == {"threshold": 0.5, "n_negative": 4, "n_set_aside": 2, "fraction": 0.5}
    # pairs (abnormal, NILM): 0.5 beats 2, ties 1 → 2.5; 0.9 beats 4 → (2.5 + 4) / 8
    assert binary_auroc(abnormal, scores) == pytest.approx(6.5 / 8)
    assert set_aside_at_full_sensitivity([0.3, 0.4], [False, False])["fraction"] is None
    t = score_tail(np.arange(1001) / 1000)
    assert t["n"] == 1001 and t["p99"] == pytest.approx(0.99) and t["p99.9"] == pytest.approx(0.999)
    assert t["max"] == 1.0


def _toy_slides() -> list[dict]:
    """Two NILM slides and two abnormal ones; on NILM slide n1 an artifact looks abnormal."""

    def row(nilm: float, ascus: float, hsil: float, art: float) -> list[float]:
        return [nilm, ascus, hsil, art]

    base = [row(0.95, 0.05, 0.0, 0.0)] * 6
    slides = {
        "n0": (base, "NILM"),
        "n1": ([*base, row(0.0, 0.0, 0.4, 0.6)], "NILM"),  # a = 0.4, artifact
        "a0": ([*base, row(0.1, 0.0, 0.9, 0.0)], "HSIL"),  # a = 0.9
        "a1": ([*base, row(0.7, 0.3, 0.0, 0.0)], "ASC-US"),  # a = 0.35
    }
    return [
        {
            "slide_id": k,
            "diagnosis": dx,
            "probs": np.array(p),
            "class_names": NAMES,
            "abnormal_classes": ["ASC-US", "HSIL"],
            "severity": SEVERITY,
        }
        for k, (p, dx) in slides.items()
    ]


def test_compare_on_a_toy_cohort() -> None:
    cs = load_pipeline("compare_slide_scores")
    r = cs.compare(_toy_slides(), top_k=(1,), thresholds=(0.5,))
    by = {e["score"]: e for e in r["scores"]}
    # top1: n0 0.05, n1 0.4, a0 0.9, a1 0.35 → a1 is below n1: AUROC (1 + 1 + 1 + 0) / 4
    assert by["top1_mean"]["auroc"] == pytest.approx(0.75)
    assert by["top1_mean"]["set_aside_100"]["n_set_aside"] == 1  # only n0 (0.05 < 0.35)
    # without the artifact cell n1 scores 0.05: both NILM slides below both abnormal ones
    assert by["no_artifact/top1_mean"]["auroc"] == pytest.approx(1.0)
    assert by["no_artifact/top1_mean"]["set_aside_100"]["fraction"] == pytest.approx(1.0)
    # HSIL+ vs NILM only: a0 above both
    assert by["top1_mean"]["auroc_hsil_plus"] == pytest.approx(1.0)
    assert r["scores"][0]["set_aside_100"]["fraction"] == pytest.approx(1.0)  # best first
    assert r["n_abnormal"] == 2 and r["n_nilm"] == 2 and r["artifact_class"] is True
    tail = r["nilm_cell_tail"]
    assert tail["abnormality"]["n"] == 13 and tail["abnormality"]["max"] == pytest.approx(0.4)
    assert tail["no_artifact/abnormality"]["max"] == pytest.approx(0.05)
    assert "AUROC" in cs.format_table(r)


def test_compare_script_on_a_constructed_batch(tmp_path: Path) -> None:
    from wsi_screen.store import CellStoreWriter

    cs = load_pipeline("compare_slide_scores")
    batch = tmp_path / "batch"
    design = {"n0": ("NILM", []), "n1": ("NILM", []), "a0": ("HSIL", ["HSIL"] * 3), "a1": ("LSIL", ["LSIL"])}
    for i, (sid, (_, abnormal)) in enumerate(design.items()):
        (batch / sid).mkdir(parents=True)
        cells = make_cells(["NILM"] * 40 + ["artifact"] * 2 + abnormal, p=0.9, seed=i)
        with CellStoreWriter(batch / sid / "cells.zarr", class_names=CLASSES, abnormal_classes=ABNORMAL) as w:
            w.append(cells)
        summary = {"triage": "negative", "score": 0.1 * i, "slide": f"{sid}.tiff"}
        (batch / sid / "summary.json").write_text(json.dumps(summary))
    csv = tmp_path / "d.csv"
    csv.write_text("slide,diagnosis\n" + "".join(f"{k}.tiff,{v[0]}\n" for k, v in design.items()))
    out = tmp_path / "s.json"
    assert cs.main([str(batch), "--diagnoses", str(csv), "-o", str(out), "--top-k", "1,3"]) == 0
    r = json.loads(out.read_text())
    by = {e["score"]: e for e in r["scores"]}
    assert {"summary.score", "top1_mean", "no_artifact/top3_severity", "per1000_ge0.5"} <= set(by)
    assert by["top1_mean"]["auroc"] == pytest.approx(1.0)
    assert by["summary.score"]["auroc"] == pytest.approx(1.0)  # 0.0, 0.1 vs 0.2, 0.3
    assert by["per1000_ge0.5"]["set_aside_100"]["fraction"] == pytest.approx(1.0)
    assert r["n_slides"] == 4 and len(r["slides"]) == 4
    bad = tmp_path / "bad.csv"
    bad.write_text("slide,diagnosis\nnope.tiff,NILM\n")
    assert cs.main([str(batch), "--diagnoses", str(bad)]) == 2


def test_cells_by_truth_type_on_a_constructed_cohort(tmp_path: Path) -> None:
    """Each detection is counted under the truth cell its centre lies in; flagged at the batch threshold."""
    from wsi_screen.store import CellStoreWriter

    cs = load_pipeline("compare_slide_scores")
    batch, cohort = tmp_path / "batch", tmp_path / "cohort"
    (cohort / "truth").mkdir(parents=True)
    h = w = 400
    cells = np.zeros((h, w), np.uint32)
    cells[0:100, 0:100] = 1  # normal_columnar/a
    cells[0:100, 200:300] = 2  # normal_intermediate/b
    cells[200:300, 0:100] = 3  # hsil/c (only on the abnormal slide's detections)
    background = np.zeros((h, w), np.uint32)
    background[300:320, 300:320] = 1
    names = np.array(["normal_columnar/a.bmp", "normal_intermediate/b.bmp", "hsil/c.png"])
    # (x, y, predicted class): two flagged columnar detections, one NILM intermediate, one field
    # nucleus, one outside everything; the abnormal slide has one HSIL detection in the HSIL cell.
    layout = {
        "n0": [
            (50, 50, "HSIL"),
            (60, 40, "LSIL"),
            (250, 50, "NILM"),
            (310, 310, "NILM"),
            (390, 150, "ASC-US"),
        ],
        "a0": [(50, 250, "HSIL"), (250, 60, "NILM")],
    }
    attrs = {"config": {"output": {"flag_min_score": 0.5}}}
    for sid, dets in layout.items():
        (batch / sid).mkdir(parents=True)
        xy = np.array([(x, y) for x, y, _ in dets], np.float64)
        table = make_cells([c for *_, c in dets], p=0.9, xy=xy, size=(w, h))
        path = batch / sid / "cells.zarr"
        with CellStoreWriter(path, class_names=CLASSES, abnormal_classes=ABNORMAL, attrs=attrs) as wr:
            wr.append(table)
        np.savez_compressed(
            cohort / "truth" / f"{sid}.truth.npz", cells=cells, background=background, names=names
        )
        (batch / sid / "summary.json").write_text(json.dumps({"slide": f"{sid}.tiff", "score": 0.5}))
    csv = tmp_path / "d.csv"
    csv.write_text("slide,diagnosis\nn0.tiff,NILM\na0.tiff,HSIL\n")
    slides = cs.load_cohort_cells(batch, csv)
    by = cs.cells_by_truth_type(batch, cohort, slides)
    assert by["flag_threshold"] == 0.5
    nilm = by["nilm_slides"]
    assert set(nilm) == {"normal_columnar", "normal_intermediate", "lbc_field_nucleus", "unmatched"}
    assert nilm["normal_columnar"]["n"] == 2 and nilm["normal_columnar"]["flagged"] == 1.0
    assert nilm["normal_intermediate"]["flagged"] == 0.0 and nilm["lbc_field_nucleus"]["n"] == 1
    assert nilm["unmatched"]["flagged"] == 1.0  # ASC-US at 0.9
    abn = by["abnormal_slides"]  # HSIL 0.9 plus two abnormal classes at 0.025 each
    assert abn["hsil"] == pytest.approx(
        {"flagged": 1.0, "n": 1, "p99": 0.95, "p99.9": 0.95, "max": 0.95}, abs=1e-6
    )
    assert abn["normal_intermediate"]["flagged"] == 0.0
    with pytest.raises(Exception, match="not found"):
        cs.cells_by_truth_type(batch, tmp_path / "elsewhere", slides)
    out = tmp_path / "s.json"
    assert cs.main([str(batch), "--diagnoses", str(csv), "--cohort", str(cohort), "-o", str(out)]) == 0
    assert json.loads(out.read_text())["cells_by_truth_type"]["nilm_slides"]["normal_columnar"]["n"] == 2
    assert cs.main([str(batch), "--diagnoses", str(csv), "--cohort", str(tmp_path / "elsewhere")]) == 2
