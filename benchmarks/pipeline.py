"""Input pipeline throughput next to the training throughput of the model it feeds.

Measures, in one process on a generated folder: decode+resize (once per run), augmentation
of an epoch of batches as training reads them (ImageBatches, 1 and N worker threads), and
the training throughput of the classifier those batches feed (an uncached, partly
unfrozen stage: the case where the pipeline must keep up every epoch). Prints one JSON line.

    python benchmarks/pipeline.py --backbone vgg16 --size 64 --images 600
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


from transferkit.backbones import REGISTRY, load_backbone  # noqa: E402
from transferkit.data.augment import build_augmenter  # noqa: E402
from transferkit.data.batches import ImageBatches  # noqa: E402
from transferkit.data.folders import index_folder  # noqa: E402
from transferkit.data.images import decode_images  # noqa: E402
from transferkit.data.synthetic import write_shapes_dataset  # noqa: E402
from transferkit.model.classifier import build_classifier  # noqa: E402
from transferkit.model.surgery import set_trainable  # noqa: E402
from transferkit.outputs import encode_targets  # noqa: E402
from transferkit.recipe import AugmentConfig, StageConfig  # noqa: E402
from transferkit.runtime import (  # noqa: E402
    dtype_policy,
    machine_facts,  # noqa: E402
    resolve_precision,
)
from transferkit.training.compile import compile_for_stage  # noqa: E402


def epoch_through(batches) -> float:
    started = time.perf_counter()
    for index in range(len(batches)):
        batches[index]
    return time.perf_counter() - started


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args(argv)

    classes = 6
    with tempfile.TemporaryDirectory(prefix="tk-pipeline-") as tmp:
        root = write_shapes_dataset(
            Path(tmp) / "data", classes, args.images // classes, size=max(args.size * 2, 96), seed=0
        )
        index = index_folder(root)
        started = time.perf_counter()
        images, _, _ = decode_images(index.paths, args.size)
        decode_seconds = time.perf_counter() - started
    labels = index.labels
    targets = encode_targets(labels, classes)
    factory = lambda: build_augmenter(AugmentConfig())  # noqa: E731
    augment = {}
    for workers in (1, os.cpu_count() or 1):
        batches = ImageBatches(
            images, targets, args.batch, shuffle=True, augmenter_factory=factory, seed=0, workers=workers
        )
        epoch_through(batches)  # warm-up: per-thread augmenters are built
        seconds = epoch_through(batches)
        augment[f"workers_{workers}"] = round(len(images) / seconds, 1)

    policy, _ = resolve_precision(args.precision)
    with dtype_policy(policy):
        backbone = load_backbone(args.backbone, "none", (args.size, args.size, 3))
        model = build_classifier(backbone, classes, backbone_name=args.backbone)
    stage = StageConfig(epochs=1, learning_rate=3e-5, unfreeze=1)
    set_trainable(model, REGISTRY[args.backbone], stage.unfreeze)
    compile_for_stage(model, stage, classes)
    plain = ImageBatches(images, targets, args.batch, shuffle=True, seed=0)
    model.fit(plain, epochs=1, verbose=0, shuffle=False)  # warm-up: tracing
    started = time.perf_counter()
    model.fit(plain, epochs=1, verbose=0, shuffle=False)
    train_rate = len(images) / (time.perf_counter() - started)
    best_augment = max(augment.values())
    print(
        json.dumps(
            {
                "benchmark": "pipeline",
                "machine": machine_facts(),
                "backbone": args.backbone,
                "size": args.size,
                "images": len(images),
                "precision": policy,
                "decode_resize_images_per_s": round(len(images) / decode_seconds, 1),
                "augment_images_per_s": augment,
                "train_images_per_s": round(train_rate, 1),
                "ratio_augment_to_train": round(best_augment / train_rate, 2),
                "ratio_decode_to_train": round(len(images) / decode_seconds / train_rate, 2),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
