"""A slide without a usable µm/px: ``inspect`` shows it (and says what ``run`` needs); ``run`` and
``tiles`` refuse it with one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile

from wsi_screen.cli.main import main
from wsi_screen.errors import MissingMppError
from wsi_screen.slide import open_slide

WSI = [sys.executable, "-m", "wsi_screen"]


@pytest.fixture(scope="module")
def no_mpp_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-level tiled TIFF with no physical resolution (ResolutionUnit NONE, tifffile's default)."""
    path = tmp_path_factory.mktemp("nompp") / "no-mpp.tiff"
    yy, xx = np.mgrid[0:512, 0:512]
    level = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    with tifffile.TiffWriter(path) as tif:
        for i in range(2):
            tif.write(level, tile=(256, 256), photometric="rgb", subfiletype=1 if i else 0)
            level = np.ascontiguousarray(level[::2, ::2])
    return path


def _main(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = capsys.readouterr()
    return int(exc.value.code or 0), out.out, out.err


def _row(out: str, key: str) -> str:
    """The value of the table row ``key`` of ``inspect``'s output."""
    for line in out.splitlines():
        line = line.strip()
        if line.startswith(key + " "):
            return line[len(key) :].strip()
    raise AssertionError(f"no row {key!r} in:\n{out}")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="120")
    return subprocess.run([*WSI, *args], capture_output=True, text=True, env=env, timeout=300)


def _assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert all(f in errors[0] for f in fragments), errors[0]
    assert "Traceback" not in proc.stderr


# -- library -----------------------------------------------------------------------------------------


def test_require_mpp_false_opens_an_implausible_slide(shared_slides: Path) -> None:
    with pytest.raises(MissingMppError, match=r"352\.8"):
        open_slide(shared_slides / "boxes.tiff")
    with open_slide(shared_slides / "boxes.tiff", require_mpp=False) as s:
        info = s.info
        assert info.mpp_status == "implausible" and not info.mpp_plausible
        assert info.mpp_x == pytest.approx(352.78, abs=0.01) and info.mpp_source == "metadata"
        assert info.level_count == 4 and info.dimensions == (300, 250)
        assert info.mpp_problem is not None and "slide.mpp" in info.mpp_problem
        # Whatever needs the µm/px still refuses, naming the value.
        for get in (lambda: s.mpp, lambda: info.size_um, lambda: s.read_region((0, 0), (8, 8), mpp=0.5)):
            with pytest.raises(MissingMppError, match=r"352\.8 µm/px.*slide\.mpp"):
                get()
        with s.reopen() as again:
            assert again.info.mpp_status == "implausible"
        data = info.to_dict()
        assert data["mpp"] is None and data["mpp_plausible"] is False and data["mpp_status"] == "implausible"
    with open_slide(shared_slides / "boxes.tiff", mpp=0.5, require_mpp=False) as s:
        assert s.info.mpp_status == "ok" and s.mpp == 0.5 and s.info.mpp_source == "override"


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_require_mpp_false_opens_a_slide_without_mpp(no_mpp_slide: Path, backend: str) -> None:
    with pytest.raises(MissingMppError, match="no µm/px metadata"):
        open_slide(no_mpp_slide, backend=backend)  # type: ignore[arg-type]
    with open_slide(no_mpp_slide, backend=backend, require_mpp=False) as s:  # type: ignore[arg-type]
        assert s.info.mpp_status == "missing" and s.info.mpp_x is None and s.info.mpp_y is None
        assert s.level_count == 2
        with pytest.raises(MissingMppError, match=r"no-mpp\.tiff has no µm/px"):
            _ = s.mpp


def test_plausible_slide_reports_ok(shared_slides: Path) -> None:
    with open_slide(shared_slides / "small.svs", require_mpp=False) as s:
        assert s.info.mpp_status == "ok" and s.info.mpp_plausible and s.info.mpp_problem is None
        assert s.mpp == pytest.approx(0.499)


# -- inspect -----------------------------------------------------------------------------------------


def test_inspect_shows_an_implausible_mpp(shared_slides: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _main(["inspect", str(shared_slides / "boxes.tiff")], capsys)
    assert code == 0, err
    assert _row(out, "dimensions") == "300 × 250 px"
    mpp = _row(out, "µm/px")
    assert "352.8" in mpp and "IMPLAUSIBLE" in mpp
    assert "--mpp" in _row(out, "run / tiles")
    assert _row(out, "physical size") == "unknown"
    assert _row(out, "levels") == "4" and "µm/px" not in _row(out, "level 1")
    code, out, err = _main(["inspect", str(shared_slides / "boxes.tiff"), "--json"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["mpp_status"] == "implausible" and data["mpp_plausible"] is False and data["mpp"] is None
    assert data["mpp_x"] == pytest.approx(352.78, abs=0.01) and "--mpp" in data["mpp_problem"]
    assert data["dimensions"] == [300, 250] and len(data["fingerprint"]) == 64
    # With --mpp the slide is shown as usable.
    code, out, err = _main(["inspect", str(shared_slides / "boxes.tiff"), "--mpp", "0.5"], capsys)
    assert code == 0, err
    assert _row(out, "µm/px") == "0.5000 × 0.5000 (override)" and "run / tiles" not in out


def test_inspect_shows_a_plausible_mpp_normally(
    shared_slides: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _main(["inspect", str(shared_slides / "small.svs")], capsys)
    assert code == 0, err
    assert _row(out, "µm/px") == "0.4990 × 0.4990 (metadata)"
    assert "IMPLAUSIBLE" not in out and "run / tiles" not in out
    assert _row(out, "level 0").endswith("0.499 µm/px")
    code, out, err = _main(["inspect", str(shared_slides / "small.svs"), "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["mpp_status"] == "ok" and data["mpp_plausible"] is True
    assert data["mpp"] == pytest.approx(0.499) and data["mpp_problem"] is None


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_inspect_shows_a_missing_mpp(
    no_mpp_slide: Path, backend: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _main(["inspect", str(no_mpp_slide), "--backend", backend], capsys)
    assert code == 0, err
    assert "MISSING" in _row(out, "µm/px") and "--mpp" in _row(out, "run / tiles")
    assert _row(out, "dimensions") == "512 × 512 px" and _row(out, "levels") == "2"
    code, out, err = _main(["inspect", str(no_mpp_slide), "--backend", backend, "--json"], capsys)
    data = json.loads(out)
    assert code == 0 and data["mpp_status"] == "missing" and data["mpp_plausible"] is False
    assert data["mpp"] is None and data["mpp_x"] is None and "--mpp" in data["mpp_problem"]


# -- run and tiles still refuse -----------------------------------------------------------------------


def test_tiles_refuses_slides_without_a_usable_mpp(
    shared_slides: Path, no_mpp_slide: Path, tmp_path: Path
) -> None:
    proc = _run("tiles", str(shared_slides / "boxes.tiff"), "-o", str(tmp_path / "a"))
    _assert_one_line_error(proc, "boxes.tiff", "352.8 µm/px", "--mpp")
    proc = _run("tiles", str(no_mpp_slide), "-o", str(tmp_path / "b"))
    _assert_one_line_error(proc, "no-mpp.tiff", "no µm/px", "--mpp")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.slow
def test_run_refuses_an_implausible_mpp(shared_slides: Path, tmp_path: Path) -> None:
    proc = _run("run", str(shared_slides / "boxes.tiff"), "-o", str(tmp_path / "out"))
    _assert_one_line_error(proc, "boxes.tiff", "352.8 µm/px", "--mpp")
