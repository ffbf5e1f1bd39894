"""What a run records of its validation split for ``predict --reject`` and ``--sets``: the
rejection threshold (``rejection``) and the prediction-set scores (``conformal``), fitted
once, after calibration, and written into the run folder (labels.json "rejection" and
"prediction_sets", and rejection.npz for the knn score).

    forward = after_training_forward(model, prepared, recipe, run_path=output)  # shared with fit_tta
    record = fit_trust(model, prepared, recipe, forward=forward)
    extra.update(record.labels_entries()); record.write_files(folder)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np

from transferkit.evaluation.calibration import logits_from, probabilities_from_logits
from transferkit.evaluation.tta import judged_passes
from transferkit.inference.embedding import EmbeddingEngine
from transferkit.inference.openvino import precision_hint
from transferkit.inference.passes import ForwardPasses, FrozenThenTop, StoredReference
from transferkit.inference.uncertainty import write_reference
from transferkit.model.surgery import compute_dtype
from transferkit.recipe import Recipe
from transferkit.training.stages import ValidationReadout
from transferkit.trust.conformal import fit_prediction_sets
from transferkit.trust.rejection import RejectionFit, fit_rejection, image_passes, reference_passes

log = logging.getLogger("transferkit")

# labels.json "rejection" "reference_passes" where the knn reference images went through the
# int8 frozen part (``after_training_forward``), or took the last stage's stored features
# through the layers above them; absent where the whole network computed them.
INT8_REFERENCE = "the frozen part in int8, the layers above it in float32"
STORED_REFERENCE = "the last stage's stored features, the layers above them in float32"
REFERENCE_PASSES = {"approximate": INT8_REFERENCE, "stored": STORED_REFERENCE}


@dataclass(frozen=True)
class TrustRecord:
    """The fitted rejection threshold and prediction-set scores of a run.

    Attributes:
        rejection: the ``RejectionFit`` (its ``record`` is labels.json "rejection").
        prediction_sets: labels.json "prediction_sets".
    """

    rejection: RejectionFit
    prediction_sets: dict

    def labels_entries(self) -> dict:
        """{"rejection": ..., "prediction_sets": ...} for labels.json."""
        return {"rejection": self.rejection.record, "prediction_sets": self.prediction_sets}

    def write_files(self, folder: str | os.PathLike) -> None:
        """Write rejection.npz (the knn score's training embeddings) into the run folder."""
        if self.rejection.reference is not None:
            write_reference(folder, self.rejection.reference)


def after_training_forward(model, prepared, recipe: Recipe, run_path: str | os.PathLike | None = None,
                           readout: ValidationReadout | None = None, int8_frozen=None,
                           reference=None) -> ForwardPasses:
    """The one forward engine of the work after training, shared by ``evaluation.tta.fit_tta``
    and ``fit_trust`` (built on first use: an engine when their image passes together reach
    ``inference.passes.ENGINE_FROM``).

    Args:
        model: the trained, calibrated classifier.
        prepared: the run's ``PreparedData``.
        recipe: the run's recipe (image size, batch size, engine, precision, tta, reject).
        run_path: the run folder being written: the converted networks go to its engine
            cache, where its first ``predict`` finds them; default None (kept nowhere).
        readout: the run's ``training.stages.ValidationReadout`` of the validation images
            (the last stage's on cached features, or the model's one pass), or None. Where it
            and the engine are both float32 (``known_validation``), it stands for the
            validation images' plain pass; in 16 bits the pass runs, so that the TTA
            choice compares every variant with "identity" computed by one engine.
        int8_frozen: where the last stage trained on int8 features, their
            ``training.features.Int8Origin`` (``StagesResult.int8_frozen``): the TTA choice's
            variants and "identity", and the knn score's reference images, then go through
            that int8 network and the layers above it in float32 (``FrozenThenTop``; about
            half a float32 pass, with nothing to quantize or check again), on passes of their
            own (``ForwardPasses.approximate``). The validation images' pass that sets the
            rejection threshold stays float32, as ``predict --reject`` embeds. Default None.
        reference: where the last stage trained on cached features, its stored training
            features (``training.features.CachedReference``, ``StagesResult.reference``): the
            knn score's reference images then take only the layers above them, in float32
            (``ForwardPasses.stored``); default None (the images go through the network).

    Returns:
        A ``ForwardPasses`` over the validation images.
    """
    known = known_validation(model, recipe, readout)
    judged = judged_passes(prepared, recipe)
    on_openvino = recipe.engine != "keras"
    reference_count = reference_passes(prepared, recipe.reject)
    stored = (reference is not None and reference_count > 0 and on_openvino
              and len(reference.features) == len(prepared.train_images))
    references = 0 if stored else reference_count  # the reference images that go through a network
    through_int8 = int8_frozen is not None and judged + references > 0 and on_openvino
    passes = (_trust_passes(prepared, recipe) - (len(prepared.val_images) if known is not None else 0)
              - (reference_count - references) - (judged + references if through_int8 else 0))
    forward = ForwardPasses(model, recipe.image_size, validation=prepared.val_images, image_passes=passes,
                            engine=recipe.engine, precision=recipe.precision, batch_size=recipe.batch_size,
                            run_path=run_path, known_validation=known)
    top = _LayersAbove(model, recipe)
    if through_int8:
        forward.approximate = ForwardPasses(
            model, recipe.image_size, validation=prepared.val_images,
            image_passes=judged + (len(prepared.val_images) if judged else 0) + references,
            batch_size=recipe.batch_size, engine_factory=lambda: top.engine(int8_frozen.first_open, int8_frozen))
    if stored:
        passes_above = ForwardPasses(model, recipe.image_size, image_passes=reference_count,
                                     batch_size=recipe.batch_size,
                                     engine_factory=lambda: top.engine(reference.first_open))
        forward.stored = StoredReference(reference.features, passes_above, reference.int8)
    return forward


class _LayersAbove:
    """The float32 engines of the backbone's blocks above a boundary and of the head (the
    trained, calibrated layers), built on first use, once for the approximate passes and the
    stored reference features: OpenVINO's, converted in memory (no later command runs them
    alone), as the recipe's engine picks it on the TensorFlow backend (the others would
    convert in a child process: Keras's own there)."""

    def __init__(self, model, recipe: Recipe):
        self.model, self.recipe = model, recipe
        self._engines: dict[int, tuple] = {}

    def engine(self, first_open: int, int8_frozen=None) -> EmbeddingEngine:
        """Images through ``int8_frozen`` (``training.features.Int8Origin``), or without it the
        features at ``first_open`` as they come, then the layers above, giving the outputs and
        the embedding."""
        if first_open not in self._engines:
            self._engines[first_open] = self._convert(first_open)
        blocks, head = self._engines[first_open]
        if int8_frozen is None:
            log.info("the knn score's reference images: the last stage's stored features, the layers above them "
                     "in float32")
            return EmbeddingEngine(FrozenThenTop(None, blocks), head, int(self.model.output_shape[-1]))
        log.info("the TTA choice's variants and the knn score's reference images: the frozen part in int8 (%s), "
                 "the layers above it in float32", int8_frozen.engine.check.describe())
        return EmbeddingEngine(FrozenThenTop(int8_frozen.alone(), blocks), head, int(self.model.output_shape[-1]))

    def _convert(self, first_open: int) -> tuple:
        from transferkit.backbones import get_spec
        from transferkit.backend import active_backend
        from transferkit.inference.engines import make_engine
        from transferkit.model.surgery import trainable_at

        engine = self.recipe.engine if active_backend() == "tensorflow" else "keras"
        spec = get_spec(self.recipe.backbone)
        blocks = None
        if first_open < len(spec.blocks):
            blocks = trainable_at(self.model, spec, first_open)[0].get_layer("open_part")
            blocks = make_engine(blocks, engine, input_shape=tuple(int(d) for d in blocks.input_shape[1:]),
                                 precision="float32")
        head = self.model.get_layer("head")
        return blocks, make_engine(head, engine, input_shape=tuple(int(d) for d in head.input_shape[1:]),
                                   precision="float32")


def known_validation(model, recipe: Recipe, readout: ValidationReadout | None) -> np.ndarray | None:
    """The validation images' ``ForwardPasses.outputs`` (the calibrated model's outputs, then
    the embedding) from the run's readout of them, where both sides compute in float32 (the
    readout always does: validation features are float32's even where int8 computed the
    training views): the model float32, the engine's precision hint f32. Else None. (The
    Dense inputs do not depend on calibration: the calibrated output layer applied to them
    gives the calibrated outputs.)"""
    if readout is None:
        return None
    if compute_dtype(model) != "float32" or precision_hint(recipe.precision) != "f32":
        return None
    logits = logits_from(model, readout.dense_inputs)  # the calibrated output layer's
    probabilities = probabilities_from_logits(logits)
    outputs = probabilities[:, 1:] if logits.shape[1] == 1 else probabilities
    return np.concatenate([outputs, readout.embeddings], axis=1).astype("float32")


def after_training_passes(prepared, recipe: Recipe, with_trust: bool = True) -> int:
    """How many image passes finetune's work after training takes at most (what a time budget
    keeps time for): calibration's pass over the validation images, and, for a run written to
    a folder (``with_trust``), the TTA choice's variants and the rejection fit's passes (the
    validation images' plain pass among them, shared). Where the last stage leaves a readout of
    the validation images (``training.stages.ValidationReadout``), calibration's pass and, in
    float32, the plain one do not run; whether it will is known only once the stages ran (int8
    features may fall short of their guard), so the budget keeps time for them."""
    return len(prepared.val_images) + (_trust_passes(prepared, recipe) if with_trust else 0)


def _trust_passes(prepared, recipe: Recipe) -> int:
    """The image passes of the TTA choice and the rejection fit on their shared engine."""
    return judged_passes(prepared, recipe) + image_passes(prepared, recipe.reject)


def fit_trust(model, prepared, recipe: Recipe, verbose: int = 0, forward: ForwardPasses | None = None) -> TrustRecord:
    """Fit the rejection threshold and the prediction-set scores on the validation split.

    Args:
        model: the trained, calibrated classifier.
        prepared: the run's ``PreparedData``.
        recipe: the run's recipe (``reject``, image size, batch size, engine, precision, seed).
        verbose: 1 logs one line with the threshold; default 0.
        forward: the ``after_training_forward`` passes shared with the TTA choice; default
            None (built for the rejection fit alone).

    Returns:
        A ``TrustRecord``.
    """
    if verbose:
        log.info("fitting the rejection threshold and the prediction sets on the validation split")
    fit = fit_rejection(model, prepared, recipe.reject, image_size=recipe.image_size, batch_size=recipe.batch_size,
                        engine=recipe.engine, precision=recipe.precision, seed=recipe.seed, forward=forward)
    if fit.reference is not None and forward is not None and forward.reference_from in REFERENCE_PASSES:
        fit.record["reference_passes"] = REFERENCE_PASSES[forward.reference_from]
    if forward is not None and forward.approximate_check is not None:
        fit.record["approximate_check"] = forward.approximate_check
    if verbose:
        log.info(f"rejection: {fit.record['score']} score >= {fit.record['threshold']:.4g} keeps "
                 f"{fit.record['validation_coverage']:.1%} of the validation images (reject.coverage "
                 f"{recipe.reject.coverage:g})")
    return TrustRecord(fit, fit_prediction_sets(fit.val_probabilities, prepared.val_labels))
