"""``wsi-screen train``: the group for training commands (``unet``, ``classifier``)."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_screen.cli.main import cli, common_options, configure_from_context


@cli.group()
def train() -> None:
    """Train model bundles on your own annotated data (see docs/training.md)."""


@train.command("unet", short_help="Train a nucleus-localization U-Net bundle.")
@click.option(
    "--images",
    "images_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder of images (PNG/TIFF/JPEG; RGB or greyscale).",
)
@click.option(
    "--masks",
    "masks_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Nucleus masks with each image's file stem: label images (one value per nucleus) or binary masks.",
)
@click.option(
    "--cytoplasm",
    "cytoplasm_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Optional cell (cytoplasm) masks with the same stems; enables the cell channel (N:C ratio).",
)
@click.option(
    "--mpp",
    type=click.FloatRange(min=0.02, max=50.0, min_open=True, max_open=True),
    required=True,
    help="µm per pixel of the training images (e.g. 0.25 for 40×).",
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Bundle folder to write (model.safetensors + bundle.json).",
)
@click.option("--epochs", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option(
    "--synthetic",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Add this many synthetic 256 µm fields (every stain profile) to the training data.",
)
@click.option(
    "--val",
    "val_names",
    default="",
    metavar="STEM,...",
    help="Image stems held out for validation, e.g. 36,37,38 (reported in the bundle).",
)
@click.option(
    "--representation",
    type=click.Choice(["od_gray", "rgb"]),
    default="od_gray",
    show_default=True,
    help="Model input: grey optical density (stain-robust) or RGB.",
)
@click.option(
    "--model-mpp",
    type=click.FloatRange(min=0.1, max=4.0),
    default=0.5,
    show_default=True,
    help="µm/px the U-Net works at (windows are resampled to it).",
)
@click.option(
    "--init",
    "init_from",
    default=None,
    metavar="BUNDLE",
    help="Start from this localization bundle's weights (name or folder), e.g. nuclei-unet-v3 with "
    "--representation rgb: fine-tuning on your slides needs fewer annotated nuclei.",
)
@click.option(
    "--glass-patches",
    type=click.FloatRange(min=0.0, max=1.0),
    default=0.0,
    show_default=True,
    help="Share of training crops in which a corner, band or blob shows the glass the pipeline puts "
    "in place of black/ink regions (its nuclei erased), so that such regions do not change what is "
    "found elsewhere; nuclei-unet-v3 used 0.25.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--name", default=None, help="Bundle name [default: the output folder's name].")
@click.option(
    "--checkpoint",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Save the run's state here every few minutes and when it stops [default: OUTPUT.ckpt].",
)
@click.option("--resume", is_flag=True, help="Continue the run saved in --checkpoint (same arguments).")
@click.option(
    "--time-budget",
    "time_budget_min",
    type=click.FloatRange(min=0.0, min_open=True),
    default=None,
    metavar="MINUTES",
    help="Stop after this long, keep the state in --checkpoint and exit 3; --resume continues.",
)
@common_options
@click.pass_context
def unet(
    ctx: click.Context,
    images_dir: Path,
    masks_dir: Path,
    cytoplasm_dir: Path | None,
    mpp: float,
    out_dir: Path,
    epochs: int,
    batch_size: int,
    synthetic: int,
    val_names: str,
    representation: str,
    model_mpp: float,
    init_from: str | None,
    glass_patches: float,
    device: str,
    seed: int,
    name: str | None,
    checkpoint: Path | None,
    resume: bool,
    time_budget_min: float | None,
) -> None:
    """Train a nucleus U-Net on annotated images and write a bundle usable with --set localization.model=DIR.

    \b
    Layouts accepted:
      ISBI 2014:  images/NN.png, nuclei/NN.png (uint16 labels), cytoplasm/NN.png
      QuPath:     images/NAME.tif + masks/NAME.png (label or binary export of the nucleus annotations)

    \b
    Example:
      wsi-screen train unet --images isbi/images --masks isbi/nuclei --cytoplasm isbi/cytoplasm \\
          --mpp 0.35 --synthetic 96 --val 36,37,38 -o my-unet
    """
    obj = configure_from_context(ctx)
    from wsi_screen.train.unet import TrainingPaused, UNetRecipe, train_unet

    recipe = UNetRecipe(model_mpp=model_mpp, representation=representation, glass_patch_p=glass_patches)
    ckpt = checkpoint or out_dir.with_name(out_dir.name + ".ckpt")
    try:
        bundle = train_unet(
            images_dir,
            masks_dir,
            cytoplasm_dir=cytoplasm_dir,
            mpp=mpp,
            out_dir=out_dir,
            val_names=[v.strip() for v in val_names.split(",") if v.strip()],
            epochs=epochs,
            batch_size=batch_size,
            synthetic_tiles=synthetic,
            recipe=recipe,
            device=device,
            seed=seed,
            progress=not obj.get("quiet"),
            name=name,
            checkpoint=ckpt,
            resume=resume,
            init_from=init_from,
            time_budget_s=None if time_budget_min is None else 60.0 * time_budget_min,
        )
    except TrainingPaused as exc:
        click.echo(f"wsi-screen: {exc}", err=True)
        ctx.exit(3)
    size_mb = bundle.weights_path.stat().st_size / 1e6
    click.echo(f"wrote {bundle.path} ({bundle.config.name}, {size_mb:.2f} MB)")
    if ckpt.is_file():
        ckpt.unlink()  # the bundle is complete: its run state is no longer needed
