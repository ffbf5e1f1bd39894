"""``transferkit evaluate``, ``explain`` and ``report``: how good a run is and why, as files."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.common import (
    InferenceEngineOption,
    InferencePrecisionOption,
    RejectOption,
    RunArgument,
    SetsOption,
    VerboseOption,
    check_choice,
    check_folders,
    check_positive,
    check_trust_flags,
    reports_errors,
    setup_logging,
    usage_error,
    usage_errors,
)
from transferkit.progress import progress_bar
from transferkit.runtime import ENGINES, PRECISIONS

ForceOption = Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")]


@reports_errors
def evaluate(
    run: RunArgument,
    images: Annotated[Path, typer.Argument(
            help="Labelled folder: one sub-folder per class, named as the run's classes.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o",
            help="Folder to write to; default RUN/eval-<folder>-<timestamp>/.")] = None,
    tta: Annotated[bool, typer.Option("--tta",
            help="Average over the image and the recipe's tta.transforms that finetune kept (metrics.json "
                 "'tta').")] = False,
    reject: RejectOption = False,
    sets: SetsOption = None,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    engine: InferenceEngineOption = "auto",
    precision: InferencePrecisionOption = "auto",
    force: ForceOption = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Evaluate a run on a labelled folder: metrics.json, predictions.csv and figures.

    Images of no known class in IMAGES/unknown/ give the open-set figures (AUROC, FPR at 95% TPR,
    risk_coverage.png) of the run's rejection score."""
    from transferkit.evaluation.evaluate import check_output_folder, evaluate_folder, write_evaluation
    from transferkit.files import require_writable_place
    from transferkit.runs import attach_model, load_run

    setup_logging(quiet, verbose)
    check_positive("--batch-size", batch_size)
    check_choice("--engine", engine, ENGINES)
    check_choice("--precision", precision, PRECISIONS)
    check_trust_flags(reject, sets, tta)
    check_folders(images, what="labelled folder")
    loaded = load_run(run, with_model=False)  # read once: a damaged file is warned about once
    if output is not None:
        check_output_folder(output, force, images, run)
    else:  # the default folder goes in the run folder: writable there, before any work
        require_writable_place(loaded.path)
    attach_model(loaded, run if run.is_file() else None)
    result = evaluate_folder(loaded, images, tta=tta, batch_size=batch_size, engine=engine,
                             precision=precision, progress=progress_bar("image", enabled=not quiet),
                             reject=reject, sets=sets)
    written = write_evaluation(result, output, force=force)
    typer.echo(result.summary(written))


@reports_errors
def explain(
    run: RunArgument,
    images: Annotated[Path, typer.Argument(help="An image file, or a folder of images (walked recursively).")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o",
            help="Folder to write to; default RUN/explain-<name>-<timestamp>/.")] = None,
    class_name: Annotated[Optional[str], typer.Option("--class",
            help="Explain this class instead of the predicted one.")] = None,
    top: Annotated[int, typer.Option("--top", help="Explain the K most likely classes.")] = 1,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing explain folder.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Grad-CAM heatmaps: where the model looked, per image a PNG and the raw .npy."""
    from transferkit.evaluation.gradcam import check_class_name, check_output_folder, default_output, write_explanations
    from transferkit.evaluation.gradcam import explain as explain_images
    from transferkit.files import require_writable_place
    from transferkit.runs import attach_model, load_run

    setup_logging(False, verbose)
    check_positive("--top", top)
    if class_name is not None and top != 1:
        raise usage_error(f"--class {class_name} explains one class and --top {top} the {top} most likely: give one "
                          "of them")
    loaded = load_run(run, with_model=False)  # labels.json, before Keras loads; read once
    if class_name is not None:
        with usage_errors():
            check_class_name(class_name, loaded.class_names)
    if output is not None:
        check_output_folder(output, force, images, run)  # before any work
    else:
        require_writable_place(loaded.path)
    attach_model(loaded, run if run.is_file() else None)
    explanations = explain_images(loaded, images, class_name=class_name, top=top)
    folder = output if output is not None else default_output(loaded.path, images)
    write_explanations(explanations, folder, force=force, root=images if images.is_dir() else None)
    for item in explanations:
        labels = ", ".join(f"{h.class_name} {h.probability:.3f}" for h in item.heatmaps)
        typer.echo(f"{item.file}  {labels}")
    typer.echo(f"{len(explanations)} image(s) explained; written to {folder}")


@reports_errors
def report(run: RunArgument, verbose: VerboseOption = False) -> None:
    """Write a run's MODEL_CARD.md, history.png and confusion.png again.

    The card with the run's exports and evaluations so far; the figures from history.csv and
    metrics.json."""
    from transferkit.evaluation.card import write_run_report

    setup_logging(False, verbose)
    written = write_run_report(run)
    typer.echo("wrote " + ", ".join(str(path) for path in written))
