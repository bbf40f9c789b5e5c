"""Where slides run: :class:`SlideExecutor` (the protocol) and :class:`LocalExecutor` (this process).

:class:`~wsi_screen.distributed.DaskExecutor` is the other implementation.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Protocol

from wsi_screen.batch._common import logger
from wsi_screen.batch.worker import SlideJob, SlideOutcome, SlideRunner, TileCallback, process_slide
from wsi_screen.config import Settings

if TYPE_CHECKING:
    from wsi_screen.pipeline import Models

__all__ = ["LocalExecutor", "SlideExecutor"]


class SlideExecutor(Protocol):
    """Runs :class:`SlideJob` s: in this process (:class:`LocalExecutor`) or on Dask workers."""

    def submit(self, job: SlideJob) -> None: ...

    def results(self, *, timeout: float) -> list[SlideOutcome]:
        """Outcomes that finished (may block up to ``timeout``; the local executor runs one slide)."""
        ...

    @property
    def busy(self) -> int:
        """Jobs submitted whose outcome was not yet returned."""
        ...

    def cancel(self) -> list[SlideJob]:
        """Drop the jobs not yet finished; returns them."""
        ...

    def close(self) -> None: ...


class LocalExecutor:
    """Screens slides one after another in this process, with models loaded once.

    A slide whose lock another process holds is put back and retried after the others, so two
    batches on the same ``OUT`` share the work instead of waiting on each other. ``runner``
    screens a slide (default: :func:`~wsi_screen.pipeline.run_slide`), ``models`` are loaded models.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        progress: bool = True,
        stop: threading.Event | None = None,
        on_tile: TileCallback | None = None,
        models: Models | None = None,
        runner: SlideRunner | None = None,
    ) -> None:
        self.settings = settings
        self.progress = progress
        self.stop = stop
        self.on_tile = on_tile
        self._models = models
        self.runner = runner
        self._queue: deque[SlideJob] = deque()
        self._contended: set[str] = set()
        self.models_loaded = 0

    def models(self) -> Models:
        """The models, loaded on first use (a batch of kept results loads none)."""
        if self._models is None:
            from wsi_screen.pipeline import load_models

            self._models = load_models(self.settings)
            self.models_loaded += 1
        return self._models

    def submit(self, job: SlideJob) -> None:
        self._queue.append(job)

    @property
    def busy(self) -> int:
        return len(self._queue)

    def results(self, *, timeout: float) -> list[SlideOutcome]:
        for _ in range(len(self._queue)):
            job = self._queue.popleft()
            outcome = process_slide(
                job,
                models=self.models,
                runner=self.runner,
                progress=self.progress,
                stop=self.stop,
                wait_for_lock=False,
                on_tile=self.on_tile,
            )
            if outcome is None:
                if job.entry.rel not in self._contended:
                    logger.info("%s: another process is screening it; coming back to it later", job.entry.rel)
                self._contended.add(job.entry.rel)
                self._queue.append(job)
                continue
            if outcome.status == "skipped" and job.entry.rel in self._contended:
                outcome.note = "screened by another batch process"
            return [outcome]
        if self._queue and self.stop is not None:
            self.stop.wait(min(timeout, 0.5))
        elif self._queue:
            time.sleep(min(timeout, 0.5))
        return []

    def cancel(self) -> list[SlideJob]:
        jobs = list(self._queue)
        self._queue.clear()
        return jobs

    def close(self) -> None:
        self._queue.clear()
