"""Numbers that say how good a classifier is on labelled images, from its probabilities.

Everything scikit-learn has is computed by scikit-learn, with ``labels=range(k)`` so that a
class the run knows but the images lack is reported (support 0, listed as absent) instead of
shifting the others. Expected calibration error (ECE) is computed here: scikit-learn has
none. No Keras import.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from transferkit.outputs import class_probabilities, is_binary

ECE_BINS = 15
# The decision threshold of a sigmoid unit (outputs.predicted_labels: p >= 0.5 is the second class).
THRESHOLD = 0.5


@dataclass(frozen=True)
class ReliabilityBin:
    """One equal-width confidence bin of the reliability diagram.

    Attributes:
        lower, upper: the bin's confidence range (lower < confidence <= upper; the first bin
            includes 0).
        count: images whose confidence falls in it.
        confidence: their mean confidence (None when empty).
        accuracy: the share of them predicted right (None when empty).
    """

    lower: float
    upper: float
    count: int
    confidence: float | None
    accuracy: float | None


def predictions(probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Predicted class and its probability per row of (n, k) probabilities (two classes:
    the second when its probability is at least ``THRESHOLD``, as the sigmoid rule says)."""
    probabilities = np.asarray(probabilities, dtype="float64")
    if probabilities.shape[1] == 2:
        predicted = (probabilities[:, 1] >= THRESHOLD).astype("int64")
    else:
        predicted = np.argmax(probabilities, axis=1)
    return predicted, probabilities[np.arange(len(predicted)), predicted]


def expected_calibration_error(
    true: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS
) -> tuple[float, list[ReliabilityBin]]:
    """ECE: the count-weighted mean gap between confidence and accuracy over equal-width bins.

    Args:
        true: class index per image.
        probabilities: (n, k) class probabilities, or a sigmoid unit's (n, 1) outputs.
        bins: how many equal-width confidence bins in [0, 1]; default 15.

    Returns:
        (ECE, one ``ReliabilityBin`` per bin, lowest first). ECE is NaN for no images.
    """
    probabilities = class_probabilities(probabilities)
    true = np.asarray(true, dtype="int64")
    predicted, confidence = predictions(probabilities)
    correct = predicted == true
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds edges[i] < confidence <= edges[i + 1]; a confidence of 0 goes to the first.
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    table: list[ReliabilityBin] = []
    gap = 0.0
    for i in range(bins):
        members = index == i
        count = int(members.sum())
        if count:
            mean_confidence = float(confidence[members].mean())
            accuracy = float(correct[members].mean())
            gap += count * abs(accuracy - mean_confidence)
            table.append(ReliabilityBin(float(edges[i]), float(edges[i + 1]), count, mean_confidence, accuracy))
        else:
            table.append(ReliabilityBin(float(edges[i]), float(edges[i + 1]), 0, None, None))
    return (gap / len(true) if len(true) else math.nan), table


def classification_metrics(
    true: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str]
) -> dict:
    """Every figure of metrics.json for labelled images.

    Args:
        true: class index per image (into ``class_names``).
        probabilities: (n, k) class probabilities, or a sigmoid unit's (n, 1) outputs.
        class_names: the run's classes, in output order.

    Returns:
        A JSON-ready dict: n_images, accuracy, balanced_accuracy, top5_accuracy (more than 5
        classes), log_loss, ece (15 bins) with its reliability bins, brier, per_class
        (precision, recall, f1, support; None where undefined), macro_avg and weighted_avg
        (over the classes present), confusion_matrix (rows true), present and absent classes;
        for two classes also roc_auc and average_precision (of the second class, None when
        one class is absent) and the threshold.

    Raises:
        ValueError: no images, or probabilities that do not match the classes.
    """
    from sklearn import metrics as sk

    probabilities = class_probabilities(probabilities)
    true = np.asarray(true, dtype="int64")
    k = len(class_names)
    if len(true) == 0:
        raise ValueError("no images to compute metrics on")
    if probabilities.shape != (len(true), k):
        raise ValueError(f"probabilities of shape {probabilities.shape} for {len(true)} images and {k} classes")
    # float32 outputs sum to 1 only up to rounding; scikit-learn checks that they do.
    probabilities = probabilities / probabilities.sum(axis=1, keepdims=True)
    labels = list(range(k))
    predicted, _ = predictions(probabilities)
    present = sorted(set(true.tolist()))
    ece, table = expected_calibration_error(true, probabilities)
    with warnings.catch_warnings():
        # Absent classes make some scores undefined; they are reported as None instead.
        warnings.simplefilter("ignore")
        precision, recall, f1, support = sk.precision_recall_fscore_support(
            true, predicted, labels=labels, zero_division=np.nan
        )
        averages = {
            average: sk.precision_recall_fscore_support(true, predicted, labels=present, average=average,
                                                        zero_division=0)[:3]
            for average in ("macro", "weighted")
        }
        result = {
            "n_images": int(len(true)),
            "class_names": list(class_names),
            "accuracy": float(sk.accuracy_score(true, predicted)),
            "balanced_accuracy": float(sk.balanced_accuracy_score(true, predicted)),
            "log_loss": float(sk.log_loss(true, probabilities, labels=labels)),
            "ece": float(ece),
            "ece_bins": ECE_BINS,
            "reliability": [bin_.__dict__ for bin_ in table],
            # Two classes: the usual binary Brier score of the second class; more: the sum
            # over classes of the squared gap to the one-hot, averaged over images.
            "brier": float(sk.brier_score_loss(true, probabilities if k > 2 else probabilities[:, 1],
                                               labels=labels)),
        }
        if k > 5:
            result["top5_accuracy"] = float(sk.top_k_accuracy_score(true, probabilities, k=5, labels=labels))
        if is_binary(k):
            both = len(present) == 2
            result["threshold"] = THRESHOLD
            result["positive_class"] = class_names[1]
            result["roc_auc"] = float(sk.roc_auc_score(true, probabilities[:, 1])) if both else None
            result["average_precision"] = (
                float(sk.average_precision_score(true, probabilities[:, 1])) if both else None
            )
    result["per_class"] = {
        name: {"precision": _number(precision[i]), "recall": _number(recall[i]), "f1": _number(f1[i]),
               "support": int(support[i])}
        for i, name in enumerate(class_names)
    }
    for average, (p, r, f) in averages.items():
        result[f"{average}_avg"] = {"precision": float(p), "recall": float(r), "f1": float(f)}
    result["confusion_matrix"] = sk.confusion_matrix(true, predicted, labels=labels).tolist()
    result["present_classes"] = [class_names[i] for i in present]
    result["absent_classes"] = [name for i, name in enumerate(class_names) if i not in set(present)]
    return result


def _number(value) -> float | None:
    value = float(value)
    return None if math.isnan(value) else value
