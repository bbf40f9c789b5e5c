"""Find the slides of a scanner folder and give each a unique folder name under ``OUT``."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from wsi_screen.batch._common import WORKLIST_FILES, BatchError

__all__ = [
    "SLIDE_SUFFIXES",
    "Discovery",
    "IgnoredFile",
    "SlideEntry",
    "assign_slide_ids",
    "discover_slides",
    "vms_companions",
]

#: File suffixes of whole-slide images (what OpenSlide 4 reads, plus Zeiss CZI, which newer OpenSlide
#: reads; an installed OpenSlide that cannot open one reports the slide as failed, visibly). A folder
#: holding ``.dcm`` files is one DICOM slide.
SLIDE_SUFFIXES: dict[str, str] = {
    ".svs": "aperio",
    ".ndpi": "hamamatsu",
    ".vms": "hamamatsu",
    ".vmu": "hamamatsu",
    ".mrxs": "mirax",
    ".tif": "tiff",
    ".tiff": "tiff",
    ".scn": "leica",
    ".bif": "ventana",
    ".svslide": "sakura",
    ".czi": "zeiss",
}
DICOM_SUFFIX = ".dcm"


@dataclass(frozen=True)
class SlideEntry:
    """One slide found in the input folder."""

    path: Path  #: absolute path to open: the slide file, or the DICOM series folder
    rel: str  #: path relative to the input folder (POSIX), the slide's name in the worklist
    format: str  #: aperio, hamamatsu, mirax, tiff, leica, ventana, sakura, zeiss or dicom
    files: tuple[Path, ...]  #: every file of the slide (MIRAX/VMS companions, DICOM instances)
    slide_id: str = ""  #: folder name under ``OUT`` (unique in the batch)


@dataclass(frozen=True)
class IgnoredFile:
    """A file in the input folder that is not a slide."""

    path: str  #: relative to the input folder
    reason: str


@dataclass
class Discovery:
    """What :func:`discover_slides` found, in stable (sorted) order."""

    root: Path
    slides: list[SlideEntry] = field(default_factory=list)
    ignored: list[IgnoredFile] = field(default_factory=list)


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel if rel != "." else path.name


def vms_companions(vms: Path) -> list[Path]:
    """Files a Hamamatsu ``.vms`` refers to (ImageFile*, MapFile, OptimisationFile), if present."""
    out: list[Path] = []
    try:
        text = vms.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        if sep and (key.startswith("imagefile") or key in ("mapfile", "optimisationfile")):
            name = value.strip()
            if name and "/" not in name and "\\" not in name and (vms.parent / name).is_file():
                out.append(vms.parent / name)
    return sorted(set(out))


def discover_slides(
    root: str | os.PathLike[str],
    *,
    exclude: Sequence[str | os.PathLike[str]] = (),
    recursive: bool = True,
) -> Discovery:
    """Find the slides under ``root`` (sorted by relative path); list every other file as ignored.

    Hidden files and folders (``.`` prefix) and the folders in ``exclude`` (e.g. the output folder
    when it lies inside the input) are skipped silently. A MIRAX companion folder (same stem as a
    ``.mrxs`` beside it) and the files a ``.vms`` names belong to their slide. Symbolic links to
    folders are not followed. Slide ids are not assigned here (see :func:`assign_slide_ids`).
    """
    base = Path(root).absolute()
    if not base.is_dir():
        raise BatchError(f"input folder not found: {base} (give the scanner's output folder)")
    excluded = {Path(e).absolute().resolve() for e in exclude}
    found = Discovery(root=base)
    for dirpath, dirnames, filenames in os.walk(base, followlinks=False):
        here = Path(dirpath)
        files = sorted(f for f in filenames if not f.startswith("."))
        mrxs_stems = {Path(f).stem for f in files if Path(f).suffix.lower() == ".mrxs"}
        keep_dirs = []
        for d in sorted(dirnames):
            if d.startswith(".") or (here / d).resolve() in excluded:
                continue
            if d in mrxs_stems:  # MIRAX companion folder: part of the .mrxs slide
                continue
            keep_dirs.append(d)
        dirnames[:] = keep_dirs if recursive else []
        dcm = [f for f in files if f.lower().endswith(DICOM_SUFFIX)]
        if dcm:
            found.slides.append(
                SlideEntry(
                    path=here,
                    rel=_rel(here, base),
                    format="dicom",
                    files=tuple(here / f for f in dcm),
                )
            )
        claimed: set[str] = set(dcm)
        for f in files:
            p = here / f
            suffix = p.suffix.lower()
            if suffix == ".vms":
                claimed.update(c.name for c in vms_companions(p))
        for f in files:
            if f in claimed and not f.lower().endswith(DICOM_SUFFIX):
                continue
            if f in claimed:
                continue
            p = here / f
            suffix = p.suffix.lower()
            fmt = SLIDE_SUFFIXES.get(suffix)
            if fmt is None or not p.is_file():
                reason = (
                    "not a file" if not p.is_file() else f"not a slide file type ({suffix or 'no suffix'})"
                )
                found.ignored.append(IgnoredFile(_rel(p, base), reason))
                continue
            members = [p]
            if suffix == ".mrxs":
                companion = here / p.stem
                if companion.is_dir():
                    members += sorted(q for q in companion.rglob("*") if q.is_file())
            elif suffix == ".vms":
                members += vms_companions(p)
            found.slides.append(SlideEntry(path=p, rel=_rel(p, base), format=fmt, files=tuple(members)))
    found.slides.sort(key=lambda e: e.rel)
    found.ignored.sort(key=lambda i: i.path)
    return found


def assign_slide_ids(
    entries: Sequence[SlideEntry], *, previous: Mapping[str, str] | None = None
) -> list[SlideEntry]:
    """Give each slide a unique folder name (case-insensitively unique, never a worklist file name).

    The id is :func:`~wsi_screen.pipeline.slide_id_for` of the slide; when two slides would get the
    same id (``a/x.svs``, ``b/x.svs``, ``x.tiff``), the first in sorted order keeps it and the others
    get ``-<6 hex of their relative path>``. ``previous`` ({relative path: id}) pins ids already
    given (watch mode), so an id never moves to another slide within a process.
    """
    from wsi_screen.pipeline import slide_id_for

    previous = dict(previous or {})
    used: set[str] = {n.casefold() for n in WORKLIST_FILES}
    used.update(previous[e.rel].casefold() for e in entries if e.rel in previous)
    out: list[SlideEntry] = []
    for e in entries:
        sid = previous.get(e.rel)
        if sid is None:
            base = slide_id_for(e.path)
            sid = base
            if sid.casefold() in used:
                digest = hashlib.sha1(e.rel.encode()).hexdigest()
                sid = f"{base[:89]}-{digest[:6]}"
                k = 6
                while sid.casefold() in used and k < len(digest):
                    k += 1
                    sid = f"{base[: 96 - k - 1]}-{digest[:k]}"
            used.add(sid.casefold())
        out.append(replace(e, slide_id=sid))
    return out
