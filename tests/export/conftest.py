"""Trained runs the export tests share and, per run, every format exported once and checked.

Both runs, the three-class (softmax) and the two-class (one sigmoid unit), are the classifier
finetune builds (``build_classifier``: resize + caffe preprocessing + backbone + head, the
layers a finetuned model.keras holds) on a small convolutional backbone trained here on the
run's own split, written as finetune writes a run folder. Every format converts the same
layers as for the tiny VGG16 (whose 59 MB of weights, at any image size, took the ONNX and
LiteRT converters most of a minute on a 2-core AVX2 CPU), so the many exports stay fast; no
export test is about the backbone."""

from __future__ import annotations

import pytest

import transferkit
from tests.conftest import TINY, shared


@pytest.fixture(scope="session")
def shapes_run(shapes_dir, tmp_path_factory):
    """A three-class run on ``shapes_dir`` (softmax output), with a small backbone (made once
    per session, whichever worker needs it first)."""
    folder = shared(tmp_path_factory, "export-shapes", lambda folder: small_backbone_run(shapes_dir, folder / "run"))
    return transferkit.load_run(folder / "run")


@pytest.fixture(scope="session")
def binary_run(binary_dir, tmp_path_factory):
    """A two-class run on ``binary_dir`` (one sigmoid unit), with a small backbone."""
    folder = shared(tmp_path_factory, "export-binary", lambda folder: small_backbone_run(binary_dir, folder / "run"))
    return transferkit.load_run(folder / "run")


def small_backbone_run(data_dir, folder):
    """A run folder whose classifier has a two-convolution backbone, trained on the
    training part of the split finetune would make (recipe defaults: val_split, seed)."""
    import keras
    import numpy as np

    from transferkit import runs
    from transferkit.data.arrays import stratified_split
    from transferkit.data.folders import index_folder
    from transferkit.data.images import load_image
    from transferkit.model.classifier import build_classifier
    from transferkit.outputs import encode_targets, loss_for, output_activation
    from transferkit.recipe import HeadConfig, load_recipe

    recipe = load_recipe(None, {**TINY, "precision": "float32"})
    size = recipe.image_size
    index = index_folder(data_dir)
    n_classes = len(index.class_names)
    train, val = stratified_split(index.labels, recipe.data.val_split, recipe.seed)
    images = np.stack([load_image(path, size) for path in index.paths]).astype("float32")  # RGB 0..255
    keras.utils.set_random_seed(0)
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    model = build_classifier(keras.Model(inputs, x, name="backbone"), n_classes, HeadConfig(units=(8,)), "vgg16")
    model.compile(keras.optimizers.Adam(3e-3), loss_for(n_classes), metrics=["accuracy"])
    targets = encode_targets(index.labels, n_classes)
    model.fit(images[train], targets[train], epochs=8, batch_size=8, verbose=0)
    _, val_accuracy = model.evaluate(images[val], targets[val], verbose=0)
    folder.mkdir(parents=True)
    model.save(folder / runs.MODEL_FILE)
    runs.write_labels(folder, index.class_names, size, "vgg16", output_activation(n_classes))
    (folder / "recipe.toml").write_text(recipe.to_toml(), encoding="utf-8")
    runs.write_json(folder / "metrics.json", {"n_train": len(train), "n_val": len(val),
                                               "final": {"val_accuracy": float(val_accuracy)}})
    return runs.load_run(folder)


@pytest.fixture(scope="session")
def shapes_exports(shapes_run, shapes_dir, tmp_path_factory):
    """Every format of the three-class run, checked against its validation split."""
    folder = tmp_path_factory.mktemp("shapes-exports")
    return {result.format: result for result in transferkit.export_run(shapes_run, "all", folder, data=shapes_dir)}


@pytest.fixture(scope="session")
def binary_exports(binary_run, tmp_path_factory):
    """Every format of the two-class run, checked on generated images (no data folder)."""
    folder = tmp_path_factory.mktemp("binary-exports")
    return {result.format: result for result in transferkit.export_run(binary_run, "all", folder)}
