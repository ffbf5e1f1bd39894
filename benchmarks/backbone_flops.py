"""Multiply-adds and parameters of every registered backbone at its ImageNet size and at 224
px, counted from the Keras model itself, and its float32 forward images/s through Keras on
this CPU (random weights: the cost of a forward pass does not depend on them).

The count covers the convolutions and the Dense layers that act as 1x1 convolutions
(ConvNeXt's), which are nearly all of a backbone's arithmetic: per output position,
kernel height x width x input channels / groups x output channels (x the depth multiplier for
depthwise ones). Normalisation, activations, pooling and squeeze-excite products are left out.

    python benchmarks/backbone_flops.py            # one JSON line; --batches 0 skips timing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from transferkit.backbones import REGISTRY, load_backbone  # noqa: E402
from transferkit.model.surgery import walk_layers  # noqa: E402
from transferkit.runtime import machine_facts  # noqa: E402


def multiply_adds(backbone) -> int:
    """Multiply-adds of one image's forward pass through the convolutions and Dense layers."""
    total = 0
    for layer in walk_layers(backbone):
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D, keras.layers.Dense)):
            positions = int(np.prod(layer.output.shape[1:-1])) if len(layer.output.shape) > 2 else 1
            total += positions * int(np.prod(layer.kernel.shape))
    return total


def images_per_second(backbone, size: int, batches: int, batch_size: int = 8) -> float:
    """Float32 forward images/s of ``backbone`` (after one warm-up batch)."""
    forward = backbone
    x = np.random.default_rng(0).uniform(0, 255, (batch_size, size, size, 3)).astype("float32")
    forward.predict_on_batch(x)
    start = time.perf_counter()
    for _ in range(batches):
        forward.predict_on_batch(x)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=3, help="timed batches of 8 at 224 px (0: none)")
    args = parser.parse_args()
    rows = {}
    for name, spec in sorted(REGISTRY.items()):
        at_224 = load_backbone(name, weights="none", input_shape=(224, 224, 3))
        native = at_224 if spec.default_size == 224 else load_backbone(
            name, weights="none", input_shape=(spec.default_size, spec.default_size, 3))
        row = {"parameters": at_224.count_params(), "gmacs_224": round(multiply_adds(at_224) / 1e9, 3),
               "default_size": spec.default_size, "gmacs_default_size": round(multiply_adds(native) / 1e9, 3)}
        if args.batches:
            row["images_per_s_224_float32"] = round(images_per_second(at_224, 224, args.batches), 1)
        rows[name] = row
    print(json.dumps({"benchmark": "backbone_flops", "machine": machine_facts(), "backbones": rows}))


if __name__ == "__main__":
    main()
