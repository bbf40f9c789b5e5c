"""Classifier training data, training loop, bundles and the ``train classifier`` / ``evaluate`` CLI."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from classifier_helpers import SMALL_SLIDE_CELLS, ThresholdLocalizer, write_small_slide
from PIL import Image

from wsi_screen.classify import CellClassifier
from wsi_screen.cli.main import main
from wsi_screen.models.bundle import load_bundle
from wsi_screen.stain import DEFAULT_TARGET
from wsi_screen.synth import CellSpec, layout_truth, make_layout
from wsi_screen.train.data import (
    DEFAULT_GLASS_RGB,
    CropSet,
    DataError,
    SyntheticSlideSpec,
    canonical_class,
    crops_from_annotations,
    find_slide_for,
    fit_to_size,
    glass_colour,
    list_class_maps,
    load_class_map,
    load_crop_folder,
    match_detections,
    prepare_crops,
    read_qupath_geojson,
    rescale_to_mpp,
    synthetic_crops,
)

HERLEV_FOLDERS = (
    "normal_superficiel",
    "normal_intermediate",
    "normal_columnar",
    "light_dysplastic",
    "moderate_dysplastic",
    "severe_dysplastic",
    "carcinoma_in_situ",
)
GLASS = (240, 238, 242)


def _disc_image(side: int, diameter_px: float, *, glass: tuple[int, int, int] = GLASS) -> np.ndarray:
    """A dark disc of ``diameter_px`` centred on pixel (side // 2, side // 2) on glass."""
    yy, xx = np.mgrid[:side, :side]
    c = side // 2 + 0.5
    inside = (xx + 0.5 - c) ** 2 + (yy + 0.5 - c) ** 2 <= (diameter_px / 2) ** 2
    img = np.empty((side, side, 3), np.uint8)
    img[:] = glass
    img[inside] = (60, 40, 90)
    return img


def _dark_mask(img: np.ndarray) -> np.ndarray:
    return img.astype(np.float32).mean(axis=2) < 150


# -- rescale, fit, pad -----------------------------------------------------------------------------------


def test_rescale_keeps_physical_size_and_centre() -> None:
    # A 10 µm disc at 0.2 µm/px is 50 px wide; at 0.25 µm/px it must be 40 px wide.
    img = _disc_image(101, 50.0)
    out = rescale_to_mpp(img, src_mpp=0.2, dst_mpp=0.25)
    assert out.shape[:2] == (81, 81)  # round(101 · 0.8)
    dark = _dark_mask(out)
    diameter = 2 * np.sqrt(dark.sum() / np.pi)
    assert diameter == pytest.approx(40.0, abs=1.0)
    crop = fit_to_size(out, 224, fill=GLASS)
    ys, xs = np.nonzero(_dark_mask(crop))
    assert xs.mean() == pytest.approx(112, abs=1.0) and ys.mean() == pytest.approx(112, abs=1.0)


def test_fit_to_size_pads_with_fill_and_centre_crops_large_images() -> None:
    small = np.zeros((10, 20, 3), np.uint8)
    small[5, 10] = 255  # the centre pixel (h // 2, w // 2)
    out = fit_to_size(small, 32, fill=(1, 2, 3))
    assert out.shape == (32, 32, 3)
    assert tuple(out[0, 0]) == (1, 2, 3) and tuple(out[16, 16]) == (255, 255, 255)
    big = np.zeros((300, 400, 3), np.uint8)
    big[150, 200] = 255
    out = fit_to_size(big, 224)
    assert tuple(out[112, 112]) == (255, 255, 255) and int(out.sum()) == 3 * 255


def test_padding_uses_the_crops_glass_then_the_groups() -> None:
    with_glass = _disc_image(60, 30.0, glass=(230, 231, 232))
    cell = _dark_mask(with_glass)
    with_glass[cell] += np.random.default_rng(0).integers(0, 30, (int(cell.sum()), 3), dtype=np.uint8)
    tight = np.full((40, 40, 3), (120, 60, 100), np.uint8)  # a crop showing no glass at all
    tight[::2] += 10
    assert tuple(glass_colour(with_glass)) == (230, 231, 232)  # type: ignore[arg-type]
    assert glass_colour(tight) is None
    out = prepare_crops(
        [with_glass, tight], src_mpp=0.25, dst_mpp=0.25, size=96, target=None, groups=["a", "a"], stain="none"
    )
    assert tuple(out[0, 0, 0]) == (230, 231, 232)
    assert tuple(out[1, 0, 0]) == (230, 231, 232)  # the tight crop borrows its group's glass
    np.testing.assert_array_equal(out[1, 28:68, 28:68], tight)
    # Alone, a glass-less crop is padded with a typical slide glass.
    alone = prepare_crops([tight], src_mpp=0.25, dst_mpp=0.25, size=96, target=None, stain="none")
    assert tuple(alone[0, 0, 0]) == DEFAULT_GLASS_RGB
    # Padding happens before Reinhard: the pad is normalized exactly like the crop's own glass.
    norm = prepare_crops(
        [with_glass], src_mpp=0.25, dst_mpp=0.25, size=96, target=DEFAULT_TARGET, stain="crop"
    )
    assert tuple(norm[0, 0, 0]) == tuple(norm[0, 18, 18])  # pad vs the crop's own glass corner
    assert tuple(norm[0, 0, 0]) != (230, 231, 232)


# -- class maps ------------------------------------------------------------------------------------------


def test_class_map_presets() -> None:
    assert {"herlev-bethesda", "sipakmed-bethesda", "cric-bethesda"} <= set(list_class_maps())
    herlev = load_class_map("herlev-bethesda")
    assert {f: herlev[f] for f in HERLEV_FOLDERS} == {
        "normal_superficiel": "NILM",
        "normal_intermediate": "NILM",
        "normal_columnar": "NILM",
        "light_dysplastic": "LSIL",
        "moderate_dysplastic": "HSIL",
        "severe_dysplastic": "HSIL",
        "carcinoma_in_situ": "HSIL",
    }
    cric = load_class_map("cric-bethesda")
    assert cric["ASC-H"] == "HSIL" and cric["SCC"] == "HSIL" and cric["ASC-US"] == "ASC-US"
    assert set(load_class_map("sipakmed-bethesda").values()) == {"NILM", "LSIL"}


def test_class_map_files_and_errors(tmp_path: Path) -> None:
    y = tmp_path / "map.yaml"
    y.write_text("classes:\n  benign: nilm\n  bad: hsil\n  junk: null\n")
    assert load_class_map(y) == {"benign": "NILM", "bad": "HSIL", "junk": None}
    j = tmp_path / "map.json"
    j.write_text(json.dumps({"a": "asc_us", "b": "skip"}))
    assert load_class_map(j) == {"a": "ASC-US", "b": None}
    with pytest.raises(DataError, match="neither a file nor a preset"):
        load_class_map("no-such-map")
    (tmp_path / "bad.yaml").write_text("- a\n- b\n")
    with pytest.raises(DataError, match="mapping"):
        load_class_map(tmp_path / "bad.yaml")
    assert canonical_class("ascus") == "ASC-US" and canonical_class("Negative") == "NILM"


# -- crop folders ----------------------------------------------------------------------------------------


def _write_crop_folder(root: Path, *, n_groups: int = 6, per_group: int = 4, side: int = 48) -> Path:
    """Two classes told apart by nucleus size, ``n_groups`` groups, a manifest with the groups."""
    rng = np.random.default_rng(0)
    rows = []
    for cls_name, diam in (("NILM", 8.0), ("HSIL", 22.0)):
        (root / cls_name).mkdir(parents=True, exist_ok=True)
        for g in range(n_groups):
            for k in range(per_group):
                img = _disc_image(side, diam * rng.uniform(0.9, 1.1))
                img = np.clip(img.astype(int) + rng.integers(-6, 7, img.shape), 0, 255).astype(np.uint8)
                name = f"{cls_name}/g{g}-{k}.png"
                Image.fromarray(img).save(root / name)
                rows.append({"file": name, "group": f"patient{g}"})
    with (root / "manifest.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["file", "group"])
        w.writeheader()
        w.writerows(rows)
    return root


def test_load_crop_folder_groups_classes_and_save(tmp_path: Path) -> None:
    root = _write_crop_folder(tmp_path / "crops")
    cs = load_crop_folder(root, mpp=0.2, target_mpp=0.25, size=64, progress=False)
    assert cs.crops.shape == (48, 64, 64, 3) and cs.class_names == ["NILM", "HSIL"]
    assert cs.class_counts() == {"NILM": 24, "HSIL": 24}
    assert set(cs.groups.tolist()) == {f"patient{g}" for g in range(6)}
    back = CropSet.load(cs.save(tmp_path / "saved"))
    np.testing.assert_array_equal(back.crops, cs.crops)
    assert back.fingerprint() == cs.fingerprint() and back.class_names == cs.class_names
    # Without a manifest every file is its own group; an unknown folder is a clear error.
    (root / "manifest.csv").unlink()
    assert len(set(load_crop_folder(root, mpp=0.25, size=64, progress=False).groups.tolist())) == 48
    (root / "weird").mkdir()
    Image.fromarray(_disc_image(20, 5)).save(root / "weird" / "x.png")
    with pytest.raises(DataError, match="unknown class 'weird'"):
        load_crop_folder(root, mpp=0.25, size=64, progress=False)
    with pytest.raises(DataError, match="unknown class 'weird'"):
        load_crop_folder(root, mpp=0.25, size=64, class_map={"NILM": "NILM", "HSIL": "HSIL"}, progress=False)
    cs2 = load_crop_folder(
        root, mpp=0.25, size=64, class_map={"NILM": "NILM", "HSIL": "HSIL", "weird": None}, progress=False
    )
    assert len(cs2) == 48


@pytest.mark.slow
def test_herlev_loads_with_the_preset(shared_data: Path) -> None:
    herlev = shared_data / "herlev"
    if not herlev.is_dir():
        pytest.skip("no Herlev data")
    cs = load_crop_folder(herlev, mpp=0.201, class_map="herlev-bethesda", size=224, progress=False)
    assert set(cs.class_names) == {"NILM", "LSIL", "HSIL"} and len(cs) == 495
    with (herlev / "manifest.csv").open() as fh:
        groups = {row["file"]: row["group"] for row in csv.DictReader(fh)}
    assert all(groups[s] == g for s, g in zip(cs.sources.tolist(), cs.groups.tolist(), strict=True))


# -- QuPath GeoJSON -----------------------------------------------------------------------------------


def _feature(
    geom: dict[str, Any], cls: str | None, otype: str = "annotation", **extra: Any
) -> dict[str, Any]:
    props: dict[str, Any] = {"objectType": otype}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geom, "properties": props, **extra}


def test_qupath_points_polygons_and_bare_arrays(tmp_path: Path) -> None:
    square = {"type": "Polygon", "coordinates": [[[10, 10], [30, 10], [30, 30], [10, 30], [10, 10]]]}
    feats = [
        _feature({"type": "Point", "coordinates": [100.5, 200.25]}, "HSIL"),
        _feature({"type": "MultiPoint", "coordinates": [[1, 2], [3, 4]]}, "NILM"),
        _feature(square, "LSIL", otype="detection"),
        _feature(
            square,
            "ASC-US",
            otype="cell",
            nucleusGeometry={"type": "Polygon", "coordinates": [[[12, 12], [14, 12], [14, 14], [12, 14]]]},
        ),
        _feature({"type": "Point", "coordinates": [5, 5]}, None),  # unclassified: skipped
        _feature({"type": "LineString", "coordinates": [[0, 0], [5, 5]]}, "HSIL"),  # not a cell: skipped
    ]
    fc = tmp_path / "a.geojson"
    fc.write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    anns = read_qupath_geojson(fc)
    assert [(a.x, a.y, a.label) for a in anns] == [
        (100.5, 200.25, "HSIL"),
        (1.0, 2.0, "NILM"),
        (3.0, 4.0, "NILM"),
        (20.0, 20.0, "LSIL"),
        (13.0, 13.0, "ASC-US"),
    ]
    assert anns[3].geometry == "Polygon" and anns[3].object_type == "detection"
    bare = tmp_path / "b.json"
    bare.write_text(json.dumps(feats[:1]))
    assert [(a.x, a.label) for a in read_qupath_geojson(bare)] == [(100.5, "HSIL")]
    gz = tmp_path / "c.geojson.gz"
    with gzip.open(gz, "wt") as fh:
        json.dump({"type": "FeatureCollection", "features": feats[2:3]}, fh)
    assert read_qupath_geojson(gz)[0].label == "LSIL"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid GeoJSON"),
        ('{"type": "FeatureCollection", "features": []}', "no classified point or polygon"),
        ("[]", "no classified point or polygon"),
        ('{"hello": 1}', "not a GeoJSON FeatureCollection"),
        (
            json.dumps([_feature({"type": "Point", "coordinates": [1, 1]}, None)]),
            r"no classified point or polygon annotations \(skipped: \{'unclassified': 1\}\)",
        ),
    ],
)
def test_qupath_bad_input_is_a_one_line_error(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "x.geojson"
    p.write_text(text)
    with pytest.raises(DataError, match=message) as info:
        read_qupath_geojson(p)
    assert "\n" not in str(info.value)


def test_find_slide_for(tmp_path: Path) -> None:
    (tmp_path / "A1.svs").write_bytes(b"")
    (tmp_path / "B.tiff").write_bytes(b"")
    (tmp_path / "B.truth.json").write_text("{}")
    assert find_slide_for("ann/A1.geojson", tmp_path).name == "A1.svs"
    assert find_slide_for("ann/A1.svs.geojson", tmp_path).name == "A1.svs"
    assert find_slide_for("B.geojson.gz", tmp_path).name == "B.tiff"
    with pytest.raises(DataError, match=r"no slide for C\.geojson"):
        find_slide_for("C.geojson", tmp_path)


# -- synthetic slides through the inference path ----------------------------------------------------------


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("slides") / "case1.tiff"
    return write_small_slide(path)


def test_match_detections_uses_one_nucleus_radius() -> None:
    layout = make_layout(
        (800, 800), [CellSpec(200.0, 200.0, "hsil", seed=1), CellSpec(600, 600, "koilocyte", seed=9)]
    )
    truth = layout_truth(layout)
    hsil = truth.objects[0]
    assert hsil.nucleus_xy is not None and hsil.nucleus_area_um2 is not None
    r = np.sqrt(hsil.nucleus_area_um2 / 0.25**2 / np.pi)
    cx, cy = hsil.nucleus_xy
    labels, obj = match_detections(
        np.array([cx, cx + 0.9 * r, cx + 1.1 * r, 50.0]), np.array([cy, cy, cy, 50.0]), truth
    )
    assert labels.tolist() == ["HSIL", "HSIL", "artifact", "artifact"]
    assert obj.tolist() == [0, 0, -1, -1]


def test_synthetic_crops_run_the_device_stage_and_cache(tmp_path: Path) -> None:
    spec = SyntheticSlideSpec(
        index=0,
        seed=11,
        size_px=1536,
        preparation="lbc",
        stain="default",
        abnormal={"HSIL": 8, "LSIL": 6},
        blur_fraction=0.0,
    )
    loc = ThresholdLocalizer()
    cs = synthetic_crops(1, cache_dir=tmp_path, localizer=loc, specs=[spec], progress=False)  # type: ignore[arg-type]
    assert cs.size == 224 and len(cs) >= 10 and cs.mpp == 0.25
    assert cs.info["n_matched_to_truth"] >= 0.6 * cs.info["n_detections"]
    assert cs.class_counts()["HSIL"] >= 4 and set(cs.groups.tolist()) == {"synth-11"}
    # The crop centre is a dark nucleus for matched cells.
    matched = np.array([not s.endswith("#-1:none") for s in cs.sources.tolist()])
    kinds = {s.split(":")[1] for s, m in zip(cs.sources.tolist(), matched, strict=True) if m}
    assert "hsil" in kinds and "koilocyte" in kinds
    centre = cs.crops[matched, 108:116, 108:116].astype(np.float32).mean()
    assert centre < cs.crops[matched].astype(np.float32).mean() - 40
    assert not list(tmp_path.glob("*.tiff"))  # slides are deleted, crops cached
    again = synthetic_crops(1, cache_dir=tmp_path, localizer=loc, specs=[spec], progress=False)  # type: ignore[arg-type]
    np.testing.assert_array_equal(again.crops, cs.crops)


def test_annotation_crops_equal_the_pipeline_crops(tmp_path: Path, small_slide: Path) -> None:
    """Crops cut from QuPath annotations are bit-identical to the crops screening cuts."""
    from wsi_screen.config import load_settings
    from wsi_screen.train.data import pipeline_crops

    settings = load_settings()
    x, y, crops = pipeline_crops(
        small_slide,
        localizer=ThresholdLocalizer(),  # type: ignore[arg-type]
        settings=settings,
        mpp=0.25,
        size=224,
        target=DEFAULT_TARGET,
        device=torch.device("cpu"),
    )
    assert len(x) >= 5
    feats = [
        _feature({"type": "Point", "coordinates": [float(a), float(b)]}, "hsil")
        for a, b in zip(x, y, strict=True)
    ]
    ann = tmp_path / "ann"
    ann.mkdir()
    (ann / "case1.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    cs = crops_from_annotations(str(ann / "*.geojson"), small_slide.parent, progress=False)
    assert cs.class_names == ["HSIL"] and set(cs.groups.tolist()) == {"case1.tiff"}
    assert cs.crops.shape == crops.shape
    same = [np.array_equal(a, b) for a, b in zip(cs.crops, crops, strict=True)]
    assert all(same), f"{same.count(False)} of {len(same)} crops differ"


def test_annotation_errors(tmp_path: Path, small_slide: Path) -> None:
    ann = tmp_path / "case1.geojson"
    ann.write_text(json.dumps([_feature({"type": "Point", "coordinates": [300, 300]}, "Tumor")]))
    with pytest.raises(DataError, match="unknown class 'Tumor'"):
        crops_from_annotations([ann], small_slide.parent, progress=False)
    cs = crops_from_annotations([ann], small_slide.parent, class_map={"Tumor": "HSIL"}, progress=False)
    assert cs.class_names == ["HSIL"] and len(cs) == 1
    orphan = tmp_path / "nothere.geojson"
    orphan.write_text(ann.read_text())
    with pytest.raises(DataError, match=r"no slide for nothere\.geojson"):
        crops_from_annotations([orphan], small_slide.parent, progress=False)
    with pytest.raises(DataError, match="no annotation files match"):
        crops_from_annotations(str(tmp_path / "*.nothing"), small_slide.parent, progress=False)


# -- training through the CLI ----------------------------------------------------------------------------


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the console entry point; (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def _invoke(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    code, out, err = _main(args, capsys)
    assert code == 0, err
    return out


_TRAIN = ["--mpp", "0.25", "--input-size", "64", "--arch", "mobilenetv3_small_050", "--batch-size", "16"]


@pytest.mark.slow
def test_train_cli_writes_a_bundle_the_pipeline_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_crop_folder(tmp_path / "crops")
    out = tmp_path / "bundle"
    _invoke(
        ["train", "classifier", "--data", str(data), "-o", str(out), "--epochs", "1", *_TRAIN, "-q"], capsys
    )
    bundle = load_bundle(out, task="classification")
    cfg = bundle.config
    assert cfg.class_names == ["NILM", "HSIL"] and cfg.abnormal_classes == ["HSIL"]
    assert cfg.input_size == 64 and cfg.mpp == 0.25 and cfg.stain_target is not None
    assert cfg.training["recipe"]["epochs"] == 1 and cfg.training["seed"] == 0
    assert set(cfg.training["class_counts"]) == {"train", "val", "test"}
    assert "val" in cfg.metrics and "test" in cfg.metrics and "review_score" in cfg.thresholds
    split = json.loads((out / "split.json").read_text())
    groups = [set(split[k]["groups"]) for k in ("train", "val", "test")]
    assert all(groups) and not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert sum(split[k]["n"] for k in ("train", "val", "test")) == 48
    clf = CellClassifier([bundle], device=torch.device("cpu"))
    crops = torch.from_numpy(np.stack([_disc_image(64, 8), _disc_image(64, 22)]))
    probs = clf.predict(crops)
    assert probs.shape == (2, 2)
    np.testing.assert_allclose(probs.sum(dim=1).numpy(), 1.0, atol=1e-5)


@pytest.mark.slow
def test_train_resumes_from_its_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_crop_folder(tmp_path / "crops")
    work = tmp_path / "work"
    args = [
        "train",
        "classifier",
        "--data",
        str(data),
        "--work-dir",
        str(work),
        *_TRAIN,
        "--patience",
        "0",
        "-q",
    ]
    _invoke([*args, "-o", str(tmp_path / "one"), "--epochs", "1"], capsys)
    first = json.loads((tmp_path / "one" / "history.json").read_text())
    assert [r["epoch"] for r in first] == [1]
    _invoke([*args, "-o", str(tmp_path / "two"), "--epochs", "2", "--resume"], capsys)
    hist = json.loads((tmp_path / "two" / "history.json").read_text())
    assert [r["epoch"] for r in hist] == [1, 2]
    assert hist[0]["train_loss"] == first[0]["train_loss"]  # epoch 1 was not trained again
    ckpt = torch.load(work / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 2
    # A checkpoint made with other options is refused with a clear message.
    code, _, err = _main(
        [*args, "-o", str(tmp_path / "three"), "--epochs", "3", "--resume", "--seed", "5"], capsys
    )
    assert code == 1 and "resume (--resume): the checkpoint was trained with seed=0" in err


@pytest.mark.slow
def test_runicnet_bundles_are_reparameterized(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _write_crop_folder(tmp_path / "crops", n_groups=3, per_group=2)
    out = tmp_path / "runic"
    _invoke(
        [
            "train", "classifier", "--data", str(data), "-o", str(out), "--epochs", "1", "--mpp", "0.25",
            "--input-size", "64", "--arch", "runicnet-tiny", "--batch-size", "8", "--val-fraction", "0.3",
            "--test-fraction", "0", "-q",
        ],
        capsys,
    )  # fmt: skip
    bundle = load_bundle(out, task="classification")
    assert bundle.config.arch_kwargs == {"deploy": True}
    model = bundle.build_model()
    assert getattr(model, "deploy", False)
    probs = CellClassifier([bundle], device=torch.device("cpu")).predict(
        torch.zeros(3, 64, 64, 3, dtype=torch.uint8)
    )
    np.testing.assert_allclose(probs.sum(dim=1).numpy(), 1.0, atol=1e-5)


@pytest.mark.slow
def test_evaluate_cli_writes_metrics_and_handles_absent_classes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_crop_folder(tmp_path / "crops")
    bundle = tmp_path / "bundle"
    _invoke(
        ["train", "classifier", "--data", str(data), "-o", str(bundle), "--epochs", "1", *_TRAIN, "-q"],
        capsys,
    )
    out = tmp_path / "eval"
    res = _invoke(
        [
            "evaluate",
            "--model",
            str(bundle),
            "--model",
            str(bundle),
            "--data",
            str(data),
            "--mpp",
            "0.25",
            "--cut",
            "crop",
            "-o",
            str(out),
        ],
        capsys,
    )
    assert "HSIL" in res and (out / "report.html").is_file() and (out / "confusion_matrix.png").is_file()
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 48 and m["class_names"] == ["NILM", "HSIL"] and m["evaluation"]["ensemble"] is True
    # Data with only one of the bundle's classes: scored over the classes present.
    only = tmp_path / "only"
    (only / "HSIL").mkdir(parents=True)
    for p in sorted((data / "HSIL").iterdir())[:5]:
        (only / "HSIL" / p.name).write_bytes(p.read_bytes())
    res = _invoke(
        ["evaluate", "--model", str(bundle), "--data", str(only), "--mpp", "0.25", "--cut", "crop", "--json"],
        capsys,
    )
    m = json.loads(res)
    assert (
        m["class_names"] == ["HSIL"]
        and m["evaluation"]["absent_classes"] == ["NILM"]
        and m["accuracy"] == 1.0
    )
    res = _invoke(
        [
            "evaluate",
            "--model",
            str(bundle),
            "--data",
            str(only),
            "--mpp",
            "0.25",
            "--cut",
            "crop",
            "--classes",
            "all",
            "--json",
        ],
        capsys,
    )
    m = json.loads(res)
    assert m["class_names"] == ["NILM", "HSIL"] and m["n"] == 5
    # A data class the bundle does not know is refused.
    (only / "LSIL").mkdir()
    (only / "LSIL" / "x.png").write_bytes(next((data / "HSIL").iterdir()).read_bytes())
    for cut in ("crop", "pipeline"):  # pipeline: refused before any slide is screened
        args = ["evaluate", "--model", str(bundle), "--data", str(only), "--mpp", "0.25", "--cut", cut]
        code, _, err = _main(args, capsys)
        assert code == 1 and "does not predict" in err and "map them with a class_map (--class-map)" in err


def test_truth_as_qupath_export_round_trips(tmp_path: Path) -> None:
    from wsi_screen.train.data import truth_to_qupath

    truth = layout_truth(make_layout((1800, 1800), list(SMALL_SLIDE_CELLS)), "case1.tiff")
    fc = truth_to_qupath(truth, geometry="mixed")
    kinds = {f["geometry"]["type"] for f in fc["features"]}
    assert kinds == {"Polygon", "MultiPoint"}  # abnormal cells outlined, the others as point sets
    path = tmp_path / "case1.tiff.geojson"
    path.write_text(json.dumps(fc))
    anns = read_qupath_geojson(path)
    assert sorted(a.label for a in anns) == sorted(o.klass for o in truth.objects)
    for a in anns:  # every annotation lies on its object (points on the nucleus, polygons' centroids)
        o = min(truth.objects, key=lambda o: (o.x - a.x) ** 2 + (o.y - a.y) ** 2)
        assert o.klass == a.label and np.hypot(o.x - a.x, o.y - a.y) < 40


# -- augmentation -------------------------------------------------------------------------------------


def test_augmentations_keep_the_cell_centred() -> None:
    from wsi_screen.train.augment import AugmentConfig, augment_batch

    crops = torch.from_numpy(np.stack([_disc_image(64, 20.0) for _ in range(16)]))
    gen = torch.Generator().manual_seed(0)
    same = augment_batch(crops, AugmentConfig.none(), mpp=0.25, generator=gen)
    torch.testing.assert_close(same, crops.permute(0, 3, 1, 2).float())
    flips = AugmentConfig(**{**AugmentConfig.none().to_dict(), "flips": True})
    out = augment_batch(crops, flips, mpp=0.25, generator=gen)
    for a, b in zip(out, crops.permute(0, 3, 1, 2).float(), strict=True):  # a permutation of the pixels
        torch.testing.assert_close(a.flatten().sort().values, b.flatten().sort().values)
    full = augment_batch(crops, AugmentConfig(), mpp=0.25, generator=gen)
    assert full.shape == (16, 3, 64, 64) and full.dtype == torch.float32
    assert float(full.min()) >= 0.0 and float(full.max()) <= 255.0
    centre = full[:, :, 28:36, 28:36].mean(dim=(1, 2, 3))
    corner = full[:, :, :8, :8].mean(dim=(1, 2, 3))
    assert bool((centre < corner - 60).all())  # the nucleus is still in the middle


def test_jpeg_augmentation_is_a_real_lossy_round_trip() -> None:
    """jpeg_p=1 changes the pixels as libjpeg does (8×8 block error, more at low quality), keeps the cell."""
    import imagecodecs

    from wsi_screen.train.augment import AugmentConfig, augment_batch

    rng = np.random.default_rng(0)
    crops = np.stack([_disc_image(64, 20.0) for _ in range(8)])
    crops = np.clip(crops.astype(np.int16) + rng.integers(-20, 21, crops.shape), 0, 255).astype(np.uint8)
    t = torch.from_numpy(crops)
    only = AugmentConfig.none().to_dict()

    def run(quality: int) -> torch.Tensor:
        cfg = AugmentConfig(**{**only, "jpeg_p": 1.0, "jpeg_quality": quality})
        return augment_batch(t, cfg, mpp=0.25, generator=torch.Generator().manual_seed(1))

    low, high = run(5), run(95)  # quality drawn from [q, 95]: q=95 means exactly 95
    ref = torch.from_numpy(imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(crops[0], level=95)))
    ref = ref.permute(2, 0, 1).float()
    torch.testing.assert_close(high[0], ref)  # exactly libjpeg's round trip at that quality
    original = t.permute(0, 3, 1, 2).float()
    err_low = (low - original).abs().mean()
    err_high = (high - original).abs().mean()
    assert 0 < err_high < err_low  # lossy, and lossier at lower quality
    centre = low[:, :, 28:36, 28:36].mean(dim=(1, 2, 3))
    corner = low[:, :, :8, :8].mean(dim=(1, 2, 3))
    assert bool((centre < corner - 60).all())
    with pytest.raises(ValueError, match="jpeg_quality"):
        AugmentConfig(jpeg_quality=0)
    with pytest.raises(ValueError, match="jpeg_p"):
        AugmentConfig(jpeg_p=1.5)
    strong = augment_batch(t, AugmentConfig.strong(), mpp=0.25, generator=torch.Generator().manual_seed(2))
    assert strong.shape == (8, 3, 64, 64) and float(strong.min()) >= 0.0 and float(strong.max()) <= 255.0


def test_a_given_split_is_used_as_is(tmp_path: Path) -> None:
    """train_classifier(split=...) trains on exactly the given indices (a split manifest's parts)."""
    import json

    from wsi_screen.train.classifier import TrainConfig, train_classifier
    from wsi_screen.train.data import CropSet, DataError

    rng = np.random.default_rng(0)
    n = 24
    data = CropSet(
        crops=rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8),
        labels=np.arange(n, dtype=np.int64) % 3,
        groups=np.array([f"g{i // 2}" for i in range(n)]),
        class_names=["NILM", "HSIL", "organism"],
        mpp=0.25,
        sources=np.array(["test"] * n),
    )
    cfg = TrainConfig(arch="mobilenetv3_small_050", epochs=1, batch_size=8, device="cpu", seed=0)
    # Groups g0/g1 are split across parts on purpose: the given split is indices, not groups.
    split = {"train": np.arange(0, 15), "val": np.arange(15, 21), "test": np.arange(21, 24)}
    res = train_classifier(data, tmp_path / "b", config=cfg, split=split, progress=False)
    saved = json.loads((tmp_path / "b" / "split.json").read_text())
    assert (saved["train"]["n"], saved["val"]["n"], saved["test"]["n"]) == (15, 6, 3)
    assert "given by the caller" in saved["group_rule"]
    assert res.bundle.config.abnormal_classes == ["HSIL"]  # organism counts as normal
    with pytest.raises(DataError, match="overlap"):
        train_classifier(
            data, tmp_path / "c", config=cfg, split={"train": [0, 1, 2], "val": [2, 3]}, progress=False
        )
    with pytest.raises(DataError, match="outside"):
        train_classifier(data, tmp_path / "d", config=cfg, split={"train": [0, 99]}, progress=False)


def test_merge_class_relabels_and_drops_the_class() -> None:
    """CropSet.merge_class: endocervical crops become NILM for a model without that class."""
    from wsi_screen.train.classifier import _abnormal_default
    from wsi_screen.train.data import CropSet, DataError

    names = ["NILM", "HSIL", "endocervical", "artifact"]
    data = CropSet(
        crops=np.zeros((5, 8, 8, 3), np.uint8),
        labels=np.array([0, 1, 2, 2, 3], np.int64),
        groups=np.array(list("abcde")),
        class_names=names,
        mpp=0.25,
        sources=np.array(["test"] * 5),
    )
    merged = data.merge_class("endocervical", "NILM")
    assert merged.class_names == ["NILM", "HSIL", "artifact"]
    assert [merged.class_names[i] for i in merged.labels] == ["NILM", "HSIL", "NILM", "NILM", "artifact"]
    assert _abnormal_default(names) == ["HSIL"]  # endocervical cells are NILM
    with pytest.raises(DataError, match="cannot merge"):
        data.merge_class("AGC", "NILM")


def test_binary_loss_adds_the_log_loss_of_the_screening_score() -> None:
    """binary_loss: CE + w × −log(summed probability of the true side: abnormal or the rest)."""
    import torch
    import torch.nn.functional as F

    from wsi_screen.train.classifier import TrainConfig, _loss_fn

    logits = torch.tensor([[2.0, 0.5, 0.1, -1.0], [0.3, 1.2, 0.9, 0.0]])
    target = torch.tensor([0, 2])  # a NILM crop and an abnormal one; classes 1 and 2 are abnormal
    ce = F.cross_entropy(logits, target)
    p = torch.softmax(logits, dim=1)
    by_hand = -(torch.log(p[0, [0, 3]].sum()) + torch.log(p[1, [1, 2]].sum())) / 2
    plain = _loss_fn(TrainConfig(), None, [1, 2])(logits, target)
    both = _loss_fn(TrainConfig(binary_loss=0.5), None, [1, 2])(logits, target)
    assert float(plain) == pytest.approx(float(ce), rel=1e-6)
    assert float(both) == pytest.approx(float(ce + 0.5 * by_hand), rel=1e-5)
    with pytest.raises(ValueError, match="binary_loss"):
        TrainConfig(binary_loss=-1.0)


def test_training_can_select_the_epoch_by_the_screening_auroc(tmp_path: Path) -> None:
    from wsi_screen.train.classifier import TrainConfig, train_classifier
    from wsi_screen.train.data import CropSet

    rng = np.random.default_rng(1)
    n = 24
    data = CropSet(
        crops=rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8),
        labels=np.arange(n, dtype=np.int64) % 3,
        groups=np.array([f"g{i}" for i in range(n)]),
        class_names=["NILM", "HSIL", "organism"],
        mpp=0.25,
        sources=np.array(["test"] * n),
    )
    cfg = TrainConfig(
        arch="mobilenetv3_small_050",
        epochs=2,
        batch_size=8,
        device="cpu",
        seed=0,
        binary_loss=1.0,
        monitor="binary_auroc",
    )
    split = {"train": np.arange(0, 16), "val": np.arange(16, 24)}
    res = train_classifier(data, tmp_path / "b", config=cfg, split=split, progress=False)
    aurocs = [row["val_binary_auroc"] for row in res.history]
    assert len(aurocs) == 2 and all(0.0 <= a <= 1.0 for a in aurocs)
    # the kept epoch is the first with the highest validation screening AUROC
    assert res.history[res.best_epoch - 1]["val_binary_auroc"] == max(aurocs)
    assert aurocs.index(max(aurocs)) == res.best_epoch - 1
    assert res.bundle.config.training["recipe"]["binary_loss"] == 1.0


def test_source_family_names_the_data_source() -> None:
    from wsi_screen.train.classifier import source_family

    assert source_family("synth-3#12:nucleus") == "synth"
    assert source_family("synth-0#-1:none") == "synth"
    assert source_family("herlev") == "herlev"
    assert source_family("lbc_nuclei") == "lbc_nuclei"
    assert source_family("hsil/0001.png") == "hsil"
    assert source_family("") == ""


def test_source_balance_gives_every_source_of_a_class_the_same_share() -> None:
    """Within a class each source family draws the same total mass; the class keeps its mass."""
    from wsi_screen.train.classifier import source_balance_factors

    labels = np.array([0] * 10 + [1] * 4 + [2] * 3)
    sources = np.array(
        ["lbc_nuclei"] * 8
        + ["herlev"] * 2  # NILM: 8 field nuclei, 2 Herlev cells
        + ["herlev", "lbc_cells", "lbc_cells", "synth-1#4:HSIL"]  # HSIL: three families
        + ["lbc_cells"] * 3  # organism: one family
    )
    f = source_balance_factors(labels, sources)
    for c, n_families in ((0, 2), (1, 3), (2, 1)):
        in_c = labels == c
        assert f[in_c].sum() == pytest.approx(in_c.sum())  # the class's mass is unchanged
        fam = np.array([s.split("-")[0] for s in sources[in_c]])
        shares = [f[in_c][fam == name].sum() for name in np.unique(fam)]
        assert len(shares) == n_families
        assert shares == pytest.approx([in_c.sum() / n_families] * n_families)
    assert f[8] / f[0] == pytest.approx(4.0)  # a Herlev NILM crop is drawn 4 × as often as a field nucleus
    with pytest.raises(ValueError, match=r"\(N,\)"):
        source_balance_factors(labels, sources[:3])


def test_training_with_source_balance_records_it(tmp_path: Path) -> None:
    from wsi_screen.train.classifier import TrainConfig, train_classifier
    from wsi_screen.train.data import CropSet

    rng = np.random.default_rng(2)
    n = 24
    data = CropSet(
        crops=rng.integers(0, 255, (n, 64, 64, 3), dtype=np.uint8),
        labels=np.arange(n, dtype=np.int64) % 2,
        groups=np.array([f"g{i}" for i in range(n)]),
        class_names=["NILM", "HSIL"],
        mpp=0.25,
        sources=np.array(["herlev" if i < 4 else "lbc_nuclei" for i in range(n)]),
    )
    cfg = TrainConfig(
        arch="mobilenetv3_small_050", epochs=1, batch_size=8, device="cpu", seed=0, balance_sources=True
    )
    res = train_classifier(data, tmp_path / "b", config=cfg, progress=False)
    assert res.bundle.config.training["recipe"]["balance_sources"] is True
