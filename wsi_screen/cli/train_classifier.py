"""``wsi-screen train classifier``: train a cell classifier bundle on labelled crops.

The data options (``--data``, ``--annotations``/``--slides``, ``--synthetic``) are shared with
``wsi-screen evaluate`` (:func:`data_options`, :func:`crops_from_options`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from wsi_screen.cli.main import common_options, configure_from_context
from wsi_screen.cli.options import config_options, settings_from_options
from wsi_screen.cli.train import train

F = TypeVar("F", bound=Callable[..., Any])

__all__ = ["crops_from_options", "data_option_values", "data_options", "run_options"]


def _csv_list(text: str | None) -> list[str] | None:
    if text is None:
        return None
    items = [t.strip() for t in text.split(",") if t.strip()]
    return items or None


def data_options(func: F) -> F:
    """Where labelled crops come from (any mix of the three sources)."""
    opts = [
        click.option(
            "--data",
            "data_dirs",
            multiple=True,
            type=click.Path(file_okay=False, path_type=Path),
            metavar="DIR",
            help="Folder of labelled crops, one sub-folder per class (any crop size; needs --mpp), "
            "or a crop set saved with --save-crops. Repeatable.",
        ),
        click.option(
            "--mpp",
            type=click.FloatRange(min=0.02, max=50.0),
            default=None,
            help="µm/px of the crops in --data (Herlev: 0.201; SIPaKMeD, CRIC: see their papers).",
        ),
        click.option(
            "--class-map",
            default=None,
            metavar="NAME|FILE",
            help="Map folder / QuPath class names to bundle classes: a preset "
            "(herlev-bethesda, sipakmed-bethesda, cric-bethesda) or a YAML/JSON file "
            "(a class mapped to null is skipped).",
        ),
        click.option(
            "--ignore",
            "ignore",
            multiple=True,
            metavar="GLOB",
            help="Skip the folders of --data whose name matches GLOB (e.g. masks, '*_raw'; any depth, "
            "case-insensitive). Repeatable.",
        ),
        click.option(
            "--annotations",
            multiple=True,
            metavar="GLOB",
            help="QuPath GeoJSON exports (point or polygon objects with a class), e.g. 'ann/*.geojson'; "
            "each file is named after its slide. Repeatable; needs --slides.",
        ),
        click.option(
            "--slides",
            "slides_dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Folder with the annotated slides (ABC.svs for ABC.geojson or ABC.svs.geojson).",
        ),
        click.option(
            "--slide-mpp",
            type=click.FloatRange(min=0.02, max=50.0),
            default=None,
            help="Level-0 µm/px of annotated slides that lack it.",
        ),
        click.option(
            "--synthetic",
            type=click.IntRange(min=0),
            default=0,
            metavar="N",
            help="Also draw N synthetic slides and cut their cells through the inference path "
            "(needs the localization bundle; labels from the exact ground truth).",
        ),
        click.option(
            "--synthetic-seed", type=int, default=0, show_default=True, help="Seed of the synthetic slides."
        ),
        click.option(
            "--synthetic-size",
            type=click.IntRange(min=512),
            default=4096,
            show_default=True,
            help="Side of each synthetic slide in pixels (at 0.25 µm/px).",
        ),
        click.option(
            "--cache",
            "cache_dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Where synthetic crops are cached (default: ./wsi-screen-synthetic-crops).",
        ),
        click.option(
            "--localizer",
            default=None,
            metavar="BUNDLE",
            help="Localization bundle for --synthetic and for crop folders cut by the pipeline "
            "(--cut pipeline) [default: the settings' localization.model].",
        ),
        click.option(
            "--stain",
            type=click.Choice(["group", "crop", "dataset", "none"]),
            default="group",
            show_default=True,
            help="Reinhard source statistics of --data crops: pooled per group (slide/patient/image), "
            "per crop, over the data set, or no normalization.",
        ),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


def run_options(func: F) -> F:
    """How and where a training run runs (shared by ``train classifier`` and ``train ssl``)."""
    opts = [
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--device",
            type=click.Choice(["auto", "cpu", "cuda", "mps"]),
            default="auto",
            show_default=True,
            help="Training device (auto: CUDA, then MPS, then CPU).",
        ),
        click.option("--threads", type=click.IntRange(min=0), default=0, help="CPU threads (0: all cores)."),
        click.option(
            "--max-minutes",
            type=click.FloatRange(min=0.0, min_open=True),
            default=None,
            help="Stop (cleanly, after an epoch) once this much training time has passed.",
        ),
        click.option(
            "--samples-per-epoch",
            type=click.IntRange(min=2),
            default=None,
            help="Crops per epoch (default: every training crop once).",
        ),
        click.option(
            "--work-dir",
            type=click.Path(file_okay=False, path_type=Path),
            default=None,
            help="Checkpoints and logs (default: OUTPUT.train beside the bundle).",
        ),
        click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the work folder."),
        click.option(
            "--half/--no-half", default=False, show_default=True, help="Store the weights as float16."
        ),
        click.option(
            "--input-size", type=click.IntRange(min=32), default=224, show_default=True, help="Crop side, px."
        ),
        click.option(
            "--model-mpp",
            type=click.FloatRange(min=0.05, max=5.0),
            default=0.25,
            show_default=True,
            help="µm/px the classifier works at (crops are resampled to it).",
        ),
    ]
    for opt in reversed(opts):
        func = opt(func)
    return func


#: Keyword arguments of :func:`crops_from_options` that come straight from :func:`data_options`.
DATA_OPTION_NAMES = (
    "data_dirs",
    "mpp",
    "class_map",
    "ignore",
    "annotations",
    "slides_dir",
    "slide_mpp",
    "synthetic",
    "synthetic_seed",
    "synthetic_size",
    "cache_dir",
    "localizer",
)


def data_option_values(kw: dict[str, Any]) -> dict[str, Any]:
    """The :func:`data_options` values of a command's keyword arguments, for :func:`crops_from_options`."""
    return {name: kw[name] for name in DATA_OPTION_NAMES}


def crops_from_options(
    *,
    data_dirs: tuple[Path, ...],
    mpp: float | None,
    class_map: str | None,
    annotations: tuple[str, ...],
    slides_dir: Path | None,
    slide_mpp: float | None,
    synthetic: int,
    synthetic_seed: int,
    synthetic_size: int,
    cache_dir: Path | None,
    localizer: str | None,
    stain: str,
    classes: list[str] | None,
    target_mpp: float,
    size: int,
    settings: Any,
    device: str,
    progress: bool,
    stain_target: Any = None,
    mask_channel: bool = False,
    ignore: tuple[str, ...] = (),
    cut: str = "crop",
) -> Any:
    """Load the crops named by :func:`data_options` (a :class:`~wsi_screen.train.data.CropSet`);
    ``mask_channel``: with the nucleus-mask channel (``rgb+mask`` bundles); ``cut``: how crop folders
    become crops (:func:`~wsi_screen.train.data.collect_crops`)."""
    from wsi_screen.train.data import collect_crops

    if localizer:
        settings = settings.with_overrides({"localization.model": localizer})
    return collect_crops(
        data=list(data_dirs),
        mpp=mpp,
        class_map=class_map,
        classes=classes,
        annotations=list(annotations),
        slides_dir=slides_dir,
        slide_mpp=slide_mpp,
        synthetic=synthetic,
        synthetic_seed=synthetic_seed,
        synthetic_size_px=synthetic_size,
        cache_dir=cache_dir,
        target_mpp=target_mpp,
        size=size,
        stain_target=stain_target,
        stain=stain,  # type: ignore[arg-type]
        settings=settings,
        device=device,
        progress=progress,
        mask_channel=mask_channel,
        ignore=list(ignore),
        cut=cut,  # type: ignore[arg-type]
    )


@train.command("classifier", short_help="Train a cell classifier bundle on labelled crops.")
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The bundle folder to write (use it with `wsi-screen run SLIDE --model OUTPUT`).",
)
@data_options
@click.option(
    "--cut",
    type=click.Choice(["crop", "pipeline"]),
    default="crop",
    show_default=True,
    help="How --data crop folders become training crops. crop: each crop rescaled, padded with its "
    "glass, normalized by --stain. pipeline: the cells pasted into slides and cut as `run` cuts them "
    "(slide-level Reinhard, the localizer's centres; up to 3 detections a cell): training then sees "
    "the pixels screening sees.",
)
@click.option(
    "--classes",
    default=None,
    metavar="A,B,...",
    help="Bundle classes in output order (default: the classes in the data, in Bethesda order).",
)
@click.option(
    "--abnormal",
    default=None,
    metavar="A,B,...",
    help="Abnormal classes (default: every class but NILM and artifact).",
)
@click.option("--name", default=None, help="Bundle name (default: the output folder's name).")
@click.option(
    "--arch",
    default=None,
    help="Architecture: any timm name (resnet50, efficientnet_b0, ...), runicnet or runicnet-tiny "
    "[default: mobilenetv3_small_100, small enough to train on a CPU].",
)
@click.option(
    "--arch-kwargs",
    default=None,
    metavar="JSON",
    help="Constructor arguments of the architecture, e.g. '{\"drop_rate\": 0.2}'.",
)
@click.option(
    "--init",
    default=None,
    metavar="BUNDLE",
    help="Start from a classifier bundle's weights (its architecture; a new head if the classes differ).",
)
@click.option(
    "--mask-channel",
    is_flag=True,
    help="Feed the classifier the nucleus mask as a 4th input channel (segmentation-informed; the "
    "bundle is rgb+mask and `run` makes the channel with the localizer). Needs --annotations or "
    "--synthetic: crop folders have no slide to localize in.",
)
@click.option(
    "--freeze-epochs",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Train only the head for the first N epochs, then everything (meaningful with --init: "
    "no ImageNet weights are available here).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=2e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0.0), default=0.02, show_default=True)
@click.option(
    "--balanced",
    is_flag=True,
    help="Class-balanced sampling (every class drawn equally often).",
)
@click.option(
    "--balance-sources",
    is_flag=True,
    help="Within each class, draw every source (the crop set's sources) equally often.",
)
@click.option(
    "--class-weights",
    type=click.Choice(["none", "balanced"]),
    default="none",
    show_default=True,
    help="Loss weights ∝ 1 / class frequency (balanced).",
)
@click.option(
    "--focal-loss",
    "focal_gamma",
    type=click.FloatRange(min=0.0),
    default=None,
    is_flag=False,
    flag_value=2.0,
    metavar="[GAMMA]",
    help="Focal loss instead of cross-entropy (gamma default 2).",
)
@click.option("--label-smoothing", type=click.FloatRange(0.0, 0.5), default=0.0, show_default=True)
@click.option(
    "--binary-loss",
    type=click.FloatRange(min=0.0),
    default=0.0,
    show_default=True,
    help="Add this weight × the log loss of the screening score (abnormal classes against the rest).",
)
@click.option("--no-augment", is_flag=True, help="No augmentation (flips, rotations, scale, blur, colour).")
@click.option(
    "--strong-augment",
    is_flag=True,
    help="Stain and scanner preset: wider HED/colour/blur ranges and JPEG round trips (quality 50–95).",
)
@click.option(
    "--hed-jitter",
    type=click.FloatRange(0.0, 0.5),
    default=None,
    help="HED colour jitter amplitude (default 0.04); mimics other stains and scanners.",
)
@click.option(
    "--scale-jitter",
    type=click.FloatRange(0.0, 0.5),
    default=None,
    help="Relative scale jitter (default 0.08; nucleus size is diagnostic, keep it small).",
)
@click.option(
    "--patience",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Stop after N epochs without improvement on the validation split (0: never).",
)
@click.option(
    "--monitor",
    type=click.Choice(["macro_f1", "accuracy", "loss", "binary_auroc"]),
    default="macro_f1",
    show_default=True,
    help="Validation figure for model selection and early stopping (binary_auroc: the screening score's).",
)
@click.option("--val-fraction", type=click.FloatRange(0.0, 0.9), default=0.15, show_default=True)
@click.option("--test-fraction", type=click.FloatRange(0.0, 0.9), default=0.15, show_default=True)
@run_options
@click.option(
    "--save-crops",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also save the prepared crops (a crop set --data reads back without re-preparing).",
)
@click.option("--description", default="", help="One line for the bundle (what it is).")
@click.option("--intended-use", default="", help="Recorded in the bundle.")
@click.option("--limitations", default="", help="Recorded in the bundle.")
@config_options
@common_options
@click.pass_context
def train_classifier_cmd(ctx: click.Context, /, **kw: Any) -> None:
    """Train a cell classifier and write a model bundle that `wsi-screen run --model` uses.

    \b
    Data (any mix):
      --data DIR --mpp F [--class-map NAME]      crop folders (Herlev, SIPaKMeD, CRIC exports);
                                                 --ignore GLOB skips non-class folders (masks)
      --annotations 'ANN/*.geojson' --slides DIR  QuPath point/polygon annotations on slides
      --synthetic N                               synthetic slides with exact ground truth

    --mask-channel adds the nucleus mask as a 4th input channel (annotations and synthetic slides).
    Splits are by group (slide, patient or source image): no group is in two splits; the split
    is saved as split.json in the bundle. Validation/test metrics are stored in bundle.json.
    See docs/training.md.
    """
    obj = configure_from_context(ctx)
    progress = not bool(obj.get("quiet"))
    from wsi_screen.train.augment import AugmentConfig
    from wsi_screen.train.classifier import DEFAULT_ARCH, TrainConfig, train_classifier

    settings = settings_from_options(kw["preset"], kw["config_path"], kw["overrides"])
    classes = _csv_list(kw["classes"])
    abnormal = _csv_list(kw["abnormal"])
    if kw["arch"] and kw["init"]:
        raise click.UsageError("--arch and --init exclude each other (--init uses its bundle's architecture)")
    arch_kwargs: dict[str, Any] = {}
    if kw["arch_kwargs"]:
        try:
            arch_kwargs = json.loads(kw["arch_kwargs"])
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not valid JSON: {exc}", param_hint="--arch-kwargs") from exc
        if not isinstance(arch_kwargs, dict):
            raise click.BadParameter("must be a JSON object", param_hint="--arch-kwargs")
    if kw["init"] and not kw["mask_channel"]:
        from wsi_screen.classify import MASK_REPRESENTATION
        from wsi_screen.models.bundle import load_bundle

        init_cfg = load_bundle(kw["init"], task="classification").config
        if init_cfg.input_representation == MASK_REPRESENTATION:
            raise click.UsageError(
                f"--init {init_cfg.name} takes {init_cfg.input_representation} crops: add --mask-channel"
            )
    if kw["no_augment"] and kw["strong_augment"]:
        raise click.UsageError("--no-augment and --strong-augment contradict each other: pass one")
    if kw["no_augment"]:
        augment = AugmentConfig.none()
    else:
        base = AugmentConfig.strong() if kw["strong_augment"] else AugmentConfig()
        changes: dict[str, float] = {}
        if kw["hed_jitter"] is not None:
            changes["hed"] = kw["hed_jitter"]
        if kw["scale_jitter"] is not None:
            changes["scale"] = kw["scale_jitter"]
        augment = AugmentConfig(**{**base.to_dict(), **changes})
    try:
        config = TrainConfig(
            arch=kw["arch"] or DEFAULT_ARCH,
            arch_kwargs=arch_kwargs,
            epochs=kw["epochs"],
            batch_size=kw["batch_size"],
            lr=kw["lr"],
            weight_decay=kw["weight_decay"],
            focal_gamma=kw["focal_gamma"],
            class_weights=kw["class_weights"],
            balanced_sampler=kw["balanced"],
            balance_sources=kw["balance_sources"],
            label_smoothing=kw["label_smoothing"],
            binary_loss=kw["binary_loss"],
            augment=augment,
            freeze_epochs=kw["freeze_epochs"],
            init=kw["init"],
            patience=kw["patience"],
            monitor=kw["monitor"],
            val_fraction=kw["val_fraction"],
            test_fraction=kw["test_fraction"],
            seed=kw["seed"],
            device=kw["device"],
            threads=kw["threads"],
            max_minutes=kw["max_minutes"],
            samples_per_epoch=kw["samples_per_epoch"],
            half=kw["half"],
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    data = crops_from_options(
        **data_option_values(kw),
        stain=kw["stain"],
        classes=classes,
        target_mpp=kw["model_mpp"],
        size=kw["input_size"],
        settings=settings,
        device=kw["device"],
        progress=progress,
        mask_channel=kw["mask_channel"],
        cut=kw["cut"],
    )
    click.echo(
        f"{len(data):,} crops from {len(set(data.groups.tolist())):,} groups: "
        + ", ".join(f"{c} {n:,}" for c, n in data.class_counts().items()),
        err=True,
    )
    if kw["save_crops"] is not None:
        data.save(kw["save_crops"])
        click.echo(f"crops saved to {kw['save_crops']}", err=True)
    result = train_classifier(
        data,
        kw["out_dir"],
        config=config,
        name=kw["name"],
        class_names=classes,
        abnormal_classes=abnormal,
        work_dir=kw["work_dir"],
        resume=kw["resume"],
        progress=progress,
        description=kw["description"],
        intended_use=kw["intended_use"],
        limitations=kw["limitations"],
    )
    from wsi_screen.metrics import format_metrics_table

    part = "test" if "test" in result.metrics else "val"
    if part in result.metrics:
        click.echo(f"\n{part} split ({result.metrics[part]['n']} crops), best epoch {result.best_epoch}:")
        click.echo(format_metrics_table(result.metrics[part]))
    click.echo(f"bundle: {result.out_dir} (train: {result.work_dir}) in {result.seconds / 60:.1f} min")
