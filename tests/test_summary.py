"""Slide triage on constructed cell tables."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cellfactory import ABNORMAL, CLASSES, make_cells

from wsi_screen.cells import CellTable
from wsi_screen.config import Settings, load_settings
from wsi_screen.summary import ranking_score, severity_scores, summarize, top_cell_indices, write_summary

ADEQUATE_NILM = 5200  # above the LBC threshold of 5,000


def summ(cells: CellTable, settings: Settings | None = None, **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "class_names": CLASSES,
        "abnormal_classes": ABNORMAL,
        "settings": settings or Settings(),
        "cellular_area_mm2": 20.0,
        "tiles_total": 400,
        "tiles_unreadable": 0,
        "tiles_out_of_focus": 0,
        "timings": {"total": 12.5},
        "versions": {"wsi_screen": "test"},
    }
    args.update(kw)
    out = summarize(cells, **args)
    json.dumps(out, allow_nan=False)  # strict JSON, always
    return out


def slide(**counts: int) -> CellTable:
    """NILM background plus abnormal cells, all predicted with probability 0.95."""
    labels: list[str] = []
    for name, k in counts.items():
        labels += [name.replace("_", "-")] * k
    return make_cells(labels, seed=len(labels))


@pytest.fixture(scope="module")
def negative_slide() -> CellTable:
    return slide(NILM=ADEQUATE_NILM)


def test_no_abnormal_cells_is_negative(negative_slide: CellTable) -> None:
    s = summ(negative_slide)
    assert s["triage"] == "negative"
    assert s["suggested_category"] == "NILM"
    assert s["score"] < Settings().triage.review_score
    assert s["adequacy"]["adequate"] is True
    assert s["adequacy"]["squamous_cells"] == ADEQUATE_NILM
    assert s["adequacy"]["threshold"] == 5000
    assert s["class_counts"]["predicted"]["NILM"] == ADEQUATE_NILM
    assert s["class_counts"]["confident"]["NILM"] == ADEQUATE_NILM
    assert s["qc"]["flags"] == []
    for key in ("class_counts", "suggested_category", "triage", "score", "adequacy", "qc", "top_cells"):
        assert key in s
    assert s["timings"] == {"total": 12.5} and s["versions"] == {"wsi_screen": "test"}


def test_cluster_of_confident_hsil_is_priority() -> None:
    s = summ(slide(NILM=ADEQUATE_NILM, HSIL=8))
    assert s["triage"] == "priority"
    assert s["suggested_category"] == "HSIL"
    assert s["class_counts"]["confident"]["HSIL"] == 8
    assert "HSIL" in s["triage_reason"]
    assert all(c["class"] == "HSIL" for c in s["top_cells"][:8])


def test_three_confident_lsil_is_review_two_is_not() -> None:
    s = summ(slide(NILM=ADEQUATE_NILM, LSIL=3))
    assert s["triage"] == "review" and s["suggested_category"] == "LSIL"
    s2 = summ(slide(NILM=ADEQUATE_NILM, LSIL=2))
    assert s2["suggested_category"] == "NILM"
    assert s2["triage"] == "negative"  # two LSIL cells give a score well below review_score


def test_highest_supported_grade_wins() -> None:
    s = summ(slide(NILM=ADEQUATE_NILM, ASC_US=6, LSIL=4, HSIL=2))
    assert s["suggested_category"] == "HSIL" and s["triage"] == "priority"
    s = summ(slide(NILM=ADEQUATE_NILM, ASC_US=6, LSIL=4, HSIL=1))
    assert s["suggested_category"] == "LSIL" and s["triage"] == "review"


def test_unconfident_cells_do_not_support_a_category() -> None:
    labels = ["NILM"] * ADEQUATE_NILM + ["HSIL"] * 5
    p = np.full(len(labels), 0.95)
    p[-5:] = 0.6  # below triage.confidence = 0.7
    s = summ(make_cells(labels, p=p))
    assert s["class_counts"]["predicted"]["HSIL"] == 5
    assert s["class_counts"]["confident"]["HSIL"] == 0
    assert s["suggested_category"] == "NILM"


def test_few_cells_without_abnormal_is_unsatisfactory() -> None:
    s = summ(slide(NILM=300))
    assert s["triage"] == "unsatisfactory"
    assert s["adequacy"]["adequate"] is False
    assert s["suggested_category"] == "NILM"


def test_abnormal_cells_are_never_unsatisfactory() -> None:
    s = summ(slide(NILM=300, HSIL=3))
    assert s["adequacy"]["adequate"] is False
    assert s["triage"] == "priority" and "adequacy" in s["triage_reason"]
    # A single confident ASC-US cell supports no category and scores low, but the slide still
    # cannot be called unsatisfactory: it goes to review.
    s = summ(slide(NILM=300, ASC_US=1))
    assert s["suggested_category"] == "NILM" and s["score"] < 0.5
    assert s["triage"] == "review"


def test_no_cells() -> None:
    s = summ(CellTable.empty(len(CLASSES)), cellular_area_mm2=0.0)
    assert s["triage"] == "unsatisfactory"
    assert s["n_cells"] == 0 and s["score"] == 0.0
    assert {"no_cells", "low_cellular_area"} <= set(s["qc"]["flags"])
    assert s["qc"]["checks"]["high_artifact_fraction"]["value"] is None
    assert s["top_cells"] == []


def test_conventional_threshold_is_8000(negative_slide: CellTable) -> None:
    conv = load_settings("conventional")
    s = summ(negative_slide, settings=conv)
    assert s["adequacy"]["threshold"] == 8000 and s["adequacy"]["preparation"] == "conventional"
    assert s["triage"] == "unsatisfactory"  # 5,200 cells are enough for LBC, not for a smear
    assert summ(negative_slide, settings=load_settings("lbc"))["triage"] == "negative"


def test_adequacy_excludes_artifacts_and_unconfident_cells() -> None:
    labels = ["NILM"] * 100 + ["artifact"] * 40 + ["NILM"] * 10
    p = np.full(len(labels), 0.9)
    p[-10:] = 0.3  # below adequacy.min_confidence = 0.5
    s = summ(make_cells(labels, p=p))
    assert s["adequacy"]["squamous_cells"] == 100


def test_qc_flags_with_values() -> None:
    cells = slide(NILM=ADEQUATE_NILM, artifact=6000)
    s = summ(cells, cellular_area_mm2=0.01, tiles_total=200, tiles_unreadable=3, tiles_out_of_focus=40)
    checks = s["qc"]["checks"]
    assert set(s["qc"]["flags"]) == {
        "low_cellular_area",
        "high_artifact_fraction",
        "out_of_focus_tiles",
        "unreadable_tiles",
    }
    assert checks["out_of_focus_tiles"]["value"] == pytest.approx(0.2)
    assert checks["unreadable_tiles"]["value"] == pytest.approx(0.015)
    assert checks["high_artifact_fraction"]["value"] == pytest.approx(6000 / 11200, abs=1e-4)
    assert checks["low_cellular_area"]["threshold"] == 0.05
    assert checks["no_cells"]["flagged"] is False
    relaxed = Settings().with_overrides(
        {"triage.max_out_of_focus_fraction": 0.25, "triage.max_unreadable_fraction": 0.02}
    )
    s2 = summ(
        cells,
        settings=relaxed,
        cellular_area_mm2=0.01,
        tiles_total=200,
        tiles_unreadable=3,
        tiles_out_of_focus=40,
    )
    assert "out_of_focus_tiles" not in s2["qc"]["flags"] and "unreadable_tiles" not in s2["qc"]["flags"]


def test_score_is_monotone_in_added_hsil_cells() -> None:
    rng = np.random.default_rng(0)
    base = make_cells(["NILM"] * 50 + ["LSIL"] * 4, p=rng.uniform(0.5, 1.0, 54), seed=1)
    previous = summ(base)["score"]
    tables = [base]
    for i in range(25):
        tables.append(make_cells(["HSIL"], p=float(rng.uniform(0.3, 1.0)), seed=100 + i))
        score = summ(CellTable.concat(tables))["score"]
        assert score >= previous - 1e-9
        previous = score
    assert previous > 0.7
    # Adding benign cells never lowers it either.
    tables.append(make_cells(["NILM"] * 100, seed=7))
    assert summ(CellTable.concat(tables))["score"] >= previous - 1e-9


def test_score_definition() -> None:
    assert ranking_score(np.array([1.0]), 10) == pytest.approx(0.1)
    assert ranking_score(np.array([0.2, 0.9, 0.5, 0.4]), 2) == pytest.approx(0.7)
    assert ranking_score(np.zeros(0), 5) == 0.0
    probs = np.array([[0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0]])
    sev = severity_scores(probs, CLASSES, ABNORMAL, {"ASC-US": 0.5, "LSIL": 0.7, "HSIL": 1.0})
    np.testing.assert_allclose(sev, [1.0, 0.5, 0.1 + 0.21 + 0.4], rtol=1e-6)


def test_top_cells(negative_slide: CellTable) -> None:
    cells = CellTable.concat([negative_slide, slide(HSIL=3, LSIL=2)])
    cells.morphometrics["nc_ratio"][-1] = np.nan
    s = summ(cells)
    top = s["top_cells"]
    assert len(top) == Settings().output.top_n
    scores = [c["score"] for c in top]
    assert scores == sorted(scores, reverse=True)
    assert [c["rank"] for c in top[:3]] == [1, 2, 3]
    first = top[0]
    assert first["class"] == "HSIL" and first["index"] >= ADEQUATE_NILM
    assert set(first["probs"]) == set(CLASSES)
    assert first["x"] == pytest.approx(cells.x[first["index"]], abs=0.01)
    assert "nucleus_area_um2" in first["morphometrics"]
    nan_cell = next(c for c in top if c["index"] == len(cells) - 1)
    assert nan_cell["morphometrics"]["nc_ratio"] is None
    assert len(summ(cells, settings=Settings().with_overrides({"output.top_n": 3}))["top_cells"]) == 3


def test_top_cell_indices_ties() -> None:
    score = np.array([0.5, 0.9, 0.9, 0.1, np.nan])
    np.testing.assert_array_equal(top_cell_indices(score, 3), [1, 2, 0])
    np.testing.assert_array_equal(top_cell_indices(score, 2, tiebreak=np.array([0, 0.1, 0.9, 0, 0])), [2, 1])
    assert len(top_cell_indices(score, 0)) == 0


def test_extra_keys_and_collisions(negative_slide: CellTable) -> None:
    s = summ(negative_slide, extra={"slide": {"path": "a.svs"}, "slide_id": "a"})
    assert s["slide_id"] == "a"
    with pytest.raises(ValueError, match="triage"):
        summ(negative_slide, extra={"triage": "negative"})


def test_bad_arguments() -> None:
    cells = slide(NILM=3)
    with pytest.raises(ValueError, match="probs"):
        summ(cells, class_names=CLASSES[:4])
    with pytest.raises(ValueError, match="abnormal"):
        summ(cells, abnormal_classes=["CIN3"])
    with pytest.raises(ValueError, match="≥ 0"):
        summ(cells, tiles_unreadable=-1)


def test_write_summary_is_strict_json(tmp_path: Path, negative_slide: CellTable) -> None:
    s = summ(negative_slide)
    path = write_summary(tmp_path / "summary.json", s)
    assert json.loads(path.read_text()) == json.loads(json.dumps(s))
    with pytest.raises(ValueError):
        write_summary(tmp_path / "bad.json", {"x": float("nan")})
    assert not (tmp_path / "bad.json").exists()


def test_settings_validation() -> None:
    from wsi_screen.errors import ConfigError

    with pytest.raises(ConfigError, match="severity"):
        Settings().with_overrides({"triage.severity": {"HSIL": 2.0}})
    with pytest.raises(ConfigError, match="min_cells"):
        Settings().with_overrides({"triage.min_cells": {"HSIL": 0}})


# -- adequacy honesty and the rule that decided (issue 15, item 4) ---------------------------------------
def test_inadequate_with_low_confidence_abnormal_cells_is_review() -> None:
    # Two HSIL cells at 0.55: not confident (< 0.7), so no category and a low score; their abnormality
    # score (0.55 + shares of the other abnormal classes) is above triage.inadequate_abnormal_score.
    labels = ["NILM"] * 300 + ["HSIL"] * 2
    p = np.r_[np.full(300, 0.95), [0.55, 0.55]]
    s = summ(make_cells(labels, p=p))
    assert s["adequacy"]["adequate"] is False and s["suggested_category"] == "NILM"
    assert s["abnormal_cells"]["confident"] == 0 and s["abnormal_cells"]["above_threshold"] == 2
    assert s["abnormal_cells"]["max_score"] >= Settings().triage.inadequate_abnormal_score
    assert s["score"] < Settings().triage.review_score
    assert s["triage"] == "review" and s["triage_rule"] == "inadequate_abnormal"
    assert "never unsatisfactory" in s["triage_reason"]
    # Raising the documented probability above those cells makes the slide unsatisfactory again.
    strict = load_settings(overrides={"triage.inadequate_abnormal_score": 0.9})
    s = summ(make_cells(labels, p=p), settings=strict)
    assert s["triage"] == "unsatisfactory" and s["triage_rule"] == "inadequate"
    assert "highest cell abnormality score" in s["triage_reason"] and "< 0.9" in s["triage_reason"]


def test_inadequate_with_review_score_is_review() -> None:
    s = summ(slide(NILM=300, LSIL=2), settings=load_settings(overrides={"triage.review_score": 0.1}))
    assert s["adequacy"]["adequate"] is False
    assert s["triage"] == "review" and s["triage_rule"] == "review_score"
    assert "below the adequacy threshold" in s["triage_reason"]


def test_unsatisfactory_names_its_rule(negative_slide: CellTable) -> None:
    s = summ(slide(NILM=300))
    assert (s["triage"], s["triage_rule"]) == ("unsatisfactory", "inadequate")
    assert "adequacy.min_squamous_cells" in s["triage_reason"]
    s = summ(CellTable.empty(len(CLASSES)), cellular_area_mm2=0.0)
    assert (s["triage"], s["triage_rule"]) == ("unsatisfactory", "no_cells")
    assert summ(negative_slide)["triage_rule"] == "negative"
    assert summ(slide(NILM=ADEQUATE_NILM, HSIL=8))["triage_rule"] == "priority_category"
    assert summ(slide(NILM=ADEQUATE_NILM, LSIL=3))["triage_rule"] == "review_category"


def test_priority_score_rule() -> None:
    cells = slide(NILM=ADEQUATE_NILM, LSIL=2, ASC_US=4)  # no category supported, a middling score
    base = summ(cells)
    assert base["suggested_category"] == "NILM"
    settings = load_settings(overrides={"triage.review_score": 0.1, "triage.priority_score": 0.2})
    s = summ(cells, settings=settings)
    assert base["score"] >= 0.2
    assert (s["triage"], s["triage_rule"]) == ("priority", "priority_score")
    assert s["rules"]["triage"]["priority_score"] == 0.2


def test_summary_names_uncalibrated_operating_point(negative_slide: CellTable) -> None:
    op = summ(negative_slide)["operating_point"]
    assert op["calibrated"] is False and op["applies"] is True
    assert op["note"].startswith("uncalibrated defaults")
