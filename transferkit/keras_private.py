"""The private Keras internals transferkit relies on, each behind one named helper.

Keras offers no public way to do these things; each helper says why it is needed, and
tests/test_keras_private.py fails when a Keras release changes what it reads or writes, so
an upgrade breaks one test here instead of training or folding quietly elsewhere. Nothing
else in transferkit touches a private Keras name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from transferkit.runtime import WrappedLoader, hook_first_import


def producing_layer(tensor):
    """The layer (operation) whose call produced a symbolic Keras tensor.

    Needed by ``model.fold``: ``keras.models.clone_model`` names a functional model's new
    inputs after its input tensors ("keras_tensor_7"), so the clone's inputs are made by hand
    with the names of the original's input layers, and only the tensor's private
    ``_keras_history`` says which layer made it.

    Args:
        tensor: a ``KerasTensor`` (a model's input or an output of a layer call).

    Returns:
        The producing ``keras.layers.Layer`` (an ``InputLayer`` for a model input).
    """
    return tensor._keras_history.operation


def graph_nodes(model) -> list | None:
    """Every node (one call of a layer) of a functional model's own graph, or None when the
    graph is not known (a subclassed model).

    Needed by ``model.fold`` to find a convolution whose only consumer is a BatchNormalization:
    the public API lists a model's layers, not which call of which layer feeds which; the
    private ``_nodes_by_depth`` does. Each node has ``operation``, ``input_tensors``,
    ``outputs`` and ``is_input``.

    Args:
        model: a ``keras.Model``.

    Returns:
        The nodes, in Keras's order (by depth), or None.
    """
    by_depth = getattr(model, "_nodes_by_depth", None)
    if by_depth is None:
        return None
    return [node for nodes in by_depth.values() for node in nodes]


def build_for_fit(model, batch) -> None:
    """Create a compiled model's optimizer and metric variables before ``fit`` traces its step.

    Needed to trace each stage's train step once instead of twice: with no distribution
    strategy, Keras on TensorFlow defers creating the optimizer's slots and the metrics'
    totals to the first trace of the train step, and ``tf.function`` traces a function that
    created variables a second time (measured: a third to a half of a stage's start-up on a
    small model). Under a strategy Keras builds them first itself, through the same private
    ``_symbolic_build``; this does what it does then. Variables that exist are left alone.

    Args:
        model: a compiled ``keras.Model`` about to be fitted.
        batch: one batch as ``fit`` will receive it: ``(x, y)`` or ``(x, y, sample_weight)``
            (only shapes and dtypes are read).
    """
    model._symbolic_build(data_batch=tuple(batch) + (None,) * (3 - len(batch)))


def hide_tensorflow_from_keras() -> None:
    """Make Keras's optional uses of TensorFlow see none, as where it is not installed.

    Needed by the command line on JAX and PyTorch: Keras probes for TensorFlow wherever it is
    installed (``keras.utils.set_random_seed`` imports it to seed ``tf.random`` for tf.data;
    serialization imports it to look for its shapes), 3 s of start-up per process that runs
    nothing on it. The probe is the private ``_available`` of the lazy module
    ``keras.src.utils.module_utils.tensorflow``; answered False, Keras runs as on a machine
    without TensorFlow, the set-up the backend sessions test (tests/test_backends.py). An
    explicit ``import tensorflow`` still works, and Keras then uses it where it is handed
    TensorFlow objects, but never seeds ``tf.random``.

    Keras is not imported here: where it is not loaded yet, the flag is set as Keras loads
    that module (``runtime.hook_first_import``), so a command that fails before it needs Keras
    still answers at once. Nothing where Keras has already imported TensorFlow.
    """
    loaded = sys.modules.get(_LAZY_MODULES)
    if loaded is not None:
        _hide_tensorflow(loaded)
    else:
        hook_first_import(_LAZY_MODULES, lambda loader: WrappedLoader(loader, then=_hide_tensorflow))


_LAZY_MODULES = "keras.src.utils.module_utils"  # Keras's lazy modules, TensorFlow's among them


def _hide_tensorflow(module_utils) -> None:
    lazy = module_utils.tensorflow
    if lazy.module is None:
        lazy._available = False


def keras_home() -> str:
    """The folder Keras downloads into (``get_file``'s cache folder, before its ``models/``).

    Needed by ``backbones`` to name where the ImageNet weights belong: Keras reads
    ``KERAS_HOME`` once, when it is imported, and keeps it privately (the environment may
    say otherwise later); where that folder cannot be written, ``get_file`` uses
    ``/tmp/.keras`` instead, as here.

    Returns:
        The folder, ``~`` expanded.
    """
    import os
    import tempfile

    from keras.src.backend import config

    home = os.path.expanduser(config.keras_home())
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir(), ".keras")
    return home


def start_progbar_at(bar, started: float) -> None:
    """Start a ``keras.utils.Progbar``'s clock at ``started`` (a ``time.time()``).

    Needed by ``progress.ProgressBar``, which makes its bar when the first units are done
    (the total is known only then, and Keras is imported only then): counted from then, the
    work of that first call would be left out of the time per unit (a 30-image predict in
    one batch read "0us/image"). Keras starts the clock in the constructor, in private
    attributes.

    Args:
        bar: a ``Progbar`` not yet updated.
        started: when its work began.
    """
    bar._start = bar._time_at_epoch_start = started


def reseed(generator, seed: int) -> None:
    """Restart a layer's ``keras.random.SeedGenerator`` at ``seed``.

    Needed by ``training.callbacks.reseed_dropout``: dropout masks must depend only on (run
    seed, epoch, layer), so that a resumed run and a head trained on cached features draw the
    masks the uninterrupted, uncached run drew. Keras seeds a generator once, at construction;
    restarting it means writing its state variable, whose layout ([seed, counter]) is private.

    Args:
        generator: a layer's ``seed_generator``.
        seed: the new seed, 0 <= seed < 2**31.
    """
    generator.state.assign(np.asarray([seed, 0], dtype=generator.state.dtype))


@dataclass
class EarlyStoppingState:
    """What ``keras.callbacks.EarlyStopping`` keeps between epochs (private attributes).

    Attributes:
        best: the best monitored value so far, or None before the first epoch.
        wait: epochs since the last improvement.
        best_epoch: the stage epoch (from 0) of ``best``.
        best_weights: the model's weights at ``best_epoch`` (with restore_best_weights), or None.
    """

    best: float | None = None
    wait: int = 0
    best_epoch: int = 0
    best_weights: list | None = None


def early_stopping_state(stopper) -> EarlyStoppingState:
    """Read an ``EarlyStopping`` callback's counters and best weights.

    Needed to checkpoint a stage mid-way: Keras keeps these in attributes that are not part
    of its API, and resets them in ``on_train_begin``.

    Args:
        stopper: a ``keras.callbacks.EarlyStopping``.

    Returns:
        An ``EarlyStoppingState`` (``best`` as a Python float).
    """
    best = stopper.best
    return EarlyStoppingState(
        best=None if best is None else float(best), wait=int(stopper.wait),
        best_epoch=int(stopper.best_epoch), best_weights=stopper.best_weights,
    )


def set_early_stopping_state(stopper, state: EarlyStoppingState) -> None:
    """Give an ``EarlyStopping`` callback saved counters and best weights; call it after
    Keras's own ``on_train_begin``, which resets them.

    Args:
        stopper: a ``keras.callbacks.EarlyStopping``.
        state: what ``early_stopping_state`` read before the restart.
    """
    stopper.best, stopper.wait = state.best, state.wait
    stopper.best_epoch, stopper.best_weights = state.best_epoch, state.best_weights
