"""Write the one split manifest of every real source in ``../shared/data``: ``pipelines/splits/real.json``.

    python pipelines/make_splits.py            # rewrites pipelines/splits/real.json (deterministic)
    python pipelines/make_splits.py --check    # exits 1 when the committed manifest is stale

Every model issue (localization, classifier, triage) uses this manifest: train on ``train``, choose
on ``val``, report on ``test``, which nothing is tuned on. Units that must stay together are split
as a whole, by a SHA-256 hash of the unit id (stable across machines and Python versions):

- ``herlev``: by **group** (the first number of the Herlev name: one source image);
- ``herlev_severe_fine``: follows the Herlev group of the same cell;
- ``lbc_nuclei``: by **field** (the number at the end of the name; rotated/flipped copies share it);
- ``cnseg``: by the **trailing number** (``barrdistorted_*_<id>`` are distorted copies of ``<id>``);
- ``isbi2014``: images 01–30 train, 31–35 val, 36–45 test (36–45 were always the held-out part);
- ``lbc_cells``: by **crop** (the source gives no slide or group ids, so crops of one slide may fall
  on both sides: every figure on it must say so).

Fractions: 60 % train, 15 % val, 25 % test of the units (Herlev's test part must hold enough cells
per class for Wilson intervals that mean something).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
OUT = ROOT / "pipelines" / "splits" / "real.json"
FRACTIONS = (("train", 0.60), ("val", 0.15), ("test", 0.25))


def part_of(source: str, unit: str) -> str:
    """The split of ``unit`` of ``source``: a uniform hash in [0, 1) against the cumulative fractions."""
    from wsi_screen.train.fields import unit_hash

    h = unit_hash(f"{source}:{unit}")
    acc = 0.0
    for name, frac in FRACTIONS:
        acc += frac
        if h < acc:
            return name
    return FRACTIONS[-1][0]


def trailing_number(stem: str) -> str:
    m = re.search(r"(\d+)$", stem)
    if m is None:
        raise ValueError(f"no trailing number in {stem!r}")
    return m.group(1)


def build(data: Path) -> dict[str, object]:
    sources: dict[str, dict[str, object]] = {}
    # Herlev: group = first number of the name.
    herlev: dict[str, dict[str, str]] = {}
    group_of: dict[str, str] = {}
    with open(data / "herlev" / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            stem = Path(row["file"]).stem
            group_of[stem] = row["group"]
            herlev[row["file"]] = {"group": row["group"], "split": part_of("herlev", row["group"])}
    sources["herlev"] = {"unit": "group", "files": herlev}
    fine = {}
    for p in sorted((data / "herlev-masks" / "severe-fine" / "images").glob("*.png")):
        g = group_of.get(p.stem) or p.stem.split("-")[0]
        fine[p.name] = {"group": g, "split": part_of("herlev", g)}
    sources["herlev_severe_fine"] = {"unit": "herlev group", "files": fine}
    lbc = {}
    for p in sorted((data / "lbc-nuclei" / "images").iterdir()):
        f = trailing_number(p.stem)
        lbc[p.name] = {"group": f, "split": part_of("lbc_nuclei", f)}
    sources["lbc_nuclei"] = {"unit": "field", "files": lbc}
    cn = {}
    for sub in ("clustered", "nuclei"):
        for p in sorted((data / "cnseg" / sub / "images").iterdir()):
            f = trailing_number(p.stem)
            cn[f"{sub}/{p.name}"] = {"group": f, "split": part_of("cnseg", f)}
    sources["cnseg"] = {"unit": "trailing number", "files": cn}
    isbi = {}
    for p in sorted((data / "isbi2014" / "images").glob("*.png")):
        i = int(p.stem)
        isbi[p.name] = {"group": p.stem, "split": "train" if i <= 30 else "val" if i <= 35 else "test"}
    sources["isbi2014"] = {"unit": "image (01–30 / 31–35 / 36–45)", "files": isbi}
    cells = {}
    for d in sorted(p for p in (data / "lbc-cells").iterdir() if p.is_dir()):
        for p in sorted(d.iterdir()):
            key = f"{d.name}/{p.name}"
            cells[key] = {"group": key, "split": part_of("lbc_cells", key)}
    sources["lbc_cells"] = {"unit": "crop (no group ids in the source)", "files": cells}
    summary = {}
    for name, src in sources.items():
        files = src["files"]
        assert isinstance(files, dict)
        counts = {k: sum(1 for v in files.values() if v["split"] == k) for k, _ in FRACTIONS}
        summary[name] = counts
    return {
        "format_version": 1,
        "description": "Grouped train/val/test split of every real source in ../shared/data "
        "(pipelines/make_splits.py). Test parts are for final figures only.",
        "fractions": dict(FRACTIONS),
        "counts": summary,
        "sources": sources,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--check", action="store_true", help="fail when the committed manifest differs")
    args = p.parse_args(argv)
    text = json.dumps(build(args.data), indent=1, ensure_ascii=False) + "\n"
    if args.check:
        same = OUT.is_file() and OUT.read_text() == text
        print("split manifest is current" if same else f"{OUT} is stale: run python pipelines/make_splits.py")
        return 0 if same else 1
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT}")
    print(json.dumps(json.loads(text)["counts"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
