"""What the server answers with, apart from HTTP: the run, its engine, uploads decoded and
turned into predict's own rows, Grad-CAM pictures, and the run's facts.

The engine is built by ``inference.predict.engine_for`` (predict's own choice of engine
and precision), uploads are decoded by ``data.images.load_image`` (predict's decoding:
formats, modes, EXIF orientation) and rows come from ``inference.predict.prediction_rows``
and ``prediction_record`` (predict's row builder and its JSON form), so an answer holds
exactly what ``transferkit predict`` gives for the same files. Nothing here imports FastAPI.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.errors import DataError, ServeError, UnreadableImage
from transferkit.serve.batcher import MicroBatcher

log = logging.getLogger("transferkit")

# The side, in pixels, that an image is scaled down to (keeping its shape) before Grad-CAM:
# the model sees the image at its own input size anyway; the picture stays small to send.
EXPLAIN_SIDE = 512

READABLE = "send a JPEG, PNG, BMP, GIF, WebP or TIFF image"


@dataclass(frozen=True)
class ServeSettings:
    """How to serve a run (what ``transferkit serve`` takes, less the address).

    Attributes:
        run: the run folder (or its model.keras).
        engine: "auto", "keras" or "openvino", as predict's ``--engine``; default "auto".
        precision: as predict's ``--precision``; default "auto".
        max_batch: the most images in one engine call; default 32.
        max_upload_mb: the largest request body, in MB (all its files together); default 20.
    """

    run: str
    engine: str = "auto"
    precision: str = "auto"
    max_batch: int = 32
    max_upload_mb: float = 20.0

    @property
    def max_upload_bytes(self) -> int:
        """``max_upload_mb`` in bytes (MB = 2**20 bytes)."""
        return int(self.max_upload_mb * 1024 * 1024)

    def to_json(self) -> str:
        """The settings as JSON (for worker processes, through the environment)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ServeSettings:
        """Settings from ``to_json``'s text."""
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Upload:
    """One uploaded file.

    Attributes:
        name: the file name the client gave (or "file1", "file2", ... without one).
        data: its bytes.
    """

    name: str
    data: bytes


class Service:
    """A loaded run ready to answer: its engine's thread, its facts, its counters.

    Args:
        settings: the ``ServeSettings``.
        run: the loaded ``Run`` (with its model).
        forward: the ``ForwardEngine`` predict would use.
        labels: the run's labels.json, as a dict.
        rejection: the run's ``RejectionRule``, whose score ``forward`` computes; default
            None (a run without one: ?reject=true is then a 4xx saying so).

    Attributes:
        batcher: the ``MicroBatcher`` that owns the engine.
        answered: images answered so far.
    """

    def __init__(self, settings: ServeSettings, run, forward, labels: dict, rejection=None):
        self.settings = settings
        self.rejection = rejection  # the run's rejection rule, when it has one (?reject=true)
        self.run = run
        self.forward = forward
        self.labels = labels
        # Grad-CAM runs the Keras model; so does a Keras engine: one at a time.
        self.model_lock = threading.Lock()
        self.batcher = MicroBatcher(forward, settings.max_batch,
                                    lock=self.model_lock if forward.name == "keras" else None)
        self.answered = 0
        # HTTP requests begun and not yet answered, health checks not counted (RequestGuard
        # keeps it, on the event loop): what a server stopping now would still owe.
        self.in_flight = 0
        self.started = time.time()
        # Set once the server has stopped answering (after its grace): a request's decoding,
        # in a worker thread that outlives its answer, ends at its next image instead of
        # keeping the process alive (250 large images: 88 s).
        self.stopped = threading.Event()

    def decode(self, uploads: list[Upload]) -> np.ndarray:
        """Decode uploads as predict decodes files, at the run's image size.

        Args:
            uploads: the files of one request.

        Returns:
            uint8 (n, S, S, 3).

        Raises:
            DataError: no file, an empty file, or one that is not a readable image (named).
            ServeError: the server stopped meanwhile (its answer was a 503 already).
        """
        from transferkit.data.images import load_image

        if not uploads:
            raise DataError("no image in the request: send each image as a multipart form field named 'file'")
        size = self.run.image_size
        images = np.empty((len(uploads), size, size, 3), dtype="uint8")
        for index, upload in enumerate(uploads):
            if self.stopped.is_set():
                raise ServeError("the server stopped before these images were read")
            if not upload.data:
                raise DataError(f"{upload.name} is empty (0 bytes); send the image file's contents")
            try:
                images[index] = load_image(upload.data, size)
            except UnreadableImage as error:
                raise DataError(f"{upload.name}: {error.reason}; {READABLE}") from None
        return images

    def row_options(self, top_k: int = 1, **asked) -> dict:
        """The options for ``prediction_rows``: ``top_k`` and every other one asked for
        (``reject``, ``sets``: predict's per-row options) that predict's row builder takes.

        Args:
            top_k: classes per image; default 1.
            **asked: option name -> value, None or False when not asked for.

        Returns:
            Keyword arguments for ``prediction_rows``.

        Raises:
            DataError: ``top_k`` below 1, or an option predict's row builder does not take.
        """
        from transferkit.inference.predict import prediction_rows

        if top_k < 1:
            raise DataError(f"top_k must be at least 1, got {top_k}")
        accepted = inspect.signature(prediction_rows).parameters
        options = {"top_k": top_k}
        for name, value in asked.items():
            if value is None or value is False:
                continue
            if name not in accepted:
                raise DataError(f"?{name}= is not supported by this transferkit's predict "
                                f"(transferkit {self.version}); leave it out")
            options[name] = value
        return options

    def rows(self, names: list[str], outputs: np.ndarray, options: dict) -> list[dict]:
        """Predict's rows for one request's outputs, as JSON-ready dicts.

        Args:
            names: the uploads' names, in order.
            outputs: their engine outputs.
            options: from ``row_options``.

        Returns:
            One dict per image (file, label, confidence, top_k, and whatever else predict's
            rows hold).
        """
        from transferkit.inference.predict import prediction_record, prediction_rows

        rows = prediction_rows(self.run, names, outputs, rejection=self.rejection, **options)
        records = [prediction_record(row) for row in rows]
        self.answered += len(records)
        return records

    def explain_png(self, upload: Upload, class_name: str | None = None) -> bytes:
        """The Grad-CAM heatmap of one image drawn over it, as a PNG (at most
        ``EXPLAIN_SIDE`` pixels on its longer side).

        Args:
            upload: the image.
            class_name: the class to explain; default None (the predicted one).

        Returns:
            The PNG file's bytes.

        Raises:
            DataError: an empty or unreadable upload, or an unknown class name.
        """
        from PIL import Image

        from transferkit.data.images import read_image
        from transferkit.evaluation.gradcam import explain, overlay_heatmap

        if not upload.data:
            raise DataError(f"{upload.name} is empty (0 bytes); send the image file's contents")
        try:
            image = Image.fromarray(read_image(upload.data))
        except UnreadableImage as error:
            raise DataError(f"{upload.name}: {error.reason}; {READABLE}") from None
        image.thumbnail((EXPLAIN_SIDE, EXPLAIN_SIDE), Image.Resampling.BILINEAR)
        pixels = np.asarray(image)
        with self.model_lock:
            (explanation,) = explain(self.run, pixels, class_name=class_name, top=1)
        picture = overlay_heatmap(pixels, explanation.heatmaps[0].heat)
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG")
        return buffer.getvalue()

    @property
    def version(self) -> str:
        from transferkit import __version__

        return __version__

    def metadata(self) -> dict:
        """The run's facts: classes, image size, backbone, calibration, rejection threshold
        (when the run has one), prediction sets (when it has them), validation accuracy, the
        engine and the server's limits, the transferkit version."""
        run, labels = self.run, self.labels
        rejection = labels.get("rejection")
        sets = labels.get("prediction_sets")
        final = run.metrics.get("final", {})
        return {
            "run": run.path.name,
            "classes": list(run.class_names),
            "image_size": run.image_size,
            "backbone": run.backbone,
            "head_activation": run.head_activation,
            "trained_precision": labels.get("precision"),
            "calibration": run.metrics.get("calibration"),
            "rejection": rejection,
            "rejection_threshold": rejection.get("threshold") if isinstance(rejection, dict) else None,
            # the method only: the validation scores behind the sets are long and say nothing here
            "prediction_sets": ({key: value for key, value in sets.items() if key != "scores"}
                                if isinstance(sets, dict) else None),
            "validation": {"accuracy": final.get("val_accuracy"), "images": run.metrics.get("n_val")},
            "data_fingerprint": labels.get("data_fingerprint"),
            "engine": self.forward.name,
            "precision": self.settings.precision,
            "max_batch": self.settings.max_batch,
            "max_upload_mb": self.settings.max_upload_mb,
            "transferkit_version": self.version,
        }

    def health(self) -> dict:
        """Liveness and counters: status, the process answering (each worker process has its
        own counters), engine, images answered, requests in flight (health checks not
        counted), queue, engine batches."""
        stats = self.batcher.stats
        return {
            "status": "ok",
            "process": os.getpid(),
            "engine": self.forward.name,
            "images_answered": self.answered,
            "requests_in_flight": self.in_flight,
            "queued": self.batcher.queued,
            "batches": stats.batches,
            "largest_batch": stats.largest,
            "uptime_s": round(time.time() - self.started, 1),
        }


def load_service(settings: ServeSettings, snapshot: str | os.PathLike | None = None) -> Service:
    """Load a run and build its engine as predict does, then warm it up (so the first
    request does not pay for it).

    Args:
        settings: the ``ServeSettings``.
        snapshot: a ``take_snapshot`` of ``settings.run`` to load instead of the run itself
            (its engine cache stays the run's, so a snapshot converts nothing again); default
            None.

    Returns:
        A ``Service``; its batcher is not started yet (``Service.batcher.start()``).

    Raises:
        RunError: the run cannot be loaded.
        EngineError: the engine asked for is not installed.
    """
    from transferkit.errors import RunError
    from transferkit.inference.int8 import AUTO_MIN_IMAGES
    from transferkit.inference.predict import engine_for
    from transferkit.inference.uncertainty import load_rejection
    from transferkit.runs import LABELS_FILE, load_run

    if snapshot is None:
        run = load_run(settings.run)
    else:
        copy = Path(snapshot)
        if not copy.exists():
            raise ServeError(f"the copy of {settings.run} that this server's workers load ({snapshot}) was removed; "
                             "start transferkit serve again")
        # the snapshot's folder and the run's: the model file's, where the run was given by it
        folder, original = (copy.parent, Path(settings.run).parent) if copy.is_file() else (copy, Path(settings.run))
        try:
            run = load_run(copy)
        except RunError as error:  # told of the run, not of the snapshot nobody knows about
            raise RunError(str(error).replace(str(folder), str(original))) from error
    try:  # the engine computes the rejection score too, so that ?reject=true costs no second pass
        rejection = load_rejection(run)
    except RunError:
        rejection = None  # a run trained before transferkit fitted one
    labels = json.loads((run.path / LABELS_FILE).read_text(encoding="utf-8"))
    if snapshot is not None:  # read from the snapshot; named, and its engine cached, as the run
        run = dataclasses.replace(run, path=original)
    # A server runs many images over its life: int8 is worth trying where the precision allows.
    forward = engine_for(run, settings.engine, settings.precision, rejection, images=AUTO_MIN_IMAGES)
    getattr(forward, "exact", None)  # predict builds the float32 engine for near ties on first use; here now
    # One pass, so that the first request meets a compiled, traced engine.
    forward.predict(np.zeros((1, run.image_size, run.image_size, 3), dtype="uint8"))
    log.debug("serving %s with %r", run.path, forward)
    return Service(settings, run, forward, labels, rejection)


# The environment variable naming the snapshot that ``serve --workers N``'s worker processes load.
SNAPSHOT_VARIABLE = "TRANSFERKIT_SERVE_SNAPSHOT"


def snapshot_folder() -> Path:
    """A new, empty folder for ``take_snapshot``: ``<cache>/serve/.snapshot-<token>.partial-<pid>``
    (``files.cache_root``; a run on the same file system is linked, not copied). Those of
    servers that were killed (their process gone) are removed first. The caller removes it
    once the server has stopped.

    Raises:
        ServeError: the folder cannot be made.
    """
    import secrets

    from transferkit.files import cache_root, remove_leftovers, staging_folder

    parent = cache_root() / "serve"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(parent)
        folder = staging_folder(parent / f"snapshot-{secrets.token_hex(4)}")
        folder.mkdir()
    except OSError as error:
        raise ServeError(f"cannot make a folder in {parent} for the workers' copy of the run "
                         f"({error.strerror or error}); set TRANSFERKIT_CACHE to a writable folder") from error
    return folder


def take_snapshot(run_path: str | os.PathLike, into: str | os.PathLike) -> Path:
    """The files a server loads from a run, hard-linked into the folder ``into`` (copied
    where a link cannot be made), as one consistent set: they stay as they are when the run
    is replaced (``finetune --force``) or removed. ``serve --workers N`` loads its workers
    from one, so that a worker uvicorn starts again hours later answers with the model the
    others answer with.

    Args:
        run_path: a run folder, or its model file.
        into: an empty folder (``snapshot_folder``).

    Returns:
        What to load (``load_service(settings, snapshot=...)``): ``into``, or the model file
        in it where ``run_path`` is a model file.

    Raises:
        RunError: the run cannot be loaded (named as given).
        ServeError: the files cannot be linked or copied there, or the run kept changing
            while they were.
    """
    import shutil

    from transferkit.runs import LABELS_FILE, MODEL_FILE, load_run

    given, into = Path(run_path), Path(into)
    for _ in range(3):  # a run replaced while it was linked is linked again: its files are one run's
        run = load_run(given, with_model=False)  # a missing or broken run is told as the user named it
        model_name = given.name if given.is_file() else MODEL_FILE
        names = {model_name, LABELS_FILE, *SNAPSHOT_FILES} | set(filter(None, [reference_file(run.rejection)]))
        for old in into.iterdir():
            old.unlink()
        copies = []
        for name in sorted(names):
            source, target = run.path / name, into / name
            if not source.is_file():
                continue
            try:
                try:
                    os.link(source, target)
                except OSError:  # another file system, or one without hard links
                    shutil.copy2(source, target)
            except OSError as error:
                raise ServeError(f"cannot keep a copy of {source} in {into} for the worker processes "
                                 f"({error.strerror or error}); free space there, or set TRANSFERKIT_CACHE to a "
                                 "folder with room") from error
            copies.append((source, target))
        if all(_same_file(source, target) for source, target in copies):
            return into / model_name if given.is_file() else into
    raise ServeError(f"{given} changed while its files were read, three times; start the server again once it is "
                     "written")


# The files a server reads from a run beside its model file, labels.json and its rejection reference.
SNAPSHOT_FILES = ("recipe.toml", "history.csv", "metrics.json")


def reference_file(rejection) -> str | None:
    """The file name of a run's rejection reference (labels.json "rejection"), where it is a
    plain name in the run folder; None otherwise (``load_rejection`` tells what is wrong)."""
    from transferkit.inference.uncertainty import REFERENCE_FILE

    if not isinstance(rejection, dict):
        return None
    name = rejection.get("reference_file", REFERENCE_FILE)
    return name if isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name else None


def _same_file(source: Path, target: Path) -> bool:
    """Whether ``target`` (a hard link or a copy) still holds what ``source`` holds."""
    try:
        a, b = source.stat(), target.stat()
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) or (a.st_size, a.st_mtime_ns) == (b.st_size, b.st_mtime_ns)


def settings_from_environment(variable: str = "TRANSFERKIT_SERVE") -> ServeSettings:
    """The settings a worker process was given through the environment.

    Args:
        variable: the environment variable holding ``ServeSettings.to_json``'s text.

    Returns:
        The ``ServeSettings``.
    """
    text = os.environ.get(variable)
    if not text:
        raise RuntimeError(f"{variable} is not set: worker processes are started by `transferkit serve`")
    return ServeSettings.from_json(text)


def upload_name(name: str | None, index: int) -> str:
    """The name an upload goes by in the answer: the file name the client gave, or
    "file<index + 1>" without one."""
    return name or f"file{index + 1}"
