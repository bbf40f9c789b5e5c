"""Progress of long work: a tqdm bar on a terminal, otherwise a log line every 10 %."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TypeVar

__all__ = ["Progress", "progress", "progress_iter"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Progress(Protocol):
    def update(self, n: int) -> Any: ...

    def close(self) -> Any: ...


class _LogProgress:
    """Logs ``desc: done/total unit (p %)`` each time another tenth of the work is done."""

    def __init__(self, total: int, *, enabled: bool, desc: str, unit: str) -> None:
        self.total, self.enabled, self.desc, self.unit = total, enabled, desc, unit
        self.n = 0
        self.next = 0.1

    def update(self, k: int) -> None:
        self.n += k
        if self.enabled and self.total and self.n / self.total >= self.next:
            logger.info(
                "%s: %d/%d %s (%.0f %%)", self.desc, self.n, self.total, self.unit, 100 * self.n / self.total
            )
            while self.n / self.total >= self.next:
                self.next += 0.1

    def close(self) -> None:
        return None


def progress(total: int, *, enabled: bool, desc: str, unit: str = "tiles") -> Progress:
    """A bar over ``total`` steps (``update(k)``, ``close()``); silent when not ``enabled``."""
    if enabled and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar: Progress = tqdm(total=total, desc=desc, unit=unit.rstrip("s"), dynamic_ncols=True, leave=False)
        return bar
    return _LogProgress(total, enabled=enabled, desc=desc, unit=unit)


def progress_iter(items: Sequence[T], *, enabled: bool, desc: str, unit: str) -> Iterator[T]:
    """``items`` one by one, with :func:`progress` over them."""
    bar = progress(len(items), enabled=enabled, desc=desc, unit=unit)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
