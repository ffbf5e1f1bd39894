"""The end of each epoch: transferkit's tf.data input against Keras's own for a ``PyDataset``.

Given a ``keras.utils.PyDataset``, Keras on TensorFlow wraps it in a ``tf.data`` pipeline
with an autotuned prefetch. tf.data's autotuning optimizer sleeps on a timer whose period
doubles over an iterator's life, and the iterator's destruction at the end of each epoch
waits for its next wake-up with every core idle. ``data.batches.keras_input`` hands ``fit``
the same batches through ``to_tf_dataset`` instead: a fixed prefetch, no autotuning.

The job is the digits job of ``finetune_vs_keras.py --dataset digits`` (scikit-learn's 1,797
real digits, 64 px, 3 head + 2 fine epochs on cached features), run in this process after
one warm-up (the converted networks cached), alternating the two inputs. The baseline is the
same finetune with ``keras_input`` giving the ``PyDataset`` as it is (Keras's default).

    python benchmarks/epoch_end.py                       # VGG16, one finetune per input
    python benchmarks/epoch_end.py --backbone resnet50 --runs 2

Prints one JSON line: per input, the wall seconds of each finetune and the seconds between
the last step of an epoch and the first step of the next (its validation, checkpoint and
the iterator's end: the same work either way but the stall), the ratio of the mean wall
seconds (transferkit / Keras's default), and whether both gave the same validation losses
(they must: only the input pipeline differs). Weights are random ("none").
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

import transferkit  # noqa: E402, I001  (first: it may turn TensorFlow's oneDNN on before TensorFlow loads)
import keras  # noqa: E402
from finetune_vs_keras import transferkit_job, write_digits  # noqa: E402
from transferkit.runtime import machine_facts  # noqa: E402
from transferkit.training import stages  # noqa: E402


class EpochBoundaries(keras.callbacks.Callback):
    """Seconds from each epoch's last step to the next epoch's first step, and from the last
    step to the end of fit."""

    def __init__(self, into: list[float]):
        super().__init__()
        self.into, self.last = into, None

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0 and self.last is not None:
            self.into.append(time.perf_counter() - self.last)

    def on_train_batch_end(self, batch, logs=None):
        self.last = time.perf_counter()

    def on_train_end(self, logs=None):
        if self.last is not None:
            self.into.append(time.perf_counter() - self.last)


def one_finetune(data: Path, folder: Path, backbone: str, ours: bool) -> tuple[float, list[float], list[float]]:
    """(wall seconds, epoch-boundary seconds, validation losses) of one finetune."""
    real_input, real_fit = stages.keras_input, keras.Model.fit
    boundaries: list[float] = []

    def fit(model, *args, callbacks=None, **kwargs):
        return real_fit(model, *args, callbacks=[*(callbacks or []), EpochBoundaries(boundaries)], **kwargs)

    if not ours:
        stages.keras_input = lambda batches: batches  # Keras's default: the PyDataset as it is
    keras.Model.fit = fit
    started = time.perf_counter()
    try:
        transferkit_job(data, backbone, 64, 32, 3, 2, 1, "auto", "default", folder)
    finally:
        stages.keras_input, keras.Model.fit = real_input, real_fit
    seconds = time.perf_counter() - started
    return seconds, boundaries, [float(row["val_loss"]) for row in transferkit.load_run(folder).history]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--runs", type=int, default=1, help="finetunes per input, after one warm-up")
    args = parser.parse_args(argv)
    figures: dict[bool, list] = {True: [], False: []}
    with tempfile.TemporaryDirectory() as root:
        data = write_digits(Path(root) / "data", 64)
        one_finetune(data, Path(root) / "warm-up", args.backbone, True)
        for index in range(args.runs):
            for ours in (False, True):
                figures[ours].append(one_finetune(data, Path(root) / f"{ours}-{index}", args.backbone, ours))

    def side(ours: bool) -> dict:
        rows = figures[ours]
        return {"wall_seconds": [round(row[0], 1) for row in rows],
                "epoch_boundary_seconds": [[round(gap, 2) for gap in row[1]] for row in rows],
                "epoch_boundary_seconds_total": round(sum(sum(row[1]) for row in rows) / len(rows), 2)}

    def mean_wall(ours: bool) -> float:
        return sum(row[0] for row in figures[ours]) / len(figures[ours])

    print(json.dumps({
        "machine": machine_facts(),
        "benchmark": "epoch_end",
        "backbone": args.backbone,
        "transferkit_input": side(True),
        "keras_default_input": side(False),
        "wall_ratio": round(mean_wall(True) / mean_wall(False), 3),
        "same_validation_losses": all(a[2] == b[2] for a, b in zip(figures[True], figures[False], strict=True)),
    }))


if __name__ == "__main__":
    sys.exit(main())
