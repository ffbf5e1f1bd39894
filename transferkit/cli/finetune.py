"""``transferkit finetune``: parse the flags, resolve the recipe, run the job, print the run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.common import (
    BackboneOption,
    BatchSizeOption,
    EngineOption,
    ImageSizeOption,
    PrecisionOption,
    QuietOption,
    RecipeOption,
    SeedOption,
    SetOption,
    VerboseOption,
    WeightsOption,
    fail,
    setup_logging,
    usage_error,
)
from transferkit.errors import TransferkitError


def finetune(
    ctx: typer.Context,
    data_dir: Annotated[Optional[Path], typer.Argument(
            help="Folder with one sub-folder of images per class (not needed with --resume).")] = None,
    recipe: RecipeOption = None,
    backbone: BackboneOption = None,
    weights: WeightsOption = None,
    image_size: ImageSizeOption = None,
    batch_size: BatchSizeOption = None,
    head_epochs: Annotated[Optional[int], typer.Option(
            help="Epochs of the first stage, the head with the backbone frozen.")] = None,
    fine_epochs: Annotated[Optional[int], typer.Option(
            help="Epochs of every later (fine-tuning) stage; 0 skips them.")] = None,
    val_split: Annotated[Optional[float], typer.Option(
            help="Fraction of each class held out for validation (recipe key: data.val_split).")] = None,
    val_dir: Annotated[Optional[Path], typer.Option(
            help="Validation folder with the same class sub-folders, instead of a split.")] = None,
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
    from transferkit import workflow
    from transferkit.recipe import FLAG_KEYS, collect_overrides, load_recipe

    setup_logging(quiet, verbose)
    flags = {name: ctx.params[name] for name in FLAG_KEYS}
    settings = {**flags, "recipe": recipe, "set_values": set_values or None, "output": output,
                "save_h5": save_h5 or None}
    if resume is not None:
        # The interrupted run's recipe and options hold; only where its data is now (when
        # it moved) and --force may be given.
        given = [_flag_name(name) for name, value in settings.items() if value is not None]
        if given:
            raise usage_error(f"--resume continues the run with its own settings; drop {', '.join(given)} "
                              "(or start a new run without --resume)")
        try:
            run = workflow.resume_finetune(resume, verbose=0 if quiet else 1, data_dir=data_dir, val_dir=val_dir,
                                           force=force)
        except TransferkitError as error:
            raise fail(error) from None
        typer.echo(run.describe())
        return
    if data_dir is None:
        raise usage_error("finetune needs DATA_DIR (or --resume RUN_DIR)")
    try:
        resolved = load_recipe(recipe, collect_overrides(set_values or [], flags))
        run = workflow.finetune(data_dir, resolved, val_dir=val_dir, output=output, force=force, save_h5=save_h5,
                                verbose=0 if quiet else 1)
    except TransferkitError as error:
        raise fail(error) from None
    typer.echo(run.describe())


def _flag_name(parameter: str) -> str:
    return {"cache": "--cache/--no-cache", "set_values": "--set"}.get(parameter, "--" + parameter.replace("_", "-"))
