"""``wsi-screen run`` (one slide) and ``wsi-screen demo`` (synthesize a slide and screen it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from wsi_screen.cli.main import cli, common_options, configure_from_context
from wsi_screen.cli.options import config_options, settings_from_options, slide_options

DEMO_SIZE = (6144, 6144)
DEMO_ABNORMAL = "HSIL=6,LSIL=5,ASC-US=5"


def screening_options(func: Any) -> Any:
    """Options shared by ``run``, ``demo`` and ``batch``."""
    for opt in reversed(
        [
            click.option(
                "--model",
                "models",
                multiple=True,
                metavar="BUNDLE",
                help="Classifier bundle (name or folder); repeat for an ensemble (probabilities averaged).",
            ),
            click.option(
                "--localizer",
                default=None,
                metavar="BUNDLE",
                help="Localization (U-Net) bundle, name or folder.",
            ),
            click.option(
                "--device",
                type=click.Choice(["auto", "cpu", "cuda", "mps"]),
                default=None,
                help="Where the models run (default auto: CUDA, then MPS, then CPU).",
            ),
            click.option(
                "--batch-size", type=click.IntRange(min=1), default=None, help="Crops per classifier batch."
            ),
            click.option(
                "--workers",
                type=click.IntRange(min=0),
                default=None,
                help="Reader threads (0 = one per CPU core).",
            ),
            click.option(
                "--min-score",
                type=click.FloatRange(0.0, 1.0),
                default=None,
                help="Lowest cell score exported to flagged.geojson [default: the classifier bundle's "
                "thresholds.flag_score, else 0.5].",
            ),
            click.option(
                "--gzip/--no-gzip", "gzip", default=None, help="Write flagged.geojson.gz (QuPath 0.5+)."
            ),
            click.option("--report/--no-report", "report", default=None, help="Write report.html."),
        ]
    ):
        func = opt(func)
    return func


def screening_overrides(
    *,
    backend: str | None,
    mpp: float | None,
    models: tuple[str, ...],
    localizer: str | None,
    device: str | None,
    batch_size: int | None,
    workers: int | None,
    min_score: float | None,
    gzip: bool | None,
    report: bool | None,
) -> dict[str, Any]:
    """Map the dedicated CLI flags to dotted settings keys (None = not given)."""
    return {
        "slide.backend": backend,
        "slide.mpp": mpp,
        "classification.models": list(models) if models else None,
        "localization.model": localizer,
        "runtime.device": device,
        "classification.batch_size": batch_size,
        "reading.workers": workers,
        "output.flag_min_score": min_score,
        "output.geojson_gzip": gzip,
        "output.report": report,
    }


def _print_result(result: Any, *, quiet: bool) -> None:
    click.echo(result.triage_line())
    if not quiet:
        out = result.out_dir
        names = sorted(p.name for p in out.iterdir())
        click.echo(f"outputs in {out}: {', '.join(names)}")


@cli.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("wsi-screen-out"),
    show_default=True,
    help="Output root; results go to OUTPUT/<slide-id>/.",
)
@click.option("--slide-id", default=None, help="Folder name for this slide (default: from the file name).")
@slide_options
@screening_options
@config_options
@common_options
@click.pass_context
def run(
    ctx: click.Context,
    /,
    slide: Path,
    out_root: Path,
    slide_id: str | None,
    preset: str | None,
    config_path: Path | None,
    overrides: tuple[str, ...],
    **flags: Any,
) -> None:
    """Screen one slide: cells.zarr, summary.json, flagged.geojson, report.html, run.json.

    \b
    Example:
      wsi-screen run slide.svs -o results/ --preset lbc
    """
    obj = configure_from_context(ctx)
    from wsi_screen.pipeline import run_slide, slide_id_for

    settings = settings_from_options(preset, config_path, overrides, screening_overrides(**flags))
    sid = slide_id_for(slide_id) if slide_id else None
    result = run_slide(
        slide,
        out_root,
        settings=settings,
        slide_id=sid,
        progress=not obj.get("quiet"),
        arguments={
            "command": "run",
            "slide": str(slide),
            "output": str(out_root),
            "preset": preset,
            "config": str(config_path) if config_path else None,
            "set": list(overrides),
            **{k: v for k, v in flags.items() if v not in (None, ())},
        },
    )
    _print_result(result, quiet=bool(obj.get("quiet")))


@cli.command()
@click.option(
    "-o",
    "--output",
    "out_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("wsi-screen-demo"),
    show_default=True,
    help="Output root.",
)
@click.option("--seed", type=int, default=7, show_default=True, help="Seed of the synthetic slide.")
@click.option(
    "--size",
    type=click.IntRange(min=1024, max=40000),
    default=DEMO_SIZE[0],
    show_default=True,
    help="Side of the synthetic slide in pixels at 0.25 µm/px.",
)
@screening_options
@config_options
@common_options
@click.pass_context
def demo(
    ctx: click.Context,
    /,
    out_root: Path,
    seed: int,
    size: int,
    preset: str | None,
    config_path: Path | None,
    overrides: tuple[str, ...],
    **flags: Any,
) -> None:
    """Synthesize a demo LBC slide with a few abnormal cells and screen it.

    The slide (OUTPUT/demo-slide.tiff) and its ground truth are synthetic: the demo shows the
    pipeline and its outputs, not clinical performance.
    """
    obj = configure_from_context(ctx)
    from wsi_screen.pipeline import run_slide
    from wsi_screen.synth import synthesize_slide

    settings = settings_from_options(
        preset, config_path, overrides, screening_overrides(backend=None, mpp=None, **flags)
    )
    out_root.mkdir(parents=True, exist_ok=True)
    slide_path = out_root / "demo-slide.tiff"
    t0 = time.perf_counter()
    synth = synthesize_slide(slide_path, size=(size, size), mpp=0.25, seed=seed, abnormal=DEMO_ABNORMAL)
    if not obj.get("quiet"):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(synth.counts.items()))
        click.echo(
            f"synthesized {slide_path} ({size}×{size} px at 0.25 µm/px; {counts}) "
            f"in {time.perf_counter() - t0:.1f} s"
        )
    result = run_slide(
        slide_path,
        out_root,
        settings=settings,
        progress=not obj.get("quiet"),
        arguments={
            "command": "demo",
            "output": str(out_root),
            "seed": seed,
            "size": size,
            "preset": preset,
            "set": list(overrides),
        },
    )
    _print_result(result, quiet=bool(obj.get("quiet")))
    if not obj.get("quiet"):
        click.echo(
            f"open {result.out_dir / 'report.html'} in a browser; "
            f"import {result.out_dir / 'flagged.geojson'} into QuPath with {slide_path}"
        )
