"""The forward passes of the work after training: ONE engine of the trained, calibrated
classifier, shared by the TTA choice (``evaluation.tta.fit_tta``) and the rejection fit
(``trust.rejection.fit_rejection``), the validation images' plain pass computed once for both
(or none: in float32, the run's one readout of the validation images stands for it). Where
the last stage trained on int8 features, the TTA variants and the knn reference images go
through a second one, ``ForwardPasses.approximate`` (the int8 frozen part, ``FrozenThenTop``),
checked against float32 on first use. Where the last stage trained on cached features, the
knn reference images take its stored features through the layers above them instead
(``ForwardPasses.stored``).

    forward = ForwardPasses(model, 64, validation=prepared.val_images, image_passes=3000,
                            run_path=output)
    forward.validation_outputs()                   # once: (n, units + d), outputs then embedding
    forward.variant_outputs(images, expand, 5)     # (5, n, units + d): every engine call batch_size images
    forward.reference_outputs(prepared.train_images, rows)   # the knn score's reference images

The engine is built on first use: from ``ENGINE_FROM`` image passes on, ``embedding_engine``
(OpenVINO where the recipe's engine, or "auto", picks it, in the recipe's precision, as
``predict --reject`` builds it), its networks written to the run's engine cache folder, so
that the first ``predict --reject`` of the run (and, in 16 bits, any predict: the same body
and head networks) neither converts nor compiles; below it, the Keras model called eagerly
(``KerasEmbedding``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.inference.embedding import KerasEmbedding, embedding_engine
from transferkit.outputs import class_probabilities

log = logging.getLogger("transferkit")

# Below this many image passes the Keras model is called eagerly: building an engine (folding
# BatchNorm, converting and compiling for OpenVINO) costs seconds, which pays off only over a
# few hundred images (benchmarks/after_training.py).
ENGINE_FROM = 256
# The Keras model called eagerly traces nothing, so its batches need no fixed size: it takes
# the images in calls of up to this many pixels (times the variants; at least ``batch_size``
# images), each call's Python overhead (a layer at a time: half a second for ResNet50) paid
# once for many images rather than once per batch.
EAGER_PIXELS = 2**21
# The approximate passes (``ForwardPasses.approximate``) are checked on their first use: on up
# to a batch of validation images, their class probabilities may differ from the float32
# passes' by at most this much on average (absolute); else their work runs on the float32
# passes, with a one-line notice. int8's rounding of the frozen features moved them by 0.01 to
# 0.03 on the suite's random-weight VGG16; a network computing something else moves them more.
APPROXIMATE_TOLERANCE = 0.05


def eager_call_size(batch_size: int, pixels: int) -> int:
    """Images per call of a model called eagerly: as many as ``EAGER_PIXELS`` allows for
    images (with their variants) of ``pixels`` pixels each, at least ``batch_size``."""
    return max(batch_size, EAGER_PIXELS // pixels)


def forward_outputs(engine, images: np.ndarray, batch_size: int = 32, rows: np.ndarray | None = None) -> np.ndarray:
    """An engine's outputs over images, batch by batch, concatenated (float32).

    For an engine with ``fixed_batches``, every batch has ``batch_size`` rows (the last one
    padded with copies of its first image, whose outputs are dropped): a Keras engine then
    traces its function once.

    Args:
        engine: a ``ForwardEngine``.
        images: (n, S, S, 3) images (a memory-mapped array is read a batch at a time).
        batch_size: images per pass; default 32.
        rows: which images, in this order; default None (all).

    Returns:
        The outputs, one row per image.
    """
    chunks = []
    count = len(images) if rows is None else len(rows)
    for start in range(0, count, batch_size):
        chosen = slice(start, start + batch_size) if rows is None else rows[start : start + batch_size]
        batch = np.asarray(images[chosen])
        batch_in = _padded(batch, batch_size) if engine.fixed_batches else batch
        chunks.append(np.asarray(engine.predict(batch_in), dtype="float32")[: len(batch)])
    return np.concatenate(chunks) if chunks else np.zeros((0, 1), dtype="float32")


def _padded(batch: np.ndarray, batch_size: int) -> np.ndarray:
    """The batch topped up to ``batch_size`` rows with copies of its first image."""
    return np.concatenate([batch, np.repeat(batch[:1], batch_size - len(batch), axis=0)])


class ForwardPasses:
    """A trained classifier's outputs and backbone embeddings over the images of the work
    after training, from one engine built on first use.

    Args:
        model: the trained, calibrated classifier (image -> preprocessing -> backbone -> head).
        image_size: the side of the images.
        validation: the validation images, uint8 (n, S, S, 3); default None (none).
        image_passes: how many image passes the work will take in all (each variant of an
            image counts once): an engine from ``ENGINE_FROM`` on, else Keras eagerly; default 0.
        engine: "auto", "keras" or "openvino" (``embedding_engine``); default "auto".
        precision: the engine's precision; default "auto".
        batch_size: images per engine call (times the variants in ``variant_outputs``); the
            eager Keras model takes more (``EAGER_PIXELS``); default 32.
        run_path: the run folder whose engine cache keeps the converted networks (claimed
            when the engine is built); default None (converted in memory, kept nowhere).
        known_validation: the validation images' ``outputs``, already computed as this
            engine computes them (in float32: from the run's readout of the validation images,
            ``trust.record.after_training_forward``); default None (one pass computes them).
        engine_factory: builds the engine (on first use) instead of ``embedding_engine``,
            with the same outputs (the head's, then the embedding); default None.

    Attributes:
        units: how many output columns are the head's (1 for a sigmoid unit); the backbone
            embedding follows.
        approximate: the ``ForwardPasses`` for the work that int8's rounding of the frozen
            features does not bias (the TTA choice's variants and "identity", compared with
            each other; the knn score's reference images): these, or passes of their own
            (the frozen part's int8 network where the last stage trained on its features,
            ``trust.record.after_training_forward``), checked on first use against these
            (``APPROXIMATE_TOLERANCE``): these where they fall short.
        approximate_check: that check's figures (images, difference, tolerance, passed), or
            None where it did not run.
        stored: the knn reference images' stored features (``StoredReference``), or None.
        reference_from: where ``reference_outputs`` took them from: "stored", "approximate"
            (on passes of their own) or "these"; None before.
        builds: how many engines were built (at most one).
        validation_passes: how many times the validation images went through it (at most
            one; none when they were known).
    """

    def __init__(self, model, image_size: int, *, validation: np.ndarray | None = None, image_passes: int = 0,
                 engine: str = "auto", precision: str = "auto", batch_size: int = 32,
                 run_path: str | os.PathLike | None = None, known_validation: np.ndarray | None = None,
                 engine_factory: Callable[[], object] | None = None):
        self.model, self.image_size, self.validation = model, image_size, validation
        self.engine_factory, self.approximate = engine_factory, self
        self.approximate_check = None
        self.stored: StoredReference | None = None
        self.reference_from: str | None = None
        self.image_passes, self.engine_choice, self.precision = image_passes, engine, precision
        self.batch_size, self.run_path = batch_size, run_path
        self.units = int(model.output_shape[-1])
        self.builds = self.validation_passes = 0
        self._engine = None
        self._validation_outputs = None if known_validation is None else np.asarray(known_validation, "float32")

    @property
    def engine(self):
        """The engine (built on first use): an ``EmbeddingEngine`` or a ``KerasEmbedding``."""
        if self._engine is None:
            self.builds += 1
            if self.engine_factory is not None:
                self._engine = self.engine_factory()
            elif self.image_passes >= ENGINE_FROM:
                self._engine = embedding_engine(self.model, self.engine_choice, self.image_size,
                                                cache_dir=self._cache_dir(), precision=self.precision,
                                                input_dtype="uint8")
            else:
                self._engine = KerasEmbedding(self.model)
            log.debug("the work after training: %d image passes on %r", self.image_passes, self._engine)
        return self._engine

    @property
    def approximate(self) -> ForwardPasses:
        if self._approximate is not self and self.approximate_check is None:
            self.approximate_check = self._check_approximate()
            if not self.approximate_check["passed"]:
                log.warning(f"the int8 frozen part's class probabilities differ from float32's by "
                            f"{self.approximate_check['difference']:.3f} on average on "
                            f"{self.approximate_check['images']} validation images (more than "
                            f"{APPROXIMATE_TOLERANCE:g}): the TTA choice and the knn reference run in float32")
                self._approximate = self
        return self._approximate

    @approximate.setter
    def approximate(self, passes: ForwardPasses) -> None:
        self._approximate, self.approximate_check = passes, None

    def _check_approximate(self) -> dict:
        """The approximate passes' class probabilities against these ones' on the first
        ``batch_size`` validation images (``validation_outputs``: the rejection fit reads
        them all in any case; known ones cost nothing)."""
        count = 0 if self.validation is None else min(len(self.validation), self.batch_size)
        if not count:
            return {"images": 0, "difference": 0.0, "tolerance": APPROXIMATE_TOLERANCE, "passed": True}
        exact = self.validation_outputs()[:count]
        got = self._approximate.outputs(np.asarray(self.validation[:count]))
        difference = float(np.mean(np.abs(class_probabilities(got[:, : self.units])
                                          - class_probabilities(exact[:, : self.units]))))
        log.debug("the approximate passes against float32 on %d validation images: %.4f", count, difference)
        return {"images": count, "difference": difference, "tolerance": APPROXIMATE_TOLERANCE,
                "passed": difference <= APPROXIMATE_TOLERANCE}

    @property
    def engine_name(self) -> str:
        """"openvino" or "keras"."""
        return self.engine.name

    def _cache_dir(self) -> Path | None:
        from transferkit.inference.openvino import claim_engine_cache

        return None if self.run_path is None else claim_engine_cache(self.run_path)

    def outputs(self, images: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """(n, units + d) float32: the head's outputs, then the embedding, of images (or of
        their ``rows``, in that order)."""
        return forward_outputs(self.engine, images, self._call_size(), rows)

    def reference_outputs(self, images: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """``outputs`` of the knn score's reference images (or of their ``rows``): from their
        stored features through the layers above them where given (``stored``; int8's unless
        the ``approximate`` passes, through the same layers, failed their check), else on the
        ``approximate`` passes over the images."""
        approximate = self.approximate  # checked on first use, where there are such passes
        failed = self.approximate_check is not None and not self.approximate_check["passed"]
        if self.stored is not None and not (self.stored.int8 and failed):
            self.reference_from = "stored"
            return self.stored.passes.outputs(self.stored.features, rows)
        self.reference_from = "these" if approximate is self else "approximate"
        return approximate.outputs(images, rows)

    def validation_outputs(self) -> np.ndarray:
        """``outputs`` of the validation images, computed on the first call only."""
        if self._validation_outputs is None:
            if self.validation is None:
                raise ValueError("these ForwardPasses were given no validation images")
            self.validation_passes += 1
            self._validation_outputs = self.outputs(self.validation)
        return self._validation_outputs

    def variant_outputs(self, images: np.ndarray, expand: Callable[[np.ndarray], np.ndarray],
                        variants: int) -> np.ndarray:
        """The outputs of variants of the images: each batch's variants made at once, then one
        engine call per variant for an engine of fixed batches (all calls ``batch_size``
        images), or one call for all of them for the eager Keras model.

        Args:
            images: (n, S, S, 3) images, read a call's worth at a time.
            expand: a (B, S, S, 3) batch -> its ``variants`` variants stacked variant-major
                (rows [v * B, (v + 1) * B) are variant v), as ``evaluation.tta.TTAEngine`` does.
            variants: how many variants ``expand`` makes.

        Returns:
            (variants, n, units + d) float32.
        """
        chunks = []
        size = self._call_size(variants)
        for start in range(0, len(images), size):
            batch = np.asarray(images[start : start + size])
            if self.engine.fixed_batches:
                # One call per variant, each of ``batch_size`` images: every call the same
                # shape (an engine that compiled for one batch size is never asked another).
                expanded = expand(_padded(batch, size))
                outputs = np.concatenate([np.asarray(self.engine.predict(np.ascontiguousarray(part)), "float32")
                                          for part in np.split(expanded, variants)])
                chunks.append(outputs.reshape(variants, size, -1)[:, : len(batch)])
            else:
                outputs = np.asarray(self.engine.predict(np.ascontiguousarray(expand(batch))), dtype="float32")
                chunks.append(outputs.reshape(variants, len(batch), -1))
        if not chunks:
            return np.zeros((variants, 0, self.units), dtype="float32")
        return np.concatenate(chunks, axis=1)

    def _call_size(self, variants: int = 1) -> int:
        """Images per engine call: ``batch_size``, or for an engine without fixed batches (the
        eager Keras model) as many as ``EAGER_PIXELS`` allows (each with its variants), at
        least ``batch_size``."""
        if self.engine.fixed_batches:
            return self.batch_size
        return eager_call_size(self.batch_size, self.image_size * self.image_size * variants)

    def probabilities(self, outputs: np.ndarray) -> np.ndarray:
        """(..., k) float64 class probabilities from ``outputs`` (a sigmoid unit p as [1 - p, p])."""
        return class_probabilities(np.asarray(outputs)[..., : self.units])


class FrozenThenTop:
    """Images -> a frozen part's int8 network (``training.features.Int8Origin``: the one that
    computed the last stage's training features, checked and guarded) -> the backbone's blocks
    above it in float32: the backbone's feature maps, with its frozen part in int8 (the body of
    an ``inference.embedding.EmbeddingEngine``). Without a frozen part, its batches are the
    frozen part's features already (stored ones: ``StoredReference``).

    Args:
        frozen: has ``features(batch)``, the frozen part's features of uint8 images; or None.
        top: a ``ForwardEngine`` of the blocks above (features -> the backbone's feature
            maps), or None where the frozen part is the whole backbone.
    """

    name = "openvino"
    fixed_batches = True

    def __init__(self, frozen, top=None):
        self.frozen, self.top = frozen, top

    def predict(self, batch: np.ndarray) -> np.ndarray:
        features = np.asarray(batch, "float32") if self.frozen is None else self.frozen.features(batch)
        return features if self.top is None else self.top.predict(features)

    def __repr__(self) -> str:
        part = "stored features" if self.frozen is None else "int8 frozen part"
        return f"<FrozenThenTop {part}, top={self.top!r}>"


@dataclass(frozen=True)
class StoredReference:
    """The knn score's reference images as the last stage's stored training features
    (``training.features.CachedReference``), with the passes of the layers above them.

    Attributes:
        features: (n, *shape), row i the i-th training image's.
        passes: ``ForwardPasses`` whose engine takes those features (``FrozenThenTop``
            without a frozen part).
        int8: whether an int8 network computed them.
    """

    features: np.ndarray
    passes: ForwardPasses
    int8: bool
