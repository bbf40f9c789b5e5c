"""Imports every command module so their sub-commands register on :data:`wsi_screen.cli.main.cli`."""

from wsi_screen.cli import (  # noqa: F401
    evaluate_slides,
    export,
    models,
    run,
    slides,
    train,
)
