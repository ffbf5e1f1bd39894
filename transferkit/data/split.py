"""Which images validate: the seeded split (stratified by class, and by group when the
recipe's ``data.group_by`` names groups), the K folds of an audit, and ``split.csv``.

A group is what ``data.group_by``'s first regex group matches in a file's path relative to
its data folder (``cat/patient12_3.jpg`` with ``'^[^/]+/(patient\\d+)_'``: ``patient12``),
or, where that matches nothing, in the file's name alone (``'^(patient\\d+)_'``).
Images of one group (one patient, one video, one object photographed three times) are
near-copies of each other; a split that puts some on each side lets the model be scored
on what it has, in effect, seen. With groups, the split keeps each group whole on one side
and the class shares about equal on both (scikit-learn's ``StratifiedGroupKFold``), so
``split_rows`` is the one place every caller (training, the data checks, the export checks)
takes its split from. No Keras import.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import warnings
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import numpy as np

from transferkit.data.arrays import stratified_split
from transferkit.errors import DataError
from transferkit.recipe import group_pattern

log = logging.getLogger("transferkit")

SPLIT_FILE = "split.csv"
TRAIN, VALIDATION = "train", "validation"
# The validation share with groups is m of N folds; N stays at most this (and at most the
# number of groups). Folds of groups are not all of one size: the rotation whose share of the
# images is nearest the one asked is taken.
MAX_GROUP_FOLDS = 10


def relative_name(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """A file's path relative to its data folder, with "/" between parts (as ``split.csv``
    and ``data.group_by`` see it); the path as given when it is not under ``root``."""
    path, root = Path(path), Path(root)
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        try:
            return path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return path.as_posix()


def group_names(paths: Sequence[str | os.PathLike], root: str | os.PathLike, pattern: str) -> np.ndarray:
    """The group of each file: the first group of ``pattern`` searched in its path relative
    to ``root`` (``cat/patient12_3.jpg``), or, where that names none, in its name alone.

    Args:
        paths: the image files.
        root: the data folder they are in (the relative paths start below it).
        pattern: the recipe's ``data.group_by``.

    Returns:
        An object array of group names, one per path.

    Raises:
        RecipeError: the pattern has no group or is not a regular expression (a recipe
            loaded with ``load_recipe`` was checked already).
        DataError: a file the pattern does not match (or whose first group matches
            nothing), named with the fix.
    """
    from transferkit.errors import RecipeError

    try:
        compiled = group_pattern(pattern)
    except ValueError as error:
        raise RecipeError(f"data.group_by: {error}") from None
    names = np.empty(len(paths), dtype=object)
    for row, path in enumerate(paths):
        relative = relative_name(path, root)
        match = compiled.search(relative)
        if match is None or not match.group(1):  # a pattern written for the name alone ('^patient(\d+)_')
            match = compiled.search(Path(path).name)
        if match is None or not match.group(1):
            raise DataError(
                f"data.group_by '{pattern}' does not name a group for {relative} (in {root}): every file needs "
                "one; change the pattern (it is searched in the path below the data folder, then in the file's "
                "name) or rename the file"
            )
        names[row] = match.group(1)
    return names


def split_rows(labels: np.ndarray, val_split: float, seed: int, class_names: Sequence[str] | None = None,
               groups: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The seeded training / validation split: stratified by class, and, with ``groups``,
    never splitting a group.

    Without groups it is ``arrays.stratified_split`` (each class's share exact). With groups
    the images are dealt into N stratified group folds (``StratifiedGroupKFold``, shuffled
    with ``seed``) and m of them validate, m / N the fraction nearest ``val_split`` with N at
    most 10 and at most the number of groups (0.2: one fold of five). Of the N rotations of
    those m folds, the one whose share of the images is nearest ``val_split`` among those
    whose both sides hold every class is taken (else among those whose training side does):
    folds hold whole groups, so their sizes differ (5 groups in 4 folds: one holds 2).

    Args:
        labels: class index per image.
        val_split: fraction for validation, in (0, 1).
        seed: random seed.
        class_names: names for messages; default None (class numbers).
        groups: group name per image; default None (no groups).

    Returns:
        (train indices, validation indices), each sorted.

    Raises:
        DataError: a class is too small to split; with groups, fewer than two groups, or a
            class all of whose images are in validating groups in every rotation.
    """
    if groups is None:
        return stratified_split(labels, val_split, seed, class_names)
    labels = np.asarray(labels)
    names = list(class_names) if class_names is not None else [f"#{label}" for label in range(labels.max() + 1)]
    n_groups = len(set(groups.tolist()))
    if n_groups < 2:
        only = f" ({groups[0]})" if len(groups) else ""
        raise DataError(f"data.group_by names a single group{only} for all {len(groups)} images; the validation "
                        "split needs at least 2 groups: check the pattern, or pass --val-dir")
    taken, folds = _fold_share(val_split, n_groups)
    parts = [held for _, held in stratified_folds(labels, groups, folds, seed)]
    present = set(labels.tolist())
    whole, partial = [], []  # (distance of the share from val_split, rotation, (train, val))
    for start in range(folds):
        val = np.sort(np.concatenate([parts[(start + k) % folds] for k in range(taken)]))
        train = np.setdiff1d(np.arange(len(labels)), val)
        if set(labels[train].tolist()) != present:
            continue
        found = whole if set(labels[val].tolist()) == present else partial
        found.append((abs(len(val) / len(labels) - val_split), start, (train, val)))
    if whole:
        return min(whole, key=lambda item: item[:2])[2]
    if not partial:
        counts = {label: len(set(groups[labels == label].tolist())) for label in present}
        fewest = min(counts, key=counts.get)
        raise DataError(f"class {names[fewest]} has its images in {counts[fewest]} group(s) only, and no split that "
                        "keeps groups whole leaves it images to train on: add images of other groups to it, lower "
                        "--val-split, or pass --val-dir")
    train, val = min(partial, key=lambda item: item[:2])[2]
    lacking = sorted(names[label] for label in present - set(labels[val].tolist()))
    log.warning(
        "the group split leaves no validation image of class(es) %s (their images are in few groups); its "
        "validation scores will not cover them", ", ".join(lacking))
    return train, val


def _fold_share(val_split: float, n_groups: int) -> tuple[int, int]:
    """(m, N): m of N folds validate, m / N nearest ``val_split`` (N at most 10 and the groups)."""
    limit = max(2, min(MAX_GROUP_FOLDS, n_groups))
    share = Fraction(val_split).limit_denominator(limit)
    taken, folds = share.numerator, share.denominator
    if taken == 0:
        taken, folds = 1, limit
    elif taken == folds:
        taken, folds = limit - 1, limit
    return taken, max(folds, 2)


def require_foldable(images: int, folds: int) -> None:
    """Refuse more folds than images (told as soon as the images are counted).

    Raises:
        DataError: fewer images than folds.
    """
    if images < folds:
        raise DataError(f"{images} image(s) cannot be dealt into {folds} folds; use fewer folds")


def stratified_folds(labels: np.ndarray, groups: np.ndarray | None, folds: int,
                seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """K seeded folds stratified by class (and kept whole by group, with ``groups``): what an
    audit's out-of-sample predictions are made on.

    Args:
        labels: class index per image.
        groups: group (name or number) per image, or None.
        folds: K, at least 2.
        seed: random seed.

    Returns:
        K (training indices, held-out indices) pairs; every image is held out once.

    Raises:
        DataError: fewer images (or groups) than folds.
    """
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.asarray(labels)
    if groups is not None and len(set(groups.tolist())) < folds:
        raise DataError(f"the images fall into {len(set(groups.tolist()))} group(s) kept whole (data.group_by's "
                        f"groups, near-copies of one image joined), fewer than the {folds} folds asked for: use "
                        "fewer folds or check the pattern")
    require_foldable(len(labels), folds)
    with warnings.catch_warnings():
        # "The least populated class has only N members": small classes are dealt as far as they go.
        warnings.simplefilter("ignore", UserWarning)
        if groups is None:
            splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            pairs = splitter.split(np.zeros(len(labels)), labels)
        else:
            splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
            pairs = splitter.split(np.zeros(len(labels)), labels, groups)
        return [(np.sort(train), np.sort(held)) for train, held in pairs]


def split_table(rows: Sequence[tuple[str, str]]) -> str:
    """``split.csv``'s text: a header ``file,subset``, then one row per image (its path
    relative to its data folder; "train" or "validation")."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "subset"])
    writer.writerows(rows)
    return buffer.getvalue()


def read_split_table(text: str) -> list[tuple[str, str]]:
    """``split.csv``'s rows as ``split_table`` wrote them: (file, subset) pairs.

    Raises:
        KeyError: the header lacks ``file`` or ``subset``.
        csv.Error: the text is not CSV.
    """
    return [(row["file"], row["subset"]) for row in csv.DictReader(io.StringIO(text))]
