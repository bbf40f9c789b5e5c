#!/usr/bin/env python
"""Train and evaluate a cell classifier end to end, twice, with the commands a lab would run.

1. **Synthetic slides** — ``wsi-screen train classifier --synthetic N`` cuts the cells of N synthetic
   slides through the inference path (U-Net ``nuclei-unet-v1``) and labels them from the exact
   ground truth; ``wsi-screen evaluate --synthetic M --synthetic-seed S`` scores the bundle on slides
   drawn with other seeds.
2. **A QuPath annotation fixture** — synthetic slides plus their ground truth written as QuPath
   GeoJSON exports, as a lab would export them: abnormal cells as polygon annotations, normal cells
   and inflammatory cells as point annotations (one MultiPoint per class), lab-style class names
   mapped to the bundle classes by a ``--class-map`` file. ``wsi-screen train classifier
   --annotations ... --slides ...`` trains on three slides; ``wsi-screen evaluate`` scores the bundle
   (and the shipped ``cyto-synth-v1``) on a fourth, held-out slide.

Every step writes its metrics (``metrics.json`` + ``report.html``); ``summary.json`` collects the
headline figures. The commands are printed as they run.

    flock /tmp/wsi-cpu.lock python pipelines/train_eval_demo.py -o runs/train-eval-demo   # ≈ 10–15 min
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

#: Lab-style QuPath class names of the fixture and the bundle class each maps to.
LAB_CLASSES = {
    "NILM": "Negative",
    "ASC-US": "ASC-US",
    "LSIL": "LSIL (koilocyte)",
    "HSIL": "HSIL",
    "artifact": "Inflammatory / debris",
}


def run(cmd: list[str]) -> None:
    """Run a ``wsi-screen`` command, echoing it first."""
    print("\n$ wsi-screen " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run([sys.executable, "-m", "wsi_screen", *cmd], check=True)


def headline(metrics_json: Path) -> dict[str, Any]:
    from wsi_screen.metrics import headline_metrics

    m = json.loads(metrics_json.read_text())
    return {"n": m["n"], "class_names": m["class_names"], **headline_metrics(m)}


def write_fixture(root: Path, *, n_slides: int, size: int, seed: int) -> list[Path]:
    """Synthetic slides + QuPath GeoJSON exports of their truth + a class-map file."""
    import yaml

    from wsi_screen.synth import synthesize_slide
    from wsi_screen.train.data import truth_to_qupath

    slides = root / "slides"
    ann = root / "annotations"
    slides.mkdir(parents=True, exist_ok=True)
    ann.mkdir(parents=True, exist_ok=True)
    stains = ["default", "pale", "blue", "dark"]
    out = []
    for i in range(n_slides):
        name = f"{'test' if i == n_slides - 1 else 'train'}-{i:02d}"
        path = slides / f"{name}.tiff"
        res = synthesize_slide(
            path,
            size=(size, size),
            seed=seed + i,
            abnormal={"ASC-US": 18, "LSIL": 18, "HSIL": 18},
            stain=stains[i % len(stains)],
            workers=1,
            write_truth=False,
        )
        fc = truth_to_qupath(res.truth, geometry="mixed")
        for feat in fc["features"]:
            cls = feat["properties"]["classification"]
            cls["name"] = LAB_CLASSES[cls["name"]]
        (ann / f"{path.name}.geojson").write_text(json.dumps(fc))  # QuPath names exports after the image
        out.append(path)
    cmap = {"name": "demo-lab", "classes": {v: k for k, v in LAB_CLASSES.items()}}
    (root / "class-map.yaml").write_text(yaml.safe_dump(cmap, sort_keys=False))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-o", "--out", type=Path, default=ROOT / "runs" / "train-eval-demo")
    p.add_argument("--synthetic", type=int, default=8, help="synthetic training slides")
    p.add_argument("--synthetic-test", type=int, default=3, help="synthetic test slides (other seeds)")
    p.add_argument("--size", type=int, default=3072, help="slide side, px at 0.25 µm/px")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--arch", default="mobilenetv3_small_050")
    args = p.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    common = [
        "--arch", args.arch, "--epochs", str(args.epochs), "--samples-per-epoch", "2048",
        "--batch-size", "48", "--device", "cpu", "--patience", "4",
    ]  # fmt: skip
    summary: dict[str, Any] = {"command": " ".join(["python", *map(shlex.quote, sys.argv)])}

    # 1. synthetic slides through the inference path
    cache = str(out / "synthetic-crops")
    run(
        [
            "train", "classifier", "--synthetic", str(args.synthetic), "--synthetic-seed", "21",
            "--synthetic-size", str(args.size), "--cache", cache, "-o", str(out / "models" / "synth-demo"),
            "--work-dir", str(out / "work" / "synth-demo"), *common,
        ]
    )  # fmt: skip
    run(
        [
            "evaluate", "--model", str(out / "models" / "synth-demo"),
            "--synthetic", str(args.synthetic_test), "--synthetic-seed", "22",
            "--synthetic-size", str(args.size), "--cache", cache,
            "-o", str(out / "eval" / "synth-demo-on-synthetic"),
        ]
    )  # fmt: skip
    summary["synthetic"] = {
        "train_slides": args.synthetic,
        "test_slides": args.synthetic_test,
        "test": headline(out / "eval" / "synth-demo-on-synthetic" / "metrics.json"),
    }

    # 2. the QuPath annotation fixture
    fixture = out / "qupath"
    write_fixture(fixture, n_slides=4, size=args.size, seed=31)
    ann = fixture / "annotations"
    cmap = str(fixture / "class-map.yaml")
    run(
        [
            "train", "classifier", "--annotations", str(ann / "train-*.geojson"),
            "--slides", str(fixture / "slides"), "--class-map", cmap, "--val-fraction", "0.3",
            "--test-fraction", "0", "-o", str(out / "models" / "qupath-demo"),
            "--work-dir", str(out / "work" / "qupath-demo"), *common,
        ]
    )  # fmt: skip
    test_args = [
        "--annotations",
        str(ann / "test-*.geojson"),
        "--slides",
        str(fixture / "slides"),
        "--class-map",
        cmap,
    ]
    run(
        [
            "evaluate",
            "--model",
            str(out / "models" / "qupath-demo"),
            *test_args,
            "-o",
            str(out / "eval" / "qupath-demo"),
        ]
    )
    run(
        [
            "evaluate",
            "--model",
            "cyto-synth-v1",
            *test_args,
            "-o",
            str(out / "eval" / "cyto-synth-v1-on-qupath"),
        ]
    )
    summary["qupath"] = {
        "train_slides": 3,
        "test_slides": 1,
        "test": headline(out / "eval" / "qupath-demo" / "metrics.json"),
        "cyto_synth_v1_on_test": headline(out / "eval" / "cyto-synth-v1-on-qupath" / "metrics.json"),
    }
    summary["minutes"] = round((time.perf_counter() - t0) / 60, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
