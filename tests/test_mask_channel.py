"""The nucleus mask as a fourth classifier input channel (``rgb+mask`` bundles), end to end."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from classifier_helpers import ThresholdLocalizer, write_small_slide

from wsi_screen.classify import CellClassifier, cut_crops, nucleus_mask
from wsi_screen.cli.main import main
from wsi_screen.errors import BundleError, ConfigError
from wsi_screen.models.bundle import BundleConfig, load_bundle, save_bundle
from wsi_screen.models.registry import create_model
from wsi_screen.stain import DEFAULT_TARGET
from wsi_screen.train.augment import AugmentConfig, augment_batch
from wsi_screen.train.data import CropSet, DataError, collect_crops, crops_from_annotations


@pytest.fixture(scope="module")
def small_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mask-slides") / "case1.tiff"
    return write_small_slide(path)


# -- rasterizing outlines -------------------------------------------------------------------------------


def test_nucleus_mask_fills_pixels_whose_centre_is_inside() -> None:
    square = np.array([[10, 5], [20, 5], [20, 15], [10, 15]], np.float32)  # x 10–20, y 5–15
    m = nucleus_mask([square], (32, 40))
    expected = np.zeros((32, 40), np.uint8)
    expected[5:15, 10:20] = 255
    np.testing.assert_array_equal(m, expected)
    # Half a pixel off: pixel centres 10.5 … 19.5 are still inside x ∈ [10.4, 20.4), 20.5 is not.
    shifted = nucleus_mask([square + np.float32(0.4)], (32, 40))
    assert int((shifted == 255).sum()) == 100
    # Outlines off the window are clipped; degenerate ones are ignored; values are 0 or 255.
    corner = np.array([[-5, -5], [3, -5], [3, 2], [-5, 2]], np.float32)
    both = nucleus_mask([square, corner, np.zeros((2, 2), np.float32)], (32, 40))
    assert int((both == 255).sum()) == 100 + 3 * 2 and set(np.unique(both).tolist()) == {0, 255}


# -- the same channel in training and in screening ------------------------------------------------------


def test_mask_crops_from_annotations_equal_the_pipeline_crops(tmp_path: Path, small_slide: Path) -> None:
    """Annotation crops with the mask channel are bit-identical to what screening feeds the classifier."""
    from wsi_screen.config import load_settings
    from wsi_screen.train.data import pipeline_crops

    loc = ThresholdLocalizer()
    x, y, crops = pipeline_crops(
        small_slide,
        localizer=loc,  # type: ignore[arg-type]
        settings=load_settings(),
        mpp=0.25,
        size=224,
        target=DEFAULT_TARGET,
        device=torch.device("cpu"),
        mask_channel=True,
    )
    assert crops.shape[3] == 4 and len(x) >= 5
    mask = crops[..., 3]
    assert set(np.unique(mask).tolist()) <= {0, 255}
    # Each crop is centred on a detection (centre pixel 112), whose 8×8 px outline covers ±2 px of it.
    assert bool((mask[:, 110:114, 110:114] == 255).all())
    # The mask marks dark pixels: the RGB under it is darker than the rest of the crop.
    rgb = crops[..., :3].astype(np.float32).mean(axis=3)
    assert float(rgb[mask == 255].mean()) < float(rgb[mask == 0].mean()) - 40
    feats = [
        {
            "type": "Feature",
            "geometry": {"type": "Point", "coordinates": [float(a), float(b)]},
            "properties": {"objectType": "annotation", "classification": {"name": "HSIL"}},
        }
        for a, b in zip(x, y, strict=True)
    ]
    (tmp_path / "case1.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    cs = crops_from_annotations(
        str(tmp_path / "*.geojson"),
        small_slide.parent,
        localizer=loc,  # type: ignore[arg-type]
        progress=False,
    )
    assert cs.representation == "rgb+mask" and cs.describe()["representation"] == "rgb+mask"
    assert cs.crops.shape == crops.shape
    same = [np.array_equal(a, b) for a, b in zip(cs.crops, crops, strict=True)]
    assert all(same), f"{same.count(False)} of {len(same)} crops differ"
    # Without the localizer the same annotations give the RGB channels alone.
    rgb_only = crops_from_annotations(str(tmp_path / "*.geojson"), small_slide.parent, progress=False)
    np.testing.assert_array_equal(rgb_only.crops, crops[..., :3])


def test_cut_crops_pads_the_mask_with_zero() -> None:
    windows = torch.full((1, 16, 16, 1), 255, dtype=torch.uint8)
    crop = cut_crops(
        windows, torch.zeros(1, dtype=torch.long), torch.tensor([0]), torch.tensor([0]), 8, pad_value=0
    )
    assert int(crop[0, :4].sum()) == 0 and int(crop[0, :, :4].sum()) == 0  # off the window
    assert bool((crop[0, 4:, 4:] == 255).all())


def test_crop_folders_cannot_make_the_mask_channel(tmp_path: Path) -> None:
    from PIL import Image

    for cls in ("NILM", "HSIL"):
        (tmp_path / cls).mkdir()
        Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(tmp_path / cls / "a.png")
    with pytest.raises(DataError, match="a crop folder has no nucleus mask"):
        collect_crops(data=[tmp_path], mpp=0.25, mask_channel=True, progress=False)
    rgb = collect_crops(data=[tmp_path], mpp=0.25, size=64, progress=False)
    saved = rgb.save(tmp_path.parent / "saved-rgb")
    with pytest.raises(DataError, match="mask_channel needs rgb\\+mask crops"):
        collect_crops(data=[saved], size=64, mask_channel=True, progress=False)


def test_crop_sets_of_both_representations_do_not_mix() -> None:
    def cs(c: int) -> CropSet:
        return CropSet(
            crops=np.zeros((2, 8, 8, c), np.uint8),
            labels=np.array([0, 1]),
            groups=np.array(["a", "b"]),
            class_names=["NILM", "HSIL"],
            mpp=0.25,
            sources=np.array(["1", "2"]),
        )

    assert cs(4).representation == "rgb+mask" and cs(3).representation == "rgb"
    with pytest.raises(DataError, match="differ in channels"):
        CropSet.concat([cs(3), cs(4)])
    with pytest.raises(ValueError, match=r"\(N, S, S, 3\) or \(N, S, S, 4\)"):
        cs(2)


# -- augmentation ----------------------------------------------------------------------------------------


def test_augmentation_moves_the_mask_with_the_cell_but_never_recolours_it() -> None:
    crops = torch.zeros((8, 32, 32, 4), dtype=torch.uint8)
    crops[..., :3] = 200
    crops[:, 4:10, 20:28, :3] = 60  # an off-centre dark nucleus …
    crops[:, 4:10, 20:28, 3] = 255  # … and its mask
    gen = torch.Generator().manual_seed(0)
    colour = AugmentConfig(**{**AugmentConfig.none().to_dict(), "hed": 0.2, "brightness": 0.2, "noise": 5.0})
    out = augment_batch(crops, colour, mpp=0.25, generator=gen)
    assert out.shape == (8, 4, 32, 32)
    torch.testing.assert_close(out[:, 3], crops[..., 3].float())  # colour and noise leave the mask alone
    assert not torch.equal(out[:, :3], crops[..., :3].permute(0, 3, 1, 2).float())
    flips = AugmentConfig(**{**AugmentConfig.none().to_dict(), "flips": True})
    out = augment_batch(crops, flips, mpp=0.25, generator=gen)
    for a in out:  # the mask still lies exactly on the dark pixels
        torch.testing.assert_close(a[3] == 255, a[0] == 60)


# -- bundles ---------------------------------------------------------------------------------------------


def _bundle(
    tmp_path: Path,
    *,
    rep: str,
    channels: int,
    mean_len: int,
    name: str = "m",
    training: dict[str, Any] | None = None,
) -> Path:
    model = create_model("mobilenetv3_small_050", num_classes=2, in_chans=channels)
    cfg = BundleConfig(
        name=name,
        task="classification",
        architecture="mobilenetv3_small_050",
        in_channels=channels,
        input_representation=rep,
        input_size=64,
        mpp=0.25,
        mean=[0.5] * mean_len,
        std=[0.25] * mean_len,
        class_names=["NILM", "HSIL"],
        abnormal_classes=["HSIL"],
        training=training or {},
    )
    save_bundle(model, cfg, tmp_path / name)
    return tmp_path / name


def test_classifier_checks_the_representation(tmp_path: Path) -> None:
    dev = torch.device("cpu")
    good = load_bundle(_bundle(tmp_path, rep="rgb+mask", channels=4, mean_len=4, name="good"))
    clf = CellClassifier([good], device=dev)
    assert clf.needs_mask and clf.in_channels == 4
    probs = clf.predict(torch.zeros((3, 64, 64, 4), dtype=torch.uint8))
    assert probs.shape == (3, 2)
    with pytest.raises(ValueError, match=r"\(N, H, W, 4\)"):
        clf.predict(torch.zeros((3, 64, 64, 3), dtype=torch.uint8))
    short = load_bundle(_bundle(tmp_path, rep="rgb+mask", channels=4, mean_len=3, name="short"))
    with pytest.raises(BundleError, match="needs 4 input channels"):
        CellClassifier([short], device=dev)
    # A representation no stage knows is refused by the bundle config (tests/test_bundle.py); one
    # another stage uses (the localizers' od_gray) is refused by the classifier.
    odd = load_bundle(_bundle(tmp_path, rep="od_gray", channels=1, mean_len=1, name="odd"))
    with pytest.raises(BundleError, match="unknown input_representation 'od_gray' for a classifier"):
        CellClassifier([odd], device=dev)
    rgb = load_bundle(_bundle(tmp_path, rep="rgb", channels=3, mean_len=3, name="rgb"))
    with pytest.raises(BundleError, match="disagree on input_representation"):
        CellClassifier([good, rgb], device=dev)


def test_screening_warns_when_the_mask_comes_from_another_localizer(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from wsi_screen.config import load_settings
    from wsi_screen.pipeline import load_models

    data = {"source": "mixed", "parts": [{"localization": {"name": "other-unet", "sha256": "0"}}]}
    path = _bundle(tmp_path, rep="rgb+mask", channels=4, mean_len=4, name="m", training={"data": data})
    settings = load_settings().with_overrides({"classification.models": [str(path)]})
    with caplog.at_level(logging.WARNING, logger="wsi_screen.pipeline"):
        models = load_models(settings, device=torch.device("cpu"))
    assert models.classifier.needs_mask
    assert any("trained on nucleus masks of other-unet" in r.getMessage() for r in caplog.records)
    caplog.clear()
    same = {"localization": {"name": models.localizer.bundle.name}}
    path = _bundle(tmp_path, rep="rgb+mask", channels=4, mean_len=4, name="n", training={"data": same})
    with caplog.at_level(logging.WARNING, logger="wsi_screen.pipeline"):
        load_models(settings.with_overrides({"classification.models": [str(path)]}), device=models.device)
    assert not [r for r in caplog.records if "nucleus masks" in r.getMessage()]


def test_tile_processor_refuses_a_contradictory_mask_flag(tmp_path: Path) -> None:
    from wsi_screen.device_stage import TileProcessor
    from wsi_screen.tiling import make_grid

    rgb = load_bundle(_bundle(tmp_path, rep="rgb", channels=3, mean_len=3, name="rgb"))
    clf = CellClassifier([rgb], device=torch.device("cpu"))
    grid = make_grid((2048, 2048), slide_mpp=0.25, mpp=0.25, tile_size=1024, halo_um=32.0)
    with pytest.raises(ConfigError, match="contradicts"):
        TileProcessor(
            localizer=ThresholdLocalizer(),  # type: ignore[arg-type]
            classifier=clf,
            grid=grid,
            source=None,
            target=None,
            crop_size=64,
            device=torch.device("cpu"),
            mask_channel=True,
        )


def test_an_rgb_bundle_initialises_a_mask_model_exactly(tmp_path: Path) -> None:
    """Zero weights on the new channel: the widened model computes what the RGB model did."""
    from wsi_screen.train.classifier import _load_init

    rgb = load_bundle(_bundle(tmp_path, rep="rgb", channels=3, mean_len=3, name="rgb"))
    wide = create_model("mobilenetv3_small_050", num_classes=2, in_chans=4)
    note = _load_init(wide, rgb, ["NILM", "HSIL"])
    assert note.startswith("all weights") and "widened" in note
    narrow = rgb.build_model(device=torch.device("cpu"))
    wide.eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        a = narrow(x)
        b = wide(torch.cat([x, torch.rand(2, 1, 64, 64)], dim=1))
    torch.testing.assert_close(a, b)


# -- end to end: train with the mask channel, screen with the bundle ------------------------------------


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    return int(exc.value.code or 0), capsys.readouterr().err


@pytest.mark.slow
def test_train_with_mask_channel_and_screen_with_it(
    tmp_path: Path, small_slide: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsi_screen.store import read_cells

    out = tmp_path / "mask-bundle"
    code, err = _main(
        [
            "train", "classifier", "--synthetic", "3", "--synthetic-size", "1536",
            "--cache", str(tmp_path / "c"), "--mask-channel", "-o", str(out), "--epochs", "1",
            "--arch", "mobilenetv3_small_050", "--input-size", "224", "--batch-size", "16",
            "--val-fraction", "0.34", "--test-fraction", "0.0", "-q",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    cfg = load_bundle(out, task="classification").config
    assert cfg.input_representation == "rgb+mask" and cfg.in_channels == 4 and len(cfg.mean) == 4
    assert cfg.training["data"]["representation"] == "rgb+mask"
    code, err = _main(
        ["run", str(small_slide), "-o", str(tmp_path / "run"), "--model", str(out), "-q"], capsys
    )
    assert code == 0, err
    cells, _attrs = read_cells(next((tmp_path / "run").iterdir()) / "cells.zarr")
    assert len(cells) >= 5 and cells.probs.shape == (len(cells), len(cfg.class_names))
    np.testing.assert_allclose(cells.probs.sum(axis=1), 1.0, atol=1e-3)
    # A crop folder cannot be used with --mask-channel: one line, non-zero exit.
    (tmp_path / "crops" / "NILM").mkdir(parents=True)
    code, err = _main(
        ["train", "classifier", "--data", str(tmp_path / "crops"), "--mpp", "0.25", "--mask-channel", "-o",
         str(tmp_path / "x"), "-q"],
        capsys,
    )  # fmt: skip
    assert code != 0 and "no nucleus mask" in err and "Traceback" not in err
