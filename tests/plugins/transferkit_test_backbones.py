"""The suite's backbones, so that the many tests whose behaviour does not depend on the
architecture train in a fraction of the time:
- ``tinyvgg``: VGG's shape (five blocks of convolution and max-pooling, named as Keras names
  VGG16's layers, caffe preprocessing, no BatchNorm) at 98,384 parameters instead of 14.7
  million;
- ``tinyresnet``: ResNet's (a convolution, BatchNorm and max-pooling stem, then residual
  blocks of two convolutions with BatchNorm, a projection shortcut where the shape changes,
  named as Keras names ResNet50's layers) at 605,888 parameters instead of 23.6 million: for
  the stories that need a backbone with BatchNorm.

It reaches transferkit as any package's backbone does: through the ``transferkit.backbones``
entry point in the ``transferkit_test_backbones-1.0.dist-info`` folder beside this module
(tests/conftest.py puts this folder on ``sys.path`` and ``PYTHONPATH``, as installing the
package would). Tests about the real architectures name them ("vgg16", "resnet50", ...).
"""

from __future__ import annotations

from transferkit.backbones import BackboneSpec

FILTERS = (8, 16, 32, 64, 128)
# Glorot's uniform initialisation at a fifth of its variance: random features of about the
# size VGG16's thirteen random layers give (mean |feature| 0.24 on random images, VGG16 0.11; 13.5 at
# Glorot's own scale, where SGD on them steps so far that float rounding decides a run).
INIT_SCALE = 0.2


def tiny_vgg(include_top: bool = False, weights=None, input_shape=(32, 32, 3)):
    """keras.applications' signature: a notop model, random weights only."""
    import keras

    if include_top or weights is not None:
        raise ValueError("tinyvgg has no top and no pretrained weights")
    inputs = keras.Input(input_shape)
    x = inputs
    for block, filters in enumerate(FILTERS, start=1):
        initializer = keras.initializers.VarianceScaling(INIT_SCALE, "fan_avg", "uniform")
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu", name=f"block{block}_conv1",
                                kernel_initializer=initializer)(x)
        x = keras.layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    return keras.Model(inputs, x, name="tinyvgg")


TINY_VGG = BackboneSpec(
    name="tinyvgg",
    constructor=tiny_vgg,
    preprocessing="caffe",
    min_size=32,
    default_size=32,
    blocks=tuple(f"block{block}" for block in range(1, len(FILTERS) + 1)),
    weights_file="",
    weights_origin="",
    last_conv="block5_conv1",
    parameters=sum(9 * before * after + after for before, after in zip((3, *FILTERS), FILTERS)),
)


# (stage, filters, blocks): one block a stage, two in the last, so that unfreezing two blocks
# opens the last stage, as it does in ResNet50 (conv5_block2 and conv5_block3).
RESNET_STAGES = ((2, 16, 1), (3, 32, 1), (4, 64, 1), (5, 128, 2))
RESNET_BLOCKS = ("conv1",) + tuple(f"conv{stage}_block{block}" for stage, _, count in RESNET_STAGES
                                   for block in range(1, count + 1))


def tiny_resnet(include_top: bool = False, weights=None, input_shape=(32, 32, 3)):
    """keras.applications' signature: a notop model, random weights only."""
    import keras

    layers = keras.layers
    if include_top or weights is not None:
        raise ValueError("tinyresnet has no top and no pretrained weights")

    def batchnorm(name):
        return layers.BatchNormalization(epsilon=1.001e-5, name=name)  # ResNet50's

    inputs = keras.Input(input_shape)
    x = layers.Conv2D(16, 3, padding="same", name="conv1_conv")(inputs)
    x = layers.Activation("relu", name="conv1_relu")(batchnorm("conv1_bn")(x))
    x = layers.MaxPooling2D(2, name="pool1_pool")(x)
    for stage, filters, count in RESNET_STAGES:
        for block in range(1, count + 1):
            name = f"conv{stage}_block{block}"
            stride = 2 if block == 1 and stage > 2 else 1
            shortcut = x
            if block == 1 and (stride > 1 or x.shape[-1] != filters):
                shortcut = layers.Conv2D(filters, 1, strides=stride, name=f"{name}_0_conv")(x)
                shortcut = batchnorm(f"{name}_0_bn")(shortcut)
            y = layers.Conv2D(filters, 3, strides=stride, padding="same", name=f"{name}_1_conv")(x)
            y = layers.Activation("relu", name=f"{name}_1_relu")(batchnorm(f"{name}_1_bn")(y))
            y = batchnorm(f"{name}_2_bn")(layers.Conv2D(filters, 3, padding="same", name=f"{name}_2_conv")(y))
            x = layers.Activation("relu", name=f"{name}_out")(layers.Add(name=f"{name}_add")([shortcut, y]))
    return keras.Model(inputs, x, name="tinyresnet")


TINY_RESNET = BackboneSpec(
    name="tinyresnet",
    constructor=tiny_resnet,
    preprocessing="caffe",
    min_size=32,
    default_size=32,
    blocks=RESNET_BLOCKS,
    weights_file="",
    weights_origin="",
    last_conv=f"{RESNET_BLOCKS[-1]}_out",
    parameters=605_888,
)
