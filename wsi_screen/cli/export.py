"""``wsi-screen export``: re-export flagged cells from ``cells.zarr`` with other thresholds."""

from __future__ import annotations

from pathlib import Path

import click

from wsi_screen.cli.main import cli, common_options, configure_from_context


def _find_store(target: Path) -> Path:
    from wsi_screen.store import StoreError

    if (target / "cells.zarr").is_dir():
        return target / "cells.zarr"
    if target.name.endswith(".zarr") and target.is_dir():
        return target
    if not target.exists():
        raise StoreError(f"{target} does not exist (expected a slide result folder OUT/<slide-id>)")
    raise StoreError(f"no cells.zarr in {target} (expected a slide result folder OUT/<slide-id>)")


@cli.command()
@click.argument("result", type=click.Path(path_type=Path), metavar="OUT/SLIDE-ID")
@click.option(
    "--min-score",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Export cells whose abnormality score is ≥ this [default: the run's output.flag_min_score].",
)
@click.option(
    "--classes",
    default=None,
    metavar="CLASS,...",
    help="Only cells predicted as these classes, e.g. HSIL,LSIL [default: the run's, else any].",
)
@click.option(
    "--max-cells",
    type=click.IntRange(min=0),
    default=None,
    help="At most this many cells, highest score first; 0 = no cap [default: the run's].",
)
@click.option("--format", "fmt", type=click.Choice(["geojson", "csv"]), default="geojson", show_default=True)
@click.option("--gzip", "gz", is_flag=True, help="Compress (.gz; QuPath 0.5+ imports .geojson.gz).")
@click.option(
    "--object-type",
    type=click.Choice(["detection", "cell"]),
    default=None,
    help="QuPath object type: detection (light) or cell (nucleus + cell outline) [default: the run's].",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="File to write [default: OUT/SLIDE-ID/export.geojson or export.csv].",
)
@common_options
@click.pass_context
def export(
    ctx: click.Context,
    result: Path,
    min_score: float | None,
    classes: str | None,
    max_cells: int | None,
    fmt: str,
    gz: bool,
    object_type: str | None,
    output: Path | None,
) -> None:
    """Re-export cells from a finished result's cells.zarr (no slide or model needed).

    \b
    Examples:
      wsi-screen export OUT/slide1 --min-score 0.3 --classes HSIL,LSIL
      wsi-screen export OUT/slide1 --format csv --min-score 0 -o all-cells.csv
    """
    configure_from_context(ctx)
    from wsi_screen.geojson import export_store

    store = _find_store(result)
    class_list = None if classes is None else [c.strip() for c in classes.split(",") if c.strip()]
    if output is None:
        output = store.parent / f"export.{fmt}"
    path, count, total = export_store(
        store,
        output,
        fmt=fmt,  # type: ignore[arg-type]
        min_score=min_score,
        classes=class_list,
        max_cells=max_cells,
        object_type=object_type,  # type: ignore[arg-type]
        gzip=True if gz else None,
    )
    click.echo(f"exported {count:,} of {total:,} cells to {path}")
