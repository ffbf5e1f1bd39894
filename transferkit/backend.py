"""The Keras backend a process runs on (TensorFlow, JAX or PyTorch) and the few things that
differ between them, each behind one helper: which backend, which GPUs it sees, and
gradients outside ``fit`` (Grad-CAM, the learning checks).

Keras reads ``KERAS_BACKEND`` once, when it is first imported; transferkit sets it to
"tensorflow" unless it is set already, so ``KERAS_BACKEND=jax transferkit finetune ...``
trains on JAX. Model code uses ``keras`` and ``keras.ops`` only, so a run folder saved on
one backend loads and predicts the same on the others; TensorFlow is imported only where a
TensorFlow-only feature needs it (the TensorFlow exports, ``--tensorboard``, the tf.data
input of Keras on TensorFlow), so training, data-parallel included, runs where Python has JAX
or PyTorch and no TensorFlow.

    from transferkit.backend import active_backend, input_gradient
    active_backend()                                  # "jax"
    score, grad = input_gradient(lambda x: keras.ops.sum(model(x)), images)
"""

from __future__ import annotations

import os
from pathlib import Path

# The Keras backends transferkit trains and predicts on; the names KERAS_BACKEND takes.
BACKENDS = ("tensorflow", "jax", "torch")


def requested_backend() -> str:
    """The backend Keras runs (or will run) on, read without importing Keras: ``KERAS_BACKEND``,
    which ``import transferkit`` sets to "tensorflow" when it is unset.

    Returns:
        The lower-cased name, e.g. "jax".
    """
    return os.environ.get("KERAS_BACKEND", "tensorflow").strip().lower() or "tensorflow"


# JAX's persistent compilation cache, set for a process on the JAX backend unless the user
# set it (JAX reads these when it is imported): on JAX every new program is compiled by XLA
# first (each layer's random initializer, each train and predict step), which takes longer
# than the tiny runs themselves; kept, the next process loads them instead. Every program is
# kept (most compile in under JAX's default threshold of 1 s), up to 1 GiB.
JAX_CACHE_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0.0, "jax_compilation_cache_max_size": 2**30}
JAX_CACHE_FOLDER = "jax"  # under files.cache_root()


def use_jax_compilation_cache() -> Path | None:
    """On the JAX backend: keep XLA's compiled programs under ``files.cache_root()/jax``
    (JAX's ``jax_compilation_cache_dir``) unless the user chose a folder already
    (``JAX_COMPILATION_CACHE_DIR``). Before JAX is imported it sets JAX's variables; after,
    its configuration (which takes effect while nothing was compiled yet).

    Returns:
        The cache folder, or None (another backend, or the user's own setting stands).
    """
    import sys

    from transferkit.files import cache_root

    jax = sys.modules.get("jax")
    if requested_backend() != "jax" or "JAX_COMPILATION_CACHE_DIR" in os.environ or (
            jax is not None and jax.config.jax_compilation_cache_dir is not None):
        return None
    folder = cache_root() / JAX_CACHE_FOLDER
    for name, value in {"jax_compilation_cache_dir": str(folder), **JAX_CACHE_SETTINGS}.items():
        if name.upper() in os.environ:
            continue  # the user's own
        if jax is None:
            os.environ[name.upper()] = str(value)
        else:
            jax.config.update(name, value)
    return folder


def active_backend() -> str:
    """The backend Keras runs on in this process (imports Keras).

    Returns:
        "tensorflow", "jax", "torch" (or another backend Keras knows, e.g. "openvino").
    """
    import keras

    return keras.config.backend()


def gpu_capabilities() -> list[tuple[int, int] | None]:
    """The GPUs the active backend sees, each as its CUDA compute capability (major, minor),
    or None where the backend does not say.

    Returns:
        One entry per GPU; empty on a CPU-only machine.
    """
    backend = active_backend()
    if backend == "tensorflow":
        import tensorflow as tf

        found = []
        for device in tf.config.list_physical_devices("GPU"):
            capability = tf.config.experimental.get_device_details(device).get("compute_capability")
            found.append(tuple(int(part) for part in capability) if capability else None)
        return found
    if backend == "jax":
        import jax

        try:
            devices = jax.devices("gpu")
        except RuntimeError:  # no GPU platform in this jaxlib
            return []
        return [_capability_text(getattr(device, "compute_capability", None)) for device in devices]
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return []
        return [tuple(torch.cuda.get_device_capability(index)) for index in range(torch.cuda.device_count())]
    return []


def _capability_text(text) -> tuple[int, int] | None:
    try:
        major, minor = str(text).split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def input_gradient(function, x):
    """A scalar function's value and its gradient with respect to its input, on any backend.

    Args:
        function: takes a backend tensor shaped like ``x`` and returns a scalar backend
            tensor, using Keras layers and ``keras.ops`` only.
        x: the point, a float32 array.

    Returns:
        (value, gradient): a float and a float32 array shaped like ``x``.
    """
    import numpy as np

    backend = active_backend()
    x = np.asarray(x, dtype="float32")
    if backend == "tensorflow":
        import tensorflow as tf

        point = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(point)
            value = function(point)
        gradient = tape.gradient(value, point)
    elif backend == "jax":
        import jax

        value, gradient = jax.value_and_grad(function)(jax.numpy.asarray(x))
    elif backend == "torch":
        import torch

        point = torch.tensor(x, requires_grad=True)
        with torch.enable_grad():
            value = function(point)
            (gradient,) = torch.autograd.grad(value, point)
        value, gradient = value.detach().cpu(), gradient.detach().cpu()
    else:
        raise NotImplementedError(f"gradients on the Keras {backend} backend; use tensorflow, jax or torch")
    return float(np.asarray(value)), np.asarray(gradient, dtype="float32")


def weight_gradients(model, loss_of_outputs, x) -> list:
    """The gradient of a loss with respect to each of a model's trainable weights, for one
    batch in training mode (dropout on, BatchNorm on batch statistics), on any backend. The
    model's variables are not changed (moving statistics included).

    Args:
        model: a Keras model.
        loss_of_outputs: takes the model's outputs (a backend tensor) and returns the
            scalar loss (e.g. a Keras loss with the targets bound).
        x: the batch.

    Returns:
        One array per ``model.trainable_weights`` entry, in that order (None where the loss
        does not depend on it).
    """
    import numpy as np

    backend = active_backend()
    variables = list(model.trainable_weights)
    if not variables:
        return []
    x = np.asarray(x, dtype="float32")
    if backend == "jax":
        import jax

        # stateless_call takes every variable (seed generators' states too); the trainable
        # ones are the trainable weights, in the same order.
        others = [variable.value for variable in model.non_trainable_variables]

        def loss(values):
            outputs, _ = model.stateless_call(values, others, x, training=True)
            return loss_of_outputs(outputs)

        gradients = jax.grad(loss)([variable.value for variable in model.trainable_variables])
    elif backend == "tensorflow":
        import tensorflow as tf

        saved = [variable.numpy() for variable in model.non_trainable_weights]
        with tf.GradientTape() as tape:
            loss = loss_of_outputs(model(x, training=True))
        gradients = tape.gradient(loss, [variable.value for variable in variables])
        _restore(model.non_trainable_weights, saved)
    elif backend == "torch":
        import torch

        saved = [variable.numpy() for variable in model.non_trainable_weights]
        with torch.enable_grad():
            loss = loss_of_outputs(model(x, training=True))
            gradients = torch.autograd.grad(loss, [variable.value for variable in variables], allow_unused=True)
        gradients = [None if gradient is None else gradient.detach().cpu() for gradient in gradients]
        _restore(model.non_trainable_weights, saved)
    else:
        raise NotImplementedError(f"gradients on the Keras {backend} backend; use tensorflow, jax or torch")
    return [None if gradient is None else np.asarray(gradient, dtype="float32") for gradient in gradients]


def _restore(variables, values) -> None:
    for variable, value in zip(variables, values):
        variable.assign(value)


# The Resizing interpolations each backend's resize op has (Keras raises on the others when
# the layer is called), and what stands in for one another backend lacks: the nearest kernel
# it has, antialiased (an area resize averages the input pixels an output pixel covers).
RESIZE_INTERPOLATIONS = {
    "tensorflow": ("bilinear", "nearest", "lanczos3", "lanczos5", "bicubic", "area"),
    "jax": ("bilinear", "nearest", "lanczos3", "lanczos5", "bicubic"),
    "torch": ("bilinear", "nearest", "bicubic"),
}
RESIZE_STAND_INS = {"area": "bilinear", "lanczos3": "bicubic", "lanczos5": "bicubic"}


def resize_stand_in(interpolation: str, backend: str) -> str | None:
    """The interpolation a ``Resizing`` layer runs with on a backend that lacks its own.

    Args:
        interpolation: the layer's interpolation, e.g. "area" (TensorFlow only).
        backend: the Keras backend, e.g. "jax".

    Returns:
        None where the backend has it (or is not one of ``BACKENDS``), else the stand-in
        (used with ``antialias=True``), e.g. "bilinear".
    """
    available = RESIZE_INTERPOLATIONS.get(backend)
    if available is None or interpolation in available:
        return None
    return RESIZE_STAND_INS.get(interpolation, "bilinear")
