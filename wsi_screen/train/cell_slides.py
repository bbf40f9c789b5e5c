"""Slides composed of real labelled cells, for training and measuring the classifier on the pipeline's
own crops.

A crop folder (Herlev, ``lbc-cells``) holds tight boxes around one cell, and box size differs by class
(HSIL crops ≈ 70 px wide, ASC-US ≈ 150 px). The classifier must never see a crop's rectangle, so
cells are not classified as crops: they are pasted into slide files and the slides are screened by
the inference path (cell regions, slide-level Reinhard, the shipped localizer, 224² crops at the
detections), exactly as ``wsi-screen run`` cuts them.

Pasting (:func:`paste_layers`) is additive in optical density, as light is absorbed: a cell adds its
density *above its own crop's glass*, inside its foreground mask (the expert mask for Herlev; for
mask-less crops, the pixels whose density is above the glass by more than the JPEG noise), dilated
and feathered. The crop's glass therefore adds exactly nothing: a crop reduced to its glass (the box
without its content, :func:`compose_cell_slide` with ``blank=True``) leaves the slide unchanged
(tested), so neither the rectangle nor its seam can reach the classifier. Cells cut by their box fade
out inside an ellipse, so a straight box edge never appears either.

Backgrounds are real LBC fields (``lbc-nuclei``, unrotated copies: their nuclei are NILM squamous
and neutrophil nuclei and stay labelled) pasted the same way onto glass with smooth unevenness.

Truth (:class:`CellSlide`): a label image of pasted cell footprints (later cells on top), one of the
pasted cells' known nuclei, one of the background nuclei, and each pasted cell's class, source and
name. :func:`label_detections` gives each detection the class of what it sits on.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen.train.unet import AnnotatedImage, TrainingDataError

__all__ = [
    "LBC_CELLS_MPP",
    "CellSlide",
    "LabelledCell",
    "compose_cell_slide",
    "foreground_label",
    "label_detections",
    "load_labelled_cells",
    "paste_layers",
    "write_image_slide",
]

logger = logging.getLogger(__name__)

U8 = NDArray[np.uint8]
F32 = NDArray[np.float32]

#: µm/px of the ``lbc-cells`` crops: a Pannoramic MIDI II at 20× (the source states ≈ 0.24).
LBC_CELLS_MPP = 0.243
#: A foreground pixel's summed optical density above its crop's glass (≈ a 5 % drop per channel,
#: several times the JPEG noise of the glass).
FOREGROUND_OD = 0.12


@dataclass
class LabelledCell:
    """One real labelled cell crop: ``label`` 0 glass, 1 cell, 2 nucleus, 255 unknown (as Herlev's)."""

    name: str
    klass: str
    source: str
    rgb: U8
    label: U8
    mpp: float
    nucleus_known: bool


def od(rgb: NDArray[Any]) -> F32:
    """Optical density of 8-bit RGB for compositing, ``-ln((v + 1) / 256)`` (natural log).

    Deliberately not the pipeline's density (:mod:`wsi_screen.optical_density`, ``-log10(v / 255)``
    with ``v`` clipped to ≥ 1): pasting adds densities and converts back to 8 bits, so this one must
    be exactly invertible on all 256 levels (:func:`rgb_from_od` returns every ``v``; clipping would
    merge 0 and 1), and glass at 255 is exactly 0. Thresholds here (``FOREGROUND_OD``) are in its
    natural-log units.
    """
    out: F32 = -np.log((rgb.astype(np.float32) + 1.0) / 256.0)
    return out


def rgb_from_od(d: F32) -> U8:
    """Inverse of :func:`od`, rounded and clipped to 8 bits."""
    return np.clip(np.rint(256.0 * np.exp(-d) - 1.0), 0, 255).astype(np.uint8)


def _glass_od(c_od: F32, label: NDArray[np.uint8] | None) -> F32:
    """The crop's glass density: the median of its glass pixels when the mask marks enough of them,
    else of its brightest 10 % (a crop filled by its cell has no glass: then no lighter than 220)."""
    if label is not None:
        g = c_od[label == 0]
        if g.shape[0] >= 20:
            out: F32 = np.median(g, axis=0).astype(np.float32)
            return out
    flat = c_od.reshape(-1, 3)
    total = flat.sum(axis=1)
    k = max(1, flat.shape[0] // 10)
    light = flat[np.argpartition(total, k - 1)[:k]]
    g = np.median(light, axis=0).astype(np.float32)
    capped: F32 = np.minimum(g, od(np.full(3, 220, np.uint8))).astype(np.float32)
    return capped


def foreground_label(rgb: U8) -> U8:
    """A cell mask for a crop without one: 1 where density is above the crop's glass, else 0."""
    from scipy.ndimage import binary_closing, binary_fill_holes, binary_opening

    c_od = od(rgb)
    fg = (c_od - _glass_od(c_od, None)[None, None, :]).sum(axis=-1) > FOREGROUND_OD
    # Morphology on an edge-padded mask, so that a cell cut by the box still touches the box.
    p = 3
    fg = np.pad(fg, p, mode="edge")
    fg = binary_opening(fg, iterations=1)
    fg = binary_fill_holes(binary_closing(fg, iterations=2))[p:-p, p:-p]
    mask: U8 = np.asarray(fg, dtype=np.uint8)
    return mask


def paste_layers(
    rgb: U8,
    label: U8,
    *,
    scale: float,
    rng: np.random.Generator,
    instances: NDArray[np.integer[Any]] | None = None,
) -> tuple[F32, F32, U8, NDArray[np.int32] | None]:
    """A crop ready to add onto a field: (density above its glass × alpha, alpha, label, instances),
    resized by ``scale``, turned by a multiple of 90° and flipped at random (``instances``, an
    optional label image of the crop, goes through the same resize and turn).

    Alpha is the cell mask dilated by 1 px and feathered (σ 1.5 px); a cell cut by its box (mask on
    more than 5 % of the border) also fades out inside the box's ellipse. Outside the mask the crop
    contributes nothing, whatever its glass.
    """
    from scipy.ndimage import binary_dilation, gaussian_filter

    h, w = label.shape
    ch, cw = max(4, round(h * scale)), max(4, round(w * scale))
    c_od = _resize(od(rgb), (ch, cw), nearest=False)
    c_lab = _resize(label, (ch, cw), nearest=True)
    inst = None if instances is None else _resize(instances.astype(np.int32), (ch, cw), nearest=True)
    k = int(rng.integers(4))
    c_od, c_lab = np.rot90(c_od, k), np.rot90(c_lab, k)
    inst = None if inst is None else np.rot90(inst, k)
    if rng.uniform() < 0.5:
        c_od, c_lab = c_od[:, ::-1], c_lab[:, ::-1]
        inst = None if inst is None else inst[:, ::-1]
    ch, cw = c_lab.shape
    glass = _glass_od(c_od, c_lab)
    body = binary_dilation(c_lab > 0, iterations=1)
    alpha = np.clip(gaussian_filter(body.astype(np.float32), 1.5) * 1.6 - 0.3, 0.0, 1.0)
    alpha[c_lab > 0] = 1.0
    alpha[~binary_dilation(body, iterations=3)] = 0.0
    if cut_by_box(body):  # fade out inside the box's ellipse
        alpha *= ellipse_fade((ch, cw), width=0.25)
    c_lab = np.where((c_lab == 2) & (alpha < 0.5), 1, c_lab).astype(np.uint8)
    contrib = (np.clip(c_od - glass[None, None, :], 0.0, None) * alpha[..., None]).astype(np.float32)
    return (
        np.ascontiguousarray(contrib),
        np.ascontiguousarray(alpha.astype(np.float32)),
        np.ascontiguousarray(c_lab),
        None if inst is None else np.ascontiguousarray(inst),
    )


def cut_by_box(mask: NDArray[np.bool_]) -> bool:
    """Whether a crop's cell mask covers more than 5 % of the crop's border (the box cuts the cell)."""
    edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    return bool(edge.mean() > 0.05)


def ellipse_fade(shape: tuple[int, int], *, width: float) -> F32:
    """1 inside the box's inscribed ellipse, falling linearly to 0 over ``width`` (a fraction of the
    semi-axes) at its rim. Semi-axes are one pixel short of the box: the outermost pixel row and
    column are 0, so no straight box edge is drawn."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    d = np.hypot((yy + 0.5 - h / 2) / max(1.0, h / 2 - 1), (xx + 0.5 - w / 2) / max(1.0, w / 2 - 1))
    out: F32 = np.clip((1.0 - d) / width, 0.0, 1.0).astype(np.float32)
    return out


def _resize(a: NDArray[Any], shape: tuple[int, int], *, nearest: bool) -> NDArray[Any]:
    from skimage.transform import resize

    if a.shape[:2] == shape:
        return a
    out: NDArray[Any]
    if nearest:
        out = resize(a, shape, order=0, preserve_range=True, anti_aliasing=False).astype(a.dtype)  # type: ignore[no-untyped-call]
    else:
        out = resize(  # type: ignore[no-untyped-call]
            a.astype(np.float32), shape, order=1, preserve_range=True, anti_aliasing=True
        ).astype(np.float32)
    return out


def load_labelled_cells(
    data: str | os.PathLike[str],
    source: str,
    keys: Sequence[str],
    class_map: Mapping[str, str | None],
) -> list[LabelledCell]:
    """Cells of ``herlev`` (expert masks) or ``lbc_cells`` (foreground masks) for manifest keys.

    ``class_map`` maps a source folder to a bundle class (``None``: left out); a folder missing from
    it is an error naming the folder.
    """
    from wsi_screen.train.fields import SOURCE_MPP, _read_rgb, load_herlev_cells

    def klass(folder: str) -> str | None:
        if folder not in class_map:
            raise TrainingDataError(
                f"{source}: folder {folder!r} is not in the class map (known: {', '.join(sorted(class_map))})"
            )
        return class_map[folder]

    out: list[LabelledCell] = []
    if source == "herlev":
        for c in load_herlev_cells(data, keys):
            k = klass(c.herlev_class)
            if k is not None:
                out.append(
                    LabelledCell(
                        c.name, k, "herlev", c.rgb, c.label, SOURCE_MPP["herlev"], nucleus_known=True
                    )
                )
        return out
    if source == "lbc_cells":
        root = Path(data) / "lbc-cells"
        for key in keys:
            folder = key.split("/", 1)[0]
            k = klass(folder)
            if k is None:
                continue
            path = root / key
            if not path.is_file():
                raise TrainingDataError(f"lbc-cells crop {key} not found: {path}")
            rgb = _read_rgb(path)
            out.append(
                LabelledCell(
                    key, k, "lbc_cells", rgb, foreground_label(rgb), LBC_CELLS_MPP, nucleus_known=False
                )
            )
        return out
    raise TrainingDataError(f"{source!r} is not a labelled cell source; known: herlev, lbc_cells")


@dataclass
class CellSlide:
    """A composed slide and its truth (level-0 px at ``mpp``).

    ``cells``: uint32 label image of the pasted cells' footprints (alpha ≥ 0.5; later cells on top),
    label i+1 for ``klass[i]``/``source[i]``/``names[i]``; ``nuclei``: uint32 label image of the
    pasted cells' known nuclei, by the same label; ``background``: uint32 label image of the
    background fields' nuclei (NILM).
    """

    rgb: U8
    cells: NDArray[np.uint32]
    nuclei: NDArray[np.uint32]
    background: NDArray[np.uint32]
    klass: list[str]
    source: list[str]
    names: list[str]
    mpp: float
    info: dict[str, Any] = field(default_factory=dict)

    def save_truth(self, path: str | os.PathLike[str]) -> Path:
        p = Path(path)
        np.savez_compressed(
            p,
            cells=self.cells,
            nuclei=self.nuclei,
            background=self.background,
            klass=np.asarray(self.klass, dtype=str),
            source=np.asarray(self.source, dtype=str),
            names=np.asarray(self.names, dtype=str),
            mpp=np.float64(self.mpp),
        )
        return p

    @staticmethod
    def load_truth(path: str | os.PathLike[str]) -> CellSlide:
        with np.load(Path(path)) as z:
            cells = z["cells"]
            return CellSlide(
                rgb=np.zeros((0, 0, 3), np.uint8),
                cells=cells,
                nuclei=z["nuclei"],
                background=z["background"],
                klass=[str(v) for v in z["klass"]],
                source=[str(v) for v in z["source"]],
                names=[str(v) for v in z["names"]],
                mpp=float(z["mpp"]),
            )


def _unevenness(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> F32:
    """Smooth zero-mean unit noise at ``scale_px`` (drawn small and upsampled: cheap for big slides)."""
    from scipy.ndimage import gaussian_filter

    f = max(1, int(scale_px // 4))
    small = (max(2, shape[0] // f + 2), max(2, shape[1] // f + 2))
    n = gaussian_filter(rng.normal(0.0, 1.0, size=small).astype(np.float32), sigma=scale_px / f)
    n = np.repeat(np.repeat(n, f, axis=0), f, axis=1)[: shape[0], : shape[1]]
    out: F32 = (n / max(float(n.std()), 1e-6)).astype(np.float32)
    return out


def compose_cell_slide(
    cells: Sequence[LabelledCell],
    *,
    backgrounds: Sequence[tuple[AnnotatedImage, float]] = (),
    n_backgrounds: tuple[int, int] = (2, 4),
    mpp: float = 0.25,
    size_px: int = 4096,
    pitch_um: float = 80.0,
    blur_p: float = 0.3,
    seed: int = 0,
    blank: bool = False,
) -> CellSlide:
    """Paste ``cells`` (each once) on a jittered lattice of ``pitch_um`` over glass and real LBC fields.

    Cells are scaled by ``cell.mpp / mpp`` × U(0.9, 1.1); lattice slots are filled in a random order
    until the cells run out (a slide holds ≈ (size · mpp / pitch)² cells: pass that many). ``blank``
    replaces every cell's content by its own glass (the box without its content): the result is the
    background alone, which is the paste-shortcut ablation.
    """
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    H = W = int(size_px)
    tint = np.clip(rng.uniform(228, 248) + rng.normal(0, 3, 3), 210, 252)
    canvas = np.broadcast_to(od(tint)[None, None, :], (H, W, 3)).astype(np.float32)
    canvas = canvas + 0.015 * _unevenness(rng, (H, W), 200.0)[..., None]
    background = np.zeros((H, W), np.uint32)
    n_bg = 0
    if backgrounds:
        for _ in range(int(rng.integers(n_backgrounds[0], n_backgrounds[1] + 1))):
            img, img_mpp = backgrounds[int(rng.integers(len(backgrounds)))]
            s = img_mpp / mpp * float(rng.uniform(0.92, 1.08))
            f_rgb, f_nuc = _trim_bars(img.rgb, img.nuclei)
            whole = np.ones(f_nuc.shape, np.uint8)  # the whole field is pasted: its glass adds nothing
            contrib, alpha, _, nuc = paste_layers(f_rgb, whole, scale=s, rng=rng, instances=f_nuc)
            assert nuc is not None
            h, w = alpha.shape
            y0 = int(rng.integers(-h // 4, max(1, H - 3 * h // 4)))
            x0 = int(rng.integers(-w // 4, max(1, W - 3 * w // 4)))
            sl_canvas, sl_crop = _overlap((y0, x0), (h, w), (H, W))
            if sl_canvas is None or sl_crop is None:
                continue
            canvas[sl_canvas] += contrib[sl_crop]
            region = background[sl_canvas]
            sub = nuc[sl_crop]
            vis = alpha[sl_crop] >= 0.5
            for v in np.unique(sub[(sub > 0) & vis]):
                n_bg += 1
                region[(sub == v) & vis] = n_bg
    cell_lab = np.zeros((H, W), np.uint32)
    nuc_lab = np.zeros((H, W), np.uint32)
    pitch = max(16, round(pitch_um / mpp))
    rows, cols = max(1, H // pitch), max(1, W // pitch)
    slots = rng.permutation(rows * cols)
    klass: list[str] = []
    source: list[str] = []
    names: list[str] = []
    order = rng.permutation(len(cells))
    for slot, ci in zip(slots.tolist(), order.tolist(), strict=False):
        c = cells[int(ci)]
        s = c.mpp / mpp * float(rng.uniform(0.9, 1.1))
        rgb = c.rgb
        if blank:  # the box without its content: every pixel is the crop's own glass
            g = rgb_from_od(_glass_od(od(rgb), c.label))
            rgb = np.broadcast_to(g[None, None, :], rgb.shape).copy()
        contrib, alpha, lab, _ = paste_layers(rgb, c.label, scale=s, rng=rng)
        h, w = alpha.shape
        r, q = divmod(slot, cols)
        cy = int((r + 0.5) * pitch + rng.integers(-pitch // 5, pitch // 5 + 1))
        cx = int((q + 0.5) * pitch + rng.integers(-pitch // 5, pitch // 5 + 1))
        sl_canvas, sl_crop = _overlap((cy - h // 2, cx - w // 2), (h, w), (H, W))
        if sl_canvas is None or sl_crop is None:
            continue
        canvas[sl_canvas] += contrib[sl_crop]
        idx = len(klass) + 1
        klass.append(c.klass)
        source.append(c.source)
        names.append(c.name)
        cell_lab[sl_canvas][alpha[sl_crop] >= 0.5] = idx
        if c.nucleus_known:
            nuc_lab[sl_canvas][lab[sl_crop] == 2] = idx
    blurred = rng.uniform() < blur_p
    if blurred:
        sigma = float(rng.uniform(0.3, 1.0))
        canvas = np.stack([gaussian_filter(canvas[..., i], sigma) for i in range(3)], axis=-1)
    canvas += rng.normal(0.0, 0.004, size=canvas.shape).astype(np.float32)
    return CellSlide(
        rgb=rgb_from_od(canvas.astype(np.float32)),
        cells=cell_lab,
        nuclei=nuc_lab,
        background=background,
        klass=klass,
        source=source,
        names=names,
        mpp=mpp,
        info={"seed": seed, "blurred": blurred, "background_nuclei": n_bg, "blank": blank},
    )


def _trim_bars(rgb: U8, nuclei: NDArray[Any]) -> tuple[U8, NDArray[Any]]:
    """A letterboxed field without its white bars and the line along them (4 px more)."""
    white = (rgb.min(axis=-1) > 245).mean
    rows = np.flatnonzero(white(axis=1) < 0.98)
    cols = np.flatnonzero(white(axis=0) < 0.98)
    if rows.size < 64 or cols.size < 64:
        return rgb, nuclei
    y0, y1 = int(rows[0]) + 4, int(rows[-1]) - 3
    x0, x1 = int(cols[0]) + 4, int(cols[-1]) - 3
    return rgb[y0:y1, x0:x1], nuclei[y0:y1, x0:x1]


def _overlap(
    origin: tuple[int, int], shape: tuple[int, int], canvas: tuple[int, int]
) -> tuple[tuple[slice, slice] | None, tuple[slice, slice] | None]:
    """Slices of the canvas and of a patch at ``origin`` where they overlap (None, None: nowhere)."""
    y0, x0 = origin
    h, w = shape
    cy0, cx0 = max(0, y0), max(0, x0)
    cy1, cx1 = min(canvas[0], y0 + h), min(canvas[1], x0 + w)
    if cy1 - cy0 < 4 or cx1 - cx0 < 4:
        return None, None
    return (slice(cy0, cy1), slice(cx0, cx1)), (slice(cy0 - y0, cy1 - y0), slice(cx0 - x0, cx1 - x0))


#: What a detection on a background field's nucleus is.
BACKGROUND_CLASS = "NILM"
BACKGROUND_SOURCE = "lbc_nuclei"


def label_detections(
    x: NDArray[np.floating[Any]],
    y: NDArray[np.floating[Any]],
    truth: CellSlide,
    *,
    tolerance_um: float = 1.0,
) -> tuple[list[str], list[str], NDArray[np.int64]]:
    """The class, source and pasted-cell index (-1: background nucleus or nothing) of each detection.

    In this order: a pasted cell's known nucleus (dilated by ``tolerance_um``), a background nucleus
    (likewise: NILM, ``lbc_nuclei``), a pasted cell's footprint; else the class is ``""`` (unlabelled
    background: dropped from training, it is neither a target nor a known artifact).
    """
    from scipy.ndimage import grey_dilation

    r = max(1, round(tolerance_um / truth.mpp))
    fp = np.hypot(*np.mgrid[-r : r + 1, -r : r + 1]) <= r
    xs = np.floor(np.asarray(x, np.float64)).astype(np.int64)
    ys = np.floor(np.asarray(y, np.float64)).astype(np.int64)
    H, W = truth.cells.shape
    inside = (xs >= 0) & (ys >= 0) & (xs < W) & (ys < H)
    xs, ys = np.clip(xs, 0, W - 1), np.clip(ys, 0, H - 1)
    nuc = grey_dilation(truth.nuclei, footprint=fp)[ys, xs]
    bg = grey_dilation(truth.background, footprint=fp)[ys, xs]
    cell = truth.cells[ys, xs]
    klass: list[str] = []
    source: list[str] = []
    index = np.full(xs.shape, -1, np.int64)
    for i in range(xs.size):
        if not inside[i]:
            klass.append("")
            source.append("")
        elif nuc[i] > 0:
            index[i] = int(nuc[i]) - 1
        elif bg[i] > 0:
            klass.append(BACKGROUND_CLASS)
            source.append(BACKGROUND_SOURCE)
            continue
        elif cell[i] > 0:
            index[i] = int(cell[i]) - 1
        else:
            klass.append("")
            source.append("")
            continue
        if index[i] >= 0:
            klass.append(truth.klass[index[i]])
            source.append(truth.source[index[i]])
    return klass, source, index


def write_image_slide(path: str | os.PathLike[str], rgb: U8, mpp: float, *, quality: int = 90) -> Path:
    """A tiled (256²) JPEG pyramidal TIFF of ``rgb`` (levels ÷4 as further pages) at ``mpp`` µm/px."""
    import tifffile
    from skimage.transform import downscale_local_mean

    p = Path(path)
    levels = [rgb]
    while max(levels[-1].shape[:2]) > 2048:
        prev = levels[-1]
        h, w = prev.shape[0] // 4 * 4, prev.shape[1] // 4 * 4
        levels.append(downscale_local_mean(prev[:h, :w], (4, 4, 1)).round().astype(np.uint8))  # type: ignore[no-untyped-call]
    tmp = p.with_name(p.name + ".tmp")
    with tifffile.TiffWriter(tmp, bigtiff=rgb.nbytes > 2**31) as tif:
        for i, lev in enumerate(levels):
            f = 4**i
            tif.write(
                lev,
                photometric="rgb",
                tile=(256, 256),
                compression="jpeg",
                compressionargs={"level": quality},
                resolution=(1e4 / (mpp * f), 1e4 / (mpp * f)),
                resolutionunit="CENTIMETER",
                subfiletype=0 if i == 0 else 1,
            )
    os.replace(tmp, p)
    return p
