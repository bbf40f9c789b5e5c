"""Peak memory of ``wsi-screen run`` on a synthetic slide and on one with 4× the area.

    python pipelines/bench_memory.py --sizes 8192 16384 --out bench_memory.json
    python pipelines/bench_memory.py --no-heap-tuning --out before.json   # glibc's dynamic threshold

Each slide is synthesized (same density of cells, so the larger one has about 4× the cells and
tiles), then screened by ``wsi-screen run`` in its own subprocess; the child's peak resident set
size comes from ``os.wait4`` (``ru_maxrss``: that process and its waited-for children only), and
``/proc/<pid>/status`` is sampled for the RSS over time. The design promise is that memory is
bounded by the queues, not by the slide: the peak may grow by less than 25 % from the first size
to the last (``--limit``); the script exits 1 when it grows more.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from wsi_screen.synth import synthesize_slide

#: Child entry point with a fixed mmap threshold (M_MMAP_THRESHOLD = -3), then the normal CLI.
MALLOPT = (
    "import ctypes, sys; ctypes.CDLL('libc.so.6').mallopt(-3, {}); "
    "sys.argv[0] = 'wsi-screen'; from wsi_screen.cli.main import main; main()"
)


def rss_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def measure(cmd: list[str], *, sample_s: float = 0.25, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; return its peak RSS (MiB, from wait4) and sampled RSS trace."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    samples: list[tuple[float, float]] = []
    done = threading.Event()

    def sampler() -> None:
        while not done.is_set():
            kib = rss_kib(proc.pid)
            if kib is not None:
                samples.append((round(time.perf_counter() - t0, 2), round(kib / 1024, 1)))
            done.wait(sample_s)

    thread = threading.Thread(target=sampler, daemon=True)
    thread.start()
    assert proc.stdout is not None
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-3000:]}")
    return {
        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # Linux: KiB
        "wall_s": round(time.perf_counter() - t0, 2),
        "samples": samples,
        "output_tail": output[-600:],
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=0, help="reader threads (0 = one per CPU)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = one per CPU)")
    ap.add_argument("--limit", type=float, default=0.25, help="allowed relative growth of the peak")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra --set KEY=VALUE")
    ap.add_argument(
        "--mmap-threshold",
        type=int,
        default=None,
        metavar="BYTES",
        help="call glibc mallopt(M_MMAP_THRESHOLD, BYTES) in the child before anything else "
        "(default: the process as shipped, which fixes it at 4 MiB when it loads the models)",
    )
    ap.add_argument(
        "--no-heap-tuning",
        action="store_true",
        help="run the child with WSI_SCREEN_HEAP_TUNING=0 (glibc's dynamic mmap threshold, as before "
        "runtime.limit_heap_growth existed)",
    )
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    results = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp_name:
        work = args.workdir or Path(tmp_name)
        work.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            slide = work / f"mem-{size}.tiff"
            if not slide.exists():
                t0 = time.perf_counter()
                synth = synthesize_slide(slide, size=(size, size), seed=args.seed, abnormal="HSIL=10,LSIL=10")
                print(f"synthesized {slide.name} ({synth.level_dimensions[0]}) in "
                      f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)  # fmt: skip
            entry = ["-m", "wsi_screen"]
            if args.mmap_threshold is not None:
                entry = ["-c", MALLOPT.format(args.mmap_threshold)]
            cmd = [
                sys.executable, *entry, "run", str(slide), "-o", str(work / "out"), "-q",
                "--device", args.device, "--workers", str(args.workers),
                "--set", f"runtime.torch_threads={args.threads}",
            ]  # fmt: skip
            for o in args.overrides:
                cmd += ["--set", o]
            env = {**os.environ, "WSI_SCREEN_HEAP_TUNING": "0"} if args.no_heap_tuning else None
            m = measure(cmd, env=env)
            run = json.loads((work / "out" / slide.stem / "run.json").read_text())
            m.update(
                size=size,
                megapixels=size * size / 1e6,
                tiles=run["tiles"]["processed"],
                cells=run["n_cells"],
                command=" ".join(cmd),
            )
            results.append(m)
            print(
                f"{size}²: peak RSS {m['peak_rss_mib']:.0f} MiB, {m['tiles']} tiles, {m['cells']} cells, "
                f"{m['wall_s']:.0f} s",
                file=sys.stderr,
            )
    first, last = results[0], results[-1]
    growth = last["peak_rss_mib"] / first["peak_rss_mib"] - 1.0
    report = {
        "growth": round(growth, 4),
        "limit": args.limit,
        "ok": growth < args.limit,
        "host": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "runs": results,
    }
    print(
        "\n| slide | tiles | cells | peak RSS (MiB) | wall (s) |\n|---|---:|---:|---:|---:|\n"
        + "\n".join(
            f"| {r['size']}×{r['size']} | {r['tiles']} | {r['cells']} | {r['peak_rss_mib']:.0f} "
            f"| {r['wall_s']:.0f} |"
            for r in results
        )
        + f"\n\ngrowth of the peak: {growth:+.1%} (limit {args.limit:.0%})"
    )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
