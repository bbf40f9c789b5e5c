"""``pipelines/benchmark.py --quick`` runs every part and produces every figure (not their values)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from pipeline_scripts import load_pipeline


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_quick_benchmark_produces_every_figure(tmp_path: Path) -> None:
    bench = load_pipeline("benchmark", module_name="wsi_benchmark")
    out = tmp_path / "bench"
    report = bench.main(
        [
            "--quick",
            "--out",
            str(out),
            "--no-report",
            "--profile",
            "--wsinfer-python",
            str(tmp_path / "no-such-python"),
        ]
    )
    on_disk = json.loads((out / "benchmark.json").read_text())
    assert on_disk["schema_version"] == bench.SCHEMA_VERSION == report["schema_version"]
    for section, keys in bench.REQUIRED.items():
        assert section in on_disk, section
        for key in keys:
            assert key in on_disk[section], f"{section}.{key}"

    hw = on_disk["hardware"]
    assert hw["cpu"] and hw["cores"] >= 1
    for pkg in ("python", "torch", "openslide", "tiffslide", "imagecodecs"):
        assert hw["versions"][pkg], pkg
    if hw["gpu"] is None:
        assert "could not be measured" in on_disk["gpu_note"]

    raw = on_disk["raw_decode"]
    assert raw["tiles"] > 0 and _positive(raw["mp_per_s"])
    dd = on_disk["device_decode"]
    assert dd["tiles"] == raw["tiles"] and _positive(dd["mp_per_s"])
    assert set(on_disk["readers"]) == {"direct", "direct-windows", "openslide", "tiffslide"}
    for variant, r in on_disk["readers"].items():
        for key in ("mp_per_s", "window_mp_per_s", "ratio_to_raw"):
            assert _positive(r[key]), f"{variant}.{key}"
    for variant in ("direct", "direct-windows"):
        direct = on_disk["readers"][variant]
        assert direct["direct"] is True
        assert direct["assembled_windows"] is (variant == "direct-windows")
        assert direct["decodes"] == raw["tiles"]  # halos overlap, yet every tile is decoded once

    st = on_disk["stages"]
    assert _positive(st["read"]["mp_per_s"])
    assert _positive(st["assemble"]["tiles_per_s"]) and _positive(st["assemble"]["stack_assembled_windows_s"])
    assert _positive(st["normalize"]["tiles_per_s"])
    assert _positive(st["localize"]["tiles_per_s"]) and _positive(st["localize"]["unet_tiles_per_s"])
    assert _positive(st["crop"]["cut_only_crops_per_s"])
    assert _positive(st["classify"]["crops_per_s"])
    assert _positive(st["write"]["cells_per_s"])
    assert _positive(st["device_stage"]["tiles_per_s"])

    e2e = on_disk["end_to_end"]
    assert _positive(e2e["seconds"]) and _positive(e2e["slides_per_hour"]) and _positive(e2e["ratio_to_raw"])
    assert e2e["tiles"] == on_disk["grid"]["kept"]
    for key in ("reader", "device", "writer"):
        assert key in e2e["stages"]
    assert e2e["stages"]["device"]["assemble_s"] > 0  # the device stage pastes the decoded tiles
    assert 0.0 <= e2e["idle"]["device_waiting_for_reader"] <= 1.0

    prof = on_disk["profile"]  # --profile: one more run under torch.profiler, its trace on disk
    assert Path(prof["trace"]).is_file() and (out / "profile" / "top_ops.txt").is_file()
    ranges = {r["name"]: r for r in prof["ranges"]}
    for stage in ("assemble", "normalize", "localize", "crop", "classify"):
        assert ranges[f"wsi_screen.{stage}"]["calls"] >= 1, stage
    assert prof["top_ops"] and all(r["self_cpu_ms"] >= 0 for r in prof["top_ops"])
    if hw["gpu"] is None:  # reading.jpeg_decoder auto: the reader threads off CUDA
        assert on_disk["settings"]["jpeg_decoder"] == "cpu (reader threads)"

    peer = on_disk["peer"]
    assert peer["status"] == "unavailable" and "setup_wsinfer_peer.sh" in peer["reason"]

    table = (out / "benchmark.md").read_text()
    for figure in ("raw JPEG decode", "direct TIFF path", "classify", "end to end", "WSInfer"):
        assert figure in table, figure
