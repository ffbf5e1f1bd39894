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

A signal (Ctrl-C, SIGTERM) ends a data-parallel process at once (``exit_on_signals``): the
processes could not agree on a batch to stop after without a collective step per batch, so
each leaves as a killed one does, and the last completed epoch in RUN.partial is what
``--resume`` (started the same way in every process) continues from.
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
def exit_on_signals(distribution: Distribution, output: Path | None):
    """End this process at once on SIGINT or SIGTERM, with one line (as a killed process
    ends: what RUN.partial holds is the last completed epoch). Only from the main thread.

    Args:
        distribution: the run's ``Distribution``.
        output: the run folder, for the line's ``--resume``; None when nothing is written.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum, frame):
        name = signal.Signals(signum).name
        kept = (f"the last completed epoch is kept in {work_dir_for(output)}; continue with: transferkit finetune "
                f"--resume {output}, started the same way in every process" if output is not None
                else "nothing was written")
        sys.stderr.write(f"{name}: process {distribution.process} of {distribution.processes} stopped; {kept}\n")
        sys.stderr.flush()
        os._exit(128 + signum)  # the others cannot finish the step without it: no polite stop

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


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
