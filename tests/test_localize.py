"""The Localizer stage on tiny inputs: geometry of cropping, resampling and coordinates; bundle checks.

A stand-in network (nucleus logit = a threshold on optical density) replaces the U-Net, so the expected
candidates are known exactly: dark discs drawn on glass.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from wsi_screen.cells import CellTable
from wsi_screen.config import LocalizationSettings
from wsi_screen.errors import BundleError
from wsi_screen.localize import Localizer, localize_region, model_input
from wsi_screen.models import BundleConfig, create_model, load_bundle, save_bundle
from wsi_screen.stain import DEFAULT_TARGET

CPU = torch.device("cpu")


class OdThreshold(nn.Module):
    """Nucleus where the (de-standardized) optical density exceeds 0.3; no marker; no cell."""

    task = "segmentation"

    def __init__(self, mean: float, std: float) -> None:
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        od = x[:, :1] * self.std + self.mean
        nuc = (od - 0.3) * 60.0
        off = torch.full_like(nuc, -30.0)
        return torch.cat([nuc, off, off], dim=1)


def _bundle(tmp_path: Path, **overrides: object) -> Path:
    model = create_model("smp-unet", num_classes=3, in_chans=1, decoder_channels=(16, 8, 8, 8, 8))
    fields: dict[str, object] = dict(
        name="tiny-unet",
        task="localization",
        architecture="smp-unet",
        arch_kwargs={"decoder_channels": [16, 8, 8, 8, 8]},
        in_channels=1,
        input_representation="od_gray",
        mpp=0.5,
        mean=[0.2],
        std=[0.2],
        class_names=["nucleus", "marker", "cell"],
        stain_target={"mu": DEFAULT_TARGET.mu, "sigma": DEFAULT_TARGET.sigma},
        thresholds={"nucleus": 0.5, "marker": 0.5, "cell": 0.5},
        inference={"context_um": 24.0},
    )
    fields.update(overrides)
    save_bundle(model, BundleConfig.model_validate(fields), tmp_path / "b")
    return tmp_path / "b"


@pytest.fixture
def localizer(tmp_path: Path) -> Localizer:
    loc = Localizer(load_bundle(_bundle(tmp_path)), settings=LocalizationSettings(), device=CPU)
    loc.model = OdThreshold(0.2, 0.2)
    return loc


def _windows(centres: list[tuple[float, float]], size: int, radius: float, batch: int = 1) -> torch.Tensor:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    img = np.full((size, size, 3), 235, np.uint8)
    for cx, cy in centres:
        img[(xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2] = (50, 45, 90)
    return torch.from_numpy(np.stack([img] * batch))


def test_model_input_shapes_and_od() -> None:
    w = torch.full((2, 100, 70, 3), 255, dtype=torch.uint8)
    w[:, 10:20, 10:20] = 25
    feats, od, step = model_input(w, representation="od_gray", factor=2.0)
    assert feats.shape == (2, 1, 64, 64) and od.shape == (2, 64, 64) and step == (2.0, 2.0)
    assert float(od[0, 5, 5]) == pytest.approx(-np.log10(25 / 255), rel=1e-5)
    assert float(od[0, 40, 30]) == 0.0  # padding is glass
    rgb, _, _ = model_input(w, representation="rgb", factor=1.0)
    assert rgb.shape == (2, 3, 128, 96) and float(rgb.max()) == 1.0
    feats, od, (sy, sx) = model_input(w, representation="od_gray", factor=1.5)
    assert (sy, sx) == pytest.approx((100 / 67, 70 / 47)) and feats.shape[-2:] == (96, 64)
    with pytest.raises(BundleError, match="representation"):
        model_input(w, representation="lab", factor=1.0)


def test_localize_returns_window_coordinates(localizer: Localizer) -> None:
    size, halo = 512, 128  # core 256 px at 0.25 µm/px; context 24 µm = 96 px → 32 px trimmed per side
    centres = [(256.0, 256.0), (130.0, 300.0), (384.0, 128.0), (60.0, 60.0), (20.0, 256.0)]
    cands = localizer.localize(_windows(centres, size, 14.0, batch=2), window_mpp=0.25, halo_px=halo)
    assert len(cands) == 2 and all(isinstance(c, CellTable) and c.frame == "window" for c in cands)
    c = cands[0]
    got = sorted(zip(c.x.round(2).tolist(), c.y.round(2).tolist(), strict=True))
    # (20, 256) lies in the trimmed band (outside core + context): not looked at.
    want = sorted(p for p in centres if p[0] >= 32 and p[1] >= 32)
    assert len(got) == len(want)
    np.testing.assert_allclose(np.array(got), np.array(want), atol=0.3)
    area = np.pi * (14.0 * 0.25) ** 2
    np.testing.assert_allclose(c.morphometrics["nucleus_area_um2"], area, rtol=0.1)
    for poly, x, y in zip(c.outlines, c.x, c.y, strict=True):
        r = np.hypot(poly[:, 0] - x, poly[:, 1] - y)
        assert np.all(np.abs(r - 14.0) < 2.0)  # outline in window px around the centre
    np.testing.assert_allclose(cands[1].x, c.x)


@pytest.mark.parametrize("window_mpp", [0.5, 0.3])
def test_localize_other_window_resolutions(localizer: Localizer, window_mpp: float) -> None:
    size, halo = 400, 100
    centres = [(200.0, 200.0), (120.5, 260.25)]
    radius = 3.5 / window_mpp  # 3.5 µm nuclei
    c = localizer.localize(_windows(centres, size, radius), window_mpp=window_mpp, halo_px=halo)[0]
    assert len(c) == 2
    order = np.argsort(c.x)
    np.testing.assert_allclose(np.stack([c.x[order], c.y[order]], 1), sorted(centres), atol=0.6)


def test_predict_maps(localizer: Localizer) -> None:
    probs = localizer.predict(_windows([(100.0, 100.0)], 256, 12.0), window_mpp=0.25)
    assert probs.shape == (1, 3, 128, 128) and probs.dtype == torch.float32
    assert float(probs[0, 0, 50, 50]) > 0.99 and float(probs[0, 0, 5, 5]) < 0.01
    assert localizer.context_px(0.25) == 96 and localizer.stain_target == DEFAULT_TARGET


def test_localize_region_level0(tmp_path: Path, localizer: Localizer) -> None:
    from wsi_screen.synth import CellSpec, synthesize_slide

    cells = [CellSpec(300, 260, "parabasal", seed=1, dye="cyan"), CellSpec(700, 620, "hsil", seed=2)]
    res = synthesize_slide(tmp_path / "s.tiff", size=(1024, 1024), cells=cells, seed=3, workers=1)
    from wsi_screen.slide import open_slide

    with open_slide(res.path) as slide:
        out = localize_region(slide, 128, 128, 768, 768, localizer=localizer, window_mpp=0.25)
    truth = [o.nucleus_xy for o in res.truth.objects]
    assert len(out) >= 2
    for tx, ty in truth:
        d = np.hypot(out.x - tx, out.y - ty)
        assert d.min() < 3.0, f"nucleus at {(tx, ty)} not found; nearest {d.min():.1f} px"
    assert np.all((out.x >= 128) & (out.x < 896) & (out.y >= 128) & (out.y < 896))


def test_bundle_checks(tmp_path: Path) -> None:
    s = LocalizationSettings()
    bad = load_bundle(_bundle(tmp_path / "a", task="classification"))
    with pytest.raises(BundleError, match="not a localization model"):
        Localizer(bad, settings=s, device=CPU)
    with pytest.raises(BundleError, match="channels"):
        Localizer(load_bundle(_bundle(tmp_path / "b", input_representation="rgb")), settings=s, device=CPU)
    with pytest.raises(BundleError, match="nucleus"):
        Localizer(
            load_bundle(_bundle(tmp_path / "c", class_names=["cell", "marker", "blob"])),
            settings=s,
            device=CPU,
        )
    loc = Localizer(
        load_bundle(_bundle(tmp_path / "d")), settings=LocalizationSettings(threshold=0.7), device=CPU
    )
    assert loc.thresholds["nucleus"] == 0.7 and loc.context_um == 24.0


def test_localize_rejects_bad_halo(localizer: Localizer) -> None:
    with pytest.raises(ValueError, match="halo"):
        localizer.localize(_windows([], 64, 1.0), window_mpp=0.25, halo_px=40)
    assert (
        localizer.localize(torch.zeros((0, 64, 64, 3), dtype=torch.uint8), window_mpp=0.25, halo_px=8) == []
    )


def test_candidate_processes_give_the_same_candidates(tmp_path: Path) -> None:
    """Candidates extracted in a pool of processes (``localization.candidate_workers``) equal those
    extracted in the device thread, in tile order; the pool is stopped by ``close()``."""
    bundle = load_bundle(_bundle(tmp_path))
    serial = Localizer(bundle, settings=LocalizationSettings(candidate_workers=0), device=CPU)
    pooled = Localizer(bundle, settings=LocalizationSettings(candidate_workers=2), device=CPU)
    serial.model = pooled.model = OdThreshold(0.2, 0.2)
    rng = np.random.default_rng(3)
    windows = torch.cat(
        [
            _windows([tuple(rng.uniform(60, 450, 2)) for _ in range(k)], 512, float(rng.uniform(8, 16)))
            for k in (3, 0, 6, 1, 4)
        ]
    )
    want = serial.localize(windows, window_mpp=0.25, halo_px=128)
    try:
        got = pooled.localize(windows, window_mpp=0.25, halo_px=128)
        assert pooled._pool is not None  # the batch went through the processes
    finally:
        pooled.close()
    assert pooled._pool is None
    assert [len(c) for c in got] == [len(c) for c in want] and sum(len(c) for c in want) > 0
    for g, w in zip(got, want, strict=True):  # one model output, single-threaded numpy/scipy: exact
        np.testing.assert_array_equal(g.x, w.x)
        np.testing.assert_array_equal(g.y, w.y)
        for name in w.morphometrics:
            np.testing.assert_array_equal(g.morphometrics[name], w.morphometrics[name])
        for a, b in zip(g.outlines, w.outlines, strict=True):
            np.testing.assert_array_equal(a, b)


def test_candidate_workers_default_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    from wsi_screen import runtime
    from wsi_screen.localize import resolve_candidate_workers

    cuda = torch.device("cuda")
    monkeypatch.setattr(runtime, "cpu_count", lambda: 16)
    assert resolve_candidate_workers(None, CPU, batch_size=32) == 0  # the U-Net's threads use every core
    assert resolve_candidate_workers(None, cuda, batch_size=32) == 15  # all but the device thread
    assert resolve_candidate_workers(None, cuda, batch_size=4) == 4  # no more than a batch's tiles
    assert resolve_candidate_workers(3, cuda, batch_size=32) == 3
    assert resolve_candidate_workers(0, cuda, batch_size=32) == 0
    monkeypatch.setattr(runtime, "cpu_count", lambda: 2)
    assert resolve_candidate_workers(None, cuda, batch_size=32) == 0  # one spare core: not worth a pool
    with pytest.raises(ValueError, match="candidate_workers"):
        LocalizationSettings(candidate_workers=-1)


def test_no_candidate_processes_inside_a_daemonic_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemonic process (a Dask worker, a multiprocessing pool worker) may not start processes."""
    import multiprocessing
    from types import SimpleNamespace

    bundle = load_bundle(_bundle(tmp_path))
    settings = LocalizationSettings(candidate_workers=4)
    assert Localizer(bundle, settings=settings, device=CPU).candidate_workers == 4
    monkeypatch.setattr(multiprocessing, "current_process", lambda: SimpleNamespace(daemon=True))
    assert Localizer(bundle, settings=settings, device=CPU).candidate_workers == 0
