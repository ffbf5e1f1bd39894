"""Per-stage callbacks: early stopping that carries over a restart, eager validation on cached
features, and the per-epoch step that seeds the data and dropout, records the history row and
saves the checkpoint."""

from __future__ import annotations

import math
import zlib

import keras
import numpy as np

from transferkit.keras_private import EarlyStoppingState, early_stopping_state, reseed, set_early_stopping_state
from transferkit.model.surgery import walk_layers
from transferkit.outputs import is_binary, loss_for
from transferkit.runs import HISTORY_COLUMNS
from transferkit.training.checkpoint import stop_if_requested


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """EarlyStopping whose counters and best weights can be carried over a restart.

    Args:
        resume_from: the ``EarlyStoppingState`` saved with the checkpoint; default None (a
            fresh start).
        **kwargs: ``keras.callbacks.EarlyStopping``'s arguments.
    """

    def __init__(self, resume_from: EarlyStoppingState | None = None, **kwargs):
        super().__init__(**kwargs)
        self.resume_from = resume_from

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.resume_from is not None:
            set_early_stopping_state(self, self.resume_from)


class EagerValidation(keras.callbacks.Callback):
    """Validation of a stage trained on cached features, computed eagerly at each epoch's end.

    The part that trains on features is small, so calling it directly costs a few
    milliseconds per epoch, while ``fit`` would first trace a test function (a few tenths of
    a second per stage). The figures are Keras's own: the compiled loss (the mean over the
    validation images) and accuracy (top class, or the 0.5 threshold for one sigmoid unit),
    written into the epoch's logs as ``val_loss`` / ``val_accuracy`` before early stopping
    and the progress bar read them.
    """

    def __init__(self, batches, n_classes: int, loss=None):
        super().__init__()
        self.batches = batches
        # The compiled loss (label smoothing included), or plain cross-entropy.
        self.loss = loss if loss is not None else keras.losses.get(loss_for(n_classes))
        self.binary = is_binary(n_classes)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        outputs = predict_eagerly(self.model, self.batches)
        targets = self.batches.targets
        loss = keras.ops.convert_to_numpy(self.loss(targets, outputs))
        if self.binary:  # Keras's binary accuracy: p > 0.5 (strictly) is the second class
            correct = (outputs[:, 0] > 0.5) == (targets[:, 0] > 0.5)
        else:
            correct = np.argmax(outputs, axis=1) == np.argmax(targets, axis=1)
        logs["val_loss"] = float(np.mean(loss))
        logs["val_accuracy"] = float(np.mean(correct))


class EpochCallback(keras.callbacks.Callback):
    """Per epoch: seed the data stream and dropout from (seed, epoch); after it, record the
    history row and save the checkpoint. A stop request ends fit after the current batch
    (``TrainingInterrupted``); the epoch it cut short is dropped."""

    def __init__(self, *, classifier, rows, stage_index, stage_name, epoch_offset, train_data, seed,
                 stopper, stop, work, decisions: dict | None = None):
        super().__init__()
        # What was decided while training (StagesRun.decisions), kept in each checkpoint.
        self.decisions = decisions or {}
        self.classifier = classifier
        self.rows, self.stage_index, self.stage_name = rows, stage_index, stage_name
        self.epoch_offset, self.train_data, self.seed = epoch_offset, train_data, seed
        self.stopper, self.stop, self.work = stopper, stop, work

    def on_epoch_begin(self, epoch, logs=None):
        global_epoch = self.epoch_offset + epoch
        if hasattr(self.train_data, "set_epoch"):
            self.train_data.set_epoch(global_epoch)
        reseed_dropout(self.classifier, self.seed, global_epoch)

    def on_train_batch_end(self, batch, logs=None):
        # Out of fit at once: a stop flag that only ended the epoch would still have Keras run
        # the validation pass (minutes on a big folder) of an epoch that is dropped anyway.
        stop_if_requested(self.stop, self.work)

    def on_epoch_end(self, epoch, logs=None):
        if self.stop is not None and self.stop.requested:
            return  # asked during validation: the epoch is neither recorded nor checkpointed
        logs = logs or {}
        learning_rate = epoch_learning_rate(self.model.optimizer)
        row = {"epoch": self.epoch_offset + epoch + 1, "stage": self.stage_name}
        for key in HISTORY_COLUMNS[2:-1]:
            value = logs.get(key)
            row[key] = float(value) if value is not None else math.nan
        row["learning_rate"] = learning_rate
        self.rows.append(row)
        if self.work is not None:
            from transferkit.training.checkpoint import TrainingState

            part = self.model.get_weights() if self.model is not self.classifier else None
            stopping = early_stopping_state(self.stopper)
            state = TrainingState(
                stage_index=self.stage_index, epochs_done=epoch + 1,
                global_epoch=self.epoch_offset + epoch + 1, calibrated=True,
                best=stopping.best, wait=stopping.wait, best_epoch=stopping.best_epoch,
                history=self.rows, **self.decisions,
            )
            self.work.save(self.classifier, state, stopping.best_weights, self.model.optimizer, part)


def epoch_learning_rate(optimizer) -> float:
    """The learning rate of the last step taken (of the epoch that just ended).

    With a per-step schedule the optimizer's ``learning_rate`` is the rate of the *next*
    step; the history row records the one the epoch ended with.
    """
    schedule = optimizer.get_config()["learning_rate"]
    if not isinstance(schedule, dict):  # a constant rate
        return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    step = max(int(keras.ops.convert_to_numpy(optimizer.iterations)) - 1, 0)
    rate = keras.optimizers.schedules.deserialize(schedule)(step)
    return float(keras.ops.convert_to_numpy(rate))


def reseed_dropout(model, seed: int, epoch: int) -> None:
    """Seed every dropout layer from (seed, epoch, layer name).

    Masks then depend only on these, so a resumed run repeats them exactly, and training
    the head alone (on cached features) draws the same masks as training the whole model.

    Args:
        model: the classifier (nested models are walked).
        seed: the run's seed.
        epoch: the run's epoch, counted over all stages from 0.
    """
    for layer in walk_layers(model):
        generator = getattr(layer, "seed_generator", None)
        if generator is not None:
            name_hash = zlib.crc32(layer.name.encode())
            state = np.random.SeedSequence([seed, epoch, name_hash]).generate_state(1)[0]
            reseed(generator, int(state) % (2**31))


def predict_eagerly(model, batches) -> np.ndarray | list[np.ndarray]:
    """The model's inference outputs over unshuffled batches, run eagerly: for a small model
    this is faster than ``predict``, which first traces a function. Cached features are
    read in large chunks (fewer calls) instead of batch by batch.

    Args:
        model: a small Keras model (the part trained on cached features).
        batches: ``FeatureBatches`` (read with ``in_order``) or any unshuffled batches.

    Returns:
        float32 outputs, one row per sample, in order; for a model of several outputs, a
        list of them.
    """
    chunks = batches.in_order() if hasattr(batches, "in_order") else (batches[i][0] for i in range(len(batches)))
    calls = [keras.tree.map_structure(keras.ops.convert_to_numpy, model(chunk, training=False)) for chunk in chunks]
    if calls and isinstance(calls[0], (list, tuple)):
        return [np.concatenate([call[place] for call in calls]).astype("float32") for place in range(len(calls[0]))]
    return np.concatenate(calls).astype("float32")
