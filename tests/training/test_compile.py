"""XLA for a stage's step: where TensorFlow runs without oneDNN, in float32, on one device, for
stages long enough; and a step compiled by XLA trains as Keras's own does."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import transferkit.runtime
from transferkit.recipe import StageConfig
from transferkit.runtime import dtype_policy
from transferkit.training import compile as compile_module
from transferkit.training.compile import XLA_MIN_STEPS, compile_for_stage, xla_pays


def top_part(policy="float32", seed=0):
    """A small stand-in for a fine stage's model: convolutions on feature maps, then a head."""
    keras.utils.set_random_seed(seed)
    with dtype_policy(policy):
        inputs = keras.Input((4, 4, 16))
        x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
        x = keras.layers.Flatten()(x)
        outputs = keras.layers.Dense(3, activation="softmax", dtype="float32")(x)
    return keras.Model(inputs, outputs)


@pytest.fixture()
def cpu(monkeypatch):
    """Set the CPU flags transferkit reads and TF_ENABLE_ONEDNN_OPTS as on a given CPU."""

    def as_on(flags, onednn_env=None):
        monkeypatch.setattr(transferkit.runtime, "cpu_flags", lambda *args: set(flags))
        if onednn_env is None:
            monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
        else:
            monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", onednn_env)
        monkeypatch.delenv("TRANSFERKIT_XLA", raising=False)

    return as_on


def test_xla_where_tensorflow_runs_without_onednn_and_the_stage_is_long_enough(cpu, monkeypatch):
    model = top_part()
    cpu({"avx2", "fma"})  # an AVX2-only CPU: TensorFlow's own kernels
    assert xla_pays(model, XLA_MIN_STEPS)
    assert not xla_pays(model, XLA_MIN_STEPS - 1)
    assert not xla_pays(model, 10**6, distributed=True)
    assert not xla_pays(top_part("mixed_bfloat16"), 10**6)
    monkeypatch.setenv("TRANSFERKIT_XLA", "0")
    assert not xla_pays(model, 10**6)
    cpu({"avx2", "avx512f", "avx512_vnni"})  # oneDNN's kernels: Keras's step as it is
    assert not xla_pays(model, 10**6)
    cpu({"avx2", "fma"}, onednn_env="1")  # oneDNN turned on where TensorFlow leaves it off (prefer_onednn)
    assert not xla_pays(model, 10**6)
    cpu({"avx2", "avx512f", "avx512_vnni"}, onednn_env="0")  # oneDNN turned off by the user
    assert xla_pays(model, 10**6)
    cpu({"amx_bf16", "amx_tile"})
    assert not xla_pays(model, 10**6)
    monkeypatch.setenv("TRANSFERKIT_XLA", "1")
    assert xla_pays(model, 10**6)
    assert compile_module.XLA_MIN_STEPS == XLA_MIN_STEPS


def test_a_step_compiled_by_xla_trains_as_kerass_own():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 2, (16, 4, 4, 16)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 16), 3)
    stage = StageConfig(epochs=1, unfreeze=1, learning_rate=1e-2)
    weights = {}
    for xla in (False, True):
        model = top_part()
        compile_for_stage(model, stage, 3, jit_compile=xla)
        assert model.jit_compile is xla
        losses = [float(model.train_on_batch(x, y)[0]) for _ in range(5)]
        assert losses[-1] < losses[0]
        weights[xla] = model.get_weights()
    for keras_own, compiled in zip(weights[False], weights[True], strict=True):
        np.testing.assert_allclose(compiled, keras_own, rtol=1e-3, atol=1e-5)


def test_without_xla_the_step_is_left_to_kerass_own_choice():
    """False is never passed on to Keras: on JAX it runs every step op by op, uncompiled (a
    data-parallel epoch took seconds per step so), and on TensorFlow with a GPU it turns
    XLA off. Keras's "auto" compiles there, and leaves a CPU-only TensorFlow step as it was."""

    class Asked(keras.Model):
        def compile(self, **kwargs):
            self.asked = kwargs["jit_compile"]
            super().compile(**kwargs)

    model = top_part()
    model = Asked(model.inputs, model.outputs)
    stage = StageConfig(name="fine", epochs=1, learning_rate=1e-3, unfreeze=0)
    compile_for_stage(model, stage, 3)
    assert model.asked == "auto"
    assert model.jit_compile is (keras.config.backend() == "jax")  # TensorFlow here, on a CPU: no XLA
    compile_for_stage(model, stage, 3, jit_compile=True)
    assert model.asked is True and model.jit_compile is True
