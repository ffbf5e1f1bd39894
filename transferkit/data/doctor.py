"""Data checks before training: what in an image folder is worth fixing, and what to know.

    report = check_data("images/", image_size=128)
    report.format_text()        # the report as lines of text; report.problems, report.warnings

The checks run over the one decode pass training uses: ``check_data(keep=...)`` hands each
decoded image on, and ``finetune`` passes the folder index it made, so a folder is walked
and read once.

``transferkit doctor DATA_DIR`` prints this report and ``finetune`` logs its findings.
Problems (the doctor exits 1) are things that make a run quietly worse: unreadable files,
classes with too few readable images, identical images under two labels, identical images
on both sides of the train/validation split, identical images within a class, groups
(``data.group_by``) with images on both sides, strong class imbalance and images much smaller
than the training size. Warnings are worth knowing but
harmless: mixed colour modes (reading converts every image to RGB) and files without an image
extension (never read).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.data.folders import FolderIndex, index_folders, partition_skipped
from transferkit.data.images import UnreadableImage, load_image, open_image
from transferkit.data.split import group_names, split_rows
from transferkit.errors import RecipeError

EXAMPLES_SHOWN = 10
HASH_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ConflictingGroup:
    """Files with identical content that sit in more than one class.

    Attributes:
        paths: the files, sorted.
        classes: the distinct class names they sit in, sorted.
    """

    paths: tuple[Path, ...]
    classes: tuple[str, ...]


@dataclass(frozen=True)
class LeakedGroup:
    """Files with identical content on both sides of the train/validation split.

    Attributes:
        train: the copies used for training, sorted.
        validation: the copies used for validation, sorted.
    """

    train: tuple[Path, ...]
    validation: tuple[Path, ...]


@dataclass(frozen=True)
class SharedGroup:
    """A group (``data.group_by``) with images on both sides of the train/validation split.

    Attributes:
        name: the group's name (what the pattern's first group matched).
        train: its images used for training, sorted.
        validation: its images used for validation, sorted.
    """

    name: str
    train: tuple[Path, ...]
    validation: tuple[Path, ...]


@dataclass(frozen=True)
class Finding:
    """One line of a report, with the files it is about.

    Attributes:
        message: one line saying what is wrong and what to do.
        examples: one line per file or group of files, all of them (display trims).
    """

    message: str
    examples: tuple[str, ...] = ()


@dataclass(frozen=True)
class DataReport:
    """What ``check_data`` found in a data folder (and its validation folder, if any).

    Attributes:
        root: the data folder.
        val_root: the validation folder, or None when validation is a split of ``root``.
        class_counts: readable images per class of ``root``, in class order.
        val_class_counts: readable images per class of ``val_root``; empty without one.
        image_size: the training image side the checks assume.
        min_side: images whose smaller side is below this are listed as small.
        val_split: the validation fraction the leakage check used (ignored with ``val_root``).
        seed: the split seed the leakage check used.
        imbalance_limit: the largest/smallest class ratio accepted.
        imbalance_ratio: largest/smallest class count of ``root``; None when a class has no
            readable image.
        unreadable: (path, reason) for files that cannot be used: not decodable, broken
            links, folders that cannot be read.
        ignored: (path, reason) for files without an image extension, which are never read.
        duplicates_within_class: groups of identical files in one class of one folder.
        conflicting_duplicates: groups of identical files in more than one class.
        split_leakage: groups of identical files used for both training and validation.
        small_images: (path, width, height) of images whose smaller side is below
            ``min_side``.
        colour_modes: number of readable images per PIL mode ("RGB", "L", "RGBA", ...).
        group_by: the pattern naming each file's group, or None (no groups checked).
        shared_groups: groups with images used for both training and validation (with a
            validation folder: in both folders; a split by group never makes one).
    """

    root: Path
    val_root: Path | None
    class_counts: dict[str, int]
    val_class_counts: dict[str, int]
    image_size: int
    min_side: int
    val_split: float
    seed: int
    imbalance_limit: float
    imbalance_ratio: float | None
    unreadable: tuple[tuple[Path, str], ...] = ()
    ignored: tuple[tuple[Path, str], ...] = ()
    duplicates_within_class: tuple[tuple[Path, ...], ...] = ()
    conflicting_duplicates: tuple[ConflictingGroup, ...] = ()
    split_leakage: tuple[LeakedGroup, ...] = ()
    small_images: tuple[tuple[Path, int, int], ...] = ()
    colour_modes: dict[str, int] = field(default_factory=dict)
    group_by: str | None = None
    shared_groups: tuple[SharedGroup, ...] = ()

    def problem_findings(self) -> list[Finding]:
        """Findings worth fixing before training, each with its files."""
        return [finding for check in _PROBLEM_CHECKS if (finding := check(self)) is not None]

    def warning_findings(self) -> list[Finding]:
        """Findings worth knowing that do not harm training, each with its files."""
        return [finding for check in _WARNING_CHECKS if (finding := check(self)) is not None]

    @property
    def problems(self) -> list[str]:
        """One line per problem worth fixing; empty when the folder is clean."""
        return [finding.message for finding in self.problem_findings()]

    @property
    def warnings(self) -> list[str]:
        """One line per harmless finding (mixed colour modes, ignored files)."""
        return [finding.message for finding in self.warning_findings()]

    def is_clean(self) -> bool:
        """True when there is no problem (warnings allowed)."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """The report as JSON-serialisable values, paths as strings."""
        return {
            "root": str(self.root),
            "val_root": None if self.val_root is None else str(self.val_root),
            "clean": self.is_clean(),
            "image_size": self.image_size,
            "min_side": self.min_side,
            "val_split": self.val_split,
            "seed": self.seed,
            "imbalance_limit": self.imbalance_limit,
            "class_counts": dict(self.class_counts),
            "val_class_counts": dict(self.val_class_counts),
            "imbalance_ratio": self.imbalance_ratio,
            "unreadable": [{"path": str(path), "reason": reason} for path, reason in self.unreadable],
            "ignored": [{"path": str(path), "reason": reason} for path, reason in self.ignored],
            "duplicates_within_class": [[str(path) for path in group] for group in self.duplicates_within_class],
            "conflicting_duplicates": [
                {"paths": [str(path) for path in group.paths], "classes": list(group.classes)}
                for group in self.conflicting_duplicates
            ],
            "split_leakage": [
                {"train": [str(path) for path in group.train], "validation": [str(path) for path in group.validation]}
                for group in self.split_leakage
            ],
            "small_images": [
                {"path": str(path), "width": width, "height": height}
                for path, width, height in self.small_images
            ],
            "colour_modes": dict(self.colour_modes),
            "group_by": self.group_by,
            "shared_groups": [
                {"group": group.name, "train": [str(path) for path in group.train],
                 "validation": [str(path) for path in group.validation]}
                for group in self.shared_groups
            ],
            "problems": self.problems,
            "warnings": self.warnings,
        }

    def format_text(self, examples: int = EXAMPLES_SHOWN) -> str:
        """A readable multi-line report: class counts, then problems, then warnings.

        Args:
            examples: files shown per finding before "and N more"; default 10.

        Returns:
            The report, lines joined by newlines, without a trailing newline.
        """
        lines = _count_table(self.root, self.class_counts)
        if self.val_root is not None:
            lines += [""] + _count_table(self.val_root, self.val_class_counts)
        if self.imbalance_ratio is not None:
            lines.append(
                f"imbalance: largest class / smallest class = {self.imbalance_ratio:.1f} "
                f"(limit {self.imbalance_limit:g})"
            )
        if self.colour_modes:
            lines.append("colour modes: " + _format_modes(self.colour_modes))
        for title, findings in (("problem", self.problem_findings()), ("warning", self.warning_findings())):
            if not findings:
                continue
            lines += ["", f"{len(findings)} {title}(s):"]
            for finding in findings:
                lines.append(f"- {finding.message}")
                lines += [f"    {example}" for example in finding.examples[:examples]]
                if len(finding.examples) > examples:
                    lines.append(f"    and {len(finding.examples) - examples} more")
        if self.is_clean():
            lines += ["", "no problems found"]
        return "\n".join(lines)


def check_data(
    data_dir: str | os.PathLike | FolderIndex,
    image_size: int = 128,
    val_split: float = 0.2,
    seed: int = 42,
    val_dir: str | os.PathLike | FolderIndex | None = None,
    imbalance_limit: float = 3.0,
    *,
    min_side: int | None = None,
    workers: int | None = None,
    keep: Callable[[Path, np.ndarray], None] | None = None,
    progress: Callable[[int], None] | None = None,
    group_by: str | None = None,
) -> DataReport:
    """Read every image of a data folder once and report what is worth fixing.

    Each image is fully decoded with ``load_image`` (so truncated files count as
    unreadable, as in training), its header gives the colour mode, and its file content is
    hashed (SHA-256) to find exact duplicates. Leakage is computed on the split training
    would make: ``split.split_rows`` over the readable images with the same
    ``val_split``, ``seed`` and ``group_by``; with ``val_dir``, it is identical content in
    both folders.

    Problems (``DataReport.problems``; the doctor exits 1): unreadable files, a class with
    fewer readable images than the split needs, identical files in more than one class,
    identical files in training and validation, groups with images on both sides, identical
    files within a class, a largest/smallest class ratio above ``imbalance_limit``, and
    images whose smaller side is below ``min_side``. Warnings only (``DataReport.warnings``): mixed colour modes such as
    some grayscale among RGB (reading converts them all to RGB), and files without an image
    extension (never read).

    Args:
        data_dir: one sub-folder of images per class, or its ``FolderIndex`` (a caller that
            indexed the folder already, as ``finetune`` does, passes that: it is not walked
            again).
        image_size: the side images are resized to for training; default 128.
        val_split: validation fraction of each class, in (0, 1); default 0.2.
        seed: split seed, as the recipe's ``seed``; default 42.
        val_dir: a validation folder with the same class sub-folders, or its index;
            default None (the split of ``data_dir``).
        imbalance_limit: largest/smallest class ratio accepted, at least 1; default 3.0.
        min_side: smallest accepted image side in pixels; default half of ``image_size``.
        workers: reading threads; default the number of CPUs.
        keep: when given, called with (path, decoded uint8 (image_size, image_size, 3)
            image) for every readable file, from the reading threads, so training need
            not read the files again.
        progress: called with the number of files read so far.
        group_by: the recipe's ``data.group_by``: the split checked keeps groups whole, as
            training's does, and groups with images on both sides (in both folders, with
            ``val_dir``) are a problem; default None (no groups).

    Returns:
        A ``DataReport``.

    Raises:
        DataError: a folder is missing, has no class folders holding image files, or
            ``val_dir`` has other classes than ``data_dir``; with ``group_by``, a file the
            pattern names no group for, or a split by group that cannot be made.
        RecipeError: an argument is out of range.
    """
    min_side = _checked_arguments(image_size, val_split, imbalance_limit, min_side)
    index, val_index = index_folders(data_dir, val_dir, allow_empty=True)  # an empty class: a finding too
    group_of = _group_of(index, val_index, group_by)  # before reading: a file it cannot name fails at once
    entries = _entries(index, val_index)
    inspections = _inspect_all([path for _, _, path in entries], image_size, keep, workers, progress)
    skipped = list(index.skipped) + list(val_index.skipped if val_index else ())
    ignored, unreadable = partition_skipped(skipped)  # never read / cannot be read
    readable: list[tuple[str, str, _Inspection]] = []
    for (folder, class_name, path), inspection in zip(entries, inspections, strict=False):
        if inspection.error is not None:
            unreadable.append((path, inspection.error))
        else:
            readable.append((folder, class_name, inspection))

    class_counts = _count(index.class_names, [name for folder, name, _ in readable if folder == "train"])
    val_class_counts = (
        _count(val_index.class_names, [name for folder, name, _ in readable if folder == "validation"])
        if val_index is not None
        else {}
    )
    groups = None if group_of is None else np.asarray(
        [group_of[inspection.path] for _, _, inspection in readable], dtype=object)
    roles = _validation_roles(readable, index.class_names, class_counts, val_split, seed, val_index is not None,
                              groups)
    within, conflicting, leaked = _duplicate_groups(readable, roles)
    counts = list(class_counts.values())
    return DataReport(
        root=index.root,
        val_root=None if val_index is None else val_index.root,
        class_counts=class_counts,
        val_class_counts=val_class_counts,
        image_size=image_size,
        min_side=min_side,
        val_split=val_split,
        seed=seed,
        imbalance_limit=imbalance_limit,
        imbalance_ratio=max(counts) / min(counts) if min(counts) > 0 else None,
        unreadable=tuple(sorted(unreadable)),
        ignored=tuple(sorted(ignored)),
        duplicates_within_class=tuple(sorted(within)),
        conflicting_duplicates=tuple(sorted(conflicting, key=lambda group: group.paths)),
        split_leakage=tuple(sorted(leaked, key=lambda group: group.train + group.validation)),
        small_images=tuple(
            sorted(
                (inspection.path, inspection.width, inspection.height)
                for _, _, inspection in readable
                if min(inspection.width, inspection.height) < min_side
            )
        ),
        colour_modes=dict(Counter(inspection.mode for _, _, inspection in readable).most_common()),
        group_by=group_by,
        shared_groups=_shared_groups(readable, roles, groups),
    )


def _group_of(index: FolderIndex, val_index: FolderIndex | None, group_by: str | None) -> dict[Path, str] | None:
    """Each image file's group (its path below its own folder, searched with ``group_by``),
    or None without a pattern."""
    if group_by is None:
        return None
    group_of = dict(zip(index.paths, group_names(index.paths, index.root, group_by), strict=True))
    if val_index is not None:
        group_of.update(zip(val_index.paths, group_names(val_index.paths, val_index.root, group_by), strict=True))
    return group_of


def _shared_groups(readable, roles: list[bool] | None, groups: np.ndarray | None) -> tuple[SharedGroup, ...]:
    """The groups with images on both sides of the split, by name."""
    if roles is None or groups is None:
        return ()
    sides: dict[str, tuple[list[Path], list[Path]]] = defaultdict(lambda: ([], []))
    for (_, _, inspection), validates, group in zip(readable, roles, groups, strict=True):
        sides[group][int(validates)].append(inspection.path)
    return tuple(SharedGroup(str(name), tuple(sorted(train)), tuple(sorted(validation)))
                 for name, (train, validation) in sorted(sides.items()) if train and validation)


def _checked_arguments(image_size: int, val_split: float, imbalance_limit: float, min_side: int | None) -> int:
    """Refuse out-of-range arguments; returns ``min_side`` (default half of ``image_size``)."""
    if image_size < 1:
        raise RecipeError(f"image_size must be at least 1, got {image_size}")
    if not 0 < val_split < 1:
        raise RecipeError(f"val_split must be between 0 and 1 (exclusive), got {val_split}")
    if imbalance_limit < 1:
        raise RecipeError(f"imbalance_limit must be 1 or more (largest / smallest class), got {imbalance_limit}")
    if min_side is None:
        return max(1, image_size // 2)
    if min_side < 1:
        raise RecipeError(f"min_side must be at least 1 pixel, got {min_side}")
    return min_side


def _entries(index: FolderIndex, val_index: FolderIndex | None) -> list[tuple[str, str, Path]]:
    """One entry per image file of both folders: ("train" or "validation", class name, path)."""
    entries = [
        ("train", index.class_names[label], path) for path, label in zip(index.paths, index.labels, strict=True)
    ]
    if val_index is not None:
        entries += [
            ("validation", val_index.class_names[label], path)
            for path, label in zip(val_index.paths, val_index.labels, strict=False)
        ]
    return entries


def _inspect_all(paths: list[Path], image_size: int, keep: Callable | None, workers: int | None,
                 progress: Callable[[int], None] | None) -> list[_Inspection]:
    """Decode, measure and hash every file, in reading threads; results in path order."""
    inspections = []
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for done, inspection in enumerate(pool.map(lambda path: _inspect(path, image_size, keep), paths), 1):
            inspections.append(inspection)
            if progress is not None:
                progress(done)
    return inspections


def _duplicate_groups(readable: list[tuple[str, str, _Inspection]], roles: list[bool] | None):
    """Files of identical content: (groups within one class of one folder, groups across
    classes, groups on both sides of the split; the last empty when ``roles`` is None)."""
    by_digest: dict[str, list[int]] = defaultdict(list)
    for position, (_, _, inspection) in enumerate(readable):
        by_digest[inspection.digest].append(position)
    within: list[tuple[Path, ...]] = []
    conflicting: list[ConflictingGroup] = []
    leaked: list[LeakedGroup] = []
    for positions in by_digest.values():
        if len(positions) < 2:
            continue
        groups: dict[tuple[str, str], list[Path]] = defaultdict(list)
        for position in positions:
            folder, class_name, inspection = readable[position]
            groups[(folder, class_name)].append(inspection.path)
        within += [tuple(sorted(paths)) for paths in groups.values() if len(paths) > 1]
        classes = sorted({class_name for _, class_name in groups})
        if len(classes) > 1:
            conflicting.append(
                ConflictingGroup(tuple(sorted(readable[p][2].path for p in positions)), tuple(classes))
            )
        if roles is not None:
            train = tuple(sorted(readable[p][2].path for p in positions if not roles[p]))
            validation = tuple(sorted(readable[p][2].path for p in positions if roles[p]))
            if train and validation:
                leaked.append(LeakedGroup(train, validation))
    return within, conflicting, leaked


@dataclass(frozen=True)
class _Inspection:
    path: Path
    error: str | None = None
    digest: str = ""
    width: int = 0
    height: int = 0
    mode: str = ""


def _inspect(path: Path, image_size: int, keep: Callable | None = None) -> _Inspection:
    try:
        # The decode training does (load_image, reduced-scale JPEG decoding included),
        # so a file is unreadable here exactly when training would skip it.
        image = load_image(path, image_size)
    except UnreadableImage as error:
        return _Inspection(path, error=error.reason)
    if keep is not None:
        keep(path, image)
    try:
        with open_image(path) as image:  # the header: size and mode before conversion to RGB
            mode = image.mode
            width, height = image.size
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as error:  # changed or removed since it was decoded
        return _Inspection(path, error=f"cannot be read ({error.strerror or error})")
    return _Inspection(path, digest=digest.hexdigest(), width=width, height=height, mode=mode)


def _count(class_names: Sequence[str], names: Sequence[str]) -> dict[str, int]:
    counts = Counter(names)
    return {name: counts.get(name, 0) for name in class_names}


def _validation_roles(
    readable: list[tuple[str, str, _Inspection]],
    class_names: Sequence[str],
    class_counts: dict[str, int],
    val_split: float,
    seed: int,
    has_val_dir: bool,
    groups: np.ndarray | None = None,
) -> list[bool] | None:
    """Per readable image, True when it is used for validation; None if no split is possible."""
    if has_val_dir:
        return [folder == "validation" for folder, _, _ in readable]
    if any(count < 2 for count in class_counts.values()):
        return None  # the split refuses this folder; that is reported as a problem instead
    # The same labels, in the same order, as training passes to the split.
    label_of = {name: label for label, name in enumerate(class_names)}
    labels = np.asarray([label_of[name] for _, name, _ in readable], dtype="int64")
    _, val_rows = split_rows(labels, val_split, seed, class_names, groups)
    roles = [False] * len(readable)
    for row in val_rows:
        roles[int(row)] = True
    return roles


def _count_table(root: Path, counts: dict[str, int]) -> list[str]:
    width = max([len("class")] + [len(name) for name in counts])
    lines = [f"{root}: {len(counts)} classes, {sum(counts.values())} readable images", f"  {'class':<{width}}  images"]
    lines += [f"  {name:<{width}}  {count:>6}" for name, count in counts.items()]
    return lines


def _format_modes(modes: dict[str, int]) -> str:
    return ", ".join(f"{mode} {count}" for mode, count in modes.items())


def _paths(paths: Sequence[Path]) -> str:
    return ", ".join(str(path) for path in paths)


# The checks, in the order a report lists them. Each returns a Finding or None.


def _unreadable(report: DataReport) -> Finding | None:
    if not report.unreadable:
        return None
    return Finding(
        f"{len(report.unreadable)} unreadable file(s), which training skips: re-export or remove them",
        tuple(f"{path}: {reason}" for path, reason in report.unreadable),
    )


def _empty_classes(report: DataReport) -> Finding | None:
    empty = [
        str(root / name)
        for root, counts in ((report.root, report.class_counts), (report.val_root, report.val_class_counts))
        for name, count in counts.items()
        if count == 0
    ]
    if not empty:
        return None
    return Finding(
        f"{len(empty)} class folder(s) hold no readable image, so training stops: add readable images "
        "or remove the folder",
        tuple(empty),
    )


# What the finding of a class too small to split says (finetune's split then stops with its own line).
SINGLE_IMAGE = "have a single readable image"


def _too_few_to_split(report: DataReport) -> Finding | None:
    if report.val_root is not None:
        return None
    few = [f"{name}: {count}" for name, count in report.class_counts.items() if count == 1]
    if not few:
        return None
    return Finding(
        f"{len(few)} class(es) {SINGLE_IMAGE}; the validation split needs at least 2 "
        "per class (leakage not checked): add images or pass a validation folder",
        tuple(few),
    )


def _conflicting(report: DataReport) -> Finding | None:
    if not report.conflicting_duplicates:
        return None
    return Finding(
        f"{len(report.conflicting_duplicates)} image(s) appear identically in more than one class "
        "(conflicting labels): keep each in its right class only",
        tuple(f"[{', '.join(group.classes)}] {_paths(group.paths)}" for group in report.conflicting_duplicates),
    )


def _leakage(report: DataReport) -> Finding | None:
    if not report.split_leakage:
        return None
    where = (
        f"both {report.root} and the validation folder {report.val_root}"
        if report.val_root is not None
        else f"both training and validation (split {report.val_split:g}, seed {report.seed})"
    )
    return Finding(
        f"{len(report.split_leakage)} image(s) are in {where}, which inflates validation scores: "
        "remove the extra copies",
        tuple(f"train {_paths(group.train)} = validation {_paths(group.validation)}" for group in report.split_leakage),
    )


def _groups_across(report: DataReport) -> Finding | None:
    if not report.shared_groups:
        return None
    where = (f"both {report.root} and the validation folder {report.val_root}" if report.val_root is not None
             else "both training and validation")
    return Finding(
        f"{len(report.shared_groups)} group(s) of data.group_by '{report.group_by}' have images in {where}, which "
        "inflates validation scores: keep each group's images on one side",
        tuple(f"{group.name}: train {_paths(group.train)}; validation {_paths(group.validation)}"
              for group in report.shared_groups),
    )


def _within_class(report: DataReport) -> Finding | None:
    if not report.duplicates_within_class:
        return None
    extra = sum(len(group) - 1 for group in report.duplicates_within_class)
    return Finding(
        f"{len(report.duplicates_within_class)} image(s) are stored more than once in the same class "
        f"({extra} extra cop{'y' if extra == 1 else 'ies'}), which over-weights them: keep one copy of each",
        tuple(_paths(group) for group in report.duplicates_within_class),
    )


def _imbalance(report: DataReport) -> Finding | None:
    if report.imbalance_ratio is None or report.imbalance_ratio <= report.imbalance_limit:
        return None
    counts = report.class_counts
    largest, smallest = max(counts, key=counts.get), min(counts, key=counts.get)
    return Finding(
        f"classes are imbalanced: {largest} has {counts[largest]} images, {smallest} {counts[smallest]} "
        f"({report.imbalance_ratio:.1f}x, limit {report.imbalance_limit:g}x): add images to the small "
        "classes (class weights only partly make up for it)"
    )


def _small(report: DataReport) -> Finding | None:
    if not report.small_images:
        return None
    return Finding(
        f"{len(report.small_images)} image(s) have a side under {report.min_side} px, much smaller than "
        f"the training size {report.image_size} px, so they are blown up and blurry: use larger "
        "images or a smaller image_size",
        tuple(f"{path} ({width}x{height})" for path, width, height in report.small_images),
    )


def _mixed_modes(report: DataReport) -> Finding | None:
    if len(report.colour_modes) < 2:
        return None
    return Finding(
        f"mixed colour modes ({_format_modes(report.colour_modes)}); each image is converted to RGB "
        "when read, so this is only worth knowing (grayscale images carry no colour cues)"
    )


def _ignored(report: DataReport) -> Finding | None:
    if not report.ignored:
        return None
    return Finding(
        f"{len(report.ignored)} file(s) without an image extension are ignored",
        tuple(f"{path}: {reason}" for path, reason in report.ignored),
    )


_PROBLEM_CHECKS: tuple[Callable[[DataReport], Finding | None], ...] = (
    _unreadable,
    _empty_classes,
    _too_few_to_split,
    _conflicting,
    _leakage,
    _groups_across,
    _within_class,
    _imbalance,
    _small,
)
_WARNING_CHECKS: tuple[Callable[[DataReport], Finding | None], ...] = (_mixed_modes, _ignored)
