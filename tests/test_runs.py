"""The run folder's files: written with the one atomic-write helper, the folder flushed
before it is published."""

from __future__ import annotations

import csv
import json

import pytest

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
