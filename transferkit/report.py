"""Figures and numbers people read after a run: metrics, curves, confusion matrix.

Figures are drawn with matplotlib's object API (no pyplot, no global figure state), so they
can be drawn in a background thread while the model is being saved, and written with the
one atomic-write helper (``transferkit.files``). No Keras import.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferkit.outputs import predicted_labels

log = logging.getLogger("transferkit")


def confusion_matrix(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class.

    Args:
        true, predicted: class index per image.
        n_classes: the matrix side.

    Returns:
        int64 array of shape (n_classes, n_classes).
    """
    matrix = np.zeros((n_classes, n_classes), dtype="int64")
    np.add.at(matrix, (true, predicted), 1)
    return matrix


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


def plot_history(history: Sequence[dict], path: Path) -> None:
    """history.png: loss and accuracy per epoch, training and validation, stages shaded.

    Args:
        history: one dict per epoch (``runs.HISTORY_COLUMNS``).
        path: the .png to write (atomically).
    """
    from matplotlib.figure import Figure

    _warn_about_missing_glyphs(sorted({row["stage"] for row in history}), path, "stage names")
    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4))
    axes = figure.subplots(1, 2)
    for axis, metric in zip(axes, ("loss", "accuracy"), strict=False):
        axis.plot(epochs, [row[metric] for row in history], "o-", label=f"train {metric}")
        axis.plot(epochs, [row[f"val_{metric}"] for row in history], "s-", label=f"val {metric}")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        start, stage_number = 0, 0
        for index, row in enumerate(history):
            last = index == len(history) - 1 or history[index + 1]["stage"] != row["stage"]
            if last:
                axis.axvspan(epochs[start] - 0.5, row["epoch"] + 0.5, alpha=0.06 + 0.08 * (stage_number % 2))
                axis.text(epochs[start] - 0.4, axis.get_ylim()[1], row["stage"], va="top", fontsize=8)
                start, stage_number = index + 1, stage_number + 1
        axis.legend(fontsize=8)
    _save_figure(figure, path)


def _save_figure(figure, path: Path) -> None:
    from transferkit.files import atomic_path

    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as temporary:  # the temporary name keeps the suffix: the format
        figure.savefig(temporary, dpi=80)


def _warn_about_missing_glyphs(texts: Sequence[str], path: Path, what: str = "class names") -> None:
    """Characters the plot font lacks (class names in CJK, say) are drawn as boxes: say so in
    one line instead of matplotlib's warning per glyph (which this silences)."""
    import warnings

    from matplotlib import font_manager

    warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
    font = font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))
    if any(font.get_char_index(ord(char)) == 0 for text in texts for char in text if not char.isspace()):
        log.warning("%s: some characters of the %s are not in the plot font and show as boxes", path.name, what)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> None:
    """confusion_matrix.png: counts, true class by row.

    Args:
        matrix: from ``confusion_matrix``.
        class_names: in label order.
        path: the .png to write (atomically).
    """
    from matplotlib.figure import Figure

    _warn_about_missing_glyphs(class_names, path)
    size = max(3.5, 0.6 * len(class_names) + 2)
    figure = Figure(figsize=(size, size))
    axis = figure.subplots()
    axis.imshow(matrix, cmap="Blues")
    axis.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axis.set_yticks(range(len(class_names)), class_names)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    peak = matrix.max() if matrix.size else 0
    for (row, column), count in np.ndenumerate(matrix):
        axis.text(column, row, str(count), ha="center", va="center",
                  color="white" if count > peak / 2 else "black")
    axis.set_title("validation confusion matrix")
    _save_figure(figure, path)
