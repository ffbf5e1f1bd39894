"""Commands about a data folder: ``doctor`` (the data checks; with ``--model`` the learning
checks of ``cli.tuning``) and ``augment-preview``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.common import (
    BackboneOption,
    BatchSizeOption,
    DataDirArgument,
    ImageSizeOption,
    RecipeOption,
    SeedOption,
    SetOption,
    StageOption,
    WeightsOption,
    check_positive,
    fail,
    recipe_overrides,
    setup_logging,
)
from transferkit.errors import TransferkitError


def doctor(
    data_dir: DataDirArgument,
    recipe: RecipeOption = None,
    image_size: ImageSizeOption = None,
    val_split: Annotated[Optional[float], typer.Option(
            help="Validation fraction, to check the split training would make for leakage.")] = None,
    val_dir: Annotated[Optional[Path], typer.Option(
            help="Validation folder to check against DATA_DIR instead of a split.")] = None,
    seed: SeedOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    model: Annotated[bool, typer.Option("--model",
            help="Check learning instead: initial loss, input, gradients, overfitting one batch, learning rate, "
                 "validation loss (builds and trains the recipe's model briefly).")] = False,
    stage: StageOption = 0,
    backbone: BackboneOption = None,
    weights: WeightsOption = None,
    batch_size: BatchSizeOption = None,
    set_values: SetOption = None,
) -> None:
    """Check a data folder: counts, imbalance, unreadable files, duplicates, leakage, sizes, modes.

    With --model, check that the recipe's model learns on it instead (the --stage, --backbone,
    --weights, --batch-size and --set flags apply). Exit code 0 when clean, 1 when there are
    problems worth fixing.
    """
    import json

    from transferkit.data.doctor import check_data
    from transferkit.recipe import load_recipe

    if model:
        from transferkit.cli.lr_find import doctor_model

        try:
            overrides = recipe_overrides(set_values, backbone=backbone, weights=weights, image_size=image_size,
                                         batch_size=batch_size, val_split=val_split, seed=seed)
        except TransferkitError as error:
            raise fail(error) from None
        doctor_model(data_dir, recipe, overrides, stage=stage, val_dir=val_dir, json_output=json_output)
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
            raise typer.Exit(code=error.exit_code) from None
        raise fail(error) from None
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
        raise fail(error) from None
    typer.echo(f"wrote {path}")
