"""Registries of model architectures (timm-style) and of the bundles shipped in the package.

>>> @register_architecture("my-net")
... def my_net(*, num_classes: int, in_chans: int = 3, **kwargs) -> nn.Module: ...
>>> model = create_model("my-net", num_classes=5)
>>> model = create_model("resnet50", num_classes=5)        # any timm model name
>>> model = create_model("timm:efficientnet_b0", num_classes=5)

Architectures never download weights: timm models are created with ``pretrained=False``.
"""

from __future__ import annotations

import importlib
import importlib.resources
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from wsi_screen.errors import BundleError

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "bundle_dir",
    "create_model",
    "is_architecture",
    "list_architectures",
    "list_bundles",
    "register_architecture",
]

ModelFactory = Callable[..., "nn.Module"]
F = TypeVar("F", bound=ModelFactory)

_ARCHITECTURES: dict[str, ModelFactory] = {}
#: modules that register architectures when imported (imported lazily, on first use)
_ARCH_MODULES = ("wsi_screen.models.unet", "wsi_screen.models.runicnet")
_loaded = False


def register_architecture(name: str) -> Callable[[F], F]:
    """Decorator registering a factory ``f(*, num_classes, in_chans, **kwargs) -> nn.Module``."""

    def deco(factory: F) -> F:
        if name in _ARCHITECTURES and _ARCHITECTURES[name] is not factory:
            raise ValueError(f"architecture {name!r} is already registered")
        _ARCHITECTURES[name] = factory
        return factory

    return deco


def _load_builtin() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _ARCH_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # a real missing dependency, not an absent optional module
                raise


def list_architectures() -> list[str]:
    """Registered architecture names (timm names are accepted too, see :func:`create_model`)."""
    _load_builtin()
    return sorted(_ARCHITECTURES)


def is_architecture(name: str) -> bool:
    """Whether ``name`` is registered or a timm model name."""
    _load_builtin()
    if name in _ARCHITECTURES:
        return True
    import timm

    return bool(timm.is_model(name.removeprefix("timm:")))


def create_model(name: str, *, num_classes: int, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Instantiate an architecture by registered name or timm name (never downloads weights)."""
    _load_builtin()
    if name in _ARCHITECTURES:
        return _ARCHITECTURES[name](num_classes=num_classes, in_chans=in_chans, **kwargs)
    import timm

    timm_name = name.removeprefix("timm:")
    if not timm.is_model(timm_name):
        raise BundleError(
            f"unknown architecture {name!r}: not registered ({', '.join(sorted(_ARCHITECTURES))}) "
            "and not a timm model name"
        )
    kwargs.pop("pretrained", None)
    return timm.create_model(
        timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs
    )


def _bundles_root() -> Path:
    return Path(str(importlib.resources.files("wsi_screen.models") / "bundles"))


def list_bundles() -> list[str]:
    """Names of the bundles shipped inside the package."""
    root = _bundles_root()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "bundle.json").is_file())


def bundle_dir(name: str) -> Path | None:
    """Folder of a shipped bundle, or None."""
    path = _bundles_root() / name
    return path if (path / "bundle.json").is_file() else None
