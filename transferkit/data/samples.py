"""The images a run's exports and int8 networks are checked and calibrated on.

From the run's data folder when it is given (or recorded in labels.json as ``data_dir``):
its validation split as the run's split.csv records it (images added to the folder since are
in neither part; a run written before split.csv: the split re-created from recipe.toml's
``data.val_split`` and ``seed``), a sample of it for the checks and a
sample of the training part for int8 calibration, each image read at the training size as
training read it. Without the data: generated images (shapes on noise), with no labels,
so accuracy is then measured against the float model's own top class.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.errors import DataError

log = logging.getLogger("transferkit")

MIN_CHECK_IMAGES = 32  # fewer validation images than this are topped up with generated ones
DEFAULT_SAMPLES = 256
DEFAULT_CALIBRATION = 200


@dataclass
class ImageSample:
    """Images at the training size for checking an export, and some for calibrating one.

    Attributes:
        images: uint8 (n, S, S, 3): the labelled validation images first, then generated ones.
        labels: true class index of the first ``len(labels)`` images (empty without data).
        files: the labelled images' files, relative to the data folder.
        calibration: uint8 training images for int8 calibration.
        source: where the images came from, in words.
    """

    images: np.ndarray
    labels: np.ndarray
    files: list[str] = field(default_factory=list)
    calibration: np.ndarray | None = None
    source: str = ""

    @property
    def labelled(self) -> int:
        return len(self.labels)


def sample_images(run, data_dir: str | os.PathLike | None = None, samples: int = DEFAULT_SAMPLES,
                  calibration: int = DEFAULT_CALIBRATION, seed: int = 0) -> ImageSample:
    """The images to check (and calibrate) a run's exports on.

    Args:
        run: a loaded ``Run``.
        data_dir: the run's data folder; default None (``data_dir`` of the run's
            labels.json when it names one that exists, else generated images).
        samples: at most this many validation images; default 256.
        calibration: at most this many training images for int8; default 200.
        seed: which images are sampled; default 0.

    Returns:
        An ``ImageSample``.

    Raises:
        DataError: the data folder's classes are not the run's.
    """
    rng = np.random.default_rng(seed)
    data_dir = data_dir if data_dir is not None else recorded_data_dir(run)
    if data_dir is None:
        log.warning("no data folder for %s (pass --data DATA_DIR to check on its validation images); "
                    "checking on generated images against the float model's own predictions", run.path)
        images = generated_images(MIN_CHECK_IMAGES, run.image_size, rng)
        return ImageSample(images, np.zeros(0, dtype="int64"), [], generated_images(calibration, run.image_size, rng),
                           "generated images (no data folder): accuracy is agreement with the float model")
    return _from_folder(run, Path(data_dir), samples, calibration, rng)


def recorded_data_dir(run) -> Path | None:
    """The data folder the run's labels.json records (``data_dir``), where it is still a
    folder; else None. ``run`` is a ``Run`` or a run folder."""
    import json

    try:
        labels = Path(getattr(run, "path", run)) / "labels.json"
        recorded = json.loads(labels.read_text(encoding="utf-8")).get("data_dir")
    except (OSError, ValueError):
        return None
    return Path(recorded) if recorded and Path(recorded).is_dir() else None


def _from_folder(run, data_dir: Path, samples: int, calibration: int, rng) -> ImageSample:
    from transferkit.data.folders import index_folder
    from transferkit.data.split import TRAIN, VALIDATION, group_names, relative_name, split_rows

    index = index_folder(data_dir)
    if tuple(index.class_names) != tuple(run.class_names):
        raise DataError(f"{data_dir} has classes {', '.join(index.class_names)} but the run was trained on "
                        f"{', '.join(run.class_names)}; pass the run's own data folder with --data")
    recipe = run.recipe or {}
    recorded = recorded_split(run)
    if recorded is not None:
        # The run's own split.csv: images added to the folder since are in neither part, so no
        # image the run trained on is taken for a validation one.
        subsets = [recorded.get(relative_name(path, index.root)) for path in index.paths]
        val_rows = np.flatnonzero([subset == VALIDATION for subset in subsets])
        train_rows = np.flatnonzero([subset == TRAIN for subset in subsets])
        how = "the run's split.csv"
    else:  # a run written before split.csv: the split re-created from its recipe
        val_split = float(recipe.get("data", {}).get("val_split", 0.2))
        split_seed = int(recipe.get("seed", 42))
        group_by = recipe.get("data", {}).get("group_by")
        groups = group_names(index.paths, index.root, group_by) if group_by else None
        train_rows, val_rows = split_rows(index.labels, val_split, split_seed, index.class_names, groups)
        how = f"re-created: val_split {val_split:g}, seed {split_seed}"
    val_rows = _subset(val_rows, samples, rng)
    train_rows = _subset(train_rows, calibration, rng)
    val_images, val_labels, val_files = _read(index, val_rows, run.image_size)
    train_images, _, _ = _read(index, train_rows, run.image_size)
    images = val_images
    if len(images) < MIN_CHECK_IMAGES:  # a small folder: more images for the agreement figures
        images = np.concatenate([images, generated_images(MIN_CHECK_IMAGES - len(images), run.image_size, rng)])
    source = f"validation split of {data_dir} ({how}), {len(val_labels)} image(s)"
    if len(images) > len(val_labels):
        source += f" + {len(images) - len(val_labels)} generated"
    return ImageSample(images, val_labels, val_files, train_images, source)


def recorded_split(run) -> dict[str, str] | None:
    """The run's split.csv as {file: TRAIN or VALIDATION}, or None where it has none."""
    import csv

    from transferkit.data.split import SPLIT_FILE, read_split_table

    try:
        return dict(read_split_table((Path(getattr(run, "path", run)) / SPLIT_FILE).read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, KeyError, csv.Error):
        return None


def _subset(rows: np.ndarray, limit: int, rng) -> np.ndarray:
    return rows if len(rows) <= limit else np.sort(rng.choice(rows, limit, replace=False))


def _read(index, rows: np.ndarray, size: int):
    """The images of some rows at the training size; unreadable files are left out."""
    from transferkit.data.images import load_image

    images, labels, files = [], [], []
    for row in rows:
        path = index.paths[row]
        try:
            images.append(load_image(path, size))
        except DataError as error:
            log.debug("leaving out %s: %s", path, error)
            continue
        labels.append(int(index.labels[row]))
        files.append(Path(os.path.relpath(path, index.root)).as_posix())
    stacked = np.stack(images) if images else np.zeros((0, size, size, 3), dtype="uint8")
    return stacked, np.asarray(labels, dtype="int64"), files


def generated_images(count: int, size: int, rng) -> np.ndarray:
    """``count`` generated RGB images (shapes on noise), uint8 (count, size, size, 3)."""
    from transferkit.data.synthetic import SHAPES, draw_shape

    if count <= 0:
        return np.zeros((0, size, size, 3), dtype="uint8")
    return np.stack([np.asarray(draw_shape(SHAPES[i % len(SHAPES)], size, rng)) for i in range(count)])


def int8_samples(run, count: int = 64, seed: int = 0):
    """The images to quantize a run's network to int8 on and check it with: training images
    to calibrate on and validation images held back, from the run's recorded data folder.

    Args:
        run: a loaded ``Run``.
        count: at most this many of each; default 64.
        seed: which images are sampled; default 0.

    Returns:
        ``inference.int8.Int8Samples``-shaped (calibration, held_back) pair as a tuple, or
        None when the run's data folder is not there (generated images are no calibration).
    """
    data_dir = recorded_data_dir(run)
    if data_dir is None:
        return None
    try:
        sample = _from_folder(run, data_dir, count, count, np.random.default_rng(seed))
    except DataError as error:
        log.info("no int8 calibration images from %s: %s", data_dir, error)
        return None
    return sample.calibration, sample.images
