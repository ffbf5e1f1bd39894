"""The command line: each command parses, calls one library function, prints.

Exit codes: 0 success, 1 the input or the run failed, 2 a usage or recipe error.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit import __version__
from transferkit.errors import TransferkitError

app = typer.Typer(
    name="transferkit",
    help="Transfer-learning image classification: fine-tune a pretrained backbone on a folder "
    "of class sub-folders, then predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Shared options, defined once.
RecipeOption = Annotated[
    Optional[str],
    typer.Option("--recipe", "-r", help="Recipe TOML file, or a shipped recipe name (quickstart, vgg16, vgg19, resnet50, small-data)."),
]
SeedOption = Annotated[Optional[int], typer.Option(help="Random seed (recipe key: seed).")]
ImageSizeOption = Annotated[Optional[int], typer.Option(help="Side in pixels images are resized to (recipe key: image_size).")]


class _StderrHandler(logging.Handler):
    """Writes "warning: ..." lines to whatever sys.stderr is now (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"{record.levelname.lower()}: {record.getMessage()}\n")


def _setup_logging() -> None:
    logger = logging.getLogger("transferkit")
    if not any(isinstance(handler, _StderrHandler) for handler in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.propagate = False
    logger.setLevel(logging.WARNING)


def _fail(error: TransferkitError) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(code=error.exit_code)


def _usage_error(message: str) -> typer.Exit:
    """A bad flag value: one `error:` line and exit code 2."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"transferkit {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """Transfer-learning image classification on Keras 3."""
    _setup_logging()


@app.command()
def finetune(
    data_dir: Annotated[Optional[Path], typer.Argument(help="Folder with one sub-folder of images per class (not needed with --resume).")] = None,
    recipe: RecipeOption = None,
    backbone: Annotated[Optional[str], typer.Option(help="Backbone: vgg16, vgg19 or resnet50 (recipe key: backbone).")] = None,
    weights: Annotated[Optional[str], typer.Option(help="imagenet (download or Keras cache), none (random), or PATH to a .h5 file.")] = None,
    image_size: ImageSizeOption = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Images per training step (recipe key: batch_size).")] = None,
    head_epochs: Annotated[Optional[int], typer.Option(help="Epochs of the first stage, the head with the backbone frozen.")] = None,
    fine_epochs: Annotated[Optional[int], typer.Option(help="Epochs of every later (fine-tuning) stage; 0 skips them.")] = None,
    val_split: Annotated[Optional[float], typer.Option(help="Fraction of each class held out for validation (recipe key: data.val_split).")] = None,
    val_dir: Annotated[Optional[Path], typer.Option(help="Validation folder with the same class sub-folders, instead of a split.")] = None,
    seed: SeedOption = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bfloat16 where the CPU/GPU runs it fast), float32, bfloat16 or float16 (recipe key: precision).")] = None,
    engine: Annotated[Optional[str], typer.Option(help="Engine for forward-only work (feature cache): auto (OpenVINO on CPU when installed), keras or openvino (recipe key: engine).")] = None,
    cache: Annotated[Optional[bool], typer.Option("--cache/--no-cache", help="Cache the frozen part's features and train only the top on them (recipe key: cache.enabled).")] = None,
    cache_views: Annotated[Optional[int], typer.Option(help="Augmented views cached per image (recipe key: cache.views).")] = None,
    cache_memory: Annotated[Optional[float], typer.Option(help="Feature cache memory budget in MB; beyond it the cache spills to disk (recipe key: cache.memory_mb).")] = None,
    set_values: Annotated[Optional[list[str]], typer.Option("--set", help="Any recipe key, e.g. --set head.dropout=0.5 --set stages.1.unfreeze=2.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Run folder to write; default runs/<data-folder>-<timestamp>.")] = None,
    force: Annotated[bool, typer.Option(help="Replace the run folder if it exists (run folders only: never another folder).")] = False,
    save_h5: Annotated[bool, typer.Option(help="Also save model.h5 in the legacy HDF5 format.")] = False,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the interrupted run RUN_DIR from its last completed epoch with its own settings; give DATA_DIR (and --val-dir) only if the data moved.", metavar="RUN_DIR")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Fine-tune a pretrained backbone on DATA_DIR and save a run folder.

    Ctrl-C stops after the current batch and keeps the last completed epoch; continue
    with --resume RUN_DIR.
    """
    from transferkit.recipe import load_recipe, parse_override
    from transferkit.workflow import finetune as run_finetune
    from transferkit.workflow import resume_finetune

    if resume is not None:
        # The interrupted run's recipe and options hold; only where its data is now (when
        # it moved) and --force may be given.
        ignored = [flag for flag, value in (
            ("--recipe", recipe), ("--backbone", backbone), ("--weights", weights), ("--image-size", image_size),
            ("--batch-size", batch_size), ("--head-epochs", head_epochs), ("--fine-epochs", fine_epochs),
            ("--val-split", val_split), ("--seed", seed), ("--precision", precision), ("--engine", engine),
            ("--cache/--no-cache", cache), ("--cache-views", cache_views), ("--cache-memory", cache_memory),
            ("--set", set_values or None), ("--output", output), ("--save-h5", save_h5 or None),
        ) if value is not None]
        if ignored:
            raise _usage_error(f"--resume continues the run with its own settings; drop {', '.join(ignored)} "
                               "(or start a new run without --resume)")
        try:
            run = resume_finetune(resume, verbose=0 if quiet else 1, data_dir=data_dir, val_dir=val_dir, force=force)
        except TransferkitError as error:
            raise _fail(error)
        typer.echo(run.describe())
        return
    if data_dir is None:
        raise _usage_error("finetune needs DATA_DIR (or --resume RUN_DIR)")
    try:
        overrides: dict = {}
        for assignment in set_values or []:
            key, value = parse_override(assignment)
            overrides[key] = value
        # Named flags the user gave win over --set; the ones not given leave --set alone.
        named = {
                "backbone": backbone,
                "weights": weights,
                "image_size": image_size,
                "batch_size": batch_size,
                "data.val_split": val_split,
                "seed": seed,
                "precision": precision,
                "engine": engine,
                "cache.enabled": cache,
                "cache.views": cache_views,
                "cache.memory_mb": float(cache_memory) if cache_memory is not None else None,
                "stages.0.epochs": head_epochs,
                "stages.1:.epochs": fine_epochs,
        }
        overrides.update({key: value for key, value in named.items() if value is not None})
        resolved = load_recipe(recipe, overrides)
        run = run_finetune(
            data_dir, resolved, val_dir=val_dir, output=output, force=force,
            save_h5=save_h5, verbose=0 if quiet else 1,
        )
    except TransferkitError as error:
        raise _fail(error)
    typer.echo(run.describe())


@app.command()
def predict(
    run: Annotated[Path, typer.Argument(help="Run folder (or a model.keras with labels.json beside it).")],
    images: Annotated[Path, typer.Argument(help="Folder of images to classify (walked recursively), or one image.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write the predictions to FILE.csv or FILE.json.")] = None,
    top_k: Annotated[int, typer.Option(help="How many classes to list per image.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    engine: Annotated[str, typer.Option(help="auto (OpenVINO on CPU when installed), keras or openvino.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bfloat16 where the CPU runs it fast, near ties again in float32), float32 (exact), bfloat16 or float16 (16 bits only).")] = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no table; with --output, print only the summary.")] = False,
) -> None:
    """Predict a class for every image under IMAGES with a saved run."""
    from transferkit.predict import check_output, predict_folder, write_predictions
    from transferkit.runs import load_run

    # Bad flag values are usage errors (exit 2), told before the run is loaded.
    if top_k < 1:
        raise _usage_error(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise _usage_error(f"--batch-size must be at least 1, got {batch_size}")
    if engine not in ("auto", "keras", "openvino"):
        raise _usage_error(f"--engine {engine!r}: choose auto, keras or openvino")
    if precision not in ("auto", "float32", "bfloat16", "float16"):
        raise _usage_error(f"--precision {precision!r}: choose auto, float32, bfloat16 or float16")
    try:
        if output is not None:
            check_output(output)
        loaded = load_run(run)
        bar = None
        if not quiet:
            import keras

            bar_holder: dict = {}

            def bar(done: int, total: int) -> None:
                if "bar" not in bar_holder:
                    bar_holder["bar"] = keras.utils.Progbar(total, unit_name="image", stateful_metrics=())
                bar_holder["bar"].update(done)

        result = predict_folder(loaded, images, top_k=top_k, batch_size=batch_size, progress=bar,
                                engine=engine, precision=precision)
        if output is not None:
            write_predictions(result, output)
    except TransferkitError as error:
        raise _fail(error)
    if not quiet:
        width = max((len(str(row.file)) for row in result.rows), default=4)
        typer.echo(f"{'file':<{width}}  {'label':<16} confidence")
        for row in result.rows:
            line = f"{str(row.file):<{width}}  {row.label:<16} {row.confidence:.3f}"
            if top_k > 1:
                line += "   " + ", ".join(f"{name} {p:.3f}" for name, p in row.top_k)
            typer.echo(line)
    summary = f"{len(result.rows)} image(s) classified ({result.engine} engine)"
    if result.skipped:
        summary += f", {len(result.skipped)} skipped (unreadable)"
    if result.ignored:
        summary += f", {len(result.ignored)} non-image file(s) ignored"
    if output is not None:
        summary += f"; written to {output}"
    typer.echo(summary)


@app.command()
def doctor(
    data_dir: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class.")],
    recipe: RecipeOption = None,
    image_size: ImageSizeOption = None,
    val_split: Annotated[Optional[float], typer.Option(help="Validation fraction, to check the split training would make for leakage.")] = None,
    val_dir: Annotated[Optional[Path], typer.Option(help="Validation folder to check against DATA_DIR instead of a split.")] = None,
    seed: SeedOption = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Check a data folder: counts, imbalance, unreadable files, duplicates, leakage, sizes, modes.

    Exit code 0 when clean, 1 when there are problems worth fixing.
    """
    import json

    from transferkit.doctor import check_data
    from transferkit.recipe import load_recipe

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
            raise typer.Exit(code=error.exit_code)
        raise _fail(error)
    if json_output:
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        typer.echo(report.format_text())
    raise typer.Exit(code=0 if report.is_clean() else 1)


@app.command("backbones")
def list_backbones() -> None:
    """List the available backbones, their input sizes and parameter counts."""
    from transferkit.backbones import REGISTRY, count_parameters

    typer.echo(f"{'name':<10} {'default size':>12} {'min size':>9} {'blocks':>7} {'parameters':>12}  ImageNet weights file")
    for name, spec in sorted(REGISTRY.items()):
        typer.echo(
            f"{name:<10} {spec.default_size:>12} {spec.min_size:>9} {len(spec.blocks):>7} "
            f"{count_parameters(name):>12,}  {spec.weights_file}"
        )


@app.command("augment-preview")
def augment_preview(
    data_dir: Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write.")] = Path("augment-preview.png"),
    recipe: RecipeOption = None,
    image_size: ImageSizeOption = None,
    count: Annotated[int, typer.Option(help="How many images (rows).")] = 6,
    views: Annotated[int, typer.Option(help="Augmented versions per image (columns after the original).")] = 5,
    seed: SeedOption = None,
) -> None:
    """Write a PNG grid of original images beside augmented versions."""
    from transferkit.augment import write_preview
    from transferkit.recipe import load_recipe

    if count < 1:
        raise _usage_error(f"--count must be at least 1, got {count}")
    try:
        resolved = load_recipe(recipe, {"image_size": image_size, "seed": seed})
        path = write_preview(
            data_dir, output, resolved.augment, image_size=resolved.image_size,
            count=count, views=views, seed=resolved.seed,
        )
    except TransferkitError as error:
        raise _fail(error)
    typer.echo(f"wrote {path}")


def _import_tensorflow_quietly() -> None:
    """Import TensorFlow with its C++ start-up chatter (oneDNN, CUDA probing) hidden.

    Those lines are written before TensorFlow's own log level applies, straight to file
    descriptor 2, so only a redirect hides them. Python errors still show: an ImportError
    is raised after the descriptor is restored.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ.get("TRANSFERKIT_DEBUG"):
        return
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            try:
                import tensorflow  # noqa: F401
            except ImportError:
                pass  # re-raised below with stderr restored
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def main() -> None:
    """Console-script entry point."""
    # Typer's parser errors (click's ClickException / UsageError) reached through the public
    # typer.BadParameter, since typer ships its own copy of click.
    click_exception, usage_error = (next(base for base in typer.BadParameter.__mro__ if base.__name__ == name)
                                    for name in ("ClickException", "UsageError"))
    try:
        if len(sys.argv) > 1 and sys.argv[1] not in ("--version", "--help"):
            _import_tensorflow_quietly()
        code = app(standalone_mode=False)
    except click_exception as error:
        if not isinstance(error, usage_error) or type(error).__name__ == "NoArgsIsHelpError":
            error.show()  # bare `transferkit`: the help, as typer shows it
            sys.exit(error.exit_code)
        # A bad flag or argument: one line, like every other user error, and where to look.
        command = error.ctx.command_path if error.ctx is not None else "transferkit"
        sys.stderr.write(f"error: {error.format_message()} (see {command} --help)\n")
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        # Ctrl-C outside training (starting up, reading images): nothing was written yet
        # that a later run needs; training itself turns Ctrl-C into a resumable stop.
        sys.stderr.write("\nerror: interrupted\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
