"""SavedModel: the whole classifier, resize included, with a serving signature that takes
uint8 RGB images of any height and width."""

from __future__ import annotations

from pathlib import Path


def write_savedmodel(model, path: Path) -> dict:
    """Write a SavedModel folder through Keras's ``ExportArchive`` (what
    ``model.export(format="tf_saved_model")`` uses), with two endpoints:

    - ``serve`` (also ``serving_default``): uint8 (n, h, w, 3), any h and w;
    - ``serve_float``: float32 (n, h, w, 3) in 0..255.

    Both return (n, units) probabilities, resizing inside as the Keras model does.

    Args:
        model: the float32 classifier.
        path: the folder to write.

    Returns:
        Details for export.json (the signatures).
    """
    import keras
    import tensorflow as tf

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve", lambda image: model(tf.cast(image, tf.float32), training=False),
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.uint8, name="image")],
    )
    archive.add_endpoint(
        "serve_float", lambda image: model(image, training=False),
        input_signature=[tf.TensorSpec((None, None, None, 3), tf.float32, name="image")],
    )
    archive.write_out(str(path), verbose=False)
    return {"signatures": {"serve": "uint8 (n, h, w, 3), any h, w", "serve_float": "float32 (n, h, w, 3), 0..255",
                           "serving_default": "= serve"}}
