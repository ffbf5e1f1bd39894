"""Predicting a folder with a saved run: listing its images, streaming them through an
engine, the rows, and the CSV / JSON files they are written to.

    result = predict_folder("runs/flowers", "to_sort/")
    write_predictions(result, "predictions.csv")

The engines themselves (and their near-tie second look) are ``inference.engines``; the
converted-network cache and its clean-up are ``inference.openvino``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.errors import DataError, RunError, UnreadableImage
from transferkit.inference.uncertainty import RejectionRule, SetRule, load_rejection, load_set_rule
from transferkit.outputs import UNKNOWN
from transferkit.runtime import check_engine_choice

# The files predictions are written to, by extension.
OUTPUT_SUFFIXES = (".csv", ".json")

log = logging.getLogger("transferkit")


@dataclass(frozen=True)
class Prediction:
    """One image's result.

    Attributes:
        file: the image path (an upload's file name in ``transferkit serve``).
        label: the predicted class name, or "unknown" when rejection was asked for and the
            image looks like none of the training images.
        confidence: the top class's probability.
        top_k: (class name, probability) pairs, most likely first.
        unknown: whether the image was rejected; None when rejection was not asked for.
        score: the rejection score (higher: more like the training images); None likewise.
        prediction_set: the classes of the conformal prediction set, most likely first; None
            when sets were not asked for.
    """

    file: Path | str
    label: str
    confidence: float
    top_k: tuple[tuple[str, float], ...] = field(default=())
    unknown: bool | None = None
    score: float | None = None
    prediction_set: tuple[str, ...] | None = None

    @property
    def top_class(self) -> str:
        """The most likely class, whether or not the image was rejected."""
        return self.top_k[0][0] if self.top_k else self.label


@dataclass(frozen=True)
class PredictionResult:
    """All rows, the image files that could not be read, and the other files passed over.

    Attributes:
        rows: one ``Prediction`` per readable image, in path order.
        skipped: (path, reason) of unreadable image files and broken links; each is warned about.
        ignored: files without an image extension (notes, CSVs), counted but not warned about.
        engine: the engine that ran ("keras" or "openvino").
        rejection: the run's ``RejectionRule`` when rejection was asked for, else None.
        set_rule: the ``SetRule`` when prediction sets were asked for, else None.
    """

    rows: list[Prediction]
    skipped: list[tuple[Path, str]]
    ignored: list[Path] = field(default_factory=list)
    engine: str = "keras"
    rejection: RejectionRule | None = None
    set_rule: SetRule | None = None

    def summary(self, output: str | os.PathLike | None = None) -> str:
        """One line: how many images were classified, skipped and ignored, and where to."""
        line = f"{len(self.rows)} image(s) classified ({self.engine} engine)"
        if self.rejection is not None:
            line += f", {sum(bool(row.unknown) for row in self.rows)} unknown"
        if self.set_rule is not None and self.rows:
            mean = sum(len(row.prediction_set or ()) for row in self.rows) / len(self.rows)
            line += f", {self.set_rule.coverage:g} prediction sets of {mean:.2f} classes on average"
        if self.skipped:
            line += f", {len(self.skipped)} skipped (unreadable)"
        if self.ignored:
            line += f", {len(self.ignored)} non-image file(s) ignored"
        if output is not None:
            line += f"; written to {output}"
        return line


def predict_folder(
    run,
    folder: str | os.PathLike,
    top_k: int = 1,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    engine="auto",
    precision: str = "auto",
    reject: bool = False,
    sets: float | None = None,
) -> PredictionResult:
    """Classify every image under a folder (recursively), streaming it in batches.

    Args:
        run: a ``Run`` from ``load_run`` (with its model) or a run folder / .keras path.
        folder: the images to classify; a single image file works too.
        top_k: how many classes to list per image; default 1.
        batch_size: images per forward pass; default 32.
        progress: called with (images done, images total) as images get their final
            outputs or are skipped (after each batch; a near tie after its float32 pass).
        engine: "auto" (OpenVINO on CPU when installed), "keras" or "openvino"; the
            converted network is cached per run and image size, outside the run folder
            (see ``inference.openvino.engine_cache_dir``). A ``ForwardEngine`` built for this
            run's model is used as it is.
        precision: the engine's compute precision: "auto" (bfloat16 where the CPU runs it
            fast, near ties computed again in float32 so the top class agrees with float32),
            "float32" (matches Keras float32 to ~1e-5), "bfloat16" or "float16" (16 bits
            only: fastest).
        reject: label images that look like none of the training images "unknown" (the
            run's rejection threshold, fitted at the end of finetune); default False.
        sets: a coverage in (0, 1), e.g. 0.9: give each image its conformal prediction set,
            which holds the true class with that probability; default None (no sets).

    Returns:
        A ``PredictionResult``: rows in path order, skipped and ignored files.

    Raises:
        DataError: the folder does not exist, holds no image file, or none of its image
            files could be read (nothing classified); ``sets`` is not in (0, 1).
        RunError: the run cannot be loaded, or has no rejection threshold (``reject``) or
            prediction-set scores (``sets``): a run trained before transferkit fitted them.
        EngineError: an engine or precision outside the choices.
    """
    check_engine_choice(engine, precision)
    run = run_for_predict(run)
    if top_k < 1:
        raise DataError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    set_rule = load_set_rule(run, sets) if sets is not None else None
    rejection = load_rejection(run) if reject else None
    folder = Path(folder)
    listing = list_images(folder)
    forward = engine_for(run, engine, precision, rejection, images=len(listing.files))
    kept, outputs, unreadable = stream_outputs(forward, listing.files, run.image_size, batch_size, progress)
    # decode_images warned about the files it could not read; the walk's finds are told here
    for path, reason in listing.skipped:
        log.warning("skipping %s: %s", path, reason)
    rows = build_rows(kept, outputs, run.class_names, min(top_k, len(run.class_names)), rejection, set_rule)
    skipped = listing.skipped + unreadable
    if not rows:
        # Nothing classified is a failed run, not an empty table (and no header-only file).
        raise _nothing_classified(folder, skipped)
    return PredictionResult(rows=rows, skipped=skipped, ignored=listing.ignored, engine=forward.name,
                            rejection=rejection, set_rule=set_rule)


@dataclass(frozen=True)
class ImageListing:
    """What a folder to classify holds.

    Attributes:
        files: image files, in path order.
        skipped: (path, reason) of broken links and folders that cannot be read.
        ignored: files without an image extension (notes, CSVs).
    """

    files: list[Path]
    skipped: list[tuple[Path, str]]
    ignored: list[Path]


def check_images(folder: str | os.PathLike) -> Path:
    """Check what to classify before any model loads: the folder exists, and one image
    file given alone can be read (told in one line, not as a warning and an error).

    Args:
        folder: a folder, or one image file.

    Returns:
        ``folder`` as a ``Path``.

    Raises:
        DataError: it does not exist, or it is one file that is not a readable image.
    """
    from transferkit.data.images import read_image

    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder} does not exist; pass a folder of images to classify")
    if folder.is_file():
        try:
            read_image(folder)
        except UnreadableImage as error:
            raise DataError(f"{folder}: {error.reason}; pass a readable image file") from None
    return folder


def list_images(folder: str | os.PathLike) -> ImageListing:
    """List the images under a folder (recursively), or a single image file.

    Args:
        folder: a folder, or one image file.

    Returns:
        An ``ImageListing``.

    Raises:
        DataError: as ``check_images``, or the folder holds no image file.
    """
    from transferkit.data.folders import IMAGE_EXTENSIONS, iter_image_files, partition_skipped

    folder = check_images(folder)
    entries = [(folder, None)] if folder.is_file() else list(iter_image_files(folder))
    files = [path for path, reason in entries if reason is None]
    ignored, skipped = partition_skipped((path, reason) for path, reason in entries if reason is not None)
    if not files:
        raise DataError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return ImageListing(files=files, skipped=skipped, ignored=[path for path, _ in ignored])


def run_for_predict(run):
    """The run to predict with: a ``Run`` as it is; a run folder loaded without its model,
    which ``engine_for`` loads only where no engine was recorded for it (``inference.warm``);
    a bare .keras file with its model.

    Args:
        run: a ``Run``, a run folder or a .keras file.

    Returns:
        A ``Run``.

    Raises:
        RunError: it cannot be loaded.
    """
    from transferkit.runs import MODEL_FILE, load_run

    if not hasattr(run, "path"):
        path = Path(run)
        return load_run(path, with_model=not (path / MODEL_FILE).is_file())
    return run


def engine_for(run, engine, precision: str, rejection: RejectionRule | None = None, images: int = 0):
    """The engine named (built for the run, its network cached in the run's engine cache
    folder), or the ``ForwardEngine`` given, as it is.

    Args:
        run: a ``Run`` (one loaded without its model gets the engine recorded for its model
            file where there is one, ``inference.warm``; else its model is loaded here).
        engine: "auto", "keras" or "openvino", or a ``ForwardEngine``.
        precision: the engine's precision (see ``predict_folder``).
        rejection: a rule whose score reads the backbone embedding gets an
            ``EmbeddingEngine`` that appends the score to each image's outputs; default None.
        images: how many images it will run (``inference.int8.worth_int8`` decides from
            it whether "auto" tries int8); default 0.

    Returns:
        A ``ForwardEngine``.

    Raises:
        ValueError: a ``ForwardEngine`` given for a rejection score it does not compute.
    """
    from transferkit.inference.embedding import EmbeddingEngine, embedding_engine

    needs_score = rejection is not None and rejection.needs_embedding
    if not isinstance(engine, str):
        if needs_score and not (isinstance(engine, EmbeddingEngine) and engine.columns is not None):
            raise ValueError(f"the {rejection.score} rejection score needs the engine engine_for(run, name, "
                             "precision, rejection) builds; pass the engine by name")
        return engine
    from transferkit.inference.int8 import Int8Engine, forward_engine, worth_int8
    from transferkit.inference.openvino import claim_engine_cache
    from transferkit.inference.warm import keep_record, record_key, recorded_engine
    from transferkit.runs import MODEL_FILE, attach_model

    cache = claim_engine_cache(run.path)
    key = None
    if run.model is None and not needs_score:  # a run loaded without its model: maybe a warm start
        # gpu=False: the Keras backend is not asked (record_key makes no key where a GPU device is)
        key = record_key(Path(run.path) / MODEL_FILE, run.image_size, engine, precision,
                         worth_int8(precision, images, gpu=False))
        recorded = recorded_engine(cache, key) if key is not None else None
        if recorded is not None:
            return recorded
    if run.model is None:
        attach_model(run)
    if needs_score:
        return embedding_engine(run.model, engine, run.image_size, cache_dir=cache, precision=precision,
                                input_dtype="uint8", columns=lambda embeddings: rejection.scores(None, embeddings))
    built = forward_engine(run.model, engine, run.image_size, cache_dir=cache, precision=precision,
                           input_dtype="uint8", int8_samples=int8_samples_for(run, precision, images))
    # int8 asked for and not used: not recorded, so that every predict says why (its check is cached)
    if key is not None and (precision != "int8" or isinstance(built, Int8Engine)):
        keep_record(cache, key, built)
    return built


def int8_samples_for(run, precision: str, images: int):
    """Where int8 is worth trying for ``images`` images in ``precision``, a function drawing
    the run's int8 calibration and held-back images (from its recorded data folder, on first
    use: a warm start finds the int8 network and its check cached); else None.

    Args:
        run: a ``Run``.
        precision: the precision asked for.
        images: how many images the engine will run.

    Returns:
        A function returning ``inference.int8.Int8Samples`` (or None without the data
        folder), or None.
    """
    from transferkit.inference.int8 import Int8Samples, worth_int8

    if not worth_int8(precision, images):
        return None

    def draw():
        from transferkit.data.samples import int8_samples

        drawn = int8_samples(run)
        return None if drawn is None else Int8Samples(*drawn)

    return draw


def stream_outputs(forward, files: list[Path], image_size: int, batch_size: int,
                    progress: Callable[[int, int], None] | None):
    """Decode and predict the files batch by batch.

    Returns:
        (the readable files, their outputs in that order, (path, reason) of the unreadable).
    """
    kept: list[Path] = []
    unreadable: list[tuple[Path, str]] = []
    done = 0

    def advance(count: int) -> None:
        # Progress counts an image once its outputs are final (a near tie waiting for its
        # float32 pass is not done yet) or once it is skipped.
        nonlocal done
        done += count
        if progress is not None and count:
            progress(done, len(files))

    def batches():
        for paths, images, batch_skipped in _stream_batches(files, image_size, batch_size):
            unreadable.extend(batch_skipped)
            advance(len(batch_skipped))
            if len(images):
                kept.extend(paths)
                yield images

    outputs = engine_outputs(forward, batches(), batch_size, finished=advance)
    return kept, outputs, unreadable


def prediction_rows(run, files: list, outputs: np.ndarray, top_k: int = 1, *, reject: bool = False,
                    sets: float | None = None, rejection: RejectionRule | None = None) -> list[Prediction]:
    """The rows of predict from the engine's outputs: per image its ``top_k`` classes, most
    likely first. ``predict_folder`` and ``transferkit serve`` both build their answers here,
    so every per-row option of predict reaches the server too.

    Args:
        run: the ``Run`` the outputs come from (its class names name them).
        files: one path (or upload name) per image, in the order of ``outputs``.
        outputs: the engine's outputs, (n, units) float32.
        top_k: how many classes to list per image (at most the run's classes); default 1.
        reject: label images below the run's rejection threshold "unknown"; default False.
        sets: a coverage in (0, 1): each image's conformal prediction set; default None.
        rejection: the run's ``RejectionRule`` (``load_rejection``), whose engine
            (``engine_for(run, ..., rejection)``) made ``outputs``; needed for ``reject``.

    Returns:
        One ``Prediction`` per image, in order.

    Raises:
        DataError: ``top_k`` below 1, or ``sets`` not in (0, 1).
        RunError: ``reject`` without a rejection rule, or ``sets`` on a run without set scores.
    """
    if top_k < 1:
        raise DataError(f"--top-k must be at least 1, got {top_k}")
    if reject and rejection is None:
        raise RunError(f"{run.path}: this run has no rejection threshold to --reject with (it was trained "
                       "before transferkit fitted one); train it again to get one")
    set_rule = load_set_rule(run, sets) if sets is not None else None
    return build_rows(files, outputs, run.class_names, min(top_k, len(run.class_names)),
                      rejection if reject else None, set_rule)


def build_rows(files: list[Path], outputs: np.ndarray, names, top_k: int = 1,
               rejection: RejectionRule | None = None, set_rule: SetRule | None = None) -> list[Prediction]:
    """One ``Prediction`` per file from the engine's outputs: what ``predict_folder`` returns.

    Args:
        files: the images, in the order of the outputs.
        outputs: (n, units) outputs of ``engine_for``'s engine; for a rejection score that
            reads the embedding, (n, units + 1), the score last.
        names: the run's class names, in output order.
        top_k: how many classes to list per image; default 1.
        rejection: label images below its threshold "unknown"; default None.
        set_rule: give each image its prediction set; default None.

    Returns:
        The rows, in the order of ``files``.
    """
    from transferkit.outputs import class_probabilities, output_units

    units = output_units(len(names))
    outputs = np.asarray(outputs)
    probabilities = class_probabilities(outputs[:, :units])
    scores = unknown = members = None
    if rejection is not None:
        scores = outputs[:, units] if rejection.needs_embedding else rejection.scores(probabilities)
        unknown = rejection.rejects(scores)
    if set_rule is not None:
        members = set_rule.sets(probabilities)
    rows: list[Prediction] = []
    for index, (path, row) in enumerate(zip(files, probabilities, strict=False)):
        order = np.argsort(-row, kind="stable")
        ranked = tuple((names[i], float(row[i])) for i in order[:top_k])
        rejected = None if unknown is None else bool(unknown[index])
        rows.append(Prediction(
            path, UNKNOWN if rejected else ranked[0][0], ranked[0][1], ranked, unknown=rejected,
            score=None if scores is None else float(scores[index]),
            prediction_set=None if members is None else tuple(names[i] for i in order if members[index, i]),
        ))
    return rows


def prediction_record(row: Prediction) -> dict:
    """One row as JSON-ready values: file, label, confidence, top_k as a list of
    {"label", "probability"}; with rejection asked for, unknown, top_class and score; with
    prediction sets, set (class names) and set_size. The JSON file of predict and the answers
    of ``transferkit serve`` both use it.

    Args:
        row: a ``Prediction``.

    Returns:
        A dict.
    """
    record = {
        "file": str(row.file),
        "label": row.label,
        "confidence": row.confidence,
        "top_k": [{"label": name, "probability": p} for name, p in row.top_k],
    }
    if row.unknown is not None:
        record.update(unknown=row.unknown, top_class=row.top_class, score=row.score)
    if row.prediction_set is not None:
        record.update(set=list(row.prediction_set), set_size=len(row.prediction_set))
    return record


def _nothing_classified(folder: Path, skipped: list[tuple[Path, str]]) -> DataError:
    """The error for a folder (or file) of which no image could be read."""
    first, reason = skipped[0]
    if folder.is_file():
        return DataError(f"{folder}: {reason}; pass a readable image file")
    if len(skipped) == 1:
        which = f"the only image file under {folder} is unreadable ({first}: {reason})"
    else:
        which = f"all {len(skipped)} image files under {folder} are unreadable (e.g. {first}: {reason})"
    return DataError(f"no image could be classified: {which}; replace them or pass another folder")


def engine_outputs(forward, batches: Iterable[np.ndarray], batch_size: int,
                   finished: Callable[[int], None] | None = None) -> np.ndarray:
    """A forward engine's float32 outputs over a stream of image batches, in order.

    A 16-bit engine that computes near ties again in float32 (``ChainedEngine`` with the
    default precision) has them gathered from several batches, up to ``batch_size``, for
    one float32 pass: per image, a pass over a few costs more than over a batch.

    Args:
        forward: a ``ForwardEngine``; one with ``first_look`` / ``second_look`` gets its
            near ties gathered.
        batches: image batches, as the engine takes them.
        batch_size: how many near ties to gather before a float32 pass.
        finished: called with a count each time that many more images have their final
            outputs (a near tie only after its float32 pass); default None.

    Returns:
        The outputs of every image, in the order of the batches.
    """
    outputs: list[np.ndarray] = []
    near_images: list[np.ndarray] = []
    near_rows: list[tuple[int, np.ndarray]] = []  # (index in outputs, rows in it)

    def report(count: int) -> None:
        if finished is not None and count:
            finished(count)

    def second_look() -> None:
        if near_images:
            refined = forward.second_look(np.concatenate(near_images))
            start = 0
            for chunk, rows_in_chunk in near_rows:
                outputs[chunk][rows_in_chunk] = refined[start : start + len(rows_in_chunk)]
                start += len(rows_in_chunk)
            near_images.clear()
            near_rows.clear()
            report(len(refined))

    for images in batches:
        near = ()
        if hasattr(forward, "first_look"):
            batch_outputs, near = forward.first_look(images)
            if len(near):
                near_images.append(images[near])
                near_rows.append((len(outputs), near))
        else:
            batch_outputs = forward.predict(images)
        outputs.append(np.array(batch_outputs, dtype="float32"))
        report(len(images) - len(near))
        if sum(map(len, near_images)) >= batch_size:
            second_look()
    second_look()
    return np.concatenate(outputs) if outputs else np.zeros((0, 1), dtype="float32")


def _stream_batches(files: list[Path], size: int, batch_size: int) -> Iterator:
    """Decode the next batch in a background thread while the current one is predicted.

    Batches come as decoded, uint8: the engine converts them inside its network."""
    from concurrent.futures import ThreadPoolExecutor

    from transferkit.data.images import decode_images
    from transferkit.inference.engines import yield_to_engine

    def decode(start: int):
        chunk = files[start : start + batch_size]
        # One decoding thread: it runs beside the engine, which uses every core itself.
        images, kept, skipped = decode_images(chunk, size, workers=1)
        return [chunk[i] for i in kept], images, skipped

    starts = range(0, len(files), batch_size)
    with ThreadPoolExecutor(max_workers=1, initializer=yield_to_engine) as pool:
        pending = pool.submit(decode, 0) if files else None
        for next_start in list(starts[1:]) + [None]:
            current = pending.result()
            pending = pool.submit(decode, next_start) if next_start is not None else None
            yield current


def check_output(path: str | os.PathLike, run: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Check, before any prediction, that ``write_predictions`` can write this file, that
    it lies outside the run folder (and any other), and that it replaces no file unless asked to (beside or
    among the images predicted is fine: a CSV or JSON file is never read as an image).

    Nothing is created: a missing parent folder only has to be creatable (``write_predictions``
    creates it once the predictions are done). Writability is tried with an anonymous
    temporary file, since permission bits say nothing for root or for file systems such
    as /proc.

    Args:
        path: the .csv or .json file to write.
        run: the run folder predicted with; default None (not checked).
        force: an existing file may be replaced; default False.

    Returns:
        The path, as a ``Path``.

    Raises:
        DataError: the extension is neither .csv nor .json, the path is a folder, a part
            of it is a file, or the folder it would go in cannot be written.
        RunError: the file lies in the run folder or another run's, or exists (without
            ``force``).
    """
    import tempfile

    from transferkit.files import existing_ancestor, require_new_file
    from transferkit.runs import require_outside_runs

    path = Path(path)
    if path.suffix.lower() not in OUTPUT_SUFFIXES:
        raise DataError(f"--output {path}: use a .csv or .json file name")
    if path.is_dir():
        raise DataError(f"--output {path} is a folder; name a .csv or .json file in it")
    require_outside_runs(path, "--output", run=run)  # the run predicted with, or any other
    require_new_file(path, force, "predictions file")
    # The nearest part of the path that exists: the folder itself, or the one it would be
    # created in. A file there means the folder can never be made.
    existing = existing_ancestor(path.parent)
    if not existing.is_dir():
        raise DataError(f"--output {path}: {existing} is a file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise DataError(
            f"--output {path}: cannot write in {existing} ({error.strerror or error}); "
            "choose a folder you can write to"
        ) from error
    if path.exists() and not os.access(path, os.W_OK):
        raise DataError(f"--output {path} exists and is read-only; choose another name or make it writable")
    return path


def write_predictions(result: PredictionResult, path: str | os.PathLike) -> Path:
    """Write rows as CSV or JSON, chosen by the file's extension, atomically (an existing
    file is replaced only once the new one is complete).

    CSV columns: file, label, confidence, then top_k as "name:prob;name:prob"; with
    rejection, unknown (true/false), top_class and score; with prediction sets, set (class
    names joined by "|", most likely first) and set_size. JSON: a list of objects with the
    same fields (set as a list), plus the skipped and ignored files.
    Every file name round-trips, whatever it holds (spaces, quotes, commas, newlines are
    quoted or escaped): a name whose bytes are not UTF-8 keeps its bytes in the CSV (read it
    with ``errors="surrogateescape"``) and is written with ``\\udcXX`` escapes in the JSON,
    which ``json.load`` and ``os.fsencode`` turn back into the same bytes.

    Args:
        result: what ``predict_folder`` returned.
        path: a .csv or .json file; its folder is created if missing.

    Returns:
        The path, as a ``Path``.

    Raises:
        DataError: the extension is neither .csv nor .json, or the file cannot be written.
    """
    from transferkit.files import remove_leftovers, write_atomic, write_failure

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in OUTPUT_SUFFIXES:
        raise DataError(f"--output {path}: use a .csv or .json file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path.parent)  # what a killed predict was writing
        # CSV as bytes: the csv module writes its own line endings, which must not be translated
        text = _csv_text(result) if suffix == ".csv" else _json_text(result)
        # A file name that is not UTF-8 holds surrogates (os.fsdecode): the CSV keeps its
        # bytes; in the JSON they become \udcXX escapes, which JSON readers decode back.
        write_atomic(path, text.encode("utf-8", "surrogateescape" if suffix == ".csv" else "backslashreplace"))
    except OSError as error:
        raise DataError(f"cannot write {path}: {write_failure(error)}") from error
    return path


def _csv_text(result: PredictionResult) -> str:
    handle = io.StringIO(newline="")
    writer = csv.writer(handle)
    rejecting, with_sets = result.rejection is not None, result.set_rule is not None
    # top_k is "name:p;name:p" (a name is what precedes its last ":") and set "name|name":
    # a class name holding the separator cannot be read back from those columns.
    names = {name for row in result.rows for name, _ in row.top_k}
    names |= {name for row in result.rows for name in (row.prediction_set or ())}
    for name in sorted(names):
        separator = ";" if ";" in name else "|" if "|" in name and with_sets else None
        if separator is not None:
            column = "top_k" if separator == ";" else "set"
            log.warning(f"class {name!r} holds {separator!r}, which the CSV's {column} column puts between classes: "
                        "read that column from a .json output instead (or rename the class folder)")
    writer.writerow(["file", "label", "confidence", "top_k"] + (["unknown", "top_class", "score"] if rejecting else [])
                    + (["set", "set_size"] if with_sets else []))
    for row in result.rows:
        fields = [str(row.file), row.label, f"{row.confidence:.6f}",
                  ";".join(f"{name}:{p:.6f}" for name, p in row.top_k)]
        if rejecting:
            fields += [str(row.unknown).lower(), row.top_class, f"{row.score:.6f}"]
        if with_sets:
            fields += ["|".join(row.prediction_set), len(row.prediction_set)]
        writer.writerow(fields)
    return handle.getvalue()


def _json_text(result: PredictionResult) -> str:
    payload = {
        "predictions": [prediction_record(row) for row in result.rows],
        "skipped": [{"file": str(p), "reason": reason} for p, reason in result.skipped],
        "ignored": [str(p) for p in result.ignored],
    }
    return json.dumps(payload, indent=2, ensure_ascii=False) + "\n"
