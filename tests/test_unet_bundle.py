"""The shipped nucleus U-Net bundle: it loads, validates, matches its card, and fails loudly when damaged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import wsi_screen.cli.commands  # noqa: F401  (registers the sub-commands)
from wsi_screen.cli.main import cli
from wsi_screen.config import load_settings
from wsi_screen.errors import BundleError, BundleNotFoundError
from wsi_screen.models import list_bundles, load_bundle
from wsi_screen.models.registry import bundle_dir
from wsi_screen.stain import DEFAULT_TARGET

NAME = "nuclei-unet-v1"


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    src = bundle_dir(NAME)
    assert src is not None
    return Path(shutil.copytree(src, tmp_path / NAME))


def test_shipped_bundle_loads_and_matches_its_card() -> None:
    assert NAME in list_bundles()
    b = load_bundle(NAME, task="localization")  # verifies the sha256 of the weights
    cfg = b.config
    assert cfg.name == NAME and cfg.task == "localization" and cfg.architecture == "smp-unet"
    assert cfg.class_names == ["nucleus", "marker", "cell"]
    assert cfg.input_representation == "od_gray" and cfg.in_channels == 1 and cfg.mpp == 0.5
    assert cfg.stain_target is not None
    assert (
        tuple(cfg.stain_target.mu) == DEFAULT_TARGET.mu
        and tuple(cfg.stain_target.sigma) == DEFAULT_TARGET.sigma
    )
    assert set(cfg.thresholds) == {"nucleus", "marker", "cell"}
    assert 20.0 <= cfg.inference["context_um"] <= 32.0
    assert b.weights_path.stat().st_size < 5_000_000  # fp16 storage
    head = b.weights_path.read_bytes()[:8]
    assert int.from_bytes(head, "little") < 1_000_000  # a safetensors header, not a pickle
    for key in ("recipe", "annotated", "synthetic", "time_s", "history"):
        assert key in cfg.training
    model = b.build_model()
    assert getattr(model, "task", None) == "segmentation"
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 70, 50))
    assert out.shape == (1, 3, 70, 50) and torch.isfinite(out).all()


def test_corrupted_weights_are_refused(copy: Path) -> None:
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt or was replaced"):
        load_bundle(copy)


def test_truncated_weights_without_checksum_are_refused(copy: Path) -> None:
    cfg = json.loads((copy / "bundle.json").read_text())
    cfg["sha256"] = ""
    (copy / "bundle.json").write_text(json.dumps(cfg))
    (copy / "model.safetensors").write_bytes((copy / "model.safetensors").read_bytes()[:5000])
    b = load_bundle(copy)
    with pytest.raises(BundleError, match=r"cannot read model\.safetensors"):
        b.build_model()


def test_missing_files_and_bad_config(copy: Path, tmp_path: Path) -> None:
    (copy / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors is missing"):
        load_bundle(copy)
    with pytest.raises(BundleNotFoundError, match="no model bundle named"):
        load_bundle("nuclei-unet-v0")
    other = Path(shutil.copytree(bundle_dir(NAME), tmp_path / "other"))  # type: ignore[arg-type]
    cfg = json.loads((other / "bundle.json").read_text())
    cfg["mpp"] = -1
    (other / "bundle.json").write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="invalid mpp"):
        load_bundle(other)
    (other / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(other)


def test_wrong_task_is_refused() -> None:
    with pytest.raises(BundleError, match="localization model, but a classification model is needed"):
        load_bundle(NAME, task="classification")


def test_localize_cli_writes_overlays(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from wsi_screen.synth import synthesize_slide

    res = synthesize_slide(
        tmp_path / "s.tiff",
        size=(1536, 1024),
        seed=4,
        abnormal="HSIL=2",
        spot=False,
        density_per_mm2=600,
        workers=1,
    )
    out = tmp_path / "out"
    result = CliRunner().invoke(
        cli,
        [
            "localize",
            str(res.path),
            "-o",
            str(out),
            "--max-tiles",
            "2",
            "--set",
            "tiling.tile_size_px=512",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    pngs = sorted(out.glob("tile_*.png"))
    assert len(pngs) == 2
    rows = (out / "candidates.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert header[:4] == ["tile", "x", "y", "owned"] and "nc_ratio" in header
    summary = json.loads((out / "summary.json").read_text())
    default_localizer = load_settings().localization.model
    assert summary["owned"] > 0 and summary["model"]["name"] == default_localizer
    assert len(rows) - 1 == summary["candidates"] >= summary["owned"]
