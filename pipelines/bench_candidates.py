"""Candidate extraction, CPU path against torch path, on the same probability maps: agreement and time.

    .venv/bin/python pipelines/bench_candidates.py --out /tmp/bench-candidates      # CPU, 1 thread
    .venv/bin/python pipelines/bench_candidates.py --quick --out /tmp/bench-cand    # CI: 2 maps, no real
    python pipelines/bench_candidates.py --device cuda --batch 32 --out bench-cand/   # on a GPU machine

Maps (all at 0.5 µm/px, the localizer's resolution):

- **synthetic**: 608² maps, the U-Net's map of one 1024² tile core at 0.25 µm/px plus its 24 µm of
  context; crowded fields of touching elliptical nuclei (nucleus, nucleus-centre marker and cell
  probability, a little noise), ``--nuclei`` per map (a sparse and a crowded density);
- **real**: the CNSeg crowded fields (``../shared/data/cnseg/clustered``, 0.33 µm/px) through the
  shipped localizer (the default, ``nuclei-unet-v3``, on the CPU, Reinhard-normalized to its target as
  ``localize_region`` does); skipped when the data or the bundle is missing.

Agreement: nuclei of the two paths matched one to one (Hungarian assignment on centre distance,
pairs within 1 µm); a nucleus *agrees* when it is matched and its area is within 5 % of its partner's
(the bar of issue 16: ≥ 99 % of the nuclei, both ways). Cell areas are compared on the matched pairs.

Time: per map, median of ``--repeats`` passes after a warm-up. The CPU path runs one map at a time
(as a candidate process does); the torch path takes the maps in batches of ``--batch`` on
``--device``; ``--threads`` torch/BLAS threads (default 1, so the figures are per core).

Writes ``OUT/bench_candidates.json`` (every figure) and ``OUT/bench_candidates.md`` (the table of
``docs/performance.md``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
MAP_MPP = 0.5
F32 = NDArray[np.float32]

logger = logging.getLogger("bench_candidates")


# -- maps --------------------------------------------------------------------------------------------------


def synthetic_maps(seed: int, *, size: int = 608, nuclei: int = 150, marker: bool = True) -> dict[str, Any]:
    """Probability maps of a crowded field: touching elliptical nuclei (radius 3–9 px at 0.5 µm/px),
    60 % of them placed against an earlier one; marker = a blob at each centre; cell = a halo around
    each nucleus; optical density from the nucleus probability. Deterministic for a seed."""
    rng = np.random.default_rng(seed)
    nuc = np.zeros((size, size), np.float32)
    mk = np.zeros_like(nuc)
    cell = np.zeros_like(nuc)
    placed: list[tuple[float, float, float]] = []
    for _ in range(nuclei):
        r = float(rng.uniform(3.0, 9.0))
        if placed and rng.random() < 0.6:
            px, py, pr = placed[int(rng.integers(len(placed)))]
            ang = float(rng.uniform(0.0, 2.0 * math.pi))
            d = (pr + r) * float(rng.uniform(0.7, 1.0))
            cx, cy = px + d * math.cos(ang), py + d * math.sin(ang)
        else:
            cx, cy = (float(v) for v in rng.uniform(0.0, size, 2))
        a, b = r * float(rng.uniform(0.8, 1.25)), r * float(rng.uniform(0.8, 1.25))
        th = float(rng.uniform(0.0, math.pi))
        reach = math.ceil(4.0 * max(a, b)) + 2
        r0, r1 = max(0, int(cy) - reach), min(size, int(cy) + reach)
        c0, c1 = max(0, int(cx) - reach), min(size, int(cx) + reach)
        if r0 >= r1 or c0 >= c1:
            continue
        yy, xx = np.mgrid[r0:r1, c0:c1] + 0.5
        dx, dy = xx - cx, yy - cy
        u = (dx * math.cos(th) + dy * math.sin(th)) / a
        v = (-dx * math.sin(th) + dy * math.cos(th)) / b
        rho = np.sqrt(u * u + v * v)
        sl = (slice(r0, r1), slice(c0, c1))
        nuc[sl] = np.maximum(nuc[sl], 1.0 / (1.0 + np.exp((rho - 1.0) * r / 1.2)))
        mk[sl] = np.maximum(mk[sl], 1.0 / (1.0 + np.exp((rho - 0.4) * r)))
        cell[sl] = np.maximum(cell[sl], 1.0 / (1.0 + np.exp((rho - 3.0) * r / 2.0)))
        placed.append((cx, cy, r))
    nuc = np.clip(nuc + rng.normal(0.0, 0.03, nuc.shape).astype(np.float32), 0.0, 1.0)
    return {
        "nucleus": nuc,
        "marker": mk if marker else None,
        "cell": cell,
        "od": (0.8 * nuc).astype(np.float32),
        "mpp": MAP_MPP,
    }


def real_maps(data: Path = SHARED, *, limit: int | None = None) -> list[dict[str, Any]]:
    """The shipped localizer's maps of the CNSeg crowded fields (CPU); [] when data or bundle is missing."""
    import torch
    from PIL import Image

    from wsi_screen.config import LocalizationSettings
    from wsi_screen.errors import BundleError
    from wsi_screen.localize import Localizer
    from wsi_screen.models import load_bundle
    from wsi_screen.stain import glass_mask, lab_stats, reinhard
    from wsi_screen.train.fields import SOURCE_MPP

    paths = sorted((data / "cnseg" / "clustered" / "images").glob("*.png"))[:limit]
    if not paths:
        return []
    try:
        bundle = load_bundle(LocalizationSettings().model, task="localization")
    except (BundleError, FileNotFoundError) as exc:
        logger.warning("no real maps: %s", exc)
        return []
    loc = Localizer(bundle, settings=LocalizationSettings(), device=torch.device("cpu"))
    mpp = float(SOURCE_MPP["cnseg"])
    out = []
    for p in paths:
        img = np.array(Image.open(p).convert("RGB"))
        batch = torch.from_numpy(img)[None]
        glass = glass_mask(batch)
        if loc.stain_target is not None and not bool(glass.all()):
            batch = reinhard(batch, loc.stain_target, source=lab_stats(batch, mask=glass))
        probs, od, (sy, sx) = loc._forward(batch, mpp)
        ch = {name: i for i, name in enumerate(loc.channels)}
        out.append(
            {
                "nucleus": probs[0, ch["nucleus"]].numpy(),
                "marker": probs[0, ch["marker"]].numpy() if "marker" in ch else None,
                "cell": probs[0, ch["cell"]].numpy() if "cell" in ch else None,
                "od": od[0].numpy(),
                "mpp": mpp * (sy + sx) / 2.0,
                "name": p.name,
                "thresholds": loc.thresholds,
            }
        )
    return out


# -- the two paths ------------------------------------------------------------------------------------------


def _kwargs(m: dict[str, Any]) -> dict[str, Any]:
    th = m.get("thresholds", {})
    return {
        "mpp": m["mpp"],
        "nucleus_threshold": th.get("nucleus", 0.5),
        "marker_threshold": th.get("marker", 0.5),
        "cell_threshold": th.get("cell", 0.5),
    }


def run_cpu(maps: Sequence[dict[str, Any]]) -> list[Any]:
    """The CPU path, one map at a time."""
    from wsi_screen.candidates import extract_candidates

    return [
        extract_candidates(m["nucleus"], marker=m["marker"], cell=m["cell"], od=m["od"], **_kwargs(m))
        for m in maps
    ]


def run_torch(maps: Sequence[dict[str, Any]], *, device: str = "cpu", batch: int = 8) -> list[Any]:
    """The torch path, ``batch`` maps at a time on ``device`` (maps of one shape and µm/px per batch)."""
    import torch

    from wsi_screen.candidates_torch import extract_candidates_torch

    def stack(key: str, group: Sequence[dict[str, Any]]) -> Any:
        if group[0][key] is None:
            return None
        return torch.from_numpy(np.stack([g[key] for g in group])).to(device)

    out: list[Any] = []
    for s in range(0, len(maps), batch):
        group = maps[s : s + batch]
        out += extract_candidates_torch(
            stack("nucleus", group),
            marker=stack("marker", group),
            cell=stack("cell", group),
            od=stack("od", group),
            **_kwargs(group[0]),
        )
    return out


# -- agreement ----------------------------------------------------------------------------------------------


def match(a: Any, b: Any, mpp: float, radius_um: float = 1.0) -> NDArray[np.int64]:
    """One-to-one pairs (i in a, j in b) of nuclei whose centres lie within ``radius_um``."""
    from scipy.optimize import linear_sum_assignment

    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), np.int64)
    d = np.hypot(a.x[:, None] - b.x[None, :], a.y[:, None] - b.y[None, :]) * mpp
    cost = np.where(d <= radius_um, d, 1e6)
    i, j = linear_sum_assignment(cost)
    ok = cost[i, j] <= radius_um
    return np.stack([i[ok], j[ok]], 1).astype(np.int64)


def agreement(
    cpu: Sequence[Any], other: Sequence[Any], mpps: Sequence[float], *, area_tol: float = 0.05
) -> dict[str, Any]:
    """Matched and agreeing nuclei of two paths' candidates of the same maps, with area and cell errors."""
    n_a = n_b = n_match = n_agree = 0
    area_err: list[float] = []
    centre: list[float] = []
    cell_err: list[float] = []
    cut_mismatch = 0
    for a, b, mpp in zip(cpu, other, mpps, strict=True):
        pairs = match(a, b, mpp)
        n_a, n_b, n_match = n_a + len(a), n_b + len(b), n_match + len(pairs)
        i, j = pairs[:, 0], pairs[:, 1]
        aa = a.morphometrics["nucleus_area_um2"][i].astype(np.float64)
        ab = b.morphometrics["nucleus_area_um2"][j].astype(np.float64)
        rel = np.abs(ab - aa) / aa
        n_agree += int((rel <= area_tol).sum())
        area_err += rel.tolist()
        centre += (np.hypot(a.x[i] - b.x[j], a.y[i] - b.y[j]) * mpp).tolist()
        ca = a.morphometrics["cell_area_um2"][i].astype(np.float64)
        cb = b.morphometrics["cell_area_um2"][j].astype(np.float64)
        both = np.isfinite(ca) & np.isfinite(cb)
        cut_mismatch += int((np.isfinite(ca) != np.isfinite(cb)).sum())
        cell_err += (np.abs(cb[both] - ca[both]) / ca[both]).tolist()
    err = np.asarray(area_err) if area_err else np.zeros(1)
    cerr = np.asarray(cell_err) if cell_err else np.zeros(1)
    return {
        "maps": len(cpu),
        "nuclei_cpu": n_a,
        "nuclei_torch": n_b,
        "matched_1um": n_match,
        "agree": n_agree,
        "agree_of_cpu": n_agree / max(n_a, 1),
        "agree_of_torch": n_agree / max(n_b, 1),
        "area_rel_err_mean": float(err.mean()),
        "area_rel_err_max": float(err.max()),
        "area_within_tol_of_matched": float((err <= area_tol).mean()),
        "centre_dist_um_max": float(max(centre, default=0.0)),
        "cell_area_rel_err_median": float(np.median(cerr)),
        "cell_area_rel_err_mean": float(cerr.mean()),
        "cell_area_rel_err_p99": float(np.quantile(cerr, 0.99)),
        "cell_cut_mismatch": cut_mismatch,
    }


# -- timing -------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], Any], repeats: int, sync: Callable[[], None]) -> tuple[float, float, Any]:
    """Median wall and process CPU seconds of ``repeats`` calls after a warm-up, and the last result.

    On a shared machine the CPU time is the fairer figure: it leaves out the time spent waiting for a
    core (with one thread it is the work on one core)."""
    out = fn()  # warm-up
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu), out


def bench(
    maps: Sequence[dict[str, Any]], *, device: str, batch: int, repeats: int, cpu_path: bool = True
) -> dict[str, Any]:
    """Agreement and per-map time of both paths on ``maps``."""
    import torch

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    res: dict[str, Any] = {"maps": len(maps), "shape": list(np.shape(maps[0]["nucleus"])), "batch": batch}
    wall, cpu, got = _timed(lambda: run_torch(maps, device=device, batch=batch), repeats, sync)
    res["torch_ms_per_map"] = {"wall": 1e3 * wall / len(maps), "cpu": 1e3 * cpu / len(maps)}
    if cpu_path:
        wall, cpu, want = _timed(lambda: run_cpu(maps), repeats, lambda: None)
        res["cpu_ms_per_map"] = {"wall": 1e3 * wall / len(maps), "cpu": 1e3 * cpu / len(maps)}
        res["agreement"] = agreement(want, got, [m["mpp"] for m in maps])
    res["nuclei_per_map"] = sum(len(c) for c in got) / len(maps)
    return res


def hardware() -> dict[str, Any]:
    import torch

    from wsi_screen.runtime import cpu_count, cpu_model

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu_model(),
        "cores": cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def markdown(r: dict[str, Any]) -> str:
    hw = r["hardware"]
    lines = [
        f"Hardware: {hw['cpu']}, {hw['cores']} cores, torch {hw['torch']} with {hw['torch_threads']} "
        f"thread(s), device `{r['device']}`; load average at start {hw['load_average']}.",
        "",
        "Time per map: median over the repeats, process CPU time (wall time in brackets).",
        "",
        "| maps | nuclei/map | CPU path ms/map | torch path ms/map | agree (of CPU · of torch) | "
        "area error mean · max | cell area error median · p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def ms(t: dict[str, float]) -> str:
        return f"{t['cpu']:.0f} ({t['wall']:.0f})"

    for name, s in r["sets"].items():
        a = s.get("agreement")
        agree = f"{a['agree_of_cpu']:.2%} · {a['agree_of_torch']:.2%}" if a else "—"
        area = f"{a['area_rel_err_mean']:.2%} · {a['area_rel_err_max']:.1%}" if a else "—"
        cells = f"{a['cell_area_rel_err_median']:.2%} · {a['cell_area_rel_err_p99']:.1%}" if a else "—"
        cpu = ms(s["cpu_ms_per_map"]) if "cpu_ms_per_map" in s else "—"
        lines.append(
            f"| {name} ({s['maps']} × {s['shape'][0]}×{s['shape'][1]}) | {s['nuclei_per_map']:.0f} | {cpu} | "
            f"{ms(s['torch_ms_per_map'])}, batches of {s['batch']} | {agree} | {area} | {cells} |"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench-candidates"))
    p.add_argument("--device", default="cpu", help="device of the torch path (cpu, cuda, cuda:N)")
    p.add_argument("--batch", type=int, default=8, help="maps per torch call")
    p.add_argument("--maps", type=int, default=8, help="synthetic maps per density")
    p.add_argument("--nuclei", type=int, nargs="+", default=[30, 150], help="nuclei per synthetic map")
    p.add_argument("--size", type=int, default=608, help="synthetic map side (px at 0.5 µm/px)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--no-real", action="store_true", help="skip the CNSeg maps")
    p.add_argument("--no-cpu-path", action="store_true", help="time the torch path only (no agreement)")
    p.add_argument("--quick", action="store_true", help="CI: 2 small maps per density, 1 repeat, no real")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    import torch

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[bench_candidates] %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.maps, args.size, args.repeats, args.no_real = 2, 256, 1, True
    r: dict[str, Any] = {"device": args.device, "hardware": hardware(), "sets": {}}
    cpu_path = not args.no_cpu_path
    for n in args.nuclei:
        maps = [synthetic_maps(1000 * n + i, size=args.size, nuclei=n) for i in range(args.maps)]
        name = f"synthetic, {n} nuclei"
        logger.info("%s: %d maps of %d²", name, len(maps), args.size)
        r["sets"][name] = bench(
            maps, device=args.device, batch=args.batch, repeats=args.repeats, cpu_path=cpu_path
        )
    n = args.nuclei[-1]
    maps = [synthetic_maps(2000 * n + i, size=args.size, nuclei=n, marker=False) for i in range(args.maps)]
    r["sets"][f"synthetic, {n} nuclei, no marker"] = bench(
        maps, device=args.device, batch=args.batch, repeats=args.repeats, cpu_path=cpu_path
    )
    if not args.no_real:
        real = real_maps()
        if real:
            logger.info("real: %d CNSeg crowded fields", len(real))
            from wsi_screen.config import LocalizationSettings

            r["sets"][f"CNSeg crowded fields, {LocalizationSettings().model}"] = bench(
                real,
                device=args.device,
                batch=args.batch,
                repeats=args.repeats,
                cpu_path=cpu_path,
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_candidates.json").write_text(json.dumps(r, indent=1) + "\n")
    md = markdown(r)
    (args.out / "bench_candidates.md").write_text(md)
    logger.info("\n%s", md)
    return r


if __name__ == "__main__":
    main()
