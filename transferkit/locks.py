"""Owner locks on folders being written: one writer at a time, named to anyone who comes second.

A folder X that transferkit writes (a run, an export, an evaluation) is written while its
process holds ``X.partial/lock``, an OS file lock (``filelock``: ``flock`` on Linux), with
``X.partial/owner.json`` beside it:

    {"pid": 4242, "host": "gpu-3", "started": "2025-06-01T10:12:03+00:00",
     "command": "transferkit finetune images/ -o X", "kind": "run"}

A second writer aimed at X is refused with one line naming that owner, whatever its flags.
The operating system releases the lock when its process ends, however it ends: a lock that
can be taken while an owner record is still there was left by a process that died (killed,
out of memory, the machine rebooted); ``FolderLock.previous`` hands that record to the
caller, which tells an interrupted run as resumable and removes other leftovers.

What it does not protect: folders on a network filesystem whose locks do not work (some NFS
and SMB setups), where two machines can both take the lock. No Keras import.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shlex
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from transferkit.errors import RunError
from transferkit.files import (
    fault_point,
    flush_tree,
    named_folder,
    pid_alive,
    remove_leftovers,
    replace_folder,
    write_atomic,
)

log = logging.getLogger("transferkit")

LOCK_FILE = "lock"
OWNER_FILE = "owner.json"
JOB_FILE = "job.json"  # in a run's in-progress folder: what it trains (training.checkpoint writes it)
# In a data-parallel run's in-progress folder: one lock file per process from the meeting to the
# end of its training (training.data_parallel's ``register``, ``PartnerWatch``).
PROCESSES_FOLDER = "processes"

# Folders whose lock this process holds: the checks that run while it writes (``runs.check_writable``
# before the final rename) must not take its own lock for another writer's.
_HELD: dict[Path, FolderLock] = {}


def work_dir_for(output: str | os.PathLike) -> Path:
    """The in-progress folder of X: ``X.partial`` beside it, which holds X's lock while X is
    being written (and, for a run, its checkpoints). X may end in "." or ".." (``-o .``):
    it is made absolute first, so that the folder is named for the folder X names."""
    output = named_folder(output)
    return output.parent / f"{output.name}.partial"


def stamped_folder(parent: str | os.PathLike, name: str) -> Path:
    """``PARENT/NAME-<YYYYmmdd-HHMMSS>``, the default name of a command's output folder;
    ``-2``, ``-3`` ... after it where that folder, or its in-progress one (``work_dir_for``),
    exists already (two commands started in the same second).

    Returns:
        The path (not created).
    """
    import datetime

    stamped = Path(parent) / f"{name}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    path, count = stamped, 1
    while path.exists() or work_dir_for(path).exists():
        count += 1
        path = stamped.with_name(f"{stamped.name}-{count}")
    return path


def command_line() -> str:
    """This process's command line as a user typed it (``transferkit ...`` for the CLI)."""
    words = list(sys.argv)
    if words and (words[0].endswith(("__main__.py", "/transferkit")) or words[0] == "transferkit"):
        words[0] = "transferkit"
    return shlex.join(words) if words else f"python (pid {os.getpid()})"


def owner_record(kind: str) -> dict:
    """What ``owner.json`` holds for this process writing a folder of ``kind``."""
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command_line(),
        "kind": kind,
    }


def read_owner(folder: Path) -> dict | None:
    """The owner record in a lock folder, or None when there is none or it is unreadable."""
    try:
        record = json.loads((Path(folder) / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_owner(record: dict | None) -> str:
    """"pid 4242 on gpu-3 since 2025-06-01T10:12:03+00:00 (command: transferkit ...)"."""
    if not record:
        return "another process (its owner record is not written yet)"
    return (f"pid {record.get('pid', '?')} on {record.get('host', '?')} since {record.get('started', '?')} "
            f"(command: {record.get('command', '?')})")


class FolderLock:
    """The owner lock of a folder being written, held by this process.

    Attributes:
        folder: the lock folder (``X.partial``).
        previous: the owner record a dead process left there (it was killed while writing),
            or None when the folder was new or its last owner ended cleanly.
    """

    def __init__(self, folder: Path, lock, previous: dict | None):
        self.folder = folder
        self.previous = previous
        self._lock = lock

    @classmethod
    def acquire(cls, folder: str | os.PathLike, kind: str, create: bool = True, wait: float = 0) -> FolderLock:
        """Take the lock of ``folder`` (created when missing, with ``create``), or fail.

        Args:
            folder: the lock folder, ``X.partial``.
            kind: what is written: "run", "export", "evaluation", "audit", "explain" or "tune" (recorded for
                whoever finds the folder later).
            create: make the folder (and its parents) when missing; default True.
            wait: seconds to wait for another owner to let go; default 0 (fail at once).

        Returns:
            The held ``FolderLock``; ``release`` (or leaving its ``with`` block) frees it.

        Raises:
            RunError: another process holds it (named: pid, host, since when, command), or
                the folder cannot be created or written.
        """
        import filelock

        folder = Path(folder)
        key = Path(os.path.abspath(folder))
        if key in _HELD:
            raise RunError(f"{folder} is being written by this process already ({describe_owner(read_owner(folder))})")
        created = create and not folder.exists()  # removed again when the lock cannot be taken

        def undo() -> None:
            if created:
                shutil.rmtree(folder, ignore_errors=True)

        try:
            if create:
                folder.mkdir(parents=True, exist_ok=True)
            lock = filelock.FileLock(str(folder / LOCK_FILE), timeout=wait, thread_local=False)
            lock.acquire()
        except filelock.Timeout:
            raise RunError(live_message(folder, read_owner(folder))) from None
        except OSError as error:
            undo()
            raise RunError(f"cannot write {folder}: {error.strerror or error}; choose another -o") from error
        held = cls(folder, lock, None)
        try:
            previous = read_owner(folder)
            if previous is not None and not _is_this_process(previous):
                held.previous = previous
            write_atomic(folder / OWNER_FILE, json.dumps(owner_record(kind), indent=2) + "\n")
        except OSError as error:
            undo()  # a full disk leaves no folder of this command's behind (gone before the lock is let go)
            lock.release()
            raise RunError(f"cannot write {folder / OWNER_FILE}: {error.strerror or error}; choose another -o") \
                from error
        _HELD[key] = held
        return held

    def release(self, restore: bool = False) -> None:
        """Remove the owner record (a clean end leaves none) and free the lock; twice is harmless.

        Args:
            restore: put back the record of the dead owner this lock was taken from (the
                folder is left as that owner left it: it was refused, not taken over);
                default False.
        """
        key = Path(os.path.abspath(self.folder))
        if _HELD.get(key) is self:
            del _HELD[key]
            with contextlib.suppress(OSError):
                if restore and self.previous is not None:
                    write_atomic(self.folder / OWNER_FILE, json.dumps(self.previous, indent=2) + "\n")
                else:
                    (self.folder / OWNER_FILE).unlink(missing_ok=True)
            self._lock.release()

    def clear(self) -> None:
        """Empty the folder but for the lock and the owner record (a takeover starts over)."""
        for entry in self.folder.iterdir():
            if entry.name in (LOCK_FILE, OWNER_FILE):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _is_this_process(record: dict) -> bool:
    return record.get("pid") == os.getpid() and record.get("host") == socket.gethostname()


def live_message(folder: Path, record: dict | None) -> str:
    """The one line that refuses a second writer."""
    folder = Path(folder)
    target = folder.with_name(folder.name.removesuffix(".partial"))  # X as it was given: runs/k9, not k9
    pid = (record or {}).get("pid")
    stop = f" (kill {pid})" if pid and (record or {}).get("host") == socket.gethostname() else ""
    return (f"{target} is being written by {describe_owner(record)}, which holds the lock in {folder}; "
            f"wait for it to finish or stop it{stop}, or choose another -o")


def held_by_another(folder: str | os.PathLike) -> dict | None:
    """Whether another process holds the lock of ``folder`` now: its owner record (an
    empty dict when it has written none yet), or None when nobody else does.

    The lock is tried and released at once; nothing is created.
    """
    import filelock

    folder = Path(folder)
    if Path(os.path.abspath(folder)) in _HELD or not (folder / LOCK_FILE).is_file():
        return None
    lock = filelock.FileLock(str(folder / LOCK_FILE), timeout=0, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        return read_owner(folder) or {}
    except OSError:
        return None
    lock.release()
    return None


def not_left_by_transferkit(folder: Path) -> list[str]:
    """The names of what an in-progress folder (``X.partial``) holds where no transferkit
    process left it: it has entries but neither an owner record (a process that died holding
    it) nor a job description (an interrupted run). A folder someone named so, or a finished
    run renamed to it: never removed by a run starting over.

    Returns:
        Its entry names, sorted (the lock file aside); empty where transferkit left it, or
        where it does not exist.
    """
    if not folder.is_dir() or (folder / OWNER_FILE).exists() or (folder / JOB_FILE).exists():
        return []
    # A data-parallel run's process locks, and what NFS leaves of a file deleted while open,
    # outlive a run that removed its folder while they were still open.
    return sorted(entry.name for entry in folder.iterdir()
                  if entry.name not in (LOCK_FILE, PROCESSES_FOLDER) and not entry.name.startswith(".nfs"))


def foreign_message(folder: Path, names: list[str], output: str | os.PathLike) -> str:
    """The one line that refuses to start over in a folder ``not_left_by_transferkit``."""
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return (f"{folder} holds {shown}, which no transferkit run left there (an interrupted run of {output} "
            f"would hold {JOB_FILE}); move it away, or choose another -o")


def require_not_live(output: str | os.PathLike) -> None:
    """Fail when another process is writing ``output`` now (it holds ``output.partial``'s lock).

    Raises:
        RunError: naming that process.
    """
    folder = work_dir_for(output)
    record = held_by_another(folder)
    if record is not None:
        raise RunError(live_message(folder, record or None))


def tell_previous(record: dict) -> str:
    """"pid 4242 on gpu-3 since ... (command: ...), which is gone": a dead owner, told."""
    here = record.get("host") == socket.gethostname()
    gone = "which is gone" if here and not pid_alive(int(record.get("pid") or 0)) else "which no longer holds the lock"
    return f"{describe_owner(record)}, {gone}"


STAGING = "staging"  # in a lock folder: the folder being filled, renamed to its final name


@contextlib.contextmanager
def publishing(target: str | os.PathLike, kind: str, check=None) -> Iterator[Path]:
    """Write a folder under its owner lock, and publish it only when it is complete.

    Holds ``TARGET.partial``'s lock, runs ``check`` under it (what was checked before the
    work began may have changed meanwhile: another process may have published the target),
    and yields an empty folder inside it to fill. When the block ends without an error, every
    file is flushed to disk and the folder is renamed to ``target`` (an existing one is
    replaced as a whole); either way ``TARGET.partial`` goes, and then the lock.

    Args:
        target: the final folder.
        kind: "export", "evaluation", "audit" or "explain" (recorded in the owner record).
        check: called with no argument under the lock, before anything is written; it
            raises to refuse. Default None.

    Yields:
        The folder to fill.

    Raises:
        RunError: another process is writing ``target`` (named), or ``TARGET.partial`` holds
            something else (an interrupted finetune into ``target``).
    """
    target = Path(target)
    folder = work_dir_for(target)
    remove_leftovers(target.parent)
    lock = FolderLock.acquire(folder, kind)
    published = False
    try:
        others = [entry.name for entry in folder.iterdir() if entry.name not in (LOCK_FILE, OWNER_FILE, STAGING)]
        if others and (lock.previous or {}).get("kind") != kind:
            lock.release(restore=True)
            raise RunError(f"{folder} holds {', '.join(sorted(others)[:3])}, not a {kind} being written (an "
                           f"interrupted finetune into {target}?); resume or remove it, or choose another -o")
        if (folder / STAGING).exists():
            log.warning("removing the unfinished %s in %s%s", kind, folder,
                        f", left by {tell_previous(lock.previous)}" if lock.previous else "")
        elif lock.previous is not None:  # killed after it published, or before it began
            log.warning("taking over %s, left by %s with no %s unfinished in it", folder,
                        tell_previous(lock.previous), kind)
        lock.clear()
        if check is not None:
            check()
        staging = folder / STAGING
        staging.mkdir()
        yield staging
        flush_tree(staging)
        fault_point(f"{kind}.staged")
        replace_folder(staging, target)
        published = True
        fault_point(f"{kind}.published")
    finally:
        if published or not others_kept(folder):
            shutil.rmtree(folder, ignore_errors=True)
        lock.release()


def others_kept(folder: Path) -> bool:
    """Whether a lock folder holds more than its lock, owner record and staging folder."""
    try:
        return any(entry.name not in (LOCK_FILE, OWNER_FILE, STAGING) for entry in folder.iterdir())
    except OSError:
        return False
