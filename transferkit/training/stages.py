"""Staged fine-tuning: per stage freeze -> recompile -> fit, as the Keras transfer-learning guide
tells it.

Train the new head with the backbone frozen, then unfreeze the top blocks and continue at a
much lower learning rate. Each stage is four steps, in this order, in ``_train_stage``:

1. freeze: ``set_trainable`` opens the stage's top blocks. BatchNorm layers of the backbone
   stay frozen in every stage by ``trainable=False`` (in Keras 3 that also runs them in
   inference mode; ``training=False`` alone does not hold under ``fit``);
2. the feature cache (``training.features``), where the stage has a frozen part: what is
   fitted is then the top part, on stored features of the frozen one;
3. recompile, which the change of ``trainable`` needs (or it is ignored);
4. fit, with early stopping on the validation loss that restores the stage's best weights.

Beside them, as steps of their own: resuming a stage from the checkpoint (``_resume_point``),
checkpointing (``_checkpoint_stage_start``, ``_checkpoint_between_stages``), and setting
the head's BatchNorm statistics once (``_calibrate_head_once``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import keras
import numpy as np

from transferkit.backbones import BackboneSpec
from transferkit.keras_private import EarlyStoppingState
from transferkit.model.surgery import set_trainable
from transferkit.outputs import loss_for
from transferkit.recipe import CacheConfig, LossConfig, StageConfig
from transferkit.training.callbacks import EagerValidation, EpochCallback, ResumableEarlyStopping, predict_eagerly
from transferkit.training.features import CALIBRATION_IMAGES, FeatureCache, FeaturePlan

log = logging.getLogger("transferkit")

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


@dataclass(frozen=True)
class StageOptions:
    """How ``run_stages`` trains, beyond the stages themselves.

    Attributes:
        verbose: passed to ``fit`` (1 shows Keras progress bars; stage lines are logged);
            default "auto".
        seed: seeds the dropout masks of each epoch and the cached views' augmentation;
            default 0. (The batch order and the uncached augmentation follow the batches'
            own seed.)
        callbacks: extra callbacks for every stage; default none.
        cache: the recipe's ``CacheConfig``; default None (no feature cache).
        loss: the recipe's ``LossConfig`` (label smoothing); default None (plain
            cross-entropy).
        forward_factory: turns an extractor model (images -> one feature map, or a list of
            them) into a batch -> outputs function (an inference engine); default None (the
            model's own ``predict_on_batch`` after BatchNorm folding, ``default_forward``).
        feature_cache: a ``FeatureCache`` that keeps the cached features for later runs on
            the same images (a study's trials) and serves this one what earlier runs left;
            default None (features are the run's own).
        forward_key: what identifies ``forward_factory``'s engine and precision in the
            shared cache's keys; default ().
    """

    verbose: int | str = "auto"
    seed: int = 0
    callbacks: Sequence[keras.callbacks.Callback] = ()
    cache: CacheConfig | None = None
    loss: LossConfig | None = None
    forward_factory: Callable | None = None
    feature_cache: FeatureCache | None = None
    forward_key: tuple = ()


@dataclass
class Checkpointing:
    """Where training resumes from, where it checkpoints, and what stops it.

    Attributes:
        state: a ``TrainingState`` to resume from; default None (the start).
        work: a ``WorkFolder`` to checkpoint into after every epoch; default None.
        stop: a ``StopFlag``; once set, training stops after the current batch and
            ``TrainingInterrupted`` is raised. Default None.
    """

    state: object = None
    work: object = None
    stop: object = None


@dataclass(frozen=True)
class StageTiming:
    """What one stage cost: epochs run, wall seconds (feature caching included), seconds
    spent caching, and whether it trained on cached features."""

    stage: str
    epochs: int
    seconds: float
    caching_seconds: float
    cached: bool


@dataclass
class StagesResult:
    """What ``run_stages`` returns.

    Attributes:
        history: one continuous history, a dict per epoch with the keys of
            ``runs.HISTORY_COLUMNS`` (the resumed run's earlier epochs included).
        timings: one ``StageTiming`` per stage run (in this process).
        val_outputs: when the last stage trained on cached features, the final model's
            outputs on the validation set, computed from the cached features (the frozen
            part cannot have changed); else None (predict with the model).
    """

    history: list[dict] = field(default_factory=list)
    timings: list[StageTiming] = field(default_factory=list)
    val_outputs: np.ndarray | None = None


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


def compile_for_stage(model, stage: StageConfig, n_classes: int, steps_per_execution: int = 1, *,
                      steps_per_epoch: int = 1, loss: LossConfig | None = None) -> None:
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
    """
    model.compile(
        optimizer=make_optimizer(stage.optimizer, stage_learning_rate(stage, steps_per_epoch), stage.weight_decay),
        loss=make_loss(n_classes, loss),
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )


def backbone_features(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The backbone's output for uint8 images, computed in inference mode.

    Args:
        model: a classifier from ``build_classifier``.
        images: uint8 (n, S, S, 3).
        batch_size: images per call; default 32.

    Returns:
        float32 features, one row per image.
    """
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


def default_forward(model):
    """A batch -> outputs function for forward-only work in Keras, with frozen BatchNorm
    folded into the convolutions before it (what makes bfloat16 pay on ResNet50).

    Args:
        model: an extractor (images -> feature maps).

    Returns:
        A function from a batch of images to the model's outputs.
    """
    from transferkit.model.fold import batchnorm_count, fold_batchnorm

    if batchnorm_count(model):
        model = fold_batchnorm(model)
    return lambda batch: model.predict_on_batch(np.asarray(batch, dtype="float32"))


def run_stages(
    model,
    spec: BackboneSpec,
    stages: Sequence[StageConfig],
    train_data,
    val_data,
    n_classes: int,
    options: StageOptions | None = None,
    checkpointing: Checkpointing | None = None,
) -> StagesResult:
    """Fit the classifier stage by stage: per stage freeze -> recompile -> fit.

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
        options: a ``StageOptions``; default None (its defaults: no cache, seed 0).
        checkpointing: a ``Checkpointing`` (resume state, work folder, stop flag); default
            None (start, no checkpoints, no stop flag).

    Returns:
        A ``StagesResult``: the history, per-stage timings, final validation outputs.

    Raises:
        TrainingInterrupted: the stop flag was set (the last completed epoch is saved).
    """
    from transferkit.training.checkpoint import TrainingState

    options = options or StageOptions()
    checkpointing = checkpointing or Checkpointing()
    if checkpointing.state is None:
        checkpointing = Checkpointing(TrainingState(), checkpointing.work, checkpointing.stop)
    state = checkpointing.state
    run = _Run(model, spec, list(stages), train_data, val_data, n_classes, options, checkpointing,
               rows=list(state.history), global_epoch=state.global_epoch, calibrated=state.calibrated)
    run.plan = _feature_plan(run)
    result = StagesResult(history=run.rows)
    try:
        for index, stage in enumerate(run.stages):
            if index < state.stage_index or stage.epochs == 0:
                continue
            timing, result.val_outputs = _train_stage(run, index)
            result.timings.append(timing)
            if run.plan is not None:
                run.plan.stage_done(index)
            _checkpoint_between_stages(run, index)
    finally:
        if run.plan is not None:
            run.plan.close()
    if checkpointing.work is not None:
        checkpointing.work.flush()
    return result


# --- the steps of a stage ---------------------------------------------------------------


@dataclass
class _Run:
    """What every step of a run of stages reads, and the history it writes."""

    model: object
    spec: BackboneSpec
    stages: list
    train_data: object
    val_data: object
    n_classes: int
    options: StageOptions
    checkpointing: Checkpointing
    rows: list = field(default_factory=list)
    global_epoch: int = 0  # epochs done before the current stage
    calibrated: bool = False
    plan: object = None  # the FeaturePlan, or None without a cache

    def stop_if_requested(self) -> None:
        _stop_if_requested(self.checkpointing.stop, self.checkpointing.work)


@dataclass
class _Fitted:
    """What a stage fits: the classifier on image batches, or its top part on cached features."""

    model: object
    train: object
    val: object
    cached: bool
    calibration: np.ndarray | None = None  # backbone features, when the cache has them

    @property
    def steps_per_execution(self) -> int:
        # Several steps per call on cached features, but never more than an epoch holds
        # (Keras's progress bar would count past the epoch's end).
        return min(16, max(1, len(self.train))) if self.cached else 1


@dataclass
class _Start:
    """Where a stage starts: its first epoch, or after the checkpoint's last epoch."""

    initial_epoch: int = 0
    stopping: EarlyStoppingState | None = None  # early stopping's counters, when resumed mid-stage

    def stopped(self, patience: int) -> bool:
        """Early stopping had fired on the last saved epoch: only its restore is left."""
        return self.stopping is not None and self.initial_epoch > 0 and self.stopping.wait >= patience


def _train_stage(run: _Run, index: int) -> tuple[StageTiming, np.ndarray | None]:
    """One stage: freeze -> (feature cache) -> recompile -> (resume) -> fit.

    Returns:
        (its timing, the validation outputs from the cache, or None).
    """
    stage = run.stages[index]
    started = time.perf_counter()
    run.stop_if_requested()
    set_trainable(run.model, run.spec, stage.unfreeze)
    fitted = _what_to_fit(run, index)
    run.stop_if_requested()  # computing the features can take a while
    caching_seconds = time.perf_counter() - started if fitted.cached else 0.0
    _calibrate_head_once(run, fitted)
    compile_for_stage(fitted.model, stage, run.n_classes, steps_per_execution=fitted.steps_per_execution,
                      steps_per_epoch=len(fitted.train), loss=run.options.loss)
    start = _resume_point(run.checkpointing, index, fitted)
    _checkpoint_stage_start(run, index, fitted)
    _log_stage(run, index, fitted, start)
    _fit(run, index, fitted, start)
    run.stop_if_requested()
    val_outputs = predict_eagerly(fitted.model, fitted.val) if fitted.cached else None
    timing = StageTiming(stage=stage.name, epochs=len(run.rows) - run.global_epoch,
                         seconds=time.perf_counter() - started, caching_seconds=caching_seconds,
                         cached=fitted.cached)
    run.global_epoch = len(run.rows)
    return timing, val_outputs


def _what_to_fit(run: _Run, index: int) -> _Fitted:
    """The feature-cache step: the stage's top part on cached features where the plan has
    them, else the whole classifier on the image batches."""
    cached = run.plan.stage_inputs(index) if run.plan is not None else None
    if cached is None:
        return _Fitted(run.model, run.train_data, run.val_data, cached=False)
    return _Fitted(cached.trainable, cached.train, cached.val, cached=True, calibration=cached.calibration)


def _calibrate_head_once(run: _Run, fitted: _Fitted) -> None:
    """Before the run's first stage trains: the head's BatchNorm statistics from backbone
    features (the cache's own where it has them)."""
    if run.calibrated:
        return
    features = fitted.calibration
    if features is None:
        features = backbone_features(run.model, run.train_data.images[:CALIBRATION_IMAGES])
    calibrate_head_batchnorm(run.model, features)
    run.calibrated = True


def _resume_point(checkpointing: Checkpointing, index: int, fitted: _Fitted) -> _Start:
    """The resume step: where stage ``index`` starts, restoring what the checkpoint saved of
    it (the weights of a part trained on cached features, the optimizer's state, early
    stopping's counters and best weights). Call it after compiling: the optimizer must exist."""
    state, work = checkpointing.state, checkpointing.work
    if index != state.stage_index:
        return _Start()
    if work is not None and state.part_only:
        # checkpoint.keras holds the model as the stage began; the part that trains on the
        # cache is saved per epoch (or once as the stage began) on its own.
        fitted.model.set_weights(work.part_weights())
    if state.epochs_done == 0:
        return _Start()
    if work is not None:
        work.restore_optimizer(fitted.model)
    best_weights = work.best_weights() if work is not None else None
    return _Start(state.epochs_done, EarlyStoppingState(state.best, state.wait, state.best_epoch, best_weights))


def _checkpoint_stage_start(run: _Run, index: int, fitted: _Fitted) -> None:
    """Per-epoch checkpoints of a cached stage hold only the part that trains, so the whole
    model must be on disk once as such a stage starts (unless a checkpoint is there).

    It is written in the background while the part trains; the part's starting weights are
    saved with it, so the checkpoint is the stage's start all the same.
    """
    from transferkit.training.checkpoint import TrainingState

    work = run.checkpointing.work
    if work is None or not fitted.cached or work.has_checkpoint():
        return
    state = TrainingState(stage_index=index, epochs_done=0, global_epoch=run.global_epoch, calibrated=True,
                          history=run.rows)
    work.save(run.model, state, part_weights=fitted.model.get_weights(), whole_in_background=True)


def _log_stage(run: _Run, index: int, fitted: _Fitted, start: _Start) -> None:
    if not run.options.verbose:
        return
    stage = run.stages[index]
    trainable = sum(int(np.prod(w.shape)) for w in fitted.model.trainable_weights)
    log.info(
        f"stage {index + 1}/{len(run.stages)} '{stage.name}': unfreeze={stage.unfreeze}, "
        f"{stage.optimizer} lr={stage.learning_rate:g}"
        + (f" ({stage.schedule}" + (f", {stage.warmup_epochs:g} warmup epochs)" if stage.warmup_epochs else ")")
           if stage.schedule != "constant" or stage.warmup_epochs else "")
        + (f", weight decay {stage.weight_decay:g}" if stage.weight_decay else "")
        + f", up to {stage.epochs} epochs"
        + (f" (resuming after epoch {start.initial_epoch})" if start.initial_epoch else "")
        + f", {trainable:,} trainable parameters"
        + (", on cached features" if fitted.cached else "")
    )


def _fit(run: _Run, index: int, fitted: _Fitted, start: _Start) -> None:
    """The fit step: ``fit`` with early stopping (restoring the best weights) and the
    per-epoch callback; validation computed eagerly on cached features."""
    stage = run.stages[index]
    if start.stopped(stage.patience):
        if start.stopping.best_weights is not None:
            fitted.model.set_weights(start.stopping.best_weights)
        return
    stopper = ResumableEarlyStopping(
        resume_from=start.stopping, monitor="val_loss", patience=stage.patience, restore_best_weights=True,
    )
    epoch_callback = EpochCallback(
        classifier=run.model, rows=run.rows, stage_index=index, stage_name=stage.name,
        epoch_offset=run.global_epoch - start.initial_epoch, train_data=fitted.train, seed=run.options.seed,
        stopper=stopper, stop=run.checkpointing.stop, work=run.checkpointing.work,
    )
    validation = ([EagerValidation(fitted.val, run.n_classes, make_loss(run.n_classes, run.options.loss))]
                  if fitted.cached else [])
    fitted.model.fit(
        fitted.train,
        validation_data=None if fitted.cached else fitted.val,
        initial_epoch=start.initial_epoch,
        epochs=stage.epochs,
        shuffle=False,  # the batches shuffle themselves, seeded per epoch
        callbacks=[*validation, stopper, epoch_callback, *run.options.callbacks],
        verbose=run.options.verbose,
    )


def _checkpoint_between_stages(run: _Run, index: int) -> None:
    """Save the model as the next stage begins. After the last stage the run is saved at
    once; resuming from its last epoch checkpoint would only repeat the restore of the best
    weights, so nothing is written then."""
    from transferkit.training.checkpoint import TrainingState

    work = run.checkpointing.work
    if work is None or all(later.epochs == 0 for later in run.stages[index + 1 :]):
        return
    work.save(run.model, TrainingState(stage_index=index + 1, epochs_done=0, global_epoch=run.global_epoch,
                                       calibrated=True, history=run.rows))


def _stop_if_requested(stop, work) -> None:
    """Raise ``TrainingInterrupted`` once a signal asked training to stop."""
    from transferkit.errors import TrainingInterrupted

    if stop is not None and stop.requested:
        if work is not None:
            work.flush()
        raise TrainingInterrupted(
            f"{stop.requested}: training stopped; the last completed epoch is saved. "
            "Continue with: transferkit finetune --resume RUN"
        )


def _feature_plan(run: _Run):
    """The run's ``FeaturePlan``, or None when the cache is off."""
    from transferkit.model.surgery import compute_dtype

    cache = run.options.cache
    if cache is None or not cache.enabled:
        return None
    # Features from a 16-bit network are stored in float16 (half the memory, no precision
    # lost that the network had); from a float32 network, in float32.
    mixed = compute_dtype(run.model) != "float32"
    return FeaturePlan(
        run.model, run.spec, run.stages, run.train_data, run.val_data, cache,
        run.options.forward_factory or default_forward, seed=run.options.seed,
        dtype="float16" if mixed else "float32", verbose=run.options.verbose, stop=run.checkpointing.stop,
        shared=run.options.feature_cache, context=run.options.forward_key,
    )
