"""Writing JSON and text files: strict JSON (no NaN), numpy values as Python ones, atomic replace."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["atomic_write_text", "json_default", "write_json"]


def json_default(value: Any) -> Any:
    """``json.dumps(default=...)`` for numpy scalars and arrays and paths; anything else is an error."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) through a temporary sibling renamed over ``path``: a reader sees the
    old file or the new one, never half of it. Creates the parent folder."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def write_json(
    path: str | os.PathLike[str],
    data: Any,
    *,
    ensure_ascii: bool = True,
    default: Callable[[Any], Any] | None = json_default,
) -> Path:
    """Write ``data`` as indented strict JSON (NaN/Infinity are an error), atomically."""
    text = json.dumps(data, indent=2, ensure_ascii=ensure_ascii, allow_nan=False, default=default)
    return atomic_write_text(path, text + "\n")
