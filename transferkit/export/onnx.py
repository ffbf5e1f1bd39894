"""ONNX: Keras's ONNX export (tf2onnx) of the fixed-size float32 model, run with ONNX
Runtime; dynamic-range and static int8 (QDQ) quantization with ONNX Runtime's own tools."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

INPUT_NAME = "image"


def write_onnx(model, path: Path, image_size: int, quantize: str = "none",
               calibration: np.ndarray | None = None) -> dict:
    """Convert and write a ``.onnx`` file.

    Args:
        model: the fixed-size float32 model (``keras.fixed_size_model``).
        path: the file to write.
        image_size: the training size S; the input "image" is (n, S, S, 3) float32.
        quantize: "none", "dynamic" (int8 weights, activations quantized on the fly) or
            "int8" (static QDQ, activations calibrated on ``calibration``).
        calibration: uint8 images (n, S, S, 3) for int8; default None.

    Returns:
        Details for export.json (the opset, the quantization settings).
    """
    import onnx
    import tensorflow as tf

    signature = [tf.TensorSpec((None, image_size, image_size, 3), tf.float32, name=INPUT_NAME)]
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-") as scratch:
        float_path = path if quantize == "none" else Path(scratch) / "float.onnx"
        model.export(str(float_path), format="onnx", input_signature=signature, verbose=False)
        details = {"opset": _opset(onnx.load(str(float_path)))}
        if quantize == "dynamic":
            details.update(_quantize_dynamic(float_path, path))
        elif quantize == "int8":
            assert calibration is not None and len(calibration), "int8 needs calibration images"
            details.update(_quantize_static(float_path, path, calibration, Path(scratch)))
    return details


def _opset(proto) -> int:
    return next(entry.version for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def _quantize_dynamic(source: Path, target: Path) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
    return {"quantization": "onnxruntime quantize_dynamic, int8 weights"}


def _quantize_static(source: Path, target: Path, calibration: np.ndarray, scratch: Path) -> dict:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(range(len(calibration)))

        def get_next(self):
            row = next(self.rows, None)
            return None if row is None else {INPUT_NAME: calibration[row : row + 1].astype("float32")}

    prepared = scratch / "prepared.onnx"
    quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(target), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
    return {"quantization": "onnxruntime quantize_static, QDQ, int8 weights (per channel) and activations",
            "calibration_images": len(calibration)}
