"""U-Net training: data loading (ISBI / QuPath layouts), matching, determinism, and the CLI end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import wsi_screen.cli.commands  # noqa: F401  (registers the sub-commands)
from wsi_screen.cli.main import cli
from wsi_screen.config import LocalizationSettings
from wsi_screen.localize import Localizer
from wsi_screen.models import load_bundle
from wsi_screen.stain import DEFAULT_TARGET, glass_mask, lab_stats
from wsi_screen.train.unet import (
    TrainingDataError,
    UNetRecipe,
    grey_source_stats,
    load_annotated_images,
    match_points,
    normalize_image,
    sample_from_image,
    train_unet,
)

SIZE = 96


def _write_set(root: Path, n: int, *, binary: bool = False, rgb: bool = False) -> tuple[Path, Path, Path]:
    """``n`` tiny images with dark nuclei on pale cells on glass, nucleus labels and cell masks."""
    images, masks, cyto = root / "images", root / "nuclei", root / "cytoplasm"
    for d in (images, masks, cyto):
        d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    for i in range(n):
        img = np.full((SIZE, SIZE), 228, np.uint8)
        labels = np.zeros((SIZE, SIZE), np.uint16)
        cells = np.zeros((SIZE, SIZE), np.uint16)
        for k, (cx, cy) in enumerate([(30, 30), (66, 62)], start=1):
            cx, cy = cx + rng.uniform(-4, 4), cy + rng.uniform(-4, 4)
            cell = (xx - cx) ** 2 + (yy - cy) ** 2 <= 22**2
            nuc = (xx - cx) ** 2 + (yy - cy) ** 2 <= 7**2
            img[cell] = 170
            img[nuc] = 70
            cells[cell] = k
            labels[nuc] = k
        img = np.clip(img + rng.normal(0, 3, img.shape), 0, 255).astype(np.uint8)
        out = np.stack([img, (img * 0.9).astype(np.uint8), img], -1) if rgb else img
        Image.fromarray(out).save(images / f"{i:02d}.png")
        Image.fromarray((labels > 0).astype(np.uint8) * 255 if binary else labels).save(
            masks / f"{i:02d}.png"
        )
        Image.fromarray(cells).save(cyto / f"{i:02d}.png")
    return images, masks, cyto


def test_load_isbi_and_qupath_layouts(tmp_path: Path) -> None:
    images, masks, cyto = _write_set(tmp_path / "isbi", 2)
    loaded = load_annotated_images(images, masks, cytoplasm_dir=cyto)
    assert [im.name for im in loaded] == ["00", "01"]
    assert loaded[0].grey and loaded[0].nuclei.max() == 2 and loaded[0].cells is not None
    images, masks, _ = _write_set(tmp_path / "qupath", 1, binary=True, rgb=True)
    (images / "extra.png").write_bytes((images / "00.png").read_bytes())  # no mask: skipped
    loaded = load_annotated_images(images, masks)
    assert len(loaded) == 1 and not loaded[0].grey
    assert loaded[0].nuclei.max() == 2  # binary mask: instances are connected components
    with pytest.raises(TrainingDataError, match="no image"):
        load_annotated_images(images, tmp_path / "qupath" / "cytoplasm" / "..", names=["zz"])
    with pytest.raises(TrainingDataError, match="not found"):
        load_annotated_images(tmp_path / "nope", masks)


def test_sample_targets_at_model_resolution(tmp_path: Path) -> None:
    images, masks, cyto = _write_set(tmp_path, 1)
    im = load_annotated_images(images, masks, cytoplasm_dir=cyto)[0]
    s = sample_from_image(im, image_mpp=0.25, model_mpp=0.5, representation="od_gray", target=DEFAULT_TARGET)
    assert s.features.shape == (1, SIZE // 2, SIZE // 2) and s.nucleus.shape == (SIZE // 2, SIZE // 2)
    assert len(s.centres) == 2 and np.allclose(s.radii, 3.5, atol=0.3)
    assert s.nucleus.sum() == pytest.approx(2 * math.pi * 3.5**2, rel=0.15)
    for cx, cy in s.centres:  # markers at the centres, inside the nuclei
        assert s.marker[int(cy), int(cx)] == 1 and s.nucleus[int(cy), int(cx)] == 1
    assert s.marker.sum() < s.nucleus.sum() / 2 and s.cell.sum() > s.nucleus.sum() * 4


def test_grey_images_are_normalized_in_lightness_only(tmp_path: Path) -> None:
    images, masks, _ = _write_set(tmp_path, 1)
    grey = load_annotated_images(images, masks)[0].rgb
    out = normalize_image(grey, grey=True, target=DEFAULT_TARGET)
    src = grey_source_stats(grey, DEFAULT_TARGET)
    assert src is not None
    stats = lab_stats(out, mask=glass_mask(grey))  # the same pixels as the source statistics
    assert stats.mu[0] == pytest.approx(DEFAULT_TARGET.mu[0], abs=0.02)
    assert stats.sigma[0] == pytest.approx(DEFAULT_TARGET.sigma[0], rel=0.05)
    assert stats.mu[1] == pytest.approx(DEFAULT_TARGET.mu[1], abs=0.01)  # the target's mean tint
    assert stats.mu[2] == pytest.approx(DEFAULT_TARGET.mu[2], abs=0.01)


def test_match_points_is_one_to_one() -> None:
    truth = np.array([[10.0, 10.0], [30.0, 10.0]])
    radii = np.array([4.0, 4.0])
    pred = np.array([[11.0, 10.0], [12.0, 10.0], [30.0, 13.9], [50.0, 50.0], [30.0, 15.0]])
    mp, mt = match_points(pred, truth, radii)
    assert sorted(zip(mp.tolist(), mt.tolist(), strict=True)) == [(0, 0), (2, 1)]
    assert len(match_points(np.zeros((0, 2)), truth, radii)[0]) == 0


def test_training_is_deterministic(tmp_path: Path) -> None:
    images, masks, cyto = _write_set(tmp_path / "d", 2)
    recipe = UNetRecipe(crop_px=64, batch_size=2, decoder_channels=(16, 8, 8, 8, 8))
    kw = dict(mpp=0.25, cytoplasm_dir=cyto, steps=2, recipe=recipe, device="cpu", seed=7, progress=False)
    a = train_unet(images, masks, out_dir=tmp_path / "a", **kw)  # type: ignore[arg-type]
    b = train_unet(images, masks, out_dir=tmp_path / "b", **kw)  # type: ignore[arg-type]
    sa, sb = a.state_dict(), b.state_dict()
    # Same machine, threads, shapes and seed: the same kernels in the same order, so bit for bit.
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    c = train_unet(images, masks, out_dir=tmp_path / "c", **{**kw, "seed": 8})  # type: ignore[arg-type]
    sc = c.state_dict()
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_train_cli_tiny_set(tmp_path: Path) -> None:
    images, masks, cyto = _write_set(tmp_path / "data", 3)
    out = tmp_path / "my-unet"
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "unet",
            "--images",
            str(images),
            "--masks",
            str(masks),
            "--cytoplasm",
            str(cyto),
            "--mpp",
            "0.25",
            "-o",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "2",
            "--val",
            "02",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "my-unet" in result.output
    bundle = load_bundle(out, task="localization")
    cfg = bundle.config
    assert cfg.architecture == "smp-unet" and cfg.class_names == ["nucleus", "marker", "cell"]
    assert cfg.mpp == 0.5 and cfg.input_representation == "od_gray" and cfg.in_channels == 1
    assert cfg.stain_target is not None and tuple(cfg.stain_target.mu) == DEFAULT_TARGET.mu
    assert cfg.training["annotated"]["train"] == ["00", "01"] and cfg.training["annotated"]["val"] == ["02"]
    assert "annotated" in cfg.metrics["validation"]
    raw = json.loads((out / "bundle.json").read_text())
    assert raw["inference"]["context_um"] > 0
    loc = Localizer(bundle, settings=LocalizationSettings(), device=torch.device("cpu"))
    window = torch.full((1, 128, 128, 3), 230, dtype=torch.uint8)
    assert len(loc.localize(window, window_mpp=0.25, halo_px=16)) == 1


def test_train_cli_errors(tmp_path: Path) -> None:
    images, _, _ = _write_set(tmp_path / "data", 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "unet",
            "--images",
            str(images),
            "--masks",
            str(empty),
            "--mpp",
            "0.25",
            "-o",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, TrainingDataError) and "same stem" in str(result.exception)


def test_init_from_a_bundle_starts_from_its_weights(tmp_path: Path) -> None:
    from wsi_screen.train.unet import TrainingDataError

    images, masks, cyto = _write_set(tmp_path / "d", 2)
    recipe = UNetRecipe(crop_px=64, batch_size=2, decoder_channels=(16, 8, 8, 8, 8), lr=1e-12)
    kw = dict(mpp=0.25, cytoplasm_dir=cyto, steps=1, recipe=recipe, device="cpu", seed=7, progress=False)
    first = train_unet(images, masks, out_dir=tmp_path / "first", **kw)  # type: ignore[arg-type]
    # Another seed would start from other random weights; from the bundle, one step at lr 1e-12 keeps
    # the (half-precision) weights of the bundle.
    tuned = train_unet(images, masks, out_dir=tmp_path / "tuned", init_from=first.path, **{**kw, "seed": 9})  # type: ignore[arg-type]
    fresh = train_unet(images, masks, out_dir=tmp_path / "fresh", **{**kw, "seed": 9})  # type: ignore[arg-type]
    sa, st, sf = first.state_dict(), tuned.state_dict(), fresh.state_dict()
    w = [k for k in sa if k.endswith("weight") and sa[k].ndim == 4]
    assert all(torch.equal(sa[k], st[k]) for k in w)
    assert not all(torch.equal(sa[k], sf[k]) for k in w)
    assert tuned.config.training["init_from"]["name"] == first.config.name
    other = UNetRecipe(crop_px=64, batch_size=2, decoder_channels=(16, 8, 8, 8, 8), representation="rgb")
    with pytest.raises(TrainingDataError, match="input_representation 'od_gray'"):
        train_unet(images, masks, out_dir=tmp_path / "x", init_from=first.path, **{**kw, "recipe": other})  # type: ignore[arg-type]


@pytest.mark.parametrize("representation", ["rgb", "od_gray"])
def test_glass_patches_erase_a_region_and_its_nuclei(representation: str) -> None:
    """``glass_patch_p``: a corner, band or blob of 10–40 % of the crop shows the pipeline's
    dark-region glass, and no nucleus, marker or cell is asked for there; the rest is untouched."""
    from wsi_screen.device_stage import DARK_FILL_RGB
    from wsi_screen.train.unet import IGNORE, NucleusSample, _Batcher

    c = 3 if representation == "rgb" else 1
    rng = np.random.default_rng(0)
    feats = rng.uniform(0.3, 0.7, size=(c, 64, 64)).astype(np.float16)
    ones = np.ones((64, 64), np.uint8)
    cell = ones.copy()
    cell[:8] = IGNORE
    smp = NucleusSample("a", "x", feats, ones, ones, cell, feats[0], np.zeros((0, 2)), np.zeros(0))
    recipe = UNetRecipe(representation=representation, glass_patch_p=1.0, crop_px=64, batch_size=1)
    batcher = _Batcher([smp], recipe, np.random.default_rng(1))
    glass = np.asarray(DARK_FILL_RGB, np.float32) / 255.0
    expect = glass if representation == "rgb" else -np.log10(glass).mean(keepdims=True)
    shares = []
    for _ in range(30):
        f, t = batcher._glass_patch(feats.astype(np.float32), np.stack([ones, ones, cell]))
        region = np.all(np.isclose(f, expect[:, None, None], atol=1e-6), axis=0)
        shares.append(region.mean())
        assert 0.05 <= region.mean() <= 0.45
        assert (t[0][region] == 0).all() and (t[1][region] == 0).all()
        assert (t[0][~region] == 1).all() and (t[1][~region] == 1).all()
        np.testing.assert_array_equal(f[:, ~region], feats.astype(np.float32)[:, ~region])
        assert set(np.unique(t[2][region])) <= {0, IGNORE}  # unknown stays unknown
    assert np.std(shares) > 0.02  # the shapes and sizes vary
    x, y = batcher.batch()  # and the batcher uses it
    assert x.shape == (1, c, 64, 64) and y.shape == (1, 3, 64, 64)


def test_train_cli_fine_tunes_from_a_bundle_with_glass_patches(tmp_path: Path) -> None:
    """``train unet --init BUNDLE --glass-patches P``: the bundle records where it started and the
    recipe; an --init whose input does not match is a clear error, and no bundle is written."""
    images, masks, cyto = _write_set(tmp_path / "data", 2)
    base = ["train", "unet", "--images", str(images), "--masks", str(masks), "--cytoplasm", str(cyto)]
    base += ["--mpp", "0.25", "--epochs", "1", "--batch-size", "2", "-q"]
    first = CliRunner().invoke(cli, [*base, "-o", str(tmp_path / "first")])
    assert first.exit_code == 0, first.output
    tuned = CliRunner().invoke(
        cli,
        [*base, "-o", str(tmp_path / "tuned"), "--init", str(tmp_path / "first"), "--glass-patches", "0.5"],
    )
    assert tuned.exit_code == 0, tuned.output
    cfg = load_bundle(tmp_path / "tuned", task="localization").config
    assert cfg.training["init_from"]["sha256"] == load_bundle(tmp_path / "first").config.sha256
    assert cfg.training["recipe"]["glass_patch_p"] == 0.5
    bad = CliRunner().invoke(
        cli,
        [*base, "-o", str(tmp_path / "bad"), "--init", str(tmp_path / "first"), "--representation", "rgb"],
    )
    # A WsiScreenError: `wsi-screen` prints it as one line and exits 1 (tests/test_cli.py).
    assert bad.exit_code != 0 and isinstance(bad.exception, TrainingDataError)
    assert "input_representation 'od_gray'" in str(bad.exception)
    assert not (tmp_path / "bad").exists()
