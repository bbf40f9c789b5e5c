"""Slide cohorts with truth, for evaluating and calibrating the slide triage (issue 15).

    python pipelines/build_cohorts.py --kind synthetic --profile pale -o /tmp/coh-pale
    python pipelines/build_cohorts.py --kind synthetic --profile all --preparation both -o /tmp/coh-synth
    python pipelines/build_cohorts.py --kind real --part val -o /tmp/coh-real-val     # calibrate on it
    python pipelines/build_cohorts.py --kind real --part test -o /tmp/coh-real-test   # report on it

A cohort folder holds:

- ``slides/*.tiff``: ``neg-NNN.tiff`` (no abnormal cell) and ``abn-NNN.tiff`` (3–30 abnormal cells of
  one diagnosis, 0.1–2 % of the slide's cells, among many NILM cells);
- ``truth/``: each slide's truth (synthetic: ``<stem>.truth.json``, every object; real cells:
  ``<stem>.truth.npz``, :class:`wsi_screen.train.cell_slides.CellSlide` or the lattice label images);
- ``diagnoses.csv``: ``slide,diagnosis`` as ``wsi-screen calibrate --diagnoses`` reads it;
- ``cohort.json``: the design (kind, profile, preparation, part, seeds, counts and prevalence per
  slide), the explicit adequacy override matching it and the exact ``wsi-screen batch`` command that
  screens the cohort with the shipped defaults plus that override.

Synthetic slides come from :func:`wsi_screen.synth.synthesize_slide` (squamous NILM cells,
neutrophils, lymphocytes, debris, mucus; abnormal ASC-US, LSIL or HSIL cells; the generator has no
organisms). The slide side follows from ``--cells`` and the preparation's cell density.

Real-cell slides use the cells of one part of the split manifest (``pipelines/splits/real.json``):
abnormal cells from the Herlev and ``lbc-cells`` abnormal classes of that part, NILM from Herlev's
normal cells of that part (2 % of them endocervical by default, ``--columnar-share``; each crop used
many times, turned, flipped and rescaled by the compositor),
organism crops (NILM) on some slides, and — with the default ``--compositor paste``
(:func:`wsi_screen.train.cell_slides.compose_cell_slide`) — real LBC fields of that part
(``lbc-nuclei``: NILM squamous and neutrophil nuclei) under the cells. ``--compositor lattice`` uses
:func:`pipelines.real_slides.lattice_slide` (RGB "over" blending, not the classifier's training
compositor; no LBC fields; its canvas grows with the largest crop, so keep cohorts small with it).
Calibrate on ``--part val``, report on ``--part test``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MANIFEST = ROOT / "pipelines" / "splits" / "real.json"
SLIDE_MPP = 0.25

#: Abnormal cells per abnormal slide, absolute and as a share of the slide's cells.
MIN_ABNORMAL, MAX_ABNORMAL = 3, 30
MIN_PREVALENCE, MAX_PREVALENCE = 0.001, 0.02
#: Synthetic abnormal classes (the generator's) and real ones (bundle classes of the class maps).
SYNTHETIC_DIAGNOSES: tuple[str, ...] = ("ASC-US", "LSIL", "HSIL")
REAL_DIAGNOSES: tuple[str, ...] = ("ASC-US", "LSIL", "ASC-H", "HSIL", "SCC", "AGC")
#: Squamous cells per mm² the synthetic slides are drawn with (the generator's defaults).
SYNTH_DENSITY = {"lbc": 220.0, "conventional": 380.0}
#: Share of the LBC spot's radius of the slide side (wsi_screen.synth.layout.random_layout).
SPOT_RADIUS = 0.46
#: Real-cell slides: share of slides with organisms, and organism crops on such a slide.
ORGANISM_SLIDE_P = 0.3
ORGANISM_CELLS = (5, 30)
#: Real-cell slides: share of the NILM cells drawn from Herlev's normal *columnar* (endocervical)
#: cells. A cervical sample holds mostly squamous cells; Bethesda asks only ≥ 10 endocervical or
#: metaplastic cells for a transformation-zone component, so tens to a few hundred among thousands
#: of squamous cells (about 0.5–5 %). Drawn in pool proportions instead, 46 % of a test slide's
#: NILM cells (17 of 37 crops) and 73 % of a validation slide's (19 of 26) are columnar.
COLUMNAR_SHARE = 0.02
COLUMNAR_FOLDER = "normal_columnar/"


@dataclass(frozen=True)
class SlidePlan:
    """One slide of a cohort: its name, diagnosis, seed and abnormal cells."""

    name: str
    diagnosis: str  # NILM or the abnormal class of its abnormal cells
    seed: int
    n_abnormal: int


def abnormal_range(n_cells: int) -> tuple[int, int, bool]:
    """(lo, hi, within): abnormal cells a slide of ``n_cells`` cells may hold — 3–30 and 0.1–2 % of
    its cells. ``within`` is False when no count satisfies both (tiny smoke slides): then 3."""
    lo = max(MIN_ABNORMAL, math.ceil(MIN_PREVALENCE * n_cells - 1e-9))
    hi = min(MAX_ABNORMAL, math.floor(MAX_PREVALENCE * n_cells + 1e-9))
    if hi < lo:
        return MIN_ABNORMAL, MIN_ABNORMAL, False
    return lo, hi, True


def plan_cohort(
    n_negatives: int, n_abnormals: int, n_cells: int, diagnoses: Sequence[str], seed: int
) -> list[SlidePlan]:
    """Negative slides, then abnormal slides with the diagnoses in turn (shuffled order) and abnormal
    counts drawn log-uniformly in :func:`abnormal_range` (rare abnormal cells are the hard case)."""
    if n_negatives < 0 or n_abnormals < 0 or n_negatives + n_abnormals == 0:
        raise SystemExit("build_cohorts: --negatives and --abnormals must be ≥ 0, not both 0")
    if n_cells < 1:
        raise SystemExit("build_cohorts: --cells must be ≥ 1")
    if n_abnormals and not diagnoses:
        raise SystemExit("build_cohorts: no abnormal class has cells here")
    rng = np.random.default_rng([seed, 0xC0])
    lo, hi, _ = abnormal_range(n_cells)
    plans = [SlidePlan(f"neg-{i:03d}", "NILM", seed * 10_000 + i, 0) for i in range(n_negatives)]
    order = [diagnoses[i % len(diagnoses)] for i in range(n_abnormals)]
    order = [order[int(j)] for j in rng.permutation(len(order))]
    for i, dx in enumerate(order):
        n = round(math.exp(rng.uniform(math.log(lo), math.log(hi + 0.999)) - 1e-9))
        n = min(max(n, lo), hi)
        plans.append(SlidePlan(f"abn-{i:03d}", dx, seed * 10_000 + 5_000 + i, n))
    return plans


def adequacy_override(min_squamous: int, fraction: float) -> dict[str, int]:
    """The adequacy rule matching the design: ``fraction`` of the fewest squamous cells a slide holds
    (the shipped 5,000/8,000 are for whole slides; these slides are designed smaller)."""
    return {"adequacy.min_squamous_cells": max(1, math.floor(fraction * min_squamous))}


def batch_command(cohort: Path, override: dict[str, Any], preset: str | None) -> str:
    """The exact ``wsi-screen batch`` command that screens a cohort: shipped defaults + the override."""
    parts = ["wsi-screen", "batch", str(cohort / "slides"), "-o", str(cohort / "batch")]
    if preset:
        parts += ["--preset", preset]
    for k, v in override.items():
        parts += ["--set", f"{k}={v}"]
    return shlex.join(parts)


def write_diagnoses(path: Path, rows: Sequence[tuple[str, str]]) -> Path:
    """``slide,diagnosis`` (the slide's file name), the format of ``wsi-screen calibrate --diagnoses``."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["slide", "diagnosis"])
        w.writerows(rows)
    return path


def _synthetic_side(n_cells: int, preparation: str, density: float) -> int:
    """Slide side (px) whose preparation area holds about ``n_cells`` squamous cells at ``density``."""
    area_px = n_cells / density * 1e6 / (SLIDE_MPP * SLIDE_MPP)
    if preparation == "lbc":
        area_px /= math.pi * SPOT_RADIUS * SPOT_RADIUS
    side = math.ceil(math.sqrt(area_px) / 64) * 64
    return max(1024, side)


def build_synthetic(
    out: Path,
    *,
    profile: str,
    preparation: str,
    n_negatives: int,
    n_abnormals: int,
    n_cells: int,
    seed: int,
    adequacy_fraction: float,
    density: float | None = None,
    workers: int | None = 1,
) -> dict[str, Any]:
    """One synthetic cohort in ``out`` (see the module docstring); returns its ``cohort.json``."""
    from wsi_screen.synth import STAIN_PROFILES, synthesize_slide, truth_path_for

    if profile not in STAIN_PROFILES:
        raise SystemExit(f"build_cohorts: unknown stain profile {profile!r} ({', '.join(STAIN_PROFILES)})")
    dens = SYNTH_DENSITY[preparation] if density is None else float(density)
    side = _synthetic_side(n_cells, preparation, dens)
    plans = plan_cohort(n_negatives, n_abnormals, n_cells, SYNTHETIC_DIAGNOSES, seed)
    slides_dir, truth_dir = out / "slides", out / "truth"
    slides_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for p in plans:
        t0 = time.perf_counter()
        path = slides_dir / f"{p.name}.tiff"
        r = synthesize_slide(
            path,
            size=(side, side),
            mpp=SLIDE_MPP,
            seed=p.seed,
            abnormal={p.diagnosis: p.n_abnormal} if p.n_abnormal else None,
            preparation=preparation,
            stain=profile,
            density_per_mm2=dens,
            workers=workers,
            write_truth=False,
        )
        r.truth.write(truth_dir / truth_path_for(path).name)
        abnormal = {c: int(r.counts.get(c, 0)) for c in SYNTHETIC_DIAGNOSES}
        n_abn = sum(abnormal.values())
        squamous = int(r.counts.get("NILM", 0)) + n_abn
        records.append(
            {
                "slide": path.name,
                "diagnosis": p.diagnosis,
                "seed": p.seed,
                "size_px": [side, side],
                "n_cells": squamous,
                "n_abnormal": n_abn,
                "abnormal": {c: v for c, v in abnormal.items() if v},
                "prevalence": n_abn / squamous if squamous else 0.0,
                "objects": {k: int(v) for k, v in r.kind_counts.items() if v},
            }
        )
        print(
            f"{path.name}: {p.diagnosis}, {squamous} squamous cells, {n_abn} abnormal "
            f"({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    preset = "conventional" if preparation == "conventional" else None
    design = {
        "kind": "synthetic",
        "profile": profile,
        "preparation": preparation,
        "density_per_mm2": dens,
        "mpp": SLIDE_MPP,
    }
    return _finish(out, design, plans, records, n_cells, seed, adequacy_fraction, preset)


def _load_real_slides() -> ModuleType:
    spec = importlib.util.spec_from_file_location("real_slides", ROOT / "pipelines" / "real_slides.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("real_slides", mod)
    spec.loader.exec_module(mod)
    return mod


def real_cell_pools(data: Path, manifest: Path, part: str) -> tuple[dict[str, list[Any]], list[Any]]:
    """The labelled cells of ``part`` by bundle class (Herlev + lbc-cells), and its LBC background
    fields (unrotated ``lbc-nuclei`` fields, as the classifier's slides use them)."""
    from wsi_screen.train.cell_slides import load_labelled_cells
    from wsi_screen.train.data import load_class_map
    from wsi_screen.train.fields import SOURCE_MPP, load_source_images, read_split_manifest, split_names

    m = read_split_manifest(manifest)
    cells = load_labelled_cells(
        data, "herlev", split_names(m, "herlev", part), load_class_map("herlev-bethesda")
    )
    cells += load_labelled_cells(
        data, "lbc_cells", split_names(m, "lbc_cells", part), load_class_map("lbc-cells-bethesda")
    )
    pools: dict[str, list[Any]] = {}
    for c in cells:
        pools.setdefault(c.klass, []).append(c)
    images = load_source_images(data, "lbc_nuclei", split_names(m, "lbc_nuclei", part))
    backgrounds = [(im, SOURCE_MPP["lbc_nuclei"]) for im in images if not im.name.startswith("rot")]
    return pools, backgrounds


def _draw(rng: np.random.Generator, pool: Sequence[Any], n: int) -> list[Any]:
    """``n`` cells of ``pool``: distinct while the pool lasts, then repeated."""
    out: list[Any] = []
    while len(out) < n:
        order = rng.permutation(len(pool))[: n - len(out)]
        out += [pool[int(i)] for i in order]
    return out


def is_columnar(cell: Any) -> bool:
    """A Herlev normal columnar (endocervical) cell, by its class folder."""
    return str(cell.name).startswith(COLUMNAR_FOLDER)


def draw_nilm(
    rng: np.random.Generator, nilm: Sequence[Any], n: int, columnar_share: float | None
) -> tuple[list[Any], int]:
    """``n`` NILM cells of ``nilm`` and how many are columnar (Herlev ``normal_columnar``).

    ``columnar_share``: the share of columnar cells (rounded; none where the pool has none), the
    rest squamous; ``None`` draws from the whole pool, in its own proportions.
    """
    columnar = [c for c in nilm if is_columnar(c)]
    if columnar_share is None:
        cells = _draw(rng, nilm, n)
        return cells, sum(map(is_columnar, cells))
    squamous = [c for c in nilm if not is_columnar(c)]
    if not squamous:
        raise SystemExit("build_cohorts: the NILM pool has no squamous cells")
    n_col = round(columnar_share * n) if columnar else 0
    return [*_draw(rng, squamous, n - n_col), *_draw(rng, columnar, n_col)], n_col


def build_real(
    out: Path,
    *,
    part: str,
    n_negatives: int,
    n_abnormals: int,
    n_cells: int,
    seed: int,
    adequacy_fraction: float,
    data: Path = DATA,
    manifest: Path = MANIFEST,
    compositor: str = "paste",
    pitch_um: float = 40.0,
    columnar_share: float | None = COLUMNAR_SHARE,
) -> dict[str, Any]:
    """One real-cell cohort of split part ``part`` in ``out``; returns its ``cohort.json``.

    ``columnar_share``: share of the NILM cells that are endocervical (:func:`draw_nilm`).
    """
    from wsi_screen.train.cell_slides import compose_cell_slide, write_image_slide

    pools, backgrounds = real_cell_pools(data, manifest, part)
    nilm = pools.get("NILM", [])
    organisms = pools.get("organism", [])
    if not nilm:
        raise SystemExit(f"build_cohorts: the {part} part has no NILM cells")
    diagnoses = [d for d in REAL_DIAGNOSES if pools.get(d)]
    plans = plan_cohort(n_negatives, n_abnormals, n_cells, diagnoses, seed)
    slides_dir, truth_dir = out / "slides", out / "truth"
    slides_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    pitch_px = max(16, round(pitch_um / SLIDE_MPP))
    size_px = math.ceil(math.sqrt(n_cells)) * pitch_px  # as many lattice slots as cells, at least
    real = _load_real_slides() if compositor == "lattice" else None
    records = []
    for p in plans:
        t0 = time.perf_counter()
        rng = np.random.default_rng([p.seed, 0x5E])
        n_org = 0
        if organisms and rng.uniform() < ORGANISM_SLIDE_P:
            kind = rng.choice(sorted({c.name.split("/", 1)[0] for c in organisms}))
            same = [c for c in organisms if c.name.split("/", 1)[0] == kind]
            n_org = int(rng.integers(ORGANISM_CELLS[0], ORGANISM_CELLS[1] + 1))
            n_org = min(n_org, max(0, n_cells - p.n_abnormal - 1))
            chosen = _draw(rng, same, n_org)
        else:
            chosen = []
        abnormal = _draw(rng, pools[p.diagnosis], p.n_abnormal) if p.n_abnormal else []
        n_nilm = max(0, n_cells - len(abnormal) - len(chosen))
        nilm_cells, n_columnar = draw_nilm(rng, nilm, n_nilm, columnar_share)
        cells = [*nilm_cells, *chosen, *abnormal]
        path = slides_dir / f"{p.name}.tiff"
        bg_nuclei = 0
        if real is None:
            cs = compose_cell_slide(
                cells, backgrounds=backgrounds, size_px=size_px, pitch_um=pitch_um, seed=p.seed
            )
            rgb, klass, sources = cs.rgb, cs.klass, cs.source
            bg_nuclei = int(cs.info["background_nuclei"])
            cs.save_truth(truth_dir / f"{p.name}.truth.npz")
        else:
            items = [(c.rgb, c.label, c.klass, c.mpp) for c in cells]
            rgb, nuclei, kinds, cell_labels, klass = real.lattice_slide(items, p.seed)
            klass = klass[1:]
            sources = []
            np.savez_compressed(
                truth_dir / f"{p.name}.truth.npz",
                nuclei=nuclei,
                kind=np.asarray(kinds),
                cells=cell_labels,
                cell_kind=np.asarray(["", *klass]),
                mpp=np.float64(SLIDE_MPP),
            )
        write_image_slide(path, rgb, SLIDE_MPP, quality=90)
        counts: dict[str, int] = {}
        for k in klass:
            counts[k] = counts.get(k, 0) + 1
        n_abn = sum(v for k, v in counts.items() if k in REAL_DIAGNOSES)
        if (n_abn > 0) != (p.diagnosis != "NILM"):
            raise SystemExit(f"build_cohorts: {path.name} lost its abnormal cells while composing")
        squamous = sum(v for k, v in counts.items() if k != "organism")
        records.append(
            {
                "slide": path.name,
                "diagnosis": p.diagnosis,
                "seed": p.seed,
                "size_px": [int(rgb.shape[1]), int(rgb.shape[0])],
                "n_cells": squamous,
                "n_abnormal": n_abn,
                "abnormal": {k: v for k, v in counts.items() if k in REAL_DIAGNOSES},
                "prevalence": n_abn / squamous if squamous else 0.0,
                "prevalence_with_background": n_abn / (squamous + bg_nuclei) if squamous else 0.0,
                "objects": {
                    **counts,
                    "NILM_columnar": n_columnar,
                    "background_nuclei": bg_nuclei,
                    "distinct_abnormal_crops": len({c.name for c in abnormal}),
                },
                "sources": {s: sources.count(s) for s in sorted(set(sources))},
            }
        )
        print(
            f"{path.name}: {p.diagnosis}, {squamous} cells (+{bg_nuclei} background nuclei, "
            f"{n_org} organisms), {n_abn} abnormal ({time.perf_counter() - t0:.1f} s)",
            flush=True,
        )
    design = {
        "kind": "real",
        "part": part,
        "compositor": compositor,
        "pitch_um": pitch_um if compositor == "paste" else None,
        "mpp": SLIDE_MPP,
        "manifest": str(manifest),
        "pools": {k: len(v) for k, v in sorted(pools.items())},
        "nilm_columnar_pool": sum(map(is_columnar, nilm)),
        "columnar_share": columnar_share,
        "background_fields": len(backgrounds) if compositor == "paste" else 0,
    }
    return _finish(out, design, plans, records, n_cells, seed, adequacy_fraction, None)


def _finish(
    out: Path,
    design: dict[str, Any],
    plans: Sequence[SlidePlan],
    records: list[dict[str, Any]],
    n_cells: int,
    seed: int,
    adequacy_fraction: float,
    preset: str | None,
) -> dict[str, Any]:
    lo, hi, within = abnormal_range(n_cells)
    min_squamous = min(int(r["n_cells"]) for r in records)
    override = adequacy_override(min_squamous, adequacy_fraction)
    abn = [r for r in records if r["diagnosis"] != "NILM"]
    prev = [float(r["prevalence"]) for r in abn]
    by_dx: dict[str, int] = {}
    for r in records:
        by_dx[r["diagnosis"]] = by_dx.get(r["diagnosis"], 0) + 1
    cohort = {
        "format_version": 1,
        **design,
        "seed": seed,
        "n_slides": len(records),
        "n_negative": len(records) - len(abn),
        "n_abnormal": len(abn),
        "diagnoses": by_dx,
        "cells_per_slide": n_cells,
        "abnormal_cells_range": [lo, hi],
        "design_within_bounds": within
        and all(MIN_ABNORMAL <= r["n_abnormal"] <= MAX_ABNORMAL for r in abn)
        and all(MIN_PREVALENCE - 1e-12 <= v <= MAX_PREVALENCE + 1e-12 for v in prev),
        "prevalence": {
            "min": min(prev) if prev else None,
            "median": float(np.median(prev)) if prev else None,
            "max": max(prev) if prev else None,
        },
        "adequacy_fraction": adequacy_fraction,
        "adequacy_override": override,
        "preset": preset,
        "batch_command": batch_command(out, override, preset),
        "diagnoses_csv": "diagnoses.csv",
        "slides": records,
    }
    if not cohort["design_within_bounds"]:
        print(
            f"warning: {out.name}: the abnormal slides are outside the 3–30 cells / 0.1–2 % design "
            f"({n_cells} cells per slide is a smoke-run size)",
            file=sys.stderr,
        )
    write_diagnoses(out / "diagnoses.csv", [(r["slide"], r["diagnosis"]) for r in records])
    (out / "cohort.json").write_text(json.dumps(cohort, indent=1) + "\n", encoding="utf-8")
    print(f"cohort {out}: {cohort['n_negative']} negative + {cohort['n_abnormal']} abnormal slides")
    print(f"screen it with:  {cohort['batch_command']}")
    return cohort


def _share(text: str) -> float | None:
    """``--columnar-share``: a share in [0, 1], or ``pool``."""
    if text.strip().lower() == "pool":
        return None
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1] or 'pool', got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in [0, 1] or 'pool', got {text!r}")
    return v


def main(argv: list[str] | None = None) -> int:
    from wsi_screen.synth import STAIN_PROFILES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", choices=["synthetic", "real"], required=True)
    p.add_argument(
        "--profile", default="default", help=f"stain profile ({', '.join(STAIN_PROFILES)}) or 'all'"
    )
    p.add_argument("--preparation", choices=["lbc", "conventional", "both"], default="lbc")
    p.add_argument("--part", choices=["val", "test"], default=None, help="split part (real cells)")
    p.add_argument("--negatives", type=int, default=30)
    p.add_argument("--abnormals", type=int, default=30)
    p.add_argument("--cells", type=int, default=2000, help="squamous cells per slide")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--adequacy-fraction",
        type=float,
        default=0.5,
        help="adequacy.min_squamous_cells = this share of the fewest cells a slide is designed with",
    )
    p.add_argument("--density", type=float, default=None, help="synthetic squamous cells per mm²")
    p.add_argument("--workers", type=int, default=1, help="synthetic render processes")
    p.add_argument("--compositor", choices=["paste", "lattice"], default="paste", help="real cells")
    p.add_argument("--pitch-um", type=float, default=40.0, help="real cells: lattice pitch (paste)")
    p.add_argument(
        "--columnar-share",
        type=_share,
        default=COLUMNAR_SHARE,
        metavar="SHARE|pool",
        help=f"real cells: share of NILM cells that are endocervical (default {COLUMNAR_SHARE}); "
        "'pool' draws them in the part's own proportions",
    )
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--manifest", type=Path, default=MANIFEST)
    p.add_argument("-o", "--out", type=Path, required=True)
    args = p.parse_args(argv)
    if not 0.0 < args.adequacy_fraction <= 1.0:
        p.error("--adequacy-fraction must lie in (0, 1]")
    common = {
        "n_negatives": args.negatives,
        "n_abnormals": args.abnormals,
        "n_cells": args.cells,
        "seed": args.seed,
        "adequacy_fraction": args.adequacy_fraction,
    }
    if args.kind == "real":
        if args.part is None:
            p.error("--kind real needs --part val|test")
        build_real(
            args.out,
            part=args.part,
            data=args.data,
            manifest=args.manifest,
            compositor=args.compositor,
            pitch_um=args.pitch_um,
            columnar_share=args.columnar_share,
            **common,
        )
        return 0
    profiles = list(STAIN_PROFILES) if args.profile == "all" else [args.profile]
    if args.profile != "all" and args.profile not in STAIN_PROFILES:
        p.error(f"unknown stain profile {args.profile!r}; choose one of: {', '.join(STAIN_PROFILES)}, all")
    preps = ["lbc", "conventional"] if args.preparation == "both" else [args.preparation]
    several = len(profiles) * len(preps) > 1
    index = []
    for prof in profiles:
        for prep in preps:
            out = args.out / f"synthetic-{prof}-{prep}" if several else args.out
            build_synthetic(
                out,
                profile=prof,
                preparation=prep,
                density=args.density,
                workers=args.workers,
                **common,
            )
            index.append(str(out.relative_to(args.out)) if several else ".")
    if several:
        (args.out / "cohorts.json").write_text(json.dumps({"cohorts": index}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
