"""The decoded images of a run in memory or memory-mapped; the split; class weights; targets."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence

import numpy as np

from transferkit.errors import DataError

log = logging.getLogger("transferkit")


def image_array(count: int, size: int, memory_budget_mb: float,
                spill_dir: str | os.PathLike | None = None) -> np.ndarray:
    """An uninitialised uint8 (count, size, size, 3) array: in memory when it fits the budget,
    else memory-mapped from a temporary file.

    The file is unlinked as soon as it is mapped (on systems that allow it), so nothing is
    left behind however the process ends; its space is freed when the array is.

    Args:
        count: number of images.
        size: image side in pixels.
        memory_budget_mb: largest size kept in memory, in MB.
        spill_dir: where the file goes; default the system temporary folder.
    """
    shape = (count, size, size, 3)
    if count * size * size * 3 <= memory_budget_mb * 2**20:
        return np.empty(shape, dtype="uint8")
    log.debug("decoded images: %.1f MB, above data.memory_mb (%g MB): memory-mapped from a temporary file in %s",
              count * size * size * 3 / 2**20, memory_budget_mb, spill_dir or tempfile.gettempdir())
    handle = tempfile.NamedTemporaryFile(prefix="transferkit-images-", suffix=".u8", dir=spill_dir, delete=False)
    try:
        array = np.memmap(handle, dtype="uint8", mode="w+", shape=shape)
    finally:
        handle.close()
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
    return array


def partition_rows(images: np.ndarray, groups: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Reorder the rows of ``images`` in place so each group's rows are contiguous, in
    the order given, and return one view per group: ``images[group]`` without a copy.

    Rows in no group go to the end. Memory stays that of ``images`` (in memory or
    memory-mapped as it is), where indexing would copy every row once more.

    Args:
        images: (n, ...) array, reordered in place.
        groups: disjoint arrays of row indices.

    Returns:
        One view of ``images`` per group, holding ``images[group]`` as it was before.
    """
    order = np.concatenate([np.asarray(group, dtype=np.int64) for group in groups] or [np.zeros(0, np.int64)])
    rest = np.setdiff1d(np.arange(len(images)), order)
    order = np.concatenate([order, rest])  # position i takes the row that was at order[i]
    placed = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if placed[start] or order[start] == start:
            continue
        # Follow the cycle: each row moves once, with one row kept aside.
        kept = np.array(images[start])
        position = start
        while True:
            placed[position] = True
            source = int(order[position])
            if source == start:
                images[position] = kept
                break
            images[position] = images[source]
            position = source
    views, offset = [], 0
    for group in groups:
        views.append(images[offset : offset + len(group)])
        offset += len(group)
    return views


def stratified_split(
    labels: np.ndarray, val_split: float, seed: int, class_names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split that keeps each class's share in both parts.

    Args:
        labels: class index per sample.
        val_split: fraction for validation, in (0, 1).
        seed: random seed.
        class_names: names for error messages; default None (class numbers).

    Returns:
        (train indices, validation indices), each sorted.

    Raises:
        DataError: a class has too few images to give both parts at least one.
    """
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = int(round(len(members) * val_split))
        n_val = min(max(n_val, 1), len(members) - 1)
        if len(members) < 2:
            name = class_names[label] if class_names is not None else f"#{label}"
            raise DataError(
                f"class {name} has {len(members)} readable image(s); the validation split "
                "needs at least 2 per class: add images or pass --val-dir"
            )
        shuffled = rng.permutation(members)
        val.append(shuffled[:n_val])
        train.append(shuffled[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Weight per class, n_samples / (n_classes * count), so each class counts equally.

    Args:
        labels: class index per sample.
        n_classes: how many classes; a class without samples gets weight 0.

    Returns:
        float64 array of shape (n_classes,).
    """
    counts = np.bincount(labels, minlength=n_classes).astype("float64")
    return np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)


