"""A real SIGINT to a real training process, then --resume, against an uninterrupted run."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import transferkit
from transferkit.errors import RunError
from transferkit.workflow import resume_finetune

FLAGS = ["--weights", "none", "--image-size", "32", "--batch-size", "2", "--head-epochs", "3",
         "--fine-epochs", "2", "--set", "head.units=[16]", "--quiet"]


def cli(*args):
    return [sys.executable, "-m", "transferkit", "finetune", *map(str, args)]


def epochs_saved(partial):
    try:
        return json.loads((partial / "state.json").read_text())["global_epoch"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(shapes_dir, tmp_path, signum):
    reference = tmp_path / "reference"
    done = subprocess.run(cli(shapes_dir, *FLAGS, "-o", reference), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    output = tmp_path / "run"
    partial = tmp_path / "run.partial"
    process = subprocess.Popen(cli(shapes_dir, *FLAGS, "-o", output), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while epochs_saved(partial) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process.poll() is None, "training finished before it could be interrupted"
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not output.exists()  # nothing that looks like a finished run
    assert not (partial / "model.keras").exists() and not (partial / "labels.json").exists()
    assert 2 <= epochs_saved(partial) < 5

    resumed = subprocess.run(cli("--resume", output, "--quiet"), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not partial.exists()
    expected = transferkit.load_run(reference).model.get_weights()
    got = transferkit.load_run(output).model.get_weights()
    for a, b in zip(expected, got):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert (output / "history.csv").read_text() == (reference / "history.csv").read_text()


def test_resume_without_an_interrupted_run_is_an_error(tmp_path):
    with pytest.raises(RunError, match="nothing to resume"):
        resume_finetune(tmp_path / "never-started")


def test_new_run_refuses_to_clobber_an_interrupted_one(shapes_dir, tmp_path, tiny):
    (tmp_path / "run.partial").mkdir()
    (tmp_path / "run.partial" / "job.json").write_text("{}")
    with pytest.raises(RunError, match="--resume"):
        transferkit.finetune(shapes_dir, None, tiny, output=tmp_path / "run", verbose=0)
