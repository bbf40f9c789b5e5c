"""Synthetic slide generator: layouts, rendering, ground truth, pyramidal TIFF/SVS writer."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from skimage.draw import polygon as fill_polygon

from wsi_screen.slide import open_slide
from wsi_screen.synth import (
    ABNORMAL_CLASSES,
    CLASS_NAMES,
    KINDS,
    STAIN_PROFILES,
    CellSpec,
    Renderer,
    SynthResult,
    get_stain_profile,
    load_truth,
    make_layout,
    parse_abnormal,
    pyramid_dimensions,
    random_layout,
    render_region,
    synthesize_slide,
    truth_path_for,
    write_slide,
)

MPP = 0.25
SIZE = (2048, 1792)  # not square, not a multiple of the tile size in both directions
TILE = 256
ABNORMAL = {"HSIL": 4, "LSIL": 3, "ASC-US": 2}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _od(rgb: np.ndarray, glass: float = 240.0) -> np.ndarray:
    """Mean-channel optical density (log10) relative to ``glass``."""
    return -np.log10(np.clip(rgb.astype(np.float64), 1.0, None) / glass).mean(axis=-1)


def _mask(poly: np.ndarray, shape: tuple[int, int], origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Pixels whose centres lie inside ``poly`` (level-0 x/y), in an array at ``origin``."""
    out = np.zeros(shape, dtype=bool)
    rr, cc = fill_polygon(poly[:, 1] - origin[1] - 0.5, poly[:, 0] - origin[0] - 0.5, shape)
    out[rr, cc] = True
    return out


@pytest.fixture(scope="session")
def synth_tiff(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    path = tmp_path_factory.mktemp("synth") / "slide.tiff"
    return synthesize_slide(path, size=SIZE, mpp=MPP, seed=7, abnormal=ABNORMAL, spot=False, tile_size=TILE)


@pytest.fixture(scope="session")
def synth_svs(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    path = tmp_path_factory.mktemp("synth") / "slide.svs"
    return synthesize_slide(path, size=SIZE, mpp=MPP, seed=7, abnormal=ABNORMAL, tile_size=TILE)


# Objects exactly on tile edges and corners (tile 256), at the slide border, and overlapping.
EDGE_CELLS = (
    CellSpec(256.0, 256.0, "intermediate", seed=1),
    CellSpec(512.0, 100.5, "hsil", seed=2),
    CellSpec(767.5, 768.0, "koilocyte", seed=3),
    CellSpec(1024.0, 512.25, "ascus", seed=4, angle_deg=30.0),
    CellSpec(0.2, 700.0, "superficial", seed=5),
    CellSpec(1023.9, 1023.9, "neutrophil", seed=6),
    CellSpec(300.0, 900.0, "debris", seed=7),
    CellSpec(700.0, 300.0, "mucus", seed=8, angle_deg=0.0),
    CellSpec(640.0, 640.0, "parabasal", seed=9, blur_um=2.0),
    CellSpec(512.0, 896.0, "lymphocyte", seed=10),
)


@pytest.fixture(scope="session")
def edge_slide(tmp_path_factory: pytest.TempPathFactory) -> SynthResult:
    path = tmp_path_factory.mktemp("synth") / "edges.tiff"
    return synthesize_slide(path, size=(1024, 1024), cells=EDGE_CELLS, seed=3, tile_size=TILE, quality=95)


# -- parse_abnormal ------------------------------------------------------------------------------
def test_parse_abnormal_counts_fractions_and_aliases() -> None:
    assert parse_abnormal("HSIL=5,LSIL=3") == {"HSIL": 5, "LSIL": 3}
    assert parse_abnormal(" ascus = 0.01 , hsil=0 ") == {"ASC-US": 0.01, "HSIL": 0}
    assert parse_abnormal("") == {}
    assert isinstance(parse_abnormal("LSIL=2")["LSIL"], int)


@pytest.mark.parametrize(
    ("text", "bad_part"),
    [
        ("HSIL5", "HSIL5"),
        ("HSIL=5,FOO=2", "FOO=2"),
        ("HSIL=five", "HSIL=five"),
        ("LSIL=-3", "LSIL=-3"),
        ("LSIL=1.5", "LSIL=1.5"),
        ("HSIL=1,hsil=2", "hsil=2"),
        ("HSIL=1=2", "HSIL=1=2"),
    ],
)
def test_parse_abnormal_errors_name_the_bad_part(text: str, bad_part: str) -> None:
    with pytest.raises(ValueError, match=bad_part.replace("=", "=")) as info:
        parse_abnormal(text)
    assert bad_part in str(info.value)


# -- layouts -------------------------------------------------------------------------------------
def test_random_layout_exact_abnormal_counts_and_fractions() -> None:
    lay = random_layout((4096, 4096), mpp=MPP, seed=1, abnormal={"HSIL": 7, "ASC-US": 0.02})
    counts = lay.class_counts()
    n_squamous = sum(counts[c] for c in ("NILM", *ABNORMAL_CLASSES))
    assert counts["HSIL"] == 7
    assert counts["ASC-US"] == round(0.02 * n_squamous)
    assert counts["LSIL"] == 0
    assert counts["artifact"] > 0
    assert set(counts) == set(CLASS_NAMES)
    assert lay.kind_counts()["koilocyte"] == 0


def test_random_layout_is_deterministic_and_seed_dependent() -> None:
    a = random_layout((3000, 2000), seed=5, abnormal="HSIL=3")
    b = random_layout((3000, 2000), seed=5, abnormal="HSIL=3")
    c = random_layout((3000, 2000), seed=6, abnormal="HSIL=3")
    assert a.cells == b.cells
    assert a.cells != c.cells


def test_lbc_spot_confines_cells_and_conventional_is_denser() -> None:
    lbc = random_layout((4000, 3000), seed=2)
    assert lbc.spot is not None
    cx, cy, r = lbc.spot
    assert all(math.hypot(c.x - cx, c.y - cy) <= r for c in lbc.cells)
    conv = random_layout((4000, 3000), seed=2, preparation="conventional")
    assert conv.spot is None and conv.streaks is not None
    assert len(conv.cells) > 1.5 * len(lbc.cells)
    # cells outside the LBC circle exist on the smear
    assert any(math.hypot(c.x - cx, c.y - cy) > r for c in conv.cells)


def test_layout_validation_errors() -> None:
    with pytest.raises(ValueError, match="unknown cell kind 'blob'"):
        CellSpec(1.0, 2.0, "blob")
    with pytest.raises(ValueError, match="blur_um"):
        CellSpec(1.0, 2.0, "hsil", blur_um=-1.0)
    with pytest.raises(ValueError, match="unknown stain profile 'teal'"):
        get_stain_profile("teal")
    with pytest.raises(ValueError, match="preparation"):
        random_layout((100, 100), preparation="smear")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown abnormal class"):
        random_layout((100, 100), abnormal={"AGC": 2})


def test_morphology_in_physical_units() -> None:
    """Nucleus areas (µm²) follow the Bethesda size criteria, at any µm/px."""
    intermediate = np.pi * (7.5 / 2) ** 2
    for mpp in (0.25, 0.5):
        cells = [CellSpec(2000.0, 2000.0, kind, seed=s) for kind in KINDS for s in range(20)]
        lay = make_layout((4000, 4000), cells, mpp=mpp)
        areas: dict[str, list[float]] = {}
        ratio: dict[str, list[float]] = {}
        from wsi_screen.synth import layout_truth

        for obj in layout_truth(lay).objects:
            if obj.nucleus_area_um2 is not None:
                areas.setdefault(obj.kind, []).append(obj.nucleus_area_um2)
                ratio.setdefault(obj.kind, []).append(obj.nucleus_area_um2 / obj.cell_area_um2)
        assert 36 < np.mean(areas["intermediate"]) < 56
        assert 1.9 < np.mean(areas["ascus"]) / intermediate < 2.6
        assert 1.9 < np.mean(areas["koilocyte"]) / intermediate < 3.1
        assert np.mean(areas["superficial"]) < 26
        assert np.mean(ratio["hsil"]) > 0.3 > np.mean(ratio["intermediate"]) * 5
        cell_d = [
            2 * math.sqrt(o.cell_area_um2 / math.pi) for o in layout_truth(lay).objects if o.kind == "hsil"
        ]
        assert min(cell_d) > 11 and max(cell_d) < 21
        assert "debris" not in areas and "mucus" not in areas


def test_render_window_holds_every_outline() -> None:
    """Cell, nuclei (even poking out of the cell) and blur margin lie inside the render window."""
    for kind in KINDS:
        for seed in range(30):
            blur = 2.0 if seed % 3 == 0 else 0.0
            spec = CellSpec(250.3, 249.6, kind, seed=seed, blur_um=blur)
            geom = make_layout((500, 500), [spec]).geometries[0]
            x0, y0, x1, y1 = geom.bbox
            margin = 3 * blur / MPP
            for poly in (geom.cell, *geom.nuclei):
                assert poly[:, 0].min() - margin >= x0 and poly[:, 0].max() + margin <= x1
                assert poly[:, 1].min() - margin >= y0 and poly[:, 1].max() + margin <= y1


# -- rendering -----------------------------------------------------------------------------------
@pytest.mark.parametrize("preparation", ["lbc", "conventional"])
def test_render_region_is_local(preparation: str) -> None:
    """A region renders to the same pixels alone as inside a larger render (strip rendering)."""
    lay = random_layout(
        (2600, 2300),
        seed=11,
        preparation=preparation,
        abnormal="HSIL=3",  # type: ignore[arg-type]
        spot=False,
        blur_fraction=0.2,
    )
    big = render_region(lay, 0, 0, 2600, 2300)
    renderer = Renderer(lay)
    for x0, y0, w, h in [(0, 0, 300, 200), (517, 1023, 1100, 701), (2100, 1900, 500, 400)]:
        np.testing.assert_array_equal(renderer.render(x0, y0, w, h), big[y0 : y0 + h, x0 : x0 + w])


def test_background_is_bright_tinted_noisy_glass() -> None:
    lay = make_layout((1024, 1024), [], seed=4)
    img = render_region(lay, 0, 0, 1024, 1024).astype(np.float64)
    assert 235 <= img.mean() <= 245
    assert 0.5 < img[..., 1].std() < 4.0  # sensor noise, no structure
    pale = render_region(make_layout((256, 256), [], stain="scanner_b"), 0, 0, 256, 256)
    assert pale[..., 2].mean() < pale[..., 0].mean() - 8  # yellowish glass of scanner B


@pytest.mark.parametrize("stain", sorted(STAIN_PROFILES))
def test_every_stain_profile_renders_dark_nuclei(stain: str) -> None:
    cell = CellSpec(200.0, 200.0, "intermediate", seed=3)
    lay = make_layout((400, 400), [cell], stain=stain)
    img = render_region(lay, 0, 0, 400, 400)
    glass = img[:20, :20].reshape(-1, 3).mean(axis=0)
    nucleus = lay.geometries[0].nuclei[0]
    inside = img[_mask(nucleus, (400, 400))]
    assert _od(inside, glass.mean()).mean() > 0.25


def test_blur_softens_edges() -> None:
    sharp = CellSpec(150.0, 150.0, "hsil", seed=12)
    blurred = CellSpec(450.0, 150.0, "hsil", seed=12, blur_um=2.5)
    img = render_region(make_layout((600, 300), [sharp, blurred]), 0, 0, 600, 300)
    grey = img.astype(np.float64).mean(axis=-1)
    grad = np.hypot(*np.gradient(grey))
    assert grad[:, :300].max() > 2.5 * grad[:, 300:].max()


# -- writer: both backends -----------------------------------------------------------------------
def test_pyramid_dimensions() -> None:
    assert pyramid_dimensions(20000, 20000) == ((20000, 20000), (5000, 5000), (1250, 1250), (312, 312))
    assert pyramid_dimensions(2048, 1792) == ((2048, 1792), (512, 448))
    assert pyramid_dimensions(3001, 999, level_factor=2) == ((3001, 999), (1500, 499), (750, 249))
    assert pyramid_dimensions(800, 600) == ((800, 600),)


@pytest.mark.parametrize("fixture", ["synth_tiff", "synth_svs"])
def test_both_backends_agree_exactly(fixture: str, request: pytest.FixtureRequest) -> None:
    result: SynthResult = request.getfixturevalue(fixture)
    with open_slide(result.path, backend="openslide") as a, open_slide(result.path, backend="tiffslide") as b:
        assert a.level_count == b.level_count == len(result.level_dimensions) >= 2
        assert a.level_dimensions == b.level_dimensions == result.level_dimensions
        assert a.level_downsamples == b.level_downsamples
        assert a.mpp == pytest.approx(MPP) and b.mpp == pytest.approx(MPP)
        assert a.dimensions == SIZE
        for level, (w, h) in enumerate(a.level_dimensions):
            np.testing.assert_array_equal(
                a.read_level((0, 0), level, (w, h)), b.read_level((0, 0), level, (w, h))
            )
        for mpp in (0.25, 0.4, 1.0, 3.3):
            np.testing.assert_array_equal(
                a.read_region((333.5, 171.0), (300, 200), mpp=mpp),
                b.read_region((333.5, 171.0), (300, 200), mpp=mpp),
            )


@pytest.mark.parametrize(("size", "fmt"), [((100, 80), "tiff"), ((700, 1030), "svs"), ((1100, 300), "svs")])
def test_small_and_odd_slides(tmp_path: Path, size: tuple[int, int], fmt: str) -> None:
    result = synthesize_slide(tmp_path / f"small.{fmt}", size=size, seed=1, abnormal="HSIL=1", spot=False)
    assert result.counts["HSIL"] == 1
    with open_slide(result.path, backend="openslide") as a, open_slide(result.path, backend="tiffslide") as b:
        assert a.dimensions == b.dimensions == size
        assert a.level_dimensions == b.level_dimensions == result.level_dimensions
        np.testing.assert_array_equal(a.read_level((0, 0), 0, size), b.read_level((0, 0), 0, size))
        if fmt == "svs":
            assert a.vendor == "aperio" and "thumbnail" in b.associated_image_names


def test_empty_layout_and_bad_arguments(tmp_path: Path) -> None:
    empty = synthesize_slide(tmp_path / "empty.tiff", size=(600, 500), cells=[])
    assert sum(empty.counts.values()) == 0 and load_truth(empty.path).objects == ()
    with pytest.raises(ValueError, match="preparation"):
        synthesize_slide(tmp_path / "x.tiff", size=(64, 64), preparation="smear")
    with pytest.raises(ValueError, match="fmt"):
        synthesize_slide(tmp_path / "x.tiff", size=(64, 64), fmt="png")
    with pytest.raises(ValueError, match="tile_size"):
        synthesize_slide(tmp_path / "x.tiff", size=(64, 64), tile_size=100)
    assert not list(tmp_path.glob("x*"))  # nothing half-written


def test_tiff_metadata(synth_tiff: SynthResult) -> None:
    with open_slide(synth_tiff.path, backend="openslide") as s:
        assert s.vendor == "generic-tiff"
        assert s.info.properties["tiff.ResolutionUnit"] == "centimeter"
        assert float(s.info.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    import tifffile

    with tifffile.TiffFile(synth_tiff.path) as tif:
        assert not tif.pages.first.subifds  # levels are main IFDs
        assert len(tif.pages) == len(synth_tiff.level_dimensions)
        for page in tif.pages:
            assert page.is_tiled and page.tilewidth == TILE and page.compression == 7
            assert page.photometric == 2  # RGB, no YCbCr subsampling


def test_svs_is_aperio(synth_svs: SynthResult) -> None:
    for backend in ("openslide", "tiffslide"):
        with open_slide(synth_svs.path, backend=backend) as s:  # type: ignore[arg-type]
            assert s.vendor == "aperio"
            assert s.objective_power == pytest.approx(40.0)
            assert s.mpp == pytest.approx(MPP)
            assert {"label", "macro", "thumbnail"} <= set(s.associated_image_names)
            assert s.associated_image("thumbnail").shape[2] == 3
    head = synth_svs.path.read_bytes()[:4096]
    assert b"Aperio Image Library" in head and b"|AppMag = 40|MPP = 0.25" in head


def test_file_pixels_match_render_region(synth_tiff: SynthResult) -> None:
    with open_slide(synth_tiff.path, backend="tiffslide") as s:
        got = s.read_level((0, 0), 0, SIZE).astype(np.int16)
    want = render_region(synth_tiff.layout, 0, 0, *SIZE).astype(np.int16)
    diff = np.abs(got - want)
    psnr = 10 * np.log10(255**2 / np.mean(diff.astype(np.float64) ** 2))
    assert diff.mean() < 1.5 and psnr > 38, (diff.mean(), psnr)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, synth_tiff: SynthResult) -> None:
    again = synthesize_slide(
        tmp_path / "slide.tiff",
        size=SIZE,
        mpp=MPP,
        seed=7,
        abnormal=ABNORMAL,
        spot=False,
        tile_size=TILE,
    )
    assert _sha(again.path) == _sha(synth_tiff.path)
    assert again.truth_path is not None and synth_tiff.truth_path is not None
    assert again.truth_path.read_bytes() == synth_tiff.truth_path.read_bytes()
    other = synthesize_slide(
        tmp_path / "other.tiff",
        size=SIZE,
        mpp=MPP,
        seed=8,
        abnormal=ABNORMAL,
        spot=False,
        tile_size=TILE,
    )
    assert _sha(other.path) != _sha(synth_tiff.path)


@pytest.mark.slow
def test_process_pool_gives_the_same_bytes(tmp_path: Path) -> None:
    lay = random_layout((2000, 2600), seed=21, abnormal="HSIL=2")
    one = write_slide(lay, tmp_path / "one.tiff", tile_size=256, strip_rows=512, workers=1)
    two = write_slide(lay, tmp_path / "two.tiff", tile_size=256, strip_rows=512, workers=2)
    assert one.n_strips == two.n_strips == 6
    assert (one.workers, two.workers) == (1, 2)
    assert _sha(one.path) == _sha(two.path)
    whole = write_slide(lay, tmp_path / "whole.tiff", tile_size=256)
    assert whole.n_strips == 1
    assert _sha(whole.path) == _sha(one.path)


# -- ground truth --------------------------------------------------------------------------------
def test_truth_file_roundtrip_and_counts(synth_tiff: SynthResult) -> None:
    assert synth_tiff.truth_path == truth_path_for(synth_tiff.path)
    assert synth_tiff.truth_path is not None and synth_tiff.truth_path.name == "slide.truth.json"
    raw = json.loads(synth_tiff.truth_path.read_text())
    assert raw["counts"] == synth_tiff.counts
    for klass, n in ABNORMAL.items():
        assert synth_tiff.counts[klass] == n
    assert sum(raw["counts"].values()) == len(raw["objects"]) == len(synth_tiff.layout.cells)
    truth = load_truth(synth_tiff.path)
    assert truth.class_counts() == synth_tiff.counts
    assert (truth.width, truth.height, truth.mpp) == (*SIZE, MPP)
    for mem, disk in zip(synth_tiff.truth.objects, truth.objects, strict=True):
        assert (disk.id, disk.klass, disk.kind, disk.blurred) == (mem.id, mem.klass, mem.kind, mem.blurred)
        assert np.abs(disk.cell - mem.cell).max() <= 0.05 + 1e-9
        if mem.nucleus is None:
            assert disk.nucleus is None and mem.kind in ("debris", "mucus")
        else:
            assert disk.nucleus is not None
            assert np.abs(disk.nucleus - mem.nucleus).max() <= 0.05 + 1e-9
    objs = {o["kind"]: o for o in raw["objects"]}
    assert "nucleus" not in objs.get("debris", {"kind": "debris"})
    assert all(
        o["class"] == "artifact"
        for o in raw["objects"]
        if o["kind"] in ("neutrophil", "lymphocyte", "debris", "mucus")
    )


def test_truth_nuclei_are_dark_in_the_file(synth_tiff: SynthResult) -> None:
    """Mean optical density inside every truth nucleus is far above the glass."""
    with open_slide(synth_tiff.path, backend="openslide") as s:
        img = s.read_level((0, 0), 0, SIZE)
    covered = np.zeros(img.shape[:2], dtype=bool)
    for geom in synth_tiff.layout.geometries:
        covered |= _mask(geom.cell, img.shape[:2])
    glass_od = _od(img[~covered]).mean()
    assert abs(glass_od) < 0.03
    checked = 0
    for obj in synth_tiff.truth.objects:
        if obj.nucleus is None or obj.blurred:
            continue
        mask = _mask(obj.nucleus, img.shape[:2])
        if mask.sum() < 20:  # cut by the slide border
            continue
        ring = _mask(obj.cell, img.shape[:2]) & ~mask
        nucleus_od = _od(img[mask]).mean()
        assert nucleus_od > glass_od + 0.3, (obj.id, obj.kind, nucleus_od)
        if ring.sum() > 50 and obj.kind not in ("neutrophil", "lymphocyte"):
            assert nucleus_od > _od(img[ring]).mean() + 0.1, (obj.id, obj.kind)
        checked += 1
    assert checked >= 20


def test_explicit_layout_on_tile_edges(edge_slide: SynthResult) -> None:
    truth = edge_slide.truth
    assert [(o.x, o.y, o.kind) for o in truth.objects] == [(c.x, c.y, c.kind) for c in EDGE_CELLS]
    assert [o.blurred for o in truth.objects] == [c.blur_um > 0 for c in EDGE_CELLS]
    want = render_region(edge_slide.layout, 0, 0, 1024, 1024).astype(np.int16)
    for backend in ("openslide", "tiffslide"):
        with open_slide(edge_slide.path, backend=backend) as s:  # type: ignore[arg-type]
            got = s.read_level((0, 0), 0, (1024, 1024)).astype(np.int16)
        assert np.abs(got - want).mean() < 1.0
        for obj in truth.objects:
            if obj.nucleus is None:
                continue
            mask = _mask(obj.nucleus, got.shape[:2])
            # a nucleus cut by a tile edge is dark on both sides of it
            assert _od(got[mask]).mean() > 0.3, (backend, obj.kind)
    # the nucleus centred on the 4-tile corner (256, 256) spans all four tiles
    corner = _mask(truth.objects[0].nucleus, (1024, 1024))  # type: ignore[arg-type]
    assert corner[:256, :256].any() and corner[:256, 256:].any()
    assert corner[256:, :256].any() and corner[256:, 256:].any()
