"""Slide files built from real annotated cells, with truth, for measurements through ``run_slide``.

    python pipelines/real_slides.py --part test -o /tmp/real-slides      # herlev, lbc, cnseg, isbi slides

Each slide is a tiled, JPEG-compressed pyramidal TIFF at 0.25 µm/px (the pipeline's working
resolution, so tile edges fall every 1024 px), next to ``<name>.truth.npz``: ``nuclei`` (uint32
level-0 label image, one label per true nucleus), ``kind`` (per label: Herlev class, or the source
name), ``source`` (per label) and ``mpp``. Cells come from one part of the split manifest
(``pipelines/splits/real.json``): ``--part test`` for final figures, ``val`` for choices.

This builder is deliberately **not** the compositor that made the U-Net's training fields
(``wsi_screen.train.fields.compose_fields``: optical-density addition, overlaps, 90° turns, LBC or
smooth-noise glass). Here cells are resampled with Lanczos, blended *over* the background in RGB
with a wider feather (σ = 3 px), never overlap, sit on a jittered lattice whose period is unrelated
to the tile size (so many cells straddle tile edges), on flat glass with a radial illumination
fall-off and sensor grain. A model that learned paste seams of the training compositor does not
profit here.

- ``herlev``: every Herlev cell of the part (coarse expert masks; nuclei labelled by class);
- ``cells``: every Herlev cell and ``lbc-cells`` crop of the part (foreground masks), with cell
  footprints (``cells``) labelled by bundle class (``cell_kind``: ``herlev-bethesda``,
  ``lbc-cells-bethesda``; Herlev's normal cells as ``NILM squamous`` or ``NILM columnar``) for the
  classifier's end-to-end figures;
- ``lbc``: the part's LBC fields (0.75 µm/px, estimated) resampled ×3, letterbox and black corners
  as they are, in a mosaic with glass between fields;
- ``cnseg``: the part's CNSeg fields (0.33 µm/px, estimated) resampled, in a mosaic;
- ``isbi``: ISBI 2014 images of the part (0.35 µm/px, estimated; greyscale) in a mosaic.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MANIFEST = ROOT / "pipelines" / "splits" / "real.json"
SLIDE_MPP = 0.25
#: Nucleus-mask components smaller than this are mask noise, not nuclei, and get no truth label. In
#: Herlev's coarse masks (upsampled from 40×40) a stray pixel or two of the nucleus class lies beside
#: 14 of the 494 nuclei: 0.04–1.13 µm², against ≥ 11.6 µm² for the smallest real nucleus (a pyknotic
#: superficial one). Counted as nuclei they were "missed" by every localizer.
MIN_TRUTH_NUCLEUS_UM2 = 3.0


def write_pyramid_tiff(path: Path, rgb: np.ndarray, mpp: float, *, quality: int = 90) -> None:
    """Tiled JPEG pyramidal TIFF (:func:`wsi_screen.train.cell_slides.write_image_slide`)."""
    from wsi_screen.train.cell_slides import write_image_slide

    write_image_slide(path, rgb, mpp, quality=quality)


def _resample(a: np.ndarray, factor: float, *, labels: bool) -> np.ndarray:
    from PIL import Image

    h, w = a.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    if labels:
        return np.asarray(Image.fromarray(a.astype(np.int32)).resize(size, Image.NEAREST)).astype(a.dtype)
    return np.asarray(Image.fromarray(a).resize(size, Image.LANCZOS))


def _glass(rng: np.random.Generator, shape: tuple[int, int], *, grey: bool = False) -> np.ndarray:
    """Flat glass with a radial fall-off and grain; neutral grey for greyscale sources (ISBI), so that
    their slide stays greyscale, as a greyscale scan is."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2
    tint = [240.0, 240.0, 240.0] if grey else [241.0, 238.0, 243.0]
    base = np.array(tint, np.float32) * (1.0 - 0.06 * r2)[..., None]
    if grey:
        base += rng.normal(0.0, 2.0, size=(h, w, 1)).astype(np.float32)
    else:
        base += rng.normal(0.0, 2.0, size=(h, w, 3)).astype(np.float32)
    return base


def herlev_slide(data: Path, keys: list[str], seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Herlev cells on glass, lattice-placed, RGB 'over' blending; returns rgb, labels, kind per label."""
    from wsi_screen.train.fields import load_herlev_cells

    cells = load_herlev_cells(data, keys)
    items = [(c.rgb, c.label, c.herlev_class, 0.201) for c in cells]
    rgb, nuclei, kinds, _, _ = lattice_slide(items, seed, fade_cut=False)
    return rgb, nuclei, kinds


def lattice_slide(
    items: list[tuple[np.ndarray, np.ndarray, str, float]], seed: int, *, fade_cut: bool = True
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, list[str]]:
    """Cells (rgb, label 0 glass/1 cell/2 nucleus/255 unknown, kind, µm/px) on glass on a jittered
    lattice with RGB 'over' blending (with ``fade_cut``, a cell whose mask meets its box fades out in
    the box's ellipse; the Herlev localization slide keeps its first design without it).

    Returns rgb, nucleus labels (labelled nuclei only) with their kinds, and cell-footprint labels with
    their kinds.
    """
    from scipy.ndimage import binary_dilation, gaussian_filter
    from scipy.ndimage import label as cc_label

    from wsi_screen.train.cell_slides import cut_by_box, ellipse_fade

    rng = np.random.default_rng(seed)
    sized = []
    for rgb, lab, kind, mpp in items:
        factor = mpp / SLIDE_MPP
        sized.append((kind, _resample(rgb, factor, labels=False), _resample(lab, factor, labels=True)))
    pitch = int(max(max(r.shape[:2]) for _, r, _ in sized) * 0.75) + 80  # gaps of ≥ 20 µm
    cols = math.ceil(math.sqrt(len(sized)))
    rows = math.ceil(len(sized) / cols)
    H, W = rows * pitch + 256, cols * pitch + 256
    canvas = _glass(rng, (H, W))
    labels = np.zeros((H, W), np.uint32)
    cell_labels = np.zeros((H, W), np.uint32)
    kinds: list[str] = [""]
    cell_kinds: list[str] = [""]
    order = rng.permutation(len(sized))
    for slot, idx in enumerate(order):
        kind, rgb, lab = sized[int(idx)]
        k = int(rng.integers(4))
        rgb, lab = np.rot90(rgb, k), np.rot90(lab, k)
        h, w = lab.shape
        if max(h, w) > pitch - 40:  # the largest crops: scale into the slot
            s = (pitch - 40) / max(h, w)
            rgb, lab = (
                _resample(np.ascontiguousarray(rgb), s, labels=False),
                _resample(np.ascontiguousarray(lab), s, labels=True),
            )
            h, w = lab.shape
        r, q = divmod(slot, cols)
        cy = 128 + r * pitch + pitch // 2 + int(rng.integers(-pitch // 8, pitch // 8 + 1))
        cx = 128 + q * pitch + pitch // 2 + int(rng.integers(-pitch // 8, pitch // 8 + 1))
        y0, x0 = max(0, cy - h // 2), max(0, cx - w // 2)
        y1, x1 = min(H, y0 + h), min(W, x0 + w)
        sub_lab = lab[: y1 - y0, : x1 - x0]
        sub_rgb = rgb[: y1 - y0, : x1 - x0].astype(np.float32)
        body = binary_dilation(sub_lab > 0, iterations=2)
        alpha = gaussian_filter(body.astype(np.float32), 3.0)
        alpha = np.maximum(alpha, (sub_lab > 0).astype(np.float32))
        if fade_cut and cut_by_box(body):  # cut by its box: no straight edge
            alpha *= ellipse_fade(sub_lab.shape, width=0.3)
        region = canvas[y0:y1, x0:x1]
        canvas[y0:y1, x0:x1] = alpha[..., None] * sub_rgb + (1.0 - alpha[..., None]) * region
        cell_labels[y0:y1, x0:x1][alpha >= 0.5] = len(cell_kinds)
        cell_kinds.append(kind)
        nuc, n = cc_label((sub_lab == 2) & (alpha >= 0.5))
        lab_region = labels[y0:y1, x0:x1]
        for i in range(1, n + 1):
            m = nuc == i
            if m.sum() < MIN_TRUTH_NUCLEUS_UM2 / SLIDE_MPP**2:  # mask noise
                continue
            lab_region[m] = len(kinds)
            kinds.append(kind)
    return np.clip(canvas, 0, 255).astype(np.uint8), labels, kinds, cell_labels, cell_kinds


def cells_slide(
    data: Path, manifest: dict, part: str, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray, list[str]]:
    """Herlev cells and lbc-cells crops of ``part``, labelled by their bundle class
    (``herlev-bethesda``, ``lbc-cells-bethesda``), for the classifier's end-to-end figures."""
    from wsi_screen.train.cell_slides import load_labelled_cells
    from wsi_screen.train.data import load_class_map
    from wsi_screen.train.fields import split_names

    cells = load_labelled_cells(
        data, "herlev", split_names(manifest, "herlev", part), load_class_map("herlev-bethesda")
    )
    cells += load_labelled_cells(
        data, "lbc_cells", split_names(manifest, "lbc_cells", part), load_class_map("lbc-cells-bethesda")
    )
    items = [(c.rgb, c.label, _cell_kind(c), c.mpp) for c in cells]
    return lattice_slide(items, seed)


def _cell_kind(cell: Any) -> str:
    """A cell's bundle class; Herlev's normal cells as ``NILM squamous`` or ``NILM columnar``
    (the classifier's per-source bar is on NILM squamous cells)."""
    if cell.source == "herlev" and cell.klass == "NILM":
        folder = cell.name.split("/", 1)[0]
        return "NILM columnar" if folder == "normal_columnar" else "NILM squamous"
    return str(cell.klass)


def mosaic_slide(
    images: list[Any], image_mpp: float, name: str, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Annotated fields resampled to 0.25 µm/px in a mosaic on glass; instance labels kept."""
    rng = np.random.default_rng(seed)
    factor = image_mpp / SLIDE_MPP
    tiles = [
        (_resample(im.rgb, factor, labels=False), _resample(im.nuclei, factor, labels=True)) for im in images
    ]
    gap = 96
    cell = max(max(t[0].shape[:2]) for t in tiles) + gap
    cols = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    H, W = rows * cell + 2 * gap, cols * cell + 2 * gap
    canvas = _glass(rng, (H, W), grey=all(im.grey for im in images))
    labels = np.zeros((H, W), np.uint32)
    kinds: list[str] = [""]
    for i, (rgb, lab) in enumerate(tiles):
        r, q = divmod(i, cols)
        y0, x0 = gap + r * cell, gap + q * cell
        h, w = lab.shape
        canvas[y0 : y0 + h, x0 : x0 + w] = rgb
        region = labels[y0 : y0 + h, x0 : x0 + w]
        for v in np.unique(lab[lab > 0]):
            region[lab == v] = len(kinds)
            kinds.append(name)
    return np.clip(canvas, 0, 255).astype(np.uint8), labels, kinds


def build(
    data: Path, manifest_path: Path, part: str, out: Path, *, which: list[str], seed: int = 0
) -> list[Path]:
    from wsi_screen.train.fields import SOURCE_MPP, load_source_images, read_split_manifest, split_names

    m = read_split_manifest(manifest_path)
    out.mkdir(parents=True, exist_ok=True)
    made = []
    for kind in which:
        extra: dict[str, Any] = {}
        if kind == "herlev":
            rgb, labels, kinds = herlev_slide(data, split_names(m, "herlev", part), seed)
        elif kind == "cells":
            rgb, labels, kinds, cell_labels, cell_kinds = cells_slide(data, m, part, seed)
            extra = {"cells": cell_labels, "cell_kind": np.asarray(cell_kinds)}
        else:
            src = {"lbc": "lbc_nuclei", "cnseg": "cnseg", "isbi": "isbi2014"}[kind]
            images = load_source_images(data, src, split_names(m, src, part))
            rgb, labels, kinds = mosaic_slide(images, SOURCE_MPP[src], src, seed)
        path = out / f"real-{kind}-{part}.tiff"
        write_pyramid_tiff(path, rgb, SLIDE_MPP)
        np.savez_compressed(
            path.with_suffix(".truth.npz"),
            nuclei=labels,
            kind=np.asarray(kinds),
            mpp=np.float64(SLIDE_MPP),
            **extra,
        )
        print(f"wrote {path} ({rgb.shape[1]}×{rgb.shape[0]} px, {len(kinds) - 1} nuclei)", flush=True)
        made.append(path)
    return made


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    p.add_argument("--part", choices=["train", "val", "test"], default="test")
    p.add_argument("--which", nargs="+", default=["herlev", "lbc", "cnseg", "isbi"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--out", type=Path, required=True)
    args = p.parse_args(argv)
    build(args.data, args.manifest, args.part, args.out, which=args.which, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
