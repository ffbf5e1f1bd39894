"""OpenVINO IR: the conversion the OpenVINO engine does (``inference.openvino``), written
where the user asks; float16 compresses the weights, int8 is NNCF's post-training
quantization calibrated on the run's training images."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_openvino(model, path: Path, image_size: int, quantize: str = "none",
                   calibration: np.ndarray | None = None) -> dict:
    """Convert and write ``model.xml`` + ``model.bin``.

    Args:
        model: the float32 classifier (converted at the training size; the engine's
            conversion makes the same-size resize the identity).
        path: the ``.xml`` file to write (the ``.bin`` goes beside it).
        image_size: the training size S; the input is (n, S, S, 3) float32.
        quantize: "none", "float16" (weights stored as float16) or "int8" (NNCF).
        calibration: uint8 images (n, S, S, 3) for int8; default None.

    Returns:
        Details for export.json.
    """
    from transferkit.inference.openvino import export_network, import_openvino, quantize_int8

    ov = import_openvino()
    network = export_network(model, image_size)
    details = {"openvino": ov.__version__}
    if quantize == "int8":
        assert calibration is not None and len(calibration), "int8 needs calibration images"
        network = quantize_int8(network, calibration)
        details.update({"quantization": "NNCF quantize (post-training, int8)", "calibration_images": len(calibration)})
    ov.save_model(network, str(path), compress_to_fp16=quantize == "float16")
    return details

