"""``wsi-screen models``: list and describe model bundles and architectures."""

from __future__ import annotations

import json
from typing import Any

import click

from wsi_screen.cli.main import cli, common_options, configure_from_context


@cli.group()
def models() -> None:
    """Model bundles shipped with wsi-screen (or in a folder) and registered architectures."""


@models.command("list")
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@common_options
@click.pass_context
def models_list(ctx: click.Context, as_json: bool) -> None:
    """List the shipped bundles."""
    configure_from_context(ctx)
    from wsi_screen.models.bundle import load_bundle
    from wsi_screen.models.registry import list_bundles

    rows: list[dict[str, Any]] = []
    for name in list_bundles():
        cfg = load_bundle(name, verify=False).config
        rows.append(
            {
                "name": cfg.name,
                "task": cfg.task,
                "architecture": cfg.architecture,
                "mpp": cfg.mpp,
                "classes": cfg.class_names,
                "description": cfg.description,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no bundles are shipped in this installation")
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        click.echo(
            f"{r['name']:<{width}}  {r['task']:<14}  {r['architecture']:<24}  {r['mpp']:.3g} µm/px  "
            f"{', '.join(r['classes'])}"
        )


@models.command("info")
@click.argument("bundle")
@common_options
@click.pass_context
def models_info(ctx: click.Context, bundle: str) -> None:
    """Show a bundle's full configuration (name of a shipped bundle or a folder); checks its sha256."""
    configure_from_context(ctx)
    from wsi_screen.models.bundle import load_bundle

    b = load_bundle(bundle)
    click.echo(json.dumps(b.info(), indent=2))


@models.command("architectures")
@common_options
@click.pass_context
def models_architectures(ctx: click.Context) -> None:
    """List registered architectures (any timm model name works too)."""
    configure_from_context(ctx)
    from wsi_screen.models.registry import list_architectures

    for name in list_architectures():
        click.echo(name)
    click.echo("(and any timm model name, e.g. resnet50, mobilenetv3_small_100, efficientnet_b0)")
