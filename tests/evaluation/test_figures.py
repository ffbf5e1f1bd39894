"""The figures people look at instead of the numbers: what each one marks."""

import numpy as np
import pytest

from transferkit.evaluation import figures


def drawn(monkeypatch, draw):
    """The figure a plot function builds, kept instead of written."""
    kept = []
    monkeypatch.setattr(figures, "save_figure", lambda figure, path: kept.append(figure) or path)
    draw()
    (figure,) = kept
    return figure


def history(val_losses, head_epochs):
    return [{"epoch": epoch, "stage": "head" if epoch <= head_epochs else "fine", "loss": loss, "accuracy": 0.5,
             "val_loss": loss, "val_accuracy": 1 - loss / 2} for epoch, loss in enumerate(val_losses, 1)]


def rings(axis):
    return [(int(line.get_xdata()[0]), float(line.get_ydata()[0])) for line in axis.lines
            if line.get_marker() == "o" and line.get_markerfacecolor() == "none"]


def test_history_names_the_epoch_a_stage_started_from_when_it_is_not_the_last_one_before(monkeypatch):
    figure = drawn(monkeypatch, lambda: figures.plot_history(history([1.2, 0.8, 0.9, 1.0, 0.7, 0.6], 4), "h.png",
                                                             {"epoch": 6, "stage": "fine"}))
    loss, accuracy = figure.axes[:2]
    for axis in (loss, accuracy):
        assert [text.get_text() for text in axis.texts] == ["head", "fine (from epoch 2)"]
    assert rings(loss) == [(2, 0.8)] and rings(accuracy) == [(2, pytest.approx(0.6))]


def test_history_marks_nothing_when_each_stage_ends_on_its_best_epoch(monkeypatch):
    figure = drawn(monkeypatch, lambda: figures.plot_history(history([1.2, 0.8, 0.7, 0.9], 2), "h.png"))
    assert [text.get_text() for text in figure.axes[0].texts] == ["head", "fine"]
    assert rings(figure.axes[0]) == []


@pytest.mark.parametrize("names", [["a", "b"], ["a_much_longer_class_name_than_most", "b"]])
def test_confusion_colour_bars_stand_beside_their_matrices(monkeypatch, names):
    figure = drawn(monkeypatch, lambda: figures.plot_confusion(np.array([[5, 1], [2, 7]]), names, "c.png"))
    figure.canvas.draw()
    matrices = [axis for axis in figure.axes if axis.images]
    assert len(matrices) == 2
    for axis in matrices:
        (bar,) = axis.child_axes
        gap = bar.get_window_extent().x0 - axis.get_window_extent().x1
        assert 0 < gap < 0.1 * axis.get_window_extent().width
