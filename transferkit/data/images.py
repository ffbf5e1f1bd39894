"""Any image file -> RGB uint8: formats, modes, EXIF orientation, fast JPEG decoding.

No Keras import: the data checks and predict read images through this module alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

try:
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; Pillow decodes every JPEG anyway
    simplejpeg = None

from transferkit.errors import UnreadableImage

log = logging.getLogger("transferkit")


def read_image(path: str | os.PathLike | bytes) -> np.ndarray:
    """Read any supported image as RGB uint8, EXIF orientation applied.

    Grayscale, RGBA/LA/palette with transparency (composited on white), CMYK, 16-bit and
    float images are converted; an animated GIF gives its first frame.

    Args:
        path: the image file, or its contents as bytes (an upload).

    Returns:
        An array of shape (height, width, 3), dtype uint8.

    Raises:
        UnreadableImage: the file is empty, truncated, not an image, or too large to open
            safely (decompression-bomb guard: a file over twice Pillow's MAX_IMAGE_PIXELS,
            about 179 megapixels; bytes over MAX_IMAGE_PIXELS, about 89).
    """
    return np.asarray(_open_rgb(_source(path)))


def load_image(path: str | os.PathLike | bytes, size: int) -> np.ndarray:
    """Read an image and resize it to size x size (bilinear, antialiased).

    Args:
        path: the image file, or its contents as bytes (an upload: the same pixels as
            from the file).
        size: the side of the square result, in pixels.

    Returns:
        An array of shape (size, size, 3), dtype uint8.

    Raises:
        UnreadableImage: as ``read_image``.
    """
    source = _source(path)
    decoded = _decode_plain_jpeg(source, size)
    if decoded is not None and decoded.shape[:2] == (size, size):
        return decoded
    image = Image.fromarray(decoded) if decoded is not None else _open_rgb(source, draft_size=size)
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _source(path: str | os.PathLike | bytes) -> Path | bytes:
    """A file as a ``Path``, or an image's contents as they are."""
    return bytes(path) if isinstance(path, (bytes, bytearray, memoryview)) else Path(path)


# JPEG colour spaces whose decoding to RGB is libjpeg's own, in Pillow as in simplejpeg.
_PLAIN_COLOURSPACES = ("YCbCr", "Gray", "RGB")


def _decode_plain_jpeg(path: Path | bytes, size: int) -> np.ndarray | None:
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
    if isinstance(path, bytes):
        if not path.startswith(b"\xff\xd8\xff"):
            return None
        data = path
    else:
        try:
            with open(path, "rb") as handle:
                if handle.read(3) != b"\xff\xd8\xff":
                    return None
                data = b"\xff\xd8\xff" + handle.read()
        except OSError:
            return None
    if not _plain_jpeg_header(data, strict=isinstance(path, bytes)):
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


def _plain_jpeg_header(data: bytes, strict: bool) -> bool:
    """Whether Pillow opens the file as a JPEG (not MPO) in RGB or grayscale that its EXIF
    or XMP orientation leaves as stored, within the decompression-bomb limit (header only;
    ``strict``: the limit of uploads, as ``_open_rgb`` sets them apart)."""
    import io

    try:
        with open_image(io.BytesIO(data), strict=strict) as image:
            return (image.format == "JPEG" and image.mode in ("RGB", "L")
                    and image.getexif().get(0x0112, 1) == 1)
    except Exception:  # Pillow's path will say what is wrong with it
        return False


# Pillow warns (DecompressionBombWarning) when it opens an image of more than
# Image.MAX_IMAGE_PIXELS pixels and refuses one of more than twice that. Its warning is
# silenced while it reads the header, one thread at a time: ``warnings.catch_warnings`` sets
# the process's filters and puts back those it found, so two threads inside it at once
# (``decode_images`` decodes in several) put back each other's, and Pillow's warning reached
# the user's terminal as a raw line of Python.
_HEADER_LOCK = threading.Lock()


def open_image(source, strict: bool = False) -> Image.Image:
    """``PIL.Image.open`` without Pillow's decompression-bomb warning on standard error.

    Args:
        source: a path or a binary file object.
        strict: refuse an image above ``Image.MAX_IMAGE_PIXELS`` (where Pillow only warns),
            as for bytes sent to ``serve``; default False (refused above twice that, as
            Pillow does: a file on disk is the user's own).

    Returns:
        The opened image (its header read, not decoded); close it, or use it as a context
        manager.

    Raises:
        Image.DecompressionBombError: the image is above the limit.
        OSError, ValueError, ...: as ``Image.open``.
    """
    with _HEADER_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(source)
    if strict and Image.MAX_IMAGE_PIXELS is not None and image.width * image.height > Image.MAX_IMAGE_PIXELS:
        image.close()
        raise Image.DecompressionBombError(
            f"Image size ({image.width * image.height} pixels) exceeds limit of {Image.MAX_IMAGE_PIXELS} pixels")
    return image


def _open_rgb(path: Path | bytes, draft_size: int | None = None) -> Image.Image:
    import io

    source = io.BytesIO(path) if isinstance(path, bytes) else path
    # Between MAX_IMAGE_PIXELS (about 89 megapixels) and twice it Pillow only warns; above, it
    # refuses. A file on disk is the user's own: a 100-megapixel photo or scan is read. Bytes
    # sent to serve stop at the warning: a small, highly compressed upload must not make the
    # server decode gigabytes.
    strict = isinstance(path, bytes)
    limit = (Image.MAX_IMAGE_PIXELS or 0) * (1 if strict else 2)
    try:
        with open_image(source, strict=strict) as image:
            if draft_size is not None and image.format == "JPEG":
                # Let libjpeg decode at a reduced scale: much faster for large photos.
                image.draft("RGB", (draft_size, draft_size))
            image.seek(0)
            image = ImageOps.exif_transpose(image)
            return _to_rgb(image)
    except Image.DecompressionBombError as error:
        raise UnreadableImage(
            _named(path),
            f"image too large to open safely (decompression-bomb guard, over {limit} pixels)",
        ) from error
    except (OSError, SyntaxError, ValueError, EOFError, TypeError, MemoryError) as error:
        # (Pillow names a file object by its repr, which says nothing to a reader)
        detail = str(error).replace(f" {source!r}", "") or type(error).__name__
        raise UnreadableImage(_named(path), f"not a readable image ({detail})") from error


def _named(path: Path | bytes) -> Path | str:
    """What an error calls the image: its path, or "image bytes" for contents passed in."""
    return "image bytes" if isinstance(path, bytes) else path


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
