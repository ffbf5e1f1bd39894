"""int8 forward passes: quantized once and cached by fingerprint, checked against float32 before
use, float32 with a notice where int8 falls short; finetune and predict with --precision int8."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import textwrap

import keras
import numpy as np
import pytest

import transferkit
from tests import forked
from transferkit.inference import int8 as int8_module
from transferkit.inference.engines import OpenVINOEngine, make_engine
from transferkit.inference.int8 import Int8Engine, Int8Samples, int8_engine, samples_from, worth_int8
from transferkit.runtime import resolve_precision

pytest.importorskip("openvino")
# Looked up, not imported: NNCF imported whole brings PyTorch into the worker, which transferkit keeps
# out (inference/openvino.py imports NNCF without its PyTorch parts).
if importlib.util.find_spec("nncf") is None:
    pytest.skip("the openvino extra (NNCF) is not installed", allow_module_level=True)

SIZE = 32


def images(n, seed=0):
    """Noisy images around a random colour, of random contrast."""
    rng = np.random.default_rng(seed)
    colour = rng.uniform(0, 255, (n, 1, 1, 3))
    contrast = rng.uniform(5, 120, (n, 1, 1, 1))
    return np.clip(colour + contrast * rng.standard_normal((n, SIZE, SIZE, 3)), 0, 255).astype("uint8")


def extractor(seed=0, outlier=1.0):
    """A small convolutional feature extractor; ``outlier`` scales one channel of its first
    layer: a large one leaves 8 bits too coarse for the other channels after it."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = keras.layers.Rescaling(1 / 255)(inputs)
    first = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="first")
    x = first(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same")(x)
    model = keras.Model(inputs, x, name=f"extractor{seed}")
    kernel, bias = first.get_weights()
    kernel[..., 0] *= outlier
    first.set_weights([kernel, bias])
    return model


def float_engine(model, cache):
    engine = make_engine(model, "openvino", input_shape=(SIZE, SIZE, 3), cache_dir=cache, precision="float32",
                         input_dtype="uint8")
    assert isinstance(engine, OpenVINOEngine)
    return engine


def test_int8_network_is_quantized_once_and_cached_with_its_check(tmp_path):
    model = extractor()
    samples = Int8Samples(images(32, seed=1), images(32, seed=2))
    # Drawn by a function (a run's own classifier): drawn only where nothing is cached, and the
    # first calibration of the network is kept.
    first = int8_engine(model, float_engine(model, tmp_path), lambda: samples, tmp_path, classifier=False, auto=False)
    assert isinstance(first, Int8Engine) and first.check.passed
    assert first.check.measure == "feature error" and first.check.value <= int8_module.FEATURE_ERROR
    assert first.ir_path.name == f"{model.name}-int8.xml" and first.ir_path.with_suffix(".check.json").is_file()

    def never():
        raise AssertionError("a cached int8 network and check need no images")

    again = int8_engine(model, float_engine(model, tmp_path), never, tmp_path, classifier=False, auto=False)
    batch = images(8, seed=3)
    np.testing.assert_array_equal(again.predict(batch), first.predict(batch))
    assert again.check == first.check
    # Other weights: another fingerprint, quantized and checked anew.
    other = extractor(seed=1)
    asked = []
    third = int8_engine(other, float_engine(other, tmp_path), lambda: asked.append(1) or samples, tmp_path,
                        classifier=False, auto=False)
    assert asked == [1] and third.ir_path != first.ir_path


def test_given_samples_key_the_int8_network_so_each_run_on_other_images_gets_its_own(tmp_path, monkeypatch):
    """A frozen part shared by runs on other images (the same pretrained weights): the
    network is quantized on each run's own images and checked on its own held-back ones,
    and reused by a run on the same images."""
    import transferkit.inference.openvino as openvino_module

    quantized = []
    real = openvino_module.quantize_int8
    monkeypatch.setattr(openvino_module, "quantize_int8",
                        lambda network, calibration, seven_bits=False: quantized.append(len(calibration))
                        or real(network, calibration, seven_bits))
    model = extractor()
    ours = Int8Samples(images(32, seed=1), images(32, seed=2))
    theirs = Int8Samples(images(24, seed=4), images(32, seed=5))
    assert ours.digest() == Int8Samples(images(32, seed=1), images(32, seed=2)).digest() != theirs.digest()
    first = int8_engine(model, float_engine(model, tmp_path), ours, tmp_path, classifier=False, auto=False)
    assert first.ir_path.name == f"{model.name}-int8-{ours.digest()}.xml" and quantized == [32]
    same = int8_engine(model, float_engine(model, tmp_path), ours, tmp_path, classifier=False, auto=False)
    assert same.ir_path == first.ir_path and same.check == first.check and quantized == [32]
    other = int8_engine(model, float_engine(model, tmp_path), theirs, tmp_path, classifier=False, auto=False)
    assert other.ir_path.name == f"{model.name}-int8-{theirs.digest()}.xml" and quantized == [32, 24]
    assert other.check != first.check  # checked on its own held-back images
    batch = images(8, seed=3)
    assert not np.array_equal(other.predict(batch), first.predict(batch))  # other activation ranges


def test_the_feature_check_of_a_network_with_several_outputs_counts_its_worst_output():
    """A large output close to float32 must not hide a small one that is not."""

    class Outputs:
        def __init__(self, scale):
            self.scale = scale

        def predict(self, batch):
            rows = np.asarray(batch, dtype="float32").reshape(len(batch), -1)
            return [np.repeat(rows, 16, axis=1), rows[:, :8] * self.scale]  # 16x as large, then small

    batch = images(16, seed=1).astype("float32") + 1
    check = int8_module.measure(Outputs(0.8), Outputs(1.0), batch, classifier=False)
    assert check.value == pytest.approx(0.2, rel=1e-4) and not check.passed  # 0.2 at the small one
    concatenated = np.hypot(0, 0.2 * np.linalg.norm(batch.reshape(16, -1)[:, :8])) / np.hypot(
        4 * np.linalg.norm(batch), np.linalg.norm(batch.reshape(16, -1)[:, :8]))
    assert concatenated < int8_module.FEATURE_ERROR  # what one figure over both would have said


def test_a_classifiers_speed_counts_the_float32_pass_over_its_near_ties(caplog, monkeypatch):
    """Int8Engine computes near ties again in float32: where most outputs are near ties, int8
    is no faster than float32, and "auto" must not take it for its bare network's speed."""
    import types

    # The engines' seconds on a clock of the test's own: slept for, they would be measured
    # with whatever the scheduler adds (a worker descheduled for 2 ms inside an int8 pass of
    # 30 us measured a speedup of 6 where 100 was meant).
    clock = [0.0]
    monkeypatch.setattr(int8_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))

    class Classifier:
        def __init__(self, probabilities, seconds):
            self.probabilities, self.seconds = np.asarray(probabilities, dtype="float32"), seconds

        def predict(self, batch):
            clock[0] += self.seconds + 1e-4  # and a small cost of every call
            return np.tile(self.probabilities, (len(batch), 1))

    batch = images(64, seed=1)
    for probabilities, share in (([0.50, 0.49, 0.01], 1.0), ([0.90, 0.05, 0.05], 0.0)):
        check = int8_module.measure(Classifier(probabilities, 0.0), Classifier(probabilities, 0.01), batch,
                                    classifier=True)
        assert check.passed and check.near_ties == share
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="transferkit"):
            int8_module.warn_if_slower(check)  # where int8 was asked for by name
        if share:
            assert check.speedup < 1 and "(100% of them)" in check.describe()
            assert "int8 runs slower than float32 here" in caplog.text
        else:
            assert not caplog.records
            assert check.speedup > 10 * int8_module.AUTO_SPEEDUP and "(0% of them)" in check.describe()


def test_int8_that_falls_short_of_float32_runs_float32_with_a_notice(tmp_path, caplog):
    model = extractor(outlier=300.0)
    exact = float_engine(model, tmp_path)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        engine = int8_engine(model, exact, Int8Samples(images(32, seed=1), images(32, seed=2)), tmp_path,
                             classifier=False, auto=False)
    assert engine is exact
    notice = [record.getMessage() for record in caplog.records if "int8 fell short" in record.getMessage()]
    assert len(notice) == 1 and "feature error" in notice[0] and "running float32" in notice[0]
    samples = Int8Samples(images(32, seed=1), images(32, seed=2))
    stored = int8_module._cached_check(tmp_path / f"openvino-{SIZE}px" / f"{model.name}-int8-{samples.digest()}.xml")
    assert stored is not None and not stored.passed and stored.value > int8_module.FEATURE_ERROR


SATURATION = textwrap.dedent("""
    import json
    import keras
    import numpy as np
    from transferkit.inference.openvino import export_network, openvino_core, quantize_int8
    from transferkit.runtime import int8_saturates

    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Rescaling(1 / 255)(inputs)
    for width, stride in ((64, 1), (64, 1), (128, 2)):
        x = keras.layers.Conv2D(width, 3, strides=stride, padding="same", activation="relu")(x)
    network = export_network(keras.Model(inputs, keras.layers.Conv2D(128, 3, strides=2, padding="same")(x)),
                             (32, 32, 3))
    rng = np.random.default_rng(1)
    pictures = [np.clip(rng.uniform(0, 255, (32, 1, 1, 3)) + rng.uniform(5, 120, (32, 1, 1, 1))
                        * rng.standard_normal((32, 32, 32, 3)), 0, 255).astype("float32") for _ in range(2)]

    def run(net):
        return openvino_core().compile_model(net, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(pictures[1])[0]

    exact = run(network)
    error = {str(seven): float(np.linalg.norm(run(quantize_int8(network, pictures[0], seven)) - exact)
                               / np.linalg.norm(exact)) for seven in (False, True)}
    print(json.dumps({"saturates": int8_saturates(), **error}))
""")


def test_where_int8_products_saturate_the_weights_take_7_bits(tmp_path):
    """oneDNN capped to AVX2 (OpenVINO's too), in a process of its own: int8 convolutions as on
    a CPU without VNNI, whose 16-bit sums of u8 x s8 pairs saturate with 8-bit weights. The
    weights in 7 bits (what ``load_or_convert`` quantizes there) bring int8 closer to float32."""
    done = forked.run([sys.executable, "-c", SATURATION], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                      env={**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["saturates"]
    assert measured["True"] < 0.9 * measured["False"], measured  # measured here: 0.032 against 0.040


def test_the_int8_network_is_kept_for_the_kind_of_cpu_it_was_quantized_for(tmp_path, monkeypatch):
    """7-bit and 8-bit networks are not interchangeable: a cache written on a CPU of one kind is
    quantized anew on the other."""
    from transferkit import runtime

    model = extractor()
    samples = Int8Samples(images(32, seed=1), images(32, seed=2))
    kinds = []
    for saturates in (True, False, True):
        monkeypatch.setattr(runtime, "int8_saturates", lambda saturates=saturates: saturates)
        asked = []
        engine = int8_engine(model, float_engine(model, tmp_path), lambda asked=asked: asked.append(1) or samples,
                             tmp_path, classifier=False, auto=False)
        kinds.append((engine.ir_path.with_suffix(".fingerprint").read_text().split("|")[-1].strip(), len(asked)))
    assert kinds == [("int8-7bit", 1), ("int8", 1), ("int8-7bit", 1)]


def test_predict_in_int8_agrees_with_float32(shapes_run, shapes_dir, tmp_path):
    """Calibrated on the run's own training images (its recorded data folder), checked on held-back
    ones, near ties computed again in float32."""
    from typer.testing import CliRunner

    from transferkit.cli import app

    labels, outputs = {}, {}
    for precision in ("int8", "float32"):
        out = tmp_path / f"{precision}.csv"
        done = CliRunner().invoke(app, ["predict", str(shapes_run.path), str(shapes_dir), "--precision", precision,
                                        "--output", str(out)])
        assert done.exit_code == 0, done.output
        outputs[precision] = done.output
        labels[precision] = np.array([line.split(",")[1] for line in out.read_text().splitlines()[1:]])
    assert "OpenVINO int8" in outputs["int8"] and "top-1 agreement" in outputs["int8"]
    assert "quantizing" in outputs["int8"] and "Statistics collection" not in outputs["int8"]  # NNCF's own bars
    assert "OpenVINO int8" not in outputs["float32"]
    assert len(labels["int8"]) == 30
    assert np.mean(labels["int8"] == labels["float32"]) >= int8_module.AGREEMENT


def test_auto_tries_int8_only_for_work_worth_quantizing():
    assert worth_int8("int8", 1)
    assert not worth_int8("float32", 10**6) and not worth_int8("bfloat16", 10**6)
    assert not worth_int8("auto", int8_module.AUTO_MIN_IMAGES - 1)
    no_fast_bfloat16 = resolve_precision("auto")[0] == "float32"
    assert worth_int8("auto", int8_module.AUTO_MIN_IMAGES) == no_fast_bfloat16


def test_samples_hold_back_images_never_calibrated_on():
    train = np.arange(200, dtype="uint8").reshape(200, 1, 1, 1) * np.ones((1, 2, 2, 3), dtype="uint8")
    val = (train[:10] + 200).astype("uint8")
    samples = samples_from(train, val, seed=0)
    calibrated = set(samples.calibration[:, 0, 0, 0].tolist())
    held = samples.held_back[:, 0, 0, 0].tolist()
    assert len(calibrated) == int8_module.CALIBRATION_IMAGES
    assert len(held) == int8_module.HELD_BACK_IMAGES and sorted(held[:10]) == list(range(200, 210))
    assert not calibrated & set(held)


def test_finetune_trains_in_float32_on_int8_features(shapes_dir, tmp_path):
    from typer.testing import CliRunner

    from transferkit.cli import app

    run = tmp_path / "run"
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("weights = 'none'\nimage_size = 32\nbatch_size = 8\nprecision = 'int8'\n[head]\nunits = [16]\n"
                      "[[stages]]\nepochs = 1\n[[stages]]\nepochs = 1\nunfreeze = 1\nlearning_rate = 1e-5\n")
    done = CliRunner().invoke(app, ["finetune", str(shapes_dir), "--recipe", str(recipe), "--output", str(run)])
    assert done.exit_code == 0, done.output
    assert "forward engine for the feature cache: openvino int8" in done.output
    loaded = transferkit.load_run(run)
    assert loaded.recipe["precision"] == "int8" and loaded.model.dtype_policy.name == "float32"
    guard = loaded.metrics["int8_features"]  # the head's validation loss on int8 features against float32's
    assert guard["stage"] == "stage" and guard["images"] > 0 and isinstance(guard["passed"], bool)
