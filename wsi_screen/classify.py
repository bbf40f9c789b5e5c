"""Cell-centred crops cut on the device, and batched (ensemble) classification.

Crops are gathered from the normalized read windows with one advanced-indexing operation per batch
(no per-cell Python loop): a crop centred on a cell near a core edge still lies inside its window,
because the halo is at least half a crop wide (``tiling.halo_um`` ≥ crop size × µm/px / 2).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from wsi_screen.errors import BundleError
from wsi_screen.runtime import autocast_context

if TYPE_CHECKING:
    import torch

    from wsi_screen.models.bundle import ModelBundle

__all__ = ["CellClassifier", "cut_crops"]

logger = logging.getLogger(__name__)

_PAD_VALUE = 255  # crops running off a window are filled with white glass


def cut_crops(
    windows: torch.Tensor,
    tile_index: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    size: int,
    *,
    pad_value: int = _PAD_VALUE,
) -> torch.Tensor:
    """Gather ``size``×``size`` crops centred on (cx, cy) from channels-last windows.

    Args:
        windows: (B, H, W, C) tensor (uint8 or float) on any device.
        tile_index: (N,) window index of each crop.
        cx, cy: (N,) integer crop centres in window pixels (the centre pixel is ``size // 2``).
        size: crop side in pixels.

    Returns:
        (N, size, size, C) tensor on the windows' device; parts outside a window are ``pad_value``.
    """
    import torch

    if windows.ndim != 4:
        raise ValueError(f"windows must be (B, H, W, C), got shape {tuple(windows.shape)}")
    n = int(tile_index.shape[0])
    _b, h, w, c = windows.shape
    if n == 0:
        return windows.new_empty((0, size, size, c))
    half = size // 2
    dev = windows.device
    offs = torch.arange(size, device=dev) - half
    ys = cy.to(dev).long()[:, None] + offs[None, :]
    xs = cx.to(dev).long()[:, None] + offs[None, :]
    inside_any = (ys.min() >= 0) and (xs.min() >= 0) and (ys.max() < h) and (xs.max() < w)
    if bool(inside_any):
        src = windows
    else:
        src = torch.nn.functional.pad(
            windows.permute(0, 3, 1, 2), (half, half, half, half), value=float(pad_value)
        ).permute(0, 2, 3, 1)
        ys = ys + half
        xs = xs + half
    ti = tile_index.to(dev).long()
    return src[ti[:, None, None], ys[:, :, None], xs[:, None, :]]


class CellClassifier:
    """One bundle, or several whose probabilities are averaged (an ensemble)."""

    def __init__(
        self, bundles: Sequence[ModelBundle], *, device: torch.device, batch_size: int = 128
    ) -> None:
        import torch

        if not bundles:
            raise BundleError("at least one classifier bundle is needed")
        first = bundles[0].config
        for b in bundles:
            cfg = b.config
            if cfg.task != "classification":
                raise BundleError(f"bundle {cfg.name} is a {cfg.task} model, not a classifier")
            for attr in ("class_names", "input_size", "mpp"):
                if getattr(cfg, attr) != getattr(first, attr):
                    raise BundleError(
                        f"ensemble members disagree on {attr}: {first.name} has {getattr(first, attr)!r}, "
                        f"{cfg.name} has {getattr(cfg, attr)!r}"
                    )
            if cfg.in_channels != 3:
                raise BundleError(
                    f"bundle {cfg.name} expects {cfg.in_channels} input channels; "
                    "the pipeline feeds RGB crops"
                )
        self.bundles = list(bundles)
        self.device = device
        self.batch_size = int(batch_size)
        self.class_names: list[str] = list(first.class_names)
        self.abnormal_classes: list[str] = list(first.abnormal_classes)
        self.input_size = int(first.input_size)
        self.mpp = float(first.mpp)
        self._models = []
        self._norm = []
        for b in self.bundles:
            model = b.build_model(device=device)
            if device.type != "mps":
                model = model.to(memory_format=torch.channels_last)
            self._models.append(model)
            mean = torch.tensor(b.config.mean, device=device).view(1, -1, 1, 1) * 255.0
            std = torch.tensor(b.config.std, device=device).view(1, -1, 1, 1) * 255.0
            self._norm.append((mean, std))

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.bundles]

    def predict(self, crops: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N, C) float32 for uint8 channels-last crops (N, H, W, 3)."""
        import torch

        n = int(crops.shape[0])
        out = torch.zeros((n, len(self.class_names)), dtype=torch.float32, device=self.device)
        if n == 0:
            return out
        with torch.inference_mode(), autocast_context(self.device):
            for start in range(0, n, self.batch_size):
                chunk = crops[start : start + self.batch_size].to(self.device, non_blocking=True)
                x = chunk.permute(0, 3, 1, 2).float()
                if self.device.type != "mps":
                    x = x.contiguous(memory_format=torch.channels_last)
                acc = torch.zeros((x.shape[0], len(self.class_names)), device=self.device)
                for model, (mean, std) in zip(self._models, self._norm, strict=True):
                    logits = model((x - mean) / std)
                    acc += torch.softmax(logits.float(), dim=1)
                out[start : start + x.shape[0]] = acc / len(self._models)
        return out
