"""What the batch modules share: the logger, the batch's own names in ``OUT``, small file helpers."""

from __future__ import annotations

import json
import logging
import os
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from wsi_screen.errors import WsiScreenError
from wsi_screen.jsonio import atomic_write_text as atomic_write

__all__ = ["FAILED_DIR", "LOCK_DIR", "MESSAGE_LIMIT", "WORKLIST_FILES", "BatchError", "atomic_write"]
__all__ += ["logger", "now", "read_json", "worker_name"]

#: One logger for the whole package (``batch.log`` lines name it), as when it was one module.
logger = logging.getLogger("wsi_screen.batch")

#: Names in ``OUT`` that belong to the batch, so no slide may take them as its id.
WORKLIST_FILES = ("batch.csv", "batch.json", "index.html", "batch.log")
LOCK_DIR = ".locks"
FAILED_DIR = ".failed"

#: Longest error message a worklist row holds.
MESSAGE_LIMIT = 500


class BatchError(WsiScreenError, ValueError):
    """The batch itself cannot run (input folder missing, output inside a slide folder, ...)."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
