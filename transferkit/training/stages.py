"""Staged fine-tuning: per stage set what trains, keep BatchNorm frozen, recompile, fit.

The order follows the Keras transfer-learning guide: train the new head with the backbone
frozen, then unfreeze the top blocks and continue at a much lower learning rate. BatchNorm
layers of the backbone stay frozen in every stage by ``trainable=False`` (in Keras 3 that
also runs them in inference mode; ``training=False`` alone does not hold under ``fit``).
"""

from __future__ import annotations

import logging

import time
from typing import Sequence

import keras
import numpy as np

from transferkit.backbones import BackboneSpec
from transferkit.outputs import loss_for
from transferkit.keras_private import EarlyStoppingState
from transferkit.recipe import StageConfig
from transferkit.model.surgery import set_trainable
from transferkit.training.callbacks import EagerValidation, EpochCallback, ResumableEarlyStopping, predict_eagerly

log = logging.getLogger("transferkit")


_OPTIMIZERS = {
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "sgd": lambda learning_rate: keras.optimizers.SGD(learning_rate=learning_rate, momentum=0.9),
    "rmsprop": keras.optimizers.RMSprop,
}






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
    ``transferkit.training.features.FeaturePlan``).

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
    from transferkit.training.checkpoint import TrainingState

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
    from transferkit.training.checkpoint import TrainingState

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
            resume_from = EarlyStoppingState(state.best, state.wait, state.best_epoch, work.best_weights() if work else None)
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
            log.info(
                f"stage {index + 1}/{len(stages)} '{stage.name}': unfreeze={stage.unfreeze}, "
                f"{stage.optimizer} lr={stage.learning_rate:g}, up to {stage.epochs} epochs"
                + (f" (resuming after epoch {initial_epoch})" if resuming else "")
                + f", {trainable:,} trainable parameters"
                + (", on cached features" if cached else "")
            )
        stopper = ResumableEarlyStopping(
            resume_from=resume_from, monitor="val_loss", patience=stage.patience,
            restore_best_weights=True,
        )
        epoch_callback = EpochCallback(
            classifier=model, rows=rows, stage_index=index, stage_name=stage.name,
            epoch_offset=global_epoch - initial_epoch, train_data=stage_train, seed=seed,
            stopper=stopper, stop=stop, work=work,
        )
        if resuming and state.wait >= stage.patience and initial_epoch > 0:
            # Early stopping had fired on the last saved epoch: only the restore is left.
            if resume_from.best_weights is not None:
                train_model.set_weights(resume_from.best_weights)
        else:
            validation = [EagerValidation(stage_val, n_classes)] if cached else []
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
                final_outputs["val"] = predict_eagerly(train_model, stage_val)
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
    from transferkit.training.checkpoint import TrainingInterrupted

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
    from transferkit.model.fold import batchnorm_count, fold_batchnorm

    if batchnorm_count(model):
        model = fold_batchnorm(model)
    return lambda batch: model.predict_on_batch(np.asarray(batch, dtype="float32"))


def _feature_plan(model, spec, stages, train_data, val_data, cache, forward_factory, seed, verbose, stop=None):
    """The run's ``FeaturePlan``, or None when the cache is off."""
    from transferkit.training.features import FeaturePlan

    from transferkit.runtime import compute_dtype

    if cache is None or not cache.enabled:
        return None
    # Features from a 16-bit network are stored in float16 (half the memory, no precision
    # lost that the network had); from a float32 network, in float32.
    mixed = compute_dtype(model) != "float32"
    return FeaturePlan(
        model, spec, stages, train_data, val_data, cache, forward_factory or default_forward,
        seed=seed, dtype="float16" if mixed else "float32", verbose=verbose, stop=stop,
    )


