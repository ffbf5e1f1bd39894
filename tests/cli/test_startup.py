"""How fast the command line answers when nothing is trained: `--help` and the listings load
no Keras (tests/test_packaging.py) and little else. Each is timed in a fresh process, the
best of three runs, so that a busy machine (other test workers) does not fail it."""

import subprocess
import sys
import time

import pytest


def best_of_three(*args: str) -> float:
    """Seconds of the fastest of three runs of ``python -m transferkit ARGS``."""
    seconds = []
    for _ in range(3):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True,
                              timeout=120)
        seconds.append(time.perf_counter() - started)
        assert done.returncode == 0, done.stderr
    return min(seconds)


@pytest.mark.parametrize("args, budget", [(["--help"], 1.0), (["backbones"], 2.0)])
def test_help_and_listings_answer_within_their_start_up_budget(args, budget):
    seconds = best_of_three(*args)
    assert seconds < budget, f"transferkit {' '.join(args)} took {seconds:.2f} s (budget {budget} s)"
