"""Contract of every model architecture: registered ones (``list_architectures()``) and documented timm names.

Classification architectures return (B, num_classes); segmentation ones (``task = "segmentation"`` on the
model, or a 4-D output when ``task`` is not declared) return (B, num_classes, H, W) at input resolution.
Every test here runs with the network disabled.
"""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from wsi_screen.errors import BundleError
from wsi_screen.models import BundleConfig, create_model, list_architectures, load_bundle, save_bundle
from wsi_screen.models.registry import is_architecture
from wsi_screen.models.runicnet import RUNICNET_VARIANTS, RepConv3x3, RunicNet

REGISTERED = list_architectures()
TIMM_DOCUMENTED = ["resnet18", "resnet50", "mobilenetv3_small_100", "efficientnet_b0"]
ALL_ARCHS = REGISTERED + [n for n in TIMM_DOCUMENTED if n not in REGISTERED]
NUM_CLASSES = 3
SIZE = 64  # small enough to be fast, large enough for every stride-32 backbone
HEAVY = {"resnet50"}


def _param(name: str) -> Any:
    return pytest.param(name, id=name, marks=[pytest.mark.slow] if name in HEAVY else [])


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a connection (e.g. a weight download) fails the test."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    torch.manual_seed(0)


def _build(name: str, in_chans: int = 3) -> nn.Module:
    try:
        return create_model(name, num_classes=NUM_CLASSES, in_chans=in_chans)
    except (TypeError, ValueError, NotImplementedError) as exc:
        if in_chans == 3:
            raise
        pytest.skip(f"{name} does not support in_chans={in_chans}: {exc}")


def _is_segmentation(model: nn.Module, out: torch.Tensor) -> bool:
    task = getattr(model, "task", None)
    if task is not None:
        return bool(task == "segmentation")
    return out.ndim == 4


def _check_output(model: nn.Module, out: torch.Tensor, x: torch.Tensor) -> None:
    assert isinstance(out, torch.Tensor), f"forward must return a tensor, got {type(out).__name__}"
    if _is_segmentation(model, out):
        assert tuple(out.shape) == (x.shape[0], NUM_CLASSES, *x.shape[2:]), tuple(out.shape)
    else:
        assert tuple(out.shape) == (x.shape[0], NUM_CLASSES), tuple(out.shape)
    assert torch.isfinite(out).all(), "output has NaN/inf"


def _calibrate_bn(model: nn.Module, in_chans: int, size: int = SIZE) -> None:
    """Give every BatchNorm realistic running statistics (cumulative average over a few batches)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, in_chans, size, size))
    model.eval()


# --------------------------------------------------------------------------- every architecture


def test_registry_lists_runicnet_variants() -> None:
    assert {"runicnet", "runicnet-tiny"} <= set(REGISTERED)
    for name in ALL_ARCHS:
        assert is_architecture(name)


@pytest.mark.parametrize("in_chans", [3, 4])
@pytest.mark.parametrize("name", [_param(n) for n in ALL_ARCHS])
def test_forward_backward(name: str, in_chans: int) -> None:
    model = _build(name, in_chans).train()
    x = torch.randn(2, in_chans, SIZE, SIZE)
    out = model(x)
    _check_output(model, out, x)
    out.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert grads, "no parameter received a gradient"
    assert all(torch.isfinite(g).all() for g in grads), "non-finite gradient"
    first = next(p for p in model.parameters() if p.requires_grad)
    assert first.grad is not None and first.grad.abs().sum() > 0, "no gradient reaches the input layer"


@pytest.mark.parametrize("name", [_param(n) for n in ALL_ARCHS])
def test_eval_is_deterministic(name: str) -> None:
    model = _build(name).eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        a, b = model(x), model(x)
    _check_output(model, a, x)
    assert torch.equal(a, b)  # same input and shapes, so the same kernels in the same order: exact


def test_timm_models_are_created_without_pretrained_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import timm

    seen: list[Any] = []
    real = timm.create_model

    def spy(*args: Any, **kwargs: Any) -> nn.Module:
        seen.append(kwargs.get("pretrained"))
        return real(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", spy)
    model = create_model("timm:resnet18", num_classes=NUM_CLASSES, pretrained=True)
    assert seen == [False]
    assert model.get_classifier().out_features == NUM_CLASSES


def test_unknown_architecture_is_a_bundle_error() -> None:
    with pytest.raises(BundleError, match="no-such-net-v9"):
        create_model("no-such-net-v9", num_classes=2)
    assert not is_architecture("no-such-net-v9")


# --------------------------------------------------------------------------- re-parameterization


@pytest.mark.parametrize(
    ("in_ch", "out_ch", "stride", "groups", "edge"),
    [(8, 8, 1, 1, True), (8, 8, 1, 1, False), (4, 12, 2, 1, True), (8, 8, 2, 2, True), (8, 8, 1, 4, True)],
)
def test_repconv_fusion_is_exact(in_ch: int, out_ch: int, stride: int, groups: int, edge: bool) -> None:
    conv = RepConv3x3(in_ch, out_ch, stride=stride, groups=groups, edge=edge)
    for m in conv.modules():  # non-trivial BN statistics and affine parameters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)  # type: ignore[union-attr]
            m.running_var.uniform_(0.5, 2)  # type: ignore[union-attr]
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.5, 0.5)
    conv.eval().double()  # the fusion is exact algebra: in float64 only float64 rounding remains
    x = torch.randn(2, in_ch, 13, 10, dtype=torch.float64)  # odd sizes: border and stride handling
    with torch.no_grad():
        expected = conv(x)
        conv.reparameterize()
        got = conv(x)
    assert conv.deploy and conv.conv3 is None and conv.edge_convs is None
    assert list(conv.state_dict()) == ["fused.weight", "fused.bias"]
    # Each output sums ≤ 300 products (3×3, 1×1, identity and 3 edge branches over 8 channels), each
    # rounded ≤ 90 times on its way (K − 1 additions, BN, branch sums), so any order is within
    # 90·u64·Σ|w·x| ≈ 1e-14 · 3000 ≈ 3e-11 of exact (|x| ≤ 4, folded |w| ≤ 0.75, edge taps ≤ 4;
    # measured: 5e-15). A fusion done in float32, or a misplaced BN ε, is ≥ 1e-7 off.
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", REGISTERED)
def test_reparameterized_model_matches(name: str) -> None:
    model = _build(name, 4)
    if not callable(getattr(model, "reparameterize", None)):
        pytest.skip(f"{name} has no reparameterize()")
    _calibrate_bn(model, 4)
    model = model.double()  # exact algebra, compared in float64 (see test_repconv_fusion_is_exact)
    x = torch.randn(2, 4, 80, 72, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        fused = copy.deepcopy(model).reparameterize()
        got = fused(x)
    # Worst case per layer: K·u64 ≈ 2.6e-13 of Σ|w·x| (widest K = 9·256), Σ|w·x| ≲ 100·|y|; ~40
    # layers adding up give ~1e-9 relative, and 1e-8 leaves ×10 for the layers' gain (measured: 6e-14,
    # |out| < 4). A fusion done in float32, or a misplaced BN ε, is ≥ 1e-7 off.
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-8)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules() if isinstance(m, RepConv3x3))
    assert sum(p.numel() for p in fused.parameters()) < sum(p.numel() for p in model.parameters())
    if isinstance(model, RunicNet):  # the deploy form built directly has the fused state-dict layout
        direct = create_model(name, num_classes=NUM_CLASSES, in_chans=4, deploy=True)
        assert direct.state_dict().keys() == fused.state_dict().keys()


# --------------------------------------------------------------------------- RunicNet specifics


@pytest.mark.slow
def test_runicnet_full_size_and_odd_sizes() -> None:
    model = create_model("runicnet", num_classes=NUM_CLASSES, in_chans=4).eval()
    with torch.no_grad():
        for b, h, w in [(2, 224, 224), (1, 97, 131), (1, 32, 32)]:
            x = torch.randn(b, 4, h, w)
            out = model(x)
            assert out.shape == (b, NUM_CLASSES) and torch.isfinite(out).all()


def test_runicnet_sizes_and_api() -> None:
    def n_params(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    default = create_model("runicnet", num_classes=5, deploy=True)
    tiny = create_model("runicnet-tiny", num_classes=5, deploy=True)
    assert isinstance(default, RunicNet) and default.task == "classification"
    assert 2_000_000 < n_params(default) < 6_000_000
    assert n_params(tiny) < 1_000_000
    assert default.deploy and not create_model("runicnet", num_classes=5).deploy
    assert set(RUNICNET_VARIANTS) <= set(REGISTERED)

    small = create_model("runicnet", num_classes=2, widths=(8, 16), depths=(1, 0), drop_rate=0.0)
    x = torch.randn(2, 3, 40, 40)
    assert small.forward_features(x).shape == (2, 16, 5, 5)  # stem /4, one transition /2
    assert small.forward_head(small.forward_features(x), pre_logits=True).shape == (2, 16)
    small.reset_classifier(7)
    assert small(x).shape == (2, 7)
    assert create_model("runicnet-tiny", num_classes=0)(x).shape == (2, 128)

    with pytest.raises(BundleError, match="pretrained"):
        create_model("runicnet", num_classes=2, pretrained=True)
    create_model("runicnet-tiny", num_classes=2, pretrained=False)
    with pytest.raises(ValueError, match="widths"):
        create_model("runicnet", num_classes=2, widths=(8, 16), depths=(1,))


@pytest.mark.parametrize("deploy", [False, True], ids=["train-form", "deploy-form"])
def test_runicnet_bundle_round_trip(tmp_path: Path, deploy: bool) -> None:
    model = create_model("runicnet", num_classes=NUM_CLASSES, in_chans=4)
    _calibrate_bn(model, 4)
    arch_kwargs: dict[str, Any] = {}
    if deploy:
        model.reparameterize()
        arch_kwargs = {"deploy": True}
    config = BundleConfig(
        name="runicnet-contract",
        task="classification",
        architecture="runicnet",
        arch_kwargs=arch_kwargs,
        in_channels=4,
        input_representation="rgb+mask",
        input_size=SIZE,
        mpp=0.5,
        mean=[0.5] * 4,
        std=[0.25] * 4,
        class_names=["NILM", "LSIL", "HSIL"],
        abnormal_classes=["LSIL", "HSIL"],
    )
    save_bundle(model, config, tmp_path / "bundle")
    loaded = load_bundle(tmp_path / "bundle", task="classification").build_model()
    x = torch.randn(2, 4, SIZE, SIZE)
    with torch.no_grad():  # bit-identical weights, same modules and shapes: the same kernels, exact
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
