"""Batched training augmentations for cell crops, in torch on the training device.

Every transform keeps the cell at the crop centre and its physical size almost unchanged (the
nucleus size is diagnostic, so scale jitter is small):

- **geometry**: the 8 flips/90° rotations, a small scale jitter (``scale``, relative) and a shift of
  up to ``shift_um`` µm (the localizer's centre is not exact), in one bilinear resampling;
- **colour**: HED jitter (Tellez et al. 2018: each stain channel ``x·α + β``, α ∈ [1−h, 1+h],
  β ∈ [−h, h]) — Pap stains are not H&E, but the jitter mimics stain and scanner variation after
  Reinhard — plus brightness, contrast and saturation jitter;
- **optics**: Gaussian blur with probability ``blur_p`` (σ up to ``blur_um`` µm: focus variation) and
  Gaussian sensor noise (σ up to ``noise`` grey levels);
- **compression**: with probability ``jpeg_p``, a JPEG round trip (libjpeg-turbo through
  ``imagecodecs``) at a quality drawn from [``jpeg_quality``, 95]: scanners and microscope cameras
  store their images at very different JPEG qualities, and the block artifacts are a source cue.

:meth:`AugmentConfig.strong` is a preset for stain and scanner robustness across sources (larger
colour and optics ranges, JPEG on); the defaults are the milder recipe the shipped bundles used.

A fourth channel (the nucleus mask of ``rgb+mask`` crops) follows the geometry only: colour and optics
change the RGB channels, not what the localizer found.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["AugmentConfig", "augment_batch"]

# skimage.color's stain matrices (Ruifrok & Johnston 2001): rows are the H, E, DAB OD vectors.
_RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
_HED_FROM_RGB = torch.linalg.inv(_RGB_FROM_HED)


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths (0 disables one); see the module docstring."""

    flips: bool = True
    scale: float = 0.08
    shift_um: float = 2.0
    hed: float = 0.04
    brightness: float = 0.08
    contrast: float = 0.1
    saturation: float = 0.1
    blur_p: float = 0.25
    blur_um: float = 0.4
    noise: float = 3.0
    jpeg_p: float = 0.0
    jpeg_quality: int = 50

    def __post_init__(self) -> None:
        if not 0.0 <= self.jpeg_p <= 1.0 or not 0.0 <= self.blur_p <= 1.0:
            raise ValueError(f"jpeg_p and blur_p must lie in [0, 1], got {self.jpeg_p}, {self.blur_p}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must lie in [1, 95], got {self.jpeg_quality}")

    @classmethod
    def strong(cls) -> AugmentConfig:
        """Stain and scanner augmentation for cross-source robustness (issue 14's ablation)."""
        return cls(
            hed=0.10,
            brightness=0.15,
            contrast=0.2,
            saturation=0.25,
            blur_p=0.5,
            blur_um=0.8,
            noise=5.0,
            jpeg_p=0.5,
            jpeg_quality=50,
        )

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all."""
        return cls(
            flips=False,
            scale=0.0,
            shift_um=0.0,
            hed=0.0,
            brightness=0.0,
            contrast=0.0,
            saturation=0.0,
            blur_p=0.0,
            noise=0.0,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG round trip of float (N, 3, H, W) grey levels, each at its own ``quality`` (N,), on the CPU.

    ``imagecodecs`` (libjpeg-turbo, a dependency already: it decodes the slides' tiles).
    """
    import imagecodecs

    u8 = torch.clamp(x, 0.0, 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack(
        [
            imagecodecs.jpeg8_decode(imagecodecs.jpeg8_encode(np.ascontiguousarray(img), level=int(q)))
            for img, q in zip(u8, quality.tolist(), strict=True)
        ]
    )
    return torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype)


def _uniform(n: int, lo: float, hi: float, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=gen).to(device) * (hi - lo) + lo


def _geometry(x: torch.Tensor, cfg: AugmentConfig, mpp: float, gen: torch.Generator) -> torch.Tensor:
    n, _, h, w = x.shape
    dev = x.device
    k = torch.randint(0, 4, (n,), generator=gen) if cfg.flips else torch.zeros(n, dtype=torch.long)
    flip = torch.randint(0, 2, (n,), generator=gen) if cfg.flips else torch.zeros(n, dtype=torch.long)
    s = 1.0 + (torch.rand(n, generator=gen) * 2 - 1) * cfg.scale
    ang = k.double() * (math.pi / 2)
    cos, sin = torch.cos(ang).round(), torch.sin(ang).round()
    fx = 1.0 - 2.0 * flip.double()
    # Output → input coordinates (normalized): rotate, flip x, then scale (s > 1 zooms in).
    theta = torch.zeros(n, 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = cos * fx / s
    theta[:, 0, 1] = -sin / s
    theta[:, 1, 0] = sin * fx / s
    theta[:, 1, 1] = cos / s
    if cfg.shift_um > 0:
        shift_px = cfg.shift_um / mpp
        theta[:, 0, 2] = (torch.rand(n, generator=gen).double() * 2 - 1) * shift_px * 2 / w
        theta[:, 1, 2] = (torch.rand(n, generator=gen).double() * 2 - 1) * shift_px * 2 / h
    if cfg.scale == 0 and cfg.shift_um == 0:
        # Exact pixel permutations, no resampling.
        out = x.clone()
        for kk in range(4):
            for ff in range(2):
                sel = ((k == kk) & (flip == ff)).nonzero().flatten().to(dev)
                if sel.numel():
                    y = x[sel]
                    if ff:
                        y = torch.flip(y, dims=(3,))
                    out[sel] = torch.rot90(y, kk, dims=(2, 3))
        return out
    grid = F.affine_grid(theta.to(x.dtype).to(dev), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _hed_jitter(x: torch.Tensor, amount: float, gen: torch.Generator) -> torch.Tensor:
    """HED jitter as one per-sample affine map of optical density: od' = od·M_in·diag(α)·M_out + β·M_out."""
    n = x.shape[0]
    dev, dt = x.device, x.dtype
    ln10 = math.log(10.0)
    od = torch.log(torch.clamp(x, min=1.0) / 255.0).mul_(-1.0 / ln10)  # (N, 3, H, W)
    alpha = 1.0 + (torch.rand(n, 3, generator=gen, dtype=torch.float64) * 2 - 1) * amount
    beta = (torch.rand(n, 3, generator=gen, dtype=torch.float64) * 2 - 1) * amount
    a = _HED_FROM_RGB[None] @ torch.diag_embed(alpha) @ _RGB_FROM_HED[None]  # (N, 3, 3)
    b = beta[:, None, :] @ _RGB_FROM_HED[None]  # (N, 1, 3)
    od2 = torch.einsum("nchw,ncd->ndhw", od, a.to(dev, dt)) + b[:, 0, :, None, None].to(dev, dt)
    return torch.exp(od2.mul_(-ln10)).mul_(255.0)


def _blur(x: torch.Tensor, sigma_px: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian blur; ``sigma_px`` (N,) in pixels (0: unchanged)."""
    n, c, h, w = x.shape
    radius = max(1, math.ceil(3 * float(sigma_px.max())))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    sig = torch.clamp(sigma_px.to(x.device, x.dtype), min=1e-3)[:, None]
    k = torch.exp(-0.5 * (t[None, :] / sig) ** 2)
    k = k / k.sum(dim=1, keepdim=True)  # (N, K)
    k = k.repeat_interleave(c, dim=0)  # (N*C, K)
    y = x.reshape(1, n * c, h, w)
    y = F.pad(y, (radius, radius, radius, radius), mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=n * c)
    y = F.conv2d(y, k[:, None, :, None], groups=n * c)
    return y.reshape(n, c, h, w)


def augment_batch(
    crops: torch.Tensor,
    cfg: AugmentConfig,
    *,
    mpp: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Augment uint8 (N, H, W, C) crops; returns float32 (N, C, H, W) in grey levels [0, 255].

    C is 3 (RGB) or 4 (RGB + nucleus mask: geometry only).
    """
    x = crops.permute(0, 3, 1, 2).float()
    n = x.shape[0]
    if n == 0:
        return x
    dev = x.device
    if cfg.flips or cfg.scale > 0 or cfg.shift_um > 0:
        x = _geometry(x, cfg, mpp, generator)
    extra = x[:, 3:]
    x = x[:, :3]
    if cfg.hed > 0:
        x = _hed_jitter(x, cfg.hed, generator)
    if cfg.saturation > 0:
        grey = x.mean(dim=1, keepdim=True)
        f = 1.0 + _uniform(n, -cfg.saturation, cfg.saturation, generator, dev).view(n, 1, 1, 1)
        x = grey + (x - grey) * f
    if cfg.contrast > 0:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        f = 1.0 + _uniform(n, -cfg.contrast, cfg.contrast, generator, dev).view(n, 1, 1, 1)
        x = mean + (x - mean) * f
    if cfg.brightness > 0:
        x = x * (1.0 + _uniform(n, -cfg.brightness, cfg.brightness, generator, dev).view(n, 1, 1, 1))
    if cfg.blur_p > 0 and cfg.blur_um > 0:
        on = torch.rand(n, generator=generator) < cfg.blur_p
        if bool(on.any()):
            sigma = torch.rand(n, generator=generator) * (cfg.blur_um / mpp)
            sigma = torch.where(on, sigma, torch.zeros_like(sigma))
            idx = on.nonzero().flatten().to(dev)
            x[idx] = _blur(x[idx], sigma[on])
    if cfg.noise > 0:
        sd = (torch.rand(n, 1, 1, 1, generator=generator) * cfg.noise).to(dev)
        noise = torch.randn(x.shape, generator=generator).to(dev)
        x = x + noise * sd
    x = torch.clamp(x, 0.0, 255.0)
    if cfg.jpeg_p > 0:
        on = torch.rand(n, generator=generator) < cfg.jpeg_p
        if bool(on.any()):
            quality = torch.randint(cfg.jpeg_quality, 96, (n,), generator=generator)
            idx = on.nonzero().flatten().to(dev)
            x[idx] = _jpeg(x[idx], quality[on])
    return torch.cat([x, extra], dim=1) if extra.shape[1] else x
