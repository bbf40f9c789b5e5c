"""The batch: :func:`run_batch` and its loop over scans of the input folder (:class:`BatchLoop`)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wsi_screen import __version__
from wsi_screen.batch._common import MESSAGE_LIMIT, BatchError, logger, now
from wsi_screen.batch.discovery import IgnoredFile, SlideEntry, assign_slide_ids, discover_slides
from wsi_screen.batch.executors import LocalExecutor, SlideExecutor
from wsi_screen.batch.identity import (
    ResumeKey,
    config_hash,
    entry_fingerprint,
    entry_signature,
    models_hash,
    models_identity,
)
from wsi_screen.batch.locks import clean_worklist_temps
from wsi_screen.batch.worker import SlideJob, SlideOutcome, SlideRunner, decide
from wsi_screen.batch.worklist import write_worklist
from wsi_screen.config import Settings
from wsi_screen.errors import one_line

__all__ = ["BatchLoop", "BatchReport", "run_batch"]


@dataclass
class BatchReport:
    """What :func:`run_batch` did."""

    outcomes: list[SlideOutcome]
    ignored: list[IgnoredFile]
    interrupted: bool = False
    rows: list[dict[str, Any]] = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def exit_code(self) -> int:
        """0 when no slide failed, 1 otherwise (an interrupted run is the caller's call)."""
        return 1 if self.count("failed") else 0

    def line(self) -> str:
        parts = [f"{self.count(s)} {s}" for s in ("ok", "skipped", "failed", "pending") if self.count(s)]
        return f"{len(self.outcomes)} slide(s): {', '.join(parts) or 'none'}"


class _Tracked:
    """Watch-mode state of one slide: its files' signature and since when it is unchanged."""

    __slots__ = ("done_sig", "sig", "since")

    def __init__(self, sig: tuple[tuple[str, int, int], ...], now: float) -> None:
        self.sig = sig
        self.since = now
        self.done_sig: tuple[tuple[str, int, int], ...] | None = None


class _BatchProgress:
    """A tqdm bar of slides on a terminal; log lines otherwise."""

    def __init__(self, *, enabled: bool) -> None:
        import sys

        self.enabled = enabled
        self.total = 0
        self.done = 0
        self.bar: Any = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=0, desc="slides", unit="slide", dynamic_ncols=True, position=0)

    def add(self, n: int) -> None:
        self.total += n
        if self.bar is not None and n:
            self.bar.total = self.total
            self.bar.refresh()

    def finished(self, outcome: SlideOutcome) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        status = outcome.status.upper()
        detail = outcome.error or (
            f"{outcome.triage} score {outcome.score:.3f}" if outcome.score is not None else outcome.note
        )
        log = logger.warning if outcome.status == "failed" else logger.info
        log("[%d/%d] %s: %s %s", self.done, self.total, outcome.slide, status, detail)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@contextlib.contextmanager
def _log_file(path: Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"))
    target = logging.getLogger("wsi_screen")
    target.addHandler(handler)
    try:
        yield
    finally:
        target.removeHandler(handler)
        handler.close()


class BatchLoop:
    """One :func:`run_batch`: the slides seen so far, their outcomes, and the steps of a round.

    A round (:meth:`round`) scans the input folder, starts the slides that are ready (each new slide
    at once; in watch mode, a new or changed slide once its files kept their size and mtime for
    ``settle_s`` seconds), then collects outcomes until the executor is idle (watch mode: or the next
    scan is due). The worklist is rewritten after each round and each outcome.
    """

    def __init__(
        self,
        src: Path,
        out: Path,
        *,
        settings: Settings,
        executor: SlideExecutor,
        key_config: str,
        key_models: str,
        meta: dict[str, Any],
        stop: threading.Event,
        watch: bool,
        interval_s: float,
        settle_s: float,
        force: bool,
        retry_failed: bool,
        progress: bool,
        arguments: Mapping[str, Any] | None,
        max_rounds: int | None,
    ) -> None:
        self.src, self.out = src, out
        self.settings = settings
        self.executor = executor
        self.key_config, self.key_models = key_config, key_models
        self.meta = meta
        self.stop = stop
        self.watch = watch
        self.interval_s, self.settle_s = interval_s, settle_s
        self.force, self.retry_failed = force, retry_failed
        self.arguments = arguments
        self.max_rounds = max_rounds
        self.bar = _BatchProgress(enabled=progress)
        self.outcomes: dict[str, SlideOutcome] = {}  #: by relative path, in order of discovery
        self.ids: dict[str, str] = {}  #: slide ids given so far (kept for the whole run)
        self.tracked: dict[str, _Tracked] = {}  #: watch mode: each slide's files
        self.in_flight: set[str] = set()
        self.ignored: list[IgnoredFile] = []
        self._seen_ignored: set[str] = set()
        self.interrupted = False
        self.rounds = 0

    def publish(self, state: str) -> list[dict[str, Any]]:
        """Rewrite the worklist with the batch in ``state`` (running, finished, stopped, interrupted)."""
        self.meta["state"] = state
        if state != "running":
            self.meta["finished"] = now()
        return write_worklist(
            self.out,
            list(self.outcomes.values()),
            input_dir=self.src,
            ignored=self.ignored,
            meta=self.meta,
            refresh_s=max(10, int(self.interval_s)) if self.watch and state == "running" else None,
        )

    def run(self) -> None:
        """Rounds until the work is done, ``max_rounds`` or a stop (the jobs not started are dropped)."""
        while not self.stop.is_set():
            if not self.round():
                break
        if self.stop.is_set():
            self.cancel()

    def round(self) -> bool:
        """One scan and the work it finds; False when the batch should end."""
        self.rounds += 1
        entries = self.scan()
        ready = self.ready(entries)
        self.bar.add(len(ready))
        for entry in ready:
            self.start(entry)
        if self.rounds == 1 and not entries:
            logger.warning("no slides found in %s%s", self.src, " yet" if self.watch else "")
        self.publish("running")
        self.collect()
        if not self.watch and not self.executor.busy:
            return False
        if self.max_rounds is not None and self.rounds >= self.max_rounds:
            return False
        if not self.executor.busy:
            self.stop.wait(self.interval_s)
        return True

    def scan(self) -> list[SlideEntry]:
        """The slides in the input folder, with their ids; each new non-slide file is logged once."""
        found = discover_slides(self.src, exclude=[self.out])
        for item in found.ignored:
            if item.path not in self._seen_ignored:
                self._seen_ignored.add(item.path)
                logger.info("ignored %s: %s", item.path, item.reason)
        self.ignored = found.ignored
        entries = assign_slide_ids(found.slides, previous=self.ids)
        self.ids.update((e.rel, e.slide_id) for e in entries)
        return entries

    def ready(self, entries: Sequence[SlideEntry]) -> list[SlideEntry]:
        """The slides to start now: not in flight, and new (watch mode: settled since they changed)."""
        clock = time.monotonic()
        out: list[SlideEntry] = []
        for entry in entries:
            if entry.rel in self.in_flight:
                continue
            if not self.watch:
                if entry.rel not in self.outcomes:
                    out.append(entry)
            elif self._settled(entry, clock):
                out.append(entry)
        return out

    def _settled(self, entry: SlideEntry, clock: float) -> bool:
        """Watch mode: whether the files of ``entry`` changed since its last start and then settled."""
        sig = entry_signature(entry)
        t = self.tracked.get(entry.rel)
        if t is None or t.sig != sig:
            if t is None:
                self.tracked[entry.rel] = _Tracked(sig, clock)
            else:
                if t.done_sig is not None:
                    logger.info("%s changed; waiting for it to settle", entry.rel)
                t.sig, t.since = sig, clock
            if entry.rel not in self.outcomes:
                self.outcomes[entry.rel] = SlideOutcome(
                    entry.rel, entry.slide_id, "pending", note="waiting for the file to settle"
                )
            return False
        if t.done_sig != sig and clock - t.since >= self.settle_s:
            t.done_sig = sig
            return True
        return False

    def start(self, entry: SlideEntry) -> None:
        """Record the outcome of a slide that needs no screening (kept, known failure), else submit it."""
        try:
            fingerprint = entry_fingerprint(entry)
        except OSError as exc:  # vanished or unreadable since discovery
            msg = f"{entry.rel} cannot be read: {one_line(exc, limit=MESSAGE_LIMIT)}"
            self._done(SlideOutcome(entry.rel, entry.slide_id, "failed", error=msg))
            return
        job = SlideJob(
            entry=entry,
            out_root=self.out,
            settings=self.settings,
            key=ResumeKey(fingerprint, self.key_config, self.key_models),
            force=self.force,
            retry_failed=self.retry_failed,
            arguments=dict(self.arguments or {}),
        )
        decided, _ = decide(job)
        if decided is not None:
            self._done(decided)
            return
        self.outcomes[entry.rel] = SlideOutcome(entry.rel, entry.slide_id, "pending", note="queued")
        self.executor.submit(job)
        self.in_flight.add(entry.rel)

    def collect(self) -> None:
        """Take outcomes as slides finish until the executor is idle, a stop, or the next scan is due."""
        last_scan = time.monotonic()
        while self.executor.busy and not self.stop.is_set():
            for outcome in self.executor.results(timeout=0.5):
                self.in_flight.discard(outcome.slide)
                self._done(outcome)
                self.publish("running")
            if self.watch and time.monotonic() - last_scan >= self.interval_s:
                break

    def _done(self, outcome: SlideOutcome) -> None:
        self.outcomes[outcome.slide] = outcome
        self.bar.finished(outcome)

    def cancel(self) -> None:
        """After a stop: drop the jobs not started (they stay ``pending``)."""
        self.interrupted = True
        for job in self.executor.cancel():
            self.in_flight.discard(job.entry.rel)
            self.outcomes[job.entry.rel] = SlideOutcome(
                job.entry.rel,
                job.entry.slide_id,
                "pending",
                note="not started: the batch was stopped",
            )
        logger.warning("batch stopped before the end")

    def finish(self) -> list[dict[str, Any]]:
        """The last worklist: ``finished``, or ``stopped`` (watch mode) / ``interrupted`` after a stop."""
        stopped = self.interrupted or self.stop.is_set()
        return self.publish(("stopped" if self.watch else "interrupted") if stopped else "finished")


def run_batch(
    input_dir: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    *,
    settings: Settings,
    executor: SlideExecutor | None = None,
    runner: SlideRunner | None = None,
    watch: bool = False,
    interval_s: float = 10.0,
    settle_s: float = 30.0,
    force: bool = False,
    retry_failed: bool = False,
    progress: bool = True,
    stop: threading.Event | None = None,
    arguments: Mapping[str, Any] | None = None,
    log_file: bool | str | os.PathLike[str] = True,
    max_rounds: int | None = None,
) -> BatchReport:
    """Screen every slide under ``input_dir`` into ``out_root`` and keep the ranked worklist there.

    Args:
        input_dir: the scanner's output folder (searched recursively).
        out_root: output root ``OUT`` (``OUT/<slide-id>/`` per slide, plus the worklist).
        settings: resolved settings.
        executor: where slides run (default: a :class:`LocalExecutor` in this process).
        runner: what screens a slide in the default executor (default:
            :func:`~wsi_screen.pipeline.run_slide`); give it to the executor instead when passing one.
        watch: keep looking for new slides every ``interval_s`` seconds until ``stop`` is set; a slide
            is screened once its files kept the same size and mtime for ``settle_s`` seconds.
        force: screen every slide again, even with a matching previous result.
        retry_failed: try again slides that failed before with the same file, settings and models.
        progress: progress bars on a terminal, else log lines.
        stop: set it (e.g. from a signal handler) to stop cleanly: the slide being screened locally
            is abandoned without a result, the worklist is written, the function returns.
        arguments: the command line, recorded in each slide's ``run.json``.
        log_file: True: ``OUT/batch.log`` (appended, timestamped); a path: that file; False: none.
            It receives what the ``wsi_screen`` logger emits (INFO and up under the CLI).
        max_rounds: watch mode: stop after this many scans of the folder (tests).
    """
    if executor is not None and runner is not None:
        raise ValueError("give the runner to the executor, not to run_batch")
    src = Path(input_dir).absolute()
    out = Path(out_root).absolute()
    if not src.is_dir():
        raise BatchError(f"input folder not found: {src} (give the scanner's output folder)")
    try:
        src.resolve().relative_to(out.resolve())
    except ValueError:
        pass
    else:
        raise BatchError(f"the output folder {out} contains the input folder {src}; choose another -o")
    out.mkdir(parents=True, exist_ok=True)
    log_path = (out / "batch.log") if log_file is True else (Path(log_file) if log_file else None)
    stop = stop if stop is not None else threading.Event()
    own_executor = executor is None
    with _log_file(log_path):
        logger.info(
            "batch %s → %s (wsi-screen %s, pid %d on %s%s)",
            src,
            out,
            __version__,
            os.getpid(),
            socket.gethostname(),
            ", watching" if watch else "",
        )
        identity = models_identity(settings)  # fails early (one line) if a bundle is missing
        from wsi_screen.pipeline import resolve_flag_threshold

        settings = resolve_flag_threshold(settings)  # as run_slide records it: one resume key
        settings.operating_point.check_models(identity)  # a calibrated preset holds for its models only
        key_models = models_hash(identity)
        key_config = config_hash(settings)
        if executor is None:
            executor = LocalExecutor(settings, progress=progress, stop=stop, runner=runner)
        clean_worklist_temps(out)
        meta: dict[str, Any] = {
            "started": now(),
            "state": "running",
            "arguments": dict(arguments or {}),
            "models": identity,
            "config_hash": key_config,
        }
        loop = BatchLoop(
            src,
            out,
            settings=settings,
            executor=executor,
            key_config=key_config,
            key_models=key_models,
            meta=meta,
            stop=stop,
            watch=watch,
            interval_s=interval_s,
            settle_s=settle_s,
            force=force,
            retry_failed=retry_failed,
            progress=progress,
            arguments=arguments,
            max_rounds=max_rounds,
        )
        try:
            loop.run()
        finally:
            loop.bar.close()
            if own_executor:
                executor.close()
            rows = loop.finish()
        report = BatchReport(
            outcomes=list(loop.outcomes.values()),
            ignored=list(loop.ignored),
            interrupted=loop.interrupted,
            rows=rows,
        )
        logger.info("batch done: %s; worklist %s", report.line(), out / "index.html")
    return report
