"""Each stage's train step traced once (``keras_private.build_for_fit``) against Keras's default.

With no distribution strategy, Keras on TensorFlow creates the optimizer's and the metrics'
variables inside the first trace of the train step, and ``tf.function`` then traces the step
again. ``begin_stage`` builds them first, so each ``fit`` traces its step once. The baseline
is the same finetune in the same process with that call made a no-op (Keras's default).

    python benchmarks/stage_start.py                  # VGG16, 32 px, 3 classes x 10 images
    python benchmarks/stage_start.py --size 64 --runs 3

Prints one JSON line: the traces of the train step per finetune, CPU and wall seconds per
finetune in both modes (after one warm-up finetune, alternating), their ratio, and whether
both modes gave the same validation losses (they must: only the tracing differs).
Weights are random ("none"): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from tensorflow.python.eager.polymorphic_function import tracing_compilation  # noqa: E402

import transferkit  # noqa: E402
from transferkit.data.synthetic import write_shapes_dataset  # noqa: E402
from transferkit.runtime import machine_facts  # noqa: E402
from transferkit.training import stages  # noqa: E402

TRACES: list[str] = []
_create = tracing_compilation._create_concrete_function


def _counting(function_type, type_context, func_graph, tracing_options):
    TRACES.append(tracing_options.name)
    return _create(function_type, type_context, func_graph, tracing_options)


def one_finetune(data: Path, folder: Path, recipe: dict, build_first: bool) -> tuple[float, float, int, list[float]]:
    """(CPU seconds, wall seconds, train-step traces, validation losses) of one finetune."""
    real = stages.build_for_fit
    if not build_first:
        stages.build_for_fit = lambda model, batch: None  # Keras's default: built in the first trace
    TRACES.clear()
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        run = transferkit.finetune(data, None, recipe, output=folder, verbose=0)
    finally:
        stages.build_for_fit = real
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu, wall, TRACES.count("one_step_on_data"), [float(row["val_loss"]) for row in run.history]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--runs", type=int, default=2, help="finetunes per mode, after one warm-up")
    args = parser.parse_args(argv)
    tracing_compilation._create_concrete_function = _counting
    recipe = {"backbone": args.backbone, "weights": "none", "image_size": args.size, "batch_size": 8,
              "head.units": [16], "stages.0.epochs": 1, "stages.1:.epochs": 1}
    figures = {True: [], False: []}
    with tempfile.TemporaryDirectory() as root:
        data = write_shapes_dataset(Path(root) / "data", 3, args.per_class, size=max(args.size, 40), seed=1)
        one_finetune(data, Path(root) / "warm-up", recipe, True)
        for index in range(args.runs):
            for build_first in (True, False):
                figures[build_first].append(one_finetune(data, Path(root) / f"{build_first}-{index}", recipe,
                                                         build_first))

    def mean(mode: bool, column: int) -> float:
        return round(sum(row[column] for row in figures[mode]) / len(figures[mode]), 2)

    print(json.dumps({
        "machine": machine_facts(),
        "benchmark": "stage_start",
        "backbone": args.backbone,
        "size": args.size,
        "images": 3 * args.per_class,
        "train_step_traces_per_finetune": {"built_first": figures[True][0][2], "keras_default": figures[False][0][2]},
        "cpu_seconds_per_finetune": {"built_first": mean(True, 0), "keras_default": mean(False, 0)},
        "wall_seconds_per_finetune": {"built_first": mean(True, 1), "keras_default": mean(False, 1)},
        "cpu_ratio": round(mean(True, 0) / mean(False, 0), 3),
        "same_validation_losses": all(a[3] == b[3] for a, b in zip(figures[True], figures[False], strict=True)),
    }))


if __name__ == "__main__":
    sys.exit(main())
