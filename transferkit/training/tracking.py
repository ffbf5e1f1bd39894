"""MLflow tracking of a training: the resolved recipe as params, every epoch's metrics (one step
count across stages), the run folder's files and the model, the data's fingerprint and lineage as
tags; a tune study as a parent run with one nested run per trial.

MLflow is an extra (``pip install 'transferkit[mlflow]'``), imported only when a job tracks.
Tracking never stops a training: a store that cannot be reached when the job starts, or that
fails later, is one warning line, and the job goes on without it (the run folder has every
figure anyway). Calls go through ``MlflowClient`` with the run's id, so no global MLflow state
is left behind (the logged model, which MLflow logs through its global tracking URI and active
run, excepted: they are set for that call and put back).

On a ``sqlite:///`` store, an experiment created here keeps its artifacts beside the database
(``<database folder>/mlartifacts/``), not in ``./mlruns`` of whatever folder the job ran in.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import keras

from transferkit.errors import TransferkitError, first_line
from transferkit.inference.uncertainty import REFERENCE_FILE
from transferkit.runtime import quieter_loggers
from transferkit.training.tensorboard import SCALARS

log = logging.getLogger("transferkit")

INSTALL = "pip install 'transferkit[mlflow]'  (or: pip install mlflow-skinny pandas)"
ENVIRONMENT_URI = "MLFLOW_TRACKING_URI"
ENVIRONMENT_EXPERIMENT = "MLFLOW_EXPERIMENT_NAME"
DEFAULT_EXPERIMENT = "transferkit"
OFF = "off"
# Where a new experiment on a SQLite store keeps its artifacts, beside the database.
SQLITE_ARTIFACTS = "mlartifacts"
# A server that does not answer within this many seconds when the job starts is not waited for.
PROBE_SECONDS = 5.0
# MLflow retries an HTTP call for minutes by default; a training does not wait that long for
# its tracking (a user's own settings of these variables win).
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}
# MLflow's own limits on one batch and one value.
PARAMS_PER_BATCH = 100
PARAM_LENGTH = 6000
TAG_LENGTH = 8000
# The tags of transferkit's own facts (run_tags), on the run and on its logged model.
TAG_PREFIX = "transferkit."
# The run folder's files logged as artifacts (the model too; MODEL_CARD.md is also the run's
# description). TensorBoard logs and checkpoints are left to the folder.
ARTIFACT_PATTERNS = ("*.png", "metrics.json", "labels.json", "recipe.toml", "history.csv", "MODEL_CARD.md",
                     "skipped.txt", "split.csv", "model.keras", REFERENCE_FILE)
STATUS = {"complete": "FINISHED", "pruned": "KILLED", "interrupted": "KILLED", "fail": "FAILED"}


def tracking_uri(setting: str) -> str | None:
    """The MLflow tracking URI a job logs to: the recipe's ``mlflow`` key, else the
    ``MLFLOW_TRACKING_URI`` environment variable; None when neither asks (or the key is "off").

    Args:
        setting: the recipe's ``mlflow`` value.

    Returns:
        The URI, or None.
    """
    setting = setting.strip()
    if setting.lower() == OFF:
        return None
    return setting or os.environ.get(ENVIRONMENT_URI, "").strip() or None


def check_tracking(setting: str) -> str | None:
    """The URI a job will track to (``tracking_uri``), checked before any work: a recipe or
    flag that asks for MLflow without MLflow installed is an error; the environment variable
    alone is one warning (the job goes on untracked).

    Args:
        setting: the recipe's ``mlflow`` value.

    Returns:
        The URI, or None (no tracking).

    Raises:
        TransferkitError: the recipe names a URI and MLflow is not installed; the message
            gives the install command.
    """
    import importlib.util

    require_mlflow(setting)
    uri = tracking_uri(setting)
    if uri is None or importlib.util.find_spec("mlflow") is not None:
        return uri
    log.warning(f"{ENVIRONMENT_URI} is set but MLflow is not installed, so this job is not tracked; run: {INSTALL}")
    return None


def recipe_params(recipe: Mapping[str, Any]) -> dict[str, str]:
    """A resolved recipe as MLflow params: dotted keys as ``--set`` takes them
    (``stages.1.learning_rate``, ``head.units``), values as TOML writes them; the tracking
    URI and the search space left out.

    Args:
        recipe: ``Recipe.model_dump(mode="json")``.

    Returns:
        Key -> value text.
    """
    params: dict[str, str] = {}

    def add(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, item in value.items():
                add(f"{prefix}.{key}" if prefix else str(key), item)
        elif prefix == "stages" and isinstance(value, (list, tuple)):
            for index, stage in enumerate(value):
                add(f"stages.{index}", stage)
        else:
            text = "[" + ", ".join(str(item) for item in value) + "]" if isinstance(value, (list, tuple)) else value
            params[prefix] = str(text).lower() if isinstance(text, bool) else str(text)[:PARAM_LENGTH]

    add("", {key: value for key, value in recipe.items() if key not in ("mlflow", "tune")})
    return params


def metric_key(text: str) -> str:
    """A name MLflow takes as a metric key (letters, digits, _ - . space /)."""
    return re.sub(r"[^\w\-. /]", "_", text)[:250] or "_"


class Tracker:
    """One MLflow run that a job logs to; every call is a no-op once tracking has failed.

    Open one with ``Tracker.open``, which returns None when the store cannot be reached.

    Attributes:
        uri: the tracking URI.
        run_id: the MLflow run's id.
        experiment_id: its experiment.
    """

    def __init__(self, client, uri: str, run_id: str, experiment_id: str):
        self.client, self.uri, self.run_id, self.experiment_id = client, uri, run_id, experiment_id
        self.failed = False

    @classmethod
    def open(cls, uri: str, *, run_name: str, tags: Mapping[str, Any] | None = None,
             params: Mapping[str, str] | None = None, resume_id: str | None = None,
             experiment: str | None = None) -> Tracker | None:
        """Start (or continue) an MLflow run; a store that cannot be reached is one warning.

        Args:
            uri: the tracking URI.
            run_name: the run's name in MLflow (the run folder's name).
            tags: tags of the run (values made text; empty ones left out).
            params: params of the run (from ``recipe_params``); not logged again on a resumed run.
            resume_id: an MLflow run this job continues (an interrupted run resumed); default
                None (a new run). A run that no longer exists starts a new one.
            experiment: the experiment's name; default ``MLFLOW_EXPERIMENT_NAME``, else
                "transferkit".

        Returns:
            The ``Tracker``, or None when MLflow or its store cannot be used (warned once).
        """
        try:
            with mlflow_calls():
                _probe(uri)
                from mlflow import MlflowClient

                client = MlflowClient(tracking_uri=uri)
                run = _existing_run(client, resume_id)
                if run is not None:
                    client.update_run(run.info.run_id, status="RUNNING")
                    tracker = cls(client, uri, run.info.run_id, run.info.experiment_id)
                else:
                    experiment_id = _experiment_id(client, uri, experiment)
                    run = client.create_run(experiment_id, run_name=run_name, tags=_tag_texts(tags))
                    tracker = cls(client, uri, run.info.run_id, experiment_id)
                    tracker.log_params(params or {})
        except Exception as error:
            log.warning(f"MLflow tracking at {public_uri(uri)} is off for this job: {_reason(error)}; training goes "
                        "on, the run folder keeps everything")
            return None
        if tracker.failed:
            return None
        return tracker

    def child(self, run_name: str, *, tags: Mapping[str, Any] | None = None,
              params: Mapping[str, str] | None = None) -> Tracker | None:
        """A nested run under this one (a tune trial under its study).

        Args:
            run_name: the nested run's name.
            tags: its tags.
            params: its params.

        Returns:
            Its ``Tracker``, or None once tracking has failed.
        """
        if self.failed:
            return None
        nested = dict(_tag_texts(tags), **{"mlflow.parentRunId": self.run_id})
        with self._guard("start a nested run"):
            run = self.client.create_run(self.experiment_id, run_name=run_name, tags=nested)
            tracker = Tracker(self.client, self.uri, run.info.run_id, self.experiment_id)
            tracker.log_params(params or {})
            if tracker.failed:
                self.failed = True
                return None
            return tracker
        return None

    def log_params(self, params: Mapping[str, str]) -> None:
        """Log params, in batches MLflow takes."""
        if self.failed:
            return
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        with self._guard("log the params"):
            for start in range(0, len(items), PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=items[start:start + PARAMS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (values made text, cut to MLflow's limit; empty ones left out)."""
        if self.failed:
            return
        from mlflow.entities import RunTag

        items = [RunTag(key, value) for key, value in _tag_texts(tags).items()]
        with self._guard("set the tags"):
            for start in range(0, len(items), PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, tags=items[start:start + PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float | None], step: int = 0) -> None:
        """Log metrics at a step (None and NaN values left out)."""
        if self.failed:
            return
        import time

        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(metric_key(key), float(value), stamp, step) for key, value in metrics.items()
                 if value is not None and math.isfinite(float(value))]
        if items:
            with self._guard("log metrics"):
                self.client.log_batch(self.run_id, metrics=items)

    def log_files(self, files: Iterable[Path], artifact_path: str | None = None) -> None:
        """Log files as artifacts."""
        if self.failed:
            return
        with self._guard("log the artifacts"):
            for file in files:
                self.client.log_artifact(self.run_id, str(file), artifact_path)

    def log_run_folder(self, folder: Path) -> None:
        """Log a finished run folder's files (``ARTIFACT_PATTERNS``) as artifacts, and its model
        card as the run's description."""
        files = sorted({file for pattern in ARTIFACT_PATTERNS for file in folder.glob(pattern) if file.is_file()})
        self.log_files(files)
        card = folder / "MODEL_CARD.md"
        if card.is_file():
            self.set_tags({"mlflow.note.content": card.read_text(encoding="utf-8")})

    def log_keras_model(self, model: keras.Model, name: str = "model") -> str | None:
        """Log a Keras model as an MLflow logged model of the Keras flavour (loadable with
        ``mlflow.keras.load_model``), with its input and output signature, the
        requirements that load it (Keras and its backend only: no transferkit), and the
        run's ``transferkit.*`` tags (data fingerprint, folders, lineage, run folder ...).

        Args:
            model: the classifier.
            name: the logged model's name; default "model".

        Returns:
            Its model URI (``models:/...``), or None when it could not be logged (warned once).
        """
        if self.failed:
            return None
        try:
            with mlflow_calls():
                import mlflow
                import mlflow.keras

                # The run's own tags (those it was opened with, and any set since), so that
                # the logged model says where it came from without its run.
                tags = {key: value for key, value in self.client.get_run(self.run_id).data.tags.items()
                        if key.startswith(TAG_PREFIX)}
                # The flavour logs through MLflow's active run (which names the experiment the
                # logged model belongs to) on the global tracking URI: both set for this call.
                environment = os.environ.get(ENVIRONMENT_URI)
                current = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
                mlflow.set_tracking_uri(self.uri)  # (which sets the environment variable too)
                try:
                    with mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None):
                        info = mlflow.keras.log_model(model, name=name, signature=_signature(model),
                                                      pip_requirements=_requirements(), tags=tags)
                finally:
                    mlflow.set_tracking_uri(None if current == environment else current)  # None: unset
                    if environment is not None:
                        os.environ[ENVIRONMENT_URI] = environment
        except Exception as error:
            # The flavour's own trouble (not the store's): the run goes on, with model.keras
            # among its artifacts.
            log.warning(f"MLflow: the model is logged as the artifact model.keras only, not as a logged model of "
                        f"the Keras flavour: {_reason(error)}")
            return None
        return info.model_uri

    def end(self, outcome: str = "complete") -> None:
        """End the run: "complete", "pruned", "interrupted" or "fail"."""
        if self.failed:
            return
        with self._guard("end the run"):
            self.client.set_terminated(self.run_id, status=STATUS[outcome])

    def epoch_logger(self, epochs_done: int = 0) -> EpochMetrics:
        """The Keras callback that logs every epoch's figures to this run.

        Args:
            epochs_done: epochs the run completed before (a resumed run); default 0.
        """
        return EpochMetrics(self, epochs_done)

    @contextlib.contextmanager
    def _guard(self, what: str):
        """Run MLflow calls (callers check ``failed`` first); the first failure is one warning
        and switches tracking off."""
        try:
            with mlflow_calls():
                yield
        except Exception as error:
            self.failed = True
            log.warning(f"MLflow tracking at {public_uri(self.uri)} stopped (could not {what}: {_reason(error)}); "
                        "training goes on, the run folder keeps everything")


class EpochMetrics(keras.callbacks.Callback):
    """Logs each epoch's loss, accuracy, validation figures and learning rate to an MLflow run,
    at the run's epoch count across stages (each stage is one ``fit``, whose own count restarts).

    Args:
        tracker: the ``Tracker``.
        epochs_done: epochs the run completed before (a resumed run); default 0.
    """

    def __init__(self, tracker: Tracker, epochs_done: int = 0):
        super().__init__()
        self.tracker = tracker
        self.epoch = epochs_done

    def on_epoch_end(self, epoch, logs=None):
        self.epoch += 1
        logs = dict(logs or {})
        if "learning_rate" not in logs and getattr(self.model, "optimizer", None) is not None:
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        self.tracker.log_metrics({name: logs.get(name) for name in SCALARS}, step=self.epoch)


@contextlib.contextmanager
def mlflow_calls():
    """MLflow's calls as a training wants them: HTTP retries bounded (``HTTP_LIMITS``, where
    the environment does not set them), MLflow's own info lines (database migrations) held
    back unless transferkit's logger shows details, and its usage telemetry off (no call to
    MLflow's servers) unless ``MLFLOW_DISABLE_TELEMETRY`` is set."""
    # MLflow's usage telemetry would call out to its servers: off unless the environment says.
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import mlflow  # noqa: F401  (its import sets its loggers' levels, which are set here after it)

    added = {name: value for name, value in HTTP_LIMITS.items() if name not in os.environ}
    os.environ.update(added)
    held = {} if log.isEnabledFor(logging.DEBUG) else {"mlflow": logging.WARNING, "alembic": logging.WARNING}
    try:
        with quieter_loggers(held):
            yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def _probe(uri: str) -> None:
    """An HTTP tracking server must answer within ``PROBE_SECONDS`` (any HTTP status will
    do), so a server that is down costs seconds, not MLflow's minutes of retries.

    Raises:
        OSError: no answer.
    """
    if not uri.lower().startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=PROBE_SECONDS):
            pass
    except urllib.error.HTTPError:
        pass  # it answered


def _existing_run(client, run_id: str | None):
    """The MLflow run ``run_id`` when it still exists, else None."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception as error:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(error, "error_code", "")) or "not found" in str(error).lower():
            return None
        raise
    return run if run.info.lifecycle_stage == "active" else None


def _experiment_id(client, uri: str, name: str | None) -> str:
    """The experiment's id, created when missing (on SQLite, its artifacts beside the database)."""
    name = name or os.environ.get(ENVIRONMENT_EXPERIMENT) or DEFAULT_EXPERIMENT
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage != "active":
            raise TransferkitError(f"the experiment {name!r} is deleted; restore it or set {ENVIRONMENT_EXPERIMENT}")
        return experiment.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        database = Path(uri[len("sqlite:///"):].split("?")[0]).expanduser()
        location = (database.resolve().parent / SQLITE_ARTIFACTS).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except Exception:
        experiment = client.get_experiment_by_name(name)  # another job created it meanwhile
        if experiment is None:
            raise
        return experiment.experiment_id


def _tag_texts(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {key: str(value)[:TAG_LENGTH] for key, value in (tags or {}).items() if value not in (None, "")}


def _signature(model: keras.Model):
    """The model's input and output tensors as an MLflow signature."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    def spec(tensor, name):
        shape = tuple(-1 if size is None else int(size) for size in tensor.shape)
        return Schema([TensorSpec(np.dtype(keras.backend.standardize_dtype(tensor.dtype)), shape, name)])

    return ModelSignature(inputs=spec(model.inputs[0], "image"), outputs=spec(model.outputs[0], "probabilities"))


def _requirements() -> list[str]:
    """What loads the logged model: Keras and its backend (the model needs no transferkit)."""
    import importlib.metadata

    packages = ["keras", keras.backend.backend()]
    found = []
    for package in packages:
        try:
            found.append(f"{package}=={importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def _reason(error: BaseException) -> str:
    """A failure in a few words: connection errors by what they are, not MLflow's whole text."""
    if isinstance(error, urllib.error.URLError):
        reason = error.reason
        return f"cannot reach the server ({first_line(reason) if isinstance(reason, BaseException) else reason})"
    if isinstance(error, (TimeoutError, ConnectionError)):
        return f"cannot reach the server ({type(error).__name__})"
    if "MLFLOW_ALLOW_FILE_STORE" in str(error):  # its fix comes at the end of a long paragraph
        return ("this MLflow refuses a file store (a folder or file: URI) unless MLFLOW_ALLOW_FILE_STORE=true is "
                "set; track to sqlite:///mlflow.db instead, or set that variable")
    return f"{type(error).__name__}: {first_line(error)}"


# --- a training into a run folder -----------------------------------------------------------

TRACKING_FILE = "mlflow.json"  # in RUN.partial: the MLflow run a resumed training continues


def require_mlflow(setting: str) -> None:
    """Fail before any work when the recipe (or ``--mlflow``) names a tracking URI and MLflow
    is not installed, or when the URI the job would track to (``tracking_uri``: the recipe's,
    else ``MLFLOW_TRACKING_URI``) has a scheme MLflow has no store for (a typo such as
    ``sqlit:///``). A store that is merely down or cannot be opened is not checked here: that
    is one warning when the job opens it (``Tracker.open``).

    Args:
        setting: the recipe's ``mlflow`` value.

    Raises:
        TransferkitError: MLflow is missing; the message gives the install command.
        RecipeError: an unsupported URI scheme; the message names where the URI came from
            and the schemes MLflow takes.
    """
    import importlib.util

    named = setting.strip() and setting.strip().lower() != OFF
    installed = importlib.util.find_spec("mlflow") is not None
    if named and not installed:
        raise TransferkitError(f"--mlflow {public_uri(setting.strip())} needs MLflow, which is not installed; "
                               f"run: {INSTALL}")
    uri = tracking_uri(setting)
    if uri is None or not installed:
        return
    problem = _unsupported_scheme(uri)
    if problem is None:
        return
    from transferkit.errors import RecipeError

    if named:
        raise RecipeError(f"--mlflow {public_uri(uri)} (recipe key mlflow): {problem}")
    raise RecipeError(f"{ENVIRONMENT_URI}={public_uri(uri)}: {problem}; correct it, or unset it (--mlflow off "
                      "tracks nothing)")


# MLflow registers these for Unity Catalog model registries and refuses them as tracking stores.
NOT_TRACKING_SCHEMES = ("databricks-uc", "uc")


def _unsupported_scheme(uri: str) -> str | None:
    """What is wrong with the scheme of ``uri`` when MLflow has no tracking store for it, else
    None. Asks MLflow's own registry of tracking stores (the one ``MlflowClient`` builds its
    store from, plugins' schemes included) without building a store: nothing is opened,
    created or reached. The registry is an MLflow internal (pinned by
    tests/training/test_tracking.py); where a release moves it, nothing is checked here and
    ``Tracker.open`` warns as for any store it cannot open."""
    import difflib
    import urllib.parse

    with mlflow_calls():
        try:
            from mlflow.exceptions import MlflowException
            from mlflow.tracking._tracking_service.utils import _tracking_store_registry as registry

            schemes = [scheme for scheme in registry._registry if scheme and scheme not in NOT_TRACKING_SCHEMES]
        except (ImportError, AttributeError):
            return None
        try:
            registry.get_store_builder(uri)
            return None
        except MlflowException:  # no store registered for it, or a database engine MLflow does not know
            pass
    scheme = urllib.parse.urlparse(uri).scheme
    close = difflib.get_close_matches(scheme, schemes, n=1)
    return (f"MLflow has no tracking store for the URI scheme {scheme!r}"
            + (f" (did you mean {close[0]}?)" if close else "")
            + f"; the schemes it takes: {', '.join(schemes)} (e.g. sqlite:///mlflow.db, http://host:5000)")


def public_uri(uri: str) -> str:
    """A tracking URI without the user name and password it may hold (for files and tags)."""
    return re.sub(r"(^[\w+.-]+://)[^/@]*@", r"\1", uri)


def run_tags(prepared, recipe, output: Path, run_id: str | None) -> dict[str, Any]:
    """The tags of a training's MLflow run: where its run folder and data are, the data's
    fingerprint, its lineage (the run its backbone started from), backbone and classes.

    Args:
        prepared: the ``PreparedData`` it trains on.
        recipe: the resolved ``Recipe``.
        output: the run folder.
        run_id: the run's own id (labels.json "run_id").

    Returns:
        Tag -> value (None where there is nothing to say).
    """
    from transferkit import __version__
    from transferkit.model.transfer import source_run

    source = source_run(recipe.weights)
    lineage = source.lineage() if source is not None else {}
    return {"transferkit.run_folder": output.resolve(), "transferkit.run_id": run_id,
            "transferkit.data_fingerprint": prepared.fingerprint, "transferkit.data_dir": prepared.data_dir,
            "transferkit.val_dir": prepared.val_dir, "transferkit.lineage.source_run": lineage.get("source_run"),
            "transferkit.lineage.data_fingerprint": lineage.get("data_fingerprint"),
            "transferkit.backbone": recipe.backbone, "transferkit.classes": ", ".join(prepared.class_names),
            "transferkit.version": __version__}


@contextlib.contextmanager
def tracked_training(recipe, prepared, output: Path, work):
    """The MLflow run of one training into a run folder, when the recipe or the environment
    asks for one: started (or, for a resumed training, continued: its id is kept in the
    in-progress folder), ended as finished when the block ends, as killed when training was
    interrupted, as failed on any other error.

    Args:
        recipe: the resolved ``Recipe`` (its params are logged).
        prepared: the ``PreparedData`` it trains on (tags: fingerprint, folders, classes).
        output: the run folder (its name names the MLflow run).
        work: the training's ``WorkFolder``.

    Yields:
        The ``Tracker``, or None (no tracking, or a store that cannot be reached: warned).
    """
    import json

    from transferkit.errors import TrainingInterrupted

    uri = check_tracking(recipe.mlflow)
    tracker = None
    if uri is not None:
        record = work.path / TRACKING_FILE
        previous = None
        if record.is_file():
            with contextlib.suppress(OSError, ValueError):
                previous = json.loads(record.read_text(encoding="utf-8")).get("run_id")
        tracker = Tracker.open(uri, run_name=output.name, resume_id=previous,
                               tags=run_tags(prepared, recipe, output, work.job().get("run_id")),
                               params=recipe_params(recipe.model_dump(mode="json")))
        if tracker is not None:
            log.info(f"MLflow: {'continuing' if tracker.run_id == previous else 'logging to'} run "
                     f"{tracker.run_id} at {public_uri(uri)}")
        if tracker is not None and tracker.run_id != previous:
            from transferkit.files import write_atomic

            write_atomic(record, json.dumps({"run_id": tracker.run_id, "tracking_uri": public_uri(uri)}) + "\n")
    try:
        yield tracker
    except (TrainingInterrupted, KeyboardInterrupt):
        if tracker is not None:
            tracker.end("interrupted")
        raise
    except BaseException:
        if tracker is not None:
            tracker.end("fail")
        raise
    if tracker is not None:
        tracker.end("complete")


def log_finished_run(tracker: Tracker, folder: Path, model: keras.Model, metrics: Mapping[str, Any]) -> None:
    """What a finished run adds to its MLflow run: the final validation figures and
    calibration, the run folder's files, and the model as a logged model of the Keras flavour.

    Args:
        tracker: the run's ``Tracker``.
        folder: the run folder, published.
        model: the saved classifier.
        metrics: the run's metrics.json content.
    """
    calibration = metrics.get("calibration") or {}
    final = metrics.get("final") or {}
    figures = {
        "final_val_accuracy": final.get("val_accuracy"),
        "final_val_loss": final.get("val_loss"),
        "calibration_temperature": calibration.get("temperature"),
        "ece_before_calibration": calibration.get("ece_before"),
        "ece_after_calibration": calibration.get("ece_after"),
        "n_train": metrics.get("n_train"),
        "n_val": metrics.get("n_val"),
    }
    for name, recall in (metrics.get("per_class_accuracy") or {}).items():
        figures[f"val_recall/{name}"] = recall
    tracker.log_metrics(figures, step=int(metrics.get("epochs") or 0))
    log.info(f"MLflow: logging the run folder's files and the model to run {tracker.run_id}")
    tracker.log_run_folder(folder)
    tracker.log_keras_model(model)
