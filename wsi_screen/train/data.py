"""Labelled cell crops for training and evaluating classifiers, from three sources.

Every source gives a :class:`CropSet`: uint8 RGB crops ``(N, S, S, 3)`` at the bundle's µm/px (plus
the nucleus-mask channel, ``(N, S, S, 4)``, when asked and the source runs the localizer),
Reinhard-normalized towards the bundle's stain target, a class per crop and a **group** per crop (the
slide, patient or source image), which must never be on both sides of a train/validation/test split.

1. **Crop folders** (:func:`load_crop_folder`): one sub-folder per class (SIPaKMeD, Herlev, CRIC
   exports) with crops of any size at a known µm/px. Each crop is

   - rescaled to the bundle µm/px (bilinear, antialiased when shrinking — as the slide reader does);
   - centred on a ``size``×``size`` canvas (the crop's centre pixel lands on pixel ``size // 2``, the
     centre of a pipeline crop): a larger crop is centre-cropped, a smaller one is **padded with
     glass** — the glass colour of the crop's own border (or, when a tight crop shows none, of its
     group, of the data set, or a typical slide glass), before normalization — so the cell sits on
     glass as in a crop cut from a slide, and that glass is normalized like a slide's glass;
   - Reinhard-normalized with glass-masked source statistics pooled over its **group** (the crops
     of one source image or slide, like the slide-level statistics of inference; a crop without a
     group is its own group) — see :data:`STAIN_MODES` for the other choices.

   Groups come from a ``manifest.csv`` in the folder (column ``group``, ``slide``, ``patient`` or
   ``image``, matched to the file by the ``file``/``path`` column); without one every file is its own
   group.
2. **QuPath GeoJSON annotations on slides** (:func:`crops_from_annotations`): point or polygon objects
   with a classification. Crops are cut exactly as inference cuts them: tile windows read at the bundle
   µm/px by :func:`wsi_screen.reader.iter_windows`, slide-level source statistics from
   :func:`wsi_screen.pipeline.estimate_source_stats` on the same cell-region tile grid, Reinhard with the
   same target, :func:`wsi_screen.classify.cut_crops`. Groups are slides.
3. **Synthetic slides** (:func:`synthetic_crops`): slides drawn by
   :func:`wsi_screen.synth.synthesize_slide`, screened by :class:`wsi_screen.pipeline.TileProcessor`
   with ``classifier=None, keep_crops=True`` — the inference path, U-Net included — and each detected
   cell labelled by the ground-truth object whose nucleus it falls on (:func:`match_detections`;
   detections on no nucleus are ``artifact``). Groups are slides; crops are cached per slide.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import json
import logging
import math
import os
import re
import shlex
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_screen.classify import MASK_REPRESENTATION, REPRESENTATIONS
from wsi_screen.errors import DataError
from wsi_screen.geojson_read import Annotation, read_qupath_geojson
from wsi_screen.progress import progress_iter

if TYPE_CHECKING:
    import torch

    from wsi_screen.cells import CellTable
    from wsi_screen.config import Settings
    from wsi_screen.localize import Localizer
    from wsi_screen.stain import ReinhardStats
    from wsi_screen.synth.truth import SlideTruth

__all__ = [
    "BETHESDA_CLASSES",
    "IMAGE_SUFFIXES",
    "STAIN_MODES",
    "Annotation",
    "CropFolderListing",
    "CropSet",
    "DataError",
    "SyntheticSlideSpec",
    "annotation_files",
    "canonical_class",
    "collect_crops",
    "crops_from_annotations",
    "crops_from_slide",
    "find_slide_for",
    "fit_to_size",
    "glass_colour",
    "list_class_maps",
    "list_crop_folder",
    "load_class_map",
    "load_crop_folder",
    "load_crops",
    "match_detections",
    "order_classes",
    "pipeline_cells",
    "pipeline_crops",
    "prepare_crops",
    "read_qupath_geojson",
    "rescale_to_mpp",
    "synthetic_crops",
    "synthetic_specs",
    "truth_to_qupath",
]

logger = logging.getLogger(__name__)

#: The five classes of the first bundles (cyto-synth-v1, cyto-herlev-v1), in their canonical order: the
#: default class set of a crop folder without a class map.
BETHESDA_CLASSES: tuple[str, ...] = ("NILM", "ASC-US", "LSIL", "HSIL", "artifact")
#: Other Bethesda names accepted as class names (kept in this order after the five above).
_EXTRA_ORDER: tuple[str, ...] = ("ASC-H", "AGC", "AIS", "SCC", "organism", "endocervical")
IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})
#: How crop-folder crops get their Reinhard source statistics: pooled over the crop's group
#: (default), per crop, over the whole dataset, or no normalization at all.
STAIN_MODES: tuple[str, ...] = ("group", "crop", "dataset", "none")
StainMode = Literal["group", "crop", "dataset", "none"]

_CROPSET_FORMAT = "wsi-screen-crops/1"
_GROUP_COLUMNS = ("group", "slide", "patient", "image")
_FILE_COLUMNS = ("file", "path", "filename", "image_path")
#: Fewer cell (non-glass) pixels than this and the statistics use every pixel instead.
_MIN_CELL_PIXELS = 400


# -- class names and class maps -----------------------------------------------------------------------


def _norm_name(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name).lower()


_CANONICAL = {_norm_name(c): c for c in (*BETHESDA_CLASSES, *_EXTRA_ORDER)}
_CANONICAL.update({"negative": "NILM", "normal": "NILM", "artefact": "artifact"})


def canonical_class(name: str) -> str | None:
    """The canonical spelling of a Bethesda class name (``"asc_us"`` → ``"ASC-US"``), or None."""
    return _CANONICAL.get(_norm_name(name))


def order_classes(names: Iterable[str]) -> list[str]:
    """Class names in the canonical order (NILM, ASC-US, LSIL, HSIL, artifact, ...; others sorted)."""
    order = [*BETHESDA_CLASSES, *_EXTRA_ORDER]
    uniq = set(names)
    known = [c for c in order if c in uniq]
    return known + sorted(uniq - set(order))


def list_class_maps() -> list[str]:
    """Names of the class-map presets shipped in ``wsi_screen/train/class_maps``."""
    import importlib.resources

    root = importlib.resources.files("wsi_screen.train") / "class_maps"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def load_class_map(name_or_path: str | os.PathLike[str]) -> dict[str, str | None]:
    """A class map: source class (folder or QuPath class name) → bundle class, or None to skip.

    ``name_or_path`` is a preset name (:func:`list_class_maps`, e.g. ``herlev-bethesda``) or a YAML /
    JSON file holding either a flat ``{source: target}`` mapping or ``{"classes": {source: target}}``.
    A target of ``null`` (or ``"skip"``) leaves that source class out.
    """
    import importlib.resources

    import yaml

    text: str
    where = str(name_or_path)
    path = Path(name_or_path)
    preset = importlib.resources.files("wsi_screen.train") / "class_maps" / f"{where}.yaml"
    if path.is_file():
        text = path.read_text(encoding="utf-8")
    elif os.sep not in where and "/" not in where and preset.is_file():
        text = preset.read_text(encoding="utf-8")
        where = f"class map {where}"
    else:
        raise DataError(
            f"class map {where!r} is neither a file nor a preset ({', '.join(list_class_maps())})"
        )
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DataError(f"{where}: not valid YAML/JSON ({' '.join(str(exc).split())[:160]})") from exc
    if isinstance(data, dict) and isinstance(data.get("classes"), dict):
        data = data["classes"]
    if not isinstance(data, dict) or not data:
        raise DataError(f"{where}: expected a mapping of source class → bundle class")
    out: dict[str, str | None] = {}
    for key, value in data.items():
        if value is None or (isinstance(value, str) and value.strip().lower() == "skip"):
            out[str(key)] = None
        elif isinstance(value, str) and value.strip():
            out[str(key)] = canonical_class(value) or value.strip()
        else:
            raise DataError(f"{where}: class {key!r} maps to {value!r}; expected a class name or null")
    return out


class _ClassResolver:
    """Maps source class names through a class map (or onto known class names), with clear errors."""

    def __init__(self, class_map: Mapping[str, str | None] | None, classes: Sequence[str] | None) -> None:
        self.class_map = None if class_map is None else dict(class_map)
        self.classes = None if classes is None else list(classes)
        self._by_norm: dict[str, str | None] = {}
        if self.class_map is not None:
            for k, v in self.class_map.items():
                self._by_norm.setdefault(_norm_name(k), v)

    def known(self) -> list[str]:
        if self.class_map is not None:
            return list(self.class_map)
        return list(self.classes) if self.classes is not None else list(BETHESDA_CLASSES)

    def __call__(self, name: str, *, where: str, hint: str = "") -> str | None:
        """The bundle class of ``name`` (None: skip it); raises DataError for an unknown class
        (``hint``, when given, is appended to that message)."""
        if self.class_map is not None:
            if name in self.class_map:
                target = self.class_map[name]
            elif _norm_name(name) in self._by_norm:
                target = self._by_norm[_norm_name(name)]
            else:
                raise DataError(
                    f"{where}: unknown class {name!r}; the class map knows {', '.join(self.known())}{hint}"
                )
        else:
            target = canonical_class(name) or name
            allowed = self.classes if self.classes is not None else list(BETHESDA_CLASSES)
            if target not in allowed:
                raise DataError(
                    f"{where}: unknown class {name!r}; expected one of {', '.join(allowed)} "
                    f"(map other names with a class_map){hint}"
                )
        if target is not None and self.classes is not None and target not in self.classes:
            raise DataError(f"{where}: class {name!r} maps to {target!r}, which is not in {self.classes}")
        return target


# -- the crop set -------------------------------------------------------------------------------------


@dataclass
class CropSet:
    """Labelled crops: ``crops`` (N, S, S, C) uint8, ``labels`` (N,) indices into ``class_names``,
    ``groups`` (N,) group names, ``sources`` (N,) where each crop came from, at ``mpp`` µm/px.

    C is 3 (RGB) or 4 (RGB + the nucleus mask of :func:`wsi_screen.classify.nucleus_mask`; only the
    sources that run the localizer — annotations and synthetic slides — can make those).
    """

    crops: NDArray[np.uint8]
    labels: NDArray[np.int64]
    groups: NDArray[np.str_]
    class_names: list[str]
    mpp: float
    sources: NDArray[np.str_]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if (
            self.crops.ndim != 4
            or self.crops.shape[3] not in (3, 4)
            or self.crops.shape[1] != self.crops.shape[2]
        ):
            raise ValueError(f"crops must be (N, S, S, 3) or (N, S, S, 4), got {self.crops.shape}")
        if self.crops.shape[0] != n or len(self.groups) != n or len(self.sources) != n:
            raise ValueError("crops, labels, groups and sources must have the same length")
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.class_names)):
            raise ValueError("labels must index class_names")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def size(self) -> int:
        """Crop side in pixels."""
        return int(self.crops.shape[1])

    @property
    def channels(self) -> int:
        """3 (RGB) or 4 (RGB + nucleus mask)."""
        return int(self.crops.shape[3])

    @property
    def representation(self) -> str:
        """The classifier input representation of the crops (``rgb`` or ``rgb+mask``)."""
        return next(name for name, c in REPRESENTATIONS.items() if c == self.channels)

    def class_counts(self) -> dict[str, int]:
        """Crops per class (every class listed)."""
        counts = np.bincount(self.labels, minlength=len(self.class_names))
        return {c: int(counts[i]) for i, c in enumerate(self.class_names)}

    def present_classes(self) -> list[str]:
        """Classes with at least one crop."""
        return [c for c, n in self.class_counts().items() if n]

    def subset(self, index: Sequence[int] | NDArray[np.integer[Any]]) -> CropSet:
        """The crops at ``index`` (a copy of the pixel data)."""
        idx = np.asarray(index, dtype=np.int64)
        return CropSet(
            crops=np.ascontiguousarray(self.crops[idx]),
            labels=self.labels[idx],
            groups=self.groups[idx],
            class_names=list(self.class_names),
            mpp=self.mpp,
            sources=self.sources[idx],
            info=dict(self.info),
        )

    def with_classes(self, class_names: Sequence[str]) -> CropSet:
        """The same crops with labels re-indexed into ``class_names`` (which must hold every label)."""
        names = list(class_names)
        missing = [c for c in self.present_classes() if c not in names]
        if missing:
            raise DataError(f"the data holds classes {missing} that are not among {names}")
        remap = np.array([names.index(c) if c in names else -1 for c in self.class_names], np.int64)
        return CropSet(
            crops=self.crops,
            labels=remap[self.labels],
            groups=self.groups,
            class_names=names,
            mpp=self.mpp,
            sources=self.sources,
            info=dict(self.info),
        )

    def merge_class(self, name: str, into: str) -> CropSet:
        """The same crops with class ``name`` relabelled as ``into`` and dropped from the class list
        (e.g. ``endocervical`` → ``NILM`` for a model without that class)."""
        if name not in self.class_names or into not in self.class_names:
            raise DataError(f"cannot merge {name!r} into {into!r}: classes are {self.class_names}")
        labels = np.where(
            self.labels == self.class_names.index(name), self.class_names.index(into), self.labels
        )
        merged = CropSet(
            crops=self.crops,
            labels=labels,
            groups=self.groups,
            class_names=self.class_names,
            mpp=self.mpp,
            sources=self.sources,
            info=dict(self.info),
        )
        return merged.with_classes([c for c in self.class_names if c != name])

    @staticmethod
    def concat(sets: Sequence[CropSet], *, info: Mapping[str, Any] | None = None) -> CropSet:
        """Concatenate crop sets with the same crop size and µm/px (classes are merged)."""
        if not sets:
            raise ValueError("nothing to concatenate")
        size, mpp, ch = sets[0].size, sets[0].mpp, sets[0].channels
        for s in sets:
            if s.size != size or not math.isclose(s.mpp, mpp, rel_tol=1e-6):
                raise ValueError("crop sets differ in crop size or µm/px")
            if s.channels != ch:
                raise DataError(
                    f"crop sets differ in channels ({ch} and {s.channels}): mix only sources with the "
                    "same representation (mask_channel needs annotations or synthetic slides)"
                )
        names = order_classes(c for s in sets for c in s.class_names)
        parts = [s.with_classes(names) for s in sets]
        return CropSet(
            crops=np.concatenate([p.crops for p in parts])
            if parts
            else np.zeros((0, size, size, ch), np.uint8),
            labels=np.concatenate([p.labels for p in parts]),
            groups=np.concatenate([p.groups.astype(str) for p in parts]),
            class_names=names,
            mpp=mpp,
            sources=np.concatenate([p.sources.astype(str) for p in parts]),
            info=dict(info or sets[0].info),
        )

    def fingerprint(self) -> str:
        """sha256 (hex, 16 chars) of the labels, groups, sources and a sample of the pixels."""
        h = hashlib.sha256()
        h.update(json.dumps([self.class_names, self.mpp, list(self.crops.shape)]).encode())
        h.update(self.labels.astype(np.int64).tobytes())
        h.update("\n".join(self.groups.astype(str).tolist()).encode())
        h.update("\n".join(self.sources.astype(str).tolist()).encode())
        step = max(1, len(self) // 64)
        h.update(np.ascontiguousarray(self.crops[::step]).tobytes())
        return h.hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """JSON summary: counts, groups, crop size, µm/px and the provenance in ``info``."""
        return {
            "n": len(self),
            "class_counts": self.class_counts(),
            "n_groups": len(set(self.groups.tolist())),
            "crop_size_px": self.size,
            "representation": self.representation,
            "mpp": self.mpp,
            "fingerprint": self.fingerprint(),
            **self.info,
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write a folder: ``crops.npy`` (memory-mappable), ``index.npz`` and ``meta.json`` (atomic)."""
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            np.save(tmp / "crops.npy", np.ascontiguousarray(self.crops))
            np.savez(
                tmp / "index.npz",
                labels=self.labels.astype(np.int64),
                groups=self.groups.astype(str),
                sources=self.sources.astype(str),
            )
            meta = {
                "format": _CROPSET_FORMAT,
                "class_names": self.class_names,
                "mpp": self.mpp,
                "n": len(self),
                "crop_size_px": self.size,
                "class_counts": self.class_counts(),
                "info": self.info,
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, mmap: bool = True) -> CropSet:
        """Read a folder written by :meth:`save` (pixels memory-mapped unless ``mmap=False``)."""
        p = Path(path)
        try:
            meta = json.loads((p / "meta.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{p}: not a crop set folder ({exc})") from exc
        if meta.get("format") != _CROPSET_FORMAT:
            raise DataError(f"{p}: not a crop set (format {meta.get('format')!r})")
        crops = np.load(p / "crops.npy", mmap_mode="r" if mmap else None)
        with np.load(p / "index.npz") as idx:
            labels, groups, sources = idx["labels"], idx["groups"], idx["sources"]
        return cls(
            crops=crops,
            labels=labels.astype(np.int64),
            groups=groups.astype(str),
            class_names=list(meta["class_names"]),
            mpp=float(meta["mpp"]),
            sources=sources.astype(str),
            info=dict(meta.get("info", {})),
        )

    @staticmethod
    def is_cropset(path: str | os.PathLike[str]) -> bool:
        """Whether ``path`` is a folder written by :meth:`save`."""
        p = Path(path)
        return (p / "meta.json").is_file() and (p / "crops.npy").is_file()


# -- rescale, fit, normalize ---------------------------------------------------------------------------


def rescale_to_mpp(img: NDArray[np.uint8], *, src_mpp: float, dst_mpp: float) -> NDArray[np.uint8]:
    """Resample an (H, W, 3) image from ``src_mpp`` to ``dst_mpp`` µm/px (bilinear, antialiased).

    The output side is ``round(side · src_mpp / dst_mpp)`` and the source box is chosen so that the
    scale is exact (the slide reader's resampling: PIL bilinear with a box).
    """
    from PIL import Image

    if src_mpp <= 0 or dst_mpp <= 0:
        raise ValueError(f"µm/px must be positive, got {src_mpp} and {dst_mpp}")
    f = src_mpp / dst_mpp
    h, w = img.shape[:2]
    if abs(f - 1.0) < 1e-9:
        return img
    nw, nh = max(1, round(w * f)), max(1, round(h * f))
    box = (0.0, 0.0, nw / f, nh / f)
    # The exact-scale box can overhang the image by < 1 px: replicate the edge there.
    px, py = max(0, math.ceil(box[2] - w)), max(0, math.ceil(box[3] - h))
    src = np.pad(img, ((0, py), (0, px), (0, 0)), mode="edge") if px or py else img
    out = Image.fromarray(np.ascontiguousarray(src)).resize((nw, nh), Image.Resampling.BILINEAR, box=box)
    return np.asarray(out, dtype=np.uint8)


#: Glass colour used for padding when neither a crop nor its group nor the data set shows glass: the
#: median raw glass of the synthetic slides' stain profiles (before normalization, like real glass).
DEFAULT_GLASS_RGB: tuple[int, int, int] = (241, 238, 242)
#: A crop's own ring is used as its glass colour when at least this fraction of it is glass.
_MIN_RING_GLASS = 0.1
#: Fewer glass pixels than this and a crop has no glass colour of its own.
_MIN_GLASS_PIXELS = 100


def _ring(img: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """(K, 3) pixels of the outermost ring of an image."""
    if img.shape[0] < 3 or img.shape[1] < 3:
        return img.reshape(-1, img.shape[2])
    return np.concatenate([img[0], img[-1], img[1:-1, 0], img[1:-1, -1]])


def glass_colour(img: NDArray[np.uint8]) -> NDArray[np.uint8] | None:
    """The glass colour of a (raw) crop, or None when it shows too little glass.

    The median of the glass pixels (:func:`wsi_screen.stain.glass_mask`) of its outermost ring when at
    least 10 % of the ring is glass, else of the glass pixels anywhere in it (≥ 100 of them).
    """
    from wsi_screen.stain import glass_mask

    ring = _ring(img)
    g_ring = glass_mask(ring[None]).numpy()[0]
    if g_ring.mean() >= _MIN_RING_GLASS:
        colour: NDArray[np.uint8] = np.median(ring[g_ring], axis=0).round().astype(np.uint8)
        return colour
    g = glass_mask(img).numpy()
    if int(g.sum()) >= _MIN_GLASS_PIXELS:
        colour = np.median(img[g], axis=0).round().astype(np.uint8)
        return colour
    return None


def fit_to_size(
    img: NDArray[np.uint8], size: int, *, fill: Sequence[int] | NDArray[np.uint8] | int = 255
) -> NDArray[np.uint8]:
    """Centre ``img`` on a ``size``×``size`` canvas: centre-crop what is larger, pad what is smaller.

    The image's pixel ``(h // 2, w // 2)`` lands on ``(size // 2, size // 2)``, the centre pixel of a
    pipeline crop. Padding is ``fill``: an RGB colour or a grey level.
    """
    h, w, c = img.shape
    colour = np.broadcast_to(np.asarray(fill, dtype=np.uint8), (c,))
    out = np.empty((size, size, c), np.uint8)
    out[:] = colour
    oy, ox = size // 2 - h // 2, size // 2 - w // 2
    sy0, sx0 = max(0, -oy), max(0, -ox)
    dy0, dx0 = max(0, oy), max(0, ox)
    hh, ww = min(h - sy0, size - dy0), min(w - sx0, size - dx0)
    out[dy0 : dy0 + hh, dx0 : dx0 + ww] = img[sy0 : sy0 + hh, sx0 : sx0 + ww]
    return out


def _cell_pixels(img: NDArray[np.uint8]) -> NDArray[np.uint8]:
    """(K, 3) non-glass pixels of an image (every pixel when too few are not glass)."""
    from wsi_screen.stain import glass_mask

    flat = img.reshape(-1, 3)
    keep = ~glass_mask(img).numpy().reshape(-1)
    return flat[keep] if int(keep.sum()) >= _MIN_CELL_PIXELS else flat


def _pixel_stats(pixels: Sequence[NDArray[np.uint8]]) -> ReinhardStats:
    from wsi_screen.stain import lab_stats

    stacked = np.concatenate(list(pixels))
    return lab_stats(stacked.reshape(1, -1, 1, 3))


def _median_colour(colours: Sequence[NDArray[np.uint8]]) -> NDArray[np.uint8] | None:
    if not colours:
        return None
    out: NDArray[np.uint8] = np.median(np.stack(colours), axis=0).round().astype(np.uint8)
    return out


def prepare_crops(
    images: Sequence[NDArray[np.uint8]],
    *,
    src_mpp: float,
    dst_mpp: float,
    size: int,
    target: ReinhardStats | None,
    groups: Sequence[str] | None = None,
    stain: StainMode = "group",
) -> NDArray[np.uint8]:
    """Rescale, pad/crop and Reinhard-normalize crops of any size into an (N, size, size, 3) array.

    1. Rescale from ``src_mpp`` to ``dst_mpp`` (:func:`rescale_to_mpp`).
    2. Centre on a ``size``×``size`` canvas (:func:`fit_to_size`), padding with **glass**: the crop's
       own glass colour (:func:`glass_colour`), else the median glass colour of its group, else of
       all crops, else :data:`DEFAULT_GLASS_RGB`. Padding happens *before* normalization, so the
       padded glass is transformed exactly like the glass around a cell on a slide.
    3. Reinhard towards ``target`` with glass-masked source statistics of the (unpadded) crops, pooled
       per ``stain`` mode: over each group (``groups``), per crop, or over all crops (``dataset``);
       ``none`` (or ``target=None``) leaves the colours as they are.
    """
    from wsi_screen.stain import reinhard

    if stain not in STAIN_MODES:
        raise ValueError(f"stain must be one of {STAIN_MODES}, got {stain!r}")
    scaled = [rescale_to_mpp(_as_rgb(im), src_mpp=src_mpp, dst_mpp=dst_mpp) for im in images]
    n = len(scaled)
    group_keys = [str(g) for g in groups] if groups is not None else [str(i) for i in range(n)]
    own = [glass_colour(im) for im in scaled]
    by_group: dict[str, list[NDArray[np.uint8]]] = {}
    for k, c in zip(group_keys, own, strict=True):
        if c is not None:
            by_group.setdefault(k, []).append(c)
    group_glass = {k: _median_colour(v) for k, v in by_group.items()}
    all_glass = _median_colour([c for c in own if c is not None])
    fallback = all_glass if all_glass is not None else np.asarray(DEFAULT_GLASS_RGB, np.uint8)
    out = np.empty((n, size, size, 3), np.uint8)
    for i, im in enumerate(scaled):
        fill = own[i]
        if fill is None:
            fill = group_glass.get(group_keys[i])
        out[i] = fit_to_size(im, size, fill=fallback if fill is None else fill)
    if target is not None and stain != "none" and n:
        if stain == "crop":
            keys = [str(i) for i in range(n)]
        elif stain == "group":
            keys = group_keys
        else:
            keys = ["all"] * n
        by_key: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            by_key.setdefault(k, []).append(i)
        pooled: ReinhardStats | None = None
        for members in by_key.values():
            try:
                source = _pixel_stats([_cell_pixels(scaled[i]) for i in members])
            except ValueError:  # uniform colour: fall back to the statistics of all crops
                if pooled is None:
                    try:
                        pooled = _pixel_stats([_cell_pixels(im) for im in scaled])
                    except ValueError:
                        logger.warning("crops without colour variation are left unnormalized")
                        continue
                source = pooled
            out[members] = reinhard(out[members], target, source=source).numpy()
    return out


def _as_rgb(img: NDArray[Any]) -> NDArray[np.uint8]:
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[2] == 4:
        alpha = img[..., 3:4].astype(np.float32) / 255.0
        img = np.rint(img[..., :3] * alpha + 255.0 * (1.0 - alpha))
    return np.ascontiguousarray(img[..., :3], dtype=np.uint8)


def _read_image(path: Path) -> NDArray[np.uint8]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            arr = np.asarray(im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {' '.join(str(exc).split())}") from exc
    return _as_rgb(arr)


# -- crop folders --------------------------------------------------------------------------------------


def _read_manifest(root: Path) -> dict[str, str]:
    """``relative path`` and ``file name`` → group, from ``root/manifest.csv`` (empty if none)."""
    path = root / "manifest.csv"
    if not path.is_file():
        return {}
    with path.open(newline="", encoding="utf-8-sig") as fh:
        sample = fh.read(4096)
        fh.seek(0)
        try:
            dialect: Any = csv.Sniffer().sniff(sample, delimiters=",;\t")
        except csv.Error:
            dialect = csv.excel
        reader = csv.DictReader(fh, dialect=dialect)
        cols = {c.strip().lower(): c for c in (reader.fieldnames or [])}
        file_col = next((cols[c] for c in _FILE_COLUMNS if c in cols), None)
        group_col = next((cols[c] for c in _GROUP_COLUMNS if c in cols), None)
        if file_col is None or group_col is None:
            logger.info("%s has no file/group columns; every file is its own group", path)
            return {}
        out: dict[str, str] = {}
        for row in reader:
            f = (row.get(file_col) or "").strip().replace("\\", "/")
            g = (row.get(group_col) or "").strip()
            if f and g:
                out[f] = g
                out.setdefault(Path(f).name, g)
    return out


def _ignored(name: str, patterns: Sequence[str]) -> bool:
    """Whether the folder ``name`` matches one of the glob ``patterns`` (case-insensitive)."""
    low = name.lower()
    return any(fnmatch.fnmatchcase(low, pat.lower()) for pat in patterns)


@dataclass(frozen=True)
class CropFolderListing:
    """The labelled images of a crop folder: ``files`` (path, bundle class) and each file's group."""

    root: Path
    files: list[tuple[Path, str]]
    groups: list[str]
    class_map: Mapping[str, str | None] | None
    ignored: list[str]
    groups_from: Literal["manifest.csv", "file"]


def list_crop_folder(
    root: str | os.PathLike[str],
    *,
    class_map: Mapping[str, str | None] | str | None = None,
    classes: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
) -> CropFolderListing:
    """The images of a crop folder and their classes and groups, read by nothing yet (the rules of
    :func:`load_crop_folder`: one sub-folder per class, searched recursively; ``manifest.csv`` groups)."""
    base = Path(root)
    if not base.is_dir():
        raise DataError(f"crop folder not found: {base}")
    cmap = load_class_map(class_map) if isinstance(class_map, (str, os.PathLike)) else class_map
    resolve = _ClassResolver(cmap, classes)
    manifest = _read_manifest(base)
    patterns = list(ignore)
    files: list[tuple[Path, str]] = []
    skipped: Counter[str] = Counter()
    ignored: set[str] = set()
    for sub in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if _ignored(sub.name, patterns):
            ignored.add(sub.name)
            continue
        images = []
        for p in sorted(sub.rglob("*")):
            if p.suffix.lower() not in IMAGE_SUFFIXES or not p.is_file():
                continue
            inner = p.relative_to(base).parts[1:-1]
            hit = next((i for i, part in enumerate(inner) if _ignored(part, patterns)), None)
            if hit is not None:
                ignored.add("/".join((sub.name, *inner[: hit + 1])))
                continue
            images.append(p)
        if not images:
            continue
        quoted = shlex.quote(sub.name)
        target = resolve(
            sub.name,
            where=f"{base}: folder {sub.name!r}",
            hint=f"; to skip the folder, add {quoted} to ignore or map it to null in a class_map "
            f"file ({sub.name}: null)",
        )
        if target is None:
            skipped[sub.name] += len(images)
            continue
        files += [(p, target) for p in images]
    if not files:
        raise DataError(f"{base}: no labelled images (expected one sub-folder of images per class)")
    if skipped:
        logger.info("skipped by the class map: %s", dict(skipped))
    if ignored:
        logger.info("ignored folders: %s", ", ".join(sorted(ignored)))
    groups: list[str] = []
    for p, _ in files:
        rel = p.relative_to(base).as_posix()
        groups.append(manifest.get(rel) or manifest.get(p.name) or rel)
    return CropFolderListing(
        root=base,
        files=files,
        groups=groups,
        class_map=cmap,
        ignored=sorted(ignored),
        groups_from="manifest.csv" if manifest else "file",
    )


def load_crop_folder(
    root: str | os.PathLike[str],
    *,
    mpp: float,
    class_map: Mapping[str, str | None] | str | None = None,
    classes: Sequence[str] | None = None,
    target_mpp: float = 0.25,
    size: int = 224,
    stain_target: ReinhardStats | None = None,
    stain: StainMode = "group",
    progress: bool = True,
    ignore: Sequence[str] = (),
) -> CropSet:
    """Read a folder of labelled crops (one sub-folder per class, searched recursively).

    Args:
        root: the folder; an optional ``manifest.csv`` gives groups (see the module docstring).
        mpp: µm/px of the crops (Herlev: 0.201).
        class_map: sub-folder name → bundle class (a mapping, a preset name or a file); without one the
            sub-folder names must be class names (``classes``, default the five Bethesda classes). A
            sub-folder mapped to None (``null`` in a file) is skipped.
        classes: the allowed bundle classes (None: any mapped class).
        ignore: glob patterns of folders to skip (e.g. ``masks``), matched without regard
            to case against the name of every folder under ``root`` (class folders and the folders
            inside them).
        target_mpp, size: the bundle's µm/px and input size.
        stain_target: Reinhard target (None: :data:`wsi_screen.stain.DEFAULT_TARGET`); ``stain`` the
            source-statistics mode (:data:`STAIN_MODES`).
    """
    from wsi_screen.stain import DEFAULT_TARGET

    base = Path(root)
    if not base.is_dir():
        raise DataError(f"crop folder not found: {base}")
    if mpp is None or mpp <= 0:
        raise DataError(f"{base}: give the crops' µm/px (mpp, e.g. 0.201 for Herlev)")
    listing = list_crop_folder(base, class_map=class_map, classes=classes, ignore=ignore)
    files, groups, cmap, ignored = listing.files, listing.groups, listing.class_map, listing.ignored
    images_list = []
    for p, _ in progress_iter(files, enabled=progress, desc="reading crops", unit="crops"):
        images_list.append(_read_image(p))
    target_stats = DEFAULT_TARGET if stain_target is None else stain_target
    crops = prepare_crops(
        images_list,
        src_mpp=mpp,
        dst_mpp=target_mpp,
        size=size,
        target=None if stain == "none" else target_stats,
        groups=groups,
        stain=stain,
    )
    names = order_classes(t for _, t in files)
    labels = np.array([names.index(t) for _, t in files], np.int64)
    info = {
        "source": "crop_folder",
        "path": str(base.resolve()),
        "source_mpp": mpp,
        "class_map": cmap if cmap is None else {k: v for k, v in cmap.items()},
        "folders": dict(Counter(p.relative_to(base).parts[0] for p, _ in files)),
        "ignored": ignored,
        "groups_from": listing.groups_from,
        "stain": stain,
        "stain_target": None if stain == "none" else target_stats.to_dict(),
        "padding": "centre-crop, or pad with the crop's (else its group's) glass colour before Reinhard",
    }
    return CropSet(
        crops=crops,
        labels=labels,
        groups=np.array(groups, dtype=str),
        class_names=names,
        mpp=float(target_mpp),
        sources=np.array([p.relative_to(base).as_posix() for p, _ in files], dtype=str),
        info=info,
    )


def load_crops(
    path: str | os.PathLike[str],
    *,
    mpp: float | None = None,
    class_map: Mapping[str, str | None] | str | None = None,
    classes: Sequence[str] | None = None,
    target_mpp: float = 0.25,
    size: int = 224,
    stain_target: ReinhardStats | None = None,
    stain: StainMode = "group",
    progress: bool = True,
    ignore: Sequence[str] = (),
) -> CropSet:
    """A saved :class:`CropSet` folder as is, or a crop folder via :func:`load_crop_folder`
    (``ignore``: its folders to skip; a saved crop set has none)."""
    if CropSet.is_cropset(path):
        cs = CropSet.load(path)
        if not math.isclose(cs.mpp, target_mpp, rel_tol=1e-3) or cs.size != size:
            raise DataError(
                f"{path}: crops are {cs.size} px at {cs.mpp} µm/px, the model needs {size} px at "
                f"{target_mpp} µm/px"
            )
        if class_map is not None:
            cmap = load_class_map(class_map) if isinstance(class_map, (str, os.PathLike)) else class_map
            resolve = _ClassResolver(cmap, classes)
            mapped = [resolve(c, where=str(path)) for c in cs.class_names]
            keep_cls = [m is not None for m in mapped]
            keep = np.array(keep_cls, bool)[cs.labels]
            names = order_classes(m for m in mapped if m is not None)
            remap = np.array([names.index(m) if m is not None else -1 for m in mapped], np.int64)
            cs = CropSet(
                crops=cs.crops[keep] if not keep.all() else cs.crops,
                labels=remap[cs.labels[keep]],
                groups=cs.groups[keep],
                class_names=names,
                mpp=cs.mpp,
                sources=cs.sources[keep],
                info=cs.info,
            )
        return cs
    if mpp is None:
        raise DataError(f"{path}: give the crops' µm/px as mpp (e.g. 0.201 for Herlev)")
    return load_crop_folder(
        path,
        mpp=mpp,
        class_map=class_map,
        classes=classes,
        target_mpp=target_mpp,
        size=size,
        stain_target=stain_target,
        stain=stain,
        progress=progress,
        ignore=ignore,
    )


# -- QuPath annotation files ----------------------------------------------------------------------------


def annotation_files(pattern: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Annotation files from a glob pattern, a folder (its ``*.geojson``/``*.json``/``*.gz``) or a list."""
    import glob

    items = [pattern] if isinstance(pattern, (str, os.PathLike)) else list(pattern)
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out += sorted(
                q for q in p.iterdir() if q.name.lower().endswith((".geojson", ".json", ".geojson.gz"))
            )
        elif p.is_file():
            out.append(p)
        else:
            found = sorted(Path(m) for m in glob.glob(str(item)))
            if not found:
                raise DataError(f"no annotation files match {str(item)!r}")
            out += found
    if not out:
        raise DataError(f"no annotation files in {pattern!r}")
    return out


def _annotation_stem(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".geojson", ".json"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return name


def find_slide_for(annotation_path: str | os.PathLike[str], slides_dir: str | os.PathLike[str]) -> Path:
    """The slide in ``slides_dir`` whose file name (or name without suffix) is the annotation's stem.

    ``ABC.svs.geojson`` and ``ABC.geojson`` both find ``ABC.svs``. Raises :class:`DataError` when
    none or several match.
    """
    stem = _annotation_stem(Path(annotation_path))
    sdir = Path(slides_dir)
    if not sdir.is_dir():
        raise DataError(f"slide folder not found: {sdir}")
    exact = sdir / stem
    if exact.exists() and not exact.name.lower().endswith((".geojson", ".json")):
        return exact
    matches = [
        q
        for q in sorted(sdir.iterdir())
        if q.name.split(".")[0] == stem or q.stem == stem
        if not q.name.lower().endswith((".geojson", ".json", ".gz", ".truth.json"))
    ]
    matches = [q for q in matches if not q.name.endswith(".truth.json")]
    if not matches:
        raise DataError(f"no slide for {Path(annotation_path).name} in {sdir} (looked for {stem}.*)")
    if len(matches) > 1:
        names = ", ".join(q.name for q in matches)
        raise DataError(f"several slides match {Path(annotation_path).name} in {sdir}: {names}")
    return matches[0]


# -- the inference path on one slide -------------------------------------------------------------------


def crops_from_slide(
    slide_path: str | os.PathLike[str],
    x: NDArray[np.float64],
    y: NDArray[np.float64],
    *,
    mpp: float,
    size: int,
    target: ReinhardStats | None,
    settings: Settings | None = None,
    slide_mpp: float | None = None,
    localizer: Localizer | None = None,
) -> tuple[NDArray[np.uint8], NDArray[np.bool_]]:
    """Crops centred on level-0 points, cut by the inference path (read → Reinhard → ``cut_crops``).

    Only the tiles owning a point are read (whether or not the cell-region mask kept them). Returns
    the (K, size, size, C) crops of the points inside the slide and the (N,) mask of those points.
    With a ``localizer`` the crops carry the nucleus-mask channel (C = 4), made as
    :class:`~wsi_screen.pipeline.TileProcessor` makes it: the localizer on the normalized window,
    :func:`~wsi_screen.classify.nucleus_mask` of its candidates, cut at the same place.
    """
    import torch

    from wsi_screen.classify import cut_crops, cut_mask_crops
    from wsi_screen.config import load_settings
    from wsi_screen.device_stage import DARK_FILL_RGB
    from wsi_screen.pipeline import prepare_slide
    from wsi_screen.reader import iter_windows
    from wsi_screen.slide import open_slide
    from wsi_screen.stain import dark_region_mask, reinhard

    s = settings or load_settings()
    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    with open_slide(slide_path, backend=s.slide.backend, mpp=slide_mpp or s.slide.mpp) as slide:
        loc_target = None if localizer is None else getattr(localizer, "stain_target", target)
        prepared = prepare_slide(slide, s, grid_mpp=mpp, target=target, localizer_target=loc_target)
        grid, stain = prepared.grid, prepared.stain
        rows, cols = grid.owner(xs, ys)
        inside = rows >= 0
        if not inside.all():
            logger.warning("%s: %d points lie outside the slide", Path(slide_path).name, int((~inside).sum()))
        tile_ids = rows * grid.cols + cols
        wanted = sorted(set(tile_ids[inside].tolist()))
        tiles = [grid.tile(t // grid.cols, t % grid.cols) for t in wanted]
        out = np.zeros((int(inside.sum()), size, size, 3 if localizer is None else 4), np.uint8)
        pos = np.cumsum(inside) - 1
        workers = s.reading.threads
        for read in iter_windows(slide, tiles, mpp=grid.mpp, workers=workers, prefetch=s.reading.queue_tiles):
            if read.window is None:
                raise DataError(f"{Path(slide_path).name}: tile {read.tile.index} unreadable ({read.error})")
            raw = torch.from_numpy(read.window)[None]
            win = raw
            if stain.target is not None and stain.source is not None:
                win = reinhard(raw, stain.target, source=stain.source)
            sel = np.flatnonzero(inside & (tile_ids == read.tile.index))
            px, py = read.tile.to_window(xs[sel], ys[sel])
            ti = torch.zeros(len(sel), dtype=torch.long)
            cx = torch.from_numpy(np.floor(px).astype(np.int64))
            cy = torch.from_numpy(np.floor(py).astype(np.int64))
            crops = cut_crops(win, ti, cx, cy, size)
            if localizer is not None:
                loc_in = win  # the localizer's own target (as TileProcessor does): one pass if equal
                if loc_target != stain.target:
                    loc_in = (
                        raw
                        if loc_target is None or stain.source is None
                        else reinhard(raw, loc_target, source=stain.source)
                    )
                if s.stain.fill_dark_regions:  # glass instead of large dark regions, as TileProcessor
                    dark = dark_region_mask(raw, mpp=grid.mpp, isolated=False)
                    glass = torch.tensor(DARK_FILL_RGB, dtype=torch.uint8)
                    loc_in = torch.where(dark[..., None], glass, loc_in)
                (cands,) = localizer.localize(
                    loc_in.to(localizer.device), window_mpp=grid.mpp, halo_px=grid.halo
                )
                hw = (int(win.shape[1]), int(win.shape[2]))
                crops = torch.cat(
                    [crops, cut_mask_crops([cands.outlines], hw, ti, cx, cy, size, device=win.device)], 3
                )
            out[pos[sel]] = crops.cpu().numpy()
    return out, inside


def crops_from_annotations(
    annotations: Sequence[str | os.PathLike[str]] | str,
    slides_dir: str | os.PathLike[str],
    *,
    mpp: float = 0.25,
    size: int = 224,
    class_map: Mapping[str, str | None] | str | None = None,
    classes: Sequence[str] | None = None,
    stain_target: ReinhardStats | None = None,
    settings: Settings | None = None,
    slide_mpp: float | None = None,
    progress: bool = True,
    localizer: Localizer | None = None,
) -> CropSet:
    """Crops of QuPath-annotated cells, cut through the inference path; one group per slide.

    Args:
        annotations: a glob pattern, folder or list of ``.geojson`` files named after their slides.
        slides_dir: where the slides are (``ABC.svs`` for ``ABC.geojson`` or ``ABC.svs.geojson``).
        class_map: QuPath class → bundle class (mapping, preset name or file); without one the class
            names must be bundle class names (``classes``, default the five Bethesda classes; case,
            ``-``, ``_`` and spaces are ignored).
        stain_target: Reinhard target (None: :data:`wsi_screen.stain.DEFAULT_TARGET`).
        settings: pipeline settings (tissue, tiling, stain, reading); default preset when None.
        slide_mpp: level-0 µm/px for slides without it.
        localizer: when given, the crops carry the nucleus-mask channel (``rgb+mask`` bundles).
    """
    from wsi_screen.stain import DEFAULT_TARGET

    files = annotation_files(annotations)
    cmap = load_class_map(class_map) if isinstance(class_map, (str, os.PathLike)) else class_map
    resolve = _ClassResolver(cmap, classes)
    target = DEFAULT_TARGET if stain_target is None else stain_target
    plans: list[tuple[Path, Path, list[Annotation], list[str]]] = []
    for f in files:
        slide_path = find_slide_for(f, slides_dir)
        anns = read_qupath_geojson(f)
        labels = []
        kept = []
        for a in anns:
            t = resolve(a.label, where=f.name)
            if t is not None:
                kept.append(a)
                labels.append(t)
        if kept:
            plans.append((f, slide_path, kept, labels))
    if not plans:
        raise DataError("the annotations hold no cell of a mapped class")
    parts: list[CropSet] = []
    for f, slide_path, anns, labels in progress_iter(plans, enabled=progress, desc="slides", unit="slides"):
        xs = np.array([a.x for a in anns])
        ys = np.array([a.y for a in anns])
        crops, inside = crops_from_slide(
            slide_path,
            xs,
            ys,
            mpp=mpp,
            size=size,
            target=target,
            settings=settings,
            slide_mpp=slide_mpp,
            localizer=localizer,
        )
        lab = [t for t, ok in zip(labels, inside, strict=True) if ok]
        if not lab:
            continue
        names = order_classes(lab)
        parts.append(
            CropSet(
                crops=crops,
                labels=np.array([names.index(t) for t in lab], np.int64),
                groups=np.array([slide_path.name] * len(lab), dtype=str),
                class_names=names,
                mpp=float(mpp),
                sources=np.array(
                    [
                        f"{slide_path.name}@{x:.1f},{y:.1f}"
                        for x, y in zip(xs[inside], ys[inside], strict=True)
                    ],
                    dtype=str,
                ),
            )
        )
        logger.info("%s: %d crops from %s", f.name, len(lab), slide_path.name)
    if not parts:
        raise DataError("no annotated cell lies inside its slide")
    info = {
        "source": "qupath_annotations",
        "annotations": [str(f) for f, *_ in plans],
        "slides": [str(p[1]) for p in plans],
        "class_map": None if cmap is None else dict(cmap),
        "stain_target": target.to_dict(),
        "path": "inference (tile windows at the bundle µm/px, slide Reinhard statistics, cut_crops)",
        **({} if localizer is None else {"localization": localizer_identity(localizer)}),
    }
    return CropSet.concat(parts, info=info)


# -- synthetic slides ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSlideSpec:
    """The arguments of one synthetic training slide (see :func:`synthesize_slide`)."""

    index: int
    seed: int
    size_px: int
    preparation: str
    stain: str
    abnormal: dict[str, int]
    blur_fraction: float

    def key(self) -> str:
        """Content hash of the spec (cache file names)."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "seed": self.seed,
            "size_px": self.size_px,
            "preparation": self.preparation,
            "stain": self.stain,
            "abnormal": dict(self.abnormal),
            "blur_fraction": self.blur_fraction,
        }


def synthetic_specs(
    n_slides: int,
    *,
    seed: int = 0,
    size_px: int = 4096,
    abnormal_range: tuple[int, int] = (8, 30),
    conventional_fraction: float = 0.3,
) -> list[SyntheticSlideSpec]:
    """A deterministic, varied set of slide specs: stain profiles in turn, LBC and conventional
    preparations, per-class abnormal counts drawn from ``abnormal_range``, some blur."""
    from wsi_screen.synth import ABNORMAL_CLASSES, STAIN_PROFILES

    rng = np.random.default_rng([seed, 0x5EED])
    stains = sorted(STAIN_PROFILES)
    out = []
    for i in range(n_slides):
        prep = "conventional" if rng.random() < conventional_fraction else "lbc"
        lo, hi = abnormal_range
        abnormal = {c: int(rng.integers(lo, hi + 1)) for c in ABNORMAL_CLASSES}
        out.append(
            SyntheticSlideSpec(
                index=i,
                seed=int(seed * 100_003 + i * 7919 + 17) % (2**31 - 1),
                size_px=int(size_px),
                preparation=prep,
                stain=stains[(i + seed) % len(stains)],
                abnormal=abnormal,
                blur_fraction=float(rng.choice([0.0, 0.05, 0.1])),
            )
        )
    return out


def _nucleus_targets(truth: SlideTruth) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.int64]]:
    """(K, 2) nucleus centres, (K,) nucleus radii (level-0 px) and (K,) object index of every nucleus."""
    from wsi_screen.synth.cells import polygon_area, polygon_centroid

    xy: list[tuple[float, float]] = []
    r: list[float] = []
    obj: list[int] = []
    px_um2 = truth.mpp * truth.mpp
    for i, o in enumerate(truth.objects):
        if o.nucleus is None or o.nucleus_xy is None or o.nucleus_area_um2 is None:
            continue
        xy.append(o.nucleus_xy)
        r.append(math.sqrt(o.nucleus_area_um2 / px_um2 / math.pi))
        obj.append(i)
        for extra in o.extra_nuclei:
            xy.append(polygon_centroid(extra))
            r.append(math.sqrt(polygon_area(extra) / math.pi))
            obj.append(i)
    return (
        np.asarray(xy, np.float64).reshape(-1, 2),
        np.asarray(r, np.float64),
        np.asarray(obj, np.int64),
    )


def match_detections(
    x: NDArray[np.float64], y: NDArray[np.float64], truth: SlideTruth, *, tolerance: float = 1.0
) -> tuple[NDArray[np.str_], NDArray[np.int64]]:
    """Label detections (level-0 px) by the ground-truth nucleus they fall on.

    A detection matches the nearest nucleus (binucleate cells: either nucleus) whose centre is within
    ``tolerance`` × that nucleus's equivalent radius (√(area/π)); it takes the class of the nucleus's
    object. Unmatched detections are ``artifact``. Returns (class names, matched object index or -1).
    """
    from scipy.spatial import cKDTree

    xs, ys = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = xs.size
    obj_idx = np.full(n, -1, np.int64)
    centres, radii, owner = _nucleus_targets(truth)
    if n and len(centres):
        tree = cKDTree(centres)
        k = min(8, len(centres))
        dist, idx = tree.query(
            np.stack([xs, ys], axis=1), k=k, distance_upper_bound=float(radii.max()) * tolerance
        )
        dist = dist.reshape(n, k)
        idx = idx.reshape(n, k)
        for i in range(n):
            for d, j in zip(dist[i], idx[i], strict=True):
                if not np.isfinite(d):
                    break
                if d <= tolerance * radii[j]:
                    obj_idx[i] = owner[j]
                    break
    classes = np.array(
        [truth.objects[j].klass if j >= 0 else "artifact" for j in obj_idx.tolist()], dtype=str
    ).reshape(n)
    return classes, obj_idx


def pipeline_cells(
    slide_path: str | os.PathLike[str],
    *,
    localizer: Localizer,
    settings: Settings | None = None,
    mpp: float = 0.25,
    size: int = 224,
    target: ReinhardStats | None = None,
    device: torch.device | None = None,
    mask_channel: bool = False,
) -> tuple[CellTable, NDArray[np.uint8]]:
    """Every cell the pipeline would classify on a slide: its row of the cell table (level-0
    centre, nucleus outline, morphometrics — the inputs of a bundle's ``score_head``) and its crop.

    The slide is prepared (:func:`~wsi_screen.pipeline.prepare_slide`) and its tiles screened by
    :func:`~wsi_screen.tile_loop.run_tiles` as in :func:`~wsi_screen.pipeline.run_slide`, without a
    classifier: cells on tile edges are settled by the slide's
    :class:`~wsi_screen.localize.CoverageResolver`, each cell once, with the crop of the tile whose
    version was kept.
    """
    from wsi_screen.config import load_settings
    from wsi_screen.device_stage import BatchResult, TileProcessor
    from wsi_screen.localize import CoverageResolver
    from wsi_screen.pipeline import prepare_slide
    from wsi_screen.slide import open_slide
    from wsi_screen.tile_loop import run_tiles
    from wsi_screen.tiling import Tile

    if settings is None:
        settings = load_settings()
    if device is None:
        device = _cpu()
    # The crop of every cell of every tile's version, by (tile, x, y); the resolver keeps one version.
    held: dict[tuple[int, float, float], NDArray[np.uint8]] = {}

    def keep_crops(tiles: Sequence[Tile], res: BatchResult) -> None:
        if res.crops is None:
            raise RuntimeError("the device stage returned no crops (keep_crops=True)")
        tile_crops = res.crops.cpu().numpy()
        start = 0
        for tile, table in zip(tiles, res.tables, strict=True):
            for i, (a, b) in enumerate(zip(table.x.tolist(), table.y.tolist(), strict=True)):
                held[(tile.index, float(a), float(b))] = tile_crops[start + i]
            start += len(table)

    with open_slide(slide_path, backend=settings.slide.backend) as slide:
        loc_target = getattr(localizer, "stain_target", target)
        prepared = prepare_slide(slide, settings, grid_mpp=mpp, target=target, localizer_target=loc_target)
        proc = TileProcessor(
            localizer=localizer,
            classifier=None,
            grid=prepared.grid,
            source=prepared.stain.source,
            target=prepared.stain.target,
            fill_dark=settings.stain.fill_dark_regions,
            crop_size=size,
            device=device,
            keep_crops=True,
            mask_channel=mask_channel,
            coverage=CoverageResolver(prepared.grid),
        )
        cells = run_tiles(
            slide, prepared.grid, proc, settings=settings, class_names=(), on_batch=keep_crops
        ).cells
    if not len(cells):
        return cells, np.zeros((0, size, size, 4 if mask_channel else 3), np.uint8)
    crops = [
        held[(int(t), float(a), float(b))]
        for t, a, b in zip(cells.tile.tolist(), cells.x.tolist(), cells.y.tolist(), strict=True)
    ]
    return cells, np.stack(crops)


def synthetic_crops(
    n_slides: int,
    *,
    cache_dir: str | os.PathLike[str],
    localizer: Localizer,
    seed: int = 0,
    size_px: int = 4096,
    mpp: float = 0.25,
    size: int = 224,
    stain_target: ReinhardStats | None = None,
    settings: Settings | None = None,
    specs: Sequence[SyntheticSlideSpec] | None = None,
    progress: bool = True,
    keep_slides: bool = False,
    mask_channel: bool = False,
) -> CropSet:
    """Crops of synthetic slides cut by the inference path and labelled from the exact truth.

    Each slide of :func:`synthetic_specs` (or ``specs``) is drawn into ``cache_dir``, screened by
    :class:`~wsi_screen.pipeline.TileProcessor` (``classifier=None, keep_crops=True``), its detections
    labelled by :func:`match_detections`, and its crops cached as ``cache_dir/slide-<key>.npz``
    (reused on the next call; the slide file itself is deleted unless ``keep_slides``). Each crop's
    source is ``synth-<seed>#<object index>:<kind>`` (``#-1:none`` for a detection on no nucleus).
    ``mask_channel`` adds the nucleus-mask channel (``rgb+mask`` bundles).
    """
    from wsi_screen.config import load_settings
    from wsi_screen.stain import DEFAULT_TARGET
    from wsi_screen.synth import synthesize_slide

    s = settings or load_settings()
    target = DEFAULT_TARGET if stain_target is None else stain_target
    plan = list(specs) if specs is not None else synthetic_specs(n_slides, seed=seed, size_px=size_px)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    device = localizer.device if hasattr(localizer, "device") else _cpu()
    tag = hashlib.sha256(
        json.dumps(
            [localizer_identity(localizer), mpp, size, target.to_dict(), s.to_dict()]
            + ([MASK_REPRESENTATION] if mask_channel else []),
            sort_keys=True,
            default=str,
        ).encode()
    ).hexdigest()[:8]
    parts: list[CropSet] = []
    n_det = 0
    n_matched = 0
    t0 = time.perf_counter()
    for spec in progress_iter(plan, enabled=progress, desc="synthetic slides", unit="slides"):
        f = cache / f"slide-{spec.index:04d}-{spec.key()}-{tag}.npz"
        if f.is_file():
            with np.load(f) as z:
                crops, labels_s, obj = z["crops"], z["labels"].astype(str), z["object"]
                kinds = z["kind"].astype(str) if "kind" in z.files else np.full(len(obj), "", dtype=str)
        else:
            slide_path = cache / f"slide-{spec.index:04d}-{spec.key()}.tiff"
            synthesize_slide(
                slide_path,
                size=(spec.size_px, spec.size_px),
                mpp=mpp,
                seed=spec.seed,
                abnormal=spec.abnormal,
                preparation=spec.preparation,
                stain=spec.stain,
                blur_fraction=spec.blur_fraction,
                workers=1,
            )
            from wsi_screen.synth import load_truth

            truth = load_truth(slide_path)
            x, y, crops = pipeline_crops(
                slide_path,
                localizer=localizer,
                settings=s,
                mpp=mpp,
                size=size,
                target=target,
                device=device,
                mask_channel=mask_channel,
            )
            labels_s, obj = match_detections(x, y, truth)
            kinds = np.array([truth.objects[o].kind if o >= 0 else "none" for o in obj.tolist()], dtype=str)
            tmp = f.with_name(f.name + ".part.npz")
            np.savez_compressed(tmp, crops=crops, labels=labels_s, object=obj, kind=kinds, x=x, y=y)
            os.replace(tmp, f)
            if not keep_slides:
                slide_path.unlink(missing_ok=True)
                slide_path.with_name(slide_path.stem + ".truth.json").unlink(missing_ok=True)
        n_det += len(labels_s)
        n_matched += int((obj >= 0).sum())
        if not len(labels_s):
            continue
        names = order_classes(labels_s.tolist())
        group = f"synth-{spec.seed}"
        parts.append(
            CropSet(
                crops=crops,
                labels=np.array([names.index(c) for c in labels_s.tolist()], np.int64),
                groups=np.array([group] * len(labels_s), dtype=str),
                class_names=names,
                mpp=float(mpp),
                sources=np.array(
                    [f"{group}#{int(o)}:{k}" for o, k in zip(obj.tolist(), kinds.tolist(), strict=True)],
                    dtype=str,
                ),
            )
        )
    if not parts:
        raise DataError("the synthetic slides gave no detections (is the localization bundle trained?)")
    info = {
        "source": "synthetic_slides",
        "n_slides": len(plan),
        "slides": [sp.to_dict() for sp in plan],
        "localization": localizer_identity(localizer),
        "stain_target": target.to_dict(),
        "n_detections": n_det,
        "n_matched_to_truth": n_matched,
        "labels": "nearest ground-truth nucleus within one nucleus radius; unmatched detections are artifact",
        "path": "inference (TileProcessor, classifier=None, keep_crops=True)",
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return CropSet.concat(parts, info=info)


def localizer_identity(localizer: Any) -> dict[str, Any]:
    """Name and sha256 of a localizer's bundle (for provenance and cache keys)."""
    bundle = getattr(localizer, "bundle", None)
    if bundle is None:
        return {"name": type(localizer).__name__}
    return {"name": str(bundle.name), "sha256": str(bundle.sha256)}


def _cpu() -> torch.device:
    import torch

    return torch.device("cpu")


# -- several sources at once ---------------------------------------------------------------------------


def collect_crops(
    *,
    data: Sequence[str | os.PathLike[str]] = (),
    mpp: float | None = None,
    class_map: Mapping[str, str | None] | str | None = None,
    classes: Sequence[str] | None = None,
    annotations: Sequence[str] = (),
    slides_dir: str | os.PathLike[str] | None = None,
    slide_mpp: float | None = None,
    synthetic: int = 0,
    synthetic_seed: int = 0,
    synthetic_size_px: int = 4096,
    cache_dir: str | os.PathLike[str] | None = None,
    target_mpp: float = 0.25,
    size: int = 224,
    stain_target: ReinhardStats | None = None,
    stain: StainMode = "group",
    settings: Settings | None = None,
    device: str = "auto",
    progress: bool = True,
    mask_channel: bool = False,
    ignore: Sequence[str] = (),
    cut: Literal["crop", "pipeline"] = "crop",
) -> CropSet:
    """Crops from any mix of crop folders / saved crop sets, QuPath annotations and synthetic slides.

    ``ignore``: glob patterns of folders of the crop folders to skip (:func:`load_crop_folder`).
    ``cut``: how crop folders become crops — ``crop``: each crop rescaled, padded with its glass and
    normalized by ``stain`` (:func:`load_crop_folder`); ``pipeline``: the folder's cells pasted into
    slides and cut by the inference path with the settings' localizer, up to 3 detections a cell
    (:func:`wsi_screen.train.pasted.pasted_crops`: the crops screening would classify).

    ``annotations`` needs ``slides_dir``; ``synthetic`` slides need the localization bundle named in
    ``settings.localization.model`` (``nuclei-unet-v1`` by default) and cache their crops in
    ``cache_dir``. ``mask_channel`` adds the nucleus-mask channel (``rgb+mask``), made by that same
    localization bundle; crop folders cannot have it (there are no slide windows to localize in), saved
    crop sets only if they were made with it.
    """
    from wsi_screen.config import load_settings
    from wsi_screen.stain import DEFAULT_TARGET

    s = settings or load_settings()
    parts: list[CropSet] = []
    want = 4 if mask_channel else 3
    loaded: list[Localizer] = []

    def localizer() -> Localizer:
        """The localization bundle of the settings, loaded once."""
        if not loaded:
            from wsi_screen.localize import Localizer
            from wsi_screen.models.bundle import load_bundle
            from wsi_screen.runtime import resolve_device

            bundle = load_bundle(s.localization.model, task="localization")
            loaded.append(
                Localizer(bundle, settings=s.localization, device=resolve_device(device, setting="device"))
            )
        return loaded[0]

    if cut not in ("crop", "pipeline"):
        raise DataError(f"cut must be 'crop' or 'pipeline', got {cut!r}")
    for d in data:
        folder = not CropSet.is_cropset(d)
        if cut == "pipeline" and folder:
            from wsi_screen.train.pasted import folder_cells, pasted_crops

            if mpp is None or mpp <= 0:
                raise DataError(f"{d}: give the crops' µm/px (mpp, e.g. 0.201 for Herlev)")
            cells, groups = folder_cells(
                d, mpp=mpp, class_map=class_map, classes=classes, ignore=ignore, progress=progress
            )
            part = pasted_crops(
                cells,
                groups,
                localizer=localizer(),
                settings=s,
                mpp=target_mpp,
                size=size,
                target=None if stain == "none" else (stain_target or DEFAULT_TARGET),
                mask_channel=mask_channel,
                progress=progress,
            )
            part.info.update({"source": "crop_folder", "path": str(Path(d).resolve()), "source_mpp": mpp})
            parts.append(part)
            continue
        if mask_channel and folder:
            raise DataError(
                f"{d}: a crop folder has no nucleus mask; mask_channel needs cut='pipeline' (the folder's "
                "cells pasted into slides), annotations with slides_dir, synthetic slides, or a crop set "
                "saved with mask_channel"
            )
        part = load_crops(
            d,
            mpp=mpp,
            class_map=class_map,
            classes=classes,
            target_mpp=target_mpp,
            size=size,
            stain_target=stain_target,
            stain=stain,
            progress=progress,
            ignore=ignore,
        )
        if part.channels != want:
            raise DataError(
                f"{d}: the crop set is {part.representation} ({part.channels} channels); "
                + ("drop mask_channel" if part.channels == 4 else "mask_channel needs rgb+mask crops")
                + " or save the crops again"
            )
        parts.append(part)

    if annotations:
        if slides_dir is None:
            raise DataError("annotations needs slides_dir (the folder with the annotated slides)")
        parts.append(
            crops_from_annotations(
                list(annotations),
                slides_dir,
                mpp=target_mpp,
                size=size,
                class_map=class_map,
                classes=classes,
                stain_target=stain_target,
                settings=s,
                slide_mpp=slide_mpp,
                progress=progress,
                localizer=localizer() if mask_channel else None,
            )
        )
    if synthetic:
        cache = Path(cache_dir) if cache_dir is not None else Path("wsi-screen-synthetic-crops")
        parts.append(
            synthetic_crops(
                synthetic,
                cache_dir=cache,
                localizer=localizer(),
                seed=synthetic_seed,
                size_px=synthetic_size_px,
                mpp=target_mpp,
                size=size,
                stain_target=stain_target,
                settings=s,
                progress=progress,
                mask_channel=mask_channel,
            )
        )
    if not parts:
        raise DataError("no training data: give data, annotations with slides_dir, or synthetic slides")
    if len(parts) == 1:
        return parts[0]
    return CropSet.concat(parts, info={"source": "mixed", "parts": [p.info for p in parts]})


# -- QuPath fixtures from synthetic truth ----------------------------------------------------------------


def truth_to_qupath(
    truth: SlideTruth,
    *,
    geometry: Literal["point", "polygon", "mixed"] = "mixed",
    classes: Sequence[str] | None = None,
    include_anucleate: bool = False,
) -> dict[str, Any]:
    """The ground truth of a synthetic slide as a QuPath GeoJSON export, as a lab would write it.

    ``point``: one ``MultiPoint`` annotation per class at the nuclei (QuPath's Points tool exports a
    class's points as one object); ``polygon``: one ``Polygon`` annotation per cell outline; ``mixed``:
    abnormal cells as polygons, the others as points. ``classes`` limits the classes exported;
    anucleate objects (debris, mucus) are left out unless ``include_anucleate``. Coordinates are
    level-0 pixels.
    """
    import uuid

    colours = {"NILM": [0, 160, 0], "ASC-US": [230, 200, 0], "LSIL": [240, 120, 0], "HSIL": [220, 0, 0]}
    points: dict[str, list[list[float]]] = {}
    features: list[dict[str, Any]] = []
    for o in truth.objects:
        if classes is not None and o.klass not in classes:
            continue
        if o.nucleus_xy is None and not include_anucleate:
            continue
        cls_json = {"name": o.klass, "color": colours.get(o.klass, [120, 120, 120])}
        as_polygon = geometry == "polygon" or (geometry == "mixed" and o.klass not in ("NILM", "artifact"))
        if as_polygon or o.nucleus_xy is None:
            ring = [[round(float(x), 2), round(float(y), 2)] for x, y in o.cell]
            ring.append(ring[0])
            features.append(
                {
                    "type": "Feature",
                    "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{truth.slide}/{o.id}")),
                    "geometry": {"type": "Polygon", "coordinates": [ring]},
                    "properties": {"objectType": "annotation", "classification": cls_json},
                }
            )
        else:
            points.setdefault(o.klass, []).append([round(o.nucleus_xy[0], 2), round(o.nucleus_xy[1], 2)])
    for klass, pts in points.items():
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{truth.slide}/points/{klass}")),
                "geometry": {"type": "MultiPoint", "coordinates": pts},
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": klass, "color": colours.get(klass, [120, 120, 120])},
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def pipeline_crops(
    slide_path: str | os.PathLike[str],
    *,
    localizer: Localizer,
    settings: Settings | None = None,
    mpp: float = 0.25,
    size: int = 224,
    target: ReinhardStats | None = None,
    device: torch.device | None = None,
    mask_channel: bool = False,
) -> tuple[NDArray[np.float64], NDArray[np.float64], NDArray[np.uint8]]:
    """Every cell ``run_slide`` would classify on a slide: level-0 (x, y) and its crop, cut by the
    inference path (cell regions, slide-level Reinhard towards ``target``, ``localizer``, the
    coverage resolver on tile edges, ``size``² crops at ``mpp``); :func:`pipeline_cells` without
    the rest of the cell table."""
    cells, crops = pipeline_cells(
        slide_path,
        localizer=localizer,
        settings=settings,
        mpp=mpp,
        size=size,
        target=target,
        device=device,
        mask_channel=mask_channel,
    )
    return np.asarray(cells.x, np.float64), np.asarray(cells.y, np.float64), crops
