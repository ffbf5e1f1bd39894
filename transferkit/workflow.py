"""The jobs a user names, composed from the rooms below, and the run folder they write.

    finetune: recipe -> data.prepare (index, decode, check, split) -> model.build ->
              training.stages (under the signal handlers, checkpointing into RUN.partial)
              -> validation metrics -> calibration -> TTA choice, trust -> the run folder
              (runs.save_run, the model card last), each step logged to MLflow when asked
    resume_finetune: the same from RUN.partial's recipe, job and checkpoint
    train_prepared: the same on data prepared once (tune's trials), with or without a folder
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import keras

from transferkit import runs
from transferkit.backbones import get_spec, plugin_source
from transferkit.data.prepare import PreparedData, prepare_data
from transferkit.errors import RecipeError, RunError, TrainingInterrupted
from transferkit.evaluation import summary, tta
from transferkit.evaluation.calibration import calibrate as fit_calibration
from transferkit.files import fault_point, named_folder
from transferkit.model.build import build_model, log_setup
from transferkit.recipe import Recipe, load_recipe
from transferkit.run_folder import TrainedRun, write_run_contents
from transferkit.runtime import resolve_precision
from transferkit.strategies import Distribution, resolve_distribution
from transferkit.training.checkpoint import (
    KEEPS_LAST_EPOCH,
    StopFlag,
    WorkFolder,
    interruption,
    output_for,
    remove_if_finished,
    stop_if_requested,
    stop_on_signals,
)
from transferkit.training.data_parallel import (
    failing_before_training,
    follow,
    follow_resumed,
    leave_distribution,
    meet,
    read_resumed,
    training_together,
)
from transferkit.training.features import FeatureCache, engine_forward
from transferkit.training.flips import as_trained, auto_flips
from transferkit.training.stages import Checkpointing, StageOptions, StagesResult, ValidationReadout, run_stages
from transferkit.training.tensorboard import TensorBoardLog, require_tensorboard
from transferkit.training.tracking import Tracker, log_finished_run, public_uri, require_mlflow, tracked_training
from transferkit.trust.record import after_training_forward, after_training_passes, fit_trust

log = logging.getLogger("transferkit")


def finetune(
    data_dir: str | os.PathLike,
    recipe: Recipe | str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    val_dir: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    force: bool = False,
    save_h5: bool = False,
    verbose: int = 1,
) -> runs.Run:
    """Fine-tune a pretrained backbone on a folder of class sub-folders and save the run.

    Ctrl-C or SIGTERM stops after the current batch, keeping the last completed epoch in
    ``RUN.partial/``; ``resume_finetune(RUN)`` continues it.

    Args:
        data_dir: one sub-folder of images per class.
        recipe: a ``Recipe``, a recipe file or shipped recipe name, or None for the defaults.
        overrides: dotted recipe keys to values, applied over the recipe (a ``Recipe`` too).
        val_dir: a validation folder with the same class sub-folders; default None (a
            stratified ``data.val_split`` of ``data_dir``).
        output: the run folder; default ``runs/<data-folder-name>-<timestamp>``.
        force: replace an existing run folder (and an interrupted one); default False.
        save_h5: also write model.h5 in the legacy HDF5 format; default False.
        verbose: 0 silent, 1 progress bars and stage lines; default 1.

    Returns:
        The saved ``Run`` (with its model).

    Raises:
        TransferkitError: a bad recipe, folder, image set, weights or output folder;
            ``TrainingInterrupted`` after a signal.
    """
    recipe = load_recipe(recipe, overrides)
    recipe.require_training()
    # Before TensorFlow starts (it may set its devices), and before JAX computes (data-parallel).
    distribution = resolve_distribution(recipe.strategy, recipe.devices)
    with failing_before_training(distribution):
        if recipe.tensorboard:
            require_tensorboard()
        require_mlflow(recipe.mlflow)
        if output is None and distribution.processes > 1:
            raise RunError("--strategy data-parallel: give -o RUN, the same run folder in every process")
        output = named_folder(output) if output is not None else runs.default_run_dir(data_dir)
        if distribution.process > 0:  # process 0 checks and writes the run
            return follow(data_dir, val_dir, recipe, output, None, _train_beside)
        runs.require_run_name(output)
        remove_if_finished(output)
        runs.check_writable(output, force, data_folders=(data_dir, val_dir), new_run=True)
        prepared = prepare_data(data_dir, recipe, val_dir=val_dir, verbose=verbose)
        return _train_into(prepared, recipe, output, force=force, save_h5=save_h5, verbose=verbose)


def train_prepared(prepared: PreparedData, recipe: Recipe, output: str | os.PathLike | None = None, *,
                   callbacks: Sequence[keras.callbacks.Callback] = (), calibrate: bool | None = None,
                   feature_cache: FeatureCache | None = None, force: bool = False, save_h5: bool = False,
                   verbose: int = 1, after_a_stop: str | None = None) -> runs.Run:
    """Train on data from ``data.prepare.prepare_data`` exactly as ``finetune`` would with the
    recipe (same seed, same split, same figures), into a run folder or only in memory.

    Args:
        prepared: from ``prepare_data`` with a recipe of the same image size, seed and
            validation split.
        recipe: the resolved ``Recipe``.
        output: the run folder to write (with ``RUN.partial/`` checkpoints while it trains);
            default None (nothing is written: no checkpoints, no TensorBoard logs).
        callbacks: extra Keras callbacks for every stage, told of one epoch count across
            stages only through their own counting (each stage is one ``fit``); default none.
        calibrate: fit the confidence temperature; default None (the recipe's ``calibrate``).
        feature_cache: a ``training.features.FeatureCache`` shared by several trainings on
            the same ``prepared`` data: a training whose frozen part computes what an earlier
            one's did takes the cached features from it (values equal up to float rounding
            from another batch grouping); default None (each training computes its own).
        force: replace an existing run folder; default False.
        save_h5: also write model.h5; default False.
        verbose: 0 silent, 1 progress bars and stage lines; default 1.
        after_a_stop: what a first Ctrl-C's warning says follows (a tune trial's); default: what is kept.

    Returns:
        The ``Run`` with its model and metrics (``path`` None when nothing was written).

    Raises:
        TransferkitError: bad weights or output folder; ``TrainingInterrupted`` after a signal.
    """
    extras = _Extras(tuple(callbacks), calibrate, feature_cache, after_a_stop=after_a_stop)
    resolve_distribution(recipe.strategy, recipe.devices)
    if output is None:
        return _train(prepared, recipe, None, verbose, extras)
    require_mlflow(recipe.mlflow)
    output = named_folder(output)
    runs.require_run_name(output)
    remove_if_finished(output)
    runs.check_writable(output, force, data_folders=(prepared.data_dir, prepared.val_dir), new_run=True)
    return _train_into(prepared, recipe, output, force=force, save_h5=save_h5, verbose=verbose, extras=extras)


def resume_finetune(run: str | os.PathLike, verbose: int = 1, *, data_dir: str | os.PathLike | None = None,
                    val_dir: str | os.PathLike | None = None, force: bool = False,
                    overrides: Mapping[str, Any] | None = None) -> runs.Run:
    """Continue an interrupted ``finetune`` from its last completed epoch.

    The recipe and options come from ``RUN.partial/``; with the same data the result
    matches an uninterrupted run with the same seed. The run is written to RUN, wherever
    the interrupted run was meant to go (a renamed or moved ``RUN.partial`` resumes where
    it is now). A run whose process was killed after it published RUN, before it removed
    ``RUN.partial``, is finished: that folder is removed, with a warning, and RUN returned.

    Args:
        run: the run folder that was being written (or its ``.partial`` folder).
        verbose: 0 silent, 1 progress bars; default 1.
        data_dir, val_dir: where the data is now, when it moved; default None (where it
            was). The images must be those the run started with.
        force: replace a finished run at RUN (as the interrupted run's own ``force``
            would); default False.
        overrides: recipe keys to change for the rest of the run, only ``strategy`` and
            ``devices`` (the devices it goes on with; None values are ignored); default None.

    Returns:
        The saved ``Run``.

    Raises:
        RunError: nothing to resume, or the checkpoint cannot be read.
        DataError: the data is missing or is not what the run started with.
        RecipeError: an override of another key than strategy and devices.
    """
    changed = {key: value for key, value in (overrides or {}).items() if value is not None}
    if set(changed) - {"strategy", "devices"}:
        raise RecipeError(f"a resumed run keeps its own settings but strategy and devices; drop "
                          f"{', '.join(sorted(set(changed) - {'strategy', 'devices'}))}")
    reader, recipe, distribution = read_resumed(run, changed)  # before the lock, which only process 0 takes
    if distribution is not None and distribution.process > 0:
        return follow_resumed(reader, recipe, data_dir, val_dir, distribution, _train_beside)
    with failing_before_training(distribution):
        finished = remove_if_finished(run)
        if finished is not None:
            return runs.load_run(finished)
        work = WorkFolder.open(run)  # holds its owner lock until the run is written or fails
        try:
            job = work.job()
            work.require_backbone(job)  # a plugin's, uninstalled since: its package is named
            recipe = load_recipe(work.path / "recipe.toml", changed)
            resolve_distribution(recipe.strategy, recipe.devices)  # before TensorFlow starts
            output = output_for(work.path)
            force = force or bool(job.get("force"))
            data_dir, val_dir = work.data_folders(data_dir, val_dir)
            runs.check_writable(output, force, data_folders=(data_dir, val_dir))
            if verbose:
                state = work.state()
                log.info(f"resuming {output}: {state.global_epoch} epoch(s) done, stage {state.stage_index + 1}")
            prepared = prepare_data(data_dir, recipe, val_dir=val_dir, verbose=verbose)
            prepared.require_same(job.get("class_names"), job.get("data_fingerprint"),
                                  f"the interrupted run of {output}")
            return _train(prepared, recipe, _Output(output, work, force, bool(job["save_h5"])), verbose)
        finally:
            work.release()


# --- the steps of a job -------------------------------------------------------------------


def _train_beside(model, recipe: Recipe, train_batches, val_batches, n_classes, output, reader, distribution):
    """A data-parallel process other than 0 trains as process 0 does (checkpointing nothing)."""
    _run_training(model, recipe, train_batches, val_batches, n_classes, _Output(output, reader, False, False), 0,
                  _Extras(), distribution)


@dataclass(frozen=True)
class _Output:
    """Where a training writes: the run folder, its in-progress folder, and how."""

    path: Path
    work: WorkFolder
    force: bool
    save_h5: bool


@dataclass(frozen=True)
class _Extras:
    """What a caller of ``train_prepared`` adds to the recipe's training."""

    callbacks: tuple = ()
    calibrate: bool | None = None
    feature_cache: FeatureCache | None = None
    after_passes: int | None = None  # the image passes after training, for a time budget
    after_a_stop: str | None = None  # what the first signal's warning says follows (default: what is kept)


def _train_into(prepared: PreparedData, recipe: Recipe, output: Path, *, force: bool, save_h5: bool, verbose: int,
                extras: _Extras = _Extras()) -> runs.Run:
    """Train into the run folder ``output``, checkpointing into ``output.partial/``."""
    # run_id is also in the run's labels.json: a published run tells its RUN.partial apart.
    job = {"run_id": uuid.uuid4().hex, "data_dir": prepared.data_dir, "val_dir": prepared.val_dir,
           "output": str(output.resolve()), "force": force,
           "save_h5": save_h5 and get_spec(recipe.backbone).require_format("h5", "the run's model.keras"),
           "class_names": list(prepared.class_names), "data_fingerprint": prepared.fingerprint,
           "backbone": recipe.backbone, "backbone_package": plugin_source(recipe.backbone)}
    work = WorkFolder.create(output, job, recipe.to_toml(), force)
    try:
        return _train(prepared, recipe, _Output(output, work, force, save_h5), verbose, extras)
    except TrainingInterrupted:
        raise
    except BaseException:
        # Nothing to resume before the first checkpoint (weights that cannot be loaded,
        # say): leave no in-progress folder that a new run would have to step around.
        if not work.has_checkpoint():
            work.remove()
        raise
    finally:
        work.release()  # the owner lock (a finished run's went with its folder)


def _train(prepared: PreparedData, recipe: Recipe, out: _Output | None, verbose: int,
           extras: _Extras = _Extras()) -> runs.Run:
    """Build (or load from the checkpoint) the model, run the stages, evaluate, calibrate,
    save the run (without ``out``, nothing is written: no checkpoints, no run folder, no
    MLflow run), tracked in MLflow when the recipe or the environment asks."""
    meet(resolve_distribution(recipe.strategy, recipe.devices), out.work.job().get("run_id") if out else None,
         prepared.split_csv, out.work.path if out else None)  # the others decode their share of this split
    if out is None:
        return _train_tracked(prepared, recipe, out, verbose, extras, None)
    try:
        with tracked_training(recipe, prepared, out.path, out.work) as tracker:
            return _train_tracked(prepared, recipe, out, verbose, extras, tracker)
    except KeyboardInterrupt:  # outside training's handlers (after it): what it kept is told
        raise interruption(TrainingInterrupted("interrupted"), out.work, out.path) from None


def _train_tracked(prepared: PreparedData, recipe: Recipe, out: _Output | None, verbose: int, extras: _Extras,
                   tracker: Tracker | None) -> runs.Run:
    # matplotlib is needed only at the end (the figures); imported meanwhile, it costs the job nothing.
    threading.Thread(target=importlib.import_module, args=("matplotlib.figure",), daemon=True).start()
    keras.utils.set_random_seed(recipe.seed)
    work = out.work if out is not None else None
    if work is not None and work.has_checkpoint():
        distribution = resolve_distribution(recipe.strategy, recipe.devices)
        policy, reason = resolve_precision(recipe.precision)
        if verbose:
            log_setup(policy, reason, distribution)
        with distribution.scope():  # its variables on every replica's device
            model = work.load_model()
    else:
        built = build_model(recipe, prepared.n_classes, verbose=verbose)
        model, policy, distribution = built.model, built.policy, built.distribution
    train_batches, val_batches = prepared.batches(recipe)
    extras = replace(extras, after_passes=after_training_passes(prepared, recipe, with_trust=out is not None))
    tensorboard = work.path / "tensorboard" if recipe.tensorboard and work is not None else None
    if tracker is not None:
        epochs_done = len(work.state().history) if work is not None else 0
        extras = replace(extras, callbacks=(*extras.callbacks, tracker.epoch_logger(epochs_done)))
    result = _run_training(model, recipe, train_batches, val_batches, prepared.n_classes, out, verbose, extras,
                           distribution)
    model = leave_distribution(model, distribution)  # data-parallel: process 0 finishes the run alone
    trained = TrainedRun(model, policy, distribution, result.history, tensorboard=tensorboard)
    if tracker is not None:
        trained.tracking = {"tracking_uri": public_uri(tracker.uri), "experiment_id": tracker.experiment_id,
                            "run_id": tracker.run_id}
    readout = result.validation or ValidationReadout.of_model(model, val_batches)  # one pass at most
    trained.metrics = summary.validation_metrics(model, val_batches, readout.outputs, trained.history,
                                                 prepared.val_labels, prepared.class_names, len(prepared.train_labels))
    trained.metrics["precision"] = policy
    trained.metrics["class_counts"] = summary.class_counts(prepared.train_labels, prepared.val_labels,
                                                           prepared.class_names)
    trained.metrics.update(strategy=distribution.as_dict(), **result.records())
    if recipe.calibrate if extras.calibrate is None else extras.calibrate:
        calibration = fit_calibration(model, prepared.val_images, prepared.val_labels, prepared.n_classes,
                                      batch_size=recipe.batch_size, dense_inputs=readout.dense_inputs)
        if verbose:
            log.info(f"calibrated confidences: temperature {calibration.temperature:.3g}, validation ECE "
                     f"{calibration.ece_before:.3f} -> {calibration.ece_after:.3f}")
        trained.metrics["calibration"] = calibration.as_dict()
    if out is not None:  # what predict --tta, --reject and --sets need, fitted after calibration on one engine
        forward = after_training_forward(model, prepared, recipe, out.path, readout, result.int8_frozen,
                                         result.reference)
        trained.metrics["tta"] = tta.fit_tta(model, prepared, as_trained(recipe, result.hflip), verbose, forward)
        trained.trust = fit_trust(model, prepared, recipe, verbose, forward)
        _write_run(out, trained, recipe, prepared)
        fault_point("run.published")
        out.work.remove()
        if tracker is not None:
            log_finished_run(tracker, out.path, model, trained.metrics)
    return trained.as_run(out.path if out is not None else None, recipe, prepared)


def _run_training(model: keras.Model, recipe: Recipe, train_batches, val_batches, n_classes: int,
                  out: _Output | None, verbose: int, extras: _Extras, distribution: Distribution) -> StagesResult:
    """Run the recipe's stages under the signal handlers (checkpointing into the work folder,
    when there is one); an interruption becomes one ``TrainingInterrupted`` that says what
    was kept."""
    work = out.work if out is not None else None
    callbacks = ()
    if recipe.tensorboard and work is not None and not work.reader:
        # In the in-progress folder while training (a resumed run goes on in the same logs),
        # copied into the run folder with the rest.
        callbacks = (TensorBoardLog(work.path / "tensorboard", epochs_done=len(work.state().history)),)
    callbacks += extras.callbacks
    options = StageOptions(verbose=verbose, seed=recipe.seed, cache=recipe.cache, loss=recipe.loss,
                           forward_factory=engine_forward(recipe.engine, recipe.precision, verbose),
                           callbacks=callbacks,
                           feature_cache=extras.feature_cache, forward_key=(recipe.engine, recipe.precision),
                           distribution=distribution, time_budget=recipe.time_budget_seconds,
                           after_training_passes=extras.after_passes, auto_flips=auto_flips(recipe.augment))
    try:
        keeping = extras.after_a_stop or (KEEPS_LAST_EPOCH if work is not None else "writing nothing")
        with (training_together(distribution, out.path if out is not None else None) if distribution.processes > 1
              else stop_on_signals(StopFlag(), keeping)) as stop:
            state = work.state() if work is not None else None
            result = run_stages(model, get_spec(recipe.backbone), recipe.stages, train_batches, val_batches,
                                n_classes, options, Checkpointing(state=state, work=work, stop=stop))
            stop_if_requested(stop, work)  # asked after the last epoch's check: every epoch kept, not published
            return result
    except (TrainingInterrupted, KeyboardInterrupt) as interrupted:
        raise interruption(interrupted, work, out.path if out is not None else None) from None
    finally:
        for callback in callbacks:
            if hasattr(callback, "close"):
                callback.close()


def _write_run(out: _Output, trained: TrainedRun, recipe: Recipe, prepared: PreparedData) -> None:
    """Write the finished run folder atomically; when that fails, keep the training for
    ``--resume`` and say so."""
    try:
        run_id = out.work.job().get("run_id")
        runs.save_run(out.path, lambda folder: write_run_contents(
            folder, trained, recipe, prepared, save_h5=out.save_h5, run_id=run_id, name=out.path.name), force=out.force)
    except RunError as error:
        if not out.work.has_checkpoint():
            raise
        out.work.flush()
        raise RunError(f"{error}; the training is kept in {out.work.path}: once the folder can be written, "
                       f"finish with: transferkit finetune --resume {out.path}") from error
