"""The ``wsi-screen`` command line: a thin click layer over the library.

Every command imports its stage modules lazily, so ``wsi-screen --version`` and ``--help`` stay fast.
Errors a user can cause (:class:`~wsi_screen.errors.WsiScreenError`, bad options) print one line on
stderr and exit non-zero; ``--debug`` shows the traceback instead. Library errors name settings keys
and parameters; the line adds the command's flag for each (:func:`wsi_screen.cli.options.name_flags`).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from wsi_screen import __version__
from wsi_screen.errors import WsiScreenError

__all__ = ["EXIT_FAILED", "EXIT_USAGE", "cli", "command_path", "common_options", "main"]

EXIT_FAILED = 1  # the work could not be done (bad slide, missing model, ...)
EXIT_USAGE = 2  # the command line itself is wrong (click's convention)
EXIT_INTERNAL = 3  # a bug: please report it
EXIT_INTERRUPTED = 130

F = TypeVar("F", bound=Callable[..., Any])


def setup_logging(*, verbose: int = 0, quiet: bool = False, debug: bool = False) -> None:
    """Configure the root logger for command-line use (idempotent)."""
    if debug or verbose >= 2:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    else:
        level = logging.INFO
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_wsi_screen", False):
            root.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler._wsi_screen = True  # type: ignore[attr-defined]
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if debug else "%(levelname)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("wsi_screen").setLevel(level)
    # Third-party chatter stays at WARNING unless debugging.
    for noisy in ("PIL", "matplotlib", "numcodecs", "zarr", "urllib3", "distributed", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)


def _store_flag(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    obj = ctx.ensure_object(dict)
    if param.name == "verbose":
        obj["verbose"] = max(int(obj.get("verbose", 0)), int(value or 0))
    elif value:
        obj[str(param.name)] = value
    return value


def common_options(func: F) -> F:
    """``--quiet``, ``--verbose``, ``--debug`` accepted after any sub-command too."""
    func = click.option(
        "--debug",
        is_flag=True,
        expose_value=False,
        callback=_store_flag,
        help="Debug logging; show tracebacks on errors.",
    )(func)
    func = click.option(
        "-v",
        "--verbose",
        count=True,
        expose_value=False,
        callback=_store_flag,
        help="More log output (repeat for debug).",
    )(func)
    func = click.option(
        "-q",
        "--quiet",
        is_flag=True,
        expose_value=False,
        callback=_store_flag,
        help="Only warnings and errors; no progress bars.",
    )(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "-V", "--version", prog_name="wsi-screen")
@common_options
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Screen whole-slide images of cervical cytology (Pap smear, liquid-based cytology).

    \b
    Quick start:
      wsi-screen demo                      synthesize a demo slide and screen it
      wsi-screen run SLIDE -o OUT          screen one slide
      wsi-screen batch DIR -o OUT          screen every slide of a scanner folder
    """
    ctx.ensure_object(dict)


def configure_from_context(ctx: click.Context) -> dict[str, Any]:
    """Apply the logging flags collected from the group and the sub-command; return them."""
    obj = ctx.find_root().ensure_object(dict)
    setup_logging(
        verbose=int(obj.get("verbose", 0)), quiet=bool(obj.get("quiet")), debug=bool(obj.get("debug"))
    )
    return obj


def _register() -> None:
    from wsi_screen.cli import commands  # noqa: F401  (registers the sub-commands)


def command_path(args: Sequence[str]) -> str:
    """The sub-command ``args`` invoke, as words after ``wsi-screen`` (``"train classifier"``).

    The group's own options are flags without values (``-q``, ``-v``, ``--debug``), so the first words
    that are not options name the command.
    """
    group: click.Command = cli
    words: list[str] = []
    for arg in args:
        if arg.startswith("-"):
            continue
        if not isinstance(group, click.Group) or arg not in group.commands:
            break
        group = group.commands[arg]
        words.append(arg)
    return " ".join(words)


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    _register()
    try:
        rv = cli.main(args=args, prog_name="wsi-screen", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("wsi-screen: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("wsi-screen: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except WsiScreenError as exc:
        if debug:
            raise
        from wsi_screen.cli.options import flags_for, name_flags

        click.echo(f"wsi-screen: error: {name_flags(str(exc), flags_for(command_path(args)))}", err=True)
        sys.exit(EXIT_FAILED)
    except Exception as exc:
        if debug:
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        click.echo(
            f"wsi-screen: internal error: {type(exc).__name__}: {text} "
            "(run again with --debug for the traceback and please report it)",
            err=True,
        )
        sys.exit(EXIT_INTERNAL)
    sys.exit(rv if isinstance(rv, int) else 0)
