"""Model bundles: weights in safetensors plus a validated JSON config.

A bundle is a folder::

    my-bundle/
      bundle.json          # BundleConfig: architecture, classes, µm/px, normalization, metrics, sha256
      model.safetensors    # the weights (never a pickle)

``load_bundle`` accepts a shipped bundle's name (see :func:`wsi_screen.models.registry.list_bundles`)
or a path, validates the JSON, checks the weights' sha256, and never unpickles anything. Every
problem is a :class:`~wsi_screen.errors.BundleError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from wsi_screen.errors import BundleError, BundleNotFoundError

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = [
    "BUNDLE_FORMAT",
    "BundleConfig",
    "InputRepresentation",
    "ModelBundle",
    "load_bundle",
    "save_bundle",
    "sha256_file",
]

BUNDLE_FORMAT = 1
CONFIG_NAME = "bundle.json"
WEIGHTS_NAME = "model.safetensors"

#: How tiles/crops become model input, every representation the code supports: ``rgb`` and ``od_gray``
#: for localizers (:data:`wsi_screen.localize.REPRESENTATIONS`), ``rgb`` and ``rgb+mask`` for
#: classifiers (:data:`wsi_screen.classify.REPRESENTATIONS`); each stage refuses the others.
InputRepresentation = Literal["rgb", "od_gray", "rgb+mask"]


class StainTarget(BaseModel):
    """Reinhard target statistics in Ruderman lαβ (see :mod:`wsi_screen.stain`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    mu: tuple[float, float, float]
    sigma: tuple[float, float, float]

    @model_validator(mode="after")
    def _positive(self) -> StainTarget:
        if any(s <= 0 for s in self.sigma):
            raise ValueError(f"sigma must be positive, got {self.sigma}")
        return self


class BundleConfig(BaseModel):
    """Everything needed to run a model exactly as it was trained."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())

    format_version: int = BUNDLE_FORMAT
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = "1"
    task: Literal["localization", "classification"]
    description: str = ""
    architecture: str = Field(min_length=1, description="registered name or any timm model name")
    arch_kwargs: dict[str, Any] = Field(default_factory=dict)
    in_channels: int = Field(3, ge=1, le=16)
    input_representation: InputRepresentation = Field(
        "rgb",
        description="how tiles/crops become model input: rgb, od_gray (localizers), rgb+mask (classifiers)",
    )
    input_size: int = Field(224, ge=8, le=8192, description="crop side (classifier) in px")
    mpp: float = Field(gt=0.02, lt=50.0, description="µm/px the model works at")
    mean: list[float] = Field(default_factory=lambda: [0.5, 0.5, 0.5])
    std: list[float] = Field(default_factory=lambda: [0.25, 0.25, 0.25])
    class_names: list[str] = Field(min_length=1)
    abnormal_classes: list[str] = Field(default_factory=list)
    stain_target: StainTarget | None = None
    thresholds: dict[str, float] = Field(default_factory=dict)
    inference: dict[str, Any] = Field(
        default_factory=dict, description="model-specific inference parameters (e.g. context_um)"
    )
    extra_features: list[str] = Field(default_factory=list, description="morphometric inputs")
    training: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    intended_use: str = ""
    limitations: str = ""
    sha256: str = Field("", description="sha256 of the weights file")

    @model_validator(mode="after")
    def _consistent(self) -> BundleConfig:
        if self.format_version > BUNDLE_FORMAT:
            raise ValueError(
                f"bundle format {self.format_version} is newer than this wsi-screen "
                f"understands ({BUNDLE_FORMAT}); upgrade wsi-screen"
            )
        unknown = [c for c in self.abnormal_classes if c not in self.class_names]
        if unknown:
            raise ValueError(f"abnormal_classes {unknown} are not in class_names {self.class_names}")
        if len(set(self.class_names)) != len(self.class_names):
            raise ValueError(f"class_names has duplicates: {self.class_names}")
        if len(self.mean) != len(self.std):
            raise ValueError("mean and std must have the same length")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std must be positive, got {self.std}")
        return self


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class ModelBundle:
    """A loaded (validated) bundle; weights are read lazily."""

    def __init__(self, path: Path, config: BundleConfig) -> None:
        self.path = path
        self.config = config

    def __repr__(self) -> str:
        return f"ModelBundle({self.config.name!r}, task={self.config.task!r}, path={str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def sha256(self) -> str:
        return self.config.sha256

    @property
    def identity_sha256(self) -> str:
        """The sha256 that names what the model computes (``run.json``, ``cells.zarr``, operating
        points): the weights' sha256, or for a bundle with a score head (``inference.score_head``)
        the sha256 of the weights' sha256 followed by the head's canonical JSON, since the same
        weights with another head give other scores."""
        head = self.config.inference.get("score_head")
        if head is None:
            return self.sha256
        text = self.sha256 + json.dumps(head, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    @property
    def weights_path(self) -> Path:
        return self.path / WEIGHTS_NAME

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The weights as float32 tensors on the CPU (safetensors: no code is executed)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.weights_path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise BundleError(
                f"bundle {self.name}: cannot read {WEIGHTS_NAME} ({' '.join(str(exc).split())})"
            ) from exc
        return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}

    def build_model(self, *, device: str | torch.device = "cpu") -> nn.Module:
        """Instantiate the architecture, load the weights (strict), eval mode, on ``device``."""
        from wsi_screen.models.registry import create_model

        cfg = self.config
        model = create_model(
            cfg.architecture,
            num_classes=len(cfg.class_names),
            in_chans=cfg.in_channels,
            **cfg.arch_kwargs,
        )
        state = self.state_dict()
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:240]
            raise BundleError(
                f"bundle {self.name}: weights do not match architecture {cfg.architecture} ({first})"
            ) from exc
        return model.to(device).eval()

    def info(self) -> dict[str, Any]:
        """JSON view (``wsi-screen models info``)."""
        data = self.config.model_dump(mode="json")
        data["path"] = str(self.path)
        return data


def _resolve(name_or_path: str | os.PathLike[str]) -> Path:
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if p.is_file() and p.name == CONFIG_NAME:
        return p.parent
    text = str(name_or_path)
    if os.sep not in text and "/" not in text:
        from wsi_screen.models.registry import bundle_dir, list_bundles

        found = bundle_dir(text)
        if found is not None:
            return found
        raise BundleNotFoundError(
            f"no model bundle named {text!r}; shipped bundles: {', '.join(list_bundles()) or 'none'} "
            "(or give the path of a bundle folder)"
        )
    raise BundleNotFoundError(f"model bundle not found: {p} (a folder with {CONFIG_NAME})")


def load_bundle(
    name_or_path: str | os.PathLike[str],
    *,
    task: Literal["localization", "classification"] | None = None,
    verify: bool = True,
) -> ModelBundle:
    """Load and validate a bundle by shipped name or folder path.

    Args:
        name_or_path: a shipped bundle name or a bundle folder.
        task: refuse a bundle made for another task.
        verify: check the weights file against the recorded sha256.
    """
    path = _resolve(name_or_path)
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise BundleNotFoundError(f"{path} is not a model bundle: {CONFIG_NAME} is missing")
    try:
        raw = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{cfg_path}: not valid JSON ({exc})") from exc
    try:
        config = BundleConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "bundle"
        msg = err["msg"].removeprefix("Value error, ")
        raise BundleError(f"{cfg_path}: invalid {loc}: {msg}") from None
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise BundleError(f"bundle {config.name}: {WEIGHTS_NAME} is missing in {path}")
    if task is not None and config.task != task:
        raise BundleError(f"bundle {config.name} is a {config.task} model, but a {task} model is needed")
    if verify:
        actual = sha256_file(weights)
        if config.sha256 and actual != config.sha256:
            raise BundleError(
                f"bundle {config.name}: {WEIGHTS_NAME} is corrupt or was replaced "
                f"(sha256 {actual[:12]}… ≠ recorded {config.sha256[:12]}…)"
            )
    return ModelBundle(path, config)


def save_bundle(
    model: nn.Module,
    config: BundleConfig,
    out_dir: str | os.PathLike[str],
    *,
    half: bool = False,
    overwrite: bool = True,
) -> ModelBundle:
    """Write ``model``'s weights and ``config`` as a bundle folder (atomically: temp dir + rename).

    Args:
        half: store floating-point weights as float16 (halves the size; loaded back as float32).
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise BundleError(f"{out} exists; choose another output folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: (
            v.detach().to("cpu", torch.float16 if half else v.dtype)
            if v.is_floating_point()
            else v.detach().cpu()
        ).contiguous()
        for k, v in model.state_dict().items()
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"name": config.name, "format": "pt"})
        final = config.model_copy(update={"sha256": sha256_file(tmp / WEIGHTS_NAME)})
        (tmp / CONFIG_NAME).write_text(
            json.dumps(final.model_dump(mode="json"), indent=2) + "\n", encoding="utf-8"
        )
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ModelBundle(out, final)
