"""The whole job behind ``transferkit finetune``: folder in, run folder out.

recipe -> index the folder -> decode -> split -> backbone -> classifier -> stages -> save.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from transferkit.errors import DataError
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

    Args:
        data_dir: one sub-folder of images per class.
        recipe: a ``Recipe``, a recipe file or shipped recipe name, or None for the defaults.
        overrides: dotted recipe keys to values, applied over the recipe (ignored when
            ``recipe`` is already a ``Recipe``).
        val_dir: a validation folder with the same class sub-folders; default None (a
            stratified ``data.val_split`` of ``data_dir``).
        output: the run folder; default ``runs/<data-folder-name>-<timestamp>``.
        force: replace an existing run folder; default False.
        save_h5: also write model.h5 in the legacy HDF5 format; default False.
        verbose: 0 silent, 1 progress bars and stage lines; default 1.

    Returns:
        The saved ``Run`` (with its model).

    Raises:
        TransferkitError: a bad recipe, folder, image set, weights or output folder.
    """
    import keras

    from transferkit import backbones, data, report, runs, training
    from transferkit.augment import build_augmenter
    from transferkit.model import build_classifier, output_activation

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    output = Path(output) if output is not None else runs.default_run_dir(data_dir)
    runs.check_writable(output, force)

    index = data.index_folder(data_dir)
    class_names = index.class_names
    n_classes = len(class_names)
    val_index = None
    if val_dir is not None:
        val_index = data.index_folder(val_dir)
        if val_index.class_names != class_names:
            raise DataError(
                f"--val-dir {val_dir} has classes {', '.join(val_index.class_names)} but "
                f"{data_dir} has {', '.join(class_names)}; both need the same class sub-folders"
            )

    size = recipe.image_size
    images, kept, skipped = _decode(index.paths, size, verbose, "reading training images")
    labels = index.labels[kept]
    skipped = list(index.skipped) + skipped
    _require_every_class(labels, class_names, data_dir)
    if val_index is None:
        train_rows, val_rows = data.stratified_split(labels, recipe.data.val_split, recipe.seed)
        train_images, train_labels = images[train_rows], labels[train_rows]
        val_images, val_labels = images[val_rows], labels[val_rows]
        del images
    else:
        train_images, train_labels = images, labels
        val_images, val_kept, val_skipped = _decode(val_index.paths, size, verbose, "reading validation images")
        val_labels = val_index.labels[val_kept]
        skipped += list(val_index.skipped) + val_skipped
        _require_every_class(val_labels, class_names, val_dir)
    if skipped:
        log.warning("skipped %d file(s) that are not readable images; the run lists them in skipped.txt", len(skipped))
    if verbose:
        counts = np.bincount(train_labels, minlength=n_classes)
        print(
            f"{n_classes} classes, {len(train_labels)} training and {len(val_labels)} validation "
            f"images at {size}px: " + ", ".join(f"{name} {count}" for name, count in zip(class_names, counts)),
            flush=True,
        )

    keras.utils.set_random_seed(recipe.seed)
    spec = backbones.get_spec(recipe.backbone)
    backbone = backbones.load_backbone(recipe.backbone, recipe.weights, (size, size, 3))
    model = build_classifier(backbone, n_classes, recipe.head, backbone_name=recipe.backbone)

    sample_weights = None
    if recipe.data.class_weights:
        sample_weights = data.balanced_class_weights(train_labels, n_classes)[train_labels].astype("float32")
    augment = recipe.augment
    train_batches = data.ImageBatches(
        train_images,
        data.encode_targets(train_labels, n_classes),
        recipe.batch_size,
        shuffle=True,
        augmenter_factory=(lambda: build_augmenter(augment)) if build_augmenter(augment) else None,
        sample_weights=sample_weights,
        seed=recipe.seed,
    )
    val_batches = data.ImageBatches(
        val_images, data.encode_targets(val_labels, n_classes), recipe.batch_size
    )
    history = training.run_stages(
        model, spec, recipe.stages, train_batches, val_batches, n_classes, verbose=verbose
    )

    outputs = model.predict(val_batches, verbose=0)
    val_loss = float(keras.ops.convert_to_numpy(
        keras.losses.get(training.loss_for(n_classes))(data.encode_targets(val_labels, n_classes), outputs)
    ).mean())
    metrics = report.summarize(history, val_labels, outputs, class_names, val_loss, len(train_labels))

    def write_contents(folder: Path) -> None:
        model.save(folder / runs.MODEL_FILE)
        if save_h5:
            model.save(folder / "model.h5")
        runs.write_labels(folder, class_names, size, recipe.backbone, output_activation(n_classes))
        (folder / "recipe.toml").write_text(recipe.to_toml(), encoding="utf-8")
        runs.write_history(folder, history)
        runs.write_json(folder / "metrics.json", metrics)
        if history:
            report.plot_history(history, folder / "history.png")
        report.plot_confusion(np.asarray(metrics["confusion_matrix"]), class_names, folder / "confusion_matrix.png")
        if skipped:
            (folder / "skipped.txt").write_text(
                "".join(f"{path}\t{reason}\n" for path, reason in skipped), encoding="utf-8"
            )

    runs.save_run(output, write_contents, force=force)
    return runs.Run(
        path=output,
        class_names=class_names,
        image_size=size,
        backbone=recipe.backbone,
        head_activation=output_activation(n_classes),
        recipe=recipe.model_dump(mode="json"),
        history=history,
        metrics=metrics,
        model=model,
    )


def _decode(paths, size: int, verbose: int, title: str):
    from transferkit import data

    progress = None
    if verbose and paths:
        import keras

        print(f"{title} ({len(paths)} files)", flush=True)
        bar = keras.utils.Progbar(len(paths), unit_name="image")
        progress = bar.update
    return data.decode_images(paths, size, progress=progress)


def _require_every_class(labels: np.ndarray, class_names, folder) -> None:
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [name for name, count in zip(class_names, counts) if count == 0]
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(empty)} in {folder} hold no readable image; "
            "add readable images or remove the folder"
        )
