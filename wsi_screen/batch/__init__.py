"""Screen every slide of a scanner output directory: discovery, resume, locks, worklist, watch mode.

>>> report = run_batch("scans/", "results/", settings=load_settings("lbc"))
>>> report.exit_code          # 0: every slide screened (or already done), 1: some slide failed

One slide is one unit of work (:func:`process_slide`), run in this process or on a Dask worker
(:mod:`wsi_screen.distributed`):

1. take ``OUT/.locks/<slide-id>.lock`` (``fcntl.flock``; the OS releases it if the process dies),
   so two batches on the same ``OUT`` never screen a slide twice at the same time;
2. remove temporary folders a killed run left for this slide (never one of a live process);
3. **resume**: a complete ``OUT/<slide-id>/`` made from the same file (fingerprint), the same
   result-relevant settings (:func:`config_hash`) and the same models (:func:`models_hash`) is kept
   (status ``skipped``); a slide that failed with the same file, settings and models fails again
   without another attempt (``retry_failed`` retries);
4. otherwise :func:`~wsi_screen.pipeline.run_slide`, which publishes ``OUT/<slide-id>/`` by an atomic
   rename: a killed batch never leaves a half result that looks finished.

After every slide the worklist ``OUT/batch.csv``, ``OUT/batch.json`` and ``OUT/index.html`` is
rewritten atomically, ranked: priority, review, failed, unsatisfactory, negative, then by score.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import html
import io
import json
import logging
import os
import re
import shutil
import socket
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from wsi_screen import __version__
from wsi_screen.config import Settings
from wsi_screen.errors import WsiScreenError

if TYPE_CHECKING:
    from wsi_screen.pipeline import Models

__all__ = [
    "RESULT_NEUTRAL_SETTINGS",
    "SLIDE_SUFFIXES",
    "BatchError",
    "BatchReport",
    "Discovery",
    "IgnoredFile",
    "LocalExecutor",
    "ResumeKey",
    "SlideEntry",
    "SlideExecutor",
    "SlideJob",
    "SlideLock",
    "SlideOutcome",
    "check_previous",
    "clean_stale",
    "config_hash",
    "discover_slides",
    "entry_fingerprint",
    "models_hash",
    "models_identity",
    "process_slide",
    "rank_outcomes",
    "run_batch",
    "write_worklist",
]

logger = logging.getLogger(__name__)

#: File suffixes of whole-slide images (what OpenSlide 4 reads, plus Zeiss CZI, which newer OpenSlide
#: reads; an installed OpenSlide that cannot open one reports the slide as failed, visibly). A folder
#: holding ``.dcm`` files is one DICOM slide.
SLIDE_SUFFIXES: dict[str, str] = {
    ".svs": "aperio",
    ".ndpi": "hamamatsu",
    ".vms": "hamamatsu",
    ".vmu": "hamamatsu",
    ".mrxs": "mirax",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".scn": "leica",
    ".bif": "ventana",
    ".svslide": "sakura",
    ".czi": "zeiss",
}
DICOM_SUFFIX = ".dcm"

#: Settings that cannot change a slide's results; they are left out of :func:`config_hash`.
RESULT_NEUTRAL_SETTINGS: tuple[str, ...] = (
    "reading.workers",
    "reading.queue_tiles",
    "runtime.device",
    "runtime.torch_threads",
    "localization.batch_size",
    "localization.candidate_workers",
    "classification.batch_size",
)

#: Names in ``OUT`` that belong to the batch, so no slide may take them as its id.
WORKLIST_FILES = ("batch.csv", "batch.json", "index.html", "batch.log")
LOCK_DIR = ".locks"
FAILED_DIR = ".failed"
SCHEMA_VERSION = 1

Status = Literal["ok", "failed", "skipped", "pending"]
#: Worklist order of the groups (lower first); within a group, higher score first.
RANK_GROUPS = {"priority": 0, "review": 1, "failed": 2, "unsatisfactory": 3, "negative": 4, "pending": 5}

_TMP_RE = re.compile(r"^\.(?P<sid>.+)\.(?:tmp-(?P<pid>\d+)-[0-9a-f]{8}|old-[0-9a-f]{8})$")


class BatchError(WsiScreenError, ValueError):
    """The batch itself cannot run (input folder missing, output inside a slide folder, ...)."""


class _Abandoned(Exception):
    """Raised from the tile callback to abandon the current slide when a stop was requested."""


# -- discovery --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlideEntry:
    """One slide found in the input folder."""

    path: Path  #: absolute path to open: the slide file, or the DICOM series folder
    rel: str  #: path relative to the input folder (POSIX), the slide's name in the worklist
    format: str  #: aperio, hamamatsu, mirax, tiff, leica, ventana, sakura, zeiss or dicom
    files: tuple[Path, ...]  #: every file of the slide (MIRAX/VMS companions, DICOM instances)
    slide_id: str = ""  #: folder name under ``OUT`` (unique in the batch)


@dataclass(frozen=True)
class IgnoredFile:
    """A file in the input folder that is not a slide."""

    path: str  #: relative to the input folder
    reason: str


@dataclass
class Discovery:
    """What :func:`discover_slides` found, in stable (sorted) order."""

    root: Path
    slides: list[SlideEntry] = field(default_factory=list)
    ignored: list[IgnoredFile] = field(default_factory=list)


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel if rel != "." else path.name


def _vms_companions(vms: Path) -> list[Path]:
    """Files a Hamamatsu ``.vms`` refers to (ImageFile*, MapFile, OptimisationFile), if present."""
    out: list[Path] = []
    try:
        text = vms.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        if sep and (key.startswith("imagefile") or key in ("mapfile", "optimisationfile")):
            name = value.strip()
            if name and "/" not in name and "\\" not in name and (vms.parent / name).is_file():
                out.append(vms.parent / name)
    return sorted(set(out))


def discover_slides(
    root: str | os.PathLike[str],
    *,
    exclude: Sequence[str | os.PathLike[str]] = (),
    recursive: bool = True,
) -> Discovery:
    """Find the slides under ``root`` (sorted by relative path); list every other file as ignored.

    Hidden files and folders (``.`` prefix) and the folders in ``exclude`` (e.g. the output folder
    when it lies inside the input) are skipped silently. A MIRAX companion folder (same stem as a
    ``.mrxs`` beside it) and the files a ``.vms`` names belong to their slide. Symbolic links to
    folders are not followed. Slide ids are not assigned here (see :func:`assign_slide_ids`).
    """
    base = Path(root).absolute()
    if not base.is_dir():
        raise BatchError(f"input folder not found: {base} (give the scanner's output folder)")
    excluded = {Path(e).absolute().resolve() for e in exclude}
    found = Discovery(root=base)
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        here = Path(dirpath)
        files = sorted(f for f in filenames if not f.startswith("."))
        mrxs_stems = {Path(f).stem for f in files if Path(f).suffix.lower() == ".mrxs"}
        keep_dirs = []
        for d in sorted(dirnames):
            if d.startswith(".") or (here / d).resolve() in excluded:
                continue
            if d in mrxs_stems:  # MIRAX companion folder: part of the .mrxs slide
                continue
            keep_dirs.append(d)
        dirnames[:] = keep_dirs if recursive else []
        dcm = [f for f in files if f.lower().endswith(DICOM_SUFFIX)]
        if dcm:
            found.slides.append(
                SlideEntry(
                    path=here,
                    rel=_rel(here, base),
                    format="dicom",
                    files=tuple(here / f for f in dcm),
                )
            )
        claimed: set[str] = set(dcm)
        for f in files:
            p = here / f
            suffix = p.suffix.lower()
            if suffix == ".vms":
                claimed.update(c.name for c in _vms_companions(p))
        for f in files:
            if f in claimed and not f.lower().endswith(DICOM_SUFFIX):
                continue
            if f in claimed:
                continue
            p = here / f
            suffix = p.suffix.lower()
            fmt = SLIDE_SUFFIXES.get(suffix)
            if fmt is None or not p.is_file():
                reason = (
                    "not a file" if not p.is_file() else f"not a slide file type ({suffix or 'no suffix'})"
                )
                found.ignored.append(IgnoredFile(_rel(p, base), reason))
                continue
            members = [p]
            if suffix == ".mrxs":
                companion = here / p.stem
                if companion.is_dir():
                    members += sorted(q for q in companion.rglob("*") if q.is_file())
            elif suffix == ".vms":
                members += _vms_companions(p)
            found.slides.append(SlideEntry(path=p, rel=_rel(p, base), format=fmt, files=tuple(members)))
    found.slides.sort(key=lambda e: e.rel)
    found.ignored.sort(key=lambda i: i.path)
    return found


def assign_slide_ids(
    entries: Sequence[SlideEntry], *, previous: Mapping[str, str] | None = None
) -> list[SlideEntry]:
    """Give each slide a unique folder name (case-insensitively unique, never a worklist file name).

    The id is :func:`~wsi_screen.pipeline.slide_id_for` of the slide; when two slides would get the
    same id (``a/x.svs``, ``b/x.svs``, ``x.tiff``), the first in sorted order keeps it and the others
    get ``-<6 hex of their relative path>``. ``previous`` ({relative path: id}) pins ids already
    given (watch mode), so an id never moves to another slide within a process.
    """
    from wsi_screen.pipeline import slide_id_for

    previous = dict(previous or {})
    used: set[str] = {n.casefold() for n in WORKLIST_FILES}
    used.update(previous[e.rel].casefold() for e in entries if e.rel in previous)
    out: list[SlideEntry] = []
    for e in entries:
        sid = previous.get(e.rel)
        if sid is None:
            base = slide_id_for(e.path)
            sid = base
            if sid.casefold() in used:
                digest = hashlib.sha1(e.rel.encode()).hexdigest()
                sid = f"{base[:89]}-{digest[:6]}"
                k = 6
                while sid.casefold() in used and k < len(digest):
                    k += 1
                    sid = f"{base[: 96 - k - 1]}-{digest[:k]}"
            used.add(sid.casefold())
        out.append(replace(e, slide_id=sid))
    return out


def entry_signature(entry: SlideEntry) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of every file of the slide, re-listed from disk (watch mode)."""
    paths: list[Path]
    if entry.format == "dicom":
        paths = sorted(q for q in entry.path.iterdir() if q.is_file() and not q.name.startswith("."))
    elif entry.format == "mirax" and entry.path.with_suffix("").is_dir():
        comp = entry.path.with_suffix("")
        paths = [entry.path, *sorted(q for q in comp.rglob("*") if q.is_file())]
    elif entry.format == "hamamatsu" and entry.path.suffix.lower() == ".vms":
        paths = [entry.path, *_vms_companions(entry.path)]
    else:
        paths = [entry.path]
    sig = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        sig.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(sig)


# -- identity: file, settings, models -------------------------------------------------------------------


def entry_fingerprint(entry: SlideEntry) -> str:
    """Content fingerprint of every file of the slide (:func:`~wsi_screen.slide.slide_fingerprint`)."""
    from wsi_screen.slide import slide_fingerprint

    if entry.format != "hamamatsu" or entry.path.suffix.lower() != ".vms" or len(entry.files) == 1:
        return slide_fingerprint(entry.path)
    digest = hashlib.sha256()
    for f in entry.files:
        digest.update(f.name.encode() + b"\0" + slide_fingerprint(f).encode())
    return digest.hexdigest()


def _drop_key(data: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(last, None)


def config_hash(config: Settings | Mapping[str, Any]) -> str:
    """sha256 of the resolved settings minus :data:`RESULT_NEUTRAL_SETTINGS` (canonical JSON)."""
    data = config.to_dict() if isinstance(config, Settings) else json.loads(json.dumps(dict(config)))
    for key in RESULT_NEUTRAL_SETTINGS:
        _drop_key(data, key)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def models_identity(settings: Settings) -> list[dict[str, Any]]:
    """task, name, version and weights sha256 of every bundle ``settings`` names (no weights loaded).

    The same list :meth:`~wsi_screen.pipeline.Models.describe` returns after loading.
    """
    from wsi_screen.models.bundle import load_bundle

    loc = load_bundle(settings.localization.model, task="localization", verify=False)
    out = [{"task": "localization", "name": loc.name, "version": loc.config.version, "sha256": loc.sha256}]
    for name in settings.classification.models:
        b = load_bundle(name, task="classification", verify=False)
        out.append(
            {"task": "classification", "name": b.name, "version": b.config.version, "sha256": b.sha256}
        )
    return out


def models_hash(models: Sequence[Mapping[str, Any]]) -> str:
    """sha256 over (task, name, version, weights sha256) of each model, in order."""
    rows = [[str(m.get(k, "")) for k in ("task", "name", "version", "sha256")] for m in models]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class ResumeKey:
    """What makes a slide's result reusable: same file, same result-relevant settings, same models."""

    fingerprint: str
    config: str
    models: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


PreviousState = Literal["match", "missing", "incomplete", "file", "settings", "models", "name"]
_PREVIOUS_TEXT = {
    "missing": "no previous result",
    "incomplete": "the previous result is incomplete",
    "file": "the slide file changed",
    "settings": "the settings changed",
    "models": "the models changed",
    "name": "the previous result is of another slide",
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _result_complete(folder: Path, run: Mapping[str, Any]) -> bool:
    if not (folder / "summary.json").is_file():
        return False
    if not ((folder / "flagged.geojson").is_file() or (folder / "flagged.geojson.gz").is_file()):
        return False
    config = run.get("config")
    wants_report = not isinstance(config, dict) or config.get("output", {}).get("report", True)
    if wants_report and not (folder / "report.html").is_file():
        return False
    meta = _read_json(folder / "cells.zarr" / "zarr.json")
    attrs = meta.get("attributes", {}) if isinstance(meta, dict) else {}
    return bool(isinstance(attrs, dict) and attrs.get("complete") is True)


def check_previous(out_root: Path, entry: SlideEntry, key: ResumeKey) -> PreviousState:
    """Whether ``OUT/<slide-id>/`` is a complete result of this slide made with ``key``."""
    folder = out_root / entry.slide_id
    if not folder.is_dir():
        return "missing"
    run = _read_json(folder / "run.json")
    if not isinstance(run, dict) or not _result_complete(folder, run):
        return "incomplete"
    slide = run.get("slide") if isinstance(run.get("slide"), dict) else {}
    assert isinstance(slide, dict)
    if slide.get("name") not in (None, entry.path.name):
        return "name"
    args = run.get("arguments")
    batch = args.get("batch") if isinstance(args, dict) else None
    if isinstance(batch, dict) and isinstance(batch.get("resume_key"), dict):
        stored = batch["resume_key"]
        fingerprint_ok = stored.get("fingerprint") == key.fingerprint
    else:  # a result of `wsi-screen run`: the pipeline's own fingerprint of the opened file
        from wsi_screen.slide import resolve_slide_path, slide_fingerprint

        try:
            fingerprint_ok = slide.get("fingerprint") == slide_fingerprint(resolve_slide_path(entry.path))
        except (OSError, WsiScreenError):
            fingerprint_ok = False
    if not fingerprint_ok:
        return "file"
    config = run.get("config")
    if not isinstance(config, dict) or config_hash(config) != key.config:
        return "settings"
    models = run.get("models")
    if not isinstance(models, list) or models_hash(models) != key.models:
        return "models"
    return "match"


# -- locks and stale temporary folders -------------------------------------------------------------


class SlideLock:
    """An exclusive ``fcntl.flock`` on ``OUT/.locks/<slide-id>.lock`` (released by the OS on death).

    Lock files are never deleted: deleting one while another process waits on it would let a third
    process lock a new file of the same name.
    """

    def __init__(self, out_root: str | os.PathLike[str], slide_id: str) -> None:
        self.path = Path(out_root) / LOCK_DIR / f"{slide_id}.lock"
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(
        self, *, blocking: bool = True, stop: threading.Event | None = None, poll_s: float = 0.25
    ) -> bool:
        """Take the lock; without ``blocking`` return False at once if another process holds it.

        A blocking wait polls so that ``stop`` can end it (returns False).
        """
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not blocking or (stop is not None and stop.is_set()):
                    os.close(fd)
                    return False
                time.sleep(poll_s)
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        self._fd = fd
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        return True

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> SlideLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out_root: Path, slide_id: str) -> list[Path]:
    """Remove temporary folders of ``slide_id`` left by killed runs; call only while holding its lock.

    ``.<id>.tmp-<pid>-<hex>`` of a process still alive on this host is kept (a ``wsi-screen run``
    that takes no lock may be writing it); ``.<id>.old-<hex>`` (an interrupted replacement) goes.
    """
    removed: list[Path] = []
    if not out_root.is_dir():
        return removed
    prefix = f".{slide_id}."
    for p in out_root.iterdir():
        if not p.name.startswith(prefix):
            continue
        m = _TMP_RE.match(p.name)
        if m is None or m.group("sid") != slide_id:
            continue
        pid = m.group("pid")
        if pid is not None and _pid_alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
        logger.info("removed %s, left by an interrupted run", p.name)
    return removed


# -- one slide ------------------------------------------------------------------------------------------


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _outcome_from_folder(job: SlideJob, status: Status, note: str) -> SlideOutcome:
    folder = job.out_root / job.entry.slide_id
    summary = _read_json(folder / "summary.json")
    run = _read_json(folder / "run.json")
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


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _record_failure(job: SlideJob, error: str, kind: str) -> None:
    record = {
        "slide": job.entry.rel,
        "slide_id": job.entry.slide_id,
        "error": error,
        "error_type": kind,
        "resume_key": job.key.to_dict(),
        "time": _now(),
        "worker": _worker_name(),
    }
    _atomic_write(_failure_path(job.out_root, job.entry.slide_id), json.dumps(record, indent=2) + "\n")


def _previous_failure(job: SlideJob) -> dict[str, Any] | None:
    data = _read_json(_failure_path(job.out_root, job.entry.slide_id))
    if (
        isinstance(data, dict)
        and data.get("resume_key") == job.key.to_dict()
        and data.get("slide") == job.entry.rel
    ):
        return data
    return None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 500 else text[:497] + "..."


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


ModelsProvider = Callable[[], "Models"]
TileCallback = Callable[[int, int], None]


def process_slide(
    job: SlideJob,
    *,
    models: ModelsProvider,
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
    """
    from wsi_screen.pipeline import run_slide

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
            logger.info("%s: screening again (%s)", entry.rel, _PREVIOUS_TEXT.get(state, state))

        def tile_cb(done: int, total: int) -> None:
            if stop is not None and stop.is_set():
                raise _Abandoned
            if on_tile is not None:
                on_tile(done, total)

        loaded = models()  # a model that cannot load stops the batch: it is not the slide's fault
        started = _now()
        t0 = time.perf_counter()
        arguments = dict(job.arguments)
        arguments["batch"] = {
            "source": entry.rel,
            "resume_key": job.key.to_dict(),
            "worker": _worker_name(),
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
                msg = _one_line(exc)
                _record_failure(job, msg, type(exc).__name__)
                logger.debug("%s: failed: %s", entry.rel, msg)
            else:  # a bug: not recorded as the slide's fault, so a rerun tries it again
                msg = f"internal error: {type(exc).__name__}: {_one_line(exc)}"
                logger.debug("%s: failed: %s", entry.rel, msg, exc_info=True)
            return SlideOutcome(
                entry.rel,
                entry.slide_id,
                "failed",
                error=msg,
                started=started,
                finished=_now(),
                seconds=round(time.perf_counter() - t0, 3),
                worker=_worker_name(),
            )
        with contextlib.suppress(FileNotFoundError):
            _failure_path(job.out_root, entry.slide_id).unlink()
        outcome = _outcome_from_folder(job, "ok", "")
        outcome.summary = result.summary if not outcome.summary else outcome.summary
        return outcome
    finally:
        lock.release()


# -- executors --------------------------------------------------------------------------------------------


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
    batches on the same ``OUT`` share the work instead of waiting on each other.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        progress: bool = True,
        stop: threading.Event | None = None,
        on_tile: TileCallback | None = None,
        models: Models | None = None,
    ) -> None:
        self.settings = settings
        self.progress = progress
        self.stop = stop
        self.on_tile = on_tile
        self._models = models
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


# -- worklist -----------------------------------------------------------------------------------------


def rank_outcomes(outcomes: Sequence[SlideOutcome]) -> list[SlideOutcome]:
    """Worklist order: priority, review, failed, unsatisfactory, negative, pending; then score, name."""

    def key(o: SlideOutcome) -> tuple[int, float, str]:
        if o.status == "failed":
            group = RANK_GROUPS["failed"]
        elif o.status == "pending" or not o.triage:
            group = RANK_GROUPS["pending"]
        else:
            group = RANK_GROUPS.get(o.triage, RANK_GROUPS["pending"])
        return group, -(o.score if o.score is not None else -1.0), o.slide

    return sorted(outcomes, key=key)


def _class_names(outcomes: Sequence[SlideOutcome]) -> list[str]:
    names: dict[str, None] = {}
    for o in outcomes:
        for c in o.summary.get("class_names", []) or []:
            names[str(c)] = None
    return list(names)


BASE_COLUMNS = (
    "rank",
    "slide",
    "slide_id",
    "status",
    "triage",
    "score",
    "suggested_category",
    "n_cells",
    "squamous_cells",
    "adequate",
    "qc_flags",
    "error",
    "note",
    "seconds",
    "tiles",
    "started",
    "finished",
    "worker",
    "output",
    "report",
)


def _row(rank: int, o: SlideOutcome, out_root: Path, classes: Sequence[str]) -> dict[str, Any]:
    s = o.summary
    adequacy = s.get("adequacy") if isinstance(s.get("adequacy"), dict) else {}
    qc = s.get("qc") if isinstance(s.get("qc"), dict) else {}
    assert isinstance(adequacy, dict) and isinstance(qc, dict)
    counts = s.get("class_counts", {}).get("predicted", {}) if isinstance(s.get("class_counts"), dict) else {}
    has_result = o.status in ("ok", "skipped") and (out_root / o.slide_id / "summary.json").is_file()
    has_report = has_result and (out_root / o.slide_id / "report.html").is_file()
    tiles = o.run.get("tiles", {}).get("processed") if isinstance(o.run.get("tiles"), dict) else None
    score = o.score
    row: dict[str, Any] = {
        "rank": rank,
        "slide": o.slide,
        "slide_id": o.slide_id,
        "status": o.status,
        "triage": o.triage if has_result else "",
        "score": round(score, 6) if score is not None and has_result else None,
        "suggested_category": s.get("suggested_category", "") if has_result else "",
        "n_cells": s.get("n_cells") if has_result else None,
        "squamous_cells": adequacy.get("squamous_cells") if has_result else None,
        "adequate": adequacy.get("adequate") if has_result else None,
        "qc_flags": list(qc.get("flags", [])) if has_result else [],
        "error": o.error,
        "note": o.note,
        "seconds": round(o.seconds, 3) if o.seconds is not None else None,
        "tiles": tiles,
        "started": o.started,
        "finished": o.finished,
        "worker": o.worker,
        "output": f"{o.slide_id}/" if has_result else "",
        "report": f"{o.slide_id}/report.html" if has_report else "",
        "class_counts": {c: counts.get(c) for c in classes} if has_result else {},
        "timings": o.run.get("timings", {}) if has_result else {},
    }
    return row


def _csv_text(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*BASE_COLUMNS, *(f"n_{c}" for c in classes)])

    def cell(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return ";".join(str(x) for x in v)
        return v

    for r in rows:
        counts = r.get("class_counts", {})
        writer.writerow([cell(r[c]) for c in BASE_COLUMNS] + [cell(counts.get(c)) for c in classes])
    return buf.getvalue()


_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em}.meta{color:#555;margin-bottom:1em}
table{border-collapse:collapse;width:100%}th,td{padding:.3em .5em;border-bottom:1px solid #ddd;
text-align:left;vertical-align:top}th{background:#f4f4f4;position:sticky;top:0}td.n{text-align:right}
.t{display:inline-block;padding:0 .45em;border-radius:3px;font-weight:600;font-size:.9em}
.priority{background:#c62828;color:#fff}.review{background:#f9a825;color:#000}
.failed{background:#6a1b9a;color:#fff}.unsatisfactory{background:#757575;color:#fff}
.negative{background:#2e7d32;color:#fff}.pending{background:#e0e0e0;color:#333}
.err{color:#6a1b9a}.note{color:#666;font-size:.9em}details{margin-top:1.5em}code{font-size:.95em}
"""


def _html_text(
    rows: Sequence[Mapping[str, Any]],
    *,
    input_dir: str,
    counts: Mapping[str, int],
    updated: str,
    ignored: Sequence[IgnoredFile],
    refresh_s: int | None,
) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
    ]
    if refresh_s:
        out.append(f'<meta http-equiv="refresh" content="{int(refresh_s)}">')
    out += [
        f"<title>wsi-screen worklist — {e(input_dir)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>wsi-screen worklist</h1>",
        f'<div class="meta">Input <code>{e(input_dir)}</code> · updated {e(updated)} · '
        + " · ".join(f"{e(k)} {int(v)}" for k, v in counts.items())
        + f" · wsi-screen {e(__version__)}</div>",
        "<table><thead><tr><th>#</th><th>Slide</th><th>Triage</th><th>Score</th><th>Suggested</th>"
        "<th>Cells</th><th>Adequate</th><th>QC</th><th>Notes</th></tr></thead><tbody>",
    ]
    for r in rows:
        status = str(r["status"])
        label = status if status in ("failed", "pending") else str(r["triage"] or status)
        css = label if label in RANK_GROUPS else "pending"
        name = e(str(r["slide"]))
        if r["report"]:
            href = "/".join(urllib.parse.quote(part, safe="") for part in str(r["report"]).split("/"))
            name = f'<a href="{e(href)}">{name}</a>'
        score = "" if r["score"] is None else f"{float(r['score']):.3f}"
        cells = "" if r["n_cells"] is None else f"{int(r['n_cells']):,}"
        adequate = {True: "yes", False: "no"}.get(r["adequate"], "")
        notes = []
        if r["error"]:
            notes.append(f'<span class="err">{e(str(r["error"]))}</span>')
        if r["note"]:
            notes.append(f'<span class="note">{e(str(r["note"]))}</span>')
        if status == "skipped":
            notes.append('<span class="note">kept from a previous run</span>')
        out.append(
            f"<tr><td class=n>{int(r['rank'])}</td><td>{name}<br><span class=note>{e(str(r['slide_id']))}"
            f"</span></td><td><span class='t {css}'>{e(label)}</span></td><td class=n>{score}</td>"
            f"<td>{e(str(r['suggested_category'] or ''))}</td><td class=n>{cells}</td><td>{adequate}</td>"
            f"<td>{e(', '.join(str(f) for f in r['qc_flags']))}</td><td>{'<br>'.join(notes)}</td></tr>"
        )
    out.append("</tbody></table>")
    if ignored:
        out.append(
            f"<details><summary>{len(ignored)} file(s) in the input folder are not slides</summary><ul>"
        )
        out += [f"<li><code>{e(i.path)}</code> — {e(i.reason)}</li>" for i in ignored]
        out.append("</ul></details>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_worklist(
    out_root: Path,
    outcomes: Sequence[SlideOutcome],
    *,
    input_dir: Path,
    ignored: Sequence[IgnoredFile] = (),
    meta: Mapping[str, Any] | None = None,
    refresh_s: int | None = None,
) -> list[dict[str, Any]]:
    """Write ``batch.csv``, ``batch.json`` and ``index.html`` (ranked), each by an atomic replace."""
    ranked = rank_outcomes(outcomes)
    classes = _class_names(ranked)
    rows = [_row(i + 1, o, out_root, classes) for i, o in enumerate(ranked)]
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("ok", "skipped", "failed", "pending")}
    updated = _now()
    doc = {
        "schema_version": SCHEMA_VERSION,
        "wsi_screen_version": __version__,
        "input": str(input_dir),
        "output": str(out_root),
        "updated": updated,
        **dict(meta or {}),
        "counts": counts,
        "class_names": classes,
        "slides": rows,
        "ignored": [asdict(i) for i in ignored],
    }
    _atomic_write(out_root / "batch.json", json.dumps(doc, indent=2, allow_nan=False, default=str) + "\n")
    _atomic_write(out_root / "batch.csv", _csv_text(rows, classes))
    _atomic_write(
        out_root / "index.html",
        _html_text(
            rows,
            input_dir=str(input_dir),
            counts=counts,
            updated=updated,
            ignored=ignored,
            refresh_s=refresh_s,
        ),
    )
    return rows


# -- the batch ------------------------------------------------------------------------------------------


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


def _clean_worklist_temps(out_root: Path) -> None:
    for p in out_root.glob(".*.tmp-*"):
        m = re.match(r"^\.(batch\.csv|batch\.json|index\.html)\.tmp-(\d+)-\d+$", p.name)
        if m and not _pid_alive(int(m.group(2))):
            with contextlib.suppress(OSError):
                p.unlink()
    failed = out_root / FAILED_DIR
    if failed.is_dir():
        for p in failed.glob(".*.tmp-*"):
            m = re.match(r"^\..+\.tmp-(\d+)-\d+$", p.name)
            if m and not _pid_alive(int(m.group(1))):
                with contextlib.suppress(OSError):
                    p.unlink()


def run_batch(
    input_dir: str | os.PathLike[str],
    out_root: str | os.PathLike[str],
    *,
    settings: Settings,
    executor: SlideExecutor | None = None,
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
            executor = LocalExecutor(settings, progress=progress, stop=stop)
        _clean_worklist_temps(out)
        started = _now()
        meta: dict[str, Any] = {
            "started": started,
            "state": "running",
            "arguments": dict(arguments or {}),
            "models": identity,
            "config_hash": key_config,
        }
        bar = _BatchProgress(enabled=progress)
        outcomes: dict[str, SlideOutcome] = {}
        ids: dict[str, str] = {}
        tracked: dict[str, _Tracked] = {}
        in_flight: set[str] = set()
        ignored: list[IgnoredFile] = []
        seen_ignored: set[str] = set()
        interrupted = False
        rounds = 0

        def publish(state: str) -> list[dict[str, Any]]:
            meta["state"] = state
            if state != "running":
                meta["finished"] = _now()
            return write_worklist(
                out,
                list(outcomes.values()),
                input_dir=src,
                ignored=ignored,
                meta=meta,
                refresh_s=max(10, int(interval_s)) if watch and state == "running" else None,
            )

        try:
            while not stop.is_set():
                rounds += 1
                disc = discover_slides(src, exclude=[out])
                for item in disc.ignored:
                    if item.path not in seen_ignored:
                        seen_ignored.add(item.path)
                        logger.info("ignored %s: %s", item.path, item.reason)
                ignored = disc.ignored
                entries = assign_slide_ids(disc.slides, previous=ids)
                now = time.monotonic()
                ready: list[SlideEntry] = []
                for entry in entries:
                    ids[entry.rel] = entry.slide_id
                    if entry.rel in in_flight:
                        continue
                    if not watch:
                        if entry.rel not in outcomes:
                            ready.append(entry)
                        continue
                    sig = entry_signature(entry)
                    t = tracked.get(entry.rel)
                    if t is None or t.sig != sig:
                        if t is None:
                            tracked[entry.rel] = t = _Tracked(sig, now)
                        else:
                            if t.done_sig is not None:
                                logger.info("%s changed; waiting for it to settle", entry.rel)
                            t.sig, t.since = sig, now
                        if entry.rel not in outcomes:
                            outcomes[entry.rel] = SlideOutcome(
                                entry.rel, entry.slide_id, "pending", note="waiting for the file to settle"
                            )
                        continue
                    if t.done_sig != sig and now - t.since >= settle_s:
                        t.done_sig = sig
                        ready.append(entry)
                bar.add(len(ready))
                for entry in ready:
                    try:
                        fingerprint = entry_fingerprint(entry)
                    except OSError as exc:  # vanished or unreadable since discovery
                        msg = f"{entry.rel} cannot be read: {_one_line(exc)}"
                        outcomes[entry.rel] = SlideOutcome(entry.rel, entry.slide_id, "failed", error=msg)
                        bar.finished(outcomes[entry.rel])
                        continue
                    job = SlideJob(
                        entry=entry,
                        out_root=out,
                        settings=settings,
                        key=ResumeKey(fingerprint, key_config, key_models),
                        force=force,
                        retry_failed=retry_failed,
                        arguments=dict(arguments or {}),
                    )
                    decided, _ = decide(job)
                    if decided is not None:
                        outcomes[entry.rel] = decided
                        bar.finished(decided)
                        continue
                    outcomes[entry.rel] = SlideOutcome(entry.rel, entry.slide_id, "pending", note="queued")
                    executor.submit(job)
                    in_flight.add(entry.rel)
                if rounds == 1 and not entries:
                    logger.warning("no slides found in %s%s", src, " yet" if watch else "")
                publish("running")
                last_scan = time.monotonic()
                while executor.busy and not stop.is_set():
                    for outcome in executor.results(timeout=0.5):
                        in_flight.discard(outcome.slide)
                        outcomes[outcome.slide] = outcome
                        bar.finished(outcome)
                        publish("running")
                    if watch and time.monotonic() - last_scan >= interval_s:
                        break
                if not watch and not executor.busy:
                    break
                if max_rounds is not None and rounds >= max_rounds:
                    break
                if not executor.busy:
                    stop.wait(interval_s)
            if stop.is_set():
                interrupted = True
                for job in executor.cancel():
                    in_flight.discard(job.entry.rel)
                    outcomes[job.entry.rel] = SlideOutcome(
                        job.entry.rel,
                        job.entry.slide_id,
                        "pending",
                        note="not started: the batch was stopped",
                    )
                logger.warning("batch stopped before the end")
        finally:
            bar.close()
            if own_executor:
                executor.close()
            stopped = interrupted or stop.is_set()
            rows = publish(("stopped" if watch else "interrupted") if stopped else "finished")
        report = BatchReport(
            outcomes=list(outcomes.values()), ignored=list(ignored), interrupted=interrupted, rows=rows
        )
        logger.info("batch done: %s; worklist %s", report.line(), out / "index.html")
    return report
