"""The output rule, in one place: two classes get one sigmoid unit, more get a softmax.

Everything that follows from it lives here: the output layer's width and activation, the
loss, the training targets, and how outputs become per-class probabilities and labels.
No Keras import: the data, inference and report layers all use it.
"""

from __future__ import annotations

import numpy as np

# The label of an image of no known class (predict --reject), and the name of evaluate's
# folder of such images: no class may bear it.
UNKNOWN = "unknown"


def is_binary(n_classes: int) -> bool:
    """Whether the classifier has one sigmoid unit (exactly two classes)."""
    return n_classes == 2


def output_units(n_classes: int) -> int:
    """Width of the output layer: 1 for two classes, else one unit per class."""
    return 1 if is_binary(n_classes) else n_classes


def output_activation(n_classes: int) -> str:
    """"sigmoid" for two classes (one unit), "softmax" for more."""
    return "sigmoid" if is_binary(n_classes) else "softmax"


def loss_for(n_classes: int) -> str:
    """Binary cross-entropy for one sigmoid unit, categorical cross-entropy for softmax."""
    return "binary_crossentropy" if is_binary(n_classes) else "categorical_crossentropy"


def encode_targets(labels: np.ndarray, n_classes: int) -> np.ndarray:
    """Targets in the shape the output layer needs: (n, 1) 0/1 for two classes, one-hot else."""
    if is_binary(n_classes):
        return labels.astype("float32").reshape(-1, 1)
    return np.eye(n_classes, dtype="float32")[labels]


def target_labels(targets: np.ndarray) -> np.ndarray:
    """Class indices of targets as ``encode_targets`` makes them (the inverse)."""
    return predicted_labels(targets)


def class_probabilities(outputs: np.ndarray) -> np.ndarray:
    """Per-class probabilities (n, k): a sigmoid unit p becomes [1 - p, p]."""
    outputs = np.asarray(outputs, dtype="float64")
    if outputs.shape[-1] == 1:
        return np.concatenate([1.0 - outputs, outputs], axis=-1)
    return outputs


def predicted_labels(outputs: np.ndarray) -> np.ndarray:
    """Class index per row, for sigmoid (n, 1) or softmax (n, k) outputs (p >= 0.5: the second class)."""
    outputs = np.asarray(outputs)
    if outputs.shape[-1] == 1:
        return (outputs[:, 0] >= 0.5).astype("int64")
    return np.argmax(outputs, axis=-1)


def top_margin(outputs: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 probability per row (a single sigmoid unit p: |2p - 1|)."""
    outputs = np.asarray(outputs)
    if outputs.shape[-1] == 1:
        return np.abs(2.0 * outputs[:, 0] - 1.0)
    top = np.partition(outputs, -2, axis=-1)
    return top[:, -1] - top[:, -2]
