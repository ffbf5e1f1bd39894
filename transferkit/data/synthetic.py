"""Generated image folders of simple shapes, for the sample dataset, tests and benchmarks.

    python -m transferkit.data.synthetic sample_images --per-class 30 --size 96

Each class is one kind of shape (circle, square, triangle, stripes, cross, ring, ...) drawn
with a random colour, size, position and rotation on a random textured background, so a
classifier has to learn shape rather than colour. ``write_textures_dataset`` writes textures
instead (stripes, checks, dots, blobs, waves, grain) that fill the whole image at a random
scale, orientation, phase and pair of colours: what tells them apart is the pattern, and no
flip, shift or rotation changes it. ``write_unknown_images`` writes images of no shape at all
(noise, smooth colour fields, checkerboards): images of no known class, for rejection tests
and benchmarks.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

log = logging.getLogger("transferkit")

SHAPES = ("circle", "square", "triangle", "stripes", "cross", "ring", "star", "dots", "hexagon", "diamond")


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of a shape of ``kind`` on a random background.

    Args:
        kind: one of ``SHAPES``.
        size: the image side in pixels.
        rng: the random generator (colour, size, position, rotation).

    Returns:
        A PIL RGB image.
    """
    background = tuple(int(v) for v in rng.integers(0, 256, 3))
    noise = rng.normal(0, 18, (size, size, 3))
    base = np.clip(np.asarray(background, dtype="float64") + noise, 0, 255).astype("uint8")
    image = Image.fromarray(base)
    draw = ImageDraw.Draw(image)
    colour = tuple(int((b + rng.integers(80, 176)) % 256) for b in background)
    radius = size * rng.uniform(0.2, 0.35)
    cx, cy = size * rng.uniform(0.35, 0.65, 2)
    angle = rng.uniform(0, 2 * math.pi)
    width = max(1, int(size * 0.06))

    def polygon(n: int, r: float, phase: float = 0.0):
        return [
            (cx + r * math.cos(angle + phase + 2 * math.pi * k / n),
             cy + r * math.sin(angle + phase + 2 * math.pi * k / n))
            for k in range(n)
        ]

    if kind == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    elif kind == "square":
        draw.polygon(polygon(4, radius * 1.2), fill=colour)
    elif kind == "triangle":
        draw.polygon(polygon(3, radius * 1.3), fill=colour)
    elif kind == "hexagon":
        draw.polygon(polygon(6, radius * 1.1), fill=colour)
    elif kind == "diamond":
        points = polygon(4, radius * 1.2)
        points = [(cx + (x - cx) * 0.55, y) for x, y in points]
        draw.polygon(points, fill=colour)
    elif kind == "star":
        outer = polygon(5, radius * 1.3)
        inner = polygon(5, radius * 0.5, phase=math.pi / 5)
        draw.polygon([p for pair in zip(outer, inner, strict=False) for p in pair], fill=colour)
    elif kind == "ring":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], outline=colour, width=width * 2)
    elif kind == "cross":
        for theta in (angle, angle + math.pi / 2):
            dx, dy = radius * 1.2 * math.cos(theta), radius * 1.2 * math.sin(theta)
            draw.line([cx - dx, cy - dy, cx + dx, cy + dy], fill=colour, width=width * 2)
    elif kind == "stripes":
        spacing = size * rng.uniform(0.12, 0.2)
        dx, dy = math.cos(angle), math.sin(angle)
        for offset in np.arange(-size, size, spacing):
            px, py = size / 2 + offset * -dy, size / 2 + offset * dx
            draw.line([px - dx * size, py - dy * size, px + dx * size, py + dy * size], fill=colour, width=width)
    elif kind == "dots":
        for _ in range(int(rng.integers(5, 9))):
            x, y = rng.uniform(0.1, 0.9, 2) * size
            r = size * 0.05
            draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    else:
        raise ValueError(f"unknown shape {kind!r}; choose from {', '.join(SHAPES)}")
    return image.filter(ImageFilter.GaussianBlur(radius=size / 160))


TEXTURES = ("stripes", "checks", "dots", "blobs", "waves", "grain")


def draw_texture(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image filled with a texture of ``kind``: a pattern between two random colours
    at a random scale, orientation and phase, with pixel noise.

    Args:
        kind: one of ``TEXTURES``.
        size: the image side in pixels.
        rng: the random generator.

    Returns:
        A PIL RGB image.
    """
    y, x = (np.mgrid[0:size, 0:size] / size).astype("float64")
    angle = rng.uniform(0, math.pi)
    u = x * math.cos(angle) + y * math.sin(angle)  # along the pattern's axis
    v = -x * math.sin(angle) + y * math.cos(angle)
    period = rng.uniform(0.08, 0.16)  # of the side
    phase = rng.uniform(0, 2 * math.pi, 2)
    if kind == "stripes":
        pattern = np.sin(2 * math.pi * u / period + phase[0]) > 0
    elif kind == "checks":
        pattern = np.sin(2 * math.pi * u / period + phase[0]) * np.sin(2 * math.pi * v / period + phase[1]) > 0
    elif kind == "waves":
        bend = rng.uniform(0.04, 0.08)
        pattern = np.sin(2 * math.pi * (u + bend * np.sin(2 * math.pi * v / (3 * period) + phase[1])) / period
                         + phase[0]) > 0
    elif kind == "dots":
        step = period * size
        offset = rng.uniform(0, step, 2)
        cu = (u * size + offset[0]) % step - step / 2
        cv = (v * size + offset[1]) % step - step / 2
        pattern = cu ** 2 + cv ** 2 < (step * rng.uniform(0.22, 0.3)) ** 2
    elif kind in ("blobs", "grain"):
        cells = max(2, round(1 / period)) if kind == "blobs" else max(4, size // 2)
        coarse = Image.fromarray(rng.normal(0, 1, (cells, cells)).astype("float32"))  # mode "F"
        field = np.asarray(coarse.resize((size, size), Image.BICUBIC))
        pattern = field > np.median(field)
    else:
        raise ValueError(f"unknown texture {kind!r}; choose from {', '.join(TEXTURES)}")
    colours = rng.integers(0, 256, (2, 3)).astype("float64")
    while np.abs(colours[0] - colours[1]).sum() < 150:  # the two colours differ clearly
        colours = rng.integers(0, 256, (2, 3)).astype("float64")
    pixels = np.where(pattern[..., None], colours[0], colours[1]) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype("uint8"))


UNKNOWN_KINDS = ("noise", "field", "checker")


def draw_unknown(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One RGB image of no shape: "noise" (every pixel random), "field" (a smooth random
    colour field) or "checker" (a checkerboard of two random colours, random cell size).

    Args:
        kind: one of ``UNKNOWN_KINDS``.
        size: the image side in pixels.
        rng: the random generator.

    Returns:
        A PIL RGB image.
    """
    if kind == "noise":
        return Image.fromarray(rng.integers(0, 256, (size, size, 3)).astype("uint8"))
    if kind == "field":
        coarse = rng.integers(0, 256, (int(rng.integers(2, 6)),) * 2 + (3,)).astype("uint8")
        return Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    if kind == "checker":
        cell = int(rng.integers(max(2, size // 16), max(3, size // 3)))
        grid = ((np.arange(size)[:, None] // cell + np.arange(size)[None, :] // cell) % 2).astype(bool)
        colours = rng.integers(0, 256, (2, 3)).astype("uint8")
        return Image.fromarray(np.where(grid[..., None], colours[0], colours[1]).astype("uint8"))
    raise ValueError(f"unknown kind {kind!r}; choose from {', '.join(UNKNOWN_KINDS)}")


def write_unknown_images(folder: str | Path, count: int = 12, size: int = 96, seed: int = 0,
                         kinds: Sequence[str] = UNKNOWN_KINDS, extension: str = ".png") -> Path:
    """Write ``folder/<kind>_NNN<extension>`` images of no shape, the kinds in turn.

    Args:
        folder: the folder to create.
        count: how many images; default 12.
        size: image side in pixels; default 96.
        seed: random seed; default 0.
        kinds: which of ``UNKNOWN_KINDS``; default all.
        extension: ".png" or ".jpg"; default ".png".

    Returns:
        ``folder``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for index in range(count):
        kind = kinds[index % len(kinds)]
        draw_unknown(kind, size, rng).save(folder / f"{kind}_{index:03d}{extension}")
    return folder


def write_shapes_dataset(
    root: str | Path,
    classes: Sequence[str] | int = 4,
    per_class: int | Sequence[int] = 30,
    size: int = 96,
    seed: int = 0,
    extension: str = ".jpg",
) -> Path:
    """Write ``root/<class>/<class>_NNN<extension>`` images.

    Args:
        root: the folder to create.
        classes: shape names, or how many of ``SHAPES`` to use; default 4.
        per_class: images per class, or one count per class; default 30.
        size: image side in pixels; default 96.
        seed: random seed; default 0.
        extension: ".jpg" (quality 90) or ".png"; default ".jpg".

    Returns:
        ``root``.
    """
    return _write_classes(root, SHAPES, draw_shape, classes, per_class, size, seed, extension)


def write_textures_dataset(
    root: str | Path,
    classes: Sequence[str] | int = 6,
    per_class: int | Sequence[int] = 30,
    size: int = 96,
    seed: int = 0,
    extension: str = ".png",
) -> Path:
    """Write ``root/<texture>/<texture>_NNN<extension>`` images (see ``draw_texture``).

    Args:
        root: the folder to create.
        classes: texture names, or how many of ``TEXTURES`` to use; default 6 (all).
        per_class: images per class, or one count per class; default 30.
        size: image side in pixels; default 96.
        seed: random seed; default 0.
        extension: ".png" or ".jpg" (quality 90); default ".png".

    Returns:
        ``root``.
    """
    return _write_classes(root, TEXTURES, draw_texture, classes, per_class, size, seed, extension)


def _write_classes(root, kinds: Sequence[str], draw, classes, per_class, size: int, seed: int, extension: str) -> Path:
    root = Path(root)
    names = list(kinds[:classes]) if isinstance(classes, int) else list(classes)
    counts = [per_class] * len(names) if isinstance(per_class, int) else list(per_class)
    rng = np.random.default_rng(seed)
    for name, count in zip(names, counts, strict=False):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image = draw(name, size, rng)
            path = folder / f"{name}_{index:03d}{extension}"
            if extension.lower() in (".jpg", ".jpeg"):
                image.save(path, quality=90)
            else:
                image.save(path)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m transferkit.data.synthetic ROOT``: write a generated folder; the one
    line it reports goes through the ``transferkit`` logger (shown when run as a script)."""
    parser = argparse.ArgumentParser(description="Write a generated folder of shape images.")
    parser.add_argument("root", type=Path)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    write_shapes_dataset(args.root, args.classes, args.per_class, args.size, args.seed)
    log.info("wrote %d classes x %d images to %s", args.classes, args.per_class, args.root)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
