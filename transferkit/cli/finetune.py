"""``transferkit finetune``: parse the flags, resolve the recipe, run the job, print the run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.common import (
    BackboneOption,
    BatchSizeOption,
    DevicesOption,
    EngineOption,
    FineEpochsOption,
    GroupByOption,
    HeadEpochsOption,
    ImageSizeOption,
    MlflowOption,
    PrecisionOption,
    QuietOption,
    RecipeOption,
    SeedOption,
    SetOption,
    StrategyOption,
    TimeBudgetOption,
    ValDirOption,
    VerboseOption,
    WeightsOption,
    check_folders,
    recipe_overrides,
    reports_errors,
    setup_logging,
    usage_error,
)
from transferkit.strategies import keras_distribution_variables

# What --resume accepts besides RUN_DIR: where the data is now, --force, and the devices it
# goes on with (another machine may have others; the result does not depend on them beyond
# float rounding); every other setting is the interrupted run's own.
RESUME_PARAMETERS = frozenset({"data_dir", "val_dir", "resume", "force", "quiet", "verbose", "strategy", "devices"})


@reports_errors
def finetune(
    ctx: typer.Context,
    data_dir: Annotated[Optional[Path], typer.Argument(
            help="Folder with one sub-folder of images per class (not needed with --resume).")] = None,
    recipe: RecipeOption = None,
    backbone: BackboneOption = None,
    weights: WeightsOption = None,
    image_size: ImageSizeOption = None,
    batch_size: BatchSizeOption = None,
    head_epochs: HeadEpochsOption = None,
    fine_epochs: FineEpochsOption = None,
    time_budget: TimeBudgetOption = None,
    val_split: Annotated[Optional[float], typer.Option(
            help="Fraction of each class held out for validation (recipe key: data.val_split).")] = None,
    val_dir: ValDirOption = None,
    group_by: GroupByOption = None,
    seed: SeedOption = None,
    precision: PrecisionOption = None,
    engine: EngineOption = None,
    cache: Annotated[Optional[bool], typer.Option("--cache/--no-cache",
            help="Cache the frozen part's features and train only the top on them (recipe key: "
                 "cache.enabled).")] = None,
    cache_views: Annotated[Optional[int], typer.Option(
            help="Augmented views cached per image (recipe key: cache.views).")] = None,
    cache_memory: Annotated[Optional[float], typer.Option(
            help="Feature cache memory budget in MB; beyond it the cache spills to disk (recipe key: "
                 "cache.memory_mb).")] = None,
    tensorboard: Annotated[Optional[bool], typer.Option("--tensorboard",
            help="Write TensorBoard logs to RUN/tensorboard/, one step count across stages (recipe key: "
                 "tensorboard).")] = None,
    mlflow: MlflowOption = None,
    strategy: StrategyOption = None,
    devices: DevicesOption = None,
    set_values: SetOption = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o",
            help="Run folder to write; default runs/<data-folder>-<timestamp>.")] = None,
    force: Annotated[bool, typer.Option(
            help="Replace the run folder if it exists (run folders only: never another folder).")] = False,
    save_h5: Annotated[bool, typer.Option(help="Also save model.h5 in the legacy HDF5 format.")] = False,
    resume: Annotated[Optional[Path], typer.Option(
            help="Continue the interrupted run RUN_DIR from its last completed epoch with its own settings; give "
                 "DATA_DIR (and --val-dir) only if the data moved.", metavar="RUN_DIR")] = None,
    quiet: QuietOption = False,
    verbose: VerboseOption = False,
) -> None:
    """Fine-tune a pretrained backbone on DATA_DIR and save a run folder.

    Ctrl-C stops after the current batch and keeps the last completed epoch; continue
    with --resume RUN_DIR.
    """
    from transferkit.recipe import load_recipe

    setup_logging(quiet, verbose)
    if resume is not None:
        given = [_flag(parameter) for parameter in ctx.command.params
                 if parameter.name not in RESUME_PARAMETERS and _given(ctx, parameter.name)]
        if given:
            raise usage_error(f"--resume continues the run with its own settings; drop {', '.join(given)} "
                              "(or start a new run without --resume)")
        check_folders(data_dir, val_dir)
        from transferkit.training.checkpoint import require_resumable

        require_resumable(resume)  # told before Keras loads
        from transferkit import workflow

        run = workflow.resume_finetune(resume, verbose=0 if quiet else 1, data_dir=data_dir, val_dir=val_dir,
                                       force=force, overrides={"strategy": strategy, "devices": devices})
        typer.echo(run.describe())
        return
    if data_dir is None:
        raise usage_error("finetune needs DATA_DIR (or --resume RUN_DIR)")
    if val_split is not None and val_dir is not None:
        raise usage_error("--val-split holds out part of DATA_DIR and --val-dir names other validation images; "
                          "pass one of them")
    resolved = load_recipe(recipe, recipe_overrides(ctx))  # a bad recipe is told before Keras loads
    resolved.require_training()
    # Class folders checked here in one process only: of several, process 0 tells them once they have met.
    one_process = resolved.strategy != "data-parallel" and not keras_distribution_variables()
    check_folders(data_dir, val_dir, classes=one_process)
    from transferkit.backbones import find_spec
    from transferkit.model.transfer import check_fits, source_run

    source, spec = source_run(resolved.weights), find_spec(resolved.backbone)
    if source is not None and spec is not None:  # --weights RUN_DIR of another backbone or size: told now too
        check_fits(source, spec, resolved.image_size)
    if output is not None and one_process:
        from transferkit.runs import check_writable, require_run_name
        from transferkit.training.checkpoint import remove_if_finished

        # An -o that exists, or lies in the data, told before Keras loads too (in one process
        # only: of several, process 0 checks once they have met). First, the in-progress
        # folder of a finished run whose process was killed just after publishing it goes.
        require_run_name(output)
        remove_if_finished(output)
        check_writable(output, force, data_folders=(data_dir, val_dir), new_run=True)
    from transferkit import workflow

    run = workflow.finetune(data_dir, resolved, val_dir=val_dir, output=output, force=force, save_h5=save_h5,
                            verbose=0 if quiet else 1)
    typer.echo(run.describe())


def _given(ctx: typer.Context, name: str) -> bool:
    """Whether a parameter was given a value on the command line (an empty --set list or a
    switch left off is not)."""
    value = ctx.params[name]
    return value is not None and value is not False and not (isinstance(value, (list, tuple)) and not value)


def _flag(parameter) -> str:
    """A parameter as --help names it: ``--output``, ``--cache/--no-cache``."""
    return "/".join([parameter.opts[0], *parameter.secondary_opts])
