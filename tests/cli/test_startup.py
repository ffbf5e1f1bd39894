"""How fast the command line answers when nothing is trained: `--help` and the listings load
no Keras (tests/test_packaging.py) and little else. Each is timed in a fresh process, the
best of three runs, by the CPU time the process used (user + system): what it costs on an idle
machine, which the other test workers sharing these cores do not inflate as they inflate the
wall clock."""

import resource
import subprocess
import sys

import pytest


def best_of_three(*args: str) -> float:
    """CPU seconds of the cheapest of three runs of ``python -m transferkit ARGS``."""

    def used() -> float:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return children.ru_utime + children.ru_stime

    seconds = []
    for _ in range(3):
        before = used()
        done = subprocess.run([sys.executable, "-m", "transferkit", *args], capture_output=True, text=True,
                              timeout=120)
        seconds.append(used() - before)
        assert done.returncode == 0, done.stderr
    return min(seconds)


@pytest.mark.parametrize("args, budget", [(["--help"], 1.0), (["backbones"], 2.0)])
def test_help_and_listings_answer_within_their_start_up_budget(args, budget):
    seconds = best_of_three(*args)
    assert seconds < budget, f"transferkit {' '.join(args)} took {seconds:.2f} s (budget {budget} s)"
