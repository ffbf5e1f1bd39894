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


class _HistoryRecorder(keras.callbacks.Callback):
    """Appends one row per epoch, numbered across stages, to a shared list."""

    def __init__(self, rows: list[dict], stage_name: str, epoch_offset: int):
        super().__init__()
        self.rows = rows
        self.stage_name = stage_name
        self.epoch_offset = epoch_offset

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        row = {"epoch": self.epoch_offset + epoch + 1, "stage": self.stage_name}
        for key in HISTORY_COLUMNS[2:-1]:
            value = logs.get(key)
            row[key] = float(value) if value is not None else math.nan
        row["learning_rate"] = learning_rate
        self.rows.append(row)


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
) -> list[dict]:
    """Fit the classifier stage by stage.

    Each stage sets trainability, recompiles, and fits with early stopping on the
    validation loss that restores the stage's best weights. Stages with 0 epochs are skipped.

    Args:
        model: a classifier from ``build_classifier``.
        spec: the backbone's registry entry.
        stages: the recipe's stages, in order.
        train_data: a Keras-fittable training source (e.g. ``ImageBatches``).
        val_data: the validation source.
        n_classes: number of classes.
        verbose: passed to ``fit`` (1 shows Keras progress bars); default "auto".
        callbacks: extra callbacks for every stage.

    Returns:
        One continuous history: a dict per epoch with the keys of ``HISTORY_COLUMNS``.
    """
    rows: list[dict] = []
    calibrate_head_batchnorm(model, train_data)
    for index, stage in enumerate(stages):
        if stage.epochs == 0:
            continue
        set_trainable(model, spec, stage.unfreeze)
        compile_for_stage(model, stage, n_classes)
        if verbose:
            trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
            print(
                f"stage {index + 1}/{len(stages)} '{stage.name}': unfreeze={stage.unfreeze}, "
                f"{stage.optimizer} lr={stage.learning_rate:g}, up to {stage.epochs} epochs, "
                f"{trainable:,} trainable parameters",
                flush=True,
            )
        stopper = keras.callbacks.EarlyStopping(
            monitor="val_loss", patience=stage.patience, restore_best_weights=True
        )
        recorder = _HistoryRecorder(rows, stage.name, epoch_offset=len(rows))
        model.fit(
            train_data,
            validation_data=val_data,
            epochs=stage.epochs,
            callbacks=[stopper, recorder, *callbacks],
            verbose=verbose,
        )
    return rows
