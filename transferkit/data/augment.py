"""Training-set augmentation with albumentations, and a preview grid to see it."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from transferkit.errors import DataError
from transferkit.files import require_apart, require_new_file, require_writable_place
from transferkit.recipe import AugmentConfig
from transferkit.runs import require_outside_runs


def import_albumentations():
    """``albumentations``, without its PyTorch transforms (which import torch wherever it is
    installed: ``runtime.import_without_torch``)."""
    from transferkit.runtime import import_without_torch

    return import_without_torch("albumentations", ("albumentations.pytorch",))


def augmentation_enabled(config: AugmentConfig) -> bool:
    """Whether any transform of the recipe's augmentation is switched on (``hflip = "auto"``
    flips)."""
    return config.shift > 0 or config.rotation > 0 or config.contrast > 0 or bool(config.hflip)


def augmenter_factory(config: AugmentConfig, flips: bool = True):
    """What training batches build their augmenters with (one per thread): a function
    returning a new ``build_augmenter`` pipeline, or None when nothing augments.

    Args:
        config: augmentation strengths.
        flips: False leaves horizontal flips out whatever ``config.hflip`` says (the stages
            of ``hflip = "auto"`` that train without flips); default True.

    Returns:
        A function of no arguments, or None.
    """
    if not flips:
        config = config.model_copy(update={"hflip": False})
    return (lambda: build_augmenter(config)) if augmentation_enabled(config) else None


def was_flipped(result: dict) -> bool:
    """Whether a ``build_augmenter`` pipeline flipped the image it returned ``result`` for
    (it records what it applied where it flips)."""
    return any(name == "HorizontalFlip" for name, _ in result.get("applied_transforms", ()))


def build_augmenter(config: AugmentConfig, seed: int | None = None):
    """An albumentations pipeline from the recipe's strengths; None when all are off.

    Args:
        config: ``shift`` (fraction of the image side, translation in x and y),
            ``contrast`` (contrast change, +-fraction), ``rotation`` (degrees, +-),
            ``hflip`` (random horizontal flip; "auto" flips). 0 / False switches a
            transform off.
        seed: seed for the pipeline's random generator; None draws one.

    Returns:
        An ``albumentations.Compose`` taking and returning uint8 HxWx3 images, or None.
    """
    import cv2

    A = import_albumentations()  # noqa: N806 - albumentations' usual name

    transforms = []
    if config.shift > 0 or config.rotation > 0:
        transforms.append(
            A.Affine(
                translate_percent={
                    "x": (-config.shift, config.shift),
                    "y": (-config.shift, config.shift),
                },
                rotate=(-config.rotation, config.rotation),
                # Reflect rather than pad with black: black borders are a shortcut a
                # classifier could learn.
                border_mode=cv2.BORDER_REFLECT_101,
                p=1.0,
            )
        )
    if config.contrast > 0:
        transforms.append(
            A.RandomBrightnessContrast(
                brightness_limit=0.0, contrast_limit=config.contrast, p=1.0
            )
        )
    if config.hflip:  # true or "auto"
        transforms.append(A.HorizontalFlip(p=0.5))
    if not transforms:
        return None
    # Where it flips, it records what it applied: the feature cache notes which stored views
    # are mirrored (``was_flipped``), for the stages of hflip = "auto" that train without flips.
    return A.Compose(transforms, seed=seed, save_applied_params=bool(config.hflip))


def preview_grid(
    images: list[np.ndarray], config: AugmentConfig, views: int = 5, seed: int = 0, tile: int = 128
) -> Image.Image:
    """A grid: each row is one original image followed by ``views`` augmented versions.

    Args:
        images: RGB uint8 images, all the same size.
        config: augmentation strengths.
        views: augmented versions per image; default 5.
        seed: seed for the augmentation; default 0.
        tile: side of each tile in pixels; default 128.

    Returns:
        A PIL image.
    """
    augmenter = build_augmenter(config, seed=seed)
    pad, header = 4, 18
    columns = views + 1
    grid = Image.new(
        "RGB",
        (columns * (tile + pad) + pad, header + len(images) * (tile + pad) + pad),
        (255, 255, 255),
    )
    draw = ImageDraw.Draw(grid)
    draw.text((pad, 3), "original", fill=(0, 0, 0))
    draw.text((tile + 2 * pad, 3), "augmented" if augmenter else "augmented (all off)", fill=(0, 0, 0))
    for row, image in enumerate(images):
        tiles = [image]
        for _ in range(views):
            tiles.append(augmenter(image=image)["image"] if augmenter else image)
        for column, array in enumerate(tiles):
            picture = Image.fromarray(array).resize((tile, tile), Image.Resampling.BILINEAR)
            grid.paste(picture, (pad + column * (tile + pad), header + pad + row * (tile + pad)))
    return grid


def write_preview(
    data_dir: str | Path,
    output: str | Path,
    config: AugmentConfig | None = None,
    image_size: int = 128,
    count: int = 6,
    views: int = 5,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write a PNG of originals beside augmented versions, for images drawn from a data folder.

    Args:
        data_dir: a folder of class sub-folders.
        output: the PNG file to write.
        config: augmentation strengths; default ``AugmentConfig()``.
        image_size: the training size images are resized to first; default 128.
        count: how many images (spread over the classes); default 6.
        views: augmented versions per image; default 5.
        seed: picks the images and seeds the augmentation; default 0.
        force: replace an existing file; default False.

    Returns:
        The path written.

    Raises:
        DataError: ``count`` is below 1, or the folder cannot be indexed or holds no
            readable image.
        RunError: ``output`` lies inside ``data_dir`` or a run folder, is a folder, exists
            (without ``force``), or its folder cannot be created or written.
    """
    from transferkit.data.folders import index_folder
    from transferkit.data.images import decode_images

    output = Path(output)
    if count < 1:
        raise DataError(f"count must be at least 1, got {count}")
    if output.suffix.lower() != ".png":
        raise DataError(f"preview output {output} must end in .png")
    require_apart(output, [data_dir], "preview")  # a PNG in a class folder would be trained on
    require_outside_runs(output, "preview")
    require_new_file(output, force, "preview")
    require_writable_place(output.parent)
    index = index_folder(data_dir)
    rng = np.random.default_rng(seed)
    # Round-robin over classes so every class shows up.
    per_class = [
        list(rng.permutation(np.flatnonzero(index.labels == label)))
        for label in range(len(index.class_names))
    ]
    chosen: list[int] = []
    while len(chosen) < count and any(per_class):
        for members in per_class:
            if members and len(chosen) < count:
                chosen.append(int(members.pop()))
    if len(chosen) < count:
        logging.getLogger("transferkit").warning(f"{data_dir} holds {len(chosen)} image(s), fewer than --count "
                                                 f"{count}: the preview shows each of them")
    images, _, _ = decode_images([index.paths[i] for i in chosen], image_size)
    if len(images) == 0:
        raise DataError(f"no readable image among those drawn from {data_dir}")
    grid = preview_grid(list(images), config or AugmentConfig(), views=views, seed=seed)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        grid.save(output)
    except OSError as error:
        raise DataError(f"cannot write {output}: {error.strerror or error}; choose another -o") from error
    return output
