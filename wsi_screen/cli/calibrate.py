"""``wsi-screen calibrate``: choose the triage thresholds of a diagnosed batch (an operating point)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from wsi_screen.cli.main import cli, common_options, configure_from_context

_SHARE = click.FloatRange(0.0, 1.0)
_OPEN = click.FloatRange(0.0, 1.0, min_open=True, max_open=True)


@cli.command("calibrate", short_help="Choose triage thresholds on diagnosed validation slides.")
@click.argument("batch_dir", metavar="BATCH_DIR", type=click.Path(path_type=Path))
@click.option(
    "--diagnoses",
    "diagnoses_csv",
    type=click.Path(path_type=Path),
    required=True,
    help="CSV with columns 'slide' (file name or slide id) and 'diagnosis' (or 'label'): NILM, ASC-US, "
    "LSIL, ASC-H, HSIL, SCC, AGC, …",
)
@click.option(
    "-o",
    "--output",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write calibration.json, calibration.html and operating-point.yaml here "
    "(default: BATCH_DIR/calibration).",
)
@click.option(
    "--hsil-sensitivity",
    type=_SHARE,
    default=1.0,
    show_default=True,
    help="Share of HSIL+ slides that must stay in review (review or priority).",
)
@click.option(
    "--ascus-sensitivity",
    type=_SHARE,
    default=0.98,
    show_default=True,
    help="Share of ASC-US+ slides (every abnormal diagnosis) that must stay in review.",
)
@click.option(
    "--priority-sensitivity",
    type=_SHARE,
    default=0.9,
    show_default=True,
    help="Share of HSIL+ slides to triage priority (0: priority by suggested category only).",
)
@click.option(
    "--high-grade",
    default="HSIL,SCC,AIS,ADENOCARCINOMA",
    show_default=True,
    metavar="LABELS",
    help="Diagnoses counted as HSIL+ (comma-separated), e.g. add ASC-H,AGC.",
)
@click.option(
    "--confidence",
    type=_OPEN,
    default=0.95,
    show_default=True,
    help="Confidence of the one-sided Clopper–Pearson lower bounds.",
)
@click.option(
    "--min-lower-bound",
    type=_OPEN,
    default=0.9,
    show_default=True,
    help="Refuse to calibrate on fewer slides per group than give this lower bound with none missed.",
)
@click.option("--name", default=None, help="Name of the operating point (default: BATCH_DIR name and date).")
@click.option(
    "--allow-unmatched",
    is_flag=True,
    help="Calibrate on the slides that have both a result and a diagnosis; warn about the others.",
)
@click.option(
    "--validate",
    "preset",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Do not calibrate: measure the operating point of this operating-point.yaml on BATCH_DIR "
    "(writes validation.json and validation.html).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the full result as JSON.")
@common_options
@click.pass_context
def calibrate(
    ctx: click.Context,
    /,
    batch_dir: Path,
    *,
    diagnoses_csv: Path,
    out_dir: Path | None,
    hsil_sensitivity: float,
    ascus_sensitivity: float,
    priority_sensitivity: float,
    high_grade: str,
    confidence: float,
    min_lower_bound: float,
    name: str | None,
    allow_unmatched: bool,
    preset: Path | None,
    as_json: bool,
) -> None:
    """Choose the review and priority thresholds of a `wsi-screen batch` output BATCH_DIR whose
    slides have known diagnoses, and write them as a config preset for `run`/`batch --config`.

    By default every HSIL+ slide and ≥ 98 % of the ASC-US+ slides stay in review (`unsatisfactory`
    does not count). Reports the exact one-sided Clopper–Pearson lower bound of each sensitivity, the
    slides needed for a wanted bound, the share of NILM slides set aside and the slide ROC.

    \b
    Example:
      wsi-screen calibrate val-out/ --diagnoses val.csv -o op/
      wsi-screen batch scans/ -o out/ --config op/operating-point.yaml
      wsi-screen calibrate test-out/ --diagnoses test.csv --validate op/operating-point.yaml
    """
    configure_from_context(ctx)
    from wsi_screen.calibration import (
        CalibrationTarget,
        format_calibration,
        parse_high_grade,
        validate_operating_point,
        write_calibration,
    )
    from wsi_screen.calibration import calibrate as run_calibration

    if preset is not None:
        result = validate_operating_point(batch_dir, diagnoses_csv, preset, allow_unmatched=allow_unmatched)
    else:
        target = CalibrationTarget(
            hsil_plus=hsil_sensitivity,
            ascus_plus=ascus_sensitivity,
            priority=priority_sensitivity,
            confidence=confidence,
            min_lower_bound=min_lower_bound,
            high_grade=parse_high_grade(high_grade),
        )
        result = run_calibration(
            batch_dir, diagnoses_csv, target=target, name=name, allow_unmatched=allow_unmatched
        )
    written = write_calibration(result, out_dir if out_dir is not None else batch_dir / "calibration")
    if as_json:
        click.echo(json.dumps(result, indent=2, allow_nan=False, ensure_ascii=False))
    else:
        click.echo(format_calibration(result))
    click.echo("wrote " + ", ".join(str(p) for p in written.values()), err=as_json)
    safety = {k: ok for k, ok in result["holds"].items() if k in ("hsil_plus", "ascus_plus")}
    if result["kind"] == "validation" and not all(safety.values()):
        from wsi_screen.errors import CalibrationError

        missed = " and ".join(k for k, ok in safety.items() if not ok)
        raise CalibrationError(
            f"operating point {result['operating_point']['name']!r} misses its {missed} target on "
            f"{batch_dir} (see {written['html']})"
        )
