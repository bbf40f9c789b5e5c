"""Reusable click options and helpers shared by the sub-commands."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["config_options", "settings_from_options", "slide_options"]


def slide_options(func: F) -> F:
    """``--backend`` and ``--mpp``."""
    func = click.option(
        "--mpp",
        type=click.FloatRange(min=0.02, max=50.0),
        default=None,
        help="Level-0 µm/px to use when the slide lacks it or states it wrongly (e.g. 0.25 for 40×).",
    )(func)
    func = click.option(
        "--backend",
        type=click.Choice(["openslide", "tiffslide"]),
        default=None,
        help="Slide reader (default: openslide; tiffslide reads TIFF-based slides only).",
    )(func)
    return func


def config_options(func: F) -> F:
    """``--preset``, ``--config`` and ``--set key=value``."""
    func = click.option(
        "--set",
        "overrides",
        multiple=True,
        metavar="KEY=VALUE",
        help="Override one setting, e.g. --set triage.confidence=0.8 (repeatable).",
    )(func)
    func = click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help="YAML file with settings (see `wsi-screen config show`).",
    )(func)
    func = click.option(
        "--preset",
        default=None,
        metavar="NAME",
        help="Settings preset: default, lbc, conventional (see configs/).",
    )(func)
    return func


def settings_from_options(
    preset: str | None,
    config_path: Path | None,
    overrides: Sequence[str],
    extra: dict[str, Any] | None = None,
) -> Any:
    """Resolve :class:`~wsi_screen.config.Settings` from the common options (later wins)."""
    from wsi_screen.config import load_settings, parse_override

    merged: dict[str, Any] = {}
    for text in overrides:
        key, value = parse_override(text)
        merged[key] = value
    for key, value in (extra or {}).items():
        if value is not None:
            merged[key] = value
    return load_settings(preset, config=config_path, overrides=merged)
