"""Images on disk -> arrays: folder indexing, robust reading, splitting, training batches.

A data folder holds one sub-folder per class, sorted by name; images in deeper sub-folders
of a class folder belong to that class. Hidden files and OS litter (.DS_Store, Thumbs.db,
__MACOSX) are ignored; files without an image extension are listed as skipped.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

try:
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; Pillow decodes every JPEG anyway
    simplejpeg = None

from transferkit.errors import DataError

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


def iter_image_files(folder: Path) -> Iterator[tuple[Path, str | None]]:
    """Walk a folder recursively in sorted order, following symlinks once.

    Yields:
        (path, None) for each file with an image extension and (path, reason) for other
        files, which callers report as skipped. Symlink loops are walked once.
    """
    seen: set[str] = set()

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
            if is_dir:
                yield from walk(path)
            elif is_file:
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    yield path, None
                else:
                    yield path, f"not an image file extension ({path.suffix or 'none'})"
            else:
                yield path, "broken link or not a regular file"

    yield from walk(folder)


def index_folder(root: str | os.PathLike) -> FolderIndex:
    """Index a folder of class sub-folders.

    Args:
        root: the data folder; each sub-folder is a class.

    Returns:
        A ``FolderIndex``; files are not opened yet.

    Raises:
        DataError: the folder is missing, is a file, or has fewer than two class folders
            holding image files.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass a folder with one sub-folder per class")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; pass a folder with one sub-folder per class")
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
    paths: list[Path] = []
    labels: list[int] = []
    skipped: list[tuple[Path, str]] = []
    empty: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        found = 0
        for path, reason in iter_image_files(class_dir):
            if reason is None:
                paths.append(path)
                labels.append(label)
                found += 1
            else:
                skipped.append((path, reason))
        if found == 0:
            empty.append(class_dir.name)
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
    return FolderIndex(
        root=root,
        class_names=tuple(path.name for path in class_dirs),
        paths=tuple(paths),
        labels=np.asarray(labels, dtype="int64"),
        skipped=tuple(skipped),
    )
































