"""Owner locks and leftovers, with real processes holding real OS locks (no Keras)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import SUBPROCESS_PATH
from transferkit import files, locks
from transferkit.errors import RunError


def holder(folder: Path, kind: str = "run", then: str = "time.sleep(120)") -> subprocess.Popen:
    """A process that takes ``folder``'s owner lock, says so on stdout, then runs ``then``."""
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        from transferkit.locks import FolderLock
        lock = FolderLock.acquire({str(folder)!r}, {kind!r})
        print("held", flush=True)
        {then}
    """)
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": SUBPROCESS_PATH})
    assert process.stdout.readline().strip() == "held"
    return process


def test_a_live_owner_is_named_to_a_second_writer_and_its_folder_is_untouched(tmp_path):
    folder = locks.work_dir_for(tmp_path / "X")
    process = holder(folder)
    try:
        with pytest.raises(RunError) as refused:
            locks.FolderLock.acquire(folder, "run")
        message = str(refused.value)
        assert f"pid {process.pid} on {socket.gethostname()} since " in message
        assert "is being written by" in message and "-c" in message and f"kill {process.pid}" in message
        assert "\n" not in message
        with pytest.raises(RunError, match=f"pid {process.pid}"):
            locks.require_not_live(tmp_path / "X")
        assert json.loads((folder / locks.OWNER_FILE).read_text())["pid"] == process.pid
    finally:
        process.kill()
        process.wait()


def test_the_refusal_names_the_folder_as_the_user_gave_it(shapes_dir, tmp_path, monkeypatch):
    """finetune -o runs/k9 --force (or --resume runs/k9) while another process writes
    runs/k9: the line names runs/k9, not k9."""
    from typer.testing import CliRunner

    from transferkit.cli import app

    monkeypatch.chdir(tmp_path)
    process = holder(locks.work_dir_for(Path("runs/k9")))
    try:
        for arguments in (["finetune", str(shapes_dir), "-o", "runs/k9", "--force", "--weights", "none"],
                          ["finetune", "--resume", "runs/k9"]):
            result = CliRunner().invoke(app, arguments)
            assert result.exit_code == 1, result.output
            assert result.output.startswith(f"error: runs/k9 is being written by pid {process.pid} on "), \
                result.output
            assert "which holds the lock in runs/k9.partial;" in result.output
    finally:
        process.kill()
        process.wait()


def test_a_killed_owner_leaves_a_record_that_the_next_owner_is_told_of(tmp_path):
    folder = locks.work_dir_for(tmp_path / "X")
    process = holder(folder, then="os.kill(os.getpid(), signal.SIGKILL)")
    process.wait()
    assert process.returncode == -signal.SIGKILL
    locks.require_not_live(tmp_path / "X")  # the OS released it
    with locks.FolderLock.acquire(folder, "run") as lock:
        assert lock.previous["pid"] == process.pid
        assert f"pid {process.pid}" in locks.tell_previous(lock.previous)
        assert locks.tell_previous(lock.previous).endswith("which is gone")
        assert json.loads((folder / locks.OWNER_FILE).read_text())["pid"] == os.getpid()
    # a clean release leaves no record: the next owner is told of nobody
    with locks.FolderLock.acquire(folder, "run") as lock:
        assert lock.previous is None


def test_a_second_lock_in_the_same_process_is_refused_too(tmp_path):
    with locks.FolderLock.acquire(tmp_path / "X.partial", "run"):
        with pytest.raises(RunError, match="this process"):
            locks.FolderLock.acquire(tmp_path / "X.partial", "run")
        locks.require_not_live(tmp_path / "X")  # its own writer's checks pass


def test_leftovers_of_killed_processes_are_removed_by_name_and_live_ones_kept(tmp_path, caplog):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = [tmp_path / f".model.keras.partial-{dead.pid}.keras", tmp_path / f".run.partial-{dead.pid}",
            tmp_path / f".run.replaced-{dead.pid}"]
    gone[0].write_bytes(b"half")
    for folder in gone[1:]:
        folder.mkdir()
        (folder / "labels.json").write_text("{")
    kept = [tmp_path / f".run.partial-{os.getpid()}", tmp_path / f".other.partial-{os.getppid()}.json",
            tmp_path / "run.partial", tmp_path / "notes.txt", tmp_path / "run"]  # run: published (not put back)
    for path in kept:
        path.write_text("x")
    with caplog.at_level("WARNING", logger="transferkit"):
        assert sorted(files.remove_leftovers(tmp_path)) == sorted(gone)
    assert all(path.exists() for path in kept) and not any(path.exists() for path in gone)
    assert all(str(path) in caplog.text for path in gone) and f"pid {dead.pid}" in caplog.text


def test_publishing_checks_under_the_lock_and_publishes_only_a_complete_folder(tmp_path):
    target = tmp_path / "eval"
    with pytest.raises(RuntimeError):
        with locks.publishing(target, "evaluation") as staging:
            (staging / "metrics.json").write_text("{}")
            raise RuntimeError("the writer failed")
    assert not target.exists() and not locks.work_dir_for(target).exists()
    with locks.publishing(target, "evaluation") as staging:
        (staging / "metrics.json").write_text("{}")
        assert locks.held_by_another(locks.work_dir_for(target)) is None  # its own
    assert (target / "metrics.json").is_file() and not locks.work_dir_for(target).exists()

    def refuse():
        raise RunError(f"{target} exists already")

    with pytest.raises(RunError, match="exists already"), locks.publishing(target, "evaluation", check=refuse):
        pytest.fail("the check runs before the block")


def test_an_interrupted_run_is_never_cleared_by_an_export_or_evaluation_aimed_at_it(tmp_path):
    folder = locks.work_dir_for(tmp_path / "X")
    folder.mkdir()
    (folder / "job.json").write_text("{}")
    with pytest.raises(RunError, match="interrupted finetune"), locks.publishing(tmp_path / "X", "export"):
        pass
    assert (folder / "job.json").is_file()


def test_an_unfinished_export_of_a_killed_process_is_removed_with_a_notice(tmp_path, caplog):
    folder = locks.work_dir_for(tmp_path / "onnx")
    process = holder(folder, "export", then=f"os.mkdir({str(folder / 'staging')!r}); os.kill(os.getpid(), 9)")
    process.wait()
    with caplog.at_level("WARNING", logger="transferkit"), locks.publishing(tmp_path / "onnx", "export") as staging:
        (staging / "model.onnx").write_bytes(b"x")
    assert f"pid {process.pid}" in caplog.text and "unfinished export" in caplog.text
    assert sorted(path.name for path in (tmp_path / "onnx").iterdir()) == ["model.onnx"]


def test_a_lock_folder_that_cannot_be_written_is_one_error_and_leaves_no_folder(tmp_path):
    """A full disk (here: a file size limit, EFBIG, as on a full disk ENOSPC) stops the owner
    record: the command says so, and the folder it had just made is gone again."""
    script = textwrap.dedent(f"""
        import resource, sys
        from transferkit.errors import RunError
        from transferkit.locks import FolderLock
        resource.setrlimit(resource.RLIMIT_FSIZE, (8, 8))  # the lock file is empty; the record is not
        try:
            FolderLock.acquire({str(tmp_path / "eval.partial")!r}, "evaluation")
        except RunError as error:
            print(error)
            sys.exit(1)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": SUBPROCESS_PATH})
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith(f"cannot write {tmp_path / 'eval.partial' / 'owner.json'}: File too large")
    assert list(tmp_path.iterdir()) == []


def test_what_a_run_leaves_in_its_in_progress_folder_is_never_taken_for_someone_elses(tmp_path):
    from transferkit.locks import JOB_FILE, OWNER_FILE, PROCESSES_FOLDER, not_left_by_transferkit

    folder = tmp_path / "run.partial"
    assert not_left_by_transferkit(folder) == []  # nothing there
    # what a data-parallel run that removed its folder while its process locks were open leaves
    # (on NFS, a deleted open file lives on as .nfsXXXX)
    (folder / PROCESSES_FOLDER).mkdir(parents=True)
    (folder / ".nfs0000000001").write_text("")
    (folder / "lock").write_text("")
    assert not_left_by_transferkit(folder) == []
    (folder / "model.keras").write_text("a finished run renamed here")
    (folder / "labels.json").write_text("{}")
    assert not_left_by_transferkit(folder) == ["labels.json", "model.keras"]
    for left in (JOB_FILE, OWNER_FILE):  # an interrupted run, or a process that died holding it
        (folder / left).write_text("{}")
        assert not_left_by_transferkit(folder) == []
        (folder / left).unlink()
