"""Self-supervised (SimCLR) pre-training: the loss, the views, the backbone bundle and its use."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from wsi_screen.train.data import CropSet
from wsi_screen.train.ssl import BACKBONE_CLASS, SSLConfig, SSLError, nt_xent_loss, pretrain_ssl, simclr_views


def _crops(n: int = 16, side: int = 64, seed: int = 0) -> CropSet:
    rng = np.random.default_rng(seed)
    return CropSet(
        crops=rng.integers(0, 255, (n, side, side, 3), dtype=np.uint8),
        labels=np.arange(n, dtype=np.int64) % 2,
        groups=np.array([f"g{i // 2}" for i in range(n)]),
        class_names=["NILM", "HSIL"],
        mpp=0.25,
        sources=np.array(["test"] * n),
    )


def test_nt_xent_is_low_for_matching_views_and_log_of_the_others_for_random_ones() -> None:
    torch.manual_seed(0)
    n, d = 32, 64
    z = torch.randn(n, d)
    # Identical partners, near-orthogonal others, sharp temperature: the loss is close to 0.
    assert float(nt_xent_loss(z, z.clone(), temperature=0.05)) < 0.05
    # Every similarity equal (all views the same vector): each view picks 1 of 2n − 1 at random.
    same = torch.ones(n, d)
    assert float(nt_xent_loss(same, same, temperature=0.2)) == pytest.approx(math.log(2 * n - 1), rel=1e-5)
    # Partners swapped for strangers: worse than the true pairing.
    other = torch.randn(n, d)
    assert float(nt_xent_loss(z, other, 0.2)) > float(nt_xent_loss(z, z + 0.1 * other, 0.2))
    with pytest.raises(ValueError, match="same shape"):
        nt_xent_loss(z, z[:4], 0.2)


def test_views_have_the_view_size_and_differ_between_draws() -> None:
    cfg = SSLConfig(view_size=40, min_scale=0.5)
    crops = torch.from_numpy(_crops(4).crops)
    gen = torch.Generator().manual_seed(0)
    a = simclr_views(crops, cfg, mpp=0.25, generator=gen)
    b = simclr_views(crops, cfg, mpp=0.25, generator=gen)
    assert a.shape == b.shape == (4, 3, 40, 40)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 255.0
    assert float((a - b).abs().mean()) > 1.0


def test_a_full_view_without_colour_change_is_the_resized_crop() -> None:
    """min_scale 1 and no colour augmentation: a view is the whole crop, flipped/rotated, resampled."""
    from wsi_screen.train.augment import AugmentConfig

    side = 32
    yy, xx = np.mgrid[0:side, 0:side]
    img = np.stack([yy * 8, xx * 8, np.full_like(yy, 100)], axis=-1).astype(np.uint8)[None]
    cfg = SSLConfig(view_size=side, min_scale=1.0, augment=AugmentConfig.none())
    view = simclr_views(torch.from_numpy(img), cfg, mpp=0.25, generator=torch.Generator().manual_seed(3))[0]
    x = torch.from_numpy(img[0]).permute(2, 0, 1).float()
    # The aspect jitter may stretch by ≤ 4/3 before clamping; with area 1 the view covers the crop on
    # one axis at least, so compare against the 8 symmetries of the crop on the untouched channel.
    assert torch.allclose(view[2], x[2])
    candidates = []
    for k in range(4):
        for flip in (False, True):
            y = torch.flip(x, dims=(2,)) if flip else x
            candidates.append(torch.rot90(y, k, dims=(1, 2)))
    err = min(float((view - c).abs().mean()) for c in candidates)
    assert err < 8.0


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        SSLConfig(batch_size=1)
    with pytest.raises(ValueError, match="min_scale"):
        SSLConfig(min_scale=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SSLConfig(temperature=0.0)


def test_pretraining_writes_a_backbone_bundle_that_inits_a_classifier_and_cannot_screen(
    tmp_path: Path,
) -> None:
    from wsi_screen.classify import CellClassifier
    from wsi_screen.models.bundle import BundleError, load_bundle
    from wsi_screen.train.classifier import TrainConfig, train_classifier

    data = _crops(16)
    cfg = SSLConfig(arch="mobilenetv3_small_050", epochs=2, batch_size=8, view_size=48, device="cpu", seed=0)
    bundle = pretrain_ssl(data, tmp_path / "ssl", config=cfg, indices=np.arange(12), progress=False)
    assert bundle.config.class_names == [BACKBONE_CLASS]
    assert bundle.config.inference["backbone_only"] is True
    hist = bundle.config.training["history"]
    assert [h["epoch"] for h in hist] == [1, 2] and all(np.isfinite(h["loss"]) for h in hist)
    assert bundle.config.training["crops"] == 12
    state = bundle.state_dict()
    head = [k for k in state if k.startswith("classifier.")]
    assert head and all(float(state[k].abs().max()) == 0.0 for k in head)
    # The pipeline refuses it.
    with pytest.raises(BundleError, match="backbone"):
        CellClassifier([load_bundle(tmp_path / "ssl", task="classification")], device=torch.device("cpu"))
    # A classifier starts from its backbone (new head) and records it.
    res = train_classifier(
        data,
        tmp_path / "clf",
        config=TrainConfig(epochs=1, batch_size=8, device="cpu", init=str(tmp_path / "ssl")),
        split={"train": np.arange(0, 10), "val": np.arange(10, 13), "test": np.arange(13, 16)},
        progress=False,
    )
    assert "backbone" in res.bundle.config.training["init"]
    assert res.bundle.config.architecture == "mobilenetv3_small_050"


def test_pretraining_resumes_and_refuses_another_recipe(tmp_path: Path) -> None:
    data = _crops(16)
    cfg = SSLConfig(arch="mobilenetv3_small_050", epochs=1, batch_size=8, view_size=40, device="cpu")
    pretrain_ssl(data, tmp_path / "a", config=cfg, work_dir=tmp_path / "w", progress=False)
    longer = SSLConfig(arch="mobilenetv3_small_050", epochs=2, batch_size=8, view_size=40, device="cpu")
    with pytest.raises(SSLError, match="another recipe"):
        pretrain_ssl(
            data, tmp_path / "b", config=longer, work_dir=tmp_path / "w", resume=True, progress=False
        )
    again = pretrain_ssl(
        data, tmp_path / "c", config=cfg, work_dir=tmp_path / "w", resume=True, progress=False
    )
    assert [h["epoch"] for h in again.config.training["history"]] == [1]  # nothing left to train


def test_too_few_crops_or_bad_indices_are_one_line_errors(tmp_path: Path) -> None:
    data = _crops(6)
    with pytest.raises(SSLError, match="fewer than one batch"):
        pretrain_ssl(data, tmp_path / "x", config=SSLConfig(batch_size=8, device="cpu"), progress=False)
    with pytest.raises(SSLError, match="out of range"):
        pretrain_ssl(
            _crops(16),
            tmp_path / "y",
            config=SSLConfig(batch_size=4, device="cpu"),
            indices=np.array([0, 1, 2, 3, 99]),
        )


def _write_unlabelled_folder(root: Path, n: int = 12, side: int = 48) -> Path:
    from PIL import Image

    rng = np.random.default_rng(1)
    for k in range(n):
        folder = root / ("batch-a" if k % 2 else "scan 2")  # any folder names: labels are not used
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(60, 240, (side, side, 3), dtype=np.uint8)).save(folder / f"c{k}.png")
    return root


def test_train_ssl_cli_writes_a_backbone_that_train_classifier_takes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from wsi_screen.cli.main import main
    from wsi_screen.models.bundle import load_bundle

    data = _write_unlabelled_folder(tmp_path / "crops")
    out = tmp_path / "ssl"
    args = ["train", "ssl", "--data", str(data), "--mpp", "0.25", "--input-size", "48", "-o", str(out)]
    small = [
        "--arch",
        "mobilenetv3_small_050",
        "--epochs",
        "1",
        "--batch-size",
        "6",
        "--view-size",
        "40",
        "-q",
    ]
    with pytest.raises(SystemExit) as exc:
        main([*args, *small])
    captured = capsys.readouterr()
    assert exc.value.code in (0, None), captured.err
    assert "backbone bundle" in captured.out
    bundle = load_bundle(out, task="classification")
    assert bundle.config.inference["backbone_only"] and bundle.config.training["crops"] == 12
    # A bad value is one line naming it, before any crop is read.
    with pytest.raises(SystemExit) as exc:
        main([*args, "--min-scale", "0", "-q"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--min-scale" in err and "Traceback" not in err
    # Screening with the backbone is refused in one line.
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--model", str(out), "-o", str(tmp_path / "demo"), "-q"])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and "self-supervised backbone" in err and "Traceback" not in err
