"""Distribution strategies: the choice (``auto`` and its reasons), the one-line errors of bad
requests, a mirrored run on two logical CPU devices (a fresh process: TensorFlow fixes its
devices when it starts) interrupted and resumed, and the multi-worker failure of Keras that
keeps ``multiworker`` off.

The fresh process runs the CLI twice in one TensorFlow start-up: a mirrored finetune that a
real SIGINT stops after its first epoch, then ``--resume``. Its result is compared with the
same recipe on one device in this process.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

import transferkit
from tests import forked
from transferkit.cli import app, main
from transferkit.errors import StrategyError
from transferkit.strategies import choose_strategy

# Small enough for seconds, two head epochs so that there is an epoch to resume after;
# dropout 0: each replica draws its own dropout masks, the one thing a mirrored run does
# not share with one device.
RECIPE = {"backbone": "tinyvgg", "weights": "none", "image_size": 32, "batch_size": 8, "head.units": [16],
          "head.dropout": 0.0, "stages.0.epochs": 2, "stages.1:.epochs": 0}
FLAGS = ["--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--set", "head.units=[16]", "--set", "head.dropout=0.0", "--head-epochs", "2", "--fine-epochs", "0"]


def finetune_cli(*args):
    return CliRunner().invoke(app, ["finetune", *map(str, args)])


def one_error_line(result, code=2):
    lines = result.output.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    return lines[0]


def console_error_line(capsys, monkeypatch, *args):
    """The one stderr line and exit code 2 of the console script (its parser errors too)."""
    monkeypatch.setattr(sys, "argv", ["transferkit", "finetune", *map(str, args)])
    with pytest.raises(SystemExit) as done:
        main()
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert done.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), captured
    return lines[0]


# --- the choice ------------------------------------------------------------------------------


def test_auto_is_data_parallel_when_keras_distribution_variables_are_set():
    name, reason = choose_strategy("auto", environ={"KERAS_DISTRIBUTION_NUM_PROCESSES": "2"})
    assert name == "data-parallel" and "KERAS_DISTRIBUTION_NUM_PROCESSES" in reason


def test_auto_without_gpus_is_one_device_unless_devices_ask_for_more():
    import tensorflow as tf

    if len(tf.config.list_physical_devices("GPU")) > 1:
        pytest.skip("this machine has several GPUs: auto is mirrored here")
    assert choose_strategy("auto", environ={})[0] == "none"
    name, reason = choose_strategy("auto", 2, environ={})
    assert name == "mirrored" and reason.startswith("auto: --devices 2")
    assert choose_strategy("mirrored", 2, environ={}) == ("mirrored", "--strategy mirrored --devices 2")


# --- bad requests: one line each, before any image is read -----------------------------------


@pytest.mark.parametrize("flags, expected", [
    (["--devices", "0"], "devices: 0 is not a number of devices; use 1 or more, or 'all'"),
    (["--devices", "two"], "'two' is not a number of devices"),
    (["--strategy", "everywhere"], "strategy = 'everywhere'"),
    (["--strategy", "none", "--devices", "2"], "--strategy none does not use"),
    (["--strategy", "data-parallel"], "data-parallel runs on Keras's JAX backend"),
], ids=["devices-0", "devices-word", "unknown-strategy", "none-with-devices", "data-parallel"])
def test_a_bad_request_is_one_line(shapes_dir, tmp_path, capsys, monkeypatch, flags, expected):
    line = console_error_line(capsys, monkeypatch, shapes_dir, *FLAGS, *flags, "-o", tmp_path / "run")
    assert expected in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "run.partial").exists()


def test_auto_with_keras_distribution_variables_names_them_and_what_to_do(shapes_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_DISTRIBUTION_PROCESS_ID", "0")
    line = one_error_line(finetune_cli(shapes_dir, *FLAGS, "-o", tmp_path / "run"))
    assert "KERAS_DISTRIBUTION_PROCESS_ID" in line and "KERAS_BACKEND=jax" in line and "--strategy mirrored" in line


def test_mirrored_asks_for_no_more_devices_than_the_machine_has(shapes_dir, tmp_path):
    import tensorflow as tf

    gpus = len(tf.config.list_physical_devices("GPU"))
    too_many = gpus + 1 if gpus else (os.cpu_count() or 1) + 1
    line = one_error_line(finetune_cli(shapes_dir, *FLAGS, "--strategy", "mirrored", "--devices", too_many,
                                       "-o", tmp_path / "run"))
    assert f"--devices {too_many}" in line and "or fewer" in line
    if not gpus:
        line = one_error_line(finetune_cli(shapes_dir, *FLAGS, "--strategy", "mirrored", "-o", tmp_path / "run"))
        assert "sees no GPU" in line and "--devices N" in line


def test_logical_devices_asked_for_after_tensorflow_started_are_one_line(shapes_dir, tmp_path):
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU") or (os.cpu_count() or 1) < 2:
        pytest.skip("needs a CPU-only machine of 2 cores or more")
    tf.constant(0.0)  # TensorFlow has started in this process (with one logical CPU device)
    if len(tf.config.list_logical_devices("CPU")) >= 2:
        pytest.skip("this process already has two logical CPU devices")
    with pytest.raises(StrategyError, match="fresh process"):
        transferkit.resolve_distribution("mirrored", 2)
    line = one_error_line(finetune_cli(shapes_dir, *FLAGS, "--strategy", "mirrored", "--devices", "2",
                                       "-o", tmp_path / "run"))
    assert "cannot change now" in line


def test_lr_find_sets_its_stage_up_in_the_strategys_scope(shapes_dir):
    """A mirrored strategy over one device (all this process can have): the stage lr-find
    begins and compiles itself must make its optimizer in the strategy's scope."""
    result = transferkit.find_learning_rate(shapes_dir, None, {**RECIPE, "strategy": "mirrored", "devices": 1},
                                            steps=6)
    assert len(result.losses) >= 2 and all(loss == loss for loss in result.losses)


# --- a mirrored run on two logical CPU devices -------------------------------------------------


CHILD = textwrap.dedent("""
    import os, signal, sys

    import transferkit.training.callbacks as callbacks
    from transferkit.cli import main

    saved = callbacks.EpochCallback.on_epoch_end

    def stop_after_the_first_epoch(self, epoch, logs=None):
        saved(self, epoch, logs)
        if len(self.rows) == 1:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, once the epoch is checkpointed

    callbacks.EpochCallback.on_epoch_end = stop_after_the_first_epoch
    codes = []
    for argv in (sys.argv[2:], ["finetune", "--resume", sys.argv[1], "--quiet"]):
        sys.argv = ["transferkit", *argv]
        try:
            main()
        except SystemExit as done:
            codes.append(done.code)
        print(f"exit code {codes[-1]}", flush=True)
""")


@pytest.fixture(scope="module")
def mirrored_run(shapes_dir, tmp_path_factory):
    """A run trained with --strategy mirrored --devices 2 in a fresh process, stopped by
    SIGINT after its first epoch and resumed there: (run folder, the process's output)."""
    output = tmp_path_factory.mktemp("mirrored") / "run"
    process = forked.run(
        [sys.executable, "-c", CHILD, str(output), "finetune", str(shapes_dir), *FLAGS,
         "--strategy", "mirrored", "--devices", "2", "-o", str(output)],
        capture_output=True, text=True, timeout=600,
    )
    return output, process.stdout + process.stderr


@pytest.mark.slow
def test_mirrored_run_on_two_devices_resumes_and_trains_as_one_device(mirrored_run, shapes_dir, tmp_path):
    output, text = mirrored_run
    assert "exit code 130\n" in text and "exit code 0\n" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "strategy: mirrored over 2 device(s) (/cpu:0, /cpu:1) (--strategy mirrored --devices 2)" in text
    labels = json.loads((output / "labels.json").read_text())
    assert labels["strategy"] == {"name": "mirrored", "requested": "mirrored", "replicas": 2,
                                  "devices": ["/cpu:0", "/cpu:1"], "reason": "--strategy mirrored --devices 2"}
    assert json.loads((output / "metrics.json").read_text())["strategy"]["replicas"] == 2
    assert "devices = 2" in (output / "recipe.toml").read_text()

    # The same recipe and seed on one device: batch_size is the global batch, the head's
    # BatchNorm normalises over it, so the losses agree up to float rounding.
    one = transferkit.finetune(shapes_dir, None, {**RECIPE, "strategy": "none"}, output=tmp_path / "one", verbose=0)
    mirrored = transferkit.load_run(output)
    assert [row["stage"] for row in mirrored.history] == ["head", "head"]
    for ours, theirs in zip(mirrored.history, one.history):
        for key in ("loss", "val_loss"):
            assert float(ours[key]) == pytest.approx(theirs[key], rel=0.02, abs=0.01), (key, mirrored.history,
                                                                                        one.history)
    final, one_final = mirrored.metrics["final"], one.metrics["final"]
    assert final["val_loss"] == pytest.approx(one_final["val_loss"], rel=0.02, abs=0.01)
    assert final["val_accuracy"] == pytest.approx(one_final["val_accuracy"], abs=0.2)
    # What is saved is a plain model: no BatchNorm synchronized across replicas.
    import keras

    batchnorms = [layer for layer in mirrored.model.get_layer("head").layers
                  if isinstance(layer, keras.layers.BatchNormalization)]
    assert batchnorms and not any(layer.synchronized for layer in batchnorms)


# --- TensorFlow's multi-worker strategy: not offered while Keras's fit fails under it ------------


WORKER = textwrap.dedent("""
    import json, os, sys

    index, ports = int(sys.argv[1]), sys.argv[2].split(",")
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": [f"127.0.0.1:{port}" for port in ports]},
                                          "task": {"type": "worker", "index": index}})
    import keras
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
        model.compile("sgd", "categorical_crossentropy", metrics=["accuracy"])
    x = np.zeros((8, 4), "float32")
    y = np.eye(2, dtype="float32")[np.arange(8) % 2]
    try:
        model.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(4), epochs=1, verbose=0)
    except Exception as error:
        print(f"fit failed: {type(error).__name__}: {error}")
        sys.exit(3)
    print("fit worked")
""")


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for each in sockets:
        each.bind(("127.0.0.1", 0))
    ports = [each.getsockname()[1] for each in sockets]
    for each in sockets:
        each.close()
    return ports


@pytest.mark.slow
def test_keras_fit_still_fails_under_multiworker_mirrored_strategy(tmp_path):
    """keras#20585 (also tensorflow#72388): two workers on loopback ports, a tiny model, Keras
    3 fit. When this test fails because fit worked, Keras has fixed it: offer a multi-worker
    strategy (a row of transferkit.strategies.BUILDERS) and turn this test around."""
    ports = ",".join(map(str, free_ports(2)))
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    workers = [forked.Popen([sys.executable, "-c", WORKER, str(index), ports], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, env=environment, cwd=tmp_path)
               for index in range(2)]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=240)[0])
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for worker, text in zip(workers, outputs):
        assert "fit worked" not in text, ("keras#20585 looks fixed: Keras fit trains under "
                                          "MultiWorkerMirroredStrategy; offer it in transferkit.strategies")
        assert worker.returncode == 3, text[-3000:]
        assert "Attempt to convert a value (PerReplica" in text or "Invalid reduction dimension" in text, text[-3000:]

