"""Prediction sets with guaranteed coverage: split conformal prediction with the LAC score.

At the end of finetune each validation image's nonconformity score, 1 - the calibrated
probability of its true class (LAC: "least ambiguous set-valued classifiers", Sadinle, Lei
and Wasserman 2019), is recorded, sorted, in labels.json "prediction_sets". For a coverage
1 - alpha asked at predict time, q is the ceil((n + 1)(1 - alpha))-th smallest of the n
scores, and an image's set is every class whose probability is at least 1 - q (and always
its top class). On images exchangeable with the validation split the set holds the true
class with probability at least 1 - alpha; LAC gives the smallest sets on average of the
sets with that guarantee (APS adapts their size to each image's difficulty, at the price of
larger sets). Applying the sets is ``inference.uncertainty``; this module fits and measures.

    record = fit_prediction_sets(val_probabilities, val_labels)   # labels.json "prediction_sets"
    set_metrics(members, labels)                                  # empirical coverage, mean size
"""

from __future__ import annotations

import numpy as np

from transferkit.inference.uncertainty import SET_METHOD, lac_scores


def fit_prediction_sets(probabilities: np.ndarray, labels: np.ndarray) -> dict:
    """The labels.json "prediction_sets" entry from the validation split.

    Args:
        probabilities: (n, k) calibrated class probabilities of the validation images.
        labels: their true class indices.

    Returns:
        {"method": "LAC", "score": what the scores are, "scores": sorted scores, "n_validation"}.
    """
    scores = np.sort(lac_scores(probabilities, labels))
    return {
        "method": SET_METHOD,
        "score": "1 - the calibrated probability of the true class",
        "scores": [float(score) for score in scores],
        "n_validation": int(len(scores)),
    }


def set_metrics(members: np.ndarray, labels: np.ndarray, coverage: float) -> dict:
    """How prediction sets did on labelled images.

    Args:
        members: (n, k) bool, each image's set.
        labels: the true class indices.
        coverage: the coverage the sets were asked for.

    Returns:
        {"target_coverage", "coverage" (the share of sets holding the true class),
        "mean_size", "size_counts" (set size -> images)}; coverage and mean size are None for
        no images.
    """
    members = np.asarray(members, dtype=bool)
    labels = np.asarray(labels, dtype="int64")
    sizes = members.sum(axis=1)
    counts = np.bincount(sizes, minlength=members.shape[1] + 1) if len(sizes) else np.zeros(1, dtype="int64")
    return {
        "target_coverage": float(coverage),
        "coverage": float(np.mean(members[np.arange(len(labels)), labels])) if len(labels) else None,
        "mean_size": float(np.mean(sizes)) if len(sizes) else None,
        "size_counts": {str(size): int(count) for size, count in enumerate(counts) if count},
    }
