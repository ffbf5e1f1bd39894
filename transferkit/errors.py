"""Errors that transferkit raises for things a user can get wrong.

Every error here is caught by the CLI and printed as one line, with the exit code the
class names (1: the input or the run is wrong; 2: the command line or recipe is wrong;
130: training was interrupted).

    TransferkitError
    ├── RecipeError        a recipe key or CLI override is unknown, mistyped or out of range
    ├── DataError          the image folder, a validation folder or an image cannot be used
    │   └── UnreadableImage  one file is not a readable image (skipped where others go on)
    ├── WeightsError       backbone weights cannot be downloaded, found or loaded
    ├── EngineError        the inference engine asked for is not installed
    ├── StrategyError      the distribution strategy or device count asked for cannot be
    │                      set up here (more devices than the machine has, a strategy not built)
    ├── RunError           a run folder cannot be written, found or read
    ├── ExportError        an export cannot be written here, disagrees with the Keras model,
    │                      loses more accuracy than allowed, or its folder exists already
    ├── ServeError         ``transferkit serve`` cannot start: its extra is missing, or the
    │                      address cannot be listened on
    └── TrainingInterrupted  Ctrl-C (SIGINT) or SIGTERM stopped training; what was kept is
                           told, and ``finetune --resume`` continues from it
"""

from __future__ import annotations


class TransferkitError(Exception):
    """Base class: a problem the user can fix, told in one line."""

    exit_code = 1


class RecipeError(TransferkitError):
    """Raised when a recipe file or a command-line override has a bad key or value."""

    exit_code = 2


class DataError(TransferkitError):
    """Raised when the data folder, its classes or its images cannot be used."""


class UnreadableImage(DataError):
    """Raised by ``data.images.read_image`` for a file that is not a readable image; callers
    that read many skip it with its reason.

    Attributes:
        path: the file.
        reason: why it cannot be used, without the path.
    """

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class WeightsError(TransferkitError):
    """Raised when backbone weights cannot be downloaded, found, or do not fit the backbone."""


class EngineError(TransferkitError):
    """Raised when ``--engine openvino`` is asked for and the openvino package is missing."""


class StrategyError(TransferkitError):
    """Raised when ``--strategy`` / ``--devices`` ask for what this machine or this version
    cannot give: more devices than it has, logical CPU devices after TensorFlow started, or a
    strategy that is not built."""

    exit_code = 2


class RunError(TransferkitError):
    """Raised when a run folder exists already, cannot be written, or is not a transferkit run."""


class ExportError(TransferkitError):
    """Raised when a format cannot be written here, disagrees with the Keras model, loses
    more accuracy than allowed, or its output folder exists already."""


class ServeError(TransferkitError):
    """Raised when ``transferkit serve`` cannot start: the ``serve`` extra is not installed,
    or the host and port cannot be listened on (in use, not this machine's, not allowed)."""


class TrainingInterrupted(TransferkitError):
    """Raised when SIGINT or SIGTERM stopped training; the message says what was kept (the
    last completed epoch, or nothing)."""

    exit_code = 130


SHORTENED = " ... (cut short)"


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message, or its type's name when it has no
    message: what a one-line error quotes of a cause. A line longer than ``limit`` characters
    is cut after its last whole word within them and ends with ``SHORTENED``, so that a cut
    never passes for the whole message nor ends mid-word.

    Args:
        error: any exception.
        limit: the longest text kept of the line; default 200.

    Returns:
        The line.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    line = lines[0]
    if len(line) <= limit:
        return line
    kept = line[:limit]
    if not line[limit].isspace() and " " in kept:  # the limit falls inside a word: drop that word
        kept = kept.rsplit(" ", 1)[0]
    return kept.rstrip(" ,;:") + SHORTENED
