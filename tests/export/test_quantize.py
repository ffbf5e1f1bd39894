"""Quantized exports are written, and the accuracy they report is the accuracy of the file
(checked here by evaluating the exported file independently on the same images)."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import transferkit
from transferkit.data.images import load_image
from transferkit.errors import ExportError
from transferkit.export.exporter import ExportResult, _check
from transferkit.outputs import predicted_labels


def _independent_accuracy(result, data_dir, class_names, size) -> float:
    """The exported file's accuracy on the images export.json lists, run here with its runtime."""
    files = json.loads((result.folder / "export.json").read_text())["accuracy"]["files"]
    images = np.stack([load_image(data_dir / name, size) for name in files]).astype("float32")
    labels = np.asarray([class_names.index(name.split("/")[0]) for name in files])
    if result.format == "litert":
        from ai_edge_litert.interpreter import Interpreter

        interpreter = Interpreter(model_path=str(result.file))
        source = interpreter.get_input_details()[0]
        interpreter.resize_tensor_input(source["index"], images.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(source["index"], images)
        interpreter.invoke()
        outputs = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    elif result.format == "onnx":
        import onnxruntime as ort

        outputs = ort.InferenceSession(str(result.file), providers=["CPUExecutionProvider"]).run(
            None, {"image": images})[0]
    else:
        sys.modules.setdefault("openvino_telemetry", None)
        import openvino as ov

        compiled = ov.Core().compile_model(str(result.file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        outputs = compiled(images)[0]
    return float(np.mean(predicted_labels(outputs) == labels))


@pytest.mark.parametrize("format, quantize", [("litert", "int8"), ("onnx", "int8"), ("openvino", "int8"),
                                              ("litert", "float16")])
def test_quantized_export_reports_the_accuracy_of_the_file(format, quantize, shapes_run, shapes_dir, tmp_path):
    [result] = transferkit.export_run(shapes_run, format, tmp_path / "out", quantize, data=shapes_dir,
                                      allow_drop=True)
    record = json.loads((result.folder / "export.json").read_text())
    assert record["quantize"] == quantize and result.file.is_file()
    assert record["verification"]["tolerance"] is None  # quantized: judged by accuracy, not by tolerance
    accuracy = record["accuracy"]
    assert accuracy["images"] == shapes_run.metrics["n_val"] and accuracy["labels"].startswith("true classes")
    assert accuracy["exported"] == pytest.approx(
        _independent_accuracy(result, shapes_dir, list(shapes_run.class_names), shapes_run.image_size))
    assert accuracy["drop_points"] == pytest.approx(100 * (accuracy["keras_float32"] - accuracy["exported"]))
    if quantize == "int8":
        assert record["details"]["calibration_images"] == shapes_run.metrics["n_train"]


def _result(accuracy, float_accuracy):
    return ExportResult("litert", "int8", None, None, 0, 0.1, 0.9, 10, accuracy, float_accuracy)


def test_accuracy_drop_beyond_max_drop_is_an_error_unless_allowed():
    context = SimpleNamespace(quantize="int8", max_drop=1.0, allow_drop=False, sample=SimpleNamespace(labels=[0] * 10))
    _check(context, _result(0.80, 0.805))  # half a point: kept
    with pytest.raises(ExportError, match="loses 10.0 accuracy points.*--allow-drop"):
        _check(context, _result(0.70, 0.80))
    _check(SimpleNamespace(**{**vars(context), "allow_drop": True}), _result(0.70, 0.80))


def test_float_export_beyond_tolerance_is_an_error_and_leaves_nothing(shapes_run, tmp_path, monkeypatch):
    import transferkit.export.exporter as exporter

    monkeypatch.setattr(exporter, "FLOAT_TOLERANCE", -1.0)  # every file "disagrees"
    with pytest.raises(ExportError, match="disagrees with the Keras model.*not written"):
        transferkit.export_run(shapes_run, "litert", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
