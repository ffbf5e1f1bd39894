"""``transferkit tune``: parse the flags, resolve the recipe, run the search, print the summary."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.common import (
    BackboneOption,
    BatchSizeOption,
    DataDirArgument,
    ImageSizeOption,
    QuietOption,
    RecipeOption,
    SetOption,
    VerboseOption,
    WeightsOption,
    check_choice,
    fail,
    setup_logging,
    usage_error,
)
from transferkit.errors import TransferkitError

METRICS = ("val_accuracy", "val_loss")  # the library's table, without importing it for --help
RECIPE_FLAGS = ("backbone", "weights", "image_size", "batch_size")


def tune(
    ctx: typer.Context,
    data_dir: DataDirArgument,
    recipe: RecipeOption = None,
    trials: Annotated[int, typer.Option(help="Trials to run in this call (the study keeps earlier ones).")] = 20,
    timeout: Annotated[Optional[float], typer.Option(help="Start no trial after this many seconds.")] = None,
    storage: Annotated[Optional[str], typer.Option(
            help="Optuna storage URL shared by several workers: sqlite:///study.db, postgresql://..., "
                 "journal:///shared/study.log; default OUT_DIR/study.db.")] = None,
    study: Annotated[Optional[str], typer.Option(help="Study name; default the data folder's name.")] = None,
    metric: Annotated[str, typer.Option(metavar="[val_accuracy|val_loss]",
            help="Final validation figure to optimize (accuracy up, loss down).")] = "val_accuracy",
    output: Annotated[Optional[Path], typer.Option("--output", "-o",
            help="Folder for best_recipe.toml, trials.csv, history.png, importance.png (and study.db); default "
                 "runs/tune-<data-folder>.")] = None,
    val_dir: Annotated[Optional[Path], typer.Option(
            help="Validation folder with the same class sub-folders, instead of a split.")] = None,
    backbone: BackboneOption = None,
    weights: WeightsOption = None,
    image_size: ImageSizeOption = None,
    batch_size: BatchSizeOption = None,
    set_values: SetOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Search hyperparameters on DATA_DIR: the space of the recipe's tune section (or a default one), TPE
    sampling with pruning, one Optuna study that the same command continues.

    Each trial trains as finetune would; `transferkit finetune DATA_DIR --recipe
    OUT_DIR/best_recipe.toml` trains the best one again. Ctrl-C ends the current trial and
    keeps the study.
    """
    from transferkit.recipe import collect_overrides
    from transferkit.tuning.search import tune as run_search

    setup_logging(quiet, verbose)
    check_choice("--metric", metric, METRICS)
    if trials < 0:
        raise usage_error(f"--trials must be 0 or more, got {trials}")
    try:
        overrides = collect_overrides(set_values or [], {name: ctx.params[name] for name in RECIPE_FLAGS})
        summary = run_search(data_dir, recipe, overrides, trials=trials, timeout=timeout, storage=storage, study=study,
                             metric=metric, output=output, val_dir=val_dir, verbose=0 if quiet else 1)
    except TransferkitError as error:
        raise fail(error) from None
    typer.echo(summary.describe())
    if summary.interrupted:
        raise typer.Exit(code=130)
    if summary.best_trial is None and summary.trials:
        typer.echo("error: no trial has completed; see fail_reason in trials.csv", err=True)
        raise typer.Exit(code=1)
