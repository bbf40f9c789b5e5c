"""Throughput of Reinhard normalization: wsi_screen.stain (torch) next to HistomicsTK.

    python pipelines/bench_stain.py --out bench_stain.json
    python pipelines/bench_stain.py --tiles 16 --size 1024 --threads 8 --out bench_stain.json

Tiles are 1024×1024 crops of a real slide (``../shared/data/slides/cmu-1-small-region.svs`` when it is
there, or ``--slide``), else synthetic cytology-like tiles (``--synthetic``). Each case runs once to warm
up, then ``--repeats`` times; the table shows the best run (least disturbed by other load on the machine;
the JSON also has the median). HistomicsTK (if installed) runs on the first
``--htk-tiles`` tiles, and its output is compared with ours (fraction within one grey level, max diff).
With CUDA, GPU figures are added (tiles already on the device, and including host↔device copies).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from wsi_screen import stain
from wsi_screen.runtime import cpu_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SLIDE = ROOT.parent / "shared" / "data" / "slides" / "cmu-1-small-region.svs"
# A Pap-like target in Ruderman lαβ (any valid target exercises the same arithmetic).
TARGET = stain.ReinhardStats(mu=(8.9, -0.05, -0.02), sigma=(0.45, 0.06, 0.03))


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def hardware(threads: int) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": threads,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "histomicstk": version("histomicstk"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def slide_tiles(path: Path, n: int, size: int, seed: int) -> NDArray[np.uint8]:
    """``n`` size×size crops of a real slide at its native resolution, at random offsets."""
    from wsi_screen.slide import open_slide

    rng = np.random.default_rng(seed)
    with open_slide(path) as slide:
        w, h = slide.dimensions
        tiles = []
        for _ in range(n):
            x = int(rng.integers(0, max(1, w - size)))
            y = int(rng.integers(0, max(1, h - size)))
            tiles.append(slide.read_region((x, y), (size, size), mpp=slide.mpp))
    return np.stack(tiles)


def synthetic_tiles(n: int, size: int, seed: int) -> NDArray[np.uint8]:
    """Cytology-like tiles: mostly glass, scattered stained cells with dark nuclei."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        img = rng.normal(238, 5, (size, size, 3)).astype(np.float32)
        for _ in range(40):
            cy, cx = rng.integers(0, size, 2).tolist()
            r = int(rng.integers(20, 60))
            d2 = (yy - cy) ** 2 + (xx - cx) ** 2
            img[d2 < r * r] = rng.choice([[215, 150, 175], [150, 195, 205], [205, 185, 130]])
            img[d2 < (r // 3) ** 2] = rng.uniform(30, 90, 3)
        img += rng.normal(0, 6, img.shape).astype(np.float32)
        out[i] = np.clip(img, 0, 255).astype(np.uint8)
    return out


def timeit(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> list[float]:
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return times


def row(name: str, device: str, stats: str, times: list[float], megapixels: float) -> dict[str, Any]:
    med = statistics.median(times)
    return {
        "implementation": name,
        "device": device,
        "statistics": stats,
        "megapixels": megapixels,
        "seconds_median": med,
        "mp_per_s_median": megapixels / med,
        "seconds_min": min(times),
        "mp_per_s": megapixels / min(times),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiles", type=int, default=8, help="tiles per batch (default 8)")
    p.add_argument("--size", type=int, default=1024, help="tile side in pixels (default 1024)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--htk-tiles", type=int, default=4, help="tiles given to HistomicsTK (it is slow)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable cores)")
    p.add_argument("--slide", type=Path, default=DEFAULT_SLIDE)
    p.add_argument("--synthetic", action="store_true", help="use synthetic tiles even if the slide exists")
    p.add_argument("--no-gpu", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    threads = args.threads or (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    torch.set_num_threads(threads)
    if not args.synthetic and args.slide.is_file():
        tiles = slide_tiles(args.slide, args.tiles, args.size, args.seed)
        source_desc = f"{args.slide.name}: {args.tiles} random {args.size}² crops at native µm/px"
    else:
        tiles = synthetic_tiles(args.tiles, args.size, args.seed)
        source_desc = f"synthetic: {args.tiles} cytology-like {args.size}² tiles"
    mp = tiles.shape[0] * tiles.shape[1] * tiles.shape[2] / 1e6
    batch = torch.from_numpy(tiles)
    glass = stain.glass_mask(batch)
    source = stain.lab_stats(batch, mask=glass)
    rows = [
        row(
            "wsi_screen.stain.reinhard",
            "cpu",
            "slide-level source=",
            timeit(lambda: stain.reinhard(batch, TARGET, source=source), args.repeats),
            mp,
        ),
        row(
            "wsi_screen.stain.reinhard",
            "cpu",
            "per image",
            timeit(lambda: stain.reinhard(batch, TARGET), args.repeats),
            mp,
        ),
        row(
            "wsi_screen.stain.lab_stats + glass_mask",
            "cpu",
            "(computes source)",
            timeit(lambda: stain.lab_stats(batch, mask=stain.glass_mask(batch)), args.repeats),
            mp,
        ),
    ]

    parity: dict[str, Any] = {}
    if version("histomicstk") is not None:
        from histomicstk.preprocessing.color_normalization import reinhard as htk_reinhard

        sub = tiles[: args.htk_tiles]
        sub_mp = sub.shape[0] * sub.shape[1] * sub.shape[2] / 1e6
        mu, sigma = np.array(TARGET.mu), np.array(TARGET.sigma)
        src_mu, src_sigma = list(source.mu), list(source.sigma)
        htk_reps = max(1, min(3, args.repeats))
        rows.append(
            row(
                "histomicstk reinhard",
                "cpu",
                "slide-level source=",
                timeit(
                    lambda: [htk_reinhard(t, mu, sigma, src_mu=src_mu, src_sigma=src_sigma) for t in sub],
                    htk_reps,
                ),
                sub_mp,
            )
        )
        rows.append(
            row(
                "histomicstk reinhard",
                "cpu",
                "per image",
                timeit(lambda: [htk_reinhard(t, mu, sigma) for t in sub], htk_reps),
                sub_mp,
            )
        )
        cases: list[tuple[str, stain.ReinhardStats | None, dict[str, Any]]] = [
            ("slide-level source=", source, {"src_mu": src_mu, "src_sigma": src_sigma}),
            ("per image", None, {}),
        ]
        for name, src, ref_kwargs in cases:
            ours = stain.reinhard(torch.from_numpy(sub), TARGET, source=src).numpy()
            ref = np.stack([htk_reinhard(t, mu, sigma, **ref_kwargs) for t in sub])
            d = np.abs(ours.astype(np.int16) - ref.astype(np.int16))
            parity[name] = {
                "fraction_within_1": float(np.mean(d <= 1)),
                "fraction_equal": float(np.mean(d == 0)),
                "max_abs_diff": int(d.max()),
            }
    else:
        print("histomicstk is not installed: see requirements/histomicstk.sh", file=sys.stderr)

    if torch.cuda.is_available() and not args.no_gpu:
        dev = torch.device("cuda")
        gpu = batch.to(dev)
        sync = torch.cuda.synchronize
        gname = torch.cuda.get_device_name(0)
        rows.append(
            row(
                "wsi_screen.stain.reinhard",
                gname,
                "slide-level source=",
                timeit(lambda: stain.reinhard(gpu, TARGET, source=source), args.repeats, sync),
                mp,
            )
        )
        rows.append(
            row(
                "wsi_screen.stain.reinhard",
                gname,
                "per image",
                timeit(lambda: stain.reinhard(gpu, TARGET), args.repeats, sync),
                mp,
            )
        )
        rows.append(
            row(
                "wsi_screen.stain.reinhard incl. host↔device copies",
                gname,
                "slide-level source=",
                timeit(
                    lambda: stain.reinhard(
                        batch.pin_memory().to(dev, non_blocking=True), TARGET, source=source
                    ).cpu(),
                    args.repeats,
                    sync,
                ),
                mp,
            )
        )
        ours_gpu = stain.reinhard(gpu, TARGET).cpu().numpy()
        ours_cpu = stain.reinhard(batch, TARGET).numpy()
        d = np.abs(ours_gpu.astype(np.int16) - ours_cpu.astype(np.int16))
        parity["gpu vs cpu (per image)"] = {
            "fraction_within_1": float(np.mean(d <= 1)),
            "fraction_equal": float(np.mean(d == 0)),
            "max_abs_diff": int(d.max()),
        }

    htk_rate = {r["statistics"]: r["mp_per_s"] for r in rows if r["implementation"].startswith("histomicstk")}
    hw = hardware(threads)
    print(
        f"\nTiles: {source_desc}. CPU: {hw['cpu']}, {hw['usable_cpus']} usable cores, "
        f"{threads} torch threads; torch {hw['torch']}, histomicstk {hw['histomicstk']}"
        + (f"; GPU: {hw['gpu']}" if "gpu" in hw else "")
        + "\n"
    )
    print("| implementation | device | statistics | MP/s (best) | ms per tile | vs HistomicsTK |")
    print("|---|---|---|---:|---:|---:|")
    for r in rows:
        per_tile = r["seconds_min"] / (r["megapixels"] / (args.size * args.size / 1e6)) * 1e3
        htk = htk_rate.get(r["statistics"])
        speedup = (
            f"{r['mp_per_s'] / htk:.0f}×" if htk and not r["implementation"].startswith("histomicstk") else ""
        )
        print(
            f"| {r['implementation']} | {r['device']} | {r['statistics']} | {r['mp_per_s']:.1f} | "
            f"{per_tile:.1f} | {speedup} |"
        )
    for name, pr in parity.items():
        print(
            f"\nParity ({name}): {pr['fraction_within_1']:.6%} within 1 grey level, "
            f"{pr['fraction_equal']:.4%} equal, max diff {pr['max_abs_diff']}"
        )
    if args.out:
        result = {
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "tiles": source_desc,
            "tile_size": args.size,
            "n_tiles": args.tiles,
            "repeats": args.repeats,
            "target": TARGET.to_dict(),
            "source": source.to_dict(),
            "hardware": hw,
            "results": rows,
            "parity_vs_histomicstk": parity,
        }
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
