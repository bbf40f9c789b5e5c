"""One slide, the unit of work: lock, clean, resume check, screen; what happened (:class:`SlideOutcome`)."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from wsi_screen import output_layout as layout
from wsi_screen.batch._common import (
    FAILED_DIR,
    MESSAGE_LIMIT,
    atomic_write,
    logger,
    now,
    read_json,
    worker_name,
)
from wsi_screen.batch.discovery import SlideEntry
from wsi_screen.batch.identity import PREVIOUS_TEXT, PreviousState, ResumeKey, check_previous
from wsi_screen.batch.locks import SlideLock, clean_stale
from wsi_screen.config import Settings
from wsi_screen.errors import WsiScreenError, one_line

if TYPE_CHECKING:
    from wsi_screen.pipeline import Models, SlideResult

__all__ = [
    "ModelsProvider",
    "SlideJob",
    "SlideOutcome",
    "SlideRunner",
    "Status",
    "TileCallback",
    "decide",
    "default_runner",
    "process_slide",
]

Status = Literal["ok", "failed", "skipped", "pending"]
ModelsProvider = Callable[[], "Models"]
TileCallback = Callable[[int, int], None]


class SlideRunner(Protocol):
    """Screens one slide into ``out_root/<slide_id>/``, as :func:`wsi_screen.pipeline.run_slide` does.

    It must write the folder as :mod:`wsi_screen.output_layout` describes (temporary folder, atomic rename),
    call ``on_tile`` as tiles are done (an exception from it abandons the slide: remove the temporary
    folder and let it propagate) and raise :class:`~wsi_screen.errors.WsiScreenError` for a bad slide.
    """

    def __call__(
        self,
        slide_path: Path,
        out_root: Path,
        *,
        settings: Settings,
        models: Models,
        slide_id: str,
        progress: bool,
        arguments: Mapping[str, Any],
        on_tile: TileCallback,
    ) -> SlideResult: ...


def default_runner() -> SlideRunner:
    """:func:`wsi_screen.pipeline.run_slide`, imported when first needed."""
    from wsi_screen.pipeline import run_slide

    return run_slide


class _Abandoned(Exception):
    """Raised from the tile callback to abandon the current slide when a stop was requested."""


@dataclass(frozen=True)
class SlideJob:
    """Everything a process (local or a Dask worker) needs to screen one slide; picklable."""

    entry: SlideEntry
    out_root: Path
    settings: Settings
    key: ResumeKey
    force: bool = False
    retry_failed: bool = False
    arguments: Mapping[str, Any] = field(default_factory=dict)
    attempt: int = 1


@dataclass
class SlideOutcome:
    """One worklist row's source: what happened to a slide."""

    slide: str  #: relative path in the input folder
    slide_id: str
    status: Status
    error: str = ""
    note: str = ""
    summary: dict[str, Any] = field(default_factory=dict)
    run: dict[str, Any] = field(default_factory=dict)
    seconds: float | None = None
    started: str = ""
    finished: str = ""
    worker: str = ""

    @property
    def triage(self) -> str:
        return str(self.summary.get("triage") or "")

    @property
    def score(self) -> float | None:
        value = self.summary.get("score")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _outcome_from_folder(job: SlideJob, status: Status, note: str) -> SlideOutcome:
    folder = job.out_root / job.entry.slide_id
    summary = read_json(folder / layout.SUMMARY)
    run = read_json(folder / layout.RUN)
    run = run if isinstance(run, dict) else {}
    timings = run.get("timings") if isinstance(run.get("timings"), dict) else {}
    args = run.get("arguments") if isinstance(run.get("arguments"), dict) else {}
    batch = args.get("batch") if isinstance(args, dict) and isinstance(args.get("batch"), dict) else {}
    assert isinstance(timings, dict) and isinstance(batch, dict)
    total = timings.get("total")
    return SlideOutcome(
        slide=job.entry.rel,
        slide_id=job.entry.slide_id,
        status=status,
        note=note,
        summary=summary if isinstance(summary, dict) else {},
        run=_run_digest(run),
        seconds=float(total) if isinstance(total, (int, float)) else None,
        started=str(run.get("started", "")),
        finished=str(run.get("finished", "")),
        worker=str(batch.get("worker", "")),
    )


def _run_digest(run: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of ``run.json`` the worklist shows (tiles, timings, device)."""
    keys = ("tiles", "timings", "device", "n_cells", "torch_threads")
    return {k: run[k] for k in keys if k in run}


def _failure_path(out_root: Path, slide_id: str) -> Path:
    return out_root / FAILED_DIR / f"{slide_id}.json"


def _record_failure(job: SlideJob, error: str, kind: str) -> None:
    record = {
        "slide": job.entry.rel,
        "slide_id": job.entry.slide_id,
        "error": error,
        "error_type": kind,
        "resume_key": job.key.to_dict(),
        "time": now(),
        "worker": worker_name(),
    }
    atomic_write(_failure_path(job.out_root, job.entry.slide_id), json.dumps(record, indent=2) + "\n")


def _previous_failure(job: SlideJob) -> dict[str, Any] | None:
    data = read_json(_failure_path(job.out_root, job.entry.slide_id))
    if (
        isinstance(data, dict)
        and data.get("resume_key") == job.key.to_dict()
        and data.get("slide") == job.entry.rel
    ):
        return data
    return None


def decide(job: SlideJob) -> tuple[SlideOutcome | None, PreviousState | None]:
    """The outcome of a slide that needs no screening (kept result or known failure), else None.

    Also returns the state of the previous result (None with ``force``). Cheap (reads JSON files);
    safe without the lock for a kept result, because results are published by an atomic rename.
    """
    if job.force:
        return None, None
    state = check_previous(job.out_root, job.entry, job.key)
    if state == "match":
        return _outcome_from_folder(job, "skipped", "result of a previous run"), state
    if not job.retry_failed:
        failure = _previous_failure(job)
        if failure is not None:
            outcome = SlideOutcome(
                slide=job.entry.rel,
                slide_id=job.entry.slide_id,
                status="failed",
                error=str(failure.get("error", "")),
                note="failed before with the same file, settings and models (--retry-failed retries)",
                finished=str(failure.get("time", "")),
                worker=str(failure.get("worker", "")),
            )
            return outcome, state
    return None, state


def process_slide(
    job: SlideJob,
    *,
    models: ModelsProvider,
    runner: SlideRunner | None = None,
    progress: bool = False,
    stop: threading.Event | None = None,
    wait_for_lock: bool = True,
    on_tile: TileCallback | None = None,
) -> SlideOutcome | None:
    """Lock, clean, resume-check and screen one slide; never raises for a bad slide.

    Returns None when ``wait_for_lock`` is False and another process holds the slide's lock (or a
    ``stop`` ended the wait). A slide error (:class:`~wsi_screen.errors.WsiScreenError`) or any other
    exception becomes a ``failed`` outcome with a one-line message; a ``stop`` set during screening
    abandons the slide (its temporary folder is removed) and returns a ``pending`` outcome.
    ``runner`` screens the slide (default: :func:`~wsi_screen.pipeline.run_slide`).
    """
    run_slide = runner if runner is not None else default_runner()
    entry = job.entry
    lock = SlideLock(job.out_root, entry.slide_id)
    if not lock.acquire(blocking=wait_for_lock, stop=stop):
        return None
    try:
        clean_stale(job.out_root, entry.slide_id)
        decided, state = decide(job)
        if decided is not None:
            return decided
        if state not in (None, "missing"):
            logger.info("%s: screening again (%s)", entry.rel, PREVIOUS_TEXT.get(state, state))

        def tile_cb(done: int, total: int) -> None:
            if stop is not None and stop.is_set():
                raise _Abandoned
            if on_tile is not None:
                on_tile(done, total)

        loaded = models()  # a model that cannot load stops the batch: it is not the slide's fault
        started = now()
        t0 = time.perf_counter()
        arguments = dict(job.arguments)
        arguments["batch"] = {
            "source": entry.rel,
            "resume_key": job.key.to_dict(),
            "worker": worker_name(),
            "attempt": job.attempt,
        }
        try:
            result = run_slide(
                entry.path,
                job.out_root,
                settings=job.settings,
                models=loaded,
                slide_id=entry.slide_id,
                progress=progress,
                arguments=arguments,
                on_tile=tile_cb,
            )
        except _Abandoned:
            logger.warning("%s: abandoned on stop (no result written)", entry.rel)
            return SlideOutcome(
                entry.rel, entry.slide_id, "pending", note="abandoned when the batch was stopped"
            )
        except Exception as exc:  # one bad slide never stops the batch
            if isinstance(exc, WsiScreenError):
                msg = one_line(exc, limit=MESSAGE_LIMIT)
                _record_failure(job, msg, type(exc).__name__)
                logger.debug("%s: failed: %s", entry.rel, msg)
            else:  # a bug: not recorded as the slide's fault, so a rerun tries it again
                msg = f"internal error: {type(exc).__name__}: {one_line(exc, limit=MESSAGE_LIMIT)}"
                logger.debug("%s: failed: %s", entry.rel, msg, exc_info=True)
            return SlideOutcome(
                entry.rel,
                entry.slide_id,
                "failed",
                error=msg,
                started=started,
                finished=now(),
                seconds=round(time.perf_counter() - t0, 3),
                worker=worker_name(),
            )
        with contextlib.suppress(FileNotFoundError):
            _failure_path(job.out_root, entry.slide_id).unlink()
        outcome = _outcome_from_folder(job, "ok", "")
        outcome.summary = result.summary if not outcome.summary else outcome.summary
        return outcome
    finally:
        lock.release()
