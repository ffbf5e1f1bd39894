"""The run folder's files: written with the one atomic-write helper, the folder flushed
before it is published."""

from __future__ import annotations

import csv
import json

import pytest

import transferkit.errors
import transferkit.files
import transferkit.runs as runs


def test_run_files_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    runs.write_labels(tmp_path, ("cat", "dog"), 32, "vgg16", "sigmoid")
    runs.write_json(tmp_path / "metrics.json", {"final": {"val_loss": float("nan")}})
    runs.write_history(tmp_path, [{"epoch": 1, "stage": "head", "loss": 0.5}])
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir()}
    assert json.loads(before["labels.json"])["class_names"] == ["cat", "dog"]
    with open(tmp_path / "history.csv", newline="", encoding="utf-8") as handle:
        assert list(csv.DictReader(handle))[0]["loss"] == "0.5"

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(transferkit.files.os, "replace", crash)
    for write in (
        lambda: runs.write_labels(tmp_path, ("a", "b", "c"), 64, "resnet50", "softmax"),
        lambda: runs.write_json(tmp_path / "metrics.json", {"other": 1}),
        lambda: runs.write_history(tmp_path, []),
    ):
        with pytest.raises(OSError):
            write()
    # the old files are intact and no temporary file is left beside them
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir()} == before


def test_the_run_folder_is_flushed_before_it_is_renamed_into_place(tmp_path, monkeypatch):
    flushed, renamed = [], []
    monkeypatch.setattr(transferkit.files, "fsync_file", lambda path: flushed.append(path.name))
    real_replace = runs.os.replace

    def replace(source, destination):
        renamed.append((list(flushed), destination))
        real_replace(source, destination)

    monkeypatch.setattr(runs.os, "replace", replace)

    def contents(folder):
        (folder / "model.keras").write_bytes(b"written by a writer that does not flush")
        (folder / "sub").mkdir()
        (folder / "sub" / "deep.txt").write_text("x")

    output = runs.save_run(tmp_path / "run", contents)
    (files_flushed, destination), = renamed
    assert destination == output and sorted(files_flushed) == ["deep.txt", "model.keras"]


def test_one_check_of_where_a_run_may_be_written():
    assert runs.require_writable_place is transferkit.files.require_writable_place
    assert runs.require_apart is transferkit.files.require_apart


def test_a_new_run_inside_another_run_folder_is_refused(tmp_path):
    """Replacing the outer run (--force) would delete the inner one with it."""
    outer = tmp_path / "runs" / "demo"
    outer.mkdir(parents=True)
    runs.write_labels(outer, ("cat", "dog"), 32, "vgg16", "sigmoid")
    with pytest.raises(transferkit.errors.RunError, match=r"would lie inside the run .*demo; choose another -o"):
        runs.check_writable(outer / "deeper" / "sub", force=False, new_run=True)
    runs.check_writable(tmp_path / "runs" / "beside", force=False, new_run=True)  # beside it: fine


def test_a_place_whose_permissions_pass_but_refuses_a_folder_is_told_before_any_work(tmp_path):
    """Root passes every permission check; /proc refuses a new folder all the same."""
    import os

    if not os.path.isdir("/proc/self") or not os.access("/proc", os.W_OK):
        pytest.skip("needs /proc with write permission (root on Linux)")
    with pytest.raises(transferkit.errors.RunError, match=r"^cannot write into /proc \(.*\); choose another -o$"):
        runs.check_writable(transferkit.files.Path("/proc/run"), force=False, new_run=True)
    runs.check_writable(tmp_path / "run", force=False, new_run=True)
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing


def test_finetune_refusing_a_finished_run_removes_the_in_progress_folder_its_killed_writer_left(
        tmp_path, shapes_dir, caplog):
    """A process killed between publishing RUN and removing RUN.partial: the next plain
    finetune at RUN refuses it (it exists) and removes RUN.partial, saying so."""
    from typer.testing import CliRunner

    from transferkit.cli import app
    from transferkit.locks import JOB_FILE, work_dir_for

    output = tmp_path / "run"
    output.mkdir()
    runs.write_labels(output, ("cat", "dog"), 32, "vgg16", "sigmoid")
    labels = json.loads((output / "labels.json").read_text())
    (output / "labels.json").write_text(json.dumps({**labels, "run_id": "finished-run"}))
    partial = work_dir_for(output)
    partial.mkdir()
    (partial / JOB_FILE).write_text(json.dumps({"run_id": "finished-run"}))
    with caplog.at_level("WARNING", logger="transferkit"):
        result = CliRunner().invoke(app, ["finetune", str(shapes_dir), "--weights", "none", "-o", str(output)])
    assert result.exit_code == 1 and "exists already; pass --force" in result.output
    assert not partial.exists() and (output / "labels.json").is_file()
    assert f"{output} is finished; removing its in-progress folder {partial}" in caplog.text


def test_a_run_that_is_not_there_says_so_and_where_an_interrupted_one_waits_to_be_resumed(tmp_path):
    with pytest.raises(transferkit.errors.RunError) as missing:
        runs.load_run(tmp_path / "k9")
    assert str(missing.value) == f"{tmp_path / 'k9'} does not exist; pass a run folder made by 'transferkit finetune'"
    (tmp_path / "k9.partial").mkdir()  # a finetune -o k9 stopped by Ctrl-C
    with pytest.raises(transferkit.errors.RunError) as interrupted:
        runs.load_run(tmp_path / "k9")
    assert str(interrupted.value) == (
        f"{tmp_path / 'k9'} does not exist: its finetune was interrupted ({tmp_path / 'k9.partial'} holds its "
        f"checkpoints); finish it with transferkit finetune --resume {tmp_path / 'k9'}")


def test_a_default_name_taken_in_the_same_second_gets_a_number(tmp_path, monkeypatch):
    """Two commands started in the same second (evaluations of one run, runs of one folder):
    the second was refused as writing into the first's folder, a name the user never chose."""
    import datetime

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 12, 8, 3, 35, 8)

    monkeypatch.setattr(datetime, "datetime", Frozen)
    first = runs.default_run_dir(tmp_path / "flowers", tmp_path / "runs")
    assert first == tmp_path / "runs" / "flowers-20261208-033508"
    (tmp_path / "runs" / "flowers-20261208-033508.partial").mkdir(parents=True)  # the first, still training
    assert runs.default_run_dir(tmp_path / "flowers", tmp_path / "runs").name == "flowers-20261208-033508-2"
    (tmp_path / "runs" / "flowers-20261208-033508-2").mkdir()
    assert runs.default_run_dir(tmp_path / "flowers", tmp_path / "runs").name == "flowers-20261208-033508-3"
