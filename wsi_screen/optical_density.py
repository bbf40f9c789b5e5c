"""Optical density of 8-bit brightfield RGB: the one home of the formula.

``OD = -log10(I / 255)`` per channel, with the intensity ``I`` clipped to ≥ 1 (glass at 255 is 0,
black is ``log10(255) ≈ 2.41``), averaged over R, G and B where one channel is wanted. The candidate
morphometrics (:func:`optical_density`), the localizer's ``od_gray`` input and the OD map next to
its features (:func:`optical_density_torch`) and the U-Net training stain jitter
(:func:`transmittance_od_torch`) all use it, each in float32.

Densities elsewhere differ on purpose and do not use these functions:

- :mod:`wsi_screen.tissue` measures density relative to the thumbnail's own glass colour,
  ``-log10(I / I_glass)``, since a thumbnail's glass is rarely at 255;
- :func:`wsi_screen.train.cell_slides.od` is ``-ln((I + 1) / 256)``, exactly invertible on 8 bits,
  for additive compositing of cells;
- the HED jitter of :mod:`wsi_screen.train.augment` computes the same per-channel density with a
  natural log, ``-ln(I / 255) / ln 10`` (equal up to float rounding, not bit for bit), in the
  crops' own dtype, and inverts it with ``exp``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

if TYPE_CHECKING:
    import torch

__all__ = ["optical_density", "optical_density_torch", "transmittance_od_torch"]

F32 = NDArray[np.float32]


def optical_density(rgb: NDArray[np.generic]) -> F32:
    """Mean optical density over the channels, ``-log10(I / 255)`` with ``I`` clipped to ≥ 1.

    Args:
        rgb: (H, W, 3) intensities on the 0–255 scale (any dtype), or one (H, W) channel.

    Returns:
        (H, W) float32: the mean over the last axis for (H, W, 3), the channel's density for (H, W).
    """
    arr = np.asarray(rgb, dtype=np.float32)
    od = -np.log10(np.clip(arr, 1.0, 255.0) / np.float32(255.0))
    out: F32 = od.mean(axis=-1, dtype=np.float32) if arr.ndim == 3 else od
    return out


def optical_density_torch(x: torch.Tensor) -> torch.Tensor:
    """:func:`optical_density` of channels-first float32 intensities on the 0–255 scale.

    Args:
        x: (B, 3, H, W) float32, values in [0, 255].

    Returns:
        (B, 1, H, W) float32: the mean over the channel dimension (kept).
    """
    import torch

    return -torch.log10(x.clamp(min=1.0) / 255.0).mean(dim=1, keepdim=True)


def transmittance_od_torch(t: torch.Tensor) -> torch.Tensor:
    """Per-channel optical density of transmittance ``t = I / 255``, ``-log10(t)`` with ``t ≥ 1/255``.

    The same density as :func:`optical_density` (the floor is ``I ≥ 1``), on intensities already
    scaled to [0, 1] (the ``rgb`` model input) and without the mean over the channels.
    """
    import torch

    return -torch.log10(t.clamp(min=1.0 / 255.0))
