"""The loaded models of a run, and what the rest of the pipeline reads from them.

:class:`Models` is the one place that says what the models decide for a slide: the grid µm/px and
the crop size (the classifier's), each model's Reinhard target, and the class spec.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from wsi_screen.config import Settings
from wsi_screen.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from wsi_screen.classify import CellClassifier
    from wsi_screen.localize import Localizer
    from wsi_screen.stain import ReinhardStats

__all__ = ["FALLBACK_FLAG_SCORE", "ClassSpec", "Models", "load_models", "resolve_flag_threshold"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClassSpec:
    """The classifier's classes: ``names`` (the columns of ``probs``) and the ``abnormal`` ones
    (summed into a cell's score)."""

    names: tuple[str, ...]
    abnormal: tuple[str, ...]


@dataclass
class Models:
    """The loaded localization and classification models, and the device they run on.

    The classifier decides the slide's tile grid and crops: :attr:`grid_mpp`, :attr:`crop_size`,
    :attr:`stain_target` (the crops' Reinhard target) and :attr:`class_spec` come from its bundles,
    which must agree on them (an ensemble); the localizer's input gets its own bundle's target
    (:attr:`localizer_stain_target`) and is resampled to the localizer's µm/px inside
    :class:`~wsi_screen.localize.Localizer`.
    """

    localizer: Localizer
    classifier: CellClassifier
    device: torch.device

    def __post_init__(self) -> None:
        bundles = list(getattr(self.classifier, "bundles", []) or [])
        targets = {_target_key(b.config.stain_target) for b in bundles}
        if len(targets) > 1:
            names = ", ".join(f"{b.name} {_target_key(b.config.stain_target)}" for b in bundles)
            raise ConfigError(
                f"the classification.models ensemble disagrees on its Reinhard stain_target ({names}): "
                "ensemble bundles trained with one target"
            )

    @property
    def grid_mpp(self) -> float:
        """µm/px of the tile grid, the crops and the localizer's windows: the classifier's."""
        return float(self.classifier.mpp)

    @property
    def crop_size(self) -> int:
        """Side of the square crops in px at :attr:`grid_mpp`: the classifier's input size."""
        return int(self.classifier.input_size)

    @property
    def stain_target(self) -> ReinhardStats | None:
        """The crops' Reinhard target: the classifier bundles' ``stain_target`` (None: crops as read)."""
        bundles = getattr(self.classifier, "bundles", None) or []
        cfg = bundles[0].config.stain_target if bundles else None
        if cfg is None:
            return None
        from wsi_screen.stain import ReinhardStats

        return ReinhardStats(mu=cfg.mu, sigma=cfg.sigma)

    @property
    def localizer_stain_target(self) -> ReinhardStats | None:
        """The localizer input's Reinhard target: its own bundle's."""
        target: ReinhardStats | None = getattr(self.localizer, "stain_target", None)
        return target

    @property
    def class_spec(self) -> ClassSpec:
        """The classifier's class names and abnormal classes."""
        return ClassSpec(tuple(self.classifier.class_names), tuple(self.classifier.abnormal_classes))

    def describe(self) -> list[dict[str, Any]]:
        """Names, versions and sha256 of every model (for ``run.json`` and ``cells.zarr``)."""
        out = [
            {
                "task": "localization",
                "name": self.localizer.bundle.name,
                "version": self.localizer.bundle.config.version,
                "sha256": self.localizer.bundle.sha256,
            }
        ]
        out += [
            {
                "task": "classification",
                "name": b.name,
                "version": b.config.version,
                "sha256": b.identity_sha256,
            }
            for b in self.classifier.bundles
        ]
        return out


#: The export threshold when neither the settings nor the classifier bundle name one.
FALLBACK_FLAG_SCORE = 0.5


def resolve_flag_threshold(settings: Settings, classifier: Any = None) -> Settings:
    """Settings whose ``output.flag_min_score`` is a number: the setting when given, else the first
    classifier bundle's ``thresholds.flag_score`` (chosen on its validation data), else 0.5.

    ``classifier``: the loaded :class:`~wsi_screen.classify.CellClassifier`; None reads the first
    bundle of ``classification.models`` (a batch resolves before hashing its settings, so that a
    result's recorded settings and the batch's resume key agree).
    """
    if settings.output.flag_min_score is not None:
        return settings
    if classifier is None:
        from wsi_screen.models.bundle import load_bundle

        bundles = [load_bundle(settings.classification.models[0], task="classification")]
    else:
        bundles = getattr(classifier, "bundles", None) or []
    value = FALLBACK_FLAG_SCORE
    if bundles:
        value = float(bundles[0].config.thresholds.get("flag_score", FALLBACK_FLAG_SCORE))
    return settings.with_overrides({"output.flag_min_score": value})


def load_models(settings: Settings, *, device: torch.device | None = None) -> Models:
    """Load the bundles named in ``settings`` onto the device (``runtime.device``)."""
    from wsi_screen.classify import CellClassifier
    from wsi_screen.localize import Localizer
    from wsi_screen.models.bundle import load_bundle
    from wsi_screen.runtime import configure_torch, limit_heap_growth, resolve_device

    limit_heap_growth()
    configure_torch(threads=settings.runtime.torch_threads)
    dev = device if device is not None else resolve_device(settings.runtime.device)
    loc_bundle = load_bundle(settings.localization.model, task="localization")
    cls_bundles = [load_bundle(m, task="classification") for m in settings.classification.models]
    settings.operating_point.check_models(  # a calibrated preset holds for its models only
        [{"task": "localization", "name": loc_bundle.name, "sha256": loc_bundle.sha256}]
        + [{"task": "classification", "name": b.name, "sha256": b.identity_sha256} for b in cls_bundles]
    )
    bf16 = settings.runtime.cpu_bf16
    localizer = Localizer(loc_bundle, settings=settings.localization, device=dev, cpu_bf16=bf16)
    classifier = CellClassifier(
        cls_bundles,
        device=dev,
        batch_size=settings.classification.batch_size,
        cpu_bf16=bf16,
        tta=settings.classification.tta,
    )
    if classifier.needs_mask:
        for b in cls_bundles:
            trained_with = _mask_localizers(b.config.training.get("data", {}))
            if trained_with and loc_bundle.name not in trained_with:
                logger.warning(
                    "%s was trained on nucleus masks of %s, but this run localizes with %s: its mask "
                    "channel may differ from what it learned",
                    b.name,
                    " / ".join(sorted(trained_with)),
                    loc_bundle.name,
                )
    logger.info(
        "models on %s: localization %s, classification %s",
        dev,
        loc_bundle.name,
        " + ".join(classifier.names),
    )
    return Models(localizer=localizer, classifier=classifier, device=dev)


def _mask_localizers(data: Any) -> set[str]:
    """Names of the localization bundles that made a training set's crops (``training.data``)."""
    if not isinstance(data, Mapping):
        return set()
    found = set()
    loc = data.get("localization")
    if isinstance(loc, Mapping) and isinstance(loc.get("name"), str):
        found.add(str(loc["name"]))
    for part in data.get("parts", []) or []:
        found |= _mask_localizers(part)
    return found


def _target_key(target: Any) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    return None if target is None else (tuple(target.mu), tuple(target.sigma))
