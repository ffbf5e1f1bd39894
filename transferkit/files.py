"""File-system steps every layer shares: atomic writes and where a new folder would go.

A file written with ``atomic_path`` or ``write_atomic`` is written under a temporary name
beside its destination, flushed to disk (fsync) and only then renamed over it, so a crash,
a full disk or a kill at any moment leaves either the old file or the new one, never a
half-written one. Every temporary name carries the writer's process id
(``.NAME.partial-PID...``, ``.NAME.replaced-PID``, ``.NAME.removing-PID``), so ``remove_leftovers`` can tell the
temporary files of a killed process from those of a live one and remove them, with a notice.
``fault_point`` marks the instants where the tests kill a process (test-only). No Keras import.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

from transferkit.errors import first_line

log = logging.getLogger("transferkit")

# The temporary names of this module, of staging folders (``staging_folder``) and of the
# folders ``replace_folder`` moves aside: a leading dot, the final name, the writer's pid.
_TEMPORARY_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|replaced|removing)-(?P<pid>\d+)(?:\D.*)?$")


# Test-only: TRANSFERKIT_FAULT=<point> kills the process with SIGKILL when it reaches that
# point (tests/reliability/test_faults.py), to prove what a kill -9 there leaves. The points:
FAULT_VARIABLE = "TRANSFERKIT_FAULT"
FAULT_POINTS = (
    "run.epoch_saved",     # training.checkpoint.WorkFolder._write: an epoch's checkpoint is complete on disk
    "run.staged",          # runs.save_run: the run folder is complete under its temporary name, not renamed
    "run.published",       # workflow._train: the run folder is renamed into place, RUN.partial not removed
    "folder.moved_aside",  # replace_folder: the old folder is moved aside, the new one not renamed into place
    "export.staged",       # locks.publishing: the export is complete in OUT.partial/staging, not renamed
    "export.published",    # locks.publishing: renamed into place, OUT.partial not removed
    "evaluation.staged",   # the same for evaluate -o
    "evaluation.published",
    "audit.staged",        # the same for audit -o
    "audit.published",
    "explain.staged",      # the same for explain -o
    "explain.published",
    "tune.trial",          # tuning.search: a trial has reported its first epoch, mid-training
)


def fault_point(name: str) -> None:
    """Test-only: kill this process at once (SIGKILL: no handler, no clean-up, as a kill -9 or
    the out-of-memory killer would) when ``TRANSFERKIT_FAULT`` names this point; otherwise
    nothing (one environment look-up).

    Args:
        name: one of ``FAULT_POINTS``.
    """
    assert name in FAULT_POINTS, name
    if os.environ.get(FAULT_VARIABLE) == name:
        os.kill(os.getpid(), signal.SIGKILL)


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
    """Write text or bytes to ``path`` atomically (see ``atomic_path``). Text is encoded with
    ``surrogateescape``: file names that are not UTF-8 keep their bytes.

    Args:
        path: the file.
        content: str (written with ``encoding``) or bytes.
        encoding: default "utf-8".

    Returns:
        The path.
    """
    path = Path(path)
    with atomic_path(path) as temporary:
        # surrogateescape: a file name that is not UTF-8 (os.fsdecode's surrogates) is
        # written as its own bytes instead of failing the whole write.
        temporary.write_bytes(content if isinstance(content, bytes) else content.encode(encoding, "surrogateescape"))
    return path


def flush_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder under ``folder``, so that the rename that publishes it
    never publishes files whose data is not on the disk yet (writers such as ``model.save``
    and matplotlib do not flush)."""
    for root, _, names in os.walk(folder):
        for name in names:
            fsync_file(Path(root) / name)
        fsync_folder(root)


def staging_folder(target: str | os.PathLike) -> Path:
    """The temporary name a folder is filled under before ``replace_folder`` publishes it:
    ``.NAME.partial-PID`` beside ``target`` (not created)."""
    target = Path(target)
    return target.parent / f".{target.name}.partial-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError, ValueError):
        return False
    return True


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that killed processes left in ``folder``
    (names from ``atomic_path``, ``staging_folder`` and ``replace_folder`` whose process is
    gone), each named in a warning. A folder that ``replace_folder`` had moved aside when its
    process was killed, before the new one took its name, is put back instead. Nothing of a
    live process is touched; a folder that cannot be read or entries that cannot be removed
    are left as they are.

    A process id is checked on this machine only: on a folder shared between machines, a
    leftover of a process that still runs elsewhere with a pid that is free here would go.

    Args:
        folder: the folder to look in (not recursively).

    Returns:
        The removed paths.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY_NAME.match(entry.name)
        if match is None:
            continue
        pid = int(match["pid"])
        if pid == os.getpid() or pid_alive(pid):
            continue
        original = entry.parent / match["name"]
        if match["kind"] == "replaced" and not os.path.lexists(original):
            _put_back(entry, original, pid)
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except OSError:
            continue
        log.warning("removed %s, left by a process that was killed while writing %s (pid %d)",
                    entry, match["name"], pid)
        removed.append(entry)
    return removed


def _put_back(entry: Path, original: Path, pid: int) -> bool:
    try:
        os.replace(entry, original)
    except OSError:
        return False
    log.warning("put %s back, which a process killed while replacing it had moved aside (pid %d)", original, pid)
    return True


def put_back_replaced(target: str | os.PathLike) -> bool:
    """Put back a folder that ``replace_folder`` had moved aside when its process was killed,
    before the new one took its name: what a command that reads ``target`` does when it
    finds nothing there, so that a run whose replacement was killed is found, not told
    missing. Only a folder of a process that is gone, and only where ``target`` is free.

    Args:
        target: the folder looked for.

    Returns:
        True when it was put back (and ``target`` now exists).
    """
    target = Path(target)
    if os.path.lexists(target) or not target.name:
        return False
    try:
        entries = list(target.parent.glob(f".{glob.escape(target.name)}.replaced-*"))
        entries.sort(key=lambda entry: entry.stat().st_mtime, reverse=True)  # the newest first
    except OSError:
        return False
    for entry in entries:
        match = _TEMPORARY_NAME.match(entry.name)
        if match is None or match["name"] != target.name or match["kind"] != "replaced":
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and not pid_alive(pid) and _put_back(entry, target, pid):
            return True
    return False


def replace_folder(staging: Path, target: Path) -> Path:
    """Put a filled staging folder in place of ``target`` (which may exist): the old folder
    is moved aside, the staging folder renamed to ``target``, the old one removed, and the
    rename flushed to disk. A reader sees the old folder or the new one, never a mixture; a
    kill between the two renames leaves neither under ``target`` until the next
    ``remove_leftovers`` there, or a reader looking for it (``put_back_replaced``), puts the
    old one back.

    Returns:
        ``target``.
    """
    retired = target.parent / f".{target.name}.replaced-{os.getpid()}"
    if target.exists():
        os.replace(target, retired)
        fault_point("folder.moved_aside")
    os.replace(staging, target)
    if os.path.lexists(retired):
        # Renamed before it is deleted: a kill half-way through leaves a folder no reader
        # would ever put back (only remove_leftovers' to delete).
        removing = target.parent / f".{target.name}.removing-{os.getpid()}"
        os.replace(retired, removing)
        shutil.rmtree(removing, ignore_errors=True)
    fsync_folder(target.parent)
    return target


def existing_ancestor(path: Path) -> Path:
    """The nearest part of ``path`` that exists (``path`` itself when it does): where a
    folder that is not there yet would be created."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def require_not_a_file(output: str | os.PathLike) -> None:
    """Refuse an output folder path where a file stands.

    Raises:
        RunError: ``output`` is a file.
    """
    from transferkit.errors import RunError

    if os.path.exists(output) and not os.path.isdir(output):
        raise RunError(f"output {output} is a file; pass a folder path with -o")


def require_new_file(output: str | os.PathLike, force: bool, what: str) -> None:
    """Refuse to replace an existing output file (predictions, a plot) unless asked to.

    Args:
        output: the file to be written.
        force: an existing file may be replaced.
        what: what the file is, for the message ("predictions file", "plot").

    Raises:
        RunError: it is a folder, or it exists and ``force`` is not given.
    """
    from transferkit.errors import RunError

    if os.path.isdir(output):
        raise RunError(f"{what} {output} is a folder; name a file in it, or another file, with -o")
    if os.path.exists(output) and not force:
        raise RunError(f"{what} {output} exists already; pass --force to replace it or choose another -o")


def require_writable_place(folder: str | os.PathLike) -> None:
    """Fail before any work where ``folder`` could not be created or written: a file stands
    where a folder of its path should be, or the nearest part of it that exists is not
    writable.

    Raises:
        RunError: either of those, naming the part and what to do.
    """
    from transferkit.errors import RunError

    folder = Path(os.path.abspath(folder))
    existing = existing_ancestor(folder)
    if not existing.is_dir():
        raise RunError(f"cannot create {folder}: {existing} is a file; choose another -o")
    if not os.access(existing, os.W_OK | os.X_OK):
        try:
            read_only = bool(os.statvfs(existing).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):  # no statvfs (Windows)
            read_only = False
        why = "its filesystem is read-only" if read_only else "permission denied"
        raise RunError(f"cannot write into {existing} ({why}); choose another -o")
    # The permission bits do not tell everything (root passes them; /proc, /sys and some
    # network filesystems refuse a new folder anyway): an empty folder made there and removed.
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".transferkit-probe-", dir=existing))
    except OSError as error:
        reason = WRITE_FAILURES.get(error.errno) or error.strerror or first_line(error)
        raise RunError(f"cannot write into {existing} ({reason}); choose another -o") from error


def require_apart(output: str | os.PathLike, data_folders, what: str) -> None:
    """Refuse an output folder that is a data folder, lies inside one (what it writes would
    be read as a class of images, or mixed into one) or holds one (replacing it would
    delete the data). Paths are compared with symbolic links resolved, so that a link to
    the data is the data.

    Args:
        output: the folder to be written (it need not exist).
        data_folders: the folders read (None entries are passed over).
        what: what the output is, for the message ("run folder", "evaluation folder").

    Raises:
        RunError: it is, lies inside or holds one of them.
    """
    from transferkit.errors import RunError

    def real(path) -> Path:
        path = Path(os.path.abspath(path))
        existing = existing_ancestor(path)
        return existing.resolve() / path.relative_to(existing)

    target = real(output)
    for folder in data_folders:
        if folder is None:
            continue
        data = real(folder)
        if target == data:
            raise RunError(f"{what} {output} is the data folder {folder}; write it elsewhere with -o")
        if data in target.parents:
            raise RunError(f"{what} {output} is inside the data folder {folder} (its files would be read as "
                           "images of a class); write it outside it with -o")
        if target in data.parents:
            raise RunError(f"{what} {output} holds the data folder {folder}; choose another -o")


# errno -> what a write failure is, in words a user acts on.
WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EFBIG: "the file size limit was reached (ulimit -f)",
    errno.EROFS: "the filesystem is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def write_failure(error: BaseException) -> str:
    """Why a write failed, in a few words: the path it names (when it names one) and the cause.

    Args:
        error: an ``OSError``, or an error a writer raised for one (h5py, Keras), with the
            ``OSError`` as its cause or context.

    Returns:
        For example "the disk is full (writing /runs/x/model.keras)".
    """
    cause = error
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    if cause is None:
        return first_line(error)
    reason = WRITE_FAILURES.get(cause.errno) or cause.strerror or first_line(cause)
    return f"{reason} (writing {cause.filename})" if cause.filename else reason


def cache_root() -> Path:
    """Where transferkit keeps what it can compute again (converted inference networks,
    compiled programs): ``$TRANSFERKIT_CACHE``, else ``$XDG_CACHE_HOME/transferkit``
    (default ``~/.cache/transferkit``). Not created here.
    """
    root = os.environ.get("TRANSFERKIT_CACHE")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "transferkit")
    return Path(root)


def named_folder(path: str | os.PathLike) -> Path:
    """The path, made absolute when it ends in "." or ".." (those name no folder that a
    temporary one could be written beside and renamed to)."""
    path = Path(path)
    return Path(os.path.abspath(path)) if path.name in ("", ".", "..") else path
