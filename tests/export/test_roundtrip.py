"""Every format round-trips: the file, loaded by its own runtime in a process without
transferkit, agrees with the Keras model; labels.json and README.txt say how to use it."""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

from tests import forked
from transferkit.data.samples import generated_images
from transferkit.export.formats import FLOAT_TOLERANCE, FORMATS
from transferkit.export.keras import float32_model

EVERY_FORMAT = tuple(FORMATS)  # every one converts here (the export extra is installed for the tests)


@pytest.mark.parametrize("which", ["shapes", "binary"])
def test_every_format_agrees_with_the_keras_model_within_tolerance(which, request):
    run = request.getfixturevalue(f"{which}_run")
    exports = request.getfixturevalue(f"{which}_exports")
    assert set(exports) == set(EVERY_FORMAT)
    for name, result in exports.items():
        record = json.loads((result.folder / "export.json").read_text())
        assert result.file.exists() and record["format"] == name and record["quantize"] == "none"
        assert record["verification"]["max_abs_diff"] == result.max_abs_diff <= FLOAT_TOLERANCE, name
        assert record["verification"]["top1_agreement"] == result.top1_agreement == 1.0, name
        assert record["verification"]["images"] >= 32
        labels = json.loads((result.folder / "labels.json").read_text())
        assert labels["class_names"] == list(run.class_names)
        assert labels["output_activation"] == ("sigmoid" if which == "binary" else "softmax")
        assert labels["output"]["shape"] == [None, 1 if which == "binary" else 3]
        assert labels["input_size"] == run.image_size == 32
        assert labels["resize"] == ("model" if FORMATS[name].any_size else "caller")
        assert labels["source_run"] == str(run.path.resolve()) and labels["transferkit_version"]
        assert not list(result.folder.parent.glob(".*partial*")), "a staging folder was left behind"
    assert json.loads((exports["onnx"].folder / "export.json").read_text())["details"]["opset"] >= 13


def test_checked_on_the_recreated_validation_split(shapes_exports, shapes_run):
    record = json.loads((shapes_exports["onnx"].folder / "export.json").read_text())
    accuracy = record["accuracy"]
    assert accuracy["labels"].startswith("true classes") and accuracy["images"] == shapes_run.metrics["n_val"]
    assert len(accuracy["files"]) == accuracy["images"]
    assert accuracy["exported"] == accuracy["keras_float32"]  # float32: the same predictions
    # the split the run was trained with: its own val_accuracy on the same images
    assert accuracy["keras_float32"] == pytest.approx(shapes_run.metrics["final"]["val_accuracy"])


def _readme_lines(folder) -> str:
    text = (folder / "README.txt").read_text()
    lines = text.split("Load it in three lines (Python):\n", 1)[1].strip("\n").splitlines()
    assert len(lines) == 3
    return textwrap.dedent("\n".join(lines))


def test_readme_three_lines_run_in_a_fresh_process_and_agree(shapes_exports, shapes_run, tmp_path):
    images = generated_images(4, shapes_run.image_size, np.random.default_rng(3))
    expected = float32_model(shapes_run.model).predict(images.astype("float32"), verbose=0)
    np.save(tmp_path / "images.npy", images)
    for name in ("savedmodel", "litert", "onnx", "openvino"):  # .keras and .h5: keras.models.load_model
        result = shapes_exports[name]
        script = (f"import sys, numpy as np\nimages = images_uint8 = np.load({str(tmp_path / 'images.npy')!r})\n"
                  f"{_readme_lines(result.folder)}\n"
                  f"np.save({str(tmp_path / (name + '.npy'))!r}, np.asarray(probabilities))\n"
                  "assert not [m for m in sys.modules if m.startswith('transferkit')]\n")
        done = forked.run([sys.executable, "-c", script], cwd=result.folder, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, (name, done.stderr[-1500:])
        np.testing.assert_allclose(np.load(tmp_path / f"{name}.npy"), expected, atol=FLOAT_TOLERANCE, err_msg=name)


def test_savedmodel_serving_signature_takes_other_sizes(shapes_exports, shapes_run):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(shapes_exports["savedmodel"].file))
    model = float32_model(shapes_run.model)
    for height, width in ((48, 40), (20, 64)):
        images = np.random.default_rng(height).integers(0, 256, (2, height, width, 3), dtype=np.uint8)
        served = loaded.signatures["serving_default"](image=tf.constant(images))
        [probabilities] = served.values()
        expected = model.predict(images.astype("float32"), verbose=0)
        np.testing.assert_allclose(probabilities.numpy(), expected, atol=FLOAT_TOLERANCE)
        np.testing.assert_allclose(loaded.serve(tf.constant(images)).numpy(), expected, atol=FLOAT_TOLERANCE)


def test_fixed_size_formats_refuse_other_sizes(shapes_exports):
    import onnxruntime as ort

    session = ort.InferenceSession(str(shapes_exports["onnx"].file), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        session.run(None, {"image": np.zeros((1, 40, 40, 3), dtype="float32")})


def test_float32_copy_of_a_mixed_precision_model_has_only_float32_layers(shapes_run):
    import keras

    mixed = keras.models.clone_model(shapes_run.model, clone_function=lambda layer: layer.__class__.from_config(
        {**layer.get_config(), "dtype": "mixed_bfloat16"}) if "dtype" in layer.get_config() else layer,
        recursive=True)
    mixed.set_weights(shapes_run.model.get_weights())
    copy = float32_model(mixed)

    def policies(model):
        for layer in model.layers:
            yield layer.dtype_policy.name
            if hasattr(layer, "layers"):
                yield from policies(layer)

    assert "mixed_bfloat16" in set(policies(mixed)) and set(policies(copy)) == {"float32"}
    images = generated_images(2, 32, np.random.default_rng(0)).astype("float32")
    np.testing.assert_allclose(copy.predict(images, verbose=0),
                               float32_model(shapes_run.model).predict(images, verbose=0), atol=1e-6)
