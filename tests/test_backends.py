"""The same toolkit on Keras's JAX and PyTorch backends.

One session per backend runs the commands in a process of its own with KERAS_BACKEND set and
TensorFlow unimportable (tests/backend_session.py): finetune, predict, evaluate, an export
(refused, in one line) and the backend's gradients of known functions; the full session also
stops the finetune with a real SIGINT and resumes it, and runs predict on the OpenVINO
engine, explain, lr-find, doctor --model and tune. The tests read what it left; the run it
trained is loaded here, on TensorFlow, and must predict what it predicted there. JAX runs
the short session (on a CPU, XLA compiles every new step first: the JAX finetune alone takes
about 30 s, the full session about 3 times the short one), the full one with
TRANSFERKIT_TEST_BACKENDS=full; PyTorch runs the full session wherever torch is installed
(.ci/run installs torch 2.13.0, a CPU build: 18 CPU seconds).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import transferkit
from tests.conftest import UNOPTIMIZED_XLA_FLAGS
from transferkit.backend import BACKENDS, RESIZE_INTERPOLATIONS, active_backend, input_gradient, resize_stand_in

SESSION = Path(__file__).with_name("backend_session.py")
INSTALL = {"jax": "pip install 'transferkit[jax]'", "torch": "pip install torch==2.13.0, a CPU build"}


def smooth_images() -> np.ndarray:
    """Two 40 px images of slow colour gradients (where every resize kernel nearly agrees)."""
    y, x = np.mgrid[0:40, 0:40].astype("float32") / 39.0
    first = np.stack([255 * x, 255 * y, 127 + 100 * np.sin(3 * x + 2 * y)], axis=-1)
    return np.stack([first, first[::-1, ::-1]]).astype("float32")


@pytest.fixture(scope="module", params=["jax", "torch"])
def session(request, shapes_dir, tmp_path_factory):
    """(backend, the folder the session wrote into, its session.json)."""
    import keras

    backend = request.param
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed here ({INSTALL[backend]}); its backend tests run where it is")
    root = tmp_path_factory.mktemp(f"session-{backend}")
    os.symlink(shapes_dir, root / "data")
    area = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Resizing(16, 16, interpolation="area")])
    area.save(root / "area.keras")
    np.save(root / "area_images.npy", smooth_images())
    environment = {**os.environ, "KERAS_BACKEND": backend}
    if backend == "jax":
        environment["XLA_FLAGS"] = UNOPTIMIZED_XLA_FLAGS
    full = backend == "torch" or os.environ.get("TRANSFERKIT_TEST_BACKENDS") == "full"
    done = subprocess.run([sys.executable, str(SESSION), str(root), *(["--full"] if full else [])],
                          env=environment, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return backend, root, json.loads((root / "session.json").read_text())


def read_predictions(path: Path) -> dict[str, tuple[str, float]]:
    with open(path, newline="") as handle:
        return {row["file"]: (row["label"], float(row["confidence"])) for row in csv.DictReader(handle)}


def json_in(output: str) -> dict:
    """The JSON object a --json command printed (progress lines may come before it)."""
    return json.loads(output[output.index("{"): output.rindex("}") + 1])


def test_every_command_runs_on_the_backend_without_tensorflow(session):
    backend, _, report = session
    assert report["backend"] == backend
    assert report["tensorflow_importable"] is False and report["tensorflow_imported"] is False
    for name, command in report["commands"].items():
        assert "Traceback" not in command["output"], f"{name}: {command['output']}"
        if name == "finetune" and report["full"]:  # stopped by the SIGINT, resumable
            assert command["exit"] == 130 and "--resume" in command["output"], command["output"]
        elif name == "doctor --model":  # 1: a check failed on the tiny data; the report is what counts
            assert command["exit"] in (0, 1), command["output"]
        elif name == "export":  # the converters read TensorFlow graphs: one line saying how
            assert command["exit"] == 1 and "KERAS_BACKEND=tensorflow" in command["output"], command["output"]
            assert len(command["output"].strip().splitlines()) == 1
        else:
            assert command["exit"] == 0, f"{name}: {command['output']}"


def test_jax_keeps_its_compiled_programs_in_the_cache(session):
    backend, _, report = session
    if backend != "jax":
        pytest.skip("JAX's compilation cache")
    cache = report["compilation_cache"]
    assert Path(cache["folder"]) == Path(os.environ["TRANSFERKIT_CACHE"]) / "jax" and cache["files"] > 0


def needs_full(report) -> None:
    if not report["full"]:
        pytest.skip(f"the full {report['backend']} session runs with TRANSFERKIT_TEST_BACKENDS=full")


def test_the_resumed_run_goes_on_from_its_checkpoint(session):
    backend, root, report = session
    needs_full(report)
    kept = report["interrupted_history"]
    assert kept and len(kept) < 3  # stopped after the first epoch, before the last
    with open(root / "run" / "history.csv", newline="") as handle:
        history = list(csv.DictReader(handle))
    assert [row["stage"] for row in history] == ["head", "head", "fine"]
    for saved, row in zip(kept, history):  # the epochs before the stop are kept, not trained again
        assert float(row["loss"]) == pytest.approx(saved["loss"], rel=1e-6)
    assert not (root / "run.partial").exists()


def test_the_run_predicts_the_same_under_tensorflow(session):
    """The held-out check: a run trained on another backend, loaded on TensorFlow."""
    backend, root, _ = session
    assert json.loads((root / "run" / "labels.json").read_text())["backend"] == backend
    there = read_predictions(root / "keras.csv")
    run = transferkit.load_run(root / "run")
    for engine in ("keras", "openvino"):
        rows = transferkit.predict_folder(run, root / "data", engine=engine, precision="float32").rows
        here = {str(row.file): (row.label, float(row.confidence)) for row in rows}
        assert here.keys() == there.keys()
        agreement = np.mean([here[file][0] == there[file][0] for file in there])
        assert agreement >= 0.99, f"{engine}: top-1 agreement {agreement:.3f}"
        gap = max(abs(here[file][1] - there[file][1]) for file in there)
        assert gap < 1e-4, f"{engine}: confidences differ by {gap}"


def test_the_openvino_engine_works_for_a_run_on_the_backend(session):
    _, root, report = session
    needs_full(report)
    assert "OpenVINO" in report["commands"]["predict openvino"]["output"]
    assert "using Keras" not in report["commands"]["predict openvino"]["output"]
    keras_rows, openvino_rows = read_predictions(root / "keras.csv"), read_predictions(root / "openvino.csv")
    assert keras_rows.keys() == openvino_rows.keys()
    for file, (label, confidence) in keras_rows.items():
        assert openvino_rows[file][0] == label and abs(openvino_rows[file][1] - confidence) < 1e-4


def test_evaluate_leaves_its_results(session):
    _, root, _ = session
    metrics = json.loads((root / "evaluation" / "metrics.json").read_text())
    assert metrics["n_images"] == 30 and 0 <= metrics["accuracy"] <= 1
    assert (root / "evaluation" / "confusion.png").stat().st_size > 0
    there = read_predictions(root / "keras.csv")
    with open(root / "evaluation" / "predictions.csv", newline="") as handle:
        evaluated = {row["file"]: row for row in csv.DictReader(handle)}
    assert evaluated.keys() == there.keys()
    assert all(evaluated[file]["predicted"] == label for file, (label, _) in there.items())


def test_lr_find_doctor_and_tune_leave_their_results(session):
    _, root, report = session
    needs_full(report)
    found = json_in(report["commands"]["lr-find"]["output"])
    assert found["steps"] == 6 and found["suggestion"] is not None and (root / "lr_find.png").is_file()
    checks = json_in(report["commands"]["doctor --model"]["output"])
    from transferkit.tuning.diagnostics import CHECKS

    assert len(checks["checks"]) == len(CHECKS)  # every check ran on the backend
    gradients = next(check for check in checks["checks"] if check["name"] == "gradients")
    assert gradients["passed"], gradients  # the backend's own gradients reach the head
    assert (root / "tune" / "best_recipe.toml").is_file()


def test_the_backend_s_gradients_are_right(session):
    _, _, report = session
    gradients = report["gradients"]
    assert gradients["value"] == pytest.approx(14.0)
    np.testing.assert_allclose(gradients["input"], [[2.0, -4.0, 6.0]], rtol=1e-6)
    np.testing.assert_allclose(gradients["kernel"], [[1.0], [-2.0], [3.0]], rtol=1e-6)  # d sum(x W) / dW = x


def test_gradcam_on_the_backend_matches_tensorflow(session):
    _, root, report = session
    needs_full(report)
    index = json.loads((root / "explain" / "heatmaps.json").read_text())
    assert len(index) == 10 and all(len(entry["heatmaps"]) == 2 for entry in index)
    run = transferkit.load_run(root / "run")
    files = [Path(entry["file"]) for entry in index]
    here = transferkit.explain(run, files, top=2)
    for entry, explanation in zip(index, here):
        for saved, heatmap in zip(entry["heatmaps"], explanation.heatmaps):
            assert saved["class"] == heatmap.class_name
            np.testing.assert_allclose(np.load(root / "explain" / saved["npy"]), heatmap.heat, atol=2e-3)


def test_a_tensorflow_only_resize_gets_a_stand_in_and_says_so(session):
    import keras

    backend, root, report = session
    (warning,) = report["area_warnings"]
    assert "area -> bilinear" in warning and backend in warning and "only TensorFlow" in warning
    tensorflow = keras.models.load_model(root / "area.keras")(smooth_images())
    there = np.load(root / "area_outputs.npy")
    assert there.shape == (2, 16, 16, 3)
    assert np.abs(there - np.asarray(tensorflow)).mean() < 2.0  # of 0..255: the closest kernel, not the same


def test_the_resize_table_follows_keras():
    """Each backend's interpolations as Keras lists them (``backend.RESIZE_INTERPOLATIONS``)."""
    import importlib

    for backend in BACKENDS:
        try:
            module = importlib.import_module(f"keras.src.backend.{backend}.image")
        except ImportError:
            continue  # its framework is not installed here
        assert set(RESIZE_INTERPOLATIONS[backend]) == set(module.RESIZE_INTERPOLATIONS), backend
    assert resize_stand_in("area", "tensorflow") is None and resize_stand_in("bilinear", "torch") is None
    assert resize_stand_in("area", "jax") == "bilinear" and resize_stand_in("lanczos3", "torch") == "bicubic"


def test_input_gradient_is_the_backend_s_own():
    import keras

    assert active_backend() == "tensorflow"
    x = np.array([[1.0, -2.0, 3.0]], dtype="float32")
    value, gradient = input_gradient(lambda t: keras.ops.sum(keras.ops.square(t)), x)
    assert value == pytest.approx(14.0) and np.allclose(gradient, 2 * x)


def test_batches_become_a_tf_data_pipeline_with_the_same_epochs():
    from transferkit.data.batches import ImageBatches, to_tf_dataset

    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype="uint8")
    targets = np.arange(10) % 2
    direct = ImageBatches(images, targets, 4, shuffle=True, seed=3)
    piped = to_tf_dataset(ImageBatches(images, targets, 4, shuffle=True, seed=3))
    for _ in range(2):  # two epochs, each in its own seeded order
        expected = [direct[index] for index in range(len(direct))]
        direct.on_epoch_end()
        got = [tuple(part.numpy() for part in batch) for batch in piped]
        assert len(got) == len(expected) == 3
        for (x, y), (gx, gy) in zip(expected, got):
            np.testing.assert_array_equal(x, gx)
            np.testing.assert_array_equal(y, gy)


def test_fit_takes_batches_as_tf_data_without_autotuning_and_learns_the_same():
    import keras
    import tensorflow as tf

    from transferkit.data.batches import ImageBatches, keras_input

    images = np.random.default_rng(1).integers(0, 256, (20, 4, 4, 3), dtype="uint8")
    targets = np.arange(20) % 2
    ours = ImageBatches(images, targets, 6, shuffle=True, seed=5)
    given = keras_input(ours)
    # tf.data's autotuning would stall the end of every epoch (benchmarks/epoch_end.py)
    assert isinstance(given, tf.data.Dataset) and given.options().autotune.enabled is False

    class Epochs(keras.callbacks.Callback):  # as training.callbacks.EpochCallback seeds each epoch
        def __init__(self, batches):
            super().__init__()
            self.batches = batches

        def on_epoch_begin(self, epoch, logs=None):
            self.batches.set_epoch(7 + epoch)

    def trained(data, batches) -> list[np.ndarray]:
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Flatten(),
                                  keras.layers.Dense(1, activation="sigmoid")])
        model.compile(keras.optimizers.SGD(0.5), "binary_crossentropy")
        model.fit(data, epochs=3, shuffle=False, verbose=0, callbacks=[Epochs(batches)])
        return model.get_weights()

    # Each epoch the batches of the order seeded at its start, as Keras draws from the
    # PyDataset itself, though the next epoch's pass is prepared ahead.
    keras_own = ImageBatches(images, targets, 6, shuffle=True, seed=5)
    for got, expected in zip(trained(given, ours), trained(keras_own, keras_own), strict=True):
        np.testing.assert_array_equal(got, expected)


def test_a_pass_that_keras_stops_at_its_last_batch_is_followed_by_the_next_epoch():
    """Keras takes a pass's known number of batches and drops the iterator: the pass's end is
    never asked for, and what ran there ran only if the prefetch thread got to it."""
    from transferkit.data.batches import ImageBatches, to_tf_dataset

    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype="uint8")
    batches = ImageBatches(images, np.arange(10) % 2, 4, shuffle=True, seed=3)
    piped = to_tf_dataset(batches, prefetch=1)
    for epoch in range(4):
        iterator = iter(piped)
        got = [next(iterator)[1].numpy() for _ in range(len(batches))]  # as many as the cardinality
        del iterator
        order = np.random.default_rng([3, epoch]).permutation(10)
        np.testing.assert_array_equal(np.concatenate(got), (np.arange(10) % 2)[order])


def test_a_slow_prefetch_thread_serves_each_pass_the_epoch_set_for_it():
    import threading
    import time

    import keras

    from transferkit.data.batches import ImageBatches, to_tf_dataset

    class Descheduled(ImageBatches):
        """The prefetch thread is slow to go on whenever it reads the epoch, as on a busy
        machine (moving the epoch on at a pass's end, it did so after the next epoch was set:
        epochs 7, 9, 10 were served)."""

        served: list[int] = []

        @property
        def epoch(self):
            if threading.current_thread() is not threading.main_thread():
                time.sleep(0.3)
            return self._epoch

        @epoch.setter
        def epoch(self, value):
            self._epoch = value

        def __getitem__(self, index):
            Descheduled.served.append(self._epoch)
            return super().__getitem__(index)

    images = np.random.default_rng(1).integers(0, 256, (20, 4, 4, 3), dtype="uint8")
    batches = Descheduled(images, np.arange(20) % 2, 6, shuffle=True, seed=5)
    given = to_tf_dataset(batches)
    Descheduled.served.clear()

    class Epochs(keras.callbacks.Callback):  # as training.callbacks.EpochCallback seeds each epoch
        def on_epoch_begin(self, epoch, logs=None):
            batches.set_epoch(7 + epoch)

    model = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(1, activation="sigmoid")])
    model.compile("sgd", "binary_crossentropy")
    model.fit(given, epochs=3, shuffle=False, verbose=0, callbacks=[Epochs()])
    assert Descheduled.served == [7] * 4 + [8] * 4 + [9] * 4
