"""Slide triage calibration (``wsi-screen calibrate``) on constructed batch outputs.

Two cohorts of constructed slides stand for two kinds of slide: ``sharp`` (confident cells, a narrow
NILM score tail: synthetic-like) and ``broad`` (a heavy tail of unconfident NILM cells, false-positive
ASC-US cells, artifacts, fewer and fainter abnormal cells: real-like). Their summaries are written by
the project's own :func:`~wsi_screen.summary.summarize`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cellfactory import ABNORMAL, CLASSES, probs_for
from scipy.stats import binom

from wsi_screen.calibration import (
    PRESET_FILE,
    CalibrationTarget,
    calibrate,
    validate_operating_point,
    write_calibration,
)
from wsi_screen.cells import MORPHOMETRICS, CellTable
from wsi_screen.cli.main import main
from wsi_screen.config import OperatingPointSettings, Settings, TriageSettings, load_settings
from wsi_screen.errors import CalibrationError, ConfigError
from wsi_screen.evaluation import EvaluationError
from wsi_screen.metrics import clopper_pearson_interval, clopper_pearson_lower, slides_needed
from wsi_screen.summary import summarize, write_summary

MODELS = [
    {"task": "localization", "name": "nuclei-test", "version": "1", "sha256": "a" * 64},
    {"task": "classification", "name": "cyto-test", "version": "1", "sha256": "b" * 64},
]
OTHER_MODELS = [MODELS[0], {**MODELS[1], "name": "cyto-other", "sha256": "c" * 64}]
#: The explicit adequacy override of these small slides (400-700 cells each), as the issue asks.
SMALL_SLIDES = {"adequacy.min_squamous_cells": 300}
#: The cell class that stands for each diagnosis (the constructed classifier has 3 abnormal classes).
CELL_CLASS = {"ASC-US": "ASC-US", "LSIL": "LSIL", "ASC-H": "HSIL", "HSIL": "HSIL", "SCC": "HSIL"}
#: 40 NILM, 30 HSIL+ (HSIL, SCC), 30 low-grade and ASC-H slides: ≥ 29 per group.
COHORT = ["NILM"] * 40 + ["ASC-US"] * 12 + ["LSIL"] * 12 + ["ASC-H"] * 6 + ["HSIL"] * 24 + ["SCC"] * 6


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers() -> Iterator[None]:
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_wsi_screen", False):
            root.removeHandler(h)


# -- constructed cohorts ----------------------------------------------------------------------------------
@dataclass
class Slide:
    slide_id: str
    diagnosis: str
    cells: CellTable


def _cells(diagnosis: str, kind: str, rng: np.random.Generator, *, small: bool = False) -> CellTable:
    """One slide: NILM background, false-positive cells, artifacts and the diagnosis's abnormal cells."""
    n = 150 if small else int(rng.integers(400, 700))
    if kind == "sharp":
        nilm_p = rng.uniform(0.88, 0.99, n)
        n_fp = 0 if small else int(rng.poisson(1.0))
        fp_p, n_art = rng.uniform(0.35, 0.6, n_fp), 0
        k, (lo, hi) = int(rng.integers(3, 31)), (0.6, 0.97)
    elif kind == "broad":
        nilm_p = 1.0 - rng.beta(1.2, 12.0, n)  # a long tail of unconfident NILM cells
        n_fp = 0 if small else int(rng.poisson(4.0))
        fp_p, n_art = rng.uniform(0.3, 0.55, n_fp), int(rng.integers(0, 60))
        k, (lo, hi) = int(rng.integers(3, 12)), (0.5, 0.9)
    else:
        raise ValueError(kind)
    labels = ["NILM"] * n + ["ASC-US"] * n_fp + ["artifact"] * n_art
    p = [*nilm_p, *fp_p, *rng.uniform(0.5, 0.9, n_art)]
    if diagnosis != "NILM":
        if small:  # inadequate and only low-confidence abnormal cells
            k, (lo, hi) = 2, (0.45, 0.6)
        labels += [CELL_CLASS[diagnosis]] * k
        p += list(rng.uniform(lo, hi, k))
    return fast_cells(labels, np.asarray(p), rng)


def fast_cells(labels: Sequence[str], p: np.ndarray, rng: np.random.Generator) -> CellTable:
    """Cells with the given predicted classes and top probabilities (square outlines, no morphometrics)."""
    n = len(labels)
    x, y = rng.uniform(100, 9900, n), rng.uniform(100, 9900, n)
    square = np.array([[-6, -6], [6, -6], [6, 6], [-6, 6]], np.float32)
    outline = (np.stack([x, y], 1)[:, None, :] + square[None]).reshape(-1, 2).astype(np.float32)
    return CellTable(
        x=x,
        y=y,
        tile=np.zeros(n, np.int32),
        detection_score=np.ones(n, np.float32),
        morphometrics={k: np.full(n, np.nan, np.float32) for k in MORPHOMETRICS},
        outline_offsets=np.arange(0, 4 * n + 1, 4, dtype=np.int64),
        outline_xy=outline,
        probs=probs_for(labels, p),
    )


def cohort(kind: str, seed: int, diagnoses: Sequence[str] = COHORT, *, small: int = 2) -> list[Slide]:
    """Slides of one kind; the first ``small`` NILM and abnormal slides are inadequate (150 cells)."""
    rng = np.random.default_rng(seed)
    out, n_small = [], {"NILM": 0, "abnormal": 0}
    for i, d in enumerate(diagnoses):
        group = "NILM" if d == "NILM" else "abnormal"
        is_small = n_small[group] < small
        n_small[group] += is_small
        out.append(Slide(f"{kind}-{i:03d}", d, _cells(d, kind, rng, small=is_small)))
    return out


def summarise(slide: Slide, settings: Settings, models: Sequence[dict[str, Any]] = MODELS) -> dict[str, Any]:
    return summarize(
        slide.cells,
        class_names=CLASSES,
        abnormal_classes=ABNORMAL,
        settings=settings,
        cellular_area_mm2=5.0,
        tiles_total=10,
        tiles_unreadable=0,
        tiles_out_of_focus=0,
        timings={},
        versions={"wsi_screen": "test", "models": list(models)},
        extra={"slide_id": slide.slide_id},
    )


def write_batch(
    root: Path,
    slides: Sequence[Slide],
    settings: Settings,
    *,
    models: Sequence[dict[str, Any]] = MODELS,
    csv_rows: Sequence[tuple[str, str]] | None = None,
) -> tuple[Path, Path]:
    """A batch output (``OUT/<slide-id>/summary.json``) and its diagnoses CSV (slide file names)."""
    out = root / "out"
    out.mkdir(parents=True)
    for s in slides:
        (out / s.slide_id).mkdir()
        write_summary(out / s.slide_id / "summary.json", summarise(s, settings, models))
    rows = csv_rows if csv_rows is not None else [(f"{s.slide_id}.svs", s.diagnosis) for s in slides]
    path = root / "diagnoses.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["slide", "diagnosis"])
        w.writerows(rows)
    return out, path


@pytest.fixture(scope="module")
def small_slides() -> Settings:
    return load_settings(overrides=SMALL_SLIDES)


@pytest.fixture(scope="module")
def sharp() -> list[Slide]:
    return cohort("sharp", 1)


@pytest.fixture(scope="module")
def broad() -> list[Slide]:
    return cohort("broad", 2)


@pytest.fixture(scope="module")
def sharp_batch(
    tmp_path_factory: pytest.TempPathFactory, sharp: list[Slide], small_slides: Settings
) -> tuple[Path, Path]:
    return write_batch(tmp_path_factory.mktemp("sharp"), sharp, small_slides)


@pytest.fixture(scope="module")
def sharp_result(sharp_batch: tuple[Path, Path]) -> dict[str, Any]:
    return calibrate(*sharp_batch, today="2025-01-02")


def kept_shares(slides: Sequence[Slide], settings: Settings, high: Sequence[str]) -> dict[str, float]:
    """Re-screen (re-summarise) ``slides`` with ``settings``: shares kept / set aside per group."""
    triage = [(s.diagnosis, summarise(s, settings)["triage"]) for s in slides]

    def share(group: Sequence[tuple[str, str]], wanted: set[str]) -> float:
        return sum(t in wanted for _, t in group) / len(group)

    kept = {"review", "priority"}
    return {
        "hsil_plus": share([x for x in triage if x[0] in high], kept),
        "ascus_plus": share([x for x in triage if x[0] != "NILM"], kept),
        "nilm_set_aside": share([x for x in triage if x[0] == "NILM"], {"negative"}),
    }


# -- statistics -------------------------------------------------------------------------------------------
def test_clopper_pearson_known_values() -> None:
    assert clopper_pearson_lower(59, 59) == pytest.approx(0.9505, abs=5e-5)
    assert clopper_pearson_lower(59, 59) == pytest.approx(0.05 ** (1 / 59), rel=1e-12)
    assert clopper_pearson_lower(9, 10) == pytest.approx(0.6058, abs=5e-5)
    assert clopper_pearson_lower(0, 10) == 0.0
    assert clopper_pearson_lower(0, 0) is None
    assert clopper_pearson_lower(30, 30, confidence=0.99) == pytest.approx(0.01 ** (1 / 30))
    # The definition: at the bound, k or more successes have probability exactly 1 − confidence.
    for k, n in [(1, 5), (17, 20), (58, 60), (290, 300)]:
        lb = clopper_pearson_lower(k, n)
        assert lb is not None
        assert binom.sf(k - 1, n, lb) == pytest.approx(0.05, rel=1e-6)
    lo, hi = clopper_pearson_interval(9, 10) or (0.0, 0.0)
    assert lo == pytest.approx(0.5550, abs=5e-5) and hi == pytest.approx(0.9975, abs=5e-5)
    assert clopper_pearson_interval(10, 10) == (pytest.approx(0.025 ** (1 / 10)), 1.0)
    with pytest.raises(ValueError, match="successes"):
        clopper_pearson_lower(11, 10)


@pytest.mark.parametrize(
    ("bound", "misses", "expected"),
    [(0.95, 0, 59), (0.98, 0, 149), (0.99, 0, 299), (0.90, 0, 29), (0.95, 1, 93), (0.95, 2, 124)],
)
def test_slides_needed(bound: float, misses: int, expected: int) -> None:
    n = slides_needed(bound, misses=misses)
    assert n == expected
    # Smallest: n slides reach the bound, n − 1 do not.
    assert (clopper_pearson_lower(n - misses, n) or 0.0) >= bound
    assert (clopper_pearson_lower(n - 1 - misses, n - 1) or 0.0) < bound
    if misses == 0:
        assert n == math.ceil(math.log(0.05) / math.log(bound))


# -- threshold choice on minimal summaries ------------------------------------------------------------------
def minimal_summary(
    score: float,
    *,
    category: str = "NILM",
    adequate: bool = True,
    n_cells: int = 6000,
    max_cell: float = 0.1,
    models: Sequence[dict[str, Any]] = MODELS,
    triage: TriageSettings | None = None,
) -> dict[str, Any]:
    """The keys calibration reads; not a full summary (the triage it claims does not matter)."""
    rules = (triage or TriageSettings()).model_dump(mode="json")
    return {
        "schema_version": 1,
        "triage": "negative",
        "score": score,
        "suggested_category": category,
        "n_cells": n_cells,
        "class_names": CLASSES,
        "abnormal_classes": ABNORMAL,
        "class_counts": {"predicted": {}, "confident": {}},
        "abnormal_cells": {"confident": 0, "max_score": max_cell, "threshold": 0.5, "above_threshold": 0},
        "adequacy": {"adequate": adequate},
        "rules": {"triage": rules, "adequacy": {"preparation": "lbc", "min_squamous_cells": 5000}},
        "versions": {"models": list(models)},
    }


def write_minimal(root: Path, rows: Sequence[tuple[str, str, dict[str, Any]]]) -> tuple[Path, Path]:
    out = root / "out"
    out.mkdir(parents=True)
    for sid, _, summary in rows:
        (out / sid).mkdir()
        (out / sid / "summary.json").write_text(json.dumps(summary))
    path = root / "diagnoses.csv"
    path.write_text("slide,diagnosis\n" + "".join(f"{sid}.svs,{d}\n" for sid, d, _ in rows))
    return out, path


def _ladder() -> list[tuple[str, str, dict[str, Any]]]:
    """30 NILM at 0.01…0.30, 30 HSIL at 0.51…0.80, 30 LSIL: one at 0.20, the others at 0.32…0.60."""
    rows = [(f"n{i:02d}", "NILM", minimal_summary(0.01 * i)) for i in range(1, 31)]
    rows += [(f"h{i:02d}", "HSIL", minimal_summary(0.5 + 0.01 * i)) for i in range(1, 31)]
    rows += [("l00", "LSIL", minimal_summary(0.20))]
    rows += [(f"l{i:02d}", "LSIL", minimal_summary(0.31 + 0.01 * i)) for i in range(1, 30)]
    return rows


def test_threshold_choice(tmp_path: Path) -> None:
    res = calibrate(*write_minimal(tmp_path, _ladder()))
    th = res["thresholds"]
    # ASC-US+ 98 % of 60 = 59 kept: the LSIL at 0.20 may go, the one at 0.32 must stay; the highest NILM
    # below it is 0.30, so the threshold lies halfway.
    assert th["review_interval"] == [pytest.approx(0.30), pytest.approx(0.32)]
    assert th["review_score"] == pytest.approx(0.31)
    sens = res["sensitivity"]
    assert (sens["hsil_plus"]["count"], sens["hsil_plus"]["n"]) == (30, 30)
    assert sens["hsil_plus"]["lower_bound"] == pytest.approx(0.05 ** (1 / 30))
    assert (sens["ascus_plus"]["count"], sens["ascus_plus"]["n"]) == (59, 60)
    assert sens["ascus_plus"]["lower_bound"] == pytest.approx(clopper_pearson_lower(59, 60))
    assert res["negatives_set_aside"]["count"] == 30 and res["negatives_set_aside"]["value"] == 1.0
    assert [m["slide"] for m in res["misses"]] == ["l00"]
    assert all(res["holds"].values())
    # Priority: 90 % of the 30 HSIL = 27 above the threshold, i.e. down to 0.54; the highest other
    # slide below is the LSIL at 0.53.
    assert 0.53 < th["priority_score"] <= 0.54
    assert (sens["priority"]["count"], sens["priority"]["n"]) == (27, 30)
    # The LSIL at 0.20 is below 10 NILM slides and ties with one (half a pair) of 60 × 30 pairs.
    assert res["ranking"]["auroc"] == pytest.approx(1 - 10.5 / 1800)
    assert res["slides_needed"][1] == {"lower_bound": 0.95, "no_miss": 59, "misses": 1, "with_misses": 93}
    assert res["operating_point"]["review_score"] == th["review_score"]
    OperatingPointSettings.model_validate(res["operating_point"])


def test_category_kept_and_unsatisfactory_slides(tmp_path: Path) -> None:
    rows = _ladder()
    # The LSIL slide at 0.32 is suggested LSIL by its cells: kept whatever the score, so the next
    # one (0.33) sets the threshold. An HSIL slide with no cells cannot be kept by any threshold above 0.
    rows[61] = ("l01", "LSIL", minimal_summary(0.32, category="LSIL"))
    res = calibrate(*write_minimal(tmp_path / "a", rows), target=CalibrationTarget(priority=0.0))
    assert res["thresholds"]["review_score"] == pytest.approx(0.315)  # between NILM 0.30 and LSIL 0.33
    assert res["thresholds"]["priority_score"] is None
    rows[0] = ("n01", "NILM", minimal_summary(0.31, adequate=False, n_cells=100, max_cell=0.2))
    rows[30] = ("h01", "HSIL", minimal_summary(0.0, n_cells=0, adequate=False, max_cell=0.0))
    res = calibrate(*write_minimal(tmp_path / "b", rows), target=CalibrationTarget(priority=0.0))
    # Every HSIL+ kept: the empty slide (score 0) forces the threshold to 0 — everything is reviewed.
    assert res["thresholds"]["review_score"] == 0.0
    assert res["negatives_set_aside"]["count"] == 0


# -- calibration on constructed cohorts -------------------------------------------------------------------
def test_calibrate_sharp_cohort(sharp_result: dict[str, Any]) -> None:
    res = sharp_result
    assert res["n_slides"] == {"NILM": 40, "ASC-US": 12, "LSIL": 12, "ASC-H": 6, "HSIL": 24, "SCC": 6}
    assert all(res["holds"].values())
    assert res["sensitivity"]["hsil_plus"]["count"] == 30
    assert res["sensitivity"]["ascus_plus"]["count"] >= 59
    assert res["negatives_set_aside"]["value"] >= 0.4
    assert res["ranking"]["auroc"] > 0.9
    # The inadequate abnormal slides (two low-confidence abnormal cells) are reviewed, not unsatisfactory;
    # the inadequate NILM slides without any suspicious cell are unsatisfactory.
    small = {
        s["slide_id"]: s for s in res["slides"] if s["slide_id"] in ("sharp-000", "sharp-001", "sharp-040")
    }
    assert small["sharp-040"]["diagnosis"] == "ASC-US" and small["sharp-040"]["triage"] == "review"
    assert small["sharp-000"]["triage"] == "unsatisfactory"
    op = res["operating_point"]
    assert op["calibrated"] and op["name"] == "out-2025-01-02" and op["date"] == "2025-01-02"
    assert op["models"] == MODELS
    assert op["n_slides"]["NILM"] == 40
    assert op["adequacy"] == {"preparation": "lbc", "min_squamous_cells": 300}


def test_preset_round_trip(
    tmp_path: Path, sharp: list[Slide], sharp_result: dict[str, Any], small_slides: Settings
) -> None:
    written = write_calibration(sharp_result, tmp_path / "op")
    assert {p.name for p in written.values()} == {"calibration.json", "calibration.html", PRESET_FILE}
    preset = written["preset"]
    data = yaml.safe_load(preset.read_text())
    assert set(data) == {"triage", "operating_point"}  # no run.json in this batch: no model names
    settings = load_settings(config=preset, overrides=SMALL_SLIDES)
    th = sharp_result["thresholds"]
    assert settings.triage.review_score == th["review_score"] != Settings().triage.review_score
    assert settings.triage.priority_score == th["priority_score"]
    assert settings.operating_point.calibrated
    assert settings.operating_point.name == sharp_result["operating_point"]["name"]
    # Re-screening the calibration slides with the preset gives the triage calibration predicted, and
    # every summary names the operating point with its figures.
    predicted = {s["slide_id"]: s["triage"] for s in sharp_result["slides"]}
    changed = 0
    for s in sharp:
        summary = summarise(s, settings)
        assert summary["triage"] == predicted[s.slide_id], s.slide_id
        changed += summary["triage"] != summarise(s, small_slides)["triage"]
        op = summary["operating_point"]
        assert op["calibrated"] is True and op["applies"] is True
        assert op["name"] == settings.operating_point.name
        assert op["sensitivity"]["hsil_plus"]["lower_bound"] == pytest.approx(0.05 ** (1 / 30))
    assert changed > 0  # the preset changes the triage
    # Overriding a calibrated threshold is allowed, but the summary then says the figures do not apply.
    moved = settings.with_overrides({"triage.review_score": 0.6, "triage.priority_score": 0.7})
    op = summarise(sharp[0], moved)["operating_point"]
    assert op["applies"] is False and "do not apply" in op["note"]


def test_uncalibrated_defaults_say_so(sharp: list[Slide]) -> None:
    op = summarise(sharp[0], Settings())["operating_point"]
    assert op["calibrated"] is False and op["applies"] is True
    assert op["name"] == "uncalibrated-defaults" and op["note"].startswith("uncalibrated defaults")


def test_transfer_sharp_to_broad(
    tmp_path: Path, sharp_result: dict[str, Any], broad: list[Slide], small_slides: Settings
) -> None:
    """Calibrated on the sharp cohort, applied to the broad one (other NILM tail, fainter lesions)."""
    written = write_calibration(sharp_result, tmp_path / "op")
    settings = load_settings(config=written["preset"], overrides=SMALL_SLIDES)
    high = sharp_result["target"]["high_grade"]
    shares = kept_shares(broad, settings, high)
    assert shares["hsil_plus"] == 1.0
    assert shares["ascus_plus"] >= 0.98
    defaults = kept_shares(broad, small_slides, high)
    assert defaults["ascus_plus"] < 0.98  # the uncalibrated default misses low-grade slides of this kind
    # The same check without re-screening: --validate on the broad batch screened with the preset.
    out, diagnoses = write_batch(tmp_path / "broad", broad, settings)
    val = validate_operating_point(out, diagnoses, written["preset"])
    assert val["kind"] == "validation"
    assert val["holds"]["hsil_plus"] and val["holds"]["ascus_plus"]  # (the priority share need not hold)
    assert val["sensitivity"]["ascus_plus"]["value"] == pytest.approx(shares["ascus_plus"])
    assert val["negatives_set_aside"]["value"] == pytest.approx(shares["nilm_set_aside"])
    # The share of negatives set aside does not transfer: the broad NILM tail reaches higher.
    assert val["negatives_set_aside"]["value"] < sharp_result["negatives_set_aside"]["value"]


def test_transfer_failure_is_reported(
    tmp_path: Path,
    sharp_batch: tuple[Path, Path],
    broad: list[Slide],
    small_slides: Settings,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Calibrated on the broad cohort, the threshold is too high for the sharp one: validation says so."""
    out, diagnoses = write_batch(tmp_path / "broad", broad, small_slides)
    res = calibrate(out, diagnoses)
    assert all(res["holds"].values())
    preset = write_calibration(res, tmp_path / "op")["preset"]
    val = validate_operating_point(*sharp_batch, preset)
    assert val["holds"]["ascus_plus"] is False and val["misses"]
    code, _, err = _cli(
        [
            "calibrate",
            str(sharp_batch[0]),
            "--diagnoses",
            str(sharp_batch[1]),
            "--validate",
            str(preset),
            "-o",
            str(tmp_path / "val"),
        ],
        capsys,
    )
    assert code == 1 and _one_error(err).count("misses its ascus_plus target") == 1
    assert (tmp_path / "val" / "validation.html").is_file()


def test_html_is_self_contained(sharp_result: dict[str, Any], tmp_path: Path) -> None:
    page = write_calibration(sharp_result, tmp_path)["html"].read_text()
    assert "<svg" in page and "<polyline" in page and "AUROC" in page
    assert "<script" not in page.lower() and "http://" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    assert "https://" not in page
    assert sharp_result["operating_point"]["name"] in page


def test_cli_calibrate(
    tmp_path: Path, sharp_batch: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out, diagnoses = sharp_batch
    code, stdout, _ = _cli(
        ["calibrate", str(out), "--diagnoses", str(diagnoses), "-o", str(tmp_path / "op"), "--name", "lab-a"],
        capsys,
    )
    assert code == 0
    assert "review_score" in stdout and "lower bound" in stdout and "slide AUROC" in stdout
    data = json.loads((tmp_path / "op" / "calibration.json").read_text())
    assert data["operating_point"]["name"] == "lab-a"
    assert load_settings(config=tmp_path / "op" / PRESET_FILE).operating_point.name == "lab-a"
    code, stdout, _ = _cli(
        [
            "calibrate",
            str(out),
            "--diagnoses",
            str(diagnoses),
            "-o",
            str(tmp_path / "op2"),
            "--json",
            "-q",
            "--ascus-sensitivity",
            "1.0",
            "--priority-sensitivity",
            "0",
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(stdout)
    assert data["target"]["ascus_plus"] == 1.0 and data["sensitivity"]["ascus_plus"]["value"] == 1.0
    assert data["thresholds"]["priority_score"] is None


def test_preset_carries_run_models(tmp_path: Path, sharp: list[Slide], small_slides: Settings) -> None:
    out, diagnoses = write_batch(tmp_path, sharp, small_slides)
    for s in sharp:
        config = {"localization": {"model": "nuclei-test"}, "classification": {"models": ["/lab/cyto-test"]}}
        (out / s.slide_id / "run.json").write_text(json.dumps({"config": config}))
    res = calibrate(out, diagnoses)
    data = yaml.safe_load(write_calibration(res, tmp_path / "op")["preset"].read_text())
    assert data["classification"] == {"models": ["/lab/cyto-test"]}
    assert data["localization"] == {"model": "nuclei-test"}


# -- errors: one line, non-zero exit -----------------------------------------------------------------------
def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    code = exc.value.code
    return (int(code) if isinstance(code, int) else 1), captured.out, captured.err


def _one_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("wsi-screen: ") or "error:" in line.lower()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _cli_error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, _, err = _cli(args, capsys)
    assert code == 1, err
    return _one_error(err)


def _rows(
    n_nilm: int = 30, n_hsil: int = 30, n_lsil: int = 30, **kw: Any
) -> list[tuple[str, str, dict[str, Any]]]:
    rows = [(f"n{i:02d}", "NILM", minimal_summary(0.01 * (i % 30), **kw)) for i in range(n_nilm)]
    rows += [(f"h{i:02d}", "HSIL", minimal_summary(0.5 + 0.01 * (i % 30), **kw)) for i in range(n_hsil)]
    return rows + [(f"l{i:02d}", "LSIL", minimal_summary(0.3 + 0.01 * (i % 30), **kw)) for i in range(n_lsil)]


def test_error_unmatched_diagnoses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, diagnoses = write_minimal(tmp_path, _rows(n_nilm=32))
    text = diagnoses.read_text().replace("n00.svs", "x-1.svs").replace("n01.svs", "x-2.svs")
    diagnoses.write_text(text + "x-3.svs,HSIL\n")
    msg = _cli_error(["calibrate", str(out), "--diagnoses", str(diagnoses)], capsys)
    assert "do not match" in msg
    assert "3 diagnoses name no slide of the batch: 'x-1.svs', 'x-2.svs', 'x-3.svs'" in msg
    assert "2 slides have no diagnosis: 'n00', 'n01'" in msg
    # The library names its parameter; the CLI adds the flag.
    assert "allow_unmatched (--allow-unmatched) uses the matching slides only" in msg
    with pytest.raises(CalibrationError, match="allow_unmatched uses the matching slides only") as info:
        calibrate(out, diagnoses)
    assert "--allow-unmatched" not in str(info.value)
    # --allow-unmatched calibrates on the rest.
    res = calibrate(out, diagnoses, allow_unmatched=True)
    assert res["n_slides"] == {"NILM": 30, "LSIL": 30, "HSIL": 30}


def test_error_too_few_slides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, diagnoses = write_minimal(tmp_path / "a", _rows(n_hsil=12))
    msg = _cli_error(["calibrate", str(out), "--diagnoses", str(diagnoses)], capsys)
    assert "too few HSIL+ slides to calibrate: 12 (HSIL 12), at least 29 needed" in msg
    assert f"≥ {0.05 ** (1 / 12):.3f}" in msg
    assert "(the target's min_lower_bound (--min-lower-bound) sets the bound asked for)" in msg
    # A weaker bound asks for fewer slides: 0.75 needs 11.
    code, _, _ = _cli(
        [
            "calibrate",
            str(out),
            "--diagnoses",
            str(diagnoses),
            "--min-lower-bound",
            "0.75",
            "-o",
            str(tmp_path / "o"),
        ],
        capsys,
    )
    assert code == 0
    out, diagnoses = write_minimal(tmp_path / "b", _rows(n_nilm=10))
    msg = _cli_error(["calibrate", str(out), "--diagnoses", str(diagnoses)], capsys)
    assert "too few NILM slides to calibrate: 10, at least 29 needed" in msg


def test_error_mixed_models(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = _rows()
    rows[5] = (rows[5][0], rows[5][1], minimal_summary(0.05, models=OTHER_MODELS))
    out, diagnoses = write_minimal(tmp_path, rows)
    msg = _cli_error(["calibrate", str(out), "--diagnoses", str(diagnoses)], capsys)
    assert "screened with different models" in msg
    assert (
        "89 with nuclei-test" in msg
        and "1 with nuclei-test (aaaaaaaaaaaa) + cyto-other (cccccccccccc)" in msg
    )
    assert "'n05'" in msg


def test_error_mixed_rules(tmp_path: Path) -> None:
    rows = _rows()
    rows[3] = (rows[3][0], rows[3][1], minimal_summary(0.05, triage=TriageSettings(top_k=5)))
    with pytest.raises(
        CalibrationError, match=r"different triage rules: triage.top_k is 10 for slide 'h00' and 5 for 'n03'"
    ):
        calibrate(*write_minimal(tmp_path, rows))


def test_error_unknown_label_and_conflicts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, diagnoses = write_minimal(tmp_path, _rows())
    diagnoses.write_text(diagnoses.read_text().replace("n03.svs,NILM", "n03.svs,CIN3"))
    msg = _cli_error(["calibrate", str(out), "--diagnoses", str(diagnoses)], capsys)
    assert "line 5: unknown label 'CIN3'" in msg
    diagnoses.write_text("slide,diagnosis\nn00.svs,NILM\nn00,HSIL\n")
    with pytest.raises(CalibrationError, match="'NILM' on line 2 and 'HSIL' on line 3"):
        calibrate(out, diagnoses)
    diagnoses.write_text("slide,result\nn00.svs,NILM\n")
    with pytest.raises(EvaluationError, match="has no 'diagnosis' or 'label' column"):
        calibrate(out, diagnoses)
    msg = _cli_error(
        ["calibrate", str(out), "--diagnoses", str(diagnoses), "--high-grade", "HSIL,CIN2"], capsys
    )
    assert "high_grade (--high-grade): 'CIN2' is not an abnormal Bethesda diagnosis" in msg


def test_error_summary_without_models(tmp_path: Path) -> None:
    rows = _rows()
    no_models = minimal_summary(0.05)
    del no_models["versions"]
    rows[0] = (rows[0][0], rows[0][1], no_models)
    with pytest.raises(CalibrationError, match="names no models"):
        calibrate(*write_minimal(tmp_path, rows))


def test_error_applying_with_other_models(
    tmp_path: Path, sharp_result: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    preset = write_calibration(sharp_result, tmp_path / "op")["preset"]
    op = load_settings(config=preset).operating_point
    op.check_models(MODELS)  # the calibrated models pass
    with pytest.raises(ConfigError, match="was calibrated with localization nuclei-test"):
        op.check_models(OTHER_MODELS)
    OperatingPointSettings().check_models(OTHER_MODELS)  # uncalibrated: any model
    # `wsi-screen batch --config` refuses before screening anything: the shipped models are not these.
    scans = tmp_path / "scans"
    scans.mkdir()
    msg = _cli_error(["batch", str(scans), "-o", str(tmp_path / "res"), "--config", str(preset)], capsys)
    assert "was calibrated with localization nuclei-test (aaaaaaaaaaaa)" in msg and "but this run uses" in msg
    # --validate on a batch screened with other models.
    rows = _rows(models=OTHER_MODELS)
    out, diagnoses = write_minimal(tmp_path / "other", rows)
    msg = _cli_error(
        ["calibrate", str(out), "--diagnoses", str(diagnoses), "--validate", str(preset)], capsys
    )
    assert (
        "were screened with nuclei-test" in msg
        and "cyto-other" in msg
        and "do not hold for other models" in msg
    )


def test_preset_validation_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"priority_score .* must not be below review_score"):
        load_settings(overrides={"triage.review_score": 0.5, "triage.priority_score": 0.4})
    bad = tmp_path / "bad.yaml"
    bad.write_text("operating_point:\n  calibrated: true\n  name: x\n")
    with pytest.raises(ConfigError, match="a calibrated operating point needs review_score, target"):
        load_settings(config=bad)


@pytest.mark.slow
def test_load_models_refuses_other_models(sharp_result: dict[str, Any], tmp_path: Path) -> None:
    """`run` goes through load_models: a calibrated preset refuses the shipped (other) bundles."""
    from wsi_screen.pipeline import load_models

    preset = write_calibration(sharp_result, tmp_path / "op")["preset"]
    settings = load_settings(config=preset, overrides={"runtime.device": "cpu"})
    with pytest.raises(ConfigError, match="but this run uses localization nuclei-unet-v3"):
        load_models(settings)
