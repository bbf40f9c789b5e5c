"""Imports every command module so their sub-commands register on :data:`wsi_screen.cli.main.cli`."""

import wsi_screen.cli.evaluate_slides  # noqa: F401
from wsi_screen.cli import export, slides  # noqa: F401
