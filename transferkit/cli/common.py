"""What every command shares: the options defined once, logging to the terminal, the one
path from flags to recipe overrides, and the one mapping from a ``TransferkitError`` to a
one-line message and its exit code (``reports_errors``, on every command)."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.backbones import REGISTRY
from transferkit.errors import TrainingInterrupted, TransferkitError
from transferkit.runtime import ENGINES, PRECISIONS
from transferkit.strategies import STRATEGIES


def choices(values: Sequence[str]) -> str:
    """The metavar --help shows for a choice: ``[auto|keras|openvino]``."""
    return "[" + "|".join(values) + "]"


def one_of(values: Sequence[str]) -> str:
    """A choice in words: ``auto, keras or openvino``."""
    *first, last = values
    return f"{', '.join(first)} or {last}" if first else last


# Recipe flags shared by every command that resolves a recipe (recipe keys in brackets).
RecipeOption = Annotated[
    Optional[str],
    typer.Option("--recipe", "-r", help="Recipe TOML file, or a shipped recipe name (see `transferkit recipes`)."),
]
BackboneOption = Annotated[Optional[str], typer.Option(
        help=f"Backbone: {', '.join(sorted(REGISTRY))}, or one an installed package adds (`transferkit backbones` "
             "lists them all; recipe key: backbone).")]
WeightsOption = Annotated[
    Optional[str], typer.Option(help="imagenet (download or Keras cache), none (random), PATH to a .h5 file, or a "
                                "finished RUN_DIR (or its model.keras) to start from its backbone.")
]
ImageSizeOption = Annotated[Optional[int], typer.Option(
        help="Side in pixels images are resized to (recipe key: image_size).")]
BatchSizeOption = Annotated[Optional[int], typer.Option(help="Images per training step (recipe key: batch_size).")]
SeedOption = Annotated[Optional[int], typer.Option(help="Random seed (recipe key: seed).")]
SetOption = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Any recipe key, e.g. --set head.dropout=0.5 --set stages.1.unfreeze=2."),
]
StageOption = Annotated[
    int, typer.Option("--stage",
            help="Which stage of the recipe (0: the first, the head); earlier stages are trained first."),
]
EngineOption = Annotated[
    Optional[str],
    typer.Option(metavar=choices(ENGINES), help="Engine for forward-only work: auto (OpenVINO on CPU when installed), "
                 "keras or openvino (recipe key: engine)."),
]
PrecisionOption = Annotated[
    Optional[str],
    typer.Option(metavar=choices(PRECISIONS), help="auto (bfloat16 where the CPU/GPU runs it fast; on a CPU without "
                 "it, the feature cache in int8 where the work pays and int8 passes its check), float32, bfloat16, "
                 "float16 or int8 (training in float32, the feature cache in int8 once checked) (recipe key: "
                 "precision)."),
]


def device_count(value: str | None) -> int | str | None:
    """--devices as the recipe takes it: a number, or "all"."""
    if value is None or value == "all":
        return value
    if not value.strip().lstrip("-").isdigit():
        raise typer.BadParameter(f"{value!r} is not a number of devices; give 1 or more, or all")
    return int(value)


StrategyOption = Annotated[
    Optional[str],
    typer.Option(metavar=choices(STRATEGIES), help="How many devices train: auto (mirrored over the GPUs when "
                 "TensorFlow sees several, else none), none (one device), mirrored (the local GPUs, or --devices "
                 "logical CPU devices), data-parallel (several processes on Keras's JAX backend, joined through the "
                 "KERAS_DISTRIBUTION_* variables or Slurm) (recipe key: strategy).")]
DevicesOption = Annotated[
    Optional[str],
    typer.Option(metavar="N|all", callback=device_count, help="Devices the strategy trains on: GPUs, or on a CPU "
                 "logical CPU devices; default all GPUs (recipe key: devices). The batch size stays the global "
                 "batch.")]
# The inference engine and precision of the commands that run a saved model (predict, evaluate).
InferenceEngineOption = Annotated[str, typer.Option(
    "--engine", metavar=choices(ENGINES), help="auto (OpenVINO on CPU when installed), keras or openvino.")]
InferencePrecisionOption = Annotated[str, typer.Option(
    "--precision", metavar=choices(PRECISIONS),
    help="auto (bfloat16 where the CPU runs it fast, near ties again in float32; without it, int8 for 1,000 "
         "images or more where int8 passes its check and is faster), float32 (exact), bfloat16 or float16 (16 bits "
         "only), int8 (calibrated on the run's training images, checked on held-back ones, near ties in float32).")]
GroupByOption = Annotated[Optional[str], typer.Option(
        metavar="REGEX", help="Each file's group: the regex's first group, searched in its path below DATA_DIR "
        "(else in its name), e.g. '^[^/]+/(patient\\d+)_' for cat/patient12_3.jpg; no group is split between "
        "training and validation (recipe key: data.group_by).")]
MlflowOption = Annotated[Optional[str], typer.Option("--mlflow", metavar="URI",
        help="Log to MLflow: params, per-epoch metrics, figures and the model (sqlite:///mlflow.db, "
             "http://host:5000, ...; default MLFLOW_TRACKING_URI when set; off: never; recipe key: mlflow).")]
# What predict and evaluate add to a class when asked (labels.json "rejection", "prediction_sets").
RejectOption = Annotated[bool, typer.Option(
    "--reject", help="Label images that look like none of the training images 'unknown' (the run's threshold, "
                     "fitted on validation at reject.coverage); the top class stays in its own column.")]
SetsOption = Annotated[Optional[float], typer.Option(
    "--sets", metavar="COVERAGE", help="Conformal prediction sets (LAC) that hold the true class with this "
                                       "probability, e.g. 0.9: columns set (names joined by |) and set_size.")]
ValDirOption = Annotated[Optional[Path], typer.Option(
        help="Validation folder with the same class sub-folders, instead of a split.")]
HeadEpochsOption = Annotated[Optional[int], typer.Option(
        help="Epochs of the first stage, the head with the backbone frozen (recipe key: stages.0.epochs).")]
FineEpochsOption = Annotated[Optional[int], typer.Option(
        help="Epochs of every later (fine-tuning) stage; 0 skips them (recipe key: stages.1:.epochs).")]
TimeBudgetOption = Annotated[Optional[str], typer.Option(metavar="DURATION",
        help="Finish training within this time, e.g. 90s, 10m or 1.5h: the stages' epochs (at most the recipe's) "
             "and the cached views are planned from the first steps' measured speed; the final save comes after "
             "(recipe key: time_budget).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars and no progress messages.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="More messages (engines, caches, decisions).")]
DataDirArgument = Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class.")]
RunArgument = Annotated[Path, typer.Argument(help="Run folder (or a model.keras with labels.json beside it).")]


class LineTracker:
    """A text stream that remembers whether its last line is unfinished (a Keras progress bar
    is redrawn with "\r" and no newline), so that an error or a warning on stderr starts on
    a line of its own instead of being glued to the bar's end."""

    def __init__(self, stream):
        self.stream = stream
        self.line_open = False

    def write(self, text: str) -> int:
        written = self.stream.write(text)
        if text:
            self.line_open = not text.endswith("\n")
        return written

    def end_line(self) -> None:
        """Finish an unfinished line with a newline."""
        if self.line_open:
            self.write("\n")
            self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def end_open_line() -> None:
    """Before a message on stderr: end the line a progress bar left open on stdout."""
    if isinstance(sys.stdout, LineTracker):
        sys.stdout.end_line()


class TerminalHandler(logging.Handler):
    """The library's messages on the terminal: progress (info) as plain lines on stdout,
    warnings and errors as "warning: ..." on stderr; whatever sys.stdout / sys.stderr are
    now (test runners swap them)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO:
            end_open_line()  # told during an epoch (a time budget's plan): below the progress bar
            sys.stdout.write(f"{record.getMessage()}\n")
            sys.stdout.flush()
        else:
            end_open_line()
            sys.stderr.write(f"{record.levelname.lower()}: {record.getMessage()}\n")


def setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    """Show the ``transferkit`` logger's messages: warnings always, progress unless
    ``quiet``, debug details with ``verbose``."""
    logger = logging.getLogger("transferkit")
    if not any(isinstance(handler, TerminalHandler) for handler in logger.handlers):
        # Records still propagate: a program embedding the CLI (or pytest) sees them too;
        # a plain process has no root handlers, so nothing is shown twice.
        logger.addHandler(TerminalHandler())
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def reports_errors(command: Callable | None = None, *, json_flag: str | None = None):
    """Decorate a command so that a ``TransferkitError`` it raises ends it with one
    ``error: ...`` line on stderr and the error class's exit code (no traceback).

    Args:
        command: the command function; leave it out to give ``json_flag``.
        json_flag: the name of a parameter (``json_output``) that, when true, asks for the
            error as ``{"error": "..."}`` on stdout instead, so scripts reading --json get
            JSON for a failure too. Default None: always the line.

    Returns:
        The wrapped command (its signature, and so its options, unchanged), or a decorator.
    """
    def decorate(function: Callable) -> Callable:
        @functools.wraps(function)
        def run(*args, **kwargs):
            stdout = sys.stdout
            if not isinstance(stdout, LineTracker):
                sys.stdout = LineTracker(stdout)
            _ERRORS_IN_JSON["on"] = json_flag is not None and bool(kwargs.get(json_flag))
            try:
                return function(*args, **kwargs)
            except TransferkitError as error:
                end_open_line()
                raise tell_error(str(error), error.exit_code) from None
            except KeyboardInterrupt:
                # Ctrl-C outside training (loading, predicting, exporting): typer would end
                # with 130 and no word; training turns it into a resumable stop above.
                end_open_line()
                typer.echo("error: interrupted", err=True)
                raise typer.Exit(code=TrainingInterrupted.exit_code) from None
            finally:
                sys.stdout = stdout
                _ERRORS_IN_JSON["on"] = False  # the next command in this process (tests) starts without

        run.reports_errors = True
        run.json_flag = json_flag  # main answers a bad flag with --json in JSON too
        return run

    return decorate if command is None else decorate(command)


# Whether the command running asked for --json, so that its errors are {"error": ...} on stdout.
_ERRORS_IN_JSON = {"on": False}


def tell_error(message: str, code: int) -> typer.Exit:
    """Say a user error: one ``error:`` line on stderr, or ``{"error": ...}`` on stdout where
    the command was given --json (``reports_errors``'s ``json_flag``).

    Returns:
        The ``typer.Exit`` with ``code``, to raise.
    """
    if _ERRORS_IN_JSON["on"]:
        typer.echo(json.dumps({"error": message}, ensure_ascii=False))
    else:
        typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=code)


def usage_error(message: str) -> typer.Exit:
    """A bad flag value: one ``error:`` line (or JSON, as ``tell_error``) and exit code 2."""
    return tell_error(message, 2)


@contextlib.contextmanager
def usage_errors() -> Iterator[None]:
    """Around a library check of flag values (a format the run's formats table lacks, a
    class the run does not have): the error it raises is a bad flag value, told as a usage
    error (its one line, exit code 2) whatever its class's own exit code."""
    try:
        yield
    except TransferkitError as error:
        raise usage_error(str(error)) from None


def check_choice(flag: str, value: str | None, allowed: Sequence[str]) -> None:
    """A usage error for a value outside a choice table (told before any work)."""
    if value is not None and value not in allowed:
        raise usage_error(f"{flag} {value!r}: choose {one_of(allowed)}")


def check_trust_flags(reject: bool, sets: float | None, tta: bool) -> None:
    """Usage errors for --sets outside (0, 1), and for --reject or --sets with --tta (the
    threshold and the set scores were fitted on single-view outputs, which TTA's averaged
    probabilities are not)."""
    if sets is not None and not 0 < sets < 1:
        raise usage_error(f"--sets must be between 0 and 1 (exclusive), e.g. 0.9; got {sets:g}")
    if tta and (reject or sets is not None):
        flag = "--reject" if reject else "--sets"
        raise usage_error(f"{flag} does not combine with --tta: its threshold was fitted on single-view "
                          "probabilities, not TTA's averages; drop one of them")


def check_suffix(flag: str, path: Path | None, suffixes: Sequence[str]) -> None:
    """A usage error for a file name whose extension is none of ``suffixes`` (told before
    any work; the library checks it again for its own callers)."""
    if path is not None and path.suffix.lower() not in suffixes:
        raise usage_error(f"{flag} {path}: use a {' or '.join(suffixes)} file name")


def check_folders(data_dir: Path | None, val_dir: Path | None = None, what: str = "data folder", *,
                  classes: bool = False) -> None:
    """A missing or mistyped data (and validation) folder, or a validation folder that is the
    data folder, told in one line before Keras loads (seconds) instead of after; with
    ``classes``, class folders that training cannot take too (none, one, an empty one, other
    classes in the validation folder: ``data.folders.check_class_folders``, which reads each
    class folder up to its first image file)."""
    from transferkit.data.folders import check_class_folders, require_folder, require_other_folder

    if data_dir is not None:
        require_folder(data_dir, what)
    if val_dir is not None:
        require_folder(val_dir, "validation folder")
        if data_dir is not None:
            require_other_folder(data_dir, val_dir)
    if classes and data_dir is not None:
        check_class_folders(data_dir, val_dir)


def check_positive(flag: str, value: int | None) -> None:
    """A usage error for a count below 1."""
    if value is not None and value < 1:
        raise usage_error(f"{flag} must be at least 1, got {value}")


def recipe_overrides(ctx: typer.Context) -> dict:
    """The recipe overrides of a command line: its --set values, then every recipe flag the
    command has (by its name in ``recipe.FLAG_KEYS``: --backbone, --image-size, ...) that
    was given.

    Args:
        ctx: the command's context; its parameters hold the flags' values (None: not given).

    Returns:
        Dotted recipe key -> value, for ``load_recipe``.

    Raises:
        RecipeError: a --set value without "=".
    """
    from transferkit.recipe import FLAG_KEYS, collect_overrides

    flags = {name: value for name, value in ctx.params.items() if name in FLAG_KEYS}
    return collect_overrides(ctx.params.get("set_values") or [], flags)
