"""The export formats, in one table: what each file is, what loads it, what it can be
quantized to, and how a user loads it in three lines.

Two kinds of input, decided by what the runtimes can convert: the model's own resize is
Keras's antialiased bilinear ``Resizing``, which TensorFlow runs as its ``ScaleAndTranslate``
op, and ONNX, LiteRT and OpenVINO have no translation for it. So

- ``savedmodel`` keeps the whole model: uint8 RGB images of ANY height and width, resized
  inside exactly as the Keras model does;
- every other file takes images at the training size (``input_size`` in labels.json,
  ``resize: "caller"``): float32 RGB 0..255, NHWC. At that size the model's resize is the
  identity, so nothing is lost; images of other sizes must be resized by the caller first
  (bilinear, antialiased, as ``transferkit`` reads images), and a file of a fixed-size
  format refuses other sizes instead of silently resizing them differently;
- ``keras`` and ``h5`` are the Keras model itself (any size, resized inside).

No Keras import here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from transferkit.errors import ExportError

QUANTIZATIONS = ("none", "float16", "dynamic", "int8")
EXTRA_INSTALL = "pip install 'transferkit[export]'"
# A float32 export whose probabilities differ from the Keras model's (run in float32) by
# more than this on any image is an error.
FLOAT_TOLERANCE = 1e-4
DEFAULT_MAX_DROP = 1.0  # accuracy points a quantized export may lose before it is an error




@dataclass(frozen=True)
class Package:
    """An optional package a format needs: the module imported and the pip requirement
    (the same bounds as the ``export`` extra in pyproject.toml)."""

    module: str
    requirement: str


TF2ONNX = Package("tf2onnx", "tf2onnx>=1.16,<2")
ONNX = Package("onnx", "onnx>=1.16,<2")
ONNXRUNTIME = Package("onnxruntime", "onnxruntime>=1.18,<2")
LITERT = Package("ai_edge_litert", "ai-edge-litert>=1.2,<3")
OPENVINO = Package("openvino", "openvino>=2025.1,<2027")
NNCF = Package("nncf", "nncf>=2.16,<4")
H5PY = Package("h5py", "h5py>=3.10,<4")


@dataclass(frozen=True)
class ExportFormat:
    """One export format.

    Attributes:
        name: the --format value.
        filename: the file (or folder, for savedmodel) written in the export folder.
        runtime: what loads it, as README.txt and the tables name it.
        packages: what writing and verifying it needs beyond TensorFlow and Keras.
        quantizations: the --quantize values it supports ("none" first).
        any_size: it takes images of any size and resizes them itself; else images at the
            training size, float32 0..255 (see the module docstring).
        load: three lines of Python that load it and predict ``images``; ``{file}`` is the
            file's name.
        quantize_packages: extra packages per quantization (int8 of OpenVINO needs NNCF).
    """

    name: str
    filename: str
    runtime: str
    packages: tuple[Package, ...]
    quantizations: tuple[str, ...]
    any_size: bool
    load: str
    quantize_packages: tuple[tuple[str, tuple[Package, ...]], ...] = ()

    def folder_name(self, quantize: str) -> str:
        """The export folder's default name: "litert", "litert-int8"."""
        return self.name if quantize == "none" else f"{self.name}-{quantize}"

    def needed(self, quantize: str) -> tuple[Package, ...]:
        """The optional packages this format with this quantization needs."""
        return self.packages + dict(self.quantize_packages).get(quantize, ())


FORMATS: dict[str, ExportFormat] = {
    spec.name: spec
    for spec in (
        ExportFormat(
            "savedmodel", "saved_model", "TensorFlow (tf.saved_model.load)", (), ("none",), True,
            "import tensorflow as tf\n"
            "model = tf.saved_model.load('{file}')\n"
            "probabilities = model.serve(tf.constant(images_uint8)).numpy()  # (n, h, w, 3) uint8, any h, w",
        ),
        ExportFormat(
            "litert", "model.tflite", "LiteRT (ai-edge-litert Interpreter)", (LITERT,), QUANTIZATIONS, False,
            "from ai_edge_litert.interpreter import Interpreter\n"
            "runner = Interpreter('{file}').get_signature_runner()\n"
            "probabilities = runner(image=images.astype('float32'))['output_0']  # (n, S, S, 3), 0..255",
        ),
        ExportFormat(
            "onnx", "model.onnx", "ONNX Runtime", (TF2ONNX, ONNX, ONNXRUNTIME), ("none", "dynamic", "int8"), False,
            "import onnxruntime as ort\n"
            "session = ort.InferenceSession('{file}', providers=['CPUExecutionProvider'])\n"
            "probabilities = session.run(None, {{'image': images.astype('float32')}})[0]  # (n, S, S, 3), 0..255",
        ),
        ExportFormat(
            "openvino", "model.xml", "OpenVINO", (OPENVINO,), ("none", "float16", "int8"), False,
            "import openvino as ov\n"
            "compiled = ov.Core().compile_model('{file}', 'CPU', {{'INFERENCE_PRECISION_HINT': 'f32'}})\n"
            "probabilities = compiled(images.astype('float32'))[0]  # (n, S, S, 3), 0..255",
            quantize_packages=(("int8", (NNCF,)),),
        ),
        ExportFormat(
            "h5", "model.h5", "Keras (legacy HDF5)", (H5PY,), ("none",), True,
            "import keras\n"
            "model = keras.models.load_model('{file}', compile=False)\n"
            "probabilities = model.predict(images, verbose=0)  # (n, h, w, 3) RGB 0..255, any h, w",
        ),
        ExportFormat(
            "keras", "model.keras", "Keras", (), ("none",), True,
            "import keras\n"
            "model = keras.models.load_model('{file}', compile=False)\n"
            "probabilities = model.predict(images, verbose=0)  # (n, h, w, 3) RGB 0..255, any h, w",
        ),
    )
}
FORMAT_CHOICES = (*FORMATS, "all")


def get_format(name: str) -> ExportFormat:
    """The table entry of a format.

    Raises:
        ExportError: an unknown name (the valid ones are named).
    """
    if name not in FORMATS:
        raise ExportError(f"unknown export format {name!r}; choose one of {', '.join(FORMAT_CHOICES)}")
    return FORMATS[name]


def holdable(backbone, items: list, format_of: Callable, named: bool) -> tuple[list, list]:
    """Which of ``items`` (export entries of any shape) are in a format that can hold the
    run's backbone (``BackboneSpec.require_format``), before any export.

    Args:
        backbone: the run's ``BackboneSpec``, or None (a backbone no installed package adds
            any more: it declares nothing, so every format is kept).
        items: the entries.
        format_of: an entry's format name.
        named: the entries were asked for by name: one that cannot hold the backbone is an
            error, not set aside.

    Returns:
        (the entries kept, [(entry, its ExportError)] for those set aside).

    Raises:
        ExportError: ``named`` and a format cannot hold the backbone.
    """
    kept, unfit = [], []
    for item in items:
        try:
            if backbone is not None:
                backbone.require_format(format_of(item))
        except ExportError as error:
            if named:
                raise
            unfit.append((item, error))
            continue
        kept.append(item)
    return kept, unfit


def check_quantization(spec: ExportFormat, quantize: str) -> None:
    """Raises ExportError when a format does not support a quantization (naming those it does)."""
    if quantize not in QUANTIZATIONS:
        raise ExportError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if quantize not in spec.quantizations:
        raise ExportError(f"{spec.name} export cannot be quantized to {quantize}; it supports "
                          f"{', '.join(spec.quantizations)}")


def require_tensorflow_backend() -> None:
    """Raises ExportError unless Keras runs on TensorFlow here: the converters read
    TensorFlow graphs (a run trained on any backend loads on TensorFlow)."""
    from transferkit.backend import active_backend

    backend = active_backend()
    if backend != "tensorflow":
        raise ExportError(f"exports are written from Keras's TensorFlow backend, and this process runs on {backend}; "
                          "run the command again with KERAS_BACKEND=tensorflow (a run folder trained on any backend "
                          "loads there)")


def missing_packages(spec: ExportFormat, quantize: str = "none") -> list[Package]:
    """The optional packages of a format that do not import here."""
    missing = []
    for package in spec.needed(quantize):
        try:
            importlib.import_module(package.module)
        except ImportError:
            missing.append(package)
    return missing


def install_hint(packages) -> str:
    """The exact install command for some missing packages."""
    requirements = " ".join(f"'{package.requirement}'" for package in packages)
    return f"pip install {requirements} (or every export runtime: {EXTRA_INSTALL})"


def require_packages(spec: ExportFormat, quantize: str = "none") -> None:
    """Raises ExportError, with the install command, when a package the format needs is missing."""
    missing = missing_packages(spec, quantize)
    if missing:
        names = ", ".join(package.module for package in missing)
        what = spec.name if quantize == "none" else f"{spec.name} {quantize}"
        raise ExportError(f"the {what} export needs {names}, which is not installed; install it with: "
                          f"{install_hint(missing)}")
