"""MODEL_CARD.md: what a run's model is and how far to trust it, in the Hugging Face model-card
layout (YAML front matter, then sections), written from the run folder's own files.

    labels.json      classes, backbone, image size, data fingerprint and folders, lineage,
                     the rejection threshold ("rejection") and prediction sets when present,
                     the MLflow run
    metrics.json     class counts, validation figures and confusion matrix (per-class
                     precision, recall, F1), calibration (temperature, ECE before and after)
    recipe.toml      head, stages, augmentation
    exports/*/       each export's export.json: format, size, accuracy and its drop
    eval-*/          each evaluation's metrics.json: accuracy on other labelled folders

``finetune`` writes it with the rest of the run (inside the atomic save); ``transferkit report
RUN`` writes it again (after an export or an evaluation); each export carries a copy that
lists it. Nothing here loads Keras: the card is text about files.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from transferkit.errors import RunError, first_line
from transferkit.files import write_atomic, write_failure
from transferkit.runs import EXPORT_RECORD, EXPORTS_FOLDER, LABELS_FILE, MODEL_FILE, MODEL_SUFFIXES

log = logging.getLogger("transferkit")

CARD_FILE = "MODEL_CARD.md"
# The 95% interval of an accuracy measured on n images (Wilson score interval).
Z95 = 1.96
# A class with fewer validation images than this has rough figures, and the card says so.
FEW_IMAGES = 20


def write_model_card(run: str | os.PathLike, into: str | os.PathLike | None = None, *, name: str | None = None,
                     extra_exports: Sequence[tuple[Path, Mapping]] = (), note: str | None = None) -> Path:
    """Write MODEL_CARD.md for a run folder, atomically.

    Args:
        run: the run folder (or the staging folder of one being written).
        into: the folder to write the card into; default the run folder.
        name: the run's name in the card; default the run folder's name.
        extra_exports: (folder, export.json content) of exports not yet in ``RUN/exports/``
            (the one being written); one of the same folder replaces it.
        note: a line shown under the title (an export's copy says what it travels with);
            default None.

    Returns:
        The card's path.

    Raises:
        RunError: not a run folder (no labels.json), or one of its files is damaged.
    """
    run = Path(run)
    path = Path(into if into is not None else run) / CARD_FILE
    write_atomic(path, render_model_card(run, name=name, extra_exports=extra_exports, note=note))
    return path


def write_run_report(run: str | os.PathLike) -> list[Path]:
    """``transferkit report``: a run's history.png and confusion.png drawn again from
    history.csv and metrics.json (where it has them), then its MODEL_CARD.md written again,
    listing the exports in ``RUN/exports/`` and the evaluations in ``RUN/eval-*/`` so far.

    Args:
        run: a run folder (or a ``Run``).

    Returns:
        The files written, the card last.

    Raises:
        RunError: not a run folder, or a file it needs is damaged.
    """
    from transferkit.evaluation.figures import write_run_figures
    from transferkit.runs import load_run

    given = Path(getattr(run, "path", run))
    folder = given.parent if given.is_file() and given.suffix.lower() in MODEL_SUFFIXES else given  # RUN/model.keras
    # A damaged metrics.json would give a card without the validation figures in place of
    # the one that has them: nothing is redrawn or rewritten (told before the run is read,
    # which would warn about it first).
    if (folder / LABELS_FILE).is_file():
        _read_json(folder / "metrics.json", required=True)
    loaded = load_run(given, with_model=False)
    written = []
    try:
        if loaded.history or loaded.metrics.get("confusion_matrix"):
            written += write_run_figures(loaded)
        return [*written, write_model_card(loaded.path)]
    except OSError as error:  # a read-only run, a folder where a file goes
        raise RunError(f"cannot write the report into {loaded.path}: {write_failure(error)}") from error


def render_model_card(run: str | os.PathLike, *, name: str | None = None,
                      extra_exports: Sequence[tuple[Path, Mapping]] = (), note: str | None = None) -> str:
    """The model card of a run folder, as Markdown text.

    Args:
        run: the run folder.
        name: the run's name; default the folder's name.
        extra_exports: (folder, export.json content) of exports not yet in ``RUN/exports/``.
        note: a line shown under the title; default None.

    Returns:
        The card's text.

    Raises:
        RunError: not a run folder (no labels.json), or a file it needs is damaged.
    """
    facts = _Facts.read(Path(run), name, extra_exports)
    facts.note = note
    sections = (_front_matter, _summary, _details, _classes, _training_data, _evaluation, _calibration,
                _rejection, _exports, _uses, _limitations, _how_to_use, _footer)
    return "\n".join(section(facts) for section in sections)


class _Facts:
    """What the card says, read once from the run folder."""

    def __init__(self, folder: Path, name: str, labels: dict, metrics: dict, recipe: dict,
                 exports: list[tuple[Path, Mapping]], evaluations: list[tuple[Path, dict]], skipped: int):
        self.folder, self.name = folder, name
        self.labels, self.metrics, self.recipe = labels, metrics, recipe
        self.exports, self.evaluations, self.skipped = exports, evaluations, skipped
        self.classes: list[str] = [str(item) for item in labels.get("class_names", [])]
        self.size = labels.get("image_size")
        self.backbone = str(labels.get("backbone", "?"))
        self.package = labels.get("backbone_package")  # a plugin's
        self.final = metrics.get("final") or {}
        self.note: str | None = None

    @classmethod
    def read(cls, folder: Path, name: str | None, extra_exports) -> _Facts:
        labels_path = folder / LABELS_FILE
        if not labels_path.is_file():
            raise RunError(f"{folder} is not a run folder: {LABELS_FILE} is missing; pass a folder made by "
                           "'transferkit finetune'")
        labels = _read_json(labels_path, required=True)
        metrics = _read_json(folder / "metrics.json")
        recipe = {}
        if (folder / "recipe.toml").is_file():
            try:
                recipe = tomllib.loads((folder / "recipe.toml").read_text(encoding="utf-8"))
            except (OSError, ValueError) as error:
                log.warning("%s is damaged (%s); the card leaves the recipe out", folder / "recipe.toml", error)
        exports = {path.parent.resolve(): (path.parent, _read_json(path))
                   for path in sorted(folder.glob(f"{EXPORTS_FOLDER}/*/{EXPORT_RECORD}"))}
        for export_folder, record in extra_exports:
            exports[Path(export_folder).resolve()] = (Path(export_folder), dict(record))
        evaluations = [(path.parent, _read_json(path)) for path in sorted(folder.glob("eval-*/metrics.json"))]
        skipped = 0
        if (folder / "skipped.txt").is_file():
            skipped = sum(1 for line in (folder / "skipped.txt").read_text(encoding="utf-8").splitlines() if line)
        return cls(folder, name or folder.resolve().name, labels, metrics, recipe,
                   [item for item in exports.values() if item[1]], [item for item in evaluations if item[1]],
                   skipped)

    @property
    def binary(self) -> bool:
        return len(self.classes) == 2

    @property
    def accuracy(self) -> float | None:
        return _finite(self.final.get("val_accuracy"))

    @property
    def n_val(self) -> int:
        return int(self.metrics.get("n_val") or 0)

    @property
    def weights(self) -> str:
        weights = str(self.recipe.get("weights", "?"))
        lineage = self.labels.get("lineage") or {}
        if lineage.get("source_run"):
            return f"the backbone of the run {lineage['source_run']}"
        return {"imagenet": "ImageNet weights", "none": "random weights"}.get(weights.lower(),
                                                                                               f"the file {weights}")

    def per_class(self) -> dict[str, dict]:
        """Precision, recall, F1 and support per class, from the validation confusion matrix."""
        matrix = self.metrics.get("confusion_matrix") or []
        if len(matrix) != len(self.classes):
            return {}
        rows = {}
        for index, name in enumerate(self.classes):
            support = sum(matrix[index])
            predicted = sum(row[index] for row in matrix)
            hits = matrix[index][index]
            precision = hits / predicted if predicted else None
            recall = hits / support if support else None
            f1 = (2 * precision * recall / (precision + recall) if precision and recall else
                  (0.0 if precision is not None and recall is not None else None))
            rows[name] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        return rows

    def counts(self) -> dict[str, tuple[Any, Any]]:
        """Class -> (training images, validation images); "?" where the run did not record them."""
        recorded = self.metrics.get("class_counts") or {}
        per_class = self.per_class()
        return {name: (recorded.get("train", {}).get(name, "?"),
                       recorded.get("val", {}).get(name, per_class.get(name, {}).get("support", "?")))
                for name in self.classes}


# --- the sections, in order -----------------------------------------------------------------


def _front_matter(facts: _Facts) -> str:
    from transferkit import __version__

    lines = ["---", "library_name: keras", "pipeline_tag: image-classification", "tags:"]
    lines += [f"- {tag}" for tag in ("transferkit", "keras", "image-classification", "transfer-learning",
                                     facts.backbone)]
    lines += ["metrics:", "- accuracy"]
    if facts.accuracy is not None:
        data_name = Path(str(facts.labels.get("data_dir") or "images")).name or "images"
        lines += ["model-index:", f"- name: {_yaml(facts.name)}", "  results:", "  - task:",
                  "      type: image-classification", "      name: Image Classification", "    dataset:",
                  "      type: imagefolder", f"      name: {_yaml(data_name)}", "    metrics:",
                  "    - type: accuracy", f"      value: {_yaml(facts.accuracy)}", "      name: Validation accuracy"]
    lines += ["transferkit:", f"  version: {_yaml(__version__)}", f"  classes: {_yaml(facts.classes)}",
              f"  image_size: {_yaml(facts.size)}", f"  backbone: {_yaml(facts.backbone)}",
              f"  data_fingerprint: {_yaml(facts.labels.get('data_fingerprint'))}", "---", ""]
    return "\n".join(lines)


def _summary(facts: _Facts) -> str:
    n = len(facts.classes)
    accuracy = (f" Validation accuracy: **{_percent(facts.accuracy)}** on {facts.n_val} images."
                if facts.accuracy is not None else "")
    note = f"> {facts.note}\n\n" if facts.note else ""
    return (f"# Model card: {facts.name}\n\n{note}"
            f"An image classifier for {n} classes ({', '.join(facts.classes)}), fine-tuned with transferkit from "
            f"a {_backbone(facts)} backbone ({facts.weights}) at {facts.size}x{facts.size} pixels.{accuracy}\n")


def _backbone(facts: _Facts) -> str:
    """A built-in backbone's name as its family writes it (VGG16); a plugin's as its package
    gave it, with the package."""
    return f"{facts.backbone} (from the package {facts.package})" if facts.package else facts.backbone.upper()


def _details(facts: _Facts) -> str:
    recipe, head = facts.recipe, facts.recipe.get("head") or {}
    output = (f"one sigmoid unit: the probability of {facts.classes[1]!r}" if facts.binary
              else f"a softmax over the {len(facts.classes)} classes, in the order of labels.json")
    lines = ["## Model details", "",
             f"- **Backbone:** {facts.backbone}"
             f"{f' (added by the package {facts.package})' if facts.package else ''}, starting from {facts.weights}",
             f"- **Input:** RGB pixels 0..255 of any size; the model resizes them to {facts.size}x{facts.size} "
             "(squashed, not cropped) and applies the backbone's preprocessing itself",
             f"- **Head:** {head.get('pooling', '?')} pooling, dense layers {head.get('units', '?')} "
             f"({head.get('activation', '?')}, dropout {head.get('dropout', '?')}), then {output}",
             f"- **Trained in:** {facts.labels.get('precision', 'float32')} precision, seed {recipe.get('seed', '?')},"
             f" batch size {recipe.get('batch_size', '?')}, transferkit {facts.labels.get('transferkit_version', '?')}"]
    saved = facts.metrics.get("saved") or {}
    if saved:
        lines.append(f"- **Saved weights:** epoch {saved.get('epoch')} (stage {saved.get('stage')!r}: the lowest "
                     "validation loss of the last stage)")
    tracking = facts.labels.get("mlflow") or {}
    if tracking.get("run_id"):
        lines.append(f"- **MLflow:** run {tracking['run_id']} (experiment {tracking.get('experiment_id')}) at "
                     f"{tracking.get('tracking_uri')}")
    stages = recipe.get("stages") or []
    if stages:
        ran = {}
        for row in facts.metrics.get("stages") or []:
            ran[row.get("stage")] = row.get("epochs")
        lines += ["", "| stage | unfrozen blocks | epochs run (of) | optimizer | learning rate | schedule |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for stage in stages:
            epochs = ran.get(stage.get("name"), 0 if stage.get("epochs") == 0 else "?")
            lines.append(f"| {stage.get('name')} | {stage.get('unfreeze')} | {epochs} "
                         f"({stage.get('epochs')}) | {stage.get('optimizer')} | {stage.get('learning_rate')} | "
                         f"{stage.get('schedule', 'constant')} |")
    lines += ["", "Every setting is in `recipe.toml`; `transferkit finetune DATA_DIR --recipe recipe.toml` "
              "trains the same model again (same seed, same split).", ""]
    return "\n".join(lines)


def _classes(facts: _Facts) -> str:
    lines = ["## Classes", "", "In output order:", "", "| # | class | training images | validation images |",
             "| --- | --- | --- | --- |"]
    for index, (name, (train, val)) in enumerate(facts.counts().items()):
        lines.append(f"| {index} | {_cell(name)} | {train} | {val} |")
    lines += ["", f"{facts.metrics.get('n_train', '?')} training and {facts.metrics.get('n_val', '?')} validation "
              "images in all.", ""]
    return "\n".join(lines)


def _training_data(facts: _Facts) -> str:
    labels = facts.labels
    data = facts.recipe.get("data") or {}
    n_train, n_val = facts.metrics.get("n_train"), facts.metrics.get("n_val")
    share = f"{n_val / (n_train + n_val):.0%} of the images" if n_train and n_val else "its share unknown"
    if labels.get("val_dir"):
        validation = f"the folder `{labels['val_dir']}`"
    elif data.get("group_by"):
        validation = (f"a seeded split by group (`data.group_by` = `{data['group_by']}`: no group on both sides), "
                      f"{share} (`data.val_split` {data.get('val_split', '?')}), of the same folder")
    else:
        validation = (f"a seeded stratified split ({data.get('val_split', '?')} of each class) of the same "
                      "folder")
    lines = ["## Training data", "",
             f"- **Folder:** `{labels.get('data_dir', '?')}` (one sub-folder per class)",
             f"- **Validation:** {validation}",
             f"- **Data fingerprint:** `{labels.get('data_fingerprint', 'not recorded')}` (which files were read, "
             "by path and size: a resumed or reproduced run checks it)"]
    if facts.skipped:
        lines.append(f"- **Left out:** {facts.skipped} unreadable or non-image file(s), listed in `skipped.txt`")
    augment = facts.recipe.get("augment") or {}
    if augment:
        lines.append(f"- **Augmentation (training only):** shift {augment.get('shift')}, contrast "
                     f"{augment.get('contrast')}, rotation {augment.get('rotation')} degrees, horizontal flip "
                     f"{_flips_in_words(augment.get('hflip'), facts.metrics.get('hflip'))}")
    lineage = labels.get("lineage") or {}
    if lineage:
        lines.append(f"- **Lineage:** the backbone started from the run `{lineage.get('source_run')}` (its data "
                     f"fingerprint `{lineage.get('data_fingerprint')}`, classes "
                     f"{', '.join(lineage.get('class_names') or [])}); its recipe is in labels.json \"lineage\"")
    else:
        lines.append(f"- **Lineage:** none; the backbone started from {facts.weights}")
    lines.append("")
    return "\n".join(lines)


def _flips_in_words(hflip, decision: dict | None) -> str:
    """The recipe's horizontal flip, and for "auto" what the run decided."""
    if hflip != "auto":
        return "on" if hflip else "off"
    if decision is None:
        return "auto (off: the run's one stage trained without flips, with no later stage to judge them for)"
    first = f"off in stage '{decision['judged_after']}'"
    if decision.get("check") is None:
        return f"auto ({first}, on after it: not judged, too few validation images or several processes)"
    if decision["kept"]:
        return (f"auto ({first}, on after it: mirrored validation images then scored not clearly worse than the "
                "originals)")
    return (f"auto ({first} and after it: mirrored validation images then scored clearly worse, so flips seem "
            "to change the class)")


def _evaluation(facts: _Facts) -> str:
    lines = ["## Evaluation", ""]
    if facts.accuracy is None:
        return "\n".join(lines + ["No validation figures were recorded (metrics.json is missing).", ""])
    low, high = _wilson(facts.accuracy, facts.n_val)
    lines += [f"On the {facts.n_val} validation images: accuracy **{_percent(facts.accuracy)}** "
              f"({facts.accuracy:.3f}; 95% interval "
              f"{_percent(low)} to {_percent(high)}), loss {_number(facts.final.get('val_loss'))}.", ""]
    per_class = facts.per_class()
    if per_class:
        lines += ["| class | precision | recall | F1 | support |", "| --- | --- | --- | --- | --- |"]
        for name, row in per_class.items():
            lines.append(f"| {_cell(name)} | {_number(row['precision'])} | {_number(row['recall'])} | "
                         f"{_number(row['f1'])} | {row['support']} |")
        lines.append("")
    best = facts.metrics.get("best") or {}
    if best:
        lines += [f"The highest validation accuracy during training was {_percent(best.get('val_accuracy'))} at "
                  f"epoch {best.get('epoch')} ({best.get('stage')}).", ""]
    figures = [f"![{stem}]({stem}.png)" for stem in ("history", "confusion")
               if (facts.folder / f"{stem}.png").is_file()]
    if figures:
        lines += [" ".join(figures), ""]
    if facts.evaluations:
        lines += ["Evaluations on other labelled folders (`transferkit evaluate`):", "",
                  "| evaluation | images | accuracy | ECE |", "| --- | --- | --- | --- |"]
        trained = []
        for folder, metrics in facts.evaluations:
            mark = "*" if metrics.get("n_training_images") else ""
            trained += [f"{folder.name}: {metrics['n_training_images']}"] if mark else []
            lines.append(f"| {folder.name}{mark} | {metrics.get('n_images', '?')} | "
                         f"{_percent(metrics.get('accuracy'))} | {_number(metrics.get('ece'))} |")
        lines.append("")
        if trained:
            lines += [f"\\* Not held out: these include images the run trained on ({'; '.join(trained)}), so "
                      "their figures are optimistic.", ""]
    return "\n".join(lines)


def _calibration(facts: _Facts) -> str:
    calibration = facts.metrics.get("calibration")
    lines = ["## Calibration", ""]
    if not calibration:
        return "\n".join(lines + ["The confidences were not calibrated (`calibrate = false`): they are the "
                                  "network's own softmax / sigmoid outputs.", ""])
    temperature = _finite(calibration.get("temperature"))
    fitted = _finite(calibration.get("fitted_temperature"))
    applied = (f"A temperature of {temperature:.3g}, fitted on the validation split, is folded into the output "
               "layer, so plain Keras gives the calibrated probabilities (the top class never changes)."
               if temperature is not None and temperature != 1.0 else
               f"A fitted temperature ({_number(fitted)}) would have raised the calibration error, so none is applied.")
    lines += [applied, "",
              f"Expected calibration error on {calibration.get('n_images', facts.n_val)} validation images: "
              f"{_number(calibration.get('ece_before'))} before, {_number(calibration.get('ece_after'))} after "
              f"(log loss {_number(calibration.get('log_loss_before'))} -> "
              f"{_number(calibration.get('log_loss_after'))}).", ""]
    return "\n".join(lines)


def _rejection(facts: _Facts) -> str:
    rejection = facts.labels.get("rejection")
    lines = ["## Rejection of unknown images", ""]
    if rejection:
        score, threshold = rejection.get("score", "?"), rejection.get("threshold")
        lines += [f"Images whose {score} score falls below the threshold {_number(threshold)} are answered `unknown` "
                  f"(`transferkit predict RUN IMAGES --reject`). On the validation images it keeps "
                  f"{_percent(rejection.get('validation_coverage'))} of them (target coverage "
                  f"{_percent(rejection.get('target_coverage'))}).", ""]
    else:
        lines += ["This run has no rejection threshold: every image, even one of none of these classes, is given "
                  "one of them.", ""]
    sets = facts.labels.get("prediction_sets")
    if sets:
        lines += [f"Prediction sets ({sets.get('method', '?')}, calibrated on "
                  f"{len(sets.get('scores') or [])} validation images) give, for a chosen coverage, every class "
                  "the true one is likely among (`transferkit predict RUN IMAGES --sets 0.9`).", ""]
    return "\n".join(lines)


def _exports(facts: _Facts) -> str:
    lines = ["## Exports", ""]
    if not facts.exports:
        return "\n".join(lines + ["None yet. `transferkit export RUN --format onnx` (or litert, openvino, savedmodel, "
                                  "h5, keras; `--quantize int8` ...) makes one; `transferkit report RUN` then lists "
                                  "it here.", ""])
    lines += ["Each was checked in a fresh process against the Keras model on the validation images:", "",
              "| export | quantization | size | accuracy | Keras float32 | drop (points) | max prob. difference |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for folder, record in facts.exports:
        accuracy = record.get("accuracy") or {}
        verification = record.get("verification") or {}
        run_folder, resolved = facts.folder.resolve(), folder.resolve()
        where = resolved.relative_to(run_folder) if run_folder in resolved.parents else resolved
        size = record.get("size_bytes")
        lines.append(f"| `{where}` | {record.get('quantize', 'none')} | "
                     f"{f'{size / 1e6:.1f} MB' if isinstance(size, (int, float)) else '?'} | "
                     f"{_percent(accuracy.get('exported'))} | {_percent(accuracy.get('keras_float32'))} | "
                     f"{_number(accuracy.get('drop_points'), 2)} | {_number(verification.get('max_abs_diff'))} |")
    lines.append("")
    return "\n".join(lines)


def _uses(facts: _Facts) -> str:
    classes = ", ".join(facts.classes)
    return (f"## Uses\n\n"
            f"Sorting photographs like the training images into {classes}: images of those classes, taken and "
            f"framed as in `{facts.labels.get('data_dir', 'the training folder')}`. The confidences are "
            f"{'calibrated' if facts.metrics.get('calibration') else 'not calibrated'} on the validation split; "
            "decisions that matter should use them with a threshold chosen on held-out data "
            "(`transferkit evaluate`).\n\n"
            "Out of scope: anything else. The model was not trained on images of other classes, other kinds of "
            "pictures (drawings, screenshots, scans) or other cameras and conditions than its data, and it does "
            "not detect or locate objects: it names the one class an image looks most like.\n")


def _limitations(facts: _Facts) -> str:
    lines = ["## Bias, risks and limitations", ""]
    counts = facts.counts()
    lines.append(f"- It knows only its {len(facts.classes)} classes. "
                 + ("Images of anything else are answered `unknown` only with `--reject`, and only when they look "
                    "unlike the training images." if facts.labels.get("rejection") else
                    "An image of anything else still gets one of them, often with high confidence."))
    if facts.accuracy is not None:
        low, high = _wilson(facts.accuracy, facts.n_val)
        lines.append(f"- The validation set is small ({facts.n_val} images): the accuracy could be anywhere from "
                     f"{_percent(low)} to {_percent(high)} (95%) on more images like them."
                     if facts.n_val < 200 else
                     f"- The figures hold for images like the validation images ({facts.n_val}), drawn from the "
                     "same folder as the training images; new data is usually harder.")
    few = [name for name, (_, val) in counts.items() if isinstance(val, int) and val < FEW_IMAGES]
    if few:
        which = ("every class" if len(few) == len(counts) else
                 f"{', '.join(few[:12])}" + (f" and {len(few) - 12} more" if len(few) > 12 else ""))
        lines.append(f"- Classes with fewer than {FEW_IMAGES} validation images have rough per-class figures: "
                     f"{which}.")
    train = [value for value, _ in counts.values() if isinstance(value, int)]
    if train and min(train) and max(train) / min(train) >= 3:
        lines.append(f"- The classes are imbalanced ({min(train)} to {max(train)} training images); the training "
                     "weighted them, but the rarer classes are still learnt from fewer examples.")
    if str(facts.recipe.get("weights", "")).lower() == "none":
        lines.append("- The backbone started from random weights, which is much weaker on real photographs than "
                     "ImageNet weights.")
    lines.append(f"- Images are squashed to {facts.size}x{facts.size}: details smaller than a few pixels at that "
                 "size are lost, and very elongated images are distorted.")
    lines.append("")
    return "\n".join(lines)


def _how_to_use(facts: _Facts) -> str:
    if facts.binary:
        answer = (f"probability = float(model.predict(pixels[None])[0, 0])  # of {facts.classes[1]!r}\n"
                  "label = class_names[1] if probability > 0.5 else class_names[0]\n"
                  "confidence = probability if label == class_names[1] else 1 - probability")
    else:
        answer = ("probabilities = model.predict(pixels[None])[0]\n"
                  "label, confidence = class_names[int(probabilities.argmax())], float(probabilities.max())")
    from transferkit.inference.engines import REFINE_MARGIN
    from transferkit.inference.int8 import AGREEMENT

    precision = facts.labels.get("precision", "float32")
    computes = precision.removeprefix("mixed_")
    rounding = ("to float32 rounding" if computes == "float32" else
                f"to float32 rounding; to {computes} rounding\n# where the backbone has BatchNorm, which predict "
                "folds into the convolutions")
    return (f"## How to use\n\n"
            f"In plain Keras (the model needs nothing from transferkit), from this folder:\n\n"
            f"```python\nimport json\n\nimport keras\nimport numpy as np\nfrom PIL import Image, ImageOps\n\n"
            f"model = keras.models.load_model(\"{MODEL_FILE}\")\n"
            f"class_names = json.load(open(\"{LABELS_FILE}\"))[\"class_names\"]\n"
            f"# The model takes RGB 0..255 of any size and resizes it itself; read as transferkit predict\n"
            f"# reads images (JPEGs decoded at a reduced scale, EXIF orientation, bilinear resize), it gives\n"
            f"# the confidences of `transferkit predict --engine keras`: both run the model in its own\n"
            f"# precision, {precision} ({rounding}).\n"
            f"# Other sizes go through the model's own resize: close, not the same.\n"
            f"image = Image.open(\"photo.jpg\")\n"
            f"image.draft(\"RGB\", ({facts.size}, {facts.size}))\n"
            f"image = ImageOps.exif_transpose(image).convert(\"RGB\").resize(({facts.size}, {facts.size}), "
            f"Image.Resampling.BILINEAR)\n"
            f"pixels = np.asarray(image, dtype=\"float32\")\n{answer}\n```\n\n"
            f"`transferkit predict` with its default engine and precision (auto) computes otherwise: in OpenVINO "
            f"where it is installed, the backbone in bfloat16 where the CPU or GPU runs bfloat16 fast (the head in "
            f"float32). Its confidences then differ from these by 16-bit rounding, about {REFINE_MARGIN / 2:g} "
            f"(what its near-tie check allows for: an image whose top two probabilities are closer than "
            f"{REFINE_MARGIN:g} is computed again in float32, so that its label is float32's where the rounding "
            f"moved its top two by less than that). Without fast "
            f"bfloat16 it computes in float32, or, for 1,000 images or more, in int8 where int8 is faster and "
            f"agrees with float32's label on at least {AGREEMENT:.1%} of its check's images. `--engine keras` "
            f"gives the figures of the lines above; `--precision float32` float32's.\n\n"
            f"With transferkit (batches, calibrated confidences, top-k, CSV or JSON):\n\n"
            f"```bash\ntransferkit predict RUN_DIR images/ --output predictions.csv\n```\n")


def _footer(facts: _Facts) -> str:
    from transferkit import __version__

    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"---\n\n*Written by transferkit {__version__} on {stamp} from this run folder's files; "
            f"`transferkit report RUN_DIR` writes it again.*\n")


# --- small helpers ----------------------------------------------------------------------------


def _read_json(path: Path, required: bool = False) -> dict:
    if not path.is_file():
        return {}
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        if required:
            raise RunError(f"{path} is damaged ({first_line(error)}); nothing was rewritten: copy it from a backup "
                           "of the run, or re-run finetune") from error
        log.warning("%s is damaged (%s); the model card leaves it out", path, error)
        return {}
    return value if isinstance(value, dict) else {}


def _finite(value) -> float | None:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _percent(value) -> str:
    value = _finite(value)
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _number(value, digits: int = 3) -> str:
    value = _finite(value)
    return "n/a" if value is None else f"{value:.{digits}f}"


def _cell(text: str) -> str:
    """A table cell: a "|" in a class name would split it."""
    return str(text).replace("|", "\\|")


def _wilson(accuracy: float, n: int) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy measured on n images."""
    if n <= 0:
        return math.nan, math.nan
    z2 = Z95 * Z95
    centre = (accuracy + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(accuracy * (1 - accuracy) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _yaml(value) -> str:
    """A YAML flow value: JSON is YAML (1.2), so strings, numbers, lists and null come out safe."""
    return json.dumps(value, ensure_ascii=False)
