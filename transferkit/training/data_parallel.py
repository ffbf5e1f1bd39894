"""Several processes training one run (``--strategy data-parallel``): what sets them apart.

Every process runs the same command. Before training they meet once (``meet``): each says
whether it got ready (process 0: its data read, checked and split, and the run's in-progress
folder taken, under its owner lock; the others: the data folders found), and process 0 hands
the others the run's id and its split, of which each decodes only its share
(``data.prepare.prepare_share``). A process that failed on the way is named to the others
and all stop, so that none waits in training for a partner that will never come
(``failing_before_training`` tells them of the failure).

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
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np

from transferkit.errors import RunError, StrategyError
from transferkit.locks import PROCESSES_FOLDER, held_by_another, work_dir_for
from transferkit.runs import LABELS_FILE
from transferkit.strategies import Distribution

log = logging.getLogger("transferkit")

# Whether this process has met the others (a failure after that is not told at the meeting).
_MET: list[bool] = [False]
# This process's registration: (folder, process, attempt, open locked file), from ``meet``.
_REGISTRATION: list[tuple] = []
# A meeting's row: failed, run id (16 bytes), attempt (8), length of process 0's split (8).
_ROW = 33


def _gather(failed: bool, run_id: str | None = None, attempt: bytes = b"", plan_length: int = 0) -> np.ndarray:
    """Every process's meeting row (``_ROW``), one row per process."""
    from jax.experimental import multihost_utils

    mine = np.zeros(_ROW, dtype=np.uint8)
    mine[0] = 1 if failed else 0
    if run_id:
        mine[1:17] = np.frombuffer(bytes.fromhex(run_id), dtype=np.uint8)
    mine[17:25] = np.frombuffer(attempt.ljust(8, b"\0")[:8], dtype=np.uint8)
    mine[25:33] = np.frombuffer(int(plan_length).to_bytes(8, "little"), dtype=np.uint8)
    _MET[0] = True
    return np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, _ROW)


def gather_rows(mine: np.ndarray) -> np.ndarray:
    """Every process's rows, process 0's first: the same array in every process (each must
    give as many rows of the same shape and dtype)."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.ascontiguousarray(mine), tiled=True))


def meet(distribution: Distribution, run_id: str | None = None, split: Callable[[], str] | None = None,
         work: Path | None = None) -> tuple[str | None, str | None]:
    """Meet the other processes before training: all got ready, or all stop. Process 0 hands
    the others the run's id and its split of the images (so that each decodes only its
    share), and every process registers in ``work``/processes/ for the others to watch.

    Args:
        distribution: the run's ``Distribution`` (a no-op for one process).
        run_id: the run's id (process 0: from RUN.partial's job.json); default None.
        split: gives process 0's ``split.csv`` text (``PreparedData.split_csv``); default None.
        work: RUN.partial, where it is on this machine; default None (nothing registered).

    Returns:
        (process 0's run id, process 0's split.csv text); (run_id, None) for one process.

    Raises:
        StrategyError: another process failed before training (it tells why).
    """
    if distribution.processes <= 1:
        return run_id, None
    plan = zlib.compress(split().encode("utf-8")) if split is not None and distribution.process == 0 else b""
    attempt = os.urandom(8) if distribution.process == 0 else b""
    every = _gather(False, run_id, attempt, len(plan))
    failed = [index for index, row in enumerate(every) if row[0]]
    if failed:
        raise StrategyError(f"process(es) {', '.join(map(str, failed))} of {distribution.processes} stopped before "
                            "training (see their message); fix that and start every process again")
    first = every[0]
    length = int.from_bytes(bytes(first[25:33]), "little")
    if length:
        from jax.experimental import multihost_utils

        mine = np.frombuffer(plan, dtype=np.uint8) if distribution.process == 0 else np.zeros(length, np.uint8)
        plan = bytes(np.asarray(multihost_utils.broadcast_one_to_all(mine), dtype=np.uint8))
    if work is not None and Path(work).is_dir():
        register(Path(work) / PROCESSES_FOLDER, distribution.process, bytes(first[17:25]).hex())
    return (bytes(first[1:17]).hex() if first[1:17].any() else None,
            zlib.decompress(plan).decode("utf-8") if length else None)


@contextlib.contextmanager
def failing_before_training(distribution: Distribution | None):
    """Tell the other processes when this one fails before it met them (they would wait for
    it in training otherwise), and let go of its registration when it fails after (they see
    it stop); the error goes on as it was. None: nothing to tell."""
    try:
        yield
    except Exception:
        if distribution is not None and distribution.processes > 1 and not _MET[0]:
            _gather(True, None)
        raise
    finally:
        finish(False)  # still registered after the meeting: failed before training ended


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
    the others are watched (``PartnerWatch``, through the files ``meet`` registered in
    RUN.partial/processes/): one that dies before its training ended stops this one too, with
    one line. Only from the main thread.

    Args:
        distribution: the run's ``Distribution``.
        output: the run folder, for the lines' ``--resume``; None when nothing is written.
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
        sys.stderr.write(f"error: process {partner} of {distribution.processes} stopped before its training ended "
                         f"(its own message says why), so process {distribution.process} stops too; {kept}\n")
        sys.stderr.flush()
        os._exit(1)  # its steps wait for the lost process in a collective that cannot be left

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    completed = False
    try:
        if _REGISTRATION:
            folder, _, attempt, _ = _REGISTRATION[0]
            watch = PartnerWatch(folder, distribution.process, distribution.processes, attempt, lost)
            try:
                with watch:
                    yield
            except Exception:
                # A collective step fails at once when a partner's connection drops (before
                # the watch looks again): a partner that died is told as the watch tells it.
                partner = watch.dead_partner(wait=2.0)
                if partner is not None:
                    lost(partner)
                raise
        else:  # RUN.partial is not on this machine: nothing to watch through
            yield
        completed = True
    finally:
        finish(completed)  # not completed: the others see it, as they would a killed process
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def register(folder: Path, process: int, attempt: str) -> None:
    """Hold ``folder/process-N.lock`` until this process's training ends: locked (the system
    frees it when the process dies, whatever killed it), and holding this attempt's id (which
    process 0 drew for the meeting), so that a file an earlier, killed attempt left is never
    taken for this one. Put in place already locked, by a rename.
    """
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    staging = folder / f".process-{process}.{os.getpid()}.lock"
    handle = open(staging, "w", encoding="utf-8")  # noqa: SIM115 - held until training ends
    fcntl.flock(handle, fcntl.LOCK_EX)
    handle.write(f"{attempt}\n{os.getpid()}\n")
    handle.flush()
    os.replace(staging, folder / f"process-{process}.lock")
    _REGISTRATION[:] = [(folder, process, attempt, handle)]


def finish(completed: bool) -> None:
    """Let go of this process's registration: after its training completed, as ``.done`` (the
    others stop watching it); else as it is (the others see it die)."""
    if not _REGISTRATION:
        return
    folder, process, _, handle = _REGISTRATION.pop()
    if completed:
        with contextlib.suppress(OSError):
            os.replace(folder / f"process-{process}.lock", folder / f"process-{process}.done")
    handle.close()


class PartnerWatch:
    """Watch the other processes' lock files while training (``with``: a thread looks every
    ``poll`` seconds): one whose file holds this attempt's id and is no longer locked died
    (killed, crashed, failed, stopped by a signal) before its training ended. The processes
    could not go on without it (each step is collective, and JAX would only give up minutes
    later, with pages of output), so ``lost(process)`` is called: by default one line and the
    end of this process. A partner whose file is missing (not there yet) or another attempt's,
    or that finished (``.done``), is not a death.
    """

    def __init__(self, folder: Path, process: int, processes: int, attempt: str, lost, poll: float = 0.5):
        self.folder, self.process, self.processes, self.attempt = folder, process, processes, attempt
        self.lost, self.poll = lost, poll
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
                if state == "done":
                    partners.discard(partner)
                elif state == "dead" and not self._stop.is_set():
                    self.lost(partner)
                    return
            self._stop.wait(self.poll)

    def dead_partner(self, wait: float = 0.0) -> int | None:
        """A partner that died (or None), looking again for up to ``wait`` seconds."""
        deadline = time.monotonic() + wait
        while True:
            for partner in sorted(set(range(self.processes)) - {self.process}):
                if self.look(partner) == "dead":
                    return partner
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.1)

    def _ours(self, path: Path) -> bool:
        try:
            return path.read_text(encoding="utf-8").split("\n", 1)[0] == self.attempt
        except OSError:
            return False

    def look(self, partner: int) -> str:
        """"alive", "waiting" (no file of this attempt yet), "done" or "dead"."""
        import fcntl

        path, done = self.folder / f"process-{partner}.lock", self.folder / f"process-{partner}.done"
        try:
            handle = open(path, encoding="utf-8")  # noqa: SIM115
        except OSError:
            return "done" if self._ours(done) else "waiting"
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                return "alive"
            ours = handle.read().split("\n", 1)[0] == self.attempt
            try:
                renamed = os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino
            except OSError:
                renamed = True
            if renamed:  # finished (renamed .done) between the open and the lock
                return "done" if self._ours(done) else "waiting"
            return "dead" if ours else "waiting"


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
    from transferkit.data.folders import index_folders
    from transferkit.data.prepare import prepare_share
    from transferkit.model.build import build_model
    from transferkit.strategies import resolve_distribution

    distribution = resolve_distribution(recipe.strategy, recipe.devices)
    indexes = index_folders(data_dir, val_dir)  # a folder that cannot be used is told at the meeting
    # After the meeting RUN.partial exists (process 0 takes it first): registered there, this
    # process decodes only its share of process 0's split.
    run_id, split = meet(distribution, work=work_dir_for(output))
    prepared = prepare_share(data_dir, recipe, split, distribution.process, distribution.processes, val_dir=val_dir,
                             indexes=indexes)
    if reader is not None:
        job = reader.job()
        prepared.require_same(job.get("class_names"), job.get("data_fingerprint"), f"the interrupted run of {output}")
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
