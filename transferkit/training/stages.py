"""Staged fine-tuning: per stage freeze -> recompile -> fit, as the Keras transfer-learning guide
tells it.

Train the new head with the backbone frozen, then unfreeze the top blocks and continue at a
much lower learning rate. ``run_stages`` tells the story; each stage is ``begin_stage`` then
its fit:

1. freeze: ``set_trainable`` opens the stage's top blocks. BatchNorm layers of the backbone
   stay frozen in every stage by ``trainable=False`` (in Keras 3 that also runs them in
   inference mode; ``training=False`` alone does not hold under ``fit``);
2. the feature cache (``training.features``), where the stage has a frozen part: what is
   fitted is then the top part, on stored features of the frozen one;
3. the head's BatchNorm statistics, set once from real backbone features before the first
   stage trains;
4. recompile (``training.compile``), which the change of ``trainable`` needs (or it is
   ignored);
5. fit, with early stopping on the validation loss that restores the stage's best weights.

Under a distribution strategy (``StageOptions.distribution``), what fits is built and
compiled in the strategy's scope, and fit splits each batch (the recipe's global batch)
across the replicas; the head's BatchNorm layers then compute their batch statistics over
the global batch (synchronized across replicas), so a step normalises as on one device and
every replica keeps the same moving statistics. The feature cache is computed once, outside
the strategy, and its batches are split across the replicas like image batches. Under
data-parallel (several processes, ``strategies``), each process fits on its own share of
the images (``data.batches.process_share``, a ``PyDataset``), and the feature cache is
off: the frozen part runs in every step, on each process's share.

With a time budget (``StageOptions.time_budget``, ``training.budget``), a stage starts only
when the budget leaves time for it, its fit is timed and stopped at the budget's plan, and
the feature cache computes the views that fit.

``begin_stage`` (steps 1-4) is public: ``lr-find`` and ``doctor --model`` set a stage up
exactly as training begins it. Beside the steps: resuming a stage from the checkpoint
(``_resume_point``) and checkpointing (``_checkpoint_stage_start``,
``_checkpoint_between_stages``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import keras
import numpy as np

from transferkit.backbones import BackboneSpec
from transferkit.data.batches import ImageBatches, keras_input, process_share
from transferkit.keras_private import EarlyStoppingState, build_for_fit
from transferkit.model.classifier import calibrate_head_batchnorm
from transferkit.model.surgery import compute_dtype, readout_at, set_trainable, synchronize_batchnorm
from transferkit.outputs import class_probabilities, target_labels
from transferkit.progress import fit_verbosity
from transferkit.recipe import CacheConfig, LossConfig, StageConfig
from transferkit.runs import stage_epochs
from transferkit.strategies import Distribution
from transferkit.training.budget import TimeBudget
from transferkit.training.callbacks import EagerValidation, EpochCallback, ResumableEarlyStopping, predict_eagerly
from transferkit.training.checkpoint import StopFlag, TrainingState, WorkFolder, stop_if_requested
from transferkit.training.compile import compile_for_stage, make_loss, xla_pays
from transferkit.training.data_parallel import gather_rows
from transferkit.training.features import (
    CALIBRATION_IMAGES,
    CachedReference,
    FeatureCache,
    FeaturePlan,
    Int8Origin,
    backbone_features,
    default_forward,
)
from transferkit.training.flips import AutoFlips, describe_decision, flip_free_stages, flip_record, judge_flips
from transferkit.training.int8_guard import CHECK_MOST, CHECK_ROUND, HeadLossCheck, compare_head_loss

log = logging.getLogger("transferkit")


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
            them) and the ``features.ForwardWork`` it will do into a batch -> outputs
            function (an inference engine); default None (the
            model's own ``predict_on_batch`` after BatchNorm folding, ``default_forward``).
        feature_cache: a ``FeatureCache`` that keeps the cached features for later runs on
            the same images (a study's trials) and serves this one what earlier runs left;
            default None (features are the run's own).
        forward_key: what identifies ``forward_factory``'s engine and precision in the
            shared cache's keys; default ().
        distribution: the ``strategies.Distribution`` the model was built under (what fits
            is built and compiled in its scope); default None (one device).
        time_budget: seconds the stages and the work after them may take: their epochs (at
            most the stages' own) and the cached views are planned to fit
            (``training.budget``); default None (no budget).
        after_training_passes: the image passes of the work after the stages (calibration,
            TTA choice, rejection fit), which the budget keeps time for; default None (the
            training images once and the validation images three times).
        auto_flips: with ``augment.hflip = "auto"``, a ``training.flips.AutoFlips``: the
            first stage that trains does so without flips, and the later ones with them
            unless mirrored validation images then score clearly worse; default None (the
            training batches' augmentation throughout).
    """

    verbose: int | str = "auto"
    seed: int = 0
    callbacks: Sequence[keras.callbacks.Callback] = ()
    cache: CacheConfig | None = None
    loss: LossConfig | None = None
    forward_factory: Callable | None = None
    feature_cache: FeatureCache | None = None
    forward_key: tuple = ()
    distribution: Distribution | None = None
    time_budget: float | None = None
    after_training_passes: int | None = None
    auto_flips: AutoFlips | None = None


@dataclass
class Checkpointing:
    """Where training resumes from, where it checkpoints, and what stops it.

    Attributes:
        state: a ``TrainingState`` to resume from; default None (the start).
        work: a ``WorkFolder`` to checkpoint into after every epoch; default None.
        stop: a ``StopFlag``; once set, training stops after the current batch and
            ``TrainingInterrupted`` is raised. Default None.
    """

    state: TrainingState | None = None
    work: WorkFolder | None = None
    stop: StopFlag | None = None


@dataclass(frozen=True)
class StageTiming:
    """What one stage cost: epochs run, wall seconds (feature caching included), seconds
    spent caching, and whether it trained on cached features."""

    stage: str
    epochs: int
    seconds: float
    caching_seconds: float
    cached: bool


@dataclass(frozen=True)
class ValidationReadout:
    """The final model's readout (``model.surgery.readout_at``) of the validation images, from
    the last stage's cached features (the frozen part cannot have changed; validation
    features are float32's even where int8 computed the training views), or from one pass of
    the model (``of_model``): what the validation metrics, calibration and the work after
    training read, instead of a pass of the whole network each.

    Attributes:
        outputs: (n, units) class outputs (the validation metrics').
        dense_inputs: (n, d) inputs of the head's output Dense (calibration's logits).
        embeddings: (n, e) backbone embeddings (the rejection fit's and the TTA choice's).
    """

    outputs: np.ndarray
    dense_inputs: np.ndarray
    embeddings: np.ndarray

    @classmethod
    def of_model(cls, model: keras.Model, batches) -> ValidationReadout:
        """The whole classifier's readout over unshuffled image batches, in one pass: what
        the validation metrics, calibration and the work after training read where no stage
        on cached features left one (an uncached last stage, a run resumed after its stages)."""
        readouts = readout_at(model).predict(batches, verbose=0)
        return cls(*(np.asarray(readout, dtype="float32") for readout in readouts))


@dataclass
class StagesResult:
    """What ``run_stages`` returns.

    Attributes:
        history: one continuous history, a dict per epoch with the keys of
            ``runs.HISTORY_COLUMNS`` (the resumed run's earlier epochs included).
        timings: one ``StageTiming`` per stage run (in this process).
        budget: with a time budget, its plan and what came of it (``TimeBudget.record``);
            else None.
        validation: when the last stage trained on cached features (int8 ones kept by the
            guard), the final model's ``ValidationReadout`` of the validation images; else
            None (the model runs over them).
        int8_guard: where a stage trained on int8 features, how the head's validation loss
            on them compared with float32's (``training.int8_guard``); else None.
        int8_frozen: where the last stage trained on int8 features (kept by the guard), the
            ``training.features.Int8Origin`` of its frozen part (the TTA choice's variants
            and the knn reference images go through it, ``trust.record.after_training_forward``);
            else None.
        reference: where the last stage trained on cached features (as for ``validation``),
            its stored training features, the images themselves
            (``training.features.CachedReference``: the knn reference images need only the
            layers above them); else None.
        hflip: with ``hflip = "auto"``, what was decided of flips (``training.flips.flip_record``);
            else None.
    """

    history: list[dict] = field(default_factory=list)
    timings: list[StageTiming] = field(default_factory=list)
    budget: dict | None = None
    validation: ValidationReadout | None = None
    int8_guard: HeadLossCheck | None = None
    int8_frozen: Int8Origin | None = None
    reference: CachedReference | None = None
    hflip: dict | None = None

    @property
    def val_outputs(self) -> np.ndarray | None:
        """The validation readout's class outputs, or None."""
        return None if self.validation is None else self.validation.outputs

    def stage_records(self) -> list[dict]:
        """One entry per stage that trained, from the whole history (a resumed run's earlier
        epochs included): its name and epochs, and this process's timing of it (seconds,
        caching, cached; None for a stage trained wholly before a resume, and "resumed":
        true where the timing covers only the epochs after the resume)."""
        groups = stage_epochs(row["stage"] for row in self.history)
        timed = dict(zip(range(len(groups) - len(self.timings), len(groups)), self.timings))  # the last stages
        entries = []
        for index, (name, epochs) in enumerate(groups):
            timing = timed.get(index)
            entry = asdict(timing) if timing is not None else {"stage": name, "seconds": None,
                                                               "caching_seconds": None, "cached": None}
            entry["epochs"] = epochs
            if timing is None or timing.epochs != epochs:
                entry["resumed"] = True
            entries.append(entry)
        return entries

    def records(self) -> dict:
        """What metrics.json records of the stages: "stages" (``stage_records``), with a time
        budget "time_budget", on int8 features "int8_features" (the head-loss guard), and with
        ``hflip = "auto"`` "hflip" (what was decided)."""
        records = {"stages": self.stage_records()}
        if self.budget is not None:
            records["time_budget"] = self.budget
        if self.int8_guard is not None:
            records["int8_features"] = self.int8_guard.record()
        if self.hflip is not None:
            records["hflip"] = self.hflip
        return records


def run_stages(
    model: keras.Model,
    spec: BackboneSpec,
    stages: Sequence[StageConfig],
    train_data: ImageBatches,
    val_data: ImageBatches,
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
    run = StagesRun.start(model, spec, stages, train_data, val_data, n_classes, options, checkpointing)
    first = run.checkpointing.state.stage_index
    result = StagesResult(history=run.rows)
    with run:
        for index in range(len(run.stages)):
            if index < first or not run.trains(index):
                continue
            timing, result.validation = _train_stage(run, index)
            result.int8_frozen = run.plan.int8_origin(index) if result.validation is not None else None
            result.reference = run.plan.reference(index) if result.validation is not None else None
            result.timings.append(timing)
            run.stage_done(index)
            _checkpoint_between_stages(run, index)
    if run.checkpointing.work is not None:
        run.checkpointing.work.flush()
    result.budget = run.budget.finish() if run.budget is not None else None
    result.int8_guard, result.hflip = run.int8_guard, run.hflip
    return result


@dataclass
class StagesRun:
    """A run of stages under way: what every step reads, and the history it writes.

    Make one with ``StagesRun.start``; use it in a ``with`` block (or ``close`` it) to
    release the cached features.

    Attributes:
        model: the whole classifier.
        spec: the backbone's registry entry.
        stages: the stages, in order.
        train_data, val_data: the image batches.
        n_classes: number of classes.
        options: the ``StageOptions``.
        checkpointing: the ``Checkpointing`` (its ``state`` always set).
        rows: the history so far, a dict per epoch (a resumed run's earlier epochs included).
        global_epoch: epochs done before the current stage.
        calibrated: whether the head's BatchNorm statistics are set.
        plan: the ``FeaturePlan`` holding the cached features, or None without a cache.
        budget: the ``training.budget.TimeBudget``, or None without one.
        int8_guard: the head-loss guard's ``HeadLossCheck`` once a stage trained on int8
            features, else None.
        hflip: with ``hflip = "auto"``, the decision's record once it was made
            (``training.flips.flip_record``), else None.
        flip_free: with ``hflip = "auto"``, the stages that train without flips
            (``training.flips.flip_free_stages``).
    """

    model: keras.Model
    spec: BackboneSpec
    stages: list[StageConfig]
    train_data: ImageBatches
    val_data: ImageBatches
    n_classes: int
    options: StageOptions
    checkpointing: Checkpointing
    rows: list[dict] = field(default_factory=list)
    global_epoch: int = 0
    calibrated: bool = False
    plan: FeaturePlan | None = None
    budget: TimeBudget | None = None
    int8_guard: HeadLossCheck | None = None
    hflip: dict | None = None
    flip_free: frozenset[int] = frozenset()

    @classmethod
    def start(cls, model: keras.Model, spec: BackboneSpec, stages: Sequence[StageConfig], train_data: ImageBatches,
              val_data: ImageBatches, n_classes: int, options: StageOptions | None = None,
              checkpointing: Checkpointing | None = None) -> StagesRun:
        """Where a run of stages starts (the checkpoint's state, or the beginning), with its
        feature plan when the cache is on. Arguments as ``run_stages``'s."""
        options = options or StageOptions()
        checkpointing = checkpointing or Checkpointing()
        if checkpointing.state is None:
            checkpointing = Checkpointing(TrainingState(), checkpointing.work, checkpointing.stop)
        state = checkpointing.state
        run = cls(model, spec, list(stages), train_data, val_data, n_classes, options, checkpointing,
                  rows=list(state.history), global_epoch=state.global_epoch, calibrated=state.calibrated)
        if options.time_budget is not None:  # its clock starts here, before the feature cache
            run.budget = TimeBudget(options.time_budget, stages, train_images=len(train_data.images),
                                    val_images=len(val_data.images), first_stage=state.stage_index,
                                    done_before=state.epochs_done, verbose=options.verbose,
                                    after_training_passes=options.after_training_passes,
                                    history_stages=[row["stage"] for row in state.history])
        run.plan = _feature_plan(run)
        if state.int8_guard is not None:  # resumed after the guard: its later stages as it decided
            run.int8_guard = HeadLossCheck.from_record(state.int8_guard)
            if not run.int8_guard.passed and run.plan is not None:
                run.plan.use_float32()
        if options.auto_flips is not None:  # resumed after the decision: the later stages as it decided
            run.hflip = state.hflip
            _train_without_flips(run, flip_free_stages(run.stages, state.hflip))
        return run

    def decisions(self) -> dict:
        """What a checkpoint's state keeps of what was decided while training: the head-loss
        guard's record and the flip decision's (``TrainingState``'s fields)."""
        return {"int8_guard": None if self.int8_guard is None else self.int8_guard.record(), "hflip": self.hflip}

    def trains(self, index: int) -> bool:
        """Whether stage ``index`` trains: it has epochs, and the time budget (if any) lets it
        start (decided once)."""
        return self.stages[index].epochs > 0 and (self.budget is None or self.budget.allows(index))

    def stop_if_requested(self) -> None:
        """Raise ``TrainingInterrupted`` once a signal asked training to stop."""
        stop_if_requested(self.checkpointing.stop, self.checkpointing.work)

    def scope(self):
        """The distribution strategy's scope (a no-op on one device): models that fit are
        built and compiled in it."""
        distribution = self.options.distribution
        return distribution.scope() if distribution is not None else contextlib.nullcontext()

    def stage_done(self, index: int) -> None:
        """Release the cached features no later stage needs."""
        if self.plan is not None:
            self.plan.stage_done(index)

    def close(self) -> None:
        """Release every cached feature."""
        if self.plan is not None:
            self.plan.close()

    def __enter__(self) -> StagesRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class BegunStage:
    """A stage set up to fit: the classifier on image batches, or its top part on cached
    features, compiled with the stage's optimizer, schedule and loss.

    Attributes:
        model: what fits (the classifier, or its top part).
        train, val: the batches it fits on (images, or cached features).
        cached: whether ``model`` is the top part on cached features.
        caching_seconds: the time spent computing cached features for it.
        began: ``time.perf_counter()`` as the stage began to be set up.
        calibration: backbone features of some training images, when the cache has them.
    """

    model: keras.Model
    train: keras.utils.PyDataset
    val: keras.utils.PyDataset
    cached: bool
    caching_seconds: float = 0.0
    began: float = 0.0
    calibration: np.ndarray | None = None

    def steps_per_execution(self, distribution: Distribution | None = None) -> int:
        """Steps per call: several on cached features, but never more than an epoch holds
        (Keras's progress bar would count past the epoch's end); one under a tf.distribute
        strategy, where Keras 3.15's multi-step loop fails on a PyDataset ("You must feed a
        value for placeholder tensor"), and on PyTorch (Keras runs one there)."""
        if distribution is not None and distribution.strategy is not None:
            return 1
        if keras.config.backend() == "torch":  # Keras on PyTorch runs one
            return 1
        return min(16, max(1, len(self.train))) if self.cached else 1


def begin_stage(run: StagesRun, index: int) -> BegunStage:
    """Set stage ``index`` up as training begins it: freeze -> (feature cache) -> the head's
    BatchNorm statistics (once per run) -> recompile, what fits built and compiled in the
    distribution strategy's scope.

    Args:
        run: the ``StagesRun`` (from ``StagesRun.start``).
        index: which of ``run.stages``.

    Returns:
        The ``BegunStage``: what fits, on what, compiled.

    Raises:
        TrainingInterrupted: the stop flag was set meanwhile.
    """
    stage = run.stages[index]
    started = time.perf_counter()
    run.stop_if_requested()
    set_trainable(run.model, run.spec, stage.unfreeze)
    begun = _what_to_fit(run, index)
    run.stop_if_requested()  # computing the features can take a while
    begun.began = started
    if begun.cached:
        begun.caching_seconds = time.perf_counter() - started
    _calibrate_head_once(run, begun)
    distribution = run.options.distribution
    with run.scope():
        # XLA only for the part above cached features: blocks and head, no image layers.
        xla = begun.cached and xla_pays(begun.model, stage.epochs * len(begun.train),
                                        distributed=distribution is not None and distribution.name != "none")
        compile_for_stage(begun.model, stage, run.n_classes,
                          steps_per_execution=begun.steps_per_execution(distribution),
                          steps_per_epoch=len(begun.train), loss=run.options.loss, jit_compile=xla)
        if len(begun.train):
            # The optimizer's and metrics' variables now, so that fit traces its step once.
            build_for_fit(begun.model, begun.train[0])
    return begun


# --- the steps of a stage ---------------------------------------------------------------


@dataclass
class _Start:
    """Where a stage starts: its first epoch, or after the checkpoint's last epoch."""

    initial_epoch: int = 0
    stopping: EarlyStoppingState | None = None  # early stopping's counters, when resumed mid-stage

    def stopped(self, patience: int) -> bool:
        """Early stopping had fired on the last saved epoch: only its restore is left."""
        return self.stopping is not None and self.initial_epoch > 0 and self.stopping.wait >= patience


def _train_stage(run: StagesRun, index: int) -> tuple[StageTiming, ValidationReadout | None]:
    """One stage: begin it (freeze -> cache -> recompile) -> (resume) -> fit.

    Returns:
        (its timing, the validation readout from the cache, or None).
    """
    stage = run.stages[index]
    started = time.perf_counter()
    begun = begin_stage(run, index)
    with run.scope():  # the optimizer's restored state lives on every replica
        start = _resume_point(run.checkpointing, index, begun)
    _checkpoint_stage_start(run, index, begun)
    _log_stage(run, index, begun, start)
    _fit(run, index, begun, start)
    run.stop_if_requested()
    kept = _guard_int8_features(run, index, begun) if begun.cached else True
    if _judges_flips(run, index):  # on the cache unless the guard released it
        _judge_flips(run, index, begun, cached=begun.cached and kept)
    readout = None
    if begun.cached and kept:
        outputs, dense_inputs, embeddings = predict_eagerly(readout_at(begun.model), begun.val)
        readout = ValidationReadout(outputs, dense_inputs, embeddings)
    timing = StageTiming(stage=stage.name, epochs=len(run.rows) - run.global_epoch,
                         seconds=time.perf_counter() - started, caching_seconds=begun.caching_seconds,
                         cached=begun.cached)
    run.global_epoch = len(run.rows)
    return timing, readout


def _guard_int8_features(run: StagesRun, index: int, begun: BegunStage) -> bool:
    """After the run's first stage on int8 features: compare its trained part's validation
    loss on them with float32's (``training.int8_guard``); where int8 falls short, say so in
    one line and compute the later stages' features in float32.

    Returns:
        Whether the stage's cached validation features may stand for the model's (False:
        int8 fell short; the validation figures come from the model, in float32).
    """
    if run.plan is None or run.int8_guard is not None:
        return True
    check = compare_head_loss(begun.model, run.plan.int8_rounds(index, CHECK_ROUND, CHECK_MOST),
                              make_loss(run.n_classes, run.options.loss), run.stages[index].name)
    if check is None:
        return True
    run.int8_guard = check
    if check.passed:
        if run.options.verbose:
            log.info(check.describe())
        return True
    later = any(stage.epochs > 0 and run.plan.boundary(j) > 0 for j, stage in enumerate(run.stages) if j > index)
    log.warning("%s; %s", check.describe(), "the later stages' features are computed in float32" if later
                else "the validation figures are computed in float32")
    run.plan.use_float32()
    return False


def _judges_flips(run: StagesRun, index: int) -> bool:
    """Whether flips are judged after stage ``index``: ``hflip = "auto"``, undecided, and a
    later stage trains."""
    return (run.options.auto_flips is not None and run.hflip is None
            and any(stage.epochs > 0 for stage in run.stages[index + 1 :]))


def _judge_flips(run: StagesRun, index: int, begun: BegunStage, cached: bool) -> None:
    """After the first stage of ``hflip = "auto"``, trained without flips: judge on the
    validation images whether mirroring changes the class (``training.flips.judge_flips``:
    the trained stage on images and their mirror images, on its cached features where
    ``cached``, else the whole classifier), say so in one line, and where it does, train the
    later stages without flips too."""
    name = run.stages[index].name
    parallel = _data_parallel(run)
    if parallel is not None and parallel.processes > 1:
        # Each process holds a share of the images: not judged, the later stages flip.
        run.hflip = flip_record(None, name, index, reason="each of several processes holds a share of the images")
    else:
        size = run.val_data.batch_size

        def outputs(model, x: np.ndarray) -> np.ndarray:
            return class_probabilities(predict_eagerly(model, [(x[start : start + size],)
                                                               for start in range(0, len(x), size)]))

        def probabilities(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            if cached:
                plain = np.asarray(begun.val.store.array[0, rows], dtype="float32")
                return outputs(begun.model, plain), outputs(begun.model, run.plan.mirrored_validation(index, rows))
            plain = np.asarray(run.val_data.images[rows], dtype="float32")
            return outputs(run.model, plain), outputs(run.model, np.ascontiguousarray(plain[:, :, ::-1]))

        started = time.perf_counter()
        check = judge_flips(probabilities, target_labels(run.val_data.targets), seed=run.options.seed)
        run.hflip = {**flip_record(check, name, index), "seconds": round(time.perf_counter() - started, 3)}
    _train_without_flips(run, flip_free_stages(run.stages, run.hflip))
    if run.options.verbose or not run.hflip["kept"]:
        log.info(describe_decision(run.hflip, [stage.name for stage in run.stages]))


def _train_without_flips(run: StagesRun, stages: set[int]) -> None:
    """Train ``stages`` without horizontal flips: on image batches augmented without them
    (``_training_batches``), and on cached views read without mirrored images
    (``FeaturePlan.train_without_flips``)."""
    run.flip_free = frozenset(stages)
    if run.plan is not None:
        run.plan.train_without_flips(stages, run.options.auto_flips.without)


def _training_batches(run: StagesRun, index: int) -> ImageBatches:
    """The training image batches of stage ``index``: augmented without flips where it trains
    without them."""
    if index in run.flip_free:
        return run.train_data.with_augmenter(run.options.auto_flips.without)
    return run.train_data


def _what_to_fit(run: StagesRun, index: int) -> BegunStage:
    """The feature-cache step: the stage's top part on cached features where the plan has
    them, else the whole classifier on the image batches."""
    cached = run.plan.stage_inputs(index) if run.plan is not None else None
    if cached is None:
        train = _training_batches(run, index)
        parallel = _data_parallel(run)
        if parallel is not None:  # this process's share of every global batch
            local = max(1, parallel.replicas // parallel.processes)
            return BegunStage(run.model, process_share(train, parallel.process, parallel.processes, local),
                              process_share(run.val_data, parallel.process, parallel.processes, local), cached=False)
        return BegunStage(run.model, train, run.val_data, cached=False)
    return BegunStage(cached.trainable, cached.train, cached.val, cached=True, calibration=cached.calibration)


def _calibrate_head_once(run: StagesRun, begun: BegunStage) -> None:
    """Before the run's first stage trains: the head's BatchNorm statistics from backbone
    features (the cache's own where it has them)."""
    if run.calibrated:
        return
    features = begun.calibration
    if features is None:
        features = head_calibration_features(run.model, run.train_data, _data_parallel(run))
    calibrate_head_batchnorm(run.model, features)
    run.calibrated = True


def head_calibration_features(model: keras.Model, train_data: ImageBatches,
                              distribution: Distribution | None = None) -> np.ndarray:
    """The backbone features the head's BatchNorm statistics start from: those of the first
    ``CALIBRATION_IMAGES`` training images.

    Under data-parallel, each process decoded only its own share of the images (every
    ``processes``-th from its index): each computes the features of its rows among them, and
    every process gets all processes' rows, so that the head starts alike everywhere.
    (Statistics that differed would stay different: the step updates them from the global
    batch, and restoring the best epoch's weights requires them equal in every process.)

    Args:
        model: a classifier from ``build_classifier``.
        train_data: the run's whole training batches (this process's decoded rows).
        distribution: the run's ``Distribution``; its rows are gathered when it is
            data-parallel over several processes; default None.

    Returns:
        float32 features, one row per image.
    """
    images = train_data.images[:CALIBRATION_IMAGES]
    if distribution is None or distribution.name != "data-parallel" or distribution.processes < 2:
        return backbone_features(model, images)
    count = len(images) // distribution.processes
    mine = images[distribution.process :: distribution.processes][:count]
    return gather_rows(backbone_features(model, mine))


def _resume_point(checkpointing: Checkpointing, index: int, begun: BegunStage) -> _Start:
    """The resume step: where stage ``index`` starts, restoring what the checkpoint saved of
    it (the weights of a part trained on cached features, the optimizer's state, early
    stopping's counters and best weights). Call it after compiling: the optimizer must exist."""
    state, work = checkpointing.state, checkpointing.work
    if index != state.stage_index:
        return _Start()
    if work is not None and state.part_only:
        # checkpoint.keras holds the model as the stage began; the part that trains on the
        # cache is saved per epoch (or once as the stage began) on its own.
        begun.model.set_weights(work.part_weights())
    if state.epochs_done == 0:
        return _Start()
    if work is not None:
        work.restore_optimizer(begun.model)
    best_weights = work.best_weights() if work is not None else None
    return _Start(state.epochs_done, EarlyStoppingState(state.best, state.wait, state.best_epoch, best_weights))


def _checkpoint_stage_start(run: StagesRun, index: int, begun: BegunStage) -> None:
    """Per-epoch checkpoints of a cached stage hold only the part that trains, so the whole
    model must be on disk once as such a stage starts (unless a checkpoint is there).

    It is written in the background while the part trains; the part's starting weights are
    saved with it, so the checkpoint is the stage's start all the same.
    """
    work = run.checkpointing.work
    if work is None or not begun.cached or work.has_checkpoint():
        return
    state = TrainingState(stage_index=index, epochs_done=0, global_epoch=run.global_epoch, calibrated=True,
                          history=run.rows, **run.decisions())
    work.save(run.model, state, part_weights=begun.model.get_weights(), whole_in_background=True)


def _log_stage(run: StagesRun, index: int, begun: BegunStage, start: _Start) -> None:
    if not run.options.verbose:
        return
    stage = run.stages[index]
    trainable = sum(int(np.prod(w.shape)) for w in begun.model.trainable_weights)
    # Counted among the stages that train (a stage of 0 epochs is skipped: --fine-epochs 0).
    training = [number for number, each in enumerate(run.stages) if each.epochs > 0 or number == index]
    log.info(
        f"stage {training.index(index) + 1}/{len(training)} '{stage.name}': unfreeze={stage.unfreeze}, "
        f"{stage.optimizer} lr={stage.learning_rate:g}"
        + (f" ({stage.schedule}" + (f", {stage.warmup_epochs:g} warmup epochs)" if stage.warmup_epochs else ")")
           if stage.schedule != "constant" or stage.warmup_epochs else "")
        + (f", weight decay {stage.weight_decay:g}" if stage.weight_decay else "")
        + f", up to {stage.epochs} epoch{'' if stage.epochs == 1 else 's'}"
        + (f" (resuming after epoch {start.initial_epoch})" if start.initial_epoch else "")
        + f", {trainable:,} trainable parameters"
        + (", on cached features" if begun.cached else "")
    )


def _fit(run: StagesRun, index: int, begun: BegunStage, start: _Start) -> None:
    """The fit step: ``fit`` with early stopping (restoring the best weights) and the
    per-epoch callback; validation computed eagerly on cached features."""
    stage = run.stages[index]
    if start.stopped(stage.patience):
        if start.stopping.best_weights is not None:
            begun.model.set_weights(start.stopping.best_weights)
        return
    stopper = ResumableEarlyStopping(
        resume_from=start.stopping, monitor="val_loss", patience=stage.patience, restore_best_weights=True,
    )
    epoch_callback = EpochCallback(
        classifier=run.model, rows=run.rows, stage_index=index, stage_name=stage.name,
        epoch_offset=run.global_epoch - start.initial_epoch, train_data=begun.train, seed=run.options.seed,
        stopper=stopper, stop=run.checkpointing.stop, work=run.checkpointing.work,
        decisions=run.decisions(),
    )
    validation = ([EagerValidation(begun.val, run.n_classes, make_loss(run.n_classes, run.options.loss))]
                  if begun.cached else [])
    # Last: it times each epoch with its validation and checkpoint.
    budget = [] if run.budget is None else [run.budget.callback(
        index, began=begun.began, caching_seconds=begun.caching_seconds, steps_per_epoch=len(begun.train),
        cached=begun.cached)]
    # Across replicas, the head's BatchNorm normalises over the global batch while fit runs
    # (its step is traced then); before and after, the model is a plain one that loads on any
    # backend. (A whole-model checkpoint written during fit holds the flag: it resumes on
    # TensorFlow, where the strategy is.)
    distribution = run.options.distribution
    synchronize_batchnorm(begun.model, distribution is not None and distribution.synchronizes_batchnorm)
    before = len(run.rows)
    try:
        begun.model.fit(
            keras_input(begun.train),
            validation_data=None if begun.cached else keras_input(begun.val),
            initial_epoch=start.initial_epoch,
            epochs=stage.epochs,
            shuffle=False,  # the batches shuffle themselves, seeded per epoch
            callbacks=[*validation, stopper, epoch_callback, *run.options.callbacks, *budget],
            verbose=fit_verbosity(run.options.verbose),
        )
    finally:
        synchronize_batchnorm(begun.model, False)
    _tell_restored_epoch(run, index, run.rows[before - start.initial_epoch:])  # (a resumed stage's earlier epochs too)


def _tell_restored_epoch(run: StagesRun, index: int, rows: list[dict]) -> None:
    """Where a stage ends on an earlier epoch than its last (early stopping restored its
    lowest validation loss) and a later stage starts from it, say which (history.png rings it)."""
    losses = [row.get("val_loss", math.nan) for row in rows]
    if not run.options.verbose or len(rows) < 2 or all(math.isnan(loss) for loss in losses):
        return
    best = int(np.nanargmin(losses))
    later = next((run.stages[number].name for number in range(index + 1, len(run.stages))
                  if run.stages[number].epochs > 0), None)
    if best < len(rows) - 1 and later is not None:
        log.info(f"stage '{run.stages[index].name}' ends on its epoch {best + 1} of {len(rows)} (epoch "
                 f"{rows[best]['epoch']}: its lowest val_loss, {losses[best]:.4f}); stage '{later}' starts from it")


def _checkpoint_between_stages(run: StagesRun, index: int) -> None:
    """Save the model as the next stage begins. After the last stage the run is saved at
    once; resuming from its last epoch checkpoint would only repeat the restore of the best
    weights, so nothing is written then."""
    work = run.checkpointing.work
    if work is None or not any(run.trains(later) for later in range(index + 1, len(run.stages))):
        return
    work.save(run.model, TrainingState(stage_index=index + 1, epochs_done=0, global_epoch=run.global_epoch,
                                       calibrated=True, history=run.rows, **run.decisions()))


def _feature_plan(run: StagesRun):
    """The run's ``FeaturePlan``, or None when the cache is off."""
    cache = run.options.cache
    if cache is None or not cache.enabled:
        return None
    if _data_parallel(run) is not None:
        if run.options.verbose:
            log.info("feature cache: off under data-parallel (each process runs the frozen part on its own share "
                     "of the images in every step)")
        return None
    # Features from a 16-bit network are stored in float16 (half the memory, no precision
    # lost that the network had); from a float32 network, in float32.
    mixed = compute_dtype(run.model) != "float32"
    return FeaturePlan(
        run.model, run.spec, run.stages, run.train_data, run.val_data, cache,
        run.options.forward_factory or default_forward, seed=run.options.seed,
        dtype="float16" if mixed else "float32", verbose=run.options.verbose, stop=run.checkpointing.stop,
        shared=run.options.feature_cache, context=run.options.forward_key, scope=run.scope,
        plan_views=run.budget.cache_views if run.budget is not None else None,
    )


def _data_parallel(run: StagesRun) -> Distribution | None:
    """The data-parallel ``Distribution`` the run trains under, or None."""
    distribution = run.options.distribution
    return distribution if distribution is not None and distribution.name == "data-parallel" else None
