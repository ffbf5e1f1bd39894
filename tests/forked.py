"""Real processes without TensorFlow's start-up each time: ``Popen`` and ``run``, for the
command lines ``python -m transferkit ...``, ``python -c CODE ...`` and ``python SCRIPT.py ...``,
as ``subprocess`` has them, started from multiprocessing's fork server.

Each test process of the suite would otherwise pay TensorFlow's and Keras's import (7-12 s of
a core) before doing its few seconds of work. The fork server imports them once per pytest
worker, before it has run any TensorFlow op, and forks a new process for each command: a real
process with its own pid, the environment and working folder it is given, its stdout and
stderr on pipes or files, killed by real signals, its exit status as ``subprocess`` reports it
(negative for a signal). transferkit itself is imported in each process, as a fresh Python
would: a check that a saved model loads without transferkit still means it.

Only the TensorFlow backend is preloaded: a command line with another ``KERAS_BACKEND``, or one
that is not ``-m transferkit`` / ``-c CODE`` / a ``.py`` file, needs ``subprocess`` (a ValueError
says so). What the first process of a session proves (start-up time, the console script) is
tested with ``subprocess`` too (tests/cli/test_startup.py and .ci/run's wheel check).
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading

PIPE, STDOUT, DEVNULL = subprocess.PIPE, subprocess.STDOUT, subprocess.DEVNULL
TimeoutExpired = subprocess.TimeoutExpired

# What every command imports first and fresh Python would take seconds over: TensorFlow,
# Keras (on TensorFlow: KERAS_BACKEND is read at its import), and the libraries transferkit
# loads lazily (albumentations as transferkit imports it: without torch). Never transferkit.
PRELOAD = ["tensorflow", "keras", "numpy", "PIL.Image", "tests.albumentations_alone", "matplotlib.pyplot",
           "sklearn.metrics", "scipy.stats", "pydantic", "typer"]

_context = None
_lock = threading.Lock()


def _server():
    global _context
    with _lock:
        if _context is None:
            os.environ.setdefault("MPLBACKEND", "Agg")
            _context = multiprocessing.get_context("forkserver")
            _context.set_forkserver_preload(PRELOAD)
        return _context


class _Fd:
    """A file descriptor handed to the forked process (multiprocessing passes it over the
    fork server's socket, as it does a Connection's)."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self):
        from multiprocessing import reduction

        return _Fd._rebuild, (reduction.DupFd(self.fd),)

    @staticmethod
    def _rebuild(duplicate):
        return _Fd(duplicate.detach())


def _main(argv: list[str], env: dict, cwd: str | None, fds: tuple, preexec_fn=None) -> None:
    """The forked process: the environment, folder and standard streams it was given, then
    the command line as ``python`` would run it, ending as ``python`` does."""
    import atexit
    import runpy
    import signal
    import traceback

    stdin, stdout, stderr = fds
    for target, source in ((0, stdin), (1, stdout), (2, stderr)):
        if source is not None:
            os.dup2(source.fd, target)
            os.close(source.fd)
    sys.stdin = open(0, encoding="utf-8", closefd=False)
    sys.stdout = open(1, "w", encoding="utf-8", closefd=False)
    sys.stderr = open(2, "w", encoding="utf-8", closefd=False, buffering=1)
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if preexec_fn is not None:
        preexec_fn()
    code = 0
    try:
        if argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        elif argv[0] != "-c":  # a script: its folder first on the path, as python puts it
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
        else:
            sys.argv = ["-c", *argv[2:]]
            sys.path.insert(0, "")
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT
    except BaseException:  # noqa: BLE001 - as python prints an uncaught exception and exits 1
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if code < 0:  # as python ends on an uncaught KeyboardInterrupt: by the signal
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _command(args) -> list[str]:
    args = [str(arg) for arg in args]
    script = len(args) >= 2 and args[1].endswith(".py") and os.path.isfile(args[1])
    if len(args) < 2 or args[0] != sys.executable or not (script or len(args) >= 3 and (
            args[1] == "-c" or args[1] == "-m" and args[2] == "transferkit")):
        raise ValueError("not a command line for tests.forked (python -m transferkit, python -c or python "
                         f"SCRIPT.py): {args[:3]}")
    return args[1:]


class Popen:
    """``subprocess.Popen`` for ``[sys.executable, "-m", "transferkit", ...]``,
    ``[sys.executable, "-c", CODE, ...]`` and ``[sys.executable, "SCRIPT.py", ...]``, forked
    from the preloaded server."""

    def __init__(self, args, stdout=None, stderr=None, stdin=None, text=None, env=None, cwd=None,
                 encoding=None, universal_newlines=None, preexec_fn=None):
        argv = _command(args)
        env = dict(os.environ if env is None else env)
        if env.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
            raise ValueError("tests.forked preloads Keras on TensorFlow: use subprocess for another backend")
        self.args = list(args)
        self.text = bool(text or encoding or universal_newlines)
        self.returncode = None
        self.stdin = None
        handed, keep = [], []  # descriptors for the child, the parent's ends (stdin's the write end)

        def child_end(choice, name):
            if choice is None:
                return None
            if choice == PIPE:
                read, write = os.pipe()
                mine, theirs = (write, read) if name == "stdin" else (read, write)
                keep.append((name, mine))
                handed.append(theirs)
                return _Fd(theirs)
            if choice == DEVNULL:
                fd = os.open(os.devnull, os.O_RDWR)
                handed.append(fd)
                return _Fd(fd)
            return _Fd(choice if isinstance(choice, int) else choice.fileno())

        out = child_end(stdout, "stdout")
        err = _Fd(out.fd) if stderr == STDOUT and out is not None else child_end(stderr, "stderr")
        inp = child_end(DEVNULL if stdin is None else stdin, "stdin")
        self._process = _server().Process(target=_main, args=(argv, env, None if cwd is None else str(cwd),
                                                              (inp, out, err), preexec_fn), daemon=False)
        self._process.start()
        for fd in handed:
            os.close(fd)
        self.stdout = self.stderr = None
        for name, fd in keep:
            mode = "w" if name == "stdin" else "r"
            setattr(self, name, open(fd, mode, encoding="utf-8") if self.text else open(fd, mode + "b"))
        self.pid = self._process.pid

    def poll(self):
        if self.returncode is None and self._process.exitcode is not None:
            self.returncode = self._process.exitcode
        return self.returncode

    def wait(self, timeout=None):
        self._process.join(timeout)
        if self.poll() is None:
            raise subprocess.TimeoutExpired(self.args, timeout)
        return self.returncode

    def send_signal(self, signum):
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self):
        self.send_signal(15)

    def kill(self):
        self.send_signal(9)

    def communicate(self, input=None, timeout=None):  # noqa: A002 - subprocess's name
        readers, results = [], {}
        for name in ("stdout", "stderr"):
            stream = getattr(self, name)
            if stream is not None:
                reader = threading.Thread(target=lambda n=name, s=stream: results.__setitem__(n, s.read()), daemon=True)
                reader.start()
                readers.append(reader)
        if self.stdin is not None:  # after the readers start: a child that writes much while it reads never blocks
            try:
                if input:
                    self.stdin.write(input)
                self.stdin.close()
            except BrokenPipeError:
                pass  # it ended without reading: as subprocess, no error
        self.wait(timeout)
        for reader in readers:
            reader.join(timeout)
        for name in ("stdout", "stderr"):
            stream = getattr(self, name)
            if stream is not None:
                stream.close()
        return results.get("stdout"), results.get("stderr")

    def __enter__(self):
        return self

    def __exit__(self, *_):
        for stream in (self.stdin, self.stdout, self.stderr):
            if stream is not None:
                try:
                    stream.close()
                except BrokenPipeError:
                    pass  # stdin of a process that ended unread: as subprocess, no error
        self.wait()


def run(args, capture_output=False, text=None, timeout=None, check=False, env=None, cwd=None, stdout=None,
        stderr=None, input=None, **options) -> subprocess.CompletedProcess:  # noqa: A002 - subprocess's name
    """``subprocess.run`` for the command lines ``Popen`` takes."""
    if capture_output:
        stdout = stderr = PIPE
    if input is not None:
        options["stdin"] = PIPE
    with Popen(args, stdout=stdout, stderr=stderr, text=text, env=env, cwd=cwd, **options) as process:
        try:
            out, err = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise
    done = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    if check:
        done.check_returncode()
    return done


__all__ = ["DEVNULL", "PIPE", "STDOUT", "Popen", "TimeoutExpired", "run"]
