"""Frozen-part feature cache: compute the frozen layers' output once, train the rest on it.

While a stage keeps the bottom of the network frozen, the frozen part's output does not
depend on what is being trained, so it is computed once per image (and per augmented view)
and the trainable top (unfrozen blocks + head) trains on the stored features. With
augmentation on, ``views`` augmented versions of each image are stored and epoch ``e``
uses view ``e mod views``; every epoch after the views are computed costs only the top.

Features live in memory up to a budget and in a memory-mapped file beyond it.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from transferkit.backbones import BackboneSpec
from transferkit.data import SeededBatches


@dataclass
class SplitModel:
    """A classifier cut at the boundary of its frozen part.

    Attributes:
        extractor: images -> boundary features (preprocessing + frozen backbone layers).
        trainable: boundary features -> class outputs (unfrozen blocks + head), sharing its
            layers (and so its weights) with the classifier.
        boundary: name of the backbone layer whose output is the boundary, or "" for the
            backbone's output.
    """

    extractor: object
    trainable: object
    boundary: str


def split_at_frozen_part(model, spec: BackboneSpec, unfreeze: int | str) -> SplitModel | None:
    """Cut a classifier where its frozen part ends; None when nothing in it is frozen.

    Args:
        model: a classifier from ``build_classifier``.
        spec: the backbone's registry entry.
        unfreeze: the stage's depth: 0, N or "all".

    Returns:
        A ``SplitModel``, or None for ``unfreeze="all"`` (or N = every block).
    """
    backbone = model.get_layer("backbone")
    first_open = spec.first_unfrozen(unfreeze)
    if first_open <= 0:
        return None
    image_size = int(backbone.input_shape[1])
    images = keras.Input(shape=(image_size, image_size, 3), name="image")
    preprocessed = model.get_layer("preprocessing")(images)
    if first_open == len(spec.blocks):
        extractor = keras.Model(images, backbone(preprocessed), name="extractor")
        return SplitModel(extractor, model.get_layer("head"), "")
    layers = backbone.layers
    start = next(i for i, layer in enumerate(layers) if spec.block_of(layer.name) == first_open)
    boundary = layers[start - 1]
    frozen = keras.Model(backbone.input, boundary.output, name="frozen_part")
    extractor = keras.Model(images, frozen(preprocessed), name="extractor")
    top = keras.Model(boundary.output, backbone.output, name="open_part")
    features = keras.Input(shape=tuple(boundary.output.shape[1:]), name="features")
    trainable = keras.Model(features, model.get_layer("head")(top(features)), name="trainable_part")
    return SplitModel(extractor, trainable, boundary.name)


class FeatureStore:
    """(views, n, *shape) features in memory up to a budget, else in a memory-mapped file."""

    def __init__(self, views: int, count: int, shape: tuple[int, ...], dtype: str, memory_budget_mb: float,
                 spill_dir: str | os.PathLike | None = None):
        self.shape = (views, count, *shape)
        nbytes = math.prod(self.shape) * np.dtype(dtype).itemsize
        self.on_disk = nbytes > memory_budget_mb * 2**20
        self._file = None
        if self.on_disk:
            self._file = tempfile.NamedTemporaryFile(prefix="transferkit-features-", suffix=".npy",
                                                     dir=spill_dir, delete=False)
            self._file.close()
            self.array = np.lib.format.open_memmap(self._file.name, mode="w+", dtype=dtype, shape=self.shape)
        else:
            self.array = np.empty(self.shape, dtype=dtype)
        self.nbytes = nbytes

    def close(self) -> None:
        """Release the memory map and delete its file."""
        if self._file is not None:
            del self.array
            Path(self._file.name).unlink(missing_ok=True)
            self._file = None

    def __del__(self):  # pragma: no cover - best effort clean-up
        try:
            self.close()
        except Exception:
            pass


def compute_features(
    forward: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    feature_shape: tuple[int, ...],
    *,
    views: int = 1,
    augmenter_factory: Callable[[], object] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    dtype: str = "float32",
    memory_budget_mb: float = 2048,
    spill_dir: str | os.PathLike | None = None,
    progress: Callable[[int], None] | None = None,
) -> FeatureStore:
    """Run the frozen part once per image and view.

    Args:
        forward: batch of float32 images -> features (a Keras model call or an engine).
        images: uint8 (n, S, S, 3).
        feature_shape: shape of one image's features.
        views: stored versions per image; with an augmenter each is augmented (seeded by
            seed, view and image), without one a single unaugmented view is stored.
        augmenter_factory: builds the albumentations pipeline; None for no augmentation.
        seed: augmentation seed; default 0.
        batch_size: images per forward pass; default 32.
        dtype: storage dtype; default float32.
        memory_budget_mb: above this the store spills to disk; default 2048.
        spill_dir: where a spilled store's file goes; default the system temp folder.
        progress: called with the number of forward batches done.

    Returns:
        A ``FeatureStore`` of shape (views, n, *feature_shape).
    """
    from concurrent.futures import ThreadPoolExecutor

    from transferkit.data import _augment_one

    views = views if augmenter_factory is not None else 1
    store = FeatureStore(views, len(images), feature_shape, dtype, memory_budget_mb, spill_dir)
    augmenter = augmenter_factory() if augmenter_factory is not None else None

    def prepare(view: int, start: int) -> np.ndarray:
        batch = images[start : start + batch_size]
        if augmenter is not None:
            batch = np.stack([
                _augment_one(augmenter, image, [seed, 1_000_003, view, start + offset])
                for offset, image in enumerate(batch)
            ])
        return batch.astype("float32")

    jobs = [(view, start) for view in range(views) for start in range(0, len(images), batch_size)]
    # Augment the next batch in a thread while the engine runs the current one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(prepare, *jobs[0]) if jobs else None
        for done, (view, start) in enumerate(jobs, start=1):
            batch = pending.result()
            if done < len(jobs):
                pending = pool.submit(prepare, *jobs[done])
            store.array[view, start : start + len(batch)] = np.asarray(forward(batch), dtype=dtype)
            if progress is not None:
                progress(done)
    return store


class FeatureBatches(SeededBatches):
    """Training batches over stored features: the same per-epoch order as ``ImageBatches``,
    view ``epoch mod views`` of each image."""

    def __init__(self, store: FeatureStore, targets: np.ndarray, batch_size: int, *, shuffle: bool = True,
                 sample_weights: np.ndarray | None = None, seed: int = 0):
        self.store = store
        super().__init__(store.shape[1], targets, batch_size, shuffle=shuffle,
                         sample_weights=sample_weights, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch's order (as ``ImageBatches`` does) and its view."""
        super().set_epoch(epoch)
        self.view = epoch % self.store.shape[0]

    def _inputs(self, selected: np.ndarray) -> np.ndarray:
        # Sorted reads are much faster from a memory map; the batch order is restored after.
        ordering = np.argsort(selected, kind="stable")
        features = np.empty((len(selected), *self.store.shape[2:]), dtype="float32")
        features[ordering] = self.store.array[self.view, selected[ordering]]
        return features
