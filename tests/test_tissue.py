"""Cell-region detection on synthetic cytology slides and hand-made thumbnails."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from wsi_screen.config import TissueSettings
from wsi_screen.slide import open_slide
from wsi_screen.synth import CellSpec, load_truth, make_layout, synthesize_slide
from wsi_screen.tissue import detect_cell_regions, qc_thumbnail_png, slide_cell_regions


@pytest.fixture(scope="module")
def lbc_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tissue") / "lbc.tiff"
    synthesize_slide(path, size=(6144, 6144), seed=11, abnormal="HSIL=3", stain="pale")
    return path


def _truth_centres(path: Path) -> np.ndarray:
    truth = load_truth(path.with_name(path.stem + ".truth.json"))
    return np.array([(o.x, o.y) for o in truth.objects])


def test_every_cell_centre_lies_in_the_mask(lbc_slide: Path) -> None:
    with open_slide(lbc_slide) as s:
        regions = slide_cell_regions(s, TissueSettings())
    centres = _truth_centres(lbc_slide)
    scale = s.mpp / regions.mpp
    ix = np.clip((centres[:, 0] * scale).astype(int), 0, regions.mask.shape[1] - 1)
    iy = np.clip((centres[:, 1] * scale).astype(int), 0, regions.mask.shape[0] - 1)
    covered = regions.mask[iy, ix]
    assert covered.mean() >= 0.99, f"{(~covered).sum()} of {len(covered)} cells outside the mask"
    # ... while most of the empty glass is rejected.
    assert regions.fraction < 0.75


def test_empty_glass_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "empty.tiff"
    layout = make_layout((3072, 3072), [], mpp=0.25, seed=1)
    from wsi_screen.synth import write_slide

    write_slide(layout, path)
    with open_slide(path) as s:
        regions = slide_cell_regions(s, TissueSettings())
    assert regions.mask.sum() == 0
    assert regions.area_um2 == 0.0


def test_single_pale_cell_is_kept(tmp_path: Path) -> None:
    """One faint superficial cell on a large empty field must not be lost (cytology: every cell counts)."""
    path = tmp_path / "one.tiff"
    layout = make_layout(
        (4096, 4096), [CellSpec(2000, 1500, "superficial", seed=3)], mpp=0.25, seed=2, stain="pale"
    )
    from wsi_screen.synth import write_slide

    write_slide(layout, path)
    with open_slide(path) as s:
        regions = slide_cell_regions(s, TissueSettings())
    scale = 0.25 / regions.mpp
    assert regions.mask[int(1500 * scale), int(2000 * scale)]
    assert 0 < regions.area_um2 < 0.05e6


def test_pen_mark_and_label_edge_excluded() -> None:
    rng = np.random.default_rng(0)
    thumb = np.full((400, 400, 3), 240, np.uint8) + rng.integers(0, 3, (400, 400, 3), dtype=np.uint8)
    # Pale cyan cells (OD ~ 0.1 in red).
    yy, xx = np.mgrid[0:400, 0:400]
    for cx, cy in ((100, 100), (150, 260), (300, 200)):
        disc = (xx - cx) ** 2 + (yy - cy) ** 2 < 8**2
        thumb[disc] = (190, 225, 230)
    # A thick black-blue pen stroke and a dark label edge along the border.
    thumb[320:335, 40:360] = (20, 30, 90)
    thumb[:, 385:] = (60, 60, 60)
    regions = detect_cell_regions(thumb, mpp=8.0, settings=TissueSettings(lbc_spot="off"))
    assert regions.mask[100, 100] and regions.mask[260, 150] and regions.mask[200, 300]
    assert not regions.mask[327, 200].any()
    assert not regions.mask[:, 385:].any()
    assert regions.excluded[327, 200] and regions.excluded[200, 390]
    png = qc_thumbnail_png(regions)
    img = Image.open(__import__("io").BytesIO(png))
    assert img.size == (400, 400)


def test_parameters_are_physical() -> None:
    """The same scene at two thumbnail resolutions gives the same cellular area (µm² units)."""

    def scene(mpp: float) -> np.ndarray:
        n = round(3200 / mpp)
        img = np.full((n, n, 3), 242, np.uint8)
        yy, xx = np.mgrid[0:n, 0:n] * mpp
        for cx, cy in ((800, 800), (2000, 1500), (1200, 2600)):
            img[(xx - cx) ** 2 + (yy - cy) ** 2 < 60**2] = (185, 220, 228)
        return img

    a = detect_cell_regions(scene(4.0), mpp=4.0, settings=TissueSettings(lbc_spot="off"))
    b = detect_cell_regions(scene(8.0), mpp=8.0, settings=TissueSettings(lbc_spot="off"))
    assert a.area_um2 == pytest.approx(b.area_um2, rel=0.1)


def test_bad_thumbnail() -> None:
    with pytest.raises(ValueError, match="RGB"):
        detect_cell_regions(np.zeros((10, 10), np.uint8), mpp=4.0)
