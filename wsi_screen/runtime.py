"""Device selection and torch runtime settings."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from wsi_screen.errors import WsiScreenError

if TYPE_CHECKING:
    import torch

__all__ = [
    "DeviceError",
    "autocast_context",
    "configure_torch",
    "cpu_count",
    "cpu_model",
    "limit_heap_growth",
    "resolve_device",
]

logger = logging.getLogger(__name__)


class DeviceError(WsiScreenError, RuntimeError):
    """The requested compute device is not available."""


def resolve_device(name: str = "auto", *, setting: str = "runtime.device") -> torch.device:
    """``auto`` → CUDA, then MPS, then CPU; an explicit device that is absent is an error.

    ``setting``: the key that gave ``name``, as the error names it (``device`` for the training and
    evaluation functions' parameter).
    """
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
            raise DeviceError(f"{setting} = {name!r}: no CUDA GPU is available here; use 'cpu' or 'auto'")
        return torch.device(name)
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError(f"{setting} = 'mps': Apple MPS is not available here; use 'cpu' or 'auto'")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:N or mps")


def cpu_count() -> int:
    """CPU cores this process may use (respects affinity masks and cgroup pinning)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), for run records and benchmark tables."""
    import platform
    from pathlib import Path

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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


#: Buffers at least this large are served by mmap (returned to the OS when freed): see
#: :func:`limit_heap_growth`.
MMAP_THRESHOLD_BYTES = 4 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def limit_heap_growth(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold so large buffers do not fragment the heap (Linux/glibc only).

    glibc raises its mmap threshold after each large free, so the read windows and tensors of a few MiB
    that the reader threads, the device stage and the writer pass around end up in the threads' heap
    arenas, which fragment and are never trimmed: the peak RSS then grows with the slide. With a fixed
    threshold they are mmapped and returned on free (measured in docs/performance.md, *Memory*).
    A ``MALLOC_MMAP_THRESHOLD_`` environment variable set by the user wins, and
    ``WSI_SCREEN_HEAP_TUNING=0`` turns this off. Returns whether it applied.
    """
    import ctypes
    import sys

    if (
        not sys.platform.startswith("linux")
        or "MALLOC_MMAP_THRESHOLD_" in os.environ
        or os.environ.get("WSI_SCREEN_HEAP_TUNING") == "0"
    ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    if ok:
        logger.debug("glibc mmap threshold fixed at %d bytes", threshold)
    return ok


def autocast_context(device: torch.device, *, cpu_bf16: bool = False) -> torch.autocast:
    """bf16 autocast on CUDA; on the CPU only with ``cpu_bf16`` (``runtime.cpu_bf16``), else float32."""
    import torch

    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=cpu_bf16 and device.type == "cpu")
