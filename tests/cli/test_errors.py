"""The command line turns a library error into one line and its exit code in one place:
``cli.common.reports_errors``, on every command."""

import ast
import inspect
from pathlib import Path

import pytest
from typer.testing import CliRunner

import transferkit.cli
from transferkit import errors
from transferkit.cli import COMMANDS, app

ERROR_CLASSES = [value for value in vars(errors).values()
                 if inspect.isclass(value) and issubclass(value, errors.TransferkitError)]


def test_every_command_reports_errors_through_the_one_wrapper():
    registered = {info.name: info.callback for info in app.registered_commands}
    assert registered == {name: command for name, command, _ in COMMANDS}
    unwrapped = [name for name, command in registered.items() if not getattr(command, "reports_errors", False)]
    assert not unwrapped, f"decorate with cli.common.reports_errors: {unwrapped}"


def test_no_command_module_catches_library_errors_itself():
    names = {error.__name__ for error in ERROR_CLASSES}
    caught = []
    for path in Path(transferkit.cli.__file__).parent.glob("*.py"):
        if path.name == "common.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                spelled = {ast.unparse(part).split(".")[-1] for part in ast.walk(node.type)
                           if isinstance(part, (ast.Name, ast.Attribute))}
                caught += [f"{path.name}:{node.lineno} {name}" for name in sorted(spelled & names)]
    assert not caught, "; ".join(caught)


@pytest.mark.parametrize("error_class", ERROR_CLASSES, ids=lambda error_class: error_class.__name__)
def test_a_library_error_is_one_line_with_its_class_exit_code(error_class, tmp_path, monkeypatch):
    import transferkit.evaluation.card

    # UnreadableImage is told as "PATH: reason"; the others take their message whole.
    arguments = (("what went wrong", "what to do") if error_class is errors.UnreadableImage
                 else ("what went wrong; what to do",))
    message = ": ".join(arguments)

    def fails(run):
        raise error_class(*arguments)

    monkeypatch.setattr(transferkit.evaluation.card, "write_run_report", fails)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == error_class.exit_code
    assert result.output == f"error: {message}\n"


def test_an_error_after_an_unfinished_progress_line_starts_a_line_of_its_own(tmp_path, monkeypatch):
    """A Keras progress bar leaves its line open ("\\r" redraws, no newline); the error line
    must not be glued to its end."""
    import sys

    import transferkit.evaluation.card

    def fails(run):
        sys.stdout.write("\r 3/10 ━━━━━━━━━━━━━━━━━━━━ 2s 300ms/step - loss: 0.6931")
        raise errors.RunError("cannot write run/model.keras: File too large")

    monkeypatch.setattr(transferkit.evaluation.card, "write_run_report", fails)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stdout.endswith("loss: 0.6931\n")
    assert result.stderr == "error: cannot write run/model.keras: File too large\n"


def test_a_finished_line_gets_no_extra_newline(tmp_path, monkeypatch):
    import sys

    import transferkit.evaluation.card

    def fails(run):
        sys.stdout.write("reading images (3 files)\n")
        raise errors.RunError("stop")

    monkeypatch.setattr(transferkit.evaluation.card, "write_run_report", fails)
    result = CliRunner().invoke(app, ["report", str(tmp_path)])
    assert result.stdout == "reading images (3 files)\n"


def test_ctrl_c_outside_training_is_one_line_and_exit_130(shapes_dir, tmp_path, monkeypatch):
    import transferkit.runs

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what SIGINT raises in the main thread while the run loads

    monkeypatch.setattr(transferkit.runs, "load_run", interrupted)
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), str(shapes_dir), "-q"])
    assert result.exit_code == 130
    assert result.output.strip() == "error: interrupted"


def test_a_cause_longer_than_its_line_is_cut_at_a_word_and_says_so():
    """A warning quoting MLflow's list of URI schemes ended "... 'databricks', 'databrick"."""
    cause = RuntimeError("Supported URI schemes are: " + ", ".join(f"'scheme{index}'" for index in range(40)))
    line = errors.first_line(cause, limit=60)
    assert line == "Supported URI schemes are: 'scheme0', 'scheme1', 'scheme2'" + errors.SHORTENED
    assert errors.first_line(RuntimeError("short enough\nsecond line")) == "short enough"
    assert errors.first_line(RuntimeError("x" * 80), limit=60) == "x" * 60 + errors.SHORTENED  # one long word
