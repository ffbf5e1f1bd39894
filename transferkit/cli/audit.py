"""``transferkit audit``: parse the flags, resolve the recipe, audit the folder, print what was found."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.common import (
    BackboneOption,
    BatchSizeOption,
    DataDirArgument,
    EngineOption,
    GroupByOption,
    ImageSizeOption,
    PrecisionOption,
    QuietOption,
    RecipeOption,
    SeedOption,
    SetOption,
    VerboseOption,
    WeightsOption,
    check_folders,
    recipe_overrides,
    reports_errors,
    setup_logging,
    usage_error,
)


@reports_errors
def audit(
    ctx: typer.Context,
    data_dir: DataDirArgument,
    recipe: RecipeOption = None,
    backbone: BackboneOption = None,
    weights: WeightsOption = None,
    image_size: ImageSizeOption = None,
    batch_size: BatchSizeOption = None,
    head_epochs: Annotated[Optional[int], typer.Option(
            help="Epochs the head trains on each fold (recipe key: stages.0.epochs).")] = None,
    group_by: GroupByOption = None,
    seed: SeedOption = None,
    precision: PrecisionOption = None,
    engine: EngineOption = None,
    set_values: SetOption = None,
    folds: Annotated[int, typer.Option(
            help="K: the head is trained K times, each on all folds but one, which it then predicts.")] = 5,
    output: Annotated[Optional[Path], typer.Option("--output", "-o",
            help="Folder for issues.csv, issues.png, moves.sh, predictions.csv, audit.json; default "
                 "runs/<data-folder>-audit-<timestamp>.")] = None,
    force: Annotated[bool, typer.Option(
            help="Replace an earlier audit folder at --output (audit folders only).")] = False,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Find the likely label errors, outliers and near-duplicates in DATA_DIR.

    The recipe's head is trained K times on the frozen backbone's features,
    each time predicting the fold it did not see; those held-out
    probabilities rank the label errors, and image hashes and the features
    find near-copies and outliers. Writes issues.csv, issues.png and
    moves.sh (the moves it suggests, for you to read and run): it never
    moves a file itself.
    """
    from transferkit.recipe import load_recipe

    setup_logging(quiet, verbose)
    if folds < 2:
        raise usage_error(f"--folds must be at least 2, got {folds}")
    resolved = load_recipe(recipe, recipe_overrides(ctx))
    check_folders(data_dir, classes=True)
    from transferkit.trust.audit import audit as run_audit

    result = run_audit(data_dir, resolved, output=output, force=force, folds=folds, verbose=0 if quiet else 1)
    typer.echo(result.summary())
