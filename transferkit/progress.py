"""The one progress reporter: bars for long work, shown only where the caller asks.

The library never prints: messages go through the ``transferkit`` logger, and long work
takes a progress callable from here (or None, for silence). The bar itself is Keras's
``Progbar``, the same bars ``fit`` draws. Where the output is not a terminal (a log file, a
pipe) each bar, ``fit``'s included (``fit_verbosity``), is one line when its work ends
instead of a line redrawn with carriage returns and colour codes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable


def interactive() -> bool:
    """Whether progress reaches a person's screen: standard output is a terminal, or a
    notebook's kernel runs this (Keras's own test, less its "any POSIX system")."""
    stdout = sys.stdout
    return bool(getattr(stdout, "isatty", None) and stdout.isatty()) or "ipykernel" in sys.modules


def fit_verbosity(verbose: int) -> int:
    """``verbose`` for Keras's ``fit``: 2 (a line per epoch) in place of 1 (a redrawn bar)
    where the output is not ``interactive``; 0 stays 0."""
    return 2 if verbose == 1 and not interactive() else verbose


class ProgressBar:
    """A progress bar as a callable: ``bar(done)`` or ``bar(done, total)``.

    The bar is drawn on first call, when the total is known (Keras is imported only then),
    with its clock started when the bar was made, so that the work before the first call
    counts in its time per unit.

    Args:
        unit: what is counted ("image", "batch").
        total: how many there are; default None (given with the first call).
    """

    def __init__(self, unit: str, total: int | None = None):
        self.unit, self.total = unit, total
        self._bar = None
        self._started = time.time()

    def __call__(self, done: int, total: int | None = None) -> None:
        if self._bar is None:
            import keras

            from transferkit.keras_private import start_progbar_at

            self._bar = keras.utils.Progbar(total or self.total, unit_name=self.unit, stateful_metrics=(),
                                            verbose=1 if interactive() else 2)
            start_progbar_at(self._bar, self._started)
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
