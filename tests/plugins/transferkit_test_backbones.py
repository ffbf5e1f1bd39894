"""The suite's backbone: VGG's shape (five blocks of convolution and max-pooling, named as
Keras names VGG16's layers, caffe preprocessing, no BatchNorm) at 98,384 parameters instead
of 14.7 million, so that the many tests whose behaviour does not depend on the architecture
train in a fraction of the time.

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
