"""Data-parallel training (``--strategy data-parallel``): two real processes on loopback, Keras
on JAX with TensorFlow not importable, joined through Keras's KERAS_DISTRIBUTION_* variables.
Process 0 is killed (SIGKILL) right after its first epoch's checkpoint, and process 1 stops by
itself (in one line, or ended by JAX, whose coordinator process 0 was); both started again
with ``--resume`` finish the run: one run folder and nothing beside it, which loads and
predicts under TensorFlow here as process 0 predicted under JAX. Plus each process's share of
the images, and the one-line errors when data-parallel cannot start.
"""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import transferkit
from tests.conftest import ROOT, UNOPTIMIZED_XLA_FLAGS
from transferkit.data.batches import ImageBatches, process_share
from transferkit.data.prepare import prepare_data, prepare_share
from transferkit.errors import DataError, StrategyError
from transferkit.recipe import load_recipe
from transferkit.strategies import KERAS_DISTRIBUTION_VARIABLES, SLURM_VARIABLES, check_data_parallel
from transferkit.training.data_parallel import PartnerWatch

# Two head epochs (an epoch to resume after), no fine stage: the smallest run with a resume.
FLAGS = ["--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--set", "head.units=[16]", "--head-epochs", "2", "--fine-epochs", "0"]


JAX_ENV = {"KERAS_BACKEND": "jax", "XLA_FLAGS": UNOPTIMIZED_XLA_FLAGS}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# ``python -m transferkit`` as on a machine without TensorFlow (tests/no_tensorflow.py):
# data-parallel needs none.
WITHOUT_TENSORFLOW = "import tests.no_tensorflow; from transferkit.cli import main; main()"


def start(process: int, port: int, *args, fault: str | None = None) -> subprocess.Popen:
    """One of two ``transferkit finetune`` processes on loopback, Keras on JAX, TensorFlow
    not importable."""
    env = {**os.environ, **JAX_ENV, "KERAS_DISTRIBUTION_JOB_ADDRESSES": f"127.0.0.1:{port}",
           "KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": str(process)}
    env.pop("TRANSFERKIT_FAULT", None)
    if fault is not None:
        env["TRANSFERKIT_FAULT"] = fault
    return subprocess.Popen([sys.executable, "-c", WITHOUT_TENSORFLOW, "finetune", *map(str, args)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_processes_killed_and_resumed_write_one_run_that_predicts_under_tensorflow(shapes_dir, tmp_path):
    parent = tmp_path / "runs"
    run = parent / "run"
    port = free_port()
    # Process 0 kills itself once the first epoch's checkpoint is on disk; process 1, waiting
    # for it in the next step, sees it gone and stops by itself, with no traceback.
    first = [start(0, port, shapes_dir, *FLAGS, "--strategy", "data-parallel", "-o", run, fault="run.epoch_saved"),
             start(1, port, shapes_dir, *FLAGS, "--strategy", "data-parallel", "-o", run)]
    try:
        outputs = [process.communicate(timeout=400)[0] for process in first]
    finally:
        for process in first:
            if process.poll() is None:
                process.kill()
                process.communicate()
    assert first[0].returncode == -signal.SIGKILL, outputs[0]
    assert "Traceback" not in outputs[1], outputs[1]
    if first[1].returncode == -signal.SIGABRT:
        # Process 0 is JAX's coordinator: JAX itself may end the others first, in its words.
        assert "another task died" in outputs[1], outputs[1]
    else:
        assert first[1].returncode == 1, outputs[1]
        [line] = [line for line in outputs[1].splitlines() if "training ended" in line]
        assert line.startswith("error: process 0 of 2 stopped before its training ended") and f"--resume {run}," in line
    state = json.loads((parent / "run.partial" / "state.json").read_text())
    assert state["epochs_done"] == 1 and not run.exists()

    port = free_port()
    second = [start(process, port, "--resume", run) for process in (0, 1)]
    outputs = [process.communicate(timeout=400)[0] for process in second]
    for process, output in zip(second, outputs, strict=True):
        assert process.returncode == 0, output
        assert "Traceback" not in output, output
    assert "resuming" in outputs[0] and "data-parallel over 2 device(s) in 2 processes" in outputs[0]
    assert sorted(os.listdir(parent)) == ["run"]  # RUN.partial gone, nothing else written

    labels = json.loads((run / "labels.json").read_text())
    assert labels["backend"] == "jax"
    assert labels["strategy"]["name"] == "data-parallel" and labels["strategy"]["processes"] == 2
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["epochs"] == 2
    # Under TensorFlow here, the validation images fall in the confusion matrix that process 0
    # computed under JAX, image for image.
    with open(run / "split.csv", newline="") as table:
        validation = {row["file"] for row in csv.DictReader(table) if row["subset"] == "validation"}
    loaded = transferkit.load_run(run)
    result = transferkit.predict_folder(loaded, shapes_dir, engine="keras", precision="float32")
    names = list(labels["class_names"])
    confusion = np.zeros((len(names), len(names)), dtype=int)
    for row in result.rows:
        relative = os.path.relpath(row.file, shapes_dir).replace(os.sep, "/")
        if relative in validation:
            confusion[names.index(relative.split("/")[0]), names.index(row.label)] += 1
    assert confusion.sum() == len(validation) > 0
    assert confusion.tolist() == metrics["confusion_matrix"]


def test_a_process_waiting_for_partners_that_never_come_ends_at_once_on_sigterm(shapes_dir, tmp_path):
    """While it waits inside JAX's rendezvous (C code), a Python signal handler would only
    run when the wait gives up, minutes later."""
    port = free_port()
    alone = start(0, port, shapes_dir, *FLAGS, "--strategy", "data-parallel", "-o", tmp_path / "run")
    try:
        deadline = time.monotonic() + 120
        while True:  # process 0 serves the rendezvous on the port: it is waiting there now
            assert alone.poll() is None, alone.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "process 0 never began its rendezvous"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        time.sleep(1)
        alone.send_signal(signal.SIGTERM)
        alone.communicate(timeout=20)
    finally:
        if alone.poll() is None:
            alone.kill()
            alone.communicate()
    assert alone.returncode in (-signal.SIGTERM, 130)
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


# --- each process's share ---------------------------------------------------------------------


def test_process_shares_cover_the_images_in_equal_steps():
    images = np.arange(11, dtype=np.uint8).reshape(11, 1, 1, 1).repeat(3, axis=3)
    batches = ImageBatches(images, np.eye(11, dtype="float32"), 4, shuffle=True, seed=3)
    shares = [process_share(batches, process, 2) for process in (0, 1)]
    seen = [set(share.images[:, 0, 0, 0].tolist()) for share in shares]
    assert seen[0].isdisjoint(seen[1]) and seen[0] | seen[1] == set(range(11))
    assert [share.count for share in shares] == [6, 6] and [share.batch_size for share in shares] == [2, 2]
    assert len(shares[0]) == len(shares[1]) == 3
    with pytest.raises(StrategyError, match="--batch-size 4 does not split evenly over 3 processes"):
        process_share(batches, 0, 3)


# --- what keeps it from starting: one line each ---------------------------------------------


def test_data_parallel_needs_the_jax_backend_and_the_processes_to_join(monkeypatch):
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    with pytest.raises(StrategyError, match="runs on Keras's JAX backend .* KERAS_BACKEND=jax"):
        check_data_parallel(environ={name: "1" for name in KERAS_DISTRIBUTION_VARIABLES})
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    with pytest.raises(StrategyError, match="KERAS_DISTRIBUTION_JOB_ADDRESSES.*srun"):
        check_data_parallel(environ={})
    with pytest.raises(StrategyError, match="but not KERAS_DISTRIBUTION_JOB_ADDRESSES"):
        check_data_parallel(environ={"KERAS_DISTRIBUTION_NUM_PROCESSES": "2", "KERAS_DISTRIBUTION_PROCESS_ID": "0"})
    with pytest.raises(StrategyError, match="drop --devices"):
        check_data_parallel(2, environ={name: "1" for name in KERAS_DISTRIBUTION_VARIABLES})
    check_data_parallel(environ={name: "1" for name in SLURM_VARIABLES})  # an srun step joins by itself


@pytest.mark.parametrize("command", [["tune", "--trials", "1"], ["lr-find"], ["doctor", "--model"]])
def test_commands_of_one_process_refuse_data_parallel_in_one_line_and_write_nothing(command, shapes_dir, tmp_path,
                                                                                    monkeypatch):
    from typer.testing import CliRunner

    from transferkit.cli import app

    monkeypatch.chdir(tmp_path)
    name, *flags = command
    result = CliRunner().invoke(app, [name, str(shapes_dir), *flags, "--set", "strategy=data-parallel"])
    assert result.exit_code == 2, result.output  # a setting the command cannot use, as a bad strategy is
    [line] = [line for line in result.output.splitlines() if line.strip()]
    assert line.startswith("error: data-parallel (--strategy data-parallel) is for finetune") and name in line
    assert "trains in one process: run it with --strategy none" in line
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


# --- a partner lost while training ----------------------------------------------------------

PARTNER = """
import sys, time
from pathlib import Path
from transferkit.training.data_parallel import finish, register
register(Path(sys.argv[1]), int(sys.argv[2]), "attempt-2")
print("registered", flush=True)
if sys.stdin.readline().strip() == "finish":
    finish(True)
else:
    time.sleep(120)
"""


def test_a_partner_that_stops_before_its_training_ended_is_seen_and_one_that_finished_is_not(tmp_path):
    """What every data-parallel process watches while training (the whole chain, one line and
    the end of the survivor, is tested above): process 1 is killed with SIGKILL and is
    reported; process 2 finishes and is not; files an earlier, killed attempt left are not
    taken for this attempt's."""
    folder = tmp_path / "processes"
    folder.mkdir()
    (folder / "process-1.lock").write_text("attempt-1\n4242\n")  # unlocked: its process is gone
    (folder / "process-2.done").write_text("attempt-1\n4243\n")
    lost = []
    with PartnerWatch(folder, 0, 3, "attempt-2", lost.append, poll=0.05):
        time.sleep(0.3)  # the old files are looked at, and not reported
        assert lost == []
        partners = {index: subprocess.Popen([sys.executable, "-c", PARTNER, str(folder), str(index)], text=True,
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
                    for index in (1, 2)}
        try:
            for partner in partners.values():
                assert partner.stdout.readline().strip() == "registered"
            partners[2].communicate("finish\n", timeout=60)
            assert partners[2].returncode == 0 and (folder / "process-2.done").is_file()
            time.sleep(0.3)
            assert lost == []
            partners[1].kill()
            partners[1].wait()
            deadline = time.monotonic() + 10
            while not lost and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            for partner in partners.values():
                partner.kill()
                partner.communicate()
    assert lost == [1]


def test_a_process_decodes_only_its_share_of_process_0s_split(shapes_dir):
    recipe = load_recipe(None, {"image_size": 32, "data.val_split": 0.3})
    whole = prepare_data(shapes_dir, recipe, verbose=0)
    for process in (0, 1):
        share = prepare_share(shapes_dir, recipe, whole.split_csv(), process, 2)
        assert share.split == whole.split and share.fingerprint == whole.fingerprint
        for mine, full in ((share.train_images, whole.train_images), (share.val_images, whole.val_images)):
            assert mine.shape == full.shape
            np.testing.assert_array_equal(mine[process::2], full[process::2])
            assert not mine[1 - process::2].any()  # never decoded
        np.testing.assert_array_equal(share.train_labels, whole.train_labels)
        np.testing.assert_array_equal(share.val_labels, whole.val_labels)
    with pytest.raises(DataError, match="class nothing"):
        prepare_share(shapes_dir, recipe, "file,subset\nnothing/a.png,train\n", 0, 2)


# --- the head's BatchNorm starts alike in every process ---------------------------------------

CALIBRATION = """
import tests.no_tensorflow  # nothing here needs TensorFlow: spared its start-up (seconds per process)
import json, os
import jax, keras, numpy as np
from transferkit.data.batches import ImageBatches
from transferkit.model.classifier import build_classifier, calibrate_head_batchnorm
from transferkit.recipe import HeadConfig
from transferkit.strategies import Distribution
from transferkit.training.features import backbone_features
from transferkit.training.stages import head_calibration_features

# The two processes joined as data-parallel joins them (the whole set-up is tested above).
process = int(os.environ["PROCESS"])
jax.distributed.initialize(os.environ["ADDRESS"], 2, process)
distribution = Distribution("data-parallel", ("cpu:0",), "test", process=process, processes=2)
keras.utils.set_random_seed(0)
inputs = keras.Input((32, 32, 3))  # a two-convolution backbone: what is tested is the head's start
features = keras.layers.Conv2D(8, 3, strides=4, activation="relu")(keras.layers.Conv2D(4, 3, strides=2)(inputs))
model = build_classifier(keras.Model(inputs, features, name="backbone"), 3, HeadConfig(units=(16,)),
                         backbone_name="vgg16")
images = np.random.default_rng(0).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
decoded = np.zeros_like(images)  # what prepare_share decodes: this process's rows only
decoded[process :: 2] = images[process :: 2]
calibrate_head_batchnorm(model, head_calibration_features(model, ImageBatches(decoded, np.eye(3)[np.arange(10) % 3], 4),
                                                          distribution))
batchnorm = model.get_layer("head").get_layer("batchnorm_1")
mean = keras.ops.convert_to_numpy(batchnorm.moving_mean).tolist()
calibrate_head_batchnorm(model, backbone_features(model, images))  # every image, as one process reads them
print(json.dumps({"mean": mean, "whole": keras.ops.convert_to_numpy(batchnorm.moving_mean).tolist()}))
"""


def test_every_process_starts_the_heads_batchnorm_from_every_processs_images():
    """A data-parallel run whose best epoch was not its last failed as it restored it: each
    process had set the head's BatchNorm statistics from the first images of its own
    decoded rows (the others' rows are never decoded there), the step kept them apart, and
    JAX refused to restore weights that differed between the processes."""
    port = free_port()
    env = {**os.environ, **JAX_ENV, "ADDRESS": f"127.0.0.1:{port}"}
    processes = [subprocess.Popen([sys.executable, "-c", CALIBRATION], env={**env, "PROCESS": str(index)}, cwd=ROOT,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for index in (0, 1)]
    outputs = [process.communicate(timeout=300) for process in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0]["mean"] == results[1]["mean"]
    np.testing.assert_allclose(results[0]["mean"], results[0]["whole"], rtol=1e-4, atol=1e-6)
