"""Slide-level commands: ``inspect``, ``tiles``, ``synth`` and ``config show``."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import click

from wsi_screen.cli.main import cli, common_options, configure_from_context
from wsi_screen.cli.options import config_options, settings_from_options, slide_options


def _fmt_size(w: int, h: int) -> str:
    return f"{w:,} × {h:,} px"


@cli.command()
@click.argument("slide", type=click.Path(path_type=Path))
@slide_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("--properties", is_flag=True, help="Include every raw metadata property.")
@common_options
@click.pass_context
def inspect(
    ctx: click.Context,
    slide: Path,
    backend: str | None,
    mpp: float | None,
    as_json: bool,
    properties: bool,
) -> None:
    """Show a slide's metadata: size, pyramid levels, µm/px, vendor, associated images.

    A slide whose µm/px is implausible (e.g. a TIFF's default 72 dpi) or missing is shown too, with
    the value marked; `run` and `tiles` refuse it unless given --mpp.
    """
    configure_from_context(ctx)
    from wsi_screen.cli.options import flags_for, name_flags
    from wsi_screen.slide import open_slide

    with open_slide(
        slide,
        backend=backend or "openslide",  # type: ignore[arg-type]
        mpp=mpp,
        require_mpp=False,
    ) as s:
        info = s.info
        if as_json:
            data = info.to_dict(with_properties=properties)
            data["fingerprint"] = s.fingerprint()
            if data.get("mpp_problem"):
                data["mpp_problem"] = name_flags(str(data["mpp_problem"]), flags_for("inspect"))
            click.echo(json.dumps(data, indent=2))
            return
        w, h = info.dimensions
        rows: list[tuple[str, str]] = [
            ("path", info.path),
            ("backend", info.backend),
            ("vendor", info.vendor or "generic"),
            ("dimensions", _fmt_size(w, h)),
        ]
        if info.mpp_plausible:
            size_um = info.size_um
            rows += [
                ("physical size", f"{size_um[0] / 1000:.2f} × {size_um[1] / 1000:.2f} mm"),
                ("µm/px", f"{info.mpp_x:.4f} × {info.mpp_y:.4f} ({info.mpp_source})"),
            ]
        else:
            if info.mpp_status == "implausible":
                stated = f"{info.mpp_x:.4g} × {info.mpp_y:.4g} (metadata): IMPLAUSIBLE"
                why = "no microscope scan has it; often a TIFF default resolution"
            else:
                stated, why = "MISSING", "the slide states no pixel size"
            rows += [
                ("physical size", "unknown"),
                ("µm/px", f"{stated} ({why})"),
                ("run / tiles", "need --mpp with the scan's real pixel size (e.g. 0.25 at 40×, 0.5 at 20×)"),
            ]
        rows += [
            ("objective", f"{info.objective_power:g}×" if info.objective_power else "unknown"),
            ("levels", str(info.level_count)),
        ]
        for level, (dims, ds) in enumerate(zip(info.level_dimensions, info.level_downsamples, strict=True)):
            lmpp = f"  {ds * info.mpp:.3f} µm/px" if info.mpp_plausible else ""
            rows.append((f"  level {level}", f"{_fmt_size(*dims)}  ↓{ds:.3g}{lmpp}"))
        rows.append(("associated", ", ".join(info.associated_images) or "none"))
        rows.append(("fingerprint", s.fingerprint()[:16]))
        if properties:
            rows += [(f"  {k}", v) for k, v in sorted(info.properties.items())]
        width = max(len(k) for k, _ in rows)
        for key, value in rows:
            click.echo(f"{key:<{width}}  {value}")


@cli.command()
@click.argument("slide", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Folder for the mask, QC thumbnail and tile table.",
)
@click.option(
    "--target-mpp",
    type=click.FloatRange(min=0.05, max=20.0),
    default=0.25,
    show_default=True,
    help="µm/px at which the models run (tiles are cut there).",
)
@slide_options
@config_options
@common_options
@click.pass_context
def tiles(
    ctx: click.Context,
    slide: Path,
    out_dir: Path,
    target_mpp: float,
    backend: str | None,
    mpp: float | None,
    preset: str | None,
    config_path: Path | None,
    overrides: tuple[str, ...],
) -> None:
    """Detect cell regions and lay out the tile grid of a slide (no models needed).

    Writes OUT/mask.png, OUT/qc.png (thumbnail with the region outline), OUT/tiles.csv (one row per
    tile: level-0 core, cellular fraction, kept or skipped) and OUT/tiles.json (summary).
    """
    configure_from_context(ctx)
    import numpy as np
    from PIL import Image

    from wsi_screen.pipeline import cell_regions_and_grid
    from wsi_screen.slide import open_slide
    from wsi_screen.tissue import qc_thumbnail_png

    settings = settings_from_options(
        preset, config_path, overrides, {"slide.backend": backend, "slide.mpp": mpp}
    )
    with open_slide(slide, backend=settings.slide.backend, mpp=settings.slide.mpp) as s:
        regions, grid = cell_regions_and_grid(s, settings, grid_mpp=target_mpp)
    out_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray((regions.mask * np.uint8(255)).astype(np.uint8)).save(out_dir / "mask.png")
    (out_dir / "qc.png").write_bytes(qc_thumbnail_png(regions))
    with (out_dir / "tiles.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["index", "row", "col", "x0", "y0", "x1", "y1", "tissue_fraction", "keep"])
        for t in grid.tiles(kept_only=False):
            writer.writerow(
                [t.index, t.row, t.col, t.x0, t.y0, t.x1, t.y1, f"{t.tissue_fraction:.4f}", int(t.keep)]
            )
    summary: dict[str, Any] = {"slide": str(slide), "grid": grid.to_dict(), "regions": regions.summary()}
    (out_dir / "tiles.json").write_text(json.dumps(summary, indent=2))
    click.echo(
        f"{grid.n_kept} of {grid.n_tiles} tiles kept ({grid.rows}×{grid.cols} grid of "
        f"{grid.tile_size} px at {target_mpp} µm/px); cellular area "
        f"{regions.area_um2 / 1e6:.2f} mm²; outputs in {out_dir}"
    )


@cli.command()
@click.argument("output", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--size",
    default="4096x4096",
    show_default=True,
    metavar="WxH",
    help="Level-0 size in pixels (one number for a square).",
)
@click.option(
    "--mpp", type=click.FloatRange(min=0.05, max=5.0), default=0.25, show_default=True, help="Level-0 µm/px."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--abnormal",
    default="",
    metavar="CLASS=N,...",
    help="Abnormal cells to place, e.g. HSIL=5,LSIL=3,ASC-US=4.",
)
@click.option("--preparation", type=click.Choice(["lbc", "conventional"]), default="lbc", show_default=True)
@click.option("--stain", default="default", show_default=True, help="Stain/scanner colour profile.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["tiff", "svs"]),
    default=None,
    help="Generic pyramidal TIFF or Aperio-style SVS (default: from the file suffix).",
)
@common_options
@click.pass_context
def synth(
    ctx: click.Context,
    output: Path,
    size: str,
    mpp: float,
    seed: int,
    abnormal: str,
    preparation: str,
    stain: str,
    fmt: str | None,
) -> None:
    """Synthesize a Papanicolaou-stained LBC slide with exact ground truth (OUTPUT.truth.json)."""
    configure_from_context(ctx)
    from wsi_screen.synth import parse_abnormal, synthesize_slide

    try:
        parts = size.lower().split("x")
        w, h = (int(parts[0]), int(parts[-1])) if len(parts) in (1, 2) else (0, 0)
    except ValueError:
        w = h = 0
    if w <= 0 or h <= 0:
        raise click.BadParameter(f"{size!r} is not WIDTHxHEIGHT (e.g. 4096x4096)", param_hint="--size")
    try:
        counts = parse_abnormal(abnormal)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--abnormal") from None
    kind = fmt or ("svs" if output.suffix.lower() == ".svs" else "tiff")
    result = synthesize_slide(
        output,
        size=(w, h),
        mpp=mpp,
        seed=seed,
        abnormal=counts,
        preparation=preparation,
        stain=stain,
        fmt=kind,
    )
    counts_txt = ", ".join(f"{k} {v}" for k, v in sorted(result.counts.items()))
    click.echo(f"wrote {result.path} ({w}×{h} px at {mpp} µm/px; {counts_txt}); truth: {result.truth_path}")


@cli.group("config")
def config_group() -> None:
    """Inspect settings and presets."""


@config_group.command("show")
@config_options
@click.option("--json", "as_json", is_flag=True, help="JSON instead of YAML.")
@common_options
@click.pass_context
def config_show(
    ctx: click.Context,
    preset: str | None,
    config_path: Path | None,
    overrides: tuple[str, ...],
    as_json: bool,
) -> None:
    """Print every setting with its resolved value."""
    configure_from_context(ctx)
    import yaml

    settings = settings_from_options(preset, config_path, overrides)
    data = settings.to_dict()
    click.echo(json.dumps(data, indent=2) if as_json else yaml.safe_dump(data, sort_keys=False))


@config_group.command("presets")
def config_presets() -> None:
    """List the shipped presets."""
    from wsi_screen.config import list_presets

    for name in list_presets():
        click.echo(name)
