"""Reinhard stain normalization in Ruderman's lαβ space, batched in torch.

The maths is HistomicsTK's ``preprocessing.color_normalization.reinhard`` (v1.4.0), to within one
grey level on ≥ 99.9 % of pixels (see ``tests/test_stain.py``):

- RGB (0–255) → LMS with HistomicsTK's ``_rgb2lms``; ``lms == 0`` (only a pure black pixel) becomes
  ``np.spacing(1)``; natural log; → lαβ with ``_lms2lab``;
- ``lab' = (lab - μ_src) / σ_src · σ_tgt + μ_tgt`` per channel (population statistics, ``ddof=0``);
- back with the inverse matrices and ``exp``, clip to [0, 255], truncate to uint8 (``astype``).

Because the lαβ step is linear in log-LMS, the whole normalization folds into
``rgb' = M₂ · exp(A · log(M₁ · rgb) + c)`` with precomputed 3×3 matrices, and ``exp(c)`` folds into
``M₂``. It runs in float32, in cache-sized chunks, on the device of the input. float64 is used for
the 3×3 algebra, the accumulation of statistics, and for a whole image where float32 could overflow
(extreme scaling, e.g. a near-uniform source). HistomicsTK's ``lms == eps → 0`` rule on the way back
is not reproduced: it changes values by ~1e-15 and cannot change a uint8 result.

Typical use (one source statistic per slide, as HistomicsTK's ``reinhard_stats`` intends)::

    target = ReinhardStats.from_dict(bundle["stain_target"])
    source = lab_stats(sample_tiles, mask=glass_mask(sample_tiles))
    normalized = reinhard(tiles, target, source=source)  # (B, H, W, 3) uint8, same device
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import torch
from numpy.typing import NDArray

__all__ = [
    "DEFAULT_TARGET",
    "PLAUSIBLE_LOG_SIGMA",
    "PLAUSIBLE_MU_SIGMAS",
    "ReinhardStats",
    "SourceEstimate",
    "cell_source_stats",
    "check_source",
    "dark_region_mask",
    "glass_mask",
    "lab_stats",
    "pooled_source_stats",
    "reference_stats",
    "reinhard",
    "reinhard_numpy",
    "source_distance",
]

logger = logging.getLogger(__name__)

#: An image ``(H, W, 3)`` or a batch ``(B, H, W, 3)`` of uint8 RGB, as a tensor or numpy array.
Images: TypeAlias = "torch.Tensor | NDArray[np.uint8]"
#: A boolean mask ``(H, W)`` or ``(B, H, W)``, as a tensor or numpy array.
Mask: TypeAlias = "torch.Tensor | NDArray[np.bool_]"

# HistomicsTK's matrices (color_conversion/rgb_to_lab.py, lab_to_rgb.py), float64.
_RGB2LMS = np.array(
    [[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]],
    dtype=np.float64,
)
_LMS2LAB = np.diag([1 / 3**0.5, 1 / 6**0.5, 1 / 2**0.5]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]], dtype=np.float64
)
_LMS2RGB = np.linalg.inv(_RGB2LMS)
_LAB2LMS = np.linalg.inv(_LMS2LAB)
_EPS = float(np.spacing(1))
_LOG_EPS = math.log(_EPS)
# Range of log-LMS over uint8 RGB: pure black gives log(eps) in all three channels; any other colour
# has lms_j >= min_k M1[j, k] (one channel at 1) and lms_j <= 255 * sum_k M1[j, k].
_LOG_LMS_LO = np.log(_RGB2LMS.min(axis=1))
_LOG_LMS_HI = np.log(255.0 * _RGB2LMS.sum(axis=1))
# float32 exp overflows above ~88.7; stay well below it, including the M2 coefficients.
_F32_SAFE_EXP = 80.0

_CPU_CHUNK_PER_THREAD = 32_768  # pixels; keeps each thread's temporaries in L2
_CPU_MIN_CHUNK = 65_536
_DEVICE_CHUNK = 1 << 22

_DEFAULT_MIN_BRIGHTNESS = 200
_DEFAULT_MAX_SATURATION = 0.1


# --------------------------------------------------------------------------------------------------
# Statistics


def _triple(name: str, value: object, *, positive: bool) -> tuple[float, float, float]:
    """Validate ``value`` as 3 finite real numbers (``> 0`` if ``positive``); name it in errors."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (Sequence, np.ndarray)):
        raise TypeError(f"ReinhardStats.{name} must be a sequence of 3 numbers, got {value!r}")
    items = list(value)
    if len(items) != 3:
        raise ValueError(f"ReinhardStats.{name} must have 3 values (L, α, β), got {len(items)}: {value!r}")
    out: list[float] = []
    for i, v in enumerate(items):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"ReinhardStats.{name}[{i}] must be a number, got {v!r}")
        f = float(v)
        if not math.isfinite(f):
            raise ValueError(f"ReinhardStats.{name}[{i}] must be finite, got {f!r}")
        if positive and f <= 0.0:
            raise ValueError(f"ReinhardStats.{name}[{i}] must be > 0, got {f!r}")
        out.append(f)
    return out[0], out[1], out[2]


@dataclass(frozen=True)
class ReinhardStats:
    """Per-channel mean and (population) standard deviation in Ruderman's lαβ space.

    ``mu`` and ``sigma`` accept any 3-sequence of finite numbers (stored as float tuples); ``sigma``
    must be positive. The values are HistomicsTK's ``target_mu`` / ``target_sigma``.
    """

    mu: tuple[float, float, float]
    sigma: tuple[float, float, float]

    def __post_init__(self) -> None:
        object.__setattr__(self, "mu", _triple("mu", self.mu, positive=False))
        object.__setattr__(self, "sigma", _triple("sigma", self.sigma, positive=True))

    def to_dict(self) -> dict[str, list[float]]:
        """JSON-ready ``{"mu": [...], "sigma": [...]}`` (for model bundles)."""
        return {"mu": list(self.mu), "sigma": list(self.sigma)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReinhardStats:
        """Inverse of :meth:`to_dict`; raises ``ValueError``/``TypeError`` naming the bad value."""
        if not isinstance(data, Mapping):
            raise TypeError(f"Reinhard statistics must be a mapping with 'mu' and 'sigma', got {data!r}")
        keys = set(data)
        if keys != {"mu", "sigma"}:
            missing = sorted({"mu", "sigma"} - keys)
            unknown = sorted(str(k) for k in keys - {"mu", "sigma"})
            raise ValueError(
                "Reinhard statistics need exactly the keys 'mu' and 'sigma'"
                + (f"; missing {missing}" if missing else "")
                + (f"; unknown {unknown}" if unknown else "")
            )
        return cls(mu=data["mu"], sigma=data["sigma"])


#: Default Reinhard target: pooled lαβ statistics of the stained-cell pixels (glass masked) of the 495
#: real Papanicolaou-stained Herlev cells in ``../shared/data/herlev``, computed by
#: ``python pipelines/stain_target.py`` (13,887,435 pixels). Every shipped bundle stores it as
#: ``stain_target``; slides are normalized towards it with slide-level source statistics.
DEFAULT_TARGET = ReinhardStats(mu=(8.5852, -0.0756, 0.0085), sigma=(0.4091, 0.0926, 0.0218))


def _stats_from_gram(gram: torch.Tensor, what: str) -> ReinhardStats:
    """lαβ mean and population std from ``Σ [t, 1]ᵀ [t, 1]`` over pixels (t = log-LMS), float64.

    lαβ is linear in t, so its mean is ``L · mean(t)`` and its covariance ``L · cov(t) · Lᵀ``.
    """
    g = gram.detach().to("cpu", torch.float64).numpy()
    n = g[3, 3]
    if n < 1:
        raise ValueError(f"no pixels left to compute Reinhard statistics of {what} (all masked or empty)")
    mean_t = g[:3, 3] / n
    cov_t = g[:3, :3] / n - np.outer(mean_t, mean_t)
    mu = _LMS2LAB @ mean_t
    var = np.diag(_LMS2LAB @ cov_t @ _LMS2LAB.T)
    # Rounding can leave a uniform channel with a tiny variance instead of 0: treat it as 0.
    floor = 1e-12 * np.maximum(1.0, mu * mu)
    sigma = np.sqrt(np.where(var > floor, var, 0.0))
    if np.any(sigma <= 0.0):
        raise ValueError(
            f"{what} is uniform in a lαβ channel (sigma={sigma.tolist()}); Reinhard statistics need "
            "colour variation: pass source= statistics computed over more pixels"
        )
    return ReinhardStats(mu=(mu[0], mu[1], mu[2]), sigma=(sigma[0], sigma[1], sigma[2]))


# --------------------------------------------------------------------------------------------------
# Input handling


def _as_tensor(x: torch.Tensor | NDArray[Any], what: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, np.ndarray):
        if not x.flags.writeable:
            x = x.copy()
        return torch.from_numpy(x)
    raise TypeError(f"{what} must be a torch.Tensor or numpy array, got {type(x).__name__}")


def _as_images(images: Images) -> tuple[torch.Tensor, bool]:
    """``(B, H, W, 3)`` uint8 tensor and whether the input was a single image."""
    t = _as_tensor(images, "images")
    if t.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 RGB, got dtype {t.dtype}")
    if t.ndim == 3 and t.shape[-1] == 3:
        return t.unsqueeze(0), True
    if t.ndim == 4 and t.shape[-1] == 3:
        return t, False
    raise ValueError(
        f"images must be (H, W, 3) or (B, H, W, 3) channels-last RGB, got shape {tuple(t.shape)}"
    )


def _as_mask(mask: Mask, images: torch.Tensor, what: str) -> torch.Tensor:
    """Boolean ``(B, H, W)`` mask on the images' device; an ``(H, W)`` mask applies to all."""
    m = _as_tensor(mask, what)
    if m.dtype != torch.bool:
        raise TypeError(f"{what} must be a boolean mask, got dtype {m.dtype}")
    shape = tuple(images.shape[:-1])
    if tuple(m.shape) == shape[1:]:
        m = m.unsqueeze(0).expand(shape)
    elif tuple(m.shape) != shape:
        raise ValueError(
            f"{what} has shape {tuple(m.shape)}; expected {shape[1:]} or {shape} to match the images"
        )
    return m.to(images.device)


def _chunk_pixels(device: torch.device, rows: int) -> int:
    """Pixels per chunk for ``rows`` pixels: cache-sized on CPU, large on accelerators."""
    if device.type == "cpu":
        chunk = max(_CPU_MIN_CHUNK, _CPU_CHUNK_PER_THREAD * torch.get_num_threads())
    else:
        chunk = _DEVICE_CHUNK
    return max(1, min(chunk, rows))


def _cpu_float32_mm_is_exact() -> bool:
    """Whether float32 ``torch.mm`` on CPU is IEEE (not lowered to bf16/tf32 by a global flag)."""
    try:
        backends = torch.backends
        settings = [
            getattr(getattr(backends.mkldnn, "matmul", None), "fp32_precision", None),
            getattr(backends.mkldnn, "fp32_precision", None),
            getattr(backends, "fp32_precision", None),
        ]
        if any(s is not None for s in settings):
            return all(s in (None, "none", "ieee") for s in settings)
        return torch.get_float32_matmul_precision() == "highest"
    except Exception:  # unknown torch API: take the always-exact path
        return False


# --------------------------------------------------------------------------------------------------
# Kernels: pixels are rows (n, 3); matrices act as rgb' = M @ rgb.


class _Kernel:
    """Chunked per-pixel maths in one dtype on one device, with reusable buffers."""

    def __init__(self, device: torch.device, dtype: torch.dtype, chunk: int) -> None:
        self.device, self.dtype, self.chunk = device, dtype, chunk
        # float32 mm may be lowered to bf16/tf32 by global settings; the elementwise path never is.
        self.use_mm = dtype == torch.float64 or (device.type == "cpu" and _cpu_float32_mm_is_exact())
        self.a = torch.empty((chunk, 3), dtype=dtype, device=device)
        self.b = torch.empty((chunk, 3), dtype=dtype, device=device)
        self.m1 = self.matrix(_RGB2LMS)
        self._g: torch.Tensor | None = None

    @property
    def g(self) -> torch.Tensor:
        """float64 ``(chunk, 4)`` buffer whose last column is 1 (for :meth:`gram`)."""
        if self._g is None:
            self._g = torch.ones((self.chunk, 4), dtype=torch.float64, device=self.device)
        return self._g

    def matrix(self, m: NDArray[np.floating[Any]]) -> torch.Tensor:
        """``m`` transposed for ``rows @ m.T``, in the kernel's dtype and device."""
        return torch.as_tensor(np.ascontiguousarray(m.T), dtype=self.dtype, device=self.device)

    def _mat3(self, x: torch.Tensor, mt: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if self.use_mm:
            return torch.mm(x, mt, out=out)
        for i in range(3):
            o = out[:, i]
            torch.mul(x[:, 0], mt[0, i], out=o)
            o.addcmul_(x[:, 1], mt[1, i]).addcmul_(x[:, 2], mt[2, i])
        return out

    def log_lms(self, rgb: torch.Tensor) -> torch.Tensor:
        """log(max(M1 · rgb, eps)) of a uint8 chunk (n, 3), in buffer ``b``."""
        n = rgb.shape[0]
        x = self.a[:n]
        x.copy_(rgb)
        t = self._mat3(x, self.m1, self.b[:n])
        return t.clamp_(min=_EPS).log_()

    def gram(self, rgb: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """``Σ [t, 1]ᵀ [t, 1]`` (4×4, float64) of log-LMS ``t`` over the chunk's ``keep`` pixels."""
        n = rgb.shape[0]
        t = self.log_lms(rgb)
        g = self.g[:n]
        g[:, :3].copy_(t)
        if keep is None:
            return torch.mm(g.T, g)
        w = g[:, 3]
        w.copy_(keep)  # weights 1/0: rows w·[t, 1], and w² = w
        g[:, :3].mul_(w[:, None])
        gram = torch.mm(g.T, g)
        w.fill_(1.0)
        return gram

    def normalize(
        self,
        rgb: torch.Tensor,
        a_t: torch.Tensor,
        bias: torch.Tensor | None,
        m2_t: torch.Tensor,
        out: torch.Tensor,
    ) -> None:
        """``out = uint8(clip(M2 · exp(A · log_lms(rgb) [+ bias]), 0, 255))``."""
        n = rgb.shape[0]
        t = self.log_lms(rgb)
        z = self._mat3(t, a_t, self.a[:n])
        if bias is not None:
            z.add_(bias)
        y = self._mat3(z.exp_(), m2_t, self.b[:n]).clamp_(0.0, 255.0)
        out.copy_(y)  # float → uint8 truncates toward zero, like numpy's astype


def _affine(source: ReinhardStats, target: ReinhardStats) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """``(A, c)`` with ``log_lms' = A · log_lms + c`` equal to Reinhard's per-channel lαβ map."""
    scale = np.asarray(target.sigma) / np.asarray(source.sigma)
    shift = np.asarray(target.mu) - scale * np.asarray(source.mu)
    return _LAB2LMS @ np.diag(scale) @ _LMS2LAB, _LAB2LMS @ shift


def _can_fold_in_float32(a: NDArray[np.float64], c: NDArray[np.float64]) -> bool:
    """Whether ``exp(A·t)`` and ``exp(c)`` (folded into M2) stay far from float32 overflow.

    ``t`` ranges over the log-LMS of all uint8 colours. Near-uniform sources (tiny σ) give huge
    ``A`` and ``c`` whose exponentials overflow even though ``exp(A·t + c)`` does not.
    """
    box = np.maximum(a * _LOG_LMS_LO, a * _LOG_LMS_HI).sum(axis=1)  # bound over non-black pixels
    black = a.sum(axis=1) * _LOG_EPS
    z = np.maximum(box, black)
    return bool(
        np.all(z < _F32_SAFE_EXP) and np.all(z + c < _F32_SAFE_EXP) and np.all(np.abs(c) < _F32_SAFE_EXP)
    )


def _normalize_rows(
    flat: torch.Tensor,
    out: torch.Tensor,
    source: ReinhardStats,
    target: ReinhardStats,
    keep_rows: torch.Tensor | None,
    kernels: dict[torch.dtype, _Kernel],
) -> None:
    """Normalize uint8 pixel rows ``flat`` (n, 3) into ``out``; ``keep_rows`` rows stay as is."""
    a, c = _affine(source, target)
    fold = _can_fold_in_float32(a, c)
    dtype = torch.float32 if fold else torch.float64
    if not fold:
        logger.debug("Reinhard statistics %s → %s: extreme scaling, using float64", source, target)
    if dtype not in kernels:
        kernels[dtype] = _Kernel(flat.device, dtype, _chunk_pixels(flat.device, flat.shape[0]))
    k = kernels[dtype]
    a_t = k.matrix(a)
    if fold:  # exp(A·t + c) = diag(exp(c)) · exp(A·t): no per-pixel bias
        bias, m2_t = None, k.matrix(_LMS2RGB * np.exp(c)[None, :])
    else:
        bias, m2_t = torch.as_tensor(c, dtype=dtype, device=flat.device), k.matrix(_LMS2RGB)
    for s in range(0, flat.shape[0], k.chunk):
        e = min(s + k.chunk, flat.shape[0])
        k.normalize(flat[s:e], a_t, bias, m2_t, out[s:e])
        if keep_rows is not None:
            kr = keep_rows[s:e]
            out[s:e] = torch.where(kr[:, None], flat[s:e], out[s:e])


def _gram(flat: torch.Tensor, excluded: torch.Tensor | None, kernel: _Kernel) -> torch.Tensor:
    """Sum of :meth:`_Kernel.gram` over the rows of ``flat`` not ``excluded``."""
    total = torch.zeros((4, 4), dtype=torch.float64, device=flat.device)
    for s in range(0, flat.shape[0], kernel.chunk):
        e = min(s + kernel.chunk, flat.shape[0])
        total += kernel.gram(flat[s:e], None if excluded is None else ~excluded[s:e])
    return total


# --------------------------------------------------------------------------------------------------
# Public API


@torch.inference_mode()
def lab_stats(images: Images, *, mask: Mask | None = None) -> ReinhardStats:
    """lαβ mean and standard deviation over all pixels of ``images`` where ``mask`` is not True.

    ``mask`` marks pixels to *exclude* (HistomicsTK's ``mask_out`` convention), e.g. the result of
    :func:`glass_mask`. Statistics pool the whole batch: one source statistic per slide from
    sampled tissue tiles.
    """
    imgs, _ = _as_images(images)
    flat = imgs.reshape(-1, 3)
    excluded = None if mask is None else _as_mask(mask, imgs, "mask").reshape(-1)
    kernel = _Kernel(imgs.device, torch.float32, _chunk_pixels(imgs.device, flat.shape[0]))
    return _stats_from_gram(_gram(flat, excluded, kernel), "the images")


#: Pixels whose brightest channel is below this are not stain (scanner fill, black field corners).
_DEFAULT_DARK_LEVEL = 30
#: Smooth pixels with a luminance below this may be ink, a label edge or scanner fill when they form
#: a large region (see :func:`dark_region_mask`).
_DEFAULT_INK_LEVEL = 70
#: ... smooth: luminance standard deviation over 5×5 px at most this (grey levels).
_INK_MAX_STD = 3.0
_SMOOTH_PX = 5
#: A dark region must hold a square of this side to be excluded, and this margin around it goes too
#: (anti-aliased edges). In µm with ``mpp``: twice the largest nucleus; blurred, magnified
#: hyperchromatic groups (CNSeg's barrel-distorted fields at 0.25 µm/px) hold smooth dark squares of
#: 24 µm but none of 32 µm. Without ``mpp`` in px (magnified crops show smooth nuclei over 64 px).
_REGION_UM = 40.0
_MARGIN_UM = 1.5
_DEFAULT_REGION_PX = 128
_DEFAULT_MARGIN_PX = 3
_LUMA = (0.299, 0.587, 0.114)
#: At most this many cell pixels enter the robust statistics (a fixed stride subsample).
_ROBUST_MAX_PIXELS = 2_000_000
#: Fewer cell pixels than this give no statistics (None): too little stain to estimate a source.
_ROBUST_MIN_PIXELS = 2_000
#: A channel whose standard deviation is below this has no colour variation (a greyscale image).
_MIN_SIGMA = 1e-6


def _max_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """Separable ``k``×``k`` maximum of (N, 1, H, W) float maps, centred, same size (zero outside)."""
    if k <= 1:
        return x
    lo, hi = k // 2, k - 1 - k // 2
    x = torch.nn.functional.pad(x, (lo, hi, 0, 0))
    x = torch.nn.functional.max_pool2d(x, (1, k), stride=1)
    x = torch.nn.functional.pad(x, (0, 0, lo, hi))
    return torch.nn.functional.max_pool2d(x, (k, 1), stride=1)


def _large_regions(cand: torch.Tensor, size: int) -> torch.Tensor:
    """Pixels of ``cand`` (H, W) within ``size`` px of a ``size``×``size`` square lying in ``cand``.

    Computed on ``s``×``s`` blocks (s = size // 8): a block counts when all its pixels are
    candidates; a seed is a run of ``size // s - 1`` such blocks in both directions (it fits in any
    ``size`` square of candidates); candidates up to that run's width from a seed belong to it, so the
    rounded or ragged ends of a region that the square cannot reach are not left behind.
    """
    f = torch.nn.functional
    h, w = int(cand.shape[0]), int(cand.shape[1])
    s = max(1, size // 8)
    c = cand.to(torch.float32)[None, None]
    full = -f.max_pool2d(-c, s, stride=s, ceil_mode=True)  # edge blocks: over their pixels inside
    k = max(1, size // s - 1)
    hc, wc = int(full.shape[2]), int(full.shape[3])
    if hc < k or wc < k:
        return torch.zeros_like(cand)
    seeds = torch.zeros_like(full)
    seeds[..., : hc - k + 1, : wc - k + 1] = -f.max_pool2d(-full, k, stride=1)  # at the run's top left
    near = f.max_pool2d(f.pad(seeds, (2 * k - 1, k, 2 * k - 1, k)), 3 * k, stride=1)  # run ± k blocks
    up = near[0, 0].repeat_interleave(s, 0).repeat_interleave(s, 1)[:h, :w]
    return cand & (up > 0)


def _region_sizes(region_px: int | None, margin_px: int | None, mpp: float | None) -> tuple[int, int]:
    if mpp is not None and not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise ValueError(f"mpp must be a positive number of µm per pixel, got {mpp!r}")
    if region_px is None:
        region_px = _DEFAULT_REGION_PX if mpp is None else max(8, math.ceil(_REGION_UM / mpp))
    if margin_px is None:
        margin_px = _DEFAULT_MARGIN_PX if mpp is None else max(1, math.ceil(_MARGIN_UM / mpp))
    for name, v, lo in (("region_px", region_px, 2), ("margin_px", margin_px, 0)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"{name} must be an integer ≥ {lo}, got {v!r}")
    return int(region_px), int(margin_px)


@torch.inference_mode()
def dark_region_mask(
    images: Images,
    *,
    dark_level: int = _DEFAULT_DARK_LEVEL,
    ink_level: int = _DEFAULT_INK_LEVEL,
    region_px: int | None = None,
    margin_px: int | None = None,
    mpp: float | None = None,
    isolated: bool = True,
) -> torch.Tensor:
    """True where a pixel is not stain but a dark region: fill, black corners, ink, a label edge.

    Excluded are (1) every near-black pixel (brightest channel ``< dark_level``); (2) large dark
    regions: near-black or smooth dark pixels (luminance ``< ink_level`` and a luminance standard
    deviation ≤ 3 grey levels over 5×5 px: ink, fill, not textured chromatin), kept only where they
    hold a ``region_px`` square (40 µm with ``mpp``, twice the largest nucleus; else 128 px), with the
    region's ragged ends; (3) ``margin_px`` around those regions (their anti-aliased or blurred
    edges: 1.5 µm with ``mpp``, else 3 px). Small dark objects (nuclei, even pyknotic ones, and
    hyperchromatic groups, which are textured) are left to the statistics, apart from their
    near-black pixels (``isolated=False``: those too, only the regions and their margins).
    ``ink_level=0`` only looks for near-black regions.
    Returns ``(H, W)`` or ``(B, H, W)`` booleans on the images' device.
    """
    for name, v in (("dark_level", dark_level), ("ink_level", ink_level)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not 0 <= v <= 255:
            raise ValueError(f"{name} must be an integer grey level in [0, 255], got {v!r}")
    size, margin = _region_sizes(region_px, margin_px, mpp)
    imgs, single = _as_images(images)
    f = torch.nn.functional
    luma = torch.tensor(_LUMA, dtype=torch.float32, device=imgs.device)
    out = torch.empty(imgs.shape[:-1], dtype=torch.bool, device=imgs.device)
    for i in range(int(imgs.shape[0])):
        x = imgs[i]
        h, w = int(x.shape[0]), int(x.shape[1])
        # Regions are large: look for them on 2×2 means (a quarter of the work), then map back.
        s = 2 if size >= 32 and min(h, w) >= 64 else 1
        rgb = x.permute(2, 0, 1)[None].to(torch.float32)
        if s > 1:
            if h % 2 or w % 2:
                rgb = f.pad(rgb, (0, w % 2, 0, h % 2), mode="replicate")
            rgb = f.avg_pool2d(rgb, 2)
        lo = max(dark_level, ink_level)
        lum = torch.einsum("bchw,c->bhw", rgb, luma)[:, None]
        region = torch.zeros((1, 1, *lum.shape[2:]), dtype=torch.bool, device=imgs.device)
        side = max(2, size // s)
        # A region needs a side × side square of dark pixels: most windows have far fewer.
        if int((lum < max(lo, 1)).sum()) >= side * side // 2:
            cand = rgb.amax(dim=1, keepdim=True) < dark_level
            if ink_level > 0:
                p = _SMOOTH_PX // 2
                m = f.avg_pool2d(lum, _SMOOTH_PX, stride=1, padding=p, count_include_pad=False)
                m2 = f.avg_pool2d(lum * lum, _SMOOTH_PX, stride=1, padding=p, count_include_pad=False)
                cand |= (lum < ink_level) & ((m2 - m * m) <= _INK_MAX_STD**2)
            region = _large_regions(cand[0, 0], side)[None, None]
            if bool(region.any()):  # the margin, from the edge (the smoothness test stops short of it)
                grow = math.ceil(margin / s) + (_SMOOTH_PX // 2 if ink_level > 0 else 0)
                region = _max_filter(region.to(torch.float32), 2 * grow + 1) > 0
        r = region[0, 0]
        if s > 1:
            hs, ws = int(r.shape[0]), int(r.shape[1])
            r = r[:, None, :, None].expand(hs, s, ws, s).reshape(hs * s, ws * s)[:h, :w]
        out[i] = r | (x.amax(dim=-1) < dark_level) if isolated else r
    return out[0] if single else out


def _excluded(
    imgs: torch.Tensor,
    *,
    mask_glass: bool,
    min_brightness: int,
    max_saturation: float,
    dark_level: int,
    ink_level: int,
    region_px: int | None,
    margin_px: int | None,
    mpp: float | None,
) -> tuple[torch.Tensor, int, int]:
    """Flat mask of the non-cell pixels of ``imgs`` (B, H, W, 3) — glass and dark regions — with the
    counts of non-glass pixels and of those excluded as dark regions."""
    dark = dark_region_mask(
        imgs,
        dark_level=dark_level,
        ink_level=ink_level,
        region_px=region_px,
        margin_px=margin_px,
        mpp=mpp,
    ).reshape(-1)
    if not mask_glass:
        return dark, int(dark.numel()), int(dark.sum())
    glass = glass_mask(imgs, min_brightness=min_brightness, max_saturation=max_saturation).reshape(-1)
    return glass | dark, int((~glass).sum()), int((dark & ~glass).sum())


def _cell_gram(flat: torch.Tensor, excluded: torch.Tensor) -> torch.Tensor:
    """``Σ [t, 1]ᵀ [t, 1]`` (float64) over the pixel rows of ``flat`` not ``excluded`` (t: log-LMS)."""
    kernel = _Kernel(flat.device, torch.float32, _chunk_pixels(flat.device, flat.shape[0]))
    return _gram(flat, excluded, kernel)


def _gram_stats(gram: torch.Tensor) -> ReinhardStats | None:
    """:func:`_stats_from_gram`, or None for too few pixels or a channel without variation."""
    if float(gram[3, 3]) < _ROBUST_MIN_PIXELS:
        return None
    try:
        stats = _stats_from_gram(gram, "the cell pixels")
    except ValueError:
        return None
    return stats if min(stats.sigma) > _MIN_SIGMA else None


def _check_levels(dark_level: object, clip_sigmas: object) -> None:
    if clip_sigmas is not None and not (isinstance(clip_sigmas, (int, float)) and clip_sigmas > 0):
        raise ValueError(f"clip_sigmas must be > 0, got {clip_sigmas!r}")
    bad_level = isinstance(dark_level, bool) or not isinstance(dark_level, (int, np.integer))
    if bad_level or not 0 <= dark_level <= 255:  # type: ignore[operator]
        raise ValueError(f"dark_level must be an integer grey level in [0, 255], got {dark_level!r}")


def _clip(lab: NDArray[np.float64], clip_sigmas: float | None) -> NDArray[np.float64]:
    if clip_sigmas is None or lab.shape[0] == 0:
        return lab
    med = np.median(lab, axis=0)
    mad = 1.4826 * np.median(np.abs(lab - med), axis=0)
    sel: NDArray[np.float64] = lab[np.all(np.abs(lab - med) <= clip_sigmas * np.maximum(mad, 1e-6), axis=1)]
    return sel


def cell_source_stats(
    images: Images,
    *,
    min_brightness: int = _DEFAULT_MIN_BRIGHTNESS,
    max_saturation: float = _DEFAULT_MAX_SATURATION,
    dark_level: int = _DEFAULT_DARK_LEVEL,
    clip_sigmas: float | None = None,
    ink_level: int = _DEFAULT_INK_LEVEL,
    region_px: int | None = None,
    margin_px: int | None = None,
    mpp: float | None = None,
) -> ReinhardStats | None:
    """Reinhard source statistics from stained-cell pixels only, robust to dark regions and outliers.

    Glass (:func:`glass_mask`) and dark regions (:func:`dark_region_mask` with ``dark_level``,
    ``ink_level``, ``region_px``, ``margin_px`` and ``mpp``: near-black pixels, large smooth dark
    regions such as scanner fill, the black corners of rotated fields, ink or a label edge, and a
    margin around them) are excluded. With ``clip_sigmas``, pixels farther than that many robust
    standard deviations (1.4826 · MAD) from the median on any lαβ channel are dropped too (stain
    distributions are heavy-tailed, so this also trims real stain: off by default). Returns the mean
    and population standard deviation of the rest (the statistics :func:`lab_stats` gives on clean
    cells), or None when fewer than 2,000 cell pixels remain (an all-glass or all-dark sample).
    """
    _check_levels(dark_level, clip_sigmas)
    imgs, _ = _as_images(images)
    excluded, _, _ = _excluded(
        imgs,
        mask_glass=True,
        min_brightness=min_brightness,
        max_saturation=max_saturation,
        dark_level=dark_level,
        ink_level=ink_level,
        region_px=region_px,
        margin_px=margin_px,
        mpp=mpp,
    )
    flat = imgs.reshape(-1, 3)
    if clip_sigmas is None:
        return _gram_stats(_cell_gram(flat, excluded))
    rows = flat[~excluded]
    n = int(rows.shape[0])
    if n < _ROBUST_MIN_PIXELS:
        return None
    if n > _ROBUST_MAX_PIXELS:
        rows = rows[:: math.ceil(n / _ROBUST_MAX_PIXELS)]
    m1 = torch.as_tensor(_RGB2LMS.T, dtype=torch.float64, device=rows.device)
    m2 = torch.as_tensor(_LMS2LAB.T, dtype=torch.float64, device=rows.device)
    lab = (rows.to(torch.float64) @ m1).clamp_(min=_EPS).log_() @ m2
    sel = _clip(lab.cpu().numpy(), clip_sigmas)
    if int(sel.shape[0]) < _ROBUST_MIN_PIXELS:
        return None
    sigma = sel.std(axis=0)
    if not bool(np.all(sigma > _MIN_SIGMA)):
        return None
    return ReinhardStats(mu=tuple(sel.mean(axis=0)), sigma=tuple(sigma))


@dataclass(frozen=True)
class SourceEstimate:
    """Source statistics pooled over sampled images (a slide's tiles) by :func:`pooled_source_stats`.

    ``used``, ``sparse`` and ``rejected`` are indices into the images: pooled, left out for too few
    cell pixels, and left out as outliers (their statistics far from the other images': a dark or
    ink-covered tile the pixel rules missed). ``dark_fraction``: of the non-glass pixels, the
    fraction excluded as dark regions (:func:`dark_region_mask`).
    """

    stats: ReinhardStats | None
    n_images: int
    used: tuple[int, ...]
    sparse: tuple[int, ...]
    rejected: tuple[int, ...]
    cell_pixels: int
    dark_fraction: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``stats`` as :meth:`ReinhardStats.to_dict`)."""
        return {
            "stats": None if self.stats is None else self.stats.to_dict(),
            "images": self.n_images,
            "used": len(self.used),
            "sparse": len(self.sparse),
            "rejected": list(self.rejected),
            "cell_pixels": self.cell_pixels,
            "dark_fraction": round(self.dark_fraction, 4),
        }


@torch.inference_mode()
def pooled_source_stats(
    images: Images,
    *,
    mask_glass: bool = True,
    min_brightness: int = _DEFAULT_MIN_BRIGHTNESS,
    max_saturation: float = _DEFAULT_MAX_SATURATION,
    dark_level: int = _DEFAULT_DARK_LEVEL,
    ink_level: int = _DEFAULT_INK_LEVEL,
    region_px: int | None = None,
    margin_px: int | None = None,
    mpp: float | None = None,
    min_pixels: int | None = None,
    outlier_sigmas: float = 3.0,
    outlier_ratio: float = 4.0,
) -> SourceEstimate:
    """One source statistic from a batch of images (a slide's sampled tiles), robust per image.

    Each image's cell pixels are those of :func:`cell_source_stats` (glass — unless
    ``mask_glass=False`` — and :func:`dark_region_mask` excluded). Images with fewer than
    ``min_pixels`` cell pixels (default: 1 % of an image, at least 2,000) are left out (when none
    has that many, all images with cell pixels are pooled, if they hold 2,000 together). With three
    or more images left, the per-channel medians over the images of their lαβ means and standard
    deviations give a robust centre, and an image whose mean is more than ``outlier_sigmas`` median
    standard deviations from the median mean on any channel, or whose standard deviation differs
    from the median one by more than ``outlier_ratio`` times, is left out as an outlier. The rest are
    pooled exactly: mean and population standard deviation of all their cell pixels together (what
    :func:`lab_stats` gives on clean tiles), so one dark or ink-covered tile cannot hijack a slide.
    """
    _check_levels(dark_level, None)
    if not (outlier_sigmas > 0 and outlier_ratio > 1):
        raise ValueError(
            f"need outlier_sigmas > 0 and outlier_ratio > 1, got {outlier_sigmas}, {outlier_ratio}"
        )
    imgs, _ = _as_images(images)
    b, h, w = (int(v) for v in imgs.shape[:3])
    need = max(_ROBUST_MIN_PIXELS, math.ceil(0.01 * h * w)) if min_pixels is None else int(min_pixels)
    grams: list[torch.Tensor] = []
    n_tissue = n_dark = 0
    for i in range(b):
        one = imgs[i : i + 1]
        excluded, nt, nd = _excluded(
            one,
            mask_glass=mask_glass,
            min_brightness=min_brightness,
            max_saturation=max_saturation,
            dark_level=dark_level,
            ink_level=ink_level,
            region_px=region_px,
            margin_px=margin_px,
            mpp=mpp,
        )
        n_tissue += nt
        n_dark += nd
        grams.append(_cell_gram(one.reshape(-1, 3), excluded))
    counts = [int(g[3, 3]) for g in grams]
    sparse = [i for i in range(b) if counts[i] < max(1, need)]
    ok = [i for i in range(b) if i not in set(sparse)]
    if not ok and sum(counts) >= _ROBUST_MIN_PIXELS:  # little material everywhere: pool what there is
        ok = [i for i in range(b) if counts[i] > 0]
    rejected: list[int] = []
    per = {i: _gram_stats(grams[i]) for i in ok} if len(ok) >= 3 else {}
    good = [i for i, st in per.items() if st is not None]
    if len(good) >= 3:
        mu = np.asarray([per[i].mu for i in good])  # type: ignore[union-attr]
        sd = np.asarray([per[i].sigma for i in good])  # type: ignore[union-attr]
        med_mu, med_sd = np.median(mu, axis=0), np.median(sd, axis=0)
        far = np.any(np.abs(mu - med_mu) > outlier_sigmas * med_sd, axis=1)
        far |= np.any(np.abs(np.log(sd / med_sd)) > math.log(outlier_ratio), axis=1)
        rejected = [i for i, bad in zip(good, far.tolist(), strict=True) if bad]
        ok = [i for i in ok if i not in set(rejected)]
    total = torch.zeros((4, 4), dtype=torch.float64, device=imgs.device)
    for i in ok:
        total += grams[i]
    stats = _gram_stats(total) if ok else None
    n_cells = sum(counts[i] for i in ok)
    return SourceEstimate(
        stats=stats,
        n_images=b,
        used=tuple(ok),
        sparse=tuple(sparse),
        rejected=tuple(rejected),
        cell_pixels=int(n_cells),
        dark_fraction=n_dark / n_tissue if n_tissue else 0.0,
    )


#: Plausible source statistics lie within these of at least one known target (a bundle's): every
#: ``|μ − μ_target| / σ_target`` and every ``|ln(σ / σ_target)|`` over the lαβ channels. Measured
#: (``docs/architecture.md``): real Papanicolaou images reach 6.0 target σ (CNSeg clusters) and
#: ``|ln σ ratio|`` 2.3 (single Herlev cells) per image, the synthetic stain profiles less; a
#: black-cornered field's plain statistics are ~50 σ off (ln σ ratio ~4).
PLAUSIBLE_MU_SIGMAS = 8.0
PLAUSIBLE_LOG_SIGMA = 2.75


def source_distance(source: ReinhardStats, target: ReinhardStats) -> tuple[float, float]:
    """``(max_c |μ_c − μt_c| / σt_c, max_c |ln(σ_c / σt_c)|)`` over the lαβ channels."""
    mu = np.abs(np.subtract(source.mu, target.mu)) / np.asarray(target.sigma)
    ls = np.abs(np.log(np.divide(source.sigma, target.sigma)))
    return float(mu.max()), float(ls.max())


def check_source(
    source: ReinhardStats,
    targets: Sequence[ReinhardStats],
    *,
    max_mu_sigmas: float = PLAUSIBLE_MU_SIGMAS,
    max_log_sigma: float = PLAUSIBLE_LOG_SIGMA,
) -> dict[str, Any]:
    """Whether ``source`` is a plausible stain: within the bounds of at least one of ``targets``.

    Returns ``plausible``, ``distance`` (to the nearest target, in units of the bounds: the larger of
    ``mu_sigmas / max_mu_sigmas`` and ``log_sigma_ratio / max_log_sigma``; plausible when ≤ 1), the
    nearest target's ``mu_sigmas`` and ``log_sigma_ratio`` (:func:`source_distance`), and the bounds.
    No targets: plausible (there is nothing to compare with).
    """
    if not (max_mu_sigmas > 0 and max_log_sigma > 0):
        raise ValueError(f"bounds must be > 0, got {max_mu_sigmas}, {max_log_sigma}")
    best: tuple[float, float, float] | None = None
    for t in targets:
        mu, ls = source_distance(source, t)
        d = max(mu / max_mu_sigmas, ls / max_log_sigma)
        if best is None or d < best[0]:
            best = (d, mu, ls)
    d, mu, ls = best if best is not None else (0.0, 0.0, 0.0)
    return {
        "plausible": bool(d <= 1.0),
        "distance": round(d, 4),
        "mu_sigmas": round(mu, 3),
        "log_sigma_ratio": round(ls, 3),
        "bounds": {"mu_sigmas": max_mu_sigmas, "log_sigma_ratio": max_log_sigma},
    }


@torch.inference_mode()
def glass_mask(
    images: Images,
    *,
    min_brightness: int = _DEFAULT_MIN_BRIGHTNESS,
    max_saturation: float = _DEFAULT_MAX_SATURATION,
) -> torch.Tensor:
    """True where a pixel is bright, unsaturated background glass.

    A pixel is glass when its brightest channel is ``>= min_brightness`` and its HSV saturation
    ``(max - min) / max`` is ``<= max_saturation``. Pass the result as ``mask`` / ``mask_out`` to
    keep glass out of the statistics (cytology slides are mostly glass).
    Returns ``(H, W)`` or ``(B, H, W)`` booleans on the images' device.
    """
    if isinstance(min_brightness, bool) or not isinstance(min_brightness, (int, np.integer)):
        raise TypeError(f"min_brightness must be an integer grey level, got {min_brightness!r}")
    if not 0 <= min_brightness <= 255:
        raise ValueError(f"min_brightness must be in [0, 255], got {min_brightness}")
    if not (isinstance(max_saturation, (int, float)) and 0.0 <= max_saturation <= 1.0):
        raise ValueError(f"max_saturation must be in [0, 1], got {max_saturation!r}")
    imgs, single = _as_images(images)
    flat = imgs.reshape(-1, 3)
    out = torch.empty(flat.shape[0], dtype=torch.bool, device=imgs.device)
    step = _chunk_pixels(imgs.device, flat.shape[0])
    for s in range(0, flat.shape[0], step):
        r, g, b = flat[s : s + step].unbind(1)
        hi = torch.maximum(torch.maximum(r, g), b)
        lo = torch.minimum(torch.minimum(r, g), b)
        # (hi - lo) / hi <= max_saturation, written without a division (black has hi = 0).
        hf = hi.to(torch.float32)
        out[s : s + step] = (hi >= min_brightness) & (hf - lo).le(hf.mul(max_saturation))
    out = out.view(imgs.shape[:-1])
    return out[0] if single else out


@torch.inference_mode()
def reinhard(
    images: Images,
    target: ReinhardStats,
    *,
    source: ReinhardStats | None = None,
    mask_out: Mask | None = None,
    keep_masked: bool = False,
) -> torch.Tensor:
    """Reinhard-normalize uint8 RGB ``images`` to the ``target`` lαβ statistics.

    Args:
        images: ``(H, W, 3)`` or ``(B, H, W, 3)`` uint8 (tensor or numpy); the result has the same
            shape and is on the same device.
        target: statistics to map onto (e.g. :func:`reference_stats` of a reference image).
        source: statistics to map from, shared by all images (one per slide: :func:`lab_stats`).
            ``None`` computes them per image over its pixels not in ``mask_out``, like HistomicsTK.
        mask_out: boolean ``(H, W)`` or ``(B, H, W)``; True pixels are left out of per-image
            statistics.
        keep_masked: also leave ``mask_out`` pixels unchanged in the output (what HistomicsTK
            does); by default every pixel is normalized.
    """
    if not isinstance(target, ReinhardStats):
        raise TypeError(f"target must be ReinhardStats, got {type(target).__name__}")
    if source is not None and not isinstance(source, ReinhardStats):
        raise TypeError(f"source must be ReinhardStats or None, got {type(source).__name__}")
    imgs, single = _as_images(images)
    excluded = None if mask_out is None else _as_mask(mask_out, imgs, "mask_out")
    if keep_masked and excluded is None:
        raise ValueError("keep_masked=True needs a mask_out")
    out = torch.empty_like(imgs, memory_format=torch.contiguous_format)
    kernels: dict[torch.dtype, _Kernel] = {}
    if source is not None:
        keep_rows = excluded.reshape(-1) if (keep_masked and excluded is not None) else None
        _normalize_rows(imgs.reshape(-1, 3), out.view(-1, 3), source, target, keep_rows, kernels)
    else:
        rows = imgs.shape[1] * imgs.shape[2]
        kernels[torch.float32] = _Kernel(imgs.device, torch.float32, _chunk_pixels(imgs.device, rows))
        for i in range(imgs.shape[0]):
            flat = imgs[i].reshape(-1, 3)
            ex = None if excluded is None else excluded[i].reshape(-1)
            gram = _gram(flat, ex, kernels[torch.float32])
            stats = _stats_from_gram(gram, f"image {i}" + ("" if ex is None else " outside mask_out"))
            _normalize_rows(flat, out[i].view(-1, 3), stats, target, ex if keep_masked else None, kernels)
    return out[0] if single else out


def reinhard_numpy(
    img: NDArray[np.uint8],
    target: ReinhardStats,
    *,
    source: ReinhardStats | None = None,
    mask_out: NDArray[np.bool_] | None = None,
    keep_masked: bool = False,
) -> NDArray[np.uint8]:
    """:func:`reinhard` for numpy arrays on CPU: ``(H, W, 3)`` or ``(B, H, W, 3)`` uint8 in/out."""
    if not isinstance(img, np.ndarray):
        raise TypeError(f"img must be a numpy array, got {type(img).__name__}")
    out = reinhard(img, target, source=source, mask_out=mask_out, keep_masked=keep_masked)
    result: NDArray[np.uint8] = out.numpy()
    return result


def _read_rgb(path: Path) -> NDArray[np.uint8]:
    """An image file as (H, W, 3) uint8 RGB; transparency is composited onto white."""
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"reference image not found: {path}")
    try:
        with Image.open(path) as src:
            src.load()
            if src.mode in ("RGBA", "LA", "PA", "P") or "transparency" in src.info:
                arr = np.asarray(src.convert("RGBA"))
            elif src.mode != "RGB":
                arr = np.asarray(src.convert("RGB"))
            else:
                arr = np.asarray(src)
    except (UnidentifiedImageError, OSError) as exc:
        if path.suffix.lower() not in (".tif", ".tiff"):
            raise ValueError(f"cannot read reference image {path}: {exc}") from exc
        import tifffile

        try:
            arr = np.asarray(tifffile.imread(path))
        except Exception as exc2:
            raise ValueError(f"cannot read reference image {path}: {exc2}") from exc2
    if arr.dtype != np.uint8:
        raise ValueError(f"reference image {path} must be 8-bit RGB, got dtype {arr.dtype}")
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise ValueError(f"reference image {path} must be RGB(A), got shape {arr.shape}")
    if arr.shape[2] == 4:
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = np.rint(arr[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    return np.ascontiguousarray(arr)


def reference_stats(
    image_or_path: str | os.PathLike[str] | Images,
    *,
    mask_glass: bool = True,
    min_brightness: int = _DEFAULT_MIN_BRIGHTNESS,
    max_saturation: float = _DEFAULT_MAX_SATURATION,
) -> ReinhardStats:
    """Target statistics of a reference image (PNG/JPEG/TIFF file or ``(H, W, 3)`` uint8 array).

    With ``mask_glass`` (default) background glass (:func:`glass_mask`, with ``min_brightness`` and
    ``max_saturation``) is left out, so the statistics describe the stained cells.
    """
    if isinstance(image_or_path, (str, os.PathLike)):
        path = Path(image_or_path)
        image: Images = _read_rgb(path)
        what = f"reference image {path}"
    else:
        image = image_or_path
        what = "the reference image"
    imgs, single = _as_images(image)
    if not single:
        raise ValueError(f"reference_stats takes one (H, W, 3) image, got shape {tuple(imgs.shape)}")
    mask = (
        glass_mask(imgs, min_brightness=min_brightness, max_saturation=max_saturation) if mask_glass else None
    )
    if mask is not None and bool(mask.all()):
        raise ValueError(f"{what} is all background glass; pass mask_glass=False or another image")
    try:
        return lab_stats(imgs, mask=mask)
    except ValueError as exc:
        raise ValueError(f"{what}: {exc}") from exc
