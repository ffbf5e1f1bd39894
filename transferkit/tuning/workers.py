"""Several workers on one study: heartbeats, a dead worker's trial retried, a cap on the study.

Workers (processes, on one machine or many) share a study through its storage. Three things
keep them honest with each other:

- Heartbeats (RDB storages: SQLite, PostgreSQL, MySQL). While a trial trains, a thread records
  its heartbeat every ``HEARTBEAT_INTERVAL`` seconds (Optuna's ``record_heartbeat``). Before
  each trial, and while it waits, a worker fails the RUNNING trials whose heartbeat is older
  than ``GRACE_PERIOD`` (``optuna.storages.fail_stale_trials``): their worker was killed. The
  storage's stale-trial callback (Optuna's ``RetryHeartbeatStaleTrialCallback``) queues each
  one again with the same parameters, up to ``RETRIES`` times, and the next ``ask`` of any
  worker runs it. Optuna does this inside ``Study.optimize``; transferkit runs its own
  ask/tell loop (a trial trains on the data decoded once and the feature cache kept between
  trials), so it makes the same three calls itself.
- A worker that ends while trials of other workers are RUNNING waits until each one either
  shows a new heartbeat (its worker is alive) or is failed as stale (at most
  ``GRACE_PERIOD + HEARTBEAT_INTERVAL`` seconds): no trial of a dead worker stays RUNNING
  once another worker has run.
- ``--study-trials N`` (``StudyCap``): every worker stops once the study holds N finished
  trials, COMPLETE or PRUNED (``MaxTrialsCallback(N, states=(COMPLETE, PRUNED))``'s count),
  whatever each one's ``--trials``. Optuna's ``MaxTrialsCallback`` stops a worker *after* a
  trial, so two workers that ask when N - 1 are finished both run one and the study ends
  with N + 1; here a worker asks only while finished + running trials are fewer than N, waits
  while the running ones may still fill the study, and gives back a trial that lost the race
  of two workers asking at once (it is told FAIL, "not run", before any training).

The journal storage (``journal:///...``) has no heartbeat in Optuna (``JournalStorage`` is
not a ``BaseHeartbeat``, Optuna 4 and 5): a killed worker's trial stays RUNNING there, and
under ``--study-trials`` it counts as started, so the other workers stop rather than wait for
it. Use an RDB storage (PostgreSQL across machines) where workers may be killed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator

log = logging.getLogger("transferkit")

# Seconds between the heartbeats of a running trial.
HEARTBEAT_INTERVAL = 5
# Seconds without a heartbeat after which a RUNNING trial's worker is taken for dead. Several
# missed beats: a busy database or a long pause of the worker is not a death.
GRACE_PERIOD = 20
# Times a dead worker's trial is queued again with the same parameters (a trial whose
# parameters kill its worker, e.g. the kernel's out-of-memory killer, is not retried forever).
RETRIES = 2
# The states --study-trials counts: finished trials (a failed one leaves its place to another).
FINISHED = ("COMPLETE", "PRUNED")
# A trial's system attribute that changes with every heartbeat of its worker (no clock in it:
# the workers' clocks may differ): another worker sees it change and knows the trial is alive.
BEAT = "transferkit:beat"
# How often a waiting worker looks at the study again, in seconds.
POLL = 1.0
# Opening an RDB storage: attempts, and what the databases say when two workers create its
# tables at once (PostgreSQL, MySQL, SQLite).
SCHEMA_ATTEMPTS = 3
SCHEMA_RACE = ("already exists", "duplicate key", "Duplicate entry", "UNIQUE constraint failed")


def rdb_storage(optuna, url: str, **kwargs):
    """An Optuna ``RDBStorage`` that records heartbeats and retries a dead worker's trial
    (Optuna marks both experimental; its warnings are held back here).

    Args:
        optuna: the optuna module.
        url: an SQLAlchemy URL (``sqlite:///...``, ``postgresql+psycopg://...``, ``mysql://...``).
        **kwargs: more ``RDBStorage`` keyword arguments (``engine_kwargs``).

    Returns:
        The storage.
    """
    with _experimental_quiet(optuna):
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)

        def open_it():
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
                                              heartbeat_stale_trial_callback=retry, **kwargs)

        for attempt in range(SCHEMA_ATTEMPTS - 1):
            try:
                return open_it()
            except Exception as error:
                # Workers started together on an empty database all create Optuna's tables, and
                # all but one fail on the tables the first made (optuna#1092); once they exist,
                # opening the storage again reads them.
                if not any(text in str(error) for text in SCHEMA_RACE):
                    raise
                time.sleep(1.0 + attempt)
        return open_it()


@contextlib.contextmanager
def _experimental_quiet(optuna) -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Study.ask warns that heartbeats are meant for Study.optimize: this module does what
        # optimize does around each trial (see the module's docstring).
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        yield


class SharedStudy:
    """A study as one of its workers sees it: asks with the stale trials failed first, beats
    while a trial trains, waits for room under ``cap``, and looks after the others' trials
    when it ends.

    Args:
        study: the Optuna study.
        storage: the storage object it was opened on (an ``RDBStorage`` with heartbeats, or
            another storage, which has none).
        cap: the study's trial count (``--study-trials``), or None for no cap.
    """

    def __init__(self, study, storage, cap: int | None = None):
        import optuna

        self.optuna = optuna
        self.study, self.storage, self.cap = study, storage, cap
        get_interval = getattr(storage, "get_heartbeat_interval", None)
        self.interval = get_interval() if get_interval is not None else None
        grace = getattr(storage, "grace_period", None)
        self.grace = grace if grace is not None else 2 * (self.interval or 0)
        self.study_id = storage.get_study_id_from_name(study.study_name)
        self.worker = f"{socket.gethostname()}:{os.getpid()}"

    @property
    def heartbeats(self) -> bool:
        """Whether the storage records heartbeats (RDB storages)."""
        return self.interval is not None

    def _trials(self, *states: str):
        wanted = tuple(getattr(self.optuna.trial.TrialState, state) for state in states)
        return self.study.get_trials(deepcopy=False, states=wanted)

    def fail_stale(self) -> list[int]:
        """Fail the RUNNING trials whose heartbeat stopped (their retries are queued); their numbers."""
        if not self.heartbeats:
            return []
        running = {trial.number for trial in self._trials("RUNNING")}
        with _experimental_quiet(self.optuna):
            self.optuna.storages.fail_stale_trials(self.study)
        still = {trial.number for trial in self._trials("RUNNING")}
        failed = sorted((running - still) & {trial.number for trial in self._trials("FAIL")})
        for number in failed:
            log.warning(f"trial {number}: its worker sent no heartbeat for {self.grace} s (killed?); failed, "
                        "its parameters queued again for the next trial")
        return failed

    def room(self, deadline: float | None = None) -> bool:
        """Whether this worker may start a trial under the cap, after waiting while other
        workers' running trials may still fill it.

        Args:
            deadline: a ``time.monotonic()`` after which it stops waiting; default None.

        Returns:
            True to ask for a trial; False when the study holds its ``cap`` finished trials
            (or, without heartbeats, when running ones may fill it), or the deadline passed.
        """
        told = False
        while True:
            self.fail_stale()
            if self.cap is None:
                return True
            finished = len(self._trials(*FINISHED))
            running = self._trials("RUNNING")
            if finished >= self.cap:
                log.info(f"the study holds {finished} finished trials (--study-trials {self.cap}); no new trial")
                return False
            if finished + len(running) < self.cap:
                return True
            if not self.heartbeats or (deadline is not None and time.monotonic() >= deadline):
                log.info(f"the study holds {finished} finished and {len(running)} running trials "
                         f"(--study-trials {self.cap}); no new trial")
                return False
            if not told:
                numbers = ", ".join(str(trial.number) for trial in running)
                log.info(f"waiting for trial(s) {numbers} of other workers: the study holds {finished} of "
                         f"{self.cap} finished trials")
                told = True
            time.sleep(POLL)

    def ask(self):
        """A new trial (a queued one first: the recipe as given, a dead worker's retry)."""
        with _experimental_quiet(self.optuna):
            return self.study.ask()

    def over_cap(self, trial) -> bool:
        """Whether ``trial`` lost a race: with the trials before it that finished or still run,
        the study would exceed its cap (two workers asked at once). Numbers are handed out in
        order, so of two such workers exactly the later one gives its trial back."""
        if self.cap is None:
            return False
        counted = [t for t in self._trials(*FINISHED, "RUNNING") if t.number < trial.number]
        return len(counted) >= self.cap

    @contextlib.contextmanager
    def beating(self, trial) -> Iterator[None]:
        """Record ``trial``'s heartbeat now and every ``interval`` seconds until the block ends."""
        if not self.heartbeats:
            yield
            return
        trial_id = self.storage.get_trial_id_from_study_id_trial_number(self.study_id, trial.number)
        stop = threading.Event()
        self._beat(trial_id, 0)  # before training: a trial RUNNING without a heartbeat is never failed
        thread = threading.Thread(target=self._beat_until, args=(trial_id, stop), name="transferkit-heartbeat",
                                  daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _beat(self, trial_id: int, count: int) -> bool:
        """One heartbeat; False once the trial is finished (another worker failed it as stale)."""
        try:
            self.storage.record_heartbeat(trial_id)
            self.storage.set_trial_system_attr(trial_id, BEAT, f"{self.worker}:{count}")
        except self.optuna.exceptions.UpdateFinishedTrialError:
            return False
        except Exception as error:  # a database hiccup: the next beat tries again
            log.debug(f"heartbeat of trial id {trial_id} not recorded: {error}")
        return True

    def _beat_until(self, trial_id: int, stop: threading.Event) -> None:
        count = 1
        while not stop.wait(self.interval):
            if not self._beat(trial_id, count):
                return
            count += 1

    def settle(self) -> None:
        """Before this worker ends: wait until each RUNNING trial of another worker either
        beats (alive) or is failed as stale (its retry queued), at most grace + interval
        seconds, so that no dead worker's trial stays RUNNING."""
        if not self.heartbeats:
            return
        watched = self._beats()
        if not watched:
            return
        wait = self.grace + self.interval
        log.info(f"checking that the workers of trial(s) {', '.join(map(str, sorted(watched)))} are alive "
                 f"(up to {wait} s)")
        end = time.monotonic() + wait + POLL
        while watched and time.monotonic() < end:
            time.sleep(POLL)
            self.fail_stale()
            now = self._beats()
            # Gone from RUNNING (finished, failed) or beating since: nothing more to wait for.
            watched = {number: beat for number, beat in watched.items() if now.get(number) == beat}

    def _beats(self) -> dict[int, str]:
        """The last beat of each RUNNING trial that records them (older trials do not)."""
        return {trial.number: trial.system_attrs[BEAT] for trial in self._trials("RUNNING")
                if BEAT in trial.system_attrs}
