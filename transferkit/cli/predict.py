"""``transferkit predict``: classify a folder with a saved run, print a table, write a file."""

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
    check_positive,
    check_suffix,
    check_trust_flags,
    reports_errors,
    setup_logging,
)
from transferkit.progress import progress_bar
from transferkit.runtime import ENGINES, PRECISIONS


@reports_errors
def predict(
    run: RunArgument,
    images: Annotated[Path, typer.Argument(help="Folder of images to classify (walked recursively), or one image.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o",
            help="Write the predictions to FILE.csv or FILE.json.")] = None,
    top_k: Annotated[int, typer.Option(help="How many classes to list per image.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    engine: InferenceEngineOption = "auto",
    precision: InferencePrecisionOption = "auto",
    tta: Annotated[bool, typer.Option("--tta",
            help="Test-time augmentation: average over the image and the recipe's tta.transforms that "
                 "finetune kept (metrics.json 'tta').")] = False,
    reject: RejectOption = False,
    sets: SetsOption = None,
    force: Annotated[bool, typer.Option("--force", help="Replace the --output file if it exists.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q",
            help="No progress bar; with --output, no table either: only the summary.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Predict a class for every image under IMAGES with a saved run."""
    from transferkit.inference.predict import (
        OUTPUT_SUFFIXES,
        check_images,
        check_output,
        predict_folder,
        run_for_predict,
        write_predictions,
    )
    from transferkit.runs import load_run

    setup_logging(quiet, verbose)
    # Bad flag values are usage errors (exit 2), told before the run is loaded.
    check_positive("--top-k", top_k)
    check_positive("--batch-size", batch_size)
    check_choice("--engine", engine, ENGINES)
    check_choice("--precision", precision, PRECISIONS)
    check_trust_flags(reject, sets, tta)
    check_suffix("--output", output, OUTPUT_SUFFIXES)
    if output is not None:
        check_output(output, run, force)
    check_images(images)
    # The model is loaded only where no engine was recorded for it (--tta builds on it).
    loaded = load_run(run) if tta else run_for_predict(run)
    bar = progress_bar("image", enabled=not quiet)
    forward = engine
    if tta:
        from transferkit.evaluation.tta import tta_engine

        forward = tta_engine(loaded, engine, precision)
    result = predict_folder(loaded, images, top_k=top_k, batch_size=batch_size, progress=bar,
                            engine=forward, precision=precision, reject=reject, sets=sets)
    if output is not None:
        write_predictions(result, output)
    if not quiet or output is None:  # without --output the table is the result: -q leaves it
        _print_table(result, top_k)
    typer.echo(result.summary(output))


def _columns(text: str) -> int:
    """How many terminal columns ``text`` takes: East Asian wide and full-width letters two."""
    import unicodedata

    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def _pad(text: str, width: int) -> str:
    return text + " " * max(0, width - _columns(text))


def _print_table(result, top_k: int) -> None:
    width = max((_columns(str(row.file)) for row in result.rows), default=4)
    labels = max([16, *(_columns(name) for row in result.rows for name in (row.label, row.top_class or ""))])
    header = f"{_pad('file', width)}  {_pad('label', labels)} confidence"
    if result.rejection is not None:
        header += f"  {_pad('top class', labels)} score"
    header += "  set" if result.set_rule is not None else ""
    typer.echo(header + (f"   top {top_k}" if top_k > 1 else ""))
    for row in result.rows:
        line = f"{_pad(str(row.file), width)}  {_pad(row.label, labels)} {row.confidence:.3f}     "
        if result.rejection is not None:
            line += f"  {_pad(row.top_class, labels)} {row.score:.3f}"
        if result.set_rule is not None:
            line += "  " + "|".join(row.prediction_set)
        if top_k > 1:
            line += "   " + ", ".join(f"{name} {p:.3f}" for name, p in row.top_k)
        typer.echo(line.rstrip())
