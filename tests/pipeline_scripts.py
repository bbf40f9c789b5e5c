"""Importing the scripts of ``pipelines/`` (not a package) in tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def load_pipeline(name: str, *, module_name: str | None = None) -> ModuleType:
    """``pipelines/<name>.py`` as a module (registered in ``sys.modules`` as ``module_name`` or ``name``)."""
    key = module_name or name
    spec = importlib.util.spec_from_file_location(key, PIPELINES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod
