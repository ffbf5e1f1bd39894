"""Checking a written file in a fresh Python process that never imports transferkit.

The process runs ``STANDALONE`` (plain Python: numpy and the format's own runtime), loads the
file as a user would, predicts the given images and, for the benchmark, times loading and
throughput. It fails if anything imported transferkit, so a file that only works with
transferkit around is caught here.

    run_fresh("onnx", file, images)            # one file, one process
    with FreshChecks() as checks:              # one export call's files
        checks.run("savedmodel", file, images) # the TensorFlow formats share one process
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.errors import ExportError

# Run as ``python -c`` in an empty folder: nothing of transferkit is importable by accident
# (a script run by its path would have transferkit/export/ on sys.path, whose onnx.py and
# openvino.py would shadow the real packages).
STANDALONE = r'''
import json, os, sys, time, traceback
import numpy as np

job = {}


def load_savedmodel(path):
    import tensorflow as tf
    loaded = tf.saved_model.load(path)  # kept: its variables live as long as it does
    return lambda x: loaded.serve(tf.constant(x.astype("uint8"))).numpy()


def load_litert(path):
    from ai_edge_litert.interpreter import Interpreter
    interpreter = Interpreter(model_path=path, num_threads=job.get("threads"))
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    shape = [None]

    def run(x):
        if shape[0] != x.shape:
            interpreter.resize_tensor_input(source["index"], x.shape)
            interpreter.allocate_tensors()
            shape[0] = x.shape
        interpreter.set_tensor(source["index"], x.astype("float32"))
        interpreter.invoke()
        return interpreter.get_tensor(target["index"]).copy()
    return run


def load_onnx(path):
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x.astype("float32")})[0]


def load_openvino(path):
    sys.modules.setdefault("openvino_telemetry", None)  # no usage events from an offline check
    import openvino as ov
    compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return lambda x: compiled(x.astype("float32"))[0]


def load_keras(path):
    import keras
    model = keras.models.load_model(path, compile=False, safe_mode=True)
    return lambda x: np.asarray(model(x.astype("float32"), training=False))


LOADERS = {"savedmodel": load_savedmodel, "litert": load_litert, "onnx": load_onnx,
           "openvino": load_openvino, "h5": load_keras, "keras": load_keras}


def check(path):
    job.clear()
    job.update(json.load(open(path)))
    images = np.load(job["images"])
    start = time.perf_counter()
    predict = LOADERS[job["format"]](job["file"])
    first = predict(images[:1])
    stats = {"load_seconds": time.perf_counter() - start, "pid": os.getpid()}
    batch = job["batch_size"]
    outputs = np.concatenate([predict(images[i:i + batch]) for i in range(0, len(images), batch)])
    np.save(job["outputs"], outputs.astype("float64"))
    if job.get("benchmark"):
        def rate(size, seconds=job["seconds"]):
            x = np.concatenate([images] * (size // len(images) + 1))[:size]
            predict(x)  # warm-up: allocations and the first run of this shape
            count, begin = 0, time.perf_counter()
            while True:
                predict(x)
                count += size
                elapsed = time.perf_counter() - begin
                if elapsed >= seconds and count >= 2 * size:
                    return count / elapsed
        stats["images_per_second_batch_1"] = rate(1)
        stats["images_per_second_batch_n"] = rate(batch)
    leaked = sorted(name for name in sys.modules if name == "transferkit" or name.startswith("transferkit."))
    stats["transferkit_imported"] = leaked
    json.dump(stats, open(job["stats"], "w"))


if sys.argv[1] != "-":
    check(sys.argv[1])  # one job: a failure is the traceback and the exit code
else:  # a job file's path per line of standard input, each answered by one line of DONE or FAILED
    for line in sys.stdin:
        try:
            check(line.strip())
            print("\x1fDONE", flush=True)
        except Exception as error:
            lines = [text for text in "".join(traceback.format_exception_only(type(error), error)).splitlines()
                     if text.strip()]
            print("\x1fFAILED " + (lines[-1] if lines else type(error).__name__), flush=True)
'''


@dataclass(frozen=True)
class FreshRun:
    """What the fresh process returned: the outputs for the images (float64) and its
    timings (load_seconds; with the benchmark, images per second at batch 1 and batch N)."""

    outputs: np.ndarray
    stats: dict


# The formats whose runtime is TensorFlow (TensorFlow loads a SavedModel, Keras on TensorFlow a
# .keras or .h5 file): one export call checks them in one fresh process, which pays
# TensorFlow's start-up (seconds of a core) once, not once per format. Every other format is
# checked in a process of its own, its runtime alone there.
SHARED_PROCESS = {"savedmodel": "tensorflow", "keras": "tensorflow", "h5": "tensorflow"}

_DONE, _FAILED = "\x1fDONE", "\x1fFAILED "


def _environment() -> dict:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}


def _write_job(folder: Path, format_name: str, file: Path, images: np.ndarray, batch_size: int,
               benchmark_seconds: float | None) -> Path:
    """The job file of one check, with the images beside it, in ``folder``."""
    np.save(folder / "images.npy", np.ascontiguousarray(images))
    job = {"format": format_name, "file": str(Path(file).resolve()), "images": str(folder / "images.npy"),
           "outputs": str(folder / "outputs.npy"), "stats": str(folder / "stats.json"),
           "batch_size": int(batch_size), "benchmark": benchmark_seconds is not None,
           "seconds": float(benchmark_seconds or 0), "threads": os.cpu_count()}
    (folder / "job.json").write_text(json.dumps(job), encoding="utf-8")
    return folder / "job.json"


def _read_result(folder: Path, file: Path) -> FreshRun:
    stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
    if stats.pop("transferkit_imported"):
        raise ExportError(f"loading {file} imported transferkit; an export must load without it")
    return FreshRun(np.load(folder / "outputs.npy"), stats)


def _failure(file: Path, format_name: str, reason: str) -> ExportError:
    return ExportError(f"{file} does not load and run in a fresh {format_name} process: {reason}")


def _timed_out(file: Path, timeout: float) -> ExportError:
    return ExportError(f"loading {file} with its runtime took over {timeout:.0f} s; the check was stopped")


def run_fresh(format_name: str, file: Path, images: np.ndarray, batch_size: int = 32,
              benchmark_seconds: float | None = None, timeout: float = 600) -> FreshRun:
    """Load a written file with its own runtime in a new process and predict ``images``.

    Args:
        format_name: the format (a key of ``FORMATS``).
        file: the model file (or SavedModel folder).
        images: uint8 (n, h, w, 3).
        batch_size: images per call; default 32.
        benchmark_seconds: also time batch 1 and batch ``batch_size`` for about this long
            each; default None (no timing beyond loading).
        timeout: seconds before the process is killed; default 600.

    Returns:
        A ``FreshRun``.

    Raises:
        ExportError: the process failed (its last error line is quoted) or imported
            transferkit.
    """
    with tempfile.TemporaryDirectory(prefix="tk-verify-") as scratch:
        folder = Path(scratch)
        job = _write_job(folder, format_name, file, images, batch_size, benchmark_seconds)
        try:
            result = subprocess.run([sys.executable, "-c", STANDALONE, str(job)], cwd=folder,
                                    capture_output=True, text=True, timeout=timeout, env=_environment())
        except subprocess.TimeoutExpired as error:
            raise _timed_out(file, timeout) from error
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise _failure(file, format_name, lines[-1][:300] if lines else f"exit code {result.returncode}")
        return _read_result(folder, file)


class FreshChecks:
    """The fresh processes of one export call: the TensorFlow formats (``SHARED_PROCESS``)
    are checked one after another in one process, started on first use; every other format
    in a process of its own (``run_fresh``). A file that fails to load is answered and the
    process goes on; one that ends the process (or takes over the timeout, and is killed)
    leaves the next format to a new one.

    Args:
        timeout: seconds one check may take before its process is killed; default 600.

    Attributes:
        started: how many shared processes were started.
    """

    def __init__(self, timeout: float = 600):
        self.timeout = timeout
        self.started = 0
        self._shared: dict[str, _JobProcess] = {}

    def __enter__(self) -> FreshChecks:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(kill=exc_type is not None)  # on an error or Ctrl-C, no wait for a check under way

    def run(self, format_name: str, file: Path, images: np.ndarray, batch_size: int = 32) -> FreshRun:
        """Check one file as ``run_fresh`` does (no benchmark), in the shared process where
        its format has one.

        Raises:
            ExportError: the file failed to load or run, the process died or took over the
                timeout, or transferkit was imported.
        """
        family = SHARED_PROCESS.get(format_name)
        if family is None:
            return run_fresh(format_name, file, images, batch_size, timeout=self.timeout)
        with tempfile.TemporaryDirectory(prefix="tk-verify-") as scratch:
            folder = Path(scratch)
            job = _write_job(folder, format_name, file, images, batch_size, None)
            if family not in self._shared:
                self._shared[family] = _JobProcess()
                self.started += 1
            stopped = self._shared[family].check(job, self.timeout)
            if stopped is not None:
                reason, ended = stopped
                if ended:  # it died or took too long: the next check starts another
                    self._shared.pop(family).close(kill=True)
                if reason is None:
                    raise _timed_out(file, self.timeout)
                raise _failure(file, format_name, reason[:300])
            return _read_result(folder, file)

    def close(self, kill: bool = False) -> None:
        """End the shared processes: each finishes the check under way first (up to 30 s),
        unless ``kill``."""
        while self._shared:
            self._shared.popitem()[1].close(kill=kill)


class _JobProcess:
    """``STANDALONE`` reading job files from its standard input, in an empty folder of its own;
    its stderr goes to a file (the last line says why, should it die)."""

    def __init__(self):
        self._folder = tempfile.TemporaryDirectory(prefix="tk-verify-process-")
        self._stderr = open(Path(self._folder.name) / "stderr.txt", "w+", encoding="utf-8")  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, "-c", STANDALONE, "-"], cwd=self._folder.name,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                        text=True, env=_environment())
        self._lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(line.rstrip("\n"))
        self._lines.put(None)  # the process ended

    def check(self, job: Path, timeout: float) -> tuple[str | None, bool] | None:
        """Run one job: None once it is DONE, else (why it failed, or None for a time-out;
        whether the process is ended)."""
        try:
            self.process.stdin.write(f"{job}\n")
            self.process.stdin.flush()
        except OSError:
            pass  # it died: the reader says so below
        deadline = time.monotonic() + timeout
        try:
            while True:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
                if line is None:
                    self.process.wait()
                    return self._last_error_line() or f"exit code {self.process.returncode}", True
                if line == _DONE:
                    return None
                if line.startswith(_FAILED):
                    return line[len(_FAILED):], False
                # anything else a runtime printed on stdout is not an answer
        except queue.Empty:
            return None, True

    def _last_error_line(self) -> str:
        self._stderr.flush()
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def close(self, kill: bool = False) -> None:
        try:
            if kill:
                self.process.kill()
            self.process.stdin.close()
            self.process.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self._stderr.close()
        self._folder.cleanup()
