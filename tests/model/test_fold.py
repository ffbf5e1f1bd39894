import keras
import numpy as np
import pytest

from tests.fresh_process import predict_without_transferkit
from transferkit.backbones import REGISTRY, load_backbone
from transferkit.model.classifier import build_classifier
from transferkit.model.fold import batchnorm_count, fold_batchnorm
from transferkit.model.surgery import set_trainable, walk_layers
from transferkit.runtime import dtype_policy

SIZE = 32
RESNET50 = REGISTRY["resnet50"]


def give_batchnorm_statistics(model, seed=0):
    """Fresh BatchNorm layers are the identity (mean 0, variance 1, gamma 1, beta 0), which
    would let a wrong fold pass: give every one non-trivial values."""
    rng = np.random.default_rng(seed)
    for layer in walk_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.moving_mean.shape[0]
            layer.moving_mean.assign(rng.normal(0.0, 0.3, channels))
            layer.moving_variance.assign(rng.uniform(0.3, 3.0, channels))
            if layer.scale:
                layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            if layer.center:
                layer.beta.assign(rng.normal(0.0, 0.3, channels))
    return model


def frozen_resnet50(policy="float32"):
    with dtype_policy(policy):
        backbone = load_backbone("resnet50", weights="none", input_shape=(SIZE, SIZE, 3))
    backbone.trainable = False
    return give_batchnorm_statistics(backbone)


def resnet50_classifier(unfreeze):
    backbone = load_backbone("resnet50", weights="none", input_shape=(SIZE, SIZE, 3))
    classifier = build_classifier(backbone, 3, backbone_name="resnet50")
    give_batchnorm_statistics(classifier)
    set_trainable(classifier, RESNET50, unfreeze)
    return classifier


def images(shape=(3, SIZE, SIZE, 3), seed=1):
    return np.random.default_rng(seed).uniform(-100, 100, shape).astype("float32")


def relative_error(expected, actual):
    expected, actual = np.asarray(expected, "float64"), np.asarray(actual, "float64")
    return np.linalg.norm(actual - expected) / np.linalg.norm(expected)


def cosine(expected, actual):
    expected, actual = np.ravel(expected).astype("float64"), np.ravel(actual).astype("float64")
    return expected @ actual / (np.linalg.norm(expected) * np.linalg.norm(actual))


def test_frozen_resnet50_folds_every_batchnorm_and_matches_in_float32():
    backbone = frozen_resnet50()
    folded = fold_batchnorm(backbone)
    x = images()
    expected = keras.ops.convert_to_numpy(backbone(x, training=False))
    actual = keras.ops.convert_to_numpy(folded(x, training=False))
    assert relative_error(expected, actual) < 1e-4
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert batchnorm_count(backbone) == 53 and batchnorm_count(folded) == 0
    assert len(folded.folded_batchnorm) == 53
    # Same names (BackboneSpec.block_of keeps working), BatchNorm now an Identity.
    assert [layer.name for layer in folded.layers] == [layer.name for layer in backbone.layers]
    assert isinstance(folded.get_layer("conv1_bn"), keras.layers.Identity)
    assert folded.get_layer("conv2_block1_1_conv").use_bias
    assert not folded.trainable and not folded.trainable_weights
    # The original is left as it was.
    assert isinstance(backbone.get_layer("conv1_bn"), keras.layers.BatchNormalization)


def test_folding_keeps_mixed_bfloat16_and_matches_within_bf16_tolerance():
    backbone = frozen_resnet50("mixed_bfloat16")
    folded = fold_batchnorm(backbone)
    for original, copy in zip(walk_layers(backbone), walk_layers(folded)):
        assert copy.dtype_policy.name == original.dtype_policy.name, original.name
    assert folded.get_layer("conv1_conv").dtype_policy.name == "mixed_bfloat16"
    x = images()
    expected = keras.ops.convert_to_numpy(backbone(x, training=False)).astype("float32")
    actual = keras.ops.convert_to_numpy(folded(x, training=False)).astype("float32")
    assert cosine(expected, actual) > 0.999
    assert relative_error(expected, actual) < 2e-2
    # Against float32 with the same weights, folding costs no accuracy bf16 did not lose.
    reference_model = frozen_resnet50("float32")
    reference_model.set_weights(backbone.get_weights())
    reference = keras.ops.convert_to_numpy(reference_model(x, training=False))
    assert relative_error(reference, actual) < max(2e-2, 1.5 * relative_error(reference, expected))


def test_partly_unfrozen_classifier_keeps_batchnorm_after_training_convolutions():
    """What a stage's feature pass and the Keras engine fold: the frozen pairs only."""
    classifier = resnet50_classifier(unfreeze=2)
    folded = fold_batchnorm(classifier)
    backbone, folded_backbone = classifier.get_layer("backbone"), folded.get_layer("backbone")
    training_blocks = {RESNET50.blocks.index(name) for name in ("conv5_block2", "conv5_block3")}
    for layer in backbone.layers:
        copy = folded_backbone.get_layer(layer.name)
        assert copy.trainable == layer.trainable, layer.name
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        if RESNET50.block_of(layer.name) in training_blocks:
            assert isinstance(copy, keras.layers.BatchNormalization), layer.name
            conv = backbone.get_layer(layer.name[: -len("bn")] + "conv")
            assert conv.trainable
            for expected, actual in zip(conv.get_weights(), folded_backbone.get_layer(conv.name).get_weights()):
                np.testing.assert_array_equal(actual, expected)
        else:
            assert isinstance(copy, keras.layers.Identity), layer.name
    assert batchnorm_count(folded_backbone) == 6
    # The head's BatchNorm follows a Dense layer: not folded, weights copied.
    head, folded_head = classifier.get_layer("head"), folded.get_layer("head")
    for expected, actual in zip(head.get_weights(), folded_head.get_weights()):
        np.testing.assert_array_equal(actual, expected)
    assert len(folded.trainable_weights) == len(classifier.trainable_weights)
    x = images((3, 41, 29, 3))
    expected = keras.ops.convert_to_numpy(classifier(x, training=False))
    actual = keras.ops.convert_to_numpy(folded(x, training=False))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6)


def test_folded_classifier_loads_and_predicts_identically_without_transferkit(tmp_path):
    folded = fold_batchnorm(resnet50_classifier(unfreeze=0))
    assert batchnorm_count(folded.get_layer("backbone")) == 0
    x = images((4, 45, 37, 3))
    expected = folded.predict(x, verbose=0)
    check = """
        backbone = model.get_layer("backbone")
        assert not any(isinstance(l, keras.layers.BatchNormalization) for l in backbone.layers)
    """
    np.testing.assert_array_equal(predict_without_transferkit(folded, x, tmp_path, check), expected)


def small_model(**batchnorm_options):
    """Conv (no bias) -> BN and DepthwiseConv (multiplier 2) -> BN, in a Sequential."""
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, use_bias=False, name="conv"),
        keras.layers.BatchNormalization(name="conv_bn", **batchnorm_options),
        keras.layers.ReLU(name="relu"),
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2, name="depthwise"),
        keras.layers.BatchNormalization(name="depthwise_bn", **batchnorm_options),
    ])
    return give_batchnorm_statistics(model, seed=3)


@pytest.mark.parametrize(
    "options", [{}, {"center": False}, {"scale": False}, {"center": False, "scale": False}]
)
def test_sequential_depthwise_and_bias_free_convolutions_fold_exactly(options):
    model = small_model(**options)
    model.trainable = False
    folded = fold_batchnorm(model)
    assert isinstance(folded, keras.Sequential)
    assert folded.folded_batchnorm == ("conv_bn", "depthwise_bn")
    assert batchnorm_count(folded) == 0
    x = images((2, 8, 8, 3), seed=4)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(folded(x)), keras.ops.convert_to_numpy(model(x, training=False)),
        rtol=1e-5, atol=1e-4,
    )


def test_trainable_pairs_fold_only_when_asked():
    model = small_model()
    assert fold_batchnorm(model).folded_batchnorm == ()
    assert batchnorm_count(fold_batchnorm(model, fold_trainable=True)) == 0


def test_convolution_with_another_consumer_or_an_activation_is_not_folded():
    inputs = keras.Input((8, 8, 3))
    shared = keras.layers.Conv2D(4, 3, name="shared")(inputs)
    branch = keras.layers.BatchNormalization(name="shared_bn")(shared)
    x = keras.layers.Add(name="add")([shared, branch])
    x = keras.layers.Conv2D(4, 3, activation="relu", name="activated")(x)
    x = keras.layers.BatchNormalization(name="activated_bn")(x)
    model = keras.Model(inputs, x)
    model.trainable = False
    assert fold_batchnorm(model).folded_batchnorm == ()


def test_vgg16_has_nothing_to_fold_and_gives_an_equivalent_model():
    backbone = load_backbone("vgg16", weights="none", input_shape=(SIZE, SIZE, 3))
    backbone.trainable = False
    folded = fold_batchnorm(backbone)
    assert folded.folded_batchnorm == ()
    x = images()
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(folded(x)), keras.ops.convert_to_numpy(backbone(x))
    )
