"""Which recipe defaults help: one setting at a time around a shipped recipe, over several datasets.

For every dataset and seed, finetune runs with the recipe as shipped and then with each other
value of one setting (an "axis"; every other setting as shipped), and each run is scored on a
test split that finetune never sees (neither its training nor its validation images):

    schedule   every stage's learning-rate schedule: constant, cosine, one-cycle
    fine_lr    the learning rates of the stages after the first, x1/3 and x3
    unfreeze   the last stage's unfrozen blocks, one fewer and one more
    views      cache.views (stored versions per image): 1, 2, 3
    augment    shift, contrast and rotation x0, x0.5, x1 and x2 (flips as the recipe says)
    flip       augment.hflip: true (every stage), false, "auto" (judged after the first stage)
    backbone   --backbones (accuracy per minute of each family, the rest of the recipe as is)

With ``--tta`` every run is scored on the test split with ``--tta`` as well (the variants its
finetune kept), and the JSON line and table say per dataset how TTA's test accuracy and log
loss differ from plain prediction's (paired by run, with standard errors).

The datasets: scikit-learn's 1,797 handwritten digits (10 classes), scikit-image's LFW subset
(100 faces and 100 other crops: two classes, the sigmoid head), generated shapes and generated
textures (``transferkit.data.synthetic``, 6 classes each). All four are on disk with their
packages: nothing is downloaded but the backbone's weights.

Prints a line per run as it ends, then one JSON line: the machine, the settings, every run, and
per axis and value the mean test accuracy, its paired difference from the shipped value (mean
over datasets x seeds, with its standard error), mean seconds and accuracy per minute, and a
verdict. A value is "better" (or "worse") where the difference is beyond two standard errors;
the axis's choice is the best "better" value, else a value no worse and at most 0.8 of the
shipped value's seconds, else the shipped value. ``--markdown`` prints the table as well.

    python benchmarks/defaults.py --size 96                        # imagenet weights (downloaded)
    python benchmarks/defaults.py --weights none --axes views,augment --seeds 1

Defaults must be chosen from runs on the weights users get: ``--weights imagenet`` (Keras
downloads them once) or a weights file. With ``--weights none`` the figures say how the
settings act on random features, not on pretrained ones.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import transferkit  # noqa: E402
from transferkit.recipe import load_recipe  # noqa: E402
from transferkit.runtime import machine_facts  # noqa: E402

DATASETS = ("digits", "faces", "shapes", "textures")
AXES = ("schedule", "fine_lr", "unfreeze", "views", "augment", "flip", "backbone")
BACKBONES = ("vgg16", "resnet50", "efficientnetv2-b0", "convnext-tiny", "mobilenetv3-large")
TEST_SHARE = 0.25
NOISE = 2.0  # standard errors of the paired difference beyond which a value is better or worse
FASTER = 0.8  # a value no worse than the shipped one is chosen when it takes at most this share of its time


def dataset_images(name: str, size: int, per_class: int | None, seed: int) -> dict[str, list[Image.Image]]:
    """The images of a dataset by class, as size-px RGB images (``per_class``: at most that
    many of each class of a real dataset, that many of a generated one)."""
    from transferkit.data import synthetic

    def grey(pixels: np.ndarray, top: float) -> Image.Image:
        image = Image.fromarray((pixels * (255 / top)).astype("uint8")).convert("RGB")
        return image.resize((size, size), Image.BILINEAR)

    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        classes = {str(d): [grey(p, 16) for p in digits.images[digits.target == d]] for d in range(10)}
    elif name == "faces":
        from skimage.data import lfw_subset  # 100 faces, then 100 crops of other things

        crops = lfw_subset()
        classes = {"face": [grey(p, 1) for p in crops[:100]], "not_face": [grey(p, 1) for p in crops[100:]]}
    elif name in ("shapes", "textures"):
        kinds, draw = ((synthetic.SHAPES[:6], synthetic.draw_shape) if name == "shapes"
                       else (synthetic.TEXTURES, synthetic.draw_texture))
        rng = np.random.default_rng(seed)
        return {kind: [draw(kind, size, rng) for _ in range(per_class or 100)] for kind in kinds}
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    return {label: images[:per_class] if per_class else images for label, images in classes.items()}


def write_split(images: dict[str, list[Image.Image]], root: Path, seed: int) -> tuple[Path, Path]:
    """``root/train/<class>/`` and ``root/test/<class>/``: a seeded TEST_SHARE of each class
    held out for testing."""
    rng = np.random.default_rng(seed)
    for label, members in images.items():
        order = rng.permutation(len(members))
        held = set(order[:max(1, round(TEST_SHARE * len(members)))].tolist())
        for index, image in enumerate(members):
            folder = root / ("test" if index in held else "train") / label
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{label}_{index:04d}.png")
    return root / "train", root / "test"


def candidates(recipe, axes: list[str], backbones: list[str]) -> list[tuple[str, str, dict]]:
    """(axis, value, overrides) of every value tried besides the shipped recipe's, whose
    value per axis ``shipped_values`` gives."""
    stages = recipe.stages
    last = len(stages) - 1
    shipped = shipped_values(recipe)
    tried = {
        "schedule": [(s, {"stages.0:.schedule": s}) for s in ("constant", "cosine", "one-cycle")],
        "fine_lr": [(f"x{label}", {f"stages.{i}.learning_rate": stages[i].learning_rate * factor
                                   for i in range(1, len(stages))})
                    for label, factor in (("1/3", 1 / 3), ("3", 3.0))] if len(stages) > 1 else [],
        "unfreeze": [(str(n), {f"stages.{last}.unfreeze": n})
                     for n in (stages[last].unfreeze - 1, stages[last].unfreeze + 1)
                     if isinstance(stages[last].unfreeze, int) and n >= 1 and last > 0],
        "views": [(str(n), {"cache.views": n}) for n in (1, 2, 3)],
        "augment": [(f"x{factor:g}", {"augment.shift": recipe.augment.shift * factor,
                                       "augment.contrast": recipe.augment.contrast * factor,
                                       "augment.rotation": recipe.augment.rotation * factor})
                    for factor in (0.0, 0.5, 1.0, 2.0)],
        "flip": [(_flip_name(flip), {"augment.hflip": flip}) for flip in (True, False, "auto")],
        "backbone": [(name, {"backbone": name}) for name in backbones],
    }
    return [(axis, value, overrides) for axis in axes for value, overrides in tried[axis]
            if value != shipped[axis]]


def shipped_values(recipe) -> dict[str, str]:
    """Each axis's value in the recipe as given (the name its runs are reported under)."""
    return {"schedule": recipe.stages[0].schedule, "fine_lr": "x1", "unfreeze": str(recipe.stages[-1].unfreeze),
            "views": str(recipe.cache.views), "augment": "x1", "flip": _flip_name(recipe.augment.hflip),
            "backbone": recipe.backbone}


def _flip_name(hflip) -> str:
    return hflip if isinstance(hflip, str) else str(hflip).lower()


def verdicts(rows: list[dict], shipped: dict[str, str]) -> dict[str, dict]:
    """Per axis: each value's mean test accuracy, seconds and accuracy per minute, its paired
    difference from the shipped value over the (dataset, seed) pairs both ran, and the choice.

    Args:
        rows: {"axis", "value", "dataset", "seed", "accuracy", "seconds"}; the shipped recipe's
            runs have axis "shipped".
        shipped: ``shipped_values`` of the recipe.
    """
    base = {(r["dataset"], r["seed"]): r for r in rows if r["axis"] == "shipped"}
    summary = {}
    for axis in dict.fromkeys(r["axis"] for r in rows if r["axis"] != "shipped"):
        values = [{"value": shipped[axis], "shipped": True, **_means(list(base.values()))}]
        for value in dict.fromkeys(r["value"] for r in rows if r["axis"] == axis):
            runs = [r for r in rows if r["axis"] == axis and r["value"] == value and (r["dataset"], r["seed"]) in base]
            mean, error = paired([r["accuracy"] - base[(r["dataset"], r["seed"])]["accuracy"] for r in runs])
            seconds = sum(r["seconds"] for r in runs) / sum(base[(r["dataset"], r["seed"])]["seconds"] for r in runs)
            values.append({"value": value, "shipped": False, **_means(runs), "difference": mean,
                           "standard_error": error, "seconds_over_shipped": seconds, "verdict": verdict(mean, error)})
        summary[axis] = {"values": values, **_choice(values)}
    return summary


def paired(differences: list[float]) -> tuple[float, float]:
    """The mean of paired differences and its standard error (infinite for a single pair)."""
    differences = np.asarray(differences, dtype="float64")
    error = float(differences.std(ddof=1) / math.sqrt(len(differences))) if len(differences) > 1 else math.inf
    return float(differences.mean()), error


def verdict(mean: float, error: float) -> str:
    """"better" or "worse" where the mean difference lies beyond ``NOISE`` standard errors of
    nothing, else "same"."""
    return "better" if mean - NOISE * error > 0 else "worse" if mean + NOISE * error < 0 else "same"


def _means(runs: list[dict]) -> dict:
    accuracy = float(np.mean([r["accuracy"] for r in runs]))
    seconds = float(np.mean([r["seconds"] for r in runs]))
    return {"runs": len(runs), "accuracy": accuracy, "seconds": seconds, "accuracy_per_minute": accuracy * 60 / seconds}


def _choice(values: list[dict]) -> dict:
    better = [v for v in values if v.get("verdict") == "better"]
    if better:
        best = max(better, key=lambda v: v["accuracy"])
        return {"choice": best["value"], "why": f"better by {100 * best['difference']:+.1f} points "
                                                f"(standard error {100 * best['standard_error']:.1f})"}
    faster = [v for v in values if v.get("verdict") == "same" and v["seconds_over_shipped"] <= FASTER]
    if faster:
        best = min(faster, key=lambda v: v["seconds_over_shipped"])
        share = best["seconds_over_shipped"]
        return {"choice": best["value"], "why": f"no worse ({100 * best['difference']:+.1f} points, standard error "
                                                f"{100 * best['standard_error']:.1f}) in {share:.2f} of the time"}
    return {"choice": values[0]["value"], "why": "no other value is clearly better, nor as good and clearly faster"}


def one_run(train: Path, test: Path, recipe, overrides: dict, output: Path, tta: bool = False) -> dict:
    """finetune on ``train`` (its seconds) and evaluate on ``test`` (with ``tta``, with
    ``--tta`` too); the run folder is removed."""
    import keras

    started = time.perf_counter()
    run = transferkit.finetune(train, recipe, overrides, output=output, force=True, verbose=0)
    seconds = time.perf_counter() - started
    metrics = transferkit.evaluate_folder(run, test).metrics
    figures = {"seconds": seconds, "accuracy": metrics["accuracy"], "log_loss": metrics["log_loss"],
               "hflip": (run.metrics.get("hflip") or {}).get("kept")}
    if tta:
        averaged = transferkit.evaluate_folder(run, test, tta=True).metrics
        figures.update(tta_accuracy=averaged["accuracy"], tta_log_loss=averaged["log_loss"],
                       tta_variants=averaged["tta"])
    shutil.rmtree(output, ignore_errors=True)
    del run
    keras.backend.clear_session()
    gc.collect()
    return figures


def tta_summary(rows: list[dict]) -> dict[str, dict]:
    """Per dataset, over its runs scored with ``--tta`` too: the mean test accuracy and log
    loss of plain prediction and of TTA, TTA's paired differences with their standard errors,
    and a verdict on accuracy ("worse" where TTA's is lower beyond ``NOISE`` standard errors,
    "better" where higher, else "same")."""
    summary = {}
    for dataset in dict.fromkeys(r["dataset"] for r in rows if "tta_accuracy" in r):
        runs = [r for r in rows if r["dataset"] == dataset and "tta_accuracy" in r]
        found = {"runs": len(runs)}
        for figure in ("accuracy", "log_loss"):
            mean, error = paired([r[f"tta_{figure}"] - r[figure] for r in runs])
            found.update({figure: float(np.mean([r[figure] for r in runs])),
                          f"tta_{figure}": float(np.mean([r[f"tta_{figure}"] for r in runs])),
                          f"{figure}_difference": mean, f"{figure}_standard_error": error})
        found["verdict"] = verdict(found["accuracy_difference"], found["accuracy_standard_error"])
        summary[dataset] = found
    return summary


def markdown(summary: dict) -> str:
    lines = ["| axis | value | test accuracy | vs shipped (s.e.) | seconds | accuracy / min | verdict |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for axis, found in summary.items():
        for v in found["values"]:
            versus = ("shipped" if v["shipped"] else
                      f"{100 * v['difference']:+.1f} ({100 * v['standard_error']:.1f})")
            lines.append(f"| {axis} | {v['value']} | {100 * v['accuracy']:.1f}% | {versus} | {v['seconds']:.1f} | "
                         f"{v['accuracy_per_minute']:.2f} | {v.get('verdict', '')} |")
        lines.append(f"| {axis} | **choice: {found['choice']}** | | | | | {found['why']} |")
    return "\n".join(lines)


def tta_markdown(summary: dict) -> str:
    lines = ["| dataset | runs | test accuracy plain -> --tta | difference (s.e.) | log loss plain -> --tta "
             "| verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for dataset, found in summary.items():
        lines.append(f"| {dataset} | {found['runs']} | {100 * found['accuracy']:.1f}% -> "
                     f"{100 * found['tta_accuracy']:.1f}% | {100 * found['accuracy_difference']:+.1f} "
                     f"({100 * found['accuracy_standard_error']:.1f}) | {found['log_loss']:.3f} -> "
                     f"{found['tta_log_loss']:.3f} | {found['verdict']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart", help="shipped recipe name or TOML file (default quickstart)")
    parser.add_argument("--weights", default="imagenet", help="imagenet (downloaded), none, or a weights file")
    parser.add_argument("--size", type=int, default=None, help="image size (default: the recipe's)")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--axes", default=",".join(AXES))
    parser.add_argument("--backbones", default=",".join(BACKBONES), help="the backbone axis's values")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per dataset (default 2)")
    parser.add_argument("--per-class", type=int, default=None,
                        help="images per class (default: all of a real dataset, 100 generated)")
    parser.add_argument("--head-epochs", type=int, default=None, help="the first stage's epochs (default: recipe's)")
    parser.add_argument("--fine-epochs", type=int, default=None, help="later stages' epochs (default: recipe's)")
    parser.add_argument("--tta", action="store_true", help="score every run with --tta too")
    parser.add_argument("--markdown", action="store_true", help="print the summary as a table too")
    args = parser.parse_args(argv)
    datasets, axes = args.datasets.split(","), args.axes.split(",")
    unknown = sorted(set(datasets) - set(DATASETS)) + sorted(set(axes) - set(AXES))
    if unknown:
        parser.error(f"unknown dataset or axis: {', '.join(unknown)} (datasets: {', '.join(DATASETS)}; "
                     f"axes: {', '.join(AXES)})")
    fixed = {"weights": args.weights, "image_size": args.size, "stages.0.epochs": args.head_epochs,
             "stages.1:.epochs": args.fine_epochs}
    try:
        recipe = load_recipe(args.recipe, {key: value for key, value in fixed.items() if value is not None})
        shipped = shipped_values(recipe)
        rows = measure(args, datasets, recipe, candidates(recipe, axes, [b for b in args.backbones.split(",") if b]))
    except transferkit.TransferkitError as error:  # e.g. no network for --weights imagenet: one line
        print(f"error: {error}", file=sys.stderr)
        return 1
    summary = verdicts(rows, shipped)
    tta = tta_summary(rows)
    print(json.dumps({"machine": machine_facts(), "recipe": args.recipe, "weights": args.weights,
                      "image_size": recipe.image_size, "datasets": datasets, "seeds": args.seeds,
                      "shipped": shipped, "summary": summary, **({"tta": tta} if args.tta else {}), "runs": rows}))
    if args.markdown:
        print(markdown(summary))
        if args.tta:
            print(tta_markdown(tta))
    return 0


def measure(args, datasets: list[str], recipe, tried: list[tuple[str, str, dict]]) -> list[dict]:
    """Every run of every dataset and seed: the shipped recipe's, then each tried value's."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="tk-defaults-") as scratch:
        for dataset in datasets:
            for seed in range(1, args.seeds + 1):
                folder = Path(scratch) / f"{dataset}-{seed}"
                train, test = write_split(dataset_images(dataset, recipe.image_size, args.per_class, seed),
                                          folder, seed)
                for axis, value, overrides in [("shipped", "", {}), *tried]:
                    figures = one_run(train, test, recipe, {"seed": seed, **overrides}, folder / "run", args.tta)
                    rows.append({"dataset": dataset, "seed": seed, "axis": axis, "value": value, **figures})
                    print(f"{dataset} seed {seed} {axis} {value}: test accuracy {figures['accuracy']:.3f}"
                          + (f" (--tta {figures['tta_accuracy']:.3f})" if args.tta else "")
                          + f", {figures['seconds']:.1f} s", file=sys.stderr, flush=True)
                shutil.rmtree(folder, ignore_errors=True)
    return rows


if __name__ == "__main__":
    sys.exit(main())
