"""``wsi-screen evaluate``: cell-level screening metrics of classifier bundle(s) on labelled crops."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from wsi_screen.cli.main import cli, common_options, configure_from_context
from wsi_screen.cli.options import config_options, settings_from_options
from wsi_screen.cli.train_classifier import crops_from_options, data_option_values, data_options


@cli.command("evaluate", short_help="Score classifier bundle(s) on labelled crops or annotated slides.")
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    metavar="BUNDLE",
    help="Classifier bundle (name or folder); repeat for an ensemble (probabilities averaged).",
)
@data_options
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write metrics.json, confusion_matrix.png, reliability.png and report.html here.",
)
@click.option(
    "--classes",
    "class_mode",
    type=click.Choice(["pooled", "present", "all"]),
    default="pooled",
    show_default=True,
    help="pooled: score over the classes in the data, each other bundle class counted as one of them "
    "(ASC-US as LSIL, ASC-H/SCC/AGC as HSIL, organism/artifact as NILM, when the data has only those), "
    "which keeps the screening score; present: the other classes dropped, probabilities renormalized; "
    "all: over every bundle class.",
)
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda", "mps"]),
    default="auto",
    show_default=True,
)
@click.option(
    "--cut",
    type=click.Choice(["pipeline", "crop"]),
    default="pipeline",
    show_default=True,
    help="How --data crop folders reach the classifier. pipeline: every cell is pasted into slides and "
    "cut as `run` cuts it (slide-level Reinhard, the localizer's centres, the bundle's crops); a cell "
    "scores as its most abnormal detection, an undetected cell as a negative call. crop: each crop is "
    "rescaled, padded with its glass and normalized by --stain (a box screening never sees).",
)
@click.option(
    "--keep-slides",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="With --cut pipeline: keep the slides the cells were pasted into (one sub-folder per --data "
    "folder: pasted-NNNN.tiff and its .truth.npz), e.g. to open them in QuPath.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the full metrics as JSON instead of tables.")
@config_options
@common_options
@click.pass_context
def evaluate(ctx: click.Context, /, **kw: Any) -> None:
    """Run classifier bundle(s) on labelled crops and report the screening metrics.

    \b
    Data (any mix, as for `wsi-screen train classifier`):
      --data DIR --mpp F [--class-map NAME]      crop folders (Herlev: --mpp 0.201
                                                 --class-map herlev-bethesda), or saved crop sets;
                                                 --ignore GLOB skips non-class folders (masks)
      --annotations 'ANN/*.geojson' --slides DIR  QuPath annotations, cut as screening cuts them
      --synthetic N                               synthetic slides with exact ground truth

    Prints accuracy, per-class precision/recall/F1/AUROC, the HSIL→NILM under-call rate, the
    needs-review sensitivity/specificity and the calibration (definitions: docs/training.md).
    """
    obj = configure_from_context(ctx)
    progress = not bool(obj.get("quiet"))
    from wsi_screen.classify import MASK_REPRESENTATION
    from wsi_screen.metrics import format_metrics_table, write_metrics_report
    from wsi_screen.models.bundle import load_bundle
    from wsi_screen.stain import ReinhardStats
    from wsi_screen.train.classifier import evaluate_bundles
    from wsi_screen.train.data import CropSet

    settings = settings_from_options(kw["preset"], kw["config_path"], kw["overrides"])
    first = load_bundle(kw["models"][0], task="classification").config
    target = (
        None if first.stain_target is None else ReinhardStats(first.stain_target.mu, first.stain_target.sigma)
    )
    values = data_option_values(kw)
    folders: tuple[Path, ...] = ()
    if kw["cut"] == "pipeline":  # crop folders go through the pipeline; saved crop sets as they are
        folders = tuple(d for d in values["data_dirs"] if not CropSet.is_cropset(d))
        values["data_dirs"] = tuple(d for d in values["data_dirs"] if d not in folders)
    screened = _screen_folders(folders, kw, settings, target, progress) if folders else []
    data = None
    if values["data_dirs"] or values["annotations"] or values["synthetic"] or not folders:
        data = crops_from_options(
            **values,
            stain="none" if target is None else kw["stain"],
            classes=None,
            target_mpp=first.mpp,
            size=first.input_size,
            settings=settings,
            device=kw["device"],
            progress=progress,
            stain_target=target,
            mask_channel=first.input_representation == MASK_REPRESENTATION,
        )
    metrics = evaluate_bundles(
        list(kw["models"]),
        data,
        cells=screened,
        classes=kw["class_mode"],
        device=kw["device"],
        batch_size=kw["batch_size"],
    )
    if kw["as_json"]:
        click.echo(json.dumps(metrics, indent=2, allow_nan=False))
    else:
        ev = metrics["evaluation"]
        unit = "cells" if data is None else "crops and cells" if screened else "crops"
        click.echo(
            f"{metrics['n']:,} {unit}; model{'s' if ev['ensemble'] else ''}: "
            + " + ".join(m["name"] for m in ev["models"])
        )
        if "screened_cells" in ev:
            sc = ev["screened_cells"]
            click.echo(
                f"{sc['n']:,} cells of the crop folders pasted into slides and screened: "
                f"{sc['detected']:,} found by the localizer (the others count as negative calls): "
                + ", ".join(f"{c} {k}/{n}" for c, (k, n) in sc["detected_by_class"].items())
            )
        if ev["absent_classes"]:
            how = {"present": "dropped", "all": "kept"}.get(ev["class_mode"]) or "counted as " + ", ".join(
                f"{a}→{b}" for a, b in ev["pooled_into"].items()
            )
            click.echo(
                f"classes absent from the data: {', '.join(ev['absent_classes'])} ({how}; "
                f"{ev['n_predicted_as_absent']} crops would have been called one of them)"
            )
        click.echo(format_metrics_table(metrics))
    if kw["out_dir"] is not None:
        names = " + ".join(m["name"] for m in metrics["evaluation"]["models"])
        written = write_metrics_report(metrics, kw["out_dir"], title=f"Evaluation of {names}")
        click.echo(f"report: {written['html']}; metrics: {written['json']}", err=kw["as_json"])


def _screen_folders(
    folders: tuple[Path, ...], kw: dict[str, Any], settings: Any, target: Any, progress: bool
) -> list[Any]:
    """The cells of each crop folder, pasted into slides and screened (``--cut pipeline``)."""
    from wsi_screen.errors import DataError
    from wsi_screen.pipeline import load_models
    from wsi_screen.train.pasted import screen_folder_cells

    if kw["mpp"] is None:
        raise DataError("--data crop folders need --mpp, their µm/px (Herlev: 0.201)")
    overrides: dict[str, Any] = {
        "classification.models": list(kw["models"]),
        "classification.batch_size": kw["batch_size"],
    }
    if kw["localizer"]:
        overrides["localization.model"] = kw["localizer"]
    if kw["device"] != "auto":
        overrides["runtime.device"] = kw["device"]
    settings = settings.with_overrides(overrides)
    models = load_models(settings)
    return [
        screen_folder_cells(
            d,
            mpp=kw["mpp"],
            classifier=models.classifier,
            localizer=models.localizer,
            settings=settings,
            target=target,
            class_map=kw["class_map"],
            ignore=kw["ignore"],
            work_dir=None if kw["keep_slides"] is None else kw["keep_slides"] / f"{k:02d}-{d.name}",
            progress=progress,
        )
        for k, d in enumerate(folders)
    ]
