"""Listings that answer at once: ``backbones`` and ``recipes`` (nothing is built or loaded)."""

from __future__ import annotations

import typer

from transferkit.backbones import REGISTRY
from transferkit.cli.common import reports_errors


@reports_errors
def backbones() -> None:
    """List the available backbones, their input sizes and parameter counts."""
    header = f"{'name':<17} {'default size':>12} {'min size':>9} {'blocks':>7} {'parameters':>12}"
    typer.echo(f"{header}  ImageNet weights file")
    for name, spec in sorted(REGISTRY.items()):
        typer.echo(
            f"{name:<17} {spec.default_size:>12} {spec.min_size:>9} {len(spec.blocks):>7} "
            f"{spec.parameters:>12,}  {spec.weights_file}"
        )


@reports_errors
def recipes() -> None:
    """List the shipped recipes with the first line of each one's description."""
    from transferkit.recipe import available_recipes, recipe_summary

    names = available_recipes()
    width = max(map(len, names), default=4)
    for name in names:
        typer.echo(f"{name:<{width}}  {recipe_summary(name)}")
