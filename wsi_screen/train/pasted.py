"""Labelled crop folders screened the way screening sees cells: pasted into slides, cut by the pipeline.

A crop folder (Herlev, ``lbc-cells``, a lab's exported cells) holds tight boxes around single cells.
Screening never sees such a box: it sees a slide, normalized with slide-level Reinhard statistics,
and a 224² crop centred on a nucleus the localizer found. A classifier trained on those crops
(``cyto-real-v1``) scored on rescaled, glass-padded boxes is scored on pixels it never sees in use
(on the Herlev test cells: binary AUROC 0.66 as boxes against 0.85 through the pipeline, docs/models.md).

:func:`screen_folder_cells` therefore pastes every cell of a folder into slide files with the
classifier's training compositor (:func:`wsi_screen.train.cell_slides.compose_cell_slide`, on glass:
additive in optical density inside the cell's foreground mask, so no box or seam is drawn), screens
each slide with the inference path (:func:`wsi_screen.train.data.pipeline_cells`: cell regions,
slide-level Reinhard, the localizer, the coverage resolver, the classifier's crops, the bundle's score
head if any) and gives each cell what a reviewer would see of it: the class probabilities of its
**most abnormal detection** (the one the GeoJSON export flags first), the number of detections on it,
and whether the localizer found it at all. A cell without a detection is never classified in
screening; it counts as a negative call.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen.errors import DataError
from wsi_screen.progress import progress_iter

if TYPE_CHECKING:
    import torch

    from wsi_screen.cells import CellTable
    from wsi_screen.classify import CellClassifier
    from wsi_screen.config import Settings
    from wsi_screen.localize import Localizer
    from wsi_screen.stain import ReinhardStats
    from wsi_screen.train.cell_slides import LabelledCell
    from wsi_screen.train.data import CropSet

__all__ = ["ScreenedCells", "folder_cells", "pasted_crops", "screen_cells", "screen_folder_cells"]

logger = logging.getLogger(__name__)

#: Lattice pitch and slide side of the composed slides (those of the classifier's training slides).
PITCH_UM = 80.0
SLIDE_UM = 1024.0


@dataclass
class ScreenedCells:
    """Per labelled cell: truth and what screening made of it, in the classifier's classes.

    ``probs`` (N, K) are the probabilities of the cell's most abnormal detection (its highest summed
    abnormal-class probability); a cell with no detection (``detected`` False) gets all its mass on
    ``negative_class``, as screening never shows it.
    """

    names: list[str]
    labels: list[str]
    groups: list[str]
    probs: NDArray[np.float32]
    detected: NDArray[np.bool_]
    detections: NDArray[np.int64]
    class_names: list[str]
    negative_class: str
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.names)


def folder_cells(
    root: str | os.PathLike[str],
    *,
    mpp: float,
    class_map: Mapping[str, str | None] | str | None = None,
    classes: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    progress: bool = True,
) -> tuple[list[LabelledCell], list[str]]:
    """The labelled cells of a crop folder (:func:`~wsi_screen.train.data.list_crop_folder` rules) at
    ``mpp`` µm/px, each with a foreground mask from its own glass, and each cell's group."""
    from wsi_screen.train.cell_slides import LabelledCell, foreground_label
    from wsi_screen.train.data import _read_image, list_crop_folder

    if mpp is None or mpp <= 0:
        raise DataError(f"{root}: give the crops' µm/px (mpp, e.g. 0.201 for Herlev)")
    listing = list_crop_folder(root, class_map=class_map, classes=classes, ignore=ignore)
    cells: list[LabelledCell] = []
    for p, klass in progress_iter(listing.files, enabled=progress, desc="reading cells", unit="cells"):
        rgb = _read_image(p)
        name = p.relative_to(listing.root).as_posix()
        cells.append(LabelledCell(name, klass, "crop_folder", rgb, foreground_label(rgb), float(mpp), False))
    return cells, list(listing.groups)


@dataclass
class _PastedSlide:
    """One screened slide of pasted cells: its cell table and crops, and for each detection the index
    (into the caller's cells) of the pasted cell it lies on, -1 for none."""

    table: CellTable
    crops: NDArray[np.uint8]
    cell: NDArray[np.int64]


def _pasted_slides(
    cells: Sequence[LabelledCell],
    *,
    localizer: Localizer,
    settings: Settings,
    mpp: float,
    size: int,
    target: ReinhardStats | None,
    device: torch.device,
    mask_channel: bool = False,
    seed: int = 0,
    backgrounds: Sequence[tuple[Any, float]] = (),
    work_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Iterator[_PastedSlide]:
    """Paste ``cells`` into slides (:data:`SLIDE_UM` square, one cell per :data:`PITCH_UM` lattice slot,
    in a seeded random order) and screen each with the inference path, without a classifier."""
    from wsi_screen.train.cell_slides import compose_cell_slide, label_detections, write_image_slide
    from wsi_screen.train.data import pipeline_cells

    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise DataError("cell names must be unique (they label the pasted cells)")
    index = {n: i for i, n in enumerate(names)}
    size_px = round(SLIDE_UM / mpp)
    capacity = (size_px // max(16, round(PITCH_UM / mpp))) ** 2
    order = np.random.default_rng(seed).permutation(len(cells))
    chunks = [order[i : i + capacity] for i in range(0, len(order), capacity)]
    with tempfile.TemporaryDirectory(prefix="wsi-screen-pasted-") as tmp:
        folder = Path(work_dir) if work_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for s, chunk in enumerate(
            progress_iter(chunks, enabled=progress, desc="screening slides", unit="slides")
        ):
            cs = compose_cell_slide(
                [cells[int(i)] for i in chunk],
                backgrounds=backgrounds,
                mpp=mpp,
                size_px=size_px,
                pitch_um=PITCH_UM,
                seed=seed + s,
            )
            path = write_image_slide(folder / f"pasted-{s:04d}.tiff", cs.rgb, mpp)
            if work_dir is not None:  # kept: the slides and their truth, for a look in QuPath
                cs.save_truth(path.with_suffix(".truth.npz"))
            table, crops = pipeline_cells(
                path,
                localizer=localizer,
                settings=settings,
                mpp=mpp,
                size=size,
                target=target,
                device=device,
                mask_channel=mask_channel,
            )
            _, _, where = label_detections(table.x, table.y, cs)
            cell = np.array([index[cs.names[j]] if j >= 0 else -1 for j in where.tolist()], np.int64)
            yield _PastedSlide(table=table, crops=crops, cell=cell)


def screen_cells(
    cells: Sequence[LabelledCell],
    groups: Sequence[str],
    *,
    classifier: CellClassifier,
    localizer: Localizer,
    settings: Settings,
    target: ReinhardStats | None,
    seed: int = 0,
    backgrounds: Sequence[tuple[Any, float]] = (),
    work_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ScreenedCells:
    """Paste ``cells`` into slides (:data:`SLIDE_UM` square, one cell per :data:`PITCH_UM` lattice
    slot, in a seeded random order), screen each slide and score every cell (:class:`ScreenedCells`).

    ``target``: the classifier's Reinhard target (the crops'); the localizer gets its own bundle's.
    ``backgrounds``: real fields (an :class:`~wsi_screen.train.unet.AnnotatedImage` and its µm/px)
    pasted under the cells, as in the classifier's training slides (default: glass only).
    Slides are written to ``work_dir`` with their truth (``pasted-NNNN.tiff``, ``.truth.npz``;
    default: a temporary folder, removed afterwards).
    """
    import torch

    from wsi_screen.cells import abnormality_score

    if len(cells) != len(groups):
        raise ValueError(f"{len(cells)} cells but {len(groups)} groups")
    negatives = [c for c in classifier.class_names if c not in classifier.abnormal_classes]
    negative = "NILM" if "NILM" in classifier.class_names else (negatives[0] if negatives else "")
    if not negative:
        raise DataError(f"{' + '.join(classifier.names)} has no negative class to give undetected cells")
    probs = np.zeros((len(cells), len(classifier.class_names)), np.float32)
    probs[:, classifier.class_names.index(negative)] = 1.0
    detected = np.zeros(len(cells), bool)
    n_det = np.zeros(len(cells), np.int64)
    best = np.full(len(cells), -1.0)
    n_slides = 0
    for slide in _pasted_slides(
        cells,
        localizer=localizer,
        settings=settings,
        mpp=float(classifier.mpp),
        size=classifier.input_size,
        target=target,
        device=classifier.device,
        mask_channel=classifier.needs_mask,
        seed=seed,
        backgrounds=backgrounds,
        work_dir=work_dir,
        progress=progress,
    ):
        n_slides += 1
        table, crops = slide.table, slide.crops
        if not len(table):
            continue
        p = np.concatenate(
            [
                classifier.predict(
                    torch.from_numpy(np.ascontiguousarray(crops[a : a + 512])),
                    morphometrics={f: table.morphometrics[f][a : a + 512] for f in classifier.morphometrics},
                )
                .cpu()
                .numpy()
                for a in range(0, len(crops), 512)
            ]
        )
        score = abnormality_score(p, classifier.class_names, classifier.abnormal_classes)
        for d, i in enumerate(slide.cell.tolist()):
            if i < 0:
                continue
            detected[i] = True
            n_det[i] += 1
            if score[d] > best[i]:
                best[i] = float(score[d])
                probs[i] = p[d]
    logger.info(
        "pasted screening: %d of %d cells detected, %d slides", int(detected.sum()), len(cells), n_slides
    )
    return ScreenedCells(
        names=[c.name for c in cells],
        labels=[c.klass for c in cells],
        groups=list(groups),
        probs=probs,
        detected=detected,
        detections=n_det,
        class_names=list(classifier.class_names),
        negative_class=negative,
        info={
            "cut": "pipeline",
            "slides": n_slides,
            "slide_um": SLIDE_UM,
            "pitch_um": PITCH_UM,
            "seed": seed,
            "compositor": "wsi_screen.train.cell_slides.compose_cell_slide ("
            + ("real fields under the cells)" if backgrounds else "glass, no background fields)"),
            "cell_score": "the probabilities of the cell's most abnormal detection; undetected: negative",
            "detected": int(detected.sum()),
        },
    )


def screen_folder_cells(
    root: str | os.PathLike[str],
    *,
    mpp: float,
    classifier: CellClassifier,
    localizer: Localizer,
    settings: Settings,
    target: ReinhardStats | None,
    class_map: Mapping[str, str | None] | str | None = None,
    classes: Sequence[str] | None = None,
    ignore: Sequence[str] = (),
    seed: int = 0,
    work_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> ScreenedCells:
    """:func:`folder_cells` then :func:`screen_cells` (``work_dir``: keep the slides and their truth
    there); ``info`` names the folder."""
    cells, groups = folder_cells(
        root, mpp=mpp, class_map=class_map, classes=classes, ignore=ignore, progress=progress
    )
    unknown = sorted({c.klass for c in cells} - set(classifier.class_names))
    if unknown:
        raise DataError(
            f"the data has classes {unknown} that {' + '.join(classifier.names)} does not predict "
            f"({', '.join(classifier.class_names)}); map them with a class_map"
        )
    out = screen_cells(
        cells,
        groups,
        classifier=classifier,
        localizer=localizer,
        settings=settings,
        target=target,
        seed=seed,
        work_dir=work_dir,
        progress=progress,
    )
    out.info.update({"source": "crop_folder", "path": str(Path(root).resolve()), "source_mpp": mpp})
    return out


def pasted_crops(
    cells: Sequence[LabelledCell],
    groups: Sequence[str],
    *,
    localizer: Localizer,
    settings: Settings,
    mpp: float = 0.25,
    size: int = 224,
    target: ReinhardStats | None = None,
    per_cell: int = 3,
    seed: int = 0,
    mask_channel: bool = False,
    progress: bool = True,
) -> CropSet:
    """Training crops of labelled cells, cut as screening cuts them: the cells pasted into slides on
    glass (as :func:`screen_cells`), each slide screened by the inference path without a classifier,
    and up to ``per_cell`` detections on each cell (drawn at random) kept, labelled with the cell's
    class and group. Detections on no cell are dropped (the slides hold nothing else).
    ``mask_channel``: with the nucleus-mask channel of the localizer's outlines (``rgb+mask``)."""
    import torch

    from wsi_screen.train.data import CropSet, localizer_identity, order_classes

    if len(cells) != len(groups):
        raise ValueError(f"{len(cells)} cells but {len(groups)} groups")
    if per_cell < 1:
        raise ValueError(f"per_cell must be ≥ 1, got {per_cell}")
    rng = np.random.default_rng(seed)
    crops: list[NDArray[np.uint8]] = []
    owner: list[int] = []
    for slide in _pasted_slides(
        cells,
        localizer=localizer,
        settings=settings,
        mpp=mpp,
        size=size,
        target=target,
        device=getattr(localizer, "device", torch.device("cpu")),
        mask_channel=mask_channel,
        seed=seed,
        progress=progress,
    ):
        by_cell: dict[int, list[int]] = {}
        for d, i in enumerate(slide.cell.tolist()):
            if i >= 0:
                by_cell.setdefault(i, []).append(d)
        for i, dets in sorted(by_cell.items()):
            for d in rng.permutation(dets)[:per_cell].tolist():
                crops.append(slide.crops[d])
                owner.append(i)
    if not crops:
        raise DataError("the localizer found none of the pasted cells: check the crops' µm/px (--mpp)")
    classes = order_classes(c.klass for c in cells)
    found = len(set(owner))
    logger.info("pasted crops: %d crops of %d of %d cells", len(owner), found, len(cells))
    return CropSet(
        crops=np.stack(crops),
        labels=np.array([classes.index(cells[i].klass) for i in owner], np.int64),
        groups=np.array([groups[i] for i in owner], dtype=str),
        class_names=classes,
        mpp=float(mpp),
        sources=np.array([cells[i].name for i in owner], dtype=str),
        info={
            "cut": "pipeline",
            "per_cell": per_cell,
            "cells": len(cells),
            "cells_found": found,
            "compositor": "wsi_screen.train.cell_slides.compose_cell_slide (glass, no background fields)",
            "localization": localizer_identity(localizer),
            "stain_target": None if target is None else target.to_dict(),
            "seed": seed,
        },
    )
