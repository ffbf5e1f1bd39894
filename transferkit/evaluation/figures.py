"""The pictures people open after a run or an evaluation.

Drawn with matplotlib's object API (``matplotlib.figure.Figure``; never pyplot, so no window
and no global figure state, and figures can be drawn in a background thread), saved at
``DPI`` with a fixed size (a figure's pixel size is its ``*_size`` in inches times ``DPI``),
and written atomically (``transferkit.files.atomic_path``). Class names the plot font lacks
are told in one warning per figure.

    confusion.png     counts and row-normalised side by side
    top_losses.png    the most confidently wrong images, titled true / predicted / confidence
    reliability.png   confidence against accuracy per bin, with the diagonal and bin counts
    roc.png, pr.png   two classes: ROC and precision-recall curves of the second class
    history.png       loss and accuracy per epoch, stages shaded and named, the saved epoch marked
    issues.png        an audit's top suspicions, given and suggested class under each
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferkit.files import atomic_path

log = logging.getLogger("transferkit")

DPI = 100
# Beyond this many classes the cells of the confusion matrix get no numbers (unreadable).
CELL_NUMBERS_UP_TO = 20
CURVE_SIZE = (5.0, 5.0)
RELIABILITY_SIZE = (6.0, 6.5)
HISTORY_SIZE = (11.0, 4.5)


def warn_about_missing_glyphs(texts: Sequence[str], path: Path, what: str = "class names") -> None:
    """Characters the plot font lacks (class names in CJK, say) are drawn as boxes: say so in
    one line instead of matplotlib's warning per glyph (which this silences)."""
    import warnings

    from matplotlib import font_manager

    warnings.filterwarnings("ignore", message=r"Glyph \d+ .*missing from font", category=UserWarning)
    font = font_manager.get_font(font_manager.findfont(font_manager.FontProperties()))
    if any(font.get_char_index(ord(char)) == 0 for text in texts for char in text if not char.isspace()):
        log.warning("%s: some characters of the %s are not in the plot font and show as boxes", path.name, what)


def save_figure(figure, path: Path) -> Path:
    """Write the figure as PNG at its own size (no tight bounding box: the size is fixed)."""
    path = Path(path)
    figure.set_layout_engine("constrained")
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=DPI, format="png")
    return path


def confusion_size(n_classes: int, longest_name: int = 6) -> tuple[float, float]:
    """The confusion figure's size in inches: two square panels that grow with the classes,
    and room for the class names beside and below them (growing up to 30 characters)."""
    panel = min(18.0, max(4.5, 0.3 * n_classes + 2.5))
    names = 0.07 * max(0, min(longest_name, 30) - 6)
    return (2 * (panel + names) - 0.2, panel + names - 0.1)


def confusion_font(n_classes: int, size: tuple[float, float]) -> float:
    """The confusion figure's font size in points: set to fit a cell, not shrunk with the
    class count (the panels grow with it, so a cell keeps about 0.3 inch: about 9 points at
    40 classes), between 6 and 10."""
    cell_points = 72 * 0.75 * size[1] / max(n_classes, 1)  # the panel is about 3/4 of the figure's height
    return float(np.clip(0.45 * cell_points, 6, 10))


def row_shares(matrix: np.ndarray) -> np.ndarray:
    """Each row of a confusion matrix over its sum (recall per true class); NaN for a class
    with no image (nothing to share out: its row is drawn blank, not as zeros)."""
    matrix = np.asarray(matrix, dtype="float64")
    rows = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, rows, out=np.full(matrix.shape, np.nan), where=rows > 0)


def plot_confusion(matrix: np.ndarray, class_names: Sequence[str], path: str | os.PathLike,
                   title: str = "confusion matrix") -> Path:
    """confusion.png: counts and row-normalised (recall per true class) side by side.

    Args:
        matrix: (k, k) counts, rows the true class, columns the predicted one.
        class_names: the k names, on both axes.
        path: the PNG to write.
        title: the figure's title; default "confusion matrix".

    Returns:
        The path.
    """
    from matplotlib.figure import Figure

    path = Path(path)
    matrix = np.asarray(matrix, dtype="int64")
    n = len(class_names)
    warn_about_missing_glyphs(class_names, path)
    size = confusion_size(n, max(map(len, class_names), default=0))
    font = confusion_font(n, size)
    normalised = row_shares(matrix)
    figure = Figure(figsize=size)
    figure.suptitle(title, fontsize=font + 2)
    for axis, values, name, fmt in zip(figure.subplots(1, 2), (matrix, normalised),
                                       ("counts", "share of each true class"), ("{:d}", "{:.2f}"), strict=False):
        image = axis.imshow(values, cmap="Blues", vmin=0, vmax=1 if values is normalised else max(1, values.max()))
        axis.set_xticks(range(n), class_names, rotation=90 if n > 8 else 45, ha="right" if n <= 8 else "center",
                        fontsize=font)
        axis.set_yticks(range(n), class_names, fontsize=font)
        axis.set_xlabel("predicted", fontsize=font + 1)
        axis.set_ylabel("true", fontsize=font + 1)
        axis.set_title(name, fontsize=font + 1)
        # Beside the matrix itself: a colour bar given the panel's cell would stand at the
        # cell's far edge, as far from a square matrix as the cell is wide.
        bar = figure.colorbar(image, cax=axis.inset_axes([1.03, 0.0, 0.04, 1.0]))
        if values is matrix:  # counts: whole numbers on the scale
            from matplotlib.ticker import MaxNLocator

            bar.locator = MaxNLocator(integer=True)
            bar.update_ticks()
        if n <= CELL_NUMBERS_UP_TO:
            peak = np.nanmax(values) if np.isfinite(values).any() else 0
            for (row, column), value in np.ndenumerate(values):
                if np.isnan(value):
                    continue
                axis.text(column, row, fmt.format(value), ha="center", va="center", fontsize=font,
                          color="white" if value > peak / 2 else "black")
    return save_figure(figure, path)


def top_losses_size(count: int, columns: int = 4) -> tuple[float, float]:
    """The top-losses grid's size in inches for ``count`` images (at least one row)."""
    rows = max(1, math.ceil(count / columns))
    return (columns * 2.6, rows * 3.1)


def plot_top_losses(items: Sequence[tuple[Path, str, str, float]], path: str | os.PathLike,
                    columns: int = 4, thumbnail: int = 160) -> Path:
    """top_losses.png: the most confidently wrong images in a grid.

    Args:
        items: (file, true class, predicted class, confidence), worst first (from
            ``EvaluationResult.top_losses``); the files are read again here.
        path: the PNG to write.
        columns: images per row; default 4.
        thumbnail: the side each image is shown at, in pixels; default 160.

    Returns:
        The path. With no wrong image the figure says so.
    """
    from matplotlib.figure import Figure

    from transferkit.data.images import load_image
    from transferkit.errors import DataError

    path = Path(path)
    warn_about_missing_glyphs([text for _, true, predicted, _ in items for text in (true, predicted)], path)
    figure = Figure(figsize=top_losses_size(len(items), columns))
    if not items:
        axis = figure.subplots()
        axis.axis("off")
        axis.text(0.5, 0.5, "no wrong predictions", ha="center", va="center", fontsize=14)
        return save_figure(figure, path)
    figure.suptitle("most confidently wrong (file, true class, predicted class: confidence)")
    rows = math.ceil(len(items) / columns)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axis in axes:
        axis.axis("off")
    for axis, (file, true, predicted, confidence) in zip(axes, items, strict=False):
        try:
            axis.imshow(load_image(file, thumbnail))
        except (DataError, OSError) as error:  # gone or changed since it was classified
            axis.text(0.5, 0.5, f"cannot read\n{Path(file).name}\n({error})", ha="center", va="center", fontsize=7)
        axis.set_title(top_loss_title(file, true, predicted, confidence), fontsize=8)
    return save_figure(figure, path)


def top_loss_title(file, true: str, predicted: str, confidence: float) -> str:
    """An image's title in top_losses.png: three short lines, each cut to the column's width
    (an ellipsis in the middle): the file (with its folder: names repeat across classes),
    its true class, the class predicted and its confidence."""
    return f"{file_label(file)}\ntrue: {fit_text(true, 20)}\n{fit_text(predicted, 18)}: {confidence:.2f}"


def file_label(file, characters: int = 26) -> str:
    """An image as a figure names it: its folder and name (names repeat across class
    folders), cut to ``characters``."""
    path = Path(file)
    return fit_text(f"{path.parent.name}/{path.name}" if path.parent.name else path.name, characters)


def fit_text(text: str, characters: int = 26) -> str:
    """``text`` cut to ``characters`` (an ellipsis in the middle, where file names differ)."""
    if len(text) <= characters:
        return text
    keep = characters - 1
    return text[: (keep + 1) // 2] + "\u2026" + text[len(text) - keep // 2:]


def plot_reliability(bins: Sequence[dict], ece: float, path: str | os.PathLike) -> Path:
    """reliability.png: accuracy against confidence per bin, the diagonal of perfect
    calibration, and each bin's image count (on its bar and as a histogram below).

    Args:
        bins: dicts with lower, upper, count, confidence, accuracy (``ReliabilityBin``s'
            fields, as metrics.json holds them).
        ece: the expected calibration error, for the title.
        path: the PNG to write.

    Returns:
        The path.
    """
    from matplotlib.figure import Figure

    bins = [dict(b) if isinstance(b, dict) else dict(b.__dict__) for b in bins]
    figure = Figure(figsize=RELIABILITY_SIZE)
    top, bottom = figure.subplots(2, 1, height_ratios=(3, 1), sharex=True)
    centres = [(b["lower"] + b["upper"]) / 2 for b in bins]
    widths = [b["upper"] - b["lower"] for b in bins]
    accuracy = [b["accuracy"] or 0.0 for b in bins]
    top.bar(centres, accuracy, width=widths, edgecolor="black", color="#4c72b0", alpha=0.8, label="accuracy")
    filled = [b for b in bins if b["count"]]
    top.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], "o", color="#dd8452",
             label="mean confidence of the bin")
    top.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    for centre, b in zip(centres, bins, strict=False):
        if b["count"]:
            top.text(centre, min(1.02, (b["accuracy"] or 0) + 0.02), str(b["count"]), ha="center", fontsize=7)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.08)
    top.set_ylabel("accuracy")
    top.set_title(f"reliability diagram (ECE {ece:.4f}, {len(bins)} bins)")
    top.legend(loc="best", fontsize=8)  # where it covers the fewest bars and dots
    bottom.bar(centres, [b["count"] for b in bins], width=widths, edgecolor="black", color="#8c8c8c")
    bottom.set_xlabel("confidence (probability of the predicted class)")
    bottom.set_ylabel("images")
    return save_figure(figure, path)


def plot_roc(true: np.ndarray, scores: np.ndarray, path: str | os.PathLike, positive: str = "positive") -> Path:
    """roc.png (two classes): the ROC curve of the second class, with its AUC.

    Args:
        true: 0/1 labels.
        scores: the second class's probability per image.
        path: the PNG to write.
        positive: the second class's name, for the title.

    Returns:
        The path.
    """
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    false_positive, true_positive, _ = roc_curve(true, scores)
    figure = Figure(figsize=CURVE_SIZE)
    axis = figure.subplots()
    axis.plot(false_positive, true_positive, label=f"AUC {roc_auc_score(true, scores):.4f}")
    axis.plot([0, 1], [0, 1], "--", color="gray", label="chance")
    axis.set_xlabel("false positive rate")
    axis.set_ylabel("true positive rate")
    axis.set_title(f"ROC ({positive} positive)")
    axis.legend(loc="lower right")
    warn_about_missing_glyphs([positive], Path(path))
    return save_figure(figure, Path(path))


def plot_pr(true: np.ndarray, scores: np.ndarray, path: str | os.PathLike, positive: str = "positive") -> Path:
    """pr.png (two classes): the precision-recall curve of the second class, with its
    average precision and the share of positives (a classifier that guesses).

    Returns:
        The path.
    """
    from matplotlib.figure import Figure
    from sklearn.metrics import average_precision_score, precision_recall_curve

    precision, recall, _ = precision_recall_curve(true, scores)
    figure = Figure(figsize=CURVE_SIZE)
    axis = figure.subplots()
    axis.step(recall, precision, where="post", label=f"AP {average_precision_score(true, scores):.4f}")
    axis.axhline(float(np.mean(true)), linestyle="--", color="gray", label="chance")
    axis.set_xlabel("recall")
    axis.set_ylabel("precision")
    axis.set_xlim(0, 1)
    axis.set_ylim(0, 1.05)
    axis.set_title(f"precision-recall ({positive} positive)")
    axis.legend(loc="lower left")
    warn_about_missing_glyphs([positive], Path(path))
    return save_figure(figure, Path(path))


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def plot_history(history: Sequence[dict], path: str | os.PathLike, saved: dict | None = None) -> Path:
    """history.png: loss and accuracy per epoch, training and validation, each stage shaded
    and named, the epoch the saved model comes from marked, and where a stage started from
    an earlier epoch than the one before it (its predecessor's best) that epoch ringed.

    Args:
        history: one dict per epoch with epoch, stage, loss, accuracy, val_loss, val_accuracy
            (numbers or, as read from history.csv, strings).
        path: the PNG to write.
        saved: metrics.json's "saved" ({"epoch", "stage", ...}); default None (not marked).

    Returns:
        The path.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    rows = [dict(row, epoch=int(_number(row["epoch"]))) for row in history]
    warn_about_missing_glyphs(sorted({str(row["stage"]) for row in rows}), path, "stage names")
    epochs = [row["epoch"] for row in rows]
    figure = Figure(figsize=HISTORY_SIZE)
    for axis, metric in zip(figure.subplots(1, 2), ("loss", "accuracy"), strict=False):
        axis.plot(epochs, [_number(row[metric]) for row in rows], "o-", label=f"train {metric}")
        axis.plot(epochs, [_number(row[f"val_{metric}"]) for row in rows], "s-", label=f"val {metric}")
        axis.set_xlabel("epoch")
        axis.set_title(metric)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        start, began_from = 0, None
        for index, row in enumerate(rows):
            if index == len(rows) - 1 or rows[index + 1]["stage"] != row["stage"]:
                shade = 0.06 + 0.08 * (len(axis.patches) % 2)
                axis.axvspan(epochs[start] - 0.5, row["epoch"] + 0.5, alpha=shade, color="gray")
                # Named at the bottom of its band (x in epochs, y in axis fractions).
                name = str(row["stage"]) + ("" if began_from is None else f" (from epoch {began_from})")
                axis.text(epochs[start] - 0.4, 0.02, name, va="bottom", fontsize=8,
                          transform=axis.get_xaxis_transform())
                if index < len(rows) - 1:  # the last stage's best is the saved epoch, starred below
                    began_from = _ring_best_before_its_end(axis, rows[start:index + 1], metric)
                start = index + 1
        if saved and saved.get("epoch") is not None:
            epoch = int(_number(saved["epoch"]))
            axis.axvline(epoch, color="#c44e52", linestyle=":", label=f"saved (epoch {epoch})")
            match = [row for row in rows if row["epoch"] == epoch]
            if match:
                axis.plot([epoch], [_number(match[-1][f"val_{metric}"])], "*", color="#c44e52", markersize=14)
        axis.legend(fontsize=8)
    return save_figure(figure, path)


def _ring_best_before_its_end(axis, stage_rows: list[dict], metric: str) -> int | None:
    """A stage ends on its best epoch (lowest validation loss), so the next one starts from
    there: where that is not the stage's last epoch, ring its point (the line drawn on from
    the last epoch would suggest otherwise) and return it for the next band's name.

    Returns:
        The epoch the next stage started from, or None when it is the stage's last.
    """
    losses = [_number(row["val_loss"]) for row in stage_rows]
    if not losses or all(math.isnan(loss) for loss in losses):
        return None
    best = stage_rows[int(np.nanargmin(losses))]
    if best["epoch"] == stage_rows[-1]["epoch"]:
        return None
    axis.plot([best["epoch"]], [_number(best[f"val_{metric}"])], "o", markersize=11, markerfacecolor="none",
              markeredgecolor="dimgray")
    return best["epoch"]


def write_run_figures(run: str | os.PathLike) -> list[Path]:
    """Draw a run's history.png (from history.csv) and confusion.png (from metrics.json)
    again, in the run folder.

    Args:
        run: a run folder, or a ``Run`` (its history and metrics as loaded: a damaged file is
            not read, and warned about, twice).

    Returns:
        The PNGs written.

    Raises:
        RunError: not a run folder, or it has neither history.csv nor a confusion matrix
            in metrics.json.
    """
    from transferkit.errors import RunError
    from transferkit.runs import Run, load_run

    loaded = run if isinstance(run, Run) else load_run(run, with_model=False)
    written = []
    if loaded.history:
        written.append(plot_history(loaded.history, loaded.path / "history.png", loaded.metrics.get("saved")))
    matrix = loaded.metrics.get("confusion_matrix")
    if matrix:
        written.append(plot_confusion(np.asarray(matrix), loaded.class_names, loaded.path / "confusion.png",
                                      title="validation confusion matrix"))
    if not written:
        raise RunError(f"{loaded.path} has no history.csv and no confusion matrix in metrics.json; "
                       "nothing to draw (re-run finetune)")
    return written


def contact_sheet_size(count: int, columns: int = 6) -> tuple[float, float]:
    """A contact sheet's size in inches for ``count`` images (at least one row)."""
    rows = max(1, math.ceil(count / columns))
    return (columns * 2.2, rows * 2.9 + 0.6)


def plot_contact_sheet(items: Sequence[tuple[Path, str]], path: str | os.PathLike, title: str,
                       columns: int = 6, thumbnail: int = 128, empty: str = "nothing to show") -> Path:
    """A grid of images, each with a few lines of caption under it (``issues.png``).

    Args:
        items: (file, caption) in the order shown; the files are read here (one that cannot
            be read shows its name and why).
        path: the PNG to write.
        title: the figure's title.
        columns: images per row; default 6.
        thumbnail: the side each image is shown at, in pixels; default 128.
        empty: what the figure says when there is no item; default "nothing to show".

    Returns:
        The path.
    """
    from matplotlib.figure import Figure

    from transferkit.data.images import load_image
    from transferkit.errors import DataError

    path = Path(path)
    warn_about_missing_glyphs([caption for _, caption in items], path, "captions")
    columns = max(1, min(columns, len(items)))
    figure = Figure(figsize=contact_sheet_size(len(items), columns))
    if not items:
        axis = figure.subplots()
        axis.axis("off")
        axis.text(0.5, 0.5, empty, ha="center", va="center", fontsize=14)
        return save_figure(figure, path)
    figure.suptitle(title)
    rows = math.ceil(len(items) / columns)
    axes = np.atleast_1d(figure.subplots(rows, columns)).ravel()
    for axis in axes:
        axis.axis("off")
    for axis, (file, caption) in zip(axes, items, strict=False):
        axis.axis("on")  # a frame without ticks: the caption is its x label, which the layout makes room for
        axis.set_xticks([])
        axis.set_yticks([])
        try:
            axis.imshow(load_image(file, thumbnail))
        except (DataError, OSError):  # gone or changed since it was read
            axis.set_aspect("equal")
            axis.text(0.5, 0.5, "cannot read\nthe file now", ha="center", va="center", fontsize=8)
        axis.set_xlabel(caption, fontsize=8)
    return save_figure(figure, path)
