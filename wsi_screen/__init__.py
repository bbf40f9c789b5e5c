"""wsi-screen: whole-slide screening of cervical cytology.

Importing the package is cheap: it touches neither the disk, the network nor torch. The front door
is imported on first use::

    import wsi_screen

    result = wsi_screen.screen("slide.svs")          # nothing written; ``out=`` writes OUT/<slide-id>/
    print(len(result.cells), result.summary["triage"])

also ``open_slide`` (a slide reader), ``load_settings`` (presets, YAML, dotted overrides) and
``load_bundle`` (a shipped or trained model bundle).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from wsi_screen.api import ScreenResult, screen
    from wsi_screen.config import load_settings
    from wsi_screen.models.bundle import load_bundle
    from wsi_screen.slide import open_slide

#: Public name → the module that defines it (imported when the name is first used).
_LAZY = {
    "screen": "wsi_screen.api",
    "ScreenResult": "wsi_screen.api",
    "open_slide": "wsi_screen.slide",
    "load_settings": "wsi_screen.config",
    "load_bundle": "wsi_screen.models.bundle",
}

__all__ = ["ScreenResult", "__version__", "load_bundle", "load_settings", "open_slide", "screen"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'wsi_screen' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
