"""``wsi-screen evaluate-slides``: slide-level screening figures of a batch output against diagnoses."""

from __future__ import annotations

import json
from pathlib import Path

import click

from wsi_screen.cli.main import cli, common_options, configure_from_context


@cli.command("evaluate-slides", short_help="Score a batch's triage against known slide diagnoses.")
@click.argument("batch_dir", metavar="OUT", type=click.Path(path_type=Path))
@click.option(
    "--labels",
    "labels_csv",
    type=click.Path(path_type=Path),
    required=True,
    help="CSV with columns 'slide' (file name or slide id) and 'label' (NILM, ASC-US, LSIL, ASC-H, HSIL, …).",
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write metrics.json, roc.png and report.html here (default: print only).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full metrics as JSON instead of tables.")
@common_options
@click.pass_context
def evaluate_slides(
    ctx: click.Context, batch_dir: Path, labels_csv: Path, out_dir: Path | None, as_json: bool
) -> None:
    """Compare the triage of a `wsi-screen batch` output folder OUT with known slide diagnoses.

    Reports the sensitivity/specificity of the triage (review or priority = positive), the ROC of the
    slide score, and the fraction of slides that could be set aside as "no further review" while every
    HSIL+ slide (ASC-H, HSIL, SCC, AGC, AIS) stays in review. Definitions: docs/training.md.
    """
    configure_from_context(ctx)
    from wsi_screen.evaluation import evaluate_slides as run_evaluation
    from wsi_screen.metrics import format_metrics_table, write_metrics_report

    metrics = run_evaluation(batch_dir, labels_csv)
    if as_json:
        click.echo(json.dumps(metrics, indent=2, allow_nan=False))
    else:
        click.echo(format_metrics_table(metrics))
    if out_dir is not None:
        written = write_metrics_report(metrics, out_dir, title=f"Slide-level evaluation of {batch_dir.name}")
        click.echo(f"report: {written['html']}; metrics: {written['json']}", err=as_json)
