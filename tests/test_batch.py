"""Batch logic with a stand-in for the screening step: discovery, ids, locks, resume, worklist, watch.

The stand-in runner (``run_batch(runner=...)``) opens each slide with the real reader (so corrupt,
truncated and µm/px-less files fail exactly as in a real run) and publishes a small result folder
through :mod:`wsi_screen.output_layout` (temporary folder, atomic rename), as ``run_slide`` does.
End-to-end runs with the shipped models are in ``test_batch_e2e.py``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsi_screen import batch as B
from wsi_screen.config import Settings, load_settings
from wsi_screen.errors import WsiScreenError

MODELS = [
    {"task": "localization", "name": "fake-unet", "version": "1", "sha256": "a" * 64},
    {"task": "classification", "name": "fake-cls", "version": "1", "sha256": "b" * 64},
]
WSI = [sys.executable, "-m", "wsi_screen"]
CLASSES = ["NILM", "ASC-US", "LSIL", "HSIL", "artifact"]


# -- helpers --------------------------------------------------------------------------------------------


def write_tiff(path: Path, *, mpp: float | None = 0.25, size: int = 512, value: int | None = None) -> Path:
    """A small tiled TIFF OpenSlide reads (generic TIFF); without resolution when ``mpp`` is None."""
    import tifffile

    rng = np.random.default_rng(len(path.name))
    img = (
        np.full((size, size, 3), value, np.uint8)
        if value is not None
        else rng.integers(100, 255, (size, size, 3), dtype=np.uint8)
    )
    kwargs: dict[str, Any] = {}
    if mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    path.parent.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib", **kwargs)
    return path


class FakePipeline:
    """Stands in for ``run_slide`` (a :class:`~wsi_screen.batch.SlideRunner`): real slide opening,
    fake but complete outputs, published as ``run_slide`` publishes them."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.lock = threading.Lock()
        self.delay_s = 0.0

    def __call__(
        self,
        slide_path: Any,
        out_root: Any,
        *,
        settings: Settings,
        models: Any = None,
        slide_id: str | None = None,
        progress: bool = True,
        arguments: Any = None,
        on_tile: Any = None,
    ) -> Any:
        from wsi_screen import output_layout as layout
        from wsi_screen.pipeline import SlideResult, slide_id_for
        from wsi_screen.slide import open_slide
        from wsi_screen.store import CellStoreWriter

        with self.lock:
            self.calls.append(Path(slide_path).name)
        with open_slide(slide_path, backend=settings.slide.backend, mpp=settings.slide.mpp) as slide:
            fingerprint = slide.fingerprint()
            dims = slide.dimensions
        sid = slide_id or slide_id_for(slide_path)
        out_root = Path(out_root)
        tmp = layout.atomic_dir(out_root, sid)
        try:
            for i in range(4):
                time.sleep(self.delay_s / 4)
                if on_tile is not None:
                    on_tile(i + 1, 4)
        except BaseException:  # as run_slide: an abandoned slide leaves nothing behind
            shutil.rmtree(tmp)
            raise
        h = int(hashlib.sha256(fingerprint.encode()).hexdigest()[:8], 16)
        score = (h % 1000) / 1000
        triage = ["negative", "review", "priority"][h % 3]
        summary = {
            "triage": triage,
            "score": score,
            "suggested_category": "NILM",
            "n_cells": h % 500,
            "class_names": CLASSES,
            "class_counts": {"predicted": dict.fromkeys(CLASSES, 1)},
            "adequacy": {"squamous_cells": 10, "adequate": False},
            "qc": {"flags": ["low_cellular_area"]},
        }
        (tmp / layout.SUMMARY).write_text(json.dumps(summary))
        (tmp / layout.FLAGGED).write_text('{"type": "FeatureCollection", "features": []}')
        (tmp / layout.REPORT).write_text("<html></html>")
        CellStoreWriter(tmp / layout.CELLS, class_names=CLASSES, abnormal_classes=CLASSES[1:4]).close()
        run = {
            "slide": {"name": Path(slide_path).name, "fingerprint": fingerprint, "dimensions": list(dims)},
            "arguments": dict(arguments or {}),
            "config": settings.to_dict(),
            "models": MODELS,
            "timings": {"total": 0.1},
            "tiles": {"processed": 4},
        }
        (tmp / layout.RUN).write_text(json.dumps(run))
        layout.publish(tmp, out_root / sid)
        return SlideResult(sid, out_root / sid, summary, summary["n_cells"], {"total": 0.1})


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakePipeline:
    """The stand-in runner (pass it as ``run_batch(runner=fake)``), fake models and their identity."""
    monkeypatch.setattr("wsi_screen.pipeline.load_models", lambda settings: object())
    monkeypatch.setattr("wsi_screen.batch.loop.models_identity", lambda settings: MODELS)
    return FakePipeline()


@pytest.fixture
def settings() -> Settings:
    return load_settings(overrides={"runtime.device": "cpu"})


@pytest.fixture
def scans(tmp_path: Path) -> Path:
    """good slides, a corrupt file, a truncated slide, a slide without µm/px, non-slides, MIRAX."""
    d = tmp_path / "scans"
    write_tiff(d / "good-1.tiff")
    write_tiff(d / "sub" / "good-2.tif")
    write_tiff(d / "no-mpp.tiff", mpp=None)
    full = write_tiff(d / "truncated.tiff", size=1024).read_bytes()
    (d / "truncated.tiff").write_bytes(full[: len(full) // 2])
    (d / "corrupt.svs").write_bytes(os.urandom(1001))
    (d / "notes.txt").write_text("not a slide")
    (d / "mirax.mrxs").write_text("[GENERAL]\n")
    (d / "mirax").mkdir()
    (d / "mirax" / "Slidedat.ini").write_text("[GENERAL]\n")
    (d / "mirax" / "Data0000.dat").write_bytes(b"\0" * 64)
    return d


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    return int(proc.stdout)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


# -- discovery ----------------------------------------------------------------------------------------------


def test_discovery_formats_companions_and_ignored(tmp_path: Path) -> None:
    d = tmp_path / "in"
    for name in ("b.svs", "a.ndpi", "x/c.scn", "x/d.bif", "e.TIFF", "f.tif", "g.ome.tiff", "h.czi"):
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_bytes(b"x")
    (d / "m.mrxs").write_text("")
    (d / "m").mkdir()
    (d / "m" / "Data0000.dat").write_bytes(b"x")
    (d / "m" / "Slidedat.ini").write_text("")
    (d / "dicom").mkdir()
    for i in range(3):
        (d / "dicom" / f"{i}.dcm").write_bytes(b"x")
    (d / "scan.vms").write_text("[Virtual Microscope Specimen]\nImageFile=scan.jpg\nMapFile=scan_map.jpg\n")
    (d / "scan.jpg").write_bytes(b"x")
    (d / "scan_map.jpg").write_bytes(b"x")
    (d / "readme.txt").write_text("")
    (d / "photo.jpg").write_bytes(b"x")
    (d / ".DS_Store").write_bytes(b"x")
    (d / ".hidden").mkdir()
    (d / ".hidden" / "z.svs").write_bytes(b"x")
    out = d / "results"
    (out / "old").mkdir(parents=True)
    (out / "old" / "y.svs").write_bytes(b"x")

    found = B.discover_slides(d, exclude=[out])
    rels = [s.rel for s in found.slides]
    assert rels == sorted(rels)
    assert set(rels) == {
        "a.ndpi", "b.svs", "dicom", "e.TIFF", "f.tif", "g.ome.tiff", "h.czi", "m.mrxs", "scan.vms",
        "x/c.scn", "x/d.bif",
    }  # fmt: skip
    by = {s.rel: s for s in found.slides}
    assert by["dicom"].format == "dicom" and len(by["dicom"].files) == 3
    assert by["m.mrxs"].format == "mirax" and len(by["m.mrxs"].files) == 3  # .mrxs + companion files
    assert {f.name for f in by["scan.vms"].files} == {"scan.vms", "scan.jpg", "scan_map.jpg"}
    assert [i.path for i in found.ignored] == ["photo.jpg", "readme.txt"]
    assert all("not a slide" in i.reason for i in found.ignored)
    # Same answer twice (stable), and ids are unique and safe.
    assert [s.rel for s in B.discover_slides(d, exclude=[out]).slides] == rels
    ids = [e.slide_id for e in B.assign_slide_ids(found.slides)]
    assert len({i.casefold() for i in ids}) == len(ids)
    assert "g" in ids  # .ome.tiff → stem without .ome


def test_discovery_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(B.BatchError, match="input folder not found"):
        B.discover_slides(tmp_path / "nope")


def test_slide_ids_collisions_reserved_and_pinned(tmp_path: Path) -> None:
    def entry(rel: str) -> B.SlideEntry:
        return B.SlideEntry(path=tmp_path / rel, rel=rel, format="tiff", files=())

    entries = [entry(r) for r in ("a/x.svs", "b/x.svs", "X.tiff", "index.html.svs", "batch.svs", "<bad>.svs")]
    ids = [e.slide_id for e in B.assign_slide_ids(entries)]
    assert ids[0] == "x"
    assert ids[1].startswith("x-") and ids[2].startswith("X-") and ids[1] != ids[2]
    assert ids[3].startswith("index.html-")  # never the worklist page
    assert ids[4] == "batch"  # batch.csv/json are files, a folder "batch" does not clash
    assert ids[5] == "bad"
    # A collider hash depends only on its own path: the same on every run.
    again = [e.slide_id for e in B.assign_slide_ids(list(reversed(entries)))]
    assert again[-2] == ids[1] or again[-1] == ids[0]
    # Pinned ids keep their owner even when a new slide sorts first.
    pinned = B.assign_slide_ids([entry("c/x.svs"), entry("a/x.svs")], previous={"a/x.svs": "x"})
    assert pinned[1].slide_id == "x" and pinned[0].slide_id != "x"


# -- identity --------------------------------------------------------------------------------------------


def test_config_hash_ignores_only_neutral_settings(settings: Settings) -> None:
    h = B.config_hash(settings)
    neutral = {
        "reading.workers": 7,
        "reading.queue_tiles": 3,
        "runtime.device": "cuda",
        "runtime.torch_threads": 5,
        "localization.batch_size": 9,
        "localization.candidate_workers": 3,
        "classification.batch_size": 11,
    }
    assert set(neutral) == set(B.RESULT_NEUTRAL_SETTINGS)
    assert B.config_hash(settings.with_overrides(neutral)) == h
    assert B.config_hash(settings.to_dict()) == h  # run.json's config hashes the same
    for key, value in {"triage.confidence": 0.8, "slide.mpp": 0.5, "stain.enabled": False}.items():
        assert B.config_hash(settings.with_overrides({key: value})) != h, key
    assert B.models_hash(MODELS) != B.models_hash([*MODELS[:1], {**MODELS[1], "sha256": "c" * 64}])


# -- locks and stale folders ------------------------------------------------------------------------------


def test_lock_is_exclusive_and_released_by_a_dying_process(tmp_path: Path) -> None:
    a = B.SlideLock(tmp_path, "s1")
    b = B.SlideLock(tmp_path, "s1")
    assert a.acquire(blocking=False)
    assert not b.acquire(blocking=False)
    assert B.SlideLock(tmp_path, "s2").acquire(blocking=False)
    stop = threading.Event()
    stop.set()
    assert not b.acquire(blocking=True, stop=stop)  # a stop ends a blocking wait
    a.release()
    assert b.acquire(blocking=False)
    b.release()
    # A process that dies holding the lock releases it (the OS closes its descriptor).
    code = (
        "import sys, time; from wsi_screen.batch import SlideLock; "
        f"l = SlideLock({str(tmp_path)!r}, 's1'); assert l.acquire(); "
        "print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        assert not B.SlideLock(tmp_path, "s1").acquire(blocking=False)
    finally:
        proc.kill()
        proc.wait()
    c = B.SlideLock(tmp_path, "s1")
    assert c.acquire(blocking=False)
    c.release()


def test_clean_stale_keeps_live_writers(tmp_path: Path) -> None:
    dead = dead_pid()
    names = {
        f".s1.tmp-{dead}-0123abcd": True,  # killed run: removed
        ".s1.old-89abcdef": True,  # interrupted replacement: removed
        f".s1.tmp-{os.getpid()}-0123abcd": False,  # a live process writes it: kept
        f".s10.tmp-{dead}-0123abcd": False,  # another slide: not ours to clean
        "s1": False,
    }
    for n in names:
        (tmp_path / n).mkdir()
    B.clean_stale(tmp_path, "s1")
    for n, removed in names.items():
        assert (tmp_path / n).exists() != removed, n


# -- worklist ---------------------------------------------------------------------------------------------


def test_worklist_ranking_and_hostile_names(tmp_path: Path) -> None:
    hostile = '<script>alert("x")</script>&"\'.svs'

    def ok(slide: str, sid: str, triage: str, score: float) -> B.SlideOutcome:
        (tmp_path / sid).mkdir()
        (tmp_path / sid / "summary.json").write_text("{}")
        (tmp_path / sid / "report.html").write_text("")
        summary = {"triage": triage, "score": score, "class_names": ["NILM", "HSIL"],
                   "class_counts": {"predicted": {"NILM": 5, "HSIL": 1}}}  # fmt: skip
        return B.SlideOutcome(slide, sid, "ok", summary=summary)

    outcomes = [
        ok("neg.svs", "neg", "negative", 0.01),
        ok("rev-low.svs", "rev-low", "review", 0.5),
        B.SlideOutcome("bad.svs", "bad", "failed", error="bad.svs is corrupt <b>"),
        ok(hostile, "script_alert_x_script", "priority", 0.7),
        ok("rev-high.svs", "rev-high", "review", 0.9),
        ok("unsat.svs", "unsat", "unsatisfactory", 0.0),
        B.SlideOutcome("wait.svs", "wait", "pending"),
    ]
    rows = B.write_worklist(tmp_path, outcomes, input_dir=tmp_path / "in")
    order = [r["slide"] for r in rows]
    assert order == [hostile, "rev-high.svs", "rev-low.svs", "bad.svs", "unsat.svs", "neg.svs", "wait.svs"]
    table = read_csv(tmp_path / "batch.csv")
    assert [r["slide"] for r in table] == order
    assert {"slide", "slide_id", "status", "error", "triage", "score", "n_NILM", "n_HSIL"} <= set(table[0])
    assert table[3]["status"] == "failed" and table[3]["error"] == "bad.svs is corrupt <b>"
    doc = json.loads((tmp_path / "batch.json").read_text())
    assert doc["counts"] == {"ok": 5, "skipped": 0, "failed": 1, "pending": 1}
    assert doc["slides"][0]["class_counts"] == {"NILM": 5, "HSIL": 1}
    page = (tmp_path / "index.html").read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page and "<b>" not in page
    assert 'href="script_alert_x_script/report.html"' in page
    assert "http" not in page.replace("http-equiv", "")  # no external resources


# -- the batch loop with the stand-in pipeline ---------------------------------------------------------


def test_batch_bad_slides_reported_and_resume(
    fake: FakePipeline,
    scans: Path,
    tmp_path: Path,
    settings: Settings,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="wsi_screen")
    out = tmp_path / "out"
    report = B.run_batch(scans, out, settings=settings, runner=fake, progress=False)
    status = {o.slide: o for o in report.outcomes}
    assert {k: o.status for k, o in status.items()} == {
        "good-1.tiff": "ok",
        "sub/good-2.tif": "ok",
        "no-mpp.tiff": "failed",
        "truncated.tiff": "failed",
        "corrupt.svs": "failed",
        "mirax.mrxs": "failed",
    }
    assert "slide.mpp" in status["no-mpp.tiff"].error
    assert "truncated" in status["truncated.tiff"].error
    assert "not a whole-slide image" in status["corrupt.svs"].error
    assert all("\n" not in o.error for o in report.outcomes)
    assert report.exit_code == 1
    assert [i.path for i in report.ignored] == ["notes.txt"]
    table = read_csv(out / "batch.csv")
    assert {r["slide"] for r in table} == set(status)
    assert json.loads((out / "batch.json").read_text())["ignored"] == [
        {"path": "notes.txt", "reason": "not a slide file type (.txt)"}
    ]
    assert "notes.txt" in (out / "batch.log").read_text()
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]

    # Second run: finished slides are kept; known failures are not retried.
    fake.calls.clear()
    again = B.run_batch(scans, out, settings=settings, runner=fake, progress=False)
    assert fake.calls == []
    expected = {k: "skipped" if o.status == "ok" else o.status for k, o in status.items()}
    assert {o.slide: o.status for o in again.outcomes} == expected
    assert "failed before with the same file" in {o.slide: o for o in again.outcomes}["corrupt.svs"].note
    assert read_csv(out / "batch.csv")[0]["score"] != ""  # kept results stay in the worklist

    # --retry-failed tries the failures again, --mpp fixes one of them.
    B.run_batch(scans, out, settings=settings, runner=fake, progress=False, retry_failed=True)
    assert sorted(fake.calls) == ["corrupt.svs", "mirax.mrxs", "no-mpp.tiff", "truncated.tiff"]

    # A result-neutral change keeps everything; a relevant one redoes every slide.
    fake.calls.clear()
    neutral = settings.with_overrides({"reading.workers": 1})
    relevant = settings.with_overrides({"triage.confidence": 0.9})
    B.run_batch(scans, out, settings=neutral, runner=fake, progress=False)
    assert fake.calls == []
    B.run_batch(scans, out, settings=relevant, runner=fake, progress=False)
    assert sorted(fake.calls) == [
        "corrupt.svs",
        "good-1.tiff",
        "good-2.tif",
        "mirax.mrxs",
        "no-mpp.tiff",
        "truncated.tiff",
    ]

    # A changed file is redone; the others are kept.
    fake.calls.clear()
    write_tiff(scans / "good-1.tiff", size=768)
    B.run_batch(scans, out, settings=relevant, runner=fake, progress=False)
    assert fake.calls == ["good-1.tiff"]

    # Other models redo everything that succeeded.
    fake.calls.clear()
    other = [*MODELS[:1], {**MODELS[1], "sha256": "c" * 64}]
    monkeypatch.setattr("wsi_screen.batch.loop.models_identity", lambda settings: other)
    B.run_batch(scans, out, settings=relevant, runner=fake, progress=False)
    assert sorted(fake.calls) == [
        "corrupt.svs",
        "good-1.tiff",
        "good-2.tif",
        "mirax.mrxs",
        "no-mpp.tiff",
        "truncated.tiff",
    ]


def test_incomplete_or_foreign_result_is_redone(
    fake: FakePipeline, tmp_path: Path, settings: Settings
) -> None:
    scans = tmp_path / "scans"
    write_tiff(scans / "s.tiff")
    out = tmp_path / "out"
    B.run_batch(scans, out, settings=settings, runner=fake, progress=False)
    (out / "s" / "report.html").unlink()  # damaged by hand
    fake.calls.clear()
    B.run_batch(scans, out, settings=settings, runner=fake, progress=False)
    assert fake.calls == ["s.tiff"]
    zarr_json = out / "s" / "cells.zarr" / "zarr.json"
    meta = json.loads(zarr_json.read_text())
    meta["attributes"]["complete"] = False  # as a store whose writer never closed it
    zarr_json.write_text(json.dumps(meta))
    fake.calls.clear()
    B.run_batch(scans, out, settings=settings, runner=fake, progress=False)
    assert fake.calls == ["s.tiff"]
    # A half-written temporary folder of a killed run is never taken for a result, and is cleaned.
    stale = out / f".s.tmp-{dead_pid()}-0123abcd"
    (out / "s").rename(stale)
    fake.calls.clear()
    B.run_batch(scans, out, settings=settings, runner=fake, progress=False)
    assert fake.calls == ["s.tiff"] and not stale.exists()


def test_empty_input_and_output_inside_input(fake: FakePipeline, tmp_path: Path, settings: Settings) -> None:
    (tmp_path / "empty").mkdir()
    report = B.run_batch(
        tmp_path / "empty", tmp_path / "empty" / "out", settings=settings, runner=fake, progress=False
    )
    assert report.outcomes == [] and report.exit_code == 0
    assert json.loads((tmp_path / "empty" / "out" / "batch.json").read_text())["slides"] == []
    with pytest.raises(B.BatchError, match="contains the input"):
        B.run_batch(tmp_path / "empty", tmp_path, settings=settings, runner=fake, progress=False)


def test_two_batches_share_the_work(fake: FakePipeline, tmp_path: Path, settings: Settings) -> None:
    scans = tmp_path / "scans"
    for i in range(6):
        write_tiff(scans / f"s{i}.tiff")
    out = tmp_path / "out"
    fake.delay_s = 0.2
    reports: list[B.BatchReport] = []

    def go() -> None:
        reports.append(
            B.run_batch(scans, out, settings=settings, runner=fake, progress=False, log_file=False)
        )

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(reports) == 2
    assert sorted(fake.calls) == sorted(f"s{i}.tiff" for i in range(6))  # each slide screened once
    for r in reports:
        assert {o.status for o in r.outcomes} <= {"ok", "skipped"} and len(r.outcomes) == 6
    ok = [{o.slide for o in r.outcomes if o.status == "ok"} for r in reports]
    assert not ok[0] & ok[1] and len(ok[0] | ok[1]) == 6


def test_stop_abandons_the_current_slide(fake: FakePipeline, tmp_path: Path, settings: Settings) -> None:
    scans = tmp_path / "scans"
    for i in range(3):
        write_tiff(scans / f"s{i}.tiff")
    out = tmp_path / "out"
    stop = threading.Event()
    fake.delay_s = 1.0
    timer = threading.Timer(0.5, stop.set)  # mid-way through the first slide
    timer.start()
    report = B.run_batch(scans, out, settings=settings, runner=fake, progress=False, stop=stop)
    timer.cancel()
    assert report.interrupted
    assert {o.status for o in report.outcomes} == {"pending"}
    assert not [p for p in out.iterdir() if p.name.startswith(".s")]  # no half result
    assert not (out / "s0").exists()
    assert json.loads((out / "batch.json").read_text())["state"] == "interrupted"


def test_watch_waits_for_files_to_settle(fake: FakePipeline, tmp_path: Path, settings: Settings) -> None:
    scans = tmp_path / "scans"
    write_tiff(scans / "first.tiff")
    out = tmp_path / "out"
    stop = threading.Event()
    result: list[B.BatchReport] = []
    runner = threading.Thread(
        target=lambda: result.append(
            B.run_batch(
                scans,
                out,
                settings=settings,
                runner=fake,
                progress=False,
                stop=stop,
                watch=True,
                interval_s=0.1,
                settle_s=0.8,
            )
        )
    )
    runner.start()
    try:
        deadline = time.monotonic() + 20
        while not (out / "first").is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "first").is_dir()
        # A slide that keeps growing is not touched until it stops changing.
        data = write_tiff(tmp_path / "staging" / "late.tiff", size=1024).read_bytes()
        target = scans / "late.tiff"
        step = len(data) // 6
        for i in range(6):
            with target.open("ab") as fh:
                fh.write(data[i * step : (i + 1) * step] if i < 5 else data[5 * step :])
            done_writing = time.monotonic()
            time.sleep(0.3)
            assert "late.tiff" not in fake.calls
        while not (out / "late").is_dir() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (out / "late").is_dir()
        assert time.monotonic() - done_writing >= 0.8
        assert fake.calls.count("late.tiff") == 1
    finally:
        stop.set()
        runner.join(20)
    assert result and not [o for o in result[0].outcomes if o.status == "failed"]
    assert {o.slide: o.status for o in result[0].outcomes} == {"first.tiff": "ok", "late.tiff": "ok"}


def test_cli_errors(tmp_path: Path) -> None:
    env = dict(os.environ, COLUMNS="120")
    proc = subprocess.run(
        [*WSI, "batch", str(tmp_path / "nope"), "-o", str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "input folder not found" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [*WSI, "batch", str(tmp_path), "--scheduler", "tcp://x:1", "--cluster", "local"],
        capture_output=True, text=True, env=env, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "either --scheduler or --cluster" in proc.stderr


def test_resource_parsing() -> None:
    from wsi_screen.distributed import parse_resource

    assert parse_resource("GPU=1") == {"GPU": 1.0}
    assert parse_resource("gpu-mem=2.5") == {"gpu-mem": 2.5}
    assert parse_resource("none") is None and parse_resource("") is None
    for bad in ("=1", "GPU=0", "GPU=x", "a b=1"):
        with pytest.raises(WsiScreenError):
            parse_resource(bad)


def test_results_recorded_with_the_removed_seed_setting_still_resume() -> None:
    """``runtime.seed`` (removed in issue 17) in an older run.json does not change its config hash."""
    from wsi_screen.batch import config_hash
    from wsi_screen.config import load_settings

    now = load_settings().to_dict()
    older = {**now, "runtime": {**now["runtime"], "seed": 0}}
    assert config_hash(older) == config_hash(now)
    other = {**now, "triage": {**now["triage"], "min_focus": now["triage"]["min_focus"] + 0.01}}
    assert config_hash(other) != config_hash(now)
