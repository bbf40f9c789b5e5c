"""Runtime helpers: device resolution and glibc heap tuning."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from wsi_screen.runtime import DeviceError, limit_heap_growth, resolve_device


def test_resolve_device_cpu_and_errors() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only"
)
def test_limit_heap_growth_on_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    assert limit_heap_growth() is True
    monkeypatch.setenv("WSI_SCREEN_HEAP_TUNING", "0")
    assert limit_heap_growth() is False
    monkeypatch.delenv("WSI_SCREEN_HEAP_TUNING")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")  # the user's own setting wins
    assert limit_heap_growth() is False


def test_cpu_bf16_autocast_only_when_asked() -> None:
    """``runtime.cpu_bf16`` turns bf16 autocast on for CPU inference; by default it stays float32."""
    from wsi_screen.config import load_settings
    from wsi_screen.pipeline import load_models
    from wsi_screen.runtime import autocast_context

    cpu = torch.device("cpu")
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with autocast_context(cpu):
        assert (a @ b).dtype == torch.float32
    with autocast_context(cpu, cpu_bf16=True):
        assert (a @ b).dtype == torch.bfloat16
    default = load_models(load_settings(), device=cpu)
    assert not default.localizer.cpu_bf16 and not default.classifier.cpu_bf16
    fast = load_models(load_settings().with_overrides({"runtime.cpu_bf16": True}), device=cpu)
    assert fast.localizer.cpu_bf16 and fast.classifier.cpu_bf16
    crops = torch.randint(
        0, 256, (4, fast.classifier.input_size, fast.classifier.input_size, 3), dtype=torch.uint8
    )
    probs = fast.classifier.predict(crops)
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(1), torch.ones(4), atol=1e-2)
    torch.testing.assert_close(probs, default.classifier.predict(crops), atol=0.05, rtol=0)
