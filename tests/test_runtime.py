import json
import logging

import keras
import numpy as np
import pytest

import transferkit
from transferkit.runtime import dtype_policy, resolve_precision


def cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
    return path


@pytest.mark.parametrize(
    "flags, policy",
    [("avx512f amx_bf16 amx_tile", "mixed_bfloat16"), ("avx512f avx512_bf16", "mixed_bfloat16"),
     ("avx2 fma", "float32")],
)
def test_auto_follows_the_cpu_flags(tmp_path, flags, policy):
    got, reason = resolve_precision("auto", cpuinfo(tmp_path, flags))
    assert got == policy and reason.startswith("auto")


def test_the_avx2_emulation_leaves_avx512_and_amx_out_of_this_machines_flags_only(tmp_path, monkeypatch):
    from pathlib import Path

    from transferkit.runtime import cpu_flags

    monkeypatch.setenv("TRANSFERKIT_TEST_CPU", "avx2")
    real = cpu_flags(emulated=False)
    assert cpu_flags() == {flag for flag in real if not flag.startswith(("avx512", "amx")) and flag != "avx_vnni"}
    # a file of another CPU is read as it is, emulation or not
    assert "amx_bf16" in cpu_flags(cpuinfo(tmp_path, "avx512f amx_bf16 amx_tile"))
    assert resolve_precision("auto", Path("/proc/cpuinfo"))[0] == "float32"
    monkeypatch.delenv("TRANSFERKIT_TEST_CPU")
    assert cpu_flags() == real


@pytest.mark.parametrize(
    "flags, saturates",
    [("avx2 fma", True), ("avx512f avx512bw", True), ("avx512f avx512_vnni", False), ("avx2 avx_vnni", False),
     ("avx512f amx_int8 amx_tile", False)],
)
def test_int8_products_saturate_on_cpus_without_vnni(tmp_path, monkeypatch, flags, saturates):
    from transferkit.runtime import int8_saturates

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert int8_saturates(cpuinfo(tmp_path, flags)) is saturates
    # oneDNN (OpenVINO's too) capped below VNNI runs as a CPU without it
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx2")
    assert int8_saturates(cpuinfo(tmp_path, flags))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    assert int8_saturates(cpuinfo(tmp_path, flags)) is saturates


def test_the_avx2_emulation_has_no_vnni(monkeypatch):
    from transferkit.runtime import int8_saturates

    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.setenv("TRANSFERKIT_TEST_CPU", "avx2")
    assert int8_saturates()


@pytest.mark.parametrize(
    "choice, policy", [("float32", "float32"), ("bfloat16", "mixed_bfloat16"), ("float16", "mixed_float16")])
def test_explicit_choices(choice, policy):
    assert resolve_precision(choice)[0] == policy


def test_policy_is_restored_after_building():
    before = keras.config.dtype_policy().name
    with dtype_policy("mixed_bfloat16"):
        layer = keras.layers.Dense(2)
    assert layer.dtype_policy.name == "mixed_bfloat16"
    assert keras.config.dtype_policy().name == before


def test_run_records_its_precision_and_keeps_io_layers_float32(bfloat16_run):
    assert json.loads((bfloat16_run.path / "labels.json").read_text())["precision"] == "mixed_bfloat16"
    model = bfloat16_run.model
    assert model.get_layer("backbone").get_layer("block1_conv1").dtype_policy.name == "mixed_bfloat16"
    assert model.get_layer("head").get_layer("output").dtype_policy.name == "float32"
    assert model.get_layer("preprocessing").get_layer("resize").dtype_policy.name == "float32"
    assert model.output.dtype == "float32"


def test_unknown_precision_is_a_recipe_error():
    with pytest.raises(transferkit.RecipeError, match="precision = 'half'"):
        transferkit.load_recipe(None, {"precision": "half"})


def test_keras_functions_traced_anew_for_each_model_are_not_reported_but_a_retracing_function_is(caplog):
    import tensorflow as tf

    from transferkit.runtime import KerasRetracingFilter

    assert any(isinstance(known, KerasRetracingFilter) for known in logging.getLogger("tensorflow").filters)
    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for _ in range(7):  # as a notebook's runs (or tune's trials) do: a new model, new functions
            model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
            model.compile("sgd", "mse")
            model.fit(np.zeros((4, 2)), np.zeros((4, 1)), verbose=0)
    assert not [record for record in caplog.records if "retracing" in record.getMessage()]

    def traced_again():
        def step(x):
            return x + 1

        return tf.function(step)

    with caplog.at_level(logging.WARNING, logger="tensorflow"):
        for _ in range(7):  # a function of one's own, traced again and again: still reported
            traced_again()(tf.constant(1.0))
    assert any("triggered tf.function retracing" in record.getMessage() for record in caplog.records)


def test_held_stderr_drops_what_cpp_code_writes_unless_the_block_fails(capfd, monkeypatch):
    import os

    from transferkit.runtime import held_stderr

    monkeypatch.delenv("TRANSFERKIT_DEBUG", raising=False)
    with held_stderr():
        os.write(2, b"fully_quantize: 0, inference_type: 6\n")  # as a converter's C++ writes it
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError, match="conversion failed"), held_stderr():
        os.write(2, b"the converter's context\n")
        raise RuntimeError("conversion failed")
    assert capfd.readouterr().err == "the converter's context\n"
    # Ctrl-C or SIGTERM during TensorFlow's start-up: its lines say nothing about that.
    with pytest.raises(KeyboardInterrupt), held_stderr():
        os.write(2, b"oneDNN custom operations are on\n")
        raise KeyboardInterrupt
    assert capfd.readouterr().err == ""
    os.write(2, b"after\n")  # file descriptor 2 is back
    assert capfd.readouterr().err == "after\n"


def test_a_noted_signal_is_taken_once_and_stops_a_training_before_its_first_step(shapes_dir, tmp_path, tiny):
    """The command line notes SIGINT and SIGTERM as it raises KeyboardInterrupt: Python can
    lose that exception (raised in a garbage-collection callback, JAX registers one), and the
    training it should have stopped then stops at its first check."""
    import signal

    import transferkit
    from transferkit.errors import TrainingInterrupted
    from transferkit.runtime import interrupt_on_signal, take_noted_signal

    with pytest.raises(KeyboardInterrupt):
        interrupt_on_signal(signal.SIGTERM, None)
    assert take_noted_signal() == "SIGTERM" and take_noted_signal() is None
    with pytest.raises(KeyboardInterrupt):
        interrupt_on_signal(signal.SIGINT, None)  # raised, and lost on the way
    with pytest.raises(TrainingInterrupted, match="SIGINT: training stopped before its first epoch ended"):
        transferkit.finetune(shapes_dir, None, tiny, output=tmp_path / "run", verbose=0)
    assert list(tmp_path.iterdir()) == [] and take_noted_signal() is None


def test_quieter_loggers_raise_levels_for_the_block_never_lower_them_and_restore_them_after_an_error():
    import logging

    from transferkit.runtime import quieter_loggers

    loud, silent = logging.getLogger("tk-test-loud"), logging.getLogger("tk-test-silent")
    loud.setLevel(logging.INFO)
    silent.setLevel(logging.CRITICAL)
    with pytest.raises(RuntimeError), quieter_loggers({"tk-test-loud": logging.ERROR, "tk-test-silent": logging.ERROR}):
        assert loud.level == logging.ERROR and silent.level == logging.CRITICAL
        raise RuntimeError("inside")
    assert loud.level == logging.INFO and silent.level == logging.CRITICAL


@pytest.mark.parametrize(
    "flags, preset, turned_on",
    [("avx2 fma", None, True), ("avx2 fma", "0", False), ("avx2 avx512f avx512_vnni", None, False),
     ("avx2 amx_tile amx_bf16", None, False), ("sse4_2", None, False)],
)
def test_onednn_is_turned_on_where_tensorflow_would_leave_it_off(monkeypatch, flags, preset, turned_on):
    """On an AVX2 CPU without the features TensorFlow enables oneDNN for, transferkit turns it
    on before TensorFlow is imported; never over the user's setting, nor once TensorFlow runs."""
    import sys

    from transferkit import runtime

    monkeypatch.setattr(runtime, "cpu_flags", lambda *args: set(flags.split()))
    if preset is None:
        monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    else:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", preset)
    assert not runtime.prefer_onednn()  # TensorFlow is imported in this process: too late to change
    monkeypatch.delitem(sys.modules, "tensorflow")
    assert runtime.prefer_onednn() is turned_on
    assert runtime.tensorflow_onednn() is (turned_on or (preset is None and "avx512_vnni" in flags)
                                           or (preset is None and "amx_bf16" in flags))
    if turned_on:
        import os

        assert os.environ["TF_ENABLE_ONEDNN_OPTS"] == "1"


@pytest.mark.parametrize(
    "flags, preset, left_off",
    [("avx2 fma", None, True), ("avx2 fma", "0", False), ("avx2 fma", "1", False),
     ("avx2 avx512f avx512_vnni", None, False), ("sse4_2", None, False)],
)
def test_a_run_says_when_tensorflow_came_first_and_left_onednn_off(monkeypatch, caplog, flags, preset, left_off):
    """TensorFlow imported before transferkit (``import keras`` first) on an AVX2 CPU where
    transferkit would have turned oneDNN on: the run's set-up lines say so, once, with the fix.
    Not where the user set the variable, nor where TensorFlow turns oneDNN on itself."""
    import logging

    from transferkit import runtime
    from transferkit.model.build import log_setup
    from transferkit.strategies import resolve_distribution

    monkeypatch.setattr(runtime, "cpu_flags", lambda *args: set(flags.split()))
    if preset is None:
        monkeypatch.delenv("TF_ENABLE_ONEDNN_OPTS", raising=False)
    else:
        monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", preset)
    assert runtime.onednn_left_off() is left_off
    with caplog.at_level(logging.INFO, logger="transferkit"):
        log_setup("float32", "asked for", resolve_distribution("none"))
    warned = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert warned == ([runtime.ONEDNN_LEFT_OFF] if left_off else [])
    if left_off:
        assert "import transferkit before" in warned[0] and "TF_ENABLE_ONEDNN_OPTS=1" in warned[0]
