"""Checking a written file in a fresh Python process that never imports transferkit.

The process runs ``STANDALONE`` (plain Python: numpy and the format's own runtime), loads the
file as a user would, predicts the given images and, for the benchmark, times loading and
throughput. It fails if anything imported transferkit, so a file that only works with
transferkit around is caught here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from transferkit.errors import ExportError

# Run as ``python -c`` in an empty folder: nothing of transferkit is importable by accident
# (a script run by its path would have transferkit/export/ on sys.path, whose onnx.py and
# openvino.py would shadow the real packages).
STANDALONE = r'''
import json, sys, time
import numpy as np

job = json.load(open(sys.argv[1]))


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

images = np.load(job["images"])
start = time.perf_counter()
predict = LOADERS[job["format"]](job["file"])
first = predict(images[:1])
stats = {"load_seconds": time.perf_counter() - start}
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
'''


@dataclass(frozen=True)
class FreshRun:
    """What the fresh process returned: the outputs for the images (float64) and its
    timings (load_seconds; with the benchmark, images per second at batch 1 and batch N)."""

    outputs: np.ndarray
    stats: dict


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
        np.save(folder / "images.npy", np.ascontiguousarray(images))
        job = {"format": format_name, "file": str(Path(file).resolve()), "images": str(folder / "images.npy"),
               "outputs": str(folder / "outputs.npy"), "stats": str(folder / "stats.json"),
               "batch_size": int(batch_size), "benchmark": benchmark_seconds is not None,
               "seconds": float(benchmark_seconds or 0), "threads": os.cpu_count()}
        (folder / "job.json").write_text(json.dumps(job), encoding="utf-8")
        environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "KERAS_BACKEND": "tensorflow"}
        try:
            result = subprocess.run([sys.executable, "-c", STANDALONE, str(folder / "job.json")], cwd=folder,
                                    capture_output=True, text=True, timeout=timeout, env=environment)
        except subprocess.TimeoutExpired as error:
            raise ExportError(f"loading {file} with its runtime took over {timeout:.0f} s; "
                              "the check was stopped") from error
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise ExportError(f"{file} does not load and run in a fresh {format_name} process: "
                              f"{lines[-1][:300] if lines else 'exit code ' + str(result.returncode)}")
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        if stats.pop("transferkit_imported"):
            raise ExportError(f"loading {file} imported transferkit; an export must load without it")
        return FreshRun(np.load(folder / "outputs.npy"), stats)
