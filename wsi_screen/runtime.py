"""Device selection and torch runtime settings."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from wsi_screen.errors import WsiScreenError

if TYPE_CHECKING:
    import torch

__all__ = ["DeviceError", "autocast_context", "configure_torch", "cpu_count", "resolve_device"]

logger = logging.getLogger(__name__)


class DeviceError(WsiScreenError, RuntimeError):
    """The requested compute device is not available."""


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → CUDA, then MPS, then CPU; an explicit device that is absent is an error."""
    import torch

    name = name.lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {name}: no CUDA GPU is available here; use --device cpu or auto")
        return torch.device(name)
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError("--device mps: Apple MPS is not available here; use --device cpu or auto")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps")


def cpu_count() -> int:
    """CPU cores this process may use (respects affinity masks and cgroup pinning)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_torch(*, threads: int = 0) -> None:
    """Set torch's intra-op threads (0 = all cores) and fast-matmul flags."""
    import torch

    n = threads or cpu_count()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast_context(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA; a disabled context elsewhere (CPU inference stays float32)."""
    import torch

    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", enabled=False)
