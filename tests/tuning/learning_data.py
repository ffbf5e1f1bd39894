"""Image folders for the learning checks and the range test: classes told apart by colour, which
even a backbone with random weights (weights="none") separates in a few steps, and the same
folders broken on purpose (labels shuffled across the classes, pixels scaled to 0..1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from tests.conftest import TINY

# TINY, in float32 on every CPU (the checks' figures then do not depend on bfloat16).
LEARNING = {**TINY, "precision": "float32"}

_COLOURS = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]])


def write_colour_classes(root: Path, per_class: int = 20, size: int = 40, seed: int = 0, *,
                         scale: float = 1.0, shuffle_labels: bool = False) -> Path:
    """Three classes of noisy red, green and blue PNGs.

    Args:
        scale: multiplies the pixels before they are saved (1/255: images scaled to 0..1).
        shuffle_labels: put each image into a random class folder (labels that do not follow
            the images; each class keeps ``per_class`` images).
    """
    rng = np.random.default_rng(seed)
    images = [np.clip((colour + rng.normal(0, 40, (size, size, 3))) * scale, 0, 255).astype("uint8")
              for colour in _COLOURS for _ in range(per_class)]
    labels = np.repeat(np.arange(len(_COLOURS)), per_class)
    if shuffle_labels:
        labels = rng.permutation(labels)
    for number, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{number:03d}.png")
    return root


def write_stripe_classes(root: Path, per_class: int = 24, size: int = 32, seed: int = 0) -> Path:
    """Two classes of noisy grey PNGs striped along a diagonal: "rising" (/) and "falling"
    (\\), each the other's mirror image, so that a horizontal flip turns one class into the
    other. Stripes of one phase and little noise: a backbone with random weights tells the
    two apart about as clearly as it tells colours."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size]
    rising = 128 + 100 * np.sin(2 * np.pi * (rows + columns) / 6.0)[..., None]
    for name, template in (("rising", rising), ("falling", rising[:, ::-1])):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(per_class):
            image = template + rng.normal(0, 4, (size, size, 3))
            Image.fromarray(np.clip(image, 0, 255).astype("uint8")).save(folder / f"{name}_{number:03d}.png")
    return root
