"""Training throughput on GPUs: images/s of each stage of each backbone's shipped recipe, in
float32 and in mixed precision, against the bare backbone's forward pass in the same run, on
one device and on all local devices.

    python benchmarks/gpu.py                                 # every backbone, 224 px
    python benchmarks/gpu.py --backbones resnet50 --precisions mixed
    python benchmarks/gpu.py --quick                         # VGG16 at 32 px, one step: the CPU test

Prints one JSON line per backbone, precision and device count, with the device it ran on.
Mixed precision is mixed_float16 on GPUs of compute capability 7.x and mixed_bfloat16 on 8.0
or newer (and on a CPU); a GPU older than 7.0 has no mixed figure. Per line:

- ``forward``: the frozen backbone's forward pass (what the feature cache and predict run),
  the baseline;
- ``stages``: a training step of the whole classifier on images with the stage's blocks open
  (the recipe's ``unfreeze``; the head stage trains through a frozen backbone), and
  ``head_cached``: the head stage as transferkit trains it once the features are cached (the
  head alone, on the backbone's output);
- ``over_forward``: each of those divided by ``forward``.

All devices: the batch per device times the devices is the global batch; TensorFlow splits it
with ``tf.distribute.MirroredStrategy`` (transferkit's ``--strategy mirrored``), JAX with
``keras.distribution.DataParallel``. Weights are random: speed does not depend on their
values. Runs on the TensorFlow or the JAX backend (``KERAS_BACKEND``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from transferkit.backbones import available_backbones, get_spec, load_backbone  # noqa: E402
from transferkit.model.classifier import build_classifier  # noqa: E402
from transferkit.model.surgery import set_trainable, trainable_at  # noqa: E402
from transferkit.recipe import available_recipes, load_recipe  # noqa: E402
from transferkit.runtime import dtype_policy, machine_facts  # noqa: E402
from transferkit.training.compile import compile_for_stage  # noqa: E402

CLASSES = 10
PRECISIONS = ("float32", "mixed")


# --- the devices ------------------------------------------------------------------------------


def accelerators() -> list[dict]:
    """The local GPUs the backend sees: name and compute capability (an empty list on a CPU)."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        found = []
        for device in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(device)
            capability = details.get("compute_capability")
            found.append({"name": details.get("device_name", device.name),
                          "compute_capability": ".".join(map(str, capability)) if capability else None})
        return found
    if backend == "jax":
        import jax

        return [{"name": device.device_kind, "compute_capability": getattr(device, "compute_capability", None)}
                for device in jax.devices() if device.platform == "gpu"]
    raise SystemExit(f"benchmarks/gpu.py runs on the tensorflow or jax backend, not {backend}")


def mixed_policy(gpus: list[dict]) -> tuple[str | None, str]:
    """The mixed-precision policy for these GPUs (or the CPU), and why."""
    if not gpus:
        return "mixed_bfloat16", "CPU: bfloat16"
    capability = gpus[0]["compute_capability"]
    major, minor = (int(part) for part in str(capability or "0.0").split(".")[:2])
    if (major, minor) >= (8, 0):
        return "mixed_bfloat16", f"compute capability {major}.{minor}: bfloat16"
    if major == 7:
        return "mixed_float16", f"compute capability {major}.{minor}: float16"
    return None, f"compute capability {major}.{minor}: no fast 16-bit training"


def device_scope(count: int):
    """A context in which models built and trained use ``count`` devices (one: a no-op)."""
    if count == 1:
        return contextlib.nullcontext()
    if keras.backend.backend() == "tensorflow":
        from transferkit.strategies import resolve_distribution

        return resolve_distribution("mirrored", count).scope()
    return _jax_data_parallel(count)


@contextlib.contextmanager
def _jax_data_parallel(count: int):
    import jax

    devices = [device for device in jax.devices() if device.platform == "gpu"][:count]
    keras.distribution.set_distribution(keras.distribution.DataParallel(devices=devices))
    try:
        yield
    finally:
        keras.distribution.set_distribution(None)


# --- the measurements ---------------------------------------------------------------------------


def images_per_second(step, batch: int, steps: int) -> float:
    """Images/s of ``step()`` (which returns numpy, so the device has finished) after one
    warm-up call, which compiles."""
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return round(batch * steps / (time.perf_counter() - start), 2)


def measure(name: str, policy: str, devices: int, size: int, batch: int, steps: int, quick: bool = False) -> dict:
    """One backbone in one precision on ``devices`` devices: forward, every stage (with
    ``quick``, the first only), the cached head stage, each in images/s."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype("float32")
    targets = keras.utils.to_categorical(rng.integers(0, CLASSES, batch), CLASSES)
    recipe = load_recipe(name if name in available_recipes() else None, {"backbone": name, "weights": "none",
                                                                         "image_size": size})
    spec = get_spec(name)
    figures: dict = {"stages": {}}
    with device_scope(devices), dtype_policy(policy):
        backbone = load_backbone(name, weights="none", input_shape=(size, size, 3))
        backbone.trainable = False
        figures["forward"] = images_per_second(lambda: backbone.predict_on_batch(images), batch, steps)
        model = build_classifier(backbone, CLASSES, recipe.head, backbone_name=name)
        for stage in recipe.stages[:1] if quick else recipe.stages:
            set_trainable(model, spec, stage.unfreeze)
            compile_for_stage(model, stage, CLASSES, steps_per_epoch=max(1, steps))
            figures["stages"][stage.name] = images_per_second(lambda: model.train_on_batch(images, targets),
                                                              batch, steps)
        head, _ = trainable_at(model, spec, len(spec.blocks))
        features = rng.standard_normal((batch, *head.input_shape[1:])).astype("float32")
        compile_for_stage(head, recipe.stages[0], CLASSES, steps_per_epoch=max(1, steps))
        figures["stages"]["head_cached"] = images_per_second(lambda: head.train_on_batch(features, targets),
                                                             batch, steps)
    figures["over_forward"] = {stage: round(value / figures["forward"], 3)
                               for stage, value in figures["stages"].items()}
    keras.backend.clear_session()
    return figures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=224, help="input side in pixels (default 224)")
    parser.add_argument("--batch", type=int, default=64, help="images per device per step (default 64)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after the warm-up (default 5)")
    parser.add_argument("--backbones", default=",".join(available_backbones()),
                        help="comma-separated (default: every backbone)")
    parser.add_argument("--precisions", default=",".join(PRECISIONS), help="float32, mixed or both (default both)")
    parser.add_argument("--quick", action="store_true",
                        help="VGG16 at 32 px, 2 images per device, one timed step, its head stage only: a check "
                             "that it runs (on a CPU)")
    args = parser.parse_args(argv)
    if args.quick:
        args.size, args.batch, args.steps, args.backbones = 32, 2, 1, "vgg16"

    gpus = accelerators()
    mixed, mixed_reason = mixed_policy(gpus)
    counts = sorted({1, len(gpus)}) if gpus else [1]
    device = ({"kind": "GPU", "name": gpus[0]["name"], "compute_capability": gpus[0]["compute_capability"],
               "count": len(gpus)} if gpus else {"kind": "CPU", "name": machine_facts()["cpu"], "count": 1})
    backend_version = (__import__("tensorflow").__version__ if keras.backend.backend() == "tensorflow"
                       else __import__("jax").__version__)
    for name in [part.strip() for part in args.backbones.split(",") if part.strip()]:
        for precision in [part.strip() for part in args.precisions.split(",") if part.strip()]:
            policy = "float32" if precision == "float32" else mixed
            if policy is None:
                print(json.dumps({"benchmark": "gpu", "backbone": name, "precision": precision, "device": device,
                                  "skipped": mixed_reason}), flush=True)
                continue
            for count in counts:
                figures = measure(name, policy, count, args.size, args.batch * count, args.steps, args.quick)
                print(json.dumps({
                    "benchmark": "gpu",
                    "unit": "images/s",
                    "backbone": name,
                    "precision": policy,
                    "precision_reason": "float32" if policy == "float32" else mixed_reason,
                    "devices_used": count,
                    "size": args.size,
                    "batch_per_device": args.batch,
                    "global_batch": args.batch * count,
                    "steps": args.steps,
                    **figures,
                    "device": device,
                    "machine": machine_facts(),
                    "python": platform.python_version(),
                    "keras": keras.__version__,
                    "backend": keras.backend.backend(),
                    "backend_version": backend_version,
                }), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
