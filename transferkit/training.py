"""Staged fine-tuning: per stage set what trains, keep BatchNorm frozen, recompile, fit.

The order follows the Keras transfer-learning guide: train the new head with the backbone
frozen, then unfreeze the top blocks and continue at a much lower learning rate. BatchNorm
layers of the backbone stay frozen in every stage by ``trainable=False`` (in Keras 3 that
also runs them in inference mode; ``training=False`` alone does not hold under ``fit``).
"""

from __future__ import annotations

import math
import time
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
    return set(range(spec.first_unfrozen(unfreeze), len(spec.blocks)))


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


def compile_for_stage(model, stage: StageConfig, n_classes: int, steps_per_execution: int = 1) -> None:
    """Compile with the stage's optimizer and learning rate.

    Recompiling after changing ``trainable`` is required, or the change is ignored.
    ``steps_per_execution`` > 1 runs several steps per call (same steps, less overhead:
    worth it when a step is as small as a head on cached features).
    """
    model.compile(
        optimizer=make_optimizer(stage.optimizer, stage.learning_rate),
        loss=loss_for(n_classes),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )


CALIBRATION_IMAGES = 128


def backbone_features(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The backbone's output for uint8 images, computed in inference mode."""
    layers = [model.get_layer("preprocessing"), model.get_layer("backbone")]
    outputs = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].astype("float32")
        for layer in layers:
            x = layer(x, training=False)
        outputs.append(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")))
    return np.concatenate(outputs, axis=0)


def calibrate_head_batchnorm(model, features: np.ndarray) -> None:
    """Set the head's BatchNorm moving statistics from real backbone features.

    A fresh BatchNormalization layer starts with moving mean 0 and variance 1, and moves
    towards the true statistics by 1 - momentum per step. Backbone features can have a
    variance far below 1 (random or small-scale weights), and a small dataset gives few
    steps, so at inference the layer would still divide by the initial variance and squash
    every prediction towards one class. Starting from measured statistics avoids that.

    Args:
        model: a classifier from ``build_classifier``.
        features: backbone outputs of some training images (the first
            ``CALIBRATION_IMAGES`` are enough).
    """
    head = model.get_layer("head")
    if not any(isinstance(layer, keras.layers.BatchNormalization) for layer in head.layers):
        return
    values = keras.ops.convert_to_tensor(features)
    for layer in head.layers[1:]:
        if isinstance(layer, keras.layers.BatchNormalization):
            axes = list(range(len(values.shape) - 1))
            as_float = keras.ops.cast(values, "float32")
            layer.moving_mean.assign(keras.ops.mean(as_float, axis=axes))
            layer.moving_variance.assign(keras.ops.var(as_float, axis=axes))
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


class _EagerValidation(keras.callbacks.Callback):
    """Validation of a stage trained on cached features, computed eagerly at each epoch's end.

    The part that trains on features is small, so calling it directly costs a few
    milliseconds per epoch, while ``fit`` would first trace a test function (a few tenths of
    a second per stage). The figures are Keras's own: the compiled loss (the mean over the
    validation images) and accuracy (top class, or the 0.5 threshold for one sigmoid unit),
    written into the epoch's logs as ``val_loss`` / ``val_accuracy`` before early stopping
    and the progress bar read them.
    """

    def __init__(self, batches, n_classes: int):
        super().__init__()
        self.batches = batches
        self.loss = keras.losses.get(loss_for(n_classes))
        self.binary = n_classes == 2

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        outputs = _outputs_on(self.model, self.batches)
        targets = self.batches.targets
        loss = keras.ops.convert_to_numpy(self.loss(targets, outputs))
        if self.binary:
            correct = (outputs[:, 0] > 0.5) == (targets[:, 0] > 0.5)
        else:
            correct = np.argmax(outputs, axis=1) == np.argmax(targets, axis=1)
        logs["val_loss"] = float(np.mean(loss))
        logs["val_accuracy"] = float(np.mean(correct))


class _EpochCallback(keras.callbacks.Callback):
    """Per epoch: seed the data stream and dropout from (seed, epoch); after it, record the
    history row and save the checkpoint. An epoch cut short by a stop request is dropped."""

    def __init__(self, *, classifier, rows, stage_index, stage_name, epoch_offset, train_data, seed,
                 stopper, stop, work):
        super().__init__()
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

            part = self.model.get_weights() if self.model is not self.classifier else None
            state = TrainingState(
                stage_index=self.stage_index, epochs_done=epoch + 1,
                global_epoch=self.epoch_offset + epoch + 1, calibrated=True,
                best=None if self.stopper.best is None else float(self.stopper.best),
                wait=int(self.stopper.wait), best_epoch=int(self.stopper.best_epoch),
                history=self.rows,
            )
            self.work.save(self.classifier, state, self.stopper.best_weights, self.model.optimizer, part)


def reseed_dropout(model, seed: int, epoch: int) -> None:
    """Seed every dropout layer from (seed, epoch, layer name).

    Masks then depend only on these, so a resumed run repeats them exactly, and training
    the head alone (on cached features) draws the same masks as training the whole model.
    """
    import zlib

    for layer in _all_layers(model):
        generator = getattr(layer, "seed_generator", None)
        if generator is not None:
            name_hash = zlib.crc32(layer.name.encode())
            state = np.random.SeedSequence([seed, epoch, name_hash]).generate_state(1)[0]
            generator.state.assign(np.asarray([int(state) % (2**31), 0], dtype=generator.state.dtype))


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
    cache=None,
    forward_factory=None,
    timings: list | None = None,
    final_outputs: dict | None = None,
) -> list[dict]:
    """Fit the classifier stage by stage.

    Each stage sets trainability, recompiles, and fits with early stopping on the
    validation loss that restores the stage's best weights. Stages with 0 epochs are skipped.
    With a feature cache, a stage whose bottom is frozen trains only its top on features
    of the frozen part, computed once for all the stages that can share them (see
    ``transferkit.cache.FeaturePlan``).

    Args:
        model: a classifier from ``build_classifier`` (or loaded from a checkpoint).
        spec: the backbone's registry entry.
        stages: the recipe's stages, in order.
        train_data: training ``ImageBatches``.
        val_data: validation ``ImageBatches``.
        n_classes: number of classes.
        verbose: passed to ``fit`` (1 shows Keras progress bars); default "auto".
        callbacks: extra callbacks for every stage.
        seed: seeds the data order, augmentation and dropout of each epoch; default 0.
        state: a ``TrainingState`` to resume from; default None (start).
        work: a ``WorkFolder`` to checkpoint into after every epoch; default None.
        stop: a ``StopFlag``; when set, training stops after the current batch and
            ``TrainingInterrupted`` is raised.
        cache: a ``CacheConfig`` (enabled, views, memory_mb); default None (no cache).
        forward_factory: turns an extractor model (images -> one feature map, or a list
            of them) into a batch -> outputs function (an inference engine); default: the
            model's own ``predict_on_batch`` after BatchNorm folding.
        timings: when given, one dict per stage run is appended: name, epochs run, wall
            seconds (feature caching included), seconds spent caching, cached or not.
        final_outputs: when given and the last stage trained on cached features, its
            "val" key receives the final model's outputs on the validation set, computed
            from the cached features (the frozen part cannot have changed).

    Returns:
        One continuous history: a dict per epoch with the keys of ``HISTORY_COLUMNS``.
    """
    from transferkit.checkpoint import TrainingState

    state = state or TrainingState()
    plan = _feature_plan(model, spec, stages, train_data, val_data, cache, forward_factory, seed, verbose, stop)
    try:
        return _run_stages(model, spec, stages, train_data, val_data, n_classes, verbose=verbose,
                           callbacks=callbacks, seed=seed, state=state, work=work, stop=stop, plan=plan,
                           timings=timings, final_outputs=final_outputs)
    finally:
        if plan is not None:
            plan.close()


def _run_stages(model, spec, stages, train_data, val_data, n_classes, *, verbose, callbacks, seed, state, work,
                stop, plan, timings, final_outputs):
    from transferkit.checkpoint import TrainingState

    rows: list[dict] = list(state.history)
    global_epoch = state.global_epoch
    calibrated = state.calibrated
    for index, stage in enumerate(stages):
        if index < state.stage_index or stage.epochs == 0:
            continue
        resuming = index == state.stage_index and state.epochs_done > 0
        started = time.perf_counter()
        _stop_if_requested(stop, work)
        set_trainable(model, spec, stage.unfreeze)
        inputs = plan.stage_inputs(index) if plan is not None else None
        _stop_if_requested(stop, work)  # computing the features can take a while
        if inputs is None:
            train_model, stage_train, stage_val, features = model, train_data, val_data, None
        else:
            train_model, stage_train, stage_val = inputs.trainable, inputs.train, inputs.val
            features = inputs.calibration
        cached_seconds = time.perf_counter() - started
        if not calibrated:
            if features is None:
                features = backbone_features(model, train_data.images[:CALIBRATION_IMAGES])
            calibrate_head_batchnorm(model, features)
            calibrated = True
        cached = train_model is not model
        # Several steps per call on cached features, but never more than an epoch holds
        # (Keras's progress bar would count past the epoch's end).
        steps = min(16, max(1, len(stage_train))) if cached else 1
        compile_for_stage(train_model, stage, n_classes, steps_per_execution=steps)
        resume_from = None
        initial_epoch = 0
        if resuming:
            resume_from = (state.best, state.wait, state.best_epoch, work.best_weights() if work else None)
            initial_epoch = state.epochs_done
            if work is not None:
                if state.part_only:
                    train_model.set_weights(work.part_weights())
                work.restore_optimizer(train_model)
        elif work is not None and cached:
            if state.part_only and index == state.stage_index:
                # Resumed at the start of this stage: its part as it was when the stage began
                # (checkpoint.keras was written while that part was already training).
                train_model.set_weights(work.part_weights())
            elif not work.has_checkpoint():
                # Per-epoch checkpoints of a cached stage hold only the part that trains, so
                # the whole model must be saved once as the stage starts. It is written in
                # the background while the part trains; the part's starting weights are
                # saved with it, so the checkpoint is the stage's start all the same.
                work.save(model, TrainingState(stage_index=index, epochs_done=0, global_epoch=global_epoch,
                                               calibrated=True, history=rows),
                          part_weights=train_model.get_weights(), whole_in_background=True)
        if verbose:
            trainable = sum(int(np.prod(w.shape)) for w in train_model.trainable_weights)
            print(
                f"stage {index + 1}/{len(stages)} '{stage.name}': unfreeze={stage.unfreeze}, "
                f"{stage.optimizer} lr={stage.learning_rate:g}, up to {stage.epochs} epochs"
                + (f" (resuming after epoch {initial_epoch})" if resuming else "")
                + f", {trainable:,} trainable parameters"
                + (", on cached features" if cached else ""),
                flush=True,
            )
        stopper = _ResumableEarlyStopping(
            resume_from=resume_from, monitor="val_loss", patience=stage.patience,
            restore_best_weights=True,
        )
        epoch_callback = _EpochCallback(
            classifier=model, rows=rows, stage_index=index, stage_name=stage.name,
            epoch_offset=global_epoch - initial_epoch, train_data=stage_train, seed=seed,
            stopper=stopper, stop=stop, work=work,
        )
        if resuming and state.wait >= stage.patience and initial_epoch > 0:
            # Early stopping had fired on the last saved epoch: only the restore is left.
            if resume_from[3] is not None:
                train_model.set_weights(resume_from[3])
        else:
            validation = [_EagerValidation(stage_val, n_classes)] if cached else []
            train_model.fit(
                stage_train,
                validation_data=None if cached else stage_val,
                initial_epoch=initial_epoch,
                epochs=stage.epochs,
                shuffle=False,  # the batches shuffle themselves, seeded per epoch
                callbacks=[*validation, stopper, epoch_callback, *callbacks],
                verbose=verbose,
            )
        _stop_if_requested(stop, work)
        if final_outputs is not None:
            final_outputs.pop("val", None)
            if cached:
                final_outputs["val"] = _outputs_on(train_model, stage_val)
        if timings is not None:
            timings.append({
                "stage": stage.name, "epochs": len(rows) - global_epoch,
                "seconds": time.perf_counter() - started,
                "caching_seconds": cached_seconds if cached else 0.0,
                "cached": cached,
            })
        global_epoch = len(rows)
        if plan is not None:
            plan.stage_done(index)
        last = all(later.epochs == 0 for later in stages[index + 1 :])
        if work is not None and not last:
            # After the last stage the run is saved at once; resuming from its last epoch
            # checkpoint would only repeat the restore of the best weights.
            work.save(model, TrainingState(
                stage_index=index + 1, epochs_done=0, global_epoch=global_epoch,
                calibrated=True, history=rows,
            ))
    if work is not None:
        work.flush()
    return rows


def _stop_if_requested(stop, work) -> None:
    """Raise ``TrainingInterrupted`` once a signal asked training to stop."""
    from transferkit.checkpoint import TrainingInterrupted

    if stop is not None and stop.requested:
        if work is not None:
            work.flush()
        raise TrainingInterrupted(
            f"{stop.requested}: training stopped; the last completed epoch is saved. "
            "Continue with: transferkit finetune --resume RUN"
        )


def default_forward(model):
    """A batch -> outputs function for forward-only work in Keras, with frozen BatchNorm
    folded into the convolutions before it (what makes bfloat16 pay on ResNet50)."""
    from transferkit.fold import batchnorm_count, fold_batchnorm

    if batchnorm_count(model):
        model = fold_batchnorm(model)
    return lambda batch: model.predict_on_batch(np.asarray(batch, dtype="float32"))


def _feature_plan(model, spec, stages, train_data, val_data, cache, forward_factory, seed, verbose, stop=None):
    """The run's ``FeaturePlan``, or None when the cache is off."""
    from transferkit.cache import FeaturePlan

    from transferkit.precision import compute_dtype

    if cache is None or not cache.enabled:
        return None
    # Features from a 16-bit network are stored in float16 (half the memory, no precision
    # lost that the network had); from a float32 network, in float32.
    mixed = compute_dtype(model) != "float32"
    return FeaturePlan(
        model, spec, stages, train_data, val_data, cache, forward_factory or default_forward,
        seed=seed, dtype="float16" if mixed else "float32", verbose=verbose, stop=stop,
    )


def _outputs_on(model, batches) -> np.ndarray:
    """The model's inference outputs over unshuffled batches, run eagerly: for a small model
    this is faster than ``predict``, which first traces a function. Cached features are
    read in large chunks (fewer calls) instead of batch by batch."""
    chunks = batches.in_order() if hasattr(batches, "in_order") else (batches[i][0] for i in range(len(batches)))
    outputs = [keras.ops.convert_to_numpy(model(chunk, training=False)) for chunk in chunks]
    return np.concatenate(outputs).astype("float32")
