"""The demo slide screened by ``wsi-screen demo`` and by ``wsi-screen batch`` gives the recorded outputs.

The records (tests/golden/demo/run and batch, written by tests/golden/make_golden.py) hold what a
reorganization of the code must not change: the arrays of cells.zarr, the GeoJSON, summary.json and
run.json (apart from timings, versions, timestamps and host) and the batch row; ``run`` and
``batch`` each have their own record (their run.json differ). How a run is compared with a record, and why
the tolerances are what they are: tests/golden_outputs.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from golden_outputs import GOLDEN, collect, compare, load

from wsi_screen.cli import commands  # noqa: F401  (registers the sub-commands)
from wsi_screen.cli.main import cli

pytestmark = pytest.mark.slow


def screen_demo_twice(tmp: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Records of ``wsi-screen demo`` (default options) and of ``wsi-screen batch`` on its slide."""
    runner = CliRunner()
    demo = runner.invoke(cli, ["-q", "demo", "-o", str(tmp / "demo")])
    if demo.exit_code != 0:
        raise RuntimeError(f"demo failed: {demo.output}") from demo.exception
    slides = tmp / "slides"
    slides.mkdir()
    shutil.copy(tmp / "demo" / "demo-slide.tiff", slides / "demo-slide.tiff")
    batch = runner.invoke(cli, ["-q", "batch", str(slides), "-o", str(tmp / "batch")])
    if batch.exit_code != 0:
        raise RuntimeError(f"batch failed: {batch.output}") from batch.exception
    run_record = collect(tmp / "demo" / "demo-slide")
    batch_record = collect(tmp / "batch" / "demo-slide", tmp / "batch" / "batch.json")
    return run_record, batch_record


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], dict[str, Any]]:
    return screen_demo_twice(tmp_path_factory.mktemp("golden"))


def test_run_gives_the_recorded_outputs(records: tuple[dict[str, Any], dict[str, Any]]) -> None:
    assert compare(records[0], load(GOLDEN / "run")) == []


def test_batch_gives_the_recorded_outputs(records: tuple[dict[str, Any], dict[str, Any]]) -> None:
    assert compare(records[1], load(GOLDEN / "batch")) == []


def test_the_comparison_sees_a_changed_cell(records: tuple[dict[str, Any], dict[str, Any]]) -> None:
    """The tolerant comparison is not blind: a cell moved by 1 px or a changed triage is reported."""
    golden = load(GOLDEN / "run")
    moved = {**records[0], "arrays": dict(records[0]["arrays"])}
    x = moved["arrays"]["cells/x"].copy()
    x[0] += 1.0
    moved["arrays"]["cells/x"] = x
    assert any("cells" in d for d in compare(moved, golden))
    other = {**records[0], "summary": {**records[0]["summary"], "triage": "negative"}}
    assert any("summary.triage" in d for d in compare(other, golden))
