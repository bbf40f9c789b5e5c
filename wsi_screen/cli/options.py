"""Reusable click options and helpers shared by the sub-commands."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

__all__ = [
    "COMMAND_FLAGS",
    "config_options",
    "flags_for",
    "name_flags",
    "settings_from_options",
    "slide_options",
]

# -- the flags of the settings and parameters that library messages name --------------------------------
# Library errors name what to change as the library knows it: a dotted settings key (``slide.mpp``) or a
# function's parameter (``val_fraction``). Where the CLI shows such an error it adds the flag of the
# command that sets it (:func:`name_flags`): ``slide.mpp = 400: ...`` → ``slide.mpp (--mpp) = 400: ...``.

#: ``--backend`` and ``--mpp`` (:func:`slide_options`).
SLIDE_FLAGS: dict[str, str] = {"slide.backend": "--backend", "slide.mpp": "--mpp"}
#: The screening flags of ``run``, ``batch`` and ``demo`` (``cli.run.screening_overrides``).
SCREENING_FLAGS: dict[str, str] = {
    "classification.models": "--model",
    "localization.model": "--localizer",
    "runtime.device": "--device",
    "classification.batch_size": "--batch-size",
    "reading.workers": "--workers",
    "output.flag_min_score": "--min-score",
}
#: The crop commands' (``evaluate``, ``train classifier``) flags for the parameters of
#: :func:`wsi_screen.train.data.collect_crops` (their ``--mpp`` is the crops' µm/px; the slides' is
#: ``--slide-mpp``) and of the evaluation and training functions.
_CROP_FLAGS: dict[str, str] = {
    "slide.mpp": "--slide-mpp",
    "localization.model": "--localizer",
    "device": "--device",
    "class_map": "--class-map",
    "annotations": "--annotations",
    "synthetic": "--synthetic",
    "data": "--data",
    "mpp": "--mpp",
    "slides_dir": "--slides",
    "ignore": "--ignore",
}
#: Per command (its path after ``wsi-screen``): the key → flag pairs :func:`name_flags` applies.
COMMAND_FLAGS: dict[str, dict[str, str]] = {
    "run": SLIDE_FLAGS | SCREENING_FLAGS,
    "batch": SLIDE_FLAGS | SCREENING_FLAGS | {"resources=None": "--resource none"},
    "demo": dict(SCREENING_FLAGS),
    "inspect": dict(SLIDE_FLAGS),
    "tiles": dict(SLIDE_FLAGS),
    "localize": SLIDE_FLAGS | {"localization.model": "--model", "runtime.device": "--device"},
    "calibrate": {
        "allow_unmatched": "--allow-unmatched",
        "min_lower_bound": "--min-lower-bound",
        "high_grade": "--high-grade",
    },
    "evaluate": dict(_CROP_FLAGS),
    "train classifier": _CROP_FLAGS
    | {
        "mask_channel": "--mask-channel",
        "target_mpp": "--model-mpp",
        "size": "--input-size",
        "val_fraction": "--val-fraction",
        "test_fraction": "--test-fraction",
        "init": "--init",
        "resume": "--resume",
        "work_dir": "--work-dir",
    },
    "train unet": {"device": "--device"},
    "train ssl": _CROP_FLAGS | {"target_mpp": "--model-mpp", "size": "--input-size", "resume": "--resume"},
}


def flags_for(command: str) -> dict[str, str]:
    """The key → flag pairs of one command (``"train classifier"``); empty for a command without any."""
    return dict(COMMAND_FLAGS.get(command, {}))


def name_flags(message: str, flags: Mapping[str, str]) -> str:
    """``message`` with the flag added after the first mention of each key it names.

    A mention is the key as a whole word (not part of a longer name, dotted key or flag), optionally
    quoted; the flag goes after the closing quote: ``unknown setting 'slide.mpp'`` →
    ``unknown setting 'slide.mpp' (--mpp)``.
    """
    for key, flag in flags.items():
        pattern = re.compile(r"(?<![\w.\-])(['\"`]?)" + re.escape(key) + r"\1(?![\w\-]|\.\w)")
        found = pattern.search(message)
        if found is not None:
            message = f"{message[: found.end()]} ({flag}){message[found.end() :]}"
    return message


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
