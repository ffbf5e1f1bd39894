"""``transferkit augment-preview``: a PNG grid of images beside their augmented versions, to
see what the recipe's augmentation does before training on it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from transferkit.cli.common import (
    DataDirArgument,
    ImageSizeOption,
    RecipeOption,
    SeedOption,
    SetOption,
    check_folders,
    check_positive,
    check_suffix,
    recipe_overrides,
    reports_errors,
    setup_logging,
)


@reports_errors
def augment_preview(
    ctx: typer.Context,
    data_dir: DataDirArgument,
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")] = Path("augment-preview.png"),
    recipe: RecipeOption = None,
    image_size: ImageSizeOption = None,
    count: Annotated[int, typer.Option(help="How many images (rows).")] = 6,
    views: Annotated[int, typer.Option(help="Augmented versions per image (columns after the original).")] = 5,
    seed: SeedOption = None,
    set_values: SetOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the PNG file if it exists.")] = False,
) -> None:
    """Write a PNG grid of original images beside augmented versions.

    The recipe's augment section draws them: try strengths with --set, e.g. --set augment.rotation=30.
    """
    from transferkit.data.augment import write_preview
    from transferkit.recipe import load_recipe

    setup_logging()
    check_positive("--count", count)
    check_positive("--views", views)
    check_suffix("--output", output, (".png",))
    check_folders(data_dir)
    resolved = load_recipe(recipe, recipe_overrides(ctx))
    path = write_preview(data_dir, output, resolved.augment, image_size=resolved.image_size, count=count,
                         views=views, seed=resolved.seed, force=force)
    typer.echo(f"wrote {path}")
