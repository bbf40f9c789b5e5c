"""Screening from Python: :func:`screen` one slide and get its cells, summary and timings.

>>> import wsi_screen
>>> result = wsi_screen.screen("slide.svs", preset="lbc", overrides={"triage.confidence": 0.8})
>>> len(result.cells), result.summary["triage"]

Nothing is written unless ``out=`` is given; then ``OUT/<slide-id>/`` is written exactly as
``wsi-screen run`` writes it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from wsi_screen.cells import CellTable
    from wsi_screen.config import Settings
    from wsi_screen.pipeline import Models
    from wsi_screen.tile_loop import ProgressCallback

__all__ = ["ScreenResult", "screen"]


@dataclass
class ScreenResult:
    """One slide screened by :func:`screen`.

    ``cells``: every cell found, once, in level-0 pixel coordinates, with its class probabilities
    (columns ``class_names``); ``summary``: the ``summary.json`` document (triage, adequacy, QC,
    top cells); ``timings``: seconds per stage; ``out_dir``: the result folder when ``out=`` was
    given, else None; ``settings``: the settings the slide was screened with.
    """

    slide_id: str
    cells: CellTable
    summary: dict[str, Any]
    timings: dict[str, Any]
    class_names: list[str]
    abnormal_classes: list[str]
    settings: Settings
    out_dir: Path | None = None

    @property
    def triage(self) -> str:
        """``priority``, ``review``, ``negative`` or ``unsatisfactory``."""
        return str(self.summary["triage"])

    def __len__(self) -> int:
        return len(self.cells)


def screen(
    path: str | os.PathLike[str],
    *,
    preset: str | None = None,
    models: Models | str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    settings: Settings | None = None,
    out: str | os.PathLike[str] | None = None,
    slide_id: str | None = None,
    progress: bool = False,
    on_tile: ProgressCallback | None = None,
) -> ScreenResult:
    """Screen the slide at ``path`` with the shipped defaults, a preset and overrides.

    Args:
        path: the slide file (or DICOM series folder).
        preset: a settings preset (``wsi-screen config presets``), default ``default``.
        models: the classifier bundle(s) by name or folder (``classification.models``), or
            :class:`~wsi_screen.pipeline.Models` already loaded (:func:`~wsi_screen.pipeline.load_models`),
            to reuse them across slides.
        overrides: settings by the dotted keys of ``--set`` (``{"triage.confidence": 0.8}``).
        settings: resolved settings instead of ``preset`` (``overrides`` still apply).
        out: an output root: ``OUT/<slide-id>/`` is written as by ``wsi-screen run``. Without it
            nothing is written, not even a temporary file.
        slide_id: the result's name (default: from the file name).
        progress: a progress bar on a terminal (log lines otherwise).
        on_tile: called with (tiles done, tiles total) after each tile.
    """
    from wsi_screen.config import load_settings
    from wsi_screen.pipeline import Models, screen_and_write, slide_id_for

    loaded: Models | None = None
    values = dict(overrides or {})
    if isinstance(models, Models):
        loaded = models
    elif isinstance(models, str):
        values["classification.models"] = [models]
    elif models is not None:
        values["classification.models"] = [str(m) for m in models]
    if settings is None:
        settings = load_settings(preset, overrides=values)
    elif values:
        settings = settings.with_overrides(values)
    result, screened = screen_and_write(
        path,
        out,
        settings=settings,
        models=loaded,
        slide_id=slide_id_for(slide_id) if slide_id else None,
        progress=progress,
        arguments={"command": "screen", "slide": str(path), "preset": preset, "set": values},
        on_tile=on_tile,
    )
    spec = screened.models.class_spec
    return ScreenResult(
        slide_id=screened.slide_id,
        cells=screened.cells,
        summary=screened.summary,
        timings={k: round(float(v), 4) for k, v in screened.timings.items()},
        class_names=list(spec.names),
        abnormal_classes=list(spec.abnormal),
        settings=screened.settings,
        out_dir=None if result is None else result.out_dir,
    )
