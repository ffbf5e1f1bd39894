"""What every command shares: the options defined once, logging to the terminal, and the
one mapping from a ``TransferkitError`` to a one-line message and its exit code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.errors import TransferkitError
from transferkit.runtime import ENGINES, PRECISIONS


def choices(values: Sequence[str]) -> str:
    """The metavar --help shows for a choice: ``[auto|keras|openvino]``."""
    return "[" + "|".join(values) + "]"


# Recipe flags shared by every command that resolves a recipe (recipe keys in brackets).
RecipeOption = Annotated[
    Optional[str],
    typer.Option("--recipe", "-r", help="Recipe TOML file, or a shipped recipe name (see `transferkit recipes`)."),
]
BackboneOption = Annotated[Optional[str], typer.Option(
        help="Backbone: vgg16, vgg19 or resnet50 (recipe key: backbone).")]
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
    typer.Option(metavar=choices(PRECISIONS), help="auto (bfloat16 where the CPU/GPU runs it fast), float32, bfloat16 "
                 "or float16 (recipe key: precision)."),
]
# The inference engine and precision of the commands that run a saved model (predict, evaluate).
InferenceEngineOption = Annotated[str, typer.Option(
    "--engine", metavar=choices(ENGINES), help="auto (OpenVINO on CPU when installed), keras or openvino.")]
InferencePrecisionOption = Annotated[str, typer.Option(
    "--precision", metavar=choices(PRECISIONS),
    help="auto (bfloat16 where the CPU runs it fast, near ties again in float32), float32 (exact), bfloat16 "
         "or float16 (16 bits only).")]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars and no progress messages.")]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="More messages (engines, caches, decisions).")]
DataDirArgument = Annotated[Path, typer.Argument(help="Folder with one sub-folder of images per class.")]


class TerminalHandler(logging.Handler):
    """The library's messages on the terminal: progress (info) as plain lines on stdout,
    warnings and errors as "warning: ..." on stderr; whatever sys.stdout / sys.stderr are
    now (test runners swap them)."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno == logging.INFO:
            sys.stdout.write(f"{record.getMessage()}\n")
            sys.stdout.flush()
        else:
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


def fail(error: TransferkitError) -> typer.Exit:
    """A library error as one ``error:`` line, with its class's exit code."""
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(code=error.exit_code)


def usage_error(message: str) -> typer.Exit:
    """A bad flag value: one ``error:`` line and exit code 2."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=2)


def check_choice(flag: str, value: str | None, allowed: Sequence[str]) -> None:
    """A usage error for a value outside a choice table (told before any work)."""
    if value is not None and value not in allowed:
        *first, last = allowed
        raise usage_error(f"{flag} {value!r}: choose {', '.join(first)} or {last}")


def check_positive(flag: str, value: int | None) -> None:
    """A usage error for a count below 1."""
    if value is not None and value < 1:
        raise usage_error(f"{flag} must be at least 1, got {value}")


def recipe_overrides(set_values: Sequence[str] | None, **flags) -> dict:
    """The recipe overrides of a command line: its --set values, then the shared recipe
    flags given (--backbone, --weights, --image-size, --batch-size ..., by their names in
    ``recipe.FLAG_KEYS``; None: not given)."""
    from transferkit.recipe import collect_overrides

    return collect_overrides(set_values or [], flags)
