"""``transferkit tune``: a resumable, shareable hyperparameter search on Optuna.

    data -> decoded once (per image size) -> for each trial: sample the [tune] space ->
    load_recipe -> train exactly as finetune would (quietly, nothing written) -> the final
    validation metric -> the study's storage -> trials.csv, best_recipe.toml, figures

Each trial trains with ``workflow.train_prepared`` on data decoded once per study and image
size, with the recipe's seed and split, and on the frozen-part features of an earlier trial
where its frozen part, augmentation and engine are the same (one ``FeatureCache`` per
study): ``transferkit finetune --recipe best_recipe.toml`` trains the best trial again and
gets its score. A Keras callback reports the validation
metric after every epoch (one step count across stages) and raises ``optuna.TrialPruned``
when the pruner (median of the earlier trials at the same epoch) calls the trial hopeless.

With MLflow tracking (the recipe's ``mlflow`` key, ``--mlflow`` or ``MLFLOW_TRACKING_URI``), each
call is one MLflow run and each of its trials a nested run under it (the trial's recipe as params,
its epochs' metrics, its final figure and state); the call's run gets the outputs and the best
figure.

The study lives in its storage: ``OUT/study.db`` (SQLite) unless ``storage`` names another
Optuna storage URL (PostgreSQL, ``journal:///shared/study.log`` for a journal file on a
shared disk), so the same command continues it, and several processes or machines can
work on one study at once. A new study's first trial is the recipe as given (where the
space holds its values; a warning names those it does not), so the best trial is never worse
than the recipe as given. Without a ``[tune]`` section, the keys the overrides set (--set,
flags) are left out of the default space: they stay as the user set them.

Optuna is an extra (``pip install 'transferkit[tune]'``), imported only here, only when a
study runs.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transferkit.backbones import WEIGHTS_CHOICES
from transferkit.errors import (
    DataError,
    EngineError,
    RunError,
    TrainingInterrupted,
    TransferkitError,
    WeightsError,
    first_line,
)
from transferkit.files import fault_point, pid_alive, require_apart, write_atomic
from transferkit.recipe import Recipe, keys_meet, load_recipe
from transferkit.runtime import quieter_loggers
from transferkit.strategies import require_one_process, resolve_distribution
from transferkit.tuning.objective import METRICS
from transferkit.tuning.workers import BEAT, SharedStudy, rdb_storage

if TYPE_CHECKING:
    from transferkit.data.prepare import PreparedData

log = logging.getLogger("transferkit")

INSTALL = "pip install 'transferkit[tune]'  (or: pip install optuna)"
DEFAULT_TRIALS = 20
# Median pruning starts once this many trials completed, and from this epoch on.
PRUNE_AFTER_TRIALS = 3
PRUNE_FROM_EPOCH = 2
# Random trials before TPE models the results.
RANDOM_TRIALS = 5
# Failures of the set-up, not of a trial's parameters: every later trial would fail the same
# way, so the search stops at the first with its reason (weights that cannot be loaded, data
# that cannot be read, an engine that is not installed).
SETUP_FAILURES = (WeightsError, DataError, EngineError)

BEST_RECIPE_FILE = "best_recipe.toml"
TRIALS_FILE = "trials.csv"
HISTORY_FIGURE = "history.png"
IMPORTANCE_FIGURE = "importance.png"
STUDY_FILE = "study.db"
FIGURE_SIZE = (7.0, 4.5)
# Below this many complete trials the importance figure calls itself a rough estimate.
ROUGH_IMPORTANCE = 10


@dataclass
class TuneSummary:
    """What ``tune`` returns: where the study stands (all its workers' trials counted).

    Attributes:
        study: the study's name.
        storage: its storage URL.
        output: the folder of best_recipe.toml, trials.csv and the figures.
        metric: "val_accuracy" (maximized) or "val_loss" (minimized).
        best_value: the best trial's final validation metric; None before a trial completes.
        best_trial: its number; None before a trial completes.
        best_params: its sampled values, by recipe key (lists as their JSON text).
        best_recipe: its complete resolved recipe; None before a trial completes.
        counts: trials by state ("complete", "pruned", "fail", "running", ...).
        new_trials: trials this call ran.
        interrupted: Ctrl-C ended this call (the trial it was in is recorded as failed).
        files: output name -> path, of those written.
        data_dir: the data folder the trials trained on; default None (not known).
    """

    study: str
    storage: str
    output: Path
    metric: str
    best_value: float | None = None
    best_trial: int | None = None
    best_params: dict[str, Any] = field(default_factory=dict)
    best_recipe: Recipe | None = None
    counts: dict[str, int] = field(default_factory=dict)
    new_trials: int = 0
    interrupted: bool = False
    files: dict[str, Path] = field(default_factory=dict)
    data_dir: Path | None = None

    @property
    def trials(self) -> int:
        """How many trials the study holds."""
        return sum(self.counts.values())

    def describe(self) -> str:
        """A few lines for the terminal."""
        counts = ", ".join(f"{count} {state}" for state, count in self.counts.items())
        lines = [f"study {self.study!r} ({self.storage}): {self.trials} trial(s) ({counts}), {self.new_trials} new"
                 + (" (interrupted)" if self.interrupted else "")]
        if self.best_trial is None:
            lines.append("no trial has completed yet")
        else:
            lines.append(f"best {self.metric} {self.best_value:.4f} (trial {self.best_trial}): "
                         f"{_params_text(self.best_params)}")
        if self.files:
            lines.append(f"wrote {self.output}/: {', '.join(path.name for path in self.files.values())}")
        if BEST_RECIPE_FILE in self.files:
            data = shlex.quote(str(self.data_dir)) if self.data_dir is not None else "DATA_DIR"
            best = shlex.quote(str(self.files[BEST_RECIPE_FILE]))
            lines.append(f"train it: transferkit finetune {data} --recipe {best}")
        return "\n".join(lines)


# Seconds a tune waits for another process of the study to finish writing the same folder.
OUTPUT_LOCK_WAIT = 120
# What a first Ctrl-C or SIGTERM in a trial's training says follows ("stopping after this batch
# and ..."): the search ends, and the tune folder is written as at any end.
AFTER_A_STOP = ("recording this trial as failed; the study keeps its finished trials, summarised in {output} "
                "(trials.csv, best_recipe.toml, figures)")


def require_optuna():
    """The optuna module, or the install command when it is missing.

    Raises:
        TransferkitError: optuna is not installed; the message gives the install command.
    """
    try:
        import optuna
    except ImportError:
        raise TransferkitError(f"transferkit tune needs optuna, which is not installed; run: {INSTALL}") from None
    return optuna


def tune(
    data_dir: str | os.PathLike,
    recipe: Recipe | str | os.PathLike | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    trials: int | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_trials: int | None = None,
    study: str | None = None,
    metric: str = "val_accuracy",
    output: str | os.PathLike | None = None,
    val_dir: str | os.PathLike | None = None,
    pruner=None,
    verbose: int = 1,
) -> TuneSummary:
    """Search the recipe's ``[tune]`` space (or the default space) for the best validation
    metric, adding trials to a study that the same call continues later.

    Args:
        data_dir: one sub-folder of images per class.
        recipe: a ``Recipe``, a recipe file or shipped recipe name, or None for the defaults;
            its ``[tune]`` section is the space (``space.default_space`` when it has none).
        overrides: dotted recipe keys to values over the recipe (a ``Recipe`` too).
        trials: trials to run in this call; default None: 20, or no limit of this call's
            own when ``study_trials`` is given.
        timeout: start no trial after this many seconds; default None (no limit).
        storage: an Optuna storage URL (``sqlite:///...``, ``postgresql+psycopg://...``,
            ``mysql://...``, ``journal:///path/study.log`` for a journal file), or a path
            ending in .log (a journal file) or .db (SQLite); default None
            (``OUTPUT/study.db``). The RDB storages record heartbeats: a trial whose worker
            was killed is failed after 20 s without one and its parameters queued again
            (``tuning.workers``).
        study_trials: stop once the study holds this many finished trials, counted as
            Optuna's ``MaxTrialsCallback(N, states=(COMPLETE, PRUNED))`` counts them (failed
            trials leave their place to others), whatever every worker's ``trials``; several
            workers together start no more than N (one waits while the running trials of
            others may fill the study). Default None (no cap).
        study: the study's name; default the data folder's name.
        metric: "val_accuracy" (maximized; default) or "val_loss" (minimized), the final
            figure of the trained model as finetune's metrics.json has it.
        output: the folder for the outputs; default ``runs/tune-<data folder name>``.
        val_dir: a validation folder instead of the recipe's split; default None.
        pruner: an Optuna pruner; default None (the median of the completed trials at the
            same epoch, after 3 completed trials, from epoch 2 on).
        verbose: 0 warnings only, 1 a line per trial; default 1.

    Returns:
        The ``TuneSummary`` (best value, parameters and recipe, trial counts, files).

    Raises:
        TransferkitError: optuna is missing, a bad recipe or space (``RecipeError``), bad
            data (``DataError``), a storage that cannot be opened or reached, a study that
            optimizes another metric, or a trial failed for a reason no trial's parameters
            change (``SETUP_FAILURES``: the search stops at the first, the study is kept).
    """
    optuna = require_optuna()
    from transferkit.training.tracking import require_mlflow
    from transferkit.tuning.space import build_space

    if metric not in METRICS:
        raise TransferkitError(f"metric {metric!r}: choose {' or '.join(METRICS)}")
    if trials is not None and trials < 0:
        raise TransferkitError(f"trials must be 0 or more, got {trials}")
    if study_trials is not None and study_trials < 1:
        raise TransferkitError(f"study_trials must be 1 or more, got {study_trials}")
    if trials is None:
        trials = DEFAULT_TRIALS if study_trials is None else sys.maxsize
    name = Path(data_dir).resolve().name
    output = Path(output) if output is not None else Path("runs") / f"tune-{name}"
    require_apart(output, [data_dir, val_dir], "tune folder")
    with _recipe_source(recipe, overrides) as (source, source_overrides):
        base = load_recipe(source, source_overrides)
        require_one_process(base.strategy, base.devices, "tune")
        resolve_distribution(base.strategy, base.devices)  # before TensorFlow starts: it may set its devices
        space = build_space(source, source_overrides, base)
        if space.fixed:
            log.info(f"not searched, as you set them: {', '.join(space.fixed)} (a [tune] section in the recipe "
                     "searches any key)")
        require_mlflow(base.mlflow)
        _check_tune_output(output)
        created = not output.exists()
        data = _Data(data_dir, val_dir)
        tracker, search, outcome = None, None, "fail"
        try:
            output.mkdir(parents=True, exist_ok=True)
            storage_url = storage if storage is not None else f"sqlite:///{(output / STUDY_FILE).resolve()}"
            with _optuna_quiet(optuna):
                try:
                    the_study, opened = _open_study(optuna, storage_url, study or name, metric, base, pruner,
                                                    _fixed_settings(base, space))
                    if trials == 0 and not the_study.trials:  # nothing to run and nothing to summarise
                        raise TransferkitError(f"--trials 0 runs no trial, and study {the_study.study_name!r} holds "
                                               "none yet; give --trials 1 or more")
                    if not the_study.trials and space.parameters:
                        params = space.recipe_params(base)
                        outside = space.outside(base)
                        if outside:
                            log.warning(f"the first trial cannot be the recipe as given: the search space does not "
                                        f"hold its {'; '.join(outside)}, so that trial samples "
                                        f"{'it' if len(outside) == 1 else 'them'}")
                        if params:
                            the_study.enqueue_trial(params, user_attrs={"origin": "the recipe as given"},
                                                    skip_if_exists=True)
                    data.for_recipe(base, verbose)  # data errors before the first trial
                except TransferkitError:
                    if created:  # a call that fails before its first trial leaves no folder of its own
                        shutil.rmtree(output, ignore_errors=True)
                    raise
                tracker = _track_study(base, the_study, storage_url, output)
                shared = SharedStudy(the_study, opened, cap=study_trials)
                search = _Search(shared, space, data, metric, output, verbose, storage_url, tracker)
                search.run(trials, timeout)
                outcome = "interrupted" if search.interrupted else "complete"
        finally:
            data.features.close()
            if tracker is not None:
                _end_study_run(tracker, the_study, output, metric, outcome)
        return search.summary(storage_url)


def _check_tune_output(output: Path) -> None:
    """Fail before any work where the tune folder cannot be written, or is another kind of
    folder (a run, an export): an existing tune folder (its study.db or trials.csv) is where
    the same command continues the study.

    Raises:
        RunError: it is a file, a non-empty folder of something else, or its parent cannot
            be created or written.
    """
    from transferkit.files import require_not_a_file, require_writable_place
    from transferkit.locks import LOCK_FILE

    require_not_a_file(output)
    # What a tune (this one's partner on the study, maybe, a moment earlier) writes first.
    marks = (STUDY_FILE, TRIALS_FILE, BEST_RECIPE_FILE, LOCK_FILE)
    if output.is_dir() and any(output.iterdir()) and not any((output / name).is_file() for name in marks):
        raise RunError(f"{output} is not a tune folder (no {STUDY_FILE} or {TRIALS_FILE}) and is not empty; "
                       "choose another -o")
    require_writable_place(output)


@contextmanager
def _recipe_source(recipe, overrides):
    """(source, overrides) that ``load_recipe`` resolves to the study's base recipe: the
    file or name as given, or a ``Recipe`` written to a temporary file."""
    if not isinstance(recipe, Recipe):
        yield recipe, dict(overrides or {})
        return
    with tempfile.TemporaryDirectory(prefix="transferkit-tune-") as folder:
        path = Path(folder) / "recipe.toml"
        path.write_text(recipe.to_toml(), encoding="utf-8")
        yield path, dict(overrides or {})  # over the Recipe as over a file: they stay the user's


@contextmanager
def _optuna_quiet(optuna):
    """Optuna's own per-trial log lines off (the search tells its own), restored after."""
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(level)


def open_storage(url: str):
    """An Optuna storage for a URL: ``journal:///path`` (or a path ending in .log) a
    journal file, ``sqlite:///path`` (or a path ending in .db) SQLite, waiting for the
    other workers' writes instead of failing, any other URL as Optuna takes it; the RDB
    storages (SQLite, PostgreSQL, MySQL) with heartbeats and the retry of a dead worker's
    trial (``tuning.workers.rdb_storage``).

    Args:
        url: the storage URL or path.

    Returns:
        An Optuna storage object.

    Raises:
        TransferkitError: a path that is neither .log nor .db, a journal or SQLite file whose
            folder does not exist, or a storage that cannot be opened.
    """
    optuna = require_optuna()
    if "://" not in url:
        suffix = Path(url).suffix.lower()
        if suffix in (".log", ".jsonl"):
            url = f"journal://{Path(url).resolve()}"
        elif suffix in (".db", ".sqlite", ".sqlite3"):
            url = f"sqlite:///{Path(url).resolve()}"
        else:
            raise TransferkitError(f"storage {url!r}: give an Optuna storage URL (sqlite:///study.db, "
                                   "postgresql://..., journal:///shared/study.log) or a path ending in .log or .db")
    # The file may be new, its folder not: a missing one is a mistyped path or a shared disk
    # that is not mounted here, where a study of this machine's own would start.
    scheme = next((prefix for prefix in ("journal://", "sqlite:///") if url.startswith(prefix)), None)
    if scheme is not None:
        folder = Path(url[len(scheme):]).expanduser().absolute().parent
        if not folder.is_dir():
            raise TransferkitError(f"storage {url}: the folder {folder} does not exist (for a shared study, the "
                                   "shared disk mounted there); create it, or correct the path (sqlite:///study.db is "
                                   "relative, sqlite:////abs/study.db absolute)")
    try:
        if url.startswith("journal://"):
            from optuna.storages.journal import JournalFileBackend

            path = Path(url[len("journal://"):]).expanduser()
            return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
        if url.startswith("sqlite:///"):
            # Several workers on one file: wait for the lock (60 s) rather than fail.
            return rdb_storage(optuna, url, engine_kwargs={"connect_args": {"timeout": 60}})
        return rdb_storage(optuna, url)
    except Exception as error:  # the drivers' own errors (no psycopg2, refused connection, ...)
        raise TransferkitError(f"storage {url}: cannot be opened: {first_line(error)}; use sqlite:///FILE.db, "
                               "journal://FILE.log, postgresql://... (with its driver installed) or a .db/.log "
                               "path") from None


# Recipe keys that change how a trial runs, not what it trains to: a worker on another machine
# may set them otherwise.
RUNNING_KEYS = ("tensorboard", "strategy", "devices", "data.memory_mb", "cache.memory_mb")


def _fixed_settings(base: Recipe, space) -> dict[str, str]:
    """The settings every trial of a study shares: the recipe's keys as MLflow's params name
    them, but the searched ones (a ``[tune]`` range such as "stages.1:.epochs" too), those
    of ``RUNNING_KEYS``, and weights from a file compared by its name and size (its folder
    may differ from machine to machine)."""
    from transferkit.training.tracking import recipe_params

    searched = [parameter.key for parameter in space.parameters]
    settings = {key: value for key, value in recipe_params(base.model_dump(mode="json")).items()
                if key not in RUNNING_KEYS and not any(keys_meet(tuned, key, len(base.stages)) for tuned in searched)}
    if base.weights.lower() not in WEIGHTS_CHOICES:  # a weights file, or a run to start from (its model)
        path = Path(base.weights)
        weights = path / "model.keras" if path.is_dir() else path
        size = weights.stat().st_size if weights.is_file() else 0
        settings["weights"] = f"{path.name}{'/model.keras' if path.is_dir() else ''} ({size} bytes)"
    return settings


def _check_settings(optuna, study, url: str, settings: dict[str, str]) -> None:
    """Refuse to add trials to a study whose finished trials were trained with other fixed
    settings (another image size, backbone, epochs...): their figures would be ranked
    together. Until a trial has finished (a first call that failed on its set-up, which the
    user then fixes), and for a study made before this record, this call's settings are
    recorded instead."""
    recorded = study.user_attrs.get("settings")
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    if recorded is None or not study.get_trials(deepcopy=False, states=states):
        if recorded != settings:
            study.set_user_attr("settings", settings)
        return
    changed = [f"{key} {recorded.get(key)!r} -> {settings.get(key)!r}"
               for key in sorted(set(recorded) | set(settings)) if recorded.get(key) != settings.get(key)]
    if changed:
        shown = "; ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        raise TransferkitError(f"study {study.study_name!r} in {url} was run with other settings ({shown}): its "
                               "trials would be ranked with this call's; use the same settings to continue it, or "
                               "--study NAME (or another -o) for a new study")


def _open_study(optuna, url: str, name: str, metric: str, base: Recipe, pruner, settings: dict[str, str]):
    """(study, the storage object it is on): loaded or created; a study that optimizes
    another metric, or whose trials were trained with other fixed settings, is refused.

    The sampler is TPE seeded from the recipe's seed and the trials the study holds (a
    worker that joins later samples apart from the first)."""
    storage = open_storage(url)
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=PRUNE_AFTER_TRIALS,
                                                   n_warmup_steps=PRUNE_FROM_EPOCH)
    try:
        study = optuna.create_study(storage=storage, study_name=name, direction=METRICS[metric], pruner=pruner,
                                    load_if_exists=True)
    except Exception as error:
        raise TransferkitError(f"study {name!r} in {url}: {first_line(error)}") from None
    recorded = study.user_attrs.get("metric")
    direction = study.direction.name.lower()
    if (recorded or metric) != metric or direction != METRICS[metric]:
        known = recorded or next((name for name, way in METRICS.items() if way == direction), direction)
        raise TransferkitError(f"study {name!r} in {url} optimizes {known}, not {metric}; use --metric {known} "
                               "to continue it, or --study NAME for a new study")
    if recorded is None:
        study.set_user_attr("metric", metric)
    _check_settings(optuna, study, url, settings)
    _fail_killed_trials(optuna, storage, study)
    study.sampler = optuna.samplers.TPESampler(seed=base.seed + len(study.trials), n_startup_trials=RANDOM_TRIALS)
    return study, storage


def _fail_killed_trials(optuna, storage, study) -> None:
    """Tell the study as failed the trials whose worker was killed mid-trial (its process,
    on this machine, is gone; another machine's worker's trial is left to the heartbeats of an
    RDB storage), with the reason in their ``fail_reason``, and queue their parameters again
    (the recipe as given keeps its origin: the best trial is still never worse than it)."""
    running = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    study_id = storage.get_study_id_from_name(study.study_name) if running else None
    for trial in running:
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") != socket.gethostname() or pid_alive(int(worker.get("pid") or 0)):
            continue
        reason = f"its worker, pid {worker['pid']} on {worker['host']}, was killed mid-trial"
        try:
            storage.set_trial_user_attr(storage.get_trial_id_from_study_id_trial_number(study_id, trial.number),
                                        "fail_reason", reason)
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
        except (RuntimeError, ValueError):
            continue  # another worker told it meanwhile
        log.warning(f"trial {trial.number} failed: {reason}; its parameters are tried again")
        origin = {"origin": trial.user_attrs["origin"]} if "origin" in trial.user_attrs else None
        study.enqueue_trial(dict(trial.params), user_attrs=origin)


class _Data:
    """The data decoded once per image size (and seed and split), for every trial, and the
    frozen-part features the trials share (``training.features.FeatureCache``)."""

    def __init__(self, data_dir, val_dir):
        from transferkit.training.features import FeatureCache

        self.data_dir, self.val_dir = data_dir, val_dir
        self._prepared: dict[tuple, PreparedData] = {}
        self.features = FeatureCache()

    def for_recipe(self, recipe: Recipe, verbose: int = 0) -> PreparedData:
        from transferkit.data.prepare import prepare_data  # loads Keras: not at the CLI's start-up

        key = (recipe.image_size, recipe.seed, recipe.data.val_split, recipe.data.memory_mb, recipe.data.group_by)
        if key not in self._prepared:
            self._prepared[key] = prepare_data(self.data_dir, recipe, val_dir=self.val_dir, verbose=verbose)
        return self._prepared[key]


def _track_study(base: Recipe, study, storage_url: str, output: Path):
    """The MLflow run of this call (each trial a nested run under it), when the recipe or the
    environment asks for one; None otherwise, or when its store cannot be reached (warned)."""
    from transferkit.training.tracking import Tracker, check_tracking, public_uri, recipe_params

    uri = check_tracking(base.mlflow)
    if uri is None:
        return None
    tags = {"transferkit.tune.study": study.study_name, "transferkit.tune.storage": public_uri(storage_url),
            "transferkit.tune.output": output.resolve()}
    return Tracker.open(uri, run_name=f"tune-{study.study_name}", tags=tags,
                        params=recipe_params(base.model_dump(mode="json")))


def _end_study_run(tracker, study, output: Path, metric: str, outcome: str) -> None:
    """The study's best figure and this call's outputs on its MLflow run, which then ends."""
    best = _best(study)
    if best is not None:
        tracker.log_metrics({f"best_{metric}": best.value, "best_trial": best.number})
    tracker.log_files([output / name for name in (BEST_RECIPE_FILE, TRIALS_FILE, HISTORY_FIGURE, IMPORTANCE_FIGURE)
                       if (output / name).is_file()])
    tracker.end(outcome)


class _Search:
    """The trial loop of one call: ask, train, tell, write the outputs."""

    def __init__(self, shared: SharedStudy, space, data: _Data, metric: str, output: Path, verbose: int,
                 storage_url: str, tracker=None):
        self.shared, self.study = shared, shared.study
        self.space, self.data, self.metric = space, data, metric
        self.output, self.verbose, self.storage_url = output, verbose, storage_url
        self.tracker = tracker  # the call's MLflow run; each trial's nested run is trial_tracker
        self.trial_tracker = None
        self.new_trials = 0
        self.interrupted = False

    def run(self, trials: int, timeout: float | None) -> None:
        started = time.monotonic()
        deadline = started + timeout if timeout is not None else None
        try:
            for _ in range(trials):
                if deadline is not None and time.monotonic() >= deadline:
                    log.info(f"timeout: {timeout:g} s passed; no new trial")
                    break
                if not self.shared.room(deadline):
                    break
                self._trial()
                self._write(figures=False)
            self.shared.settle()
        except KeyboardInterrupt:
            self.interrupted = True
            log.warning("interrupted: the study is kept; the same command continues it")
        except Exception as error:
            if _storage_failure(error):
                raise TransferkitError(f"storage {self.storage_url}: cannot be reached: {first_line(error)}; the "
                                       "search stops (the same command continues the study once it is back)") from None
            raise
        self._write(figures=True)

    def _write(self, figures: bool) -> None:
        """The tables (and figures) under the folder's lock, waited for: several processes
        may work on one study into one folder, and each writes a consistent set in turn (the
        study itself is shared through its storage, which is not locked here)."""
        from transferkit.locks import FolderLock

        with FolderLock.acquire(self.output, "tune", wait=OUTPUT_LOCK_WAIT):
            write_tables(self.study, self.output, self.metric)
            if figures:
                write_figures(self.study, self.output, self.metric)

    def _trial(self) -> None:
        """One trial, told to the study as complete, pruned or failed (with its reason).

        Raises:
            TransferkitError: it failed for a reason no trial's parameters change.
        """
        optuna = require_optuna()
        states = optuna.trial.TrialState

        trial = self.shared.ask()
        if self.shared.over_cap(trial):
            # Another worker asked at the same moment and the study is full with it.
            self._finish(trial, states.FAIL, reason=f"not run: the study had its {self.shared.cap} trials "
                                                    "(--study-trials) when another worker asked at the same time")
            return
        # Who runs it: a trial whose worker is gone is told as failed by the next worker on
        # this machine at once (heartbeats do it across machines, after their grace period).
        trial.set_user_attr("worker", {"pid": os.getpid(), "host": socket.gethostname()})
        self.new_trials += 1
        started = time.perf_counter()
        try:
            with self.shared.beating(trial):
                value = self._train(trial)
        except optuna.TrialPruned as pruned:
            self._end_trial_run("pruned")
            if self._finish(trial, states.PRUNED):
                self._tell(trial, f"pruned {pruned}", started)
        except (KeyboardInterrupt, TrainingInterrupted):
            # Ctrl-C: training stopped after its current batch (a second one at once).
            self._end_trial_run("interrupted")
            self._finish(trial, states.FAIL, reason="interrupted (Ctrl-C or SIGTERM)")
            raise KeyboardInterrupt from None
        except Exception as error:  # out of memory at a large batch size, NaN, ...: the search goes on
            self._end_trial_run("fail", f"{type(error).__name__}: {first_line(error)}")
            if _storage_failure(error):
                raise  # nothing can be told; run() says so in one line
            self._fail(trial, error, started)
        else:
            self._end_trial_run("complete")
            if self._finish(trial, states.COMPLETE, value):
                self._tell(trial, f"{self.metric} {value:.4f}", started)

    def _finish(self, trial, state, value: float | None = None, reason: str | None = None) -> bool:
        """Tell the study how ``trial`` ended; False when another worker failed it first
        (its heartbeats stopped reaching the storage: its retry is queued already)."""
        optuna = require_optuna()
        try:
            if reason is not None:
                trial.set_user_attr("fail_reason", reason)
            told = self.study.tell(trial, value, state=state, skip_if_finished=True)
        except optuna.exceptions.UpdateFinishedTrialError:
            told = None
        if told is not None and told.state == state:
            return True
        log.warning(f"trial {trial.number}: another worker failed it, as no heartbeat of it reached the storage for "
                    f"{self.shared.grace} s; its outcome is not recorded (its parameters are queued again)")
        return False

    def _train(self, trial) -> float:
        import keras

        from transferkit import workflow

        overrides = self.space.suggest(trial)
        recipe = self.space.recipe(overrides)
        trial.set_user_attr("recipe", recipe.to_toml())
        prepared = self.data.for_recipe(recipe)
        callbacks = (_pruning_callback(trial, self.metric),)
        self.trial_tracker = self._trial_run(trial, recipe)
        if self.trial_tracker is not None:  # first: the epoch a trial is pruned at is logged too
            callbacks = (self.trial_tracker.epoch_logger(), *callbacks)
        # A fresh Keras state per trial, as in a process of its own (finetune on the best
        # recipe then trains the same model).
        keras.backend.clear_session()
        with _quiet_training():
            run = workflow.train_prepared(prepared, recipe, callbacks=callbacks, calibrate=False,
                                          feature_cache=self.data.features, verbose=0,
                                          after_a_stop=AFTER_A_STOP.format(output=self.output))
        final = run.metrics["final"]
        if self.trial_tracker is not None:
            self.trial_tracker.log_metrics({f"final_{name}": final[name] for name in METRICS}, step=len(run.history))
        for name in METRICS:
            trial.set_user_attr(name, final[name])
        trial.set_user_attr("epochs", len(run.history))
        value = float(final[self.metric])
        if not math.isfinite(value):
            raise FloatingPointError(f"the final {self.metric} is {value}")
        return value

    def _trial_run(self, trial, recipe: Recipe):
        """The trial's nested MLflow run (its recipe as params), or None."""
        if self.tracker is None:
            return None
        from transferkit.training.tracking import recipe_params

        tags = {"transferkit.tune.study": self.study.study_name, "transferkit.tune.trial": trial.number,
                "transferkit.tune.sampled": _params_text(trial.params)}
        return self.tracker.child(f"trial-{trial.number}", tags=tags,
                                  params=recipe_params(recipe.model_dump(mode="json")))

    def _end_trial_run(self, outcome: str, reason: str | None = None) -> None:
        """End the trial's nested MLflow run: complete, pruned, interrupted or fail (with why)."""
        tracker, self.trial_tracker = self.trial_tracker, None
        if tracker is not None:
            tracker.set_tags({"transferkit.tune.state": outcome, "transferkit.tune.fail_reason": reason})
            tracker.end(outcome)

    def _fail(self, trial, error: BaseException, started: float) -> None:
        """Tell a failed trial with its reason; a set-up failure stops the search (the
        outputs written first: trials.csv tells the failed trial).

        Raises:
            TransferkitError: ``error`` is one of ``SETUP_FAILURES``.
        """
        optuna = require_optuna()
        reason = f"{type(error).__name__}: {first_line(error)}"
        if not self._finish(trial, optuna.trial.TrialState.FAIL, reason=reason):
            return
        took = time.perf_counter() - started
        if isinstance(error, SETUP_FAILURES):
            self._write(figures=True)
            raise TransferkitError(f"trial {trial.number} failed: {first_line(error)}; no trial's parameters change "
                               "that, so the search stops (fix it and run the same command: the study is kept)") \
                from error
        log.warning(f"trial {trial.number} failed after {took:.1f} s: {reason} "
                    f"({_params_text(trial.params)}); the search goes on")

    def _tell(self, trial, outcome: str, started: float) -> None:
        """The progress line of a trial: number, outcome, duration, parameters, best so far."""
        if not self.verbose:
            return
        best = _best(self.study)
        best_text = f"best {best.value:.4f} (trial {best.number})" if best is not None else "none complete yet"
        log.info(f"trial {trial.number}: {outcome} in {time.perf_counter() - started:.1f} s "
                 f"({_params_text(trial.params)}); {best_text}")

    def summary(self, storage_url: str) -> TuneSummary:
        counts: dict[str, int] = {}
        for trial in self.study.get_trials(deepcopy=False):
            state = trial.state.name.lower()
            counts[state] = counts.get(state, 0) + 1
        files = {name: self.output / name for name in (BEST_RECIPE_FILE, TRIALS_FILE, HISTORY_FIGURE, IMPORTANCE_FIGURE)
                 if (self.output / name).is_file()}
        summary = TuneSummary(study=self.study.study_name, storage=storage_url, output=self.output, metric=self.metric,
                              counts=counts, new_trials=self.new_trials, interrupted=self.interrupted, files=files,
                              data_dir=Path(self.data.data_dir))
        best = _best(self.study)
        if best is not None:
            summary.best_value, summary.best_trial, summary.best_params = best.value, best.number, dict(best.params)
            summary.best_recipe = _recipe_of(best)
        return summary


def _storage_failure(error: BaseException) -> bool:
    """Whether ``error`` is the database of an RDB storage failing (gone, unreachable):
    no trial can be told, so no trial should start."""
    try:
        from sqlalchemy.exc import SQLAlchemyError  # Optuna's RDB storages need it
    except ImportError:
        return False
    return isinstance(error, SQLAlchemyError)


@contextmanager
def _quiet_training():
    """Trials train quietly: the library's progress messages (engines, caches) and
    TensorFlow's retracing notes (a new model per trial) are held back; warnings still show."""
    with quieter_loggers({"transferkit": logging.WARNING, "tensorflow": logging.ERROR}):
        yield


def _pruning_callback(trial, metric: str):
    """A Keras callback that reports ``metric`` after every epoch, counting epochs across
    the stages (each stage is one ``fit``), and raises ``optuna.TrialPruned`` out of
    training when the pruner says so."""
    import keras
    import optuna

    class PruneHopeless(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch = 0

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(metric)
            if value is None:
                return
            self.epoch += 1
            value = float(value)
            trial.report(value, self.epoch)
            fault_point("tune.trial")
            if trial.should_prune():
                raise optuna.TrialPruned(f"at epoch {self.epoch}, {metric} {value:.4f}")

    return PruneHopeless()


def _best(study):
    """The best complete trial, or None."""
    try:
        return study.best_trial
    except ValueError:
        return None


def _recipe_of(trial) -> Recipe | None:
    text = trial.user_attrs.get("recipe")
    if text is None:
        return None
    with tempfile.TemporaryDirectory(prefix="transferkit-tune-") as folder:
        path = Path(folder) / "recipe.toml"
        path.write_text(text, encoding="utf-8")
        return load_recipe(path)


def _params_text(params: Mapping[str, Any]) -> str:
    return ", ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}"
                     for key, value in params.items()) or "no parameters"


def write_tables(study, output: Path, metric: str) -> list[Path]:
    """trials.csv (number, state, value, duration, epochs, each parameter, why it failed)
    and best_recipe.toml (the best trial's complete recipe), written atomically.

    Args:
        study: the Optuna study.
        output: the folder.
        metric: the study's metric (the value column's name).

    Returns:
        The paths written.
    """
    trials = study.get_trials(deepcopy=False)
    names = sorted({name for trial in trials for name in trial.params})
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["number", "state", metric, "duration_s", "epochs", *names, "fail_reason"])
    for trial in trials:
        duration = trial.duration.total_seconds() if trial.duration is not None else None
        writer.writerow([trial.number, trial.state.name.lower(), _cell(trial.value), _cell(duration),
                         trial.user_attrs.get("epochs", ""), *(_cell(trial.params.get(name)) for name in names),
                         _fail_reason(trial)])
    written = [write_atomic(output / TRIALS_FILE, text.getvalue())]
    best = _best(study)
    if best is not None and "recipe" in best.user_attrs:
        header = (f"# The best trial ({best.number}) of study {study.study_name!r}: {metric} {best.value:.4f}.\n"
                  f"# Train it: transferkit finetune DATA_DIR --recipe {BEST_RECIPE_FILE}\n\n")
        written.append(write_atomic(output / BEST_RECIPE_FILE, header + best.user_attrs["recipe"]))
    return written


def _fail_reason(trial) -> str:
    """Why a trial failed: as its worker told it, or, for a trial failed by another worker
    because its heartbeats stopped, that."""
    if "fail_reason" in trial.user_attrs:
        return trial.user_attrs["fail_reason"]
    if trial.state.name == "FAIL" and BEAT in trial.system_attrs:
        return "its worker stopped sending heartbeats (killed?); its parameters were queued again"
    return ""


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_figures(study, output: Path, metric: str) -> list[Path]:
    """history.png (each trial's value, the best so far) and importance.png (Optuna's
    parameter importances; with fewer than 2 complete trials the figure says so).

    Args:
        study: the Optuna study.
        output: the folder.
        metric: the study's metric.

    Returns:
        The paths written.
    """
    return [plot_trials(study, output / HISTORY_FIGURE, metric), plot_importance(study, output / IMPORTANCE_FIGURE)]


def plot_trials(study, path: Path, metric: str) -> Path:
    """The optimization history: complete trials' values, pruned trials at their last
    reported value, failed ones along the bottom, and the best so far."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from transferkit.evaluation.figures import save_figure

    trials = study.get_trials(deepcopy=False)
    complete = [trial for trial in trials if trial.state.name == "COMPLETE"]
    pruned = [trial for trial in trials if trial.state.name == "PRUNED" and trial.intermediate_values]
    failed = [trial for trial in trials if trial.state.name == "FAIL"]
    figure = Figure(figsize=FIGURE_SIZE)
    axis = figure.subplots()
    if complete:
        axis.plot([t.number for t in complete], [t.value for t in complete], "o", label="complete")
        better = max if METRICS[metric] == "maximize" else min
        best, running = [], None
        for trial in complete:
            running = trial.value if running is None else better(running, trial.value)
            best.append(running)
        axis.step([t.number for t in complete], best, where="post", color="#c44e52", label="best so far")
    if pruned:
        last = [t.intermediate_values[max(t.intermediate_values)] for t in pruned]
        axis.plot([t.number for t in pruned], last, "x", color="gray", label="pruned (last reported)")
    if failed:
        axis.plot([t.number for t in failed], [0.0] * len(failed), "v", color="black",
                  transform=axis.get_xaxis_transform(), clip_on=False, label="failed")
    if not trials:
        axis.text(0.5, 0.5, "no trials yet", ha="center", va="center", transform=axis.transAxes)
    axis.set_xlabel("trial")
    axis.set_ylabel(metric)
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title(f"study {study.study_name}: {metric} per trial ({METRICS[metric]}d)")
    if trials:
        axis.legend(fontsize=8)
    return save_figure(figure, path)


def plot_importance(study, path: Path) -> Path:
    """Parameter importances (fANOVA, seeded) as horizontal bars; with fewer than 2
    complete trials, or when they cannot be computed, the figure says why."""
    import optuna
    from matplotlib.figure import Figure

    from transferkit.evaluation.figures import save_figure

    complete = [trial for trial in study.get_trials(deepcopy=False) if trial.state.name == "COMPLETE"]
    figure = Figure(figsize=FIGURE_SIZE)
    axis = figure.subplots()
    note = None
    importances: dict[str, float] = {}
    if len(complete) < 2:
        note = f"parameter importances need at least 2 complete trials ({len(complete)} so far)"
    else:
        try:
            evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
            importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
        except Exception as error:  # e.g. every complete trial has the same parameters
            note = f"parameter importances cannot be computed: {first_line(error, 120)}"
        if not importances and note is None:
            note = "no parameter varied between the complete trials"
    if note is not None:
        log.info(f"{path.name}: {note}")
        axis.text(0.5, 0.5, note, ha="center", va="center", wrap=True, transform=axis.transAxes)
        axis.set_axis_off()
    else:
        names = list(importances)[::-1]  # the most important on top
        axis.barh(names, [importances[name] for name in names], color="#4c72b0")
        axis.set_xlabel("importance (share of the variance of the objective)")
        axis.set_xlim(0, 1)
    rough = ": a rough estimate" if note is None and len(complete) < ROUGH_IMPORTANCE else ""
    # A figure title, so that the layout makes room for it whatever the width of the bars' names.
    figure.suptitle(f"study {study.study_name}: parameter importances\n({len(complete)} complete trials{rough})")
    return save_figure(figure, path)
