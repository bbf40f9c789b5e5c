"""``wsi-screen train ssl``: self-supervised (SimCLR) pre-training of a classifier backbone.

The data options are those of ``wsi-screen train classifier``
(:func:`~wsi_screen.cli.train_classifier.data_options`); the crops' labels, if any, are not used.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from wsi_screen.cli.main import common_options, configure_from_context
from wsi_screen.cli.options import config_options, settings_from_options
from wsi_screen.cli.train import train
from wsi_screen.cli.train_classifier import crops_from_options, data_option_values, data_options, run_options


@train.command("ssl", short_help="Pre-train a classifier backbone on unlabelled crops (SimCLR).")
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="The backbone bundle to write (then `wsi-screen train classifier --init OUTPUT`).",
)
@data_options
@click.option("--name", default=None, help="Bundle name (default: the output folder's name).")
@click.option(
    "--arch",
    default="mobilenetv3_small_100",
    show_default=True,
    help="Any timm architecture name (the classifier trained from it keeps it).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=12, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=2),
    default=64,
    show_default=True,
    help="Crops per step (each gives two views; the other crops of the batch are the negatives).",
)
@click.option("--lr", type=click.FloatRange(min=0.0, min_open=True), default=2e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0.0), default=0.05, show_default=True)
@click.option("--temperature", type=click.FloatRange(min=0.0, min_open=True), default=0.2, show_default=True)
@click.option(
    "--view-size",
    type=click.IntRange(min=32),
    default=160,
    show_default=True,
    help="Side of each view in px (smaller than the crops: cheaper steps).",
)
@click.option(
    "--min-scale",
    type=click.FloatRange(0.05, 1.0),
    default=0.35,
    show_default=True,
    help="Smallest share of a crop's area that a view covers (random resized crop).",
)
@run_options
@config_options
@common_options
@click.pass_context
def train_ssl_cmd(ctx: click.Context, /, **kw: Any) -> None:
    """Pre-train a backbone self-supervised (SimCLR) on crops whose labels are not needed.

    \b
    Data: --data DIR (images in sub-folders of DIR, any folder names; or a
    crop set saved with --save-crops), --annotations with --slides, --synthetic N.

    Use crops of your training slides only, never of the slides you validate or test on. The
    result is a backbone bundle: train a classifier from it with
    `wsi-screen train classifier --init OUTPUT`; `run` refuses to screen with it. See docs/training.md.
    """
    obj = configure_from_context(ctx)
    progress = not bool(obj.get("quiet"))
    from wsi_screen.train.ssl import BACKBONE_CLASS, SSLConfig, pretrain_ssl

    settings = settings_from_options(kw["preset"], kw["config_path"], kw["overrides"])
    values = data_option_values(kw)
    if values["class_map"] is None:
        # Labels are not used: every class folder of --data is accepted, whatever its name.
        values["class_map"] = {
            sub.name: BACKBONE_CLASS
            for root in kw["data_dirs"]
            if Path(root).is_dir()
            for sub in Path(root).iterdir()
            if sub.is_dir() and not sub.name.startswith(".")
        }
    try:
        config = SSLConfig(
            arch=kw["arch"],
            epochs=kw["epochs"],
            batch_size=kw["batch_size"],
            lr=kw["lr"],
            weight_decay=kw["weight_decay"],
            temperature=kw["temperature"],
            view_size=kw["view_size"],
            min_scale=kw["min_scale"],
            samples_per_epoch=kw["samples_per_epoch"],
            seed=kw["seed"],
            device=kw["device"],
            threads=kw["threads"],
            max_minutes=kw["max_minutes"],
            half=kw["half"],
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    data = crops_from_options(
        **values,
        stain=kw["stain"],
        classes=None,
        target_mpp=kw["model_mpp"],
        size=kw["input_size"],
        settings=settings,
        device=kw["device"],
        progress=progress,
    )
    click.echo(
        f"{len(data):,} crops from {len(set(data.groups.tolist())):,} groups (labels unused)", err=True
    )
    bundle = pretrain_ssl(
        data,
        kw["out_dir"],
        config=config,
        name=kw["name"],
        work_dir=kw["work_dir"],
        resume=kw["resume"],
        progress=progress,
    )
    last = bundle.config.training["history"][-1]
    click.echo(
        f"backbone bundle: {bundle.path} ({len(bundle.config.training['history'])} epochs, "
        f"NT-Xent {last['loss']:.3f}, partner found {last['pair_top1']:.2f})"
    )
