"""``transferkit doctor``: check a data folder (counts, leakage, unreadable files, ...) or,
with ``--model``, check that the recipe's model learns on it."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.common import (
    BackboneOption,
    BatchSizeOption,
    DataDirArgument,
    GroupByOption,
    ImageSizeOption,
    RecipeOption,
    SeedOption,
    SetOption,
    StageOption,
    WeightsOption,
    check_folders,
    recipe_overrides,
    reports_errors,
    setup_logging,
)


@reports_errors(json_flag="json_output")
def doctor(
    ctx: typer.Context,
    data_dir: DataDirArgument,
    recipe: RecipeOption = None,
    image_size: ImageSizeOption = None,
    val_split: Annotated[Optional[float], typer.Option(
            help="Validation fraction, to check the split training would make for leakage.")] = None,
    val_dir: Annotated[Optional[Path], typer.Option(
            help="Validation folder to check against DATA_DIR instead of a split.")] = None,
    group_by: GroupByOption = None,
    seed: SeedOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    model: Annotated[bool, typer.Option("--model",
            help="Check learning instead: initial loss, input, gradients, overfitting one batch, learning rate, "
                 "validation loss, horizontal flip (builds and trains the recipe's model briefly).")] = False,
    stage: StageOption = 0,
    backbone: BackboneOption = None,
    weights: WeightsOption = None,
    batch_size: BatchSizeOption = None,
    set_values: SetOption = None,
) -> None:
    """Check a data folder: counts, imbalance, unreadable files, duplicates, leakage, sizes, modes.

    With --group-by, groups with images on both sides of the split (or in both DATA_DIR and
    --val-dir) are a problem too.

    With --model, check that the recipe's model learns on it instead (the --stage, --backbone,
    --weights, --batch-size and --set flags apply). Exit code 0 when clean, 1 when there are
    problems worth fixing.
    """
    from transferkit.data.doctor import check_data
    from transferkit.recipe import load_recipe

    setup_logging(quiet=json_output)
    model_only = [flag for flag, value in (("--stage", stage != 0), ("--backbone", backbone is not None),
                                           ("--weights", weights is not None), ("--batch-size", batch_size is not None))
                  if value]
    if model_only and not model:
        logging.getLogger("transferkit").warning(f"{', '.join(model_only)}: ignored, they apply to the learning "
                                                 "checks (--model)")
    overrides = recipe_overrides(ctx)
    check_folders(data_dir, val_dir, classes=model)
    resolved = load_recipe(recipe, overrides)  # a bad recipe is told before --model loads Keras
    if model:
        _check_learning(data_dir, recipe, overrides, stage=stage, val_dir=val_dir, json_output=json_output)
    report = check_data(data_dir, image_size=resolved.image_size, val_split=resolved.data.val_split,
                        seed=resolved.seed, val_dir=val_dir, group_by=resolved.data.group_by)
    typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if json_output else report.format_text())
    raise typer.Exit(code=0 if report.is_clean() else 1)


def _check_learning(data_dir: Path, recipe: str | None, overrides: dict, *, stage: int, val_dir: Path | None,
                    json_output: bool) -> None:
    """``doctor --model``: the learning checks, printed; exit 0 when all pass, 1 otherwise."""
    from transferkit.tuning.diagnostics import check_learning

    # With --json, stdout holds the JSON alone: what the libraries print there (Keras's
    # "Downloading data from ...") goes to stderr.
    with contextlib.redirect_stdout(sys.stderr) if json_output else contextlib.nullcontext():
        report = check_learning(data_dir, recipe, overrides, stage=stage, val_dir=val_dir,
                                verbose=0 if json_output else 1)
    typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False) if json_output else report.format_text())
    raise typer.Exit(code=0 if report.passed else 1)
