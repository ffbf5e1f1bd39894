"""The command line: each command parses, calls one library function, prints.

Each module is named for its commands: ``finetune``, ``predict``, ``doctor`` (doctor, and
doctor --model), ``augment_preview``, ``lr_find``, ``tune``, ``evaluate`` (evaluate, explain,
report), ``export`` (export, benchmark), ``info`` (backbones, recipes), ``audit``. ``common``
holds the options defined once, the one path from flags to recipe overrides, and ``reports_errors``,
on every command: a ``TransferkitError`` becomes one ``error:`` line and its class's exit
code. Exit codes: 0 success, 1 the input or the run failed, 2 a usage or recipe error, 130
interrupted.

Start-up: a command module imports at its top what loads quickly (typer, the choice tables,
the backbone registry); what loads numpy, Pillow, pydantic or Keras is imported inside the
command that uses it, so that ``--help`` answers within 1 s and ``backbones`` within 2 s
(tests/cli/test_startup.py).
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from typing import Annotated, Optional

import typer

from transferkit import __version__
from transferkit.backend import requested_backend
from transferkit.cli import (
    audit,
    augment_preview,
    doctor,
    evaluate,
    export,
    finetune,
    info,
    lr_find,
    predict,
    serve,
    tune,
)
from transferkit.cli.common import setup_logging
from transferkit.errors import TrainingInterrupted
from transferkit.keras_private import hide_tensorflow_from_keras
from transferkit.runtime import interrupt_on_signal, quiet_tensorflow_import

app = typer.Typer(
    name="transferkit",
    help="Transfer-learning image classification: fine-tune a pretrained backbone on a folder "
    "of class sub-folders, then predict.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


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
    setup_logging()


# Whether this console-script command line loads TensorFlow (``main`` decides, from argv).
_STARTUP = {"tensorflow": False}


def _tensorflow_first(command):
    """The command with TensorFlow's import made quiet, whenever it comes, when ``main`` said
    the command line needs it: a mistyped flag, or a mistake found before Keras is needed, is
    answered at once, not after TensorFlow's start-up (seconds). On JAX and PyTorch, Keras is
    kept from importing TensorFlow at all (``keras_private.hide_tensorflow_from_keras``)."""

    @functools.wraps(command)
    def run(*args, **kwargs):
        if _STARTUP["tensorflow"]:
            quiet_tensorflow_import()
            if requested_backend() != "tensorflow":  # JAX, PyTorch: as where TensorFlow is not installed
                hide_tensorflow_from_keras()
        return command(*args, **kwargs)

    return run


# Every command, in --help's order, with whether it loads Keras / TensorFlow: True, False
# (listings, data checks: they answer without TensorFlow's start-up), or the flag with which
# it does (doctor checks learning with --model); those that may are wrapped by _tensorflow_first.
COMMANDS = tuple((name, _tensorflow_first(command) if loads else command, loads) for name, command, loads in (
    ("finetune", finetune.finetune, True),
    ("predict", predict.predict, True),
    ("doctor", doctor.doctor, "--model"),
    ("augment-preview", augment_preview.augment_preview, False),
    ("lr-find", lr_find.lr_find, True),
    ("evaluate", evaluate.evaluate, True),
    ("explain", evaluate.explain, True),
    ("report", evaluate.report, False),
    ("tune", tune.tune, True),
    ("audit", audit.audit, True),
    ("export", export.export, True),
    ("benchmark", export.benchmark, True),
    ("serve", serve.serve, True),
    ("backbones", info.backbones, False),
    ("recipes", info.recipes, False),
))
for name, command, _ in COMMANDS:
    app.command(name)(command)

COMMAND_FUNCTIONS = {name: command for name, command, _ in COMMANDS}
TENSORFLOW_COMMANDS = frozenset(name for name, _, loads in COMMANDS if loads is True)
TENSORFLOW_FLAGS = {name: loads for name, _, loads in COMMANDS if isinstance(loads, str)}


def needs_tensorflow(argv: list[str]) -> bool:
    """Whether the command line runs a command that loads Keras, and with it TensorFlow (not
    for --help). On JAX or PyTorch, Keras's own probes for TensorFlow are then answered as
    where it is not installed, and an import a command makes itself is made quiet."""
    if len(argv) < 2 or "--help" in argv:
        return False
    command = argv[1]
    return command in TENSORFLOW_COMMANDS or TENSORFLOW_FLAGS.get(command, "\0") in argv[2:]


def main() -> None:
    """Console-script entry point."""
    # Typer's parser errors (click's ClickException / UsageError) reached through the public
    # typer.BadParameter, since typer ships its own copy of click.
    click_exception, usage_error = (next(base for base in typer.BadParameter.__mro__ if base.__name__ == name)
                                    for name in ("ClickException", "UsageError"))
    # SIGTERM (a scheduler, `kill`, a container stopping) ends a command as Ctrl-C does: one
    # line, exit code 130, nothing half-written; training turns either into a resumable stop.
    # Both are noted too, for training to find one whose KeyboardInterrupt was lost.
    for number, default in ((signal.SIGTERM, signal.SIG_DFL), (signal.SIGINT, signal.default_int_handler)):
        if signal.getsignal(number) is default:
            signal.signal(number, interrupt_on_signal)
    try:
        _STARTUP["tensorflow"] = needs_tensorflow(sys.argv)
        code = app(standalone_mode=False)
    except click_exception as error:
        if not isinstance(error, usage_error) or type(error).__name__ == "NoArgsIsHelpError":
            error.show()  # bare `transferkit`: the help, as typer shows it
            sys.exit(error.exit_code)
        # A bad flag or argument: one line, like every other user error, and where to look.
        command = error.ctx.command_path if error.ctx is not None else "transferkit"
        message = f"{error.format_message()} (see {command} --help)"
        if "--json" in sys.argv[2:] and getattr(COMMAND_FUNCTIONS.get(sys.argv[1]), "json_flag", None):
            sys.stdout.write(json.dumps({"error": message}, ensure_ascii=False) + "\n")  # as its other errors
        else:
            sys.stderr.write(f"error: {message}\n")
        sys.exit(error.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        # Ctrl-C outside training (starting up, reading images): nothing was written yet
        # that a later run needs; training itself turns Ctrl-C into a resumable stop.
        sys.stderr.write("\nerror: interrupted\n")
        sys.exit(TrainingInterrupted.exit_code)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":  # pragma: no cover
    main()
