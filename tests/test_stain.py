"""Reinhard normalization: parity with HistomicsTK, batching, statistics, glass mask, errors."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.typing import NDArray

from wsi_screen import stain
from wsi_screen.stain import (
    ReinhardStats,
    glass_mask,
    lab_stats,
    reference_stats,
    reinhard,
    reinhard_numpy,
)

# HistomicsTK's example target (its tutorials' H&E reference) and a bluer, Pap-like one.
TARGETS = {
    "htk-he": ReinhardStats(
        mu=(8.63234435, -0.11501964, 0.03868433), sigma=(0.57506023, 0.10403329, 0.01364062)
    ),
    "pap": ReinhardStats(mu=(8.9, -0.05, -0.02), sigma=(0.45, 0.06, 0.03)),
}
HtkReinhard = Callable[..., NDArray[np.uint8]]
PARITY = 0.999  # fraction of pixels that must agree with HistomicsTK within one grey level


# ---------------------------------------------------------------------------------------------------
# Helpers


def synthetic_tile(seed: int, size: tuple[int, int] = (96, 128)) -> NDArray[np.uint8]:
    """A cytology-like tile: noisy glass, coloured cells with dark nuclei, pure 0/255 specks, noise."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = rng.normal(240, 4, (h, w, 3)) + rng.normal(0, 3, 3)  # glass with a slight tint
    yy, xx = np.mgrid[:h, :w]
    for _ in range(rng.integers(2, 6)):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(8, 30)
        cell = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        img[cell] = rng.choice([[220, 150, 180], [150, 200, 210], [200, 190, 120]]) + rng.normal(
            0, 8, (cell.sum(), 3)
        )
        nucleus = (yy - cy) ** 2 + (xx - cx) ** 2 < (r // 3) ** 2
        img[nucleus] = rng.uniform(20, 90, 3) + rng.normal(0, 6, (nucleus.sum(), 3))
    img[: h // 8, : w // 8] = rng.integers(0, 256, (h // 8, w // 8, 3))  # uniform noise patch
    img[-3:, :] = np.linspace(0, 255, w)[None, :, None]  # grey ramp incl. 0 and 255
    flat = img.reshape(-1, 3)
    idx = rng.choice(flat.shape[0], 40, replace=False)
    flat[idx[:10]] = 0  # pure black: HistomicsTK's lms == 0 → eps rule
    flat[idx[10:20]] = 255  # saturated white
    flat[idx[20:30], 0] = 0  # one channel at 0
    flat[idx[30:], 2] = 255
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def within_one(ours: NDArray[np.uint8], ref: NDArray[np.uint8]) -> tuple[float, int]:
    """Fraction of values within one grey level, and the largest difference."""
    assert ours.shape == ref.shape
    assert ours.dtype == np.uint8
    d = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
    return float(np.mean(d <= 1)), int(d.max())


def assert_parity(ours: NDArray[np.uint8], ref: NDArray[np.uint8]) -> None:
    frac, worst = within_one(ours, ref)
    assert frac >= PARITY, f"only {frac:.5%} of values within one grey level (max diff {worst})"


# Rounding bounds (docs/testing.md, "Floating-point assertions"). Two evaluations of the same maths that
# differ in chunking, pixel order, thread count or CPU kernels (AVX2/AVX-512/AMX, FMA or not, MKL's
# Intel or AMD code path, CUDA) need not agree bit for bit; these bound how far apart they can be.
U32 = 2.0**-24  # unit roundoff of float32
U64 = 2.0**-53  # unit roundoff of float64
GAMMA3 = 3 * U32 / (1 - 3 * U32)  # a 3-term float32 dot product, any order, with or without FMA


def exact_log_lms(pixels: NDArray[np.uint8]) -> NDArray[np.float64]:
    """log-LMS ``t`` of uint8 RGB pixels (..., 3) in float64: the exact value to ~1e-15."""
    rgb = pixels.reshape(-1, 3).astype(np.float64)
    t: NDArray[np.float64] = np.log(np.maximum(rgb @ stain._RGB2LMS.T, stain._EPS))
    return t


def log_lms_error(t: NDArray[np.float64]) -> NDArray[np.float64]:
    """Bound on |float32 log-LMS − exact| per value, for every kernel the code may run.

    ``M1 · rgb`` has three positive terms (rgb and the float32 ``M1`` are exact inputs), so any order,
    with or without FMA, is within ``γ3`` relatively; ``log`` of that is within ``γ3`` absolutely, and
    every log implementation used (SLEEF u10, MKL VML HA, glibc, CUDA ``logf``) is within 1 ulp.
    """
    ulp = np.spacing(np.abs(t).astype(np.float32) * np.float32(1.0001))  # binade above, near 2^k
    return GAMMA3 + ulp.astype(np.float64)


def stats_tolerance(
    images: NDArray[np.uint8], mask: NDArray[np.bool_] | None = None
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Bounds on |Δμ| and |Δσ| (per lαβ channel) between two :func:`lab_stats` of the same pixels.

    float32 part: each pixel's ``t`` moves by at most ``2 ε`` (``ε`` = :func:`log_lms_error`), so its
    lαβ value by ``e = |L| · 2ε``; a mean moves by at most ``mean(e)``, and σ (the RMS of the
    deviations from the mean) by at most ``RMS(e)``. float64 part: the Gram entries are sums of products
    of float32 values, which are exact in float64 (48 ≤ 53 bits); a sum of N terms in any order (dgemm
    blocking, threads, chunk partial sums) is within ``γ_{N-1} Σ|x|`` of the exact one, twice that
    between two runs (``γ_{N+8}`` also covers the fixed 3×3 float64 algebra that follows); it reaches σ
    through ``cov = G/n − m mᵀ`` and ``|Δσ| ≤ |Δvar| / σ``. Exact float64 (e.g. HistomicsTK) counts as a
    run. 1 % covers second-order terms. Masked rows are summed as exact zeros: N counts them.
    """
    n_rows = images.size // 3
    t = exact_log_lms(images)
    if mask is not None:
        t = t[~mask.reshape(-1)]
    absl = np.abs(stain._LMS2LAB)
    e = (2 * log_lms_error(t)) @ absl.T
    tol_mu, tol_sigma = e.mean(axis=0), np.sqrt((e * e).mean(axis=0))
    g = 2 * (n_rows + 8) * U64 / (1 - (n_rows + 8) * U64)
    tt = np.abs(np.c_[t, np.ones(len(t))])
    s = tt.T @ tt / len(t)  # mean |t_a t_b|
    m = t.mean(axis=0)
    cov = np.cov(t.T, bias=True)
    dm = g * s[:3, 3]
    dcov = g * s[:3, :3] + g * np.abs(np.outer(m, m)) + np.outer(np.abs(m), dm) + np.outer(dm, np.abs(m))
    sigma = np.sqrt(np.diag(stain._LMS2LAB @ cov @ stain._LMS2LAB.T))
    tol_mu = tol_mu + absl @ dm + g * (absl @ np.abs(m))
    tol_sigma = tol_sigma + np.diag(absl @ (dcov + g * np.abs(cov)) @ absl.T) / sigma
    return 1.01 * tol_mu, 1.01 * tol_sigma


def assert_stats_close(
    got: ReinhardStats, want: ReinhardStats, tol: tuple[NDArray[np.float64], NDArray[np.float64]]
) -> None:
    for name, a, b, bound in (("mu", got.mu, want.mu, tol[0]), ("sigma", got.sigma, want.sigma, tol[1])):
        d = np.abs(np.subtract(a, b))
        assert np.all(d <= bound), f"{name} differs by {d} > rounding bound {bound}: {a} vs {b}"


def exact_stats(img: NDArray[np.uint8], mask: NDArray[np.bool_] | None = None) -> ReinhardStats:
    """lαβ mean and population std in float64 over the pixels not in ``mask``."""
    t = exact_log_lms(img)
    if mask is not None:
        t = t[~mask.reshape(-1)]
    lab = t @ stain._LMS2LAB.T
    return ReinhardStats(mu=tuple(lab.mean(axis=0)), sigma=tuple(lab.std(axis=0)))


def reinhard_error(
    img: NDArray[np.uint8],
    target: ReinhardStats,
    source: ReinhardStats,
    stats_error: tuple[NDArray[np.float64] | float, NDArray[np.float64] | float],
) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
    """Exact pre-truncation output ``y`` (N, 3) and a bound ``D`` on |float32 run − y| per value.

    ``stats_error``: how far the run's source statistics may be from ``source`` (0 for given ones).
    In lαβ, ``l' = s (l − μ_s) + μ_t`` with ``s = σ_t / σ_s``, so ``|Δl'| ≤ s (|l − μ_s| Δσ/σ + Δμ + |Δl|)``
    (``Δl`` from :func:`log_lms_error`), and ``z = L⁻¹ l'``. Rounding adds ``(γ3 + u)·|A||t|`` to ``z``
    (3-term product, A rounded to float32); ``exp`` adds 1 ulp (2u) and the float32 ``M2`` u, relatively;
    the 3-term ``M2 · exp(z)`` with mixed signs is within ``γ3 Σ|M2| exp(z)``. So
    ``D = Σ_k |M2_ik| exp(z_k) (|Δz_k| + 3u + γ3)`` (+1 % for second-order terms). Clipping is
    1-Lipschitz; a truncated value can only change where an integer lies within ``D`` of ``y``.
    """
    a, c = stain._affine(source, target)
    assert stain._can_fold_in_float32(a, c), "the bound is for the folded float32 path"
    t = exact_log_lms(img)
    lab = t @ stain._LMS2LAB.T
    dmu, dsigma = (np.broadcast_to(np.asarray(v, np.float64), (3,)) for v in stats_error)
    s = np.asarray(target.sigma) / np.asarray(source.sigma)
    dl = log_lms_error(t) @ np.abs(stain._LMS2LAB).T
    dlp = s * (np.abs(lab - np.asarray(source.mu)) * dsigma / np.asarray(source.sigma) + dmu + dl)
    z = t @ a.T + c
    dz = dlp @ np.abs(stain._LAB2LMS).T + (GAMMA3 + U32) * (np.abs(t) @ np.abs(a).T)
    ez = np.exp(z)
    y = np.clip(ez @ stain._LMS2RGB.T, 0.0, 255.0)
    bound = ((dz + 3 * U32 + GAMMA3) * ez) @ np.abs(stain._LMS2RGB).T
    return y.reshape(img.shape), 1.01 * bound.reshape(img.shape)


def assert_equal_but_rounding(
    a: NDArray[np.uint8], b: NDArray[np.uint8], y: NDArray[np.float64], bound: NDArray[np.float64]
) -> None:
    """Two float32 runs of the same normalization: equal except where rounding may cross an integer.

    Both runs are within ``bound`` of the exact ``y`` (:func:`reinhard_error`), so a value can differ
    only where an integer lies within ``bound`` of ``y``, and (``bound < 0.5``) by one grey level.
    """
    assert bound.max() < 0.5
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert d.max() <= 1
    near = np.abs(y - np.rint(y)) <= bound
    assert np.all(near[d > 0]), f"{int((~near & (d > 0)).sum())} values differ away from any rounding edge"


def htk_masked_stats(img: NDArray[np.uint8], mask_out: NDArray[np.bool_] | None) -> ReinhardStats:
    """HistomicsTK's own lαβ statistics (float64 numpy) over the pixels not in ``mask_out``."""
    from histomicstk.preprocessing.color_conversion import rgb_to_lab

    lab = rgb_to_lab(img).reshape(-1, 3)
    if mask_out is not None:
        lab = lab[~mask_out.reshape(-1)]
    return ReinhardStats(mu=tuple(lab.mean(0)), sigma=tuple(lab.std(0)))


@pytest.fixture(scope="module")
def htk_reinhard() -> HtkReinhard:
    """HistomicsTK's ``reinhard`` (skips when HistomicsTK is not installed)."""
    mod = pytest.importorskip("histomicstk.preprocessing.color_normalization")
    fn: HtkReinhard = mod.reinhard
    return fn


@pytest.fixture(scope="module")
def cmu_tiles(shared_slides: Path) -> NDArray[np.uint8]:
    """Four 256×256 regions of the real Aperio slide (from 97 % to 9 % glass) plus one at 1 µm/px."""
    from wsi_screen.slide import open_slide

    with open_slide(shared_slides / "cmu-1-small-region.svs") as slide:
        tiles = [
            slide.read_region(xy, (256, 256), mpp=slide.mpp)
            for xy in [(0, 0), (900, 300), (600, 900), (1500, 2500)]
        ]
        tiles.append(slide.read_region((800, 1000), (256, 256), mpp=1.0))
    return np.stack(tiles)


@pytest.fixture(scope="module")
def herlev_crops(shared_data: Path) -> list[NDArray[np.uint8]]:
    """Every 12th Herlev crop (all seven classes), real Pap-stained cells."""
    from PIL import Image

    files = sorted((shared_data / "herlev").glob("*/*.jpeg"))
    if not files:
        pytest.skip("no Herlev crops in ../shared/data/herlev")
    crops = []
    for f in files[::12]:
        with Image.open(f) as im:
            crops.append(np.asarray(im.convert("RGB")))
    return crops


# ---------------------------------------------------------------------------------------------------
# ReinhardStats


def test_stats_round_trip_through_json() -> None:
    stats = ReinhardStats(mu=np.array([8.6, -0.11, 0.038]), sigma=[0.57, 1, 0.013])  # type: ignore[arg-type]
    assert stats.mu == (8.6, -0.11, 0.038)
    assert stats.sigma == (0.57, 1.0, 0.013)
    assert all(type(v) is float for v in stats.mu + stats.sigma)
    again = ReinhardStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again == stats
    assert hash(again) == hash(stats)


@pytest.mark.parametrize(
    ("data", "error", "needle"),
    [
        ({"mu": [1, 2, 3]}, ValueError, "missing ['sigma']"),
        ({"mu": [1, 2, 3], "sigma": [1, 1, 1], "sigmas": 1}, ValueError, "unknown ['sigmas']"),
        ({"mu": [1, 2], "sigma": [1, 1, 1]}, ValueError, "got 2"),
        ({"mu": [1, 2, 3], "sigma": [1, 0, 1]}, ValueError, "sigma[1] must be > 0, got 0.0"),
        ({"mu": [1, 2, 3], "sigma": [1, 1, -0.5]}, ValueError, "sigma[2] must be > 0, got -0.5"),
        ({"mu": [1, float("nan"), 3], "sigma": [1, 1, 1]}, ValueError, "mu[1] must be finite, got nan"),
        ({"mu": [1, 2, 3], "sigma": [1, math.inf, 1]}, ValueError, "sigma[1] must be finite, got inf"),
        ({"mu": [1, "2", 3], "sigma": [1, 1, 1]}, TypeError, "mu[1] must be a number, got '2'"),
        ({"mu": [True, 2, 3], "sigma": [1, 1, 1]}, TypeError, "mu[0] must be a number, got True"),
        ({"mu": "abc", "sigma": [1, 1, 1]}, TypeError, "mu must be a sequence of 3 numbers"),
        ([1, 2, 3], TypeError, "must be a mapping"),
    ],
)
def test_invalid_stats_are_refused(data: object, error: type[Exception], needle: str) -> None:
    with pytest.raises(error) as info:
        ReinhardStats.from_dict(data)  # type: ignore[arg-type]
    assert needle in str(info.value)


# ---------------------------------------------------------------------------------------------------
# Parity with HistomicsTK


def test_lab_stats_match_histomicstk_float64() -> None:
    pytest.importorskip("histomicstk")
    img = synthetic_tile(1)
    glass = glass_mask(img).numpy()
    for mask in (None, glass):
        # float32 log-LMS against float64: within the rounding bound of two runs (stats_tolerance).
        assert_stats_close(lab_stats(img, mask=mask), htk_masked_stats(img, mask), stats_tolerance(img, mask))


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", sorted(TARGETS))
def test_synthetic_parity_per_image_stats(htk_reinhard: HtkReinhard, seed: int, target: str) -> None:
    img = synthetic_tile(seed)
    t = TARGETS[target]
    assert_parity(reinhard_numpy(img, t), htk_reinhard(img, np.array(t.mu), np.array(t.sigma)))


@pytest.mark.parametrize("seed", range(4))
def test_synthetic_parity_given_source(htk_reinhard: HtkReinhard, seed: int) -> None:
    imgs = np.stack([synthetic_tile(seed), synthetic_tile(seed + 10)])
    source = lab_stats(imgs, mask=glass_mask(imgs))
    t = TARGETS["pap"]
    ours = reinhard_numpy(imgs, t, source=source)
    for i, img in enumerate(imgs):
        ref = htk_reinhard(
            img, np.array(t.mu), np.array(t.sigma), src_mu=list(source.mu), src_sigma=list(source.sigma)
        )
        assert_parity(ours[i], ref)


@pytest.mark.parametrize("seed", range(4))
def test_synthetic_parity_mask_out(htk_reinhard: HtkReinhard, seed: int) -> None:
    img = synthetic_tile(seed)
    mask = glass_mask(img).numpy()
    assert 0.2 < mask.mean() < 0.98
    t = TARGETS["htk-he"]
    ref = htk_reinhard(img, np.array(t.mu), np.array(t.sigma), mask_out=mask)
    ours = reinhard_numpy(img, t, mask_out=mask, keep_masked=True)
    assert_parity(ours, ref)
    np.testing.assert_array_equal(ours[mask], img[mask])  # masked pixels untouched, like HistomicsTK
    # Default: the mask only shapes the statistics, every pixel is normalized.
    stats = htk_masked_stats(img, mask)
    ref_all = htk_reinhard(
        img, np.array(t.mu), np.array(t.sigma), src_mu=list(stats.mu), src_sigma=list(stats.sigma)
    )
    assert_parity(reinhard_numpy(img, t, mask_out=mask), ref_all)


def test_identity_normalization_truncates_like_histomicstk(htk_reinhard: HtkReinhard) -> None:
    img = synthetic_tile(7)
    own = lab_stats(img)
    ours = reinhard_numpy(img, own)  # target == source: only the float round trip and truncation remain
    assert_parity(ours, htk_reinhard(img, np.array(own.mu), np.array(own.sigma)))
    assert np.abs(ours.astype(int) - img).max() <= 1


def test_extreme_stats_fall_back_to_float64(
    htk_reinhard: HtkReinhard, monkeypatch: pytest.MonkeyPatch
) -> None:
    img = synthetic_tile(3)
    s0, s1, s2 = lab_stats(img).sigma
    source = ReinhardStats(mu=lab_stats(img).mu, sigma=(s0 / 100, s1 / 100, s2 / 100))  # exp(> 88)
    t = TARGETS["htk-he"]
    assert not stain._can_fold_in_float32(*stain._affine(source, t))
    with np.errstate(over="ignore", invalid="ignore"):
        ref = htk_reinhard(
            img, np.array(t.mu), np.array(t.sigma), src_mu=list(source.mu), src_sigma=list(source.sigma)
        )
    assert_parity(reinhard_numpy(img, t, source=source), ref)
    # Forcing float32 overflows: the fallback is what keeps parity.
    monkeypatch.setattr(stain, "_can_fold_in_float32", lambda a, c: True)
    assert within_one(reinhard_numpy(img, t, source=source), ref)[0] < 0.9


def near_uniform_glass(seed: int = 0) -> NDArray[np.uint8]:
    """Blank glass with ±1 grey level of noise: tiny σ, so the normalization scales by ~100×."""
    rng = np.random.default_rng(seed)
    tint = np.array([0, 1, 2])
    img: NDArray[np.uint8] = np.clip(np.rint(rng.normal(241, 0.7, (64, 64, 3)) + tint), 0, 255).astype(
        np.uint8
    )
    return img


def test_near_uniform_glass_parity(
    htk_reinhard: HtkReinhard, shared_slides: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Per-image statistics of an all-glass tile: huge scaling that overflows a folded float32 map."""
    from wsi_screen.slide import open_slide

    with open_slide(shared_slides / "cmu-1-small-region.svs") as slide:
        real_glass = slide.read_region((0, 2048), (256, 256), mpp=slide.mpp)
    t = TARGETS["pap"]
    mu, sigma = np.array(t.mu), np.array(t.sigma)
    for img in (near_uniform_glass(), real_glass):
        own = lab_stats(img)
        assert max(own.sigma) < 0.005
        assert not stain._can_fold_in_float32(*stain._affine(own, t))
        assert_parity(reinhard_numpy(img, t), htk_reinhard(img, mu, sigma))
    monkeypatch.setattr(stain, "_can_fold_in_float32", lambda a, c: True)  # the bug this guards against
    assert within_one(reinhard_numpy(real_glass, t), htk_reinhard(real_glass, mu, sigma))[0] < 0.5


def test_real_slide_tiles_parity(htk_reinhard: HtkReinhard, cmu_tiles: NDArray[np.uint8]) -> None:
    t = TARGETS["pap"]
    per_image = reinhard_numpy(cmu_tiles, t)
    glass = glass_mask(cmu_tiles).numpy()
    assert 0.0 < glass.mean() < 1.0
    masked = reinhard_numpy(cmu_tiles, t, mask_out=glass, keep_masked=True)
    source = lab_stats(cmu_tiles, mask=glass)
    given = reinhard_numpy(cmu_tiles, t, source=source)
    mu, sigma = np.array(t.mu), np.array(t.sigma)
    for i, tile in enumerate(cmu_tiles):
        assert_parity(per_image[i], htk_reinhard(tile, mu, sigma))
        assert_parity(masked[i], htk_reinhard(tile, mu, sigma, mask_out=glass[i]))
        ref = htk_reinhard(tile, mu, sigma, src_mu=list(source.mu), src_sigma=list(source.sigma))
        assert_parity(given[i], ref)


def test_herlev_crops_parity(htk_reinhard: HtkReinhard, herlev_crops: list[NDArray[np.uint8]]) -> None:
    t = TARGETS["pap"]
    mu, sigma = np.array(t.mu), np.array(t.sigma)
    source = lab_stats(herlev_crops[0])
    checked_mask = 0
    for crop in herlev_crops:
        assert_parity(reinhard_numpy(crop, t), htk_reinhard(crop, mu, sigma))
        ref = htk_reinhard(crop, mu, sigma, src_mu=list(source.mu), src_sigma=list(source.sigma))
        assert_parity(reinhard_numpy(crop, t, source=source), ref)
        dark = crop.max(axis=-1) < 120  # a mask that leaves out nuclei (Herlev crops have little glass)
        if 0.05 < dark.mean() < 0.95:
            checked_mask += 1
            ref = htk_reinhard(crop, mu, sigma, mask_out=dark)
            assert_parity(reinhard_numpy(crop, t, mask_out=dark, keep_masked=True), ref)
    assert checked_mask >= 10


# ---------------------------------------------------------------------------------------------------
# Batching, layouts, code paths


def test_batch_equals_single_images() -> None:
    imgs = np.stack([synthetic_tile(s) for s in range(3)])
    masks = glass_mask(imgs).numpy()
    t = TARGETS["pap"]
    source = lab_stats(imgs, mask=masks)
    batch = reinhard(torch.from_numpy(imgs), t)
    batch_src = reinhard(imgs, t, source=source)
    batch_mask = reinhard(imgs, t, mask_out=masks, keep_masked=True)
    for i, img in enumerate(imgs):
        # Per-image statistics: each image runs alone, with the chunk size of its own pixel count,
        # through the same kernels on the same values as a single image: bit for bit the same.
        assert torch.equal(batch[i], reinhard(torch.from_numpy(img), t))
        assert torch.equal(batch_mask[i], reinhard(img, t, mask_out=masks[i], keep_masked=True))
        # A shared source normalizes the whole batch as one run of pixels: other chunks, other
        # thread splits, so equal up to float32 rounding only.
        y, bound = reinhard_error(img, t, source, (0.0, 0.0))
        assert_equal_but_rounding(batch_src[i].numpy(), reinhard(img, t, source=source).numpy(), y, bound)


def test_shapes_dtypes_and_layouts() -> None:
    img = synthetic_tile(2, (64, 80))
    t = TARGETS["pap"]
    out = reinhard(torch.from_numpy(img), t)
    assert out.shape == (64, 80, 3)
    assert out.dtype == torch.uint8
    assert out.device.type == "cpu"
    # Non-contiguous views, read-only numpy arrays and an (H, W) mask broadcast over the batch.
    big = torch.from_numpy(np.stack([synthetic_tile(2, (64, 160))] * 2))
    view = big[:, :, ::2]
    assert not view.is_contiguous()
    source = lab_stats(img)
    # Same shapes and values, so the same chunks and kernels: exactly equal (layouts are copied first).
    assert torch.equal(reinhard(view, t, source=source), reinhard(view.contiguous(), t, source=source))
    ro = img.copy()
    ro.flags.writeable = False
    assert np.array_equal(reinhard_numpy(ro, t), out.numpy())
    mask = glass_mask(img).numpy()
    batch = np.stack([img, img])
    np.testing.assert_array_equal(
        reinhard_numpy(batch, t, mask_out=mask), reinhard_numpy(batch, t, mask_out=np.stack([mask, mask]))
    )
    assert reinhard(torch.zeros((0, 8, 8, 3), dtype=torch.uint8), t, source=source).shape == (0, 8, 8, 3)


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunking changes only rounding: the float32 kernels may differ by chunk length (MKL picks its
    sgemm kernel by shape; vector tails), and the float64 Gram sums are added in another order, so
    the bounds are those of two runs (stats_tolerance, reinhard_error), not bit equality. They are
    ~2e-6 on μ and σ, while one pixel dropped or counted twice at a chunk edge moves μ_L by ~1e-5
    and σ_L by ~5e-5."""
    imgs = np.stack([synthetic_tile(s) for s in range(2)])
    t = TARGETS["pap"]
    glass = glass_mask(imgs).numpy()
    whole = reinhard_numpy(imgs, t, mask_out=glass)
    stats = lab_stats(imgs)
    monkeypatch.setattr(stain, "_CPU_MIN_CHUNK", 1000)  # chunks that do not divide the images
    monkeypatch.setattr(stain, "_CPU_CHUNK_PER_THREAD", 1)
    chunked = reinhard_numpy(imgs, t, mask_out=glass)
    for i, img in enumerate(imgs):  # per-image statistics: each run's are within half the two-run bound
        tol_mu, tol_sigma = stats_tolerance(img, glass[i])
        y, bound = reinhard_error(img, t, exact_stats(img, glass[i]), (tol_mu / 2, tol_sigma / 2))
        assert_equal_but_rounding(chunked[i], whole[i], y, bound)
    assert_stats_close(lab_stats(imgs), stats, stats_tolerance(imgs))


def test_elementwise_path_matches_matmul_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The path used on GPUs and when float32 matmul is lowered to bf16/tf32 by a global flag."""
    imgs = np.stack([synthetic_tile(s) for s in range(2)])
    t = TARGETS["htk-he"]
    mm = reinhard_numpy(imgs, t)
    monkeypatch.setattr(stain, "_cpu_float32_mm_is_exact", lambda: False)
    elementwise = reinhard_numpy(imgs, t)
    for i, img in enumerate(imgs):  # the same maths rounded differently (e.g. FMA or not)
        tol_mu, tol_sigma = stats_tolerance(img)
        y, bound = reinhard_error(img, t, exact_stats(img), (tol_mu / 2, tol_sigma / 2))
        assert_equal_but_rounding(elementwise[i], mm[i], y, bound)


def test_reduced_precision_matmul_flag_is_respected() -> None:
    """A global bf16/tf32 float32-matmul setting (common for inference) must not change the result."""
    matmul = getattr(torch.backends.mkldnn, "matmul", None)
    if matmul is None or not hasattr(matmul, "fp32_precision"):
        pytest.skip("this torch has no torch.backends.mkldnn.matmul.fp32_precision")
    img = synthetic_tile(8)
    t = TARGETS["pap"]
    exact = reinhard_numpy(img, t)
    old = matmul.fp32_precision
    try:
        matmul.fp32_precision = "bf16"
        assert not stain._cpu_float32_mm_is_exact()
        # The elementwise float32 path: rounding differences only, never bf16 ones (~1 % of y).
        tol_mu, tol_sigma = stats_tolerance(img)
        y, bound = reinhard_error(img, t, exact_stats(img), (tol_mu / 2, tol_sigma / 2))
        assert_equal_but_rounding(reinhard_numpy(img, t), exact, y, bound)
    finally:
        matmul.fp32_precision = old
    assert stain._cpu_float32_mm_is_exact()


def test_lab_stats_pool_the_batch() -> None:
    a, b = synthetic_tile(4), synthetic_tile(5)
    pooled = lab_stats(np.stack([a, b]))
    side_by_side = lab_stats(np.concatenate([a, b], axis=1))
    # The same pixels in another order: other chunks and summation order, same rounding bound.
    assert_stats_close(pooled, side_by_side, stats_tolerance(np.stack([a, b])))
    mask = np.zeros(a.shape[:2], dtype=bool)
    mask[:, a.shape[1] // 2 :] = True
    half = lab_stats(a, mask=mask)
    assert_stats_close(
        half, lab_stats(np.ascontiguousarray(a[:, : a.shape[1] // 2])), stats_tolerance(a, mask)
    )


# ---------------------------------------------------------------------------------------------------
# Glass mask and reference statistics


def test_glass_mask_on_known_pixels() -> None:
    pixels = np.array(
        [
            [245, 245, 245],  # glass
            [255, 255, 255],  # saturated white: glass
            [250, 240, 245],  # saturation 0.04: glass
            [230, 200, 230],  # pale pink cytoplasm, saturation 0.13: not glass
            [150, 150, 150],  # grey but dark: not glass
            [0, 0, 0],
            [200, 200, 200],  # exactly at the brightness threshold: glass
        ],
        dtype=np.uint8,
    )[None]
    assert glass_mask(pixels)[0].tolist() == [True, True, True, False, False, False, True]
    assert glass_mask(pixels, max_saturation=0.15)[0].tolist()[3] is True
    assert glass_mask(pixels, min_brightness=246)[0].tolist()[:3] == [False, True, True]
    batch = glass_mask(np.stack([pixels, pixels]))
    assert batch.shape == (2, 1, 7)
    assert batch.dtype == torch.bool


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"min_brightness": 256}, ValueError),
        ({"min_brightness": 1.5}, TypeError),
        ({"max_saturation": -0.1}, ValueError),
    ],
)
def test_glass_mask_rejects_bad_parameters(kwargs: dict[str, float], error: type[Exception]) -> None:
    with pytest.raises(error, match=str(next(iter(kwargs.values())))):
        glass_mask(synthetic_tile(0), **kwargs)  # type: ignore[arg-type]


def test_reference_stats_from_files_and_arrays(tmp_path: Path) -> None:
    import tifffile
    from PIL import Image

    img = synthetic_tile(6)
    expected = lab_stats(img, mask=glass_mask(img))
    assert reference_stats(img) == expected
    assert reference_stats(img, mask_glass=False) == lab_stats(img)
    Image.fromarray(img).save(tmp_path / "ref.png")
    tifffile.imwrite(tmp_path / "ref.tiff", img, photometric="rgb")
    assert reference_stats(tmp_path / "ref.png") == expected
    assert reference_stats(str(tmp_path / "ref.tiff")) == expected
    Image.fromarray(img).save(tmp_path / "ref.jpg", quality=95)
    with Image.open(tmp_path / "ref.jpg") as im:
        decoded = np.asarray(im)
    assert reference_stats(tmp_path / "ref.jpg") == reference_stats(decoded)
    # Transparent pixels are composited onto white (glass), so they drop out with the glass mask.
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])
    rgba[:, :20, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    composited = img.copy()
    composited[:, :20] = 255
    assert reference_stats(tmp_path / "rgba.png") == reference_stats(composited)


def test_reference_stats_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        reference_stats(tmp_path / "nope.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"bad\.png"):
        reference_stats(tmp_path / "bad.png")
    glass = np.full((16, 16, 3), 242, np.uint8)
    with pytest.raises(ValueError, match="all background glass"):
        reference_stats(glass)
    with pytest.raises(ValueError, match="uniform"):
        reference_stats(glass, mask_glass=False)
    with pytest.raises(ValueError, match="one"):
        reference_stats(np.stack([synthetic_tile(0)] * 2))


# ---------------------------------------------------------------------------------------------------
# Errors


def test_bad_inputs_name_the_bad_value() -> None:
    t = TARGETS["pap"]
    img = synthetic_tile(0)
    with pytest.raises(TypeError, match="float32"):
        reinhard(torch.zeros((4, 4, 3)), t)
    with pytest.raises(ValueError, match=r"\(4, 4, 4\)"):
        reinhard(torch.zeros((4, 4, 4), dtype=torch.uint8), t)
    with pytest.raises(ValueError, match=r"mask_out has shape \(3, 3\)"):
        reinhard(img, t, mask_out=np.zeros((3, 3), bool))
    with pytest.raises(TypeError, match="mask_out must be a boolean mask"):
        reinhard(img, t, mask_out=np.zeros(img.shape[:2], np.uint8))
    with pytest.raises(ValueError, match="keep_masked=True needs a mask_out"):
        reinhard(img, t, keep_masked=True)
    with pytest.raises(TypeError, match="target must be ReinhardStats"):
        reinhard(img, {"mu": [1, 2, 3], "sigma": [1, 1, 1]})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="img must be a numpy array"):
        reinhard_numpy(torch.from_numpy(img), t)  # type: ignore[arg-type]


def test_degenerate_images_are_refused_with_their_index() -> None:
    t = TARGETS["pap"]
    imgs = np.stack([synthetic_tile(0), synthetic_tile(1)])
    mask = np.zeros(imgs.shape[:3], bool)
    mask[1] = True
    with pytest.raises(ValueError, match="image 1 outside mask_out"):
        reinhard(imgs, t, mask_out=mask)
    imgs[1] = 255  # a uniform tile (e.g. padding beyond the slide edge)
    with pytest.raises(ValueError, match="image 1 is uniform"):
        reinhard(imgs, t)
    # With slide-level source statistics a uniform tile is fine.
    out = reinhard(imgs, t, source=lab_stats(imgs[:1]))
    assert len(torch.unique(out[1].reshape(-1, 3), dim=0)) == 1
    with pytest.raises(ValueError, match="no pixels left"):
        lab_stats(imgs, mask=np.ones(imgs.shape[:3], bool))


# ---------------------------------------------------------------------------------------------------
# GPU


@pytest.mark.gpu
def test_cuda_matches_cpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    imgs = torch.from_numpy(np.stack([synthetic_tile(s, (256, 256)) for s in range(4)]))
    mask = glass_mask(imgs)
    t = TARGETS["pap"]
    gpu = imgs.cuda()
    assert glass_mask(gpu).cpu().equal(mask)
    source_cpu, source_gpu = lab_stats(imgs, mask=mask), lab_stats(gpu, mask=mask.numpy())
    # CUDA logf is within 1 ulp and cuBLAS dgemm sums in its own order: the same two-run bound.
    assert_stats_close(source_gpu, source_cpu, stats_tolerance(imgs.numpy(), mask.numpy()))
    for kwargs in ({}, {"source": source_cpu}, {"mask_out": mask, "keep_masked": True}):
        out = reinhard(gpu, t, **kwargs)
        assert out.device == gpu.device
        assert_parity(out.cpu().numpy(), reinhard(imgs, t, **kwargs).numpy())
    # TF32 matmuls (a common global speed setting) must not change the result.
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert_parity(reinhard(gpu, t).cpu().numpy(), reinhard(imgs, t).numpy())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
