"""The one progress reporter: a bar redrawn on a terminal, one line at the end elsewhere
(a log file, a pipe), with the time of the work before its first call counted."""

import io
import re
import sys
import time

from transferkit.progress import ProgressBar, fit_verbosity, interactive


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_bar_on_a_terminal_redraws_its_line_and_one_in_a_log_writes_one_line_at_its_end(monkeypatch):
    screen = Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    assert interactive() and fit_verbosity(1) == 1
    bar = ProgressBar("image", 32)
    bar(16)
    time.sleep(0.06)  # past Keras's redraw interval
    bar(32)
    assert screen.getvalue().count("\r") == 2 and "\x1b[" in screen.getvalue()

    log = io.StringIO()
    monkeypatch.setattr(sys, "stdout", log)
    assert not interactive() and fit_verbosity(1) == 2 and fit_verbosity(0) == 0
    bar = ProgressBar("image")
    bar(16, 32)
    bar(32)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and re.fullmatch(r"32/32 - \d+s - \d+(us|ms|s)/image", lines[0]), log.getvalue()
    assert "\r" not in log.getvalue() and "\x1b" not in log.getvalue()


def test_the_work_before_the_first_call_counts_in_the_time_per_image(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stdout", log)
    bar = ProgressBar("image", 3)
    time.sleep(0.3)  # the first (and only) batch of three images
    bar(3)
    per_image = re.search(r"(\d+)ms/image", log.getvalue())
    assert per_image and int(per_image.group(1)) >= 90, log.getvalue()  # ~100 ms, not "0us/image"
