#!/usr/bin/env python
"""The real-cell classifier ``cyto-real-v1``: crops cut by the pipeline from slides of real cells.

    flock /tmp/wsi-cpu.lock .venv/bin/python pipelines/train_classifier_real.py --work /tmp/cyto-real
    python pipelines/train_classifier_real.py --work /tmp/c --stages slides crops --copies 1 --smoke

Every stage caches its output in ``--work``; a rerun does only what is missing (``--force STAGE`` redoes
one). Data: ``../shared/data``, split by the one manifest ``pipelines/splits/real.json`` (Herlev by
group; ``lbc-cells`` by crop, as it has no group ids; ``lbc-nuclei`` fields by field).

Stages (``--stages``, default all, in this order):

``slides``
    For each part (train, val, test): Herlev cells (``herlev-bethesda``) and ``lbc-cells`` crops
    (``lbc-cells-bethesda``) of that part, pasted ``--copies`` times (train; once for val and test)
    into 1,024 µm slides (:func:`wsi_screen.train.cell_slides.compose_cell_slide`: optical-density
    paste by the cell's mask, no crop rectangle, on glass and real LBC fields of the same part, whose
    nuclei are NILM squamous and neutrophil nuclei). ``WORK/slides/<part>-NNN.tiff`` + ``.truth.npz``.
``crops``
    Each slide screened by the inference path (:func:`wsi_screen.train.data.pipeline_crops`: cell
    regions, slide-level Reinhard, the default localizer, coverage resolver, 224² crops at
    0.25 µm/px) and every detection labelled by what it sits on
    (:func:`wsi_screen.train.cell_slides.label_detections`); at most ``--per-cell`` detections per
    pasted cell and ``--background-per-slide`` background nuclei per slide are kept (drawn at
    random). ``WORK/crops-<part>.npz`` (a :class:`~wsi_screen.train.data.CropSet`).
``synthetic``
    ``--synthetic`` synthetic slides (six stain profiles) cut the same way
    (:func:`~wsi_screen.train.data.synthetic_crops`): the ``artifact`` class (debris, detections on
    no nucleus) comes only from them; their cells join training at weight ``--synthetic-weight``.
``ssl`` (only when asked for)
    Self-supervised pre-training (:func:`wsi_screen.train.ssl.pretrain_ssl`, SimCLR) of a backbone on
    the real crops of the training part, labels unused (``--ssl-epochs``, ``--ssl-minutes``); never
    the val or test crops. ``WORK/bundles/ssl`` (a backbone bundle) for the ``ssl-init`` variant.
``train``
    ``train_classifier`` on the train crops (+ synthetic), validated (model selection) on the val
    crops; variants ``--variants`` (``scratch``; ``init``: synthetic pre-training, initialised from
    ``cyto-synth-v1``, class-balanced draws; ``scratch-natural``: ``scratch`` with draws at the
    crops' natural class frequencies (the class-balanced-sampling ablation); ``scratch-runicnet``:
    ``scratch`` with the ``runicnet-tiny`` backbone instead of ``--arch`` (RunicNet against the timm
    backbone); ``ssl-init``: the ``scratch`` recipe started from the
    ``ssl`` stage's backbone, and ``ssl-finetune`` the ``finetune`` second stage from it;
    ``finetune``: ``init`` trained further at half the
    learning rate with NILM and organism drawn ``--negative-weight`` × as often, so that about half
    the draws are negative; ``scratch-finetune``: the same second stage from ``scratch``;
    ``finetune-columnar``: ``finetune`` trained further at lr 5·10⁻⁴ with Herlev's normal columnar
    cells drawn ``--columnar-weight`` × as often on top; ``refit``: the shipped ``cyto-real-v1``
    trained again like ``finetune`` on these crops (cut by today's default localizer); ``refit-ec``:
    the same with Herlev's normal columnar cells as a class of their own, ``endocervical`` (NILM,
    class map ``herlev-bethesda-endocervical``; every other variant trains them as NILM);
    ``refit-ec-bin``: ``refit-ec`` plus the screening loss (``--binary-loss`` × the log loss of the
    summed abnormal probability) and the epoch chosen by validation binary AUROC; ``refit-aug``:
    ``refit`` with the stain and scanner augmentation preset ``AugmentConfig.strong()`` (wider HED,
    colour and blur ranges, JPEG round trips at quality 50–95); ``refit-src``: ``refit`` with draws
    balanced over sources within each class (``TrainConfig.balance_sources``), so that Herlev's few
    normal cells are drawn as often as the many LBC-field nuclei; ``polish``: the shipped
    ``cyto-real-v1`` trained a few epochs further at lr 5·10⁻⁴ (negatives 3 ×) on the work folder's
    crops — with ``--glass-share`` slides, the slide-composition ablation. Test crops are never seen.
``evaluate``
    Every variant (and every ``--ensembles`` average of variants, ``a+b``) on the test crops
    (``CellClassifier``, as in screening), at the review threshold
    chosen on validation (binary sensitivity ≥ 0.90): binary sensitivity/specificity, HSIL+ recall,
    per-class recall, NILM specificity per source, the 99th/99.9th percentile of NILM cell scores per
    source, with bootstrap 95 % intervals over cells. ``WORK/evaluate.json``.
``ablation``
    The paste-shortcut check: slides composed from the val cells with every crop reduced to its own
    glass (the box without its content) are compared with the same slides composed from other cells
    (of other classes and box sizes): identical pixels mean no box shape or seam survives.
    ``WORK/ablation.json``.
``cross-source`` (only when asked for)
    Issue 14's cross-source table on what two sources share, NILM against LSIL and HSIL
    (:data:`CROSS_SIDES`): one 3-class model trained on each side's train part (from ``cyto-synth-v1``,
    which has seen no real cell; model chosen on that side's val part), scored on the test part of
    both sides and on every part of the other side (cells it has never seen), next to the shipped
    ``cyto-real-v1`` (both sides, its classes pooled onto the three). ``WORK/cross-source.json``;
    with ``--cross-augment strong`` the one-source models are trained with ``AugmentConfig.strong()``
    (``WORK/cross-source-strong.json``): does scanner augmentation make a model transfer?
``tta`` (only when asked for)
    Test-time augmentation (``classification.tta``: ``--tta`` flips/rotations per crop, averaged)
    against none, for each of ``--variants``, on the val and test crops, each at its own validation
    threshold, with the AUROC gain and a paired bootstrap interval. ``WORK/tta<N>.json``.
``compare`` (only when asked for)
    The binary AUROC of each of ``--variants`` after the first against the first, on the same val and
    test crops, with a paired bootstrap interval over cells. ``WORK/compare.json``.
``head`` (only when asked for)
    The score head (:mod:`wsi_screen.score_head`): the ``--head-base`` bundle's abnormality score
    refitted by a logistic regression with the localizer's nucleus morphometrics of each crop
    (``WORK/morph-<part>.npz``, written by ``crops``), for each feature set of :data:`HEAD_FEATURES`.
    Fitted on the validation crops (the CNN has seen the training crops), with grouped
    ``--head-folds``-fold cross-fitting for the validation figures and the threshold; the test crops
    are scored once by the head refitted on all of validation. ``WORK/head.json``.
``ship``
    Copies the ``--ship`` variant to ``wsi_screen/models/bundles/<--name>`` with its figures and its
    ``thresholds.flag_score`` (the validation threshold above), which ``run_slide`` uses as the
    default ``output.flag_min_score``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
MANIFEST = ROOT / "pipelines" / "splits" / "real.json"
BUNDLES = ROOT / "wsi_screen" / "models" / "bundles"
PARTS = ("train", "val", "test")
#: The labels of the crops: Herlev's normal columnar cells are ``endocervical`` (class map
#: ``herlev-bethesda-endocervical``); a variant without that class trains them as NILM.
CLASSES = ["NILM", "ASC-US", "LSIL", "ASC-H", "HSIL", "SCC", "AGC", "organism", "endocervical", "artifact"]
ABNORMAL = ["ASC-US", "LSIL", "ASC-H", "HSIL", "SCC", "AGC"]
#: NILM under Bethesda (the binary negatives; artifacts are neither).
NEGATIVE = ["NILM", "organism", "endocervical"]
HSIL_PLUS = ["HSIL", "SCC"]
STAGES = (
    "slides",
    "crops",
    "synthetic",
    "ssl",
    "train",
    "evaluate",
    "ablation",
    "ship",
    "cross-source",
    "tta",
    "compare",
    "head",
)
#: Stages run when ``--stages`` is not given (``ssl``, ``cross-source`` train extra models: asked for).
DEFAULT_STAGES = tuple(s for s in STAGES if s not in ("ssl", "cross-source", "tta", "compare", "head"))
#: The classes both sides of the cross-source table share (issue 14, item 3).
CROSS_CLASSES = ["NILM", "LSIL", "HSIL"]
#: The two sides of the cross-source table: what each holds, from the crops of every part.
CROSS_SIDES = {
    "herlev": "Herlev: normal cells (squamous and columnar) NILM; light dysplasia LSIL; moderate, severe "
    "dysplasia and carcinoma in situ HSIL",
    "lbc": "LBC: lbc-nuclei field nuclei and lbc-cells organisms NILM; lbc-cells LSIL and HSIL",
}
#: Herlev's normal folders by kind (reported apart: the per-source bar is on NILM squamous cells).
HERLEV_NORMAL_KINDS = {
    "squamous": ["normal_superficiel", "normal_intermediate"],
    "columnar": ["normal_columnar"],
}
#: Second-stage variants and what each starts from: a first stage in ``WORK/bundles``, or (``refit``,
#: ``refit-ec``) the shipped ``cyto-real-v1``, trained again on the crops of today's default localizer.
FINETUNE_FROM = {
    "finetune": "init",
    "scratch-finetune": "scratch",
    "ssl-finetune": "ssl-init",
    "finetune-columnar": "finetune",
    "refit": "cyto-real-v1",
    "refit-ec": "cyto-real-v1",
    "refit-ec-bin": "cyto-real-v1",
    "refit-aug": "cyto-real-v1",
    "refit-src": "cyto-real-v1",
    "polish": "cyto-real-v1",
}
#: First-stage variants and the bundle each starts from (``scratch``: random weights).
FIRST_STAGE_INIT = {
    "scratch": None,
    "init": "cyto-synth-v1",
    "ssl-init": "ssl",
    "scratch-natural": None,
    "scratch-runicnet": None,
}
VARIANTS = (*FIRST_STAGE_INIT, *FINETUNE_FROM)
#: Variants that keep Herlev's columnar cells apart as ``endocervical`` (the others train them as NILM).
ENDOCERVICAL_VARIANTS = frozenset({"refit-ec", "refit-ec-bin"})
#: Variants trained with the screening loss (``TrainConfig.binary_loss``) and selected by validation
#: binary AUROC instead of macro-F1.
SCREENING_LOSS_VARIANTS = frozenset({"refit-ec-bin"})
#: Variants trained with the stain and scanner augmentation preset :meth:`AugmentConfig.strong`.
STRONG_AUGMENT_VARIANTS = frozenset({"refit-aug"})
#: Variants whose draws are balanced over sources within each class (``TrainConfig.balance_sources``:
#: Herlev's normal cells as often as the LBC-field nuclei, Herlev's HSIL as often as lbc-cells').
SOURCE_BALANCED_VARIANTS = frozenset({"refit-src"})
#: Variants drawn at the crops' natural class frequencies (no class balance), issue 14's
#: class-balanced-sampling ablation against ``scratch``.
NATURAL_DRAW_VARIANTS = frozenset({"scratch-natural"})
#: Variants trained with another backbone than ``--arch`` (issue 14's RunicNet against the timm
#: backbone): ``runicnet-tiny``, the RunicNet size for CPU training (a step costs ≈ 3 × MobileNetV3-small's
#: on 2 cores; the full ``runicnet`` ≈ 4.5 × more).
VARIANT_ARCH = {"scratch-runicnet": "runicnet-tiny"}


def variant_classes(variant: str) -> list[str]:
    """The class set a variant is trained with."""
    return CLASSES if variant in ENDOCERVICAL_VARIANTS else [c for c in CLASSES if c != "endocervical"]


logger = logging.getLogger("train_classifier_real")


def _write_json(path: Path, data: Any) -> None:
    from wsi_screen.metrics import jsonable

    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(jsonable(data), indent=2) + "\n")
    tmp.replace(path)


def part_cells(args: argparse.Namespace, part: str) -> list[Any]:
    from wsi_screen.train.cell_slides import load_labelled_cells
    from wsi_screen.train.data import load_class_map
    from wsi_screen.train.fields import read_split_manifest, split_names

    m = read_split_manifest(args.manifest)
    cells = load_labelled_cells(
        args.data,
        "herlev",
        split_names(m, "herlev", part),
        load_class_map("herlev-bethesda-endocervical"),
    )
    cells += load_labelled_cells(
        args.data, "lbc_cells", split_names(m, "lbc_cells", part), load_class_map("lbc-cells-bethesda")
    )
    return cells


def part_backgrounds(args: argparse.Namespace, part: str) -> list[tuple[Any, float]]:
    from wsi_screen.train.fields import SOURCE_MPP, load_source_images, read_split_manifest, split_names

    m = read_split_manifest(args.manifest)
    images = load_source_images(args.data, "lbc_nuclei", split_names(m, "lbc_nuclei", part))
    return [(im, SOURCE_MPP["lbc_nuclei"]) for im in images if not im.name.startswith("rot")]


def stage_slides(args: argparse.Namespace, work: Path) -> None:
    from wsi_screen.train.cell_slides import compose_cell_slide, write_image_slide

    out = work / "slides"
    out.mkdir(parents=True, exist_ok=True)
    capacity = (args.slide_px // max(16, round(args.pitch_um / 0.25))) ** 2  # the lattice slots of a slide
    index: dict[str, list[str]] = {}
    for pi, part in enumerate(PARTS):
        done = sorted(out.glob(f"{part}-*.tiff"))
        if done and "slides" not in args.force:
            index[part] = [p.name for p in done]
            continue
        cells = part_cells(args, part)
        bgs = part_backgrounds(args, part)
        copies = args.copies if part == "train" else 1
        glass_rng = np.random.default_rng(args.seed + 7 + pi)
        rng = np.random.default_rng(args.seed + 1000 * pi)
        names = []
        k = 0
        for c in range(copies):
            order = rng.permutation(len(cells))
            for start in range(0, len(order), capacity):
                chunk = [cells[int(i)] for i in order[start : start + capacity]]
                on_glass = part == "train" and glass_rng.uniform() < args.glass_share
                cs = compose_cell_slide(
                    chunk,
                    backgrounds=[] if on_glass else bgs,
                    size_px=args.slide_px,
                    pitch_um=args.pitch_um,
                    seed=args.seed + 100_000 * pi + k,
                )
                path = out / f"{part}-{k:03d}.tiff"
                write_image_slide(path, cs.rgb, 0.25, quality=int(rng.integers(80, 95)))
                cs.save_truth(path.with_suffix(".truth.npz"))
                names.append(path.name)
                logger.info(
                    "%s: %d cells (copy %d), %d background nuclei",
                    path.name,
                    len(cs.klass),
                    c,
                    cs.info["background_nuclei"],
                )
                k += 1
        index[part] = names
    _write_json(work / "slides.json", index)


def _localizer(args: argparse.Namespace) -> Any:
    from wsi_screen.config import load_settings
    from wsi_screen.localize import Localizer
    from wsi_screen.models.bundle import load_bundle

    s = load_settings()
    name = args.localizer or s.localization.model
    import torch

    bundle = load_bundle(name, task="localization")
    return Localizer(bundle, settings=s.localization, device=torch.device("cpu")), s


def stage_crops(args: argparse.Namespace, work: Path) -> None:
    from wsi_screen.cells import MORPHOMETRICS
    from wsi_screen.stain import DEFAULT_TARGET
    from wsi_screen.train.cell_slides import CellSlide, label_detections
    from wsi_screen.train.data import CropSet, localizer_identity, pipeline_cells

    index = json.loads((work / "slides.json").read_text())
    loc, settings = _localizer(args)
    for part in PARTS:
        dest = work / f"crops-{part}.npz"
        if dest.exists() and "crops" not in args.force:
            continue
        sets = []
        morph: dict[str, list[np.ndarray]] = {name: [] for name in MORPHOMETRICS}
        stats: dict[str, int] = {"detections": 0, "unlabelled": 0, "kept": 0}
        for name in index[part]:
            path = work / "slides" / name
            t0 = time.perf_counter()
            cells, crops = pipeline_cells(path, localizer=loc, settings=settings, target=DEFAULT_TARGET)
            x, y = cells.x, cells.y
            truth = CellSlide.load_truth(path.with_suffix(".truth.npz"))
            klass, source, cell = label_detections(x, y, truth)
            rng = np.random.default_rng(zlib.crc32(name.encode()))
            keep: list[int] = []
            by_cell: dict[int, list[int]] = {}
            background: list[int] = []
            for i, (k, c) in enumerate(zip(klass, cell.tolist(), strict=True)):
                if not k:
                    continue
                (by_cell.setdefault(c, []) if c >= 0 else background).append(i)
            for idx in by_cell.values():
                keep += rng.permutation(idx)[: args.per_cell].tolist()
            keep += rng.permutation(background)[: args.background_per_slide].tolist()
            keep.sort()
            stats["detections"] += len(klass)
            stats["unlabelled"] += sum(1 for k in klass if not k)
            stats["kept"] += len(keep)
            groups = [(truth.names[cell[i]] if cell[i] >= 0 else f"lbc_nuclei:{name}") for i in keep]
            for key in MORPHOMETRICS:
                morph[key].append(np.asarray(cells.morphometrics[key], np.float32)[keep])
            sets.append(
                CropSet(
                    crops=crops[keep],
                    labels=np.array([CLASSES.index(klass[i]) for i in keep], np.int64),
                    groups=np.array(groups, dtype=str),
                    class_names=list(CLASSES),
                    mpp=0.25,
                    sources=np.array([source[i] for i in keep], dtype=str),
                )
            )
            logger.info(
                "%s/%s: %d detections, %d kept (%.0f s)",
                part,
                name,
                len(klass),
                len(keep),
                time.perf_counter() - t0,
            )
        data = CropSet.concat(
            sets,
            info={
                "source": "real-cell slides (pipelines/train_classifier_real.py)",
                "part": part,
                "localization": localizer_identity(loc),
                "stain_target": DEFAULT_TARGET.to_dict(),
                "labels": (
                    "label_detections: pasted nucleus, background nucleus (NILM), pasted cell footprint"
                ),
                "counts": stats,
            },
        )
        # The localizer's morphometrics of every kept crop, row by row (the score head's inputs).
        np.savez_compressed(
            work / f"morph-{part}.npz",
            **{k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in morph.items()},
        )
        data.save(dest)
        logger.info("%s: %d crops %s", part, len(data), data.class_counts())


def stage_synthetic(args: argparse.Namespace, work: Path) -> None:
    from wsi_screen.train.data import synthetic_crops

    dest = work / "crops-synthetic.npz"
    if dest.exists() and "synthetic" not in args.force:
        return
    loc, settings = _localizer(args)
    data = synthetic_crops(
        args.synthetic, cache_dir=work / "synthetic", localizer=loc, seed=args.seed + 77, settings=settings
    )
    data.save(dest)
    logger.info("synthetic: %d crops %s", len(data), data.class_counts())


def _load(work: Path, name: str) -> Any:
    from wsi_screen.train.data import CropSet

    return CropSet.load(work / f"crops-{name}.npz", mmap=False).with_classes(CLASSES)


def training_data(args: argparse.Namespace, work: Path) -> tuple[Any, dict[str, np.ndarray], np.ndarray]:
    """Train + synthetic + val crops, the explicit split, and sampling weights."""
    from wsi_screen.train.data import CropSet

    train, val = _load(work, "train"), _load(work, "val")
    parts = [train]
    syn_n = 0
    if args.synthetic and (work / "crops-synthetic.npz").exists():
        syn = _load(work, "synthetic")
        parts.append(syn)
        syn_n = len(syn)
    data = CropSet.concat([*parts, val])
    n_tr = len(train) + syn_n
    split = {"train": np.arange(n_tr), "val": np.arange(n_tr, len(data))}
    w = np.ones(n_tr, np.float64)
    w[len(train) :] = args.synthetic_weight
    return data, split, w


def _first_stage_init(work: Path, variant: str) -> str | None:
    """What a first-stage variant starts from: a bundle name, ``WORK/bundles/ssl``, or nothing."""
    start = FIRST_STAGE_INIT.get(variant)
    if start == "ssl":
        if not (work / "bundles" / "ssl" / "bundle.json").is_file():
            raise SystemExit(f"{variant} starts from the self-supervised backbone: run --stages ssl first")
        return str(work / "bundles" / "ssl")
    return start


def stage_ssl(args: argparse.Namespace, work: Path) -> None:
    """SimCLR pre-training on the real training crops, labels ignored (never val or test crops)."""
    from wsi_screen.train.ssl import SSLConfig, pretrain_ssl

    out = work / "bundles" / "ssl"
    if (out / "bundle.json").is_file() and "ssl" not in args.force:
        return
    train = _load(work, "train")  # real cells of the training part only
    cfg = SSLConfig(
        arch=args.arch,
        epochs=args.ssl_epochs,
        batch_size=64,
        seed=args.seed,
        threads=args.threads,
        max_minutes=args.ssl_minutes,
        half=True,
    )
    t0 = time.perf_counter()
    bundle = pretrain_ssl(
        train,
        out,
        config=cfg,
        name="ssl-backbone",
        work_dir=work / "bundles" / "ssl.train",
        resume="ssl" not in args.force,
        description=f"{args.arch} backbone, SimCLR on the {len(train)} real training crops (labels unused)",
    )
    hist = bundle.config.training["history"]
    logger.info(
        "ssl: %d epochs in %.0f s, final NT-Xent %.3f, partner found %.3f",
        len(hist),
        time.perf_counter() - t0,
        hist[-1]["loss"],
        hist[-1]["pair_top1"],
    )


def stage_train(args: argparse.Namespace, work: Path) -> None:
    from wsi_screen.train.augment import AugmentConfig
    from wsi_screen.train.classifier import TrainConfig, train_classifier

    data, split, weights = training_data(args, work)
    negative = np.isin(data.labels[split["train"]], [CLASSES.index(c) for c in NEGATIVE])
    train_groups = data.groups[split["train"]].tolist()
    columnar = np.array([g.split("/", 1)[0] in HERLEV_NORMAL_KINDS["columnar"] for g in train_groups])
    for variant in args.variants:
        out = work / "bundles" / variant
        if (out / "bundle.json").is_file() and "train" not in args.force:
            continue
        second = variant in FINETUNE_FROM
        classes = variant_classes(variant)
        start = FINETUNE_FROM.get(variant, "")
        cfg = TrainConfig(
            arch=VARIANT_ARCH.get(variant, args.arch),
            epochs=args.epochs,
            batch_size=64,
            lr=5e-4 if variant in ("finetune-columnar", "polish") else 1e-3 if second else 2e-3,
            warmup_epochs=0.5 if second else 1.0,
            balanced_sampler=variant not in NATURAL_DRAW_VARIANTS,
            balance_sources=variant in SOURCE_BALANCED_VARIANTS,
            label_smoothing=0.05,
            binary_loss=args.binary_loss if variant in SCREENING_LOSS_VARIANTS else 0.0,
            monitor="binary_auroc" if variant in SCREENING_LOSS_VARIANTS else "macro_f1",
            augment=AugmentConfig.strong() if variant in STRONG_AUGMENT_VARIANTS else AugmentConfig(),
            init=(
                (str(work / "bundles" / start) if (work / "bundles" / start).is_dir() else start)
                if second
                else _first_stage_init(work, variant)
            ),
            patience=args.epochs,
            threads=args.threads,
            seed=args.seed,
            samples_per_epoch=args.samples_per_epoch,
            half=True,  # float16 weights: shipped bundles stay under 6 MB
        )
        t0 = time.perf_counter()
        res = train_classifier(
            data if classes == CLASSES else data.merge_class("endocervical", "NILM"),
            out,
            config=cfg,
            name=args.name,
            class_names=classes,
            abnormal_classes=ABNORMAL,
            work_dir=work / "bundles" / f"{variant}.train",
            resume=True,
            split=split,
            sample_weights=np.concatenate(
                [
                    # second stage: NILM and organism drawn negative_weight × as often as under the class
                    # balance, so that negatives are about half the draws, as the score's prior should be.
                    weights
                    * np.where(negative & second, args.negative_weight, 1.0)
                    * np.where(columnar & (variant == "finetune-columnar"), args.columnar_weight, 1.0),
                    np.ones(len(split["val"])),
                ]
            ),
            description=(
                f"Cell classifier ({len(classes)} classes: {', '.join(classes)}) trained on crops that the "
                "pipeline cuts from slides of real Pap-stained cells (Herlev, lbc-cells, LBC fields) plus "
                "synthetic cells."
            ),
            intended_use=(
                "Ranking cells of Papanicolaou-stained cervical cytology slides for review by a "
                "cytotechnologist; triage groups: HSIL+ (HSIL, SCC), priority (ASC-H, AGC), "
                "review (ASC-US, LSIL)."
            ),
            limitations=(
                "Research use. Trained on public benchmark crops (Herlev, ComparisonDetector LBC crops; no "
                "group ids for lbc-cells, so its split is by crop) composed into slides, not on a lab's own "
                "whole-slide scans; validate on your own slides before relying on it. See docs/models.md."
            ),
        )
        logger.info("trained %s in %.0f s: %s", variant, time.perf_counter() - t0, res)


def _cluster_bootstrap(
    hit: np.ndarray, groups: np.ndarray, rng: np.random.Generator, reps: int = 500
) -> list[float]:
    """95 % percentile interval of a rate, resampling whole groups (a cell's several detections, a
    background field's nuclei) with replacement: crops of one cell are not independent."""
    uniq, inv = np.unique(groups, return_inverse=True)
    k = np.bincount(inv, weights=hit.astype(np.float64), minlength=len(uniq))
    n = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    vals = []
    for _ in range(reps):
        idx = rng.integers(0, len(uniq), len(uniq))
        vals.append(k[idx].sum() / max(n[idx].sum(), 1.0))
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def crop_probs(bundle: Path, data: Any, classes: list[str] = CLASSES, *, tta: int = 1) -> np.ndarray:
    """Class probabilities of ``data`` in the columns of ``classes`` (0 for a class the bundle
    lacks: a 9-class bundle never predicts ``endocervical``); ``tta`` views per crop, as
    ``classification.tta`` in screening."""
    import torch

    from wsi_screen.classify import CellClassifier
    from wsi_screen.models.bundle import load_bundle

    clf = CellClassifier([load_bundle(bundle, task="classification")], device=torch.device("cpu"), tta=tta)
    out = []
    for start in range(0, len(data), 512):
        chunk = torch.from_numpy(np.ascontiguousarray(data.crops[start : start + 512]))
        out.append(clf.predict(chunk).cpu().numpy())
    probs = np.concatenate(out) if out else np.zeros((0, len(clf.class_names)), np.float32)
    aligned = np.zeros((len(probs), len(classes)), np.float32)
    cols = [k for k, c in enumerate(clf.class_names) if c in classes]
    aligned[:, [classes.index(clf.class_names[k]) for k in cols]] = probs[:, cols]
    return aligned


def threshold_for(score: np.ndarray, positive: np.ndarray, sensitivity: float) -> float:
    pos = np.sort(score[positive])[::-1]
    k = max(1, math.ceil(sensitivity * len(pos)))
    return float(pos[k - 1])


def screening_figures(
    probs: np.ndarray,
    labels: np.ndarray,
    sources: np.ndarray,
    groups: np.ndarray,
    threshold: float,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """Binary and per-class figures at ``threshold`` on the abnormality score, with 95 % intervals
    from a bootstrap over groups (cells; background fields)."""
    rng = np.random.default_rng(seed)
    ab = [CLASSES.index(c) for c in ABNORMAL]
    score = probs[:, ab].sum(axis=1)
    pos = np.isin(labels, ab)
    neg_classes = [CLASSES.index(c) for c in NEGATIVE]
    neg = np.isin(labels, neg_classes)
    flag = score >= threshold
    pred = probs.argmax(axis=1)

    def rate(mask: np.ndarray, hit: np.ndarray) -> tuple[float | None, list[float], int]:
        n = int(mask.sum())
        if not n:
            return None, [math.nan, math.nan], 0
        sel = np.flatnonzero(mask)
        val = float(hit[sel].mean())
        return val, _cluster_bootstrap(hit[sel], groups[sel], rng), n

    out: dict[str, Any] = {"threshold": threshold}
    v, ci, n = rate(pos, flag)
    out["sensitivity"] = {"value": v, "ci95": ci, "n": n}
    v, ci, n = rate(neg, ~flag)
    out["specificity"] = {"value": v, "ci95": ci, "n": n}
    hp = np.isin(labels, [CLASSES.index(c) for c in HSIL_PLUS])
    v, ci, n = rate(hp, flag)
    out["hsil_plus_recall_flagged"] = {"value": v, "ci95": ci, "n": n}
    v, ci, n = rate(hp, np.isin(pred, [CLASSES.index(c) for c in HSIL_PLUS]))
    out["hsil_plus_called_hsil_plus"] = {"value": v, "ci95": ci, "n": n}
    # HSIL+ called NILM/organism/endocervical (the worst error).
    v, ci, n = rate(hp, np.isin(pred, neg_classes))
    out["hsil_plus_to_negative"] = {"value": v, "ci95": ci, "n": n}
    per_class = {}
    for ci_, c in enumerate(CLASSES):
        m = labels == ci_
        if not m.any():
            continue
        per_class[c] = {
            "n": int(m.sum()),
            "recall_class": float((pred[m] == ci_).mean()),
            "flagged": float(flag[m].mean()),
        }
    out["per_class"] = per_class
    by_source: dict[str, Any] = {}
    for src in sorted(set(sources.tolist())):
        m_src = sources == src
        m = m_src & np.isin(labels, [CLASSES.index(c) for c in ("NILM", "endocervical")])
        entry: dict[str, Any] = {}
        if m.any():
            s = score[m]
            v, ci, n = rate(m, ~flag)
            entry["nilm_specificity"] = {"value": v, "ci95": ci, "n": n}
            entry["nilm_score_p99"] = float(np.percentile(s, 99))
            entry["nilm_score_p999"] = float(np.percentile(s, 99.9))
            # Herlev's normal cells are squamous (superficial, intermediate) and columnar; the issue's
            # per-source bar is on NILM *squamous* cells (a Herlev cell's group is its <class>/ key).
            folder = np.array([g.split("/", 1)[0] if "/" in g else "" for g in groups.tolist()])
            for kind, folders in HERLEV_NORMAL_KINDS.items():
                m_kind = m & np.isin(folder, folders)
                if m_kind.any():
                    v, ci, n = rate(m_kind, ~flag)
                    entry[f"nilm_{kind}_specificity"] = {"value": v, "ci95": ci, "n": n}
                    entry[f"nilm_{kind}_score_p99"] = float(np.percentile(score[m_kind], 99))
        m_pos = m_src & pos
        if m_pos.any():
            v, ci, n = rate(m_pos, flag)
            entry["abnormal_sensitivity"] = {"value": v, "ci95": ci, "n": n}
        org = m_src & (labels == CLASSES.index("organism"))
        if org.any():
            v, ci, n = rate(org, ~flag)
            entry["organism_specificity"] = {"value": v, "ci95": ci, "n": n}
        by_source[src] = entry
    out["by_source"] = by_source
    try:
        from sklearn.metrics import roc_auc_score

        m = pos | neg
        out["auroc_binary"] = float(roc_auc_score(pos[m], score[m]))
    except ValueError:
        out["auroc_binary"] = None
    return out


def stage_evaluate(args: argparse.Namespace, work: Path) -> None:
    val, test = _load(work, "val"), _load(work, "test")
    res: dict[str, Any] = {}
    probs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for variant in args.variants:
        bundle = work / "bundles" / variant
        if (bundle / "bundle.json").is_file():
            probs[variant] = (crop_probs(bundle, val), crop_probs(bundle, test))
    for spec in args.ensembles:  # "a+b": the members' probabilities averaged, as classification.models does
        members = spec.split("+")
        if all(m in probs for m in members):
            probs[spec] = (
                np.mean([probs[m][0] for m in members], axis=0),
                np.mean([probs[m][1] for m in members], axis=0),
            )
    ab = [CLASSES.index(c) for c in ABNORMAL]
    for variant, (pv, pt) in probs.items():
        t = threshold_for(pv[:, ab].sum(axis=1), np.isin(val.labels, ab), args.val_sensitivity)
        res[variant] = {
            "threshold_rule": (
                f"largest abnormality score with validation binary sensitivity ≥ {args.val_sensitivity}"
            ),
            "val": screening_figures(pv, val.labels, val.sources, val.groups, t),
            "test": screening_figures(pt, test.labels, test.sources, test.groups, t),
        }
        logger.info(
            "%s: threshold %.4f; test %s", variant, t, json.dumps(res[variant]["test"], default=str)[:600]
        )
    _write_json(work / "evaluate.json", res)


def _paired_auroc_difference(
    a: np.ndarray, b: np.ndarray, positive: np.ndarray, groups: np.ndarray, *, reps: int = 1000, seed: int = 0
) -> dict[str, Any]:
    """AUROC(b) − AUROC(a) of two scores of the same crops, with a 95 % interval from one bootstrap
    over groups (cells) for both: the pairing removes the cells' own variance from the difference."""
    from sklearn.metrics import roc_auc_score

    diffs = [
        roc_auc_score(positive[idx], b[idx]) - roc_auc_score(positive[idx], a[idx])
        for idx in _group_resamples(groups, positive, np.random.default_rng(seed), reps)
    ]
    value = float(roc_auc_score(positive, b) - roc_auc_score(positive, a))
    return {"value": value, "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]}


def _auroc_gains(
    ref: tuple[np.ndarray, np.ndarray], new: tuple[np.ndarray, np.ndarray], val: Any, test: Any
) -> dict[str, Any]:
    """``val_auroc_gain`` and ``test_auroc_gain``: the paired AUROC difference of two (val, test)
    abnormality scores on the binary crops (abnormal against NILM/organism/endocervical)."""
    ab = [CLASSES.index(c) for c in ABNORMAL]
    neg = [CLASSES.index(c) for c in NEGATIVE]
    out = {}
    for part, data, k in (("val", val, 0), ("test", test, 1)):
        m = np.isin(data.labels, ab + neg)
        out[f"{part}_auroc_gain"] = _paired_auroc_difference(
            ref[k][m], new[k][m], np.isin(data.labels[m], ab), data.groups[m].astype(str)
        )
    return out


def stage_tta(args: argparse.Namespace, work: Path) -> None:
    """Test-time augmentation (``classification.tta``) against none, for each of ``--variants``: both
    scored on the same crops, each at its own validation threshold, and the validation AUROC gain with
    a paired bootstrap interval (the decision is made on validation)."""
    val, test = _load(work, "val"), _load(work, "test")
    ab = [CLASSES.index(c) for c in ABNORMAL]
    res: dict[str, Any] = {
        "views": args.tta,
        "rule": f"largest score with val sensitivity ≥ {args.val_sensitivity}",
    }
    for variant in args.variants:
        bundle = work / "bundles" / variant
        if not (bundle / "bundle.json").is_file():
            raise SystemExit(f"no bundle {bundle}: train the variant first (--stages train)")
        entry: dict[str, Any] = {}
        scores = {}
        for views in (1, args.tta):
            t0 = time.perf_counter()
            pv, pt = crop_probs(bundle, val, tta=views), crop_probs(bundle, test, tta=views)
            seconds = time.perf_counter() - t0
            t = threshold_for(pv[:, ab].sum(axis=1), np.isin(val.labels, ab), args.val_sensitivity)
            entry[f"tta{views}"] = {
                "seconds": round(seconds, 1),
                "val": screening_figures(pv, val.labels, val.sources, val.groups, t),
                "test": screening_figures(pt, test.labels, test.sources, test.groups, t),
            }
            scores[views] = (pv[:, ab].sum(axis=1), pt[:, ab].sum(axis=1))
        entry.update(_auroc_gains(scores[1], scores[args.tta], val, test))
        res[variant] = entry
        logger.info(
            "%s: val AUROC gain of tta=%d %s; test %s",
            variant,
            args.tta,
            entry["val_auroc_gain"],
            entry["test_auroc_gain"],
        )
    _write_json(work / f"tta{args.tta}.json", res)


def stage_compare(args: argparse.Namespace, work: Path) -> None:
    """The binary AUROC of every other ``--variants`` bundle against the first, on the same val and
    test crops, with a paired bootstrap interval over cells (``WORK/compare.json``)."""
    if len(args.variants) < 2:
        raise SystemExit("compare needs two or more --variants: the first is the reference")
    val, test = _load(work, "val"), _load(work, "test")
    ab = [CLASSES.index(c) for c in ABNORMAL]
    scores: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for variant in args.variants:
        bundle = work / "bundles" / variant
        if not (bundle / "bundle.json").is_file():
            raise SystemExit(f"no bundle {bundle}: train the variant first (--stages train)")
        scores[variant] = (
            crop_probs(bundle, val)[:, ab].sum(axis=1),
            crop_probs(bundle, test)[:, ab].sum(axis=1),
        )
    ref = args.variants[0]
    res: dict[str, Any] = {"reference": ref}
    for variant in args.variants[1:]:
        entry = _auroc_gains(scores[ref], scores[variant], val, test)
        res[variant] = entry
        logger.info(
            "%s against %s: val AUROC %s; test %s",
            variant,
            ref,
            entry["val_auroc_gain"],
            entry["test_auroc_gain"],
        )
    _write_json(work / "compare.json", res)


#: The score head's candidate inputs (morphometric, transform): nucleus size, stain and shape, and
#: the cell around it where the localizer's ``cell`` channel measured one.
HEAD_FEATURES: dict[str, list[tuple[str, str]]] = {
    "nucleus": [
        ("nucleus_area_um2", "log"),
        ("nucleus_mean_od", "identity"),
        ("nucleus_circularity", "identity"),
        ("nucleus_eccentricity", "identity"),
    ],
    "nucleus+cell": [
        ("nucleus_area_um2", "log"),
        ("nucleus_mean_od", "identity"),
        ("nucleus_circularity", "identity"),
        ("nucleus_eccentricity", "identity"),
        ("nc_ratio", "log"),
        ("cell_area_um2", "log"),
    ],
    "area": [("nucleus_area_um2", "log"), ("nucleus_mean_od", "identity")],
}


def _group_folds(groups: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Fold index of every crop, whole groups (cells, background fields) in one fold."""
    uniq, inv = np.unique(groups, return_inverse=True)
    fold_of = np.random.default_rng(seed).permutation(len(uniq)) % k
    return np.asarray(fold_of[inv], np.int64)


def _morph(work: Path, part: str) -> dict[str, np.ndarray]:
    path = work / f"morph-{part}.npz"
    if not path.is_file():
        raise SystemExit(f"no {path}: rerun the crops stage (--stages crops --force crops)")
    with np.load(path) as z:
        return {k: np.asarray(z[k]) for k in z.files}


def stage_head(args: argparse.Namespace, work: Path) -> None:
    """The score head (:mod:`wsi_screen.score_head`): the base bundle's abnormality score refitted
    with the localizer's nucleus morphometrics, for each feature set of :data:`HEAD_FEATURES`.

    The CNN has seen the training crops, so its scores there are over-confident: the head is fitted on
    the **validation** crops. Its validation figures come from grouped ``--head-folds``-fold
    cross-fitting inside the validation part (each crop scored by a head that never saw its cell); the
    threshold (validation sensitivity ≥ ``--val-sensitivity``) is chosen on those cross-fitted scores;
    the head refitted on all of validation then scores the test crops once. ``WORK/head.json`` and
    ``WORK/heads/<feature set>.json`` (the refitted heads)."""
    from wsi_screen.score_head import fit_score_head

    base = Path(args.head_base) if Path(args.head_base).is_dir() else BUNDLES / args.head_base
    val, test = _load(work, "val"), _load(work, "test")
    mv, mt = _morph(work, "val"), _morph(work, "test")
    if len(next(iter(mv.values()))) != len(val) or len(next(iter(mt.values()))) != len(test):
        raise SystemExit("the morphometrics do not match the crops: rerun --stages crops --force crops")
    ab = [CLASSES.index(c) for c in ABNORMAL]
    neg = [CLASSES.index(c) for c in NEGATIVE]
    pv, pt = crop_probs(base, val), crop_probs(base, test)
    fit_rows = np.flatnonzero(np.isin(val.labels, ab + neg))  # artifacts are neither
    positive_v = np.isin(val.labels, ab)
    folds = _group_folds(val.groups.astype(str), args.head_folds, args.seed)
    res: dict[str, Any] = {
        "base": str(base.name),
        "fit": "validation crops (the CNN has seen the training crops)",
        "folds": args.head_folds,
        "l2": args.head_l2,
        "rule": f"largest score with cross-fitted val sensitivity ≥ {args.val_sensitivity}",
    }
    score_v = pv[:, ab].sum(axis=1)
    score_t = pt[:, ab].sum(axis=1)
    t = threshold_for(score_v, positive_v, args.val_sensitivity)
    res["cnn"] = {
        "val": screening_figures(pv, val.labels, val.sources, val.groups, t),
        "test": screening_figures(pt, test.labels, test.sources, test.groups, t),
    }
    heads_dir = work / "heads"
    heads_dir.mkdir(exist_ok=True)
    for name, spec in HEAD_FEATURES.items():
        feats, trans = [f for f, _ in spec], [tr for _, tr in spec]

        def fit(rows: np.ndarray, feats: list[str] = feats, trans: list[str] = trans) -> Any:
            return fit_score_head(
                score_v[rows],
                {f: mv[f][rows] for f in feats},
                positive_v[rows],
                features=feats,
                transforms=trans,
                l2=args.head_l2,
            )

        cross = pv.copy()
        for k in range(args.head_folds):
            train_rows = fit_rows[folds[fit_rows] != k]
            rows = np.flatnonzero(folds == k)
            head = fit(train_rows)
            cross[rows] = head.apply(pv[rows], ab, {f: mv[f][rows] for f in feats})
        head = fit(fit_rows)
        refit_t = head.apply(pt, ab, {f: mt[f] for f in feats})
        cv_score = cross[:, ab].sum(axis=1)
        th = threshold_for(cv_score, positive_v, args.val_sensitivity)
        entry = {
            "features": spec,
            "head": head.to_dict(),
            "val_crossfit": screening_figures(cross, val.labels, val.sources, val.groups, th),
            "test": screening_figures(refit_t, test.labels, test.sources, test.groups, th),
        }
        entry.update(_auroc_gains((score_v, score_t), (cv_score, refit_t[:, ab].sum(axis=1)), val, test))
        res[name] = entry
        _write_json(heads_dir / f"{name}.json", {"head": head.to_dict(), "threshold": th})
        logger.info(
            "head %s: val AUROC gain %s, test %s; test sens %.3f spec %.3f (cnn %.3f / %.3f)",
            name,
            entry["val_auroc_gain"],
            entry["test_auroc_gain"],
            entry["test"]["sensitivity"]["value"],
            entry["test"]["specificity"]["value"],
            res["cnn"]["test"]["sensitivity"]["value"],
            res["cnn"]["test"]["specificity"]["value"],
        )
    _write_json(work / "head.json", res)


def stage_ablation(args: argparse.Namespace, work: Path) -> None:
    """Blank boxes: the same slide from HSIL-sized and ASC-US-sized crops must be the same pixels."""
    from wsi_screen.train.cell_slides import compose_cell_slide

    cells = part_cells(args, "val")
    bgs = part_backgrounds(args, "val")
    by_class: dict[str, list[Any]] = {}
    for c in cells:
        by_class.setdefault(c.klass, []).append(c)
    a = sorted(by_class, key=lambda k: np.median([c.rgb.shape[0] * c.rgb.shape[1] for c in by_class[k]]))
    small, large = by_class[a[0]], by_class[a[-1]]
    n = min(len(small), len(large), 100)
    s1 = compose_cell_slide(small[:n], backgrounds=bgs, size_px=2048, pitch_um=40, seed=5, blank=True)
    s2 = compose_cell_slide(large[:n], backgrounds=bgs, size_px=2048, pitch_um=40, seed=5, blank=True)
    d = np.abs(s1.rgb.astype(np.int16) - s2.rgb.astype(np.int16))
    med = {k: float(np.median([c.rgb.shape[1] for c in by_class[k]])) for k in (a[0], a[-1])}
    out = {
        "classes": [a[0], a[-1]],
        "median_box_width_px": med,
        "cells": n,
        "max_abs_difference": int(d.max()),
        "pixels_differing": int((d > 0).sum()),
        "rule": "every crop reduced to its own glass (box without content); same seed, cells of two classes",
    }
    _write_json(work / "ablation.json", out)
    logger.info("ablation: %s", out)


def stage_ship(args: argparse.Namespace, work: Path) -> None:
    from wsi_screen.models.bundle import CONFIG_NAME

    src = work / "bundles" / args.ship
    dest = BUNDLES / args.name
    ev = json.loads((work / "evaluate.json").read_text())[args.ship]
    cfg = json.loads((src / CONFIG_NAME).read_text())
    # The export (flag) threshold run_slide uses by default: chosen on validation crops only.
    cfg["thresholds"]["flag_score"] = round(ev["val"]["threshold"], 6)
    cfg["metrics"]["real_cells"] = {
        "command": "python pipelines/train_classifier_real.py --stages evaluate",
        "threshold_rule": ev["threshold_rule"],
        "val": ev["val"],
        "test": ev["test"],
    }
    if (
        args.ship in FINETUNE_FROM
    ):  # record the earlier stages (the init is a path in WORK or a shipped bundle, not a name)
        start = FINETUNE_FROM[args.ship]
        start_dir = work / "bundles" / start if (work / "bundles" / start).is_dir() else BUNDLES / start
        first = json.loads((start_dir / CONFIG_NAME).read_text())
        if "stages" in first["training"]:  # a later stage: the earlier ones as that bundle records them
            earlier = list(first["training"]["stages"])
            if args.ship == "finetune-columnar":
                how = (
                    f"lr 5e-4, NILM and organism drawn {args.negative_weight} × and Herlev normal columnar "
                    f"cells a further {args.columnar_weight} × as often"
                )
            else:  # refit, refit-ec: the shipped bundle on the crops of today's default localizer
                how = (
                    f"lr 1e-3 on the crops the default localizer cuts, NILM, organism and endocervical "
                    f"drawn {args.negative_weight} × as often"
                    + (
                        f", screening loss × {args.binary_loss}, epoch chosen by validation binary AUROC"
                        if args.ship in SCREENING_LOSS_VARIANTS
                        else ""
                    )
                    + (
                        ", Herlev's normal columnar cells as a class of their own (endocervical)"
                        if args.ship in ENDOCERVICAL_VARIANTS
                        else ""
                    )
                )
            this = f"{args.ship}: from {first['name']} (the stages above), {how}"
            init = f"{first['name']} (training.stages)"
        else:
            earlier = [
                {
                    "stage": (
                        "init: synthetic pre-training (from cyto-synth-v1), class-balanced draws"
                        if start == "init"
                        else "scratch: random initialisation, class-balanced draws"
                    ),
                    "recipe": first["training"]["recipe"],
                    "best_epoch": first["training"].get("best_epoch"),
                    "train_seconds": first["training"].get("train_seconds"),
                }
            ]
            this = f"{args.ship}: from the first stage, NILM and organism drawn "
            this += f"{args.negative_weight} × as often"
            init = "stage 1 (training.stages[0])"
        cfg["training"]["stages"] = [*earlier, {"stage": this, "recipe": cfg["training"]["recipe"]}]
        cfg["training"]["recipe"] = {**cfg["training"]["recipe"], "init": init}
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns("*.train"))
    (dest / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
    logger.info("shipped %s → %s", src, dest)


def cross_source_side(data: Any, side: str) -> Any:
    """The crops of one side of the cross-source table (:data:`CROSS_SIDES`), labelled in
    :data:`CROSS_CLASSES` (endocervical and organism count as NILM; other classes are left out)."""
    from wsi_screen.train.data import CropSet

    names = np.asarray(data.class_names)[data.labels]
    src = np.asarray(data.sources).astype(str)
    if side == "herlev":
        keep = (src == "herlev") & np.isin(names, ["NILM", "endocervical", "LSIL", "HSIL"])
    elif side == "lbc":
        keep = ((src == "lbc_nuclei") & (names == "NILM")) | (
            (src == "lbc_cells") & np.isin(names, ["organism", "LSIL", "HSIL"])
        )
    else:
        raise ValueError(f"unknown cross-source side {side!r}; choose one of {sorted(CROSS_SIDES)}")
    idx = np.flatnonzero(keep)
    pooled = {"endocervical": "NILM", "organism": "NILM"}
    labels = np.array([CROSS_CLASSES.index(pooled.get(n, n)) for n in names[idx]], np.int64)
    sub = data.subset(idx)
    return CropSet(
        crops=sub.crops,
        labels=labels,
        groups=sub.groups,
        class_names=list(CROSS_CLASSES),
        mpp=sub.mpp,
        sources=sub.sources,
        info={**sub.info, "cross_source_side": side},
    )


#: How the shipped classes pool onto :data:`CROSS_CLASSES` for the reference row (its own score
#: stays the sum of the abnormal classes): the low-grade and high-grade squamous and glandular classes.
CROSS_POOL = {
    "NILM": ["NILM", "organism", "endocervical", "artifact"],
    "LSIL": ["ASC-US", "LSIL"],
    "HSIL": ["ASC-H", "HSIL", "SCC", "AGC"],
}


def cross_figures(
    probs: np.ndarray, labels: np.ndarray, groups: np.ndarray, threshold: float, *, seed: int = 0
) -> dict[str, Any]:
    """Figures of 3-class probabilities (columns :data:`CROSS_CLASSES`) at a binary ``threshold`` on
    P(LSIL) + P(HSIL): accuracy, balanced accuracy, binary AUROC, sensitivity and specificity, and
    class recall of LSIL and HSIL, with 95 % intervals from a bootstrap over groups (cells)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    pred = probs.argmax(axis=1)
    score = probs[:, 1:].sum(axis=1)
    pos = labels > 0
    flag = score >= threshold

    def rate(mask: np.ndarray, hit: np.ndarray) -> dict[str, Any]:
        sel = np.flatnonzero(mask)
        if not len(sel):
            return {"value": None, "ci95": [math.nan, math.nan], "n": 0}
        return {
            "value": float(hit[sel].mean()),
            "ci95": _cluster_bootstrap(hit[sel], groups[sel], rng),
            "n": len(sel),
        }

    correct = pred == labels
    per_class = [float(correct[labels == k].mean()) for k in range(len(CROSS_CLASSES)) if (labels == k).any()]
    return {
        "n": {c: int((labels == k).sum()) for k, c in enumerate(CROSS_CLASSES)},
        "accuracy": rate(np.ones(len(labels), bool), correct),
        "balanced_accuracy": float(np.mean(per_class)),
        "auroc_binary": float(roc_auc_score(pos, score)) if 0 < pos.sum() < len(pos) else None,
        "auroc_binary_ci95": _auroc_bootstrap(score, pos, groups, rng),
        "threshold": threshold,
        "sensitivity": rate(pos, flag),
        "specificity": rate(~pos, ~flag),
        "lsil_recall": rate(labels == 1, pred == 1),
        "hsil_recall": rate(labels == 2, pred == 2),
    }


def _group_resamples(
    groups: np.ndarray, positive: np.ndarray, rng: np.random.Generator, reps: int
) -> Iterator[np.ndarray]:
    """``reps`` bootstrap resamples of whole groups (cells), as crop indices; resamples that hold only
    one class (no AUROC) are skipped."""
    uniq, inv = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(inv == g) for g in range(len(uniq))]
    for _ in range(reps):
        idx = np.concatenate([members[g] for g in rng.integers(0, len(uniq), len(uniq))])
        if 0 < positive[idx].sum() < len(idx):
            yield idx


def _auroc_bootstrap(
    score: np.ndarray, positive: np.ndarray, groups: np.ndarray, rng: np.random.Generator, reps: int = 500
) -> list[float]:
    """95 % percentile interval of the binary AUROC, resampling whole groups (cells) with replacement."""
    from sklearn.metrics import roc_auc_score

    vals = [roc_auc_score(positive[idx], score[idx]) for idx in _group_resamples(groups, positive, rng, reps)]
    if not vals:
        return [math.nan, math.nan]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def _pool_probs(probs: np.ndarray) -> np.ndarray:
    """Probabilities in the columns of :data:`CLASSES` pooled onto :data:`CROSS_CLASSES`."""
    return np.stack(
        [probs[:, [CLASSES.index(c) for c in CROSS_POOL[k]]].sum(axis=1) for k in CROSS_CLASSES], axis=1
    )


def stage_cross_source(args: argparse.Namespace, work: Path) -> None:
    from wsi_screen.train.augment import AugmentConfig
    from wsi_screen.train.classifier import TrainConfig, train_classifier
    from wsi_screen.train.data import CropSet

    parts = {part: _load(work, part) for part in PARTS}
    sides = {s: {part: cross_source_side(parts[part], s) for part in PARTS} for s in CROSS_SIDES}
    models: dict[str, Path] = {}
    strong = args.cross_augment == "strong"
    suffix = "-strong" if strong else ""
    for side in CROSS_SIDES:
        out = work / "bundles" / f"cross-{side}{suffix}"
        models[side] = out
        if (out / "bundle.json").is_file() and "cross-source" not in args.force:
            continue
        train, val = sides[side]["train"], sides[side]["val"]
        data = CropSet.concat([train, val])
        cfg = TrainConfig(
            arch=args.arch,
            epochs=args.epochs,
            batch_size=64,
            lr=2e-3,
            warmup_epochs=1.0,
            balanced_sampler=True,
            label_smoothing=0.05,
            augment=AugmentConfig.strong() if strong else AugmentConfig(),
            init="cyto-synth-v1",
            patience=args.epochs,
            threads=args.threads,
            seed=args.seed,
            samples_per_epoch=args.samples_per_epoch,
            half=True,
        )
        t0 = time.perf_counter()
        res = train_classifier(
            data.with_classes(CROSS_CLASSES),
            out,
            config=cfg,
            name=f"cross-{side}",
            class_names=CROSS_CLASSES,
            abnormal_classes=["LSIL", "HSIL"],
            work_dir=work / "bundles" / f"cross-{side}{suffix}.train",
            resume=True,
            split={"train": np.arange(len(train)), "val": np.arange(len(train), len(data))},
            description=f"Cross-source table only (issue 14): trained on one source. {CROSS_SIDES[side]}.",
            intended_use="Measuring how a model trained on one source does on another; not for screening.",
            limitations="Three classes, one source: research measurement only.",
        )
        logger.info("trained cross-%s in %.0f s: %s", side, time.perf_counter() - t0, res)

    shipped = BUNDLES / "cyto-real-v1"
    res: dict[str, Any] = {
        "sides": CROSS_SIDES,
        "classes": CROSS_CLASSES,
        "reference_pooling": CROSS_POOL,
        "augment": (AugmentConfig.strong() if strong else AugmentConfig()).to_dict(),
        "threshold_rule": (
            f"largest P(LSIL)+P(HSIL) with binary sensitivity ≥ {args.val_sensitivity} on the val part of "
            "the side the model was trained on (cyto-real-v1: of both sides)"
        ),
        "rows": [],
    }
    trained_on = {**{side: [side] for side in CROSS_SIDES}, "cyto-real-v1": list(CROSS_SIDES)}
    for name, on in trained_on.items():

        def probs_of(d: Any, name: str = name) -> np.ndarray:
            if name == "cyto-real-v1":
                return _pool_probs(crop_probs(shipped, d))
            return crop_probs(models[name], d, CROSS_CLASSES)

        probs = {s: {p: probs_of(sides[s][p]) for p in PARTS} for s in CROSS_SIDES}
        val_score = np.concatenate([probs[s]["val"][:, 1:].sum(axis=1) for s in on])
        val_pos = np.concatenate([sides[s]["val"].labels > 0 for s in on])
        t = threshold_for(val_score, val_pos, args.val_sensitivity)
        for test_side in CROSS_SIDES:
            test_sets = {"test": ["test"]}
            if test_side not in on:  # a source the model never saw: every part of it is held out
                test_sets["all"] = list(PARTS)
            for label, ps in test_sets.items():
                p_ = np.concatenate([probs[test_side][p] for p in ps])
                lab = np.concatenate([sides[test_side][p].labels for p in ps])
                grp = np.concatenate([sides[test_side][p].groups.astype(str) for p in ps])
                row = {"model": name, "trained_on": on, "tested_on": test_side, "parts": label}
                row.update(cross_figures(p_, lab, grp, t))
                res["rows"].append(row)
                logger.info(
                    "%s → %s (%s): accuracy %.3f, AUROC %s",
                    name,
                    test_side,
                    label,
                    row["accuracy"]["value"],
                    row["auroc_binary"],
                )
    _write_json(work / f"cross-source{suffix}.json", res)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--stages", nargs="+", default=list(DEFAULT_STAGES), choices=STAGES)
    p.add_argument("--force", nargs="*", default=[], choices=STAGES)
    p.add_argument("--copies", type=int, default=3, help="times each training cell is pasted")
    p.add_argument("--slide-px", type=int, default=4096)
    p.add_argument("--pitch-um", type=float, default=80.0)
    p.add_argument("--per-cell", type=int, default=3, help="detections kept per pasted cell")
    p.add_argument(
        "--glass-share",
        type=float,
        default=0.0,
        help="slides: the share of training slides composed on glass alone, without LBC fields (other "
        "slide compositions, so other slide-level Reinhard statistics)",
    )
    p.add_argument("--background-per-slide", type=int, default=120)
    p.add_argument("--synthetic", type=int, default=12, help="synthetic slides (artifact + synthetic cells)")
    p.add_argument("--synthetic-weight", type=float, default=0.3)
    p.add_argument("--localizer", default=None, help="localization bundle (default: the shipped default)")
    p.add_argument("--variants", nargs="+", default=["init", "finetune"], choices=list(VARIANTS))
    p.add_argument(
        "--ensembles",
        nargs="*",
        default=[],
        help="evaluate: averaged variants, e.g. finetune+scratch-finetune",
    )
    p.add_argument(
        "--negative-weight", type=float, default=3.0, help="second stage: NILM/organism draw weight"
    )
    p.add_argument(
        "--columnar-weight", type=float, default=4.0, help="finetune-columnar: Herlev normal columnar draws"
    )
    p.add_argument("--tta", type=int, choices=[2, 4, 8], default=8, help="tta: views per crop against none")
    p.add_argument(
        "--cross-augment",
        choices=["standard", "strong"],
        default="standard",
        help="cross-source: the augmentation of the one-source models (strong: AugmentConfig.strong())",
    )
    p.add_argument(
        "--binary-loss", type=float, default=1.0, help="refit-ec-bin: weight of the screening loss"
    )
    p.add_argument("--ssl-epochs", type=int, default=12, help="ssl: SimCLR epochs over the train crops")
    p.add_argument("--ssl-minutes", type=float, default=None, help="ssl: stop after an epoch past this")
    p.add_argument(
        "--head-base",
        default="cyto-real-v1",
        help="head: the bundle (name or folder) whose score is refitted",
    )
    p.add_argument("--head-folds", type=int, default=5, help="head: grouped cross-fitting folds on val")
    p.add_argument("--head-l2", type=float, default=1.0, help="head: L2 penalty of the logistic regression")
    p.add_argument("--arch", default="mobilenetv3_small_100")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--samples-per-epoch", type=int, default=None)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--val-sensitivity", type=float, default=0.9)
    p.add_argument("--ship", default="finetune")
    p.add_argument("--name", default="cyto-real-v1")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("wsi_screen.synth").setLevel(logging.WARNING)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        if stage in args.stages:
            logger.info("stage %s", stage)
            globals()[f"stage_{stage.replace('-', '_')}"](args, args.work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
