"""Reading QuPath GeoJSON: the classified cells of an annotation export (training, evaluation).

The writer of the pipeline's own GeoJSON is :mod:`wsi_screen.geojson`.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wsi_screen.errors import DataError

__all__ = ["Annotation", "read_qupath_geojson"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Annotation:
    """One labelled cell from a QuPath export: its centre in level-0 px and its class name."""

    x: float
    y: float
    label: str
    geometry: str
    object_type: str


_ACCEPTED_OBJECT_TYPES = frozenset({"annotation", "detection", "cell", ""})


def _class_name(props: Mapping[str, Any]) -> str | None:
    c = props.get("classification")
    if isinstance(c, Mapping):
        name = c.get("name")
        if name is None and isinstance(c.get("names"), list):
            name = ": ".join(str(n) for n in c["names"])
        return str(name).strip() if name else None
    if isinstance(c, str) and c.strip():
        return c.strip()
    return None


def _centres(geom: Mapping[str, Any]) -> tuple[str, list[tuple[float, float]]]:
    """(geometry type, centres) of a GeoJSON geometry: points as they are, polygons' centroids."""
    from shapely.geometry import shape

    gtype = str(geom.get("type", ""))
    coords = geom.get("coordinates")
    if gtype == "Point":
        return gtype, [(float(coords[0]), float(coords[1]))]  # type: ignore[index]
    if gtype == "MultiPoint":
        return gtype, [(float(c[0]), float(c[1])) for c in coords]  # type: ignore[union-attr]
    if gtype in ("Polygon", "MultiPolygon"):
        poly = shape(geom)
        if poly.is_empty or poly.area <= 0:
            return gtype, []
        if gtype == "MultiPolygon":
            return gtype, [(float(p.centroid.x), float(p.centroid.y)) for p in poly.geoms if p.area > 0]
        return gtype, [(float(poly.centroid.x), float(poly.centroid.y))]
    return gtype, []


def read_qupath_geojson(path: str | os.PathLike[str]) -> list[Annotation]:
    """The classified point and polygon objects of a QuPath GeoJSON export (``.geojson[.gz]``).

    Accepts a FeatureCollection, a single Feature or a bare array of features (QuPath writes all
    three); ``objectType`` annotation, detection or cell (a cell's ``nucleusGeometry`` gives its
    centre). Points and MultiPoints give one cell per point, Polygons and MultiPolygons one cell at each
    polygon's centroid. Unclassified objects and other geometries (lines, ...) are skipped and counted
    in the log. Raises :class:`DataError` when the file cannot be read or holds no classified cell.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"annotation file not found: {p}")
    try:
        if p.suffix.lower() == ".gz":
            with gzip.open(p, "rt", encoding="utf-8") as fh:
                data = json.load(fh)
        else:
            data = json.loads(p.read_text(encoding="utf-8-sig"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, EOFError) as exc:
        raise DataError(f"{p}: not valid GeoJSON ({' '.join(str(exc).split())[:160]})") from exc
    if isinstance(data, Mapping) and data.get("type") == "Feature":
        features: Any = [data]
    elif isinstance(data, Mapping) and isinstance(data.get("features"), list):
        features = data["features"]
    elif isinstance(data, list):
        features = data
    else:
        raise DataError(f"{p}: not a GeoJSON FeatureCollection, Feature or array of features")
    out: list[Annotation] = []
    skipped: Counter[str] = Counter()
    for feat in features:
        if not isinstance(feat, Mapping):
            skipped["not a feature"] += 1
            continue
        props = feat.get("properties") or {}
        otype = str(props.get("objectType", "")).lower()
        if otype not in _ACCEPTED_OBJECT_TYPES:
            skipped[f"objectType {otype}"] += 1
            continue
        label = _class_name(props)
        if label is None:
            skipped["unclassified"] += 1
            continue
        geom = feat.get("nucleusGeometry") or feat.get("geometry")
        if not isinstance(geom, Mapping):
            skipped["no geometry"] += 1
            continue
        try:
            gtype, centres = _centres(geom)
        except (TypeError, ValueError, IndexError, KeyError) as exc:
            raise DataError(f"{p}: malformed {geom.get('type')} geometry ({exc})") from exc
        if not centres:
            skipped[f"{gtype or 'unknown'} geometry"] += 1
            continue
        out += [Annotation(x, y, label, gtype, otype or "annotation") for x, y in centres]
    if skipped:
        logger.info("%s: skipped %s", p.name, dict(skipped))
    if not out:
        why = f" (skipped: {dict(skipped)})" if skipped else ""
        raise DataError(f"{p}: no classified point or polygon annotations{why}")
    return out
