"""Real-nucleus training data: the split manifest, composed fields, multi-source training with
checkpoint/resume, Wilson intervals and the real-cell slide scorer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pipeline_scripts import load_pipeline

from wsi_screen.metrics import wilson_interval
from wsi_screen.train.fields import CropCell, compose_fields, fold_manifest, read_split_manifest, split_names
from wsi_screen.train.unet import (
    AnnotatedImage,
    ImageSource,
    TrainingDataError,
    TrainingPaused,
    UNetRecipe,
    train_unet,
)

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "pipelines" / "splits" / "real.json"


# -- split manifest ------------------------------------------------------------------------------------


def test_manifest_keeps_every_group_in_one_part() -> None:
    m = read_split_manifest(MANIFEST)
    for source in ("herlev", "herlev_severe_fine", "lbc_nuclei", "cnseg", "isbi2014", "lbc_cells"):
        parts_of_group: dict[str, set[str]] = {}
        for v in m["sources"][source]["files"].values():
            parts_of_group.setdefault(v["group"], set()).add(v["split"])
        assert all(len(p) == 1 for p in parts_of_group.values()), source
        for part in ("train", "val", "test"):
            assert split_names(m, source, part), f"{source} has an empty {part} part"
    # The 128² severe-dysplasia crops follow the Herlev group of the same cell.
    herlev_part = {v["group"]: v["split"] for v in m["sources"]["herlev"]["files"].values()}
    for v in m["sources"]["herlev_severe_fine"]["files"].values():
        if v["group"] in herlev_part:
            assert v["split"] == herlev_part[v["group"]]
    # CNSeg's distorted copies share the part of their field.
    cn = m["sources"]["cnseg"]["files"]
    assert cn["clustered/barrdistorted_103_0.3_0.3_10005.png"]["split"] == cn["clustered/10005.png"]["split"]
    with pytest.raises(TrainingDataError, match="unknown split part"):
        split_names(m, "herlev", "holdout")
    with pytest.raises(TrainingDataError, match="no source"):
        split_names(m, "sipakmed", "train")


def test_committed_manifest_is_current(shared_data: Path) -> None:
    """The committed manifest is exactly what pipelines/make_splits.py builds from the shared data."""
    make_splits = load_pipeline("make_splits")
    built = json.dumps(make_splits.build(shared_data), indent=1, ensure_ascii=False) + "\n"
    assert built == MANIFEST.read_text()


def test_fold_manifests_hold_out_every_herlev_group_exactly_once() -> None:
    """Grouped CV folds: each Herlev unit in test once, a group (severe-fine crops included) in one part."""
    m = read_split_manifest(MANIFEST)
    herlev_sources = ("herlev", "herlev_severe_fine")
    folds = [fold_manifest(m, folds=3, fold=k) for k in range(3)]
    for src in herlev_sources:
        keys = set(m["sources"][src]["files"])
        tested = [set(split_names(f, src, "test")) for f in folds]
        assert set().union(*tested) == keys
        assert sum(len(t) for t in tested) == len(keys)  # disjoint
    for f in folds:
        part_of_group: dict[str, set[str]] = {}
        for src in herlev_sources:
            for v in f["sources"][src]["files"].values():
                part_of_group.setdefault(v["group"], set()).add(v["split"])
        assert all(len(parts) == 1 for parts in part_of_group.values())
        assert all(split_names(f, "herlev", part) for part in ("train", "val", "test"))
        # the other sources keep the committed split; the committed manifest itself is not modified
        assert f["sources"]["lbc_nuclei"] == m["sources"]["lbc_nuclei"]
        assert f["counts"]["herlev"]["test"] == len(split_names(f, "herlev", "test"))
    assert m == read_split_manifest(MANIFEST)
    with pytest.raises(TrainingDataError, match="fold=3"):
        fold_manifest(m, folds=3, fold=3)
    with pytest.raises(TrainingDataError, match="at least 2 folds"):
        fold_manifest(m, folds=1, fold=0)


def test_cv_localization_pools_folds_per_class_with_wilson_intervals(tmp_path: Path) -> None:
    """pipelines/cv_localization.py summary: found and nuclei add up over folds, intervals per group."""
    cv = load_pipeline("cv_localization")
    rows = [
        {"normal_superficiel": (3, 4), "light_dysplastic": (5, 5)},
        {"normal_superficiel": (4, 4), "normal_columnar": (2, 3), "light_dysplastic": (6, 7)},
    ]
    for fold, kinds in enumerate(rows):
        d = tmp_path / f"fold-{fold}"
        (d / "stage2").mkdir(parents=True)
        tp = sum(f for f, _ in kinds.values())
        nuclei = sum(n for _, n in kinds.values())
        by_kind = {k: {"found": f, "nuclei": n, "recall": f / n} for k, (f, n) in kinds.items()}
        row = {"recall": tp / nuclei, "precision": tp / (tp + 2), "tp": tp, "detections": tp + 2}
        row |= {"nuclei": nuclei, "dice_median": 0.9, "recall_by_kind": by_kind}
        row |= {"edge_band": {"found": 1, "nuclei": 2}, "interior": {"found": tp - 1, "nuclei": nuclei - 2}}
        row["recall_by_group"] = cv_groups(by_kind)
        (d / "eval.json").write_text(json.dumps({"real": {"herlev": row}}))
        (d / "stage2" / "bundle.json").write_text(json.dumps({"training": {"steps": 10}}))
        (d / "manifest.json").write_text(json.dumps({"counts": {"herlev": {"test": len(kinds)}}}))
    summary = cv.summarize(tmp_path, 2)
    assert summary["recall_by_kind"]["normal_superficiel"]["found"] == 7
    assert summary["recall_by_kind"]["normal_superficiel"]["nuclei"] == 8
    normal = summary["recall_by_group"]["normal"]
    assert (normal["found"], normal["nuclei"]) == (9, 11)
    assert normal["wilson95"] == pytest.approx(wilson_interval(9, 11))
    assert summary["pooled"]["tp"] == 20 and summary["pooled"]["nuclei"] == 23
    assert summary["pooled"]["precision"] == pytest.approx(20 / 24)
    edges = summary["tile_edges"]
    assert edges["edge_band"]["found"] == 2 and edges["interior"]["nuclei"] == 19
    with pytest.raises(SystemExit, match="fold 2"):
        cv.summarize(tmp_path, 3)


def test_score_slide_matches_one_to_one_and_lists_the_misses(tmp_path: Path) -> None:
    """pipelines/eval_localization.py: hits within the 1 µm dilation, over-detection, each miss located."""
    from cellfactory import ABNORMAL, CLASSES, make_cells

    from wsi_screen.store import TILE_DONE, CellStoreWriter
    from wsi_screen.tiling import make_grid

    ev = load_pipeline("eval_localization")
    yy, xx = np.mgrid[:200, :200]
    labels = np.zeros((200, 200), np.uint32)
    centres = {1: (40, 40), 2: (100, 60), 3: (160, 150)}
    for lab, (cx, cy) in centres.items():
        labels[(xx - cx) ** 2 + (yy - cy) ** 2 <= 8**2] = lab
    kinds = np.array(["", "normal_superficiel", "light_dysplastic", "carcinoma_in_situ"])
    np.savez(tmp_path / "t.npz", nuclei=labels, kind=kinds, source=kinds, mpp=0.25)
    # nucleus 1: two detections (one is over-detection); nucleus 2: 3 px outside its mask (inside the
    # 1 µm = 4 px dilation); nucleus 3: the nearest detection 40 px (10 µm) away; one on glass.
    xy = np.array([[40, 40], [42, 41], [111, 60], [160, 110], [10, 190]], np.float64)
    cells = make_cells(["NILM"] * len(xy), xy=xy, size=(200, 200))
    grid = make_grid((200, 200), slide_mpp=0.25, mpp=0.5, tile_size=64)
    with CellStoreWriter(tmp_path / "c.zarr", class_names=CLASSES, abnormal_classes=ABNORMAL) as w:
        w.append(cells)
        w.write_tiles(grid, np.full((grid.rows, grid.cols), TILE_DONE))
    row = ev.score_slide(tmp_path / "c.zarr", tmp_path / "t.npz")
    assert (row["nuclei"], row["tp"], row["detections"]) == (3, 2, 5)
    assert row["precision"] == pytest.approx(2 / 5)
    assert row["recall_by_kind"]["carcinoma_in_situ"]["found"] == 0
    assert row["recall_by_kind"]["light_dysplastic"]["found"] == 1
    (miss,) = row["missed"]
    assert miss["kind"] == "carcinoma_in_situ" and (miss["x"], miss["y"]) == (160.0, 150.0)
    assert miss["area_um2"] == pytest.approx(int((labels == 3).sum()) * 0.25**2, abs=0.05)
    assert miss["nearest_detection_um"] == pytest.approx(10.0)


def test_real_slide_truth_drops_mask_specks_but_keeps_small_nuclei() -> None:
    """pipelines/real_slides.py: a stray speck of the nucleus class is no truth nucleus; a 12 µm² one is."""
    rs = load_pipeline("real_slides")
    lab = np.ones((120, 120), np.uint8)  # a cell filling its crop, at 0.25 µm/px (no resampling)
    yy, xx = np.mgrid[:120, :120]
    lab[(yy - 60) ** 2 + (xx - 60) ** 2 <= 10**2] = 2  # 314 px = 19.6 µm²: a nucleus
    lab[20:24, 20:24] = 2  # 16 px = 1 µm²: mask noise
    small = np.ones((120, 120), np.uint8)
    small[(yy - 60) ** 2 + (xx - 60) ** 2 <= 8**2] = 2  # 197 px = 12.3 µm²: a pyknotic nucleus
    rgb = np.full((120, 120, 3), 150, np.uint8)
    items = [(rgb, lab, "light_dysplastic", 0.25), (rgb, small, "normal_superficiel", 0.25)]
    _, labels, kinds, _, _ = rs.lattice_slide(items, 0, fade_cut=False)
    assert sorted(kinds[1:]) == ["light_dysplastic", "normal_superficiel"]
    areas = np.bincount(labels.ravel())[1:] * rs.SLIDE_MPP**2
    assert len(areas) == 2 and areas.min() > rs.MIN_TRUTH_NUCLEUS_UM2


def cv_groups(by_kind: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """The issue's Herlev groups of a per-class row, as pipelines/eval_localization.py pools them."""
    ev = load_pipeline("eval_localization")
    return dict(ev._herlev_groups({"recall_by_kind": by_kind}))


def test_split_hash_is_stable() -> None:
    """The part of a unit depends on its id only (SHA-256), not on Python's hash seed or the order."""
    make_splits = load_pipeline("make_splits")
    parts = [make_splits.part_of("herlev", str(g)) for g in range(400)]
    assert parts == [make_splits.part_of("herlev", str(g)) for g in range(400)]
    shares = {k: parts.count(k) / len(parts) for k in ("train", "val", "test")}
    assert 0.5 < shares["train"] < 0.7 and 0.08 < shares["val"] < 0.22 and 0.17 < shares["test"] < 0.33


# -- composed fields -----------------------------------------------------------------------------------


def _crop_cell(name: str, *, fills_crop: bool = False) -> CropCell:
    """A 60² crop: a nucleus disc in a cytoplasm disc on a *dark grey* crop background (a box cue)."""
    yy, xx = np.mgrid[0:60, 0:60] + 0.5
    r2 = (yy - 30) ** 2 + (xx - 30) ** 2
    label = np.zeros((60, 60), np.uint8)
    label[r2 <= (40 if fills_crop else 26) ** 2] = 1
    label[r2 <= 8**2] = 2
    rgb = np.full((60, 60, 3), 150, np.uint8)  # crop "glass" far darker than any field glass
    rgb[label == 1] = (120, 110, 160)
    rgb[label == 2] = (60, 40, 110)
    return CropCell(name=name, herlev_class="normal_intermediate", rgb=rgb, label=label)


def test_compose_fields_labels_nuclei_and_leaves_no_crop_box() -> None:
    cells = [_crop_cell("a"), _crop_cell("b")]
    fields = compose_fields(cells, n_fields=4, mpp=0.201, field_px=256, cells_per_field=(3, 3), seed=1)
    assert len(fields) == 4
    for f in fields:
        assert f.rgb.shape == (256, 256, 3) and f.nuclei.shape == (256, 256) and not f.grey
        assert f.cells is not None
        n = int(f.nuclei.max())
        assert 1 <= n <= 3
        areas = np.bincount(f.nuclei.ravel())[1:]
        # A nucleus of radius 8 px at 0.201 µm/px, scaled by U(0.9, 1.1): 160–245 px², or a part
        # of one at the field border.
        assert np.all(areas <= 1.25 * np.pi * 8.8**2)
        # The crop's own dark background never enters: outside the cells the field is glass.
        outside = ~f.cells
        grey = f.rgb[outside].astype(int)
        assert grey.min() > 185
        # Nuclei are dark, glass is bright.
        assert f.rgb[f.nuclei > 0].mean() < f.rgb[outside].mean() - 60
    again = compose_fields(cells, n_fields=4, mpp=0.201, field_px=256, cells_per_field=(3, 3), seed=1)
    assert all(np.array_equal(a.rgb, b.rgb) for a, b in zip(fields, again, strict=True))


def test_compose_fields_fades_cells_cut_by_their_crop() -> None:
    """A cell that fills its crop is faded inside an ellipse: no straight crop edge in the field."""
    cells = [_crop_cell("full", fills_crop=True)]
    f = compose_fields(cells, n_fields=1, mpp=0.201, field_px=200, cells_per_field=(1, 1), seed=3)[0]
    assert f.cells is not None and int(f.nuclei.max()) == 1
    ys, xs = np.nonzero(f.cells)
    box = f.rgb[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].astype(int).sum(axis=2)
    corners = [box[0, 0], box[0, -1], box[-1, 0], box[-1, -1]]
    centre_row = box[box.shape[0] // 2]
    # The corners of the cell's bounding box stay glass-bright; the middle of the box is not.
    assert min(corners) > 3 * 190 and centre_row.min() < 3 * 150


def test_compose_fields_keeps_background_field_nuclei() -> None:
    bg = AnnotatedImage(
        name="bg",
        rgb=np.full((100, 100, 3), 230, np.uint8),
        grey=False,
        nuclei=np.zeros((100, 100), np.int32),
    )
    bg.rgb[40:50, 40:50] = 60
    bg.nuclei[40:50, 40:50] = 1
    f = compose_fields(
        [_crop_cell("a")],
        n_fields=1,
        mpp=0.25,
        field_px=100,
        cells_per_field=(0, 0),
        backgrounds=[(bg, 0.25)],
        background_p=1.0,
    )[0]
    assert int(f.nuclei.max()) == 1 and int((f.nuclei > 0).sum()) == 100
    assert f.cells is None  # a real background field has no cell masks: unknown, not "no cell"


# -- multi-source training, checkpoint and resume ------------------------------------------------------


def _tiny_images(n: int, seed: int) -> list[AnnotatedImage]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    out = []
    for i in range(n):
        rgb = np.full((64, 64, 3), 230, np.uint8)
        nuclei = np.zeros((64, 64), np.int32)
        for k, (cx, cy) in enumerate([(20, 20), (44, 40)], start=1):
            cx, cy = cx + rng.uniform(-3, 3), cy + rng.uniform(-3, 3)
            rgb[(xx - cx) ** 2 + (yy - cy) ** 2 <= 14**2] = (170, 150, 190)
            m = (xx - cx) ** 2 + (yy - cy) ** 2 <= 5**2
            rgb[m] = (70, 50, 120)
            nuclei[m] = k
        out.append(AnnotatedImage(name=f"img{i}", rgb=rgb, grey=False, nuclei=nuclei))
    return out


def _train(tmp: Path, out: str, **kw: object) -> object:
    sources = [
        ImageSource(name="a", mpp=0.5, train=_tiny_images(1, 0), val=_tiny_images(1, 9), weight=0.7),
        ImageSource(name="b", mpp=0.5, train=_tiny_images(1, 1), weight=0.3),
    ]
    recipe = UNetRecipe(
        crop_px=64, batch_size=2, crops_per_image=1, decoder_channels=(16, 8, 8, 8, 8), representation="rgb"
    )
    return train_unet(
        None,
        None,
        mpp=0.5,
        out_dir=tmp / out,
        sources=sources,
        device="cpu",
        seed=5,
        progress=False,
        **{"steps": 3, "recipe": recipe, **kw},  # type: ignore[arg-type]
    )


def test_training_pauses_and_resumes_to_the_same_weights(tmp_path: Path) -> None:
    whole = _train(tmp_path, "whole")
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(TrainingPaused, match="resume"):
        _train(tmp_path, "parts", checkpoint=ckpt, pause_after_steps=1)
    assert ckpt.is_file() and not (tmp_path / "parts").exists()  # no bundle before the last step
    with pytest.raises(TrainingPaused):
        _train(tmp_path, "parts", checkpoint=ckpt, resume=True, pause_after_steps=1)
    parts = _train(tmp_path, "parts", checkpoint=ckpt, resume=True)
    sw, sp = whole.state_dict(), parts.state_dict()  # type: ignore[attr-defined]
    assert sw.keys() == sp.keys() and all(torch.equal(sw[k], sp[k]) for k in sw)
    cfg = parts.config  # type: ignore[attr-defined]
    assert set(cfg.training["sources"]) == {"a", "b"}
    assert cfg.training["sources"]["a"]["val"] == ["img0"]
    assert "a" in cfg.metrics["validation"]  # validation figures per source


def test_resume_refuses_another_runs_checkpoint_and_retargets_a_new_length(tmp_path: Path) -> None:
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(TrainingPaused):
        _train(tmp_path, "x", checkpoint=ckpt, pause_after_steps=1)
    other = UNetRecipe(crop_px=64, batch_size=2, crops_per_image=1, decoder_channels=(16, 8, 8, 8, 8))
    with pytest.raises(TrainingDataError, match="another run"):
        _train(tmp_path, "x", checkpoint=ckpt, resume=True, recipe=other)
    with pytest.raises(TrainingDataError, match="needs a checkpoint"):
        _train(tmp_path, "y", resume=True)
    # A new length keeps the steps done and ends the schedule at the new last step (recorded).
    longer = _train(tmp_path, "x", checkpoint=ckpt, resume=True, steps=4)
    cfg = longer.config  # type: ignore[attr-defined]
    assert cfg.training["steps"] == 4
    assert cfg.training["schedule_retargeted"] == [{"at_step": 1, "from": 3, "to": 4}]


# -- metrics -------------------------------------------------------------------------------------------


def test_wilson_interval_known_values() -> None:
    # Reference values: Wilson (1927) score interval, z = 1.96 (e.g. Newcombe 1998, table I).
    lo, hi = wilson_interval(20, 20)  # type: ignore[misc]
    assert lo == pytest.approx(0.8389, abs=1e-4) and hi == 1.0
    lo, hi = wilson_interval(5, 10)  # type: ignore[misc]
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)  # type: ignore[misc]
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    assert wilson_interval(0, 0) is None
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(3, 2)


def test_train_unet_cli_time_budget_pauses_and_resume_finishes(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from PIL import Image

    import wsi_screen.cli.commands  # noqa: F401  (registers the sub-commands)
    from wsi_screen.cli.main import cli

    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for im in _tiny_images(2, 3):
        Image.fromarray(im.rgb).save(images / f"{im.name}.png")
        Image.fromarray(im.nuclei.astype(np.uint16)).save(masks / f"{im.name}.png")
    out = tmp_path / "unet"
    args = ["train", "unet", "--images", str(images), "--masks", str(masks), "--mpp", "0.5", "-o", str(out)]
    args += ["--epochs", "1", "--batch-size", "2", "--quiet"]
    paused = CliRunner().invoke(cli, [*args, "--time-budget", "0.0001"])
    assert paused.exit_code == 3, paused.output
    assert "resume" in paused.output and (tmp_path / "unet.ckpt").is_file() and not out.exists()
    done = CliRunner().invoke(cli, [*args, "--resume"])
    assert done.exit_code == 0, done.output
    assert (out / "bundle.json").is_file() and not (tmp_path / "unet.ckpt").exists()


def test_shipped_real_cell_localizer_is_the_default_and_matches_its_card() -> None:
    from wsi_screen.config import load_settings
    from wsi_screen.models import list_bundles, load_bundle

    assert load_settings().localization.model == "nuclei-unet-v3"
    # The earlier ones stay loadable by name.
    assert {"nuclei-unet-v1", "nuclei-unet-v2", "nuclei-unet-v3"} <= set(list_bundles())
    m = read_split_manifest(MANIFEST)
    v2 = load_bundle("nuclei-unet-v2", task="localization")  # verifies the weights' sha256
    for name in ("nuclei-unet-v2", "nuclei-unet-v3"):
        b = load_bundle(name, task="localization")
        cfg = b.config
        assert cfg.input_representation == "rgb" and cfg.in_channels == 3 and cfg.mpp == 0.5
        assert cfg.thresholds["detection"] == 0.7
        assert cfg.training["split_manifest"] == "pipelines/splits/real.json"
        assert set(cfg.training["sources"]) == {"herlev_fields", "lbc_nuclei", "cnseg", "isbi2014"}
        # Nothing of a test part was trained on: every training image of a source is in its train part.
        for src, key_of in (("lbc_nuclei", lambda n: f"{n}.png"), ("isbi2014", lambda n: f"{n}.png")):
            train = set(split_names(m, src, "train"))
            assert {key_of(n) for n in cfg.training["sources"][src]["train"]} <= train
        cn_train = {k.rsplit(".", 1)[0] for k in split_names(m, "cnseg", "train")}
        assert set(cfg.training["sources"]["cnseg"]["train"]) <= cn_train
        model = b.build_model()
        with torch.no_grad():
            out = model(torch.zeros(1, 3, 64, 96))
        assert out.shape == (1, 3, 64, 96) and torch.isfinite(out).all()
    # v3 is v2 fine-tuned (the same split, hence the same parts) with dark-region glass patches.
    assert cfg.training["init_from"]["sha256"] == v2.config.sha256
    assert cfg.training["recipe"]["glass_patch_p"] == 0.25
