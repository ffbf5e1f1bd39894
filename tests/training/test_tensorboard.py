"""TensorBoard logs: one step count across the fit calls of a staged run."""

import numpy as np
import pytest

from transferkit.errors import TransferkitError
from transferkit.training import tensorboard


def read_scalars(folder):
    import tensorflow as tf

    values = {}
    for path in sorted(folder.iterdir()):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                values.setdefault(value.tag, []).append((event.step, float(tf.make_ndarray(value.tensor))))
    return values


def test_epochs_of_several_fits_count_on_and_a_resumed_run_goes_on(tmp_path):
    import keras

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x, y = np.random.default_rng(0).random((8, 3)), np.zeros((8, 1))
    log = tensorboard.TensorBoardLog(tmp_path / "tb")
    model.fit(x, y, epochs=2, validation_data=(x, y), verbose=0, callbacks=[log])
    history = model.fit(x, y, epochs=3, verbose=0, callbacks=[log])
    log.close()
    resumed = tensorboard.TensorBoardLog(tmp_path / "tb", epochs_done=5)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[resumed])
    resumed.close()
    scalars = read_scalars(tmp_path / "tb")
    assert [step for step, _ in scalars["loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in scalars["val_loss"]] == [1, 2]
    np.testing.assert_allclose([value for _, value in scalars["loss"]][2:5], history.history["loss"], rtol=1e-6)
    assert [value for _, value in scalars["learning_rate"]] == pytest.approx([0.01] * 6)


def test_missing_tensorboard_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(TransferkitError, match=r"pip install 'transferkit\[tensorboard\]'"):
        tensorboard.require_tensorboard()
