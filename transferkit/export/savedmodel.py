"""SavedModel: the whole classifier, resize included, with a serving signature that takes
uint8 RGB images of any height and width."""

from __future__ import annotations

from pathlib import Path


def write_savedmodel(model, path: Path) -> dict:
    """Write a SavedModel folder with two endpoints (each also a signature):

    - ``serve`` (and ``serving_default``): uint8 (n, h, w, 3), any h and w;
    - ``serve_float``: float32 (n, h, w, 3) in 0..255.

    Both return (n, units) probabilities, resizing inside as the Keras model does.

    A plain ``tf.Module`` holding the model's variables, not Keras's ``ExportArchive``
    (behind ``model.export(format="tf_saved_model")``): with Keras 3.15 that one stores every
    variable twice (``variables/`` and ``_all_variables/``), a SavedModel of twice the size.

    Args:
        model: the float32 classifier.
        path: the folder to write.

    Returns:
        Details for export.json (the signatures).
    """
    import tensorflow as tf

    module = tf.Module()
    module.model_variables = [variable.value for variable in model.weights]  # tracked: saved once each
    module.serve = tf.function(
        lambda image: model(tf.cast(image, tf.float32), training=False),
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8, name="image")],
    )
    module.serve_float = tf.function(
        lambda image: model(image, training=False),
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32, name="image")],
    )
    signatures = {"serving_default": module.serve.get_concrete_function(),
                  "serve": module.serve.get_concrete_function(),
                  "serve_float": module.serve_float.get_concrete_function()}
    tf.saved_model.save(module, str(path), signatures=signatures)
    return {"signatures": {"serve": "uint8 (n, h, w, 3), any h, w", "serve_float": "float32 (n, h, w, 3), 0..255",
                           "serving_default": "= serve"}}
