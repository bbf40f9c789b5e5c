#!/usr/bin/env python
"""Grouped 5-fold cross-validation on Herlev, a morphometrics experiment, and the real-cell bundle.

One reproducible command (≈ 80 min on 2 shared CPU cores, torch on one thread: 20 CV trainings of
≈ 3.2 min; every stage is cached in ``--work``, so a rerun only does what is missing)::

    flock /tmp/wsi-cpu.lock .venv/bin/python pipelines/train_herlev.py \\
        --data ../shared/data/herlev --work /tmp/herlev-cv

Stages (``--stages``, default all, in this order):

``prepare``
    The Herlev crops are read with :func:`wsi_screen.train.data.load_crop_folder` (``--mpp 0.201``,
    the ``herlev-bethesda`` class map: normal → NILM, light → LSIL, moderate/severe/CIS → HSIL),
    rescaled to 0.25 µm/px, centred on a 224 px glass canvas and Reinhard-normalized per manifest
    group — exactly as ``wsi-screen train classifier --data`` does. The fold assignment is
    :func:`wsi_screen.metrics.grouped_kfold` over the manifest ``group`` column (class-stratified,
    seed ``--seed``): no group is in two folds. It is saved as ``WORK/folds.json`` (every file → fold).
``synthetic``
    ``--synthetic N`` synthetic slides are cut through the inference path (``collect_crops``); their
    ``ASC-US`` and ``artifact`` crops are kept (the classes Herlev lacks) for the ``mixed`` variants.
``morph``
    Each Herlev crop is rescaled to 0.25 µm/px on a 640 px (160 µm) glass canvas, normalized like the
    classifier crops, and run through the shipped localization bundle ``nuclei-unet-v1``
    (:class:`wsi_screen.localize.Localizer`; candidates from
    :func:`wsi_screen.candidates.extract_candidates`).
    The candidate nearest the crop centre gives nuclear area (µm²), mean optical density, circularity
    and N:C ratio (from the U-Net ``cell`` channel). ``WORK/morphometrics.csv``.
``cv``
    For every variant in ``--variants`` and every fold: train a bundle on the other four folds
    (:func:`wsi_screen.train.classifier.train_classifier`, no inner split: a fixed number of epochs,
    the last epoch kept — the recipe of the shipped bundle) and score the held-out fold with
    :func:`wsi_screen.train.classifier.evaluate_bundles` (``CellClassifier``, as in screening; classes
    absent from Herlev dropped and rows renormalized). Variants: ``scratch`` (random init, 3 classes),
    ``init`` (initialised from ``cyto-synth-v1``), ``mixed`` (5 classes: Herlev + synthetic ASC-US and
    artifact), ``mixed-init`` (both).
``stack``
    Under the same folds: the CNN alone, morphometrics alone (standardized, class-balanced multinomial
    logistic regression) and CNN probabilities + morphometrics (a stacked logistic regression). For
    test fold k the regressions are fitted on the other four folds only (their out-of-fold CNN
    probabilities and morphometrics); no model ever sees the labels of the cells it scores.
``compare``
    The default-bundle question: ``cyto-synth-v1`` scored on every Herlev cell (it never saw them),
    and both ``cyto-synth-v1`` and the shipped bundle scored on crops of ``--heldout-synthetic`` fresh
    synthetic slides (seed ``--heldout-seed``, never trained on), cut by the inference path.
    ``WORK/compare.json``.
``final``
    The bundle shipped in ``wsi_screen/models/bundles/cyto-herlev-v1`` (``--final-variant``) trained on
    every Herlev cell (plus the synthetic crops for a ``mixed`` variant), with the cross-validated
    figures of that variant written into its ``bundle.json`` (``metrics.cross_validation``) and the
    review threshold at 95 % sensitivity taken from the out-of-fold probabilities.

Every figure is computed by ``wsi_screen.metrics.classification_metrics`` (through ``evaluate_bundles``
for the CNNs); ``WORK/cv_results.json`` holds the per-fold metrics and mean ± sd of every variant and
of the morphometrics comparison.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wsi_screen.metrics import classification_metrics, grouped_kfold, jsonable  # noqa: E402
from wsi_screen.train.augment import AugmentConfig  # noqa: E402
from wsi_screen.train.classifier import TrainConfig, evaluate_bundles, train_classifier  # noqa: E402
from wsi_screen.train.data import CropSet, collect_crops, load_crop_folder  # noqa: E402

logger = logging.getLogger("train_herlev")

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "herlev"
DEFAULT_OUT = ROOT / "wsi_screen" / "models" / "bundles" / "cyto-herlev-v1"
HERLEV_MPP = 0.201
ALL5 = ["NILM", "ASC-US", "LSIL", "HSIL", "artifact"]
HERLEV3 = ["NILM", "LSIL", "HSIL"]
MORPH = ["nucleus_area_um2", "nucleus_mean_od", "nucleus_circularity", "nc_ratio"]
#: A candidate this close to the crop centre (µm) counts as the cell's nucleus.
DETECTED_UM = 10.0
VARIANTS = ("scratch", "init", "mixed", "mixed-init")

#: Strong augmentation: real slides come from other scanners, stains and focus planes.
STRONG_AUGMENT = AugmentConfig(
    flips=True,
    scale=0.12,
    shift_um=2.0,
    hed=0.08,
    brightness=0.12,
    contrast=0.15,
    saturation=0.15,
    blur_p=0.4,
    blur_um=0.6,
    noise=4.0,
)

DESCRIPTION = (
    "Real-cell classifier (MobileNetV3-small, 224 px crops at 0.25 µm/px) trained on the 495 Herlev "
    "Papanicolaou cells (NILM, LSIL, HSIL via the herlev-bethesda map){extra}; {init}."
)
INTENDED_USE = (
    "Research and method development: a classifier that has seen real Pap-stained cells, to compare "
    "with the synthetic-only demonstration bundle and as a starting point for fine-tuning on a lab's "
    "own annotated slides (wsi-screen train classifier --init cyto-herlev-v1)."
)
LIMITATIONS = (
    "Not a medical device; must not be used to screen or diagnose patient slides. Trained on 495 tight "
    "single-cell crops from one data set (Herlev, one lab, one scanner, conventional smears), with no "
    "pretrained weights; cells cut from whole slides, other stains and other scanners are out of "
    "distribution (published single-dataset Herlev models drop from 0.95 to 0.73 accuracy on another "
    "data set). {extra_lim}"
)


# -- helpers -----------------------------------------------------------------------------------------


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(data), indent=2, allow_nan=False) + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def headline(m: Mapping[str, Any]) -> dict[str, float | None]:
    """The figures issue 8 asks for, read from one ``classification_metrics`` dict."""
    out: dict[str, float | None] = {
        "accuracy": m["accuracy"],
        "macro_f1": m["macro_f1"],
        "weighted_f1": m["weighted_f1"],
        "macro_auroc": m["macro_auroc"],
        "hsil_recall": m["hsil"]["recall"],
        "hsil_to_nilm_rate": m["hsil"]["under_call_rate"],
        "binary_sensitivity": m["needs_review"]["sensitivity"],
        "binary_specificity": m["needs_review"]["specificity"],
        "binary_accuracy": m["needs_review"]["accuracy"],
        "binary_auroc": m["needs_review"]["auroc"],
    }
    for c, row in m["per_class"].items():
        out[f"recall_{c}"] = row["recall"]
    return out


def summarize(per_fold: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, float | None]]:
    """Mean and sample sd (ddof=1) over folds of every headline figure (undefined values skipped)."""
    keys = list(dict.fromkeys(k for f in per_fold for k in f))
    out: dict[str, dict[str, float | None]] = {}
    for k in keys:
        v = np.array([f[k] for f in per_fold if f.get(k) is not None], np.float64)
        out[k] = {
            "mean": float(v.mean()) if v.size else None,
            "sd": float(v.std(ddof=1)) if v.size > 1 else None,
            "n_folds": int(v.size),
        }
    return out


def metrics_of(probs: np.ndarray, y: np.ndarray, names: Sequence[str]) -> dict[str, Any]:
    """``classification_metrics`` of a prediction table over ``names`` (the Herlev classes)."""
    return classification_metrics(
        y,
        probs,
        list(names),
        [c for c in names if c not in ("NILM", "artifact")],
        normal_class="NILM",
        hsil_class="HSIL",
    )


# -- stages ------------------------------------------------------------------------------------------


def stage_prepare(args: argparse.Namespace) -> tuple[CropSet, np.ndarray]:
    work: Path = args.work
    crops_dir = work / "crops"
    if CropSet.is_cropset(crops_dir):
        data = CropSet.load(crops_dir, mmap=False)
    else:
        data = load_crop_folder(
            args.data, mpp=HERLEV_MPP, class_map="herlev-bethesda", target_mpp=0.25, size=224, progress=False
        )
        data.save(crops_dir)
    folds_path = work / "folds.json"
    if folds_path.is_file():
        saved = _read_json(folds_path)
        fold_of = {s: int(f) for s, f in saved["assignment"].items()}
        fold = np.array([fold_of[s] for s in data.sources.tolist()], np.int64)
        return data, fold
    splits = grouped_kfold(data.groups, args.folds, seed=args.seed, stratify_labels=data.labels)
    fold = np.full(len(data), -1, np.int64)
    for k, (_, test) in enumerate(splits):
        fold[test] = k
    info = []
    for k in range(args.folds):
        idx = np.flatnonzero(fold == k)
        counts = np.bincount(data.labels[idx], minlength=len(data.class_names))
        info.append(
            {
                "fold": k,
                "n": len(idx),
                "class_counts": {c: int(counts[i]) for i, c in enumerate(data.class_names)},
                "groups": sorted(set(data.groups[idx].tolist())),
            }
        )
    for a in range(args.folds):
        for b in range(a + 1, args.folds):
            if set(info[a]["groups"]) & set(info[b]["groups"]):
                raise AssertionError(f"a group is in folds {a} and {b}")
    _write_json(
        folds_path,
        {
            "data": str(args.data),
            "n_folds": args.folds,
            "seed": args.seed,
            "rule": "grouped_kfold over manifest.csv `group`, class-stratified; no group in two folds",
            "class_names": data.class_names,
            "folds": info,
            "assignment": {s: int(f) for s, f in zip(data.sources.tolist(), fold.tolist(), strict=True)},
        },
    )
    return data, fold


def stage_synthetic(args: argparse.Namespace) -> CropSet | None:
    if args.synthetic <= 0:
        return None
    out = args.work / "synthetic_asc_artifact"
    if CropSet.is_cropset(out):
        return CropSet.load(out, mmap=False)
    syn = collect_crops(
        synthetic=args.synthetic,
        synthetic_seed=args.synthetic_seed,
        cache_dir=args.work / "syncache",
        device="cpu",
        progress=False,
    )
    keep = np.flatnonzero(np.isin(np.array(syn.class_names)[syn.labels], ["ASC-US", "artifact"]))
    sub = syn.subset(keep)
    sub.save(out)
    logger.info("synthetic ASC-US/artifact crops: %s", sub.class_counts())
    return sub


def stage_morph(args: argparse.Namespace, data: CropSet) -> dict[str, np.ndarray]:
    import torch

    from wsi_screen.config import load_settings
    from wsi_screen.localize import Localizer
    from wsi_screen.models.bundle import load_bundle

    path = args.work / "morphometrics.csv"
    if path.is_file():
        with path.open(encoding="utf-8") as fh:
            rows = {r["source"]: r for r in csv.DictReader(fh)}
        return {
            k: np.array([float(rows[s][k]) for s in data.sources.tolist()], np.float64)
            for k in [*MORPH, "n_candidates", "centre_distance_um"]
        }
    size = 640  # 160 µm at 0.25 µm/px: the largest Herlev crop (768 px × 0.201 µm) is ~154 µm
    big = load_crop_folder(
        args.data, mpp=HERLEV_MPP, class_map="herlev-bethesda", target_mpp=0.25, size=size, progress=False
    )
    if big.sources.tolist() != data.sources.tolist():
        raise AssertionError("the crop folder was read in another order")
    settings = load_settings()
    loc = Localizer(
        load_bundle(settings.localization.model, task="localization"),
        settings=settings.localization,
        device=torch.device("cpu"),
    )
    feats: dict[str, list[float]] = {k: [] for k in [*MORPH, "n_candidates", "centre_distance_um"]}
    t0 = time.perf_counter()
    for start in range(0, len(big), 8):
        windows = torch.from_numpy(np.ascontiguousarray(big.crops[start : start + 8]))
        for c in loc.localize(windows, window_mpp=0.25, halo_px=0):
            feats["n_candidates"].append(float(len(c)))
            if len(c) == 0:
                for k in MORPH:
                    feats[k].append(math.nan)
                feats["centre_distance_um"].append(math.nan)
                continue
            d = np.hypot(c.x - size / 2, c.y - size / 2)
            i = int(np.argmin(d))
            feats["centre_distance_um"].append(float(d[i] * 0.25))
            for k in MORPH:
                feats[k].append(float(c.morphometrics[k][i]))
    logger.info("morphometrics of %d crops in %.0f s", len(big), time.perf_counter() - t0)
    out = {k: np.array(v, np.float64) for k, v in feats.items()}
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["source", "label", "group", *out])
        for i, s in enumerate(data.sources.tolist()):
            w.writerow([s, data.class_names[data.labels[i]], data.groups[i], *(out[k][i] for k in out)])
    return out


def _train_config(args: argparse.Namespace, variant: str, seed: int) -> TrainConfig:
    init = "cyto-synth-v1" if variant.endswith("init") else None
    return TrainConfig(
        arch="mobilenetv3_small_100",
        epochs=args.epochs,
        batch_size=32,
        lr=args.lr if init is None else args.lr / 2,
        weight_decay=0.05,
        warmup_epochs=1.0,
        balanced_sampler=True,
        label_smoothing=0.05,
        augment=STRONG_AUGMENT,
        init=init,
        patience=0,
        val_fraction=0.0,
        test_fraction=0.0,
        seed=seed,
        device="cpu",
        threads=args.threads,
        max_minutes=args.max_minutes,
        samples_per_epoch=args.samples_per_epoch,
        half=True,
    )


def _train_set(
    data: CropSet, idx: np.ndarray, variant: str, syn: CropSet | None
) -> tuple[CropSet, list[str]]:
    part = data.subset(idx)
    if variant.startswith("mixed"):
        if syn is None:
            raise SystemExit(f"variant {variant} needs --synthetic N > 0")
        return CropSet.concat([part, syn], info=part.info), ALL5
    return part, HERLEV3


def stage_cv(
    args: argparse.Namespace, data: CropSet, fold: np.ndarray, syn: CropSet | None, variant: str
) -> None:
    vdir = args.work / f"cv-{variant}"
    res_path = vdir / "result.json"
    if res_path.is_file():
        return
    per_fold: list[dict[str, Any]] = []
    oof = np.full((len(data), len(HERLEV3)), np.nan, np.float64)
    absent: dict[str, int] = {}
    t0 = time.perf_counter()
    for k in range(args.folds):
        tr, te = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        train_set, names = _train_set(data, tr, variant, syn)
        bdir = vdir / f"fold{k}"
        res = train_classifier(
            train_set,
            bdir / "bundle",
            config=_train_config(args, variant, args.seed + k),
            name=f"herlev-{variant}-fold{k}",
            class_names=names,
            work_dir=bdir / "work",
            progress=False,
        )
        test = data.subset(te)
        m = evaluate_bundles([bdir / "bundle"], test, classes="present", device="cpu")
        _write_json(bdir / "metrics.json", m)
        oof[te] = _predict_present(bdir / "bundle", test)
        n_abs = int(m["evaluation"]["n_predicted_as_absent"])
        absent[str(k)] = n_abs
        row = {"fold": k, "n_test": len(te), "epochs_run": len(res.history), **headline(m)}
        row["n_predicted_as_absent"] = n_abs
        per_fold.append(row)
        logger.info(
            "%s fold %d: acc %.3f, macro F1 %.3f, HSIL recall %s (%.0f s)",
            variant,
            k,
            m["accuracy"],
            m["macro_f1"] or 0.0,
            m["hsil"]["recall"],
            res.seconds,
        )
    pooled = metrics_of(oof, data.labels, data.class_names)
    np.savez(vdir / "oof.npz", probs=oof, labels=data.labels, fold=fold, sources=data.sources)
    _write_json(
        res_path,
        {
            "variant": variant,
            "recipe": _train_config(args, variant, args.seed).to_dict(),
            "per_fold": per_fold,
            "mean_sd": summarize(per_fold),
            "pooled_out_of_fold": headline(pooled),
            "pooled_confusion_matrix": pooled["confusion_matrix"],
            "class_names": data.class_names,
            "predicted_as_absent_per_fold": absent,
            "seconds": round(time.perf_counter() - t0, 1),
        },
    )


def _predict_present(bundle_dir: Path, test: CropSet) -> np.ndarray:
    """Probabilities over the Herlev classes (absent bundle classes dropped, rows renormalized)."""
    import torch

    from wsi_screen.classify import CellClassifier
    from wsi_screen.models.bundle import load_bundle

    clf = CellClassifier([load_bundle(bundle_dir, task="classification")], device=torch.device("cpu"))
    p = clf.predict(torch.from_numpy(np.ascontiguousarray(test.crops))).cpu().numpy().astype(np.float64)
    cols = [clf.class_names.index(c) for c in test.class_names]
    p = p[:, cols]
    return np.asarray(p / np.maximum(p.sum(axis=1, keepdims=True), 1e-12))


def _lr(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, n_classes: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000))
    model.fit(x_tr, y_tr)
    p = np.zeros((len(x_te), n_classes))
    p[:, model.classes_] = model.predict_proba(x_te)
    return p


def stage_stack(
    args: argparse.Namespace, data: CropSet, fold: np.ndarray, morph: Mapping[str, np.ndarray]
) -> None:
    results: dict[str, Any] = {
        "features": MORPH,
        "measured_by": "nuclei-unet-v1 via wsi_screen.localize.Localizer (candidate nearest the crop centre)",
        "imputation": "missing values (no candidate, cell cut at the canvas) → median of the training folds",
        "rule": (
            "for test fold k, scaler + class-balanced multinomial logistic regression fitted on the other "
            "folds only (CNN inputs: their out-of-fold probabilities)"
        ),
        "missing": {k: int(np.isnan(morph[k]).sum()) for k in MORPH},
        "per_class_median": {
            c: {k: float(np.nanmedian(morph[k][data.labels == i])) for k in MORPH}
            for i, c in enumerate(data.class_names)
        },
    }
    x_m = np.stack([morph[k] for k in MORPH], axis=1)
    # log of the skewed, positive features
    x_m[:, 0] = np.log(np.clip(x_m[:, 0], 1e-3, None))
    x_m[:, 3] = np.log(np.clip(x_m[:, 3], 1e-3, None))
    detected = np.isfinite(morph["centre_distance_um"]) & (morph["centre_distance_um"] <= DETECTED_UM)
    results["detected_within_um"] = DETECTED_UM
    results["detection_rate"] = {
        c: {"n": int((data.labels == i).sum()), "detected": int(detected[data.labels == i].sum())}
        for i, c in enumerate(data.class_names)
    }
    n = len(data.class_names)
    for variant in args.stack_variants:
        oof_path = args.work / f"cv-{variant}" / "oof.npz"
        if not oof_path.is_file():
            logger.warning("no CV of %s: skipping its stacking", variant)
            continue
        cnn = np.load(oof_path)["probs"]
        logit = np.log(np.clip(cnn, 1e-4, 1.0))
        out: dict[str, Any] = {}
        # "all": every cell (missing morphometrics imputed); "detected": only the cells whose nucleus
        # the U-Net found near the crop centre (fitted and scored on those only)
        for population, keep in (("all", np.ones(len(data), bool)), ("detected", detected)):
            tables: dict[str, np.ndarray] = {
                "cnn": cnn.copy(),
                "morph": np.zeros_like(cnn),
                "cnn+morph": np.zeros_like(cnn),
                "cnn-refit": np.zeros_like(cnn),
            }
            for k in range(args.folds):
                tr, te = (fold != k) & keep, (fold == k) & keep
                xm = x_m.copy()
                med = np.nanmedian(xm[tr], axis=0)
                xm = np.where(np.isnan(xm), med, xm)
                tables["morph"][te] = _lr(xm[tr], data.labels[tr], xm[te], n)
                both = np.concatenate([logit, xm], axis=1)
                tables["cnn+morph"][te] = _lr(both[tr], data.labels[tr], both[te], n)
                # the same stacker on the CNN alone: the gain of refitting vs that of morphometrics
                tables["cnn-refit"][te] = _lr(logit[tr], data.labels[tr], logit[te], n)
            block: dict[str, Any] = {"n": int(keep.sum())}
            for name, probs in tables.items():
                per_fold = []
                for k in range(args.folds):
                    sel = (fold == k) & keep
                    per_fold.append(headline(metrics_of(probs[sel], data.labels[sel], data.class_names)))
                block[name] = {"per_fold": per_fold, "mean_sd": summarize(per_fold)}
            out[population] = block
        results[variant] = out
    _write_json(args.work / "stack_results.json", results)


def stage_final(args: argparse.Namespace, data: CropSet, syn: CropSet | None) -> None:
    from wsi_screen.models.bundle import CONFIG_NAME, load_bundle

    variant = args.final_variant
    cv_path = args.work / f"cv-{variant}" / "result.json"
    if not cv_path.is_file():
        raise SystemExit(f"run the cv stage of {variant} first (no {cv_path})")
    cv = _read_json(cv_path)
    train_set, names = _train_set(data, np.arange(len(data)), variant, syn)
    mixed = variant.startswith("mixed")
    extra = (
        " and synthetic ASC-US and artifact cells cut from synthetic slides by the inference path"
        if mixed
        else ""
    )
    extra_lim = (
        "ASC-US and artifact were learned from synthetic cells only: their outputs on real cells are "
        "not validated."
        if mixed
        else "It has no ASC-US and no artifact class: every detection on a slide (debris, leukocytes, "
        "clusters) is forced into NILM, LSIL or HSIL."
    )
    desc = {
        "source": "herlev+synthetic" if mixed else "herlev",
        "herlev": {**data.describe(), "path": "../shared/data/herlev", "source_mpp": HERLEV_MPP},
        "real_classes": HERLEV3,
        "synthetic_classes": ["ASC-US", "artifact"] if mixed else [],
    }
    if mixed and syn is not None:
        desc["synthetic"] = {
            "n_slides": args.synthetic,
            "seed": args.synthetic_seed,
            "class_counts": syn.class_counts(),
            "path": "inference path (collect_crops --synthetic), nuclei-unet-v1",
        }
    out = args.out
    res = train_classifier(
        train_set,
        out,
        config=_train_config(args, variant, args.seed),
        name=out.name,
        class_names=names,
        work_dir=args.work / "final-work",
        progress=False,
        description=DESCRIPTION.format(
            extra=extra,
            init="initialised from the synthetic-cell bundle cyto-synth-v1"
            if variant.endswith("init")
            else "random initial weights",
        ),
        intended_use=INTENDED_USE,
        limitations=LIMITATIONS.format(extra_lim=extra_lim),
        data_description=desc,
    )
    oof = np.load(args.work / f"cv-{variant}" / "oof.npz")
    probs, labels = oof["probs"], oof["labels"]
    ab = [i for i, c in enumerate(data.class_names) if c != "NILM"]
    score = probs[:, ab].sum(axis=1)
    pos = np.sort(score[np.isin(labels, ab)])[::-1]
    t95 = float(pos[math.ceil(0.95 * len(pos)) - 1])
    cfg_path = out / CONFIG_NAME
    cfg = _read_json(cfg_path)
    cfg["metrics"] = {
        "computed_by": "pipelines/train_herlev.py: grouped 5-fold CV, evaluate_bundles per held-out fold",
        "cross_validation": {
            "data": "Herlev (495 cells, ../shared/data/herlev), herlev-bethesda map, folds by manifest group",
            "folds_file": "folds.json (in the --work folder of the pipeline)",
            "n_folds": args.folds,
            "class_mode": "present (NILM, LSIL, HSIL; absent bundle classes dropped, rows renormalized)",
            "mean_sd": cv["mean_sd"],
            "pooled_out_of_fold": cv["pooled_out_of_fold"],
            "pooled_confusion_matrix": cv["pooled_confusion_matrix"],
            "class_names": cv["class_names"],
        },
        "note": "no held-out split: the bundle is trained on every Herlev cell; its figures are the CV ones",
        "review_threshold_note": "review_score_at_95_sensitivity: from the out-of-fold CV probabilities",
    }
    cfg["thresholds"] = {
        "review_score": 0.5,
        "review_score_at_95_sensitivity": round(t95, 6),
    }
    cfg["training"]["environment"] = {"python": platform.python_version(), "command": " ".join(sys.argv)}
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    # the config carries the sha256 of the weights only; re-validate it loads
    load_bundle(out, task="classification")
    logger.info("final bundle %s written (%.0f s)", out, res.seconds)


def stage_compare(args: argparse.Namespace, data: CropSet) -> None:
    held_dir = args.work / "synthetic_heldout"
    if CropSet.is_cropset(held_dir):
        held = CropSet.load(held_dir, mmap=False)
    else:
        held = collect_crops(
            synthetic=args.heldout_synthetic,
            synthetic_seed=args.heldout_seed,
            cache_dir=args.work / "syncache_heldout",
            device="cpu",
            progress=False,
        )
        held.save(held_dir)
    out: dict[str, Any] = {
        "synthetic_heldout": {
            "n_slides": args.heldout_synthetic,
            "seed": args.heldout_seed,
            "class_counts": held.class_counts(),
        }
    }
    m = evaluate_bundles(["cyto-synth-v1"], data, classes="present", device="cpu")
    out["cyto-synth-v1_on_herlev"] = {**headline(m), "confusion_matrix": m["confusion_matrix"]}
    for name in ("cyto-synth-v1", str(args.out)):
        for mode in ("all",):
            try:
                m = evaluate_bundles([name], held, classes=mode, device="cpu")  # type: ignore[arg-type]
            except Exception as exc:  # a 3-class bundle cannot score ASC-US/artifact crops
                out[f"{Path(name).name}_on_synthetic_{mode}"] = {"error": str(exc)}
                continue
            out[f"{Path(name).name}_on_synthetic_{mode}"] = {
                **headline(m),
                "class_names": m["class_names"],
                "confusion_matrix": m["confusion_matrix"],
            }
    _write_json(args.work / "compare.json", out)


def _ms(block: Mapping[str, Any], key: str, digits: int = 3) -> str:
    v = block.get(key) or {}
    if v.get("mean") is None:
        return "–"
    sd = v.get("sd")
    return f"{v['mean']:.{digits}f} ± {sd:.{digits}f}" if sd is not None else f"{v['mean']:.{digits}f}"


ROWS = [
    ("accuracy", "accuracy (3 classes)"),
    ("macro_f1", "macro F1"),
    ("weighted_f1", "weighted F1"),
    ("recall_NILM", "recall NILM"),
    ("recall_LSIL", "recall LSIL"),
    ("recall_HSIL", "recall HSIL"),
    ("hsil_to_nilm_rate", "HSIL→NILM under-call rate"),
    ("binary_sensitivity", "normal vs abnormal: sensitivity"),
    ("binary_specificity", "normal vs abnormal: specificity"),
    ("binary_accuracy", "normal vs abnormal: accuracy"),
    ("binary_auroc", "normal vs abnormal: AUROC"),
]


def stage_report(args: argparse.Namespace) -> None:
    """Markdown tables (mean ± sd over folds) of every result file in WORK: ``WORK/tables.md``."""
    lines: list[str] = []
    cv = {
        v: _read_json(args.work / f"cv-{v}" / "result.json")
        for v in VARIANTS
        if (args.work / f"cv-{v}" / "result.json").is_file()
    }
    lines += ["| figure | " + " | ".join(cv) + " |", "|---|" + "---|" * len(cv)]
    for key, label in ROWS:
        lines.append(f"| {label} | " + " | ".join(_ms(r["mean_sd"], key) for r in cv.values()) + " |")
    lines.append("")
    stack_path = args.work / "stack_results.json"
    if stack_path.is_file():
        st = _read_json(stack_path)
        lines.append(
            f"detection rate (nucleus within {st['detected_within_um']} µm of the centre): "
            + ", ".join(f"{c} {d['detected']}/{d['n']}" for c, d in st["detection_rate"].items())
        )
        for variant in args.stack_variants:
            for pop, block in st.get(variant, {}).items():
                models = ["cnn", "cnn-refit", "morph", "cnn+morph"]
                lines += ["", f"{variant}, {pop} cells (n = {block['n']})", ""]
                lines += ["| figure | " + " | ".join(models) + " |", "|---|" + "---|" * len(models)]
                for key, label in ROWS:
                    row = " | ".join(_ms(block[m]["mean_sd"], key) for m in models)
                    lines.append(f"| {label} | {row} |")
    (args.work / "tables.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--work", type=Path, default=Path("/tmp/herlev-cv"))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--samples-per-epoch", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--max-minutes", type=float, default=6.0, help="per training run")
    p.add_argument("--synthetic", type=int, default=6, help="synthetic slides for the mixed variants")
    p.add_argument("--synthetic-seed", type=int, default=8)
    p.add_argument("--variants", default="scratch,init,mixed,mixed-init", help=f"CV variants, of {VARIANTS}")
    p.add_argument(
        "--stack-variants", default="scratch,mixed,mixed-init", help="CV variants to stack with morphometrics"
    )
    p.add_argument("--final-variant", default="mixed-init")
    p.add_argument("--heldout-synthetic", type=int, default=3, help="fresh synthetic slides (compare)")
    p.add_argument("--heldout-seed", type=int, default=777)
    p.add_argument("--stages", default="prepare,synthetic,morph,cv,stack,final,compare,report")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is 3x faster than 2 on a shared 2-core box)"
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    args.work.mkdir(parents=True, exist_ok=True)
    args.variants = [v for v in args.variants.split(",") if v]
    args.stack_variants = [v for v in args.stack_variants.split(",") if v]
    for v in [*args.variants, *args.stack_variants, args.final_variant]:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}; known: {', '.join(VARIANTS)}")
    stages = set(args.stages.split(","))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    data, fold = stage_prepare(args)
    syn = (
        stage_synthetic(args)
        if "synthetic" in stages or any(v.startswith("mixed") for v in args.variants)
        else None
    )
    if "morph" in stages or "stack" in stages:
        morph = stage_morph(args, data)
    if "cv" in stages:
        for v in args.variants:
            stage_cv(args, data, fold, syn, v)
    if "stack" in stages:
        stage_stack(args, data, fold, morph)
    summary: dict[str, Any] = {}
    for v in VARIANTS:
        f = args.work / f"cv-{v}" / "result.json"
        if f.is_file():
            summary[v] = _read_json(f)
    if (args.work / "stack_results.json").is_file():
        summary["morphometrics"] = _read_json(args.work / "stack_results.json")
    _write_json(args.work / "cv_results.json", summary)
    if "final" in stages:
        if args.final_variant.startswith("mixed") and syn is None:
            syn = stage_synthetic(args)
        stage_final(args, data, syn)
    if "compare" in stages:
        stage_compare(args, data)
    if "report" in stages:
        stage_report(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
