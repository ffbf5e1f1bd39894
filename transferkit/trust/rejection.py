"""Rejecting images of no known class: the threshold fitted at the end of finetune, and how
well a score tells known from unknown images (AUROC, FPR at 95% TPR, the risk-coverage curve).

    fit = fit_rejection(model, prepared, recipe.reject, image_size=recipe.image_size)
    fit.record        # labels.json "rejection": score, threshold, target and validation coverage
    fit.reference     # the unit-length training embeddings (rejection.npz) for the knn score

The threshold is split-conformal (``inference.uncertainty.keep_threshold``): on images
exchangeable with the validation split it keeps at least ``reject.coverage`` of them. Which
score is the default, and why, is measured by ``benchmarks/rejection.py`` (docs/trust.md, "Know
what the model does not know").
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.inference.passes import ForwardPasses
from transferkit.inference.uncertainty import (
    REFERENCE_FILE,
    SCORES,
    RejectionRule,
    keep_threshold,
    unit_rows,
)
from transferkit.recipe import RejectConfig

log = logging.getLogger("transferkit")

# The knn score compares with at most this many training images (a seeded random choice):
# it bounds rejection.npz (float16) and the work per predicted image.
REFERENCE_LIMIT = 5000
EMBEDDING = "the backbone's feature maps averaged over height and width, L2-normalised"


@dataclass(frozen=True)
class RejectionFit:
    """What ``fit_rejection`` found.

    Attributes:
        record: the labels.json "rejection" entry.
        reference: (m, d) float32 unit-length training embeddings (None for max_probability).
        val_probabilities: (n, k) calibrated class probabilities of the validation images.
        val_scores: their scores.
    """

    record: dict
    reference: np.ndarray | None = field(repr=False)
    val_probabilities: np.ndarray = field(repr=False)
    val_scores: np.ndarray = field(repr=False)


# How far below the validation score it is the threshold is moved (at most; relative for scores
# above 1): predict's engine and precision compute that image's score a little differently.
SCORE_TOLERANCE = 1e-3


def below_the_score(threshold: float, scores: np.ndarray) -> float:
    """The threshold moved a little below the validation score it is (``SCORE_TOLERANCE``,
    relative above 1, or half the gap to the next lower score where that is less), so that
    the image that set it is kept by predict, whose engine computes its score a few 1e-5
    apart, as by the fit: the same validation images are kept.

    Returns:
        The threshold to record.
    """
    lower = scores[scores < threshold]
    step = SCORE_TOLERANCE * max(1.0, abs(threshold))
    if len(lower):
        step = min(step, (threshold - float(lower.max())) / 2)
    return float(threshold - step)


def reference_rows(n_images: int, limit: int | None = None, seed: int = 0) -> np.ndarray:
    """Which training images the knn score compares with: all, or a seeded random ``limit``
    (default ``REFERENCE_LIMIT``) of them, in order."""
    limit = REFERENCE_LIMIT if limit is None else limit
    if n_images <= limit:
        return np.arange(n_images)
    return np.sort(np.random.default_rng(seed).choice(n_images, size=limit, replace=False))


def reference_passes(prepared, config: RejectConfig) -> int:
    """How many reference images (training images, up to ``REFERENCE_LIMIT``) ``fit_rejection``
    runs forward: none for a score that does not read the embedding."""
    return min(len(prepared.train_images), REFERENCE_LIMIT) if SCORES[config.score][1] else 0


def image_passes(prepared, config: RejectConfig) -> int:
    """How many images ``fit_rejection`` runs forward: the validation images, and the
    reference images (``reference_passes``)."""
    return len(prepared.val_images) + reference_passes(prepared, config)


def fit_rejection(model, prepared, config: RejectConfig, *, image_size: int, batch_size: int = 32,
                  engine: str = "auto", precision: str = "auto", seed: int = 0,
                  forward: ForwardPasses | None = None) -> RejectionFit:
    """Fit the rejection threshold on the validation split (after calibration).

    One forward pass over the validation images (calibrated probabilities and backbone
    embeddings) and, for the "knn" score, one over the training images (up to
    ``REFERENCE_LIMIT``, unaugmented) for the reference embeddings
    (``ForwardPasses.reference_outputs``: from the last stage's stored features where kept,
    else on ``forward.approximate``, through the int8 frozen part where the last stage trained
    on int8 features).

    Args:
        model: the trained, calibrated classifier.
        prepared: the run's ``PreparedData`` (train and validation images, uint8).
        config: the recipe's ``reject`` section (coverage, score, neighbours).
        image_size: the side of the prepared images.
        batch_size: images per forward pass; default 32.
        engine: the recipe's engine, used from ``inference.passes.ENGINE_FROM`` image passes on;
            default "auto".
        precision: the recipe's precision; default "auto".
        seed: for the choice of reference images beyond ``REFERENCE_LIMIT``; default 0.
        forward: the ``inference.passes.ForwardPasses`` of ``model`` that the work after
            training shares (over ``prepared``'s validation images, whose outputs it may
            have computed already; ``image_size``, ``batch_size``, ``engine`` and
            ``precision`` are then its own; its ``approximate`` passes compute the reference
            embeddings); default None (built here for these passes).

    Returns:
        A ``RejectionFit``.
    """
    needs_embedding = SCORES[config.score][1]
    passes = image_passes(prepared, config)
    if forward is None:
        forward = ForwardPasses(model, image_size, validation=prepared.val_images, image_passes=passes,
                                engine=engine, precision=precision, batch_size=batch_size)
    log.debug("rejection threshold: forward passes over %d images", passes)
    outputs = forward.validation_outputs()
    probabilities = forward.probabilities(outputs)
    reference = None
    if needs_embedding:
        rows = reference_rows(len(prepared.train_images), seed=seed)
        every = len(rows) == len(prepared.train_images)
        train_outputs = forward.reference_outputs(prepared.train_images, None if every else rows)
        # Stored as float16: compare with what will be read back, so that the threshold fits.
        reference = unit_rows(train_outputs[:, forward.units :]).astype("float16").astype("float32")
    rule = RejectionRule(config.score, -np.inf, config.neighbours, reference, config.coverage)
    scores = rule.scores(probabilities, outputs[:, forward.units :])
    threshold = keep_threshold(scores, config.coverage)
    if not np.isfinite(threshold):
        # Too few validation images for the coverage asked (fewer than 1 / (1 - coverage) - 1):
        # the lowest score, the most that can be kept while still rejecting anything.
        threshold = float(scores.min())
        log.warning("only %d validation images: the rejection threshold is their lowest score, which keeps about "
                    "%.1f%% of new images of known classes, not the %.1f%% asked (reject.coverage); validate on "
                    "more images", len(scores), 100 * len(scores) / (len(scores) + 1), 100 * config.coverage)
    threshold = below_the_score(threshold, scores)
    record = {
        "score": config.score,
        "threshold": float(threshold),
        "target_coverage": float(config.coverage),
        "validation_coverage": float(np.mean(scores >= threshold)),
        "n_validation": int(len(scores)),
    }
    if needs_embedding:
        record.update(neighbours=int(config.neighbours), embedding=EMBEDDING, reference_file=REFERENCE_FILE,
                      n_reference=int(len(reference)))
    return RejectionFit(record, reference, probabilities, scores)


def _auroc(known: np.ndarray, unknown: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    truth = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    return float(roc_auc_score(truth, np.r_[known, unknown]))


def fpr_at_tpr(known: np.ndarray, unknown: np.ndarray, tpr: float = 0.95) -> float:
    """The share of unknown images kept by the highest threshold that keeps at least ``tpr``
    of the known ones (known images are the positives)."""
    from sklearn.metrics import roc_curve

    truth = np.r_[np.ones(len(known)), np.zeros(len(unknown))]
    false_positive, true_positive, _ = roc_curve(truth, np.r_[known, unknown])
    return float(false_positive[np.argmax(true_positive >= tpr - 1e-12)])


def open_set_metrics(known_scores: np.ndarray, unknown_scores: np.ndarray) -> dict:
    """How well scores tell images of known classes (positives) from unknown ones.

    Args:
        known_scores: scores of images of the run's classes.
        unknown_scores: scores of images of no known class.

    Returns:
        {"auroc", "fpr_at_95_tpr"}: the area under the ROC curve (1: every known image
        scores above every unknown one; 0.5: chance) and the share of unknown images kept
        where 95% of the known ones are; None each without images of both kinds.
    """
    known = np.asarray(known_scores, dtype="float64")
    unknown = np.asarray(unknown_scores, dtype="float64")
    if not len(known) or not len(unknown):
        return {"auroc": None, "fpr_at_95_tpr": None}
    return {"auroc": _auroc(known, unknown), "fpr_at_95_tpr": fpr_at_tpr(known, unknown)}


def risk_coverage(scores: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The risk-coverage curve: keeping the images of highest score first, the share of them
    kept (coverage) against the share of the kept ones that are wrong (risk).

    Args:
        scores: one per image, higher: kept first.
        errors: True where the image's answer is wrong (a misclassified known image, or an
            unknown image given a class).

    Returns:
        (coverage, risk), each (n,), coverage rising from 1 / n to 1.
    """
    order = np.argsort(-np.asarray(scores, dtype="float64"), kind="stable")
    wrong = np.asarray(errors, dtype="float64")[order]
    kept = np.arange(1, len(wrong) + 1)
    return kept / max(len(wrong), 1), np.cumsum(wrong) / kept


def area_under_risk_coverage(scores: np.ndarray, errors: np.ndarray) -> float | None:
    """The mean risk over all coverages (AURC; lower is better), None for no images."""
    if not len(scores):
        return None
    return float(np.mean(risk_coverage(scores, errors)[1]))


def plot_risk_coverage(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | os.PathLike,
                       operating_point: tuple[float, float] | None = None, title: str = "risk-coverage") -> Path:
    """risk_coverage.png: for each score, the share of kept images that are wrong against the
    share kept, the run's threshold marked.

    Args:
        curves: score name -> (coverage, risk) from ``risk_coverage``.
        path: the PNG to write.
        operating_point: (coverage, risk) at the run's threshold; default None.
        title: the figure's title.

    Returns:
        The path.
    """
    from matplotlib.figure import Figure

    from transferkit.evaluation.figures import CURVE_SIZE, save_figure

    figure = Figure(figsize=CURVE_SIZE)
    axis = figure.subplots()
    for name, (coverage, risk) in curves.items():
        axis.plot(coverage, risk, label=name)
    if operating_point is not None:
        axis.plot(*operating_point, "o", color="black", label="the run's threshold")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, max([1e-3] + [float(np.max(risk)) for _, risk in curves.values() if len(risk)]) * 1.05)
    axis.set_xlabel("coverage (share of images kept, most familiar first)")
    axis.set_ylabel("risk (share of kept images answered wrongly)")
    axis.set_title(title)
    axis.legend(loc="best", fontsize=8)
    return save_figure(figure, Path(path))


def open_set_report(scores: np.ndarray, probabilities: np.ndarray, known: np.ndarray, errors: np.ndarray,
                    score_name: str) -> dict:
    """evaluate's "open_set" metrics: how the score tells the run's classes from ``unknown/``,
    beside the largest probability.

    Args:
        scores: the score per image.
        probabilities: (n, k) class probabilities.
        known: True for images of the run's classes.
        errors: True where an image's class answer is wrong (unknown images always).
        score_name: the score's name.

    Returns:
        {"score", "auroc", "fpr_at_95_tpr", "aurc", "n_known", "n_unknown"} and, for a score
        other than the largest probability, "max_probability": the same three for it.
    """
    from transferkit.inference.uncertainty import max_probability

    known = np.asarray(known, dtype=bool)
    report = {"score": score_name, **open_set_metrics(scores[known], scores[~known]),
              "aurc": area_under_risk_coverage(scores, errors), "n_known": int(known.sum()),
              "n_unknown": int((~known).sum())}
    if score_name != "max_probability":
        plain = max_probability(probabilities)
        report["max_probability"] = {**open_set_metrics(plain[known], plain[~known]),
                                     "aurc": area_under_risk_coverage(plain, errors)}
    return report


def rejection_report(rule, rejected: np.ndarray, known: np.ndarray, errors: np.ndarray) -> dict:
    """evaluate's "rejection" metrics: what the run's threshold kept and rejected.

    Args:
        rule: the run's ``RejectionRule``.
        rejected: True where an image was labelled unknown.
        known: True for images of the run's classes.
        errors: True where an image's class answer is wrong (unknown images always).

    Returns:
        {"score", "threshold", "target_coverage", "known_kept" (the share of known images
        kept: the coverage), "unknown_rejected" (None without unknown images), "kept_accuracy"
        (of the known images kept), "risk" (the share of kept images answered wrongly)}.
    """
    rejected = np.asarray(rejected, dtype=bool)
    known = np.asarray(known, dtype=bool)
    kept_known = known & ~rejected

    def share(mask: np.ndarray, of: np.ndarray) -> float | None:
        return float(mask[of].mean()) if of.any() else None

    return {
        "score": rule.score,
        "threshold": float(rule.threshold),
        "target_coverage": float(rule.target_coverage),
        "known_kept": share(~rejected, known),
        "unknown_rejected": share(rejected, ~known),
        "kept_accuracy": share(~errors, kept_known),
        "risk": share(errors, ~rejected) if (~rejected).any() else 0.0,
    }
