"""``export_run``: a run's model written in another format, checked against the Keras model
in a fresh process before it is kept, with labels.json, README.txt and export.json beside it.

    RUN/exports/litert-int8/
      model.tflite     the file (savedmodel: a saved_model/ folder; openvino: model.xml + .bin)
      labels.json      class names in output order, the input it takes, the output activation
      README.txt       how to load it in its runtime, in three lines
      export.json      how it was made and checked: agreement with Keras, accuracy, sizes
      MODEL_CARD.md    the run's model card, this export listed in it

Each export folder is filled in ``FOLDER.partial/`` while its process holds the folder's owner
lock (``transferkit.locks``: a second export to it is refused, naming the first) and renamed
only once its file has loaded and agreed in the fresh process, so a failed export leaves
nothing behind and an existing folder is replaced only with ``force``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.backbones import find_spec
from transferkit.errors import ExportError, RunError
from transferkit.evaluation.card import write_model_card
from transferkit.export.formats import (
    DEFAULT_MAX_DROP,
    FLOAT_TOLERANCE,
    FORMATS,
    ExportFormat,
    check_quantization,
    get_format,
    holdable,
    install_hint,
    missing_packages,
    require_packages,
    require_tensorflow_backend,
)
from transferkit.export.verify import SHARED_PROCESS, FreshChecks
from transferkit.files import require_apart, require_not_a_file, require_writable_place, write_atomic, write_failure
from transferkit.locks import publishing, require_not_live
from transferkit.runs import EXPORT_RECORD, EXPORTS_FOLDER
from transferkit.runtime import quieter_loggers

log = logging.getLogger("transferkit")

RECORD_FILE = EXPORT_RECORD  # export.json; runs.EXPORTS_FOLDER: where exports go in a run folder

# format -> (module, writer function, which model it takes: "float32" or "fixed" size).
WRITERS = {
    "savedmodel": ("transferkit.export.savedmodel", "write_savedmodel", "float32"),
    "litert": ("transferkit.export.litert", "write_litert", "fixed"),
    "onnx": ("transferkit.export.onnx", "write_onnx", "fixed"),
    "openvino": ("transferkit.export.openvino", "write_openvino", "float32"),
    "h5": ("transferkit.export.keras", "write_h5", "float32"),
    "keras": ("transferkit.export.keras", "write_keras", "float32"),
}


@dataclass
class ExportResult:
    """One written (and checked) export.

    Attributes:
        format: the format name.
        quantize: "none", "float16", "dynamic" or "int8".
        folder: the export folder.
        file: the model file (or SavedModel folder) in it.
        size_bytes: the model's size on disk.
        max_abs_diff: the largest probability difference from the Keras model (float32).
        top1_agreement: the share of images whose top class is the Keras model's.
        n_images: images compared.
        accuracy: the export's accuracy on the labelled validation images (or, without data,
            its agreement with the float model's top class).
        float_accuracy: the Keras model's (float32) accuracy on the same images.
        record: the export.json content.
    """

    format: str
    quantize: str
    folder: Path
    file: Path
    size_bytes: int
    max_abs_diff: float
    top1_agreement: float
    n_images: int
    accuracy: float
    float_accuracy: float
    record: dict = field(default_factory=dict)

    @property
    def drop_points(self) -> float:
        """Accuracy lost against the float Keras model, in percentage points."""
        return 100.0 * (self.float_accuracy - self.accuracy)

    def summary(self) -> str:
        """One line for the terminal."""
        name = self.format if self.quantize == "none" else f"{self.format} {self.quantize}"
        return (f"{name}: {self.file} ({self.size_bytes / 1e6:.1f} MB); vs Keras max |dp| {self.max_abs_diff:.2g}, "
                f"top-1 agreement {100 * self.top1_agreement:.1f}% on {self.n_images} images; accuracy "
                f"{100 * self.accuracy:.1f}% (Keras float32 {100 * self.float_accuracy:.1f}%, "
                f"drop {self.drop_points:.1f} points)")


def export_run(
    run,
    format: str,
    output: str | os.PathLike | None = None,
    quantize: str = "none",
    *,
    data: str | os.PathLike | None = None,
    max_drop: float = DEFAULT_MAX_DROP,
    allow_drop: bool = False,
    force: bool = False,
    samples: int = 256,
    calibration: int = 200,
) -> list[ExportResult]:
    """Export a run's model, check each file in a fresh process, and keep it only if it agrees.

    Args:
        run: a run folder (or its model.keras), or a loaded ``Run``.
        format: one of ``FORMATS`` ("savedmodel", "litert", "onnx", "openvino", "h5",
            "keras"), or "all": every format that supports ``quantize`` and whose runtime is
            installed (the others are skipped with a warning naming the install command).
        output: the export folder; with "all", the folder that holds one per format;
            default ``RUN/exports/<format>[-<quantize>]``.
        quantize: "none" (float32), "float16", "dynamic" or "int8"; default "none".
        data: the run's data folder, whose validation split (split.csv) checks the export
            and whose training images calibrate int8; default None (``data_dir`` in the
            run's labels.json if it names one, else generated images).
        max_drop: accuracy points a quantized export may lose; default 1.0.
        allow_drop: keep a quantized export that loses more; default False.
        force: replace existing export folders; default False.
        samples: at most this many validation images are compared; default 256.
        calibration: at most this many training images calibrate int8; default 200.

    Returns:
        One ``ExportResult`` per written export.

    Raises:
        ExportError: an unknown format or quantization, a missing runtime, an existing
            folder without ``force``, a float export beyond ``FLOAT_TOLERANCE``, or a
            quantized one beyond ``max_drop`` without ``allow_drop``.
        RunError, DataError: the run or the data folder cannot be read.
    """
    from transferkit.runs import Run, load_run

    specs = _chosen_formats(format, quantize)
    if not max_drop >= 0:  # nan too
        raise ExportError(f"--max-drop must be at least 0 points, got {max_drop:g}")
    # The run's record, then the folders: a bad -o is told before Keras loads (seconds).
    described = run if isinstance(run, Run) else load_run(getattr(run, "path", run), with_model=False)
    specs = _fit_for_backbone(find_spec(described.backbone), specs, many=format == "all")
    targets = _targets(described, specs, quantize, output, format == "all", force, data)
    if format != "all":
        require_packages(specs[0], quantize)
    require_tensorflow_backend()
    from transferkit.data.samples import sample_images
    from transferkit.export.keras import fixed_size_model, float32_model, predict

    run = run if isinstance(run, Run) and run.model is not None else load_run(getattr(run, "path", run))
    model = float32_model(run.model)
    sample = sample_images(run, data, samples=samples, calibration=calibration if quantize == "int8" else 0)
    reference = predict(model, sample.images)
    fixed = None
    results = []
    with FreshChecks() as checks:  # the TensorFlow formats checked in one fresh process
        context = _Context(run, model, sample, reference, quantize, max_drop, allow_drop, force, checks)
        for spec, target in zip(specs, targets, strict=True):
            if WRITERS[spec.name][2] == "fixed" and fixed is None:
                fixed = fixed_size_model(model)
            results.append(_export_one(context, spec, target, fixed if WRITERS[spec.name][2] == "fixed" else model))
    return results


@dataclass
class _Context:
    run: object
    model: object
    sample: object
    reference: np.ndarray
    quantize: str
    max_drop: float
    allow_drop: bool
    force: bool
    checks: FreshChecks


def _chosen_formats(format: str, quantize: str) -> list[ExportFormat]:
    """The format named (its packages are checked later, once its folder is known good:
    importing them can load TensorFlow), or with "all" those whose packages import here."""
    if format != "all":
        spec = get_format(format)
        check_quantization(spec, quantize)
        return [spec]
    chosen = []
    for spec in FORMATS.values():
        if quantize not in spec.quantizations:
            continue
        missing = missing_packages(spec, quantize)
        if missing:
            log.warning("skipping the %s export: %s not installed (%s)", spec.name,
                        ", ".join(package.module for package in missing), install_hint(missing))
            continue
        chosen.append(spec)
    if not chosen:
        raise ExportError(f"no format can be exported with --quantize {quantize} here; "
                          f"install the export runtimes: {install_hint([])}")
    return chosen


def _fit_for_backbone(backbone, specs: list[ExportFormat], many: bool) -> list[ExportFormat]:
    """The formats that can hold the run's backbone (``formats.holdable``): with "all" the
    others are skipped with a warning; one asked for by name is an error. A backbone no
    installed package adds any more (None) declares none: the conversion and its check in
    the format's own runtime tell whether the file holds it."""
    fit, unfit = holdable(backbone, specs, lambda spec: spec.name, named=not many)
    for spec, error in unfit:
        log.warning("skipping the %s export: %s", spec.name, error)
    return fit


def _targets(run, specs, quantize: str, output, many: bool, force: bool, data=None) -> list[Path]:
    """Each export's folder, checked before any work: none may exist without ``force``,
    ``force`` replaces only export folders (never the run, never another folder), and none
    lies in the data folder (``data``, else the one the run recorded). With "all", the
    folders that exist are named together with the commands for the formats still missing
    (an interrupted "all" keeps the exports it completed)."""
    from transferkit.data.samples import recorded_data_dir

    root = Path(run.path) / EXPORTS_FOLDER if output is None or many else None
    if output is not None and many:
        root = Path(output)
    targets = [root / spec.folder_name(quantize) if root is not None else Path(output) for spec in specs]
    data = data if data is not None else recorded_data_dir(run)
    existing = []
    for spec, target in zip(specs, targets, strict=True):
        if many and not force and target.exists():
            _check_target(run, target, True, data)  # every other check: a file, a live or foreign folder
            existing.append((spec, target))  # told together below: an earlier or interrupted "all"
            continue
        _check_target(run, target, force, data)
    if existing:
        there = {spec.name for spec, _ in existing}
        quantized = f" --quantize {quantize}" if quantize != "none" else ""
        rest = [f"transferkit export {run.path} --format {spec.name}{quantized}"
                + (f" -o {target}" if output is not None else "")
                for spec, target in zip(specs, targets, strict=True) if spec.name not in there]
        folders = ", ".join(str(target) for _, target in existing)
        raise ExportError(f"{folders} {'exists' if len(existing) == 1 else 'exist'} already; pass --force to "
                          + ("export every format again, or export the rest one at a time (with your other "
                             "options): " + "; ".join(rest) if rest else "export again"))
    return targets


def _check_target(run, target: Path, force: bool, data=None) -> None:
    """An export folder may be written: no other process writes it now, it does not exist
    (or ``force`` and it is an export folder), it is not the run or above it, and it is not
    in the data folder ``data`` (nor holds it)."""
    run_folder = Path(run.path).resolve()
    resolved = target.resolve()
    if resolved == run_folder or resolved in run_folder.parents:
        raise ExportError(f"export folder {target} would replace the run {run.path}; choose another -o")
    try:
        require_not_live(target)
        require_apart(target, [data], "export folder")
        require_not_a_file(target)
        require_writable_place(target.parent)
    except RunError as error:
        raise ExportError(str(error)) from error
    if target.exists():
        if not force:
            raise ExportError(f"{target} exists already; pass --force to replace it or choose another -o")
        if not target.is_dir() or (any(target.iterdir()) and not (target / RECORD_FILE).is_file()):
            raise ExportError(f"{target} is not an export folder (no {RECORD_FILE}); --force replaces only "
                              "export folders: choose another -o")


def _export_one(context: _Context, spec: ExportFormat, target: Path, model) -> ExportResult:
    """Write one export into a staging folder, check it, describe it, then publish it."""
    import importlib

    started = time.perf_counter()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Under the folder's owner lock: a second export to the same folder is refused, naming
        # this one; the folder is checked again there (another process may have written it).
        with publishing(target, "export", check=lambda: _check_target(context.run, target, context.force)) as staging:
            module, function, _ = WRITERS[spec.name]
            file = staging / spec.filename
            writer = getattr(importlib.import_module(module), function)
            details = _write(writer, spec, model, file, context)
            fresh = context.checks.run(spec.name, file, context.sample.images)
            result = _compare(context, spec, target, fresh.outputs, _size(file))
            result.record = _record(context, spec, result, details, fresh.stats, time.perf_counter() - started)
            _check(context, result)
            _describe(context, spec, staging, result.record)
            # The run's model card, this export listed in it (report lists it in the run's own card).
            write_model_card(context.run.path, staging, extra_exports=[(target, result.record)],
                             note=f"This copy travels with the {_export_name(spec, context.quantize)} export "
                                  f"{spec.filename} in this folder (README.txt: how to load it); the rest "
                                  "describes the run it was exported from.")
    except RunError as error:
        raise ExportError(str(error)) from error
    except OSError as error:
        raise ExportError(f"could not write {target}: {write_failure(error)}; nothing was written") from error
    log.info("%s", result.summary())
    return result


def _write(writer, spec: ExportFormat, model, file: Path, context: _Context) -> dict:
    run, quantize = context.run, context.quantize
    try:
        with quiet_converters():
            if spec.name in ("savedmodel", "h5", "keras"):
                return writer(model, file)
            return writer(model, file, run.image_size, quantize, context.sample.calibration)
    except ExportError:
        raise
    except Exception as error:
        from transferkit.errors import first_line

        raise ExportError(f"the {spec.name} export failed: {type(error).__name__}: {first_line(error)}") from error


@contextlib.contextmanager
def quiet_converters():
    """The converters' own chatter kept off the terminal: tf2onnx, NNCF and TensorFlow log
    each step and print progress bars, and some configure the root logger (which would
    then print transferkit's lines twice); the user sees transferkit's lines instead."""
    import warnings

    root = logging.getLogger()
    state = (root.level, list(root.filters), list(root.handlers))
    converters = dict.fromkeys(("tf2onnx", "onnxruntime", "nncf", "tensorflow", "absl"), logging.ERROR)
    try:
        with quieter_loggers(converters), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(state[0])
        root.filters[:], root.handlers[:] = state[1], state[2]


def _compare(context: _Context, spec: ExportFormat, target: Path, outputs: np.ndarray, size: int) -> ExportResult:
    from transferkit.outputs import class_probabilities, predicted_labels

    reference = context.reference
    if outputs.shape != reference.shape:
        raise ExportError(f"the {spec.name} export returns outputs of shape {outputs.shape}, the Keras model "
                          f"{reference.shape}")
    diff = float(np.max(np.abs(class_probabilities(outputs) - class_probabilities(reference))))
    agreement = float(np.mean(predicted_labels(outputs) == predicted_labels(reference)))
    labels, rows = context.sample.labels, slice(None)
    if len(labels):
        rows = slice(0, len(labels))
    else:
        labels = predicted_labels(reference)
    accuracy = float(np.mean(predicted_labels(outputs[rows]) == labels))
    float_accuracy = float(np.mean(predicted_labels(reference[rows]) == labels))
    return ExportResult(spec.name, context.quantize, target, target / spec.filename, size, diff, agreement,
                        len(outputs), accuracy, float_accuracy)


def _check(context: _Context, result: ExportResult) -> None:
    """A float export must agree within the tolerance; a quantized one may lose at most
    ``max_drop`` points (unless allowed)."""
    if context.quantize == "none":
        if not result.max_abs_diff <= FLOAT_TOLERANCE:
            raise ExportError(f"the {result.format} export disagrees with the Keras model: max probability "
                              f"difference {result.max_abs_diff:.3g} > {FLOAT_TOLERANCE:g} on {result.n_images} "
                              "images; it was not written")
        return
    if result.drop_points > context.max_drop:
        message = (f"the {result.format} {context.quantize} export loses {result.drop_points:.1f} accuracy points "
                   f"({100 * result.accuracy:.1f}% vs {100 * result.float_accuracy:.1f}% for the float model) on "
                   f"{len(context.sample.labels) or result.n_images} images, more than --max-drop "
                   f"{context.max_drop:g}")
        if not context.allow_drop:
            raise ExportError(f"{message}; it was not written (pass --allow-drop to keep it)")
        log.warning("%s; kept (--allow-drop)", message)


def _record(context: _Context, spec: ExportFormat, result: ExportResult, details: dict, stats: dict,
            seconds: float) -> dict:
    from transferkit import __version__

    sample = context.sample
    return {
        "format": spec.name,
        "quantize": context.quantize,
        "file": spec.filename,
        "size_bytes": result.size_bytes,
        "source_run": str(Path(context.run.path).resolve()),
        "transferkit_version": __version__,
        "details": details,
        "verification": {
            "process": "a fresh Python process that never imported transferkit" + (
                " (one for this export's TensorFlow formats: savedmodel, keras, h5)"
                if spec.name in SHARED_PROCESS else ""),
            "runtime": spec.runtime,
            "reference": "the run's model.keras in Keras, computed in float32",
            "images": result.n_images,
            "source": sample.source,
            "max_abs_diff": result.max_abs_diff,
            "top1_agreement": result.top1_agreement,
            "tolerance": FLOAT_TOLERANCE if context.quantize == "none" else None,
            "load_seconds": stats.get("load_seconds"),
        },
        "accuracy": {
            "exported": result.accuracy,
            "keras_float32": result.float_accuracy,
            "drop_points": result.drop_points,
            "max_drop": context.max_drop if context.quantize != "none" else None,
            "images": sample.labelled or result.n_images,
            "labels": "true classes of the validation images" if sample.labelled
            else "the float model's top class (no labelled data)",
            "files": sample.files,
        },
        "seconds": seconds,
    }


def labels_payload(run, spec: ExportFormat, quantize: str) -> dict:
    """labels.json of an export: what a program needs to feed it and read its outputs."""
    from transferkit import __version__
    from transferkit.outputs import output_activation, output_units

    size = run.image_size
    n_classes = len(run.class_names)
    if spec.any_size:
        dtype = "uint8" if spec.name == "savedmodel" else "float32"
        image_input = {"shape": [None, None, None, 3], "dtype": dtype, "range": [0, 255], "layout": "NHWC, RGB",
                       "resize": "model", "note": f"any height and width: resized inside to {size}x{size} "
                       "(bilinear, antialiased), as the Keras model does"}
    else:
        image_input = {"shape": [None, size, size, 3], "dtype": "float32", "range": [0, 255], "layout": "NHWC, RGB",
                       "resize": "caller", "note": f"images must be {size}x{size} already: resize them first "
                       "(bilinear, antialiased); " + ("LiteRT's interpreter does not check the size: another one runs "
                                                      "and gives wrong probabilities" if spec.name == "litert" else
                                                      "other sizes are refused")}
    activation = output_activation(n_classes)
    meaning = ("one unit: the probability of the second class, " + repr(run.class_names[1])
               if n_classes == 2 else "one probability per class, in class_names order")
    temperature = (run.metrics.get("calibration") or {}).get("temperature")
    return {
        "class_names": list(run.class_names),
        "image_size": size,
        "input_size": size,
        "resize": image_input["resize"],
        "input": image_input,
        "output": {"shape": [None, output_units(n_classes)], "activation": activation, "meaning": meaning},
        "output_activation": activation,
        "head_activation": run.head_activation,
        "calibration_temperature": temperature,
        "backbone": run.backbone,
        "precision": "float32",
        "export_format": spec.name,
        "quantize": quantize,
        "transferkit_version": __version__,
        "source_run": str(Path(run.path).resolve()),
    }


def readme_text(run, spec: ExportFormat, quantize: str) -> str:
    """README.txt of an export: what it is and how to load it in three lines."""
    labels = labels_payload(run, spec, quantize)
    name = spec.name if quantize == "none" else f"{spec.name} ({quantize})"
    snippet = "\n".join(f"    {line}" for line in spec.load.format(file=spec.filename).splitlines())
    output = labels["output"]
    return (
        f"{name} export of the transferkit run {labels['source_run']}\n"
        f"Runtime: {spec.runtime}. Classes: {', '.join(run.class_names)} (labels.json).\n"
        f"Input: {labels['input']['dtype']} RGB 0..255, shape {labels['input']['shape']}; {labels['input']['note']}.\n"
        f"Output: {output['activation']}, {output['meaning']}.\n"
        f"Checked against the Keras model when written: see export.json.\n\n"
        f"Load it in three lines (Python):\n{snippet}\n"
    )


def _describe(context: _Context, spec: ExportFormat, staging: Path, record: dict) -> None:
    run, quantize = context.run, context.quantize
    write_atomic(staging / "labels.json", json.dumps(labels_payload(run, spec, quantize), indent=2) + "\n")
    write_atomic(staging / "README.txt", readme_text(run, spec, quantize))
    write_atomic(staging / RECORD_FILE, json.dumps(record, indent=2, allow_nan=True) + "\n")


def _export_name(spec: ExportFormat, quantize: str) -> str:
    return spec.name if quantize == "none" else f"{spec.name} {quantize}"


def _size(file: Path) -> int:
    if file.is_dir():
        return sum(path.stat().st_size for path in file.rglob("*") if path.is_file())
    if file.suffix == ".xml":
        return file.stat().st_size + file.with_suffix(".bin").stat().st_size
    return file.stat().st_size
