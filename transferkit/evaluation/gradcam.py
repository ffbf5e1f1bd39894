"""Grad-CAM: where in an image the model looked for a class.

At the backbone's last convolutional layer (``BackboneSpec.last_conv`` in the registry), each
feature map is weighted by the mean gradient of the class's logit (the output layer's
pre-activation; for a sigmoid unit +z for the second class, -z for the first) and the
weighted sum, through a ReLU, is the heatmap: scaled to 0..1 and resized to the image's own
height and width (the model squashes every image to its square input, so the map covers the
whole image). It is computed through the run's saved, self-contained model, split at that
layer; the gradient is the Keras backend's own (``backend.input_gradient``: TensorFlow's tape,
``jax.grad`` or PyTorch's autograd).

    explanations = explain(load_run("runs/demo"), "photo.jpg", top=2)
    explanations[0].heatmaps[0].heat      # float32 (H, W), 0..1
    write_explanations(explanations, "out/")
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.errors import DataError, RunError

log = logging.getLogger("transferkit")

GRID_LIMIT = 48
INDEX_FILE = "heatmaps.json"  # what marks an explain folder


@dataclass(frozen=True)
class Heatmap:
    """One class's Grad-CAM heatmap for one image.

    Attributes:
        class_name: the class explained.
        probability: the model's probability for it.
        heat: float32 (H, W), values 0..1, at the image's own size.
    """

    class_name: str
    probability: float
    heat: np.ndarray


@dataclass(frozen=True)
class Explanation:
    """An image and its heatmaps (most likely class first, or the class asked for).

    Attributes:
        file: the image file (None for an array passed in).
        image: the image, uint8 (H, W, 3) as read.
        heatmaps: one ``Heatmap`` per explained class.
    """

    file: Path | None
    image: np.ndarray
    heatmaps: tuple[Heatmap, ...]

    @property
    def predicted(self) -> str:
        """The first heatmap's class."""
        return self.heatmaps[0].class_name


class GradCAM:
    """A run's classifier split at the backbone's last convolutional layer.

    Args:
        model: a transferkit classifier (image -> "preprocessing" -> "backbone" -> "head").
        last_conv: the backbone layer whose output is explained.
    """

    def __init__(self, model, last_conv: str):
        import keras

        backbone = model.get_layer("backbone")
        head = model.get_layer("head")
        try:
            conv = backbone.get_layer(last_conv)
        except ValueError as error:
            raise RunError(f"the backbone has no layer {last_conv!r} to explain at: {error}") from error
        self.preprocessing = model.get_layer("preprocessing")
        self.to_conv = keras.Model(backbone.input, conv.output, name="gradcam_to_conv")
        # The rest of the backbone (none where the layer is the backbone's last), so that the
        # logits are a function of the layer's output and their gradient is taken there.
        self.after_conv = (None if backbone.layers[-1] is conv else
                           keras.Model(conv.output, backbone.output, name="gradcam_after_conv"))
        dense = head.get_layer("output")
        self.before_output = keras.Model(head.input, dense.input, name="before_output")
        self.dense = dense

    def logits(self, activations):
        """The output layer's pre-activations from the explained layer's output (a backend
        tensor in, a float32 backend tensor out)."""
        import keras

        kernel, bias = (np.asarray(weight, dtype="float32") for weight in self.dense.get_weights())
        features = activations if self.after_conv is None else self.after_conv(activations, training=False)
        hidden = keras.ops.cast(self.before_output(features, training=False), "float32")
        return keras.ops.add(keras.ops.matmul(hidden, kernel), bias)

    def score(self, activations, select: np.ndarray):
        """The sum over the batch of each image's selected logit (``select``: one row per
        image, 1 at the class, or +1 / -1 for a sigmoid unit) as a backend scalar."""
        import keras

        return keras.ops.sum(keras.ops.multiply(self.logits(activations), select))

    def heatmaps(self, images: np.ndarray, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Conv-resolution heatmaps and every class's probabilities.

        Args:
            images: (n, S, S, 3), 0..255.
            targets: (n, r) class indices: r heatmaps per image.

        Returns:
            (heat (n, r, h, w) float32 in 0..1, probabilities (n, k) float64).
        """
        import keras

        from transferkit.backend import input_gradient
        from transferkit.evaluation.calibration import probabilities_from_logits

        x = np.asarray(images, dtype="float32")
        conv = keras.ops.convert_to_numpy(keras.ops.cast(self.to_conv(self.preprocessing(x), training=False),
                                                         "float32"))
        units = int(self.dense.units)
        maps = []
        for rank in range(targets.shape[1]):
            column = np.asarray(targets[:, rank], dtype="int64")
            if units == 1:  # a sigmoid unit: +z for the second class, -z for the first
                select = np.where(column == 1, 1.0, -1.0).astype("float32")[:, None]
            else:
                select = np.eye(units, dtype="float32")[column]
            _, grads = input_gradient(functools.partial(self.score, select=select), conv)
            weights = grads.mean(axis=(1, 2), keepdims=True)
            cam = np.maximum((weights * conv).sum(axis=-1), 0.0)
            peak = cam.max(axis=(1, 2), keepdims=True)
            maps.append(np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0))
        logits = np.asarray(keras.ops.convert_to_numpy(self.logits(conv)), dtype="float64")
        return np.stack(maps, axis=1).astype("float32"), probabilities_from_logits(logits)


def resize_heat(heat: np.ndarray, height: int, width: int) -> np.ndarray:
    """A (h, w) map resized to (height, width), bilinear, kept in 0..1, float32."""
    from PIL import Image

    resized = np.asarray(Image.fromarray(np.asarray(heat, dtype="float32"), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR), dtype="float32")
    return np.clip(resized, 0.0, 1.0)


def _inputs(images) -> list[tuple[Path | None, object]]:
    """(file or None, path or array) per image to explain."""
    from transferkit.data.folders import iter_image_files

    if isinstance(images, np.ndarray):
        array = images[None] if images.ndim == 3 else images
        if array.ndim != 4 or array.shape[-1] != 3:
            raise DataError(f"images must be (H, W, 3) or (n, H, W, 3) RGB arrays, got shape {images.shape}")
        return [(None, image) for image in array]
    if isinstance(images, (str, os.PathLike)):
        path = Path(images)
        if not path.exists():
            raise DataError(f"{path} does not exist; pass an image file or a folder of images")
        if path.is_file():
            return [(path, path)]
        files = [file for file, reason in iter_image_files(path) if reason is None]
        if not files:
            raise DataError(f"{path} holds no image files (.jpg, .png, ...); pass a folder of images or one image")
        return [(file, file) for file in files]
    return [(Path(file), Path(file)) for file in images]


def check_class_name(class_name: str | None, class_names) -> None:
    """Raises DataError when ``class_name`` is given and is not one of ``class_names`` (the
    run's classes, named in the message).

    Args:
        class_name: the class asked for (``--class``, or /explain's ?class=); None: none asked.
        class_names: the run's classes.
    """
    if class_name is not None and class_name not in class_names:
        raise DataError(f"class {class_name!r} (--class, or /explain's ?class=) is not one of the run's classes: "
                        f"{', '.join(class_names)}")


def explain(run, images, *, class_name: str | None = None, top: int = 1, batch_size: int = 16) -> list[Explanation]:
    """Grad-CAM heatmaps for images, at the backbone's last convolutional layer.

    Args:
        run: a ``Run`` (with its model) or a run folder.
        images: an image file, a folder (walked recursively), a list of files, or uint8
            arrays (H, W, 3) / (n, H, W, 3).
        class_name: explain this class for every image; default None (the predicted class,
            or the ``top`` most likely).
        top: how many of the most likely classes to explain (ignored with ``class_name``);
            default 1.
        batch_size: images per gradient pass; default 16.

    Returns:
        One ``Explanation`` per readable image, in input order (unreadable files are
        skipped with a warning).

    Raises:
        DataError: no image, an unknown ``class_name``, ``top`` below 1, or no image could be read.
        RunError: the run cannot be loaded, or its backbone is not in the registry.
    """
    from transferkit.backbones import find_spec
    from transferkit.data.images import UnreadableImage, read_image
    from transferkit.runs import load_run

    if not hasattr(run, "model") or run.model is None:
        run = load_run(run if not hasattr(run, "path") else run.path)
    names = tuple(run.class_names)
    check_class_name(class_name, names)
    if top < 1:
        raise DataError(f"--top must be at least 1, got {top}")
    spec = find_spec(run.backbone)
    if spec is None:
        package = f" ({run.backbone_package})" if run.backbone_package else ""
        raise RunError(f"the run's backbone {run.backbone!r} is neither built in nor added by an installed package; "
                       f"cannot find its last conv layer (install the package that adds it{package})")
    cam = GradCAM(run.model, spec.last_conv)
    count = 1 if class_name is not None else min(top, len(names))
    results: list[Explanation] = []
    items = _inputs(images)
    for start in range(0, len(items), batch_size):
        batch: list[tuple[Path | None, np.ndarray]] = []
        for file, source in items[start : start + batch_size]:
            try:
                batch.append((file, read_image(source) if file is not None else np.asarray(source, dtype="uint8")))
            except UnreadableImage as error:
                log.warning("skipping %s: %s", file, error.reason)
        if batch:
            results.extend(_explain_batch(cam, batch, names, run.image_size, class_name, count))
    if not results:
        raise DataError("no image could be explained: every image file is unreadable (see the warnings above); "
                        "pass readable images")
    return results


def _explain_batch(cam: GradCAM, batch, names, size: int, class_name, count: int) -> list[Explanation]:
    from PIL import Image

    # The model's own Resizing squashes any image to its input; resized here only to batch.
    squared = np.stack([np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
                        for _, image in batch])
    if class_name is not None:
        targets = np.full((len(batch), 1), names.index(class_name), dtype="int64")
    else:
        # Probabilities first (a forward pass without the tape), then the classes to explain.
        _, probabilities = cam.heatmaps(squared, np.zeros((len(batch), 1), dtype="int64"))
        targets = np.argsort(-probabilities, axis=1, kind="stable")[:, :count]
    heat, probabilities = cam.heatmaps(squared, targets)
    explanations = []
    for i, (file, image) in enumerate(batch):
        maps = tuple(
            Heatmap(names[c], float(probabilities[i, c]), resize_heat(heat[i, r], *image.shape[:2]))
            for r, c in enumerate(targets[i])
        )
        explanations.append(Explanation(file, image, maps))
    return explanations


def default_output(run_path: Path, images) -> Path:
    """``RUN/explain-<image or folder name>-<YYYYmmdd-HHMMSS>`` (``locks.stamped_folder``)."""
    from transferkit.locks import stamped_folder

    name = Path(images).resolve().stem if isinstance(images, (str, os.PathLike)) else "images"
    return stamped_folder(run_path, f"explain-{name}")


def _safe(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("._") or "image"


def check_output_folder(out_dir: Path, force: bool, images: str | os.PathLike | None = None,
                        run: str | os.PathLike | None = None) -> None:
    """Fail before any work where the heatmaps could not be written or would mix into
    something else.

    Args:
        out_dir: the folder to write.
        force: replace an earlier explain folder (its heatmaps.json) that is not empty.
        images: the image file or folder explained; default None (not checked).
        run: the run explained (its labels.json records its data folder); default None.

    Raises:
        RunError: ``out_dir`` is a file, is not empty (without ``force``; with it, unless it
            is an explain folder: never a run folder), or is, lies inside or holds the
            images' folder (an image file's own folder) or the run's data folder (its PNGs
            would be trained on as images of a class).
    """
    from transferkit.data.samples import recorded_data_dir
    from transferkit.files import require_apart, require_not_a_file, require_writable_place

    folders = [recorded_data_dir(run) if run is not None else None]
    if images is not None:
        images = Path(images)
        folders.append(images if images.is_dir() else images.parent)
    require_apart(out_dir, folders, "explain folder")
    require_not_a_file(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not force:
            raise RunError(f"{out_dir} exists already; pass --force to replace it or choose another -o")
        if not (out_dir / INDEX_FILE).is_file():
            raise RunError(f"{out_dir} is not an explain folder (no {INDEX_FILE}) and is not empty; --force replaces "
                           "only explain folders: choose another -o")
    require_writable_place(out_dir)


def write_explanations(explanations: Sequence[Explanation], out_dir: str | os.PathLike, force: bool = False,
                       root: str | os.PathLike | None = None) -> list[Path]:
    """Per image a PNG (the original, each heatmap over it, class and confidence) and per
    heatmap the raw ``.npy`` beside it; with several images also ``gradcam_grid.png``;
    ``heatmaps.json`` indexes them. The folder is written whole under its owner lock and
    published when complete: an interrupted explain leaves none.

    File names: ``<image>.png`` and ``<image>.<class>.npy``, where ``<image>`` is the
    image's path under ``root`` with "/" as "__" (its name without ``root``).

    Args:
        explanations: from ``explain``.
        out_dir: the folder (created).
        force: replace an earlier explain folder; default False.
        root: the folder the images were found in, for unique names; default None.

    Returns:
        The files written.

    Raises:
        RunError: see ``check_output_folder`` (with ``root`` as the images' folder), or it
            could not be written.
    """
    from transferkit.files import write_failure
    from transferkit.locks import publishing

    out_dir = Path(out_dir)
    check = lambda: check_output_folder(out_dir, force, root)
    check()
    try:
        # Under the folder's owner lock, the check made again (another process may have
        # written the folder meanwhile).
        with publishing(out_dir, "explain", check=check) as staging:
            names = _write_contents(explanations, staging, root)
    except OSError as error:
        raise RunError(f"could not write {out_dir}: {write_failure(error)}; nothing was written") from error
    return [out_dir / name for name in names]


def _write_contents(explanations: Sequence[Explanation], folder: Path, root) -> list[str]:
    from transferkit.evaluation.figures import warn_about_missing_glyphs
    from transferkit.files import atomic_path, write_atomic

    written: list[Path] = []
    index = []
    used: set[str] = set()
    # Once for the folder, not once per figure (hundreds of lines on a real folder).
    warn_about_missing_glyphs(sorted({h.class_name for item in explanations for h in item.heatmaps}),
                              Path("the explain figures"))
    for number, item in enumerate(explanations):
        base = _base_name(item, number, root)
        while base in used:
            base = f"{base}_{number}"
        used.add(base)
        entry = {"file": str(item.file) if item.file else None, "png": f"{base}.png", "heatmaps": []}
        for heatmap in item.heatmaps:
            npy = folder / f"{base}.{_safe(heatmap.class_name)}.npy"
            with atomic_path(npy) as temporary:
                with open(temporary, "wb") as handle:
                    np.save(handle, heatmap.heat.astype("float32"))
            written.append(npy)
            entry["heatmaps"].append({"class": heatmap.class_name, "probability": heatmap.probability,
                                      "npy": npy.name})
        written.append(plot_explanation(item, folder / f"{base}.png", glyphs_told=True))
        index.append(entry)
    if len(explanations) > 1:
        written.append(plot_grid(explanations, folder / "gradcam_grid.png", glyphs_told=True))
    written.append(write_atomic(folder / INDEX_FILE, json.dumps(index, indent=2, ensure_ascii=False) + "\n"))
    return [path.name for path in written]


def _base_name(item: Explanation, number: int, root) -> str:
    if item.file is None:
        return f"image_{number:04d}"
    path = Path(item.file)
    if root is not None and Path(root).is_dir():
        try:
            path = path.relative_to(root)
        except ValueError:
            pass
    else:
        path = Path(path.name)
    return _safe("__".join(path.with_suffix("").parts))


# How a heatmap is drawn over its image, in the figures and in ``overlay_heatmap``.
HEAT_COLOURS = "jet"
HEAT_ALPHA = 0.45


def _overlay(axis, image: np.ndarray, heat: np.ndarray) -> None:
    axis.imshow(image)
    axis.imshow(heat, cmap=HEAT_COLOURS, alpha=HEAT_ALPHA, vmin=0, vmax=1)
    axis.axis("off")


def overlay_heatmap(image: np.ndarray, heat: np.ndarray, alpha: float = HEAT_ALPHA) -> np.ndarray:
    """A heatmap drawn over its image as the figures draw it (the "jet" colours, blended).

    Args:
        image: uint8 (H, W, 3).
        heat: (H, W), 0..1 (``Heatmap.heat``); resized to the image when its size differs.
        alpha: the heatmap's weight in the blend; default 0.45.

    Returns:
        uint8 (H, W, 3).
    """
    from matplotlib import colormaps

    height, width = image.shape[:2]
    if heat.shape != (height, width):
        heat = resize_heat(heat, height, width)
    colours = colormaps[HEAT_COLOURS](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    blended = (1.0 - alpha) * image.astype("float32") + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype("uint8")


def plot_explanation(item: Explanation, path: Path, glyphs_told: bool = False) -> Path:
    """One image: the original (titled by its folder and name), then each heatmap over it
    titled class and probability ("no heat" where the map is all zero: it draws as a plain
    tint). ``glyphs_told``: the missing-glyph warning was given for the whole folder."""
    from matplotlib.figure import Figure

    from transferkit.evaluation.figures import file_label, fit_text, save_figure, warn_about_missing_glyphs

    if not glyphs_told:
        warn_about_missing_glyphs([h.class_name for h in item.heatmaps], path)
    panels = 1 + len(item.heatmaps)
    figure = Figure(figsize=(3.2 * panels, 3.6))
    axes = np.atleast_1d(figure.subplots(1, panels))
    axes[0].imshow(item.image)
    axes[0].set_title(file_label(item.file, 36) if item.file else "image", fontsize=9)
    axes[0].axis("off")
    for axis, heatmap in zip(axes[1:], item.heatmaps, strict=False):
        _overlay(axis, item.image, heatmap.heat)
        empty = "; no heat" if not np.any(heatmap.heat > 0) else ""
        axis.set_title(f"{fit_text(heatmap.class_name, 30)} ({heatmap.probability:.3f}){empty}", fontsize=10)
    return save_figure(figure, path)


def plot_grid(explanations: Sequence[Explanation], path: Path, columns: int = 6, glyphs_told: bool = False) -> Path:
    """gradcam_grid.png: the first ``GRID_LIMIT`` images with their first heatmap over them."""
    from matplotlib.figure import Figure

    from transferkit.evaluation.figures import file_label, save_figure, warn_about_missing_glyphs

    shown = list(explanations[:GRID_LIMIT])
    if not glyphs_told:
        warn_about_missing_glyphs([e.predicted for e in shown], path)
    columns = min(columns, len(shown))
    rows = math.ceil(len(shown) / columns)
    figure = Figure(figsize=(2.4 * columns, 2.7 * rows))
    title = "Grad-CAM" + (f" (first {GRID_LIMIT} of {len(explanations)})" if len(explanations) > GRID_LIMIT else "")
    figure.suptitle(title)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axis in axes:
        axis.axis("off")
    for number, (axis, item) in enumerate(zip(axes, shown, strict=False)):
        heat = item.heatmaps[0].heat
        _overlay(axis, item.image, heat)
        # Which file each cell is, and a heatmap with no heat said so (it draws as a plain tint).
        name = file_label(item.file, 24) if item.file is not None else f"image {number + 1}"
        empty = "; no heat" if not np.any(heat > 0) else ""
        axis.set_title(f"{name}\n{item.predicted} ({item.heatmaps[0].probability:.2f}){empty}", fontsize=8)
    return save_figure(figure, path)
