"""The ranked worklist of a batch: ``OUT/batch.csv``, ``OUT/batch.json`` and ``OUT/index.html``.

Order: priority, review, failed, unsatisfactory, negative, pending; within a group, higher score
first. Each file is rewritten by an atomic replace, so a reader never sees half of one.
"""

from __future__ import annotations

import csv
import html
import io
import json
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from wsi_screen import __version__
from wsi_screen import output_layout as layout
from wsi_screen.batch._common import atomic_write, now
from wsi_screen.batch.discovery import IgnoredFile
from wsi_screen.batch.worker import SlideOutcome

__all__ = ["BASE_COLUMNS", "RANK_GROUPS", "SCHEMA_VERSION", "rank_outcomes", "write_worklist"]

SCHEMA_VERSION = 1
#: Worklist order of the groups (lower first); within a group, higher score first.
RANK_GROUPS = {"priority": 0, "review": 1, "failed": 2, "unsatisfactory": 3, "negative": 4, "pending": 5}


def rank_outcomes(outcomes: Sequence[SlideOutcome]) -> list[SlideOutcome]:
    """Worklist order: priority, review, failed, unsatisfactory, negative, pending; then score, name."""

    def key(o: SlideOutcome) -> tuple[int, float, str]:
        if o.status == "failed":
            group = RANK_GROUPS["failed"]
        elif o.status == "pending" or not o.triage:
            group = RANK_GROUPS["pending"]
        else:
            group = RANK_GROUPS.get(o.triage, RANK_GROUPS["pending"])
        return group, -(o.score if o.score is not None else -1.0), o.slide

    return sorted(outcomes, key=key)


def _class_names(outcomes: Sequence[SlideOutcome]) -> list[str]:
    names: dict[str, None] = {}
    for o in outcomes:
        for c in o.summary.get("class_names", []) or []:
            names[str(c)] = None
    return list(names)


BASE_COLUMNS = (
    "rank",
    "slide",
    "slide_id",
    "status",
    "triage",
    "score",
    "suggested_category",
    "n_cells",
    "squamous_cells",
    "adequate",
    "qc_flags",
    "error",
    "note",
    "seconds",
    "tiles",
    "started",
    "finished",
    "worker",
    "output",
    "report",
)


def _row(rank: int, o: SlideOutcome, out_root: Path, classes: Sequence[str]) -> dict[str, Any]:
    s = o.summary
    adequacy = s.get("adequacy") if isinstance(s.get("adequacy"), dict) else {}
    qc = s.get("qc") if isinstance(s.get("qc"), dict) else {}
    assert isinstance(adequacy, dict) and isinstance(qc, dict)
    counts = s.get("class_counts", {}).get("predicted", {}) if isinstance(s.get("class_counts"), dict) else {}
    has_result = o.status in ("ok", "skipped") and (out_root / o.slide_id / layout.SUMMARY).is_file()
    has_report = has_result and (out_root / o.slide_id / layout.REPORT).is_file()
    tiles = o.run.get("tiles", {}).get("processed") if isinstance(o.run.get("tiles"), dict) else None
    score = o.score
    row: dict[str, Any] = {
        "rank": rank,
        "slide": o.slide,
        "slide_id": o.slide_id,
        "status": o.status,
        "triage": o.triage if has_result else "",
        "score": round(score, 6) if score is not None and has_result else None,
        "suggested_category": s.get("suggested_category", "") if has_result else "",
        "n_cells": s.get("n_cells") if has_result else None,
        "squamous_cells": adequacy.get("squamous_cells") if has_result else None,
        "adequate": adequacy.get("adequate") if has_result else None,
        "qc_flags": list(qc.get("flags", [])) if has_result else [],
        "error": o.error,
        "note": o.note,
        "seconds": round(o.seconds, 3) if o.seconds is not None else None,
        "tiles": tiles,
        "started": o.started,
        "finished": o.finished,
        "worker": o.worker,
        "output": f"{o.slide_id}/" if has_result else "",
        "report": f"{o.slide_id}/{layout.REPORT}" if has_report else "",
        "class_counts": {c: counts.get(c) for c in classes} if has_result else {},
        "timings": o.run.get("timings", {}) if has_result else {},
    }
    return row


def _csv_text(rows: Sequence[Mapping[str, Any]], classes: Sequence[str]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*BASE_COLUMNS, *(f"n_{c}" for c in classes)])

    def cell(v: Any) -> Any:
        if v is None:
            return ""
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, list):
            return ";".join(str(x) for x in v)
        return v

    for r in rows:
        counts = r.get("class_counts", {})
        writer.writerow([cell(r[c]) for c in BASE_COLUMNS] + [cell(counts.get(c)) for c in classes])
    return buf.getvalue()


_CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .3em}.meta{color:#555;margin-bottom:1em}
table{border-collapse:collapse;width:100%}th,td{padding:.3em .5em;border-bottom:1px solid #ddd;
text-align:left;vertical-align:top}th{background:#f4f4f4;position:sticky;top:0}td.n{text-align:right}
.t{display:inline-block;padding:0 .45em;border-radius:3px;font-weight:600;font-size:.9em}
.priority{background:#c62828;color:#fff}.review{background:#f9a825;color:#000}
.failed{background:#6a1b9a;color:#fff}.unsatisfactory{background:#757575;color:#fff}
.negative{background:#2e7d32;color:#fff}.pending{background:#e0e0e0;color:#333}
.err{color:#6a1b9a}.note{color:#666;font-size:.9em}details{margin-top:1.5em}code{font-size:.95em}
"""


def _html_text(
    rows: Sequence[Mapping[str, Any]],
    *,
    input_dir: str,
    counts: Mapping[str, int],
    updated: str,
    ignored: Sequence[IgnoredFile],
    refresh_s: int | None,
) -> str:
    e = html.escape
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
    ]
    if refresh_s:
        out.append(f'<meta http-equiv="refresh" content="{int(refresh_s)}">')
    out += [
        f"<title>wsi-screen worklist — {e(input_dir)}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>wsi-screen worklist</h1>",
        f'<div class="meta">Input <code>{e(input_dir)}</code> · updated {e(updated)} · '
        + " · ".join(f"{e(k)} {int(v)}" for k, v in counts.items())
        + f" · wsi-screen {e(__version__)}</div>",
        "<table><thead><tr><th>#</th><th>Slide</th><th>Triage</th><th>Score</th><th>Suggested</th>"
        "<th>Cells</th><th>Adequate</th><th>QC</th><th>Notes</th></tr></thead><tbody>",
    ]
    for r in rows:
        status = str(r["status"])
        label = status if status in ("failed", "pending") else str(r["triage"] or status)
        css = label if label in RANK_GROUPS else "pending"
        name = e(str(r["slide"]))
        if r["report"]:
            href = "/".join(urllib.parse.quote(part, safe="") for part in str(r["report"]).split("/"))
            name = f'<a href="{e(href)}">{name}</a>'
        score = "" if r["score"] is None else f"{float(r['score']):.3f}"
        cells = "" if r["n_cells"] is None else f"{int(r['n_cells']):,}"
        adequate = {True: "yes", False: "no"}.get(r["adequate"], "")
        notes = []
        if r["error"]:
            notes.append(f'<span class="err">{e(str(r["error"]))}</span>')
        if r["note"]:
            notes.append(f'<span class="note">{e(str(r["note"]))}</span>')
        if status == "skipped":
            notes.append('<span class="note">kept from a previous run</span>')
        out.append(
            f"<tr><td class=n>{int(r['rank'])}</td><td>{name}<br><span class=note>{e(str(r['slide_id']))}"
            f"</span></td><td><span class='t {css}'>{e(label)}</span></td><td class=n>{score}</td>"
            f"<td>{e(str(r['suggested_category'] or ''))}</td><td class=n>{cells}</td><td>{adequate}</td>"
            f"<td>{e(', '.join(str(f) for f in r['qc_flags']))}</td><td>{'<br>'.join(notes)}</td></tr>"
        )
    out.append("</tbody></table>")
    if ignored:
        out.append(
            f"<details><summary>{len(ignored)} file(s) in the input folder are not slides</summary><ul>"
        )
        out += [f"<li><code>{e(i.path)}</code> — {e(i.reason)}</li>" for i in ignored]
        out.append("</ul></details>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_worklist(
    out_root: Path,
    outcomes: Sequence[SlideOutcome],
    *,
    input_dir: Path,
    ignored: Sequence[IgnoredFile] = (),
    meta: Mapping[str, Any] | None = None,
    refresh_s: int | None = None,
) -> list[dict[str, Any]]:
    """Write ``batch.csv``, ``batch.json`` and ``index.html`` (ranked), each by an atomic replace."""
    ranked = rank_outcomes(outcomes)
    classes = _class_names(ranked)
    rows = [_row(i + 1, o, out_root, classes) for i, o in enumerate(ranked)]
    counts = {s: sum(1 for o in outcomes if o.status == s) for s in ("ok", "skipped", "failed", "pending")}
    updated = now()
    doc = {
        "schema_version": SCHEMA_VERSION,
        "wsi_screen_version": __version__,
        "input": str(input_dir),
        "output": str(out_root),
        "updated": updated,
        **dict(meta or {}),
        "counts": counts,
        "class_names": classes,
        "slides": rows,
        "ignored": [asdict(i) for i in ignored],
    }
    atomic_write(out_root / "batch.json", json.dumps(doc, indent=2, allow_nan=False, default=str) + "\n")
    atomic_write(out_root / "batch.csv", _csv_text(rows, classes))
    atomic_write(
        out_root / "index.html",
        _html_text(
            rows,
            input_dir=str(input_dir),
            counts=counts,
            updated=updated,
            ignored=ignored,
            refresh_s=refresh_s,
        ),
    )
    return rows
