"""Real finetunes in real processes: a live run is never clobbered, a killed one resumes,
and a write that the system refuses becomes one error line.

Each subprocess pays TensorFlow's import, so there are two: one run that is refused a
second writer, then killed and resumed; one run under a file-size limit.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import transferkit
from tests import forked
from tests.conftest import SUBPROCESS_PATH, TINY
from transferkit.errors import RunError
from transferkit.locks import OWNER_FILE, work_dir_for

# The tiny recipe on the command line: VGG16 without weights at 32 px, one small dense layer.
# conftest.TINY as flags (float32 on every CPU, as TINY).
TINY_FLAGS = ["--backbone", "tinyvgg", "--weights", "none", "--set", "precision=\"float32\"", "--image-size", "32",
              "--batch-size", "8", "--set", "head.units=[16]"]


def transferkit_process(*args, **options) -> subprocess.Popen:
    return forked.Popen([sys.executable, "-m", "transferkit", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": SUBPROCESS_PATH},
                            **options)


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before {path.name} appeared: {process.communicate()[1][-3000:]}")
        assert time.monotonic() < deadline, f"no {path} after {timeout} s"
        time.sleep(0.05)


def test_a_live_run_refuses_a_second_writer_and_a_killed_one_resumes_to_the_end(shapes_dir, tmp_path, caplog):
    output = tmp_path / "X"
    live = transferkit_process("finetune", shapes_dir, "-o", output, *TINY_FLAGS, "--head-epochs", 3,
                               "--fine-epochs", 1, "--seed", 7)
    try:
        partial = work_dir_for(output)
        wait_for(partial / OWNER_FILE, live)
        # A second finetune to X, with or without --force, is refused before it reads an image,
        # naming the live run; nothing of the live run changes.
        for force in (False, True):
            with pytest.raises(RunError) as refused:
                transferkit.finetune(shapes_dir, None, TINY, output=output, force=force, verbose=0)
            message = str(refused.value)
            assert f"X is being written by pid {live.pid} on {socket.gethostname()} since " in message
            assert "finetune" in message and "\n" not in message
        # --resume of the live run too.
        with pytest.raises(RunError, match=f"pid {live.pid}"):
            transferkit.resume_finetune(output, verbose=0)
        assert json.loads((partial / OWNER_FILE).read_text())["pid"] == live.pid and not output.exists()
        # kill -9 once an epoch is checkpointed: the next command finds a dead owner
        wait_for(partial / "state.json", live)
        live.send_signal(signal.SIGKILL)
        live.wait(timeout=60)
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
        live.stdout.close()
        live.stderr.close()
    assert not output.exists()
    with pytest.raises(RunError, match=f"an interrupted run of {output} .*left by pid {live.pid}.*which is gone"):
        transferkit.finetune(shapes_dir, None, TINY, output=output, verbose=0)
    with caplog.at_level("WARNING", logger="transferkit"):
        run = transferkit.resume_finetune(output, verbose=0)
    assert f"pid {live.pid} on {socket.gethostname()}" in caplog.text and "resuming" in caplog.text
    assert run.path == output and not partial.exists()
    assert [int(row["epoch"]) for row in transferkit.load_run(output, with_model=False).history] == [1, 2, 3, 4]


def limit_file_size(limit: int):
    return functools.partial(resource.setrlimit, resource.RLIMIT_FSIZE, (limit, limit))


def test_a_file_size_limit_smaller_than_the_model_is_one_error_line_and_leaves_nothing(shapes_dir, tmp_path):
    # Python ignores SIGXFSZ: a write past the limit fails with EFBIG instead of killing it.
    output = tmp_path / "runs" / "X"
    process = transferkit_process("finetune", shapes_dir, "-o", output, *TINY_FLAGS, "--head-epochs", 1,
                                  "--fine-epochs", 0, preexec_fn=limit_file_size(100 * 2**10))  # model: ~150 KB
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 1, stderr[-3000:]
    assert "Traceback" not in stderr + stdout
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error:"), stderr[-3000:]
    assert str(work_dir_for(output)) in errors[0] and "file size limit" in errors[0]
    assert not output.exists() and not work_dir_for(output).exists()
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
