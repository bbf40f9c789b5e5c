"""PLACEHOLDER (replaced by the batch branch's module at merge)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

CELLS_ZARR = "cells.zarr"
SUMMARY_JSON = "summary.json"
RUN_JSON = "run.json"
FLAGGED_GEOJSON = "flagged.geojson"
REPORT_HTML = "report.html"
QC_REGIONS_PNG = "qc_regions.png"


def temp_dir(out_root: Path, slide_id: str) -> Path:
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".{slide_id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, final: Path) -> None:
    old: Path | None = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
