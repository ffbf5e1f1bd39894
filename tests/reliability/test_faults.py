"""kill -9 at named instants (``TRANSFERKIT_FAULT``, ``transferkit.files.fault_point``), then
the invariants: the previous state or a resumable partial, never a half-written folder under
the final name, and the next command completes and tells (and removes) what was left.

Each CLI subprocess pays TensorFlow's import, so there are few, each at an instant that
proves something the others do not: a finetune killed once its first epoch is checkpointed,
then resumed twice and killed before and after the rename that publishes the run (the same
code publishes finetune's and resume's runs), ending as an uninterrupted run with the same
seed; evaluate -o killed before publishing; a tune worker killed mid-trial. The publishing
of exports and evaluations (one helper) is killed before and after its rename in processes
without Keras, and a run folder's replacement between its two renames. Two writers at one
live run, with and without --force: test_live_runs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import transferkit
from tests import forked
from tests.conftest import SUBPROCESS_PATH, TINY
from tests.reliability.test_live_runs import TINY_FLAGS
from transferkit.files import FAULT_VARIABLE
from transferkit.locks import OWNER_FILE, STAGING, work_dir_for

# One epoch per stage: the recipe of conftest's TINY, and of the session's shapes_run, the
# uninterrupted run a killed and resumed one must end as (finetune also has --head-epochs and
# --fine-epochs; tune has not).
EPOCHS = ["--set", "stages.0.epochs=1", "--set", "stages.1:.epochs=1"]


def killed_at(point: str, *args, code: str | None = None) -> subprocess.CompletedProcess:
    """Run ``transferkit ARGS`` (or ``python -c CODE ARGS``) with the fault at ``point``; it must
    die there by SIGKILL."""
    command = [sys.executable, *(("-c", code) if code is not None else ("-m", "transferkit")), *map(str, args)]
    done = forked.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": SUBPROCESS_PATH, FAULT_VARIABLE: point})
    assert done.returncode == -signal.SIGKILL, f"{point}: exit {done.returncode}\n{done.stderr[-3000:]}"
    return done


def dead_owner(folder: Path) -> int:
    """The pid of the owner record left in a lock folder (its process must be gone)."""
    pid = json.loads((folder / OWNER_FILE).read_text())["pid"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    return pid


def test_a_finetune_killed_at_each_step_of_its_end_resumes_to_the_uninterrupted_result(
        shapes_dir, tmp_path, shapes_run, caplog):
    output = tmp_path / "X"
    partial = work_dir_for(output)
    # Killed once its first epoch is checkpointed: a resumable partial, nothing under X.
    killed_at("run.epoch_saved", "finetune", shapes_dir, "-o", output, *TINY_FLAGS, *EPOCHS)
    assert not output.exists()
    assert json.loads((partial / "state.json").read_text())["global_epoch"] == 1
    first = dead_owner(partial)

    # Resumed, and killed with the run folder complete under its temporary name: still
    # nothing under X, the partial still resumable.
    resumed = killed_at("run.staged", "finetune", "--resume", output, "-q")
    assert f"pid {first} on {socket.gethostname()}" in resumed.stderr and "interrupted" in resumed.stderr
    assert not output.exists()
    [staged] = [entry for entry in tmp_path.iterdir() if entry.name.startswith(".X.partial-")]
    assert (staged / "model.keras").is_file() and (partial / "state.json").is_file()

    # Resumed again (the staged folder of the killed one is removed, named), and killed
    # just after the rename that publishes X: X is complete, X.partial not yet removed.
    resumed = killed_at("run.published", "finetune", "--resume", output, "-q")
    assert f"removed {staged}" in resumed.stderr
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["X", "X.partial"]
    assert transferkit.load_run(output).model is not None

    # The next --resume finds X finished: it removes the partial, saying so, and hands X back.
    with caplog.at_level("WARNING", logger="transferkit"):
        run = transferkit.resume_finetune(output, verbose=0)
    assert f"{output} is finished" in caplog.text and str(partial) in caplog.text
    assert not partial.exists() and run.path == output
    # both loaded from history.csv
    history, expected = run.history, transferkit.load_run(shapes_run.path, with_model=False).history
    assert [(row["epoch"], row["stage"]) for row in history] == [(row["epoch"], row["stage"]) for row in expected]
    assert len(history) == 2
    for got, want in zip(history, expected, strict=True):
        for key in ("loss", "val_loss", "val_accuracy"):
            assert float(got[key]) == pytest.approx(float(want[key]), rel=1e-5, abs=1e-6), (key, got, want)
    assert run.metrics["final"]["val_loss"] == pytest.approx(shapes_run.metrics["final"]["val_loss"], rel=1e-5)
    assert (output / "history.csv").read_text() == (shapes_run.path / "history.csv").read_text()


def test_an_evaluation_killed_before_it_is_published_leaves_nothing_under_its_name(
        shapes_dir, tmp_path, shapes_run, caplog):
    from transferkit.evaluation.evaluate import evaluate_folder, write_evaluation

    output = tmp_path / "eval"
    killed_at("evaluation.staged", "evaluate", shapes_run.path, shapes_dir, "-o", output, "--engine", "keras", "-q")
    assert not output.exists()
    assert (work_dir_for(output) / STAGING / "metrics.json").is_file()
    pid = dead_owner(work_dir_for(output))
    with caplog.at_level("WARNING", logger="transferkit"):
        write_evaluation(evaluate_folder(transferkit.load_run(shapes_run.path), shapes_dir, engine="keras"), output)
    assert f"removing the unfinished evaluation in {work_dir_for(output)}, left by pid {pid}" in caplog.text
    assert (output / "metrics.json").is_file() and not work_dir_for(output).exists()


# An export written through the one publishing helper, by a process without Keras.
PUBLISH = textwrap.dedent("""
    import sys
    from pathlib import Path
    from transferkit.locks import publishing
    with publishing(Path(sys.argv[1]), "export") as staging:
        (staging / "model.tflite").write_bytes(sys.argv[2].encode() * 1000)
        (staging / "export.json").write_text(sys.argv[2])
""")


def publish(target: Path, content: str, point: str | None = None) -> None:
    if point is not None:
        killed_at(point, target, content, code=PUBLISH)
    else:
        forked.run([sys.executable, "-c", PUBLISH, str(target), content], check=True,
                       env={**os.environ, "PYTHONPATH": SUBPROCESS_PATH})


@pytest.mark.parametrize("point", ["export.staged", "folder.moved_aside", "export.published"])
def test_an_export_killed_around_its_rename_is_the_old_one_or_the_new_one_whole(tmp_path, point, caplog):
    from transferkit.files import remove_leftovers
    from transferkit.locks import publishing

    target = tmp_path / "out"
    publish(target, "old")
    publish(target, "new", point)
    if point == "folder.moved_aside":
        # Killed between the two renames: the old export is aside, and the next command that
        # looks (publishing does, first) puts it back.
        [aside] = [entry for entry in tmp_path.iterdir() if entry.name.startswith(".out.replaced-")]
        assert not target.exists()
        with caplog.at_level("WARNING", logger="transferkit"):
            assert remove_leftovers(tmp_path) == []
        assert f"put {target} back" in caplog.text and not aside.exists()
    expected = "new" if point == "export.published" else "old"
    assert (target / "export.json").read_text() == expected
    assert (target / "model.tflite").read_bytes() == expected.encode() * 1000
    assert sorted(entry.name for entry in tmp_path.iterdir()) == ["out", "out.partial"]
    pid = dead_owner(work_dir_for(target))
    # The next writer takes the folder over, saying what it removes and whose it was.
    with caplog.at_level("WARNING", logger="transferkit"), publishing(target, "export") as staging:
        (staging / "export.json").write_text("next")
    assert f"left by pid {pid}" in caplog.text
    assert (target / "export.json").read_text() == "next" and not work_dir_for(target).exists()


# A run folder replaced as finetune --force replaces one (runs.save_run), by a process without Keras.
REPLACE = textwrap.dedent("""
    import shutil, sys
    from pathlib import Path
    from transferkit.files import replace_folder, staging_folder
    target = Path(sys.argv[1])
    staging = staging_folder(target)
    shutil.copytree(target, staging)
    replace_folder(staging, target)
""")


def test_a_run_whose_replacement_was_killed_between_the_renames_is_put_back_by_the_next_reader(
        tmp_path, shapes_run, caplog):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(shapes_run.path, run)
    killed_at("folder.moved_aside", run, code=REPLACE)
    [aside] = [entry for entry in tmp_path.iterdir() if entry.name.startswith(".run.replaced-")]
    assert not run.exists()
    # predict, evaluate, report and export load the run: the old one is put back, not told missing.
    with caplog.at_level("WARNING", logger="transferkit"):
        loaded = transferkit.load_run(run, with_model=False)
    assert f"put {run} back" in caplog.text and not aside.exists()
    assert loaded.class_names == shapes_run.class_names and (run / "model.keras").is_file()
    # Named by its model file, the same.
    killed_at("folder.moved_aside", run, code=REPLACE)
    assert transferkit.load_run(run / "model.keras", with_model=False).class_names == shapes_run.class_names


def test_a_folder_half_deleted_after_its_replacement_is_never_put_back(tmp_path):
    from transferkit.files import put_back_replaced, remove_leftovers

    dead = forked.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    half = tmp_path / f".run.removing-{pid}"  # a replacement killed while it deleted the old folder
    half.mkdir()
    (half / "labels.json").write_text("{}")
    assert not put_back_replaced(tmp_path / "run") and not (tmp_path / "run").exists()
    assert remove_leftovers(tmp_path) == [half] and list(tmp_path.iterdir()) == []


TUNE_SPACE = """
[tune]
"stages.0.learning_rate" = {low = 1e-4, high = 1e-1, log = true}
"""


def test_a_tune_worker_killed_mid_trial_leaves_a_study_the_next_one_continues(shapes_dir, tmp_path, caplog):
    pytest.importorskip("optuna")
    from transferkit.tuning.search import tune

    recipe = tmp_path / "recipe.toml"
    recipe.write_text(TUNE_SPACE, encoding="utf-8")
    output = tmp_path / "out"
    killed_at("tune.trial", "tune", shapes_dir, "--recipe", recipe, "--trials", "2", "-o", output, *TINY_FLAGS,
              *EPOCHS, "-q")
    assert (output / "study.db").is_file()
    # The next worker tells the killed trial as failed, naming its worker, and runs the
    # recipe as given (the killed trial was it) again.
    with caplog.at_level("WARNING", logger="transferkit"):
        summary = tune(shapes_dir, recipe, TINY, trials=1, output=output, verbose=0)
    assert summary.counts == {"fail": 1, "complete": 1}, summary.counts
    with open(output / "trials.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["state"] for row in rows] == ["fail", "complete"]
    assert rows[0]["fail_reason"].startswith("its worker, pid ") and "was killed mid-trial" in rows[0]["fail_reason"]
    assert rows[0]["fail_reason"] in caplog.text
    assert summary.best_trial == 1 and summary.best_recipe is not None
    assert summary.best_params == {"stages.0.learning_rate": pytest.approx(1e-3)}
