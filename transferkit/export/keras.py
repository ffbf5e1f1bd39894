"""The Keras model as exports start from it: float32, built-in layers only; and the two
Keras files (.keras, legacy .h5) written from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def float32_model(model):
    """A float32 copy of a classifier: every layer's dtype policy set to float32 (a
    mixed_bfloat16 run computes in float32 then), the same built-in layers and weights, so
    that the copy saves and loads without transferkit.

    Args:
        model: the run's Keras model, in any dtype policy.

    Returns:
        A new ``keras.Model`` (the model itself when it is float32 already).
    """
    import keras

    config = keras.saving.serialize_keras_object(model)
    if not _has_other_dtype(config):
        return model
    copy = keras.saving.deserialize_keras_object(_float32_config(config))
    copy.set_weights(model.get_weights())
    return copy


def _float32_config(node):
    if isinstance(node, dict):
        if node.get("class_name") == "DTypePolicy" or node.get("class_name") == "FloatDTypePolicy":
            return {**node, "class_name": "DTypePolicy", "config": {**node.get("config", {}), "name": "float32"}}
        return {key: _float32_config(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_float32_config(value) for value in node]
    return node


def _has_other_dtype(node) -> bool:
    if isinstance(node, dict):
        if node.get("class_name") in ("DTypePolicy", "FloatDTypePolicy"):
            return node.get("config", {}).get("name") != "float32"
        return any(_has_other_dtype(value) for value in node.values())
    if isinstance(node, list):
        return any(_has_other_dtype(value) for value in node)
    return False


def fixed_size_model(model):
    """The model for formats that take images at the training size: the float32 clone that
    the OpenVINO engine converts (``inference.openvino.float32_clone``), whose resize passes
    an image of the training size through unchanged (the identity, exactly) instead of the
    antialiased resize op that ONNX, LiteRT and OpenVINO cannot convert."""
    from transferkit.inference.openvino import float32_clone

    return float32_clone(model)


def write_keras(model, path: Path) -> dict:
    """Save the float32 model as a clean ``.keras`` file (no optimizer state)."""
    model.save(path)
    return {}


def write_h5(model, path: Path) -> dict:
    """Save the float32 model in the legacy HDF5 format."""
    import warnings

    with warnings.catch_warnings():  # Keras warns that HDF5 is legacy: the user asked for it
        warnings.simplefilter("ignore")
        model.save(path)
    return {}


def predict(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The model's outputs for uint8 images, in batches, as float64."""
    outputs = [np.asarray(model(images[start:start + batch_size].astype("float32"), training=False))
               for start in range(0, len(images), batch_size)]
    return np.concatenate(outputs).astype("float64")
