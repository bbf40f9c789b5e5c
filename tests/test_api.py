"""The front door: ``wsi_screen.screen`` returns the cells, summary and timings and writes nothing
unless given ``out=``; ``import wsi_screen`` stays cheap."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import wsi_screen
from wsi_screen.store import read_cells

pytestmark = pytest.mark.slow

SIZE = 2048


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from wsi_screen.synth import synthesize_slide

    path = tmp_path_factory.mktemp("api") / "api-slide.tiff"
    synthesize_slide(path, size=(SIZE, SIZE), seed=5, abnormal="HSIL=3,LSIL=2", write_truth=False)
    return path


def test_import_is_cheap_and_lazy() -> None:
    code = (
        "import sys, wsi_screen as w\n"
        "heavy = [m for m in ('torch', 'numpy', 'zarr', 'wsi_screen.api') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert {'screen', 'open_slide', 'load_settings', 'load_bundle', 'ScreenResult'} <= set(dir(w))\n"
        "assert callable(w.load_settings) and 'wsi_screen.config' in sys.modules\n"
        "assert 'torch' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = wsi_screen.nope  # type: ignore[attr-defined]


def test_screen_returns_the_cells_and_writes_nothing(
    slide: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.chdir(work)
    before = _tree(slide.parent)

    result = wsi_screen.screen(slide)

    assert _tree(slide.parent) == before
    # torch's own (empty) compile-cache folder, made when timm first imports torch._dynamo, is not ours
    assert [p for p in _tree(tmpdir) if not p.startswith("torchinductor_")] == []
    assert _tree(work) == []
    assert result.out_dir is None
    assert len(result.cells) == result.summary["n_cells"] > 0
    assert result.summary["triage"] == result.triage
    assert result.class_names == result.summary["class_names"]
    assert result.cells.probs.shape == (len(result.cells), len(result.class_names))
    assert {"tiles", "localize", "classify", "total"} <= set(result.timings)
    # level-0 px: every cell lies on the slide
    assert np.all((result.cells.x >= 0) & (result.cells.x < SIZE))
    assert np.all((result.cells.y >= 0) & (result.cells.y < SIZE))


def test_screen_with_out_writes_what_run_writes(slide: Path, tmp_path: Path) -> None:
    """``out=`` gives the result folder of ``wsi-screen run``, and its cells are the returned ones
    (the same process, models and code path on both sides: exact)."""
    from wsi_screen.cli.run import run  # noqa: F401  (the CLI's command module imports cleanly)

    in_memory = wsi_screen.screen(slide)
    written = wsi_screen.screen(slide, out=tmp_path / "out")
    assert written.out_dir == tmp_path / "out" / "api-slide"
    assert sorted(p.name for p in written.out_dir.iterdir()) == [
        "cells.zarr",
        "flagged.geojson",
        "qc_regions.png",
        "report.html",
        "run.json",
        "summary.json",
    ]
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]
    stored, _ = read_cells(written.out_dir / "cells.zarr")
    for cells in (written.cells, stored):
        np.testing.assert_array_equal(cells.x, in_memory.cells.x)
        np.testing.assert_array_equal(cells.y, in_memory.cells.y)
        np.testing.assert_array_equal(cells.probs, in_memory.cells.probs)
        np.testing.assert_array_equal(cells.outline_xy, in_memory.cells.outline_xy)
    assert written.summary["triage"] == in_memory.summary["triage"]
    assert written.summary["score"] == in_memory.summary["score"]


def test_screen_takes_presets_overrides_and_models(slide: Path) -> None:
    from wsi_screen.config import load_settings
    from wsi_screen.pipeline import load_models

    result = wsi_screen.screen(
        slide, models="cyto-synth-v1", overrides={"output.top_n": 2, "triage.min_focus": 0.0}
    )
    assert result.settings.classification.models == ["cyto-synth-v1"]
    assert result.settings.output.top_n == 2
    assert len(result.summary["top_cells"]) <= 2
    assert result.summary["versions"]["models"][1]["name"] == "cyto-synth-v1"

    settings = load_settings("lbc")
    loaded = load_models(settings)
    reused = wsi_screen.screen(slide, settings=settings, models=loaded, slide_id="other name")
    assert reused.settings.preset == "lbc"
    assert reused.slide_id == "other_name"
    assert reused.summary["versions"]["models"][1]["name"] == loaded.classifier.names[0]


def test_screen_reports_bad_input_clearly(tmp_path: Path) -> None:
    from wsi_screen.errors import ConfigError, WsiScreenError

    with pytest.raises(WsiScreenError, match=r"missing\.svs"):
        wsi_screen.screen(tmp_path / "missing.svs")
    with pytest.raises(ConfigError, match="no_such"):
        wsi_screen.screen(tmp_path / "missing.svs", overrides={"triage.no_such": 1})
    assert os.listdir(tmp_path) == []
