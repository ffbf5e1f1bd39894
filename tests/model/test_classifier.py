import keras
import numpy as np
import pytest

from tests.fresh_process import predict_without_transferkit
from transferkit.backbones import REGISTRY, load_backbone
from transferkit.model.classifier import build_classifier, build_preprocessing
from transferkit.outputs import loss_for
from transferkit.recipe import HeadConfig


def classifier(n_classes, head=None, name="vgg16", size=32):
    backbone = load_backbone(name, weights="none", input_shape=(size, size, 3))
    return build_classifier(backbone, n_classes, head, backbone_name=name)


def test_two_classes_give_one_sigmoid_unit_and_binary_loss():
    model = classifier(2)
    output = model.get_layer("head").get_layer("output")
    assert model.output_shape == (None, 1)
    assert output.activation.__name__ == "sigmoid"
    assert loss_for(2) == "binary_crossentropy"


@pytest.mark.parametrize("n_classes", [3, 7])
def test_more_classes_give_softmax(n_classes):
    model = classifier(n_classes)
    output = model.get_layer("head").get_layer("output")
    assert model.output_shape == (None, n_classes)
    assert output.activation.__name__ == "softmax"
    assert loss_for(n_classes) == "categorical_crossentropy"
    probabilities = model.predict(np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)), verbose=0)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_one_class_is_refused():
    with pytest.raises(ValueError, match="at least 2 classes"):
        classifier(1)


def test_head_layers_follow_the_config():
    model = classifier(3, HeadConfig(pooling="flatten", units=(32, 16), dropout=0.0, batchnorm=False))
    head = model.get_layer("head")
    kinds = [type(layer).__name__ for layer in head.layers]
    assert kinds == ["InputLayer", "Flatten", "Dense", "Dense", "Dense"]
    assert [layer.units for layer in head.layers if isinstance(layer, keras.layers.Dense)] == [32, 16, 3]
    full = classifier(3, HeadConfig(units=(8,), dropout=0.5, batchnorm=True)).get_layer("head")
    kinds = [type(layer).__name__ for layer in full.layers]
    assert kinds == ["InputLayer", "GlobalAveragePooling2D", "Dense", "BatchNormalization", "Dropout", "Dense"]
    assert full.get_layer("dense_1").activation.__name__ == "relu"


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "gelu", "selu"])
def test_head_activation_is_that_of_every_hidden_layer_and_not_of_the_output(activation):
    head = classifier(3, HeadConfig(units=(8, 4), activation=activation)).get_layer("head")
    for name in ("dense_1", "dense_2"):
        assert head.get_layer(name).activation.__name__ == activation
    assert head.get_layer("output").activation.__name__ == "softmax"
    initializer = type(head.get_layer("dense_1").kernel_initializer).__name__
    assert initializer == ("LecunNormal" if activation == "selu" else "GlorotUniform")


def test_images_of_any_size_are_resized_inside_the_model():
    model = classifier(3)
    rng = np.random.default_rng(1)
    for shape in [(1, 17, 90, 3), (2, 32, 32, 3), (1, 300, 200, 3)]:
        assert model.predict(rng.uniform(0, 255, shape), verbose=0).shape == (shape[0], 3)


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_preprocessing_matches_keras_applications(name):
    import keras.applications.resnet50 as resnet50
    import keras.applications.vgg16 as vgg16

    reference = {"vgg16": vgg16.preprocess_input, "resnet50": resnet50.preprocess_input}[name]
    images = np.random.default_rng(2).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    ours = build_preprocessing(REGISTRY[name], 32)(images)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours), reference(images.copy()), atol=1e-4)


def test_saved_model_loads_and_predicts_identically_without_transferkit(tmp_path):
    model = classifier(3, name="resnet50")
    images = np.random.default_rng(3).uniform(0, 255, (4, 45, 37, 3)).astype("float32")
    expected = model.predict(images, verbose=0)
    np.testing.assert_array_equal(predict_without_transferkit(model, images, tmp_path), expected)
