"""The validation summary of a finished run, as metrics.json holds it: final and best
figures, the epoch the saved model comes from, per-class accuracy and the confusion matrix."""

from __future__ import annotations

import math
from collections.abc import Sequence

import keras
import numpy as np

from transferkit.data.batches import keras_input
from transferkit.outputs import loss_for, predicted_labels


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    matrix = np.zeros((n_classes, n_classes), dtype="int64")
    np.add.at(matrix, (true, predicted), 1)
    return matrix


def class_counts(train_labels: np.ndarray, val_labels: np.ndarray, class_names: Sequence[str]) -> dict:
    """How many training and validation images each class has (metrics.json "class_counts").

    Args:
        train_labels, val_labels: int labels.
        class_names: in label order.

    Returns:
        {"train": {class: count}, "val": {class: count}}.
    """
    def count(labels):
        found = np.bincount(np.asarray(labels, dtype="int64"), minlength=len(class_names))
        return {name: int(found[index]) for index, name in enumerate(class_names)}

    return {"train": count(train_labels), "val": count(val_labels)}


def summarize(
    history: Sequence[dict],
    true: np.ndarray,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    val_loss: float,
    n_train: int,
) -> dict:
    """metrics.json content: final and best validation figures, the epoch the saved model
    comes from, per-class accuracy, confusion.

    Args:
        history: one dict per epoch.
        true: the validation labels.
        probabilities: the saved model's outputs on the validation images.
        class_names: in label order.
        val_loss: the saved model's validation loss.
        n_train: how many images trained.

    Returns:
        A JSON-serialisable dict.
    """
    predicted = predicted_labels(probabilities)
    matrix = confusion_matrix(true, predicted, len(class_names))
    per_class = {
        name: (float(matrix[i, i] / matrix[i].sum()) if matrix[i].sum() else None)
        for i, name in enumerate(class_names)
    }
    finite = [row for row in history if not math.isnan(row.get("val_accuracy", math.nan))]
    best = max(finite, key=lambda row: row["val_accuracy"], default=None)
    # Each stage ends restoring its epoch of lowest validation loss (the first of equals),
    # so the saved model is that epoch of the last stage.
    last_stage = [row for row in history if history and row["stage"] == history[-1]["stage"]
                  and not math.isnan(row.get("val_loss", math.nan))]
    saved = min(last_stage, key=lambda row: row["val_loss"], default=None)
    return {
        "final": {
            "val_accuracy": float(np.mean(predicted == true)) if len(true) else math.nan,
            "val_loss": float(val_loss),
        },
        "best": (
            {"epoch": best["epoch"], "stage": best["stage"], "val_accuracy": best["val_accuracy"],
             "val_loss": best["val_loss"]}
            if best else {}
        ),
        "saved": {"epoch": saved["epoch"], "stage": saved["stage"], "val_loss": saved["val_loss"]} if saved else {},
        "per_class_accuracy": per_class,
        "confusion_matrix": matrix.tolist(),
        "class_names": list(class_names),
        "n_train": int(n_train),
        "n_val": int(len(true)),
        "epochs": len(history),
    }


def validation_metrics(model, val_batches, val_outputs: np.ndarray | None, history: Sequence[dict],
                       val_labels: np.ndarray, class_names: Sequence[str], n_train: int) -> dict:
    """metrics.json content for a trained model (``summarize``), from its outputs on the
    validation batches.

    Args:
        model: the trained classifier.
        val_batches: the validation ``ImageBatches`` (images and targets).
        val_outputs: the model's outputs on them when already known (the feature cache
            computes them when the last stage trained on cached features); None: predicted here.
        history: one dict per epoch.
        val_labels: the validation labels.
        class_names: in label order.
        n_train: how many images trained.

    Returns:
        A JSON-serialisable dict.
    """
    outputs = val_outputs if val_outputs is not None else model.predict(keras_input(val_batches), verbose=0)
    loss = keras.losses.get(loss_for(len(class_names)))
    val_loss = float(keras.ops.convert_to_numpy(loss(val_batches.targets, outputs)).mean())
    return summarize(history, val_labels, outputs, class_names, val_loss, n_train)
