"""Real annotated nuclei for the localization U-Net: source loaders, the split manifest and fields
composed from single-cell crops.

Sources (``../shared/data``; pixel sizes are estimates where the source states none, see
:data:`SOURCE_MPP` and docs/models.md):

- **Herlev** (``herlev/`` + ``herlev-masks/coarse``): tight crops around one Pap-stained cell, every
  grade, with expert nucleus/cytoplasm masks. A crop is not a field (its border is not glass), so
  :func:`compose_fields` pastes cells *by their masks* into fields, in optical density (transmitted
  light: overlapping cells add their densities, so a nucleus under another cell's cytoplasm stays a
  visible, labelled nucleus), with neighbours, overlap, scale and orientation jitter and blur, on
  glass or on real LBC fields. The model sees cells in context, never a crop's rectangle.
- **Herlev severe-fine** (``herlev-masks/severe-fine``): 128² crops with full-resolution nucleus masks
  (used as cells for composition too; the nucleus is the mask, the cell the non-glass pixels).
- **LBC fields** (``lbc-nuclei/``) and **CNSeg** (``cnseg/``): real fields with binary nucleus masks.
- **ISBI 2014**: greyscale, nucleus labels and cell masks (as before).

Every source is split by :func:`split_names` from the one committed manifest
``pipelines/splits/real.json`` (grouped: Herlev by group, LBC by field, CNSeg by trailing number).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen.train.cell_slides import _resize
from wsi_screen.train.cell_slides import od as _od
from wsi_screen.train.cell_slides import rgb_from_od as _rgb
from wsi_screen.train.unet import AnnotatedImage, TrainingDataError, load_annotated_images

__all__ = [
    "SOURCE_MPP",
    "CropCell",
    "compose_fields",
    "fold_manifest",
    "load_herlev_cells",
    "load_severe_fine_cells",
    "load_source_images",
    "read_split_manifest",
    "split_names",
    "unit_hash",
]

logger = logging.getLogger(__name__)

U8 = NDArray[np.uint8]
F32 = NDArray[np.float32]

#: µm/px of each real source. Herlev states 0.201. The others are estimates from nucleus sizes
#: against Herlev's own normal intermediate nuclei (median 49.6 µm² in its expert masks, IQR 41–57):
#: LBC median nucleus 64 px² (upper quartile 91 px², neutrophil lobes pull the median down) → 0.66–0.88,
#: 0.75 used; CNSeg single-cell fields median 411 px² → 0.31–0.37, 0.33 used; ISBI 2014 median 266 px²
#: and cells of 14,300 px² → 0.33–0.37, 0.35 used (pipelines/train_unet.py). Scale augmentation
#: (±15 %) covers the uncertainty.
SOURCE_MPP: dict[str, float] = {
    "herlev": 0.201,
    "herlev_severe_fine": 0.201,
    "lbc_nuclei": 0.75,
    "cnseg": 0.33,
    "isbi2014": 0.35,
}


def read_split_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The split manifest written by ``pipelines/make_splits.py``."""
    p = Path(path)
    if not p.is_file():
        raise TrainingDataError(f"split manifest not found: {p} (run python pipelines/make_splits.py)")
    data: dict[str, Any] = json.loads(p.read_text())
    if data.get("format_version") != 1 or "sources" not in data:
        raise TrainingDataError(f"{p} is not a split manifest of format_version 1")
    return data


def split_names(manifest: dict[str, Any], source: str, part: str | Sequence[str]) -> list[str]:
    """Manifest keys (file paths relative to the source folder) of ``source`` in ``part``."""
    parts = {part} if isinstance(part, str) else set(part)
    unknown = parts - {"train", "val", "test"}
    if unknown:
        raise TrainingDataError(f"unknown split part(s) {sorted(unknown)}; known: train, val, test")
    if source not in manifest["sources"]:
        known = sorted(manifest["sources"])
        raise TrainingDataError(f"the split manifest has no source {source!r}; it has {known}")
    files: dict[str, dict[str, str]] = manifest["sources"][source]["files"]
    return sorted(k for k, v in files.items() if v["split"] in parts)


def unit_hash(key: str) -> float:
    """A uniform number in [0, 1) from the SHA-256 of ``key``: stable across machines and Python
    versions. The split manifest (``pipelines/make_splits.py``) and :func:`fold_manifest` assign units
    by it."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def fold_manifest(
    manifest: dict[str, Any],
    *,
    folds: int,
    fold: int,
    sources: Sequence[str] = ("herlev", "herlev_severe_fine"),
    val_fraction: float = 0.2,
) -> dict[str, Any]:
    """The manifest of one fold of a grouped cross-validation over every unit of ``sources``.

    Each group (``files[key]["group"]``, the unit the committed manifest splits by) falls into fold
    ``floor(h * folds)`` of a SHA-256 hash ``h`` in [0, 1) of the group id alone, so the Herlev crops
    and the severe-fine crops of one Herlev group share a fold. In fold ``fold`` its groups are the
    ``test`` part; of the other groups a second hash puts ``val_fraction`` in ``val``, the rest in
    ``train``. Every other source keeps its committed split. Over the ``folds`` folds every unit of
    ``sources`` is in ``test`` exactly once. Folds are hashed, as the committed manifest's parts are,
    rather than class-stratified (:func:`wsi_screen.metrics.grouped_kfold`): a group's fold then
    depends on its id alone, not on which other groups the data hold.
    """
    if folds < 2:
        raise TrainingDataError(f"folds={folds}: a cross-validation needs at least 2 folds")
    if not 0 <= fold < folds:
        raise TrainingDataError(f"fold={fold}: give a fold in 0..{folds - 1}")
    if not 0.0 <= val_fraction < 1.0:
        raise TrainingDataError(f"val_fraction={val_fraction}: give a share in [0, 1)")
    missing = sorted(set(sources) - set(manifest["sources"]))
    if missing:
        raise TrainingDataError(f"the split manifest has no source(s) {missing}")

    out = copy.deepcopy(manifest)
    for source in sources:
        for entry in out["sources"][source]["files"].values():
            group = str(entry["group"])
            if min(int(unit_hash(f"cv-fold:{group}") * folds), folds - 1) == fold:
                entry["split"] = "test"
            else:
                entry["split"] = "val" if unit_hash(f"cv-val:{group}") < val_fraction else "train"
    out["description"] = (
        f"Fold {fold} of a {folds}-fold grouped cross-validation over {', '.join(sources)} "
        f"(wsi_screen.train.fields.fold_manifest; val share {val_fraction:g} of the other folds); "
        "other sources as in the committed manifest."
    )
    out["cross_validation"] = {
        "folds": folds,
        "fold": fold,
        "sources": list(sources),
        "val_fraction": val_fraction,
    }
    out["counts"] = {
        src: {
            part: sum(1 for v in spec["files"].values() if v["split"] == part)
            for part in ("train", "val", "test")
        }
        for src, spec in out["sources"].items()
    }
    return out


def _read_rgb(path: Path) -> U8:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def _read_mask(path: Path) -> U8:
    from PIL import Image

    with Image.open(path) as im:
        a = np.asarray(im)
    return (a[..., 0] if a.ndim == 3 else a).astype(np.uint8)


def load_source_images(
    data: str | os.PathLike[str], source: str, keys: Sequence[str]
) -> list[AnnotatedImage]:
    """Annotated fields of a field source (``lbc_nuclei``, ``cnseg`` or ``isbi2014``) for manifest keys."""
    root = Path(data)
    if source == "lbc_nuclei":
        stems = [Path(k).stem for k in keys]
        d = root / "lbc-nuclei"
        return load_annotated_images(d / "images", d / "masks", names=stems)
    if source == "isbi2014":
        stems = [Path(k).stem for k in keys]
        d = root / "isbi2014"
        return load_annotated_images(d / "images", d / "nuclei", cytoplasm_dir=d / "cytoplasm", names=stems)
    if source == "cnseg":
        out: list[AnnotatedImage] = []
        for sub in ("clustered", "nuclei"):
            stems = [Path(k).stem for k in keys if k.startswith(f"{sub}/")]
            if stems:
                d = root / "cnseg" / sub
                for im in load_annotated_images(d / "images", d / "masks", names=stems):
                    im.name = f"{sub}/{im.name}"
                    out.append(im)
        return out
    raise TrainingDataError(f"{source!r} is not a field source; known: lbc_nuclei, cnseg, isbi2014")


@dataclass
class CropCell:
    """One real cell crop with its masks: ``label`` 0 glass, 1 cytoplasm, 2 nucleus, 255 unknown."""

    name: str
    herlev_class: str
    rgb: U8
    label: U8


def load_herlev_cells(data: str | os.PathLike[str], keys: Sequence[str]) -> list[CropCell]:
    """Herlev crops (``<class>/<name>.jpeg`` manifest keys) with their coarse expert masks.

    Cells without a mask in ``herlev-masks/coarse`` are skipped (logged).
    """
    root = Path(data)
    out = []
    no_mask = []
    for key in keys:
        cls, fname = key.split("/", 1)
        img = root / "herlev" / key
        msk = root / "herlev-masks" / "coarse" / cls / (Path(fname).stem + ".png")
        if not img.is_file():
            raise TrainingDataError(f"Herlev cell {key} not found: {img}")
        if not msk.is_file():
            no_mask.append(key)
            continue
        rgb, label = _read_rgb(img), _read_mask(msk)
        if label.shape != rgb.shape[:2]:
            raise TrainingDataError(f"Herlev mask of {key} is {label.shape}, its crop {rgb.shape[:2]}")
        out.append(CropCell(name=key, herlev_class=cls, rgb=rgb, label=label))
    if no_mask:
        logger.warning("%d Herlev cells have no mask and were skipped: %s", len(no_mask), ", ".join(no_mask))
    return out


def load_severe_fine_cells(data: str | os.PathLike[str], keys: Sequence[str]) -> list[CropCell]:
    """The 128² severe-dysplasia crops with full-resolution nucleus masks; the cell is what is not glass."""
    from wsi_screen.stain import glass_mask

    root = Path(data) / "herlev-masks" / "severe-fine"
    out = []
    for key in keys:
        rgb = _read_rgb(root / "images" / key)
        nuc = _read_mask(root / "masks" / key) > 127
        glass = glass_mask(rgb, min_brightness=190, max_saturation=0.15).numpy()
        label = np.where(nuc, 2, np.where(glass, 0, 1)).astype(np.uint8)
        name = f"severe_fine/{key}"
        out.append(CropCell(name=name, herlev_class="severe_dysplastic", rgb=rgb, label=label))
    return out


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale_px: float) -> F32:
    from scipy.ndimage import gaussian_filter

    n = rng.normal(0.0, 1.0, size=shape).astype(np.float32)
    n = gaussian_filter(n, sigma=scale_px)
    out: F32 = (n / max(float(n.std()), 1e-6)).astype(np.float32)
    return out


def _glass(rng: np.random.Generator, shape: tuple[int, int]) -> F32:
    """A glass background in OD: a random light tint, smooth unevenness and grain."""
    tint = np.clip(rng.uniform(222, 248) + rng.normal(0, 4, 3), 200, 252)
    od = np.broadcast_to(_od(tint)[None, None, :], (*shape, 3)).copy()
    od += 0.02 * _smooth_noise(rng, shape, 30.0)[..., None]
    return np.clip(od, 0.0, None).astype(np.float32)


def compose_fields(
    cells: Sequence[CropCell],
    *,
    n_fields: int,
    mpp: float,
    cell_mpp: float = SOURCE_MPP["herlev"],
    field_px: int = 512,
    cells_per_field: tuple[int, int] = (4, 10),
    backgrounds: Sequence[tuple[AnnotatedImage, float]] = (),
    background_p: float = 0.4,
    seed: int = 0,
    name: str = "herlev-field",
) -> list[AnnotatedImage]:
    """Fields of ``field_px``² at ``mpp`` µm/px composed of real cell crops, with instance labels.

    Each field is glass (or, with probability ``background_p``, a real annotated field of
    ``backgrounds``, given with its µm/px, whose nuclei stay labelled) onto which 4–10 cells are
    pasted at random positions and overlaps. A cell enters by its mask only (cytoplasm, nucleus and
    the expert's "unknown" pixels, dilated by 1 px and feathered over ~1.5 px), as optical density
    above its own crop's glass, so no crop rectangle or seam reaches the model. Cells are scaled by
    ``cell_mpp / mpp`` × U(0.9, 1.1), rotated by multiples of 90° and flipped; a third of the fields
    are blurred (σ 0.3–1.2 px).
    """
    from scipy.ndimage import binary_dilation, gaussian_filter
    from scipy.ndimage import label as cc_label
    from skimage.segmentation import relabel_sequential

    if not cells:
        raise TrainingDataError("compose_fields needs at least one cell")
    rng = np.random.default_rng(seed)
    out: list[AnnotatedImage] = []
    for f in range(n_fields):
        shape = (field_px, field_px)
        labels = np.zeros(shape, np.int32)
        cellmask = np.zeros(shape, bool)
        next_id = 1
        if backgrounds and rng.uniform() < background_p:
            bg_img, bg_mpp = backgrounds[int(rng.integers(len(backgrounds)))]
            factor = bg_mpp / mpp
            h, w = bg_img.rgb.shape[:2]
            big = (max(field_px, round(h * factor)), max(field_px, round(w * factor)))
            od_bg = _resize(_od(bg_img.rgb), big, nearest=False)
            lab_bg = _resize(bg_img.nuclei, big, nearest=True)
            y0 = int(rng.integers(0, big[0] - field_px + 1))
            x0 = int(rng.integers(0, big[1] - field_px + 1))
            od = od_bg[y0 : y0 + field_px, x0 : x0 + field_px].copy()
            lab_bg = lab_bg[y0 : y0 + field_px, x0 : x0 + field_px]
            for v in np.unique(lab_bg[lab_bg > 0]):
                labels[lab_bg == v] = next_id
                next_id += 1
            unknown_cells = True
        else:
            od = _glass(rng, shape)
            unknown_cells = False
        for _ in range(int(rng.integers(cells_per_field[0], cells_per_field[1] + 1))):
            c = cells[int(rng.integers(len(cells)))]
            s = cell_mpp / mpp * float(rng.uniform(0.9, 1.1))
            h, w = c.label.shape
            ch, cw = max(4, round(h * s)), max(4, round(w * s))
            if ch >= field_px or cw >= field_px:
                continue
            c_od = _resize(_od(c.rgb), (ch, cw), nearest=False)
            c_lab = _resize(c.label, (ch, cw), nearest=True)
            k = int(rng.integers(4))
            c_od, c_lab = np.rot90(c_od, k), np.rot90(c_lab, k)
            if rng.uniform() < 0.5:
                c_od, c_lab = c_od[:, ::-1], c_lab[:, ::-1]
            ch, cw = c_lab.shape
            glass_px = c_od[c_lab == 0]
            glass_od = (
                np.median(glass_px, axis=0)
                if glass_px.shape[0] >= 20
                else np.percentile(c_od.reshape(-1, 3), 5, axis=0)
            )
            body = binary_dilation(c_lab > 0, iterations=1)
            alpha = np.clip(gaussian_filter(body.astype(np.float32), 1.5) * 1.6 - 0.3, 0.0, 1.0)
            alpha[c_lab > 0] = 1.0
            edge = np.concatenate([body[0], body[-1], body[:, 0], body[:, -1]])
            if edge.mean() > 0.05:  # the cell is cut by its crop: fade it out inside an ellipse
                yy, xx = np.mgrid[0:ch, 0:cw]
                d = np.hypot((yy + 0.5 - ch / 2) / (ch / 2), (xx + 0.5 - cw / 2) / (cw / 2))
                alpha *= np.clip((1.0 - d) / 0.25, 0.0, 1.0).astype(np.float32)
            c_lab = np.where((c_lab == 2) & (alpha < 0.5), 1, c_lab).astype(np.uint8)
            contrib = np.clip(c_od - glass_od[None, None, :], 0.0, None) * alpha[..., None]
            y0 = int(rng.integers(-ch // 4, field_px - ch + ch // 4 + 1))
            x0 = int(rng.integers(-cw // 4, field_px - cw + cw // 4 + 1))
            fy0, fx0 = max(0, y0), max(0, x0)
            fy1, fx1 = min(field_px, y0 + ch), min(field_px, x0 + cw)
            if fy1 - fy0 < 4 or fx1 - fx0 < 4:
                continue
            sl = (slice(fy0 - y0, fy1 - y0), slice(fx0 - x0, fx1 - x0))
            od[fy0:fy1, fx0:fx1] += contrib[sl]
            cellmask[fy0:fy1, fx0:fx1] |= alpha[sl] >= 0.5
            nuc, n = cc_label(c_lab[sl] == 2)
            region = labels[fy0:fy1, fx0:fx1]
            for i in range(1, n + 1):
                m = nuc == i
                if int(m.sum()) < 3:
                    continue
                region[m] = next_id
                next_id += 1
        if rng.uniform() < 1 / 3:
            sigma = float(rng.uniform(0.3, 1.2))
            od = np.stack([gaussian_filter(od[..., i], sigma) for i in range(3)], axis=-1)
        od += rng.normal(0.0, 0.006, size=od.shape).astype(np.float32)
        rgb = _rgb(od.astype(np.float32))
        # Relabel consecutively (overlaps may have split or removed some instances).
        labels = relabel_sequential(labels)[0].astype(np.int32)  # type: ignore[no-untyped-call]
        out.append(
            AnnotatedImage(
                name=f"{name}-{seed}-{f:04d}",
                rgb=rgb,
                grey=False,
                nuclei=labels,
                cells=None if unknown_cells else (cellmask | (labels > 0)),
            )
        )
    return out
