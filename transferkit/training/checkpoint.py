"""Interruption and resume: an in-progress folder beside the run, saved after every epoch.

While ``finetune`` trains into RUN, it keeps ``RUN.partial/`` (never mistaken for a finished
run: it has no model.keras or labels.json) holding:

    job.json            what was asked: data folder, validation folder, output, options
    recipe.toml         the resolved recipe
    checkpoint.keras    the model after the last completed epoch, optimizer state included
    arrays-N.npz        the best weights of the current stage so far (early stopping), the
                        optimizer's variables, and, in a stage trained on cached features,
                        the weights of the part that trains (saved per epoch instead of the
                        whole model; checkpoint.keras then holds the model as the stage began)
    state.json          stage index, epochs done in it, early-stopping counters, history

Ctrl-C (SIGINT) or SIGTERM stops training at the end of the current batch; the epoch that
was cut short is dropped, so the checkpoint is always the last completed epoch, and
``transferkit finetune --resume RUN`` continues from there. When the run completes, the
finished folder is written atomically and RUN.partial is removed (a process killed between
the two leaves a RUN.partial whose job.json holds the ``run_id`` of RUN's labels.json: the
next finetune or --resume removes it, ``remove_if_finished``).

The process that trains holds RUN.partial's owner lock (``transferkit.locks``: ``lock`` and
``owner.json`` in it) from ``create`` or ``open`` to ``remove`` or ``release``, the final
rename included: a second finetune or ``--resume`` of RUN is refused, naming it. A folder
whose owner died (killed, out of memory) is an interrupted run like one stopped by Ctrl-C,
and its owner is named when it is resumed or started over.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from transferkit.errors import DataError, RunError, TrainingInterrupted
from transferkit.files import atomic_path, fault_point, remove_leftovers, write_atomic, write_failure
from transferkit.locks import (
    JOB_FILE,
    LOCK_FILE,
    OWNER_FILE,
    FolderLock,
    foreign_message,
    not_left_by_transferkit,
    tell_previous,
    work_dir_for,
)
from transferkit.runs import LABELS_FILE
from transferkit.runtime import take_noted_signal
from transferkit.strategies import alone

log = logging.getLogger("transferkit")

STATE_FILE = "state.json"
CHECKPOINT_FILE = "checkpoint.keras"


@dataclass
class TrainingState:
    """Where training stands: stage ``stage_index`` has ``epochs_done`` completed epochs."""

    stage_index: int = 0
    epochs_done: int = 0
    global_epoch: int = 0
    calibrated: bool = False
    part_only: bool = False
    arrays_file: str | None = None
    best: float | None = None
    wait: int = 0
    best_epoch: int = 0
    history: list[dict] = field(default_factory=list)
    # The head-loss guard's record (training.int8_guard), once a stage trained on int8
    # features: a resumed run computes its later stages' features as the guard decided.
    int8_guard: dict | None = None
    # hflip = "auto"'s decision (training.flips.flip_record), once made: a resumed run trains
    # its later stages as it decided.
    hflip: dict | None = None


def output_for(path: Path) -> Path:
    """The run a path names: RUN for either RUN or RUN.partial."""
    return path.with_name(path.name[: -len(".partial")]) if path.name.endswith(".partial") else path


def in_progress_for(run: str | os.PathLike) -> Path:
    """The in-progress folder a path names: RUN.partial for either RUN or RUN.partial."""
    run = Path(run)
    return run if run.name.endswith(".partial") else work_dir_for(run)


class StopFlag:
    """Set by a signal handler; training checks it after every batch."""

    def __init__(self) -> None:
        self.requested: str | None = None


# What the stop warning says is kept when training checkpoints into a work folder.
KEEPS_LAST_EPOCH = "keeping the last completed epoch"


def stop_if_requested(stop: StopFlag | None, work: WorkFolder | None) -> None:
    """Raise ``TrainingInterrupted`` once a signal asked training to stop, after the work
    folder's last checkpoint is written.

    Args:
        stop: the run's ``StopFlag``, or None (no signals watched).
        work: the run's ``WorkFolder``, or None (nothing kept).

    Raises:
        TrainingInterrupted: the flag is set.
    """
    if stop is not None and stop.requested:
        if work is not None:
            work.flush()
        raise TrainingInterrupted(
            f"{stop.requested}: training stopped; the last completed epoch is saved. "
            "Continue with: transferkit finetune --resume RUN"
        )


@contextlib.contextmanager
def stop_on_signals(flag: StopFlag, keeping: str = KEEPS_LAST_EPOCH):
    """Turn the first SIGINT/SIGTERM into a polite stop request; a second one is immediate.

    Only installs handlers from the main thread (signals cannot be caught elsewhere).

    Args:
        flag: the ``StopFlag`` to set.
        keeping: what the warning says is kept; default ``KEEPS_LAST_EPOCH``.
    """
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {}

    def handle(signum, frame):
        if flag.requested is not None:
            raise KeyboardInterrupt
        flag.requested = signal.Signals(signum).name
        log.warning("%s received: stopping after this batch and %s (press Ctrl-C again to stop at once)",
                    flag.requested, keeping)

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, handle)
    # One that came before training and was lost on the way (see runtime.take_noted_signal)
    # stops it at its first check.
    flag.requested = flag.requested or take_noted_signal()
    try:
        yield flag
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def remove_if_finished(run: str | os.PathLike) -> Path | None:
    """Remove the in-progress folder of a run that is finished: its process published the
    run folder and was killed before it removed RUN.partial. The two are told apart from an
    interrupted run by the ``run_id`` that job.json and the run's labels.json both hold.

    Args:
        run: the run folder (or its ``.partial`` folder).

    Returns:
        The finished run folder when its in-progress folder was removed (with a warning),
        else None (nothing there, an interrupted run, or its process is still removing it).
    """
    path = in_progress_for(run)
    output = output_for(path)
    try:
        run_id = json.loads((path / JOB_FILE).read_text(encoding="utf-8")).get("run_id")
        finished = json.loads((output / LABELS_FILE).read_text(encoding="utf-8")).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    if not run_id or run_id != finished:
        return None
    try:
        lock = FolderLock.acquire(path, "run", create=False)
    except RunError:
        return None  # its process is alive, about to remove it
    writer = tell_previous(lock.previous) if lock.previous else "a process that has ended"
    log.warning("%s is finished; removing its in-progress folder %s, which its writer left when it ended just "
                "after publishing the run: %s", output, path, writer)
    shutil.rmtree(path, ignore_errors=True)
    lock.release()
    return output


class WorkFolder:
    """The in-progress folder: job description, recipe, checkpoints and state."""

    def __init__(self, path: Path, lock: FolderLock | None = None):
        from concurrent.futures import ThreadPoolExecutor

        self.path = path
        self.lock = lock  # the owner lock, held from ``create`` / ``open`` to ``remove`` / ``release``
        self.created_parents: list[Path] = []  # by ``create``, deepest first
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="transferkit-checkpoint")
        self._pending = None
        self.reader = False  # only reads the folder another process owns (``open(owner=False)``)
        existing = [int(p.stem.split("-")[1]) for p in path.glob("arrays-*.npz") if p.stem.split("-")[1].isdigit()]
        self._generation = max(existing, default=0)

    @classmethod
    def create(cls, output: Path, job: dict, recipe_toml: str, force: bool) -> WorkFolder:
        """Start a new in-progress folder and hold its lock; an interrupted run there is
        replaced only with ``force``.

        Raises:
            RunError: another process is training into it (named, whatever ``force`` says),
                an interrupted run is there already and ``force`` is not set, or it holds
                what no transferkit run left there (whatever ``force`` says).
        """
        path = work_dir_for(output)
        remove_leftovers(path.parent)  # half-written run folders of killed processes
        foreign = not_left_by_transferkit(path)
        if foreign:  # looked at before the lock is taken: taking it writes into the folder
            raise RunError(foreign_message(path, foreign, output))
        # Folders made for it go again with it when the run leaves nothing (see ``remove``).
        created = [parent for parent in path.absolute().parents if not parent.exists()]
        made = not path.exists()
        lock = FolderLock.acquire(path, "run")
        try:
            kept = [entry for entry in path.iterdir() if entry.name not in (LOCK_FILE, OWNER_FILE)]
            left_by = f" (left by {tell_previous(lock.previous)})" if lock.previous else ""
            if kept and (path / JOB_FILE).is_file() and not force:
                lock.release(restore=True)  # left as it was, for --resume to tell
                raise RunError(
                    f"an interrupted run of {output} is in {path}{left_by}; continue it with "
                    f"--resume {output}, or pass --force to start over"
                )
            if kept:
                if lock.previous is not None:
                    log.warning("starting over in %s, removing what %s left there", path,
                                tell_previous(lock.previous))
                lock.clear()
            write_atomic(path / JOB_FILE, json.dumps(job, indent=2) + "\n")
            write_atomic(path / "recipe.toml", recipe_toml)
        except OSError as error:
            lock.release()
            if made:
                shutil.rmtree(path, ignore_errors=True)
            raise RunError(f"cannot write {path}: {write_failure(error)}; choose another -o") from error
        except BaseException:
            lock.release()
            if made:
                shutil.rmtree(path, ignore_errors=True)
            raise
        work = cls(path, lock)
        work.created_parents = created
        return work

    @classmethod
    def open(cls, run: str | os.PathLike, owner: bool = True) -> WorkFolder:
        """Find the in-progress folder of RUN (or RUN.partial itself) and hold its lock.

        Args:
            run: the run folder, or its ``.partial`` folder.
            owner: take the lock; default True. Without it the folder is only read (a
                data-parallel process other than 0 resumes from the checkpoint that process
                0 owns): ``save`` writes nothing.

        Raises:
            RunError: another process is training into it (named), or there is nothing to
                resume.
        """
        path = in_progress_for(run)
        if not owner:
            if not (path / JOB_FILE).is_file():
                raise _nothing_to_resume(path)
            reader = cls(path)
            reader.reader = True
            return reader
        lock = FolderLock.acquire(path, "run", create=False) if path.is_dir() else None
        if not (path / JOB_FILE).is_file():
            if lock is not None:
                lock.release()
            raise _nothing_to_resume(path)
        if lock.previous is not None:
            log.warning("%s was interrupted: %s; resuming from its last completed epoch", path,
                        tell_previous(lock.previous))
        remove_leftovers(path)  # checkpoint files a killed process was writing
        remove_leftovers(path.parent)
        return cls(path, lock)

    def release(self) -> None:
        """Free the owner lock (the folder stays, for ``--resume``); twice is harmless."""
        self.flush_quietly()
        if self.lock is not None:
            self.lock.release()

    def flush_quietly(self) -> None:
        """Wait for the background write, ignoring its failure (already told, or to be told)."""
        with contextlib.suppress(Exception):
            self.flush()

    def job(self) -> dict:
        """What the run was started with (data folders, output, options).

        Raises:
            RunError: the file is damaged.
        """
        job = self._read_json(JOB_FILE)
        if not isinstance(job, dict) or "data_dir" not in job:
            raise self._damaged(JOB_FILE, "no data folder recorded")
        return job

    def require_backbone(self, job: dict) -> None:
        """Check that the backbone the run started with is known here.

        Args:
            job: this folder's ``job()``, as read.

        Raises:
            RunError: it came from a package (job.json "backbone_package") that no longer
                adds it: the message names the package to install.
        """
        from transferkit.backbones import find_spec

        name, package = job.get("backbone"), job.get("backbone_package")
        if name and package and find_spec(name) is None:
            raise RunError(f"{self.path / JOB_FILE}: the interrupted run's backbone {name!r} comes from the package "
                           f"{package}, which is not installed here; install it (pip install {package}), then resume")

    def data_folders(self, data_dir=None, val_dir=None) -> tuple:
        """Where the run's data is now: (data folder, validation folder or None), where they
        were recorded unless new places are given.

        Raises:
            DataError: a recorded folder is gone and no new place was given.
        """
        job, output = self.job(), output_for(self.path)
        for name, given, recorded in (("DATA_DIR", data_dir, job["data_dir"]),
                                      ("--val-dir", val_dir, job.get("val_dir"))):
            if given is None and recorded is not None and not Path(recorded).is_dir():
                new_place = "NEW_DATA_DIR" if name == "DATA_DIR" else "... --val-dir NEW_DIR"
                raise DataError(f"the data of the interrupted run, {recorded}, is gone; if it moved, give its new "
                                f"place: transferkit finetune {new_place} --resume {output}")
        return (data_dir if data_dir is not None else job["data_dir"],
                val_dir if val_dir is not None else job.get("val_dir"))

    def state(self) -> TrainingState:
        """Where training stands (the start, before the first checkpoint).

        Raises:
            RunError: the file is damaged.
        """
        if not (self.path / STATE_FILE).is_file():
            return TrainingState()
        values = self._read_json(STATE_FILE)
        try:
            return TrainingState(**values)
        except TypeError as error:
            raise self._damaged(STATE_FILE, str(error)) from error

    def _read_json(self, name: str):
        try:
            return json.loads((self.path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise self._damaged(name, getattr(error, "strerror", None) or str(error)) from error

    def _damaged(self, name: str, reason: str) -> RunError:
        return RunError(f"the interrupted run in {self.path} is damaged ({name}: {reason}); "
                        "start over with --force")

    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT_FILE).is_file() and (self.path / STATE_FILE).is_file()

    def save(self, model, state: TrainingState, best_weights=None, optimizer=None, part_weights=None,
             whole_in_background: bool = False) -> None:
        """Checkpoint the run; the arrays and state are written in the background.

        The whole model (checkpoint.keras) is written here when ``part_weights`` is None.
        Best weights, optimizer variables and trained-part weights go into one new
        ``arrays-N.npz``, then state.json is replaced to point at it, so a crash at any
        moment leaves the previous consistent checkpoint. At most one write is in flight;
        ``flush`` waits for it.

        Args:
            model: the whole classifier.
            state: where training stands.
            best_weights: early stopping's best weights of the model being fitted, or None.
            optimizer: the optimizer of the model being fitted, or None between stages.
            part_weights: the weights of the part being fitted on cached features; then
                only these are written, and checkpoint.keras stays as the stage began.
            whole_in_background: with ``part_weights``, also write checkpoint.keras, in the
                background: the model outside the part must not change meanwhile (it is
                frozen), and the part's weights in it are superseded by ``part_weights``.
        """
        import keras

        if self.reader:
            return
        self.flush()
        if part_weights is None:
            self._save_whole(model)
        state.part_only = part_weights is not None
        arrays: dict[str, np.ndarray] = {}
        groups = {"best": best_weights, "part": part_weights,
                  "optimizer": _variable_values(optimizer) if optimizer is not None else None}
        for group, values in groups.items():
            for index, value in enumerate(values or []):
                arrays[f"{group}/{index:05d}"] = np.asarray(value)
        self._generation += 1
        state.arrays_file = f"arrays-{self._generation}.npz" if arrays else None
        whole = model if whole_in_background and part_weights is not None else None
        if whole is not None and keras.config.backend() == "jax":
            # Keras on JAX detaches the values of the variables it fits while ``fit`` runs
            # (they live in its stateless train step until the epoch ends): written now.
            self._save_whole(whole)
            whole = None
        self._pending = self._writer.submit(self._write, dict(arrays), asdict(state), whole)

    def _save_whole(self, model) -> None:
        try:
            with atomic_path(self.path / CHECKPOINT_FILE) as temporary, alone():  # the others do not save
                model.save(temporary)
        except Exception as error:  # h5py and Keras wrap the OSError of a full disk
            raise self._write_failed(error) from error

    def _write_failed(self, error: BaseException) -> RunError:
        """The one line for a checkpoint that cannot be written: where, why, what is kept."""
        output = output_for(self.path)
        kept = (f"the last completed epoch is kept in {self.path}: once it can be written, continue with: "
                f"transferkit finetune --resume {output}") if self.has_checkpoint() else "nothing was kept"
        return RunError(f"cannot write the checkpoint in {self.path}: {write_failure(error)}; {kept}")

    def _write(self, arrays: dict, state: dict, whole=None) -> None:
        if whole is not None:
            self._save_whole(whole)
        if state["arrays_file"]:
            with atomic_path(self.path / state["arrays_file"]) as temporary, open(temporary, "wb") as handle:
                np.savez(handle, **arrays)
        # Last: state.json names the arrays file, which is complete on disk by now.
        write_atomic(self.path / STATE_FILE, json.dumps(state))
        for old in self.path.glob("arrays-*.npz"):
            if old.name != state["arrays_file"]:
                old.unlink(missing_ok=True)
        if state["epochs_done"]:
            fault_point("run.epoch_saved")

    def flush(self) -> None:
        """Wait for the background write; re-raise its error (a full disk, say)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            try:
                pending.result()
            except RunError:
                raise
            except Exception as error:
                raise self._write_failed(error) from error

    def load_model(self):
        """The model of the last checkpoint.

        Raises:
            RunError: checkpoint.keras is damaged (told as damaged) or cannot be loaded.
        """
        from transferkit.runs import load_keras_file

        return load_keras_file(self.path / CHECKPOINT_FILE,
                               "the interrupted run cannot be resumed: start over with --force")

    def best_weights(self):
        """Early stopping's best weights saved with the checkpoint, or None."""
        return self._arrays("best")

    def part_weights(self):
        """Weights of the part trained on cached features, or None."""
        return self._arrays("part")

    def restore_optimizer(self, model) -> None:
        """Give a freshly compiled model the optimizer state saved with the checkpoint.

        Raises:
            RunError: the saved state does not fit the model's optimizer.
        """
        saved = self._arrays("optimizer")
        if saved is None:
            return
        optimizer = model.optimizer
        optimizer.build(model.trainable_variables)
        if len(saved) != len(optimizer.variables) or any(
            tuple(value.shape) != tuple(variable.shape) for value, variable in zip(saved, optimizer.variables)
        ):
            raise RunError(f"the optimizer state in {self.path} does not fit the model; start over with --force")
        for value, variable in zip(saved, optimizer.variables):
            variable.assign(value)

    def _arrays(self, group: str):
        name = self.state().arrays_file
        if not name:
            return None
        # state.json is replaced only after the arrays it names are written: a missing or
        # unreadable file is damage, not an older layout.
        try:
            with np.load(self.path / name) as archive:
                keys = sorted(key for key in archive.files if key.startswith(group + "/"))
                return [archive[key] for key in keys] or None
        except (OSError, ValueError, zipfile.BadZipFile) as error:
            raise self._damaged(name, getattr(error, "strerror", None) or str(error)) from error

    def remove(self) -> None:
        """Delete the in-progress folder, and the folders ``create`` made for it if they are
        empty now (a run that failed or stopped early leaves no empty ``runs/`` behind)."""
        if self.reader:
            return
        self.flush_quietly()  # a write that failed meanwhile does not matter: its folder goes
        shutil.rmtree(self.path, ignore_errors=True)
        if self.lock is not None:  # after the folder went: nobody finds it half-removed
            self.lock.release()
        for parent in self.created_parents:
            try:
                parent.rmdir()
            except OSError:
                break  # not empty: the finished run is in it, or something else is


def require_resumable(run: str | os.PathLike) -> None:
    """Fail where ``--resume RUN`` has nothing to resume (no in-progress folder), as
    ``WorkFolder.open`` would, but before anything heavy is imported. A folder that is there
    is left to ``WorkFolder.open``, which tells a live writer from an empty folder.

    Raises:
        RunError: saying so, and what RUN is (a finished run, or nothing).
    """
    path = in_progress_for(run)
    if not path.is_dir():
        raise _nothing_to_resume(path)


def _nothing_to_resume(path: Path) -> RunError:
    finished = output_for(path)
    hint = f"{finished} is a finished run" if (finished / "model.keras").is_file() else f"no interrupted run at {path}"
    return RunError(f"nothing to resume: {hint}; start a new run without --resume")


def _variable_values(optimizer) -> list[np.ndarray]:
    import keras

    return [np.array(keras.ops.convert_to_numpy(variable)) for variable in optimizer.variables]


def interruption(interrupted: BaseException, work: WorkFolder | None, output: Path | None) -> TrainingInterrupted:
    """The one ``TrainingInterrupted`` a stopped training ends with, saying what was kept
    (and removing an in-progress folder that kept nothing).

    Args:
        interrupted: the ``TrainingInterrupted`` from the stop flag, or a ``KeyboardInterrupt``
            (a second Ctrl-C, which stops at once: the checkpoints on disk are each complete,
            so the last one still holds).
        work: the run's in-progress folder, or None (a training that writes nothing).
        output: the run folder it was training into, or None.

    Returns:
        The error to raise.
    """
    signal_name = str(interrupted).split(":")[0] if isinstance(interrupted, TrainingInterrupted) else "SIGINT again"
    if work is None:
        return TrainingInterrupted(f"{signal_name}: training stopped; nothing was written")
    if not work.path.exists() and output is not None and output.exists():  # stopped after the run was published
        return TrainingInterrupted(f"{signal_name} after {output} was written whole; only what followed it (logging "
                                   "the run to MLflow) was cut short")
    if not work.has_checkpoint() and not work.state().history:
        work.remove()
        return TrainingInterrupted(f"{signal_name}: training stopped before its first epoch ended; nothing was kept")
    return TrainingInterrupted(
        f"{signal_name}: training stopped; the last completed epoch is "
        f"saved in {work.path}. Continue with: transferkit finetune --resume {output}"
    )
