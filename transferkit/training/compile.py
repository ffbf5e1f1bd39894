"""What a stage compiles with: the optimizer, the learning-rate schedule with its warmup, the
loss, each by its recipe name, and whether its step is compiled by XLA (``xla_pays``).

Every schedule is Keras's own ``CosineDecay`` and every optimizer a built-in one, so a saved
model with its optimizer loads in any Keras.
"""

from __future__ import annotations

import os

import keras

from transferkit.outputs import loss_for
from transferkit.recipe import LossConfig, StageConfig

_OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": lambda **kwargs: keras.optimizers.SGD(momentum=0.9, **kwargs),
    "rmsprop": keras.optimizers.RMSprop,
}

_LOSSES = {
    "binary_crossentropy": keras.losses.BinaryCrossentropy,
    "categorical_crossentropy": keras.losses.CategoricalCrossentropy,
}

# Per schedule, after the warmup: the share of the peak rate the cosine ends at (1: constant),
# where the rise starts (a fraction of the peak) and how long it lasts when warmup_epochs is
# 0 (a fraction of the stage). Every schedule is Keras's own CosineDecay, so a saved model
# with its optimizer loads in any Keras.
_SCHEDULES = {
    "constant": {"final": 1.0, "rise_start": None, "default_rise": 0.0},
    "cosine": {"final": 0.0, "rise_start": None, "default_rise": 0.0},
    "one-cycle": {"final": 1e-4, "rise_start": 1 / 25, "default_rise": 0.3},
}


def make_optimizer(name: str, learning_rate, weight_decay: float = 0.0):
    """A Keras optimizer by recipe name.

    Args:
        name: "adam", "adamw", "sgd" (with momentum 0.9) or "rmsprop".
        learning_rate: the stage's learning rate, or a per-step schedule
            (``stage_learning_rate``).
        weight_decay: Keras's decoupled weight decay (each step, every weight shrinks by
            learning rate x weight_decay), the same in every optimizer; default 0 (none).

    Returns:
        A new ``keras.optimizers.Optimizer``.
    """
    # None, not 0, where Keras allows it: no decay op per variable for nothing. AdamW
    # requires a number (and would otherwise default to its own 0.004).
    decay = weight_decay if weight_decay or name == "adamw" else None
    return _OPTIMIZERS[name](learning_rate=learning_rate, weight_decay=decay)


def stage_learning_rate(stage: StageConfig, steps_per_epoch: int):
    """The stage's learning rate per step: its rate, or a schedule over its steps.

    The step counts from the stage's start (the optimizer is new each stage). With
    ``warmup_epochs`` W over S steps per epoch, the rate first rises linearly over
    round(W x S) steps (step k: rate x (k + 1) / (steps + 1)), then follows the schedule:
    constant; cosine from the rate to 0 at the stage's last step; one-cycle rises from
    rate/25 over the warmup (30% of the stage when W is 0), then cosine to rate x 1e-4.

    Args:
        stage: the stage's recipe entry.
        steps_per_epoch: training batches per epoch.

    Returns:
        The rate (a float) for a constant schedule without warmup, else a
        ``keras.optimizers.schedules.CosineDecay``.
    """
    shape = _SCHEDULES[stage.schedule]
    total = max(1, round(stage.epochs * steps_per_epoch))
    rise = min(total, round(stage.warmup_epochs * steps_per_epoch)) or round(shape["default_rise"] * total)
    peak = stage.learning_rate
    if rise == 0:
        if stage.schedule == "constant":
            return peak
        return keras.optimizers.schedules.CosineDecay(peak, decay_steps=total, alpha=shape["final"])
    start = peak * shape["rise_start"] if shape["rise_start"] is not None else peak / (rise + 1)
    return keras.optimizers.schedules.CosineDecay(
        start, decay_steps=max(1, total - rise), alpha=shape["final"], warmup_target=peak, warmup_steps=rise,
    )


def make_loss(n_classes: int, loss: LossConfig | None = None):
    """The training loss: binary cross-entropy for one sigmoid unit, categorical for softmax.

    Args:
        n_classes: number of classes (the output rule picks the loss).
        loss: the recipe's ``LossConfig``; default None (no label smoothing).

    Returns:
        A ``keras.losses.Loss``.
    """
    smoothing = loss.label_smoothing if loss is not None else 0.0
    return _LOSSES[loss_for(n_classes)](label_smoothing=smoothing)


# A stage of fewer steps than this keeps Keras's step: XLA's compile (about a second for VGG16's
# top block) would cost more than it saves.
XLA_MIN_STEPS = 32


def xla_pays(model, steps: int, distributed: bool = False) -> bool:
    """Whether a stage's training step should be compiled by XLA.

    Where TensorFlow runs without oneDNN (``TF_ENABLE_ONEDNN_OPTS=0``, or TensorFlow imported
    before transferkit on a CPU without AVX512-VNNI, AVX512-BF16, AVX-VNNI or AMX, where
    ``runtime.prefer_onednn`` could not turn oneDNN on), its own convolution kernels on the
    small maps of a fine stage reach about a quarter of the CPU's matrix-product rate; XLA's
    CPU code reaches most of it for VGG16 (``benchmarks/fine_stage.py``; for ResNet50's 2x2
    maps it is slower still: oneDNN is the fix there). Keras turns XLA off on
    CPU-only machines by default. Only on the TensorFlow backend, in float32 (16-bit runs are
    on CPUs with oneDNN), on one device, for a model whose layers all support XLA, and for
    at least ``XLA_MIN_STEPS`` steps. ``TRANSFERKIT_XLA=0`` turns it off, ``=1`` asks for it
    wherever those allow, whatever the CPU.

    Args:
        model: what the stage fits.
        steps: the stage's training steps (epochs x batches).
        distributed: it trains under a distribution strategy; default False.

    Returns:
        True to compile the step with ``jit_compile=True``.
    """
    setting = os.environ.get("TRANSFERKIT_XLA", "auto")
    if setting == "0" or distributed or steps < XLA_MIN_STEPS or keras.config.backend() != "tensorflow":
        return False
    from transferkit.model.surgery import compute_dtype, walk_layers
    from transferkit.runtime import gpu_visible, tensorflow_onednn

    if gpu_visible() or compute_dtype(model) != "float32":
        return False
    if not all(getattr(layer, "supports_jit", True) for layer in walk_layers(model)):
        return False
    return setting == "1" or not tensorflow_onednn()


def compile_for_stage(model, stage: StageConfig, n_classes: int, steps_per_execution: int = 1, *,
                      steps_per_epoch: int = 1, loss: LossConfig | None = None, jit_compile: bool = False) -> None:
    """Compile with the stage's optimizer, learning-rate schedule and weight decay, and the loss.

    Recompiling after changing ``trainable`` is required, or the change is ignored.

    Args:
        model: the model to fit (the classifier, or its top part on cached features).
        stage: the stage's recipe entry.
        n_classes: number of classes (the loss follows it).
        steps_per_execution: steps per call; default 1. More runs the same steps with less
            overhead, worth it when a step is as small as a head on cached features.
        steps_per_epoch: training batches per epoch, which a schedule or warmup counts in;
            default 1.
        loss: the recipe's ``LossConfig``; default None (no label smoothing).
        jit_compile: compile the step with XLA (``xla_pays``); default False: Keras's own
            choice ("auto": XLA on JAX and on TensorFlow with a GPU, none on TensorFlow on a
            CPU alone or under a tf.distribute strategy, none on PyTorch). False is never
            passed on: on JAX it would run the step op by op, uncompiled.
    """
    model.compile(
        optimizer=make_optimizer(stage.optimizer, stage_learning_rate(stage, steps_per_epoch), stage.weight_decay),
        loss=make_loss(n_classes, loss),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
        jit_compile=True if jit_compile else "auto",
    )
