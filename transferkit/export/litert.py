"""LiteRT (TFLite): float32, float16, dynamic-range and full int8, converted with
TensorFlow's converter from the fixed-size float32 model; run with the ``ai-edge-litert``
interpreter (TensorFlow 2.20 moved it there).

Every variant keeps float32 input and output (images 0..255 at the training size, class
probabilities), so the same three lines run each; int8 quantizes and dequantizes at its
edges.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferkit.runtime import held_stderr


def write_litert(model, path: Path, image_size: int, quantize: str = "none",
                 calibration: np.ndarray | None = None) -> dict:
    """Convert and write a ``.tflite`` file.

    Args:
        model: the fixed-size float32 model (``keras.fixed_size_model``).
        path: the file to write (ends in ``.tflite``).
        image_size: the training size S; the input is (n, S, S, 3) float32, n dynamic.
        quantize: "none", "float16" (weights), "dynamic" (int8 weights, float activations)
            or "int8" (weights and activations, calibrated on ``calibration``).
        calibration: uint8 images (n, S, S, 3) for int8; default None.

    Returns:
        Details for export.json.
    """
    import tensorflow as tf

    settings: dict = {"target_spec": {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS]}}
    if quantize != "none":
        settings["optimizations"] = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        settings["target_spec"]["supported_types"] = [tf.float16]
    elif quantize == "int8":
        assert calibration is not None and len(calibration), "int8 needs calibration images"
        settings["target_spec"]["supported_ops"] = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        images = calibration.astype("float32")
        settings["representative_dataset"] = lambda: ([images[i : i + 1]] for i in range(len(images)))
    signature = [tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name="image")]
    with held_stderr():  # the converter's C++ lines (quantization settings), unless it fails
        model.export(str(path), format="litert", input_signature=signature, verbose=False, **settings)
    details = {"converter": f"tensorflow {tf.__version__} TFLiteConverter", "input_output": "float32"}
    if quantize == "int8":
        details["calibration_images"] = len(calibration)
    return details
