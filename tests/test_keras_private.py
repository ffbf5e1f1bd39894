"""Each private Keras internal transferkit relies on, pinned: a Keras release that changes one
fails here, by name, before it breaks folding, resume or dropout seeding quietly."""

import os
import time
import types

import keras
import numpy as np
import pytest

from transferkit.keras_private import (
    EarlyStoppingState,
    early_stopping_state,
    graph_nodes,
    producing_layer,
    reseed,
    set_early_stopping_state,
    start_progbar_at,
)


def small_model():
    images = keras.Input(shape=(4, 4, 3), name="image")
    x = keras.layers.Conv2D(2, 1, name="conv")(images)
    x = keras.layers.BatchNormalization(name="bn")(x)
    return keras.Model(images, x, name="small"), images


def test_producing_layer_names_the_input_layer_of_a_model_input():
    model, images = small_model()
    assert producing_layer(images).name == "image"
    assert isinstance(producing_layer(images), keras.layers.InputLayer)
    assert producing_layer(model.get_layer("conv").output) is model.get_layer("conv")
    assert producing_layer(model.input).name == "image"


def test_graph_nodes_list_each_call_with_its_tensors():
    model, _ = small_model()
    nodes = graph_nodes(model)
    by_layer = {node.operation.name: node for node in nodes}
    assert set(by_layer) == {"image", "conv", "bn"}
    assert by_layer["image"].is_input and not by_layer["conv"].is_input
    # The BatchNormalization's single input is the convolution's single output.
    assert len(by_layer["bn"].input_tensors) == 1
    assert by_layer["bn"].input_tensors[0] is by_layer["conv"].outputs[0]
    assert by_layer["bn"].outputs[0] is model.outputs[0]


def test_graph_nodes_of_a_subclassed_model_are_unknown():
    class Subclassed(keras.Model):
        def call(self, x):
            return x

    assert graph_nodes(Subclassed()) is None


def dropout_mask(layer):
    return keras.ops.convert_to_numpy(layer(np.ones((1, 64), "float32"), training=True)) > 0


def test_reseeding_a_dropout_layer_repeats_its_masks_and_another_seed_changes_them():
    layer = keras.layers.Dropout(0.5, seed=1)
    assert tuple(layer.seed_generator.state.shape) == (2,)
    reseed(layer.seed_generator, 7)
    first = [dropout_mask(layer) for _ in range(2)]
    assert not np.array_equal(*first)  # the counter moves on between calls
    reseed(layer.seed_generator, 7)
    again = [dropout_mask(layer) for _ in range(2)]
    np.testing.assert_array_equal(first, again)
    reseed(layer.seed_generator, 8)
    assert not np.array_equal(dropout_mask(layer), first[0])
    # A fresh layer seeded so draws what the reseeded one drew.
    fresh = keras.layers.Dropout(0.5, seed=3)
    reseed(fresh.seed_generator, 7)
    np.testing.assert_array_equal(dropout_mask(fresh), first[0])


def forced(losses):
    class ForcedLoss(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["val_loss"] = losses[epoch]

    return ForcedLoss()


def fit_with(stopper, model, losses):
    """Fit 1 epoch per loss in ``losses``; the epoch's val_loss is forced to it."""
    x, y = np.ones((4, 2), "float32"), np.zeros((4, 1), "float32")
    history = model.fit(x, y, epochs=len(losses), verbose=0, callbacks=[forced(losses), stopper])
    return len(history.epoch)


def tiny():
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def test_early_stopping_state_reads_what_keras_keeps():
    model = tiny()
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=5, restore_best_weights=True)
    fit_with(stopper, model, [3.0, 1.0, 2.0])
    state = early_stopping_state(stopper)
    assert (state.best, state.wait, state.best_epoch) == (1.0, 1, 1)
    assert isinstance(state.best, float)
    assert [w.shape for w in state.best_weights] == [w.shape for w in model.get_weights()]


def test_set_early_stopping_state_carries_patience_and_best_weights_over_a_restart():
    class Resumed(keras.callbacks.EarlyStopping):
        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)  # resets the counters
            set_early_stopping_state(self, saved)

    model = tiny()
    best_weights = [np.full(w.shape, 0.25, "float32") for w in model.get_weights()]
    saved = EarlyStoppingState(best=1.0, wait=1, best_epoch=0, best_weights=best_weights)
    stopper = Resumed(monitor="val_loss", patience=2, restore_best_weights=True)
    # With wait 1 of patience 2, the first worse epoch ends training (epoch > 0 in Keras's
    # count, so the run starts at its second epoch) and the saved best weights come back.
    epochs = model.fit(np.ones((4, 2), "float32"), np.zeros((4, 1), "float32"), epochs=5, initial_epoch=1,
                       verbose=0, callbacks=[forced([None, 2.0, 2.0, 2.0, 2.0]), stopper]).epoch
    assert epochs == [1]
    for value in model.get_weights():
        np.testing.assert_array_equal(value, 0.25)
    assert early_stopping_state(stopper).best == pytest.approx(1.0)


def test_build_for_fit_creates_every_variable_fit_would_create_in_its_first_trace():
    """No variable created inside the traced step: tf.function then traces it once, not twice."""
    import tensorflow as tf

    from transferkit.keras_private import build_for_fit

    inputs = keras.Input((6,))
    x = keras.layers.Dense(4)(inputs)
    x = keras.layers.BatchNormalization()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
    x = np.random.default_rng(0).random((8, 6), dtype="float32")
    y = np.eye(3, dtype="float32")[np.arange(8) % 3]
    build_for_fit(model, (x[:4], y[:4]))
    assert model.optimizer.built and len(model.optimizer.variables) > 2
    created = []

    def record(next_creator, **kwargs):
        created.append(kwargs.get("name"))
        return next_creator(**kwargs)

    with tf.variable_creator_scope(record):
        model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert created == []


def test_a_progbar_started_earlier_counts_that_time_in_its_time_per_unit(capsys, monkeypatch):
    from keras.src.utils import progbar

    now = time.time()  # the bar's clock stands still: a pause (a collection, a busy core) adds nothing
    monkeypatch.setattr(progbar, "time", types.SimpleNamespace(time=lambda: now))
    bar = keras.utils.Progbar(5, verbose=2, unit_name="image")
    start_progbar_at(bar, now - 10.0)
    bar.update(5)
    line = capsys.readouterr().out.strip()
    assert line.startswith("5/5 - 10s -") and line.endswith("2s/image"), line


HIDDEN = """
import sys
import numpy as np
from transferkit.keras_private import hide_tensorflow_from_keras
hide_tensorflow_from_keras()  # before Keras loads: on its load
assert "keras" not in sys.modules
import keras
assert keras.backend.backend() == "jax"
keras.utils.set_random_seed(3)  # imports TensorFlow to seed it, wherever it is installed and seen
model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])
model.save(sys.argv[1])
loaded = keras.saving.load_model(sys.argv[1])  # serialization looks for TensorFlow's shapes too
np.testing.assert_array_equal(model.predict(np.ones((1, 4)), verbose=0), loaded.predict(np.ones((1, 4)), verbose=0))
print("tensorflow" in sys.modules)
"""


def test_keras_on_jax_with_tensorflow_hidden_seeds_saves_and_loads_without_importing_it(tmp_path):
    """What the command line does on JAX and PyTorch: 3 s of start-up per process spared."""
    import os
    import subprocess
    import sys

    pytest.importorskip("jax", reason="the jax extra is not installed")
    done = subprocess.run([sys.executable, "-c", HIDDEN, str(tmp_path / "model.keras")], capture_output=True,
                          text=True, env={**os.environ, "KERAS_BACKEND": "jax"}, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_keras_home_is_where_get_file_downloads(tmp_path, monkeypatch):
    from keras.src.backend import config

    from transferkit.keras_private import keras_home

    (tmp_path / "home").mkdir()
    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "home"))
    assert keras_home() == str(tmp_path / "home")
    source = tmp_path / "source.txt"
    source.write_text("weights")
    fetched = keras.utils.get_file("fetched.txt", origin=source.as_uri(), cache_subdir="models")
    assert fetched == str(tmp_path / "home" / "models" / "fetched.txt")
    # A home Keras cannot write into: get_file goes to /tmp/.keras, and keras_home says so.
    monkeypatch.setattr(config, "_KERAS_DIR", str(tmp_path / "never-made"))
    fetched = keras.utils.get_file("fetched-elsewhere.txt", origin=source.as_uri(), cache_subdir="models")
    try:
        assert fetched == os.path.join(keras_home(), "models", "fetched-elsewhere.txt") != str(tmp_path / "never-made")
    finally:
        os.remove(fetched)
