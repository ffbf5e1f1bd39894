"""One session of transferkit's commands on a Keras backend other than TensorFlow, in a
process of its own (Keras picks its backend once per process) where TensorFlow cannot be
imported, as on a machine that has JAX or PyTorch and no TensorFlow.

    KERAS_BACKEND=jax python tests/backend_session.py ROOT [--full]

ROOT holds ``data/`` (an image folder), ``area.keras`` (a model with an area resize) and
``area_images.npy``; the session writes its runs and outputs there and ``session.json``: per
command its exit code, seconds and output, and what the backend did. tests/test_backends.py
reads it. The session finetunes once, then predicts, evaluates, tries an export and takes
the backend's gradients of known functions; ``--full`` stops the finetune with a SIGINT and
resumes it, and adds predict on the OpenVINO engine, explain, lr-find, doctor --model and tune.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import no_tensorflow  # noqa: E402, F401  (tests/no_tensorflow.py, beside this script: TensorFlow blocked)

# float32 on every CPU: the held-out check compares confidences across backends to float
# rounding, which bfloat16 ("auto" on AMX and AVX512-BF16 CPUs) is not.
FLAGS = ["--backbone", "tinyvgg", "--weights", "none", "--image-size", "32", "--batch-size", "8",
         "--set", "head.units=[8]", "--set", 'engine="keras"', "--set", 'precision="float32"']


def interrupt_after_first_epoch(partial: Path) -> threading.Thread:
    """SIGINT to this process once the run's first epoch is checkpointed (as Ctrl-C would)."""

    def watch():
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if json.loads((partial / "state.json").read_text())["global_epoch"] >= 1:
                    os.kill(os.getpid(), signal.SIGINT)
                    return
            except (OSError, ValueError, KeyError):
                pass
            time.sleep(0.01)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def main(root: Path, full: bool) -> None:
    import keras
    from typer.testing import CliRunner

    from transferkit.cli import app

    data, run = root / "data", root / "run"
    report: dict = {"backend": keras.config.backend(), "full": full, "commands": {}}
    runner = CliRunner()

    def invoke(name: str, *args) -> None:
        start, cpu = time.perf_counter(), time.process_time()
        result = runner.invoke(app, [*map(str, args)])
        output = result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            output += "Traceback (escaped the command):\n" + "".join(traceback.format_exception(result.exception))
        report["commands"][name] = {"exit": result.exit_code, "seconds": round(time.perf_counter() - start, 2),
                                    "cpu_seconds": round(time.process_time() - cpu, 2), "output": output[-3000:]}

    if full:  # finetune, stopped by a real SIGINT after its first epoch, then --resume
        watcher = interrupt_after_first_epoch(root / "run.partial")
        invoke("finetune", "finetune", data, *FLAGS, "--head-epochs", "2", "--fine-epochs", "1", "-o", run,
               "--quiet")
        watcher.join(timeout=1)
        state = root / "run.partial" / "state.json"
        report["interrupted_history"] = json.loads(state.read_text())["history"] if state.is_file() else None
        invoke("resume", "finetune", "--resume", run, "--quiet")
    else:
        invoke("finetune", "finetune", data, *FLAGS, "--head-epochs", "1", "--fine-epochs", "1", "-o", run,
               "--quiet")
    invoke("predict", "predict", run, data, "--engine", "keras", "-o", root / "keras.csv", "--quiet")
    invoke("evaluate", "evaluate", run, data, "--engine", "keras", "-o", root / "evaluation", "--quiet")
    invoke("export", "export", run, "--format", "keras", "-o", root / "export")  # refused: TensorFlow's

    # The backend's own gradients (Grad-CAM's and doctor's), on functions whose gradient is known.
    import numpy as np

    from transferkit.backend import input_gradient, weight_gradients

    x = np.array([[1.0, -2.0, 3.0]], dtype="float32")
    value, gradient = input_gradient(lambda t: keras.ops.sum(keras.ops.square(t)), x)
    dense = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    report["gradients"] = {"value": value, "input": gradient.tolist(),
                           "kernel": weight_gradients(dense, keras.ops.sum, x)[0].tolist()}

    if full:
        invoke("predict openvino", "predict", run, data, "--engine", "openvino", "--precision", "float32",
               "-o", root / "openvino.csv", "--quiet", "--verbose")
        invoke("explain", "explain", run, data / "circle", "--top", "2", "-o", root / "explain")
        invoke("lr-find", "lr-find", data, *FLAGS, "--steps", "6", "-o", root / "lr_find.png", "--json")
        invoke("doctor --model", "doctor", data, "--model", *FLAGS, "--json")
        # A space that keeps the network's shapes: the trial's steps are those finetune compiled.
        space = root / "space.toml"
        space.write_text('[tune]\n"stages.0.learning_rate" = {low = 1e-4, high = 1e-2, log = true}\n')
        invoke("tune", "tune", data, "-r", space, *FLAGS, "--trials", "1", "--set", "stages.0.epochs=1",
               "--set", "stages.1:.epochs=1", "-o", root / "tune", "--quiet")

    # A model with a TensorFlow-only resize loads here with a stand-in, and says so.
    from transferkit.runs import load_keras_file

    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger("transferkit").addHandler(handler)
    images = np.load(root / "area_images.npy")
    area = load_keras_file(root / "area.keras", "")
    np.save(root / "area_outputs.npy", keras.ops.convert_to_numpy(area(images)))
    report["area_warnings"] = messages

    if report["backend"] == "jax":
        import jax

        folder = jax.config.jax_compilation_cache_dir
        report["compilation_cache"] = {"folder": folder, "files": len(list(Path(folder).iterdir()))}
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        report["tensorflow_importable"] = False
    else:
        report["tensorflow_importable"] = True
    report["tensorflow_imported"] = sys.modules.get("tensorflow") is not None
    (root / "session.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]), full="--full" in sys.argv[2:])
