"""Fold frozen BatchNormalization layers into the convolution before them.

A BatchNormalization layer in inference mode is a fixed per-channel scale and shift::

    y = gamma * (x - mean) / sqrt(variance + epsilon) + beta

so after a convolution with a linear activation it can be moved into that convolution's
kernel and bias (``s = gamma / sqrt(variance + epsilon)``)::

    kernel' = kernel * s                 (per output channel)
    bias'   = beta + (bias - mean) * s   (bias = 0 where the convolution had none)

On ResNet50 this is what makes mixed bfloat16 pay: BatchNormalization computes in float32
and so casts every activation map up and back down, which costs more than the convolutions
gain. The folded BatchNormalization becomes a ``keras.layers.Identity`` of the same name, so
layer names, ``BackboneSpec.block_of`` and the saved model's structure stay as they were, and
the result holds built-in layers only (``keras.models.load_model`` needs no transferkit).

Only frozen pairs are folded by default: folding a convolution that trains would change its
training dynamics (its gradient would no longer pass through the normalisation).

    from transferkit.model.fold import fold_batchnorm
    fast = fold_batchnorm(classifier)   # frozen pairs only: a stage's training blocks keep theirs
    fast.folded_batchnorm               # names of the BatchNormalization layers folded away
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np

from transferkit.keras_private import graph_nodes, producing_layer
from transferkit.model.surgery import walk_layers
from transferkit.runtime import dtype_policy

# Convolutions whose output channels map one to one onto BatchNormalization channels.
_FOLDABLE_CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)


def fold_batchnorm(model, fold_trainable: bool = False):
    """A copy of ``model`` with each frozen Conv -> BatchNormalization pair folded into the conv.

    A BatchNormalization layer is folded when its single input is the output of a
    ``Conv2D`` or ``DepthwiseConv2D`` with a linear activation that feeds nothing else, both
    are channels-last, and neither layer trains (unless ``fold_trainable``). Nested
    functional and Sequential models are folded too. Names, dtype policies and trainable
    flags are kept; weights are copied, so the original model is left as it was.

    Args:
        model: a functional or Sequential ``keras.Model``.
        fold_trainable: also fold pairs whose convolution or BatchNormalization is
            trainable; right for inference only (predict, export). Default False.

    Returns:
        A new ``keras.Model`` with the same inputs, outputs and layer names, in which each
        folded BatchNormalization is a ``keras.layers.Identity``. Its attribute
        ``folded_batchnorm`` is a tuple of the folded layers' names (empty for VGG, which
        has no BatchNormalization: then the copy is plain).
    """

    def select(owner, conv, batchnorm) -> bool:
        return fold_trainable or not (conv.trainable or batchnorm.trainable)

    return _fold(model, select)


def batchnorm_count(model) -> int:
    """How many BatchNormalization layers a model holds, nested models included.

    Args:
        model: any ``keras.Model``.

    Returns:
        The count (0 for a fully folded backbone).
    """
    return sum(isinstance(layer, keras.layers.BatchNormalization) for layer in walk_layers(model))


# --------------------------------------------------------------------------------------


def _fold(model, select: Callable):
    """Fold the pairs ``select(owner_model, conv, batchnorm)`` accepts into a new model.

    An Identity rather than no layer at all: traced, the two give the same graph (Identity
    adds no op), and the Identity keeps every name and works inside Sequential models.
    """
    pairs = {}  # id(batchnorm) -> (conv, batchnorm)
    for owner in [layer for layer in walk_layers(model) if isinstance(layer, keras.Model)] + [model]:
        for conv, batchnorm in _candidate_pairs(owner):
            if select(owner, conv, batchnorm):
                pairs[id(batchnorm)] = (conv, batchnorm)
    folded_convs = {id(conv) for conv, _ in pairs.values()}
    identities = set()  # ids of the Identity layers that stand for folded BatchNormalization

    def clone_layer(layer):
        if id(layer) in pairs:
            # The policy by name: a policy object in the config would not serialize.
            identity = keras.layers.Identity(
                name=layer.name, dtype=layer.dtype_policy.name, trainable=layer.trainable
            )
            identities.add(id(identity))
            return identity
        config = layer.get_config()
        if id(layer) in folded_convs:
            config["use_bias"] = True
        return layer.__class__.from_config(config)

    def call_layer(layer, *args, **kwargs):
        if id(layer) in identities:
            # BatchNormalization's call arguments (mask, training) mean nothing to Identity.
            return layer(args[0])
        return layer(*args, **kwargs)

    folded = _clone(model, clone_layer, call_layer)
    # Weights and flags after the graph exists: the clones are built only when called.
    _copy_state(model, folded, pairs)
    folded.folded_batchnorm = tuple(batchnorm.name for _, batchnorm in pairs.values())
    return folded


def _clone(model, clone_layer, call_layer):
    """``keras.models.clone_model`` through nested models, keeping input layer names.

    ``clone_model`` names a functional model's new inputs after the input tensors, not the
    input layers ("keras_tensor_7", not "image"), so the inputs are made here.
    """

    def clone_or_recurse(layer):
        if isinstance(layer, keras.Model):
            return _clone(layer, clone_layer, call_layer)
        return clone_layer(layer)

    # The new inputs and the container take the global policy: make it the original's.
    with dtype_policy(model.dtype_policy.name):
        if isinstance(model, keras.Sequential):
            return keras.models.clone_model(model, clone_function=clone_or_recurse)
        inputs = keras.tree.map_structure(
            lambda tensor: keras.Input(
                batch_shape=tensor.shape, dtype=tensor.dtype,
                name=producing_layer(tensor).name,
            ),
            model.input,
        )
        return keras.models.clone_model(
            model, input_tensors=inputs, clone_function=clone_or_recurse, call_function=call_layer
        )


def _candidate_pairs(owner):
    """(conv, batchnorm) pairs of one model's own graph that could be folded at all."""
    if isinstance(owner, keras.Sequential):
        layers = owner.layers
        return [pair for pair in zip(layers, layers[1:]) if _foldable(*pair)]
    nodes = graph_nodes(owner)
    if nodes is None:
        return []  # a subclassed model: its graph is not known
    producer, consumers, calls = {}, {}, {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for tensor in node.outputs:
            producer[id(tensor)] = node
        for tensor in node.input_tensors:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    for tensor in owner.outputs:
        consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    pairs = []
    for node in nodes:
        batchnorm = node.operation
        if len(node.input_tensors) != 1:
            continue
        source = producer.get(id(node.input_tensors[0]))
        if source is None or source.is_input or len(source.outputs) != 1:
            continue
        conv = source.operation
        # A layer called twice (shared) would have its kernel changed for both calls.
        if calls[id(conv)] != 1 or calls[id(batchnorm)] != 1:
            continue
        if consumers.get(id(source.outputs[0]), 0) != 1:
            continue
        if _foldable(conv, batchnorm):
            pairs.append((conv, batchnorm))
    return pairs


def _foldable(conv, batchnorm) -> bool:
    if not isinstance(conv, _FOLDABLE_CONVOLUTIONS):
        return False
    if not isinstance(batchnorm, keras.layers.BatchNormalization):
        return False
    if conv.data_format != "channels_last":
        return False
    # Both convolutions give (batch, height, width, channels): the channel axis is 3.
    if batchnorm.axis not in (-1, 3) or getattr(batchnorm, "renorm", False):
        return False
    if conv.get_config().get("activation") != "linear":
        return False
    # Quantized or LoRA kernels are not plain float tensors to rescale.
    return not getattr(conv, "quantization_mode", None) and not getattr(conv, "lora_enabled", False)


def _folded_weights(conv, batchnorm) -> list[np.ndarray]:
    """[kernel', bias'] for the conv that replaces ``conv`` followed by ``batchnorm``."""
    kernel = keras.ops.convert_to_numpy(conv.kernel).astype("float64")
    channels = batchnorm.moving_mean.shape[0]
    bias = (
        keras.ops.convert_to_numpy(conv.bias).astype("float64")
        if conv.use_bias else np.zeros(channels)
    )

    def value(variable, default):
        return np.full(channels, default) if variable is None else (
            keras.ops.convert_to_numpy(variable).astype("float64")
        )

    gamma = value(batchnorm.gamma if batchnorm.scale else None, 1.0)
    beta = value(batchnorm.beta if batchnorm.center else None, 0.0)
    mean = value(batchnorm.moving_mean, 0.0)
    variance = value(batchnorm.moving_variance, 1.0)
    scale = gamma / np.sqrt(variance + batchnorm.epsilon)
    if isinstance(conv, keras.layers.DepthwiseConv2D):
        # kernel (h, w, in, multiplier); output channel = in_index * multiplier + m.
        kernel = kernel * scale.reshape(kernel.shape[2], kernel.shape[3])
    else:
        kernel = kernel * scale  # the last axis is the output channel
    bias = beta + (bias - mean) * scale
    dtype = keras.ops.convert_to_numpy(conv.kernel).dtype
    return [kernel.astype(dtype), bias.astype(dtype)]


def _copy_state(original, clone, pairs) -> None:
    """Copy weights and trainable flags from ``original`` into ``clone``, matched by name.

    A container's flag is set before its layers', since setting it overwrites theirs.
    """
    clone.trainable = original.trainable
    convs = {id(conv): (conv, batchnorm) for conv, batchnorm in pairs.values()}
    clone_layers = {layer.name: layer for layer in clone.layers}
    for layer in original.layers:
        target = clone_layers[layer.name]  # clone_layer keeps every name
        if isinstance(layer, keras.Model):
            _copy_state(layer, target, pairs)
            continue
        target.trainable = layer.trainable
        if id(layer) in pairs:
            continue  # now an Identity: nothing to hold
        if id(layer) in convs:
            target.set_weights(_folded_weights(*convs[id(layer)]))
        elif layer.weights:
            target.set_weights(layer.get_weights())
