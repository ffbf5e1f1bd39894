"""Class folders on disk: walking and indexing them, and what is skipped or ignored, and why.

A data folder holds one sub-folder per class, sorted by name; images in deeper sub-folders
of a class folder belong to that class. Hidden files and OS litter (.DS_Store, Thumbs.db,
__MACOSX) are ignored; files without an image extension are listed as skipped. A validation
folder must hold the same class sub-folders (``index_folders`` checks it, for every caller).
No file is opened here (reading images is ``data.images``); no Keras import.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.errors import DataError
from transferkit.outputs import UNKNOWN

log = logging.getLogger("transferkit")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
OS_LITTER = frozenset({"thumbs.db", "desktop.ini", "__macosx", ".ds_store"})


@dataclass(frozen=True)
class FolderIndex:
    """The image files of a data folder.

    Attributes:
        root: the folder.
        class_names: sub-folder names, sorted; index = label.
        paths: image files, in class then path order.
        labels: class index of each path.
        skipped: (path, reason) for files that will not be used.
    """

    root: Path
    class_names: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: np.ndarray
    skipped: tuple[tuple[Path, str], ...] = field(default=())

    def counts(self) -> dict[str, int]:
        """Number of image files per class."""
        return {
            name: int(np.sum(self.labels == index)) for index, name in enumerate(self.class_names)
        }


def is_ignored(path: Path) -> bool:
    """Hidden files and OS litter are never images of the dataset."""
    return path.name.startswith(".") or path.name.lower() in OS_LITTER


def is_non_image_file(path: Path) -> bool:
    """A regular file without an image extension (notes, CSVs): never read, so listed as
    ignored rather than unreadable."""
    return path.is_file() and path.suffix.lower() not in IMAGE_EXTENSIONS


def partition_skipped(
    skipped: Iterable[tuple[Path, str]],
) -> tuple[list[tuple[Path, str]], list[tuple[Path, str]]]:
    """Split what a walk skipped into files that are ignored and files that cannot be used.

    Args:
        skipped: (path, reason) pairs, as ``iter_image_files`` or ``FolderIndex.skipped``
            give them.

    Returns:
        (ignored, unreadable): files without an image extension (``is_non_image_file``),
        and the rest (broken links, folders that cannot be read), in their order.
    """
    ignored: list[tuple[Path, str]] = []
    unreadable: list[tuple[Path, str]] = []
    for path, reason in skipped:
        (ignored if is_non_image_file(path) else unreadable).append((path, reason))
    return ignored, unreadable


def iter_image_files(folder: Path) -> Iterator[tuple[Path, str | None]]:
    """Walk a folder recursively in sorted order, following symlinks once.

    Args:
        folder: the folder to walk.

    Yields:
        (path, None) for each file with an image extension and (path, reason) for other
        files, which callers report as skipped. Symlink loops are walked once, and a link
        to a folder that holds ``folder`` (its parent, the data folder above a class) is
        reported, not walked: it would bring in other classes' images under this one.
    """
    seen: set[str] = set()
    top = Path(os.path.realpath(folder))

    def walk(directory: Path) -> Iterator[tuple[Path, str | None]]:
        real = os.path.realpath(directory)
        if real in seen:
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            yield directory, f"folder cannot be read ({error.strerror})"
            return
        for entry in entries:
            path = Path(entry.path)
            if is_ignored(path):
                continue
            try:
                is_dir = entry.is_dir()
                is_file = entry.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir and entry.is_symlink() and Path(os.path.realpath(path)) in top.parents:
                yield path, "a link to a folder above it (not followed)"
            elif is_dir:
                yield from walk(path)
            elif is_file:
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    yield path, None
                else:
                    yield path, f"not an image file extension ({path.suffix or 'none'})"
            else:
                yield path, "broken link or not a regular file"

    yield from walk(folder)


def require_folder(root: str | os.PathLike, what: str = "data folder") -> Path:
    """Check that a folder of class sub-folders exists and is a folder (nothing is listed:
    the CLI calls this before Keras loads, so a mistyped path is told at once).

    Args:
        root: the folder.
        what: how the message names it; default "data folder".

    Returns:
        ``root`` as a ``Path``.

    Raises:
        DataError: it does not exist, or it is a file.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{what} {root} does not exist; pass a folder with one sub-folder per class")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; pass a folder with one sub-folder per class")
    return root


def require_other_folder(data_dir: str | os.PathLike, val_dir: str | os.PathLike) -> None:
    """Refuse a validation folder that is the data folder itself (links seen through):
    validation on the training images says nothing about new ones.

    Raises:
        DataError: both name one folder.
    """
    if Path(val_dir).resolve() == Path(data_dir).resolve():
        raise DataError(
            f"validation folder {val_dir} is the data folder itself; pass a folder of other "
            "images, or leave --val-dir off to hold out --val-split of each class"
        )


def index_folder(root: str | os.PathLike, allow_empty: bool = False) -> FolderIndex:
    """Index a folder of class sub-folders.

    Args:
        root: the data folder; each sub-folder is a class.
        allow_empty: let class folders hold no image file (the doctor counts them as classes
            too small to split, among its other findings); default False.

    Returns:
        A ``FolderIndex``; files are not opened yet.

    Raises:
        DataError: the folder is missing, is a file, has a class folder named "unknown" (the
            label of images of no known class), or has fewer than two class folders
            holding image files.
    """
    root = require_folder(root)
    class_dirs = _class_dirs(root)
    paths: list[Path] = []
    labels: list[int] = []
    skipped: list[tuple[Path, str]] = []
    empty: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        found = 0
        for path, reason in _class_files(class_dir):
            if reason is None:
                paths.append(path)
                labels.append(label)
                found += 1
            else:
                skipped.append((path, reason))
        if found == 0:
            empty.append(class_dir.name)
    _require_classes(root, class_dirs, [] if allow_empty else empty)
    return FolderIndex(
        root=root,
        class_names=tuple(path.name for path in class_dirs),
        paths=tuple(paths),
        labels=np.asarray(labels, dtype="int64"),
        skipped=tuple(skipped),
    )


def check_class_folders(data_dir: str | os.PathLike, val_dir: str | os.PathLike | None = None) -> None:
    """Refuse, as ``index_folders`` would, class folders training cannot take (none, one, an
    empty one, one named "unknown", other classes in ``val_dir``), reading no more of each
    class folder than its first image file: cheap enough to tell before Keras loads.

    Raises:
        DataError: as ``index_folders``.
    """
    names = []
    for root in (data_dir, val_dir):
        if root is None:
            continue
        root = require_folder(root)
        class_dirs = _class_dirs(root)
        empty = [path.name for path in class_dirs
                 if not any(reason is None for _, reason in _class_files(path))]  # any(): stops at the first
        _require_classes(root, class_dirs, empty)
        names.append((root, tuple(path.name for path in class_dirs)))
    if len(names) == 2 and names[0][1] != names[1][1]:
        raise DataError(_other_classes(names[1][0], names[1][1], names[0][0], names[0][1]))


def _class_dirs(root: Path) -> list[Path]:
    """A data folder's class folders, by name; its errors as ``index_folder``'s."""
    try:
        class_dirs = sorted(
            (path for path in root.iterdir() if path.is_dir() and not is_ignored(path)),
            key=lambda path: path.name,
        )
    except OSError as error:
        raise DataError(f"data folder {root} cannot be read ({error.strerror})") from error
    if not class_dirs:
        raise DataError(
            f"{root} has no class sub-folders; put each class's images in a sub-folder "
            f"named after the class, e.g. {root}/cats/ and {root}/dogs/"
        )
    if any(path.name == UNKNOWN for path in class_dirs):
        raise DataError(
            f"class folder {root / UNKNOWN} has the name transferkit gives images of no known class (predict "
            f"--reject's label, evaluate's folder of such images); rename it, e.g. to {UNKNOWN}_class"
        )
    return class_dirs


def _class_files(class_dir: Path) -> Iterator[tuple[Path, str | None]]:
    """``iter_image_files`` of a class folder, refusing one that cannot be listed."""
    for path, reason in iter_image_files(class_dir):
        if path == class_dir and reason is not None:  # the class folder itself cannot be listed
            raise DataError(f"class folder {class_dir} {reason.removeprefix('folder ')}; give this user read "
                            "access to it (chmod -R u+rX) or remove it")
        yield path, reason


def _require_classes(root: Path, class_dirs: list[Path], empty: list[str]) -> None:
    """Refuse empty class folders, and fewer than two."""
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(empty)} in {root} hold no image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
        )
    if len(class_dirs) < 2:
        raise DataError(
            f"{root} has only one class folder ({class_dirs[0].name}); a classifier needs at "
            "least two classes, each in its own sub-folder"
        )


def _other_classes(val_root: Path, val_names, root: Path, names) -> str:
    return (f"validation folder {val_root} has classes {', '.join(val_names)} but {root} has {', '.join(names)}; "
            "both need the same class sub-folders")


def index_folders(
    data_dir: str | os.PathLike | FolderIndex,
    val_dir: str | os.PathLike | FolderIndex | None = None,
    allow_empty: bool = False,
) -> tuple[FolderIndex, FolderIndex | None]:
    """Index a data folder and its validation folder, which must have the same classes.

    Args:
        data_dir: the data folder, or its ``FolderIndex`` (used as it is).
        val_dir: the validation folder or its index; default None (no validation folder).
        allow_empty: as ``index_folder``'s; default False.

    Returns:
        (index, val_index); val_index is None without ``val_dir``.

    Raises:
        DataError: as ``index_folder``, or the validation folder is the data folder or has
            other classes.
    """
    index = data_dir if isinstance(data_dir, FolderIndex) else index_folder(data_dir, allow_empty)
    if val_dir is None:
        return index, None
    val_index = val_dir if isinstance(val_dir, FolderIndex) else index_folder(val_dir, allow_empty)
    require_other_folder(index.root, val_index.root)
    if val_index.class_names != index.class_names:
        raise DataError(_other_classes(val_index.root, val_index.class_names, index.root, index.class_names))
    return index, val_index
