"""Imports every command module so their sub-commands register on :data:`wsi_screen.cli.main.cli`."""

from wsi_screen.cli import (  # noqa: F401
    batch,
    calibrate,
    evaluate,
    evaluate_slides,
    export,
    localize,
    models,
    run,
    slides,
    train,
    train_classifier,
    train_ssl,
)
