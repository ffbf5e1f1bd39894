"""Commands about a data folder: ``doctor`` (the data checks) and ``augment-preview``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.common import (
    DataDirArgument,
    ImageSizeOption,
    RecipeOption,
    SeedOption,
    check_positive,
    fail,
    setup_logging,
)
from transferkit.errors import TransferkitError


def doctor(
    data_dir: DataDirArgument,
    recipe: RecipeOption = None,
    image_size: ImageSizeOption = None,
    val_split: Annotated[Optional[float], typer.Option(help="Validation fraction, to check the split training would make for leakage.")] = None,
    val_dir: Annotated[Optional[Path], typer.Option(help="Validation folder to check against DATA_DIR instead of a split.")] = None,
    seed: SeedOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check a data folder: counts, imbalance, unreadable files, duplicates, leakage, sizes, modes.

    Exit code 0 when clean, 1 when there are problems worth fixing.
    """
    import json

    from transferkit.data.doctor import check_data
    from transferkit.recipe import load_recipe

    setup_logging()
    try:
        resolved = load_recipe(recipe, {"image_size": image_size, "data.val_split": val_split, "seed": seed})
        report = check_data(
            data_dir, image_size=resolved.image_size, val_split=resolved.data.val_split,
            seed=resolved.seed, val_dir=val_dir,
        )
    except TransferkitError as error:
        if json_output:
            # Scripts reading --json get JSON on stdout for a failure too.
            typer.echo(json.dumps({"error": str(error)}, ensure_ascii=False))
            raise typer.Exit(code=error.exit_code)
        raise fail(error)
    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        typer.echo(report.format_text())
    raise typer.Exit(code=0 if report.is_clean() else 1)


def augment_preview(
    data_dir: DataDirArgument,
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")] = Path("augment-preview.png"),
    recipe: RecipeOption = None,
    image_size: ImageSizeOption = None,
    count: Annotated[int, typer.Option(help="How many images (rows).")] = 6,
    views: Annotated[int, typer.Option(help="Augmented versions per image (columns after the original).")] = 5,
    seed: SeedOption = None,
) -> None:
    """Write a PNG grid of original images beside augmented versions."""
    from transferkit.data.augment import write_preview
    from transferkit.recipe import load_recipe

    setup_logging()
    check_positive("--count", count)
    try:
        resolved = load_recipe(recipe, {"image_size": image_size, "seed": seed})
        path = write_preview(
            data_dir, output, resolved.augment, image_size=resolved.image_size,
            count=count, views=views, seed=resolved.seed,
        )
    except TransferkitError as error:
        raise fail(error)
    typer.echo(f"wrote {path}")
