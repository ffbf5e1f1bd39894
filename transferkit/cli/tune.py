"""``transferkit tune``: parse the flags, resolve the recipe, run the search, print the summary."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.common import (
    BackboneOption,
    BatchSizeOption,
    DataDirArgument,
    DevicesOption,
    FineEpochsOption,
    GroupByOption,
    HeadEpochsOption,
    ImageSizeOption,
    MlflowOption,
    QuietOption,
    RecipeOption,
    SetOption,
    StrategyOption,
    TimeBudgetOption,
    ValDirOption,
    VerboseOption,
    WeightsOption,
    check_choice,
    check_folders,
    choices,
    recipe_overrides,
    reports_errors,
    setup_logging,
    usage_error,
)
from transferkit.errors import TrainingInterrupted, TransferkitError
from transferkit.tuning.objective import METRICS


@reports_errors
def tune(
    ctx: typer.Context,
    data_dir: DataDirArgument,
    recipe: RecipeOption = None,
    trials: Annotated[Optional[int], typer.Option(
            help="Trials to run in this call (the study keeps earlier ones); default 20, or no limit of its own "
                 "with --study-trials.")] = None,
    study_trials: Annotated[Optional[int], typer.Option(
            help="Stop every worker of the study once it holds N finished (complete or pruned) trials, whatever "
                 "each one's --trials; the workers together start no more than N.")] = None,
    timeout: Annotated[Optional[float], typer.Option(help="Start no trial after this many seconds.")] = None,
    storage: Annotated[Optional[str], typer.Option(
            help="Optuna storage URL shared by several workers: sqlite:///study.db, postgresql://..., "
                 "journal:///shared/study.log; default OUT_DIR/study.db.")] = None,
    study: Annotated[Optional[str], typer.Option(help="Study name; default the data folder's name.")] = None,
    metric: Annotated[str, typer.Option(metavar=choices(tuple(METRICS)),
            help="Final validation figure to optimize (accuracy up, loss down).")] = "val_accuracy",
    output: Annotated[Optional[Path], typer.Option("--output", "-o",
            help="Folder for best_recipe.toml, trials.csv, history.png, importance.png (and study.db); default "
                 "runs/tune-<data-folder>.")] = None,
    val_dir: ValDirOption = None,
    group_by: GroupByOption = None,
    backbone: BackboneOption = None,
    weights: WeightsOption = None,
    image_size: ImageSizeOption = None,
    batch_size: BatchSizeOption = None,
    head_epochs: HeadEpochsOption = None,
    fine_epochs: FineEpochsOption = None,
    time_budget: TimeBudgetOption = None,
    mlflow: MlflowOption = None,
    strategy: StrategyOption = None,
    devices: DevicesOption = None,
    set_values: SetOption = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Search hyperparameters on DATA_DIR: TPE sampling with pruning, in one Optuna study.

    The space is the recipe's tune section (or a default one); the same command continues the study.

    Each trial trains as finetune would; `transferkit finetune DATA_DIR --recipe
    OUT_DIR/best_recipe.toml` trains the best one again. Ctrl-C ends the current
    trial and keeps the study.

    With --mlflow (or MLFLOW_TRACKING_URI), the call is one MLflow run and each trial a
    nested run under it.

    Several workers (processes or machines) share one study through --storage.
    On PostgreSQL, MySQL or SQLite, a killed worker's trial is failed after 20 s
    without a heartbeat, and the next worker runs its parameters again.
    """
    setup_logging(quiet, verbose)
    check_choice("--metric", metric, tuple(METRICS))
    if trials is not None and trials < 0:
        raise usage_error(f"--trials must be 0 or more, got {trials}")
    if study_trials is not None and study_trials < 1:
        raise usage_error(f"--study-trials must be 1 or more, got {study_trials}")
    if timeout is not None and not 0 < timeout < math.inf:  # nan fails both comparisons
        raise usage_error(f"--timeout must be a number of seconds above 0, got {timeout:g}")
    check_folders(data_dir, val_dir, classes=True)
    from transferkit.recipe import load_recipe

    load_recipe(recipe, recipe_overrides(ctx))  # a bad recipe is told before Keras loads
    from transferkit.tuning.search import tune as run_search

    summary = run_search(data_dir, recipe, recipe_overrides(ctx), trials=trials, timeout=timeout, storage=storage,
                         study_trials=study_trials, study=study, metric=metric, output=output, val_dir=val_dir,
                         verbose=0 if quiet else 1)
    typer.echo(summary.describe())
    if summary.interrupted:
        raise typer.Exit(code=TrainingInterrupted.exit_code)
    if summary.best_trial is None and summary.trials:
        raise TransferkitError("no trial has completed; see fail_reason in trials.csv")
