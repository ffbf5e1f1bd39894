"""A warm ``transferkit predict`` with its recorded engine against the same with the model loaded.

The first predict of a run records its engine (``inference/warm.py``); a later one rebuilds it
from the cached networks and loads neither the model nor Keras and TensorFlow. The baseline
is the same command with the record deleted before each call, so that it builds the engine
from the Keras model as every predict did before (its networks still cached: no conversion,
no compile). Both are whole processes, timed from outside, as a user runs them.

    python benchmarks/predict_start.py                  # the README's demo run, its 120 images
    python benchmarks/predict_start.py --runs 5

Prints one JSON line: the wall seconds of each call both ways (alternating, after one call
that converts and records), the ratio of the medians (recorded / model loaded), and whether
every call wrote the same predictions. Weights are random ("none").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from transferkit.data.folders import iter_image_files  # noqa: E402
from transferkit.inference.openvino import engine_cache_dir  # noqa: E402
from transferkit.runtime import machine_facts  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
COMMAND = [shutil.which("transferkit") or "transferkit"]


def predict(run: Path, images: Path, output: Path) -> float:
    started = time.perf_counter()
    subprocess.run([*COMMAND, "predict", str(run), str(images), "--output", str(output), "--force", "--quiet"],
                   check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="calls each way, after the first")
    args = parser.parse_args(argv)
    images = ROOT / "sample_images"
    seconds: dict[str, list[float]] = {"recorded": [], "model_loaded": []}
    with tempfile.TemporaryDirectory() as root:
        run = Path(root) / "demo"
        subprocess.run([*COMMAND, "finetune", str(images), "--weights", "none", "-o", str(run), "--quiet"],
                       check=True, stdout=subprocess.DEVNULL)
        first = Path(root) / "first.csv"
        predict(run, images, first)  # converts and records
        records = engine_cache_dir(run) / "warm"
        same = True
        for index in range(args.runs):
            for way in ("model_loaded", "recorded"):
                if way == "model_loaded":
                    shutil.rmtree(records, ignore_errors=True)
                output = Path(root) / f"{way}-{index}.csv"
                seconds[way].append(predict(run, images, output))
                same = same and output.read_bytes() == first.read_bytes()
    median = {way: statistics.median(values) for way, values in seconds.items()}
    print(json.dumps({
        "machine": machine_facts(),
        "benchmark": "predict_start",
        "images": sum(reason is None for _, reason in iter_image_files(images)),
        "wall_seconds": {way: [round(value, 2) for value in values] for way, values in seconds.items()},
        "ratio_recorded_to_model_loaded": round(median["recorded"] / median["model_loaded"], 3),
        "same_predictions": same,
    }))


if __name__ == "__main__":
    sys.exit(main())
