"""The classifier's outputs and its backbone embedding from one forward pass.

An image's embedding is the backbone's feature maps averaged over height and width (global
average pooling: what the head's "pool" layer computes with ``head.pooling = "avg"``). The
rejection score "knn" reads it (``inference.uncertainty``). ``EmbeddingEngine`` runs the body
(preprocessing + backbone) once, the head on its feature maps, and appends columns computed
from the embedding to the head's outputs, so that predict's stream of (B, columns) arrays,
its near-tie second look and its memory (a few columns per image, not the embedding) stay as
they are:

    engine = embedding_engine(run.model, "auto", image_size=run.image_size, input_dtype="uint8",
                              columns=lambda embeddings: rule.scores(None, embeddings)[:, None])
    outputs = engine.predict(images)      # (B, head units + 1): the outputs, then the score

``KerasEmbedding`` gives the outputs and the embedding itself by calling the Keras model
directly: for a few images, cheaper than building an engine.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np

from transferkit.inference.engines import (
    ForwardEngine,
    OpenVINOEngine,
    TwoLookEngine,
    body_and_head,
    inference_engine,
    make_engine,
)


def pooled(feature_maps: np.ndarray) -> np.ndarray:
    """(B, d) embeddings from (B, H, W, d) feature maps (their mean over H and W), float32."""
    maps = np.asarray(feature_maps, dtype="float32")
    return maps.mean(axis=(1, 2)) if maps.ndim == 4 else maps.reshape(len(maps), -1)


class EmbeddingEngine(TwoLookEngine):
    """A classifier's outputs followed by columns computed from its backbone embedding.

    Attributes:
        body, head: the engines of the two parts (``engines.body_and_head``).
        units: how many of the output columns are the head's (1 for a sigmoid unit).
        refined: how many images were computed again in float32 (near ties of a 16-bit body,
            as ``TwoLookEngine`` looks at them).
    """

    def __init__(self, body: ForwardEngine, head: ForwardEngine, units: int,
                 columns: Callable[[np.ndarray], np.ndarray] | None = None, exact_factory=None):
        super().__init__(exact_factory)
        self.body, self.head, self.units = body, head, units
        self.columns = columns
        self.name = body.name

    def first_look(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The outputs with their columns and, with a 16-bit body and "auto" precision, the
        near ties to compute again in float32 (``inference.predict.engine_outputs`` gathers
        them across batches)."""
        maps = self.body.predict(batch)
        outputs = np.asarray(self.head.predict(maps), dtype="float32")
        embeddings = pooled(maps)
        extra = embeddings if self.columns is None else np.asarray(self.columns(embeddings), dtype="float32")
        combined = np.concatenate([outputs, extra.reshape(len(outputs), -1)], axis=1)
        return combined, self.near_ties(combined, outputs)

    def __repr__(self) -> str:
        return f"<EmbeddingEngine body={self.body!r} head={self.head!r}, refined={self.refined}>"


def embedding_engine(model, engine: str = "auto", image_size: int | None = None,
                     cache_dir: str | os.PathLike | None = None, precision: str = "auto",
                     input_dtype: str = "float32",
                     columns: Callable[[np.ndarray], np.ndarray] | None = None) -> EmbeddingEngine:
    """An ``EmbeddingEngine`` for a transferkit classifier, its parts built as
    ``inference_engine`` builds them (frozen BatchNorm folded; the body in the precision asked
    for, the head in float32 on OpenVINO; with "auto" in 16 bits, near ties again in float32).

    Args:
        model: a classifier from ``build_classifier`` (or a loaded run's model).
        engine: "auto", "keras" or "openvino"; default "auto".
        image_size: the side of the square batches; default the model's own.
        cache_dir: where converted networks are cached; default None.
        precision: "auto", "float32", "bfloat16" or "float16"; default "auto".
        input_dtype: "float32" or "uint8" (images as decoded); default "float32".
        columns: embeddings (B, d) -> the columns to append (B, c); default None (the
            embeddings themselves).

    Returns:
        The engine.

    Raises:
        ValueError: the model is not a transferkit classifier.
    """
    from transferkit.model.fold import batchnorm_count, fold_batchnorm

    if batchnorm_count(model):
        model = fold_batchnorm(model, fold_trainable=True)
    parts = body_and_head(model)
    if parts is None:
        raise ValueError(f"{model.name} is not a transferkit classifier (image -> preprocessing -> backbone -> head)")
    body, head = parts
    body_engine = inference_engine(body, engine, image_size, cache_dir=cache_dir, precision=precision,
                                   input_dtype=input_dtype)
    on_openvino = isinstance(body_engine, OpenVINOEngine)
    head_engine = (make_engine(head, "openvino", cache_dir=cache_dir, precision="float32") if on_openvino
                   else inference_engine(head, "keras", precision=precision))
    units = int(head.output_shape[-1])
    exact = None
    if on_openvino and precision == "auto" and body_engine.precision_hint != "f32":

        def exact():
            return embedding_engine(model, engine, image_size, cache_dir, "float32", input_dtype, columns)

    return EmbeddingEngine(body_engine, head_engine, units, columns, exact)


class KerasEmbedding(ForwardEngine):
    """A classifier's outputs followed by its backbone embedding, by calling the Keras model
    directly (eagerly): for a few images, cheaper than building an engine (no BatchNorm fold,
    no tracing, no conversion).

    Attributes:
        units: how many of the output columns are the head's (1 for a sigmoid unit).
    """

    name = "keras"
    fixed_batches = False  # called eagerly: nothing is traced

    def __init__(self, model):
        import keras

        image = keras.Input(shape=(None, None, 3))
        maps = model.get_layer("backbone")(model.get_layer("preprocessing")(image))
        self.both = keras.Model(image, [model.get_layer("head")(maps), keras.ops.mean(maps, axis=(1, 2))])
        self.units = int(model.output_shape[-1])

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import keras

        outputs, embeddings = (keras.ops.convert_to_numpy(part)  # from any backend's tensors (PyTorch's too)
                               for part in self.both(np.asarray(batch, dtype="float32"), training=False))
        return np.concatenate([np.asarray(outputs, dtype="float32"), np.asarray(embeddings, dtype="float32")], axis=1)
