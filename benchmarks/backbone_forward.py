"""Frozen backbone forward pass: images/s in float32 and mixed bfloat16, with and without
BatchNorm folding, all in one process so every figure shares the machine's state.

    python benchmarks/backbone_forward.py                      # 224 px, batch 32, 3 batches
    python benchmarks/backbone_forward.py --size 64 --batches 2

Prints one JSON line. The baseline is each backbone's float32 unfolded pass; ``ratios``
gives bf16 folded / float32 unfolded (the speed-up a predict or frozen stage can expect).
Weights are random ("none"): speed does not depend on their values. Folding only changes
ResNet50 (VGG has no BatchNormalization, so its folded figure is its unfolded one).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from transferkit.backbones import load_backbone  # noqa: E402
from transferkit.model.fold import fold_batchnorm  # noqa: E402
from transferkit.runtime import dtype_policy, machine_facts  # noqa: E402

POLICIES = ("float32", "mixed_bfloat16")


def images_per_second(model, images: np.ndarray, batches: int) -> float:
    """Images/s of ``model.predict_on_batch`` after one warm-up call (which compiles)."""
    model.predict_on_batch(images)
    start = time.perf_counter()
    for _ in range(batches):
        model.predict_on_batch(images)
    return round(len(images) * batches / (time.perf_counter() - start), 2)


def measure(name: str, size: int, batch: int, batches: int) -> dict:
    """One backbone's figures: {policy: {"unfolded": ips, "folded": ips, ...}}."""
    images = np.random.default_rng(0).uniform(-128, 128, (batch, size, size, 3)).astype("float32")
    figures: dict = {}
    for policy in POLICIES:
        with dtype_policy(policy):
            backbone = load_backbone(name, weights="none", input_shape=(size, size, 3))
        backbone.trainable = False
        row = {"unfolded": images_per_second(backbone, images, batches)}
        folded = fold_batchnorm(backbone)
        figures["folded_layers"] = len(folded.folded_batchnorm)
        # Nothing folded (VGG): the copy is the same network, not worth timing twice.
        row["folded"] = images_per_second(folded, images, batches) if folded.folded_batchnorm else row["unfolded"]
        figures[policy] = row
        keras.backend.clear_session()
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--batches", type=int, default=3, help="timed batches after the warm-up (default 3)")
    parser.add_argument("--backbones", default="vgg16,resnet50", help="comma-separated (default vgg16,resnet50)")
    args = parser.parse_args(argv)

    import tensorflow as tf

    results, ratios = {}, {}
    for name in [part.strip() for part in args.backbones.split(",") if part.strip()]:
        figures = measure(name, args.size, args.batch, args.batches)
        results[name] = figures
        baseline = figures["float32"]["unfolded"]
        ratios[name] = {
            "bf16_folded_over_float32_unfolded": round(figures["mixed_bfloat16"]["folded"] / baseline, 2),
            "bf16_unfolded_over_float32_unfolded": round(figures["mixed_bfloat16"]["unfolded"] / baseline, 2),
            "float32_folded_over_float32_unfolded": round(figures["float32"]["folded"] / baseline, 2),
        }
    print(
        json.dumps(
            {
                "benchmark": "backbone_forward",
                "unit": "images/s",
                "size": args.size,
                "batch": args.batch,
                "batches": args.batches,
                "device": "GPU" if tf.config.list_physical_devices("GPU") else "CPU",
                "machine": machine_facts(),
                "python": platform.python_version(),
                "keras": keras.__version__,
                "tensorflow": tf.__version__,
                "results": results,
                "ratios": ratios,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
