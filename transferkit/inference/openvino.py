"""OpenVINO: converting a Keras model, compiling it, and the engine cache with its clean-up.

The engine cache of a run is a folder outside the run (``engine_cache_dir``: under
``~/.cache/transferkit/engine/``, or ``$TRANSFERKIT_CACHE``), so predicting never changes a
run and a read-only run still gets one. It holds:

    openvino-{S}px/{model name}.xml, .bin, .fingerprint   converted networks (``load_or_convert``)
    compiled/*.blob                                       OpenVINO's compiled-model cache (CACHE_DIR)
    run.txt                                               the run folder it belongs to

A converted network is reused while its fingerprint (architecture, weights, input shape,
OpenVINO version) matches; a compiled blob is reused by OpenVINO itself while the network
and the compile settings match, so a warm predict neither converts nor compiles again.
``claim_engine_cache`` removes the folders of runs that no longer exist.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np

from transferkit.files import atomic_path, remove_leftovers, write_atomic
from transferkit.runtime import import_without_torch

log = logging.getLogger("transferkit")


# Keras dtype policy -> OpenVINO CPU inference precision hint.
PRECISION_HINTS = {"float32": "f32", "mixed_bfloat16": "bf16", "mixed_float16": "f16"}
# NNCF's tensor functions for PyTorch, which import torch (1.2 s) wherever it is installed; the
# quantization here runs on OpenVINO networks and NumPy arrays.
NNCF_TORCH_PARTS = ("nncf.tensor.functions.torch_io", "nncf.tensor.functions.torch_linalg",
                    "nncf.tensor.functions.torch_numeric")


def import_openvino():
    """Import openvino with its usage telemetry off.

    On import (and on every conversion) OpenVINO sends usage events to an analytics service
    unless the user opted out; nobody running transferkit asked for that, and it is traffic
    an offline machine should not attempt. OpenVINO falls back to a no-op stand-in when the
    telemetry package cannot be imported, so it is made unimportable before openvino is
    first imported.

    Returns:
        The ``openvino`` module.
    """
    import sys

    if "openvino" not in sys.modules and "openvino_telemetry" not in sys.modules:
        sys.modules["openvino_telemetry"] = None  # import raises ImportError -> OpenVINO's stub
    import openvino

    return openvino


def uint8_input(network):
    """The network taking uint8 images: the conversion to float32 becomes its first op
    (OpenVINO's preprocessing; the cached network itself stays float32-input).

    Args:
        network: an ``openvino.Model`` with one float32 image input.

    Returns:
        The new ``openvino.Model``.
    """
    ov = import_openvino()

    steps = ov.preprocess.PrePostProcessor(network)
    steps.input(0).tensor().set_element_type(ov.Type.u8)
    steps.input(0).preprocess().convert_element_type(ov.Type.f32)
    return steps.build()


def conversion_reason(error: BaseException) -> str:
    """One line telling why an OpenVINO step failed: the error's type and its most telling
    line (the missing conversion rule, where there is one), at most 200 characters."""
    lines = [line.strip(" -") for line in str(error).splitlines() if line.strip(" -")]
    # OpenVINO's conversion report starts with a source location; the op list says more.
    telling = [line for line in lines if "No conversion rule" in line] or lines
    return f"{type(error).__name__}: {telling[0][:200]}" if telling else type(error).__name__


def precision_hint(precision: str) -> str:
    """OpenVINO's CPU inference precision hint for a precision.

    Args:
        precision: "auto" (``runtime.resolve_precision`` decides), "float32", "bfloat16",
            "float16", or a Keras dtype policy name ("mixed_bfloat16").

    Returns:
        "f32", "bf16" or "f16".

    Raises:
        ValueError: an unknown precision.
    """
    from transferkit.runtime import POLICIES, resolve_precision

    if precision != "auto" and precision not in POLICIES and precision not in PRECISION_HINTS:
        raise ValueError(
            f"precision must be auto, {', '.join(POLICIES)}, got {precision!r}"
        )
    policy = precision if precision in PRECISION_HINTS else resolve_precision(precision)[0]
    return PRECISION_HINTS[policy]


@functools.cache
def openvino_core():
    ov = import_openvino()

    return ov.Core()


class SharedCache:
    """The ``cache_dir`` (``SHARED``) of networks kept by their fingerprint alone, in
    ``cache_root()/engine/shared/<fingerprint>/``: the frozen part that training, tune's trials
    and audit run forward, which runs on the same backbone weights, image size and frozen depth
    share (each run converted and compiled it again before)."""

    def folder(self, fingerprint: str) -> Path:
        from transferkit.files import cache_root

        return cache_root() / "engine" / "shared" / fingerprint[:16]

    def __repr__(self) -> str:
        return "SHARED"


SHARED = SharedCache()


def load_or_convert(model, input_shape: tuple[int, ...], cache_dir, calibration=None, calibration_key: str = ""):
    """The OpenVINO network for a model: read from the cache when its fingerprint matches,
    else converted (and written to the cache).

    Args:
        model: a Keras model.
        input_shape: one input's shape, without the batch axis.
        cache_dir: the engine cache folder, ``SHARED`` (a folder of its fingerprint's), or None
            (convert in memory, cache nothing).
        calibration: images (or inputs) to quantize the network to int8 on (``quantize_int8``),
            or a function returning them, called only when the int8 network is not cached
            yet; it is then cached as ``{name}-int8.xml``, keyed by the float network's
            fingerprint and "int8" (with "-7bit" where ``runtime.int8_saturates``): the
            first calibration of a network is the one kept, unless ``calibration_key`` says
            whose it is. Default None (the float32 network).
        calibration_key: names the calibration images (``inference.int8.Int8Samples.digest``):
            the int8 network is then cached as ``{name}-int8-{key}.xml``, one per key, so
            that a network shared by runs on other images (a pretrained frozen part) is
            calibrated on each run's own; default "" (one int8 network per float network).

    Returns:
        (the ``openvino.Model``, its cached ``.xml`` path or None when it was not written).
    """
    if calibration is not None:
        from transferkit.runtime import int8_saturates

        source, source_xml = load_or_convert(model, input_shape, cache_dir)
        images = calibration if callable(calibration) else (lambda: calibration)
        seven_bits = int8_saturates()
        if source_xml is None:
            return quantize_int8(source, images(), seven_bits), None
        kind = ("int8-7bit" if seven_bits else "int8") + (f"|{calibration_key}" if calibration_key else "")
        name = f"{source_xml.stem}-int8" + (f"-{calibration_key}" if calibration_key else "")
        return _load_or_make(lambda: quantize_int8(source, images(), seven_bits), source_xml.with_name(f"{name}.xml"),
                             fingerprint=_fingerprint_file(source_xml).read_text(encoding="utf-8").strip() + f"|{kind}")
    if cache_dir is None:
        return export_network(model, input_shape), None
    fingerprint = model_fingerprint(model, input_shape)
    if isinstance(cache_dir, SharedCache):
        cache_dir = cache_dir.folder(fingerprint)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", getattr(model, "name", "") or "model")
    folder_name = f"openvino-{shape_label(input_shape)}"
    candidates = (
        Path(cache_dir) / folder_name,
        Path(tempfile.gettempdir()) / "transferkit-openvino" / fingerprint[:16] / folder_name,
    )
    return _load_or_make(lambda: export_network(model, input_shape), *(folder / f"{stem}.xml" for folder in candidates),
                         fingerprint=fingerprint)


def _load_or_make(make, *places: Path, fingerprint: str):
    """The network cached at the first of ``places`` whose fingerprint matches, else ``make()``
    written to the first place that can be written (the network and that path, or None)."""
    for xml in places:
        if _cached(xml, fingerprint):
            try:
                network = openvino_core().read_model(xml)
            except Exception as error:  # a truncated or corrupt file: convert again, say so
                log.warning("the converted network %s in the engine cache is damaged (%s); it is converted again",
                            xml, conversion_reason(error))
                for suffix in (".fingerprint", ".xml", ".bin"):
                    xml.with_suffix(suffix).unlink(missing_ok=True)
                continue
            log.debug("reusing the OpenVINO network %s", xml)
            return network, xml
    network = make()
    for xml in places:
        try:
            _write_cache(network, xml, fingerprint)
            # The network as a warm start will read it: the same graph to OpenVINO's
            # compiled-model cache, whose key the converted one (its conversion details
            # attached) does not share.
            return openvino_core().read_model(xml), xml
        except OSError as error:
            # A read-only run folder still predicts; the network goes to the temp folder.
            log.info("cannot write the OpenVINO cache in %s (%s); trying the temp folder",
                     xml.parent, error.strerror or error)
    return network, None


def quantize_int8(network, calibration: np.ndarray, seven_bits: bool = False):
    """NNCF's post-training int8 quantization of a network, calibrated on some of its inputs.

    Args:
        network: a float32 ``openvino.Model`` with one input.
        calibration: inputs to gather activation ranges on, (n, ...) of the network's input
            shape (uint8 images are converted to float32); one at a time, as NNCF advises.
        seven_bits: weights in 7 bits on every layer (NNCF's ``OverflowFix.ENABLE``), for a
            CPU whose int8 products saturate (``runtime.int8_saturates``); default False
            (NNCF's default: 7 bits on the first layer only).

    Returns:
        The quantized ``openvino.Model`` (int8 weights and activations, float32 input and outputs).

    Raises:
        ImportError: NNCF is not installed (``pip install nncf``).
    """
    import_openvino()  # its telemetry off first: NNCF imports it too
    nncf = import_without_torch("nncf", NNCF_TORCH_PARTS)
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    logging.getLogger("nncf").setLevel(logging.ERROR)
    advanced = AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE) if seven_bits else None
    dataset = nncf.Dataset([np.asarray(calibration[i : i + 1], dtype="float32") for i in range(len(calibration))])
    root = logging.getLogger()
    state = (root.level, list(root.filters), list(root.handlers))
    try:
        # NNCF draws its own progress bars on standard output, which is the user's (a CSV or
        # JSON being written there): its own lines go nowhere, transferkit tells the step.
        with contextlib.redirect_stdout(io.StringIO()):
            return nncf.quantize(network, dataset, subset_size=len(calibration), advanced_parameters=advanced)
    finally:  # as for convert_model: the root logger as it was
        root.setLevel(state[0])
        root.filters[:], root.handlers[:] = state[1], state[2]


def _fingerprint_file(xml: Path) -> Path:
    return xml.with_suffix(".fingerprint")


def _cached(xml: Path, fingerprint: str) -> bool:
    try:
        stored = _fingerprint_file(xml).read_text(encoding="utf-8").strip()
    except OSError:
        return False
    return stored == fingerprint and xml.is_file() and xml.with_suffix(".bin").is_file()


def _write_cache(network, xml: Path, fingerprint: str) -> None:
    """Save a converted network as ``xml`` + ``.bin`` with its fingerprint beside them,
    each file written atomically; the fingerprint goes last, so a half-written pair is never
    taken for a valid one."""
    ov = import_openvino()

    xml.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(xml.parent)  # what a killed conversion was writing
    _fingerprint_file(xml).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=xml.parent, prefix=f".{xml.stem}.partial-{os.getpid()}-") as staging:
        staged = Path(staging) / xml.name
        # compress_to_fp16=False: the weights stay float32; the bf16 hint decides at run time.
        ov.save_model(network, str(staged), compress_to_fp16=False)
        for suffix in (".bin", ".xml"):
            with atomic_path(xml.with_suffix(suffix)) as temporary:
                os.replace(staged.with_suffix(suffix), temporary)
    write_atomic(_fingerprint_file(xml), fingerprint + "\n")


COMPILED_FOLDER = "compiled"  # in an engine cache folder: OpenVINO's compiled-model cache


def compiled_cache_dir(ir_path: Path | None) -> Path | None:
    """Where OpenVINO keeps the compiled form of a cached network: ``compiled/`` in the
    engine cache folder that holds ``openvino-{S}px/{name}.xml``; None for a network that
    was never written (nothing to key a warm start on).

    Args:
        ir_path: the cached ``.xml`` of the network, or None.

    Returns:
        The folder (not created here: OpenVINO creates it), or None.
    """
    return None if ir_path is None else Path(ir_path).parent.parent / COMPILED_FOLDER


def compile_network(network, hint: str, ir_path: Path | None = None):
    """Compile a network for the CPU.

    Args:
        network: an ``openvino.Model``.
        hint: the inference precision hint, "bf16", "f16" or "f32".
        ir_path: where the network is cached (from ``load_or_convert``); when given, the
            compiled model is cached beside it (``compiled_cache_dir``, OpenVINO's
            ``CACHE_DIR``) and a later compile of the same network with the same settings
            loads it instead of compiling; default None (compiled every time).

    Returns:
        The ``openvino.CompiledModel``.
    """
    config = {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
    folder = compiled_cache_dir(ir_path)
    if folder is not None:
        try:
            return openvino_core().compile_model(network, "CPU", {**config, "CACHE_DIR": str(folder)})
        except Exception as error:  # a cache folder that cannot be written: compile without it
            log.debug("OpenVINO compiled-model cache %s: %s; compiling without it", folder, conversion_reason(error))
    return openvino_core().compile_model(network, "CPU", config)


# Raised whenever the conversion changes the network it writes for the same model, so that
# networks cached by an earlier release (engine folders, engine/shared/) are converted again:
# 2: models nested in a 16-bit model get float32 inputs (ConvNeXt's did not compile in bfloat16).
CONVERSION_REVISION = 2


def model_fingerprint(model, input_shape: int | tuple[int, ...]) -> str:
    """A hash of a model's architecture (its layers' ``trainable`` flags left out) and weights,
    the input shape, the OpenVINO version and ``CONVERSION_REVISION``.

    Args:
        model: a Keras model.
        input_shape: the shape the network is converted for: (S, S, 3), or S for images.

    Returns:
        A hex string; equal for the same model, different when any weight changed.
    """
    ov = import_openvino()

    digest = hashlib.sha256()
    try:
        config = json.dumps(_named_by_place(_forward_config(model.get_config())), sort_keys=True, default=repr)
    except Exception:  # a subclassed model without get_config: its shapes stand in
        config = repr((model.name, model.input_shape, model.output_shape))
    shape = _as_shape(input_shape)
    label = shape[0] if is_image_shape(shape) else shape  # images keep their earlier key
    digest.update(f"{label}|{ov.__version__}|{CONVERSION_REVISION}|{config}".encode())
    for weights in model.get_weights():
        weights = np.ascontiguousarray(weights)
        digest.update(f"{weights.dtype}{weights.shape}".encode())
        digest.update(weights.tobytes())
    return digest.hexdigest()


def _forward_config(config):
    """A model's config without its layers' ``trainable`` flags, which change nothing that runs
    forward: finetune's model and the same run loaded from model.keras (which keeps a nested
    model's flag as it pleases) then share their converted networks."""
    if isinstance(config, dict):
        return {key: _forward_config(value) for key, value in config.items() if key != "trainable"}
    if isinstance(config, list):
        return [_forward_config(value) for value in config]
    return config


def _named_by_place(config):
    """A model's config with its layers' (and its own) names replaced by their order of first
    appearance: Keras numbers the names it makes up (``input_layer_3``, ``functional_7``) per
    process, so the same classifier built twice in one process (a second finetune, the next
    tune trial, a test) had another fingerprint each time and was converted again. Names run
    nothing forward; where a name is referred to (a layer's inputs, the model's inputs and
    outputs), the reference is renamed with it, so the wiring still counts."""
    names: dict[str, str] = {}

    def collect(node):
        if isinstance(node, dict):
            # A layer: {"class_name", "config": {"name", ...}, "name" (a functional model's)}
            # ("DTypePolicy" entries are named after their dtype: not a layer).
            inner = node.get("config")
            name = node.get("name", inner.get("name") if isinstance(inner, dict) else None)
            if (isinstance(name, str) and "class_name" in node and "DTypePolicy" not in str(node["class_name"])
                    and name not in names):
                names[name] = f"#{len(names)}"
            for key in sorted(node):
                collect(node[key])
        elif isinstance(node, (list, tuple)):
            for value in node:
                collect(value)

    def renamed(node):
        if isinstance(node, dict):
            return {key: renamed(value) for key, value in node.items()}
        if isinstance(node, (list, tuple)):  # a layer's inputs are (name, node, tensor) tuples
            return [renamed(value) for value in node]
        return names.get(node, node) if isinstance(node, str) else node

    top = config.get("name") if isinstance(config, dict) else None
    if isinstance(top, str):
        names[top] = "#model"
    collect(config)
    return renamed(config)


def _as_shape(input_shape: int | tuple[int, ...]) -> tuple[int, ...]:
    return (input_shape, input_shape, 3) if isinstance(input_shape, int) else tuple(input_shape)


def export_network(model, input_shape: int | tuple[int, ...]):
    """Convert a Keras model to an ``openvino.Model`` for float32 batches of a static shape.

    On the TensorFlow backend the model's inference call is traced as a ``tf.function`` and
    converted in this process. On the others (JAX, PyTorch) it is converted by Keras's own
    OpenVINO backend in a short child process (``convert_elsewhere``), which needs neither
    TensorFlow nor the training backend, so runs trained on any backend get the engine.

    Args:
        model: a Keras model taking an image batch (or feature maps).
        input_shape: one input's shape, (S, S, 3), or the side S for images; the batch
            dimension stays dynamic.

    Returns:
        The converted ``openvino.Model``.
    """
    from transferkit.backend import active_backend

    shape = _as_shape(input_shape)
    if active_backend() != "tensorflow":
        return convert_elsewhere(model, shape)
    ov = import_openvino()
    import tensorflow as tf

    clone = float32_clone(model)
    forward = tf.function(lambda images: clone(images, training=False), autograph=False)
    concrete = forward.get_concrete_function(
        tf.TensorSpec((None, *shape), tf.float32, name="image" if is_image_shape(shape) else "features")
    )
    # convert_model configures the root logger (level, a handler, a filter) and a failed
    # conversion leaves it so; put it back, or later log lines come out in its format.
    root = logging.getLogger()
    state = (root.level, list(root.filters), list(root.handlers))
    try:
        # share_weights=False: the network's constants are copies. Shared (convert_model's
        # default), they point into the traced clone's tensors, which are freed once this
        # returns: the compiled network then read whatever was written there later (a head
        # whose every output was [1, 0, 0] after a Keras call reused the memory).
        network = ov.convert_model(concrete, share_weights=False)
    finally:
        root.setLevel(state[0])
        root.filters[:], root.handlers[:] = state[1], state[2]
    return _function_outputs_only(ov, network, [tensor.name for tensor in concrete.outputs])


def _function_outputs_only(ov, network, names: list[str]):
    """The network with the traced function's own outputs only, in its order.

    OpenVINO's TensorFlow front end also makes an output of each activation TensorFlow computes
    with a custom gradient (the swish of EfficientNetV2: 55 extra outputs), which the engine
    would take for the model's own.
    """
    results = network.get_results()
    if len(results) == len(names):
        return network
    by_name = {name: result for result in results for name in result.output(0).get_names()}
    by_name.update({name: result for result in results for name in result.input_value(0).get_names()})
    missing = [name for name in names if name not in by_name]
    if missing:
        raise RuntimeError(f"the converted network has {len(results)} outputs and none named {missing[0]!r}")
    return ov.Model([by_name[name] for name in names], network.get_parameters(), network.friendly_name)


# How long a child process may take to convert one network (Keras's start-up included).
CONVERSION_TIMEOUT = 900

# ``convert_elsewhere``'s child process (KERAS_BACKEND=openvino): SOURCE.keras TARGET.xml DIM...
# OpenVINO's telemetry is made unimportable first, as ``import_openvino`` does.
CONVERTER = """
import sys
sys.modules["openvino_telemetry"] = None
import keras
source, target, shape = sys.argv[1], sys.argv[2], tuple(int(dim) for dim in sys.argv[3:])
model = keras.models.load_model(source, compile=False)
model.export(target, format="openvino", verbose=False,
             input_signature=[keras.InputSpec(shape=(None, *shape), dtype="float32")])
"""


def convert_elsewhere(model, input_shape: tuple[int, ...]):
    """Convert a model with Keras's OpenVINO backend in a child process: the way to OpenVINO
    from the JAX and PyTorch backends (and where TensorFlow is not installed).

    The model is cloned in float32 with its same-size resize as ``keras.layers.Identity``
    (the antialiased resize has no OpenVINO equivalent; images of the network's input size
    need none), saved as a ``.keras`` file of built-in layers only, and loaded and exported
    there (``CONVERTER``: Keras and OpenVINO only, no transferkit).

    Args:
        model: a Keras model of built-in layers.
        input_shape: one input's static shape; the batch stays dynamic.

    Returns:
        The ``openvino.Model``.

    Raises:
        RuntimeError: the model resizes to another size than its input's, or the child
            process failed (its last line says why).
    """
    import subprocess
    import sys

    clone = float32_clone(model, identity_resize_at=input_shape)
    with tempfile.TemporaryDirectory(prefix="transferkit-openvino-") as folder:
        source, target = Path(folder) / "model.keras", Path(folder) / "model.xml"
        clone.save(source)
        environment = {**os.environ, "KERAS_BACKEND": "openvino", "TF_CPP_MIN_LOG_LEVEL": "3"}
        command = [sys.executable, "-c", CONVERTER, str(source), str(target), *map(str, input_shape)]
        done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=CONVERSION_TIMEOUT)
        if done.returncode != 0 or not target.is_file():
            lines = [line for line in (done.stderr or done.stdout or "").splitlines() if line.strip()]
            reason = lines[-1] if lines else f"exit status {done.returncode}"
            raise RuntimeError(f"Keras's OpenVINO backend could not convert it: {reason}")
        # Read into memory before the folder goes (a .bin file is otherwise mapped, not read).
        ov = import_openvino()
        weights = np.fromfile(target.with_suffix(".bin"), dtype=np.uint8)
        return openvino_core().read_model(target.read_text(encoding="utf-8"), ov.Tensor(weights, shared_memory=False))


def float32_clone(model, identity_resize_at: tuple[int, ...] | None = None):
    """A float32 copy of a model for conversion, with same-size resizes made the identity.

    Nested models are cloned too and weights copied layer by layer. A model the copy would not
    change (``_float32_already``: a frozen part ``model.fold.fold_batchnorm`` has just built,
    where a clone cost ResNet50's 0.4 s), or one that cannot be cloned (subclassed), is
    returned as it is, as is such a model nested in one that is cloned.

    Args:
        model: a Keras model, in any dtype policy.
        identity_resize_at: the static input shape the copy will get, for a copy of built-in
            layers only: each ``Resizing`` to that size becomes ``keras.layers.Identity``
            (any other size raises RuntimeError); default None: each ``Resizing`` passes
            through images already at its size at call time.

    Returns:
        The float32 clone (or ``model`` itself, see above).
    """
    import keras

    from transferkit.keras_private import graph_nodes

    pairs = []

    if identity_resize_at is not None:
        from transferkit.model.surgery import walk_layers

        for layer in walk_layers(model):
            if isinstance(layer, keras.layers.Resizing) and tuple(identity_resize_at[:2]) != (layer.height,
                                                                                            layer.width):
                raise RuntimeError(f"its {layer.name!r} layer resizes {identity_resize_at[0]}px images to "
                                   f"{layer.height}x{layer.width}, antialiased, which OpenVINO cannot do")
    if _float32_already(model):
        return model

    def clone_layer(layer):
        if isinstance(layer, keras.Sequential) or (isinstance(layer, keras.Model) and graph_nodes(layer) is not None):
            # Nested, as clone_model's recursion took them: a backbone, ConvNeXt's Sequentials.
            return float32_clone(layer, identity_resize_at)
        if isinstance(layer, keras.layers.Resizing) and identity_resize_at is not None:
            return keras.layers.Identity(name=layer.name, dtype="float32")
        if isinstance(layer, keras.layers.Resizing):
            return _same_size_resizing_class()(layer)
        if _fixed_normalization(layer):
            return _as_rescaling(layer)
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = "float32"
        clone = layer.__class__.from_config(config)
        pairs.append((layer, clone))
        return clone

    # A part of a 16-bit model that starts inside it (the blocks above a boundary), or a model
    # nested in one and called on its 16-bit tensors (ConvNeXt's Sequentials), has 16-bit
    # inputs: the clone's are float32, or its first operation is a cast OpenVINO cannot compile
    # (f32 to "dynamic"). Nested models are cloned here, not by clone_model's recursion, which
    # keeps their inputs' dtype.
    inputs = None
    if any(str(tensor.dtype) in ("bfloat16", "float16") for tensor in getattr(model, "inputs", None) or ()):
        inputs = [keras.Input(shape=tuple(tensor.shape[1:]), dtype="float32") for tensor in model.inputs]
        inputs = inputs[0] if not isinstance(model.input, (list, tuple, dict)) else inputs
    try:
        clone = keras.models.clone_model(model, input_tensors=inputs, clone_function=clone_layer)
    except Exception as error:
        if identity_resize_at is not None:  # the model as it is would keep its resize
            raise RuntimeError(f"it cannot be cloned in float32 ({conversion_reason(error)})") from error
        log.debug("cannot clone %s for conversion (%s); converting it as it is", model.name, error)
        return model
    for original, copy in pairs:
        # keras.ops calls in a functional graph (MobileNetV3's hard sigmoid, ConvNeXt's residual
        # sums) are cloned as operations too, and hold no weights.
        if isinstance(original, keras.layers.Layer):
            copy.set_weights(original.get_weights())
    return clone


def _float32_already(model) -> bool:
    """Whether ``float32_clone`` would change nothing in ``model``: float32 inputs and layers,
    no ``Resizing``, no fixed ``Normalization``."""
    import keras

    from transferkit.model.surgery import walk_layers

    if any(str(tensor.dtype) != "float32" for tensor in getattr(model, "inputs", None) or ()):
        return False
    for layer in (model, *walk_layers(model)):
        policy = getattr(layer, "dtype_policy", None)
        if (policy is not None and policy.name != "float32") or isinstance(layer, keras.layers.Resizing):
            return False
        if _fixed_normalization(layer):
            return False
    return True


def _fixed_normalization(layer) -> bool:
    """A ``Normalization`` over the channels with its mean and variance given, not adapted
    (EfficientNetV2's and ConvNeXt's own input normalisation)."""
    import keras

    return (isinstance(layer, keras.layers.Normalization) and not layer.invert
            and layer.input_mean is not None and tuple(layer.axis) in ((-1,), (3,)))


def _as_rescaling(layer):
    """The same per-channel ``(x - mean) / sqrt(variance)`` as a ``Rescaling`` layer, whose
    constants are made inside the traced function: tf2onnx turns the Normalization's tensors,
    made when the layer was built, into inputs of the ONNX graph that nobody feeds."""
    import keras

    mean, variance = np.broadcast_arrays(np.asarray(layer.input_mean, dtype="float64").reshape(-1),
                                         np.asarray(layer.input_variance, dtype="float64").reshape(-1))
    deviation = np.maximum(np.sqrt(variance), keras.config.epsilon())
    return keras.layers.Rescaling(scale=(1.0 / deviation).tolist(), offset=(-mean / deviation).tolist(),
                                  name=layer.name, dtype="float32")


@functools.cache
def _same_size_resizing_class():
    import keras

    class SameSizeResizing(keras.layers.Layer):
        """A ``Resizing`` that passes through images already at its target size.

        Resizing to the same size is exactly the identity, and the antialiased resize op
        has no OpenVINO conversion; other sizes still go through the original layer.
        """

        def __init__(self, original):
            super().__init__(name=original.name, dtype="float32")
            self.original = original

        def call(self, images):
            if tuple(images.shape[-3:-1]) == (self.original.height, self.original.width):
                return images
            return self.original(images)

        def compute_output_shape(self, input_shape):
            return self.original.compute_output_shape(input_shape)

    return SameSizeResizing


def engine_cache_dir(run_path: str | os.PathLike) -> Path:
    """Where a run's converted inference networks are cached.

    ``$TRANSFERKIT_CACHE`` or ``$XDG_CACHE_HOME/transferkit`` (default ``~/.cache/transferkit``),
    then ``engine/<run folder name>-<hash of its full path>``: outside the run folder, so
    predicting never changes a run, and a read-only run still gets a cache.

    Args:
        run_path: the run folder (or its model file).

    Returns:
        The folder; not created here (``claim_engine_cache`` does).
    """
    from transferkit.files import cache_root

    resolved = str(Path(run_path).resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:12]
    return cache_root() / "engine" / f"{Path(resolved).name}-{digest}"


RUN_RECORD = "run.txt"  # in each engine cache folder: the run folder it was made for


def claim_engine_cache(run_path: str | os.PathLike) -> Path:
    """A run's engine cache folder (``engine_cache_dir``), recorded as the run's, with the
    folders of runs that no longer exist removed.

    Each predicted run adds its converted networks (about 100 MB each for VGG16 / ResNet50)
    and their compiled blobs; without this, deleting runs would leave their networks behind for ever. A folder is
    removed only when the run it records is gone (no ``labels.json`` there) and is not being
    written either (no ``RUN.partial``: finetune converts the run's networks into it before
    it publishes the run); folders without a record are left alone. Nothing here stops a
    prediction: a cache that cannot be written only means converting again next time.

    Args:
        run_path: the run folder (or its model file).

    Returns:
        The run's cache folder.
    """
    from transferkit.locks import work_dir_for
    from transferkit.runs import LABELS_FILE

    folder = engine_cache_dir(run_path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / RUN_RECORD, str(Path(run_path).resolve()) + "\n")
        for other in folder.parent.iterdir():
            record = other / RUN_RECORD
            if other != folder and record.is_file():
                recorded = Path(record.read_text(encoding="utf-8").strip())
                published = (recorded / LABELS_FILE).is_file() or (recorded.parent / LABELS_FILE).is_file()
                if not published and not work_dir_for(recorded).is_dir():
                    shutil.rmtree(other, ignore_errors=True)
    except OSError as error:
        log.debug("engine cache %s: %s", folder, error)
    return folder


def is_image_shape(shape: tuple[int, ...]) -> bool:
    """Whether an input shape is a square RGB image, (S, S, 3)."""
    return len(shape) == 3 and shape[-1] == 3 and shape[0] == shape[1]


def shape_label(shape: tuple[int, ...]) -> str:
    """"224px" for (224, 224, 3) images, "14x14x512" for feature maps."""
    return f"{shape[0]}px" if is_image_shape(shape) else "x".join(map(str, shape))

