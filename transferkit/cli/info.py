"""Listings that answer at once: ``backbones`` and ``recipes`` (nothing is built or loaded)."""

from __future__ import annotations

import typer

from transferkit.backbones import available_backbones, get_spec, plugin_source
from transferkit.cli.common import reports_errors


@reports_errors
def backbones() -> None:
    """List the available backbones, their input sizes and parameter counts.

    The built-in ones, and those installed packages add."""
    names = available_backbones()
    width = max(17, *map(len, names))  # a plugin's name may be longer than the built-in ones
    header = f"{'name':<{width}} {'default size':>12} {'min size':>9} {'blocks':>7} {'parameters':>12}"
    typer.echo(f"{header}  ImageNet weights file")
    for name in names:
        spec, source = get_spec(name), plugin_source(name)
        weights = spec.weights_file or "none"
        typer.echo(
            f"{name:<{width}} {spec.default_size:>12} {spec.min_size:>9} {len(spec.blocks):>7} "
            f"{spec.parameters:>12,}  {weights}{f'  (added by {source})' if source else ''}"
        )


@reports_errors
def recipes() -> None:
    """List the shipped recipes with the first line of each one's description."""
    from transferkit.recipe import available_recipes, recipe_summary

    names = available_recipes()
    width = max(map(len, names), default=4)
    for name in names:
        typer.echo(f"{name:<{width}}  {recipe_summary(name)}")
