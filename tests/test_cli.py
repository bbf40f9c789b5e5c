"""The command line: bad input gets one line and a non-zero exit; --debug shows the traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

WSI = [sys.executable, "-m", "wsi_screen"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="120")
    return subprocess.run([*WSI, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], fragment: str, code: int = 1) -> None:
    assert proc.returncode == code, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1, proc.stderr
    assert fragment in errors[0]
    assert "Traceback" not in proc.stderr


def test_version_and_help() -> None:
    proc = run("--version")
    assert proc.returncode == 0
    assert "wsi-screen, version" in proc.stdout
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("run", "demo", "inspect", "tiles", "synth", "export"):
        assert command in proc.stdout


def test_missing_slide(tmp_path: Path) -> None:
    assert_one_line_error(run("inspect", str(tmp_path / "nope.svs")), "slide not found")


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("broken.svs", "not a whole-slide image"),
        ("unreadable.svs", "corrupt tile data"),
        ("unopenable.tiff", "unsupported"),
    ],
)
def test_bad_real_files(shared_slides: Path, name: str, fragment: str) -> None:
    # boxes.tiff (implausible µm/px): inspect shows it, run/tiles refuse it (tests/test_inspect_mpp.py).
    assert_one_line_error(run("inspect", str(shared_slides / name)), fragment)


def test_debug_shows_traceback(shared_slides: Path) -> None:
    proc = run("inspect", str(shared_slides / "broken.svs"), "--debug")
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr
    assert "UnsupportedSlideError" in proc.stderr


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    proc = run("inspect")
    assert proc.returncode == 2
    proc = run("synth", str(tmp_path / "x.tiff"), "--abnormal", "HSIL=abc")
    assert proc.returncode == 2
    assert "HSIL=abc" in proc.stderr
    proc = run("synth", str(tmp_path / "x.tiff"), "--size", "12xx")
    assert proc.returncode == 2


def test_bad_override_is_one_line(tmp_path: Path) -> None:
    assert_one_line_error(run("config", "show", "--set", "triage.nope=1"), "unknown setting 'triage.nope'")


def test_inspect_json_and_table(shared_slides: Path) -> None:
    proc = run("inspect", str(shared_slides / "cmu-1-small-region.svs"), "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["dimensions"] == [2220, 2967]
    assert info["mpp"] == pytest.approx(0.499)
    assert info["vendor"] == "aperio"
    assert len(info["fingerprint"]) == 64
    proc = run("inspect", str(shared_slides / "cmu-1-small-region.svs"), "--backend", "tiffslide")
    assert proc.returncode == 0
    assert "aperio" in proc.stdout and "0.4990" in proc.stdout


def test_synth_then_tiles(tmp_path: Path) -> None:
    slide = tmp_path / "s.svs"
    proc = run("synth", str(slide), "--size", "3072", "--abnormal", "HSIL=2", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    assert slide.is_file() and (tmp_path / "s.truth.json").is_file()
    info = json.loads(run("inspect", str(slide), "--json").stdout)
    assert info["vendor"] == "aperio" and info["mpp"] == pytest.approx(0.25)
    out = tmp_path / "tiles"
    proc = run("tiles", str(slide), "-o", str(out), "-q")
    assert proc.returncode == 0, proc.stderr
    assert {p.name for p in out.iterdir()} == {"mask.png", "qc.png", "tiles.csv", "tiles.json"}
    summary = json.loads((out / "tiles.json").read_text())
    assert summary["grid"]["n_tiles"] == 9
    assert 0 < summary["grid"]["n_kept"] <= 9
    rows = (out / "tiles.csv").read_text().splitlines()
    assert len(rows) == 10


def test_library_errors_get_the_commands_flag() -> None:
    """Library messages name settings keys and parameters; the CLI adds the flag of the command."""
    from wsi_screen.cli.main import _register, command_path
    from wsi_screen.cli.options import COMMAND_FLAGS, flags_for, name_flags

    _register()
    assert command_path(["-q", "train", "classifier", "--data", "d", "train"]) == "train classifier"
    assert command_path(["run", "run", "-o", "out"]) == "run"
    assert command_path(["--debug", "calibrate", "out", "--diagnoses", "d.csv"]) == "calibrate"
    assert command_path(["no-such-command"]) == ""
    assert flags_for("no-such-command") == {}
    run_flags = flags_for("run")
    assert name_flags("preset lbc: invalid slide.mpp = 100: too large", run_flags) == (
        "preset lbc: invalid slide.mpp (--mpp) = 100: too large"
    )
    # Quoted keys keep their quotes; only the first mention gets the flag; longer names are not keys.
    assert name_flags("unknown setting 'slide.mpp'; slide.mpp again", run_flags) == (
        "unknown setting 'slide.mpp' (--mpp); slide.mpp again"
    )
    for text in ("slide.mpp_x", "slide.mpp.y", "--slide.mpp", "my_slide.mpp", "a runtime.devices b"):
        assert name_flags(text, run_flags) == text
    # The crop commands' --mpp is the crops' µm/px: slide.mpp is --slide-mpp there.
    assert name_flags("slide.mpp = 0", flags_for("train classifier")) == "slide.mpp (--slide-mpp) = 0"
    # Every flag named is one the command has.
    from wsi_screen.cli.main import cli

    for path, flags in COMMAND_FLAGS.items():
        command = cli
        for word in path.split():
            command = command.commands[word]  # type: ignore[attr-defined]
        opts = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for flag in flags.values():
            assert flag.split()[0] in opts, (path, flag)


def test_device_error_names_setting_and_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    from wsi_screen.cli.main import main
    from wsi_screen.runtime import DeviceError, resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(DeviceError, match=r"^runtime\.device = 'cuda': no CUDA GPU is available here"):
        resolve_device("cuda")
    with pytest.raises(DeviceError, match=r"^device = 'cuda:1': no CUDA GPU"):
        resolve_device("cuda:1", setting="device")
    with pytest.raises(SystemExit) as info:
        main(["localize", str(tmp_path / "s.svs"), "-o", str(tmp_path / "out"), "--device", "cuda"])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert "wsi-screen: error: runtime.device (--device) = 'cuda': no CUDA GPU is available here" in err
