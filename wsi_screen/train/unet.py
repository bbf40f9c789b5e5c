"""Training the nucleus-localization U-Net (``wsi-screen train unet``, ``pipelines/train_unet.py``).

Data, all brought to the model's µm/px through the inference code (:func:`wsi_screen.localize.model_input`):

- **Annotated images** (:func:`load_annotated_images`): ``images/NN.png`` with a nucleus mask of the
  same stem in ``masks/`` — a label image (ISBI 2014: uint16, one label per nucleus; QuPath label
  export) or a binary mask (instances = connected components) — and optionally ``cytoplasm/NN.png``
  (cell label or binary mask; ISBI 2014's). Each image is Reinhard-normalized towards the stain target
  with its own glass-masked statistics (an image is its own "slide"). A **greyscale** image (ISBI) has
  no colour statistics, so Reinhard is applied to its lightness only: its L statistics are mapped to the
  target's and its α, β channels are set to the target's means (a grey image takes the target's mean
  tint), which is exactly what Reinhard does to the L channel of a colour image.
- **Synthetic fields** (:func:`synthetic_samples`): small slides drawn by :mod:`wsi_screen.synth` with
  every stain/scanner profile, written as JPEG-compressed pyramidal TIFFs, opened with
  :func:`~wsi_screen.slide.open_slide`, read in 1024² windows at 0.25 µm/px, normalized with slide-level
  source statistics (:func:`wsi_screen.pipeline.estimate_source_stats`) — the inference path — with
  exact masks rasterized from the ground-truth polygons.

Targets per model pixel: ``nucleus`` (union of nucleus masks), ``marker`` (a disc of half the nucleus's
equivalent radius at its centroid: the seeds that split touching nuclei) and ``cell`` (union of cell
masks; ignored where unknown). Loss: BCE + soft Dice on nucleus and marker, BCE on cell (× 0.5).
Runs are deterministic for a seed (same machine, torch version and thread count).
"""

from __future__ import annotations

import logging
import math
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen.errors import WsiScreenError
from wsi_screen.optical_density import transmittance_od_torch
from wsi_screen.train.common import Progress, Stopwatch, resolve_training_device, seed_everything

if TYPE_CHECKING:
    import torch
    from torch import nn

    from wsi_screen.models.bundle import ModelBundle
    from wsi_screen.stain import ReinhardStats

__all__ = [
    "AnnotatedImage",
    "ImageSource",
    "NucleusSample",
    "TrainingDataError",
    "TrainingPaused",
    "UNetRecipe",
    "evaluate_samples",
    "grey_source_stats",
    "label_centres",
    "load_annotated_images",
    "match_points",
    "normalize_image",
    "rates",
    "sample_from_image",
    "synthetic_samples",
    "train_unet",
]

logger = logging.getLogger(__name__)

U8 = NDArray[np.uint8]
F32 = NDArray[np.float32]
F64 = NDArray[np.float64]

_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
_MASK_SUFFIXES = (".png", ".tif", ".tiff")
#: Marker disc radius as a fraction of the nucleus's equivalent radius (and its floor in px).
_MARKER_FRACTION = 0.5
_MARKER_MIN_PX = 1.5
#: Window resolution of synthetic slides (the pipeline reads tiles at the classifier's 0.25 µm/px).
SYNTH_WINDOW_MPP = 0.25
SYNTH_STAINS = ("default", "pale", "dark", "blue", "pink", "scanner_b")
IGNORE = 255


class TrainingDataError(WsiScreenError, ValueError):
    """Training images or masks are missing, unreadable or inconsistent."""


class TrainingPaused(WsiScreenError):
    """A training run stopped at its time budget; its checkpoint lets it resume."""


# -- data -----------------------------------------------------------------------------------------------


@dataclass
class AnnotatedImage:
    """An image with nucleus instances (and optionally cell masks) at its own µm/px."""

    name: str
    rgb: U8
    grey: bool
    nuclei: NDArray[np.int32]
    cells: NDArray[np.bool_] | None = None


@dataclass
class NucleusSample:
    """One training/validation image at the model's µm/px: features, targets and nucleus centres."""

    name: str
    source: str
    features: NDArray[np.float16]  # (C, h, w), not standardized
    nucleus: U8  # (h, w) 0/1
    marker: U8  # (h, w) 0/1
    cell: U8  # (h, w) 0/1, IGNORE where unknown
    od: NDArray[np.float16]  # (h, w) optical density
    centres: F64  # (n, 2) x, y in continuous model px
    radii: F64  # (n,) equivalent radius, model px
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class ImageSource:
    """A named source of annotated images at one µm/px, already split into train and validation.

    ``weight`` is the source's share of the training crops (shares are normalized over the sources
    and the synthetic fields, whose share is ``UNetRecipe.synthetic_weight``).
    """

    name: str
    mpp: float
    train: list[AnnotatedImage]
    val: list[AnnotatedImage] = field(default_factory=list)
    weight: float = 1.0


def _read_any(path: Path) -> NDArray[Any]:
    from PIL import Image

    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        return np.asarray(tifffile.imread(path))
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L", "I", "L", "1", "F"):
            return np.asarray(im)
        return np.asarray(im.convert("RGB"))


def _find_with_stem(folder: Path, stem: str, suffixes: Sequence[str]) -> Path | None:
    for suf in suffixes:
        for cand in (folder / f"{stem}{suf}", folder / f"{stem}{suf.upper()}"):
            if cand.is_file():
                return cand
    return None


def _instances(mask: NDArray[Any], what: str) -> NDArray[np.int32]:
    """A label image from a label or binary mask (binary: connected components are instances)."""
    from scipy import ndimage

    if mask.ndim == 3:
        if mask.shape[2] in (3, 4) and np.all(mask[..., :3] == mask[..., :1]):
            mask = mask[..., 0]
        else:
            raise TrainingDataError(f"{what}: a mask must be a single-channel label or binary image")
    values = np.unique(mask)
    if len(values) <= 2:  # binary (or empty): connected components
        labels, _ = ndimage.label(mask > 0)
        out: NDArray[np.int32] = labels.astype(np.int32)
        return out
    if not np.issubdtype(mask.dtype, np.integer):
        raise TrainingDataError(f"{what}: a label image must be integer, got {mask.dtype}")
    return mask.astype(np.int32)


def load_annotated_images(
    images_dir: str | os.PathLike[str],
    masks_dir: str | os.PathLike[str],
    *,
    cytoplasm_dir: str | os.PathLike[str] | None = None,
    names: Sequence[str] | None = None,
) -> list[AnnotatedImage]:
    """Images with nucleus masks of the same stem (ISBI 2014 layout or QuPath exports).

    Args:
        images_dir: RGB or greyscale images (PNG, TIFF, JPEG).
        masks_dir: nucleus masks with the image's stem: label images or binary masks (PNG/TIFF).
        cytoplasm_dir: optional cell masks with the same stem (label or binary).
        names: only these stems (default: every image that has a mask).
    """
    img_dir, msk_dir = Path(images_dir), Path(masks_dir)
    for d, what in ((img_dir, "images"), (msk_dir, "masks")):
        if not d.is_dir():
            raise TrainingDataError(f"{what} folder not found: {d}")
    cyto_dir = Path(cytoplasm_dir) if cytoplasm_dir is not None else None
    if cyto_dir is not None and not cyto_dir.is_dir():
        raise TrainingDataError(f"cytoplasm folder not found: {cyto_dir}")
    files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file())
    if names is not None:
        wanted = set(names)
        files = [p for p in files if p.stem in wanted]
        missing = wanted - {p.stem for p in files}
        if missing:
            raise TrainingDataError(f"no image for {sorted(missing)} in {img_dir}")
    out: list[AnnotatedImage] = []
    skipped: list[str] = []
    for path in files:
        mpath = _find_with_stem(msk_dir, path.stem, _MASK_SUFFIXES)
        if mpath is None:
            skipped.append(path.name)
            continue
        try:
            img = _read_any(path)
            mask = _read_any(mpath)
        except Exception as exc:  # PIL/tifffile raise many types
            raise TrainingDataError(f"cannot read {path.name} or its mask: {exc}") from exc
        grey = img.ndim == 2 or (
            img.ndim == 3
            and bool(np.all(img[..., 0] == img[..., 1]))
            and bool(np.all(img[..., 1] == img[..., 2]))
        )
        if img.dtype != np.uint8:
            raise TrainingDataError(f"{path.name}: images must be 8-bit, got {img.dtype}")
        rgb = np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else np.ascontiguousarray(img[..., :3])
        nuclei = _instances(mask, mpath.name)
        if nuclei.shape != rgb.shape[:2]:
            raise TrainingDataError(
                f"{mpath.name} is {nuclei.shape}, its image {path.name} is {rgb.shape[:2]}"
            )
        cells = None
        if cyto_dir is not None:
            cpath = _find_with_stem(cyto_dir, path.stem, _MASK_SUFFIXES)
            if cpath is not None:
                cmask = _read_any(cpath)
                cmask = cmask[..., 0] if cmask.ndim == 3 else cmask
                if cmask.shape != rgb.shape[:2]:
                    raise TrainingDataError(f"{cpath.name} is {cmask.shape}, its image is {rgb.shape[:2]}")
                cells = cmask > 0
        out.append(AnnotatedImage(name=path.stem, rgb=rgb, grey=grey, nuclei=nuclei, cells=cells))
    if skipped:
        logger.warning(
            "%d images without a mask in %s were skipped: %s",
            len(skipped),
            msk_dir,
            ", ".join(skipped[:5]) + (" …" if len(skipped) > 5 else ""),
        )
    if not out:
        raise TrainingDataError(f"no image in {img_dir} has a mask with the same stem in {msk_dir}")
    return out


def grey_source_stats(rgb: U8, target: ReinhardStats) -> ReinhardStats | None:
    """Reinhard source statistics of a greyscale image that change its lightness only.

    A grey pixel's log-LMS is ``log(g)`` plus the logs of the RGB→LMS matrix's row sums, so its L
    varies with ``g`` and its α, β are constants. The returned statistics hold the image's L mean and
    standard deviation over non-glass pixels, its constant α, β as means and the *target's* α, β
    deviations, so Reinhard maps L like any image's and sets α, β to the target's means (the grey
    image takes the target's mean tint). None when the image is all glass or uniform.
    """
    from wsi_screen import stain

    glass = stain.glass_mask(rgb).numpy()
    if glass.all():
        return None
    g = np.clip(rgb[..., 0][~glass].astype(np.float64), 1.0, None)
    log_g = np.log(g)
    sigma_l = math.sqrt(3.0) * float(log_g.std())
    if sigma_l <= 0:
        return None
    lab0 = stain._LMS2LAB @ np.log(stain._RGB2LMS.sum(axis=1))
    return stain.ReinhardStats(
        mu=(math.sqrt(3.0) * float(log_g.mean()) + lab0[0], lab0[1], lab0[2]),
        sigma=(sigma_l, target.sigma[1], target.sigma[2]),
    )


def normalize_image(rgb: U8, *, grey: bool, target: ReinhardStats | None) -> U8:
    """Reinhard towards ``target`` with the image's own cell-pixel statistics (grey: lightness only).

    Colour images use :func:`wsi_screen.stain.cell_source_stats` (glass and near-black pixels, e.g.
    the black corners of rotated fields, excluded), as the pipeline does for a slide.
    """
    from wsi_screen import stain

    if target is None:
        return rgb
    if grey:
        source = grey_source_stats(rgb, target)
    else:
        source = stain.cell_source_stats(rgb)
    if source is None:
        return rgb
    out: U8 = stain.reinhard(rgb, target, source=source).numpy()
    return out


def _feature_maps(
    rgb: U8, *, factor: float, representation: str
) -> tuple[NDArray[np.float16], NDArray[np.float16], int, int]:
    """Model features and OD at the model µm/px (cropped to the image's own extent)."""
    import torch

    from wsi_screen.localize import model_input

    h, w = rgb.shape[:2]
    feats, od, (sy, sx) = model_input(
        torch.from_numpy(np.require(rgb, requirements=["C", "W"]))[None],  # a writable copy if need be
        representation=representation,
        factor=factor,
        pad_to=1,
    )
    oh, ow = round(h / sy), round(w / sx)
    return (
        feats[0, :, :oh, :ow].numpy().astype(np.float16),
        od[0, :oh, :ow].numpy().astype(np.float16),
        oh,
        ow,
    )


def _resize_labels(labels: NDArray[np.int32], oh: int, ow: int) -> NDArray[np.int32]:
    """Nearest-neighbour resize sampling each output pixel's centre."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(oh) + 0.5) * h / oh).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * w / ow).astype(np.int64), w - 1)
    out: NDArray[np.int32] = labels[rows][:, cols]
    return out


def _marker_from_centres(shape: tuple[int, int], centres: F64, radii: F64) -> U8:
    """Discs of ``_MARKER_FRACTION`` × radius (≥ ``_MARKER_MIN_PX``) at continuous centres."""
    h, w = shape
    out = np.zeros(shape, np.uint8)
    for (cx, cy), r in zip(centres, radii, strict=True):
        rm = max(_MARKER_MIN_PX, _MARKER_FRACTION * float(r))
        x0, x1 = max(0, math.floor(cx - rm)), min(w, math.ceil(cx + rm) + 1)
        y0, y1 = max(0, math.floor(cy - rm)), min(h, math.ceil(cy + rm) + 1)
        if x1 <= x0 or y1 <= y0:
            continue
        yy = np.arange(y0, y1)[:, None] + 0.5 - cy
        xx = np.arange(x0, x1)[None, :] + 0.5 - cx
        out[y0:y1, x0:x1] |= (xx * xx + yy * yy <= rm * rm).astype(np.uint8)
    return out


def label_centres(labels: NDArray[np.int32]) -> tuple[F64, F64]:
    """Centroids (continuous px) and equivalent radii of the instances of a label image."""
    ids, inv = np.unique(labels.ravel(), return_inverse=True)
    counts = np.bincount(inv).astype(np.float64)
    rows, cols = np.indices(labels.shape)
    cy = np.bincount(inv, weights=rows.ravel() + 0.5) / counts
    cx = np.bincount(inv, weights=cols.ravel() + 0.5) / counts
    keep = ids > 0
    return np.stack([cx[keep], cy[keep]], axis=1), np.sqrt(counts[keep] / math.pi)


def sample_from_image(
    img: AnnotatedImage,
    *,
    image_mpp: float,
    model_mpp: float,
    representation: str,
    target: ReinhardStats | None,
    source: str = "annotated",
) -> NucleusSample:
    """Bring an annotated image to the model's µm/px: normalized features, targets and centres."""
    norm = normalize_image(img.rgb, grey=img.grey, target=target)
    feats, od, oh, ow = _feature_maps(norm, factor=model_mpp / image_mpp, representation=representation)
    labels = _resize_labels(img.nuclei, oh, ow)
    # Instances that vanished in the resize keep their centre (a tiny nucleus is still a nucleus).
    centres_img, radii_img = label_centres(img.nuclei)
    scale_x, scale_y = ow / img.nuclei.shape[1], oh / img.nuclei.shape[0]
    centres = centres_img * np.array([scale_x, scale_y])
    radii = radii_img * math.sqrt(scale_x * scale_y)
    nucleus = (labels > 0).astype(np.uint8)
    marker = _marker_from_centres((oh, ow), centres, radii)
    if img.cells is not None:
        cell = (_resize_labels(img.cells.astype(np.int32), oh, ow) > 0).astype(np.uint8) | nucleus
    else:
        cell = np.full((oh, ow), IGNORE, np.uint8)
    return NucleusSample(
        name=img.name,
        source=source,
        features=feats,
        nucleus=nucleus,
        marker=marker,
        cell=cell,
        od=od,
        centres=centres,
        radii=radii,
    )


def _rasterize(polys: Sequence[F64], shape: tuple[int, int]) -> U8:
    """Union of polygons (continuous px coordinates) as a 0/1 mask (pixel centres inside)."""
    from skimage.draw import polygon as draw_polygon

    out = np.zeros(shape, np.uint8)
    for p in polys:
        rr, cc = draw_polygon(p[:, 1] - 0.5, p[:, 0] - 0.5, shape=shape)  # type: ignore[no-untyped-call]
        out[rr, cc] = 1
    return out


def synthetic_samples(
    n_fields: int,
    *,
    seed: int,
    model_mpp: float,
    representation: str,
    target: ReinhardStats | None,
    workdir: str | os.PathLike[str] | None = None,
    stains: Sequence[str] = SYNTH_STAINS,
    progress: bool = False,
) -> list[NucleusSample]:
    """``n_fields`` synthetic 256 µm fields (1024² at 0.25 µm/px) read through the inference path.

    Fields come four to a 2048² slide; slide ``i`` uses stain profile ``stains[i % len(stains)]``,
    LBC (dense, no spot) and conventional preparations alternate every ``len(stains)`` slides, each
    with a few abnormal cells (large, hyperchromatic, irregular nuclei) and some blur.
    """
    import torch

    from wsi_screen.slide import open_slide
    from wsi_screen.slide_stain import estimate_source_stats
    from wsi_screen.stain import reinhard
    from wsi_screen.synth import synthesize_slide
    from wsi_screen.tiling import make_grid

    if n_fields <= 0:
        return []
    field_px = 1024
    per_side = 2
    n_slides = math.ceil(n_fields / per_side**2)
    factor = model_mpp / SYNTH_WINDOW_MPP
    samples: list[NucleusSample] = []
    tmp_ctx = tempfile.TemporaryDirectory(prefix="wsi-synth-") if workdir is None else None
    root = Path(tmp_ctx.name if tmp_ctx is not None else str(workdir))
    root.mkdir(parents=True, exist_ok=True)
    try:
        with Progress(total=n_slides, desc="synthetic slides", unit="slide", enabled=progress) as bar:
            for i in range(n_slides):
                rng = np.random.default_rng([seed & 0xFFFFFFFF, i, 0x5EED])
                stain_name = stains[i % len(stains)]
                prep = "lbc" if (i // len(stains)) % 2 == 0 else "conventional"
                density = float(rng.uniform(350, 900)) if prep == "lbc" else float(rng.uniform(350, 700))
                abnormal = {
                    "HSIL": int(rng.integers(2, 6)),
                    "LSIL": int(rng.integers(1, 4)),
                    "ASC-US": int(rng.integers(1, 4)),
                }
                slide_seed = int(rng.integers(0, 2**31 - 1))
                path = root / f"synth-{seed}-{i:03d}-{stain_name}-{prep}.tiff"
                result = synthesize_slide(
                    path,
                    size=(field_px * per_side,) * 2,
                    mpp=SYNTH_WINDOW_MPP,
                    seed=slide_seed,
                    abnormal=abnormal,
                    preparation=prep,
                    stain=stain_name,
                    spot=False,
                    density_per_mm2=density,
                    blur_fraction=float(rng.choice([0.0, 0.05, 0.1])),
                    workers=1,
                    write_truth=False,
                )
                truth = result.truth
                with open_slide(path) as slide:
                    grid = make_grid(
                        slide.dimensions,
                        slide_mpp=slide.mpp,
                        mpp=SYNTH_WINDOW_MPP,
                        tile_size=field_px,
                        halo_um=0.0,
                    )
                    source = estimate_source_stats(slide, grid, n_tiles=24, mask_glass=True)
                    for tile in grid.tiles():
                        if len(samples) >= n_fields:
                            break
                        window = slide.read_region(
                            (tile.read_x, tile.read_y), (field_px, field_px), mpp=SYNTH_WINDOW_MPP
                        )
                        x = torch.from_numpy(window)
                        if target is not None and source is not None:
                            x = reinhard(x, target, source=source)
                        feats, od, oh, ow = _feature_maps(
                            x.numpy(), factor=factor, representation=representation
                        )
                        s = ow / field_px  # model px per level-0 px (slide at the window µm/px)
                        off = np.array([tile.read_x, tile.read_y])
                        nuclei_polys: list[F64] = []
                        cell_polys: list[F64] = []
                        for o in truth.objects:
                            if o.nucleus is None:
                                continue
                            bb = np.concatenate([o.cell, o.nucleus])
                            if (
                                bb[:, 0].max() < off[0]
                                or bb[:, 0].min() > off[0] + field_px
                                or bb[:, 1].max() < off[1]
                                or bb[:, 1].min() > off[1] + field_px
                            ):
                                continue
                            cell_polys.append((o.cell - off) * s)
                            nuclei_polys.append((o.nucleus - off) * s)
                            nuclei_polys.extend((p - off) * s for p in o.extra_nuclei)
                        shape = (oh, ow)
                        nucleus = _rasterize(nuclei_polys, shape)
                        cell = _rasterize(cell_polys, shape) | nucleus
                        centres_l, radii_l = _polygon_centres(nuclei_polys)
                        inside = (
                            (centres_l[:, 0] >= 0)
                            & (centres_l[:, 0] < ow)
                            & (centres_l[:, 1] >= 0)
                            & (centres_l[:, 1] < oh)
                        )
                        marker = _marker_from_centres(shape, centres_l, radii_l)
                        samples.append(
                            NucleusSample(
                                name=f"{path.stem}-t{tile.index}",
                                source=f"synthetic:{stain_name}:{prep}",
                                features=feats,
                                nucleus=nucleus,
                                marker=marker,
                                cell=cell,
                                od=od,
                                centres=centres_l[inside],
                                radii=radii_l[inside],
                                meta={"stain": stain_name, "preparation": prep},
                            )
                        )
                path.unlink(missing_ok=True)
                bar.update(1)
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()
    return samples


def _polygon_centres(polys: Sequence[F64]) -> tuple[F64, F64]:
    from wsi_screen.synth.cells import polygon_area, polygon_centroid

    if not polys:
        return np.zeros((0, 2)), np.zeros(0)
    centres = np.array([polygon_centroid(p) for p in polys], np.float64)
    radii = np.array([math.sqrt(polygon_area(p) / math.pi) for p in polys], np.float64)
    return centres, radii


# -- matching and evaluation ------------------------------------------------------------------------------


def match_points(
    pred: F64, truth: F64, radii: F64, *, tolerance: float = 1.0
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """One-to-one matching of predicted centres to true centres (all (N, 2) x, y in one frame).

    A prediction may match a true nucleus when their distance is ≤ ``tolerance`` × the true radius;
    pairs are taken greedily by increasing distance. Returns (pred index, truth index) of the matches.
    """
    from scipy.spatial import cKDTree

    pred = np.asarray(pred, np.float64).reshape(-1, 2)
    truth = np.asarray(truth, np.float64).reshape(-1, 2)
    if not len(pred) or not len(truth):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    reach = float(np.max(radii)) * tolerance
    pairs = cKDTree(truth).sparse_distance_matrix(cKDTree(pred), reach, output_type="ndarray")
    if not len(pairs):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    ti, pi, d = pairs["i"].astype(np.int64), pairs["j"].astype(np.int64), pairs["v"]
    ok = d <= tolerance * np.asarray(radii, np.float64)[ti]
    ti, pi, d = ti[ok], pi[ok], d[ok]
    order = np.argsort(d, kind="stable")
    used_t = np.zeros(len(truth), bool)
    used_p = np.zeros(len(pred), bool)
    mp: list[int] = []
    mt: list[int] = []
    for k in order:
        t, p = ti[k], pi[k]
        if not used_t[t] and not used_p[p]:
            used_t[t] = used_p[p] = True
            mp.append(int(p))
            mt.append(int(t))
    return np.asarray(mp, np.int64), np.asarray(mt, np.int64)


def detection_counts(pred: F64, truth: F64, radii: F64) -> dict[str, int]:
    """True positives, false positives and false negatives of a one-to-one matching."""
    mp, _ = match_points(pred, truth, radii)
    tp = len(mp)
    return {"tp": tp, "fp": len(pred) - tp, "fn": len(truth) - tp}


def rates(counts: dict[str, int]) -> dict[str, float | None]:
    """Recall, precision and F1 from tp/fp/fn (None where undefined)."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    recall = tp / (tp + fn) if tp + fn else None
    precision = tp / (tp + fp) if tp + fp else None
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None
    return {"recall": recall, "precision": precision, "f1": f1}


def _predict(model: nn.Module, feats: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    import torch

    with torch.inference_mode():
        return torch.sigmoid(model((feats - mean) / std).float())


def evaluate_samples(
    model: nn.Module,
    samples: Sequence[NucleusSample],
    *,
    mean: Sequence[float],
    std: Sequence[float],
    mpp: float,
    thresholds: dict[str, float],
    channels: Sequence[str],
    device: torch.device,
    min_area_um2: float = 6.0,
    max_area_um2: float = 450.0,
    min_peak_distance_um: float = 3.0,
) -> dict[str, Any]:
    """Detection counts/rates and pixel Dice of the nucleus channel, per source and overall."""
    import torch

    from wsi_screen.candidates import extract_candidates

    model.eval()
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    ch = {c: i for i, c in enumerate(channels)}
    per: dict[str, dict[str, int]] = {}
    dice_num: dict[str, float] = {}
    dice_den: dict[str, float] = {}
    for smp in samples:
        x = torch.from_numpy(smp.features.astype(np.float32))[None].to(device)
        probs = _predict(model, x, m, s)[0].cpu().numpy()
        cands = extract_candidates(
            probs[ch["nucleus"]],
            mpp=mpp,
            marker=probs[ch["marker"]] if "marker" in ch else None,
            od=smp.od.astype(np.float32),
            nucleus_threshold=thresholds["nucleus"],
            marker_threshold=thresholds.get("marker", 0.5),
            min_area_um2=min_area_um2,
            max_area_um2=max_area_um2,
            min_peak_distance_um=min_peak_distance_um,
        )
        key = smp.source.split(":")[0]
        c = detection_counts(np.stack([cands.x, cands.y], axis=1), smp.centres, smp.radii)
        acc = per.setdefault(key, {"tp": 0, "fp": 0, "fn": 0, "images": 0})
        for k in ("tp", "fp", "fn"):
            acc[k] += c[k]
        acc["images"] += 1
        pred = probs[ch["nucleus"]] >= thresholds["nucleus"]
        true = smp.nucleus > 0
        dice_num[key] = dice_num.get(key, 0.0) + 2.0 * float((pred & true).sum())
        dice_den[key] = dice_den.get(key, 0.0) + float(pred.sum() + true.sum())
    out: dict[str, Any] = {}
    for key, acc in per.items():
        out[key] = {
            **acc,
            **rates(acc),
            "pixel_dice": dice_num[key] / dice_den[key] if dice_den[key] else None,
        }
    return out


# -- training ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetRecipe:
    """Hyper-parameters of :func:`train_unet` (recorded in the bundle)."""

    model_mpp: float = 0.5
    representation: str = "od_gray"
    encoder_name: str = "tu-mobilenetv3_small_100"
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 8)
    crop_px: int = 256
    batch_size: int = 16
    epochs: int = 20
    crops_per_image: int = 4
    real_fraction: float = 0.5
    lr: float = 2e-3
    weight_decay: float = 1e-4
    scale_jitter: float = 0.15
    od_gain: float = 0.2
    blur_p: float = 0.25
    noise_sigma: float = 0.01
    cell_weight: float = 0.5
    context_um: float = 24.0
    #: Share of training crops from synthetic fields when :class:`ImageSource` sources are given.
    synthetic_weight: float = 0.2
    #: Share of crops in which a large region (a corner triangle, a band or a blob over 10–40 % of
    #: the crop) is replaced by the glass the pipeline shows the localizer instead of a dark region
    #: (``device_stage.DARK_FILL_RGB``, ``stain.fill_dark_regions``), its nuclei erased: the
    #: nuclei elsewhere must not change when a third of the window is filled (issue 13 item 5).
    glass_patch_p: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        return d


class _Batcher:
    """Random augmented crops from the samples (numpy Generator: deterministic for a seed)."""

    def __init__(
        self,
        samples: Sequence[NucleusSample],
        recipe: UNetRecipe,
        rng: np.random.Generator,
        source_weights: dict[str, float] | None = None,
    ) -> None:
        self.samples = list(samples)
        self.r = recipe
        self.rng = rng
        w = np.ones(len(self.samples))
        if source_weights:
            # Each source gets its share of the crops, spread evenly over its images.
            keys = [s.source.split(":")[0] for s in self.samples]
            counts: dict[str, int] = {}
            for k in keys:
                counts[k] = counts.get(k, 0) + 1
            w = np.array([source_weights.get(k, 0.0) / counts[k] for k in keys], np.float64)
            if not (w > 0).any():
                raise TrainingDataError(f"no training image's source has a positive weight: {source_weights}")
        else:
            real = np.array([not s.source.startswith("synthetic") for s in self.samples])
            if real.any() and (~real).any():
                w[real] = recipe.real_fraction / real.sum()
                w[~real] = (1.0 - recipe.real_fraction) / (~real).sum()
        self.p = w / w.sum()
        self.channels = int(self.samples[0].features.shape[0])

    def _crop(self, smp: NucleusSample, size: int) -> tuple[F32, U8]:
        c, h, w = smp.features.shape
        glass = 1.0 if self.r.representation == "rgb" else 0.0
        feats = np.full((c, size, size), glass, np.float32)
        tgt = np.zeros((3, size, size), np.uint8)
        tgt[2] = IGNORE if smp.cell[0, 0] == IGNORE else 0
        y0 = int(self.rng.integers(0, max(h - size, 0) + 1))
        x0 = int(self.rng.integers(0, max(w - size, 0) + 1))
        hh, ww = min(size, h), min(size, w)
        feats[:, :hh, :ww] = smp.features[:, y0 : y0 + hh, x0 : x0 + ww]
        tgt[0, :hh, :ww] = smp.nucleus[y0 : y0 + hh, x0 : x0 + ww]
        tgt[1, :hh, :ww] = smp.marker[y0 : y0 + hh, x0 : x0 + ww]
        tgt[2, :hh, :ww] = smp.cell[y0 : y0 + hh, x0 : x0 + ww]
        return feats, tgt

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        import torch
        from torch.nn import functional as F

        r, rng = self.r, self.rng
        size = r.crop_px
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        for _ in range(r.batch_size):
            smp = self.samples[int(rng.choice(len(self.samples), p=self.p))]
            scale = float(np.exp(rng.uniform(-1, 1) * math.log1p(r.scale_jitter)))
            src = max(8, round(size * scale))
            feats, tgt = self._crop(smp, src)
            k = int(rng.integers(0, 4))
            feats, tgt = np.rot90(feats, k, axes=(1, 2)), np.rot90(tgt, k, axes=(1, 2))
            if rng.uniform() < 0.5:
                feats, tgt = feats[:, :, ::-1], tgt[:, :, ::-1]
            if r.glass_patch_p > 0 and rng.uniform() < r.glass_patch_p:
                feats, tgt = self._glass_patch(np.array(feats), np.array(tgt))
            x = torch.from_numpy(np.ascontiguousarray(feats))[None]
            y = torch.from_numpy(np.ascontiguousarray(tgt)).float()[None]
            if src != size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                ignore = (y[:, 2:3] == IGNORE).float()
                y = F.interpolate(y.clamp(max=1.0), size=(size, size), mode="bilinear", align_corners=False)
                y = (y >= 0.5).float()
                ig = F.interpolate(ignore, size=(size, size), mode="nearest")
                y[:, 2:3] = torch.where(ig > 0, torch.full_like(ig, IGNORE), y[:, 2:3])
            xs.append(self._photometric(x))
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    def _glass_patch(self, feats: F32, tgt: U8) -> tuple[F32, U8]:
        """Fill a corner triangle, an edge band or a blob (10–40 % of the crop) with the pipeline's
        dark-region glass; nothing is a nucleus or a cell there any more."""
        from wsi_screen.device_stage import DARK_FILL_RGB
        from wsi_screen.optical_density import optical_density

        rng = self.rng
        _, h, w = feats.shape
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        u, v = xx / max(w - 1, 1), yy / max(h - 1, 1)
        share = float(rng.uniform(0.1, 0.4))
        kind = int(rng.integers(0, 3))
        if kind == 0:  # a rotated field's black corner: a triangle of area `share`
            t = math.sqrt(2 * share)
            region = u + v <= t
        elif kind == 1:  # a label edge or scanner fill: a band along one side
            region = u <= share
        else:  # ink: an ellipse of area `share`
            cy, cx = rng.uniform(0.2, 0.8, size=2)
            ax = float(rng.uniform(0.6, 1.6))
            ry = math.sqrt(share / math.pi / ax)
            region = ((u - cx) / (ry * ax)) ** 2 + ((v - cy) / ry) ** 2 <= 1.0
        flips = rng.integers(0, 2, size=2)
        if flips[0]:
            region = region[::-1]
        if flips[1]:
            region = region[:, ::-1]
        fill = np.asarray([[DARK_FILL_RGB]], np.float32)  # (1, 1, 3), as a window holds it
        # As localize.model_input turns a window into features: rgb I / 255, od_gray its density.
        glass = fill[0, 0] / 255.0 if self.r.representation == "rgb" else optical_density(fill)[0]
        feats[:, region] = glass[:, None]
        tgt[0][region] = 0
        tgt[1][region] = 0
        tgt[2][region & (tgt[2] != IGNORE)] = 0
        return feats, tgt

    def _photometric(self, x: torch.Tensor) -> torch.Tensor:
        """Stain-strength, offset, blur and noise jitter (in OD space for both representations)."""
        import torch
        from torch.nn import functional as F

        r, rng = self.r, self.rng
        gain = float(np.exp(rng.normal(0.0, r.od_gain)))
        offset = float(rng.normal(0.0, 0.015))
        if self.r.representation == "rgb":
            per = torch.from_numpy(
                np.exp(rng.normal(0.0, r.od_gain / 2, size=(1, 3, 1, 1))).astype(np.float32)
            )
            od = transmittance_od_torch(x)
            od = (od * gain * per + offset).clamp(min=0.0)
            x = torch.pow(10.0, -od)
        else:
            x = (x * gain + offset).clamp(min=0.0)
        if rng.uniform() < r.blur_p:
            sigma = float(rng.uniform(0.4, 1.2))
            radius = max(1, math.ceil(2.5 * sigma))
            t = torch.arange(-radius, radius + 1, dtype=torch.float32)
            k = torch.exp(-0.5 * (t / sigma) ** 2)
            k = (k / k.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
            x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
            x = F.conv2d(x, k, groups=x.shape[1])
            x = F.conv2d(x, k.transpose(2, 3), groups=x.shape[1])
        if r.noise_sigma > 0:
            noise = torch.from_numpy(rng.normal(0.0, r.noise_sigma, size=tuple(x.shape)).astype(np.float32))
            x = x + noise
        return x


def _loss(logits: torch.Tensor, y: torch.Tensor, cell_weight: float) -> torch.Tensor:
    import torch
    from torch.nn import functional as F

    total = logits.new_zeros(())
    for c in (0, 1):
        p = torch.sigmoid(logits[:, c])
        t = y[:, c]
        bce = F.binary_cross_entropy_with_logits(logits[:, c], t)
        inter = (p * t).sum()
        dice = 1.0 - (2.0 * inter + 1.0) / (p.sum() + t.sum() + 1.0)
        total = total + bce + dice
    if logits.shape[1] > 2:
        valid = (y[:, 2] != IGNORE).float()
        if valid.sum() > 0:
            t = torch.where(valid > 0, y[:, 2], torch.zeros_like(y[:, 2]))
            bce = F.binary_cross_entropy_with_logits(logits[:, 2], t, weight=valid, reduction="sum")
            total = total + cell_weight * bce / valid.sum()
    return total


def _count_sources(samples: Sequence[NucleusSample]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for smp in samples:
        key = smp.source.split(":")[0]
        counts[key] = counts.get(key, 0) + 1
    return counts


def _feature_stats(samples: Sequence[NucleusSample]) -> tuple[list[float], list[float]]:
    c = samples[0].features.shape[0]
    n = 0.0
    s = np.zeros(c)
    ss = np.zeros(c)
    for smp in samples:
        f = smp.features.astype(np.float64).reshape(c, -1)
        n += f.shape[1]
        s += f.sum(axis=1)
        ss += (f * f).sum(axis=1)
    mean = s / n
    std = np.sqrt(np.maximum(ss / n - mean * mean, 1e-12))
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def train_unet(
    images_dir: str | os.PathLike[str] | None,
    masks_dir: str | os.PathLike[str] | None,
    *,
    mpp: float,
    out_dir: str | os.PathLike[str],
    cytoplasm_dir: str | os.PathLike[str] | None = None,
    val_names: Sequence[str] = (),
    epochs: int | None = None,
    batch_size: int | None = None,
    synthetic_tiles: int = 0,
    synthetic_val_tiles: int = 0,
    recipe: UNetRecipe | None = None,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    name: str | None = None,
    description: str = "",
    training_info: dict[str, Any] | None = None,
    limitations: str = "",
    steps: int | None = None,
    sources: Sequence[ImageSource] = (),
    checkpoint: str | os.PathLike[str] | None = None,
    resume: bool = False,
    time_budget_s: float | None = None,
    checkpoint_every_s: float = 300.0,
    pause_after_steps: int | None = None,
    init_from: str | os.PathLike[str] | None = None,
) -> ModelBundle:
    """Train the nucleus U-Net on annotated images (+ synthetic fields) and save a bundle.

    Args:
        images_dir, masks_dir: annotated images and nucleus masks of the same stem (None: synthetic
            data only); ``cytoplasm_dir``: optional cell masks.
        mpp: µm/px of the annotated images.
        out_dir: the bundle folder to write.
        val_names: image stems held out for validation (never trained on).
        epochs, batch_size: override the recipe's.
        synthetic_tiles: synthetic 256 µm fields added to training; ``synthetic_val_tiles``: to
            validation (other seeds).
        recipe: hyper-parameters (:class:`UNetRecipe`).
        device: ``auto``, ``cpu``, ``cuda``, ``mps`` or a torch device.
        seed: fixes data order, augmentation, initialisation and synthetic slides.
        progress: progress bars (terminal) or log lines.
        name, description, training_info, limitations: recorded in the bundle.
        steps: total optimizer steps instead of ``epochs`` × steps per epoch (quick runs).
        sources: further annotated sources, each at its own µm/px with its own train/validation
            images and crop share (:class:`ImageSource`); validation figures are kept per source.
        checkpoint: a file where the run saves its state (model, optimizer, schedule, data order,
            history) every ``checkpoint_every_s`` seconds and when it stops; with ``resume``, a run
            continues from it (same arguments) and ends with the same weights as an uninterrupted run.
        time_budget_s: stop after this many seconds of this call, save the checkpoint and raise
            :class:`TrainingPaused` (resume to continue); no bundle is written until the last step.
        pause_after_steps: likewise, once this call has run at least this many steps (a job
            scheduler's slice). Runs pause and resume at epoch boundaries only.
        init_from: a localization bundle (name or folder) whose weights start the run (fine-tuning);
            it must have the recipe's architecture, representation and channels. The schedule (warm-up,
            cosine decay) runs as for a fresh run; the bundle is recorded in ``training.init_from``.
    """
    import torch

    from wsi_screen import __version__
    from wsi_screen.localize import CHANNELS, REPRESENTATIONS
    from wsi_screen.models.bundle import BundleConfig, StainTarget, save_bundle
    from wsi_screen.models.unet import SmpUNet
    from wsi_screen.stain import DEFAULT_TARGET

    rec = recipe or UNetRecipe()
    overrides: dict[str, Any] = {}
    if epochs is not None:
        overrides["epochs"] = int(epochs)
    if batch_size is not None:
        overrides["batch_size"] = int(batch_size)
    if overrides:
        from dataclasses import replace

        rec = replace(rec, **overrides)
    if rec.representation not in REPRESENTATIONS:
        raise TrainingDataError(
            f"unknown representation {rec.representation!r}; known: {', '.join(REPRESENTATIONS)}"
        )
    if rec.epochs < 1 or rec.batch_size < 1:
        raise TrainingDataError("epochs and batch size must be at least 1")
    if images_dir is not None and not (0.02 < mpp < 50):
        raise TrainingDataError(f"mpp {mpp} is not a plausible pixel size of the training images")
    for src in sources:
        if not (0.02 < src.mpp < 50):
            raise TrainingDataError(f"source {src.name}: mpp {src.mpp} is not a plausible pixel size")
    if resume and checkpoint is None:
        raise TrainingDataError("resume needs a checkpoint file")
    t_start = time.perf_counter()
    sw = Stopwatch()
    rng = seed_everything(seed)
    dev = resolve_training_device(device)
    target = DEFAULT_TARGET
    out = Path(out_dir)

    train: list[NucleusSample] = []
    val: list[NucleusSample] = []
    annotated_names: list[str] = []
    with sw("data"):
        if images_dir is not None and masks_dir is not None:
            images = load_annotated_images(images_dir, masks_dir, cytoplasm_dir=cytoplasm_dir)
            held = set(val_names)
            unknown = held - {im.name for im in images}
            if unknown:
                raise TrainingDataError(
                    f"validation images {sorted(unknown)} are not among the annotated images"
                )
            with Progress(total=len(images), desc="annotated images", unit="image", enabled=progress) as bar:
                for im in images:
                    smp = sample_from_image(
                        im,
                        image_mpp=mpp,
                        model_mpp=rec.model_mpp,
                        representation=rec.representation,
                        target=target,
                    )
                    (val if im.name in held else train).append(smp)
                    if im.name not in held:
                        annotated_names.append(im.name)
                    bar.update(1)
        for src in sources:
            n_img = len(src.train) + len(src.val)
            with Progress(total=n_img, desc=f"{src.name} images", unit="image", enabled=progress) as bar:
                for part, images_ in (("train", src.train), ("val", src.val)):
                    for im in images_:
                        smp = sample_from_image(
                            im,
                            image_mpp=src.mpp,
                            model_mpp=rec.model_mpp,
                            representation=rec.representation,
                            target=target,
                            source=src.name,
                        )
                        (train if part == "train" else val).append(smp)
                        bar.update(1)
        if synthetic_tiles:
            train += synthetic_samples(
                synthetic_tiles,
                seed=seed,
                model_mpp=rec.model_mpp,
                representation=rec.representation,
                target=target,
                progress=progress,
            )
        if synthetic_val_tiles:
            val += synthetic_samples(
                synthetic_val_tiles,
                seed=seed + 100_003,
                model_mpp=rec.model_mpp,
                representation=rec.representation,
                target=target,
                progress=progress,
            )
    if not train:
        raise TrainingDataError("no training data: give annotated images and/or synthetic tiles")
    has_cells = any(bool((s.cell != IGNORE).any()) for s in train)
    channels = list(CHANNELS) if has_cells else [c for c in CHANNELS if c != "cell"]
    mean, std = _feature_stats(train)
    logger.info(
        "training on %d images (%s), validating on %d; channels %s",
        len(train),
        ", ".join(f"{k}: {v}" for k, v in sorted(_count_sources(train).items())),
        len(val),
        channels,
    )

    model = SmpUNet(
        num_classes=len(channels),
        in_chans=REPRESENTATIONS[rec.representation],
        encoder_name=rec.encoder_name,
        decoder_channels=rec.decoder_channels,
    ).to(dev)
    init_info: dict[str, Any] | None = None
    if init_from is not None:
        init_info = _init_weights(model, init_from, rec=rec, channels=channels)
    steps_per_epoch = max(1, math.ceil(len(train) * rec.crops_per_image / rec.batch_size))
    total_steps = int(steps) if steps is not None else rec.epochs * steps_per_epoch
    opt = torch.optim.AdamW(model.parameters(), lr=rec.lr, weight_decay=rec.weight_decay)
    warmup = max(1, round(0.05 * total_steps))

    def lr_factor(i: int) -> float:  # linear warm-up, then cosine decay to 2 % of the peak
        if i < warmup:
            return (i + 1) / warmup
        t = (i - warmup) / max(1, total_steps - warmup)
        return 0.02 + 0.98 * 0.5 * (1.0 + math.cos(math.pi * min(t, 1.0)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    source_weights: dict[str, float] | None = None
    if sources:
        source_weights = {src.name: float(src.weight) for src in sources}
        if annotated_names:
            source_weights["annotated"] = 1.0
        source_weights["synthetic"] = rec.synthetic_weight if synthetic_tiles else 0.0
    batcher = _Batcher(train, rec, rng, source_weights)
    m_t = torch.tensor(mean, device=dev).view(1, -1, 1, 1)
    s_t = torch.tensor(std, device=dev).view(1, -1, 1, 1)
    thresholds = {"nucleus": 0.5, "marker": 0.5, "cell": 0.5}
    history: list[dict[str, Any]] = []
    step = 0
    running = 0.0
    epoch = 0
    ckpt_path = None if checkpoint is None else Path(checkpoint)
    retargeted: list[dict[str, Any]] = []
    if resume and ckpt_path is not None and ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=dev, weights_only=True)
        if state.get("recipe") != rec.to_dict():
            raise TrainingDataError(
                f"checkpoint {ckpt_path} is of another run (its recipe differs); delete it or drop resume"
            )
        if int(state["step"]) >= total_steps:
            raise TrainingDataError(
                f"checkpoint {ckpt_path} is at step {state['step']}, not before the last step {total_steps}"
            )
        if state.get("total_steps") != total_steps:
            # A new length: the schedule's warm-up is unchanged, its cosine now ends at the new last step.
            logger.warning(
                "resuming a run of %s steps as a run of %d steps: the learning-rate schedule is retargeted",
                state.get("total_steps"),
                total_steps,
            )
            retargeted.append(
                {"at_step": int(state["step"]), "from": state.get("total_steps"), "to": total_steps}
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"].cpu())
        step, epoch, running = int(state["step"]), int(state["epoch"]), float(state["running"])
        history = list(state["history"])
        retargeted = list(state.get("retargeted", [])) + retargeted
        logger.info("resumed from %s at step %d of %d", ckpt_path, step, total_steps)
    elif resume:
        logger.info("no checkpoint at %s yet: starting from the first step", ckpt_path)

    def save_checkpoint() -> None:
        if ckpt_path is None:
            return
        ckpt_path.parent.mkdir(parents=True, exist_ok=True)
        tmp_ckpt = ckpt_path.with_name(ckpt_path.name + ".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(),
                "rng": rng.bit_generator.state,
                "torch_rng": torch.get_rng_state(),
                "step": step,
                "epoch": epoch,
                "running": running,
                "history": history,
                "total_steps": total_steps,
                "recipe": rec.to_dict(),
                "retargeted": retargeted,
            },
            tmp_ckpt,
        )
        os.replace(tmp_ckpt, ckpt_path)

    last_ckpt = time.perf_counter()
    first_step = step
    with Progress(total=total_steps, desc="train unet", unit="step", enabled=progress) as bar:
        bar.update(step)
        while step < total_steps:
            over_time = time_budget_s is not None and time.perf_counter() - t_start > time_budget_s
            over_steps = pause_after_steps is not None and step - first_step >= pause_after_steps
            if over_time or over_steps:
                save_checkpoint()
                why = f"time budget of {time_budget_s:.0f} s" if over_time else f"{step - first_step} steps"
                raise TrainingPaused(
                    f"paused after {why} at step {step} of {total_steps}; "
                    + (
                        f"state saved to {ckpt_path}: run again with resume to continue"
                        if ckpt_path
                        else "no checkpoint file was given, so the run cannot be resumed"
                    )
                )
            if ckpt_path is not None and time.perf_counter() - last_ckpt > checkpoint_every_s:
                save_checkpoint()
                last_ckpt = time.perf_counter()
            epoch += 1
            model.train()
            ep_loss, ep_n = 0.0, 0
            for _ in range(min(steps_per_epoch, total_steps - step)):
                with sw("batch"):
                    x, y = batcher.batch()
                    x, y = x.to(dev), y.to(dev)
                with sw("step"):
                    logits = model((x - m_t) / s_t)
                    loss = _loss(logits, y[:, : len(channels)], rec.cell_weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()  # type: ignore[no-untyped-call]
                    opt.step()
                    sched.step()
                step += 1
                lv = float(loss.detach())
                running = lv if step == 1 else 0.95 * running + 0.05 * lv
                ep_loss += lv
                ep_n += 1
                bar.update(1, loss=running)
            entry: dict[str, Any] = {"epoch": epoch, "step": step, "loss": round(ep_loss / max(ep_n, 1), 5)}
            if val and (step >= total_steps or epoch % max(1, rec.epochs // 5) == 0):
                with sw("validate"):
                    entry["val"] = evaluate_samples(
                        model,
                        val,
                        mean=mean,
                        std=std,
                        mpp=rec.model_mpp,
                        thresholds=thresholds,
                        channels=channels,
                        device=dev,
                    )
                logger.info("epoch %d: loss %.4f; val %s", epoch, entry["loss"], _short(entry["val"]))
            else:
                logger.debug("epoch %d: loss %.4f", epoch, entry["loss"])
            history.append(entry)
    model.eval()
    train_s = time.perf_counter() - t_start
    final_val = history[-1].get("val", {}) if history else {}
    config = BundleConfig(
        name=name or out.name or "nuclei-unet",
        version="1",
        task="localization",
        description=description or "U-Net nucleus localization (nucleus, centre marker and cell channels).",
        architecture="smp-unet",
        arch_kwargs={"encoder_name": rec.encoder_name, "decoder_channels": list(rec.decoder_channels)},
        in_channels=REPRESENTATIONS[rec.representation],
        input_representation=rec.representation,
        input_size=rec.crop_px,
        mpp=rec.model_mpp,
        mean=mean,
        std=std,
        class_names=channels,
        abnormal_classes=[],
        stain_target=StainTarget(mu=target.mu, sigma=target.sigma),
        thresholds=thresholds,
        inference={
            "context_um": rec.context_um,
            "window_mpp": SYNTH_WINDOW_MPP,
            "channels": channels,
            "output": "sigmoid probabilities per channel",
        },
        training={
            "recipe": rec.to_dict(),
            "seed": seed,
            "steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
            "schedule_retargeted": retargeted,
            "init_from": init_info,
            "annotated": {
                "images_dir": None if images_dir is None else str(images_dir),
                "mpp": mpp,
                "train": annotated_names,
                "val": sorted(val_names),
            },
            "sources": {
                src.name: {
                    "mpp": src.mpp,
                    "weight": src.weight,
                    "train": [im.name for im in src.train],
                    "val": [im.name for im in src.val],
                }
                for src in sources
            },
            "synthetic": {
                "train_fields": synthetic_tiles,
                "val_fields": synthetic_val_tiles,
                "stains": list(SYNTH_STAINS),
                "window_mpp": SYNTH_WINDOW_MPP,
            },
            "device": str(dev),
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "wsi_screen": __version__,
            "time_s": round(train_s, 1),
            "phase_s": {k: round(v, 1) for k, v in sw.times.items()},
            "history": history,
            **(training_info or {}),
        },
        metrics={"validation": final_val},
        intended_use="Finding nuclei (centres, outlines, morphometrics) in Papanicolaou-stained cervical "
        "cytology whole-slide images, Reinhard-normalized towards the bundle's stain target.",
        limitations=limitations
        or f"Trained on {len(annotated_names)} annotated images at {mpp} µm/px and {synthetic_tiles} "
        "synthetic fields; check its recall on your own slides (pipelines/eval_localization.py) before "
        "relying on it.",
    )
    bundle = save_bundle(model, config, out, half=True)
    logger.info("saved %s (%.1f MB) after %.0f s", out, bundle.weights_path.stat().st_size / 1e6, train_s)
    return bundle


def _init_weights(
    model: Any, init_from: str | os.PathLike[str], *, rec: UNetRecipe, channels: Sequence[str]
) -> dict[str, Any]:
    """Load the weights of localization bundle ``init_from`` into ``model``; errors name the mismatch."""
    from wsi_screen.models.bundle import load_bundle

    bundle = load_bundle(init_from)
    cfg = bundle.config
    want = {
        "task": ("localization", cfg.task),
        "architecture": ("smp-unet", cfg.architecture),
        "input_representation": (rec.representation, cfg.input_representation),
        "encoder": (rec.encoder_name, cfg.arch_kwargs.get("encoder_name")),
        "decoder_channels": (list(rec.decoder_channels), list(cfg.arch_kwargs.get("decoder_channels", []))),
        "channels": (list(channels), list(cfg.class_names)),
    }
    bad = [f"{k} {have!r} (the run needs {need!r})" for k, (need, have) in want.items() if need != have]
    if bad:
        raise TrainingDataError(f"cannot start from bundle {cfg.name}: its " + "; ".join(bad))
    state = {k: v.float() for k, v in bundle.state_dict().items()}
    model.load_state_dict(state, strict=True)
    logger.info("starting from the weights of %s (%s)", cfg.name, bundle.path)
    return {"name": cfg.name, "version": cfg.version, "sha256": bundle.sha256}


def _short(val: dict[str, Any]) -> str:
    parts = []
    for key, v in val.items():
        r, p = v.get("recall"), v.get("precision")
        parts.append(f"{key}: R={r if r is None else round(r, 3)} P={p if p is None else round(p, 3)}")
    return "; ".join(parts)
