"""Forward-only inference engines: the Keras model itself, or OpenVINO on a CPU.

Computing the frozen part's feature cache and predicting are forward passes only, and
OpenVINO's CPU runtime uses AMX / AVX-512 bfloat16 far better than Keras does (ResNet50 at
224 px: about 8x the images per second). ``make_engine`` picks one:

    engine = make_engine(extractor, "auto", input_shape=(224, 224, 3), cache_dir=run / ".engine")
    features = engine.predict(images)          # float32 (B, 224, 224, 3) -> float32 outputs

With ``input_dtype="uint8"`` an image network takes the images as decoded and converts
them inside the network (what predict and the feature cache use).

How a model becomes an OpenVINO network: it is cloned in float32 (OpenVINO's TensorFlow
front end reads no bfloat16 constants; the bf16 inference hint brings the 16-bit compute
back), a ``Resizing`` layer that receives images already at its target size becomes the
identity it computes anyway (the antialiased resize op has no OpenVINO conversion), the
clone's inference call is traced as a ``tf.function`` with a dynamic batch and a static
image size, and ``openvino.convert_model`` converts that. The network is cached as
``cache_dir/openvino-{S}px/{model name}.xml`` (+ ``.bin``), keyed by a fingerprint of the
model's architecture and weights, so a changed model is converted again. Any failure to
convert or compile logs one warning and returns the Keras engine.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np

from transferkit.errors import EngineError

log = logging.getLogger("transferkit")

ENGINES = ("auto", "keras", "openvino")

# Keras dtype policy -> OpenVINO CPU inference precision hint.
_PRECISION_HINTS = {"float32": "f32", "mixed_bfloat16": "bf16", "mixed_float16": "f16"}


class ForwardEngine:
    """Runs a model's forward pass on float32 image batches; ``name`` says which runtime."""

    name = ""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Outputs of the model for a float32 batch of shape (B, S, S, 3); any B, float32.
        A model with several outputs gives a list of arrays, in the model's output order."""
        raise NotImplementedError

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.predict(batch)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name}>"


class KerasEngine(ForwardEngine):
    """The Keras model's own ``predict_on_batch``."""

    name = "keras"

    def __init__(self, model):
        self.model = model

    def predict(self, batch: np.ndarray) -> np.ndarray:
        outputs = self.model.predict_on_batch(np.asarray(batch, dtype="float32"))
        # A mixed_bfloat16 feature extractor returns bfloat16; callers get float32 from both engines.
        if isinstance(outputs, (list, tuple)):
            return [np.asarray(output).astype("float32", copy=False) for output in outputs]
        return np.asarray(outputs).astype("float32", copy=False)


class OpenVINOEngine(ForwardEngine):
    """A compiled OpenVINO network on the CPU, with one reusable inference request.

    Attributes:
        precision_hint: "bf16", "f16" or "f32", the CPU's inference precision.
        ir_path: the cached ``.xml`` file, or None when the network was never written.
        input_dtype: "uint8" (images as decoded, converted to float inside the network) or
            "float32" (any other dtype is converted to float32 first).
    """

    name = "openvino"

    def __init__(self, compiled, input_shape: tuple[int, ...], precision_hint: str, ir_path: Path | None,
                 input_dtype: str = "float32"):
        self._compiled = compiled
        self._request = compiled.create_infer_request()
        self._outputs = list(compiled.outputs)
        self.input_shape = tuple(input_shape)
        self.precision_hint = precision_hint
        self.ir_path = ir_path
        self.input_dtype = input_dtype

    @property
    def image_size(self) -> int:
        """The side S of the (S, S, 3) images the network takes."""
        return self.input_shape[0]

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        if self.input_dtype == "uint8" and batch.dtype != np.uint8:
            raise ValueError(
                f"this OpenVINO engine takes uint8 images, got {batch.dtype}; pass the images "
                "as decoded (uint8) or build the engine with input_dtype='float32'"
            )
        batch = np.ascontiguousarray(batch, dtype=self.input_dtype)
        expected = self.input_shape
        if batch.shape[1:] != expected:
            shape = ", ".join(map(str, expected))
            hint = f"; resize images to {expected[0]} px first" if _is_image_shape(expected) else ""
            raise ValueError(
                f"the OpenVINO engine was built for batches of shape (B, {shape}), got {batch.shape}{hint}"
            )
        if len(batch) == 0:
            values = [np.zeros((0, *(dim.get_length() for dim in output.partial_shape[1:])), dtype="float32")
                      for output in self._outputs]
        else:
            # The batch is read in place (no copy into the request's own tensor).
            result = self._request.infer({0: batch}, share_inputs=True)
            values = [np.asarray(result[output], dtype="float32") for output in self._outputs]
        return values if len(values) > 1 else values[0]

    def __repr__(self) -> str:
        return (f"<OpenVINOEngine {self.precision_hint}, {_shape_label(self.input_shape)}, "
                f"{self.input_dtype} input, ir={self.ir_path}>")


# A 16-bit prediction whose top two probabilities are closer than this is computed again in
# float32: 16-bit rounding moves probabilities by up to about 0.01, so only such near ties can
# come out with another top class than in float32.
REFINE_MARGIN = 0.02


class ChainedEngine(ForwardEngine):
    """A classifier in 16 bits: its body (preprocessing + backbone) in the 16-bit precision
    that makes it fast, then its small head in float32, so the output layer stays float32 as
    it does in Keras's mixed precision. With ``exact_factory``, near ties (top-two margin
    below ``REFINE_MARGIN``) are computed again by the float32 engine it builds (on first
    use, or when ``exact`` is read), so the top class agrees with float32 Keras while
    confident predictions keep the 16-bit speed.

    Attributes:
        body, head: the two ``OpenVINOEngine`` parts.
        refined: how many images were computed again in float32 so far.
    """

    name = "openvino"

    def __init__(self, body: "OpenVINOEngine", head: "OpenVINOEngine", exact_factory=None):
        self.body, self.head = body, head
        self.input_shape = body.input_shape
        self.precision_hint = body.precision_hint
        self.ir_path = body.ir_path
        self._exact_factory = exact_factory
        self._exact = None
        self.refined = 0

    @property
    def image_size(self) -> int:
        return self.body.image_size

    def predict(self, batch: np.ndarray) -> np.ndarray:
        outputs, near = self.first_look(batch)
        if len(near):
            outputs = np.array(outputs, copy=True)
            outputs[near] = self.second_look(np.asarray(batch)[near])
        return outputs

    def first_look(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The 16-bit outputs, and the indices of the near ties that ``second_look`` should
        compute again (none without a float32 engine). A caller streaming many batches can
        gather near ties from several and look at them in one call: a float32 pass over a
        few images costs more per image than over a batch."""
        outputs = self.head.predict(self.body.predict(batch))
        if self._exact_factory is None or len(outputs) == 0:
            return outputs, np.zeros(0, dtype="int64")
        return outputs, np.flatnonzero(_top_margin(outputs) < REFINE_MARGIN)

    def second_look(self, images: np.ndarray) -> np.ndarray:
        """Float32 outputs for images (near ties from ``first_look``)."""
        self.refined += len(images)
        return self.exact.predict(images)

    @property
    def exact(self) -> ForwardEngine | None:
        """The float32 engine for near ties (built on first use); None without one."""
        if self._exact is None and self._exact_factory is not None:
            self._exact = self._exact_factory()
        return self._exact


def yield_to_engine(niceness: int = 10) -> None:
    """Lower the calling thread's scheduling priority by ``niceness`` (Linux; elsewhere
    nothing happens).

    For a thread that prepares the next batch (decoding, augmenting) while the engine runs
    the current one: the engine keeps every core busy and waits at each layer for its
    slowest thread, so a helper thread of equal priority that takes a core away delays
    the whole pass by more than its own work. At a lower priority it runs in the engine's
    gaps instead (measured here on 2 cores, ResNet50 predict with Pillow decoding: 0.60-0.82
    of the bare forward with the decoder at equal priority, 0.84-0.93 with it lowered; with
    the cheaper simplejpeg decoding and uint8 batches the difference is within noise,
    0.893 at equal priority vs 0.888 lowered). Use it as a thread pool's ``initializer``.
    """
    import sys
    import threading

    if sys.platform.startswith("linux") and hasattr(os, "setpriority"):
        thread = threading.get_native_id()  # on Linux a thread id is a valid target: only it changes
        try:
            os.setpriority(os.PRIO_PROCESS, thread, min(os.getpriority(os.PRIO_PROCESS, thread) + niceness, 19))
        except OSError:
            pass


def _top_margin(outputs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row (a single sigmoid unit p: |2p - 1|)."""
    if outputs.shape[-1] == 1:
        return np.abs(2.0 * outputs[:, 0] - 1.0)
    top = np.partition(outputs, -2, axis=-1)
    return top[:, -1] - top[:, -2]

    def __repr__(self) -> str:
        return f"<ChainedEngine body {self.body!r}, head {self.head!r}>"


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


def make_engine(
    model,
    engine: str = "auto",
    input_shape: tuple[int, int, int] | None = None,
    cache_dir: str | os.PathLike | None = None,
    precision: str = "auto",
    input_dtype: str = "float32",
) -> ForwardEngine:
    """Choose and build the engine for a model's forward passes.

    Args:
        model: a Keras model taking an image batch: a whole classifier, or a feature
            extractor such as ``keras.Model(images, backbone_output)``.
        engine: "auto" (default: OpenVINO when the ``openvino`` package imports and
            TensorFlow sees no GPU, else Keras), "keras" or "openvino".
        input_shape: the shape of one input without the batch axis, (S, S, 3) for images
            (or any static shape for a model on feature maps); default the model's own input
            shape, which must then be static.
        cache_dir: where the converted network is kept, under ``openvino-{S}px/``; default
            None (convert in memory every time). A folder that cannot be written (a
            read-only run) is replaced by one under the system's temporary folder.
        precision: "auto" (default: bfloat16 on a CPU with AMX or AVX512-BF16), "float32",
            "bfloat16" or "float16"; sets OpenVINO's inference precision hint.
        input_dtype: "float32" (default) or "uint8": an image network that takes the
            images as decoded, 0-255, and converts them to float inside the network (the
            same outputs, without a float32 copy of every batch in Python). Only for image
            input shapes; the Keras engine takes either.

    Returns:
        A ``ForwardEngine``; ``.name`` is "keras" or "openvino". Failing to convert or
        compile for OpenVINO logs one warning and returns the Keras engine.

    Raises:
        EngineError: ``engine="openvino"`` without the openvino package installed.
        ValueError: an unknown engine, or no static ``input_shape`` to convert with.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if input_dtype not in ("float32", "uint8"):
        raise ValueError(f"input_dtype must be float32 or uint8, got {input_dtype!r}")
    if engine == "keras":
        return KerasEngine(model)
    try:
        import_openvino()
    except ImportError as error:
        if engine == "openvino":
            raise EngineError(
                "--engine openvino needs the openvino package, which is not installed "
                f"({error}); run: pip install openvino  (or pass --engine keras)"
            ) from error
        if isinstance(error, ModuleNotFoundError) and error.name == "openvino":
            log.debug("openvino is not installed; using Keras for inference "
                      "(pip install openvino for faster CPU inference)")
        else:
            log.warning("OpenVINO cannot be imported (%s); using Keras for inference", _one_line(error))
        return KerasEngine(model)
    if engine == "auto" and _gpu_visible():
        log.debug("a GPU is visible to TensorFlow; using Keras for inference")
        return KerasEngine(model)
    input_shape = _input_shape(model, input_shape)
    if input_dtype == "uint8" and not _is_image_shape(input_shape):
        raise ValueError(f"input_dtype='uint8' is for image networks, not inputs of shape {input_shape}")
    hint = _precision_hint(precision)
    step = "conversion"
    try:
        network, ir_path = _load_or_convert(model, input_shape, cache_dir)
        if input_dtype == "uint8":
            network = _uint8_input(network)
        step = "compilation"
        compiled = _core().compile_model(
            network, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": "LATENCY"}
        )
    except Exception as error:  # any OpenVINO or tracing failure: Keras still works
        log.warning(
            "OpenVINO %s of %s failed (%s); using Keras for inference",
            step, getattr(model, "name", "the model"), _one_line(error),
        )
        return KerasEngine(model)
    log.info("inference engine: OpenVINO on CPU, %s, %s", hint, _shape_label(input_shape))
    return OpenVINOEngine(compiled, input_shape, hint, ir_path, input_dtype)


def _uint8_input(network):
    """The network taking uint8 images: the conversion to float32 becomes its first op
    (OpenVINO's preprocessing; the cached network itself stays float32-input)."""
    ov = import_openvino()

    steps = ov.preprocess.PrePostProcessor(network)
    steps.input(0).tensor().set_element_type(ov.Type.u8)
    steps.input(0).preprocess().convert_element_type(ov.Type.f32)
    return steps.build()


def _one_line(error: BaseException) -> str:
    lines = [line.strip(" -") for line in str(error).splitlines() if line.strip(" -")]
    # OpenVINO's conversion report starts with a source location; the op list says more.
    telling = [line for line in lines if "No conversion rule" in line] or lines
    return f"{type(error).__name__}: {telling[0][:200]}" if telling else type(error).__name__


def _gpu_visible() -> bool:
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def _input_shape(model, input_shape) -> tuple[int, ...]:
    if input_shape is None:
        input_shape = tuple(model.input_shape[1:])
    input_shape = tuple(input_shape)
    if any(dim is None for dim in input_shape) or (
        len(input_shape) == 3 and input_shape[-1] == 3 and input_shape[0] != input_shape[1]
    ):
        raise ValueError(
            f"make_engine needs a static input_shape, square (S, S, 3) for images, got {input_shape}; "
            "pass input_shape=(image_size, image_size, 3)"
        )
    return tuple(int(dim) for dim in input_shape)


def _is_image_shape(shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and shape[-1] == 3 and shape[0] == shape[1]


def _shape_label(shape: tuple[int, ...]) -> str:
    """"224px" for (224, 224, 3) images, "14x14x512" for feature maps."""
    return f"{shape[0]}px" if _is_image_shape(shape) else "x".join(map(str, shape))


def _precision_hint(precision: str) -> str:
    from transferkit.precision import POLICIES, resolve_precision

    if precision != "auto" and precision not in POLICIES and precision not in _PRECISION_HINTS:
        raise ValueError(
            f"precision must be auto, {', '.join(POLICIES)}, got {precision!r}"
        )
    policy = precision if precision in _PRECISION_HINTS else resolve_precision(precision)[0]
    return _PRECISION_HINTS[policy]


@functools.lru_cache(maxsize=None)
def _core():
    ov = import_openvino()

    return ov.Core()


def _load_or_convert(model, input_shape: tuple[int, ...], cache_dir):
    """The OpenVINO network for a model: read from the cache when its fingerprint matches."""
    if cache_dir is None:
        return export_network(model, input_shape), None
    fingerprint = model_fingerprint(model, input_shape)
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", getattr(model, "name", "") or "model")
    folder_name = f"openvino-{_shape_label(input_shape)}"
    candidates = (
        Path(cache_dir) / folder_name,
        Path(tempfile.gettempdir()) / "transferkit-openvino" / fingerprint[:16] / folder_name,
    )
    for folder in candidates:
        xml = folder / f"{stem}.xml"
        if _cached(xml, fingerprint):
            log.debug("reusing the OpenVINO network %s", xml)
            return _core().read_model(xml), xml
    network = export_network(model, input_shape)
    for folder in candidates:
        xml = folder / f"{stem}.xml"
        try:
            _write_cache(network, xml, fingerprint)
            return network, xml
        except OSError as error:
            # A read-only run folder still predicts; the network goes to the temp folder.
            log.info("cannot write the OpenVINO cache in %s (%s); trying the temp folder",
                     folder, error.strerror or error)
    return network, None


def _fingerprint_file(xml: Path) -> Path:
    return xml.with_suffix(".fingerprint")


def _cached(xml: Path, fingerprint: str) -> bool:
    try:
        stored = _fingerprint_file(xml).read_text(encoding="utf-8").strip()
    except OSError:
        return False
    return stored == fingerprint and xml.is_file() and xml.with_suffix(".bin").is_file()


def _write_cache(network, xml: Path, fingerprint: str) -> None:
    ov = import_openvino()

    xml.parent.mkdir(parents=True, exist_ok=True)
    staging = xml.with_name(f".{xml.stem}.partial-{os.getpid()}.xml")
    try:
        # compress_to_fp16=False: the weights stay float32; the bf16 hint decides at run time.
        ov.save_model(network, str(staging), compress_to_fp16=False)
        # The fingerprint goes last, so a half-written pair is never taken for a valid one.
        _fingerprint_file(xml).unlink(missing_ok=True)
        os.replace(staging.with_suffix(".bin"), xml.with_suffix(".bin"))
        os.replace(staging, xml)
        _fingerprint_file(xml).write_text(fingerprint + "\n", encoding="utf-8")
    finally:
        staging.unlink(missing_ok=True)
        staging.with_suffix(".bin").unlink(missing_ok=True)


def model_fingerprint(model, input_shape: int | tuple[int, ...]) -> str:
    """A hash of a model's architecture and weights, the input shape and the OpenVINO version.

    Args:
        model: a Keras model.
        input_shape: the shape the network is converted for: (S, S, 3), or S for images.

    Returns:
        A hex string; equal for the same model, different when any weight changed.
    """
    ov = import_openvino()

    digest = hashlib.sha256()
    try:
        config = json.dumps(model.get_config(), sort_keys=True, default=repr)
    except Exception:  # a subclassed model without get_config: its shapes stand in
        config = repr((model.name, model.input_shape, model.output_shape))
    shape = _as_shape(input_shape)
    label = shape[0] if _is_image_shape(shape) else shape  # images keep their earlier key
    digest.update(f"{label}|{ov.__version__}|{config}".encode())
    for weights in model.get_weights():
        weights = np.ascontiguousarray(weights)
        digest.update(f"{weights.dtype}{weights.shape}".encode())
        digest.update(weights.tobytes())
    return digest.hexdigest()


def _as_shape(input_shape: int | tuple[int, ...]) -> tuple[int, ...]:
    return (input_shape, input_shape, 3) if isinstance(input_shape, int) else tuple(input_shape)


def export_network(model, input_shape: int | tuple[int, ...]):
    """Convert a Keras model to an ``openvino.Model`` for float32 batches of a static shape.

    Args:
        model: a Keras model taking an image batch (or feature maps).
        input_shape: one input's shape, (S, S, 3), or the side S for images; the batch
            dimension stays dynamic.

    Returns:
        The converted ``openvino.Model``.
    """
    ov = import_openvino()
    import tensorflow as tf

    clone = float32_clone(model)
    forward = tf.function(lambda images: clone(images, training=False), autograph=False)
    shape = _as_shape(input_shape)
    concrete = forward.get_concrete_function(
        tf.TensorSpec((None, *shape), tf.float32, name="image" if _is_image_shape(shape) else "features")
    )
    # convert_model configures the root logger (level, a handler, a filter) and a failed
    # conversion leaves it so; put it back, or later log lines come out in its format.
    root = logging.getLogger()
    state = (root.level, list(root.filters), list(root.handlers))
    try:
        return ov.convert_model(concrete)
    finally:
        root.setLevel(state[0])
        root.filters[:], root.handlers[:] = state[1], state[2]


def float32_clone(model):
    """A float32 copy of a model for conversion, with same-size resizes made the identity.

    Nested models are cloned too and weights copied layer by layer. A model that cannot be
    cloned (subclassed) is returned as it is.
    """
    import keras

    pairs = []

    def clone_layer(layer):
        if isinstance(layer, keras.layers.Resizing):
            return _same_size_resizing_class()(layer)
        config = layer.get_config()
        if "dtype" in config:
            config["dtype"] = "float32"
        clone = layer.__class__.from_config(config)
        pairs.append((layer, clone))
        return clone

    try:
        clone = keras.models.clone_model(model, clone_function=clone_layer, recursive=True)
    except Exception as error:
        log.debug("cannot clone %s for conversion (%s); converting it as it is", model.name, error)
        return model
    for original, copy in pairs:
        copy.set_weights(original.get_weights())
    return clone


@functools.lru_cache(maxsize=None)
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


def inference_engine(model, engine: str = "auto", image_size: int | None = None,
                     cache_dir: str | os.PathLike | None = None, precision: str = "auto",
                     input_dtype: str = "float32") -> ForwardEngine:
    """``make_engine`` for inference, with frozen BatchNorm folded into the convolutions first.

    Folding changes nothing for OpenVINO (it folds on its own) but makes the Keras fallback
    fast in bfloat16 on ResNet50.

    Args:
        model: the model to run forward only (a classifier or a feature extractor).
        engine: "auto", "keras" or "openvino"; default "auto".
        image_size: the side of the square batches it will get; default the model's own.
        cache_dir: where the converted network is cached; default None (not cached).
        precision: "auto", "float32", "bfloat16" or "float16"; default "auto". A classifier
            in 16 bits (auto on a CPU with bfloat16, or asked for) gets a ``ChainedEngine``:
            body in 16 bits, head in float32; with "auto" near ties are also computed again
            in float32. The Keras engine runs a 16-bit model's float32 clone for "float32"
            and keeps the model's own policy otherwise (with a warning when a different
            16-bit precision was asked for).
        input_dtype: "float32" (default) or "uint8" (images as decoded; see ``make_engine``).

    Returns:
        A ``ForwardEngine``.
    """
    from transferkit.fold import batchnorm_count, fold_batchnorm

    if batchnorm_count(model):
        model = fold_batchnorm(model, fold_trainable=True)
    shape = (image_size, image_size, 3) if image_size else None
    parts = _body_and_head(model)
    if parts is not None and engine != "keras" and _precision_hint(precision) != "f32":
        # A classifier in 16 bits: the body runs in 16 bits, the head (a few dense layers,
        # next to nothing to compute) in float32, and, for precision "auto", near ties
        # again in float32 ("bfloat16" or "float16" asked for explicitly: 16 bits only).
        body, head = parts
        body_engine = make_engine(body, engine, input_shape=shape, cache_dir=cache_dir, precision=precision,
                                  input_dtype=input_dtype)
        if not isinstance(body_engine, OpenVINOEngine):
            return _keras_engine(model, precision)
        head_engine = make_engine(head, "openvino", cache_dir=cache_dir, precision="float32")
        if isinstance(head_engine, OpenVINOEngine):
            if shape is None or precision != "auto":
                return ChainedEngine(body_engine, head_engine)

            def exact():
                return make_engine(model, "openvino", input_shape=shape, cache_dir=cache_dir, precision="float32",
                                   input_dtype=input_dtype)

            return ChainedEngine(body_engine, head_engine, exact)
    forward = make_engine(model, engine, input_shape=shape, cache_dir=cache_dir, precision=precision,
                          input_dtype=input_dtype)
    return _keras_engine(model, precision) if isinstance(forward, KerasEngine) else forward


def _keras_engine(model, precision: str) -> KerasEngine:
    """The Keras engine in the precision asked for, where Keras can give it.

    "float32" runs the model's float32 clone when the model computes in 16 bits (a run
    trained in mixed precision), so the outputs are float32 Keras's. A 16-bit precision
    other than the model's own cannot be had without rebuilding it: the model keeps its
    policy, and a one-line notice says so. "auto" is the model's own policy.
    """
    from transferkit.precision import compute_dtype

    own = compute_dtype(model)
    # A Keras policy name ("mixed_bfloat16") asks for the same as its compute dtype.
    precision = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}.get(precision, precision)
    if precision == "float32" and own != "float32":
        return KerasEngine(float32_clone(model))
    if precision in ("bfloat16", "float16") and own != precision:
        log.warning(
            "the Keras engine runs the model in its own %s precision, not %s (a 16-bit "
            "--precision applies to the OpenVINO engine; the Keras engine also takes float32)",
            own, precision,
        )
    return KerasEngine(model)


def _body_and_head(model):
    """(images -> head input, head) for a transferkit classifier; None for other models."""
    import keras

    names = [layer.name for layer in model.layers]
    if names[1:] != ["preprocessing", "backbone", "head"]:
        return None
    try:
        images = keras.Input(shape=tuple(model.input_shape[1:]), name="image")
        features = model.get_layer("backbone")(model.get_layer("preprocessing")(images))
        body = keras.Model(images, features, name="body")
    except Exception as error:  # not the classifier's layout after all
        log.debug("cannot split %s into body and head (%s)", model.name, error)
        return None
    return body, model.get_layer("head")

