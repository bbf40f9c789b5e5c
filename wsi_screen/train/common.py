"""Helpers shared by the training loops: seeding, device, progress, timing."""

from __future__ import annotations

import logging
import math
import random
import sys
import time
from collections.abc import Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["Progress", "Stopwatch", "resolve_training_device", "seed_everything"]

logger = logging.getLogger(__name__)


def seed_everything(seed: int, *, deterministic: bool = True) -> np.random.Generator:
    """Seed Python, numpy and torch; with ``deterministic``, ask torch for deterministic kernels.

    Returns a numpy Generator seeded from ``seed`` (use it rather than the global numpy state).
    Runs are bit-identical for a seed on the same machine, torch version and thread count.
    """
    import torch

    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if torch.backends.cudnn.is_available():  # type: ignore[no-untyped-call]
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
    return np.random.default_rng(seed)


def resolve_training_device(name: str | torch.device = "auto", *, threads: int = 0) -> torch.device:
    """The device to train on (``auto``: CUDA, then MPS, then CPU), with torch's threads configured."""
    import torch

    from wsi_screen.runtime import configure_torch, resolve_device

    configure_torch(threads=threads)
    return name if isinstance(name, torch.device) else resolve_device(str(name), setting="device")


class Progress:
    """A tqdm bar on a terminal; elsewhere a log line every 10 % (or nothing when disabled).

    >>> with Progress(total=100, desc="train", unit="step", enabled=True) as bar:
    ...     bar.update(1, loss=0.3)
    """

    def __init__(self, *, total: int, desc: str, unit: str = "it", enabled: bool = True) -> None:
        self.total, self.desc, self.unit, self.enabled = int(total), desc, unit, enabled
        self.n = 0
        self._next = 0.1
        self._bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=desc, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, k: int = 1, **postfix: float) -> None:
        self.n += k
        if self._bar is not None:
            self._bar.update(k)
            if postfix:
                self._bar.set_postfix({key: f"{v:.4g}" for key, v in postfix.items()}, refresh=False)
            return
        if self.enabled and self.total and self.n / self.total >= self._next - 1e-9:
            extra = " ".join(f"{key}={v:.4g}" for key, v in postfix.items())
            logger.info(
                "%s: %d/%d %ss (%.0f %%) %s",
                self.desc,
                self.n,
                self.total,
                self.unit,
                100.0 * self.n / self.total,
                extra,
            )
            self._next = math.floor(self.n / self.total * 10 + 1e-9) / 10 + 0.1

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def wrap(self, items: list[Any]) -> Iterator[Any]:
        """Iterate ``items``, advancing the bar by one per item."""
        for item in items:
            yield item
            self.update(1)


class Stopwatch:
    """Accumulates wall time per named phase: ``with sw("data"): ...``; ``sw.times`` in seconds."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self._name: list[str] = []
        self._t0: list[float] = []

    def __call__(self, name: str) -> Stopwatch:
        self._name.append(name)
        return self

    def __enter__(self) -> Stopwatch:
        self._t0.append(time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        dt = time.perf_counter() - self._t0.pop()
        name = self._name.pop()
        self.times[name] = self.times.get(name, 0.0) + dt
