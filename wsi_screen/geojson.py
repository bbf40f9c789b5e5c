"""QuPath-compatible GeoJSON (and CSV) export of the cells a reviewer should see.

Conventions, checked against QuPath's own reader/writer (``qupath-core``: ``PathObjectTypeAdapters`` /
``QuPathTypeAdapters``, ``GsonTools.PathClassTypeAdapter``, ``ROITypeAdapters``, ``PathIO``; see
``docs/qupath.md``):

* a ``FeatureCollection`` of ``Feature`` objects with key order ``type, id, geometry,
  [nucleusGeometry], properties`` as QuPath writes them;
* ``id`` is a UUID (QuPath keeps an ``id`` only if ``UUID.fromString`` accepts it): here
  ``uuid5(namespace, "<slide fingerprint>:<cell index>")``, so re-exports give the same ids;
* ``properties.objectType`` is ``"detection"`` (light-weight) or ``"cell"``; a cell's nucleus is the
  top-level ``nucleusGeometry`` and its ``geometry`` the cell boundary;
* ``properties.classification`` is ``{"name": ..., "color": [r, g, b]}`` (QuPath's reader needs
  both keys to use the colour);
* ``properties.measurements`` is a flat ``{name: number}`` map; NaN values are left out so the file
  is strict JSON;
* coordinates are level-0 pixels, origin top-left, rounded to 0.01 px (QuPath writes 2 decimals);
  polygons are closed, valid (repaired with ``make_valid``), at least 4 positions, and clipped to
  the slide.
"""

from __future__ import annotations

import csv
import gzip as gzip_module
import hashlib
import io
import json
import logging
import math
import os
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, Literal

import numpy as np
from numpy.typing import NDArray

from wsi_screen import __version__
from wsi_screen.cells import CellTable, abnormality_score, predicted_labels
from wsi_screen.errors import WsiScreenError

__all__ = [
    "CELL_ID_NAMESPACE",
    "CLASS_COLORS",
    "ExportError",
    "cell_id",
    "cells_to_features",
    "class_color",
    "export_store",
    "select_cells",
    "store_slide_info",
    "write_csv",
    "write_geojson",
]

logger = logging.getLogger(__name__)

ObjectType = Literal["detection", "cell"]

#: Namespace of the per-cell UUIDs (``uuid5(NAMESPACE_URL, "wsi-screen:cell")``, fixed forever).
CELL_ID_NAMESPACE = uuid.UUID("5e619639-0b3e-5b57-8b90-4c60852bd565")

#: Fixed display colour of each Bethesda class (RGB), from benign green to malignant dark red.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "NILM": (67, 160, 71),
    "ASC-US": (251, 192, 45),
    "LSIL": (245, 124, 0),
    "ASC-H": (229, 57, 53),
    "HSIL": (198, 40, 40),
    "SCC": (123, 31, 162),
    "AGC": (2, 136, 209),
    "organism": (0, 137, 123),
    "endocervical": (104, 159, 56),
    "artifact": (117, 117, 117),
}

#: Decimals of exported coordinates (QuPath's own GeoJSON writer uses 2).
_GRID = 0.01
#: Radius of the stand-in circle when a cell has no usable outline, µm (px when µm/px is unknown).
_FALLBACK_RADIUS_UM = 3.0
_FALLBACK_RADIUS_PX = 12.0


class ExportError(WsiScreenError, ValueError):
    """An export request cannot be met (unknown class name, bad threshold, ...)."""


def class_color(name: str) -> tuple[int, int, int]:
    """The fixed colour of a class; classes outside :data:`CLASS_COLORS` get a stable hashed colour."""
    if name in CLASS_COLORS:
        return CLASS_COLORS[name]
    import colorsys

    hue = int.from_bytes(hashlib.sha256(name.encode()).digest()[:2], "big") / 65536.0
    r, g, b = colorsys.hsv_to_rgb(hue, 0.65, 0.85)
    return round(r * 255), round(g * 255), round(b * 255)


def cell_id(slide_id: str, index: int) -> str:
    """Deterministic UUID of cell ``index`` of a slide (uuid5 of the slide fingerprint and index)."""
    return str(uuid.uuid5(CELL_ID_NAMESPACE, f"{slide_id}:{int(index)}"))


def select_cells(
    cells: CellTable,
    *,
    class_names: Sequence[str],
    abnormal_classes: Sequence[str],
    min_score: float = 0.5,
    classes: Sequence[str] | None = None,
    max_cells: int | None = None,
) -> NDArray[np.int64]:
    """Indices of the cells to flag, highest abnormality score first (ties: lower index first).

    Args:
        min_score: keep cells whose abnormality score is ≥ this.
        classes: keep only cells predicted as one of these classes (None or empty: any class).
        max_cells: keep at most this many (None: no cap).
    """
    names = list(class_names)
    if not 0.0 <= min_score <= 1.0 or math.isnan(min_score):
        raise ExportError(f"min score must lie in [0, 1], got {min_score}")
    if max_cells is not None and max_cells < 0:
        raise ExportError(f"max cells must be ≥ 0, got {max_cells}")
    n = len(cells)
    if n == 0:
        return np.zeros(0, np.int64)
    probs = np.asarray(cells.probs, np.float32)
    if probs.shape != (n, len(names)):
        raise ValueError(f"cells.probs must be {n}×{len(names)}, got {probs.shape}")
    score = abnormality_score(probs, names, list(abnormal_classes))
    keep = score >= np.float32(min_score)
    if classes:
        unknown = [c for c in classes if c not in names]
        if unknown:
            raise ExportError(
                f"unknown class {', '.join(map(repr, unknown))}; classes are {', '.join(names)}"
            )
        keep &= np.isin(predicted_labels(probs), [names.index(c) for c in classes])
    idx = np.flatnonzero(keep)
    order = np.lexsort((idx, -score[idx].astype(np.float64)))
    idx = idx[order]
    if max_cells is not None:
        idx = idx[:max_cells]
    return idx.astype(np.int64)


# -- geometry --------------------------------------------------------------------------------------
#: Cells whose geometries are built together (vectorized shapely calls, bounded memory).
_BLOCK = 4096


def _largest_polygon(geom: Any) -> Any:
    """The largest-area Polygon in ``geom`` (None if there is none with positive area)."""
    import shapely

    if geom is None or geom.is_empty:
        return None
    if geom.geom_type == "Polygon":
        return geom if geom.area > 0 else None
    parts = [g for g in shapely.get_parts(geom) if g.area > 0]
    polys = [g for g in parts if g.geom_type == "Polygon"]
    for g in parts:
        if g.geom_type in ("MultiPolygon", "GeometryCollection"):
            polys += [h for h in shapely.get_parts(g) if h.geom_type == "Polygon" and h.area > 0]
    return max(polys, key=lambda g: g.area) if polys else None


def _clean(geoms: NDArray[np.object_], size: tuple[int, int] | None) -> NDArray[np.object_]:
    """Valid, clipped, grid-snapped single polygons (None where nothing with area is left).

    Vectorized: the per-geometry repairs run only for the few invalid or edge-crossing shapes.
    """
    import shapely

    out = geoms.copy()
    present = ~shapely.is_missing(out)
    for k in np.flatnonzero(present & ~shapely.is_valid(out)):
        out[k] = _largest_polygon(shapely.make_valid(out[k]))
    if size is not None:
        box = shapely.box(0, 0, size[0], size[1])
        b = shapely.bounds(out)
        crossing = (b[:, 0] < 0) | (b[:, 1] < 0) | (b[:, 2] > size[0]) | (b[:, 3] > size[1])
        for k in np.flatnonzero(crossing):
            out[k] = _largest_polygon(out[k].intersection(box))
    # Round to the 0.01 px grid (cheap, vectorized); snap-round properly only where that broke validity.
    exact = out
    out = np.asarray(shapely.transform(exact, lambda c: np.round(c, 2)), dtype=object)
    ok = (shapely.get_type_id(out) == shapely.GeometryType.POLYGON) & (shapely.area(out) > 0)
    ok &= shapely.is_valid(out)
    for k in np.flatnonzero(~ok & ~shapely.is_missing(out)):
        g = _largest_polygon(shapely.set_precision(exact[k], _GRID))
        if g is not None and not g.is_valid:
            g = _largest_polygon(g.buffer(0))
        out[k] = g
    return out


def _outline_polygons(cells: CellTable, rows: NDArray[np.int64]) -> NDArray[np.object_]:
    """Nucleus outline polygons of ``rows`` (None where fewer than 3 finite vertices)."""
    import shapely

    geoms = np.full(len(rows), None, dtype=object)
    starts, ends = cells.outline_offsets[rows], cells.outline_offsets[rows + 1]
    usable = np.flatnonzero(ends - starts >= 3)
    if not len(usable):
        return geoms
    parts = [cells.outline_xy[starts[k] : ends[k]] for k in usable]
    lengths = np.array([len(q) for q in parts])
    coords = np.concatenate(parts).astype(np.float64)
    finite = np.isfinite(coords).all(axis=1)
    ring = np.repeat(np.arange(len(usable)), lengths)
    if not finite.all():  # drop non-finite vertices, then rings left with < 3 vertices
        coords, ring = coords[finite], ring[finite]
        counts = np.bincount(ring, minlength=len(usable))
        keep = counts[ring] >= 3
        coords, ring = coords[keep], ring[keep]
        usable = usable[counts >= 3]
        ring = np.unique(ring, return_inverse=True)[1]
    if len(coords):
        geoms[usable] = shapely.polygons(shapely.linearrings(coords, indices=ring))
    return geoms


def _radius_px(area_um2: NDArray[Any], mpp: float | None) -> NDArray[np.float64]:
    """Radius in level-0 px of a disc of ``area_um2`` (NaN where unknown)."""
    a = np.asarray(area_um2, np.float64)
    if mpp is None:
        return np.full(a.shape, np.nan)
    with np.errstate(invalid="ignore"):
        return np.where(np.isfinite(a) & (a > 0), np.sqrt(np.abs(a) / math.pi) / mpp, np.nan)


def _circles(x: NDArray[Any], y: NDArray[Any], radius: NDArray[Any]) -> NDArray[np.object_]:
    import shapely

    return np.asarray(shapely.buffer(shapely.points(x, y), radius, quad_segs=8), dtype=object)


def _geometry_json(geom: Any) -> dict[str, Any]:
    rings = [np.round(np.asarray(geom.exterior.coords)[:, :2], 2).tolist()]
    rings += [np.round(np.asarray(r.coords)[:, :2], 2).tolist() for r in geom.interiors]
    return {"type": "Polygon", "coordinates": rings}


def _number(value: Any) -> float | int | None:
    v = float(value)
    if not math.isfinite(v):
        return None
    return round(v, 6)


def _block_geometries(
    cells: CellTable,
    rows: NDArray[np.int64],
    *,
    object_type: ObjectType,
    size: tuple[int, int] | None,
    slide_mpp: float | None,
) -> tuple[NDArray[np.object_], NDArray[np.object_] | None, int]:
    """(nuclei, cell boundaries or None, cells drawn as stand-in circles) for one block of rows."""
    import shapely

    nuclei = _clean(_outline_polygons(cells, rows), size)
    missing = np.flatnonzero(shapely.is_missing(nuclei))
    if len(missing):
        fallback = _FALLBACK_RADIUS_UM / slide_mpp if slide_mpp else _FALLBACK_RADIUS_PX
        area = cells.morphometrics.get("nucleus_area_um2")
        r = _radius_px(area[rows[missing]], slide_mpp) if area is not None else np.full(len(missing), np.nan)
        r = np.where(np.isfinite(r), r, fallback)
        sub = rows[missing]
        nuclei[missing] = _clean(_circles(cells.x[sub], cells.y[sub], r), size)
    boundaries = None
    if object_type == "cell":
        boundaries = nuclei.copy()
        cell_area = cells.morphometrics.get("cell_area_um2")
        if cell_area is not None:
            r = _radius_px(cell_area[rows], slide_mpp)
            has = np.flatnonzero(np.isfinite(r) & ~shapely.is_missing(nuclei))
            if len(has):
                circles = _circles(cells.x[rows[has]], cells.y[rows[has]], r[has])
                joined = _clean(np.asarray(shapely.union(circles, nuclei[has]), dtype=object), size)
                boundaries[has] = np.where(shapely.is_missing(joined), nuclei[has], joined)
    return nuclei, boundaries, len(missing)


def cells_to_features(
    cells: CellTable,
    *,
    class_names: Sequence[str],
    abnormal_classes: Sequence[str],
    slide_id: str,
    index: Sequence[int] | NDArray[Any] | None = None,
    object_type: ObjectType = "detection",
    bounds: tuple[int, int] | None = None,
    slide_mpp: float | None = None,
) -> Iterator[dict[str, Any]]:
    """QuPath GeoJSON features for the rows ``index`` of ``cells`` (None: every row), in that order.

    Args:
        slide_id: the slide fingerprint, seed of the deterministic feature ids.
        object_type: ``"detection"`` (nucleus outline as ``geometry``) or ``"cell"`` (nucleus as
            ``nucleusGeometry``; ``geometry`` is a circle of the measured ``cell_area_um2`` around
            the nucleus centre joined with the nucleus, or the nucleus itself when unknown).
        bounds: level-0 slide (width, height); geometries are clipped to it.
        slide_mpp: level-0 µm/px (for µm² → px² conversions).

    A cell without a usable outline (fewer than 3 distinct points, no area) is drawn as a circle of
    its ``nucleus_area_um2`` (3 µm radius if unknown) so that no flagged cell is lost.
    """
    if object_type not in ("detection", "cell"):
        raise ExportError(f"object type must be 'detection' or 'cell', got {object_type!r}")
    names = list(class_names)
    n = len(cells)
    probs = np.asarray(cells.probs, np.float32)
    if probs.shape != (n, len(names)):
        raise ValueError(f"cells.probs must be {n}×{len(names)}, got {probs.shape}")
    rows_all = np.arange(n, dtype=np.int64) if index is None else np.asarray(index, np.int64).reshape(-1)
    if len(rows_all) and (rows_all.min() < 0 or rows_all.max() >= n):
        raise IndexError(f"cell index out of range for {n} cells")
    score = abnormality_score(probs, names, list(abnormal_classes))
    labels = predicted_labels(probs)
    size = (int(bounds[0]), int(bounds[1])) if bounds is not None else None
    morph = cells.morphometrics
    n_fallback = 0
    for start in range(0, len(rows_all), _BLOCK):
        rows = rows_all[start : start + _BLOCK]
        nuclei, boundaries, k = _block_geometries(
            cells, rows, object_type=object_type, size=size, slide_mpp=slide_mpp
        )
        n_fallback += k
        for j, i in enumerate(rows.tolist()):
            nucleus = nuclei[j]
            if nucleus is None:  # the centre lies outside the slide: nothing to show
                logger.warning(
                    "cell %d at (%.1f, %.1f) lies outside the slide; not exported", i, cells.x[i], cells.y[i]
                )
                continue
            cls = names[int(labels[i])]
            measurements: dict[str, float | int] = {"cell_index": int(i), "score": round(float(score[i]), 6)}
            for c, p in zip(names, probs[i].tolist(), strict=True):
                measurements[f"prob_{c}"] = round(p, 6)
            det = _number(cells.detection_score[i])
            if det is not None:
                measurements["detection_score"] = det
            for key, col in morph.items():
                v = _number(col[i])
                if v is not None:
                    measurements[key] = v
            feature: dict[str, Any] = {"type": "Feature", "id": cell_id(slide_id, i)}
            if boundaries is not None:
                feature["geometry"] = _geometry_json(boundaries[j])
                feature["nucleusGeometry"] = _geometry_json(nucleus)
            else:
                feature["geometry"] = _geometry_json(nucleus)
            feature["properties"] = {
                "objectType": object_type,
                "name": f"{cls} {float(score[i]):.2f}",
                "classification": {"name": cls, "color": list(class_color(cls))},
                "measurements": measurements,
            }
            yield feature
    if n_fallback:
        logger.info("%d exported cells had no usable outline; drawn as circles", n_fallback)


# -- files -----------------------------------------------------------------------------------------
def _open_text(path: Path, gz: bool) -> IO[str]:
    if gz:
        raw = open(path, "wb")  # noqa: SIM115  (closed through the wrapper)
        # mtime=0: the same cells give byte-identical files.
        zipped = gzip_module.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0)
        wrapper = io.TextIOWrapper(zipped, encoding="utf-8", newline="\n")
        wrapper._wsi_raw = raw  # type: ignore[attr-defined]
        return wrapper
    return open(path, "w", encoding="utf-8", newline="\n")


def _close_text(fh: IO[str]) -> None:
    raw = getattr(fh, "_wsi_raw", None)
    fh.close()
    if raw is not None:
        raw.close()


def _target(path: str | Path, gzip: bool | None) -> tuple[Path, bool]:
    p = Path(path)
    gz = p.name.endswith(".gz") if gzip is None else gzip
    if gz and not p.name.endswith(".gz"):
        p = p.with_name(p.name + ".gz")
    return p, gz


def write_geojson(
    path: str | Path,
    cells: CellTable,
    *,
    class_names: Sequence[str],
    abnormal_classes: Sequence[str],
    slide_id: str,
    index: Sequence[int] | NDArray[Any] | None = None,
    object_type: ObjectType = "detection",
    bounds: tuple[int, int] | None = None,
    slide_mpp: float | None = None,
    gzip: bool | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[Path, int]:
    """Write a QuPath FeatureCollection of the rows ``index`` (see :func:`select_cells`).

    ``gzip``: None compresses when the name ends in ``.gz``; True adds ``.gz`` if missing (QuPath
    0.5+ imports ``.geojson.gz``). ``metadata`` goes into a ``wsi_screen`` foreign member, which
    QuPath ignores. Written through a temporary sibling, then renamed. Returns (path, features).
    """
    target, gz = _target(path, gzip)
    tmp = target.with_name(f".{target.name}.tmp")
    head = {"type": "FeatureCollection", "wsi_screen": {"version": __version__, **dict(metadata or {})}}
    count = 0
    fh = _open_text(tmp, gz)
    try:
        fh.write(json.dumps(head, ensure_ascii=False, allow_nan=False)[:-1] + ', "features": [\n')
        for feature in cells_to_features(
            cells,
            class_names=class_names,
            abnormal_classes=abnormal_classes,
            slide_id=slide_id,
            index=index,
            object_type=object_type,
            bounds=bounds,
            slide_mpp=slide_mpp,
        ):
            if count:
                fh.write(",\n")
            fh.write(json.dumps(feature, ensure_ascii=False, allow_nan=False, separators=(",", ":")))
            count += 1
        fh.write("\n]}\n")
    except BaseException:
        _close_text(fh)
        tmp.unlink(missing_ok=True)
        raise
    _close_text(fh)
    os.replace(tmp, target)
    logger.debug("wrote %d features to %s", count, target)
    return target, count


def write_csv(
    path: str | Path,
    cells: CellTable,
    *,
    class_names: Sequence[str],
    abnormal_classes: Sequence[str],
    slide_id: str,
    index: Sequence[int] | NDArray[Any] | None = None,
    gzip: bool | None = None,
) -> tuple[Path, int]:
    """Write one CSV row per cell of ``index`` (None: every cell): ids, centre, class, score, probs,
    morphometrics. Missing values are empty fields. Returns (path, rows)."""
    names = list(class_names)
    n = len(cells)
    probs = np.asarray(cells.probs, np.float32)
    if probs.shape != (n, len(names)):
        raise ValueError(f"cells.probs must be {n}×{len(names)}, got {probs.shape}")
    rows = np.arange(n) if index is None else np.asarray(index, np.int64)
    score = abnormality_score(probs, names, list(abnormal_classes))
    labels = predicted_labels(probs)
    morph_names = list(cells.morphometrics)
    header = ["cell_index", "id", "x", "y", "class", "score", *[f"prob_{c}" for c in names]]
    header += ["detection_score", "tile", *morph_names]

    def fmt(v: Any) -> str:
        f = float(v)
        return repr(round(f, 6)) if math.isfinite(f) else ""

    target, gz = _target(path, gzip)
    tmp = target.with_name(f".{target.name}.tmp")
    fh = _open_text(tmp, gz)
    try:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(header)
        for i in rows.tolist():
            writer.writerow(
                [
                    i,
                    cell_id(slide_id, i),
                    f"{float(cells.x[i]):.2f}",
                    f"{float(cells.y[i]):.2f}",
                    names[int(labels[i])],
                    fmt(score[i]),
                    *[fmt(p) for p in probs[i]],
                    fmt(cells.detection_score[i]),
                    int(cells.tile[i]),
                    *[fmt(cells.morphometrics[k][i]) for k in morph_names],
                ]
            )
    except BaseException:
        _close_text(fh)
        tmp.unlink(missing_ok=True)
        raise
    _close_text(fh)
    os.replace(tmp, target)
    return target, len(rows)


def store_slide_info(
    attrs: Mapping[str, Any], *, fallback_id: str
) -> tuple[str, tuple[int, int] | None, float | None]:
    """(slide id, level-0 (width, height), level-0 µm/px) from ``cells.zarr`` root attributes."""
    slide = attrs.get("slide") or {}
    slide_id = slide.get("fingerprint")
    if not slide_id:
        logger.warning("cells.zarr has no slide fingerprint; feature ids derive from %r", fallback_id)
        slide_id = fallback_id
    dims = slide.get("dimensions")
    bounds = (int(dims[0]), int(dims[1])) if dims and len(dims) == 2 else None
    mpp = slide.get("mpp")
    return str(slide_id), bounds, (float(mpp) if mpp else None)


def export_store(
    store: str | Path,
    output: str | Path,
    *,
    fmt: Literal["geojson", "csv"] = "geojson",
    min_score: float | None = None,
    classes: Sequence[str] | None = None,
    max_cells: int | None = None,
    object_type: ObjectType | None = None,
    gzip: bool | None = None,
) -> tuple[Path, int, int]:
    """Re-export cells from a finished ``cells.zarr`` without rerunning anything.

    Unset options take the run's values (``config.output`` in the store's attributes, else the
    defaults of :class:`~wsi_screen.config.OutputSettings`); ``max_cells=0`` means no cap.
    Returns (file written, cells exported, cells in the store).
    """
    from wsi_screen.config import OutputSettings
    from wsi_screen.store import read_cells

    cells, attrs = read_cells(store)
    run_output = (attrs.get("config") or {}).get("output") or {}
    defaults = OutputSettings()

    def default(key: str) -> Any:
        return run_output.get(key, getattr(defaults, key))

    if min_score is None:
        recorded = default("flag_min_score")
        min_score = 0.5 if recorded is None else float(recorded)
    classes = list(default("flag_classes") if classes is None else classes)
    cap = int(default("flag_max_cells") if max_cells is None else max_cells)
    otype: ObjectType = default("object_type") if object_type is None else object_type
    class_names = list(attrs["class_names"])
    abnormal = list(attrs["abnormal_classes"])
    index = select_cells(
        cells,
        class_names=class_names,
        abnormal_classes=abnormal,
        min_score=min_score,
        classes=classes or None,
        max_cells=cap or None,
    )
    slide_id, bounds, slide_mpp = store_slide_info(attrs, fallback_id=Path(store).resolve().parent.name)
    if fmt == "csv":
        path, count = write_csv(
            output,
            cells,
            class_names=class_names,
            abnormal_classes=abnormal,
            slide_id=slide_id,
            index=index,
            gzip=gzip,
        )
    elif fmt == "geojson":
        meta = {
            "slide": (attrs.get("slide") or {}).get("path"),
            "slide_fingerprint": slide_id,
            "min_score": min_score,
            "classes": classes,
            "max_cells": cap,
            "cells_in_store": len(cells),
        }
        path, count = write_geojson(
            output,
            cells,
            class_names=class_names,
            abnormal_classes=abnormal,
            slide_id=slide_id,
            index=index,
            object_type=otype,
            bounds=bounds,
            slide_mpp=slide_mpp,
            gzip=gzip,
            metadata=meta,
        )
    else:
        raise ExportError(f"unknown export format {fmt!r} (geojson or csv)")
    return path, count, len(cells)
