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

    The bar is drawn on first call, when the total is known: Keras's ``Progbar`` where Keras
    is loaded, else a ``LightBar`` of the same look (Keras is not imported for a bar),
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
            if "keras" in sys.modules:
                import keras

                from transferkit.keras_private import start_progbar_at

                self._bar = keras.utils.Progbar(total or self.total, unit_name=self.unit, stateful_metrics=(),
                                                verbose=1 if interactive() else 2)
                start_progbar_at(self._bar, self._started)
            else:  # work that runs without Keras (a warm predict) does not import it for a bar
                self._bar = LightBar(total or self.total, self.unit, self._started, interactive())
        self._bar.update(done)


class LightBar:
    """The look of Keras's ``Progbar`` (a redrawn bar where the output is a terminal, else one
    line at the end: "120/120 - 3s - 25ms/image"), for work that runs without Keras: importing
    it for a bar would cost seconds of TensorFlow's start-up.

    Args:
        total: units of work.
        unit: what is counted.
        started: when the work began (``time.time()``).
        redrawn: redraw the bar as units are done (a terminal); else print the line at the end.
    """

    WIDTH = 20
    INTERVAL = 0.05  # seconds between redraws

    def __init__(self, total: int, unit: str, started: float, redrawn: bool):
        self.total, self.unit, self.started, self.redrawn = total, unit, started, redrawn
        self._drawn = 0.0

    def update(self, done: int) -> None:
        now = time.time()
        finished = done >= self.total
        per_unit = self._per_unit((now - self.started) / done if done else 0.0)
        count = f"{done:>{len(str(self.total))}}/{self.total}"
        if not self.redrawn:
            if finished:
                sys.stdout.write(f"{count} - {now - self.started:.0f}s -{per_unit}\n")
                sys.stdout.flush()
            return
        if not finished and now - self._drawn < self.INTERVAL:
            return
        self._drawn = now
        filled = int(self.WIDTH * done / self.total) if self.total else self.WIDTH
        left = (now - self.started) / done * (self.total - done) if done else 0.0
        clock = f"{now - self.started:.0f}s" if finished else f"{left:.0f}s"
        sys.stdout.write(f"\r\x1b[1m{count}\x1b[0m \33[32m{'━' * filled}\x1b[0m\33[37m{'━' * (self.WIDTH - filled)}"
                         f"\x1b[0m \x1b[1m{clock}\x1b[0m{per_unit}" + ("\n" if finished else ""))
        sys.stdout.flush()

    def _per_unit(self, seconds: float) -> str:
        """As Keras writes a time per unit: " 25ms/image"."""
        if seconds >= 1 or seconds == 0:
            return f" {seconds:.0f}s/{self.unit}"
        if seconds >= 1e-3:
            return f" {seconds * 1e3:.0f}ms/{self.unit}"
        return f" {seconds * 1e6:.0f}us/{self.unit}"


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
