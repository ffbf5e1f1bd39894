"""Evaluate a run on a labelled folder: metrics, per-image rows and the figures, written once.

The folder holds one sub-folder per class, named as the run's classes (a subset is fine: the
classes it lacks are reported as absent), and may hold ``unknown/``: images of no known class,
for the open-set figures (AUROC, FPR at 95% TPR, risk_coverage.png) of the run's rejection
score. ``reject`` and ``sets`` apply the run's rejection threshold and prediction sets as
predict does, and measure them. Images are streamed in batches as predict streams
them, so memory stays flat in the folder's size: only the paths, the true classes and the
(n, k) probabilities are kept, and the few most confidently wrong images are read again at
the end for ``top_losses.png``.

    result = evaluate_folder(load_run("runs/demo"), "test_images/")
    print(result.summary())
    write_evaluation(result)        # RUN/eval-test_images-<timestamp>/
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.errors import DataError, RunError
from transferkit.files import (
    require_apart,
    require_not_a_file,
    require_writable_place,
    write_atomic,
    write_failure,
)
from transferkit.inference.uncertainty import RejectionRule, SetRule, load_rejection, load_set_rule
from transferkit.locks import publishing, require_not_live, stamped_folder
from transferkit.outputs import UNKNOWN
from transferkit.runs import LABELS_FILE
from transferkit.runtime import check_engine_choice

log = logging.getLogger("transferkit")

TOP_LOSSES = 16
FIGURES = ("confusion.png", "top_losses.png", "reliability.png")
# With an unknown/ folder or --reject: risk against coverage, the run's score beside the largest probability.
RISK_COVERAGE = "risk_coverage.png"
BINARY_FIGURES = ("roc.png", "pr.png")


@dataclass(frozen=True)
class EvaluationRow:
    """One image's result: its file, true class ("unknown" for ``unknown/``) and predicted
    class ("unknown" when rejected), confidence, every class's probability (in the run's
    class order), and, when asked for, the rejection score and the prediction set."""

    file: Path
    true: str
    predicted: str
    confidence: float
    probabilities: tuple[float, ...]
    top_class: str = ""
    score: float | None = None
    unknown: bool | None = None
    prediction_set: tuple[str, ...] | None = None


@dataclass
class EvaluationResult:
    """What ``evaluate_folder`` found.

    Attributes:
        run_path: the run folder.
        folder: the labelled folder evaluated.
        class_names: the run's classes, in output order.
        metrics: the metrics.json content (see ``classification_metrics``), plus engine,
            tta and skipped counts.
        files: the classified images, in path order.
        labels: their true class indices.
        probabilities: (n, k) class probabilities, float32.
        skipped: (path, reason) of unreadable image files.
        ignored: files passed over (no image extension, or not inside a class folder).
        engine: the engine that ran.
        tta: the TTA variants used (empty without --tta).
        scores: the open-set score per image (the run's rejection score, or the largest
            probability for a run without one), when computed (``unknown/`` or ``reject``).
        score_name: which score that is.
        rejected: per image, whether ``reject`` labelled it unknown (None without ``reject``).
        members: (n, k) bool prediction sets (None without ``sets``).
    """

    run_path: Path
    folder: Path
    class_names: tuple[str, ...]
    metrics: dict
    files: list[Path]
    labels: np.ndarray
    probabilities: np.ndarray
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    ignored: list[Path] = field(default_factory=list)
    engine: str = "keras"
    tta: tuple[str, ...] = ()
    scores: np.ndarray | None = None
    score_name: str | None = None
    rejected: np.ndarray | None = None
    members: np.ndarray | None = None

    @property
    def known(self) -> np.ndarray:
        """True for images of the run's classes, False for those of ``unknown/``."""
        return self.labels >= 0

    @property
    def predicted(self) -> np.ndarray:
        """Predicted class index per image."""
        from transferkit.evaluation.metrics import predictions

        return predictions(self.probabilities)[0]

    def iter_rows(self) -> Iterator[EvaluationRow]:
        """The rows one at a time (what ``write_evaluation`` uses: no list of all rows)."""
        from transferkit.evaluation.metrics import predictions

        names = self.class_names
        for start in range(0, len(self.files), 1024):
            chunk = self.probabilities[start : start + 1024]
            predicted, confidence = predictions(chunk)
            for offset, row in enumerate(chunk):
                i = start + offset
                top = names[predicted[offset]]
                rejected = None if self.rejected is None else bool(self.rejected[i])
                members = None if self.members is None else tuple(
                    names[j] for j in np.argsort(-row, kind="stable") if self.members[i, j])
                yield EvaluationRow(self.files[i], names[self.labels[i]] if self.labels[i] >= 0 else UNKNOWN,
                                    UNKNOWN if rejected else top, float(confidence[offset]),
                                    tuple(float(p) for p in row), top,
                                    None if self.scores is None else float(self.scores[i]), rejected, members)

    @property
    def rows(self) -> list[EvaluationRow]:
        """Every row, in path order."""
        return list(self.iter_rows())

    def top_losses(self, count: int = TOP_LOSSES) -> list[tuple[Path, str, str, float]]:
        """The most confidently wrong images: (file, true, predicted, confidence), worst first."""
        from transferkit.evaluation.metrics import predictions

        predicted, confidence = predictions(self.probabilities)
        wrong = np.flatnonzero((predicted != self.labels) & self.known)
        order = wrong[np.argsort(-confidence[wrong], kind="stable")][:count]
        return [(self.files[i], self.class_names[self.labels[i]], self.class_names[predicted[i]],
                 float(confidence[i])) for i in order]

    def summary(self, output: str | os.PathLike | None = None) -> str:
        """A few lines for the terminal: how many images, accuracy, calibration, where written."""
        m = self.metrics
        lines = [
            f"{m['n_images']} image(s) of {len(m['present_classes'])} class(es) evaluated "
            f"({self.engine} engine{', TTA over ' + str(len(self.tta)) + ' variants' if self.tta else ''})",
            f"  accuracy {m['accuracy']:.4f}, balanced accuracy {m['balanced_accuracy']:.4f}"
            + (f", top-5 {m['top5_accuracy']:.4f}" if "top5_accuracy" in m else ""),
            f"  ECE {m['ece']:.4f} ({m['ece_bins']} bins), log loss {m['log_loss']:.4f}, Brier {m['brier']:.4f}",
        ]
        if m.get("roc_auc") is not None:
            lines.append(f"  ROC AUC {m['roc_auc']:.4f}, average precision {m['average_precision']:.4f} "
                         f"({m['positive_class']} positive, threshold {m['threshold']})")
        if m["absent_classes"]:
            lines.append(f"  absent from the folder: {', '.join(m['absent_classes'])}")
        lines += trust_summary(m)
        if self.skipped:
            lines.append(f"  {len(self.skipped)} unreadable image file(s) skipped")
        if output is not None:
            lines.append(f"  written to {output}")
        return "\n".join(lines)


def labelled_files(folder: Path, class_names: tuple[str, ...]):
    """The image files of a labelled folder, with their class index.

    Returns:
        (files, labels, skipped, ignored): readable-looking image files in class then path
        order (``unknown/`` last); their class indices (-1 for ``unknown/``, when the run has
        no class of that name); (path, reason) of broken links and unreadable folders; files
        without an image extension and files outside the class folders.

    Raises:
        DataError: the folder is missing or a file, has no class sub-folder, or has a class
            sub-folder that is not one of the run's classes (nor ``unknown/``).
    """
    from transferkit.data.folders import IMAGE_EXTENSIONS, is_ignored, iter_image_files

    if not folder.exists():
        raise DataError(f"{folder} does not exist; pass a folder with one sub-folder of images per class")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file; pass a folder with one sub-folder of images per class")
    try:
        entries = sorted(folder.iterdir(), key=lambda path: path.name)
    except OSError as error:
        raise DataError(f"{folder} cannot be read ({error.strerror})") from error
    class_dirs = [path for path in entries if path.is_dir() and not is_ignored(path)]
    known = {name: index for index, name in enumerate(class_names)}
    if UNKNOWN not in known:  # images of no known class, for the open-set figures
        known[UNKNOWN] = -1
        class_dirs.sort(key=lambda path: path.name == UNKNOWN)
    unknown = [path.name for path in class_dirs if path.name not in known]
    if unknown:
        raise DataError(
            f"{folder} has class folder(s) the run does not know: {', '.join(unknown)}; the run's classes are "
            f"{', '.join(class_names)} (rename or remove those folders; images of no known class go in {UNKNOWN}/)"
        )
    if not any(known[path.name] >= 0 for path in class_dirs):
        which = f"holds only {UNKNOWN}/ (images of no known class)" if class_dirs else "has no class sub-folders"
        raise DataError(f"{folder} {which}; evaluate needs a sub-folder per class, named as the run's classes "
                        f"({', '.join(class_names)})")
    files: list[Path] = []
    labels: list[int] = []
    skipped: list[tuple[Path, str]] = []
    ignored = [path for path in entries if path.is_file() and not is_ignored(path)]
    if any(path.suffix.lower() in IMAGE_EXTENSIONS for path in ignored):
        log.warning("%s: image files outside the class folders have no class and are not evaluated", folder)
    for class_dir in class_dirs:
        for path, reason in iter_image_files(class_dir):
            if reason is None:
                files.append(path)
                labels.append(known[class_dir.name])
            elif path.is_file() and path.suffix.lower() not in IMAGE_EXTENSIONS:
                ignored.append(path)
            else:
                skipped.append((path, reason))
    return files, np.asarray(labels, dtype="int64"), skipped, ignored


def evaluate_folder(
    run,
    folder: str | os.PathLike,
    *,
    tta: bool = False,
    batch_size: int = 32,
    engine="auto",
    precision: str = "auto",
    progress: Callable[[int, int], None] | None = None,
    reject: bool = False,
    sets: float | None = None,
) -> EvaluationResult:
    """Classify every image of a labelled folder and compute the metrics.

    Args:
        run: a ``Run`` (with its model) or a run folder.
        folder: one sub-folder per class, named as (some of) the run's classes, and
            optionally ``unknown/`` with images of no known class (metrics "open_set": the
            AUROC and FPR at 95% TPR of the run's rejection score, or of the largest
            probability for a run without one, beside the largest probability's).
        tta: average over the image and the recipe's ``tta.transforms`` that finetune kept
            (metrics.json "tta"); default False.
        batch_size: images per forward pass (times the variants with ``tta``); default 32.
        engine: "auto", "keras" or "openvino", or a ``ForwardEngine`` built for this run's
            model (used as it is, with ``tta`` ignored); default "auto".
        precision: the engine's precision (see ``predict_folder``); default "auto".
        progress: called with (images done, images total); default None.
        reject: label images below the run's rejection threshold "unknown" and measure it
            (metrics "rejection"); default False.
        sets: a coverage in (0, 1): the run's conformal prediction sets at it, and their
            empirical coverage and mean size (metrics "prediction_sets"); default None.

    Returns:
        An ``EvaluationResult``.

    Raises:
        DataError: the folder is missing, has a class the run does not know, or no image
            of a known class in it could be read; ``sets`` is not in (0, 1); ``tta`` with
            ``reject``, ``sets`` or an ``unknown/`` folder (those are fitted on single views).
        RunError: the run cannot be loaded, or lacks the rejection threshold or set scores
            asked for (a run trained before transferkit fitted them).
        EngineError: an engine or precision outside the choices.
    """
    from transferkit.inference.predict import stream_outputs
    from transferkit.runs import load_run

    check_engine_choice(engine, precision)
    if not hasattr(run, "model") or run.model is None:
        run = load_run(run if not hasattr(run, "path") else run.path)
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    set_rule = load_set_rule(run, sets) if sets is not None else None
    folder = Path(folder)
    files, labels, skipped, ignored = labelled_files(folder, run.class_names)
    for path, reason in skipped:
        log.warning("skipping %s: %s", path, reason)
    trained_on = _trained_on(run, files)
    if not files:
        raise DataError(f"{folder} holds no image files in its class folders; put each class's test images in a "
                        f"sub-folder named as the run's class ({', '.join(run.class_names[:3])}"
                        f"{', ...' if len(run.class_names) > 3 else ''})")
    has_unknown = bool(np.any(labels < 0))
    if tta and (reject or sets is not None or has_unknown):
        what = "--reject" if reject else "--sets" if sets is not None else f"an {UNKNOWN}/ folder"
        raise DataError(f"{what} does not combine with --tta: the run's threshold and set scores were fitted on "
                        "single-view probabilities, not TTA's averages; evaluate without --tta")
    rule = _open_set_rule(run, reject, has_unknown)
    forward, variants = _engine(run, engine, precision, tta, rule, images=len(files))
    kept_files, outputs, unreadable = stream_outputs(forward, files, run.image_size, batch_size, progress)
    skipped.extend(unreadable)
    readable = set(kept_files)  # in the order of ``files``, as the outputs are
    kept = [row for row, path in enumerate(files) if path in readable]
    if not any(labels[row] >= 0 for row in kept):
        if not kept:
            first, reason = skipped[0]
            raise DataError(f"no image could be evaluated: all {len(skipped)} image files under {folder} are "
                            f"unreadable (e.g. {first}: {reason}); replace them or pass another folder")
        raise DataError(f"no image of the run's classes could be read under {folder} (only {UNKNOWN}/ ones); "
                        "evaluate needs images of its classes too")
    result = _result(run, folder, outputs, labels[kept], rule, reject, set_rule)
    result.files = [files[i] for i in kept]
    trained = sum(trained_on[i] for i in kept)
    if trained:
        log.warning("%d of the %d images were training images of this run (its split.csv): its figures on them are "
                    "optimistic; evaluate on images it has not seen", trained, len(kept))
    result.skipped, result.ignored, result.engine, result.tta = skipped, ignored, forward.name, variants
    result.metrics.update(engine=forward.name, tta=list(variants), n_skipped=len(skipped), n_ignored=len(ignored),
                          n_training_images=trained, run=str(run.path), folder=str(folder))
    return result


def _open_set_rule(run, reject: bool, has_unknown: bool) -> RejectionRule | None:
    """The score that tells known from unknown images: the run's rejection rule (required
    with ``reject``), the largest probability for a run without one or (with a warning)
    whose rule cannot be read, or None when neither ``reject`` nor an ``unknown/`` folder
    asks for a score."""
    if reject:
        return load_rejection(run)
    if has_unknown and run.rejection:
        try:
            return load_rejection(run)
        except RunError as error:  # e.g. rejection.npz left behind in a copy: the figures need no threshold
            log.warning("%s; the open-set figures use the largest probability instead", error)
            return RejectionRule("max_probability", math.nan)
    if has_unknown:
        log.info("%s has no rejection score (trained before transferkit fitted one): the open-set figures use "
                 "the largest probability", run.path)
        return RejectionRule("max_probability", math.nan)
    return None


def _result(run, folder: Path, outputs: np.ndarray, labels: np.ndarray, rule: RejectionRule | None, reject: bool,
            set_rule: SetRule | None) -> EvaluationResult:
    """The metrics, scores, rejections and sets of the outputs of readable images."""
    from transferkit.evaluation.metrics import classification_metrics, predictions
    from transferkit.outputs import class_probabilities, output_units
    from transferkit.trust.conformal import set_metrics
    from transferkit.trust.rejection import open_set_report, rejection_report

    units = output_units(len(run.class_names))
    probabilities = class_probabilities(outputs[:, :units]).astype("float32")
    known = labels >= 0
    metrics = classification_metrics(labels[known], probabilities[known], run.class_names)
    scores = rejected = members = None
    if rule is not None:
        scores = outputs[:, units] if rule.needs_embedding else rule.scores(probabilities)
        errors = (predictions(probabilities)[0] != labels) | ~known
        if not known.all():
            metrics["open_set"] = open_set_report(scores, probabilities, known, errors, rule.score)
        if reject:
            rejected = rule.rejects(scores)
            metrics["rejection"] = rejection_report(rule, rejected, known, errors)
    if set_rule is not None:
        members = set_rule.sets(probabilities)
        metrics["prediction_sets"] = dict(set_metrics(members[known], labels[known], set_rule.coverage),
                                          n_calibration=set_rule.n_calibration)
    return EvaluationResult(
        run_path=Path(run.path), folder=folder, class_names=tuple(run.class_names), metrics=metrics, files=[],
        labels=labels, probabilities=probabilities, scores=scores, score_name=rule.score if rule else None,
        rejected=rejected, members=members,
    )


def _engine(run, engine, precision: str, tta: bool, rule: RejectionRule | None = None, images: int = 0):
    """The forward engine for the run (``predict.engine_for``; with a rule whose score reads
    the embedding, one that appends it), and the TTA variants it averages over."""
    from transferkit.inference.predict import engine_for

    if not isinstance(engine, str):
        return engine_for(run, engine, precision, rule), tuple(getattr(engine, "variants", ()))
    if tta:
        from transferkit.evaluation.tta import tta_engine

        forward = tta_engine(run, engine, precision, images=images)
        return forward, forward.variants
    return engine_for(run, engine, precision, rule, images), ()


def trust_summary(metrics: dict) -> list[str]:
    """The summary lines of the open-set, rejection and prediction-set metrics present."""
    lines = []
    open_set = metrics.get("open_set")
    if open_set:
        line = (f"  open set ({open_set['n_unknown']} unknown images): {open_set['score']} AUROC "
                f"{open_set['auroc']:.4f}, FPR at 95% TPR {open_set['fpr_at_95_tpr']:.4f}")
        plain = open_set.get("max_probability")
        if plain:
            line += f" (max probability: AUROC {plain['auroc']:.4f}, FPR {plain['fpr_at_95_tpr']:.4f})"
        lines.append(line)
    rejection = metrics.get("rejection")
    if rejection:
        line = (f"  rejected as unknown ({rejection['score']} < {rejection['threshold']:.4g}): "
                f"{1 - rejection['known_kept']:.1%} of known images")
        if rejection.get("unknown_rejected") is not None:
            line += f", {rejection['unknown_rejected']:.1%} of unknown ones"
        lines.append(line + f"; risk of the kept {rejection['risk']:.4f}")
    sets = metrics.get("prediction_sets")
    if sets:
        lines.append(f"  prediction sets at {sets['target_coverage']:g}: coverage {sets['coverage']:.4f}, mean size "
                     f"{sets['mean_size']:.3f}")
    return lines


def default_output(result: EvaluationResult) -> Path:
    """``RUN/eval-<folder name>-<YYYYmmdd-HHMMSS>`` (``locks.stamped_folder``)."""
    return stamped_folder(result.run_path, f"eval-{result.folder.resolve().name or 'images'}")


def check_output_folder(out_dir: Path, force: bool, folder: str | os.PathLike | None = None,
                        run: str | os.PathLike | None = None) -> None:
    """Fail before any work if ``out_dir`` exists (without ``force``), is not an evaluation
    folder that ``force`` may replace (a run folder, which also holds a metrics.json, never
    is), or is, lies inside or holds the folder evaluated or the run's own data folder
    (its figures would be trained on as images of a class).

    Args:
        out_dir: the evaluation folder.
        force: an earlier evaluation folder there may be replaced.
        folder: the labelled folder evaluated; default None (not checked).
        run: the run evaluated (its labels.json records its data folder); default None.

    Raises:
        RunError: it exists without ``force``, is a file, holds something other than an
            earlier evaluation, is, lies inside or holds ``folder`` or the run's data
            folder, or its place cannot be written.
    """
    from transferkit.data.samples import recorded_data_dir

    require_not_live(out_dir)
    require_apart(out_dir, [folder, recorded_data_dir(run) if run is not None else None], "evaluation folder")
    require_writable_place(Path(os.path.abspath(out_dir)).parent)  # where it is published
    if not out_dir.exists():
        return
    require_not_a_file(out_dir)
    if not force:
        raise RunError(f"{out_dir} exists already; pass --force to replace it or choose another -o")
    if any(out_dir.iterdir()) and not _is_evaluation(out_dir):
        kind = ("an export folder" if (out_dir / "export.json").is_file() else "a run folder"
                if (out_dir / LABELS_FILE).is_file() else
                "not an evaluation folder (no metrics.json beside an evaluation's predictions.csv)")
        raise RunError(f"{out_dir} is {kind} and is not empty; --force replaces only evaluation folders: choose "
                       "another -o")


# The first columns of an evaluation's predictions.csv (``_write_contents``).
_EVALUATION_COLUMNS = "file,true,predicted,confidence,"


def _is_evaluation(folder: Path) -> bool:
    """Whether a folder is one ``write_evaluation`` wrote: its metrics.json beside a
    predictions.csv with an evaluation's columns, and no run's labels.json (a metrics.json
    alone is too common a name to stake a folder's files on)."""
    try:
        with open(folder / "predictions.csv", encoding="utf-8", errors="replace") as handle:
            header = handle.readline()
    except OSError:
        return False
    return (header.startswith(_EVALUATION_COLUMNS) and (folder / "metrics.json").is_file()
            and not (folder / LABELS_FILE).is_file())


def write_evaluation(result: EvaluationResult, out_dir: str | os.PathLike | None = None,
                     force: bool = False) -> Path:
    """Write metrics.json, predictions.csv and the figures into a new folder, atomically.

    The folder is filled in ``OUT.partial/`` under its owner lock (a second ``evaluate -o OUT``
    is refused, naming this one), flushed to disk and renamed at the end, so an interrupted
    write leaves no half-written evaluation.

    Args:
        result: from ``evaluate_folder``.
        out_dir: the folder; default ``RUN/eval-<folder name>-<timestamp>``.
        force: replace an existing evaluation folder; default False.

    Returns:
        The folder.

    Raises:
        RunError: the folder exists without ``force``, is not an evaluation folder, or
            cannot be written.
    """
    from transferkit.files import named_folder

    out_dir = named_folder(out_dir) if out_dir is not None else default_output(result)
    check = lambda: check_output_folder(out_dir, force, result.folder, result.run_path)
    check()
    try:
        # Under the folder's owner lock: a second evaluate -o OUT is refused, naming this one,
        # and the check is made again, as another process may have written OUT meanwhile.
        with publishing(out_dir, "evaluation", check=check) as staging:
            _write_contents(result, staging)
    except OSError as error:
        raise RunError(f"could not write {out_dir}: {write_failure(error)}; nothing was written") from error
    return out_dir


CLASS_PREFIX = "p:"


def class_columns(class_names, own: Sequence[str]) -> list[str]:
    """The probability columns of ``predictions.csv``: one per class, named as the class; all
    named ``p:CLASS`` where a class's name is one of the file's own columns (a class called
    "score" or "confidence"), which a CSV reader would otherwise take for each other."""
    taken = sorted(set(class_names) & set(own))
    if not taken:
        return list(class_names)
    log.warning("class name(s) %s are predictions.csv columns of its own: its class columns are named %sCLASS",
                ", ".join(taken), CLASS_PREFIX)
    return [f"{CLASS_PREFIX}{name}" for name in class_names]


def _trained_on(run, files: Sequence[Path]) -> list[bool]:
    """Per file, whether the run trained on it: a "train" row of its split.csv, the file lying
    below the run's recorded data folder (symbolic links resolved; a file elsewhere of the
    same relative name is another image). All False for a model without its run folder's
    records, or whose data folder is gone."""
    from transferkit.data.samples import recorded_data_dir, recorded_split
    from transferkit.data.split import TRAIN

    data_dir, recorded = recorded_data_dir(run), recorded_split(run)
    if data_dir is None or recorded is None:
        return [False] * len(files)
    root = Path(data_dir).resolve()

    def trained(file: Path) -> bool:
        try:
            return recorded.get(Path(file).resolve().relative_to(root).as_posix()) == TRAIN
        except ValueError:  # not below the data folder
            return False

    return [trained(file) for file in files]


def _write_contents(result: EvaluationResult, folder: Path) -> None:
    from transferkit.evaluation import figures

    payload = dict(result.metrics, skipped=[{"file": str(p), "reason": r} for p, r in result.skipped])
    # File names that are not UTF-8 (surrogates, from os.fsdecode): \udcXX escapes in the JSON,
    # their own bytes in the CSV, as predict writes them.
    write_atomic(folder / "metrics.json",
                 (json.dumps(payload, indent=2, ensure_ascii=False) + "\n").encode("utf-8", "backslashreplace"))
    with open(folder / "predictions.csv", "w", newline="", encoding="utf-8", errors="surrogateescape") as handle:
        writer = csv.writer(handle)
        scored, rejecting = result.scores is not None, result.rejected is not None
        with_sets = result.members is not None
        own = ["file", "true", "predicted", "confidence"] + (["score"] if scored else []) + (
            ["unknown", "top_class"] if rejecting else []) + (["set", "set_size"] if with_sets else [])
        writer.writerow(own[:4] + class_columns(result.class_names, own) + own[4:])
        for row in result.iter_rows():
            fields = [str(row.file), row.true, row.predicted, f"{row.confidence:.6f}",
                      *(f"{p:.6f}" for p in row.probabilities)]
            fields += [f"{row.score:.6f}"] if scored else []
            fields += [str(row.unknown).lower(), row.top_class] if rejecting else []
            fields += ["|".join(row.prediction_set), len(row.prediction_set)] if with_sets else []
            writer.writerow(fields)
    names = result.class_names
    figures.plot_confusion(np.asarray(result.metrics["confusion_matrix"]), names, folder / "confusion.png",
                           title=f"{result.folder.name}: confusion matrix")
    figures.plot_top_losses(result.top_losses(), folder / "top_losses.png")
    figures.plot_reliability(result.metrics["reliability"], result.metrics["ece"], folder / "reliability.png")
    known = result.known
    if len(names) == 2 and result.metrics.get("roc_auc") is not None:
        figures.plot_roc(result.labels[known], result.probabilities[known, 1], folder / "roc.png", positive=names[1])
        figures.plot_pr(result.labels[known], result.probabilities[known, 1], folder / "pr.png", positive=names[1])
    if result.scores is not None:
        _plot_risk_coverage(result, folder / RISK_COVERAGE)


def _plot_risk_coverage(result: EvaluationResult, path: Path) -> None:
    from transferkit.evaluation.metrics import predictions
    from transferkit.inference.uncertainty import max_probability
    from transferkit.trust.rejection import plot_risk_coverage, risk_coverage

    predicted, _ = predictions(result.probabilities)
    errors = (predicted != result.labels) | ~result.known
    curves = {result.score_name: risk_coverage(result.scores, errors)}
    if result.score_name != "max_probability":
        curves["max_probability"] = risk_coverage(max_probability(result.probabilities), errors)
    point = None
    if result.rejected is not None:
        kept = ~result.rejected
        point = (float(kept.mean()), float(errors[kept].mean()) if kept.any() else 0.0)
    n_unknown = int((~result.known).sum())
    title = f"{result.folder.name}: risk-coverage" + (f" ({n_unknown} unknown images)" if n_unknown else "")
    plot_risk_coverage(curves, path, point, title=title)
