"""The forward engines: OpenVINO agrees with Keras float32, caches its network, falls back."""

from __future__ import annotations

import logging
import os
import sys

import keras
import numpy as np
import pytest

from tests import forked
from transferkit.backbones import load_backbone
from transferkit.errors import EngineError, TransferkitError
from transferkit.inference import engines as engine_module
from transferkit.inference import openvino as openvino_module
from transferkit.inference.engines import make_engine
from transferkit.model.classifier import build_classifier
from transferkit.recipe import HeadConfig
from transferkit.runtime import dtype_policy

pytest.importorskip("openvino")
openvino = openvino_module.import_openvino()  # with its usage telemetry off, as transferkit imports it

SIZE = 32


def images(n, seed=0, size=SIZE):
    """Noisy images around a random colour, of random contrast: features differ between them."""
    rng = np.random.default_rng(seed)
    colour = rng.uniform(0, 255, (n, 1, 1, 3))
    contrast = rng.uniform(5, 120, (n, 1, 1, 1))
    return np.clip(colour + contrast * rng.standard_normal((n, size, size, 3)), 0, 255).astype("float32")


def extractor_of(classifier):
    """Images at the backbone's size -> backbone features, as the feature cache builds it."""
    inputs = keras.Input(shape=(SIZE, SIZE, 3), name="image")
    features = classifier.get_layer("backbone")(classifier.get_layer("preprocessing")(inputs))
    return keras.Model(inputs, features, name="extractor")


def randomize_batchnorm(model, seed):
    """Random BatchNorm statistics, so a random-weight ResNet's outputs are not all alike."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            gamma, beta, mean, variance = layer.get_weights()
            layer.set_weights([
                rng.uniform(0.5, 1.5, gamma.shape).astype("float32"),
                rng.normal(0, 0.2, beta.shape).astype("float32"),
                rng.normal(0, 0.2, mean.shape).astype("float32"),
                rng.uniform(0.5, 2.0, variance.shape).astype("float32"),
            ])


def calibrate_head(model, batch):
    """Head BatchNorm statistics from real activations, so the softmax does not pick one class
    for every image (a random head on random features otherwise does)."""
    head = model.get_layer("head")
    dense = keras.Model(head.input, head.get_layer("dense_1").output)
    activations = np.asarray(dense.predict_on_batch(extractor_of(model).predict_on_batch(batch)), "float32")
    norm = head.get_layer("batchnorm_1")
    gamma, beta, _, _ = norm.get_weights()
    norm.set_weights([gamma, beta, activations.mean(axis=0), activations.var(axis=0) + 1e-3])


def classifier(name, policy="float32", seed=0):
    keras.utils.set_random_seed(seed)
    with dtype_policy(policy):
        backbone = load_backbone(name, weights="none", input_shape=(SIZE, SIZE, 3))
        if name == "resnet50":
            randomize_batchnorm(backbone, seed)
        model = build_classifier(backbone, 5, HeadConfig(units=(32,), dropout=0.3), backbone_name=name)
    calibrate_head(model, images(32, seed=100 + seed))
    return model


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One network cache for the module, so each model is converted once across tests."""
    return tmp_path_factory.mktemp("engine-cache")


@pytest.fixture(scope="module")
def vgg():
    return classifier("vgg16")


@pytest.fixture(scope="module")
def resnet():
    return classifier("resnet50")


def agreement(got, expected):
    got, expected = got.reshape(len(got), -1), expected.reshape(len(expected), -1)
    relative = np.linalg.norm(got - expected) / np.linalg.norm(expected)
    cosine = np.sum(got * expected) / (np.linalg.norm(got) * np.linalg.norm(expected))
    return relative, cosine


def in_batches(engine, batch, size):
    return np.concatenate([engine.predict(batch[i:i + size]) for i in range(0, len(batch), size)])


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_openvino_bf16_features_agree_with_keras_float32_in_partial_batches(name, vgg, resnet, shared_cache):
    extractor = extractor_of(vgg if name == "vgg16" else resnet)
    extractor.name = f"{name}_extractor"
    batch = images(10)
    expected = np.asarray(extractor.predict_on_batch(batch))
    engine = make_engine(extractor, "openvino", precision="bfloat16", cache_dir=shared_cache)
    assert engine.name == "openvino" and engine.precision_hint == "bf16"
    got = in_batches(engine, batch, 4)  # 4 + 4 + a partial batch of 2
    assert got.shape == expected.shape and got.dtype == np.float32
    relative, cosine = agreement(got, expected)
    assert relative < 2e-2 and cosine > 0.999, (relative, cosine)


def test_openvino_f32_hint_matches_keras_float32_closely(resnet, shared_cache):
    extractor = extractor_of(resnet)
    extractor.name = "resnet50_extractor"
    batch = images(5, seed=1)
    engine = make_engine(extractor, "openvino", precision="float32", cache_dir=shared_cache)
    relative, _ = agreement(engine.predict(batch), np.asarray(extractor.predict_on_batch(batch)))
    assert relative < 1e-4


def test_a_network_reduced_to_one_output_computes_it_as_the_whole_one_does(shared_cache, tmp_path):
    """output_alone: a two-output feature network (the cache's, for a head and a fine
    stage) reduced to its shallower output gives that output's very values, with one output;
    a network not on disk, or of one output, is itself."""
    keras.utils.set_random_seed(4)
    vgg = load_backbone("vgg16", weights="none", input_shape=(SIZE, SIZE, 3))
    both = keras.Model(vgg.input, [vgg.get_layer("block4_pool").output, vgg.output], name="two_outputs")
    engine = make_engine(both, "openvino", precision="float32", cache_dir=shared_cache, input_dtype="uint8")
    decoded = np.rint(images(5, seed=6)).astype("uint8")
    shallow, deep = engine.predict(decoded)
    alone = engine.output_alone(0)
    assert alone is not engine and len(alone._outputs) == 1 and alone.input_dtype == "uint8"
    assert "block5" not in " ".join(op.get_friendly_name() for op in alone._compiled.get_runtime_model().get_ops())
    np.testing.assert_array_equal(alone.predict(decoded), shallow)
    np.testing.assert_array_equal(engine.output_alone(1).predict(decoded), deep)
    assert alone.output_alone(0) is alone
    in_memory = make_engine(both, "openvino", precision="float32")
    assert in_memory.ir_path is None and in_memory.output_alone(0) is in_memory


def test_uint8_input_network_computes_what_the_float_one_does(resnet, shared_cache):
    """input_dtype="uint8": the decoded images go in as they are and the network converts
    them; the outputs are those of the float32-input network on the same values."""
    extractor = extractor_of(resnet)
    extractor.name = "resnet50_extractor"
    decoded = np.rint(images(6, seed=3)).astype("uint8")
    floats = make_engine(extractor, "openvino", precision="float32", cache_dir=shared_cache)
    direct = make_engine(extractor, "openvino", precision="float32", cache_dir=shared_cache, input_dtype="uint8")
    assert direct.input_dtype == "uint8" and floats.input_dtype == "float32"
    np.testing.assert_allclose(direct.predict(decoded), floats.predict(decoded.astype("float32")),
                               rtol=1e-5, atol=1e-5)
    # a float32-input engine takes uint8 too (converted before the call)
    np.testing.assert_array_equal(floats.predict(decoded), floats.predict(decoded.astype("float32")))
    with pytest.raises(ValueError, match="takes uint8 images, got float32"):
        direct.predict(decoded.astype("float32"))
    with pytest.raises(ValueError, match="input_dtype='uint8' is for image networks"):
        make_engine(resnet.get_layer("head"), "openvino", input_dtype="uint8")
    with pytest.raises(ValueError, match="input_dtype must be"):
        make_engine(extractor, "openvino", input_dtype="float16")


def test_openvino_classifier_top1_agrees_with_keras(vgg, shared_cache):
    batch = images(32, seed=2)
    expected = np.asarray(vgg.predict_on_batch(batch))
    # The head's outputs must differ between images, or top-1 agreement means nothing.
    assert len(set(expected.argmax(axis=1))) >= 3
    engine = make_engine(
        vgg, "openvino", input_shape=(SIZE, SIZE, 3), precision="bfloat16", cache_dir=shared_cache
    )
    got = in_batches(engine, batch, 12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-3)
    assert np.abs(got - expected).max() < 0.05
    # A random network has near ties that bf16 rounding may decide either way; picking the
    # other of two classes within 0.02 of each other (in Keras) still counts as agreeing.
    rows = np.arange(len(batch))
    near_tie = expected[rows, expected.argmax(axis=1)] - expected[rows, got.argmax(axis=1)] < 0.02
    assert np.mean((got.argmax(axis=1) == expected.argmax(axis=1)) | near_tie) >= 0.95


def test_mixed_bfloat16_model_is_exported_as_its_float32_twin(vgg):
    mixed = classifier("vgg16", policy="mixed_bfloat16")
    mixed.set_weights(vgg.get_weights())
    batch = images(6, seed=3)
    engine = make_engine(mixed, "openvino", input_shape=(SIZE, SIZE, 3), precision="float32")
    relative, _ = agreement(engine.predict(batch), np.asarray(vgg.predict_on_batch(batch)))
    assert relative < 1e-4


def test_network_is_cached_per_size_and_reused(vgg, tmp_path, monkeypatch):
    first = make_engine(vgg, "openvino", input_shape=(SIZE, SIZE, 3), cache_dir=tmp_path)
    xml = tmp_path / f"openvino-{SIZE}px" / "classifier.xml"
    assert first.ir_path == xml and xml.is_file() and xml.with_suffix(".bin").is_file()

    def no_export(*args, **kwargs):
        raise AssertionError("the cached network should have been reused")

    monkeypatch.setattr(openvino_module, "export_network", no_export)
    again = make_engine(vgg, "openvino", input_shape=(SIZE, SIZE, 3), cache_dir=tmp_path)
    assert again.name == "openvino" and again.ir_path == xml
    batch = images(3, seed=4)
    np.testing.assert_allclose(again.predict(batch), first.predict(batch), rtol=1e-5, atol=1e-6)


def test_the_same_classifier_built_again_in_one_process_reuses_its_network(tmp_path, monkeypatch):
    """Keras numbers the names it makes up per process (input_layer_3, then input_layer_7):
    a second finetune or tune trial in the same process must still find its networks."""
    first, again = classifier("vgg16", seed=5), classifier("vgg16", seed=5)
    assert first.get_config() != again.get_config()  # the names Keras made up differ
    assert openvino_module.model_fingerprint(first, SIZE) == openvino_module.model_fingerprint(again, SIZE)
    calls = []
    export = openvino_module.export_network
    monkeypatch.setattr(openvino_module, "export_network", lambda *a: calls.append(1) or export(*a))
    make_engine(first, "openvino", input_shape=(SIZE, SIZE, 3), cache_dir=tmp_path, precision="float32")
    engine = make_engine(again, "openvino", input_shape=(SIZE, SIZE, 3), cache_dir=tmp_path, precision="float32")
    assert len(calls) == 1
    batch = images(4, seed=6)
    np.testing.assert_allclose(engine.predict(batch), again.predict_on_batch(batch), rtol=1e-4, atol=1e-5)

    # Wiring still counts: the same layers and weights, the sum's first input another layer's
    # output, is another network.
    def skip_from(source):
        keras.utils.set_random_seed(0)
        x = keras.Input(shape=(4,))
        h = keras.layers.Dense(4)(x)
        o = keras.layers.Dense(4)(h)
        return keras.Model(x, keras.layers.Add()([h if source == "h" else x, o]))

    from_h, from_x = skip_from("h"), skip_from("x")
    assert all(np.array_equal(a, b) for a, b in zip(from_h.get_weights(), from_x.get_weights(), strict=True))
    assert openvino_module.model_fingerprint(from_h, (4,)) != openvino_module.model_fingerprint(from_x, (4,))
    assert openvino_module.model_fingerprint(from_h, (4,)) == openvino_module.model_fingerprint(skip_from("h"), (4,))


def test_changed_weights_are_converted_again(tmp_path, monkeypatch):
    model = classifier("vgg16", seed=5)
    calls = []
    export = openvino_module.export_network
    monkeypatch.setattr(openvino_module, "export_network", lambda *a: calls.append(1) or export(*a))
    make_engine(model, "openvino", input_shape=(SIZE, SIZE, 3), cache_dir=tmp_path)
    model.get_layer("head").get_layer("output").kernel.assign(
        np.ones(model.get_layer("head").get_layer("output").kernel.shape, dtype="float32")
    )
    engine = make_engine(model, "openvino", input_shape=(SIZE, SIZE, 3), cache_dir=tmp_path)
    assert len(calls) == 2
    batch = images(4, seed=6)
    np.testing.assert_allclose(engine.predict(batch), model.predict_on_batch(batch), atol=1e-2)


def test_unwritable_cache_folder_falls_back_to_the_temp_folder(vgg, tmp_path, monkeypatch):
    monkeypatch.setattr(openvino_module.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    blocker = tmp_path / "run"
    blocker.write_text("a file where the run's cache folder would go")
    engine = make_engine(vgg, "openvino", input_shape=(SIZE, SIZE, 3), cache_dir=blocker / ".engine")
    assert engine.name == "openvino"
    assert engine.ir_path.is_file() and (tmp_path / "tmp") in engine.ir_path.parents


def test_keras_engine_when_asked_or_when_a_gpu_is_visible(vgg, monkeypatch):
    batch = images(3)
    keras_engine = make_engine(vgg, "keras")
    assert keras_engine.name == "keras"
    np.testing.assert_array_equal(keras_engine.predict(batch), vgg.predict_on_batch(batch))
    monkeypatch.setattr(engine_module, "gpu_visible", lambda: True)
    assert make_engine(vgg, "auto", input_shape=(SIZE, SIZE, 3)).name == "keras"


def test_conversion_failure_falls_back_to_keras_with_one_warning(vgg, monkeypatch, caplog):
    def broken(*args, **kwargs):
        raise RuntimeError("No conversion rule found for operations: ScaleAndTranslate\nmore")

    monkeypatch.setattr(openvino_module, "export_network", broken)
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        engine = make_engine(vgg, "auto", input_shape=(SIZE, SIZE, 3))
    assert engine.name == "keras"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "conversion" in warnings[0] and "ScaleAndTranslate" in warnings[0] and "using Keras" in warnings[0]
    assert "\n" not in warnings[0]


def test_images_of_another_size_than_the_resize_fall_back_to_keras(vgg, caplog):
    # Only a same-size resize is the identity; the antialiased resize op has no OpenVINO form.
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        engine = make_engine(vgg, "openvino", input_shape=(SIZE + 8, SIZE + 8, 3))
    assert engine.name == "keras"
    assert "ScaleAndTranslate" in caplog.text
    assert engine.predict(images(2, size=SIZE + 8)).shape == (2, 5)


def test_missing_openvino_fails_only_when_asked_for(vgg, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    with pytest.raises(EngineError, match="pip install openvino") as raised:
        make_engine(vgg, "openvino", input_shape=(SIZE, SIZE, 3))
    assert isinstance(raised.value, TransferkitError)
    assert make_engine(vgg, "auto", input_shape=(SIZE, SIZE, 3)).name == "keras"


def test_wrong_batch_shape_and_unknown_engine_are_refused(vgg, shared_cache):
    engine = make_engine(vgg, "openvino", input_shape=(SIZE, SIZE, 3), cache_dir=shared_cache)
    with pytest.raises(ValueError, match=f"{SIZE} px"):
        engine.predict(images(2, size=SIZE + 8))
    assert engine.predict(images(0)).shape == (0, 5)
    with pytest.raises(ValueError, match="auto, keras, openvino"):
        make_engine(vgg, "tensorrt")
    with pytest.raises(ValueError, match="input_shape"):
        make_engine(vgg, "openvino")  # the classifier takes any size: S must be given


def test_openvino_is_used_with_its_telemetry_off(tmp_path):
    """OpenVINO sends usage events on import unless its telemetry package is unavailable."""
    import textwrap

    script = textwrap.dedent(
        """
        import sys
        from transferkit.inference.openvino import import_openvino
        import_openvino()
        import openvino.tools.ovc.telemetry_utils as utils
        assert sys.modules["openvino_telemetry"] is None
        assert utils.tm.__name__ == "openvino.tools.ovc.telemetry_stub", utils.tm
        """
    )
    env = {**os.environ, "HOME": str(tmp_path)}
    env.pop("CI", None)  # CI=true switches telemetry off by itself; test without it
    result = forked.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (tmp_path / "intel").exists()


def test_classifier_in_16_bits_runs_its_head_in_float32_and_near_ties_again(tmp_path, monkeypatch):
    """inference_engine splits a classifier: body in bfloat16, head in float32 (the output
    layer stays float32, as in Keras mixed precision); rows whose top-two margin is below
    REFINE_MARGIN are computed again in float32 and so equal float32 Keras."""
    import transferkit.runtime
    from transferkit.inference.engines import ChainedEngine, inference_engine
    from transferkit.outputs import top_margin

    model = classifier("vgg16", seed=7)
    only_16_bits = inference_engine(model, "openvino", SIZE, cache_dir=tmp_path, precision="bfloat16")
    assert isinstance(only_16_bits, ChainedEngine) and only_16_bits.exact is None
    # "auto" on a CPU with bfloat16 (whatever this one has)
    monkeypatch.setattr(transferkit.runtime, "resolve_precision", lambda precision: ("mixed_bfloat16", "test"))
    engine = inference_engine(model, "openvino", SIZE, cache_dir=tmp_path, precision="auto")
    assert isinstance(engine, ChainedEngine)
    assert engine.body.precision_hint == "bf16" and engine.head.precision_hint == "f32"
    assert engine.ir_path is not None and engine.ir_path.is_file()
    batch = images(12, seed=8)
    features = engine.body.predict(batch)
    sixteen_bit = engine.head.predict(features)
    # the head is float32: given the body's features it computes what Keras does
    np.testing.assert_allclose(sixteen_bit, model.get_layer("head").predict_on_batch(features), rtol=1e-4, atol=1e-6)
    margins = top_margin(sixteen_bit)
    # The threshold sits in the widest gap between the 4th and 9th smallest margins, so no
    # image is within 16-bit noise of it (OpenVINO's bfloat16 results can differ slightly
    # from one call to the next).
    ordered = np.sort(margins)
    gap = 4 + int(np.argmax(np.diff(ordered)[3:8]))
    monkeypatch.setattr(engine_module, "REFINE_MARGIN", float(ordered[gap - 1] + ordered[gap]) / 2)
    near = margins < engine_module.REFINE_MARGIN
    assert near.sum() == gap
    looks = []
    first_look = engine.first_look
    monkeypatch.setattr(engine, "first_look", lambda images: looks.append(first_look(images)) or looks[-1])
    got = engine.predict(batch)
    (looked, looked_near), = looks
    np.testing.assert_array_equal(looked_near, np.flatnonzero(near))
    assert engine.refined == near.sum()
    # the other rows are the 16-bit ones as that call computed them; near ties are float32
    np.testing.assert_array_equal(got[~near], looked[~near])
    np.testing.assert_allclose(looked[~near], sixteen_bit[~near], rtol=2e-2, atol=2e-3)
    np.testing.assert_allclose(got[near], model.predict_on_batch(batch)[near], rtol=1e-4, atol=1e-6)
    exact = inference_engine(model, "openvino", SIZE, cache_dir=tmp_path, precision="float32")
    assert not isinstance(exact, ChainedEngine)
    # Built as predict builds it (uint8 images in): the body and the float32 network for
    # near ties both take the decoded images, and compute what the float-input ones do.
    decoded = np.rint(batch).astype("uint8")
    direct = inference_engine(model, "openvino", SIZE, cache_dir=tmp_path, precision="auto", input_dtype="uint8")
    assert direct.body.input_dtype == "uint8" and direct.exact.input_dtype == "uint8"
    relative, cosine = agreement(direct.body.predict(decoded), engine.body.predict(decoded.astype("float32")))
    assert relative < 1e-2 and cosine > 0.9999, (relative, cosine)
    np.testing.assert_allclose(direct.exact.predict(decoded), engine.exact.predict(decoded.astype("float32")),
                               rtol=1e-5, atol=1e-6)
    outputs, near_direct = direct.first_look(decoded)
    assert len(near_direct) and direct.predict(decoded).shape == outputs.shape


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priority is a Linux feature")
def test_helper_threads_yield_the_cores_to_the_engine_and_only_they():
    import os
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from transferkit.inference.engines import yield_to_engine

    main = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    with ThreadPoolExecutor(max_workers=1, initializer=yield_to_engine) as pool:
        helper = pool.submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert helper == min(main + 10, 19)
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main


def test_compiled_network_is_cached_beside_the_converted_one_and_reused(vgg, tmp_path, monkeypatch):
    """OpenVINO's own compiled-model cache (CACHE_DIR) sits in the engine cache folder: the
    first engine fills it, the next build of the same network loads its blob instead of
    compiling."""
    core = openvino_module.openvino_core()
    configs, compiled_models = [], []

    class RecordingCore:
        def compile_model(self, network, device, config):
            configs.append(dict(config))
            compiled_models.append(core.compile_model(network, device, config))
            return compiled_models[-1]

        def __getattr__(self, name):
            return getattr(core, name)

    monkeypatch.setattr(openvino_module, "openvino_core", lambda: RecordingCore())
    compiled = tmp_path / "compiled"
    first = make_engine(vgg, "openvino", input_shape=(SIZE, SIZE, 3), cache_dir=tmp_path, precision="float32")
    assert first.name == "openvino"
    assert configs[-1]["CACHE_DIR"] == str(compiled) == str(openvino_module.compiled_cache_dir(first.ir_path))
    blobs = sorted(compiled.glob("*.blob"))
    assert blobs, "the first compile should have written a blob"
    assert compiled_models[-1].get_property("LOADED_FROM_CACHE") is False
    again = make_engine(vgg, "openvino", input_shape=(SIZE, SIZE, 3), cache_dir=tmp_path, precision="float32")
    assert configs[-1]["CACHE_DIR"] == str(compiled)
    assert compiled_models[-1].get_property("LOADED_FROM_CACHE") is True
    assert sorted(compiled.glob("*.blob")) == blobs
    batch = images(3, seed=9)
    np.testing.assert_allclose(again.predict(batch), first.predict(batch), rtol=1e-5, atol=1e-6)
    # without a cache folder nothing is written anywhere
    make_engine(vgg, "openvino", input_shape=(SIZE, SIZE, 3), precision="float32")
    assert "CACHE_DIR" not in configs[-1]


def test_chained_engine_repr_shows_its_body_and_head(tmp_path):
    from transferkit.inference.engines import ChainedEngine, inference_engine

    model = classifier("vgg16", seed=7)
    engine = inference_engine(model, "openvino", SIZE, cache_dir=tmp_path, precision="bfloat16")
    assert isinstance(engine, ChainedEngine)
    text = repr(engine)
    assert text.startswith("<ChainedEngine body=<OpenVINOEngine bf16, 32px")
    assert "head=<OpenVINOEngine f32, 1x1x512" in text or "head=<OpenVINOEngine f32" in text
    assert "16 bits only" in text and text.endswith(">")


def test_a_part_of_a_bfloat16_model_that_starts_inside_it_runs_on_openvino_in_float32(caplog):
    """The blocks above a boundary of a mixed_bfloat16 classifier take bfloat16 tensors: their
    float32 copy for conversion takes float32 ones (else its first operation is a cast that
    OpenVINO cannot compile, and Keras would run it) and gives the float32 model's values."""
    from transferkit.backbones import REGISTRY
    from transferkit.model.surgery import trainable_at

    spec = REGISTRY["vgg16"]
    mixed = classifier("vgg16", "mixed_bfloat16", seed=4)
    part = trainable_at(mixed, spec, len(spec.blocks) - 1)[0].get_layer("open_part")
    assert str(part.inputs[0].dtype) == "bfloat16"
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        engine = make_engine(part, "openvino", input_shape=(2, 2, 512), precision="float32")
    assert engine.name == "openvino" and not caplog.records
    exact = classifier("vgg16", seed=4)  # the same weights, in float32
    exact_part = trainable_at(exact, spec, len(spec.blocks) - 1)[0].get_layer("open_part")
    features = np.random.default_rng(0).random((8, 2, 2, 512), dtype="float32")
    relative, cosine = agreement(engine.predict(features), np.asarray(exact_part.predict_on_batch(features)))
    assert relative < 1e-4 and cosine > 0.9999


def _with_nested_sequential(policy: str, seed: int) -> keras.Model:
    """A model built as keras.applications builds ConvNeXt: a Sequential made inside it and
    called on its (in mixed_bfloat16: bfloat16) tensors, so the Sequential's input is 16-bit."""
    keras.utils.set_random_seed(seed)
    with dtype_policy(policy):
        inputs = keras.Input((16, 16, 3))
        x = keras.layers.Conv2D(8, 3, padding="same", name="first")(inputs)
        x = keras.Sequential([keras.layers.Conv2D(8, 2, strides=2, name="down"),
                              keras.layers.LayerNormalization(epsilon=1e-6, name="norm")], name="stem")(x)
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
        outputs = keras.layers.Dense(4, dtype="float32", name="out")(x)
        return keras.Model(inputs, outputs)


def test_a_model_nested_in_a_bfloat16_model_is_converted_with_float32_inputs(caplog):
    """A nested model of a mixed_bfloat16 model (ConvNeXt's stem and downsampling layers) takes
    bfloat16 tensors: its float32 copy for conversion takes float32 ones (clone_model's own
    recursion kept the bfloat16 input, a cast OpenVINO could not compile, so Keras ran every
    ConvNeXt feature pass in bfloat16) and gives the float32 model's values."""
    mixed = _with_nested_sequential("mixed_bfloat16", seed=3)
    assert str(mixed.get_layer("stem").inputs[0].dtype) == "bfloat16"
    clone = openvino_module.float32_clone(mixed)
    assert str(clone.get_layer("stem").inputs[0].dtype) == "float32"
    with caplog.at_level(logging.WARNING, logger="transferkit"):
        engine = make_engine(mixed, "openvino", precision="float32")
    assert engine.name == "openvino" and not caplog.records
    exact = _with_nested_sequential("float32", seed=3)  # the same weights, in float32
    batch = images(8, seed=5, size=16).astype("float32")
    relative, cosine = agreement(engine.predict(batch), np.asarray(exact.predict_on_batch(batch)))
    assert relative < 1e-4 and cosine > 0.9999


def test_a_new_conversion_revision_converts_cached_networks_again(monkeypatch):
    """Networks cached by an earlier release's conversion (one that did not compile, say) are
    not found once the conversion changed: CONVERSION_REVISION is part of the fingerprint."""
    model = _with_nested_sequential("float32", seed=1)
    before = openvino_module.model_fingerprint(model, 16)
    assert openvino_module.model_fingerprint(model, 16) == before
    monkeypatch.setattr(openvino_module, "CONVERSION_REVISION", openvino_module.CONVERSION_REVISION + 1)
    assert openvino_module.model_fingerprint(model, 16) != before


def test_a_float32_model_is_converted_as_it_is_and_others_through_their_float32_clone():
    """Conversion clones a model only where the clone changes something (a 16-bit policy, a
    Resizing, a fixed Normalization): a float32 one (a folded frozen part) is traced itself,
    with the same values."""
    plain = _with_nested_sequential("float32", seed=3)
    assert openvino_module.float32_clone(plain) is plain
    batch = images(8, seed=5, size=16).astype("float32")
    engine = make_engine(plain, "openvino", precision="float32")
    relative, cosine = agreement(engine.predict(batch), np.asarray(plain.predict_on_batch(batch)))
    assert relative < 1e-4 and cosine > 0.9999
    mixed = _with_nested_sequential("mixed_bfloat16", seed=3)
    assert openvino_module.float32_clone(mixed) is not mixed
    inputs = keras.Input((16, 16, 3))
    resized = keras.Model(inputs, keras.layers.Conv2D(2, 3)(keras.layers.Resizing(16, 16)(inputs)))
    assert not openvino_module._float32_already(resized) and openvino_module._float32_already(plain)
    assert openvino_module.float32_clone(resized) is not resized
    normalized = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Normalization(mean=[0.5] * 3,
                                                                                        variance=[0.2] * 3)])
    assert not openvino_module._float32_already(normalized)
