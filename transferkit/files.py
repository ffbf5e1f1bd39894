"""File-system steps every layer shares: atomic writes and where a new folder would go.

A file written with ``atomic_path`` or ``write_atomic`` is written under a temporary name
beside its destination, flushed to disk (fsync) and only then renamed over it, so a crash,
a full disk or a kill at any moment leaves either the old file or the new one, never a
half-written one. No Keras import.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written file's data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_folder(path: str | os.PathLike) -> None:
    """Flush a folder's entries (a rename into it) to the disk, where the system allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block ends
    without an error (after an fsync), removed when it raises.

    Args:
        path: the destination file.
        suffix: kept at the end of the temporary name, for writers that read the extension
            (``model.save`` needs ".keras"); default "" (the destination's own suffix).

    Yields:
        The temporary path (``.NAME.partial-PID`` + suffix, in the same folder).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}{suffix or path.suffix}")
    try:
        yield temporary
        fsync_file(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_folder(path.parent)


def write_atomic(path: str | os.PathLike, content: str | bytes, encoding: str = "utf-8") -> Path:
    """Write text or bytes to ``path`` atomically (see ``atomic_path``).

    Args:
        path: the file.
        content: str (written with ``encoding``) or bytes.
        encoding: default "utf-8".

    Returns:
        The path.
    """
    path = Path(path)
    with atomic_path(path) as temporary:
        if isinstance(content, bytes):
            temporary.write_bytes(content)
        else:
            temporary.write_text(content, encoding=encoding)
    return path


def replace_folder(staging: Path, target: Path) -> Path:
    """Put a filled staging folder in place of ``target`` (which may exist): the old folder
    is moved aside, the staging folder renamed to ``target``, the old one removed, and the
    rename flushed to disk. A reader sees the old folder or the new one, never a mixture.

    Returns:
        ``target``.
    """
    import shutil

    retired = target.parent / f".{target.name}.replaced-{os.getpid()}"
    if target.exists():
        os.replace(target, retired)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
    fsync_folder(target.parent)
    return target


def existing_ancestor(path: Path) -> Path:
    """The nearest part of ``path`` that exists (``path`` itself when it does): where a
    folder that is not there yet would be created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path
