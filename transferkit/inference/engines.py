"""Forward-only inference engines: the Keras model itself, OpenVINO on a CPU, and a
classifier split into a 16-bit body and a float32 head.

Computing the frozen part's feature cache and predicting are forward passes only, and
OpenVINO's CPU runtime uses AMX / AVX-512 bfloat16 far better than Keras does.
``make_engine`` picks one; ``inference_engine`` is the same for a whole classifier, with
frozen BatchNorm folded first and, in 16 bits, a ``ChainedEngine``:

    engine = inference_engine(model, "auto", image_size=224, cache_dir=claim_engine_cache(run.path),
                              input_dtype="uint8")
    outputs = engine.predict(images)          # uint8 (B, 224, 224, 3) as decoded -> float32 outputs

With ``input_dtype="uint8"`` (what predict and the feature cache use) an image network
takes the images as decoded and converts them inside the network; with "float32" it takes
float32 batches.

How a model becomes an OpenVINO network: it is cloned in float32 (OpenVINO's TensorFlow
front end reads no bfloat16 constants; the bf16 inference hint brings the 16-bit compute
back), a ``Resizing`` layer that receives images already at its target size becomes the
identity it computes anyway (the antialiased resize op has no OpenVINO conversion), the
clone's inference call is traced as a ``tf.function`` with a dynamic batch and a static
image size, and ``openvino.convert_model`` converts that (on the JAX and PyTorch backends,
Keras's own OpenVINO backend converts the clone in a child process instead). With a ``cache_dir`` (predict
passes the run's engine cache folder, outside the run under ``~/.cache/transferkit/engine/``;
see ``inference.openvino``) the network is kept as ``cache_dir/openvino-{S}px/{model
name}.xml`` (+ ``.bin``), keyed by a fingerprint of the model's architecture and weights so
that a changed model is converted again, and its compiled form in ``cache_dir/compiled/``
(OpenVINO's CACHE_DIR), so a warm start neither converts nor compiles. Any failure to
convert or compile logs one warning and returns the Keras engine.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import numpy as np

from transferkit.errors import EngineError
from transferkit.inference.openvino import (  # noqa: F401 - SHARED: for engine callers
    SHARED,
    compile_network,
    conversion_reason,
    float32_clone,
    import_openvino,
    is_image_shape,
    load_or_convert,
    openvino_core,
    precision_hint,
    shape_label,
    uint8_input,
)
from transferkit.outputs import top_margin
from transferkit.runtime import ENGINES, gpu_visible

log = logging.getLogger("transferkit")


class ForwardEngine:
    """Runs a model's forward pass on batches; ``name`` says which runtime.

    Attributes:
        fixed_batches: whether a batch of another size costs it a new trace or compile, so
            that callers pad the last batch to the size of the others (False: an engine that
            traces nothing, which takes any batch as it comes and as large as they like).
    """

    name = ""
    fixed_batches = True

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Outputs of the model for a batch of shape (B, S, S, 3) (or the model's input
        shape), any B: uint8 images as decoded for an engine built with
        ``input_dtype="uint8"``, else float32 (the Keras engine takes either). Outputs are
        float32; a model with several outputs gives a list of arrays, in its output order."""
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
    """A compiled OpenVINO network on the CPU, with one reusable inference request (callers
    in several threads take turns: the feature cache's background views and the int8 guard).

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
        self._turn = threading.Lock()
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
            hint = f"; resize images to {expected[0]} px first" if is_image_shape(expected) else ""
            raise ValueError(
                f"the OpenVINO engine was built for batches of shape (B, {shape}), got {batch.shape}{hint}"
            )
        if len(batch) == 0:
            values = [np.zeros((0, *(dim.get_length() for dim in output.partial_shape[1:])), dtype="float32")
                      for output in self._outputs]
        else:
            # The batch is read in place (no copy into the request's own tensor); the outputs
            # are copies (share_outputs is off), the request's own once the turn is over.
            with self._turn:
                result = self._request.infer({0: batch}, share_inputs=True)
            values = [np.asarray(result[output], dtype="float32") for output in self._outputs]
        return values if len(values) > 1 else values[0]

    def output_alone(self, output: int) -> OpenVINOEngine:
        """This network reduced to one of its outputs (the layers that feed only the others
        dropped: a multi-output feature network's deeper blocks), compiled as this one was,
        with the same weights and so the same values of that output; itself where it has one
        output, or its network is not on disk to read again."""
        if len(self._outputs) == 1 or self.ir_path is None:
            return self
        network = openvino_core().read_model(str(self.ir_path))
        if self.input_dtype == "uint8":
            network = uint8_input(network)
        alone = import_openvino().Model([network.get_results()[output]], network.get_parameters(),
                                        f"{network.get_friendly_name()}-output{output}")
        hint = "f32" if self.precision_hint == "int8" else self.precision_hint  # int8: its quantized ops say so
        return OpenVINOEngine(compile_network(alone, hint), self.input_shape, self.precision_hint, None,
                              self.input_dtype)

    def __repr__(self) -> str:
        return (f"<OpenVINOEngine {self.precision_hint}, {shape_label(self.input_shape)}, "
                f"{self.input_dtype} input, ir={self.ir_path}>")


# A 16-bit prediction whose top two probabilities are closer than this is computed again in
# float32: 16-bit rounding moves probabilities by up to about 0.01, so mostly only such near
# ties can come out with another top class than in float32. Not always: on a random-weights
# VGG16 at 32 px (every output near a uniform guess over 4 classes) bfloat16 moved one of 120
# images' top two by more than 0.02 and its label differed from float32's. An int8 engine
# measures its margin on held-back images (``inference.int8``); a 16-bit one does not yet.
REFINE_MARGIN = 0.02


class TwoLookEngine(ForwardEngine):
    """An engine that looks twice: ``first_look`` gives every image's outputs fast (a 16-bit
    body) and which of them are near ties (top-two margin below ``REFINE_MARGIN``, only with
    an ``exact_factory``); ``second_look`` computes those again with the float32 engine that
    ``exact_factory`` builds (on first use, or when ``exact`` is read). ``predict`` does both.

    Attributes:
        refined: how many images were computed again in float32 so far.
    """

    refine_margin: float | None = None  # None: REFINE_MARGIN; an engine whose first look rounds more has its own

    def __init__(self, exact_factory=None):
        self._exact_factory = exact_factory
        self._exact = None
        self.refined = 0

    def predict(self, batch: np.ndarray) -> np.ndarray:
        outputs, near = self.first_look(batch)
        if len(near):
            outputs = np.array(outputs, copy=True)
            outputs[near] = self.second_look(np.asarray(batch)[near])
        return outputs

    def first_look(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The fast outputs, and the indices of the near ties that ``second_look`` should
        compute again (none without a float32 engine). A caller streaming many batches can
        gather near ties from several and look at them in one call: a float32 pass over a
        few images costs more per image than over a batch."""
        raise NotImplementedError

    def near_ties(self, outputs: np.ndarray, scores: np.ndarray | None = None) -> np.ndarray:
        """The rows of ``outputs`` to look at again: those whose ``scores`` (default the
        outputs) have a top-two margin below ``REFINE_MARGIN``; none without a float32 engine."""
        if self._exact_factory is None or len(outputs) == 0:
            return np.zeros(0, dtype="int64")
        margin = REFINE_MARGIN if self.refine_margin is None else self.refine_margin
        return np.flatnonzero(top_margin(outputs if scores is None else scores) < margin)

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


class ChainedEngine(TwoLookEngine):
    """A classifier in 16 bits: its body (preprocessing + backbone) in the 16-bit precision
    that makes it fast, then its small head in float32, so the output layer stays float32 as
    it does in Keras's mixed precision. With ``exact_factory``, near ties are computed again
    in float32 (``TwoLookEngine``), so the top class agrees with float32 Keras while
    confident predictions keep the 16-bit speed.

    Attributes:
        body, head: the two ``OpenVINOEngine`` parts.
        refined: how many images were computed again in float32 so far.
    """

    name = "openvino"

    def __init__(self, body: OpenVINOEngine, head: OpenVINOEngine, exact_factory=None):
        super().__init__(exact_factory)
        self.body, self.head = body, head
        self.input_shape = body.input_shape
        self.precision_hint = body.precision_hint
        self.ir_path = body.ir_path

    @property
    def image_size(self) -> int:
        return self.body.image_size

    def first_look(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The 16-bit outputs, and the near ties (see ``TwoLookEngine.first_look``)."""
        outputs = self.head.predict(self.body.predict(batch))
        return outputs, self.near_ties(outputs)

    def __repr__(self) -> str:
        if self._exact_factory is None:
            near_ties = "16 bits only"
        else:
            near_ties = f"near ties in float32 ({'built' if self._exact is not None else 'on first use'})"
        return f"<ChainedEngine body={self.body!r} head={self.head!r}, {near_ties}, refined={self.refined}>"


def yield_to_engine(niceness: int = 10) -> None:
    """Lower the calling thread's scheduling priority by ``niceness`` (Linux; elsewhere
    nothing happens).

    For a thread that prepares the next batch (decoding, augmenting) while the engine runs
    the current one: the engine keeps every core busy and waits at each layer for its
    slowest thread, so a helper thread of equal priority that takes a core away delays
    the whole pass by more than its own work. At a lower priority it runs in the engine's
    gaps instead. Use it as a thread pool's ``initializer``.

    Args:
        niceness: how much lower, in nice levels (the result is capped at 19); default 10.
    """
    import sys
    import threading

    if sys.platform.startswith("linux") and hasattr(os, "setpriority"):
        thread = threading.get_native_id()  # on Linux a thread id is a valid target: only it changes
        try:
            os.setpriority(os.PRIO_PROCESS, thread, min(os.getpriority(os.PRIO_PROCESS, thread) + niceness, 19))
        except OSError:
            pass


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
            the Keras backend sees no GPU, else Keras), "keras" or "openvino".
        input_shape: the shape of one input without the batch axis, (S, S, 3) for images
            (or any static shape for a model on feature maps); default the model's own input
            shape, which must then be static.
        cache_dir: the engine cache folder: the converted network is kept under
            ``openvino-{S}px/`` and its compiled form under ``compiled/``; default None
            (convert and compile every time). A folder that cannot be written is replaced
            by one under the system's temporary folder.
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
            log.warning("OpenVINO cannot be imported (%s); using Keras for inference", conversion_reason(error))
        return KerasEngine(model)
    if engine == "auto" and gpu_visible():
        log.debug("a GPU is visible to the Keras backend; using Keras for inference")
        return KerasEngine(model)
    input_shape = _input_shape(model, input_shape)
    if input_dtype == "uint8" and not is_image_shape(input_shape):
        raise ValueError(f"input_dtype='uint8' is for image networks, not inputs of shape {input_shape}")
    hint = precision_hint(precision)
    step = "conversion"
    try:
        network, ir_path = load_or_convert(model, input_shape, cache_dir)
        if input_dtype == "uint8":
            network = uint8_input(network)
        step = "compilation"
        compiled = compile_network(network, hint, ir_path)
    except Exception as error:  # any OpenVINO or tracing failure: Keras still works
        log.warning(
            "OpenVINO %s of %s failed (%s); using Keras for inference",
            step, getattr(model, "name", "the model"), conversion_reason(error),
        )
        return KerasEngine(model)
    log.debug("inference engine: OpenVINO on CPU, %s, %s", hint, shape_label(input_shape))
    return OpenVINOEngine(compiled, input_shape, hint, ir_path, input_dtype)


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
        precision: "auto", "float32", "bfloat16", "float16" or "int8" (float32 here:
            ``inference.int8.forward_engine`` is the one that runs int8); default "auto". A classifier
            in 16 bits (auto on a CPU with bfloat16, or asked for) gets a ``ChainedEngine``:
            body in 16 bits, head in float32; with "auto" near ties are also computed again
            in float32. The Keras engine runs a 16-bit model's float32 clone for "float32"
            and keeps the model's own policy otherwise (with a warning when a different
            16-bit precision was asked for).
        input_dtype: "float32" (default) or "uint8" (images as decoded; see ``make_engine``).

    Returns:
        A ``ForwardEngine``.
    """
    from transferkit.model.fold import batchnorm_count, fold_batchnorm

    if batchnorm_count(model):
        model = fold_batchnorm(model, fold_trainable=True)
    shape = (image_size, image_size, 3) if image_size else None
    parts = body_and_head(model)
    if parts is not None and engine != "keras" and precision_hint(precision) != "f32":
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
    from transferkit.model.surgery import compute_dtype

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


def body_and_head(model):
    """Split a transferkit classifier in two.

    Args:
        model: a classifier (image -> "preprocessing" -> "backbone" -> "head"), or any model.

    Returns:
        (body: images -> the backbone's feature maps, head), or None for other models.
    """
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
