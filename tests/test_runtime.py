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
