"""The result folder of one slide, ``OUT/<slide-id>/``: its file names, how it is written, when it is whole.

A result is written into a hidden sibling ``OUT/.<slide-id>.tmp-<pid>-<hex8>`` (:func:`atomic_dir`)
and published by an atomic rename (:func:`publish`); an older result is first moved aside to
``OUT/.<slide-id>.old-<hex8>`` and deleted after. So ``OUT/<slide-id>/`` is either absent, an old
result or a new one, never half written. :data:`TEMP_RE` recognises both temporary names, so a later
run can remove those a killed process left. :func:`result_complete` says whether a folder holds every
file of a finished result. The files themselves are described in ``docs/outputs.md``.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "CELLS",
    "FLAGGED",
    "FLAGGED_GZ",
    "QC_REGIONS",
    "REPORT",
    "RUN",
    "SUMMARY",
    "TEMP_RE",
    "atomic_dir",
    "publish",
    "result_complete",
    "store_complete",
]

CELLS = "cells.zarr"  #: every cell and the tile grid (:mod:`wsi_screen.store`)
SUMMARY = "summary.json"  #: triage, score, adequacy, QC (:mod:`wsi_screen.summary`)
RUN = "run.json"  #: provenance: slide, arguments, settings, models, timings
FLAGGED = "flagged.geojson"  #: flagged cells for QuPath ...
FLAGGED_GZ = "flagged.geojson.gz"  #: ... or the same, gzipped (``output.geojson_gzip``)
REPORT = "report.html"  #: the self-contained report (``output.report``)
QC_REGIONS = "qc_regions.png"  #: the cell-region mask over the thumbnail

#: ``.<slide-id>.tmp-<pid>-<hex8>`` (being written by process ``pid``) or ``.<slide-id>.old-<hex8>``
#: (a result being replaced); groups ``sid`` and ``pid`` (None for ``old``).
TEMP_RE = re.compile(r"^\.(?P<sid>.+)\.(?:tmp-(?P<pid>\d+)-[0-9a-f]{8}|old-[0-9a-f]{8})$")


def atomic_dir(out_root: Path, slide_id: str) -> Path:
    """Create and return the temporary folder ``out_root/.<slide_id>.tmp-<pid>-<hex8>``."""
    out_root.mkdir(parents=True, exist_ok=True)
    tmp = out_root / f".{slide_id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def publish(tmp: Path, final: Path) -> None:
    """Rename the finished temp dir into place, replacing an older result."""
    old: Path | None = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def store_complete(path: Path) -> bool:
    """Whether ``path`` is a ``cells.zarr`` its writer closed (root attribute ``complete``)."""
    from wsi_screen.store import read_attrs

    try:
        attrs = read_attrs(path, allow_incomplete=True)
    except (OSError, ValueError):  # StoreError is an OSError: missing, not a group, newer schema
        return False
    return attrs.get("complete") is True


def result_complete(folder: Path, run: Mapping[str, Any]) -> bool:
    """Whether ``folder`` holds every file of a finished result; ``run`` is its ``run.json``.

    The report is required unless ``run``'s settings turned it off (``output.report``).
    """
    if not (folder / SUMMARY).is_file():
        return False
    if not ((folder / FLAGGED).is_file() or (folder / FLAGGED_GZ).is_file()):
        return False
    config = run.get("config")
    wants_report = not isinstance(config, dict) or config.get("output", {}).get("report", True)
    if wants_report and not (folder / REPORT).is_file():
        return False
    return store_complete(folder / CELLS)
