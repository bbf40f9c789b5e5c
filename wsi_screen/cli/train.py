"""``wsi-screen train``: the group for training commands (``unet``, ``classifier``)."""

from __future__ import annotations

import click

from wsi_screen.cli.main import cli


@cli.group()
def train() -> None:
    """Train model bundles on your own annotated data (see docs/training.md)."""
