"""Model surgery on a classifier: walking its layers, what trains in a stage, where the frozen
part ends, the two models cut at that boundary (the frozen extractor and the trainable top),
a digest of the weights below it (what says two runs' frozen parts compute the same), and
the readout of a classifier or its top part (outputs, the output layer's inputs, the embedding).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import keras

from transferkit.backbones import BackboneSpec
from transferkit.keras_private import graph_nodes, producing_layer


def walk_layers(model) -> Iterator:
    """Every layer inside a model, depth first, the layers of nested models included.

    Args:
        model: a ``keras.Model`` (a layer that holds no layers yields nothing).

    Yields:
        Each layer; a nested model comes before its own layers.
    """
    for layer in getattr(model, "layers", ()):
        yield layer
        yield from walk_layers(layer)


def trainable_at(model, spec: BackboneSpec, first_open: int) -> tuple[object, str]:
    """The part of a classifier above a block boundary, as a model from the boundary's
    features to the class outputs, sharing the classifier's layers and weights.

    Args:
        model: a classifier from ``build_classifier``.
        spec: the backbone's registry entry.
        first_open: the first block that trains, 1..``len(spec.blocks)``
            (``len(spec.blocks)``: the head alone).

    Returns:
        (the model, the name of the backbone layer (or operation: ConvNeXt's residual sums
        are ``keras.ops`` calls) whose output it takes, or "" for the backbone's output).
    """
    backbone = model.get_layer("backbone")
    head = model.get_layer("head")
    # A model around the head even when it is the whole part: compiling it gives the wrapper
    # the optimizer, so the classifier's own saves carry no nested optimizer state.
    if first_open == len(spec.blocks):
        features = keras.Input(shape=tuple(backbone.output.shape[1:]), name="features")
        return keras.Model(features, head(features), name="trainable_part"), ""
    boundary = _boundary_tensor(backbone, spec, first_open)
    top = keras.Model(boundary, backbone.output, name="open_part")
    features = keras.Input(shape=tuple(boundary.shape[1:]), name="features")
    return keras.Model(features, head(top(features)), name="trainable_part"), producing_layer(boundary).name


def readout_at(part):
    """A model of a classifier, or of its top part (``trainable_at``), with three outputs: the
    class outputs, the inputs of the head's output Dense (what calibration's logits are computed
    from, ``evaluation.calibration``) and the backbone's feature maps averaged over their
    positions (the embedding the rejection scores read, as ``inference.embedding.pooled``
    computes it), sharing the part's layers and weights.

    Args:
        part: a chain of layers ending in the classifier's "head": the classifier (image ->
            preprocessing -> backbone -> head) or a ``trainable_at`` part (features -> [open
            part] -> head).

    Returns:
        A ``keras.Model`` from the part's input to [outputs, Dense inputs, embedding].
    """
    head = part.get_layer("head")
    inner = keras.Model(head.input, [head.output, head.get_layer("output").input], name="head_readout")
    inputs = keras.Input(shape=tuple(part.input_shape[1:]), name=part.layers[0].name)
    maps = inputs
    for layer in part.layers[1:-1]:  # what feeds the head: the backbone's maps
        maps = layer(maps)
    outputs, dense_inputs = inner(maps)
    as_float32 = keras.ops.cast(maps, "float32")
    embedding = keras.ops.mean(as_float32, axis=(1, 2)) if len(maps.shape) == 4 else keras.ops.reshape(
        as_float32, (-1, math.prod(maps.shape[1:])))
    return keras.Model(inputs, [outputs, dense_inputs, embedding], name="readout")


def extractor_at(model, spec: BackboneSpec, first_open: Sequence[int]):
    """One model computing the frozen-part features at several block boundaries at once.

    Args:
        model: a classifier from ``build_classifier``.
        spec: the backbone's registry entry.
        first_open: first-open block indices, each in 1..``len(spec.blocks)``
            (``len(spec.blocks)``: the backbone's output).

    Returns:
        A ``keras.Model`` from images to a list of feature maps, one per index, in order
        (a single output for one index), sharing the classifier's layers and weights.
    """
    backbone = model.get_layer("backbone")
    image_size = int(backbone.input_shape[1])
    ends = [
        backbone.output if index == len(spec.blocks) else _boundary_tensor(backbone, spec, index)
        for index in first_open
    ]
    images = keras.Input(shape=(image_size, image_size, 3), name="image")
    frozen = keras.Model(backbone.input, ends if len(ends) > 1 else ends[0], name="frozen_part")
    return keras.Model(images, frozen(model.get_layer("preprocessing")(images)), name="extractor")


def frozen_digest(model, spec: BackboneSpec, first_open: int) -> str:
    """A digest of the weights below a block boundary (the preprocessing layer's and the
    backbone's layers before block ``first_open``): two models whose digests agree compute
    the same features at that boundary.

    Args:
        model: a classifier from ``build_classifier``.
        spec: the backbone's registry entry.
        first_open: 1..``len(spec.blocks)`` (``len(spec.blocks)``: the whole backbone).

    Returns:
        A hex digest of the weights' values, shapes and dtypes.
    """
    import hashlib

    import numpy as np

    backbone = model.get_layer("backbone")
    layers = list(backbone.layers)
    if first_open < len(spec.blocks):
        layers = layers[: layers.index(_first_layer(backbone, spec, first_open))]
    digest = hashlib.blake2b(digest_size=16)
    for layer in [model.get_layer("preprocessing"), *layers]:
        # Each weight by its place in the layer, not its path: a path holds the name the layer
        # was built with, automatic for some (ConvNeXt's last LayerNormalization) and so
        # different from one process to the next.
        for index, weight in enumerate(layer.weights):
            value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
            digest.update(f"{layer.name}/{index}:{value.dtype}{value.shape}".encode())
            digest.update(value.data)
    return digest.hexdigest()


def _first_layer(backbone, spec: BackboneSpec, first_open: int):
    """The first backbone layer of block ``first_open``."""
    return next(layer for layer in backbone.layers if spec.block_of(layer.name) == first_open)


def _boundary_tensor(backbone, spec: BackboneSpec, first_open: int):
    """The tensor block ``first_open`` starts from: its first layer's input.

    A tensor, not the last layer before the block: a residual sum written with ``keras.ops``
    (ConvNeXt) is no layer, and the layer before it gives only the residual branch.
    """
    first = _first_layer(backbone, spec, first_open)
    # The call in the backbone's graph: a nested model's own ``input`` is its inner input.
    node = next(node for node in graph_nodes(backbone) if node.operation is first)
    return node.input_tensors[0]


def unfrozen_blocks(spec: BackboneSpec, unfreeze: int | str) -> set[int]:
    """Indices of the blocks that train for an unfreeze depth (0, N or "all")."""
    return set(range(spec.first_unfrozen(unfreeze), len(spec.blocks)))


def set_trainable(model, spec: BackboneSpec, unfreeze: int | str) -> None:
    """Make the top ``unfreeze`` blocks of the backbone trainable, all else in it frozen.

    BatchNormalization layers stay frozen whatever the depth (LayerNormalization, as in
    ConvNeXt, trains with its block); the preprocessing layers never train; the head
    always trains.

    Args:
        model: a classifier from ``build_classifier``.
        spec: the backbone's registry entry.
        unfreeze: 0 (backbone frozen), N (top N blocks), or "all".
    """
    backbone = model.get_layer("backbone")
    model.trainable = True
    model.get_layer("preprocessing").trainable = False
    blocks = unfrozen_blocks(spec, unfreeze)
    # Setting a container's flag sets every layer inside it; per-layer flags come after.
    backbone.trainable = bool(blocks)
    if not blocks:
        return
    for layer in backbone.layers:
        block = spec.block_of(layer.name)
        layer.trainable = block in blocks
    # After the blocks' flags, which reach into nested models (ConvNeXt's downsampling).
    # LayerNormalization trains with its block: it keeps no moving statistics, so it computes
    # the same in training and inference, which is why BatchNormalization stays frozen.
    for layer in walk_layers(backbone):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def compute_dtype(model) -> str:
    """A model's 16-bit compute dtype ("bfloat16", "float16") if it has one, else "float32".

    Mixed-precision models keep their input and output layers in float32, so it is the
    layers with weights in between that tell.
    """
    for layer in walk_layers(model):
        dtype = getattr(getattr(layer, "dtype_policy", None), "compute_dtype", "float32")
        if layer.weights and dtype in ("bfloat16", "float16"):
            return dtype
    return "float32"


def synchronize_batchnorm(model, synchronized: bool) -> None:
    """Make the trainable BatchNorm layers of a model compute their batch statistics across
    the replicas of a TensorFlow distribution strategy (``synchronized``), or each on its own
    replica's share of the batch (Keras's default).

    Set before ``fit`` traces its step (compiling resets the step); frozen BatchNorm layers
    run in inference mode and compute no batch statistics, so they are left alone (turning it
    off reaches every BatchNorm layer). A saved model should hold False: a synchronized
    BatchNorm loads only on TensorFlow.

    Args:
        model: the model being fitted (nested models are walked).
        synchronized: True to synchronize, False for per-replica statistics.
    """
    for layer in walk_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization) and (layer.trainable or not synchronized):
            layer.synchronized = synchronized
