"""Slide-level evaluation of a batch output directory against a labels CSV, and its command."""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from wsi_screen.cli.main import main
from wsi_screen.evaluation import EvaluationError, evaluate_slides, normalize_label

# slide id: (triage, score, label in the CSV)
SLIDES: dict[str, tuple[str, float, str]] = {
    "n1": ("negative", 0.05, "NILM"),
    "n2": ("negative", 0.10, "negative"),
    "n3": ("review", 0.60, "nilm"),
    "n4": ("negative", 0.30, "NILM"),
    "a1": ("review", 0.55, "asc-us"),
    "l1": ("negative", 0.20, "LSIL"),
    "h1": ("priority", 0.90, "HSIL"),
    "h2": ("review", 0.25, "hsil"),
    "ah1": ("review", 0.35, "ASC H"),
    "u1": ("unsatisfactory", 0.00, "NILM"),  # triage unsatisfactory: counted apart
    "x1": ("negative", 0.15, "Unsat"),  # labelled unsatisfactory: excluded
    "nolabel": ("negative", 0.12, ""),  # output without a label row
}


@pytest.fixture(autouse=True)
def _drop_cli_log_handlers() -> Iterator[None]:
    yield
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_wsi_screen", False):
            root.removeHandler(h)


def _write_summary(out: Path, slide_id: str, triage: str, score: float) -> None:
    (out / slide_id).mkdir(parents=True)
    summary = {"triage": triage, "score": score, "suggested_category": "NILM", "class_counts": {}}
    (out / slide_id / "summary.json").write_text(json.dumps(summary))


def _write_csv(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _make_batch(tmp_path: Path, *, with_batch_csv: bool) -> tuple[Path, Path]:
    out = tmp_path / "out"
    out.mkdir()
    rows = []
    for sid, (triage, score, _) in SLIDES.items():
        _write_summary(out, sid, triage, score)
        rows.append([f"/scans/{sid}.svs", sid, "ok", ""])
    if with_batch_csv:
        rows.append(["/scans/f1.svs", "f1", "error", "corrupt tile at level 0"])  # failed: no folder
        _write_csv(out / "batch.csv", ["slide", "slide_id", "status", "error"], rows)
    labels = [[f"{sid}.svs", lab] for sid, (_, _, lab) in SLIDES.items() if sid != "nolabel"]
    labels[6][0] = "H1.SVS"  # matched regardless of case
    labels += [["zz.svs", "HSIL"], ["f1.svs", "LSIL"], ["", ""]]
    return out, _write_csv(tmp_path / "labels.csv", ["Slide", " Label "], labels)


@pytest.mark.parametrize("with_batch_csv", [True, False])
def test_evaluate_slides_hand_checked(tmp_path: Path, with_batch_csv: bool) -> None:
    out, labels = _make_batch(tmp_path, with_batch_csv=with_batch_csv)
    m = evaluate_slides(out, labels)
    json.dumps(m, allow_nan=False)
    assert m["kind"] == "slide_evaluation"
    # 9 satisfactory slides: NILM n1 .05, n2 .10, n3 .60 (review), n4 .30;
    # abnormal a1 .55 (review), l1 .20 (negative), h1 .90, h2 .25, ah1 .35 (HSIL+ = h1, h2, ah1)
    assert m["n_evaluated"] == 10 and m["n_satisfactory"] == 9
    assert m["counts_by_label"] == {"NILM": 5, "ASC-US": 1, "LSIL": 1, "ASC-H": 1, "HSIL": 2}
    t = m["triage"]
    # abnormal in review: a1, h1, h2, ah1 = 4 of 5 (l1 missed); NILM negative: 3 of 4 (n3 reviewed)
    assert (t["tp"], t["fn"], t["tn"], t["fp"]) == (4, 1, 3, 1)
    assert t["sensitivity"] == pytest.approx(0.8)
    assert t["specificity"] == pytest.approx(0.75)
    assert t["hsil_plus"] == {"n": 3, "n_review": 3, "n_priority": 1, "sensitivity": 1.0}
    r = m["ranking"]
    # abnormal vs NILM pairs won: a1 3, l1 2, h1 4, h2 2, ah1 3 → 14 / (5·4)
    assert r["auroc"] == pytest.approx(0.7)
    # HSIL+ vs NILM: h1 4, h2 2, ah1 3 → 9 / (3·4)
    assert r["auroc_hsil_plus"] == pytest.approx(0.75)
    assert r["roc"]["fpr"][0] == 0.0 and r["roc"]["thresholds"][0] is None  # +inf → null
    hp = m["set_aside"]["hsil_plus_100"]
    # lowest HSIL+ score: h2 .25; strictly below: n1 .05, n2 .10, l1 .20 → 3 of 9
    assert hp["threshold"] == pytest.approx(0.25)
    assert (hp["n_set_aside"], hp["n_slides"]) == (3, 9)
    assert hp["fraction"] == pytest.approx(3 / 9)
    assert (hp["n_nilm_set_aside"], hp["n_abnormal_set_aside"], hp["n_hsil_plus_set_aside"]) == (2, 1, 0)
    assert hp["sensitivity"] == pytest.approx(0.8) and hp["hsil_plus_sensitivity"] == 1.0
    ab = m["set_aside"]["abnormal_100"]
    # lowest abnormal: l1 .20; below: n1, n2 → 2 of 9
    assert ab["threshold"] == pytest.approx(0.2) and ab["n_set_aside"] == 2
    assert ab["sensitivity"] == 1.0
    # 95 % of 5 abnormal slides rounds up to all 5: same threshold as 100 %
    assert m["set_aside"]["abnormal_95"]["n_set_aside"] == 2
    assert m["unsatisfactory"] == {"n": 1, "by_label": {"NILM": 1}, "slides": ["u1"]}
    assert m["triage_by_label"]["NILM"] == {"negative": 3, "review": 1, "priority": 0, "unsatisfactory": 1}
    assert [e["slide"] for e in m["excluded"]] == ["x1"]
    assert [e["slide"] for e in m["missing_label"]] == ["nolabel"]
    missing = {e["slide"]: e for e in m["missing_output"]}
    if with_batch_csv:
        assert set(missing) == {"zz.svs", "f1"}
        assert "corrupt tile" in missing["f1"]["reason"] and missing["f1"]["label"] == "LSIL"
    else:
        assert set(missing) == {"zz.svs", "f1.svs"}
    assert missing["zz.svs"]["label"] == "HSIL"
    assert [s["slide_id"] for s in m["slides"][:2]] == ["h1", "n3"]  # ranked by score


def test_set_aside_at_95_percent(tmp_path: Path) -> None:
    out = tmp_path / "out"
    rows = []
    abnormal = [round(0.50 + i / 100, 2) for i in range(20)]  # 0.50 … 0.69, all LSIL
    nilm = [0.1, 0.2, 0.3, 0.4, 0.505, 0.6, 0.7]
    for i, s in enumerate(abnormal):
        _write_summary(out, f"a{i}", "review", s)
        rows.append([f"a{i}", "LSIL"])
    for i, s in enumerate(nilm):
        _write_summary(out, f"n{i}", "negative", s)
        rows.append([f"n{i}", "NILM"])
    m = evaluate_slides(out, _write_csv(tmp_path / "l.csv", ["slide", "label"], rows))
    a100, a95 = m["set_aside"]["abnormal_100"], m["set_aside"]["abnormal_95"]
    # 100 %: threshold 0.50 → NILM 0.1 … 0.4 set aside: 4 of 27
    assert a100["threshold"] == pytest.approx(0.50) and a100["n_set_aside"] == 4
    # 95 %: ceil(0.95·20) = 19 kept → threshold = 19th highest = 0.51 → 5 NILM + a0 (0.50) = 6 of 27
    assert a95["threshold"] == pytest.approx(0.51)
    assert a95["n_set_aside"] == 6 and a95["fraction"] == pytest.approx(6 / 27)
    assert a95["sensitivity"] == pytest.approx(0.95)
    # no HSIL+ slide: the HSIL+ figure is undefined, not 100 %
    assert m["set_aside"]["hsil_plus_100"]["fraction"] is None
    assert m["ranking"]["auroc_hsil_plus"] is None


def test_normalize_label() -> None:
    assert normalize_label(" asc_us ") == "ASC-US"
    assert normalize_label("Negative") == "NILM"
    assert normalize_label("ASC-H") == "ASC-H"
    assert normalize_label("agc-nos") == "AGC"
    assert normalize_label("CIN2") is None


def test_errors(tmp_path: Path) -> None:
    out, labels = _make_batch(tmp_path, with_batch_csv=False)
    with pytest.raises(EvaluationError, match="does not exist"):
        evaluate_slides(out, tmp_path / "nope.csv")
    with pytest.raises(FileNotFoundError):
        evaluate_slides(tmp_path / "no-out", labels)
    bad = _write_csv(tmp_path / "bad.csv", ["slide", "diagnosis"], [["n1", "NILM"]])
    with pytest.raises(EvaluationError, match="no 'label' column"):
        evaluate_slides(out, bad)
    unknown = _write_csv(tmp_path / "unk.csv", ["slide", "label"], [["n1", "NILM"], ["n2", "CIN3"]])
    with pytest.raises(EvaluationError, match=r"line 3: unknown label 'CIN3'"):
        evaluate_slides(out, unknown)
    clash = _write_csv(tmp_path / "clash.csv", ["slide", "label"], [["n1", "NILM"], ["n1.svs", "HSIL"]])
    with pytest.raises(EvaluationError, match="'NILM' on line 2 and 'HSIL' on line 3"):
        evaluate_slides(out, clash)
    nomatch = _write_csv(tmp_path / "nomatch.csv", ["slide", "label"], [["other.svs", "NILM"]])
    with pytest.raises(EvaluationError, match="no labelled slide has a usable output"):
        evaluate_slides(out, nomatch)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvaluationError, match="no slide results"):
        evaluate_slides(empty, labels)


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    code = exc.value.code
    return int(code) if isinstance(code, int) else 1, captured.out, captured.err


def test_cli_evaluate_slides(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, labels = _make_batch(tmp_path, with_batch_csv=True)
    rep = tmp_path / "rep"
    code, stdout, _ = _cli(["evaluate-slides", str(out), "--labels", str(labels), "-o", str(rep)], capsys)
    assert code == 0
    assert "no further review, all HSIL+ kept" in stdout and "33.3% (3/9)" in stdout
    assert "80.0% (4/5)" in stdout  # triage sensitivity
    assert {p.name for p in rep.iterdir()} == {"metrics.json", "roc.png", "report.html"}
    data: dict[str, Any] = json.loads((rep / "metrics.json").read_text())
    assert data["set_aside"]["hsil_plus_100"]["n_set_aside"] == 3
    page = (rep / "report.html").read_text()
    assert "data:image/png;base64," in page and "corrupt tile" in page

    code, stdout, _ = _cli(["evaluate-slides", str(out), "--labels", str(labels), "--json", "-q"], capsys)
    assert code == 0 and json.loads(stdout)["n_evaluated"] == 10


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_csv", "does not exist"),
        ("no_label_column", "has no 'label' column (found: slide, diagnosis)"),
        ("empty_out", "no slide results in"),
        ("empty_csv", "is empty"),
    ],
)
def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, message: str) -> None:
    out, labels = _make_batch(tmp_path, with_batch_csv=False)
    if case == "missing_csv":
        labels = tmp_path / "missing.csv"
    elif case == "no_label_column":
        labels = _write_csv(tmp_path / "bad.csv", ["slide", "diagnosis"], [["n1", "NILM"]])
    elif case == "empty_out":
        out = tmp_path / "empty"
        out.mkdir()
    else:
        labels = tmp_path / "blank.csv"
        labels.write_text("\n")
    code, stdout, stderr = _cli(["evaluate-slides", str(out), "--labels", str(labels)], capsys)
    assert code == 1
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("wsi-screen: error: ")
    assert message in lines[0]


def test_semicolon_csv_with_bom(tmp_path: Path) -> None:
    out = tmp_path / "out"
    _write_summary(out, "s1", "review", 0.8)
    _write_summary(out, "s2", "negative", 0.1)
    labels = tmp_path / "labels.csv"
    labels.write_text("\ufeffSLIDE;Label;comment\ns1.mrxs;HSIL;x\ns2.mrxs;NILM;y\n", encoding="utf-8")
    m = evaluate_slides(out, labels)
    assert m["n_evaluated"] == 2 and m["triage"]["sensitivity"] == 1.0 and m["triage"]["specificity"] == 1.0
    # one HSIL+ slide at 0.8: the NILM slide at 0.1 is set aside
    assert m["set_aside"]["hsil_plus_100"]["fraction"] == pytest.approx(0.5)
