"""Test-time augmentation: average the probabilities of an image and a few fixed variants.

The variants come from the run's recipe (``[tta]``): "identity" (the image), "hflip" (its
mirror image, only when the run trained with horizontal flips: a model that never saw
mirrored images is not helped by them) and "shift" (four copies moved left, right, up and
down by ``tta.shift`` of the side, edges reflected as in training augmentation). Every
variant is deterministic, so a TTA prediction is reproducible.

``TTAEngine`` wraps any ``ForwardEngine`` (Keras, OpenVINO, chained): a batch of B images
becomes B x V variants that go through the inner engine in one call, then each image's V
outputs are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from transferkit.inference.engines import ForwardEngine
from transferkit.recipe import TTAConfig

SHIFTS = ("shift_left", "shift_right", "shift_up", "shift_down")


def tta_variants(run_recipe: dict | None) -> tuple[str, ...]:
    """The variant names a run's recipe asks for, "shift" expanded into its four shifts.

    Args:
        run_recipe: the run's resolved recipe as a dict (``Run.recipe``); None (a bare
            model file) gives the defaults without "hflip".

    Returns:
        Variant names, e.g. ("identity", "hflip", "shift_left", ..., "shift_down").
    """
    recipe = run_recipe or {}
    config = TTAConfig.model_validate(_tuples(recipe.get("tta", {})))
    flips = bool(recipe.get("augment", {}).get("hflip", False))
    names: list[str] = []
    for transform in config.transforms:
        if transform == "shift":
            names.extend(SHIFTS)
        elif transform != "hflip" or flips:
            names.append(transform)
    return tuple(names)


def tta_shift(run_recipe: dict | None) -> float:
    """The recipe's ``tta.shift`` (fraction of the side each shift moves the image)."""
    return TTAConfig.model_validate(_tuples((run_recipe or {}).get("tta", {}))).shift


def _tuples(section: dict) -> dict:
    return {key: tuple(value) if isinstance(value, list) else value for key, value in section.items()}


def transform_batch(batch: np.ndarray, variant: str, shift: float = 0.05) -> np.ndarray:
    """One variant of a (B, S, S, 3) batch, same dtype and shape.

    Args:
        batch: images, (B, H, W, C).
        variant: "identity", "hflip" or one of ``SHIFTS``.
        shift: fraction of the side a shift moves the image (at least one pixel); default 0.05.

    Returns:
        The transformed batch.

    Raises:
        ValueError: an unknown variant.
    """
    if variant == "identity":
        return batch
    if variant == "hflip":
        return batch[:, :, ::-1]
    if variant not in SHIFTS:
        raise ValueError(f"unknown TTA variant {variant!r}; choose identity, hflip or one of {', '.join(SHIFTS)}")
    height, width = batch.shape[1:3]
    axis = 2 if variant in ("shift_left", "shift_right") else 1
    side = width if axis == 2 else height
    d = max(1, int(round(shift * side)))
    d = min(d, side - 1)
    pad = [(0, 0)] * batch.ndim
    # Content moves left / up: the far edge is filled by reflection, and the near edge cut.
    forward = variant in ("shift_left", "shift_up")
    pad[axis] = (0, d) if forward else (d, 0)
    padded = np.pad(batch, pad, mode="reflect")
    index = [slice(None)] * batch.ndim
    index[axis] = slice(d, d + side) if forward else slice(0, side)
    return padded[tuple(index)]


class TTAEngine(ForwardEngine):
    """A ``ForwardEngine`` that averages another engine's outputs over fixed variants.

    Args:
        inner: the engine that runs the model (its ``predict`` gets all variants at once).
        variants: names as ``tta_variants`` gives them; default ("identity",).
        shift: fraction of the side a shift moves the image; default 0.05.

    Attributes:
        calls: how many times the inner engine was called.
    """

    def __init__(self, inner: ForwardEngine, variants: Sequence[str] = ("identity",), shift: float = 0.05):
        if not variants:
            raise ValueError("TTAEngine needs at least one variant")
        for variant in variants:
            transform_batch(np.zeros((1, 2, 2, 3), dtype="uint8"), variant, shift)  # fails on an unknown name
        self.inner, self.variants, self.shift = inner, tuple(variants), shift
        self.name = inner.name
        self.calls = 0

    def predict(self, batch: np.ndarray) -> np.ndarray:
        batch = np.asarray(batch)
        count = len(batch)
        expanded = np.concatenate([transform_batch(batch, variant, self.shift) for variant in self.variants])
        self.calls += 1
        outputs = np.asarray(self.inner.predict(np.ascontiguousarray(expanded)), dtype="float32")
        # Variant-major: rows [v * B, (v + 1) * B) are variant v of the batch.
        return outputs.reshape(len(self.variants), count, *outputs.shape[1:]).mean(axis=0)

    def __repr__(self) -> str:
        return f"<TTAEngine {', '.join(self.variants)} over {self.inner!r}>"


def tta_engine(run, engine: str = "auto", precision: str = "auto", variants: Sequence[str] | None = None,
               images: int = 0) -> TTAEngine:
    """The TTA engine for a loaded run, over its inference engine.

    Args:
        run: a ``Run`` with its model.
        engine: "auto", "keras" or "openvino"; default "auto" (see ``inference_engine``).
        precision: the engine's precision; default "auto".
        variants: the variants to use; default the run recipe's (``tta_variants``).
        images: how many images it will be given (each runs once per variant: int8 may be
            worth it, ``inference.predict.int8_samples_for``); default 0.

    Returns:
        A ``TTAEngine`` taking uint8 (B, S, S, 3) batches.
    """
    from transferkit.inference.int8 import forward_engine
    from transferkit.inference.openvino import claim_engine_cache
    from transferkit.inference.predict import int8_samples_for

    variants = variants if variants is not None else tta_variants(run.recipe)
    inner = forward_engine(run.model, engine, run.image_size, cache_dir=claim_engine_cache(run.path),
                           precision=precision, input_dtype="uint8",
                           int8_samples=int8_samples_for(run, precision, images * (1 + len(variants))))
    return TTAEngine(inner, variants, tta_shift(run.recipe))
