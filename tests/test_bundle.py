"""Model bundles: safetensors + validated JSON; every problem is a one-line BundleError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from wsi_screen.errors import BundleError, BundleNotFoundError
from wsi_screen.models import BundleConfig, create_model, load_bundle, save_bundle
from wsi_screen.models.bundle import sha256_file

CLASSES = ["NILM", "ASC-US", "LSIL", "HSIL", "artifact"]


def _config(**kw: object) -> BundleConfig:
    base: dict[str, object] = {
        "name": "tiny",
        "task": "classification",
        "architecture": "resnet10t",
        "mpp": 0.25,
        "class_names": CLASSES,
        "abnormal_classes": ["ASC-US", "LSIL", "HSIL"],
        "stain_target": {"mu": [8.0, -0.1, 0.02], "sigma": [0.6, 0.1, 0.03]},
    }
    base.update(kw)
    return BundleConfig.model_validate(base)


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    model = create_model("resnet10t", num_classes=5)
    save_bundle(model, _config(), tmp_path / "tiny")
    return tmp_path / "tiny"


def test_round_trip_gives_identical_outputs(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir, task="classification")
    assert bundle.sha256 == sha256_file(bundle_dir / "model.safetensors")
    torch.manual_seed(0)
    original = create_model("resnet10t", num_classes=5).eval()
    rebuilt = bundle.build_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(original(x), rebuilt(x))
    assert json.loads((bundle_dir / "bundle.json").read_text())["class_names"] == CLASSES


def test_half_precision_storage(tmp_path: Path) -> None:
    model = create_model("resnet10t", num_classes=5)
    full = save_bundle(model, _config(), tmp_path / "f32")
    half = save_bundle(model, _config(), tmp_path / "f16", half=True)
    assert half.weights_path.stat().st_size < 0.6 * full.weights_path.stat().st_size
    state = load_bundle(tmp_path / "f16").state_dict()
    assert all(v.dtype == torch.float32 for v in state.values() if v.is_floating_point())


def test_missing_and_unknown(tmp_path: Path) -> None:
    with pytest.raises(BundleNotFoundError, match="no model bundle named"):
        load_bundle("no-such-bundle")
    with pytest.raises(BundleNotFoundError):
        load_bundle(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleNotFoundError, match=r"bundle\.json is missing"):
        load_bundle(tmp_path / "empty")


def test_missing_weights(bundle_dir: Path) -> None:
    (bundle_dir / "model.safetensors").unlink()
    with pytest.raises(BundleError, match=r"model\.safetensors is missing"):
        load_bundle(bundle_dir)


def test_corrupted_weights_detected_by_sha256(bundle_dir: Path) -> None:
    weights = bundle_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="corrupt or was replaced"):
        load_bundle(bundle_dir)


def test_pickle_is_never_loaded(bundle_dir: Path) -> None:
    """A pickle in place of the safetensors file is refused, not executed."""
    weights = bundle_dir / "model.safetensors"
    torch.save({"x": torch.zeros(1)}, weights)
    cfg = json.loads((bundle_dir / "bundle.json").read_text())
    cfg["sha256"] = sha256_file(weights)
    (bundle_dir / "bundle.json").write_text(json.dumps(cfg))
    bundle = load_bundle(bundle_dir)
    with pytest.raises(BundleError, match="cannot read"):
        bundle.state_dict()


def test_invalid_json_and_fields(bundle_dir: Path) -> None:
    cfg_path = bundle_dir / "bundle.json"
    good = json.loads(cfg_path.read_text())
    cfg_path.write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(bundle_dir)
    for patch, fragment in (
        ({"abnormal_classes": ["CIN3"]}, "not in class_names"),
        ({"mpp": -1}, "mpp"),
        ({"task": "segmentation"}, "task"),
        ({"unexpected": 1}, "unexpected"),
        ({"format_version": 99}, "upgrade wsi-screen"),
    ):
        cfg_path.write_text(json.dumps(good | patch))
        with pytest.raises(BundleError, match=fragment) as info:
            load_bundle(bundle_dir)
        assert "\n" not in str(info.value)


def test_input_representation_is_checked(bundle_dir: Path) -> None:
    """``input_representation`` is one of the representations the stages support, checked on load."""
    import typing

    from pydantic import ValidationError

    from wsi_screen import classify, localize
    from wsi_screen.models.bundle import InputRepresentation

    assert set(typing.get_args(InputRepresentation)) == set(localize.REPRESENTATIONS) | set(
        classify.REPRESENTATIONS
    )
    for rep in typing.get_args(InputRepresentation):
        assert _config(input_representation=rep).input_representation == rep
    with pytest.raises(ValidationError, match="input_representation") as info:
        _config(input_representation="rgb+depth")
    assert "'rgb', 'od_gray' or 'rgb+mask'" in str(info.value)
    cfg_path = bundle_dir / "bundle.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text()) | {"input_representation": "hsv"}))
    with pytest.raises(BundleError) as err:
        load_bundle(bundle_dir)
    assert "invalid input_representation: Input should be 'rgb', 'od_gray' or 'rgb+mask'" in str(err.value)
    assert "\n" not in str(err.value)


def test_wrong_task_and_mismatched_architecture(bundle_dir: Path) -> None:
    with pytest.raises(BundleError, match="localization model is needed"):
        load_bundle(bundle_dir, task="localization")
    cfg_path = bundle_dir / "bundle.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architecture"] = "resnet18"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="do not match architecture resnet18"):
        load_bundle(bundle_dir).build_model()
    cfg["architecture"] = "no-such-arch"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(BundleError, match="unknown architecture 'no-such-arch'"):
        load_bundle(bundle_dir).build_model()


def test_shipped_bundles_load_and_verify() -> None:
    from wsi_screen.models import list_bundles

    for name in list_bundles():
        bundle = load_bundle(name)
        assert bundle.config.stain_target is not None, name
        assert bundle.weights_path.stat().st_size < 6_000_000, name
        model = bundle.build_model()
        assert not model.training
