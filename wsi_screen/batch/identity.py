"""What makes a result reusable: the slide's files, the result-relevant settings, the models."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from wsi_screen import output_layout as layout
from wsi_screen.batch._common import read_json
from wsi_screen.batch.discovery import SlideEntry, vms_companions
from wsi_screen.config import Settings
from wsi_screen.errors import WsiScreenError

__all__ = [
    "REMOVED_SETTINGS",
    "RESULT_NEUTRAL_SETTINGS",
    "PreviousState",
    "ResumeKey",
    "check_previous",
    "config_hash",
    "entry_fingerprint",
    "entry_signature",
    "models_hash",
    "models_identity",
]

#: Settings that cannot change a slide's results; they are left out of :func:`config_hash`.
RESULT_NEUTRAL_SETTINGS: tuple[str, ...] = (
    "reading.workers",
    "reading.queue_tiles",
    "runtime.device",
    "runtime.torch_threads",
    "localization.batch_size",
    "localization.candidate_workers",
    "classification.batch_size",
)
#: Settings that older versions recorded and this one no longer has; left out of :func:`config_hash`
#: so that their results still resume (``runtime.seed``: nothing read it, removed in issue 17).
REMOVED_SETTINGS: tuple[str, ...] = ("runtime.seed",)


def entry_signature(entry: SlideEntry) -> tuple[tuple[str, int, int], ...]:
    """(name, size, mtime_ns) of every file of the slide, re-listed from disk (watch mode)."""
    paths: list[Path]
    if entry.format == "dicom":
        paths = sorted(q for q in entry.path.iterdir() if q.is_file() and not q.name.startswith("."))
    elif entry.format == "mirax" and entry.path.with_suffix("").is_dir():
        comp = entry.path.with_suffix("")
        paths = [entry.path, *sorted(q for q in comp.rglob("*") if q.is_file())]
    elif entry.format == "hamamatsu" and entry.path.suffix.lower() == ".vms":
        paths = [entry.path, *vms_companions(entry.path)]
    else:
        paths = [entry.path]
    sig = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            continue
        sig.append((str(p), st.st_size, st.st_mtime_ns))
    return tuple(sig)


def entry_fingerprint(entry: SlideEntry) -> str:
    """Content fingerprint of every file of the slide (:func:`~wsi_screen.slide.slide_fingerprint`)."""
    from wsi_screen.slide import slide_fingerprint

    if entry.format != "hamamatsu" or entry.path.suffix.lower() != ".vms" or len(entry.files) == 1:
        return slide_fingerprint(entry.path)
    digest = hashlib.sha256()
    for f in entry.files:
        digest.update(f.name.encode() + b"\0" + slide_fingerprint(f).encode())
    return digest.hexdigest()


def _drop_key(data: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    node: Any = data
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(last, None)


def config_hash(config: Settings | Mapping[str, Any]) -> str:
    """sha256 of the resolved settings minus :data:`RESULT_NEUTRAL_SETTINGS` and
    :data:`REMOVED_SETTINGS` (canonical JSON)."""
    data = config.to_dict() if isinstance(config, Settings) else json.loads(json.dumps(dict(config)))
    for key in (*RESULT_NEUTRAL_SETTINGS, *REMOVED_SETTINGS):
        _drop_key(data, key)
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


def models_identity(settings: Settings) -> list[dict[str, Any]]:
    """task, name, version and weights sha256 of every bundle ``settings`` names (no weights loaded).

    The same list :meth:`~wsi_screen.pipeline.Models.describe` returns after loading.
    """
    from wsi_screen.models.bundle import load_bundle

    loc = load_bundle(settings.localization.model, task="localization", verify=False)
    out = [{"task": "localization", "name": loc.name, "version": loc.config.version, "sha256": loc.sha256}]
    for name in settings.classification.models:
        b = load_bundle(name, task="classification", verify=False)
        out.append(
            {"task": "classification", "name": b.name, "version": b.config.version, "sha256": b.sha256}
        )
    return out


def models_hash(models: Sequence[Mapping[str, Any]]) -> str:
    """sha256 over (task, name, version, weights sha256) of each model, in order."""
    rows = [[str(m.get(k, "")) for k in ("task", "name", "version", "sha256")] for m in models]
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


@dataclass(frozen=True)
class ResumeKey:
    """What makes a slide's result reusable: same file, same result-relevant settings, same models."""

    fingerprint: str
    config: str
    models: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


PreviousState = Literal["match", "missing", "incomplete", "file", "settings", "models", "name"]
PREVIOUS_TEXT = {
    "missing": "no previous result",
    "incomplete": "the previous result is incomplete",
    "file": "the slide file changed",
    "settings": "the settings changed",
    "models": "the models changed",
    "name": "the previous result is of another slide",
}


def check_previous(out_root: Path, entry: SlideEntry, key: ResumeKey) -> PreviousState:
    """Whether ``OUT/<slide-id>/`` is a complete result of this slide made with ``key``."""
    folder = out_root / entry.slide_id
    if not folder.is_dir():
        return "missing"
    run = read_json(folder / layout.RUN)
    if not isinstance(run, dict) or not layout.result_complete(folder, run):
        return "incomplete"
    slide = run.get("slide") if isinstance(run.get("slide"), dict) else {}
    assert isinstance(slide, dict)
    if slide.get("name") not in (None, entry.path.name):
        return "name"
    args = run.get("arguments")
    batch = args.get("batch") if isinstance(args, dict) else None
    if isinstance(batch, dict) and isinstance(batch.get("resume_key"), dict):
        stored = batch["resume_key"]
        fingerprint_ok = stored.get("fingerprint") == key.fingerprint
    else:  # a result of `wsi-screen run`: the pipeline's own fingerprint of the opened file
        from wsi_screen.slide import resolve_slide_path, slide_fingerprint

        try:
            fingerprint_ok = slide.get("fingerprint") == slide_fingerprint(resolve_slide_path(entry.path))
        except (OSError, WsiScreenError):
            fingerprint_ok = False
    if not fingerprint_ok:
        return "file"
    config = run.get("config")
    if not isinstance(config, dict) or config_hash(config) != key.config:
        return "settings"
    models = run.get("models")
    if not isinstance(models, list) or models_hash(models) != key.models:
        return "models"
    return "match"
