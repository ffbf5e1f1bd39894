"""A study's trials with and without the shared feature cache (``training.features.FeatureCache``).

Each trial is what ``transferkit tune`` runs per trial: ``workflow.train_prepared`` on data
decoded once, with a recipe that differs from the others in the head's learning rate and
width only (the frozen part, the augmentation and the engine are the same). The baseline
runs the same trials, in the same process and order, each computing its own features.

    python benchmarks/tune_features.py                       # VGG16, 96 px, 4 trials
    python benchmarks/tune_features.py --backbone resnet50 --size 64 --trials 3

Prints one JSON line: seconds per trial in both modes, the ratio of the later trials'
mean (shared / own; the first trial computes the features either way), and the trials'
validation accuracies in both modes (equal but for float rounding: the shared features are
the values the first trial computed). Weights are random ("none"): speed does not depend
on their values.
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

import keras  # noqa: E402

from transferkit import workflow  # noqa: E402
from transferkit.data.synthetic import write_shapes_dataset  # noqa: E402
from transferkit.recipe import load_recipe  # noqa: E402
from transferkit.runtime import machine_facts  # noqa: E402
from transferkit.training.features import FeatureCache  # noqa: E402

# What the trials vary: the head's rate and width (a search over the head).
TRIALS = [(1e-3, 64), (3e-3, 32), (3e-4, 128), (1e-2, 64), (2e-3, 16), (5e-4, 256)]


def trial_seconds(prepared: dict, recipes: list, cache: FeatureCache | None) -> tuple[list[float], list[float]]:
    """(seconds, final validation accuracy) of each trial, trained as tune trains one."""
    seconds, accuracies = [], []
    for recipe in recipes:
        keras.backend.clear_session()
        started = time.perf_counter()
        run = workflow.train_prepared(prepared, recipe, calibrate=False, feature_cache=cache, verbose=0)
        seconds.append(round(time.perf_counter() - started, 2))
        accuracies.append(round(run.metrics["final"]["val_accuracy"], 4))
    return seconds, accuracies


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--per-class", type=int, default=60)
    parser.add_argument("--trials", type=int, default=4, choices=range(2, len(TRIALS) + 1))
    parser.add_argument("--head-epochs", type=int, default=3)
    parser.add_argument("--fine-epochs", type=int, default=2)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as folder:
        data = write_shapes_dataset(Path(folder) / "data", classes=3, per_class=args.per_class, size=args.size)
        base = {"backbone": args.backbone, "weights": "none", "image_size": args.size,
                "stages.0.epochs": args.head_epochs, "stages.1.epochs": args.fine_epochs}
        recipes = [load_recipe(None, {**base, "stages.0.learning_rate": rate, "head.units": [units]})
                   for rate, units in TRIALS[: args.trials]]
        prepared = workflow.prepare_data(data, recipes[0], verbose=0)
        own, own_accuracy = trial_seconds(prepared, recipes, None)
        cache = FeatureCache()
        shared, shared_accuracy = trial_seconds(prepared, recipes, cache)
        hits = cache.hits
        cache.close()

    later = slice(1, None)
    ratio = (sum(shared[later]) / len(shared[later])) / (sum(own[later]) / len(own[later]))
    print(json.dumps({
        "machine": machine_facts(),
        "benchmark": "tune_features",
        "backbone": args.backbone,
        "size": args.size,
        "images": 3 * args.per_class,
        "epochs": [args.head_epochs, args.fine_epochs],
        "seconds_per_trial": {"own_features": own, "shared_cache": shared},
        "later_trials_ratio": round(ratio, 3),
        "boundaries_taken_from_cache": hits,
        "val_accuracy": {"own_features": own_accuracy, "shared_cache": shared_accuracy},
    }))


if __name__ == "__main__":
    sys.exit(main())
