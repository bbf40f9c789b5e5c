"""The demo slide's outputs as a golden record, and how a new run is compared with it.

``collect`` reduces one result folder (``OUT/<slide-id>/``) and, for a batch, its ``batch.json`` to
what must not change when the code is reorganized: every array of ``cells.zarr``, the GeoJSON,
``summary.json`` without ``timings``/``versions``, ``run.json`` without timings, versions,
timestamps, host and per-stage timing statistics, and the batch rows without timings and
timestamps. Absolute paths are reduced to file names. ``config.runtime.seed`` (a setting that
nothing read, dropped in issue 17) and the batch ``config_hash`` that covers it are left out, and
so are the slide fingerprint and the batch worker's name (see :func:`_strip_paths`).

``compare`` checks a run against the record. On the machine that wrote the record a refactor
gives identical values (``exact=True``, used when the record is rewritten). On another CPU the
float32 networks round differently (docs/testing.md), so the default is tolerant, with bounds
that sit far below any change of behaviour:

- cells are matched one-to-one by their level-0 centre within 0.5 px, and every cell must match:
  a cell appears or disappears only where a seed's or a component's existence depends on a U-Net
  probability within ~10⁻⁵ of a threshold;
- a centre, computed from a thresholded probability map, moves by 1/area px when one boundary
  pixel flips (≤ 0.02 px for the ≥ 50 px nuclei kept): centres within 0.05 px, morphometrics
  within 3 % relative + 10⁻³ (one pixel of the smallest kept nucleus), outline polygon areas
  within 3 % + 2 px²;
- class probabilities within 10⁻³ where the crop centre ``floor(x), floor(y)`` agrees (the
  probabilistic bound for the classifier's dot products is ~10⁻⁵, docs/testing.md), within 0.15
  where a centre crossed an integer (the crop moved by one pixel);
- JSON numbers within 10⁻³ absolute or relative (they are rounded to ≤ 4 decimals and derive
  from the probabilities), morphometrics in JSON (a summary's top cells) within the arrays' 3 %
  (a cell area of 97.0 against 97.25 µm² was seen on an AMD EPYC: one boundary pixel of the cell
  channel), every other JSON value equal.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import zarr

GOLDEN = Path(__file__).parent / "golden" / "demo"

_SUMMARY_DROP = ("timings", "versions")
_RUN_DROP = ("timings", "versions", "started", "finished", "host", "stages", "torch_threads")
_ROW_DROP = ("seconds", "started", "finished", "worker", "timings")
_MATCHED_SEPARATELY = ("cells/x", "cells/y", "cells/outline_offsets", "cells/outline_xy")
_BATCH_DROP = ("updated", "started", "finished", "input", "output", "config_hash")


def _strip_paths(data: Any) -> Any:
    """Absolute paths reduced to their file name; left out: ``runtime.seed`` of any config, the
    slide's fingerprint (a hash of its bytes: the synthetic slide's JPEG bytes may differ where
    another CPU's numpy rounds a pixel the other way), the batch worker (host:pid) and the resume
    key's config hash."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if k in ("path", "output", "input", "slide") and isinstance(v, str) and "/" in v:
                v = Path(v).name
            if k != "fingerprint" and k != "worker":
                out[k] = _strip_paths(v)
        if isinstance(out.get("resume_key"), dict):
            key = out["resume_key"]
            out["resume_key"] = {k: v for k, v in key.items() if k not in ("config", "fingerprint")}
        if isinstance(out.get("runtime"), dict):
            out["runtime"] = {k: v for k, v in out["runtime"].items() if k != "seed"}
        return out
    if isinstance(data, list):
        return [_strip_paths(v) for v in data]
    return data


def _drop(data: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in keys}


def collect(folder: Path, batch_json: Path | None = None) -> dict[str, Any]:
    """The comparable content of one result folder (and of its batch's ``batch.json``)."""
    root = zarr.open_group(str(folder / "cells.zarr"), mode="r")
    arrays: dict[str, np.ndarray] = {}
    for group in ("cells", "tiles"):
        for name, arr in root[group].arrays():
            arrays[f"{group}/{name}"] = np.asarray(arr[...])
    out: dict[str, Any] = {
        "arrays": arrays,
        "zarr_attrs": _strip_paths(dict(root.attrs)),
        "geojson": json.loads((folder / "flagged.geojson").read_text()),
        "summary": _strip_paths(_drop(json.loads((folder / "summary.json").read_text()), _SUMMARY_DROP)),
        "run": _strip_paths(_drop(json.loads((folder / "run.json").read_text()), _RUN_DROP)),
    }
    if batch_json is not None:
        batch = _drop(json.loads(batch_json.read_text()), _BATCH_DROP)
        batch["slides"] = [_drop(r, _ROW_DROP) for r in batch["slides"]]
        out["batch"] = _strip_paths(batch)
    return out


def save(record: dict[str, Any], dest: Path) -> None:
    """Write a record (``cells.npz`` and one JSON per document) into ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(dest / "cells.npz", **{k.replace("/", "__"): v for k, v in record["arrays"].items()})
    for key in ("zarr_attrs", "geojson", "summary", "run", "batch"):
        if key in record:
            (dest / f"{key}.json").write_text(json.dumps(record[key], indent=1, sort_keys=True) + "\n")


def load(src: Path) -> dict[str, Any]:
    """Read a record written by :func:`save`."""
    with np.load(src / "cells.npz") as z:
        arrays = {k.replace("__", "/"): z[k] for k in z.files}
    record: dict[str, Any] = {"arrays": arrays}
    for key in ("zarr_attrs", "geojson", "summary", "run", "batch"):
        p = src / f"{key}.json"
        if p.exists():
            record[key] = json.loads(p.read_text())
    return record


# -- comparison -----------------------------------------------------------------------------------


def _json_diff(a: Any, b: Any, where: str, *, exact: bool, out: list[str]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            out.append(f"{where}: keys differ: {sorted(set(a) ^ set(b))}")
        for k in sorted(set(a) & set(b)):
            _json_diff(a[k], b[k], f"{where}.{k}", exact=exact, out=out)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: {len(a)} items, expected {len(b)}")
        for i, (x, y) in enumerate(zip(a, b, strict=False)):
            _json_diff(x, y, f"{where}[{i}]", exact=exact, out=out)
    elif (
        not exact
        and isinstance(a, float | int)
        and isinstance(b, float | int)
        and not isinstance(a, bool)
        and isinstance(a, float) | isinstance(b, float)
    ):
        # Morphometrics (a summary's top cells) get the arrays' bound: one flipped boundary pixel.
        rel = 0.03 if ".morphometrics." in where else 1e-3
        if not math.isclose(a, b, rel_tol=rel, abs_tol=1e-3):
            out.append(f"{where}: {a!r}, expected {b!r}")
    elif a != b:
        out.append(f"{where}: {a!r}, expected {b!r}")


def _polygon_areas(offsets: np.ndarray, xy: np.ndarray) -> np.ndarray:
    areas = np.zeros(len(offsets) - 1)
    for i in range(len(areas)):
        p = xy[offsets[i] : offsets[i + 1]].astype(np.float64)
        x, y = p[:, 0], p[:, 1]
        areas[i] = 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))
    return areas


def _cell_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray], *, exact: bool, out: list[str]) -> None:
    if set(a) != set(b):
        out.append(f"arrays differ: {sorted(set(a) ^ set(b))}")
        return
    if exact:
        for k in sorted(a):
            nan_ok = a[k].dtype.kind == "f"
            same = a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k], equal_nan=nan_ok)
            if not same:
                out.append(f"{k}: not identical")
        return
    for k in sorted(a):
        exact_tile_column = k.startswith("tiles/") and k not in ("tiles/focus", "tiles/n_cells")
        if exact_tile_column and not np.array_equal(a[k], b[k]):
            out.append(f"{k}: differs")
    if not np.allclose(a["tiles/focus"], b["tiles/focus"], rtol=1e-3, atol=1e-4, equal_nan=True):
        out.append("tiles/focus: differs")
    xa, ya, xb, yb = a["cells/x"], a["cells/y"], b["cells/x"], b["cells/y"]
    if len(xa) != len(xb):
        out.append(f"cells: {len(xa)}, expected {len(xb)}")
        return
    from scipy.optimize import linear_sum_assignment

    d = np.hypot(xa[:, None] - xb[None, :], ya[:, None] - yb[None, :])
    ia, ib = linear_sum_assignment(np.minimum(d, 1e6))
    bad = d[ia, ib] > 0.5
    if bad.any():
        out.append(f"cells: {int(bad.sum())} of {len(xb)} without a match within 0.5 px")
        return
    order = np.empty(len(xb), np.int64)
    order[ib] = ia  # golden row j ↔ new row order[j]
    if float(d[ia, ib].max(initial=0.0)) > 0.05:
        out.append(f"cells: a centre moved by {float(d[ia, ib].max()):.3f} px")
    if not np.array_equal(a["tiles/n_cells"], b["tiles/n_cells"]):
        out.append("tiles/n_cells: differs")
    for k in sorted(a):
        if not k.startswith("cells/") or k in _MATCHED_SEPARATELY:
            continue
        va, vb = a[k][order], b[k]
        if k in ("cells/tile",):
            ok = np.array_equal(va, vb)
        elif k in ("cells/probs", "cells/score"):
            same_px = (np.floor(xa[order]) == np.floor(xb)) & (np.floor(ya[order]) == np.floor(yb))
            tol = np.where(same_px, 1e-3, 0.15)
            diff = np.abs(va.astype(np.float64) - vb)
            ok = bool(np.all(diff <= (tol[:, None] if diff.ndim == 2 else tol)))
        elif k == "cells/label":
            ok = bool(np.mean(va == vb) >= 0.99)  # a near-tie of the two top classes may swap
        else:
            ok = bool(np.allclose(va, vb, rtol=0.03, atol=1e-3, equal_nan=True))
        if not ok:
            out.append(f"{k}: differs beyond tolerance")
    area_a = _polygon_areas(a["cells/outline_offsets"], a["cells/outline_xy"])[order]
    area_b = _polygon_areas(b["cells/outline_offsets"], b["cells/outline_xy"])
    if not np.all(np.abs(area_a - area_b) <= 0.03 * area_b + 2.0):
        out.append("cells/outline_xy: outline areas differ beyond tolerance")


def _geojson_diff(a: dict[str, Any], b: dict[str, Any], *, exact: bool, out: list[str]) -> None:
    if exact:
        _json_diff(a, b, "geojson", exact=True, out=out)
        return
    fa, fb = a.get("features", []), b.get("features", [])
    _json_diff(_drop(a, ("features",)), _drop(b, ("features",)), "geojson", exact=False, out=out)
    if len(fa) != len(fb):
        out.append(f"geojson: {len(fa)} features, expected {len(fb)}")
        return

    def centre(f: dict[str, Any]) -> tuple[float, float]:
        ring = np.asarray(f["geometry"]["coordinates"][0], np.float64)
        return float(ring[:, 0].mean()), float(ring[:, 1].mean())

    ca = np.array([centre(f) for f in fa]).reshape(-1, 2)
    cb = np.array([centre(f) for f in fb]).reshape(-1, 2)
    for j, f in enumerate(fb):
        i = int(np.argmin(np.hypot(*(ca - cb[j]).T)))
        if np.hypot(*(ca[i] - cb[j])) > 0.5:
            out.append(f"geojson: feature {j} has no match within 0.5 px")
            continue
        props_a = _drop(fa[i]["properties"], ("measurements",))
        props_b = _drop(f["properties"], ("measurements",))
        _json_diff(props_a, props_b, f"geojson.features[{j}].properties", exact=False, out=out)


def compare(actual: dict[str, Any], golden: dict[str, Any], *, exact: bool = False) -> list[str]:
    """Every difference between a run and the record (empty when they agree)."""
    out: list[str] = []
    _cell_diff(actual["arrays"], golden["arrays"], exact=exact, out=out)
    for key in ("zarr_attrs", "summary", "run", "batch"):
        if key in golden:
            _json_diff(actual.get(key), golden[key], key, exact=exact, out=out)
    _geojson_diff(actual["geojson"], golden["geojson"], exact=exact, out=out)
    return out
