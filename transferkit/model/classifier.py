"""The classifier: raw pixels in, class probabilities out, built from Keras layers only.

    image (any height x width, RGB 0..255)
      -> Resizing to the recipe's image size        (inside the model)
      -> the backbone's own preprocessing            (inside the model: a fixed 1x1 conv for
                                                      "caffe"; inside the backbone for "included")
      -> backbone (nested model named "backbone")
      -> head (nested model named "head"): pooling, [Dense, BatchNorm, Dropout] x N, output

Because every step is a built-in Keras layer, ``keras.models.load_model("model.keras")``
works in a process that never imports transferkit and predicts the same numbers.
"""

from __future__ import annotations

import numpy as np

from transferkit.backbones import BackboneSpec, get_spec
from transferkit.outputs import output_activation, output_units
from transferkit.recipe import HeadConfig

# ImageNet channel means in BGR order, as the "caffe" weights were trained with.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)

# The hidden layers' kernel initializer per activation where Glorot's is not the fit: SELU
# self-normalises only from LeCun-normal weights.
_KERNEL_INITIALIZERS = {"selu": "lecun_normal"}


def _caffe_layers(image_size: int) -> list:
    """RGB -> BGR and mean subtraction as one frozen 1x1 convolution: a built-in layer, so the
    saved model needs no custom code to load."""
    import keras

    kernel = np.zeros((1, 1, 3, 3), dtype="float32")
    for rgb_channel, bgr_channel in ((0, 2), (1, 1), (2, 0)):
        kernel[0, 0, rgb_channel, bgr_channel] = 1.0
    convert = keras.layers.Conv2D(
        3, 1, use_bias=True, trainable=False, dtype="float32", name="rgb_to_bgr_minus_mean"
    )
    convert.build((None, image_size, image_size, 3))
    convert.set_weights([kernel, -np.asarray(_CAFFE_MEAN_BGR, dtype="float32")])
    return [convert]


# The layers after resizing, per input convention of the registry (BackboneSpec.preprocessing).
# "included": the backbone scales and normalises RGB 0..255 itself (EfficientNetV2, ConvNeXt,
# MobileNetV3 hold Keras's Rescaling / Normalization layers), so the pixels pass as they are.
_CONVENTION_LAYERS = {"caffe": _caffe_layers, "included": lambda image_size: []}


def build_preprocessing(spec: BackboneSpec, image_size: int):
    """Resizing plus the backbone's input convention, as a small Sequential of built-in layers.

    Args:
        spec: the backbone's registry entry.
        image_size: the side the backbone sees.

    Returns:
        A ``keras.Sequential`` named "preprocessing", always computed in float32.
    """
    import keras

    layers = [
        keras.layers.Resizing(
            image_size, image_size, interpolation="bilinear", antialias=True,
            dtype="float32", name="resize",
        )
    ]
    layers.extend(_CONVENTION_LAYERS[spec.preprocessing](image_size))
    model = keras.Sequential(layers, name="preprocessing")
    model.build((None, None, None, 3))
    return model


def build_head(feature_shape: tuple[int, ...], n_classes: int, head: HeadConfig):
    """The new classification head, as a functional model on the backbone's feature maps.

    Args:
        feature_shape: the backbone output shape without the batch axis, e.g. (4, 4, 512).
        n_classes: number of classes (at least 2).
        head: pooling, dense units, their activation, dropout and batchnorm settings.

    Returns:
        A ``keras.Model`` named "head"; its output layer is float32 whatever the policy.
    """
    import keras

    features = keras.Input(shape=feature_shape, name="features")
    if head.pooling == "avg":
        x = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    else:
        x = keras.layers.Flatten(name="pool")(features)
    for index, units in enumerate(head.units, start=1):
        x = keras.layers.Dense(
            units, activation=head.activation, name=f"dense_{index}",
            kernel_initializer=_KERNEL_INITIALIZERS.get(head.activation, "glorot_uniform"),
        )(x)
        if head.batchnorm:
            # momentum 0.9, not Keras's 0.99: small datasets give few steps per epoch, and
            # the moving statistics used at inference must catch up within a few epochs.
            x = keras.layers.BatchNormalization(momentum=0.9, name=f"batchnorm_{index}")(x)
        if head.dropout > 0:
            x = keras.layers.Dropout(head.dropout, name=f"dropout_{index}")(x)
    outputs = keras.layers.Dense(
        output_units(n_classes), activation=output_activation(n_classes), dtype="float32", name="output"
    )(x)
    return keras.Model(features, outputs, name="head")


def build_classifier(backbone, n_classes: int, head: HeadConfig | None = None, backbone_name: str = "vgg16"):
    """Backbone + new head, with resizing and preprocessing inside the model.

    Args:
        backbone: a model from ``load_backbone`` (square input of ``image_size``).
        n_classes: number of classes, at least 2.
        head: head settings; default ``HeadConfig()`` (avg pooling, one Dense(256) with ReLU,
            batchnorm, dropout 0.3).
        backbone_name: registry name of the backbone, for its preprocessing convention;
            default "vgg16". Images are resized to the backbone's input size.

    Returns:
        An uncompiled ``keras.Model`` named "classifier" taking RGB 0..255 of any size.
    """
    import keras

    if n_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
    head = head or HeadConfig()
    spec = get_spec(backbone_name)
    image_size = int(backbone.input_shape[1])
    images = keras.Input(shape=(None, None, 3), name="image")
    x = build_preprocessing(spec, image_size)(images)
    x = backbone(x)
    outputs = build_head(tuple(backbone.output.shape[1:]), n_classes, head)(x)
    return keras.Model(images, outputs, name="classifier")


def calibrate_head_batchnorm(model, features: np.ndarray) -> None:
    """Set the head's BatchNorm moving statistics from real backbone features.

    A fresh BatchNormalization layer starts with moving mean 0 and variance 1, and moves
    towards the true statistics by 1 - momentum per step. Backbone features can have a
    variance far below 1 (random or small-scale weights), and a small dataset gives few
    steps, so at inference the layer would still divide by the initial variance and squash
    every prediction towards one class. Starting from measured statistics avoids that.

    Args:
        model: a classifier from ``build_classifier``.
        features: backbone outputs of some training images (the first
            ``training.features.CALIBRATION_IMAGES`` are enough).
    """
    import keras

    head = model.get_layer("head")
    if not any(isinstance(layer, keras.layers.BatchNormalization) for layer in head.layers):
        return
    values = keras.ops.convert_to_tensor(features)
    for layer in head.layers[1:]:
        if isinstance(layer, keras.layers.BatchNormalization):
            axes = list(range(len(values.shape) - 1))
            as_float = keras.ops.cast(values, "float32")
            layer.moving_mean.assign(keras.ops.mean(as_float, axis=axes))
            layer.moving_variance.assign(keras.ops.var(as_float, axis=axes))
        values = layer(values, training=False)
