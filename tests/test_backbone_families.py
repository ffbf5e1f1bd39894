"""The EfficientNetV2, ConvNeXt and MobileNetV3 families through the parts that look inside a
backbone: the classifier (raw pixels: the backbone normalises them itself), what trains at an
unfreeze depth, BatchNorm folding, the feature cache's split at a block boundary, the OpenVINO
conversion; then one run of the smallest end to end (finetune, predict with the OpenVINO
engine, Grad-CAM, the ONNX export checked in its runtime). One member per family at 32 px:
the members of a family differ in widths and repeats, not in the layers these parts meet."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest

import transferkit
from tests.conftest import TINY
from transferkit.backbones import REGISTRY, load_backbone
from transferkit.backend import weight_gradients
from transferkit.errors import ExportError
from transferkit.model.classifier import build_classifier
from transferkit.model.fold import batchnorm_count, fold_batchnorm
from transferkit.model.surgery import extractor_at, set_trainable, trainable_at, walk_layers
from transferkit.recipe import HeadConfig

FAMILIES = ["efficientnetv2-b0", "convnext-tiny", "mobilenetv3-small"]
SIZE = 32


@functools.cache
def classifier(name):
    """A 3-class classifier on the backbone at 32 px, its BatchNorm given non-trivial
    statistics (fresh ones are the identity, which would let a wrong fold pass)."""
    keras.utils.set_random_seed(0)
    backbone = load_backbone(name, weights="none", input_shape=(SIZE, SIZE, 3))
    model = build_classifier(backbone, 3, HeadConfig(units=(8,), dropout=0.0), backbone_name=name)
    rng = np.random.default_rng(0)
    for layer in walk_layers(model.get_layer("backbone")):
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.1, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
    return model


def images(count=4, seed=1):
    return np.random.default_rng(seed).integers(0, 256, (count, SIZE, SIZE, 3)).astype("float32")


@pytest.mark.parametrize("name", FAMILIES)
def test_family_unfreezes_folds_and_splits_as_the_whole_model_computes(name):
    spec, model = REGISTRY[name], classifier(name)
    # Raw pixels reach the backbone: its own Rescaling / Normalization layers scale them.
    assert [layer.name for layer in model.get_layer("preprocessing").layers] == ["resize"]

    # Unfreeze 2: the last two blocks train, BatchNorm never; LayerNormalization (ConvNeXt)
    # trains with its block, having no moving statistics.
    set_trainable(model, spec, 2)
    backbone = model.get_layer("backbone")
    opened = {len(spec.blocks) - 2, len(spec.blocks) - 1}
    for layer in backbone.layers:
        inner = list(walk_layers(layer)) or [layer]
        for leaf in inner:
            if not leaf.weights:
                continue
            expected = spec.block_of(layer.name) in opened and not isinstance(leaf, keras.layers.BatchNormalization)
            assert leaf.trainable == expected, (layer.name, leaf.name)
    layer_norms = [leaf for leaf in walk_layers(backbone) if isinstance(leaf, keras.layers.LayerNormalization)]
    assert (name == "convnext-tiny") == any(leaf.trainable for leaf in layer_norms)

    # A training step's gradient reaches every block that trains, and is finite.
    loss = keras.losses.SparseCategoricalCrossentropy()
    gradients = weight_gradients(model, lambda outputs: loss(np.array([0, 1, 2, 0]), outputs), images())
    norms = {}
    for weight, gradient in zip(model.trainable_weights, gradients, strict=True):
        norms[id(weight)] = 0.0 if gradient is None else float(np.linalg.norm(gradient))
    assert all(np.isfinite(list(norms.values())))
    layers_of_open_blocks = [layer for layer in backbone.layers if spec.block_of(layer.name) in opened]
    for layer in layers_of_open_blocks:
        assert all(norms.get(id(weight), 0.0) > 0 for weight in layer.trainable_weights), layer.name

    # Eager calls throughout: tracing a predict function per model cost most of this test.
    x = images(seed=2)

    def run(part, inputs):
        return keras.ops.convert_to_numpy(part(inputs, training=False))

    direct = run(model, x)
    # The feature cache's split at the unfreeze boundary computes what the whole model does.
    trainable, _ = trainable_at(model, spec, spec.first_unfrozen(2))
    features = run(extractor_at(model, spec, [spec.first_unfrozen(2)]), x)
    np.testing.assert_allclose(run(trainable, features), direct, rtol=1e-4, atol=1e-5)

    # Folding every BatchNorm (what predict and the cache run) computes the same.
    folded = fold_batchnorm(model, fold_trainable=True)
    np.testing.assert_allclose(run(folded, x), direct, rtol=1e-4, atol=1e-5)
    assert batchnorm_count(folded) == batchnorm_count(model.get_layer("head"))  # the head's Dense -> BN stays
    assert bool(folded.folded_batchnorm) == (name != "convnext-tiny")


def test_efficientnetv2_converts_to_openvino_with_the_models_own_outputs_only():
    """EfficientNetV2's swish made OpenVINO's TensorFlow front end add 55 outputs, which the
    engine took for the model's; the network has exactly the model's outputs, in order (the
    end-to-end test below converts MobileNetV3, the other families convert as they are)."""
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    from transferkit.inference.engines import make_engine

    name = "efficientnetv2-b0"
    spec, model = REGISTRY[name], classifier(name)
    # Two boundaries in the first stages: a small graph to convert, with swish in it.
    extractor = extractor_at(model, spec, [4, 2])
    x = images(seed=3)
    engine = make_engine(extractor, "openvino", precision="float32")
    assert engine.name == "openvino"
    for got, expected in zip(engine.predict(x), extractor(x, training=False), strict=True):
        expected = keras.ops.convert_to_numpy(expected)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_mobilenetv3_small_end_to_end_finetune_predict_explain_export(shapes_dir, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    name = "mobilenetv3-small"
    # --save-h5 is refused before any training: MobileNetV3's model.h5 would not load back.
    with pytest.raises(ExportError, match="mobilenetv3-small cannot be written as h5.*model.keras"):
        transferkit.finetune(shapes_dir, None, {**TINY, "backbone": name}, output=tmp_path / "h5", save_h5=True,
                             verbose=0)
    assert not (tmp_path / "h5").exists()

    run = transferkit.finetune(shapes_dir, None, {**TINY, "backbone": name, "stages.1.unfreeze": 2},
                               output=tmp_path / "run", verbose=0)
    run = transferkit.load_run(tmp_path / "run")
    assert run.backbone == name

    by_keras = transferkit.predict_folder(run, shapes_dir, engine="keras", precision="float32")
    by_openvino = transferkit.predict_folder(run, shapes_dir, engine="openvino", precision="float32")
    assert [row.file for row in by_openvino.rows] == [row.file for row in by_keras.rows]
    assert [row.label for row in by_openvino.rows] == [row.label for row in by_keras.rows]
    np.testing.assert_allclose([row.confidence for row in by_openvino.rows],
                               [row.confidence for row in by_keras.rows], atol=1e-4)

    from transferkit.evaluation.gradcam import explain

    first = sorted(shapes_dir.rglob("*.jpg"))[0]
    explanation = explain(run, first)[0]
    heat = explanation.heatmaps[0].heat
    assert heat.shape == explanation.image.shape[:2] and 0.0 <= heat.min() and heat.max() <= 1.0

    # The export is loaded and compared in its own runtime, in a fresh process. (The OpenVINO
    # export is the engine's conversion, compared with Keras above.)
    (result,) = transferkit.export_run(run, "onnx", data=shapes_dir, samples=16)
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0
