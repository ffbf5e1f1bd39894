"""tests/forked.py stands in for subprocess in the tests that start transferkit: its processes
must end, print and take signals as ``python`` started by subprocess does."""

import os
import signal
import subprocess
import sys

import pytest

from tests import forked


def test_a_forked_process_ends_prints_and_takes_signals_as_python_does(tmp_path):
    code = ("import os, sys; print('out', sys.argv[1:], os.getcwd(), os.environ['MARK']); "
            "print('err', file=sys.stderr); sys.exit(int(sys.argv[1]))")
    for exit_code in (0, 3):
        done = forked.run([sys.executable, "-c", code, str(exit_code)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env={**os.environ, "MARK": "here"})
        assert done.returncode == exit_code
        assert done.stdout == f"out ['{exit_code}'] {tmp_path} here\n" and done.stderr == "err\n"
    failing = forked.run([sys.executable, "-c", "raise RuntimeError('boom')"], capture_output=True, text=True)
    assert failing.returncode == 1 and "Traceback" in failing.stderr and "RuntimeError: boom" in failing.stderr
    modules = forked.run([sys.executable, "-c", "import sys; print(sorted(sys.modules))"], capture_output=True,
                         text=True).stdout
    assert "'transferkit" not in modules and "'keras'" in modules  # Keras preloaded, transferkit not
    for signum, expected in ((signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, -signal.SIGTERM),
                             (signal.SIGINT, -signal.SIGINT)):
        process = forked.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                               stdout=forked.PIPE, stderr=forked.PIPE, text=True)
        assert process.stdout.readline() == "ready\n"
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == expected, (signum, stderr)
    with pytest.raises(ValueError, match="use subprocess"):
        forked.Popen([sys.executable, "-m", "transferkit", "--help"], env={**os.environ, "KERAS_BACKEND": "jax"})
    with pytest.raises(subprocess.TimeoutExpired):
        forked.run([sys.executable, "-c", "import time; time.sleep(60)"], timeout=1)


def test_a_forked_script_and_a_piped_stdin_are_as_python_gives_them(tmp_path):
    (tmp_path / "helper.py").write_text("WORD = 'beside'\n")
    script = tmp_path / "script.py"
    script.write_text("import sys, helper\nprint(__name__, sys.argv[1:], helper.WORD, sys.stdin.read().upper())\n")
    done = forked.run([sys.executable, str(script), "a", "b"], capture_output=True, text=True, timeout=120,
                      input="piped")
    assert (done.returncode, done.stdout) == (0, "__main__ ['a', 'b'] beside PIPED\n"), done.stderr
    with pytest.raises(ValueError, match="not a command line for tests.forked"):
        forked.run([sys.executable, str(tmp_path / "missing.py")])
