"""Several tune workers on one study: --study-trials caps the study exactly, a killed worker's
trial is failed by heartbeat and retried, and a failure of the set-up stops the search at its
first trial. Worker processes run against a real PostgreSQL server (tests/tuning/conftest.py);
the search loop alone runs around a stub training on SQLite."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

optuna = pytest.importorskip("optuna")

from typer.testing import CliRunner  # noqa: E402

from tests import forked  # noqa: E402
from tests.conftest import SUBPROCESS_PATH, TINY  # noqa: E402
from transferkit.cli import app  # noqa: E402
from transferkit.errors import DataError, TransferkitError, WeightsError  # noqa: E402
from transferkit.tuning import workers  # noqa: E402
from transferkit.tuning.search import open_storage, tune  # noqa: E402
from transferkit.tuning.workers import BEAT, SharedStudy  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
# A trial in a few seconds: 32 px, no weights, a 16-unit head, one epoch of one stage, and
# only the head's learning rate searched.
SPACE = '[tune]\n"stages.0.learning_rate" = {low = 1e-4, high = 1e-1, log = true}\n'
WORKER = {"backbone": "tinyvgg", "weights": "none", "image_size": 32, "batch_size": 8, "head.units": [16],
          "stages.0.epochs": 1, "stages.1:.epochs": 0}
WORKER_FLAGS = ["--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "--batch-size", "8",
                "--set", "head.units=[16]", "--set", "stages.0.epochs=1", "--set", "stages.1:.epochs=0", "--quiet"]
STUB_SPACE = '[tune]\n"stages.0.learning_rate" = {low = 0.01, high = 0.5}\n'


def write_space(folder: Path, text: str = SPACE) -> Path:
    path = folder / "recipe.toml"
    path.write_text(text, encoding="utf-8")
    return path


def worker(data: Path, url: str, study: str, output: Path, *flags: str) -> subprocess.Popen:
    """``transferkit tune`` in a process of its own, on the small space."""
    command = [sys.executable, "-m", "transferkit", "tune", str(data), "--storage", url, "--study", study,
               "-o", str(output), "-r", str(write_space(output.parent)), *WORKER_FLAGS, *flags]
    env = {**os.environ, "PYTHONPATH": SUBPROCESS_PATH}
    return forked.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def states(url: str, study: str) -> list[str]:
    return [trial.state.name for trial in optuna.load_study(study_name=study, storage=open_storage(url)).trials]


def read_trials(output: Path) -> list[dict]:
    with open(output / "trials.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture()
def quick_heartbeats(monkeypatch):
    """Heartbeats every second, a worker taken for dead after 2 s without one."""
    monkeypatch.setattr(workers, "HEARTBEAT_INTERVAL", 1)
    monkeypatch.setattr(workers, "GRACE_PERIOD", 2)
    monkeypatch.setattr(workers, "POLL", 0.2)


# --- worker processes on a real PostgreSQL server -----------------------------------------


def test_two_workers_with_study_trials_stop_at_exactly_that_many_finished_trials(postgres_url, shapes_dir,
                                                                                  tmp_path):
    # Each may run 10; together they stop when the study holds 4 finished trials.
    # One worker in a process of its own, the other in this one (one TensorFlow start-up less), at once.
    other = worker(shapes_dir, postgres_url, "capped", tmp_path / "out", "--trials", "10", "--study-trials", "4")
    here = CliRunner().invoke(app, other.args[3:])
    results = other.communicate(timeout=240)
    assert (other.returncode, here.exit_code) == (0, 0), (results, here.output)
    found = states(postgres_url, "capped")
    assert sum(state in ("COMPLETE", "PRUNED") for state in found) == 4, found
    assert not {"RUNNING", "WAITING"} & set(found), found
    assert len(read_trials(tmp_path / "out")) == len(found)


def test_a_killed_workers_trial_is_failed_and_retried_by_the_next_worker(postgres_url, shapes_dir, tmp_path,
                                                                          quick_heartbeats):
    url, name = postgres_url, "killed"
    process = worker(shapes_dir, url, name, tmp_path / "out", "--trials", "20")
    storage = open_storage(url)
    try:
        deadline = time.monotonic() + 120
        running = []
        while not running:  # a trial training: its parameters sampled, its heartbeat recorded
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no trial started in 120 s"
            time.sleep(0.2)
            try:
                study = optuna.load_study(study_name=name, storage=storage)
            except KeyError:  # not created yet
                continue
            running = [trial for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
                       if BEAT in trial.system_attrs and "recipe" in trial.user_attrs]
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.communicate()
    (killed,) = [trial for trial in study.trials if trial.state.name == "RUNNING"]
    time.sleep(workers.GRACE_PERIOD + 1)  # its last heartbeat is older than the grace period now
    # The next worker fails it before its first trial, and runs its parameters first.
    summary = tune(shapes_dir, write_space(tmp_path), WORKER, trials=1, storage=url, study=name,
                   output=tmp_path / "out", verbose=0)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert "RUNNING" not in [trial.state.name for trial in trials]
    assert trials[killed.number].state.name == "FAIL"
    # On the same machine the dead pid is seen at once; elsewhere the stale heartbeat tells it.
    (retry,) = [trial for trial in trials[killed.number + 1:] if trial.params == killed.params]
    assert retry.state.name == "COMPLETE"
    assert summary.new_trials == 1 and summary.counts.get("running") is None
    row = read_trials(tmp_path / "out")[killed.number]
    assert row["state"] == "fail" and row["fail_reason"].startswith(("its worker stopped sending heartbeats",
                                                                      f"its worker, pid {process.pid} on "))


def test_weights_that_cannot_be_loaded_stop_the_search_at_the_first_trial(postgres_url, shapes_dir, tmp_path):
    broken = tmp_path / "broken.h5"
    broken.write_bytes(b"not an HDF5 file")
    arguments = ["tune", str(shapes_dir), "--storage", postgres_url, "--study", "setup", "-o", str(tmp_path / "out"),
                 "--trials", "5", *WORKER_FLAGS[2:], "--weights", str(broken)]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: trial 0 failed: "), lines
    assert "no trial's parameters change that, so the search stops" in lines[0]
    assert states(postgres_url, "setup") == ["FAIL"]
    (row,) = read_trials(tmp_path / "out")
    assert row["state"] == "fail" and row["fail_reason"].startswith("WeightsError: ")


def test_a_storage_that_cannot_be_reached_is_one_line(tmp_path, binary_dir):
    from tests.tuning.conftest import free_port

    url = f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/nothing"  # nobody listens there
    result = CliRunner().invoke(app, ["tune", str(binary_dir), "--storage", url, "-o", str(tmp_path / "out")])
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: storage {url}: cannot be opened: "), lines


# --- the search loop around a stub training (SQLite) --------------------------------------


@pytest.fixture()
def stub_training(monkeypatch):
    """Training swapped for a stub scored by the head's learning rate; ``calls["raise"]``
    makes every call raise that error instead."""
    from transferkit import workflow

    calls = {"count": 0, "raise": None}

    def train_prepared(prepared, recipe, output=None, *, callbacks=(), **_):
        calls["count"] += 1
        if calls["raise"] is not None:
            raise calls["raise"]
        score = recipe.stages[0].learning_rate
        return SimpleNamespace(metrics={"final": {"val_accuracy": score, "val_loss": 1 - score}}, history=[{}])

    monkeypatch.setattr(workflow, "train_prepared", train_prepared)
    return calls


def stub_tune(data, tmp_path, **kwargs):
    return tune(data, write_space(tmp_path, STUB_SPACE), TINY, output=tmp_path / "out", study="stub", verbose=0,
                **kwargs)


def test_study_trials_caps_the_study_whatever_trials_says(stub_training, binary_dir, tmp_path):
    assert stub_tune(binary_dir, tmp_path, trials=10, study_trials=3).counts == {"complete": 3}
    again = stub_tune(binary_dir, tmp_path, trials=10, study_trials=3)
    assert again.new_trials == 0 and again.counts == {"complete": 3}
    # Without --trials, a worker with --study-trials runs until the study holds them.
    more = stub_tune(binary_dir, tmp_path, study_trials=5)
    assert more.new_trials == 2 and more.counts == {"complete": 5}


def test_of_two_workers_asking_at_once_for_the_last_place_the_later_gives_its_trial_back(tmp_path):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="race")
    shared = SharedStudy(study, storage, cap=2)
    study.tell(shared.ask(), 1.0)
    first, second = shared.ask(), shared.ask()  # both asked with 1 finished, 0 running
    assert not shared.over_cap(first) and shared.over_cap(second)
    study.tell(first, state=optuna.trial.TrialState.FAIL)  # the first failed: its place is free again
    assert not shared.over_cap(second)


def test_a_worker_waits_for_running_trials_that_may_fill_the_study(tmp_path, quick_heartbeats):
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="wait")
    other = SharedStudy(study, storage, cap=2)
    study.tell(other.ask(), 1.0)
    running = other.ask()
    shared = SharedStudy(study, storage, cap=2)
    with other.beating(running):
        # 1 finished + 1 running of 2: wait; the deadline ends the wait.
        assert not shared.room(deadline=time.monotonic() + 0.5)
    study.tell(running, state=optuna.trial.TrialState.FAIL)
    assert shared.room()  # it failed: a place is free
    assert SharedStudy(study, storage, cap=1).room() is False  # 1 finished of 1


def test_a_worker_that_ends_fails_a_dead_workers_trial_and_queues_its_retry(stub_training, binary_dir, tmp_path,
                                                                           quick_heartbeats):
    url = f"sqlite:///{tmp_path / 'out' / 'study.db'}"
    stub_tune(binary_dir, tmp_path, trials=1)
    storage = open_storage(url)
    study = optuna.load_study(study_name="stub", storage=storage)
    dead = SharedStudy(study, storage)
    trial = dead.ask()
    trial.suggest_float("stages.0.learning_rate", 0.01, 0.5)
    with dead.beating(trial):
        pass  # it beat once and its worker "died": never told
    started = time.monotonic()
    summary = stub_tune(binary_dir, tmp_path, trials=1)  # at once: the trial is not stale yet when it asks
    # Its wait for the trial to go stale (3 s) and a stub tune (3 s alone): well under the
    # module's own 25 s, with room for a loaded worker.
    assert time.monotonic() - started < workers.GRACE_PERIOD + workers.HEARTBEAT_INTERVAL + 12
    found = optuna.load_study(study_name="stub", storage=storage).trials
    assert [t.state.name for t in found] == ["COMPLETE", "FAIL", "COMPLETE", "WAITING"] or \
        [t.state.name for t in found] == ["COMPLETE", "FAIL", "COMPLETE"], found
    assert found[trial.number].state.name == "FAIL" and summary.new_trials == 1
    (retry,) = [t for t in found if t.system_attrs.get("failed_trial") == trial.number]
    assert retry.params == trial.params


def test_a_worker_that_ends_does_not_wait_for_a_live_workers_trial(tmp_path, quick_heartbeats, monkeypatch):
    monkeypatch.setattr(workers, "GRACE_PERIOD", 10)
    storage = open_storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=storage, study_name="alive")
    other = SharedStudy(study, storage)
    running = other.ask()
    with other.beating(running):
        started = time.monotonic()
        SharedStudy(study, storage).settle()
        waited = time.monotonic() - started
    assert waited < 5  # it saw a new heartbeat (one a second), well before the grace period
    assert study.trials[running.number].state.name == "RUNNING"


@pytest.mark.parametrize("error", [WeightsError("weights file w.h5 cannot be read: truncated"),
                                   DataError("data folder images cannot be read (Permission denied)")])
def test_a_failure_of_the_set_up_stops_the_search_at_the_first_trial(error, stub_training, binary_dir, tmp_path):
    stub_training["raise"] = error
    with pytest.raises(TransferkitError, match=r"^trial 0 failed: .* so the search stops") as raised:
        stub_tune(binary_dir, tmp_path, trials=5)
    assert str(error) in str(raised.value) and stub_training["count"] == 1
    (row,) = read_trials(tmp_path / "out")
    assert row["state"] == "fail" and row["fail_reason"] == f"{type(error).__name__}: {error}"


def test_a_failure_of_a_trials_parameters_does_not_stop_the_search(stub_training, binary_dir, tmp_path):
    stub_training["raise"] = FloatingPointError("the final val_accuracy is nan")
    summary = stub_tune(binary_dir, tmp_path, trials=2)
    assert summary.counts == {"fail": 2} and stub_training["count"] == 2


def test_study_trials_on_the_command_line(stub_training, binary_dir, tmp_path):
    arguments = ["tune", str(binary_dir), "-r", str(write_space(tmp_path, STUB_SPACE)), "-o", str(tmp_path / "out"),
                 "--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "--batch-size", "8", "--quiet"]
    result = CliRunner().invoke(app, [*arguments, "--study-trials", "0"])
    assert result.exit_code == 2 and "--study-trials must be 1 or more, got 0" in result.output
    result = CliRunner().invoke(app, [*arguments, "--study-trials", "2"])  # no --trials: until the study holds 2
    assert result.exit_code == 0, result.output
    assert "2 trial(s) (2 complete), 2 new" in result.output and stub_training["count"] == 2
