"""How fast the command line answers when nothing is trained: `--help` and the listings load
no Keras (tests/test_packaging.py) and little else. Each is timed in a fresh process, the
best of three runs, by the CPU time the process used (user + system): what it costs on an idle
machine, which the other test workers sharing these cores do not inflate as they inflate the
wall clock."""

import resource
import subprocess
import sys

import pytest


def best_of_three(*args: str) -> float:
    """CPU seconds of the cheapest of three runs of ``python -m transferkit ARGS``."""

    def used() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return children.ru_utime + children.ru_stime

    seconds = []
    for _ in range(3):
        before = used()
        done = subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True,
                              timeout=120)
        seconds.append(used() - before)
        assert done.returncode == 0, done.stderr
    return min(seconds)


@pytest.mark.parametrize("args, budget", [(["--help"], 1.0), (["backbones"], 2.0)])
def test_help_and_listings_answer_within_their_start_up_budget(args, budget):
    seconds = best_of_three(*args)
    assert seconds < budget, f"transferkit {' '.join(args)} took {seconds:.2f} s (budget {budget} s)"


# Told before Keras is needed, so before TensorFlow's start-up (which a finetune or predict
# makes quietly, whenever it comes: its C++ lines, oneDNN's and CUDA's, never reach stderr).
REPORTS_TENSORFLOW = "import atexit, sys; atexit.register(lambda: print('tensorflow' in sys.modules, file=sys.stderr))"


@pytest.mark.parametrize("args, code, fragment", [
    (["finetune", "{data}", "--set", "bogus.key=1"], 2, "unknown key 'bogus'"),
    (["predict", "{tmp}/no-run", "{data}"], 1, "no-run does not exist"),
    (["predict", "{tmp}/no-run", "{tmp}/bad.jpg"], 1, "bad.jpg: "),
    (["finetune", "{tmp}/no-data"], 1, "data folder {tmp}/no-data does not exist"),
    (["finetune", "{data}", "--val-dir", "{tmp}/no-val"], 1, "validation folder {tmp}/no-val does not exist"),
    (["tune", "{tmp}/bad.jpg"], 1, "bad.jpg is a file, not a folder"),
    (["lr-find", "{tmp}/no-data"], 1, "no-data does not exist"),
    (["audit", "{tmp}/no-data"], 1, "no-data does not exist"),
    (["evaluate", "{tmp}/no-run", "{tmp}/no-data"], 1, "labelled folder {tmp}/no-data does not exist"),
    (["finetune", "{data}", "--val-dir", "{data}"], 1, "is the data folder itself"),
    (["finetune", "{data}", "-o", "{tmp}/existing"], 1, "run folder {tmp}/existing exists already"),
    (["export", "{tmp}/run", "--format", "onnx", "-o", "{tmp}/existing"], 1, "{tmp}/existing exists already"),
    (["benchmark", "{tmp}/no-run"], 1, "no-run does not exist"),
    (["finetune", "--resume", "{tmp}/no-run"], 1, "nothing to resume: no interrupted run at {tmp}/no-run.partial"),
    (["tune", "{data}", "--set", "bogus.key=1"], 2, "unknown key 'bogus'"),
    (["doctor", "{data}", "--model", "--set", "bogus.key=1"], 2, "unknown key 'bogus'"),
    (["lr-find", "{tmp}/one-class"], 1, "has only one class folder (a)"),
    (["finetune", "{tmp}/one-class", "--val-dir", "{data}"], 1, "has only one class folder (a)"),
])
def test_a_mistake_found_before_keras_is_needed_is_told_without_loading_tensorflow(args, code, fragment, shapes_dir,
                                                                                 tmp_path):
    import os

    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "notes.txt").write_text("keep me")
    (tmp_path / "one-class" / "a").mkdir(parents=True)
    (tmp_path / "one-class" / "a" / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut short")
    (tmp_path / "run").mkdir()  # a run's record (its model is loaded only once the output is known good)
    (tmp_path / "run" / "model.keras").write_bytes(b"")
    (tmp_path / "run" / "labels.json").write_text('{"class_names": ["a", "b"], "image_size": 32, "backbone": "vgg16", '
                                                  '"head_activation": "sigmoid"}')
    fragment = fragment.format(tmp=tmp_path)
    command = [sys.executable, "-c", f"{REPORTS_TENSORFLOW}; from transferkit.cli import main; sys.argv[0] = "
               "'transferkit'; main()", *(arg.format(data=shapes_dir, tmp=tmp_path) for arg in args)]
    env = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == code, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("error: ") and fragment in lines[0], done.stderr
    assert lines[1] == "False"  # TensorFlow never imported
    assert (tmp_path / "existing" / "notes.txt").read_text() == "keep me"


def test_a_command_that_loads_tensorflow_keeps_its_start_up_lines_off_stderr(shapes_run, shapes_dir):
    import os

    command = [sys.executable, "-c", f"{REPORTS_TENSORFLOW}; from transferkit.cli import main; sys.argv[0] = "
               "'transferkit'; main()", "predict", str(shapes_run.path), str(shapes_dir), "-q", "--engine", "keras"]
    env = {name: value for name, value in os.environ.items() if name != "TF_CPP_MIN_LOG_LEVEL"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.splitlines()
    assert lines[-1] == "True", done.stderr  # TensorFlow was loaded
    # and not one line of its own (transferkit's warnings, one CPU kind's or another's, may stand)
    assert all(line.startswith("warning: ") for line in lines[:-1]), done.stderr


def test_on_jax_a_mistake_is_told_without_loading_keras_or_jax(shapes_dir, tmp_path):
    """On JAX and PyTorch the command line keeps Keras from importing TensorFlow by a hook on
    Keras's own import (``keras_private.hide_tensorflow_from_keras``), not by loading Keras
    before the command has checked its arguments."""
    import os

    pytest.importorskip("jax", reason="the jax extra is not installed")
    reports = ("import atexit, sys; atexit.register(lambda: print(sorted(name for name in ('keras', 'jax', "
               "'tensorflow') if name in sys.modules), file=sys.stderr))")
    command = [sys.executable, "-c", f"{reports}; from transferkit.cli import main; sys.argv[0] = 'transferkit'; "
               "main()", "predict", str(tmp_path / "no-run"), str(shapes_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "KERAS_BACKEND": "jax"})
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 2 and "no-run does not exist" in lines[0], done.stderr
    assert lines[1] == "[]"


def test_a_bad_flag_beside_json_is_answered_in_json_on_stdout(shapes_dir):
    """As the command's other errors with --json (doctor, lr-find); without --json, or on a
    command that has none, the one line on stderr."""
    import json

    done = subprocess.run([sys.executable, "-m", "transferkit", "lr-find", str(shapes_dir), "--json", "--bogus"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not done.stderr, done.stderr
    error = json.loads(done.stdout)["error"]
    assert error.startswith("No such option: --bogus") and error.endswith("lr-find --help)")
    done = subprocess.run([sys.executable, "-m", "transferkit", "predict", str(shapes_dir), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and not done.stdout
    assert done.stderr.startswith("error: No such option: --json") and len(done.stderr.splitlines()) == 1
