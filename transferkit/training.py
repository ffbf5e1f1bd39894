"""Staged fine-tuning: per stage set what trains, keep BatchNorm frozen, recompile, fit.

The order follows the Keras transfer-learning guide: train the new head with the backbone
frozen, then unfreeze the top blocks and continue at a much lower learning rate. BatchNorm
layers of the backbone stay frozen in every stage by ``trainable=False`` (in Keras 3 that
also runs them in inference mode; ``training=False`` alone does not hold under ``fit``).
"""

from __future__ import annotations

import math
from typing import Sequence

import keras
import numpy as np

from transferkit.backbones import BackboneSpec
from transferkit.model import loss_for
from transferkit.recipe import StageConfig

HISTORY_COLUMNS = ("epoch", "stage", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")

_OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": lambda learning_rate: keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
    "rmsprop": keras.optimizers.RMSprop,
}


def unfrozen_blocks(spec: BackboneSpec, unfreeze: int | str) -> set[int]:
    """Indices of the blocks that train for an unfreeze depth (0, N or "all")."""
    depth = len(spec.blocks) if unfreeze == "all" else int(unfreeze)
    return set(range(len(spec.blocks) - depth, len(spec.blocks)))


def set_trainable(model, spec: BackboneSpec, unfreeze: int | str) -> None:
    """Make the top ``unfreeze`` blocks of the backbone trainable, all else in it frozen.

    BatchNormalization layers stay frozen whatever the depth; the preprocessing layers never
    train; the head always trains.

    Args:
        model: a classifier from ``build_classifier``.
        spec: the backbone's registry entry.
        unfreeze: 0 (backbone frozen), N (top N blocks), or "all".
    """
    backbone = model.get_layer("backbone")
    model.trainable = True
    model.get_layer("preprocessing").trainable = False
    blocks = unfrozen_blocks(spec, unfreeze)
    # Setting a container's flag sets every layer inside it; per-layer flags come after.
    backbone.trainable = bool(blocks)
    if not blocks:
        return
    for layer in backbone.layers:
        block = spec.block_of(layer.name)
        layer.trainable = (
            block in blocks and not isinstance(layer, keras.layers.BatchNormalization)
        )


def make_optimizer(name: str, learning_rate: float):
    """A Keras optimizer by recipe name ("adam", "adamw", "sgd" with momentum 0.9, "rmsprop")."""
    return _OPTIMIZERS[name](learning_rate=learning_rate)


def compile_for_stage(model, stage: StageConfig, n_classes: int) -> None:
    """Compile with the stage's optimizer and learning rate.

    Recompiling after changing ``trainable`` is required, or the change is ignored.
    """
    model.compile(
        optimizer=make_optimizer(stage.optimizer, stage.learning_rate),
        loss=loss_for(n_classes),
        metrics=["accuracy"],
    )


def calibrate_head_batchnorm(model, data, max_batches: int = 4) -> None:
    """Set the head's BatchNorm moving statistics from real training batches.

    A fresh BatchNormalization layer starts with moving mean 0 and variance 1, and moves
    towards the true statistics by 1 - momentum per step. Backbone features can have a
    variance far below 1 (random or small-scale weights), and a small dataset gives few
    steps, so at inference the layer would still divide by the initial variance and squash
    every prediction towards one class. Starting from measured statistics avoids that.

    Args:
        model: a classifier from ``build_classifier``.
        data: training batches (``x`` first in each item).
        max_batches: how many batches to measure; default 4.
    """
    head = model.get_layer("head")
    if not any(isinstance(layer, keras.layers.BatchNormalization) for layer in head.layers):
        return
    extractor = [model.get_layer("preprocessing"), model.get_layer("backbone")]
    activations = []
    for index in range(min(max_batches, len(data))):
        x = data[index][0]
        for layer in extractor:
            x = layer(x, training=False)
        activations.append(x)
    values = keras.ops.concatenate(activations, axis=0)
    for layer in head.layers[1:]:
        if isinstance(layer, keras.layers.BatchNormalization):
            axes = list(range(len(values.shape) - 1))
            layer.moving_mean.assign(keras.ops.mean(values, axis=axes))
            layer.moving_variance.assign(keras.ops.var(values, axis=axes))
        values = layer(values, training=False)


class _ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose counters and best weights can be carried over a restart."""

    def __init__(self, resume_from: tuple | None = None, **kwargs):
        super().__init__(**kwargs)
        self.resume_from = resume_from

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.resume_from is not None:
            self.best, self.wait, self.best_epoch, self.best_weights = self.resume_from


class _EpochCallback(keras.callbacks.Callback):
    """Per epoch: seed the data stream and dropout from (seed, epoch); after it, record the
    history row and save the checkpoint. An epoch cut short by a stop request is dropped."""

    def __init__(self, *, rows, stage_index, stage_name, epoch_offset, train_data, seed,
                 stopper, stop, work, calibrated=True):
        super().__init__()
        self.rows, self.stage_index, self.stage_name = rows, stage_index, stage_name
        self.epoch_offset, self.train_data, self.seed = epoch_offset, train_data, seed
        self.stopper, self.stop, self.work = stopper, stop, work

    def on_epoch_begin(self, epoch, logs=None):
        global_epoch = self.epoch_offset + epoch
        if hasattr(self.train_data, "set_epoch"):
            self.train_data.set_epoch(global_epoch)
        # Dropout masks depend only on (seed, epoch), so a resumed run repeats them exactly.
        for number, layer in enumerate(_all_layers(self.model)):
            generator = getattr(layer, "seed_generator", None)
            if generator is not None:
                state = np.random.SeedSequence([self.seed, global_epoch, number]).generate_state(1)[0]
                generator.state.assign(
                    np.asarray([int(state) % (2**31), 0], dtype=generator.state.dtype)
                )

    def on_train_batch_end(self, batch, logs=None):
        if self.stop is not None and self.stop.requested:
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.stop is not None and self.stop.requested:
            return  # the epoch was cut short: it is neither recorded nor checkpointed
        logs = logs or {}
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {"epoch": self.epoch_offset + epoch + 1, "stage": self.stage_name}
        for key in HISTORY_COLUMNS[2:-1]:
            value = logs.get(key)
            row[key] = float(value) if value is not None else math.nan
        row["learning_rate"] = learning_rate
        self.rows.append(row)
        if self.work is not None:
            from transferkit.checkpoint import TrainingState

            state = TrainingState(
                stage_index=self.stage_index, epochs_done=epoch + 1,
                global_epoch=self.epoch_offset + epoch + 1, calibrated=True,
                best=None if self.stopper.best is None else float(self.stopper.best),
                wait=int(self.stopper.wait), best_epoch=int(self.stopper.best_epoch),
                history=self.rows,
            )
            self.work.save(self.model, state, self.stopper.best_weights)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if hasattr(layer, "layers"):
            yield from _all_layers(layer)


def run_stages(
    model,
    spec: BackboneSpec,
    stages: Sequence[StageConfig],
    train_data,
    val_data,
    n_classes: int,
    *,
    verbose: int | str = "auto",
    callbacks: Sequence[keras.callbacks.Callback] = (),
    seed: int = 0,
    state=None,
    work=None,
    stop=None,
) -> list[dict]:
    """Fit the classifier stage by stage.

    Each stage sets trainability, recompiles, and fits with early stopping on the
    validation loss that restores the stage's best weights. Stages with 0 epochs are skipped.

    Args:
        model: a classifier from ``build_classifier`` (or loaded from a checkpoint).
        spec: the backbone's registry entry.
        stages: the recipe's stages, in order.
        train_data: a Keras-fittable training source (e.g. ``ImageBatches``).
        val_data: the validation source.
        n_classes: number of classes.
        verbose: passed to ``fit`` (1 shows Keras progress bars); default "auto".
        callbacks: extra callbacks for every stage.
        seed: seeds the data order, augmentation and dropout of each epoch; default 0.
        state: a ``TrainingState`` to resume from; default None (start).
        work: a ``WorkFolder`` to checkpoint into after every epoch; default None.
        stop: a ``StopFlag``; when set, training stops after the current batch and
            ``TrainingInterrupted`` is raised.

    Returns:
        One continuous history: a dict per epoch with the keys of ``HISTORY_COLUMNS``.
    """
    from transferkit.checkpoint import TrainingInterrupted, TrainingState

    state = state or TrainingState()
    rows: list[dict] = list(state.history)
    if not state.calibrated:
        calibrate_head_batchnorm(model, train_data)
    global_epoch = state.global_epoch
    for index, stage in enumerate(stages):
        if index < state.stage_index or stage.epochs == 0:
            continue
        resuming = index == state.stage_index and state.epochs_done > 0
        resume_from = None
        if resuming:
            # The checkpoint holds this stage's trainable flags and optimizer state.
            resume_from = (state.best, state.wait, state.best_epoch, work.best_weights() if work else None)
            initial_epoch = state.epochs_done
        else:
            set_trainable(model, spec, stage.unfreeze)
            compile_for_stage(model, stage, n_classes)
            initial_epoch = 0
        if verbose:
            trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
            print(
                f"stage {index + 1}/{len(stages)} '{stage.name}': unfreeze={stage.unfreeze}, "
                f"{stage.optimizer} lr={stage.learning_rate:g}, up to {stage.epochs} epochs"
                + (f" (resuming after epoch {initial_epoch})" if resuming else "")
                + f", {trainable:,} trainable parameters",
                flush=True,
            )
        stopper = _ResumableEarlyStopping(
            resume_from=resume_from, monitor="val_loss", patience=stage.patience,
            restore_best_weights=True,
        )
        epoch_callback = _EpochCallback(
            rows=rows, stage_index=index, stage_name=stage.name,
            epoch_offset=global_epoch - initial_epoch, train_data=train_data, seed=seed,
            stopper=stopper, stop=stop, work=work,
        )
        if resuming and state.wait >= stage.patience and initial_epoch > 0:
            # Early stopping had fired on the last saved epoch: only the restore is left.
            if resume_from[3] is not None:
                model.set_weights(resume_from[3])
        else:
            model.fit(
                train_data,
                validation_data=val_data,
                initial_epoch=initial_epoch,
                shuffle=False,  # ImageBatches shuffles itself, seeded per epoch
                epochs=stage.epochs,
                callbacks=[stopper, epoch_callback, *callbacks],
                verbose=verbose,
            )
        if stop is not None and stop.requested:
            raise TrainingInterrupted(
                f"{stop.requested}: training stopped; the last completed epoch is saved. "
                "Continue with: transferkit finetune --resume RUN"
            )
        global_epoch = len(rows)
        if work is not None:
            work.save(model, TrainingState(
                stage_index=index + 1, epochs_done=0, global_epoch=global_epoch,
                calibrated=True, history=rows,
            ))
    return rows
