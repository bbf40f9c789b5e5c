"""Typed settings, built from YAML presets in ``configs/`` plus user files and CLI overrides.

Resolution order (later wins): the ``default`` preset → a named preset (``lbc``, ``conventional``, …) →
``--config FILE`` → ``--set section.key=value`` / dedicated CLI flags. Every parameter with a physical
meaning is in µm, µm² or µm/px; pixel counts appear only where a model fixes them (tile and crop sizes).
Invalid input raises :class:`~wsi_screen.errors.ConfigError` with a one-line message naming the key.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from wsi_screen.errors import ConfigError

__all__ = [
    "AdequacySettings",
    "ClassificationSettings",
    "LocalizationSettings",
    "ModelIdentity",
    "OperatingPointFigure",
    "OperatingPointSettings",
    "OperatingPointTarget",
    "OutputSettings",
    "ReadingSettings",
    "RuntimeSettings",
    "Settings",
    "SlideSettings",
    "StainSettings",
    "TilingSettings",
    "TissueSettings",
    "TriageSettings",
    "list_presets",
    "load_settings",
    "parse_override",
]

logger = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SlideSettings(_Section):
    """How slides are opened."""

    backend: Literal["openslide", "tiffslide"] = "openslide"
    mpp: float | None = Field(None, gt=0.02, lt=50.0, description="µm/px override (--mpp)")


class TissueSettings(_Section):
    """Cell-region detection on a low-resolution thumbnail (see :mod:`wsi_screen.tissue`)."""

    thumbnail_mpp: float = Field(4.0, gt=0.5, le=64.0, description="thumbnail resolution, µm/px")
    od_threshold: float = Field(0.035, gt=0.0, lt=2.0, description="min optical density of cellular pixels")
    noise_factor: float = Field(4.0, ge=0.0, description="threshold ≥ this × glass noise (robust sigma)")
    closing_um: float = Field(24.0, ge=0.0, description="closing radius merging nearby cells, µm")
    min_object_area_um2: float = Field(60.0, ge=0.0, description="smallest kept object, µm²")
    margin_um: float = Field(16.0, ge=0.0, description="dilation so cell borders are not cut, µm")
    pen_od: float = Field(
        0.9, gt=0.0, description="optical density (strongest channel) above which large blobs are ink/label"
    )
    label_od: float = Field(0.5, gt=0.0, description="OD of label/slide-edge blobs touching the border")
    pen_min_area_um2: float = Field(40_000.0, ge=0.0, description="smallest ink/label blob excluded, µm²")
    pen_margin_um: float = Field(80.0, ge=0.0, description="exclusion margin around ink, µm")
    lbc_spot: Literal["auto", "off"] = "auto"


class TilingSettings(_Section):
    """The tile grid at the model's resolution."""

    tile_size_px: int = Field(1024, ge=64, le=8192, description="tile core size at the model µm/px")
    halo_um: float = Field(32.0, ge=0.0, le=512.0, description="context read around each tile core, µm")
    min_tissue_fraction: float = Field(0.002, ge=0.0, le=1.0, description="keep tiles above this")


class ReadingSettings(_Section):
    """Reader threads and the bounded queues between stages."""

    workers: int = Field(0, ge=0, le=256, description="reader threads (0 = one per CPU core)")
    queue_tiles: int = Field(16, ge=1, le=4096, description="tiles in flight between reader and device")
    max_unreadable_fraction: float = Field(0.05, ge=0.0, le=1.0, description="fail slide above this")
    jpeg_decoder: Literal["auto", "cpu", "device"] = Field(
        "auto",
        description=(
            "where JPEG tiles of directly read TIFF levels (Aperio SVS, generic tiled TIFF) are decoded: "
            "'cpu' (libjpeg-turbo, one tile at a time on the reader threads), 'device' (the tiles each "
            "window needs in one batch on the models' device: nvJPEG on CUDA), 'auto' (device on CUDA "
            "when nvJPEG works there, cpu elsewhere)"
        ),
    )

    @property
    def threads(self) -> int:
        """Reader threads to start: ``workers``, or one per CPU core this process may use."""
        from wsi_screen.runtime import cpu_count

        return self.workers or cpu_count()


class StainSettings(_Section):
    """Reinhard normalization (target statistics come from the model bundle)."""

    enabled: bool = True
    mask_glass: bool = True
    sample_tiles: int = Field(24, ge=1, le=4096, description="tiles sampled for slide source statistics")
    fill_dark_regions: bool = Field(
        True,
        description="show the localizer glass instead of large dark regions (scanner fill, black field "
        "corners, ink, label edges): they are not cells, and they change what the U-Net finds elsewhere",
    )


class LocalizationSettings(_Section):
    """U-Net nucleus localization and candidate extraction."""

    model: str = "nuclei-unet-v3"
    threshold: float | None = Field(None, gt=0.0, lt=1.0, description="probability cut (None: bundle's)")
    min_detection_score: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="drop nuclei whose mean nucleus probability is below this (None: the bundle's "
        "thresholds.detection, 0 when it has none)",
    )
    min_nucleus_area_um2: float = Field(6.0, ge=0.0, description="smallest nucleus kept, µm²")
    max_nucleus_area_um2: float = Field(450.0, gt=0.0, description="largest nucleus kept, µm²")
    min_peak_distance_um: float = Field(3.0, ge=0.0, description="min distance of split nuclei, µm")
    batch_size: int = Field(4, ge=1, le=1024)
    candidate_workers: int | None = Field(
        None,
        ge=0,
        le=1024,
        description=(
            "processes extracting candidates from a batch's probability maps in parallel (0: in the "
            "device thread; None: automatic — every CPU core but one on CUDA/MPS, at most "
            "batch_size; 0 on the CPU, where the U-Net already uses every core)"
        ),
    )
    candidates: Literal["auto", "cpu", "torch"] = Field(
        "auto",
        description=(
            "candidate extraction: 'cpu' (scipy/scikit-image, one tile at a time, in candidate_workers "
            "processes), 'torch' (batched on the U-Net's device, the maps never leave it: "
            "wsi_screen.candidates_torch), 'auto' (torch on CUDA, cpu elsewhere, where it is faster)"
        ),
    )

    @model_validator(mode="after")
    def _areas(self) -> LocalizationSettings:
        if self.max_nucleus_area_um2 <= self.min_nucleus_area_um2:
            raise ValueError(
                f"max_nucleus_area_um2 ({self.max_nucleus_area_um2}) must exceed "
                f"min_nucleus_area_um2 ({self.min_nucleus_area_um2})"
            )
        return self


class ClassificationSettings(_Section):
    """Cell classifier bundle(s); several bundles are averaged (an ensemble)."""

    # cyto-real-v1 (real cells of several sources + synthetic cells, 9 classes) is the default since it
    # was measured against cyto-synth-v1 and cyto-herlev-v1 on held-out real cells (docs/models.md).
    models: list[str] = Field(default_factory=lambda: ["cyto-real-v1"], min_length=1)
    batch_size: int = Field(128, ge=1, le=65536)
    tta: Literal[1, 2, 4, 8] = Field(
        1,
        description="test-time augmentation: probabilities averaged over this many flips/90° rotations "
        "of each crop (1 = none); costs tta × the classifier's time",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v


class AdequacySettings(_Section):
    """Specimen adequacy (Bethesda 2014: 5,000 squamous cells for LBC, 8,000 for conventional smears).

    The estimate counts *well-preserved* cells: every cell whose predicted class is not in
    ``exclude_classes`` and whose top class probability is at least ``min_confidence``.
    """

    preparation: Literal["lbc", "conventional"] = "lbc"
    min_squamous_cells: int = Field(5000, ge=0, description="cells needed for an adequate specimen")
    min_confidence: float = Field(0.5, ge=0.0, le=1.0, description="a cell counts if max prob ≥ this")
    exclude_classes: list[str] = Field(
        default_factory=lambda: ["artifact", "organism", "endocervical"],
        description="predicted classes that are not well-preserved squamous cells",
    )


class TriageSettings(_Section):
    """Slide-level triage rules (explained in docs/outputs.md)."""

    confidence: float = Field(0.7, ge=0.0, le=1.0, description="a cell is confident if its prob ≥ this")
    min_cells: dict[str, int] = Field(
        default_factory=lambda: {"SCC": 2, "HSIL": 2, "ASC-H": 2, "AGC": 2, "LSIL": 3, "ASC-US": 5},
        description="confident cells needed to suggest each category (classes a model lacks are ignored)",
    )
    severity: dict[str, float] = Field(
        default_factory=lambda: {
            "ASC-US": 0.5,
            "LSIL": 0.7,
            "AGC": 0.85,
            "ASC-H": 0.85,
            "HSIL": 1.0,
            "SCC": 1.0,
        },
        description="weight in [0, 1] of each abnormal class in the ranking score (unlisted: 1.0)",
    )
    top_k: int = Field(10, ge=1, le=10_000, description="cells averaged into the ranking score")
    review_score: float = Field(0.5, ge=0.0, le=1.0, description="score that sends a slide to review")
    priority_score: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="score that sends a slide to priority review (None: priority by category only; "
        "`wsi-screen calibrate` sets it)",
    )
    inadequate_abnormal_score: float = Field(
        0.5,
        ge=0.0,
        le=1.0,
        description="an inadequate slide with a cell whose abnormality score (summed abnormal-class "
        "probability) is at least this goes to review, never unsatisfactory",
    )
    priority_categories: list[str] = Field(
        default_factory=lambda: ["HSIL", "SCC", "ASC-H", "AGC"],
        description="categories sent to priority review (HSIL+ is HSIL and SCC; ASC-H and AGC join them)",
    )
    review_categories: list[str] = Field(default_factory=lambda: ["ASC-US", "LSIL"])
    min_organism_cells: int = Field(
        3, ge=1, description="confident organism cells that raise the slide's organism finding (NILM)"
    )
    min_endocervical_cells: int = Field(
        10,
        ge=1,
        description="confident endocervical cells for the transformation-zone finding (Bethesda: 10)",
    )
    min_cellular_area_mm2: float = Field(0.05, ge=0.0, description="QC: less cellular area is flagged")
    max_artifact_fraction: float = Field(0.5, ge=0.0, le=1.0, description="QC: flag above this")
    min_focus: float = Field(
        0.65,
        ge=0.0,
        description="a tile is out of focus below this sharpness ratio (fine / mid band edge detail)",
    )
    max_out_of_focus_fraction: float = Field(
        0.1, ge=0.0, le=1.0, description="QC: flag when more of the processed tiles are out of focus"
    )
    max_unreadable_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="QC: flag when more of the processed tiles are unreadable"
    )

    @field_validator("severity")
    @classmethod
    def _severity_range(cls, v: dict[str, float]) -> dict[str, float]:
        bad = {k: w for k, w in v.items() if not 0.0 <= w <= 1.0}
        if bad:
            raise ValueError(f"severity weights must lie in [0, 1], got {bad}")
        return v

    @model_validator(mode="after")
    def _priority_above_review(self) -> TriageSettings:
        p = self.priority_score
        if p is not None and p < self.review_score:
            raise ValueError(f"priority_score ({p}) must not be below review_score ({self.review_score})")
        return self

    @field_validator("min_cells")
    @classmethod
    def _min_cells_positive(cls, v: dict[str, int]) -> dict[str, int]:
        bad = {k: n for k, n in v.items() if n < 1}
        if bad:
            raise ValueError(f"min_cells must be ≥ 1, got {bad}")
        return v


class OutputSettings(_Section):
    """What is written next to ``cells.zarr`` (``wsi-screen export`` re-exports with other values)."""

    flag_min_score: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="cells with an abnormality score ≥ this are exported to GeoJSON "
        "(None: the classifier bundle's thresholds.flag_score, else 0.5)",
    )
    flag_classes: list[str] = Field(
        default_factory=list, description="only cells predicted as these classes (empty: any class)"
    )
    flag_max_cells: int = Field(
        5000, ge=0, description="cap on exported cells, highest score first (0: none)"
    )
    geojson_gzip: bool = False
    object_type: Literal["detection", "cell"] = "detection"
    top_n: int = Field(48, ge=0, le=1000, description="cells in summary top_cells and the report")
    report: bool = True
    report_crop_um: float = Field(40.0, gt=0.0, le=500.0, description="side of the report's cell crops, µm")
    report_heatmap_um: float = Field(
        250.0, gt=0.0, le=10_000.0, description="side of a heat-map square in the report, µm"
    )
    zarr_chunk_cells: int = Field(65536, ge=1024, description="rows per Zarr chunk")


UNCALIBRATED_NOTE = (
    "uncalibrated defaults: the triage thresholds (triage.review_score, triage.priority_score) were not "
    "chosen on diagnosed slides of this lab and no sensitivity has been validated with them; "
    "run `wsi-screen calibrate` on validation slides (docs/calibration.md)"
)


class ModelIdentity(_Section):
    """One model bundle an operating point was calibrated with (as in ``summary.json`` ``versions``)."""

    task: str
    name: str
    version: str | None = None
    sha256: str


class OperatingPointTarget(_Section):
    """What an operating point was chosen to reach."""

    hsil_plus: float = Field(1.0, ge=0.0, le=1.0, description="share of HSIL+ slides kept in review")
    ascus_plus: float = Field(0.98, ge=0.0, le=1.0, description="share of ASC-US+ slides kept in review")
    priority: float = Field(0.9, ge=0.0, le=1.0, description="share of HSIL+ slides triaged priority")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="one-sided confidence of the lower bounds")
    high_grade: list[str] = Field(
        default_factory=lambda: ["HSIL", "SCC", "AIS", "ADENOCARCINOMA"],
        description="diagnoses counted as HSIL+",
    )


class OperatingPointFigure(_Section):
    """A proportion measured on the calibration slides: ``count`` of ``n``."""

    n: int = Field(ge=0)
    count: int = Field(ge=0)
    value: float | None = Field(None, ge=0.0, le=1.0)
    lower_bound: float | None = Field(
        None, ge=0.0, le=1.0, description="exact one-sided Clopper–Pearson lower bound (sensitivities)"
    )

    @model_validator(mode="after")
    def _count(self) -> OperatingPointFigure:
        if self.count > self.n:
            raise ValueError(f"count ({self.count}) exceeds n ({self.n})")
        return self


class OperatingPointSettings(_Section):
    """The operating point behind the triage thresholds, written by ``wsi-screen calibrate``.

    Uncalibrated by default. ``summary.json`` and ``report.html`` copy it, so every triage names the
    operating point that produced it and the figures it was validated with.
    """

    calibrated: bool = False
    name: str = "uncalibrated-defaults"
    note: str = UNCALIBRATED_NOTE
    date: str | None = Field(None, description="calibration date (ISO 8601)")
    source_batch: str | None = Field(None, description="batch output the thresholds were chosen on")
    diagnoses: str | None = Field(None, description="CSV of the slide diagnoses")
    review_score: float | None = Field(None, ge=0.0, le=1.0, description="calibrated review threshold")
    priority_score: float | None = Field(None, ge=0.0, le=1.0, description="calibrated priority threshold")
    target: OperatingPointTarget | None = None
    sensitivity: dict[str, OperatingPointFigure] = Field(
        default_factory=dict, description="achieved: HSIL+ and ASC-US+ kept, HSIL+ in priority"
    )
    negatives_set_aside: OperatingPointFigure | None = Field(
        None, description="NILM slides triaged negative (no further review)"
    )
    auroc: float | None = Field(None, ge=0.0, le=1.0, description="slide score AUROC, ASC-US+ vs NILM")
    n_slides: dict[str, int] = Field(default_factory=dict, description="calibration slides per diagnosis")
    models: list[ModelIdentity] = Field(default_factory=list, description="models of the calibration batch")
    adequacy: dict[str, Any] = Field(default_factory=dict, description="adequacy rules of that batch")

    @model_validator(mode="after")
    def _complete(self) -> OperatingPointSettings:
        if self.calibrated:
            missing = [
                k for k in ("review_score", "target", "negatives_set_aside") if getattr(self, k) is None
            ]
            if not self.models:
                missing.append("models")
            if missing:
                raise ValueError(f"a calibrated operating point needs {', '.join(missing)}")
        return self

    def matches(self, triage: TriageSettings) -> bool:
        """Whether ``triage`` uses the thresholds this operating point was calibrated for."""
        if not self.calibrated:
            return True
        return triage.review_score == self.review_score and triage.priority_score == self.priority_score

    def describe(self, triage: TriageSettings) -> dict[str, Any]:
        """The ``operating_point`` block of ``summary.json``: this section plus whether it applies."""
        out: dict[str, Any] = {
            k: v for k, v in self.model_dump(mode="json", exclude_none=True).items() if v not in ({}, [])
        }
        out["applies"] = self.matches(triage)
        if not out["applies"]:
            out["note"] = (
                f"the triage thresholds (review_score {triage.review_score}, priority_score "
                f"{triage.priority_score}) differ from those of operating point {self.name!r} "
                f"(review_score {self.review_score}, priority_score {self.priority_score}): "
                "its validated figures do not apply to this triage"
            )
        return out

    def check_models(self, models: Sequence[Mapping[str, Any]]) -> None:
        """Raise :class:`ConfigError` unless ``models`` (task, name, sha256) are those calibrated with."""
        if not self.calibrated:
            return
        want = sorted((m.task, m.sha256) for m in self.models)
        have = sorted((str(m.get("task", "")), str(m.get("sha256", ""))) for m in models)
        if want == have:
            return

        def names(ms: Sequence[Any]) -> str:
            return ", ".join(
                f"{_get(m, 'task')} {_get(m, 'name')} ({str(_get(m, 'sha256'))[:12]})" for m in ms
            )

        raise ConfigError(
            f"operating point {self.name!r} was calibrated with {names(self.models)}, but this run uses "
            f"{names(list(models))}: run with the calibrated models or calibrate again for these"
        )


def _get(obj: Any, key: str) -> Any:
    return obj.get(key, "?") if isinstance(obj, Mapping) else getattr(obj, key, "?")


class RuntimeSettings(_Section):
    """Where and how the models run."""

    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    torch_threads: int = Field(0, ge=0, description="0 = torch default")
    cpu_bf16: bool = Field(
        False,
        description=(
            "bf16 autocast for the models on the CPU too (as on CUDA): faster on CPUs with AMX or "
            "AVX-512-BF16, slower elsewhere; results change slightly (figures in docs/performance.md)"
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _ignore_seed(cls, data: Any) -> Any:
        """``runtime.seed``, a setting nothing read (removed), still loads from older files: ignored."""
        if isinstance(data, Mapping) and "seed" in data:
            logger.warning(
                "setting runtime.seed is ignored (it never had an effect) and will be refused by a later "
                "version; remove it from the configuration"
            )
            data = {k: v for k, v in data.items() if k != "seed"}
        return data


class Settings(_Section):
    """All settings of a run (``run.json`` records the resolved values)."""

    preset: str = "default"
    slide: SlideSettings = SlideSettings()
    tissue: TissueSettings = TissueSettings()
    tiling: TilingSettings = TilingSettings()
    reading: ReadingSettings = ReadingSettings()
    stain: StainSettings = StainSettings()
    localization: LocalizationSettings = LocalizationSettings()
    classification: ClassificationSettings = ClassificationSettings()
    adequacy: AdequacySettings = AdequacySettings()
    triage: TriageSettings = TriageSettings()
    output: OutputSettings = OutputSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    operating_point: OperatingPointSettings = OperatingPointSettings()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-compatible dict."""
        return json.loads(self.model_dump_json())  # type: ignore[no-any-return]

    def with_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """A copy with dotted-key overrides applied (``{"triage.confidence": 0.8}``)."""
        data = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(data, key, value)
        return _validate(data, source="overrides")


def _presets_dir() -> Any:
    return importlib.resources.files("wsi_screen.configs")


def list_presets() -> list[str]:
    """Names of the YAML presets shipped in ``configs/``."""
    return sorted(p.name.removesuffix(".yaml") for p in _presets_dir().iterdir() if p.name.endswith(".yaml"))


def _read_yaml(text: str, source: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{source}: not valid YAML{where}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    return data


def _preset_data(name: str) -> dict[str, Any]:
    res = _presets_dir() / f"{name}.yaml"
    if not res.is_file():
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return _read_yaml(res.read_text(encoding="utf-8"), f"preset {name}")


def _deep_merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            raise ConfigError(f"unknown setting {key!r} (no section {part!r})")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``section.key=value`` (value read as YAML: numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML") from exc
    return key, value


def _validate(data: Mapping[str, Any], *, source: str) -> Settings:
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        value = err.get("input")
        shown = "" if isinstance(value, dict) else f" = {value!r}"
        if err["type"] == "extra_forbidden":
            raise ConfigError(f"{source}: unknown setting {loc!r}{shown}") from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{source}: invalid {loc}{shown}: {msg}") from None


def load_settings(
    preset: str | None = None,
    *,
    config: str | Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Resolve settings from the default preset, a named preset, a YAML file and overrides."""
    data = _preset_data("default")
    name = preset or "default"
    if preset and preset != "default":
        data = _deep_merge(data, _preset_data(preset))
    if config is not None:
        path = Path(config)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        user = _read_yaml(path.read_text(encoding="utf-8"), str(path))
        if "preset" in user and user["preset"] != name and preset is None:
            data = _deep_merge(data, _preset_data(str(user["preset"])))
        data = _deep_merge(data, user)
        name = str(user.get("preset", name))
    data["preset"] = name
    source = str(config) if config is not None else f"preset {name}"
    settings = _validate(data, source=source)
    if overrides:
        settings = settings.with_overrides(overrides)
    return settings
