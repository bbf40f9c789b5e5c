"""Per-tile focus: a stain- and content-independent sharpness ratio (the ``out_of_focus`` QC)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["FOCUS_DOWNSAMPLE", "FOCUS_MARGIN", "tile_focus"]


#: The focus measure works on the green channel averaged over 2×2 pixels (0.5 µm/px at the default
#: 0.25 µm/px): defocus that matters for screening (σ ≳ 1 µm) still removes its fine band, at a
#: quarter of the pixels.
FOCUS_DOWNSAMPLE = 2
#: Box filters (px at the reduced resolution, applied in turn) of the fine and of the coarse blur:
#: σ² = 2 · (3² − 1) / 12 ≈ 1.33 px² and 1.33 + 2 · (5² − 1) / 12 ≈ 5.33 px² (σ ≈ 1.15 and 2.3 px).
FOCUS_FINE_BOXES = (3, 3)
FOCUS_COARSE_BOXES = (5, 5)
#: Full-resolution pixels the focus measure needs around the core (the coarse blur's radius).
FOCUS_MARGIN = FOCUS_DOWNSAMPLE * sum(k // 2 for k in FOCUS_FINE_BOXES + FOCUS_COARSE_BOXES)


def _box_blur(img: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Box filters of ``sizes`` in turn on (N, 1, H, W); valid part only (shrinks by Σ k // 2)."""
    import torch

    for k in sizes:
        img = torch.nn.functional.avg_pool2d(img, k, stride=1)
    return img


def tile_focus(
    img: torch.Tensor, margin: int, *, edge: float = 2.0, min_fraction: float = 0.002
) -> list[float]:
    """Per tile: a stain- and content-independent sharpness ratio (NaN where too few edges).

    ``img`` is (B, H, W) grey levels or (B, H, W, 3) RGB (0–255; the green channel is used) of the
    tile cores plus ``margin`` pixels on every side (:data:`FOCUS_MARGIN` is enough; a smaller margin
    is padded). The image is averaged over 2×2 pixels; then, with G1 its fine blur (σ ≈ 1.15 px) and
    G2 its coarse blur (σ ≈ 2.3 px), over the pixels where the mid band ``|G1 − G2|`` exceeds ``edge``
    grey levels (edges of nuclei and cytoplasm), the measure is mean ``|I − G1|`` over mean
    ``|G1 − G2|``: fine detail relative to the coarser edge contrast. Defocus removes the fine band
    first, so the ratio falls (calibration: docs/outputs.md); unlike the variance of the Laplacian it
    hardly depends on how much or how dark the material is.
    """
    import torch

    g = (img[..., 1] if img.ndim == 4 else img).float()[:, None]
    if margin < FOCUS_MARGIN:  # too little context around the core: replicate its border
        pad = FOCUS_MARGIN - margin
        g = torch.nn.functional.pad(g, (pad, pad, pad, pad), mode="replicate")
        margin = FOCUS_MARGIN
    d, m = FOCUS_DOWNSAMPLE, FOCUS_MARGIN
    h, w = int(g.shape[2]) - 2 * margin, int(g.shape[3]) - 2 * margin
    g = g[:, :, margin - m : margin + h + m, margin - m : margin + w + m]
    x = torch.nn.functional.avg_pool2d(g, d, ceil_mode=False) if d > 1 else g
    mr = m // d  # margin at the reduced resolution
    hr, wr = int(x.shape[2]) - 2 * mr, int(x.shape[3]) - 2 * mr
    f = sum(k // 2 for k in FOCUS_FINE_BOXES)
    b1 = _box_blur(x, FOCUS_FINE_BOXES)
    b2 = _box_blur(b1, FOCUS_COARSE_BOXES)[:, 0, :hr, :wr]
    core = x[:, 0, mr : mr + hr, mr : mr + wr]
    b1 = b1[:, 0, mr - f : mr - f + hr, mr - f : mr - f + wr]
    mid = (b1 - b2).abs().flatten(1)
    fine = (core - b1).abs().flatten(1)
    sel = mid > edge
    n = sel.sum(dim=1).float()
    num = torch.where(sel, fine, 0.0).sum(dim=1)
    den = torch.where(sel, mid, 0.0).sum(dim=1)
    ratio = num / den.clamp(min=1e-6)
    ok = n >= max(1.0, min_fraction * sel.shape[1])
    return [v if good else float("nan") for v, good in zip(ratio.tolist(), ok.tolist(), strict=True)]
