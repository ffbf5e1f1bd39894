"""The whole job behind ``transferkit finetune``: folder in, run folder out.

recipe -> index the folder -> decode -> split -> backbone -> classifier -> stages -> save.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import DataError, RunError
from transferkit.recipe import Recipe, load_recipe

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
):
    """Fine-tune a pretrained backbone on a folder of class sub-folders and save the run.

    Ctrl-C or SIGTERM stops after the current batch, keeping the last completed epoch in
    ``RUN.partial/``; ``resume_finetune(RUN)`` continues it.

    Args:
        data_dir: one sub-folder of images per class.
        recipe: a ``Recipe``, a recipe file or shipped recipe name, or None for the defaults.
        overrides: dotted recipe keys to values, applied over the recipe (ignored when
            ``recipe`` is already a ``Recipe``).
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
    from transferkit import runs

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    if recipe.tensorboard:
        from transferkit.training.tensorboard import require_tensorboard

        require_tensorboard()
    output = runs.named_folder(output) if output is not None else runs.default_run_dir(data_dir)
    runs.check_writable(output, force, data_folders=(data_dir, val_dir))
    prepared = _prepare(data_dir, val_dir, recipe, verbose)
    return _train_into(prepared, recipe, output, force=force, save_h5=save_h5, verbose=verbose)


def prepare_data(
    data_dir: str | os.PathLike,
    recipe: Recipe | str | os.PathLike | None = None,
    *,
    val_dir: str | os.PathLike | None = None,
    verbose: int = 1,
) -> dict:
    """Index, decode and split the images once, for any number of trainings on them
    (``train_prepared``), as ``finetune`` does before it trains.

    What the result holds depends on the recipe's ``image_size``, ``seed`` and
    ``data.val_split`` only: recipes that agree on those can share it.

    Args:
        data_dir: one sub-folder of images per class.
        recipe: a ``Recipe``, a recipe file or shipped recipe name, or None for the defaults.
        val_dir: a validation folder; default None (a stratified ``data.val_split``).
        verbose: 0 silent, 1 a progress bar and the split's counts; default 1.

    Returns:
        The prepared data: a dict of the class names, the training and validation images
        (uint8) and labels, the skipped files and the data's fingerprint.

    Raises:
        DataError: the folder, its classes or its images cannot be used.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    return _prepare(data_dir, val_dir, recipe, verbose)


def train_prepared(
    prepared: dict,
    recipe: Recipe,
    output: str | os.PathLike | None = None,
    *,
    callbacks=(),
    calibrate: bool | None = None,
    feature_cache=None,
    force: bool = False,
    save_h5: bool = False,
    verbose: int = 1,
):
    """Train on data from ``prepare_data`` exactly as ``finetune`` would with the recipe
    (same seed, same split, same figures), into a run folder or only in memory.

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

    Returns:
        The ``Run`` with its model and metrics (``path`` None when nothing was written).

    Raises:
        TransferkitError: bad weights or output folder; ``TrainingInterrupted`` after a signal.
    """
    from transferkit import runs

    if output is None:
        return _train(prepared, recipe, None, None, force, save_h5, verbose, callbacks=callbacks, calibrate=calibrate,
                      feature_cache=feature_cache)
    output = runs.named_folder(output)
    runs.check_writable(output, force, data_folders=(prepared["data_dir"], prepared["val_dir"]))
    return _train_into(prepared, recipe, output, force=force, save_h5=save_h5, verbose=verbose, callbacks=callbacks,
                       calibrate=calibrate, feature_cache=feature_cache)


def _train_into(prepared: dict, recipe: Recipe, output: Path, *, force: bool, save_h5: bool, verbose: int,
                callbacks=(), calibrate: bool | None = None, feature_cache=None):
    """Train into the run folder ``output``, checkpointing into ``output.partial/``."""
    from transferkit.training.checkpoint import TrainingInterrupted, WorkFolder

    job = {
        "data_dir": prepared["data_dir"],
        "val_dir": prepared["val_dir"],
        "output": str(output.resolve()),
        "save_h5": save_h5,
        "force": force,
        "class_names": list(prepared["class_names"]),
        "data_fingerprint": prepared["fingerprint"],
    }
    work = WorkFolder.create(output, job, recipe.to_toml(), force)
    try:
        return _train(prepared, recipe, output, work, force, save_h5, verbose, callbacks=callbacks,
                      calibrate=calibrate, feature_cache=feature_cache)
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


def resume_finetune(run: str | os.PathLike, verbose: int = 1, *, data_dir: str | os.PathLike | None = None,
                    val_dir: str | os.PathLike | None = None, force: bool = False):
    """Continue an interrupted ``finetune`` from its last completed epoch.

    The recipe and options come from ``RUN.partial/``; with the same data the result
    matches an uninterrupted run with the same seed. The run is written to RUN, wherever
    the interrupted run was meant to go (a renamed or moved ``RUN.partial`` resumes where
    it is now).

    Args:
        run: the run folder that was being written (or its ``.partial`` folder).
        verbose: 0 silent, 1 progress bars; default 1.
        data_dir, val_dir: where the data is now, when it moved; default None (where it
            was). The images must be those the run started with.
        force: replace a finished run at RUN (as the interrupted run's own ``force``
            would); default False.

    Returns:
        The saved ``Run``.

    Raises:
        RunError: nothing to resume, or the checkpoint cannot be read.
        DataError: the data is missing or is not what the run started with.
    """
    from transferkit import runs
    from transferkit.training.checkpoint import WorkFolder, output_for

    work = WorkFolder.open(run)  # holds its owner lock until the run is written or fails
    try:
        job = work.job()
        recipe = load_recipe(work.path / "recipe.toml")
        output = output_for(work.path)
        force = force or bool(job.get("force"))
        for name, given, recorded in (("DATA_DIR", data_dir, job["data_dir"]),
                                      ("--val-dir", val_dir, job.get("val_dir"))):
            if given is None and recorded is not None and not Path(recorded).is_dir():
                new_place = "NEW_DATA_DIR" if name == "DATA_DIR" else "... --val-dir NEW_DIR"
                raise DataError(f"the data of the interrupted run, {recorded}, is gone; if it moved, give its new "
                                f"place: transferkit finetune {new_place} --resume {output}")
        data_dir = data_dir if data_dir is not None else job["data_dir"]
        val_dir = val_dir if val_dir is not None else job["val_dir"]
        runs.check_writable(output, force, data_folders=(data_dir, val_dir))
        if verbose:
            state = work.state()
            log.info(f"resuming {output}: {state.global_epoch} epoch(s) done, stage {state.stage_index + 1}")
        prepared = _prepare(data_dir, val_dir, recipe, verbose)
        _require_same_data(job, prepared, data_dir, output)
        return _train(prepared, recipe, output, work, force, bool(job["save_h5"]), verbose)
    finally:
        work.release()


def _require_same_data(job: dict, prepared: dict, data_dir, output: Path) -> None:
    """A resumed run must train on the images it started with (or its split, classes and
    epochs so far would not fit)."""
    if "class_names" in job and list(job["class_names"]) != list(prepared["class_names"]):
        raise DataError(
            f"{data_dir} has classes {', '.join(prepared['class_names'])} but the interrupted run of {output} "
            f"trained on {', '.join(job['class_names'])}; resume with the same data, or start over with --force"
        )
    if "data_fingerprint" in job and job["data_fingerprint"] != prepared["fingerprint"]:
        raise DataError(
            f"the images in {data_dir} changed since the interrupted run of {output} started (files added, "
            "removed or rewritten); restore them to resume, or start over with --force"
        )


def _prepare(data_dir, val_dir, recipe: Recipe, verbose: int) -> dict:
    """Index, decode and split the images; every data error is raised here, before training.

    Each folder is indexed once, and that index serves the data checks, the decoding and
    the split."""
    from transferkit.data.arrays import partition_rows, stratified_split
    from transferkit.data.folders import index_folders

    index, val_index = index_folders(data_dir, val_dir)
    class_names = index.class_names
    paths = list(index.paths) + (list(val_index.paths) if val_index is not None else [])
    decoded, readable, report = _read_images(index, val_index, paths, recipe, verbose)
    reasons = dict(report.unreadable)
    first = len(index.paths)
    kept, skipped = _kept_rows(index.paths, readable[:first], reasons)
    labels = index.labels[kept]
    skipped = list(index.skipped) + skipped
    _require_every_class(labels, class_names, data_dir)
    if val_index is None:
        train_rows, val_rows = stratified_split(labels, recipe.data.val_split, recipe.seed, class_names)
        train_rows, val_rows, train_labels, val_labels = (
            kept[train_rows], kept[val_rows], labels[train_rows], labels[val_rows])
    else:
        val_kept, val_skipped = _kept_rows(val_index.paths, readable[first:], reasons)
        train_rows, val_rows, train_labels, val_labels = kept, first + val_kept, labels, val_index.labels[val_kept]
        skipped += list(val_index.skipped) + val_skipped
        _require_every_class(val_labels, class_names, val_dir)
    # In place: no second copy of the decoded images.
    train_images, val_images = partition_rows(decoded, [train_rows, val_rows])
    if skipped:
        log.warning("skipped %d file(s) (unreadable or not images); the run lists them in skipped.txt", len(skipped))
    if report.problems:
        log.warning("for the details run: %s", _doctor_command(data_dir, val_dir, recipe))
    _tell_split(class_names, train_labels, val_labels, recipe, val_dir, verbose)
    return {
        "class_names": class_names, "skipped": skipped, "fingerprint": _data_fingerprint(data_dir, val_dir, paths),
        "data_dir": str(Path(data_dir).resolve()),
        "val_dir": str(Path(val_dir).resolve()) if val_dir is not None else None,
        "train_images": train_images, "train_labels": train_labels,
        "val_images": val_images, "val_labels": val_labels,
    }


def _read_images(index, val_index, paths: list, recipe: Recipe, verbose: int):
    """The one read of every file: the doctor's checks decode each image at the training
    size into one array (memory-mapped beyond ``data.memory_mb``), and training takes it
    from there.

    Returns:
        (decoded images, one row per path; which rows were readable; the ``DataReport``).
    """
    from transferkit.data import arrays

    rows: dict = {}
    for row, path in enumerate(paths):
        rows.setdefault(path, []).append(row)
    decoded = arrays.image_array(len(paths), recipe.image_size, recipe.data.memory_mb)
    readable = np.zeros(len(paths), dtype=bool)

    def keep(path, image):
        for row in rows.get(path, ()):  # a file added since the folder was indexed is not used
            decoded[row] = image
            readable[row] = True

    report = _check_data(index, val_index, recipe, keep, len(paths), verbose)
    return decoded, readable, report


def _tell_split(class_names, train_labels: np.ndarray, val_labels: np.ndarray, recipe: Recipe, val_dir,
                verbose: int) -> None:
    """Warn when training would get fewer images than validation (or a class fewer than 2),
    and say how many images of each class train."""
    counts = np.bincount(train_labels, minlength=len(class_names))
    if len(train_labels) < len(val_labels) or counts.min() < 2:
        fewest = class_names[int(np.argmin(counts))]
        split, fix = ((f"data.val_split {recipe.data.val_split:g}", "lower --val-split or add images")
                      if val_dir is None else (f"--val-dir {val_dir}", "add training images"))
        log.warning("only %d training image(s) (%s: %d) against %d for validation (%s); %s",
                    len(train_labels), fewest, counts.min(), len(val_labels), split, fix)
    if verbose:
        log.info(
            f"{len(class_names)} classes, {len(train_labels)} training and {len(val_labels)} validation "
            f"images at {recipe.image_size}px: "
            + ", ".join(f"{name} {count}" for name, count in zip(class_names, counts))
        )


@dataclass
class _Trained:
    """What a finished training hands to the evaluation and the run folder."""

    model: object
    policy: str  # the Keras dtype policy it trained in
    history: list
    metrics: dict | None = None
    tensorboard: Path | None = None  # the TensorBoard logs written while training


def _train(prepared: dict, recipe: Recipe, output: Path | None, work, force: bool, save_h5: bool, verbose: int,
           callbacks=(), calibrate: bool | None = None, feature_cache=None):
    """Build (or load from the checkpoint) the model, run the stages, evaluate, save the run
    (without ``work``, nothing is written: no checkpoints, no run folder)."""
    import keras

    from transferkit import runs
    from transferkit.outputs import output_activation

    # matplotlib is needed only at the end; importing it meanwhile costs the job nothing.
    threading.Thread(target=importlib.import_module, args=("matplotlib.figure",), daemon=True).start()
    keras.utils.set_random_seed(recipe.seed)
    n_classes = len(prepared["class_names"])
    model, policy = _build_or_load_model(recipe, n_classes, work, verbose)
    train_batches, val_batches = _batches(prepared, recipe)
    result = _run_training(model, recipe, train_batches, val_batches, n_classes, work, output, verbose, callbacks,
                           feature_cache)
    trained = _Trained(model, policy, result.history)
    if recipe.tensorboard and work is not None:
        trained.tensorboard = work.path / "tensorboard"
    trained.metrics = _evaluate(trained, result, val_batches, prepared)
    if recipe.calibrate if calibrate is None else calibrate:
        trained.metrics["calibration"] = _calibrate(model, prepared, recipe, verbose)
    if work is not None:
        _write_run(output, trained, recipe, prepared, work, force=force, save_h5=save_h5)
        work.remove()
    return runs.Run(
        path=output,
        class_names=prepared["class_names"],
        image_size=recipe.image_size,
        backbone=recipe.backbone,
        head_activation=output_activation(n_classes),
        recipe=recipe.model_dump(mode="json"),
        history=trained.history,
        metrics=trained.metrics,
        model=model,
    )


def _build_or_load_model(recipe: Recipe, n_classes: int, work, verbose: int):
    """The classifier from the checkpoint, or a new one in the recipe's precision.

    Returns:
        (the model, the Keras dtype policy of the run).
    """
    from transferkit import backbones
    from transferkit.model.classifier import build_classifier
    from transferkit.model.transfer import load_run_backbone, source_run
    from transferkit.runtime import dtype_policy, resolve_precision

    policy, reason = resolve_precision(recipe.precision)
    if verbose:
        log.info(f"precision: {policy} ({reason})")
    if work is not None and work.has_checkpoint():
        return work.load_model(), policy
    shape = (recipe.image_size,) * 2 + (3,)
    source = source_run(recipe.weights)
    with dtype_policy(policy):
        if source is not None:
            backbone = load_run_backbone(source, backbones.get_spec(recipe.backbone), shape)
            if verbose:
                log.info(f"backbone weights from the run {source.folder}")
        else:
            backbone = backbones.load_backbone(recipe.backbone, recipe.weights, shape)
        return build_classifier(backbone, n_classes, recipe.head, backbone_name=recipe.backbone), policy


def _batches(prepared: dict, recipe: Recipe):
    """(training batches, shuffled, augmented and class-weighted as the recipe says;
    validation batches)."""
    from transferkit.data.arrays import balanced_class_weights
    from transferkit.data.augment import augmentation_enabled, build_augmenter
    from transferkit.data.batches import ImageBatches
    from transferkit.outputs import encode_targets

    n_classes = len(prepared["class_names"])
    train_labels, val_labels = prepared["train_labels"], prepared["val_labels"]
    sample_weights = None
    if recipe.data.class_weights:
        sample_weights = balanced_class_weights(train_labels, n_classes)[train_labels].astype("float32")
    augment = recipe.augment
    train_batches = ImageBatches(
        prepared["train_images"],
        encode_targets(train_labels, n_classes),
        recipe.batch_size,
        shuffle=True,
        augmenter_factory=(lambda: build_augmenter(augment)) if augmentation_enabled(augment) else None,
        sample_weights=sample_weights,
        seed=recipe.seed,
    )
    val_batches = ImageBatches(prepared["val_images"], encode_targets(val_labels, n_classes), recipe.batch_size)
    return train_batches, val_batches


def _run_training(model, recipe: Recipe, train_batches, val_batches, n_classes: int, work, output: Path | None,
                  verbose: int, extra_callbacks=(), feature_cache=None):
    """Run the recipe's stages under the signal handlers (checkpointing into ``work``, when
    there is one); an interruption becomes one ``TrainingInterrupted`` that says what was kept.

    Returns:
        The ``StagesResult``.
    """
    from transferkit import backbones
    from transferkit.training import stages as training_stages
    from transferkit.training.checkpoint import KEEPS_LAST_EPOCH, StopFlag, TrainingInterrupted, stop_on_signals

    def forward_factory(extractor):
        from transferkit.inference.engines import inference_engine

        # The feature passes hand it uint8 images, augmented or not.
        engine = inference_engine(extractor, recipe.engine, precision=recipe.precision, input_dtype="uint8")
        if verbose:
            log.info(f"forward engine for the feature cache: {engine.name}")
        return engine.predict

    callbacks = ()
    if recipe.tensorboard and work is not None:
        from transferkit.training.tensorboard import TensorBoardLog

        # In the in-progress folder while training (a resumed run goes on in the same logs),
        # copied into the run folder with the rest.
        callbacks = (TensorBoardLog(work.path / "tensorboard", epochs_done=len(work.state().history)),)
    callbacks += tuple(extra_callbacks)
    options = training_stages.StageOptions(verbose=verbose, seed=recipe.seed, cache=recipe.cache, loss=recipe.loss,
                                           forward_factory=forward_factory, callbacks=callbacks,
                                           feature_cache=feature_cache, forward_key=(recipe.engine, recipe.precision))
    try:
        keeping = KEEPS_LAST_EPOCH if work is not None else "writing nothing"
        with stop_on_signals(StopFlag(), keeping) as stop:
            result = training_stages.run_stages(
                model, backbones.get_spec(recipe.backbone), recipe.stages, train_batches, val_batches,
                n_classes, options,
                training_stages.Checkpointing(state=work.state() if work is not None else None, work=work, stop=stop),
            )
        _close(callbacks)
        return result
    except (TrainingInterrupted, KeyboardInterrupt) as interrupted:
        _close(callbacks)
        # KeyboardInterrupt: a second Ctrl-C, which stops at once (the checkpoints on disk
        # are each complete, so the last one still holds).
        signal_name = str(interrupted).split(":")[0] if isinstance(interrupted, TrainingInterrupted) else "SIGINT again"
        if work is None:
            raise TrainingInterrupted(f"{signal_name}: training stopped; nothing was written") from None
        if not work.has_checkpoint() and not work.state().history:
            work.remove()
            raise TrainingInterrupted(
                f"{signal_name}: training stopped before its first epoch ended; nothing was kept"
            ) from None
        raise TrainingInterrupted(
            f"{signal_name}: training stopped; the last completed epoch is "
            f"saved in {work.path}. Continue with: transferkit finetune --resume {output}"
        ) from None


def _close(callbacks) -> None:
    for callback in callbacks:
        if hasattr(callback, "close"):
            callback.close()


def _evaluate(trained: _Trained, result, val_batches, prepared: dict) -> dict:
    """The run's metrics on the validation set (from the cache's final outputs when the
    last stage trained on cached features), with its precision and stage timings."""
    import keras

    from transferkit.evaluation import summary
    from transferkit.outputs import loss_for

    n_classes = len(prepared["class_names"])
    outputs = result.val_outputs
    if outputs is None:
        outputs = trained.model.predict(val_batches, verbose=0)
    val_loss = float(keras.ops.convert_to_numpy(
        keras.losses.get(loss_for(n_classes))(val_batches.targets, outputs)
    ).mean())
    metrics = summary.summarize(trained.history, prepared["val_labels"], outputs, prepared["class_names"], val_loss,
                               len(prepared["train_labels"]))
    metrics["precision"] = trained.policy
    metrics["stages"] = [asdict(timing) for timing in result.timings]
    return metrics


def _calibrate(model, prepared: dict, recipe: Recipe, verbose: int) -> dict:
    """Fit the softmax (or sigmoid) temperature on the validation split and fold it into the
    model's output layer, so the saved model gives calibrated confidences (same top class).

    Returns:
        metrics.json's "calibration": the temperature and the validation ECE and log loss
        before and after.
    """
    from transferkit.evaluation.calibration import calibrate

    calibration = calibrate(model, prepared["val_images"], prepared["val_labels"], len(prepared["class_names"]),
                            batch_size=recipe.batch_size)
    if verbose:
        log.info(f"calibrated confidences: temperature {calibration.temperature:.3g}, validation ECE "
                 f"{calibration.ece_before:.3f} -> {calibration.ece_after:.3f}")
    return calibration.as_dict()


def _write_run(output: Path, trained: _Trained, recipe: Recipe, prepared: dict, work, *, force: bool,
               save_h5: bool) -> None:
    """Write the finished run folder atomically; when that fails, keep the training for
    ``--resume`` and say so."""
    from transferkit import runs

    try:
        runs.save_run(output, lambda folder: _write_contents(folder, trained, recipe, prepared, save_h5), force=force)
    except RunError as error:
        if not work.has_checkpoint():
            raise
        work.flush()
        raise RunError(f"{error}; the training is kept in {work.path}: once the folder can be written, "
                       f"finish with: transferkit finetune --resume {output}") from error


def _write_contents(folder: Path, trained: _Trained, recipe: Recipe, prepared: dict, save_h5: bool) -> None:
    """The run folder's files: model, labels, recipe, history, metrics, figures, skipped files."""
    from concurrent.futures import ThreadPoolExecutor

    from transferkit import runs
    from transferkit.files import write_atomic
    from transferkit.model.transfer import source_run
    from transferkit.outputs import output_activation

    class_names, history, metrics = prepared["class_names"], trained.history, trained.metrics

    def draw_figures() -> None:
        from transferkit.evaluation import figures

        if history:
            figures.plot_history(history, folder / "history.png", metrics.get("saved"))
        figures.plot_confusion(np.asarray(metrics["confusion_matrix"]), class_names, folder / "confusion.png",
                               title="validation confusion matrix")

    # The figures are drawn while the model is written.
    with ThreadPoolExecutor(max_workers=1) as pool:
        figures = pool.submit(draw_figures)
        trained.model.save(folder / runs.MODEL_FILE)
        if save_h5:
            trained.model.save(folder / "model.h5")
        figures.result()
    extra = {"data_fingerprint": prepared["fingerprint"]}
    if prepared.get("data_dir") is not None:  # where the data was (exports sample their check images there)
        extra["data_dir"] = str(Path(prepared["data_dir"]).resolve())
        extra["val_dir"] = str(Path(prepared["val_dir"]).resolve()) if prepared.get("val_dir") else None
    source = source_run(recipe.weights)
    recipe_text = recipe.to_toml()
    if source is not None:
        extra["lineage"] = source.lineage()
        recipe_text = (f"# lineage: the backbone started from the run {extra['lineage']['source_run']}\n"
                       f"# (its data fingerprint {extra['lineage']['data_fingerprint']}; its recipe is that run's "
                       "recipe.toml, copied into labels.json 'lineage')\n") + recipe_text
    runs.write_labels(folder, class_names, recipe.image_size, recipe.backbone,
                      output_activation(len(class_names)), precision=trained.policy, extra=extra)
    write_atomic(folder / "recipe.toml", recipe_text)
    runs.write_history(folder, history)
    runs.write_json(folder / "metrics.json", metrics)
    if trained.tensorboard is not None:
        shutil.copytree(trained.tensorboard, folder / "tensorboard")
    if prepared["skipped"]:
        write_atomic(folder / "skipped.txt", "".join(f"{path}\t{reason}\n" for path, reason in prepared["skipped"]))


def _data_fingerprint(data_dir, val_dir, paths) -> str:
    """A digest of which image files the run reads (paths relative to their data folder,
    and sizes), to tell whether a resumed run sees the data it started with, wherever
    the folder is now."""
    import hashlib

    roots = [Path(folder).resolve() for folder in (data_dir, val_dir) if folder is not None]
    entries = []
    for path in (Path(p).resolve() for p in paths):
        index = next((i for i, root in enumerate(roots) if root in path.parents), len(roots))
        relative = path.relative_to(roots[index]) if index < len(roots) else path
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        entries.append(f"{index}\t{relative.as_posix()}\t{size}\n")
    return hashlib.sha256("".join(sorted(entries)).encode()).hexdigest()


def _kept_rows(paths, readable: np.ndarray, reasons: dict):
    """(indices of the readable paths, [(path, reason)] of the others, each warned about)."""
    skipped = []
    for path, ok in zip(paths, readable, strict=True):
        if not ok:
            reason = reasons.get(path, "cannot be read")
            log.warning("skipping %s: %s", path, reason)
            skipped.append((path, reason))
    return np.flatnonzero(readable), skipped


def _check_data(index, val_index, recipe: Recipe, keep, count: int, verbose: int):
    """Read every image once (each decoded image goes to ``keep(path, image)``) and warn,
    without stopping, about what ``transferkit doctor`` would report as problems.

    ``index`` and ``val_index`` are the folders' ``FolderIndex``es, so the doctor does not
    walk them again."""
    from transferkit.data.doctor import check_data
    from transferkit.progress import progress_bar

    progress = None
    if verbose and count:
        log.info(f"reading images ({count} files)")
        progress = progress_bar("image", count)
    report = check_data(
        index, image_size=recipe.image_size, val_split=recipe.data.val_split,
        seed=recipe.seed, val_dir=val_index, keep=keep, progress=progress,
    )
    for message in report.problems:
        if "unreadable file" not in message:  # those are warned about one by one below
            log.warning("%s", message)
    return report


def _doctor_command(data_dir, val_dir, recipe: Recipe) -> str:
    """The ``transferkit doctor`` command that checks what this run checked."""
    import shlex

    words = ["transferkit", "doctor", str(data_dir), "--image-size", str(recipe.image_size), "--seed", str(recipe.seed)]
    words += ["--val-dir", str(val_dir)] if val_dir is not None else ["--val-split", f"{recipe.data.val_split:g}"]
    return shlex.join(words)


def _require_every_class(labels: np.ndarray, class_names, folder) -> None:
    """Every class keeps at least one readable image (the folder check counted files; some
    may not have been readable)."""
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [name for name, count in zip(class_names, counts, strict=True) if count == 0]
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(empty)} in {folder} hold no readable image; "
            "add readable images or remove the folder"
        )
