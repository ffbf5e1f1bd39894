import keras
import numpy as np
import pytest

from transferkit.backbones import REGISTRY, load_backbone
from transferkit.model.classifier import build_classifier
from transferkit.model.surgery import extractor_at, trainable_at, walk_layers
from transferkit.recipe import HeadConfig


def build(name, n_classes=3, seed=0):
    keras.utils.set_random_seed(seed)
    backbone = load_backbone(name, weights="none", input_shape=(32, 32, 3))
    return build_classifier(backbone, n_classes, HeadConfig(units=(8,), dropout=0.3), backbone_name=name)


@pytest.mark.parametrize("name, unfreeze, boundary", [
    ("vgg16", 0, ""), ("vgg16", 1, "block4_pool"), ("resnet50", 2, "conv5_block1_out"), ("resnet50", 16, "pool1_pool"),
])
def test_extractor_and_trainable_part_compute_what_the_classifier_computes(name, unfreeze, boundary):
    model, spec = build(name), REGISTRY[name]
    first_open = spec.first_unfrozen(unfreeze)
    trainable, boundary_name = trainable_at(model, spec, first_open)
    assert boundary_name == boundary
    x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    direct = model.predict_on_batch(x)
    via_parts = trainable.predict_on_batch(extractor_at(model, spec, [first_open]).predict_on_batch(x))
    np.testing.assert_allclose(via_parts, direct, rtol=1e-4, atol=1e-5)
    # "all" leaves no frozen part to cut at (the feature cache then trains the whole model).
    assert spec.first_unfrozen("all") <= 0


def test_extractor_at_several_boundaries_gives_each_boundary_its_output():
    model, spec = build("vgg16"), REGISTRY["vgg16"]
    boundaries = [len(spec.blocks), spec.first_unfrozen(1)]
    both = extractor_at(model, spec, boundaries)
    x = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    outputs = both.predict_on_batch(x)
    for boundary, output in zip(boundaries, outputs):
        np.testing.assert_allclose(output, extractor_at(model, spec, [boundary]).predict_on_batch(x), rtol=1e-5)


def test_walk_layers_reaches_every_nested_layer_once_depth_first():
    model = build("vgg16")
    names = [layer.name for layer in walk_layers(model)]
    backbone = model.get_layer("backbone")
    assert names.index("backbone") < names.index("block1_conv1") < names.index("head") < names.index("output")
    assert len(names) == len(set(names))
    assert {layer.name for layer in backbone.layers} <= set(names)
    assert list(walk_layers(keras.layers.Dense(2))) == []
