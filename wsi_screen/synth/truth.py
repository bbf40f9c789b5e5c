"""Exact ground truth of a synthetic slide, in memory and as ``<slide stem>.truth.json``.

Coordinates are level-0 pixels (x right, y down, pixel i covers [i, i+1)); polygons are closed
implicitly (the first vertex is not repeated) and rounded to 0.1 px in the JSON file.

JSON layout (``format: "wsi-screen-synth-truth/1"``)::

    {"format": ..., "slide": "a.tiff", "width": W, "height": H, "mpp": 0.25, "seed": 0,
     "preparation": "lbc", "stain": "default", "spot": [cx, cy, r] | null,
     "class_names": [...], "counts": {class: n}, "kind_counts": {kind: n},
     "objects": [{"id": 0, "x": .., "y": .., "class": "HSIL", "kind": "hsil",
                  "cell": [[x, y], ...], "cell_area_um2": ..,
                  "nucleus": [[x, y], ...], "nucleus_area_um2": .., "nucleus_xy": [x, y],
                  "extra_nuclei": [[[x, y], ...]],            # binucleate cells only
                  "blurred": false, "blur_um": 0.0, "cluster": 3}]}   # cluster: grouped cells only

``nucleus``/``nucleus_area_um2``/``nucleus_xy`` are absent for anucleate objects (debris, mucus).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from wsi_screen.synth.cells import CLASS_NAMES, KINDS, CellGeometry, polygon_area, polygon_centroid

__all__ = ["TRUTH_FORMAT", "SlideTruth", "TruthObject", "load_truth", "truth_path_for"]

TRUTH_FORMAT = "wsi-screen-synth-truth/1"


def truth_path_for(slide_path: str | os.PathLike[str]) -> Path:
    """Where the truth of ``slide_path`` lives: ``a/b/slide.tiff`` → ``a/b/slide.truth.json``."""
    p = Path(slide_path)
    return p.with_name(p.stem + ".truth.json")


@dataclass(frozen=True, eq=False)
class TruthObject:
    """Ground truth of one object (polygons: (K, 2) float arrays of level-0 x, y)."""

    id: int
    x: float
    y: float
    klass: str
    kind: str
    cell: NDArray[np.float64]
    cell_area_um2: float
    nucleus: NDArray[np.float64] | None
    nucleus_area_um2: float | None
    nucleus_xy: tuple[float, float] | None
    extra_nuclei: tuple[NDArray[np.float64], ...] = ()
    blurred: bool = False
    blur_um: float = 0.0
    cluster: int | None = None

    @classmethod
    def from_geometry(cls, index: int, geom: CellGeometry, mpp: float) -> TruthObject:
        """Truth of the object ``index`` drawn from ``geom``."""
        px_um2 = mpp * mpp
        nucleus = geom.nuclei[0] if geom.nuclei else None
        return cls(
            id=index,
            x=float(geom.spec.x),
            y=float(geom.spec.y),
            klass=geom.klass,
            kind=geom.spec.kind,
            cell=geom.cell,
            cell_area_um2=polygon_area(geom.cell) * px_um2,
            nucleus=nucleus,
            nucleus_area_um2=None if nucleus is None else polygon_area(nucleus) * px_um2,
            nucleus_xy=None if nucleus is None else polygon_centroid(nucleus),
            extra_nuclei=tuple(geom.nuclei[1:]),
            blurred=geom.spec.blur_um > 0,
            blur_um=float(geom.spec.blur_um),
            cluster=geom.spec.cluster,
        )

    def to_dict(self) -> dict[str, Any]:
        """Compact JSON-ready dict (polygons rounded to 0.1 px, areas to 0.01 µm²)."""
        out: dict[str, Any] = {
            "id": self.id,
            "x": round(self.x, 2),
            "y": round(self.y, 2),
            "class": self.klass,
            "kind": self.kind,
            "cell": _poly_json(self.cell),
            "cell_area_um2": round(self.cell_area_um2, 2),
        }
        if self.nucleus is not None and self.nucleus_xy is not None:
            out["nucleus"] = _poly_json(self.nucleus)
            out["nucleus_area_um2"] = round(float(self.nucleus_area_um2 or 0.0), 2)
            out["nucleus_xy"] = [round(self.nucleus_xy[0], 2), round(self.nucleus_xy[1], 2)]
        if self.extra_nuclei:
            out["extra_nuclei"] = [_poly_json(p) for p in self.extra_nuclei]
        out["blurred"] = self.blurred
        if self.blurred:
            out["blur_um"] = round(self.blur_um, 3)
        if self.cluster is not None:
            out["cluster"] = self.cluster
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TruthObject:
        nucleus = d.get("nucleus")
        xy = d.get("nucleus_xy")
        return cls(
            id=int(d["id"]),
            x=float(d["x"]),
            y=float(d["y"]),
            klass=str(d["class"]),
            kind=str(d["kind"]),
            cell=np.asarray(d["cell"], dtype=np.float64),
            cell_area_um2=float(d["cell_area_um2"]),
            nucleus=None if nucleus is None else np.asarray(nucleus, dtype=np.float64),
            nucleus_area_um2=None if nucleus is None else float(d["nucleus_area_um2"]),
            nucleus_xy=None if xy is None else (float(xy[0]), float(xy[1])),
            extra_nuclei=tuple(np.asarray(p, dtype=np.float64) for p in d.get("extra_nuclei", [])),
            blurred=bool(d.get("blurred", False)),
            blur_um=float(d.get("blur_um", 0.0)),
            cluster=None if d.get("cluster") is None else int(d["cluster"]),
        )


def _poly_json(poly: NDArray[np.float64]) -> list[list[float]]:
    rounded: list[list[float]] = np.round(poly, 1).tolist()
    return rounded


@dataclass(frozen=True, eq=False)
class SlideTruth:
    """Ground truth of a whole slide."""

    slide: str
    width: int
    height: int
    mpp: float
    seed: int
    preparation: str
    stain: str
    spot: tuple[float, float, float] | None
    objects: tuple[TruthObject, ...]

    def class_counts(self) -> dict[str, int]:
        counts = Counter(o.klass for o in self.objects)
        return {k: counts.get(k, 0) for k in CLASS_NAMES}

    def kind_counts(self) -> dict[str, int]:
        counts = Counter(o.kind for o in self.objects)
        return {k: counts.get(k, 0) for k in KINDS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": TRUTH_FORMAT,
            "slide": self.slide,
            "width": self.width,
            "height": self.height,
            "mpp": self.mpp,
            "seed": self.seed,
            "preparation": self.preparation,
            "stain": self.stain,
            "spot": None if self.spot is None else [round(v, 2) for v in self.spot],
            "class_names": list(CLASS_NAMES),
            "counts": self.class_counts(),
            "kind_counts": self.kind_counts(),
            "objects": [o.to_dict() for o in self.objects],
        }

    def write(self, path: str | os.PathLike[str]) -> Path:
        """Write compact JSON (atomically: a temporary sibling, then rename)."""
        p = Path(path)
        tmp = p.with_name(p.name + ".part")
        tmp.write_text(json.dumps(self.to_dict(), separators=(",", ":")), encoding="utf-8")
        os.replace(tmp, p)
        return p

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SlideTruth:
        if d.get("format") != TRUTH_FORMAT:
            raise ValueError(f"not a synthetic-slide truth file (format {d.get('format')!r})")
        spot = d.get("spot")
        return cls(
            slide=str(d["slide"]),
            width=int(d["width"]),
            height=int(d["height"]),
            mpp=float(d["mpp"]),
            seed=int(d["seed"]),
            preparation=str(d["preparation"]),
            stain=str(d["stain"]),
            spot=None if spot is None else (float(spot[0]), float(spot[1]), float(spot[2])),
            objects=tuple(TruthObject.from_dict(o) for o in d["objects"]),
        )


def load_truth(path: str | os.PathLike[str]) -> SlideTruth:
    """Read a ``.truth.json`` file (or the truth beside a slide, given the slide's path)."""
    p = Path(path)
    if not p.name.endswith(".json"):
        p = truth_path_for(p)
    return SlideTruth.from_dict(json.loads(p.read_text(encoding="utf-8")))
