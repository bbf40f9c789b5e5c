"""Model architectures, bundles (safetensors + JSON) and their registries."""

from wsi_screen.models.bundle import BundleConfig, ModelBundle, load_bundle, save_bundle
from wsi_screen.models.registry import (
    create_model,
    list_architectures,
    list_bundles,
    register_architecture,
)

__all__ = [
    "BundleConfig",
    "ModelBundle",
    "create_model",
    "list_architectures",
    "list_bundles",
    "load_bundle",
    "register_architecture",
    "save_bundle",
]
