"""Images on disk -> arrays: folder indexing, robust reading, splitting, training batches.

A data folder holds one sub-folder per class, sorted by name; images in deeper sub-folders
of a class folder belong to that class. Hidden files and OS litter (.DS_Store, Thumbs.db,
__MACOSX) are ignored; files without an image extension are listed as skipped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import keras
import numpy as np
from PIL import Image, ImageOps

try:
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; Pillow decodes every JPEG anyway
    simplejpeg = None

from transferkit.errors import DataError

log = logging.getLogger("transferkit")

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
OS_LITTER = frozenset({"thumbs.db", "desktop.ini", "__macosx", ".ds_store"})


class UnreadableImage(DataError):
    """Raised by read_image for a file that is not a readable image; callers skip it.

    Attributes:
        path: the file.
        reason: why it cannot be used, without the path.
    """

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass(frozen=True)
class FolderIndex:
    """The image files of a data folder.

    Attributes:
        root: the folder.
        class_names: sub-folder names, sorted; index = label.
        paths: image files, in class then path order.
        labels: class index of each path.
        skipped: (path, reason) for files that will not be used.
    """

    root: Path
    class_names: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: np.ndarray
    skipped: tuple[tuple[Path, str], ...] = field(default=())

    def counts(self) -> dict[str, int]:
        """Number of image files per class."""
        return {
            name: int(np.sum(self.labels == index)) for index, name in enumerate(self.class_names)
        }


def is_ignored(path: Path) -> bool:
    """Hidden files and OS litter are never images of the dataset."""
    return path.name.startswith(".") or path.name.lower() in OS_LITTER


def iter_image_files(folder: Path) -> Iterator[tuple[Path, str | None]]:
    """Walk a folder recursively in sorted order, following symlinks once.

    Yields:
        (path, None) for each file with an image extension and (path, reason) for other
        files, which callers report as skipped. Symlink loops are walked once.
    """
    seen: set[str] = set()

    def walk(directory: Path) -> Iterator[tuple[Path, str | None]]:
        real = os.path.realpath(directory)
        if real in seen:
            return
        seen.add(real)
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError as error:
            yield directory, f"folder cannot be read ({error.strerror})"
            return
        for entry in entries:
            path = Path(entry.path)
            if is_ignored(path):
                continue
            try:
                is_dir = entry.is_dir()
                is_file = entry.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                yield from walk(path)
            elif is_file:
                if path.suffix.lower() in IMAGE_EXTENSIONS:
                    yield path, None
                else:
                    yield path, f"not an image file extension ({path.suffix or 'none'})"
            else:
                yield path, "broken link or not a regular file"

    yield from walk(folder)


def index_folder(root: str | os.PathLike) -> FolderIndex:
    """Index a folder of class sub-folders.

    Args:
        root: the data folder; each sub-folder is a class.

    Returns:
        A ``FolderIndex``; files are not opened yet.

    Raises:
        DataError: the folder is missing, is a file, or has fewer than two class folders
            holding image files.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; pass a folder with one sub-folder per class")
    if not root.is_dir():
        raise DataError(f"{root} is a file, not a folder; pass a folder with one sub-folder per class")
    try:
        class_dirs = sorted(
            (path for path in root.iterdir() if path.is_dir() and not is_ignored(path)),
            key=lambda path: path.name,
        )
    except OSError as error:
        raise DataError(f"data folder {root} cannot be read ({error.strerror})") from error
    if not class_dirs:
        raise DataError(
            f"{root} has no class sub-folders; put each class's images in a sub-folder "
            f"named after the class, e.g. {root}/cats/ and {root}/dogs/"
        )
    paths: list[Path] = []
    labels: list[int] = []
    skipped: list[tuple[Path, str]] = []
    empty: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        found = 0
        for path, reason in iter_image_files(class_dir):
            if reason is None:
                paths.append(path)
                labels.append(label)
                found += 1
            else:
                skipped.append((path, reason))
        if found == 0:
            empty.append(class_dir.name)
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(empty)} in {root} hold no image files "
            f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
        )
    if len(class_dirs) < 2:
        raise DataError(
            f"{root} has only one class folder ({class_dirs[0].name}); a classifier needs at "
            "least two classes, each in its own sub-folder"
        )
    return FolderIndex(
        root=root,
        class_names=tuple(path.name for path in class_dirs),
        paths=tuple(paths),
        labels=np.asarray(labels, dtype="int64"),
        skipped=tuple(skipped),
    )


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read any supported image as RGB uint8, EXIF orientation applied.

    Grayscale, RGBA/LA/palette with transparency (composited on white), CMYK, 16-bit and
    float images are converted; an animated GIF gives its first frame.

    Args:
        path: the image file.

    Returns:
        An array of shape (height, width, 3), dtype uint8.

    Raises:
        UnreadableImage: the file is empty, truncated, not an image, or too large to open
            safely (decompression-bomb guard).
    """
    return np.asarray(_open_rgb(Path(path)))


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Read an image and resize it to size x size (bilinear, antialiased).

    Returns:
        An array of shape (size, size, 3), dtype uint8.

    Raises:
        UnreadableImage: as ``read_image``.
    """
    decoded = _decode_plain_jpeg(Path(path), size)
    if decoded is not None and decoded.shape[:2] == (size, size):
        return decoded
    image = Image.fromarray(decoded) if decoded is not None else _open_rgb(Path(path), draft_size=size)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


# JPEG colour spaces whose decoding to RGB is libjpeg's own, in Pillow as in simplejpeg.
_PLAIN_COLOURSPACES = ("YCbCr", "Gray", "RGB")


def _decode_plain_jpeg(path: Path, size: int) -> np.ndarray | None:
    """A plain JPEG decoded by libjpeg-turbo through simplejpeg, scaled down inside the
    decoder as Pillow's ``draft`` does: the same pixels as Pillow's path, in about 30% less
    time, which counts where decoding shares the cores with the engine (predict).

    Pillow reads the header first, so what it would refuse to open or would turn keeps
    going its own way. None for anything else, which Pillow's path then reads, and reports
    when it cannot: not a JPEG, an EXIF or XMP orientation that turns it, an MPO file, CMYK,
    above the decompression-bomb limit, an unreadable or damaged file. (One difference
    remains: libjpeg-turbo decodes large arithmetic-coded JPEGs that Pillow's reader fails on.)
    """
    if simplejpeg is None:
        return None
    try:
        with open(path, "rb") as handle:
            if handle.read(3) != b"\xff\xd8\xff":
                return None
            data = b"\xff\xd8\xff" + handle.read()
    except OSError:
        return None
    if not _plain_jpeg_header(data):
        return None
    try:
        height, width, colourspace, _ = simplejpeg.decode_jpeg_header(data)
        # Pillow's draft scale: the largest of 1/8, 1/4, 1/2 that keeps both sides at least
        # ``size`` (libjpeg-turbo could also scale by other eighths; that would change pixels).
        scale = next((factor for factor in (8, 4, 2) if min(width // size, height // size) >= factor), 1)
        if colourspace not in _PLAIN_COLOURSPACES or (scale > 1 and min(width, height) < 16):
            # (below 8 px a finer eighth can give the same output size: Pillow decides)
            return None
        scaled = (-(-height // scale), -(-width // scale))
        decoded = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=scaled[0], min_width=scaled[1])
    except Exception:  # any failure: Pillow's path reads it or says what is wrong
        return None
    return decoded if decoded.shape[:2] == scaled else None


def _plain_jpeg_header(data: bytes) -> bool:
    """Whether Pillow opens the file as a JPEG (not MPO) in RGB or grayscale that its EXIF
    or XMP orientation leaves as stored, within the decompression-bomb limit (header only)."""
    import io

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                return (image.format == "JPEG" and image.mode in ("RGB", "L")
                        and image.getexif().get(0x0112, 1) == 1)
    except Exception:  # Pillow's path will say what is wrong with it
        return False


def _open_rgb(path: Path, draft_size: int | None = None) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Above MAX_IMAGE_PIXELS Pillow only warns; treat that as the bomb it may be.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if draft_size is not None and image.format == "JPEG":
                    # Let libjpeg decode at a reduced scale: much faster for large photos.
                    image.draft("RGB", (draft_size, draft_size))
                image.seek(0)
                image = ImageOps.exif_transpose(image)
                return _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UnreadableImage(
            path,
            f"image too large to open safely (decompression-bomb guard, "
            f"over {Image.MAX_IMAGE_PIXELS} pixels)",
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, MemoryError) as error:
        detail = str(error) or type(error).__name__
        raise UnreadableImage(path, f"not a readable image ({detail})") from error


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype="float64")
        if mode.startswith("I;16"):
            scaled = values / 257.0
        elif values.size and (values.max() > 255 or values.min() < 0):
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) * (255.0 / (high - low)) if high > low else values * 0
        elif mode == "F" and values.size and values.max() <= 1.0:
            scaled = values * 255.0
        else:
            scaled = values
        gray = np.clip(np.rint(scaled), 0, 255).astype("uint8")
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode == "P" or mode == "PA":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return image.convert("RGB")
    image.load()
    return image


def decode_images(
    paths: Sequence[Path],
    size: int,
    workers: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[Path, str]]]:
    """Decode and resize images in parallel threads, skipping unreadable ones.

    Args:
        paths: image files.
        size: output side in pixels.
        workers: decoding threads; default the number of CPUs.
        progress: called with the number of images done after each one.

    Returns:
        (images uint8 of shape (n_kept, size, size, 3), indices into ``paths`` of the kept
        images, [(path, reason)] of the skipped ones).
    """
    workers = workers or os.cpu_count() or 1
    images = np.empty((len(paths), size, size, 3), dtype="uint8")
    ok = np.zeros(len(paths), dtype=bool)
    skipped: list[tuple[Path, str]] = []

    def decode(index: int) -> tuple[int, str | None]:
        try:
            images[index] = load_image(paths[index], size)
            return index, None
        except UnreadableImage as error:
            return index, error.reason

    # One worker decodes in the calling thread (no hand-offs; a caller's thread priority holds).
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    results = pool.map(decode, range(len(paths))) if pool is not None else map(decode, range(len(paths)))
    with pool if pool is not None else contextlib.nullcontext():
        for done, (index, reason) in enumerate(results, start=1):
            if reason is None:
                ok[index] = True
            else:
                skipped.append((paths[index], reason))
                log.warning("skipping %s: %s", paths[index], reason)
            if progress is not None:
                progress(done)
    kept = np.flatnonzero(ok)
    return images[kept], kept, skipped


def image_array(count: int, size: int, memory_budget_mb: float, spill_dir: str | os.PathLike | None = None) -> np.ndarray:
    """An uninitialised uint8 (count, size, size, 3) array: in memory when it fits the budget,
    else memory-mapped from a temporary file.

    The file is unlinked as soon as it is mapped (on systems that allow it), so nothing is
    left behind however the process ends; its space is freed when the array is.

    Args:
        count: number of images.
        size: image side in pixels.
        memory_budget_mb: largest size kept in memory, in MB.
        spill_dir: where the file goes; default the system temporary folder.
    """
    shape = (count, size, size, 3)
    if count * size * size * 3 <= memory_budget_mb * 2**20:
        return np.empty(shape, dtype="uint8")
    handle = tempfile.NamedTemporaryFile(prefix="transferkit-images-", suffix=".u8", dir=spill_dir, delete=False)
    try:
        array = np.memmap(handle, dtype="uint8", mode="w+", shape=shape)
    finally:
        handle.close()
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
    return array


def partition_rows(images: np.ndarray, groups: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Reorder the rows of ``images`` in place so each group's rows are contiguous, in
    the order given, and return one view per group: ``images[group]`` without a copy.

    Rows in no group go to the end. Memory stays that of ``images`` (in memory or
    memory-mapped as it is), where indexing would copy every row once more.

    Args:
        images: (n, ...) array, reordered in place.
        groups: disjoint arrays of row indices.

    Returns:
        One view of ``images`` per group, holding ``images[group]`` as it was before.
    """
    order = np.concatenate([np.asarray(group, dtype=np.int64) for group in groups] or [np.zeros(0, np.int64)])
    rest = np.setdiff1d(np.arange(len(images)), order)
    order = np.concatenate([order, rest])  # position i takes the row that was at order[i]
    placed = np.zeros(len(order), dtype=bool)
    for start in range(len(order)):
        if placed[start] or order[start] == start:
            continue
        # Follow the cycle: each row moves once, with one row kept aside.
        kept = np.array(images[start])
        position = start
        while True:
            placed[position] = True
            source = int(order[position])
            if source == start:
                images[position] = kept
                break
            images[position] = images[source]
            position = source
    views, offset = [], 0
    for group in groups:
        views.append(images[offset : offset + len(group)])
        offset += len(group)
    return views


def stratified_split(
    labels: np.ndarray, val_split: float, seed: int, class_names: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split that keeps each class's share in both parts.

    Args:
        labels: class index per sample.
        val_split: fraction for validation, in (0, 1).
        seed: random seed.
        class_names: names for error messages; default None (class numbers).

    Returns:
        (train indices, validation indices), each sorted.

    Raises:
        DataError: a class has too few images to give both parts at least one.
    """
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_val = int(round(len(members) * val_split))
        n_val = min(max(n_val, 1), len(members) - 1)
        if len(members) < 2:
            name = class_names[label] if class_names is not None else f"#{label}"
            raise DataError(
                f"class {name} has {len(members)} readable image(s); the validation split "
                "needs at least 2 per class: add images or pass --val-dir"
            )
        shuffled = rng.permutation(members)
        val.append(shuffled[:n_val])
        train.append(shuffled[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def balanced_class_weights(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Weight per class, n_samples / (n_classes * count), so each class counts equally."""
    counts = np.bincount(labels, minlength=n_classes).astype("float64")
    return np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)


def encode_targets(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Targets in the shape the output layer needs: (n, 1) 0/1 for two classes, one-hot else."""
    if n_classes == 2:
        return labels.astype("float32").reshape(-1, 1)
    return np.eye(n_classes, dtype="float32")[labels]


class SeededBatches(keras.utils.PyDataset):
    """Batches in an order drawn from (seed, epoch): the same order whatever reads them.

    Subclasses say what a sample is (``_inputs``); this class owns the order, the targets
    and sample weights, and the epoch counter.
    """

    def __init__(self, count: int, targets: np.ndarray, batch_size: int, *, shuffle: bool,
                 sample_weights: np.ndarray | None, seed: int, workers: int = 1):
        super().__init__(workers=workers, use_multiprocessing=False)
        self.count = count
        self.targets = targets
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.sample_weights = sample_weights
        self.seed = seed
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Position the stream at an epoch (each epoch has its own seeded order)."""
        self.epoch = epoch
        self.order = (np.random.default_rng([self.seed, epoch]).permutation(self.count)
                      if self.shuffle else np.arange(self.count))

    def __len__(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def __getitem__(self, index: int):
        selected = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        x = self._inputs(selected)
        y = self.targets[selected]
        if self.sample_weights is None:
            return x, y
        return x, y, self.sample_weights[selected]

    def _inputs(self, selected: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)


class ImageBatches(SeededBatches):
    """Training or validation batches from decoded images, augmenting on the fly.

    Each image's augmentation is seeded from (seed, epoch, position), so a run is
    reproducible whatever the worker threads do; each thread has its own augmenter, since
    one albumentations pipeline is not safe to call from several threads at once.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        augmenter_factory: Callable[[], object] | None = None,
        sample_weights: np.ndarray | None = None,
        seed: int = 0,
        workers: int = 1,
    ):
        self.images = images
        self.augmenter_factory = augmenter_factory
        self._local = threading.local()
        super().__init__(len(images), targets, batch_size, shuffle=shuffle,
                         sample_weights=sample_weights, seed=seed, workers=workers)

    def _inputs(self, selected: np.ndarray) -> np.ndarray:
        batch = self.images[selected]
        if self.augmenter_factory is not None:
            augmenter = getattr(self._local, "augmenter", None)
            if augmenter is None:
                augmenter = self._local.augmenter = self.augmenter_factory()
            batch = np.stack(
                [
                    _augment_one(augmenter, image, [self.seed, self.epoch, int(position)])
                    for image, position in zip(batch, selected)
                ]
            )
        return batch.astype("float32")


def _augment_one(augmenter, image: np.ndarray, seed_parts: list[int]) -> np.ndarray:
    seed = int(np.random.SeedSequence(seed_parts).generate_state(1)[0])
    augmenter.set_random_seed(seed)
    return augmenter(image=image)["image"]
