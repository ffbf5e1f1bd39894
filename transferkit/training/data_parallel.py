"""Several processes training one run (``--strategy data-parallel``): what sets them apart.

Every process runs the same command. Before training they meet once (``meet``): each says
whether it got ready (its data read; for process 0 also the run's in-progress folder taken,
under its owner lock), and process 0 hands the run's id to the others. A process that
failed on the way is named to the others and all stop, so that none waits in training for a
partner that will never come (``failing_before_training`` tells them of the failure).

Then each process trains on its share of the images (``training.stages``). Process 0 alone
checkpoints into RUN.partial and, once training ends, leaves the distribution
(``leave_distribution``) to finish the run on its own: validation metrics, calibration, the
rejection threshold, the run folder. The others wait for it (``wait_for_run``) and end when
RUN is published with the run's id, or fail when process 0 let go of RUN.partial without
publishing. (They watch RUN.partial's lock: -o must be on a folder every process sees, as
for ``--resume``.)

While they train (``training_together``), a signal (Ctrl-C, SIGTERM) ends a data-parallel
process at once: the processes could not agree on a batch to stop after without a collective
step per batch, so each leaves as a killed one does, and the last completed epoch in
RUN.partial is what ``--resume`` (started the same way in every process) continues from. And
each watches the others (``PartnerWatch``: a lock file per process in RUN.partial/processes/,
which the system frees when its process dies): when one dies before its training ended, the
others stop within a second, with one line, instead of waiting in a collective step until
JAX gives up.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np

from transferkit.errors import RunError, StrategyError
from transferkit.locks import held_by_another, work_dir_for
from transferkit.runs import LABELS_FILE
from transferkit.strategies import Distribution

log = logging.getLogger("transferkit")

# In RUN.partial: one lock file per process while it trains (``register``, ``PartnerWatch``).
PROCESSES_FOLDER = "processes"
# Whether this process has met the others (a failure after that is not told at the meeting).
_MET: list[bool] = [False]


def _gather(failed: bool, run_id: str | None) -> np.ndarray:
    """Every process's (failed, run id bytes), one row per process."""
    from jax.experimental import multihost_utils

    mine = np.zeros(17, dtype=np.uint8)
    mine[0] = 1 if failed else 0
    if run_id:
        mine[1:] = np.frombuffer(bytes.fromhex(run_id), dtype=np.uint8)
    _MET[0] = True
    return np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, 17)


def meet(distribution: Distribution, run_id: str | None = None) -> str | None:
    """Meet the other processes before training: all got ready, or all stop.

    Args:
        distribution: the run's ``Distribution`` (a no-op for one process).
        run_id: the run's id (process 0: from RUN.partial's job.json); default None.

    Returns:
        Process 0's run id (None for one process).

    Raises:
        StrategyError: another process failed before training (it tells why).
    """
    if distribution.processes <= 1:
        return run_id
    every = _gather(False, run_id)
    failed = [index for index, row in enumerate(every) if row[0]]
    if failed:
        raise StrategyError(f"process(es) {', '.join(map(str, failed))} of {distribution.processes} stopped before "
                            "training (see their message); fix that and start every process again")
    return bytes(every[0, 1:]).hex() if every[0, 1:].any() else None


@contextlib.contextmanager
def failing_before_training(distribution: Distribution | None):
    """Tell the other processes when this one fails before it met them (they would wait for
    it in training otherwise); the error goes on as it was. None: nothing to tell."""
    try:
        yield
    except Exception:
        if distribution is not None and distribution.processes > 1 and not _MET[0]:
            _gather(True, None)
        raise


def leave_distribution(model, distribution: Distribution):
    """The trained model as a plain one on this process's devices, the distribution over
    the processes unset: process 0 finishes the run alone (other processes would have to take
    part in every prediction made under the distribution).

    Args:
        model: the trained classifier (its variables replicated on every process).
        distribution: the run's ``Distribution``.

    Returns:
        The model itself for one process; else a copy with the same weights.
    """
    if distribution.processes <= 1:
        return model
    import keras

    weights = model.get_weights()  # replicated: every process holds all of them
    keras.distribution.set_distribution(None)
    local = keras.models.clone_model(model)
    local.set_weights(weights)
    return local


def wait_for_run(output: Path, run_id: str | None, distribution: Distribution, poll: float = 0.5) -> Path:
    """Wait, in a process other than 0, for process 0 to publish the run.

    Args:
        output: the run folder process 0 writes.
        run_id: the run's id, from ``meet``.
        distribution: the run's ``Distribution``.
        poll: seconds between looks; default 0.5.

    Returns:
        ``output``, published.

    Raises:
        RunError: process 0 let go of RUN.partial without publishing the run (it failed or
            was stopped: its own message says which, and what it kept).
    """
    work = work_dir_for(output)
    if not work.exists() and not output.exists():
        log.warning("process %d: %s is not on this machine: process 0 writes the run there", distribution.process,
                    output)
        return output
    while True:
        if published(output, run_id) and not work.exists():
            return output
        if work.exists() and held_by_another(work) is None and not published(output, run_id):
            time.sleep(poll)  # it may be publishing just now: look once more
            if not published(output, run_id):
                raise RunError(f"process 0 stopped before it wrote {output} (its message says why); what it kept is "
                               f"in {work}: continue with transferkit finetune --resume {output}, started the same "
                               "way in every process")
        time.sleep(poll)


def published(output: Path, run_id: str | None) -> bool:
    """Whether ``output`` is a published run (with ``run_id``, unless None)."""
    try:
        labels = json.loads((output / LABELS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(labels, dict) and (run_id is None or labels.get("run_id") == run_id)


@contextlib.contextmanager
def training_together(distribution: Distribution, output: Path | None):
    """While this process trains beside the others: SIGINT or SIGTERM ends it at once, with one
    line (as a killed process ends: what RUN.partial holds is the last completed epoch), and
    the others are watched (``PartnerWatch``, through ``RUN.partial/processes/``): one that dies
    before its training ended stops this one too, with one line. Only from the main thread.

    Args:
        distribution: the run's ``Distribution``.
        output: the run folder, for the lines' ``--resume`` and the watch; None when nothing is
            written (nothing is watched then).
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = (f"the last completed epoch is kept in {work_dir_for(output)}; continue with: transferkit finetune "
            f"--resume {output}, started the same way in every process" if output is not None
            else "nothing was written")

    def handle(signum, frame):
        name = signal.Signals(signum).name
        sys.stderr.write(f"{name}: process {distribution.process} of {distribution.processes} stopped; {kept}\n")
        sys.stderr.flush()
        os._exit(128 + signum)  # the others cannot finish the step without it: no polite stop

    def lost(partner: int) -> None:
        sys.stderr.write(f"error: process {partner} of {distribution.processes} stopped during training (its own "
                         f"message says why), so process {distribution.process} stops too; {kept}\n")
        sys.stderr.flush()
        os._exit(1)  # its steps wait for the lost process in a collective that cannot be left

    folder = work_dir_for(output) / PROCESSES_FOLDER if output is not None else None
    handle_file = register(folder, distribution.process) if folder is not None and folder.parent.is_dir() else None
    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with (PartnerWatch(folder, distribution.process, distribution.processes, lost) if handle_file is not None
              else contextlib.nullcontext()):
            yield
        if handle_file is not None:
            finish(folder, distribution.process, handle_file)
    finally:
        if handle_file is not None:
            handle_file.close()  # after a failure: the others see it, as they would a killed process
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_REGISTERED: dict[str, object] = {}
PROCESSES_FOLDER = "processes"


def register(folder: Path, process: int):
    """Hold ``folder/process-N.lock`` (locked for as long as this process trains: the OS frees
    it when the process dies, whatever killed it). Put in place already locked, by a rename,
    so that a partner never sees it unlocked while this process lives.

    Returns:
        The open file (``finish`` renames and closes it).
    """
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"process-{process}.lock"
    staging = folder / f".process-{process}.{os.getpid()}.lock"
    handle = open(staging, "w")  # noqa: SIM115 - held until training ends
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    os.replace(staging, final)
    return handle


def finish(folder: Path, process: int, handle) -> None:
    """Say this process's training ended as it should: its lock file becomes ``.done`` (the
    same file, so a partner that saw it locked knows it is this one), then is let go."""
    with contextlib.suppress(OSError):
        os.replace(folder / f"process-{process}.lock", folder / f"process-{process}.done")
    handle.close()


class PartnerWatch:
    """Watch the other processes' lock files while training (``with``: a thread looks every
    ``poll`` seconds): one whose file this watch saw
    locked and then finds unlocked died (killed, crashed, stopped by a signal) before its
    training ended. The processes could not go on without it (each step is collective, and
    JAX would only give up minutes later, with pages of output), so ``lost(process)`` is
    called: by default one line and the end of this process.

    A file not yet seen locked (a partner still starting, or one left by an earlier, killed
    attempt) is never taken for a death, nor a partner that finished (``.done``) or whose
    file is gone.
    """

    def __init__(self, folder: Path, process: int, processes: int, lost, poll: float = 0.5):
        self.folder, self.process, self.processes, self.lost, self.poll = folder, process, processes, lost, poll
        self._seen: dict[int, int] = {}  # partner -> inode of its lock file, seen locked
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="transferkit-partners", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        partners = set(range(self.processes)) - {self.process}
        while partners and not self._stop.is_set():
            for partner in sorted(partners):
                state = self.look(partner)
                if state in ("done", "gone"):
                    partners.discard(partner)
                elif state == "dead" and not self._stop.is_set():
                    self.lost(partner)
                    return
            self._stop.wait(self.poll)

    def look(self, partner: int) -> str:
        """"alive", "starting", "done", "gone" or "dead"."""
        import fcntl

        path = self.folder / f"process-{partner}.lock"
        try:
            handle = open(path)  # noqa: SIM115
        except FileNotFoundError:
            if partner not in self._seen:
                return "starting"
            with contextlib.suppress(OSError):
                if (self.folder / f"process-{partner}.done").stat().st_ino == self._seen[partner]:
                    return "done"
            return "gone"
        except OSError:
            return "starting"
        with handle:
            inode = os.fstat(handle.fileno()).st_ino
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                self._seen[partner] = inode
                return "alive"
            fcntl.flock(handle, fcntl.LOCK_UN)
            return "dead" if self._seen.get(partner) == inode else "starting"


def follow_resumed(reader, recipe, data_dir, val_dir, distribution: Distribution, train):
    """``resume_finetune`` in a data-parallel process other than 0: from the checkpoint that
    process 0 owns (read, never written), unless the run was finished already.

    Args:
        reader: the run's in-progress folder, opened read-only (``WorkFolder.open(owner=False)``).
        recipe: the run's recipe; data_dir, val_dir: as given to ``--resume`` (or None).
        distribution: this process's ``Distribution``.
        train: what trains, as in process 0 (see ``follow``).

    Returns:
        The run process 0 published (without its model).
    """
    from transferkit import runs
    from transferkit.training.checkpoint import output_for

    output = output_for(reader.path)
    if reader.job().get("run_id") and published(output, reader.job()["run_id"]):
        return runs.load_run(output, with_model=False)  # process 0 finds it finished too: nothing to train
    with failing_before_training(distribution):
        data_dir, val_dir = reader.data_folders(data_dir, val_dir)
        return follow(data_dir, val_dir, recipe, output, reader, train)


def follow(data_dir, val_dir, recipe, output: Path, reader, train):
    """A data-parallel process other than 0: train on its share beside process 0 (the same
    steps, so that they meet in every collective one), then wait for process 0 to write the
    run. Quiet: process 0 tells the story.

    Args:
        data_dir, val_dir: the data folders; recipe: the run's recipe; output: the run folder.
        reader: the read-only in-progress folder when resuming, else None.
        train: ``train(model, recipe, train_batches, val_batches, n_classes, output, reader,
            distribution)``, the training step process 0 runs (``workflow``'s).

    Returns:
        The run process 0 published (without its model).
    """
    import keras

    from transferkit import runs
    from transferkit.data.prepare import prepare_data
    from transferkit.model.build import build_model
    from transferkit.strategies import resolve_distribution

    distribution = resolve_distribution(recipe.strategy, recipe.devices)
    prepared = prepare_data(data_dir, recipe, val_dir=val_dir, verbose=0)
    if reader is not None:
        job = reader.job()
        prepared.require_same(job.get("class_names"), job.get("data_fingerprint"), f"the interrupted run of {output}")
    run_id = meet(distribution)
    keras.utils.set_random_seed(recipe.seed)
    if reader is not None and reader.has_checkpoint():
        with distribution.scope():
            model = reader.load_model()
    else:
        model = build_model(recipe, prepared.n_classes, verbose=0).model
    train_batches, val_batches = prepared.batches(recipe)
    train(model, recipe, train_batches, val_batches, prepared.n_classes, output, reader, distribution)
    return runs.load_run(wait_for_run(output, run_id, distribution), with_model=False)  # process 0 has it


def read_resumed(run, changed: dict):
    """What ``--resume`` starts from, read before the run's lock is taken (under data-parallel
    only process 0 takes it): (read-only in-progress folder, recipe with ``changed``, its
    ``Distribution``), or (None, None, None) when the folder or its recipe cannot be read
    (``resume_finetune`` then says why, as without data-parallel)."""
    from transferkit.errors import RecipeError
    from transferkit.recipe import load_recipe
    from transferkit.strategies import resolve_distribution
    from transferkit.training.checkpoint import WorkFolder

    try:
        reader = WorkFolder.open(run, owner=False)
        recipe = load_recipe(reader.path / "recipe.toml", changed)
    except (RunError, RecipeError):
        return None, None, None
    return reader, recipe, resolve_distribution(recipe.strategy, recipe.devices)
