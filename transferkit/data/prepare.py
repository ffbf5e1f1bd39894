"""A data folder made ready to train on: indexed once, every image decoded once (the same
pass feeds the data checks), split, and turned into batches as the recipe says.

``prepare_data`` is what ``finetune``, ``--resume``, ``tune``'s trials, ``lr-find`` and
``doctor --model`` all start from, so they decode and split alike; ``PreparedData.batches``
gives the training and validation batches of a recipe. ``prepare_share`` is a data-parallel
process's part of process 0's: the same split, only its share decoded. ``decode_folder`` is the same read
without a split, for ``audit`` (which deals every image into folds of its own).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.data.arrays import balanced_class_weights, image_array, partition_rows
from transferkit.data.augment import augmenter_factory
from transferkit.data.batches import ImageBatches
from transferkit.data.doctor import SINGLE_IMAGE, DataReport, check_data
from transferkit.data.folders import FolderIndex, index_folders
from transferkit.data.split import (
    TRAIN,
    VALIDATION,
    group_names,
    read_split_table,
    relative_name,
    require_foldable,
    split_rows,
    split_table,
)
from transferkit.errors import DataError
from transferkit.outputs import encode_targets
from transferkit.progress import progress_bar
from transferkit.recipe import Recipe

log = logging.getLogger("transferkit")


@dataclass(frozen=True)
class PreparedData:
    """The decoded, split images of a data folder, for any number of trainings on them.

    What it holds depends on the recipe's ``image_size``, ``seed``, ``data.val_split`` and
    ``data.memory_mb`` only: recipes that agree on those can share it.

    Attributes:
        class_names: the classes, in label order.
        train_images, val_images: uint8 (n, S, S, 3) images (memory-mapped when large).
        train_labels, val_labels: int labels, one per image.
        skipped: (path, reason) of every file left out (unreadable, not an image).
        fingerprint: a digest of which files were read (paths relative to their folder, and
            sizes), to tell whether a resumed run sees the data it started with.
        data_dir: the data folder, resolved.
        val_dir: the validation folder, resolved; None when validation is a split of data_dir.
        split: (file, "train" or "validation") per image, in the order of the images (the
            training ones first); each file's path relative to its own folder, as
            ``split.csv`` lists them.
    """

    class_names: tuple[str, ...]
    train_images: np.ndarray
    train_labels: np.ndarray
    val_images: np.ndarray
    val_labels: np.ndarray
    skipped: tuple[tuple[str, str], ...]
    fingerprint: str
    data_dir: str
    val_dir: str | None
    split: tuple[tuple[str, str], ...] = ()

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    def split_csv(self) -> str:
        """``split.csv``'s text: ``file,subset``, one row per image (see ``split``)."""
        return split_table(self.split)

    def require_same(self, class_names, fingerprint: str | None, trained: str) -> None:
        """Raise unless these are the classes and images a run started with (a resumed run
        must train on them, or its split, classes and epochs so far would not fit).

        Args:
            class_names: the classes the run trained on; None: not recorded.
            fingerprint: the run's data fingerprint; None: not recorded.
            trained: who trained on them, for the message ("the interrupted run of RUN").

        Raises:
            DataError: other classes, or files added, removed or rewritten.
        """
        if class_names is not None and list(class_names) != list(self.class_names):
            raise DataError(
                f"{self.data_dir} has classes {', '.join(self.class_names)} but {trained} trained on "
                f"{', '.join(class_names)}; resume with the same data, or start over with --force"
            )
        if fingerprint is not None and fingerprint != self.fingerprint:
            raise DataError(
                f"the images in {self.data_dir} changed since {trained} started (files added, removed or "
                "rewritten); restore them to resume, or start over with --force"
            )

    def batches(self, recipe: Recipe) -> tuple[ImageBatches, ImageBatches]:
        """(training batches: shuffled, augmented and class-weighted as the recipe says;
        validation batches)."""
        sample_weights = None
        if recipe.data.class_weights:
            weights = balanced_class_weights(self.train_labels, self.n_classes)
            sample_weights = weights[self.train_labels].astype("float32")
        train = ImageBatches(
            self.train_images,
            encode_targets(self.train_labels, self.n_classes),
            recipe.batch_size,
            shuffle=True,
            augmenter_factory=augmenter_factory(recipe.augment),
            sample_weights=sample_weights,
            seed=recipe.seed,
        )
        val = ImageBatches(self.val_images, encode_targets(self.val_labels, self.n_classes), recipe.batch_size)
        return train, val


def prepare_data(
    data_dir: str | os.PathLike,
    recipe: Recipe,
    *,
    val_dir: str | os.PathLike | None = None,
    verbose: int = 1,
) -> PreparedData:
    """Index, decode and split the images once; every data error is raised here, before any
    training.

    Each folder is indexed once, and that index serves the data checks, the decoding and the
    split. Unreadable files are skipped with a warning each; what ``transferkit doctor``
    would report as a problem is warned about, without stopping.

    Args:
        data_dir: one sub-folder of images per class.
        recipe: the resolved recipe (its image size, seed, validation split and memory bound).
        val_dir: a validation folder with the same class sub-folders; default None (a
            stratified ``data.val_split`` of ``data_dir``).
        verbose: 0 silent, 1 a progress bar and the split's counts; default 1.

    Returns:
        The ``PreparedData``.

    Raises:
        DataError: the folder, its classes or its images cannot be used.
    """
    index, val_index = index_folders(data_dir, val_dir)
    class_names = index.class_names
    # Before any image is read: a file the pattern names no group for fails at once.
    groups = group_names(index.paths, index.root, recipe.data.group_by) if recipe.data.group_by else None
    paths = list(index.paths) + (list(val_index.paths) if val_index is not None else [])
    decoded, readable, report = _decode_all(index, val_index, paths, recipe, verbose)
    reasons = dict(report.unreadable)
    first = len(index.paths)
    kept, skipped = _kept_rows(index.paths, readable[:first], reasons)
    labels = index.labels[kept]
    skipped = list(index.skipped) + skipped
    _require_every_class(labels, class_names, data_dir)
    if val_index is None:
        train_rows, val_rows = split_rows(labels, recipe.data.val_split, recipe.seed, class_names,
                                          groups[kept] if groups is not None else None)
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
        log.warning("for the details run: %s", doctor_command(data_dir, val_dir, recipe))
    _tell_split(class_names, train_labels, val_labels, recipe, val_dir, verbose)
    if groups is not None and val_index is None and verbose:
        share = len(val_rows) / (len(train_rows) + len(val_rows))
        log.info(f"split by data.group_by: {len(set(groups[train_rows].tolist()))} group(s) train, "
                 f"{len(set(groups[val_rows].tolist()))} validate ({share:.0%} of the images; "
                 f"data.val_split {recipe.data.val_split:g}), none on both sides")
    def listed(row: int, subset: str) -> tuple[str, str]:
        root = val_index.root if val_index is not None and row >= first else index.root
        return relative_name(paths[row], root), subset

    split = [listed(row, TRAIN) for row in train_rows] + [listed(row, VALIDATION) for row in val_rows]
    return PreparedData(
        class_names=tuple(class_names),
        train_images=train_images, train_labels=train_labels,
        val_images=val_images, val_labels=val_labels,
        skipped=tuple((str(path), reason) for path, reason in skipped),
        fingerprint=data_fingerprint(data_dir, val_dir, paths),
        data_dir=str(Path(data_dir).resolve()),
        val_dir=str(Path(val_dir).resolve()) if val_dir is not None else None,
        split=tuple(split),
    )


def prepare_share(data_dir: str | os.PathLike, recipe: Recipe, split: str, process: int, processes: int, *,
                  val_dir: str | os.PathLike | None = None,
                  indexes: tuple[FolderIndex, FolderIndex | None] | None = None) -> PreparedData:
    """One data-parallel process's part of what ``prepare_data`` gave process 0: process 0's
    split, with only this process's images decoded, those that ``data.batches.process_share``
    gives it (every ``processes``-th training and validation image from ``process`` on). The
    other rows stay zeros, never read and, allocated lazily, never in memory.

    Args:
        data_dir: one sub-folder of images per class, as process 0 read it.
        recipe: the run's recipe (its image size).
        split: process 0's ``split.csv`` text (``PreparedData.split_csv``).
        process, processes: this process's index, and how many train together.
        val_dir: the validation folder, as process 0 was given; default None.
        indexes: ``index_folders(data_dir, val_dir)`` when the caller has it; default None
            (indexed here).

    Returns:
        The ``PreparedData``, its images decoded for this process's share only.

    Raises:
        DataError: the folders cannot be used, or a file of the share cannot be read here
            (process 0 read it: every process must see the same images).
    """
    from transferkit.data.images import decode_images

    index, val_index = indexes if indexes is not None else index_folders(data_dir, val_dir)
    names = {name: label for label, name in enumerate(index.class_names)}
    rows = read_split_table(split)
    parts = []
    for subset, root in ((TRAIN, Path(data_dir)), (VALIDATION, Path(val_dir if val_dir is not None else data_dir))):
        files = [file for file, kind in rows if kind == subset]
        try:
            labels = np.array([names[file.split("/", 1)[0]] for file in files], dtype=int)
        except KeyError as error:
            raise DataError(f"process 0 trains on class {error.args[0]}, which {root} has not; every process "
                            "needs the same data folder") from None
        images = np.zeros((len(files), recipe.image_size, recipe.image_size, 3), dtype="uint8")
        share = list(range(process, len(files), processes))
        decoded, kept, skipped = decode_images([root / files[row] for row in share], recipe.image_size)
        if skipped:
            path, reason = skipped[0]
            raise DataError(f"{path}: {reason}, though process 0 read it; every process needs the same images")
        images[share] = decoded
        parts += [images, labels]
    paths = list(index.paths) + (list(val_index.paths) if val_index is not None else [])
    return PreparedData(
        class_names=tuple(index.class_names),
        train_images=parts[0], train_labels=parts[1], val_images=parts[2], val_labels=parts[3],
        skipped=(), fingerprint=data_fingerprint(data_dir, val_dir, paths),
        data_dir=str(Path(data_dir).resolve()),
        val_dir=str(Path(val_dir).resolve()) if val_dir is not None else None,
        split=tuple(rows),
    )


@dataclass(frozen=True)
class DecodedFolder:
    """Every readable image of a data folder, decoded once, not split.

    Attributes:
        class_names: the classes, in label order.
        images: uint8 (n, S, S, 3) images (memory-mapped when large).
        labels: int label per image.
        files: each image's file, in class then path order.
        groups: each image's group (``data.group_by``), or None without a pattern.
        skipped: (path, reason) of every file left out.
        data_dir: the data folder, resolved.
    """

    class_names: tuple[str, ...]
    images: np.ndarray
    labels: np.ndarray
    files: tuple[Path, ...]
    groups: np.ndarray | None
    skipped: tuple[tuple[str, str], ...]
    data_dir: str


def decode_folder(data_dir: str | os.PathLike, recipe: Recipe, *, verbose: int = 1,
                  folds: int | None = None) -> DecodedFolder:
    """Index and decode every image of a folder once, as ``prepare_data`` does, without a split.

    The data checks run on the same read and what they find is warned about; unreadable
    files are skipped with a warning each.

    Args:
        data_dir: one sub-folder of images per class.
        recipe: the resolved recipe (its image size, memory bound and ``data.group_by``).
        verbose: 0 silent, 1 a progress bar; default 1.
        folds: the folds the images will be dealt into (an audit's): more than the files
            found is refused before any is decoded, and more than the readable images after;
            default None.

    Returns:
        The ``DecodedFolder``.

    Raises:
        DataError: the folder, its classes or its images cannot be used, the group
            pattern names no group for a file, or there are fewer images than ``folds``.
    """
    index, _ = index_folders(data_dir)
    if folds is not None:
        require_foldable(len(index.paths), folds)
    groups = group_names(index.paths, index.root, recipe.data.group_by) if recipe.data.group_by else None
    decoded, readable, report = _decode_all(index, None, list(index.paths), recipe, verbose)
    kept, skipped = _kept_rows(index.paths, readable, dict(report.unreadable))
    labels = index.labels[kept]
    _require_every_class(labels, index.class_names, data_dir)
    if folds is not None:
        require_foldable(len(kept), folds)
    (images,) = partition_rows(decoded, [kept])  # in place: no second copy
    skipped = list(index.skipped) + skipped
    if skipped:
        log.warning("skipped %d file(s) (unreadable or not images)", len(skipped))
    if report.problems:
        log.warning("for the details run: %s", doctor_command(data_dir, None, recipe))
    return DecodedFolder(
        class_names=tuple(index.class_names), images=images, labels=labels,
        files=tuple(index.paths[row] for row in kept), groups=groups[kept] if groups is not None else None,
        skipped=tuple((str(path), reason) for path, reason in skipped), data_dir=str(Path(data_dir).resolve()),
    )


def data_fingerprint(data_dir, val_dir, paths) -> str:
    """A digest of which image files a run reads (paths relative to their data folder, and
    sizes), to tell whether a resumed run sees the data it started with, wherever the
    folder is now."""
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


def doctor_command(data_dir, val_dir, recipe: Recipe) -> str:
    """The ``transferkit doctor`` command that checks what ``prepare_data`` checked."""
    words = ["transferkit", "doctor", str(data_dir), "--image-size", str(recipe.image_size), "--seed", str(recipe.seed)]
    words += ["--val-dir", str(val_dir)] if val_dir is not None else ["--val-split", f"{recipe.data.val_split:g}"]
    words += ["--group-by", recipe.data.group_by] if recipe.data.group_by else []
    return shlex.join(words)


# --- the steps ----------------------------------------------------------------------------


def _decode_all(index: FolderIndex, val_index: FolderIndex | None, paths: list, recipe: Recipe,
                verbose: int) -> tuple[np.ndarray, np.ndarray, DataReport]:
    """The one read of every file: the doctor's checks decode each image at the training
    size into one array (memory-mapped beyond ``data.memory_mb``), and training takes it
    from there. Problems the doctor finds are warned about, without stopping.

    Returns:
        (decoded images, one row per path; which rows were readable; the ``DataReport``).
    """
    rows: dict = {}
    for row, path in enumerate(paths):
        rows.setdefault(path, []).append(row)
    decoded = image_array(len(paths), recipe.image_size, recipe.data.memory_mb)
    readable = np.zeros(len(paths), dtype=bool)

    def keep(path, image):
        for row in rows.get(path, ()):  # a file added since the folder was indexed is not used
            decoded[row] = image
            readable[row] = True

    progress = None
    if verbose and paths:
        log.info(f"reading images ({len(paths)} files)")
        progress = progress_bar("image", len(paths))
    report = check_data(
        index, image_size=recipe.image_size, val_split=recipe.data.val_split,
        seed=recipe.seed, val_dir=val_index, keep=keep, progress=progress, group_by=recipe.data.group_by,
    )
    for message in report.problems:
        # Unreadable files are warned about one by one in _kept_rows; a class too small to
        # split stops the split with its own one line.
        if "unreadable file" not in message and SINGLE_IMAGE not in message:
            log.warning("%s", message)
    return decoded, readable, report


def _kept_rows(paths, readable: np.ndarray, reasons: dict):
    """(indices of the readable paths, [(path, reason)] of the others, each warned about)."""
    skipped = []
    for path, ok in zip(paths, readable, strict=True):
        if not ok:
            reason = reasons.get(path, "cannot be read")
            log.warning("skipping %s: %s", path, reason)
            skipped.append((path, reason))
    return np.flatnonzero(readable), skipped


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
