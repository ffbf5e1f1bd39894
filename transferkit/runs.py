"""The run folder: written atomically, loaded without flags, described in a few lines.

    RUN/
      model.keras            the whole classifier; plain keras.models.load_model() loads it
      labels.json            class names in output order, image size, backbone, head activation,
                             the run_id its RUN.partial's job.json holds too
      recipe.toml            the fully resolved recipe
      history.csv            epoch, stage, loss, accuracy, val_loss, val_accuracy, learning_rate
      metrics.json           final and best validation figures, per-class accuracy, confusion
      history.png            training curves, stage boundaries marked
      confusion.png          validation confusion matrix (counts and row-normalised)
      rejection.npz          the training embeddings predict --reject compares with (knn score)
      skipped.txt            files that were not used and why (only when there were some)
      model.h5               legacy HDF5 copy (only with --save-h5)
      MODEL_CARD.md          what the model is and how far to trust it (evaluation.card), written last
      exports/FORMAT/        exports (transferkit export), each with its export.json

A run is written under a temporary hidden name beside its destination, flushed to disk and
renamed at the end, so an interrupted run never leaves a folder that looks finished, and an
existing folder is replaced only with ``force``. Each file is written with the one
atomic-write helper (``transferkit.files``). While a run trains, its process holds the owner
lock in ``RUN.partial`` (``transferkit.locks``), the final rename included: ``check_writable``
refuses a second writer, naming it. ``load_run`` tells a damaged file as damaged (not as
missing) and loads the model with Keras's ``safe_mode`` on. No Keras import at module level
(only ``load_run`` loads the model).
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import logging
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transferkit.backbones import find_spec, plugin_source
from transferkit.errors import RunError, first_line
from transferkit.files import (
    fault_point,
    flush_tree,
    named_folder,
    put_back_replaced,
    remove_leftovers,
    replace_folder,
    require_apart,
    require_not_a_file,
    require_writable_place,
    staging_folder,
    write_atomic,
    write_failure,
)
from transferkit.locks import (
    JOB_FILE,
    foreign_message,
    not_left_by_transferkit,
    read_owner,
    require_not_live,
    stamped_folder,
    tell_previous,
    work_dir_for,
)
from transferkit.outputs import output_units

log = logging.getLogger("transferkit")

LABELS_FILE = "labels.json"
MODEL_FILE = "model.keras"
MODEL_SUFFIXES = (".keras", ".h5")  # a model file given for its run (load_run)
EXPORTS_FOLDER = "exports"  # in a run folder: where exports go by default, one folder each
EXPORT_RECORD = "export.json"  # in an export folder: how it was made and checked
RUN_FORMAT = 1
HISTORY_COLUMNS = ("epoch", "stage", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate")


@dataclass
class Run:
    """A finished run, as loaded from its folder.

    Attributes:
        path: the run folder.
        class_names: class names in the order of the model's outputs.
        image_size: the side images are resized to.
        backbone: registry name of the backbone.
        head_activation: "sigmoid" (two classes, one unit) or "softmax".
        recipe: the resolved recipe as a dict (None for a bare model file).
        history: one dict per epoch: "epoch" (int), "stage" (str) and the figures of
            ``HISTORY_COLUMNS`` (float, None where none was recorded).
        metrics: final and best validation figures.
        model: the loaded ``keras.Model`` (None until ``load_run(..., with_model=True)``).
        rejection: labels.json "rejection" (score, threshold, coverage); None for a run
            trained before there was one.
        prediction_sets: labels.json "prediction_sets" (the validation LAC scores); None
            likewise.
        backbone_package: the installed package that added the backbone (a plugin's); None
            for a built-in one.
    """

    path: Path
    class_names: tuple[str, ...]
    image_size: int
    backbone: str
    head_activation: str
    recipe: dict[str, Any] | None = None
    history: list[dict] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    model: Any = None
    rejection: dict[str, Any] | None = None
    prediction_sets: dict[str, Any] | None = None
    backbone_package: str | None = None

    def describe(self) -> str:
        """A few lines for the terminal: where, what, how well."""
        lines = [
            f"run: {self.path}",
            f"  backbone {self.backbone}, {self.image_size}px, {len(self.class_names)} classes "
            f"({', '.join(self.class_names)}), {self.head_activation} output",
        ]
        final = self.metrics.get("final", {})
        best = self.metrics.get("best", {})
        if final:
            lines.append(
                f"  validation accuracy {final.get('val_accuracy', float('nan')):.3f} "
                f"(loss {final.get('val_loss', float('nan')):.4f}) on {self.metrics.get('n_val', '?')} images"
            )
        saved = self.metrics.get("saved", {})
        if saved:
            lines.append(
                f"  model saved from epoch {saved.get('epoch')} ({saved.get('stage')}: the lowest validation "
                "loss of the last stage)"
            )
        if best:
            lines.append(
                f"  highest val_accuracy {best.get('val_accuracy', float('nan')):.3f} at epoch {best.get('epoch')} "
                f"({best.get('stage')})"
            )
        return "\n".join(lines)


def default_run_dir(data_dir: str | Path, runs_root: str | Path = "runs") -> Path:
    """``runs/<data-folder-name>-<YYYYmmdd-HHMMSS>`` (``locks.stamped_folder``: ``-2`` after
    it where another run took that name in the same second).

    Args:
        data_dir: the data folder, which names the run.
        runs_root: the folder of runs; default "runs".

    Returns:
        The path (not created).
    """
    return stamped_folder(runs_root, Path(data_dir).resolve().name or "data")


def is_run_folder(folder: str | os.PathLike) -> bool:
    """Whether a folder is a finished run: it holds both labels.json and model.keras (a
    labels.json alone is a common file name in a user's own folders)."""
    return (Path(folder) / LABELS_FILE).is_file() and (Path(folder) / MODEL_FILE).is_file()


def require_outside_runs(path: str | os.PathLike, what: str, *, run: str | os.PathLike | None = None,
                         allowed: str | os.PathLike | None = None) -> None:
    """Refuse a file output (predictions, a plot, a preview, benchmark results) inside a run
    folder, at any depth: there it would replace or mix with that run's own files, and
    ``--force`` does not change that. Paths are compared with symbolic links resolved.

    Args:
        path: the file to be written.
        what: what it is, for the message ("--output", "plot").
        run: the command's own run folder (or a model file in one), a run whatever it holds.
        allowed: the one file the command may write into its run (benchmark's RUN/benchmark.json).

    Raises:
        RunError: naming the run folder.
    """
    target = Path(os.path.realpath(path))
    if allowed is not None and target == Path(os.path.realpath(allowed)):
        return
    own = None
    if run is not None and Path(run).exists():
        own = Path(os.path.realpath(run if Path(run).is_dir() else Path(run).parent))
    # The folders above the path with "." and ".." taken out (links kept: named as the user
    # named them), then above the real one (a link into a run)
    for folder in (*Path(os.path.abspath(path)).parents, *target.parents):
        if (own is not None and Path(os.path.realpath(folder)) == own) or is_run_folder(folder):
            raise RunError(f"{what} {path} is inside the run folder {folder} (it would replace or mix with the run's "
                           "own files); write it elsewhere")


def require_run_name(output: str | os.PathLike) -> None:
    """Refuse a run folder named ``X.partial``: that name is where transferkit keeps X while
    it is written, and an interrupted X (told first: a finished run's leftover in-progress
    folder of that name would otherwise be cleaned away before the refusal).

    Raises:
        RunError: naming the folder.
    """
    if Path(output).name.endswith(".partial"):
        raise RunError(f"run folder {output}: a name ending in .partial is where transferkit keeps a run while it "
                       "is written (and an interrupted one); choose another -o")


def check_writable(output: Path, force: bool, data_folders=(), *, new_run: bool = False) -> None:
    """Fail before any training if the run could not be written, or would destroy data.

    Nothing is created here: a run that fails later leaves no folder behind.

    Args:
        output: the run folder to write.
        force: an existing run folder may be replaced.
        data_folders: folders the run reads (the data, a validation folder); the run
            folder may be neither inside one nor contain one.
        new_run: a new training starts (not a resumed one): an interrupted run waiting in
            ``RUN.partial`` is refused too (without ``force``), before the images are read.

    Raises:
        RunError: the name ends in ``.partial``, another process is writing the folder now
            (named, whatever ``force`` says), the folder exists (without ``force``), is a
            file, is not a run folder (``force`` replaces run folders only), is inside or
            holds a data folder, its parent cannot be created or written, or (``new_run``)
            an interrupted run is there (without ``force``), ``RUN.partial`` holds what no
            transferkit run left (whatever ``force`` says), or it would lie inside another
            run folder.
    """
    require_run_name(output)
    require_not_live(output)
    partial = work_dir_for(output)
    foreign = not_left_by_transferkit(partial) if new_run else []
    if foreign:
        raise RunError(foreign_message(partial, foreign, output))
    if new_run and not force and not output.exists() and (partial / JOB_FILE).is_file():
        owner = read_owner(partial)  # its writer is gone (require_not_live): told, as the lock would tell it
        left_by = f" (left by {tell_previous(owner)})" if owner else ""
        raise RunError(f"an interrupted run of {output} is in {partial}{left_by}; continue it with --resume "
                       f"{output}, or pass --force to start over")
    require_not_a_file(output)
    absolute = Path(os.path.abspath(output))
    require_apart(output, data_folders, "run folder")
    if new_run:
        holder = next((parent for parent in absolute.parents if (parent / LABELS_FILE).is_file()), None)
        if holder is not None:  # replacing that run (--force) would delete this one with it
            raise RunError(f"run folder {output} would lie inside the run {holder}; choose another -o")
    if output.exists():
        if not force:
            raise RunError(f"run folder {output} exists already; pass --force to replace it or choose another -o")
        if not (output / LABELS_FILE).is_file() and any(output.iterdir()):
            raise RunError(f"{output} is not a run folder (no {LABELS_FILE}) and is not empty; --force replaces "
                           "only run folders: choose another -o")
    require_writable_place(absolute.parent)  # created when the run is written: only checked here


def save_run(
    output: str | Path,
    write_contents: Callable[[Path], None],
    force: bool = False,
) -> Path:
    """Write a run folder atomically.

    Args:
        output: the final folder.
        write_contents: called with a temporary folder to fill.
        force: replace an existing folder; default False.

    Returns:
        The final folder.

    Raises:
        RunError: the folder exists without ``force``, or writing failed (disk full,
            permission); nothing is left behind then and an existing run is unchanged.
    """
    output = named_folder(output)
    remove_leftovers(output.parent)  # first: it puts back a run a killed process had moved aside
    check_writable(output, force)
    staging = staging_folder(output)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir(parents=True)
        write_contents(staging)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise RunError(f"could not write run folder {output}: {write_failure(error)}; the folder was not "
                       "written") from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        flush_tree(staging)
        fault_point("run.staged")
        return replace_folder(staging, output)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise RunError(f"could not write run folder {output}: {write_failure(error)}; the folder was not "
                       "written") from error


def write_labels(folder: Path, class_names, image_size: int, backbone: str, head_activation: str,
                 precision: str = "float32", extra: dict | None = None) -> None:
    """labels.json: what predict needs to read images and name outputs, and the dtype
    policy; written atomically.

    Args:
        folder: the run folder (or the temporary one being filled).
        class_names: in the order of the model's outputs.
        image_size: the side images are resized to.
        backbone: registry name of the backbone (a plugin's: its package is recorded too).
        head_activation: "sigmoid" or "softmax".
        precision: the Keras dtype policy the run trained in; default "float32".
        extra: more entries (the data fingerprint, the lineage of a run started from
            another); default None.
    """
    from transferkit import __version__

    payload = {
        "format": RUN_FORMAT,
        "class_names": list(class_names),
        "image_size": int(image_size),
        "backbone": backbone,
        # A plugin's: which package to install where the run is resumed or explained.
        **({"backbone_package": package} if (package := plugin_source(backbone)) else {}),
        "head_activation": head_activation,
        "precision": precision,
        "transferkit_version": __version__,
        **(extra or {}),
    }
    write_atomic(folder / LABELS_FILE, json.dumps(payload, indent=2) + "\n")


def write_history(folder: Path, rows: list[dict]) -> None:
    """history.csv, one row per epoch across all stages (columns ``HISTORY_COLUMNS``),
    written atomically.

    Args:
        folder: the run folder (or the temporary one being filled).
        rows: one dict per epoch; missing columns stay empty.
    """
    handle = io.StringIO(newline="")
    writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({key: row.get(key) for key in HISTORY_COLUMNS})
    # bytes: the csv module writes its own line endings, which must not be translated
    write_atomic(folder / "history.csv", handle.getvalue().encode("utf-8"))


def write_json(path: Path, payload: dict) -> None:
    """Write a dict as indented JSON (NaN allowed), atomically.

    Args:
        path: the file.
        payload: JSON-serialisable values.
    """
    write_atomic(path, json.dumps(payload, indent=2, allow_nan=True) + "\n")


def load_run(path: str | Path, with_model: bool = True) -> Run:
    """Load a run folder, or a bare ``.keras`` model file with labels.json beside it.

    Args:
        path: a run folder or a model file.
        with_model: load the Keras model too; default True.

    Returns:
        A ``Run``.

    Raises:
        RunError: not a run folder, labels.json missing or malformed, or the model cannot
            be loaded or does not match its labels.
    """
    path = Path(path)
    # A run whose replacement (finetune --force) was killed between its two renames is put
    # back here, not told missing.
    if not path.exists() and not (put_back_replaced(path.parent if path.suffix == ".keras" else path)
                                  and path.exists()):
        partial = work_dir_for(path)
        if partial.is_dir():  # an interrupted finetune's checkpoints
            raise RunError(f"{path} does not exist: its finetune was interrupted ({partial} holds its checkpoints); "
                           f"finish it with transferkit finetune --resume {path}")
        raise RunError(f"{path} does not exist; pass a run folder made by 'transferkit finetune'")
    if path.is_file():
        if path.suffix.lower() not in MODEL_SUFFIXES:  # labels.json, an image, ...: not damaged, just not a run
            hint = f" (here {path.parent})" if is_run_folder(path.parent) else ""
            raise RunError(f"{path} is a file, not a run; pass the run folder made by 'transferkit finetune'{hint} "
                           f"or its {MODEL_FILE}")
        folder, model_path = path.parent, path
    else:
        folder, model_path = path, path / MODEL_FILE
        if not model_path.is_file():
            raise RunError(
                f"{path} is not a transferkit run: {MODEL_FILE} is missing; pass a folder "
                "made by 'transferkit finetune' or a .keras file"
            )
    labels_path = folder / LABELS_FILE
    if not labels_path.is_file():
        raise RunError(
            f"{labels_path} is missing; the run needs it to name classes (copy it back, "
            "or re-run finetune)"
        )
    try:
        labels = json.loads(labels_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunError(
            f"{labels_path} is damaged ({getattr(error, 'strerror', None) or first_line(error)}): it is there but "
            "is not readable JSON; copy it from a backup of the run, or re-run finetune"
        ) from error
    try:
        names = labels["class_names"]
        if not isinstance(names, list) or len(names) < 2 or len(set(map(str, names))) < len(names):
            raise ValueError(f"class_names must list two or more different names, got {names!r}")
        class_names = tuple(str(name) for name in labels["class_names"])
        image_size = int(labels["image_size"])
        if image_size < 1:
            raise ValueError(f"image_size must be a size in pixels, got {image_size}")
        backbone = str(labels["backbone"])
        head_activation = str(labels["head_activation"])
    except (ValueError, KeyError, TypeError) as error:
        raise RunError(
            f"{labels_path} is not a valid labels file ({type(error).__name__}: {error}); "
            "it needs class_names, image_size, backbone and head_activation"
        ) from error
    run = Run(
        path=folder,
        class_names=class_names,
        image_size=image_size,
        backbone=backbone,
        head_activation=head_activation,
        recipe=_read_optional_toml(folder / "recipe.toml"),
        history=_read_optional_history(folder / "history.csv"),
        metrics=_read_optional_json(folder / "metrics.json"),
        rejection=labels.get("rejection"),
        prediction_sets=labels.get("prediction_sets"),
        backbone_package=labels.get("backbone_package"),
    )
    if with_model:
        attach_model(run, model_path)
    return run


def attach_model(run: Run, model_path: str | Path | None = None) -> Run:
    """Load a run's Keras model into it (a run loaded with ``with_model=False``), checked
    against its labels.json as ``load_run`` checks it.

    Args:
        run: a ``Run``.
        model_path: its model file; default ``run.path / MODEL_FILE``.

    Returns:
        The run, its ``model`` loaded.

    Raises:
        RunError: the model cannot be loaded or does not match the run's labels.
    """
    model_path = Path(model_path) if model_path is not None else Path(run.path) / MODEL_FILE
    # The package that added the run's backbone, where installed, is imported first: a
    # custom layer it registers with Keras loads (nothing is needed without one).
    find_spec(run.backbone)
    run.model = _load_model(model_path, len(run.class_names))
    shape = run.model.input_shape  # (None, S, S, 3) for a classifier; a list for several inputs
    size = tuple(shape[1:3]) if isinstance(shape, tuple) and len(shape) == 4 else (None, None)
    if None not in size and size != (run.image_size, run.image_size):
        raise RunError(f"model {model_path} takes {size[0]}x{size[1]} images but {Path(run.path) / LABELS_FILE} says "
                       f"image_size {run.image_size}; the two files come from different runs")
    return run


def _load_model(model_path: Path, n_classes: int):
    model = load_keras_file(model_path, "re-run finetune, or copy it from a backup of the run")
    units = model.output_shape[-1]
    expected = output_units(n_classes)
    if units != expected:
        raise RunError(
            f"model {model_path} has {units} output unit(s) but labels.json names "
            f"{n_classes} classes (expected {expected}); the two files come from different runs"
        )
    return model


def load_keras_file(path: str | os.PathLike, fix: str):
    """Load a ``.keras`` file with Keras's ``safe_mode`` on: a model that would run code of
    its own when loaded (a ``Lambda`` layer, an unregistered custom layer) is refused.

    Args:
        path: the file.
        fix: what to do when it is damaged, for the message ("re-run finetune", ...).

    Returns:
        The ``keras.Model``, not compiled.

    Raises:
        RunError: the file is missing, damaged (truncated or corrupt: told as damaged, not
            as missing), holds code, or cannot be loaded for another reason.
    """
    import keras

    path = Path(path)
    if not path.is_file():
        raise RunError(f"{path} is missing; {fix}")
    damage = keras_file_damage(path)
    if damage is not None:
        raise RunError(f"{path} is damaged ({damage}); {fix}")
    try:
        with portable_copy(path) as loadable:
            return keras.models.load_model(loadable, compile=False, safe_mode=True)
    except Exception as error:
        message = first_line(error, limit=1000)
        if "safe_mode" in message or "arbitrary code" in message:
            kind = "a Lambda layer" if "Lambda" in message else "code"
            raise RunError(f"refused to load {path}: it holds {kind}, which would run Python code from the file; "
                           "transferkit loads only models made of built-in layers (retrain it, or load it "
                           "yourself with safe_mode=False if you trust where it came from)") from error
        damage = keras_file_damage(path, check_contents=True)
        if damage is not None:
            raise RunError(f"{path} is damaged ({damage}); {fix}") from error
        raise RunError(f"cannot load model {path}: {first_line(error)}") from error


@contextlib.contextmanager
def portable_copy(path: Path):
    """The ``.keras`` file to load on this process's Keras backend: ``path`` itself, or, where
    the model resizes with an interpolation only TensorFlow has ("area"; "lanczos3" and
    "lanczos5" lack on PyTorch), a temporary copy whose ``Resizing`` layers use the closest one
    this backend has, antialiased (``backend.resize_stand_in``), with a warning that says so.
    The file itself is never changed.

    Args:
        path: a ``.keras`` file.

    Yields:
        The path to load.
    """
    import keras

    from transferkit.backend import resize_stand_in

    backend = keras.config.backend()
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        yield path  # Keras's own load says what is wrong
        return
    changed = []

    def visit(node):
        if isinstance(node, dict):
            inner = node.get("config")
            if node.get("class_name") == "Resizing" and isinstance(inner, dict):
                stand_in = resize_stand_in(str(inner.get("interpolation", "bilinear")), backend)
                if stand_in is not None:
                    changed.append(f"{inner.get('name', 'resizing')} ({inner['interpolation']} -> {stand_in})")
                    inner.update(interpolation=stand_in, antialias=True)
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    if not changed:
        yield path
        return
    log.warning("%s resizes with an interpolation the Keras %s backend lacks (only TensorFlow has it): %s, "
                "antialiased, stands in; its outputs differ slightly from TensorFlow's", path, backend,
                ", ".join(changed))
    with tempfile.TemporaryDirectory(prefix="transferkit-portable-") as folder:
        copy = Path(folder) / path.name
        with zipfile.ZipFile(path) as source, zipfile.ZipFile(copy, "w") as target:
            for item in source.infolist():
                data = json.dumps(config).encode() if item.filename == "config.json" else source.read(item)
                target.writestr(item, data)
        yield copy


def keras_file_damage(path: Path, check_contents: bool = False) -> str | None:
    """What is wrong with a ``.keras`` file's container (a zip archive), or None.

    Args:
        path: the file.
        check_contents: also check every member's CRC (reads the whole file); default False
            (the archive's directory only, which a truncated file lacks).

    Returns:
        A few words ("truncated or not a .keras archive: ...", "corrupt: Bad CRC-32 ..."), or None.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "config.json" not in names:
                return "not a .keras archive: it holds no config.json"
            if check_contents:
                bad = archive.testzip()
                if bad is not None:
                    return f"corrupt: {bad} fails its checksum"
    except zipfile.BadZipFile as error:
        return f"truncated or not a .keras archive: {first_line(error)}"
    except OSError as error:
        return f"unreadable: {error.strerror or error}"
    return None


def _read_optional_toml(path: Path) -> dict | None:
    import tomllib

    if not path.is_file():
        return None
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise RunError(f"{path} is damaged ({getattr(error, 'strerror', None) or first_line(error)}); copy it "
                       "from a backup of the run, or re-run finetune") from error


def _read_optional_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError(f"a JSON object was expected, not a {type(record).__name__}")
        return record
    except (OSError, ValueError) as error:
        log.warning("%s is damaged (%s); its figures are left out", path,
                    getattr(error, "strerror", None) or first_line(error))
        return {}


# What history.png needs of each row of history.csv.
HISTORY_NEEDED = ("epoch", "stage", "loss", "accuracy", "val_loss", "val_accuracy")


def stage_epochs(stages: Iterable[str]) -> list[tuple[str, int]]:
    """The stages a history trained, in order, with their epochs: runs of consecutive rows
    of one stage (a stage that did not train has no row).

    Args:
        stages: the "stage" of each history row, in order.

    Returns:
        (stage name, epochs) pairs.
    """
    return [(name, sum(1 for _ in rows)) for name, rows in itertools.groupby(stages)]


def _typed_row(row: dict) -> dict:
    """A history.csv row with the values the run's own ``history`` holds: the epoch an int,
    the stage a str, the figures floats (an empty cell None), other columns as written."""
    typed = dict(row)
    for key, value in row.items():
        if key == "epoch":
            typed[key] = int(value)
        elif key in HISTORY_COLUMNS and key != "stage":
            typed[key] = float(value) if value not in ("", None) else None
    return typed


def _read_optional_history(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [column for column in HISTORY_NEEDED if column not in (reader.fieldnames or ())]
            if missing:
                raise ValueError(f"no {', '.join(missing)} column")
            return [_typed_row(row) for row in reader]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, csv.Error) as error:
        log.warning("%s is damaged (%s); the run's history is left out", path,
                    getattr(error, "strerror", None) or first_line(error))
        return []
