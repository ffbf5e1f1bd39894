"""``transferkit lr-find``: the learning-rate range test of one stage, plotted, with the rate
to use."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.common import (
    BackboneOption,
    BatchSizeOption,
    DataDirArgument,
    DevicesOption,
    ImageSizeOption,
    QuietOption,
    RecipeOption,
    SetOption,
    StageOption,
    StrategyOption,
    VerboseOption,
    WeightsOption,
    check_folders,
    check_suffix,
    recipe_overrides,
    reports_errors,
    setup_logging,
)


@reports_errors(json_flag="json_output")
def lr_find(
    ctx: typer.Context,
    data_dir: DataDirArgument,
    recipe: RecipeOption = None,
    stage: StageOption = 0,
    backbone: BackboneOption = None,
    weights: WeightsOption = None,
    image_size: ImageSizeOption = None,
    batch_size: BatchSizeOption = None,
    strategy: StrategyOption = None,
    devices: DevicesOption = None,
    set_values: SetOption = None,
    val_dir: Annotated[Optional[Path], typer.Option(
            help="Validation folder, instead of the recipe's split (only training images are used).")] = None,
    min_lr: Annotated[float, typer.Option(help="Lowest learning rate tried.")] = 1e-7,
    max_lr: Annotated[float, typer.Option(
            help="Highest learning rate tried (the test stops earlier when the loss diverges).")] = 10.0,
    steps: Annotated[Optional[int], typer.Option(
            help="Steps over the range; default 8 passes over the training batches, 50..200.")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="The plot to write (PNG).")] = Path("lr_find.png"),
    force: Annotated[bool, typer.Option("--force", help="Replace the plot file if it exists.")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """The learning-rate range test of one stage: plot the loss against the rate, print the rate to use.

    Exit code 0 with a suggestion, 1 when no rate made the loss fall.
    """
    setup_logging(quiet or json_output, verbose)
    check_suffix("--output", output, (".png",))
    check_folders(data_dir, val_dir, classes=True)
    from transferkit.recipe import load_recipe

    load_recipe(recipe, recipe_overrides(ctx))  # a bad recipe is told before Keras loads
    from transferkit.tuning.lr_find import find_learning_rate

    result = find_learning_rate(data_dir, recipe, recipe_overrides(ctx), stage, val_dir=val_dir, min_lr=min_lr,
                                max_lr=max_lr, steps=steps, output=output, force=force,
                                verbose=0 if quiet or json_output else 1)
    typer.echo(json.dumps(result.to_dict()) if json_output else result.describe())
    raise typer.Exit(code=0 if result.suggestion is not None else 1)
