"""The work after training: calibration, the TTA choice and the rejection fit, each timed.

finetune ends with forward passes over the validation (and training) images: calibration
(``evaluation.calibration.calibrate``), the TTA choice (``evaluation.tta.fit_tta``: each
judged image once per variant) and the rejection fit (``trust.record.fit_trust``:
probabilities and embeddings of the validation images and of up to 5,000 training images).
This script times each on a generated dataset with a model built as finetune builds it
(weights "none", the head untrained: the forward passes cost what a trained model's do),
two ways in one process:

- "separate": each step on its own, as they ran before one engine was shared (``fit_tta``
  and ``fit_trust`` without ``forward``: TTA calls the Keras model eagerly, the rejection fit
  builds its own engine);
- "shared": the one ``ForwardPasses`` finetune builds now (``trust.record.after_training_forward``),
  its networks written to the engine cache of a run folder, used by both, the validation images'
  plain pass computed once.

It prints one JSON line: seconds per step each way, the engine the shared passes used,
whether both ways kept the same TTA transforms, and the two rejection thresholds.

    TRANSFERKIT_TEST_CPU=avx2 TF_ENABLE_ONEDNN_OPTS=0 ONEDNN_MAX_CPU_ISA=AVX2 \\
        python benchmarks/after_training.py --backbone vgg16 --size 64 --images 1500
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("separate", "shared", "both"), default="both")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        os.environ.setdefault("TRANSFERKIT_CACHE", str(Path(scratch) / "cache"))
        print(json.dumps(measure(args, Path(scratch))))


def measure(args, scratch: Path) -> dict:
    from transferkit.data.prepare import prepare_data
    from transferkit.data.synthetic import write_shapes_dataset
    from transferkit.evaluation.calibration import calibrate
    from transferkit.evaluation.tta import fit_tta
    from transferkit.model.build import build_model
    from transferkit.recipe import load_recipe
    from transferkit.runtime import machine_facts
    from transferkit.trust import record

    data = write_shapes_dataset(scratch / "data", args.classes, args.images // args.classes, size=args.size,
                                seed=args.seed)
    recipe = load_recipe(None, {"backbone": args.backbone, "weights": "none", "image_size": args.size,
                                "batch_size": args.batch, "seed": args.seed, "head.units": [256]})
    prepared = prepare_data(data, recipe, verbose=0)
    model = build_model(recipe, prepared.n_classes).model
    figures = {"benchmark": "after_training", "machine": machine_facts(), "backbone": args.backbone,
               "size": args.size, "train_images": len(prepared.train_labels),
               "val_images": len(prepared.val_labels)}

    started = time.perf_counter()
    calibrate(model, prepared.val_images, prepared.val_labels, prepared.n_classes, batch_size=recipe.batch_size)
    figures["calibration_seconds"] = round(time.perf_counter() - started, 2)

    results = {}
    if args.only in ("separate", "both"):
        started = time.perf_counter()
        choice = fit_tta(model, prepared, recipe)
        middle = time.perf_counter()
        trust = record.fit_trust(model, prepared, recipe)
        ended = time.perf_counter()
        results["separate"] = (choice, trust)
        figures["separate"] = {"tta_seconds": round(middle - started, 2), "rejection_seconds": round(ended - middle, 2)}
    if args.only in ("shared", "both") and hasattr(record, "after_training_forward"):
        started = time.perf_counter()
        forward = record.after_training_forward(model, prepared, recipe, run_path=scratch / "run")
        choice = fit_tta(model, prepared, recipe, forward=forward)
        middle = time.perf_counter()
        trust = record.fit_trust(model, prepared, recipe, forward=forward)
        ended = time.perf_counter()
        results["shared"] = (choice, trust)
        figures["shared"] = {"tta_seconds": round(middle - started, 2), "rejection_seconds": round(ended - middle, 2),
                             "engine": forward.engine_name, "engines_built": forward.builds,
                             "validation_passes": forward.validation_passes}
    for name, (choice, trust) in results.items():
        figures[name].update(kept=choice.get("kept"), threshold=trust.rejection.record["threshold"])
    if len(results) == 2:
        figures["same_kept"] = results["separate"][0].get("kept") == results["shared"][0].get("kept")
        for way in ("separate", "shared"):
            figures[way]["total_seconds"] = round(figures[way]["tta_seconds"] + figures[way]["rejection_seconds"], 2)
        figures["shared_over_separate"] = round(figures["shared"]["total_seconds"]
                                                / figures["separate"]["total_seconds"], 3)
    return figures


if __name__ == "__main__":
    main()
