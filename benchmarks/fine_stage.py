"""The fine stage's training step against the CPU's matrix-product rate, in one run.

The default recipe's fine stage trains the backbone's top block and the head on cached
features of the blocks below: for VGG16 at 64 px, block5 (three 3x3 convolutions of 512
channels) on 4x4x512 maps; for ResNet50 (``--backbone resnet50``), conv5_block3 on 2x2x2048
maps. The step is timed as Keras compiles it by default (no XLA on a CPU), compiled by XLA,
and, in a process of its own, with TensorFlow's oneDNN kernels turned on
(``TF_ENABLE_ONEDNN_OPTS=1``, read once per process); "transferkit" is the one transferkit
runs on this CPU (``runtime.prefer_onednn``, else ``training.compile.xla_pays``). Each rate
in GFLOP/s is set against a bare 2048x2048 float32 matrix product in the same process.
Prints one JSON line.

    python benchmarks/fine_stage.py [--backbone resnet50]
    TRANSFERKIT_TEST_CPU=avx2 python benchmarks/fine_stage.py   # as on a CPU without AVX-512

``TRANSFERKIT_TEST_CPU=avx2`` runs it as on such a CPU: TensorFlow alone without oneDNN (as it
runs there by default), oneDNN's kernels (TensorFlow's where turned on, OpenVINO's) capped to
AVX2, no AVX-512 flag read.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if os.environ.get("TRANSFERKIT_TEST_CPU") == "avx2":
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("ONEDNN_MAX_CPU_ISA", "AVX2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

import transferkit.runtime  # noqa: E402  (cpu_flags leaves AVX-512 and AMX out under the emulation)


def top_part(size: int, classes: int, backbone: str = "vgg16"):
    """The fine stage's model: the backbone's top block and the default head on the output of
    the block below."""
    from transferkit.backbones import get_spec, load_backbone
    from transferkit.model.classifier import build_classifier
    from transferkit.model.surgery import set_trainable, trainable_at
    from transferkit.recipe import HeadConfig

    spec = get_spec(backbone)
    model = build_classifier(load_backbone(backbone, "none", (size, size, 3)), classes, HeadConfig(),
                             backbone_name=backbone)
    set_trainable(model, spec, 1)
    return trainable_at(model, spec, spec.first_unfrozen(1))[0]


def step_ms(size: int, classes: int, batch: int, steps: int, xla: bool, backbone: str = "vgg16") -> tuple[float, float]:
    """Median milliseconds of a training step (after the first, traced call), and that first call's seconds."""
    import keras

    from transferkit.recipe import StageConfig
    from transferkit.training.compile import compile_for_stage

    keras.utils.set_random_seed(0)
    model = top_part(size, classes, backbone)
    compile_for_stage(model, StageConfig(epochs=1, unfreeze=1, learning_rate=1e-5), classes, jit_compile=xla)
    shape = tuple(model.input_shape[1:])
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 4, (batch, *shape)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, classes, batch), classes)
    started = time.perf_counter()
    model.train_on_batch(x, y)
    first = time.perf_counter() - started
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - started)
    return float(np.median(times)) * 1000, first


def gemm_gflops(n: int = 2048, rounds: int = 5) -> float:
    """Best rate of an n x n float32 matrix product in TensorFlow, GFLOP/s."""
    import tensorflow as tf

    a = tf.random.normal((n, n))
    tf.matmul(a, a).numpy()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        tf.matmul(a, a).numpy()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def step_flops(model, batch: int) -> float:
    """FLOPs of a training step: the convolutions' and dense layers' multiply-adds, forward
    and backward (about twice the forward)."""
    from transferkit.model.surgery import walk_layers

    total = 0
    for layer in walk_layers(model):
        kernel = getattr(layer, "kernel", None)
        if kernel is None:
            continue
        out = layer.output.shape
        positions = int(out[1]) * int(out[2]) if len(out) == 4 else 1
        total += positions * int(np.prod(kernel.shape))
    return 3 * batch * 2 * total


def measured(args, xla: bool, gemm: float, flops: float) -> dict:
    ms, first = step_ms(args.size, args.classes, args.batch, args.steps, xla, args.backbone)
    rate = flops / (ms / 1000) / 1e9
    return {"step_ms": round(ms, 1), "gflops": round(rate, 1), "share_of_gemm": round(rate / gemm, 3),
            "first_call_s": round(first, 2), "gemm_gflops": round(gemm, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vgg16", choices=("vgg16", "resnet50"))
    parser.add_argument("--size", type=int, default=64, help="image size (64: 4x4 maps into VGG16's block5)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--child-onednn", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from transferkit.training.compile import xla_pays

    flops = step_flops(top_part(args.size, args.classes, args.backbone), args.batch)
    if args.child_onednn:  # TensorFlow with oneDNN, in this process of its own
        print(json.dumps(measured(args, False, gemm_gflops(), flops)))
        return
    chosen = xla_pays(top_part(args.size, args.classes, args.backbone), steps=10**6)
    gemm = gemm_gflops()
    figures = {label: measured(args, xla, gemm, flops) for label, xla in (("keras_default", False), ("xla", True))}
    gemm_after = gemm_gflops()
    import subprocess

    child = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--child-onednn"],
                           env={**os.environ, "TF_ENABLE_ONEDNN_OPTS": "1"}, capture_output=True, text=True, check=True)
    figures["onednn"] = json.loads(child.stdout.strip().splitlines()[-1])
    onednn_by_transferkit = transferkit.runtime.onednn_worth_turning_on(transferkit.runtime.cpu_flags())
    taken = "onednn" if onednn_by_transferkit else ("xla" if chosen else "keras_default")
    ours = figures[taken]
    print(json.dumps({
        "benchmark": "fine_stage", "machine": transferkit.runtime.machine_facts(),
        "emulated_cpu": os.environ.get("TRANSFERKIT_TEST_CPU", ""),
        "size": args.size, "batch": args.batch, "gflop_per_step": round(flops / 1e9, 2),
        "gemm_gflops": round(gemm, 1), "gemm_gflops_after": round(gemm_after, 1),
        "backbone": args.backbone, "transferkit_runs": taken, "transferkit": ours, **figures,
        "ratio_transferkit_to_keras_default_step": round(ours["step_ms"] / figures["keras_default"]["step_ms"], 3),
    }))


if __name__ == "__main__":
    sys.exit(main())
