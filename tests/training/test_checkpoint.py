"""A real SIGTERM to a real training process, a real SIGINT to its resumed process, then
--resume, against an uninterrupted run.

Only the interrupted runs need processes of their own (real signals); the uninterrupted run and
the last --resume go through the same CLI in this process (typer's CliRunner), which spares each the
seconds of a TensorFlow import.
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import transferkit
from tests import forked
from transferkit.cli import app
from transferkit.errors import DataError, RunError
from transferkit.workflow import resume_finetune

FLAGS = ["--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "--batch-size", "2", "--head-epochs", "3",
         "--fine-epochs", "2", "--set", "head.units=[16]", "--quiet"]


# ``transferkit finetune ARGS`` that holds still once its epoch N (counted over the stages) is
# checkpointed, until a signal asks it to stop: the signal comes from outside, when the test
# sees the checkpoint, whatever the scheduler does (a tiny epoch takes under 100 ms; a signal
# that came an epoch late would find the run further on, or finished).
HELD_AT_EPOCH = """
import sys, time
import transferkit.training.callbacks as callbacks
from transferkit.cli import main

held_at = int(sys.argv[1])
saved = callbacks.EpochCallback.on_epoch_end

def held(self, epoch, logs=None):
    saved(self, epoch, logs)
    if self.epoch_offset + epoch + 1 == held_at:
        deadline = time.monotonic() + 240
        while not (self.stop is not None and self.stop.requested) and time.monotonic() < deadline:
            time.sleep(0.01)

callbacks.EpochCallback.on_epoch_end = held
sys.argv = ["transferkit", "finetune", *sys.argv[2:]]
main()
"""


def held_cli(epoch, *args):
    return [sys.executable, "-c", HELD_AT_EPOCH, str(epoch), *map(str, args)]


def epochs_saved(partial):
    try:
        return json.loads((partial / "state.json").read_text())["global_epoch"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.fixture(scope="module")
def reference(shapes_dir, tmp_path_factory):
    """The uninterrupted run both interrupted runs must end as (trained once, by the same
    command line as theirs, in this process)."""
    output = tmp_path_factory.mktemp("reference") / "run"
    done = CliRunner().invoke(app, ["finetune", str(shapes_dir), *FLAGS, "-o", str(output)])
    assert done.exit_code == 0, done.output[-2000:]
    return output


def interrupt(command, partial, after, signum):
    """Start ``command``, send it ``signum`` once ``partial`` holds ``after`` epochs, and check
    that it stopped as an interrupted run does: exit 130, the --resume line, no traceback, no
    finished run. Returns the epochs it kept."""
    process = forked.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while epochs_saved(partial) < after and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be interrupted"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    assert f"{signal.Signals(signum).name} received" in stderr
    assert not (partial / "model.keras").exists() and not (partial / "labels.json").exists()
    return epochs_saved(partial)


@pytest.mark.slow
def test_a_run_interrupted_by_sigterm_then_resumed_and_interrupted_by_sigint_ends_as_the_uninterrupted_one(
        shapes_dir, tmp_path, reference):
    """Both signals, each to a real process: the first stops a new run, the second a resumed
    one (so a resumed run keeps its own checkpoints too); the last --resume must then end
    exactly as the run trained without a stop."""
    output = tmp_path / "run"
    partial = tmp_path / "run.partial"
    first = interrupt(held_cli(1, shapes_dir, *FLAGS, "-o", output), partial, 1, signal.SIGTERM)
    assert first == 1 and not output.exists()  # the epoch it was in when stopped is dropped
    second = interrupt(held_cli(4, "--resume", output, "--quiet"), partial, 4, signal.SIGINT)
    assert second == 4 and not output.exists()  # in the second stage: resumed across the boundary

    resumed = CliRunner().invoke(app, ["finetune", "--resume", str(output), "--quiet"])
    assert resumed.exit_code == 0, resumed.output[-2000:]
    assert not partial.exists()
    expected = transferkit.load_run(reference).model.get_weights()
    got = transferkit.load_run(output).model.get_weights()
    for a, b in zip(expected, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert (output / "history.csv").read_text() == (reference / "history.csv").read_text()
    # metrics.json and the model card count every stage's epochs, those before the resumes too.
    stages = [json.loads((folder / "metrics.json").read_text())["stages"] for folder in (reference, output)]
    assert [(stage["stage"], stage["epochs"]) for stage in stages[1]] == [(stage["stage"], stage["epochs"])
                                                                         for stage in stages[0]]
    assert any(stage.get("resumed") for stage in stages[1]) and not any("resumed" in stage for stage in stages[0])
    card = (output / "MODEL_CARD.md").read_text()
    for stage in stages[0]:
        assert f"| {stage['stage']} |" in card and "| ? (" not in card


# A SIGTERM the process sends itself at a chosen step of finetune (``python -c``, through the
# console script's ``main``): before training, at the end of the last stage (its handlers still
# on), and after training (calibration, outside them).
AT_STEP = """
import os, signal, sys
import transferkit.workflow as workflow
from transferkit.cli import main

step = sys.argv[1]
real = getattr(workflow, step)

def terminated_there(*args, **kwargs):
    if step == "run_stages":
        result = real(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return result
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

setattr(workflow, step, terminated_there)
sys.argv = ["transferkit", "finetune", *sys.argv[2:]]
main()
"""


def test_sigterm_before_at_the_end_of_and_after_training_is_one_line_and_keeps_what_resumes(shapes_dir, tmp_path):
    """SIGTERM outside training ended the process at once (exit 143, no word, an in-progress
    folder left); at the end of the last stage it was told as a stop and then ignored."""
    output, partial = tmp_path / "run", tmp_path / "run.partial"

    def terminated_at(step, *args):
        done = forked.run([sys.executable, "-c", AT_STEP, step, *map(str, args)], capture_output=True, text=True,
                          timeout=300)
        assert done.returncode == 130 and "Traceback" not in done.stderr, done.stderr[-3000:]
        return [line for line in done.stderr.splitlines() if line.startswith("error:")]

    tiny = ["--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "--batch-size", "8",
            "--set", "head.units=[16]", "--head-epochs", "1", "--fine-epochs", "1", "--quiet"]
    # Before training (the model being built): one line, and no folder left to step around.
    [line] = terminated_at("build_model", shapes_dir, *tiny, "-o", output)
    assert line == "error: interrupted: training stopped before its first epoch ended; nothing was kept"
    assert list(tmp_path.iterdir()) == []
    # As the last stage ends: the stop is honoured, every epoch kept, the run not published.
    [line] = terminated_at("run_stages", shapes_dir, *tiny, "-o", output)
    assert f"saved in {partial}. Continue with: transferkit finetune --resume {output}" in line
    assert epochs_saved(partial) == 2 and not output.exists()
    # After training (calibrating), resumed: still kept, still not published.
    [line] = terminated_at("fit_calibration", "--resume", output, "--quiet")
    assert line.startswith("error: interrupted: training stopped; the last completed epoch is saved in")
    assert epochs_saved(partial) == 2 and not output.exists()
    resumed = CliRunner().invoke(app, ["finetune", "--resume", str(output), "--quiet"])
    assert resumed.exit_code == 0, resumed.output[-2000:]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["run"]
    finished = transferkit.load_run(output, with_model=False)
    assert len(finished.history) == 2
    # Every epoch was trained before the last resume: counted still (the head has no timing of
    # this process; the fine stage's covers its set-up again, no epoch).
    head, fine = finished.metrics["stages"]
    assert (head["stage"], head["epochs"], head["seconds"], head["resumed"]) == ("head", 1, None, True)
    assert (fine["stage"], fine["epochs"], fine["resumed"]) == ("fine", 1, True)


def test_resume_without_an_interrupted_run_is_an_error(tmp_path):
    with pytest.raises(RunError, match="nothing to resume"):
        resume_finetune(tmp_path / "never-started")


def test_new_run_refuses_to_clobber_an_interrupted_one(shapes_dir, tmp_path, tiny, monkeypatch):
    import transferkit.workflow

    (tmp_path / "run.partial").mkdir()
    (tmp_path / "run.partial" / "job.json").write_text("{}")

    def never(*args, **kwargs):
        raise AssertionError("the images were read before the interrupted run was found")

    monkeypatch.setattr(transferkit.workflow, "prepare_data", never)  # told before reading them
    with pytest.raises(RunError, match=f"an interrupted run of {tmp_path / 'run'} is in .*--resume"):
        transferkit.finetune(shapes_dir, None, tiny, output=tmp_path / "run", verbose=0)
    result = CliRunner().invoke(app, ["finetune", str(shapes_dir), "--backbone", "tinyvgg", "--weights", "none",
    "-o", str(tmp_path / "run")])
    assert result.exit_code == 1 and "continue it with --resume" in result.output


@pytest.fixture
def interrupted(shapes_dir, tmp_path, tiny, monkeypatch):
    """An interrupted run of a copy of the shapes data: (data folder, run folder). The
    interruption comes as training starts, so resuming trains the whole (tiny) run."""
    import shutil

    import transferkit.workflow
    from transferkit.errors import TrainingInterrupted

    data = shutil.copytree(shapes_dir, tmp_path / "data")
    output = tmp_path / "runs" / "run"

    def stop_at_once(*args, **kwargs):
        raise TrainingInterrupted("SIGINT: training stopped")

    with monkeypatch.context() as patch:
        patch.setattr(transferkit.workflow, "_train", stop_at_once)
        with pytest.raises(TrainingInterrupted):
            transferkit.finetune(data, None, tiny, output=output, verbose=0)
    assert (tmp_path / "runs" / "run.partial" / "job.json").is_file()
    return data, output


def test_resume_refuses_data_that_changed(interrupted):
    data, output = interrupted
    removed = sorted((data / "circle").iterdir())[0]
    removed.unlink()
    with pytest.raises(DataError, match="changed since the interrupted run"):
        resume_finetune(output, verbose=0)
    (data / "star").mkdir()
    for index, path in enumerate(sorted((data / "square").iterdir())[:3]):
        (data / "star" / f"copy{index}.jpg").write_bytes(path.read_bytes())
    with pytest.raises(DataError, match="has classes circle, square, star, triangle but the interrupted run"):
        resume_finetune(output, verbose=0)
    assert (output.parent / "run.partial").is_dir()  # still there to resume once the data is back


def test_resume_finds_moved_data_and_writes_where_the_partial_folder_is(interrupted, tmp_path):
    data, output = interrupted
    moved = data.rename(tmp_path / "elsewhere")
    gone = "is gone; if it moved, give its new place: transferkit finetune NEW_DATA_DIR --resume"
    with pytest.raises(DataError, match=gone):
        resume_finetune(output, verbose=0)
    renamed = output.parent / "renamed.partial"
    (output.parent / "run.partial").rename(renamed)
    run = resume_finetune(renamed, verbose=0, data_dir=moved)
    assert run.path == output.parent / "renamed" and (run.path / "model.keras").is_file()
    assert not output.exists() and not renamed.exists()


def test_damaged_checkpoint_is_reported_in_one_line(interrupted):
    data, output = interrupted
    partial = output.parent / "run.partial"
    for damage in ("{bad", ""):
        (partial / "job.json").write_text(damage)
        with pytest.raises(RunError, match=r"is damaged \(job.json: .*start over with --force"):
            resume_finetune(output, verbose=0)
    (partial / "job.json").write_text(json.dumps({"data_dir": str(data), "val_dir": None, "save_h5": False}))
    (partial / "state.json").write_text(json.dumps({"stage_index": 0, "epochs_done": 1, "arrays_file": "arrays-3.npz"}))
    with pytest.raises(RunError, match=r"damaged \(arrays-3.npz"):
        from transferkit.training.checkpoint import WorkFolder

        WorkFolder.open(output).best_weights()


def test_resuming_a_run_whose_plugin_backbone_is_gone_names_the_package_to_install(interrupted, monkeypatch):
    from transferkit import backbones

    _, output = interrupted
    partial = output.parent / "run.partial"
    job = json.loads((partial / "job.json").read_text())
    assert (job["backbone"], job["backbone_package"]) == ("tinyvgg", "transferkit-test-backbones")
    monkeypatch.setattr(backbones, "_plugins", dict)  # the package uninstalled since
    told = (r"job.json: the interrupted run's backbone 'tinyvgg' comes from the package transferkit-test-backbones, "
            r"which is not installed here; install it \(pip install transferkit-test-backbones\), then resume")
    with pytest.raises(RunError, match=told):
        resume_finetune(output, verbose=0)
    result = CliRunner().invoke(app, ["finetune", "--resume", str(output)])
    assert result.exit_code == 1 and "pip install transferkit-test-backbones" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    assert (partial / "job.json").is_file()  # kept, to resume once the package is back


def test_resume_refuses_settings_it_would_ignore(interrupted):
    _, output = interrupted
    result = CliRunner().invoke(app, ["finetune", "--resume", str(output), "--image-size", "48", "-o", "x"])
    assert result.exit_code == 2
    assert "drop --image-size, --output" in result.output


def test_a_second_ctrl_c_still_says_what_was_kept(shapes_dir, tmp_path, tiny, monkeypatch):
    """The second Ctrl-C stops at once (KeyboardInterrupt inside training): the run still
    ends with the one-line message, and a run with no finished epoch leaves nothing."""
    import transferkit.workflow
    from transferkit.errors import TrainingInterrupted

    def second_ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    # where the workflow finds it (it imports the name)
    monkeypatch.setattr(transferkit.workflow, "run_stages", second_ctrl_c)
    with pytest.raises(TrainingInterrupted, match="SIGINT again: training stopped before its first epoch ended"):
        transferkit.finetune(shapes_dir, None, tiny, output=tmp_path / "run", verbose=0)
    assert not any(tmp_path.iterdir())


def test_checkpoint_files_are_flushed_to_disk_before_they_replace_the_old_ones(tmp_path, monkeypatch):
    """checkpoint.keras, the arrays and state.json each go through the one atomic-write helper:
    written beside, fsynced, then renamed; no temporary file stays."""
    import keras

    import transferkit.files
    from transferkit.training.checkpoint import TrainingState, WorkFolder

    synced = []
    real_fsync = transferkit.files.fsync_file
    monkeypatch.setattr(transferkit.files, "fsync_file", lambda path: (synced.append(Path(path).name),
                                                                       real_fsync(path)))
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    work = WorkFolder.create(tmp_path / "run", {"data_dir": "x"}, "", force=False)
    work.save(model, TrainingState(stage_index=0, epochs_done=1), best_weights=model.get_weights())
    work.flush()
    state = work.state()
    assert state.epochs_done == 1 and state.arrays_file == "arrays-1.npz"
    assert any(name.endswith(".keras") for name in synced)
    assert any(".arrays-1.npz." in name for name in synced) and any(".state.json." in name for name in synced)
    assert sorted(path.name for path in work.path.iterdir()) == [
        "arrays-1.npz", "checkpoint.keras", "job.json", "lock", "owner.json", "recipe.toml", "state.json"]
    np.testing.assert_array_equal(work.best_weights()[0], model.get_weights()[0])
    work.remove()


def test_a_first_signal_asks_to_stop_and_says_what_is_kept_a_second_stops_at_once(caplog):
    import os

    from transferkit.training.checkpoint import StopFlag, stop_on_signals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with caplog.at_level("WARNING", logger="transferkit"), stop_on_signals(StopFlag(), "writing nothing") as flag:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert flag.requested == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
    assert "SIGINT received: stopping after this batch and writing nothing" in caplog.text
    assert "last completed epoch" not in caplog.text
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # put back


def test_a_stop_after_the_run_was_published_says_the_run_is_whole(tmp_path):
    """A signal while the finished run is logged to MLflow (after it was written and its
    in-progress folder removed) said "nothing was kept"."""
    from transferkit.errors import TrainingInterrupted
    from transferkit.training.checkpoint import WorkFolder, interruption

    output = tmp_path / "run"
    work = WorkFolder.create(output, {"run_id": "x"}, "", force=False)
    output.mkdir()  # published
    work.remove()
    work.release()
    stopped = interruption(TrainingInterrupted("interrupted"), work, output)
    assert str(stopped) == (f"interrupted after {output} was written whole; only what followed it (logging the run "
                            "to MLflow) was cut short")
