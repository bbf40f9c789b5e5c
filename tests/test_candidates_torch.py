"""The torch candidate path (``wsi_screen.candidates_torch``) against the CPU path, on the CPU.

Its building blocks equal scipy/scikit-image exactly (components, distance transform, the watershed
flood); the whole path agrees with ``extract_candidates`` on the same maps to the bar of issue 16 —
≥ 99 % of the nuclei matched one to one within 1 µm with their area within 5 % — on synthetic crowded
fields (always) and on the shipped localizer's maps of real crowded fields (when the shared data is
there). The same torch code runs on CUDA (``gpu`` marker).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pipeline_scripts import load_pipeline
from scipy import ndimage

from wsi_screen.candidates import extract_candidates
from wsi_screen.candidates_torch import (
    _NEIGHBOURS_4,
    _component_ids,
    _components,
    _edt2,
    _flood,
    _Pixels,
    extract_candidates_torch,
)
from wsi_screen.cells import MORPHOMETRICS
from wsi_screen.config import LocalizationSettings
from wsi_screen.errors import ConfigError

CPU = torch.device("cpu")


bench = load_pipeline("bench_candidates")


def _cc(mask: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """Label image of ``_components`` (ids 1.. in order of the roots), as ndimage.label numbers them."""
    pix = _Pixels(torch.from_numpy(mask)[None])
    u, v = pix.edges(connectivity)
    root = _components(pix.n, u, v)
    _, ids = torch.unique(root, return_inverse=True)
    out = np.zeros(mask.size, np.int64)
    out[pix.pos.numpy()] = ids.numpy() + 1
    return out.reshape(mask.shape)


def _random_masks(rng: np.random.Generator, n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        h, w = (int(v) for v in rng.integers(8, 90, 2))
        noise = ndimage.gaussian_filter(rng.random((h, w)), float(rng.uniform(0.6, 3.0)))
        out.append(noise > np.quantile(noise, float(rng.uniform(0.2, 0.8))))
    return out


def test_components_equal_scipy_labels() -> None:
    """Same components, numbered in the same order (by their first pixel in raster order), 4 and 8."""
    rng = np.random.default_rng(0)
    eight = ndimage.generate_binary_structure(2, 2)
    for mask in _random_masks(rng, 25):
        np.testing.assert_array_equal(_cc(mask, 4), ndimage.label(mask)[0])
        np.testing.assert_array_equal(_cc(mask, 8), ndimage.label(mask, structure=eight)[0])
    spiral = np.zeros((41, 41), bool)  # a serpentine: one long path of 400 px
    spiral[1::4, 1:-1] = True
    for k, r in enumerate(range(1, 37, 4)):
        spiral[r : r + 4, -2 if k % 2 == 0 else 1] = True
    np.testing.assert_array_equal(_cc(spiral), ndimage.label(spiral)[0])
    assert ndimage.label(spiral)[1] == 1


def test_components_never_join_maps_of_a_batch() -> None:
    mask = torch.zeros((3, 6, 6), dtype=torch.bool)
    mask[:, :, 2:] = True  # the same blob in each map, touching the shared edges of the flat layout
    pix = _Pixels(mask)
    u, v = pix.edges(8)
    assert int(torch.unique(_components(pix.n, u, v)).numel()) == 3


def test_squared_distance_transform_equals_scipy() -> None:
    rng = np.random.default_rng(1)
    for mask in _random_masks(rng, 20):
        want = ndimage.distance_transform_edt(mask) ** 2
        cap = int(rng.integers(2, 30))
        got = _edt2(torch.from_numpy(mask)[None], cap)[0].numpy()
        near = want <= cap * cap
        np.testing.assert_array_equal(got[near], np.round(want[near]).astype(np.int64))
        assert np.all(got[~near] == (cap + 1) ** 2)
    # Rows without a background pixel: distances come from the other rows only (scipy's convention).
    full = np.ones((7, 9), bool)
    full[3, 4] = False
    np.testing.assert_array_equal(
        _edt2(torch.from_numpy(full)[None], 20)[0].numpy(),
        np.round(ndimage.distance_transform_edt(full) ** 2),
    )


def test_flood_is_the_scikit_image_watershed() -> None:
    """On reliefs without ties between seeds, the level-parallel flood gives scikit-image's labels
    exactly, plateaus (first in, first out) and seeds below the level included."""
    from skimage.segmentation import watershed

    rng = np.random.default_rng(2)
    for trial in range(12):
        h, w = (int(v) for v in rng.integers(10, 40, 2))
        mask = ndimage.gaussian_filter(rng.random((h, w)), 1.5) > 0.45
        if trial % 2:  # coarse integer relief: wide plateaus
            relief = rng.integers(0, 4, (h, w))
        else:
            relief = rng.permutation(h * w).reshape(h, w)
        markers = np.zeros((h, w), np.int64)
        cand = np.flatnonzero(mask)
        if len(cand) < 3:
            continue
        picks = rng.choice(cand, size=min(len(cand), int(rng.integers(2, 8))), replace=False)
        markers.flat[picks] = np.arange(1, len(picks) + 1)
        if trial % 2:  # no ties between seeds: distinct seed values
            relief.flat[picks] = 10 + np.arange(len(picks))
        want = watershed(-relief.astype(np.float64), markers=markers, mask=mask)
        pix = _Pixels(torch.from_numpy(mask)[None])
        comp = _component_ids(pix.n, *pix.edges(4))
        for schedule in (None, comp):  # by level; per component
            got = _flood(
                pix.neighbours(_NEIGHBOURS_4),
                torch.from_numpy(markers.reshape(-1))[pix.pos],
                torch.from_numpy(relief.reshape(-1).astype(np.int64))[pix.pos],
                schedule,
            )
            out = np.zeros(h * w, np.int64)
            out[pix.pos.numpy()] = got.numpy()
            np.testing.assert_array_equal(out.reshape(h, w), want)


@pytest.mark.parametrize("marker", [True, False], ids=["marker", "distance-peaks"])
def test_both_flood_schedules_give_the_same_candidates(marker: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-component schedule (accelerators) and the per-level one (CPU) are the same queue."""
    import wsi_screen.candidates_torch as ct

    maps = [bench.synthetic_maps(200 + s, size=256, nuclei=90, marker=marker) for s in range(3)]
    runs = []
    for paced in (False, True):
        monkeypatch.setattr(ct, "PACED", paced)
        runs.append(bench.run_torch(maps, batch=3))
    for a, b in zip(*runs, strict=True):
        assert len(a) == len(b) > 0
        np.testing.assert_array_equal(a.x, b.x)
        for name in MORPHOMETRICS:
            np.testing.assert_array_equal(a.morphometrics[name], b.morphometrics[name])


def _torch_one(m: dict[str, Any], **kw: Any) -> Any:
    (c,) = extract_candidates_torch(
        m["nucleus"], marker=m["marker"], cell=m["cell"], od=m["od"], mpp=0.5, **kw
    )
    return c


def test_columns_coordinates_and_simple_shapes() -> None:
    yy, xx = np.mgrid[0:120, 0:160] + 0.5
    a = (xx - 50) ** 2 + (yy - 60) ** 2 <= 14**2
    b = (xx - 76) ** 2 + (yy - 60) ** 2 <= 14**2  # touching a
    c = ((xx - 130) / 12) ** 2 + ((yy - 30) / 6) ** 2 <= 1  # an ellipse alone
    nuc = (a | b | c).astype(np.float32)
    marker = (((xx - 50) ** 2 + (yy - 60) ** 2 <= 25) | ((xx - 76) ** 2 + (yy - 60) ** 2 <= 25)).astype(
        np.float32
    )
    m = {"nucleus": nuc, "marker": marker, "cell": None, "od": (0.5 * nuc).astype(np.float32)}
    want = extract_candidates(nuc, mpp=0.5, marker=marker, od=m["od"], keep_labels=True)
    got = _torch_one(m, keep_labels=True)
    assert len(got) == len(want) == 3 and tuple(got.morphometrics) == MORPHOMETRICS
    assert got.x.dtype == np.float64 and all(v.dtype == np.float32 for v in got.morphometrics.values())
    np.testing.assert_array_equal(got.label_image, want.label_image)  # the same split, the same numbering
    np.testing.assert_allclose(got.x, want.x, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.y, want.y, rtol=0, atol=1e-9)
    np.testing.assert_allclose(got.detection_score, want.detection_score, rtol=1e-6)
    for name in MORPHOMETRICS:
        np.testing.assert_allclose(
            got.morphometrics[name], want.morphometrics[name], rtol=1e-5, equal_nan=True
        )
    for p, q in zip(got.outlines, want.outlines, strict=True):
        np.testing.assert_array_equal(p, q)  # the CPU path's outline code on the same crop
    # The ellipse: eccentricity and centre of an isolated shape.
    k = int(np.argmax(got.x))
    assert (got.x[k], got.y[k]) == pytest.approx((130.0, 30.0), abs=0.05)


def test_empty_and_degenerate_maps() -> None:
    z = np.zeros((2, 32, 48), np.float32)
    out = extract_candidates_torch(z, mpp=0.5, marker=z, cell=z, od=z)
    assert len(out) == 2 and all(len(c) == 0 and tuple(c.morphometrics) == MORPHOMETRICS for c in out)
    # Foreground without a single marker pixel: every component is a nucleus of its own.
    yy, xx = np.mgrid[0:64, 0:64] + 0.5
    nuc = (((xx - 20) ** 2 + (yy - 20) ** 2 <= 64) | ((xx - 45) ** 2 + (yy - 45) ** 2 <= 64)).astype(
        np.float32
    )
    (c,) = extract_candidates_torch(nuc, mpp=0.5, marker=np.zeros_like(nuc))
    assert len(c) == 2
    np.testing.assert_allclose(np.sort(c.x), [20.0, 45.0], atol=1e-6)
    # Everything below the size limit.
    assert len(extract_candidates_torch(nuc, mpp=0.5, min_area_um2=100.0)[0]) == 0
    # The detection floor drops nuclei before their outlines are traced.
    probs = np.where(nuc > 0, np.where(xx < 32, 0.6, 0.9), 0.0).astype(np.float32)
    (c,) = extract_candidates_torch(probs, mpp=0.5, min_detection_score=0.7)
    assert len(c) == 1 and c.x[0] == pytest.approx(45.0, abs=1e-6) and len(c.outlines) == 1


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="mpp"):
        extract_candidates_torch(np.zeros((8, 8), np.float32), mpp=0.0)
    with pytest.raises(ValueError, match="shape"):
        extract_candidates_torch(np.zeros((8, 8), np.float32), mpp=0.5, marker=np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        extract_candidates_torch(np.zeros((1, 2, 8, 8), np.float32), mpp=0.5)


def test_a_batch_gives_each_map_its_own_candidates() -> None:
    maps = [bench.synthetic_maps(s, size=160, nuclei=40) for s in (5, 6, 7)]
    together = bench.run_torch(maps, batch=3)
    alone = bench.run_torch(maps, batch=1)
    for a, b in zip(together, alone, strict=True):
        assert len(a) == len(b)
        np.testing.assert_allclose(a.x, b.x, rtol=1e-12)
        np.testing.assert_allclose(a.y, b.y, rtol=1e-12)
        for name in MORPHOMETRICS:
            np.testing.assert_allclose(
                a.morphometrics[name], b.morphometrics[name], rtol=1e-5, equal_nan=True
            )


def _check_agreement(stats: dict[str, Any]) -> None:
    assert stats["nuclei_cpu"] > 0
    assert stats["agree_of_cpu"] >= 0.99, stats
    assert stats["agree_of_torch"] >= 0.99, stats


@pytest.mark.parametrize("marker", [True, False], ids=["marker", "distance-peaks"])
def test_agreement_on_synthetic_crowded_fields(marker: bool) -> None:
    """≥ 99 % of the nuclei matched one to one within 1 µm, areas within 5 %, both ways."""
    maps = [bench.synthetic_maps(100 + s, size=256, nuclei=90, marker=marker) for s in range(5)]
    want, got = bench.run_cpu(maps), bench.run_torch(maps, batch=5)
    stats = bench.agreement(want, got, [m["mpp"] for m in maps])
    _check_agreement(stats)
    assert stats["area_rel_err_mean"] < 0.01
    assert stats["cell_area_rel_err_median"] < 0.02  # the cells' flood is by 0.5-px levels


@pytest.mark.slow
def test_agreement_on_real_crowded_fields(shared_data: Path) -> None:
    """The shipped localizer's maps of the CNSeg crowded fields: the same bar as above."""
    maps = bench.real_maps(shared_data)
    if not maps:
        pytest.skip("no CNSeg crowded fields or no default localizer bundle")
    want, got = bench.run_cpu(maps), bench.run_torch(maps, batch=4)
    stats = bench.agreement(want, got, [m["mpp"] for m in maps])
    _check_agreement(stats)
    assert stats["nuclei_cpu"] >= 10 * len(maps)  # crowded fields indeed


def test_localizer_torch_path_matches_the_cpu_path(tmp_path: Path) -> None:
    from test_localize import OdThreshold, _bundle, _windows

    from wsi_screen.localize import Localizer
    from wsi_screen.models import load_bundle

    bundle = load_bundle(_bundle(tmp_path))
    cpu = Localizer(bundle, settings=LocalizationSettings(candidates="cpu"), device=CPU)
    tor = Localizer(
        bundle, settings=LocalizationSettings(candidates="torch", candidate_workers=2), device=CPU
    )
    assert (cpu.candidate_path, tor.candidate_path, tor.candidate_workers) == ("cpu", "torch", 0)
    cpu.model = tor.model = OdThreshold(0.2, 0.2)
    rng = np.random.default_rng(4)
    windows = torch.cat(
        [
            _windows([tuple(rng.uniform(60, 450, 2)) for _ in range(k)], 512, float(rng.uniform(8, 16)))
            for k in (5, 0, 9, 2)
        ]
    )
    want = cpu.localize(windows, window_mpp=0.25, halo_px=128)
    got = tor.localize(windows, window_mpp=0.25, halo_px=128)
    assert [len(c) for c in got] == [len(c) for c in want] and sum(len(c) for c in want) > 0
    for g, w in zip(got, want, strict=True):  # window px, outlines included
        np.testing.assert_allclose(g.x, w.x, atol=1e-6)
        np.testing.assert_allclose(g.y, w.y, atol=1e-6)
        for name in MORPHOMETRICS:
            np.testing.assert_allclose(
                g.morphometrics[name], w.morphometrics[name], rtol=1e-4, equal_nan=True
            )
        for a, b in zip(g.outlines, w.outlines, strict=True):
            np.testing.assert_allclose(a, b, atol=1e-4)


def test_candidate_path_setting() -> None:
    from wsi_screen.localize import resolve_candidate_path

    assert LocalizationSettings().candidates == "auto"
    assert resolve_candidate_path("auto", CPU) == "cpu"  # the CPU path is faster on the CPU
    assert resolve_candidate_path("auto", torch.device("cuda")) == "torch"
    assert resolve_candidate_path("auto", torch.device("mps")) == "cpu"
    assert resolve_candidate_path("torch", CPU) == "torch"
    assert resolve_candidate_path("cpu", torch.device("cuda")) == "cpu"
    with pytest.raises(ValueError, match="candidates"):
        resolve_candidate_path("gpu", CPU)
    from wsi_screen.config import load_settings

    with pytest.raises(ConfigError, match="candidates"):
        load_settings(overrides={"localization.candidates": "gpu"})


@pytest.mark.gpu
def test_the_same_candidates_on_cuda() -> None:
    """The torch path on CUDA gives the candidates it gives on the CPU (same labels; sums to float64
    rounding)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    maps = [bench.synthetic_maps(300 + s, size=608, nuclei=150) for s in range(4)]
    on_cpu = bench.run_torch(maps, batch=4)
    on_gpu = bench.run_torch(maps, device="cuda", batch=4)
    for a, b in zip(on_cpu, on_gpu, strict=True):
        assert len(a) == len(b)
        np.testing.assert_allclose(a.x, b.x, rtol=1e-9)
        for name in MORPHOMETRICS:
            np.testing.assert_allclose(
                a.morphometrics[name], b.morphometrics[name], rtol=1e-5, equal_nan=True
            )
