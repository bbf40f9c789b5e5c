"""``wsi-screen batch`` end to end with the shipped models, on small synthetic slides (CPU).

One uninterrupted batch over a folder of good and bad slides is the reference; a batch killed with
SIGKILL and finished by two concurrent processes, and a batch on a two-worker Dask cluster whose
worker is killed mid-slide, must give identical outputs. Watch mode is driven with signals.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wsi_screen.models.registry import list_bundles

pytestmark = pytest.mark.slow

WSI = [sys.executable, "-m", "wsi_screen"]
#: One torch thread and one reader thread everywhere, so every path computes exactly the same.
RUN_ARGS = ["--device", "cpu", "--workers", "1", "--set", "runtime.torch_threads=1", "-q"]
GOOD = ("a-good-1.tiff", "b-good-2.tiff", "c-good-3.svs")
SIZE = 2048


def _need_bundles() -> None:
    missing = {"nuclei-unet-v1", "cyto-synth-v1"} - set(list_bundles())
    if missing:
        pytest.skip(f"shipped bundles missing: {sorted(missing)}")


def write_plain_tiff(path: Path, *, mpp: float | None) -> None:
    import tifffile

    img = np.full((1024, 1024, 3), 245, np.uint8)
    kwargs: dict[str, Any] = {}
    if mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib", **kwargs)


@pytest.fixture(scope="module")
def scans(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three good slides, an empty one, and the usual bad files (corrupt, truncated, no µm/px, ...)."""
    _need_bundles()
    from wsi_screen.synth import synthesize_slide

    d = tmp_path_factory.mktemp("scans")
    for i, name in enumerate(GOOD):
        synthesize_slide(
            d / name, size=(SIZE, SIZE), seed=11 + i, abnormal="HSIL=3,LSIL=2", write_truth=False
        )
    synthesize_slide(d / "d-empty.tiff", size=(SIZE, SIZE), seed=1, cells=[], write_truth=False)
    data = (d / GOOD[0]).read_bytes()
    (d / "e-truncated.tiff").write_bytes(data[: len(data) // 2])
    (d / "f-corrupt.svs").write_bytes(os.urandom(4096))
    write_plain_tiff(d / "g-no-mpp.tiff", mpp=None)
    (d / "notes.txt").write_text("scanner log\n")
    (d / "h-mirax.mrxs").write_text("[GENERAL]\n")
    (d / "h-mirax").mkdir()
    (d / "h-mirax" / "Slidedat.ini").write_text("[GENERAL]\n")
    return d


def batch(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="120")
    return subprocess.run(
        [*WSI, "batch", *args, *RUN_ARGS], capture_output=True, text=True, env=env, timeout=timeout
    )


def rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "batch.csv").open(newline="", encoding="utf-8") as fh:
        return {r["slide"]: r for r in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def reference(scans: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    proc = batch(str(scans), "-o", str(out))
    assert proc.returncode == 1, proc.stderr  # some slides failed
    return out


def _result(folder: Path) -> dict[str, Any]:
    """What must be identical between runs: summary (minus timings), cell arrays, flagged cells."""
    import zarr

    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("timings", None)
    root = zarr.open_group(str(folder / "cells.zarr"), mode="r")
    arrays = {}
    for group in ("cells", "tiles"):
        for name, arr in root[group].arrays():
            arrays[f"{group}/{name}"] = np.asarray(arr[...])
    return {"summary": summary, "arrays": arrays, "geojson": (folder / "flagged.geojson").read_text()}


def assert_same_results(a: Path, b: Path, ids: list[str]) -> None:
    for sid in ids:
        ra, rb = _result(a / sid), _result(b / sid)
        assert ra["summary"] == rb["summary"], sid
        assert ra["geojson"] == rb["geojson"], sid
        assert ra["arrays"].keys() == rb["arrays"].keys(), sid
        for k in ra["arrays"]:
            np.testing.assert_array_equal(ra["arrays"][k], rb["arrays"][k], err_msg=f"{sid} {k}")


GOOD_IDS = ["a-good-1", "b-good-2", "c-good-3"]


def test_batch_reports_every_slide(scans: Path, reference: Path) -> None:
    table = rows(reference)
    assert set(table) == {
        *GOOD,
        "d-empty.tiff",
        "e-truncated.tiff",
        "f-corrupt.svs",
        "g-no-mpp.tiff",
        "h-mirax.mrxs",
    }
    for name in GOOD:
        r = table[name]
        assert r["status"] == "ok" and int(r["n_cells"]) > 0 and r["report"].endswith("/report.html")
        assert (reference / r["slide_id"] / "report.html").is_file()
    empty = table["d-empty.tiff"]
    assert (empty["status"], empty["triage"], empty["n_cells"]) == ("ok", "unsatisfactory", "0")
    assert "no_cells" in empty["qc_flags"].split(";")
    errors = {
        n: table[n]["error"] for n in ("e-truncated.tiff", "f-corrupt.svs", "g-no-mpp.tiff", "h-mirax.mrxs")
    }
    assert all(table[n]["status"] == "failed" for n in errors)
    assert "truncated" in errors["e-truncated.tiff"]
    assert "not a whole-slide image" in errors["f-corrupt.svs"]
    assert "slide.mpp" in errors["g-no-mpp.tiff"]
    assert errors["h-mirax.mrxs"]
    ranks = [int(table[n]["rank"]) for n in table]
    assert sorted(ranks) == list(range(1, len(table) + 1))
    doc = json.loads((reference / "batch.json").read_text())
    assert doc["ignored"] == [{"path": "notes.txt", "reason": "not a slide file type (.txt)"}]
    assert doc["state"] == "finished" and doc["counts"]["failed"] == 4
    log = (reference / "batch.log").read_text()
    assert "notes.txt" in log and "f-corrupt.svs" in log
    assert not [p for p in reference.iterdir() if ".tmp-" in p.name]
    # The worklist is what evaluate-slides reads.
    from wsi_screen.evaluation import evaluate_slides

    labels = reference.parent / "labels.csv"
    labels.write_text("slide,label\n" + "".join(f"{n},HSIL\n" for n in GOOD) + "d-empty.tiff,NILM\n")
    assert evaluate_slides(reference, labels)["n_labelled"] == 4


def test_kill_and_resume_with_two_processes(scans: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = dict(os.environ, COLUMNS="120")
    proc = subprocess.Popen(
        [*WSI, "batch", str(scans), "-o", str(out), *RUN_ARGS],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 300
        # Kill while the second good slide is being written (the first is published).
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "a-good-1").is_dir() and list(out.glob(".b-good-2.tmp-*")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the batch ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert list(out.glob(".b-good-2.tmp-*")) and not (out / "b-good-2").exists()  # half-written, hidden

    # Two batches finish the job together, each slide once.
    procs = [
        subprocess.Popen(
            [*WSI, "batch", str(scans), "-o", str(out), *RUN_ARGS], env=env, stderr=subprocess.PIPE
        )
        for _ in range(2)
    ]
    logs = [p.communicate(timeout=400)[1].decode() for p in procs]
    assert [p.returncode for p in procs] == [1, 1], logs
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert_same_results(reference, out, [*GOOD_IDS, "d-empty"])
    final = rows(out)
    assert final["a-good-1.tiff"]["status"] == "skipped"
    assert {r["status"] for r in final.values()} <= {"ok", "skipped", "failed"}
    # Each good slide was screened to the end exactly once over the three processes (shared log).
    log = (out / "batch.log").read_text().splitlines()
    for name in GOOD:
        done = [line for line in log if f"] {name}: OK" in line]
        assert len(done) == 1, (name, done)
    pids = {line.split("[")[1].split("]")[0] for line in log if ": OK " in line}
    assert len(pids) >= 2  # the killed process and at least one of the two others


def test_watch_mode(scans: Path, tmp_path: Path) -> None:
    src = tmp_path / "incoming"
    src.mkdir()
    out = tmp_path / "out"
    env = dict(os.environ, COLUMNS="120")
    cmd = [
        *WSI,
        "batch",
        str(src),
        "-o",
        str(out),
        "--watch",
        "--interval",
        "0.2",
        "--settle",
        "1.5",
        *RUN_ARGS,
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        # A slide copied in after the start (written elsewhere, then renamed into place).
        shutil.copy(scans / GOOD[0], tmp_path / "staged.tiff")
        os.replace(tmp_path / "staged.tiff", src / GOOD[0])
        deadline = time.monotonic() + 300
        while not (out / GOOD_IDS[0]).is_dir() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert (out / GOOD_IDS[0] / "summary.json").is_file()
        # A slide still being written is left alone until it has not changed for --settle seconds.
        data = (scans / GOOD[1]).read_bytes()
        step = len(data) // 5
        started_early = False
        for i in range(5):
            with (src / GOOD[1]).open("ab") as fh:
                fh.write(data[i * step : (i + 1) * step] if i < 4 else data[4 * step :])
            last_write = time.monotonic()
            t_end = last_write + 0.5
            while time.monotonic() < t_end:
                started_early |= bool(list(out.glob(f".{GOOD_IDS[1]}.tmp-*")))
                time.sleep(0.05)
        assert not started_early
        while not list(out.glob(f".{GOOD_IDS[1]}.tmp-*")) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert time.monotonic() - last_write >= 1.5
        # SIGTERM mid-slide: the slide is abandoned cleanly and the watcher exits 0.
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert not [p for p in out.iterdir() if ".tmp-" in p.name] and not (out / GOOD_IDS[1]).exists()
    table = rows(out)
    assert table[GOOD[0]]["status"] == "ok" and table[GOOD[1]]["status"] == "pending"
    assert json.loads((out / "batch.json").read_text())["state"] == "stopped"


def test_dask_local_cluster_same_results_despite_a_dead_worker(
    scans: Path, reference: Path, tmp_path: Path
) -> None:
    pytest.importorskip("distributed")
    from wsi_screen.batch import run_batch
    from wsi_screen.config import load_settings
    from wsi_screen.distributed import DaskExecutor, cached_model_count

    over: dict[str, Any] = {"runtime.device": "cpu", "runtime.torch_threads": 1, "reading.workers": 1}
    settings = load_settings(overrides=over)
    executor = DaskExecutor.local(2, gpus=[], resources={"GPU": 1}, retries=2)
    client = executor.client
    killed: list[int] = []

    def killer() -> None:
        # Kill the first worker seen busy with a slide (its Nanny starts a new process).
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            busy = {w: keys for w, keys in client.processing().items() if keys}
            if busy and any(p.is_dir() for p in (tmp_path / "out").glob(".*.tmp-*")):
                addr = next(iter(busy))
                pid = client.run(os.getpid, workers=[addr])[addr]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        report = run_batch(scans, tmp_path / "out", settings=settings, executor=executor, progress=False)
        thread.join(10)
        counts = client.run(cached_model_count)
    finally:
        executor.close()
    assert killed, "no worker was killed"
    status = {o.slide: o.status for o in report.outcomes}
    assert [status[n] for n in GOOD] == ["ok"] * 3 and status["d-empty.tiff"] == "ok"
    assert report.exit_code == 1  # the bad slides
    assert all(n <= 1 for n in counts.values())  # models loaded once per worker process
    out = tmp_path / "out"
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert_same_results(reference, out, [*GOOD_IDS, "d-empty"])
    ref_rows, dask_rows = rows(reference), rows(out)
    for name, r in ref_rows.items():
        for col in (
            "slide_id",
            "status",
            "triage",
            "score",
            "suggested_category",
            "n_cells",
            "error",
            "rank",
        ):
            assert dask_rows[name][col] == r[col], (name, col)
    runs = [json.loads((out / sid / "run.json").read_text()) for sid in GOOD_IDS]
    workers = {r["arguments"]["batch"]["worker"] for r in runs}
    assert not any(w.endswith(f":{killed[0]}") for w in workers)  # the killed worker published nothing
