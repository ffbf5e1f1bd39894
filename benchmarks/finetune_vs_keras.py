"""transferkit.finetune against the Keras transfer-learning guide written out by hand.

Both jobs run one after the other on the same generated dataset, with the same backbone,
image size, batch size, epochs per stage, learning rates and augmentation strengths, each in
a fresh process of its own (``--in-process``: both in this one, as before): the baseline
with TensorFlow as it runs alone on this CPU (``TF_ENABLE_ONEDNN_OPTS`` as given, else
TensorFlow's default for the CPU, pinned), transferkit's job with the variable removed, so
that transferkit chooses (``runtime.prefer_onednn``: oneDNN on where TensorFlow leaves it off).
The baseline is the guide's pipeline: image_dataset_from_directory, Keras augmentation layers,
a frozen backbone with a new head, then the top block unfrozen, in float32. Prints one JSON
line with wall seconds and images/s per stage, final validation accuracy of each, and the
ratios (transferkit / baseline).

    python benchmarks/finetune_vs_keras.py --backbone vgg16 --size 64 --head-epochs 3 --fine-epochs 2
    python benchmarks/finetune_vs_keras.py --dataset digits   # scikit-learn's 1,797 real digits
    python benchmarks/finetune_vs_keras.py --dataset digits --budget   # transferkit within the baseline's time

``--budget``: the baseline runs first, then transferkit's job with ``--time-budget`` set to the
baseline's wall seconds and its stages' epochs capped at ``--budget-epochs`` (default 20 and
10) instead of the baseline's: what accuracy transferkit reaches in the time the hand-written
guide takes.

``--weights``: ``none`` (random, the default: no network here), ``imagenet`` (Keras's
download, fetched once before either job starts, so that neither pays for it) or a weights
file of the backbone without its top; both jobs start from the same weights. With random
weights the accuracies compare the two pipelines with each other, not with what ImageNet
weights would give. ``--data FOLDER`` trains both on a folder of class sub-folders (real
photos, say) instead of ``--dataset``'s images. The issue's held-out checks, on a machine
with the network:

    python benchmarks/finetune_vs_keras.py --dataset digits --weights imagenet
    python benchmarks/finetune_vs_keras.py --dataset digits --weights imagenet --backbone resnet50
    python benchmarks/finetune_vs_keras.py --dataset digits --weights imagenet --budget
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import transferkit  # noqa: E402, I001  (first: it may turn TensorFlow's oneDNN on before TensorFlow loads)
import keras  # noqa: E402
from transferkit.data.folders import iter_image_files  # noqa: E402
from transferkit.data.synthetic import write_shapes_dataset  # noqa: E402
from transferkit.runtime import ONEDNN_VARIABLE, machine_facts, tensorflow_onednn  # noqa: E402

HEAD_LR, FINE_LR = 1e-3, 3e-5
SHIFT, CONTRAST, ROTATION = 0.1, 0.2, 15.0


class StageClock(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()

    def on_train_end(self, logs=None):
        self.seconds = time.perf_counter() - self.started


def guide_backbone(backbone: str, size: int, weights: str = "none"):
    """The guide's backbone, as ``keras.applications`` builds it: no top, ``weights`` "none"
    (random), "imagenet" (Keras's download) or a weights file (Keras's ``load_weights``)."""
    applications = {
        "vgg16": keras.applications.VGG16,
        "vgg19": keras.applications.VGG19,
        "resnet50": keras.applications.ResNet50,
    }
    return applications[backbone](include_top=False, weights=None if weights == "none" else weights,
                                  input_shape=(size, size, 3))


def keras_guide(data_dir: Path, backbone: str, size: int, batch: int, head_epochs: int, fine_epochs: int, seed: int,
                weights: str = "none"):
    """The hand-written pipeline of the Keras transfer-learning guide, float32, its backbone
    built by ``keras.applications`` with ``weights`` ("none", "imagenet" or a file)."""
    import tensorflow as tf

    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(seed)
    common = dict(image_size=(size, size), batch_size=batch, validation_split=0.2, seed=seed, label_mode="categorical")
    # Keras prints "Using N files for ..." whatever verbose says: to stderr, so stdout holds
    # only the JSON line.
    with contextlib.redirect_stdout(sys.stderr):
        train = keras.utils.image_dataset_from_directory(
            data_dir, subset="training", shuffle=True, verbose=False, **common
        )
        # The same shuffle and seed as the training subset, or the two subsets would overlap.
        val = keras.utils.image_dataset_from_directory(
            data_dir, subset="validation", shuffle=True, verbose=False, **common
        )
    n_classes = len(train.class_names)
    n_train = sum(int(x.shape[0]) for x, _ in train)
    augmentation = keras.Sequential(
        [
            keras.layers.RandomTranslation(SHIFT, SHIFT),
            keras.layers.RandomContrast(CONTRAST),
            keras.layers.RandomRotation(ROTATION / 360.0),
            keras.layers.RandomFlip("horizontal"),
        ]
    )
    train = train.map(lambda x, y: (augmentation(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    train, val = train.prefetch(tf.data.AUTOTUNE), val.prefetch(tf.data.AUTOTUNE)
    preprocess = {
        "vgg16": keras.applications.vgg16.preprocess_input,
        "vgg19": keras.applications.vgg19.preprocess_input,
        "resnet50": keras.applications.resnet50.preprocess_input,
    }[backbone]
    base = guide_backbone(backbone, size, weights)
    base.trainable = False
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Lambda(preprocess)(inputs)
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(256, activation="relu")(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.Dropout(0.3)(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    figures = {}
    model.compile(keras.optimizers.Adam(HEAD_LR), "categorical_crossentropy", metrics=["accuracy"])
    clock = StageClock()
    model.fit(train, validation_data=val, epochs=head_epochs, callbacks=[clock], verbose=0)
    figures["head"] = clock.seconds
    if fine_epochs:
        base.trainable = True
        top_block = {"vgg16": "block5", "vgg19": "block5", "resnet50": "conv5_block3"}[backbone]
        for layer in base.layers:
            layer.trainable = layer.name.startswith(top_block + "_") and not isinstance(
                layer, keras.layers.BatchNormalization
            )
        model.compile(keras.optimizers.Adam(FINE_LR), "categorical_crossentropy", metrics=["accuracy"])
        clock = StageClock()
        model.fit(train, validation_data=val, epochs=fine_epochs, callbacks=[clock], verbose=0)
        figures["fine"] = clock.seconds
    accuracy = model.evaluate(val, verbose=0, return_dict=True)["accuracy"]
    return figures, float(accuracy), n_train


def transferkit_job(
    data_dir: Path,
    backbone: str,
    size: int,
    batch: int,
    head_epochs: int,
    fine_epochs: int,
    seed: int,
    precision: str,
    engine: str,
    output: Path,
    cache_views: int | None = None,
    extra: dict | None = None,
    weights: str = "none",
):
    overrides = {
        "backbone": backbone,
        "weights": weights,
        "image_size": size,
        "batch_size": batch,
        "seed": seed,
        "precision": precision,
        "head.units": [256],
        "head.dropout": 0.3,
        "augment.shift": SHIFT,
        "augment.contrast": CONTRAST,
        "augment.rotation": ROTATION,
        # The shipped default: the guide's flips are transferkit's too where they keep the
        # class, judged after the head stage (training.flips); on digits they do not.
        "augment.hflip": "auto",
        "stages.0.epochs": head_epochs,
        "stages.0.learning_rate": HEAD_LR,
        "stages.0.patience": 100,
        "stages.1.epochs": fine_epochs,
        "stages.1.learning_rate": FINE_LR,
        "stages.1.patience": 100,
        "stages.1.unfreeze": 1,
        # The baseline does not weight classes; the generated classes are balanced anyway.
        "data.class_weights": False,
    }
    if engine != "default":
        overrides["engine"] = engine
    if cache_views is not None:
        overrides["cache.views"] = cache_views
    overrides.update(extra or {})  # benchmarks/quick.py --override: transferkit's side only
    run = transferkit.finetune(data_dir, None, overrides, output=output, force=True, verbose=0)
    figures = {timing["stage"]: timing["seconds"] for timing in run.metrics["stages"]}
    return figures, float(run.metrics["final"]["val_accuracy"]), run.metrics["n_train"], run.metrics


def run_side(args, side: str, data_dir: Path, run_dir: Path) -> dict:
    """One job ("baseline" or "transferkit") on the dataset, timed: its stage seconds,
    validation accuracy, training images, transferkit's precision and stage details, wall
    seconds, and the TensorFlow oneDNN setting of the process."""
    started = time.perf_counter()
    if side == "baseline":
        stages, accuracy, n_train = keras_guide(data_dir, args.backbone, args.size, args.batch, args.head_epochs,
                                                args.fine_epochs, args.seed, args.weights)
        metrics = {}
    else:
        extra = None
        if args.budget_seconds:  # --budget: the baseline's wall seconds, the epochs only caps
            head, fine = (int(cap) for cap in args.budget_epochs.split(","))
            extra = {"time_budget": f"{int(args.budget_seconds)}s", "stages.0.epochs": head, "stages.1.epochs": fine}
        stages, accuracy, n_train, metrics = transferkit_job(
            data_dir, args.backbone, args.size, args.batch, args.head_epochs, args.fine_epochs, args.seed,
            args.precision, args.engine, run_dir, args.cache_views, extra, args.weights)
        metrics = {key: metrics.get(key) for key in ("precision", "stages", "time_budget")}
    return {"stages": stages, "accuracy": accuracy, "n_train": n_train, "metrics": metrics,
            "seconds": time.perf_counter() - started, "onednn": os.environ.get(ONEDNN_VARIABLE)}


def separate_processes(args, argv, data_dir: Path, tmp: Path) -> dict:
    """Each job in a fresh process: the baseline with TensorFlow's own oneDNN setting for
    this CPU (as given, else its default, pinned), transferkit's with the variable removed."""
    import subprocess

    base = [sys.executable, os.path.abspath(__file__), *(argv if argv is not None else sys.argv[1:]),
            "--data", str(data_dir)]
    tensorflow_alone = os.environ.get(ONEDNN_VARIABLE) or ("1" if tensorflow_onednn() else "0")
    envs = {"baseline": {**os.environ, ONEDNN_VARIABLE: tensorflow_alone},
            "transferkit": {key: value for key, value in os.environ.items() if key != ONEDNN_VARIABLE}}
    sides = {}
    for side in sides_in_order(args):
        out = tmp / f"{side}.json"
        within = args.budget and side == "transferkit"
        budget = ["--budget-seconds", str(sides["baseline"]["seconds"])] if within else []
        subprocess.run([*base, "--only", side, "--out", str(out), *budget], env=envs[side], check=True)
        sides[side] = json.loads(out.read_text())
    return sides


def write_digits(folder: Path, size: int) -> Path:
    """scikit-learn's 1,797 handwritten digits (8x8, 16 grey levels) as size-px RGB PNGs, one
    folder per digit: real images, of the kind the issue's held-out check trains on."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for row, (pixels, digit) in enumerate(zip(digits.images, digits.target, strict=True)):
        target = folder / str(digit)
        target.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray((pixels * (255 / 16)).astype("uint8")).convert("RGB")
        image.resize((size, size), Image.BILINEAR).save(target / f"{row}.png")
    return folder


def check_inputs(args) -> None:
    """Fail before either job on what would fail one of them: a data folder that is not one,
    and weights that cannot be had. ``imagenet`` weights are downloaded here, into Keras's
    cache, where both jobs then find them (neither job's time includes the download)."""
    from transferkit.backbones import load_backbone
    from transferkit.errors import DataError

    if args.data is not None and not args.data.is_dir():
        raise DataError(f"--data {args.data}: not a folder; give a folder with one sub-folder of images per class")
    if args.weights != "none":
        load_backbone(args.backbone, args.weights, (args.size, args.size, 3))
        keras.backend.clear_session()


def sides_in_order(args) -> tuple[str, str]:
    return ("baseline", "transferkit") if args.order == "baseline-first" else ("transferkit", "baseline")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vgg16")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--dataset", choices=("shapes", "digits"), default="shapes",
                        help="generated shapes (--classes x --per-class), or scikit-learn's 1,797 digits")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=150)
    parser.add_argument("--head-epochs", type=int, default=3)
    parser.add_argument("--fine-epochs", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--engine", default="default", help="transferkit engine (default: the recipe's)")
    parser.add_argument("--cache-views", type=int, default=None, help="transferkit cache.views (default: the recipe's)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--weights", default="none",
                        help="none (random; default), imagenet (downloaded once, before the jobs) or a weights file; "
                             "both jobs start from them")
    parser.add_argument("--in-process", action="store_true", help="both jobs in this process (one TensorFlow setup)")
    parser.add_argument("--budget", action="store_true",
                        help="transferkit's job within the baseline's wall time (--time-budget), epochs as caps")
    parser.add_argument("--budget-epochs", default="20,10", help="--budget: the head's and fine stage's epoch caps")
    parser.add_argument("--budget-seconds", type=float, help=argparse.SUPPRESS)  # --budget's child: the baseline's
    parser.add_argument("--only", choices=("baseline", "transferkit"), help=argparse.SUPPRESS)  # a child's side
    parser.add_argument("--data", type=Path,
                        help="a folder of class sub-folders to train both jobs on (default: --dataset's images)")
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument(
        "--order",
        choices=("baseline-first", "transferkit-first"),
        default="baseline-first",
        help="which job runs first in the process (default: the baseline)",
    )
    args = parser.parse_args(argv)
    if args.budget and (args.in_process or args.order != "baseline-first"):
        parser.error("--budget runs the baseline first, each job in its own process")

    if args.only:  # a child's side, its figures as JSON in --out
        args.out.write_text(json.dumps(run_side(args, args.only, args.data, args.out.parent / "run")))
        return 0
    try:
        check_inputs(args)
    except transferkit.TransferkitError as error:  # e.g. no network for --weights imagenet: one line
        print(f"error: {error}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="tk-bench-") as tmp:
        if args.data is not None:
            data_dir = args.data
        elif args.dataset == "digits":
            data_dir = write_digits(Path(tmp) / "data", args.size)
        else:
            data_dir = write_shapes_dataset(
                Path(tmp) / "data", args.classes, args.per_class, size=args.size, seed=args.seed
            )
        if not args.in_process:
            sides = separate_processes(args, argv, data_dir, Path(tmp))
        else:
            sides = {}
            for side in sides_in_order(args):
                sides[side] = run_side(args, side, data_dir, Path(tmp) / "run")
                gc.collect()
        images = sum(reason is None for _, reason in iter_image_files(data_dir))
    return report(args, sides, images)


def report(args, sides: dict, images: int) -> int:
    """Print the JSON line of both sides' figures and their ratios."""

    def per_stage(figures, epochs_by_stage, count):
        return {
            stage: {"seconds": round(seconds, 2), "images_per_s": round(count * epochs_by_stage[stage] / seconds, 1)}
            for stage, seconds in figures.items()
        }

    base, ours = sides["baseline"], sides["transferkit"]
    epochs = {"head": args.head_epochs, "fine": args.fine_epochs}
    trained = {stage["stage"]: stage["epochs"] for stage in ours["metrics"].get("stages") or []}
    result = {
        "machine": machine_facts(),
        "benchmark": "finetune_vs_keras",
        "backbone": args.backbone,
        "size": args.size,
        "batch": args.batch,
        "dataset": str(args.data) if args.data is not None else args.dataset,
        "weights": args.weights,
        "images": images,
        "train_images": base["n_train"],
        "head_epochs": args.head_epochs,
        "fine_epochs": args.fine_epochs,
        "order": args.order,
        "processes": "one" if args.in_process else "separate",
        "tf_enable_onednn_opts": {side: sides[side]["onednn"] for side in sides},
        "baseline": {
            "precision": "float32",
            "total_seconds": round(base["seconds"], 2),
            "stages": per_stage(base["stages"], epochs, base["n_train"]),
            "val_accuracy": round(base["accuracy"], 4),
        },
        "transferkit": {
            "precision": ours["metrics"].get("precision"),
            "total_seconds": round(ours["seconds"], 2),
            "stages": per_stage(ours["stages"], {**epochs, **trained}, ours["n_train"]),
            "val_accuracy": round(ours["accuracy"], 4),
            "stage_details": ours["metrics"].get("stages"),
            **({"time_budget": ours["metrics"]["time_budget"]} if ours["metrics"].get("time_budget") else {}),
        },
        "ratios": {
            "total_wall": round(ours["seconds"] / base["seconds"], 3),
            **{f"{stage}_wall": round(ours["stages"][stage] / base["stages"][stage], 3)
               for stage in ours["stages"] if stage in base["stages"]},
            "val_accuracy_points": round(100 * (ours["accuracy"] - base["accuracy"]), 2),
        },
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
