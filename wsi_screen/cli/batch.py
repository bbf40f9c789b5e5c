"""``wsi-screen batch``: screen every slide of a scanner folder, locally or on a Dask cluster."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import FrameType
from typing import Any

import click

from wsi_screen.cli.main import EXIT_FAILED, EXIT_INTERRUPTED, cli, common_options, configure_from_context
from wsi_screen.cli.options import config_options, settings_from_options, slide_options
from wsi_screen.cli.run import screening_options, screening_overrides

logger = logging.getLogger("wsi_screen.batch")


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """First SIGINT/SIGTERM: set ``stop`` (finish cleanly); a second one: exit at once."""

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            os.write(2, b"wsi-screen: second signal, exiting now\n")
            os._exit(EXIT_INTERRUPTED)
        stop.set()
        logger.warning(
            "%s received: stopping (the slide in progress is abandoned, nothing half-written is kept); "
            "send it again to exit at once",
            signal.Signals(signum).name,
        )

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _log_levels(*, quiet: bool, debug: bool) -> None:
    """Keep INFO for ``OUT/batch.log`` even with ``--quiet`` (the console then shows warnings only)."""
    root = logging.getLogger()
    if quiet:
        for h in root.handlers:
            if getattr(h, "_wsi_screen", False):
                h.setLevel(logging.WARNING)
    logging.getLogger("wsi_screen").setLevel(logging.DEBUG if debug else logging.INFO)


@cli.command()
@click.argument("input_dir", metavar="DIR", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    "out_root",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("wsi-screen-out"),
    show_default=True,
    help="Output root: OUTPUT/<slide-id>/ per slide, OUTPUT/batch.csv, batch.json, index.html, batch.log.",
)
@click.option(
    "--watch", is_flag=True, help="Keep screening new slides as the scanner writes them (stop: Ctrl-C)."
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.05),
    default=10.0,
    show_default=True,
    help="Watch mode: seconds between scans of DIR.",
)
@click.option(
    "--settle",
    type=click.FloatRange(min=0.0),
    default=30.0,
    show_default=True,
    help="Watch mode: a slide starts once all its files kept their size and mtime this many seconds.",
)
@click.option("--force", is_flag=True, help="Screen every slide again, even those with a matching result.")
@click.option(
    "--retry-failed",
    is_flag=True,
    help="Try again slides that failed before with the same file and settings.",
)
@click.option(
    "--scheduler",
    default=None,
    metavar="ADDRESS",
    help="Send one task per slide to a running Dask scheduler, e.g. tcp://host:8786.",
)
@click.option(
    "--cluster",
    type=click.Choice(["local"]),
    default=None,
    help="Start a local Dask cluster of worker processes (one per GPU; see --n-workers, --gpus).",
)
@click.option(
    "--n-workers",
    type=click.IntRange(min=1),
    default=None,
    help="--cluster local: worker processes (default: one per GPU, else 1).",
)
@click.option(
    "--gpus",
    default=None,
    metavar="LIST",
    help="--cluster local: GPU indices, e.g. 0,1,2,3; worker i sees only GPU i (default: all).",
)
@click.option(
    "--resource",
    default="GPU=1",
    show_default=True,
    metavar="NAME=AMOUNT",
    help="Dask resource each slide task needs (workers declare it); 'none' for no restriction.",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=2,
    show_default=True,
    help="Dask: resubmissions of a slide whose worker kept dying.",
)
@slide_options
@screening_options
@config_options
@common_options
@click.pass_context
def batch(
    ctx: click.Context,
    /,
    input_dir: Path,
    out_root: Path,
    watch: bool,
    interval: float,
    settle: float,
    force: bool,
    retry_failed: bool,
    scheduler: str | None,
    cluster: str | None,
    n_workers: int | None,
    gpus: str | None,
    resource: str,
    retries: int,
    preset: str | None,
    config_path: Path | None,
    overrides: tuple[str, ...],
    **flags: Any,
) -> None:
    """Screen every slide in DIR (recursively) and write the ranked worklist.

    Slides: .svs .ndpi .vms .vmu .mrxs .tif/.tiff .scn .bif .svslide .czi, and DICOM series folders.
    A slide already screened with the same file, settings and models is kept (status skipped).
    Exit status: 0 when no slide failed, 1 when one did, 130 when interrupted (watch mode: 0).

    \b
    Examples:
      wsi-screen batch /scanner/out -o results/ --preset lbc
      wsi-screen batch /scanner/out -o results/ --watch --settle 60
      wsi-screen batch /scanner/out -o results/ --cluster local --gpus 0,1,2,3
      wsi-screen batch /scanner/out -o results/ --scheduler tcp://head:8786
    """
    obj = configure_from_context(ctx)
    quiet, debug = bool(obj.get("quiet")), bool(obj.get("debug"))
    _log_levels(quiet=quiet, debug=debug)
    from wsi_screen.batch import run_batch

    if scheduler and cluster:
        raise click.UsageError("give either --scheduler or --cluster, not both")
    if (n_workers or gpus) and cluster != "local":
        raise click.UsageError("--n-workers and --gpus go with --cluster local")
    settings = settings_from_options(preset, config_path, overrides, screening_overrides(**flags))
    arguments = {
        "command": "batch",
        "input": str(input_dir),
        "output": str(out_root),
        "preset": preset,
        "config": str(config_path) if config_path else None,
        "set": list(overrides),
        "watch": watch,
        **{k: v for k, v in flags.items() if v not in (None, ())},
    }
    executor: Any = None
    if scheduler or cluster:
        from wsi_screen.distributed import DaskExecutor, detect_gpus, parse_resource
        from wsi_screen.runtime import cpu_count

        resources = parse_resource(resource)
        gpu_list = [g.strip() for g in gpus.split(",") if g.strip()] if gpus else None
        if cluster and gpu_list is None:
            gpu_list = detect_gpus() if settings.runtime.device in ("auto", "cuda") else []
        n_local = n_workers or max(1, len(gpu_list or []))
        if settings.runtime.torch_threads == 0:
            # Explicit threads, so every worker computes exactly as a one-process run with this value.
            threads = max(1, cpu_count() // n_local) if cluster else cpu_count()
            settings = settings.with_overrides({"runtime.torch_threads": threads})
        if scheduler:
            executor = DaskExecutor.connect(scheduler, resources=resources, retries=retries)
        else:
            executor = DaskExecutor.local(n_local, gpus=gpu_list, resources=resources, retries=retries)
    stop = threading.Event()
    progress = not quiet
    redirect: Any = nullcontext()
    if progress and sys.stderr.isatty():
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()
    try:
        with _stop_on_signals(stop), redirect:
            report = run_batch(
                input_dir,
                out_root,
                settings=settings,
                executor=executor,
                watch=watch,
                interval_s=interval,
                settle_s=settle,
                force=force,
                retry_failed=retry_failed,
                progress=progress,
                stop=stop,
                arguments=arguments,
            )
    finally:
        if executor is not None:
            executor.close()
    click.echo(f"{report.line()}; worklist {Path(out_root) / 'index.html'}")
    if report.interrupted and not watch:
        ctx.exit(EXIT_INTERRUPTED)
    if not watch and report.exit_code:
        ctx.exit(EXIT_FAILED)
    ctx.exit(0)
