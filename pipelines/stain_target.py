"""The default Reinhard target: lαβ statistics of real Papanicolaou-stained cells (Herlev).

    python pipelines/stain_target.py                      # ../shared/data/herlev
    python pipelines/stain_target.py --herlev DIR --json stain_target.json

Every crop listed in ``manifest.csv`` is read as RGB; its background glass (``stain.glass_mask``:
bright, unsaturated pixels) is left out, and the remaining (stained-cell) pixels of all crops are pooled
into one mean and standard deviation per lαβ channel (``stain.lab_stats``), so large crops weigh more,
like the pixels of a slide. The printed ``ReinhardStats(...)`` is what ``wsi_screen.stain.DEFAULT_TARGET``
holds; every shipped bundle stores it as ``stain_target``.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from wsi_screen import stain

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_HERLEV = ROOT.parent / "shared" / "data" / "herlev"


def cell_pixels(herlev: Path) -> tuple[np.ndarray, int]:
    """All non-glass pixels (N, 3) uint8 of the Herlev crops, and the number of crops read."""
    rows = list(csv.DictReader((herlev / "manifest.csv").open(encoding="utf-8")))
    parts = []
    for row in rows:
        with Image.open(herlev / row["file"]) as im:
            rgb = np.asarray(im.convert("RGB"))
        glass = stain.glass_mask(rgb).numpy()
        parts.append(rgb[~glass])
    return np.concatenate(parts), len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--herlev", type=Path, default=DEFAULT_HERLEV, help="Herlev folder with manifest.csv")
    p.add_argument("--json", type=Path, default=None, help="also write the statistics here")
    args = p.parse_args(argv)
    if not (args.herlev / "manifest.csv").is_file():
        print(f"no manifest.csv in {args.herlev}", file=sys.stderr)
        return 1
    pixels, n = cell_pixels(args.herlev)
    stats = stain.lab_stats(pixels.reshape(1, 1, -1, 3))
    mu = tuple(round(v, 4) for v in stats.mu)
    sigma = tuple(round(v, 4) for v in stats.sigma)
    print(f"{n} Herlev crops, {len(pixels):,} stained-cell pixels (glass masked)")
    print(f"DEFAULT_TARGET = ReinhardStats(mu={mu}, sigma={sigma})")
    if args.json:
        args.json.write_text(json.dumps({"mu": mu, "sigma": sigma, "crops": n, "pixels": len(pixels)}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
