"""The loaded ``Models``: what the classifier decides for a slide, stated in one place."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from wsi_screen.errors import ConfigError
from wsi_screen.models.loaded import ClassSpec, Models


def _bundle(name: str, target: tuple[list[float], list[float]] | None) -> SimpleNamespace:
    stain = None if target is None else SimpleNamespace(mu=target[0], sigma=target[1])
    return SimpleNamespace(name=name, config=SimpleNamespace(stain_target=stain))


def _classifier(*bundles: SimpleNamespace) -> SimpleNamespace:
    return SimpleNamespace(
        bundles=list(bundles),
        mpp=0.25,
        input_size=224,
        class_names=["NILM", "LSIL", "HSIL"],
        abnormal_classes=["LSIL", "HSIL"],
    )


def test_models_state_grid_crops_targets_and_classes() -> None:
    target = ([8.6, -0.08, 0.01], [0.41, 0.09, 0.02])
    loc = SimpleNamespace(stain_target="localizer's own")
    m = Models(localizer=loc, classifier=_classifier(_bundle("a", target)), device=torch.device("cpu"))  # type: ignore[arg-type]
    assert m.grid_mpp == 0.25 and m.crop_size == 224
    assert m.stain_target is not None
    assert list(m.stain_target.mu) == target[0] and list(m.stain_target.sigma) == target[1]
    assert m.localizer_stain_target == "localizer's own"
    assert m.class_spec == ClassSpec(("NILM", "LSIL", "HSIL"), ("LSIL", "HSIL"))
    none = Models(localizer=loc, classifier=_classifier(_bundle("b", None)), device=torch.device("cpu"))  # type: ignore[arg-type]
    assert none.stain_target is None


def test_an_ensemble_must_agree_on_its_stain_target() -> None:
    a = _bundle("cls-a", ([8.6, -0.08, 0.01], [0.41, 0.09, 0.02]))
    b = _bundle("cls-b", ([8.2, -0.05, 0.01], [0.41, 0.09, 0.02]))
    loc = SimpleNamespace(stain_target=None)
    with pytest.raises(ConfigError, match=r"classification\.models.*cls-a.*cls-b"):
        Models(localizer=loc, classifier=_classifier(a, b), device=torch.device("cpu"))  # type: ignore[arg-type]
    same = Models(localizer=loc, classifier=_classifier(a, a), device=torch.device("cpu"))  # type: ignore[arg-type]
    assert same.stain_target is not None
