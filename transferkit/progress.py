"""The one progress reporter: bars for long work, shown only where the caller asks.

The library never prints: messages go through the ``transferkit`` logger, and long work
takes a progress callable from here (or None, for silence). The bar itself is Keras's
``Progbar``, the same bars ``fit`` draws.
"""

from __future__ import annotations

from collections.abc import Callable


class ProgressBar:
    """A progress bar as a callable: ``bar(done)`` or ``bar(done, total)``.

    The bar is drawn on first call, when the total is known; Keras is imported only then.

    Args:
        unit: what is counted ("image", "batch").
        total: how many there are; default None (given with the first call).
    """

    def __init__(self, unit: str, total: int | None = None):
        self.unit, self.total = unit, total
        self._bar = None

    def __call__(self, done: int, total: int | None = None) -> None:
        if self._bar is None:
            import keras

            self._bar = keras.utils.Progbar(total or self.total, unit_name=self.unit, stateful_metrics=())
        self._bar.update(done)


def progress_bar(unit: str, total: int | None = None, enabled: bool = True) -> Callable | None:
    """A ``ProgressBar`` when ``enabled``, else None (the library's "no progress").

    Args:
        unit: what is counted.
        total: how many; default None (given with the first call).
        enabled: draw it; default True.

    Returns:
        A ``ProgressBar`` or None.
    """
    return ProgressBar(unit, total) if enabled else None
