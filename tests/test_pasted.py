"""Crop folders evaluated as screening sees them (``wsi_screen.train.pasted``) and pooled class metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.classifier_helpers import ThresholdLocalizer, tiny_classifier_bundle
from wsi_screen.cells import abnormality_score
from wsi_screen.classify import CellClassifier
from wsi_screen.config import load_settings
from wsi_screen.train.cell_slides import CellSlide, LabelledCell, foreground_label, label_detections
from wsi_screen.train.classifier import evaluate_bundles, pool_absent_classes
from wsi_screen.train.data import CropSet, pipeline_cells
from wsi_screen.train.pasted import screen_cells

CPU = torch.device("cpu")
CLASSES = ["NILM", "ASC-US", "LSIL", "HSIL", "SCC", "organism", "artifact"]
ABNORMAL = ["ASC-US", "LSIL", "HSIL", "SCC"]


def test_absent_classes_pool_by_triage_group_and_into_nilm() -> None:
    # Herlev: NILM, LSIL, HSIL present.
    got = pool_absent_classes(CLASSES, ["NILM", "LSIL", "HSIL"], ABNORMAL)
    assert got == {"ASC-US": "LSIL", "SCC": "HSIL", "organism": "NILM", "artifact": "NILM"}
    # Only low-grade abnormal present: a high-grade class goes to the most severe present one.
    assert pool_absent_classes(CLASSES, ["NILM", "ASC-US"], ABNORMAL)["HSIL"] == "ASC-US"
    # Two present classes of one group: the more severe takes the absent one.
    assert pool_absent_classes(
        ["NILM", "ASC-H", "HSIL", "SCC"], ["NILM", "ASC-H", "SCC"], ["ASC-H", "HSIL", "SCC"]
    ) == {"HSIL": "SCC"}
    # No negative class present: the negatives have nowhere to go and are left out.
    assert pool_absent_classes(CLASSES, ["HSIL"], ABNORMAL) == {
        "ASC-US": "HSIL",
        "LSIL": "HSIL",
        "SCC": "HSIL",
    }
    # Without NILM the first present negative class takes them.
    assert pool_absent_classes(["NILM", "organism", "HSIL"], ["organism", "HSIL"], ["HSIL"]) == {
        "NILM": "organism"
    }


def _bundle(tmp_path: Path, name: str = "b") -> Any:
    return tiny_classifier_bundle(tmp_path / name, CLASSES, ABNORMAL)


def _auroc(score: np.ndarray, positive: np.ndarray) -> float:
    pos, neg = score[positive], score[~positive]
    return float(
        ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum())
        / (len(pos) * len(neg))
    )


def test_pooled_metrics_keep_the_screening_score(tmp_path: Path) -> None:
    bundle = _bundle(tmp_path)
    rng = np.random.default_rng(0)
    labels = np.array([0] * 12 + [1] * 12)
    data = CropSet(
        crops=rng.integers(0, 256, (24, 64, 64, 3), dtype=np.uint8),
        labels=labels,
        groups=np.array([f"g{i}" for i in range(24)]),
        class_names=["NILM", "HSIL"],
        mpp=0.25,
        sources=np.array(["s"] * 24),
    )
    raw = CellClassifier([bundle], device=CPU).predict(torch.from_numpy(data.crops)).numpy()
    score = abnormality_score(raw, CLASSES, ABNORMAL)
    pooled = evaluate_bundles([bundle.path], data, device="cpu")
    assert pooled["class_names"] == ["NILM", "HSIL"]
    assert pooled["evaluation"]["pooled_into"] == {
        "ASC-US": "HSIL",
        "LSIL": "HSIL",
        "SCC": "HSIL",
        "organism": "NILM",
        "artifact": "NILM",
    }
    # The needs-review score is the bundle's summed abnormal probability (float64 sums of float32
    # probabilities: the AUROC ranks the same values, so it is equal up to ties at ~1e-7).
    assert pooled["needs_review"]["auroc"] == pytest.approx(_auroc(score, labels == 1), abs=1e-9)
    present = evaluate_bundles([bundle.path], data, classes="present", device="cpu")
    assert present["evaluation"]["pooled_into"] == {}
    # The report says how absent classes were counted.
    from wsi_screen.metrics import write_metrics_report

    page = write_metrics_report(pooled, tmp_path / "report", title="t")["html"].read_text()
    assert "counted as present ones: ASC-US as HSIL, LSIL as HSIL" in page


def _cells(n_disc: int) -> list[LabelledCell]:
    """Cells (30 µm of pale cytoplasm around a dark nucleus of two sizes) on glass, which cell-region
    detection and the stand-in localizer find, and one crop of glass alone."""
    out = []
    rng = np.random.default_rng(1)
    side = 160
    yy, xx = np.mgrid[:side, :side]
    r2 = (xx - side / 2) ** 2 + (yy - side / 2) ** 2
    for i in range(n_disc):
        d = 16.0 if i % 2 else 26.0
        img = np.full((side, side, 3), 236, np.uint8)
        img[r2 <= 60**2] = (180, 150, 190)
        img[r2 <= (d / 2) ** 2] = (60, 40, 90)
        img = np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
        klass = "HSIL" if i % 2 == 0 else "NILM"
        out.append(LabelledCell(f"c{i}", klass, "t", img, foreground_label(img), 0.25, False))
    glass = np.full((side, side, 3), 236, np.uint8)
    out.append(LabelledCell("blank", "NILM", "t", glass, np.zeros((side, side), np.uint8), 0.25, False))
    return out


def test_screen_cells_scores_each_cell_by_its_most_abnormal_detection(tmp_path: Path) -> None:
    clf = CellClassifier([_bundle(tmp_path)], device=CPU)
    cells = _cells(8)
    settings = load_settings()
    work = tmp_path / "slides"
    res = screen_cells(
        cells,
        [f"g{i}" for i in range(len(cells))],
        classifier=clf,
        localizer=ThresholdLocalizer(),  # type: ignore[arg-type]
        settings=settings,
        target=None,
        work_dir=work,
        progress=False,
    )
    assert res.names == [c.name for c in cells] and res.labels == [c.klass for c in cells]
    assert res.groups[3] == "g3" and res.class_names == CLASSES
    assert res.detected[:-1].all() and not res.detected[-1]
    # Glass alone is never found: all its mass on the negative class, as screening never shows it.
    np.testing.assert_array_equal(res.probs[-1], np.eye(len(CLASSES), dtype=np.float32)[0])
    assert res.detections[-1] == 0
    # Each found cell carries the probabilities of its most abnormal detection: recompute them from
    # the kept slide (same code path, same crops: exact).
    slides = sorted(work.glob("pasted-*.tiff"))
    assert len(slides) == 1
    table, crops = pipeline_cells(slides[0], localizer=ThresholdLocalizer(), settings=settings, size=64)  # type: ignore[arg-type]
    probs = clf.predict(torch.from_numpy(crops)).numpy()
    score = abnormality_score(probs, CLASSES, ABNORMAL)
    truth = CellSlide.load_truth(slides[0].with_suffix(".truth.npz"))
    _, _, where = label_detections(table.x, table.y, truth)
    for i, cell in enumerate(cells[:-1]):
        j = truth.names.index(cell.name)
        mine = np.flatnonzero(where == j)
        assert len(mine) == res.detections[i] >= 1
        np.testing.assert_array_equal(res.probs[i], probs[mine[np.argmax(score[mine])]])


@pytest.mark.slow
def test_evaluate_cli_cuts_crop_folders_through_the_pipeline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.test_train_classifier import _write_crop_folder
    from wsi_screen.cli.main import main

    data = _write_crop_folder(tmp_path / "crops", n_groups=2, per_group=3, side=96)
    out = {}
    for cut in ("pipeline", "crop"):
        keep = ["--keep-slides", str(tmp_path / "kept")] if cut == "pipeline" else []
        with pytest.raises(SystemExit) as exc:
            main(
                [
                    "-q",
                    "evaluate",
                    "--model",
                    "cyto-synth-v1",
                    "--data",
                    str(data),
                    "--mpp",
                    "0.25",
                    "--cut",
                    cut,
                    "--json",
                    *keep,
                ]
            )
        captured = capsys.readouterr()
        assert (exc.value.code or 0) == 0, captured.err
        out[cut] = json.loads(captured.out)
    pipe = out["pipeline"]
    assert pipe["n"] == 12 and pipe["class_names"] == ["NILM", "HSIL"]
    screened = pipe["evaluation"]["screened_cells"]
    assert screened["n"] == 12 and 0 <= screened["detected"] <= 12
    assert pipe["evaluation"]["data"]["cut"] == "pipeline"
    found = screened["detected_by_class"]
    assert set(found) == {"NILM", "HSIL"} and found["NILM"][1] == found["HSIL"][1] == 6
    assert sum(k for k, _ in found.values()) == screened["detected"]
    kept = sorted((tmp_path / "kept").glob("*/pasted-*.tiff"))
    assert len(kept) == 1 and kept[0].with_suffix(".truth.npz").is_file()
    assert "screened_cells" not in out["crop"]["evaluation"] and out["crop"]["n"] == 12


def test_pasted_crops_keep_up_to_per_cell_detections_labelled_by_their_cell() -> None:
    from wsi_screen.train.pasted import pasted_crops

    cells = _cells(6)
    groups = [f"patient{i // 2}" for i in range(len(cells))]
    data = pasted_crops(
        cells,
        groups,
        localizer=ThresholdLocalizer(),  # type: ignore[arg-type]
        settings=load_settings(),
        size=64,
        per_cell=2,
        progress=False,
    )
    assert data.class_names == ["NILM", "HSIL"] and data.size == 64 and data.channels == 3
    by_cell = {c.name: c for c in cells}
    sources = data.sources.tolist()
    # Every found cell gives 1–2 crops, each labelled with its cell's class and group; glass gives none.
    assert set(sources) == {c.name for c in cells[:-1]}
    for name in set(sources):
        rows = [i for i, s in enumerate(sources) if s == name]
        assert 1 <= len(rows) <= 2
        assert {data.class_names[data.labels[i]] for i in rows} == {by_cell[name].klass}
        assert {data.groups[i] for i in rows} == {groups[[c.name for c in cells].index(name)]}
    # The crop is centred on a nucleus: darker in the middle than at its border.
    mid = data.crops[:, 28:36, 28:36].astype(np.float32).mean(axis=(1, 2, 3))
    rim = data.crops[:, :4].astype(np.float32).mean(axis=(1, 2, 3))
    assert (mid < rim - 40).all()
    with pytest.raises(ValueError, match="per_cell"):
        pasted_crops(cells, groups, localizer=ThresholdLocalizer(), settings=load_settings(), per_cell=0)  # type: ignore[arg-type]


def test_collect_crops_cuts_crop_folders_through_the_pipeline_with_a_mask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    import wsi_screen.localize as localize_module
    from wsi_screen.train.data import collect_crops

    for c in _cells(4)[:-1]:
        (tmp_path / "crops" / c.klass).mkdir(parents=True, exist_ok=True)
        Image.fromarray(c.rgb).save(tmp_path / "crops" / c.klass / f"{c.name}.png")
    # The stand-in localizer instead of the settings' U-Net (no weights needed).
    monkeypatch.setattr(localize_module, "Localizer", lambda *a, **k: ThresholdLocalizer())
    data = collect_crops(
        data=[tmp_path / "crops"], mpp=0.25, size=64, cut="pipeline", mask_channel=True, progress=False
    )
    assert len(data) >= 3 and data.channels == 4 and data.info["cut"] == "pipeline"
    assert set(data.class_names) == {"NILM", "HSIL"}
    assert (data.crops[..., 3] > 0).any()  # the nucleus mask channel is drawn
    with pytest.raises(Exception, match="crop folder has no nucleus mask"):
        collect_crops(data=[tmp_path / "crops"], mpp=0.25, size=64, mask_channel=True, progress=False)


@pytest.mark.slow
def test_train_cli_cut_pipeline_records_the_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    import wsi_screen.localize as localize_module
    from wsi_screen.cli.main import main

    for c in _cells(7)[:-1]:
        (tmp_path / "crops" / c.klass).mkdir(parents=True, exist_ok=True)
        Image.fromarray(c.rgb).save(tmp_path / "crops" / c.klass / f"{c.name}.png")
    monkeypatch.setattr(localize_module, "Localizer", lambda *a, **k: ThresholdLocalizer())
    out = tmp_path / "bundle"
    args = [
        "-q",
        "train",
        "classifier",
        "--data",
        str(tmp_path / "crops"),
        "--mpp",
        "0.25",
        "--cut",
        "pipeline",
    ]
    args += ["-o", str(out), "--epochs", "1", "--input-size", "64", "--arch", "mobilenetv3_small_050"]
    with pytest.raises(SystemExit) as exc:
        main([*args, "--batch-size", "8"])
    assert (exc.value.code or 0) == 0, capsys.readouterr().err
    data = json.loads((out / "bundle.json").read_text())["training"]["data"]
    assert (
        data["cut"] == "pipeline"
        and data["cells"] == 7
        and data["localization"] == {"name": "ThresholdLocalizer"}
    )
