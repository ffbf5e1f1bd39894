"""Predict throughput and memory against plain Keras, in one run.

For each backbone, on a generated folder: transferkit's predict (default engine: OpenVINO
on CPU when installed) against plain Keras float32 on the same decoded images at the same
batch size, both ``model.predict`` and ``model.predict_on_batch`` a batch at a time (best of
three each; the ``fastest`` ratios take the faster of the two), and against the bare forward
pass of the engine predict uses (for a classifier in 16 bits: its body and head, without the float32 second look at near
ties that predict's default precision adds) and, for that default, against the engine as
predict calls it (second look included) on images decoded beforehand, which isolates what
reading the folder costs; top-1 agreement with Keras float32; the same with ``--precision
bfloat16`` (no second look), ``float32`` and ``int8`` (checked against float32 first, near
ties again in float32; quantized once per run, cached, so the figures are warm). Each
precision runs in a fresh process, as a user's predict does, where predict and the forward
passes run in turn, best of three each.
Then the peak memory (max RSS) of predict over 2,000 and 20,000 images, each in a fresh
process (its VmHWM). Prints one JSON line.

    python benchmarks/predict.py --backbones vgg16,resnet50 --size 224 --images 256
    python benchmarks/predict.py --run runs/photos-resnet50 --photos photos_to_sort/

``--run RUN --photos FOLDER`` measures a run of the user's (trained on real photos from
pretrained weights, as the issue's held-out check asks) over every image in a folder, warm
(the engine cache filled first), with the default precision, float32 and int8, against plain
Keras on the same decoded images and against plain Keras reading the folder itself
(``image_dataset_from_directory``: its decoding counted, as a user's script pays it).

The classifier is the one a user predicts with: trained by ``transferkit.finetune`` (head
stage) on generated shapes, then asked about other generated shapes. Backbone weights are
random (no network here for ImageNet's), so this classifier is weak and unsure (many
near ties: the float32 second look is at its most expensive). The same figures follow
for a classifier that is sure of most answers, as a pretrained backbone is on real
photos: trained on classes of distinct (overlapping) colours ("confident_classifier"), with
``--precision int8`` too (where int8's near ties, computed again in float32, are few).
The agreement of an untrained classifier (random head, BatchNorm calibrated so predictions
spread over the classes: near-ties everywhere) is printed too, as the worst case for 16-bit
rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from transferkit.runtime import machine_facts  # noqa: E402

CLASSES = 5
TRAIN_PER_CLASS = 60
TRAIN_EPOCHS = 30


def make_run(run_dir: Path, backbone_name: str, size: int, sample: np.ndarray, seed: int = 0) -> None:
    """A run folder with a random-weight classifier whose outputs are not degenerate."""
    import keras

    from transferkit import runs
    from transferkit.backbones import load_backbone
    from transferkit.model.classifier import build_classifier, calibrate_head_batchnorm
    from transferkit.outputs import output_activation
    from transferkit.recipe import HeadConfig
    from transferkit.training.features import backbone_features

    keras.utils.set_random_seed(seed)
    backbone = load_backbone(backbone_name, "none", (size, size, 3))
    rng = np.random.default_rng(seed)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            channels = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, channels))
            layer.beta.assign(rng.normal(0, 0.2, channels))
            layer.moving_mean.assign(rng.normal(0, 0.2, channels))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, channels))
    model = build_classifier(backbone, CLASSES, HeadConfig(units=(64,), dropout=0.0), backbone_name=backbone_name)
    calibrate_head_batchnorm(model, backbone_features(model, sample))
    run_dir.mkdir(parents=True)
    model.save(run_dir / runs.MODEL_FILE)
    runs.write_labels(run_dir, [f"class{i}" for i in range(CLASSES)], size, backbone_name, output_activation(CLASSES))


def keras_float32(run_dir: Path):
    """The run's model loaded by plain Keras, in float32 (a run trained in mixed precision
    saves its layers' policies, so it is cloned with float32 ones)."""
    import keras

    from transferkit.inference.openvino import float32_clone

    keras.config.set_dtype_policy("float32")
    model = keras.models.load_model(run_dir / "model.keras", compile=False)
    return float32_clone(model)


PALETTE = ((190, 60, 60), (70, 160, 70), (60, 80, 190), (200, 180, 60), (150, 70, 170))


def write_colour_dataset(root: Path, classes: int, per_class: int, size: int, seed: int = 0) -> Path:
    """Classes of distinct colours; each image's colour and brightness vary so neighbouring
    classes overlap a little, and pixel noise covers it."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for index, colour in enumerate(PALETTE[:classes]):
        folder = root / f"colour{index}"
        folder.mkdir(parents=True, exist_ok=True)
        for number in range(per_class):
            tint = np.asarray(colour) + rng.normal(0, 30, 3) + rng.normal(0, 25)
            image = np.clip(tint + rng.normal(0, 40, (size, size, 3)), 0, 255).astype("uint8")
            Image.fromarray(image).save(folder / f"colour{index}_{number:03d}.jpg", quality=90)
    return root


def write_dataset(kind: str, root: Path, per_class: int, size: int, seed: int) -> Path:
    from transferkit.data.synthetic import write_shapes_dataset

    if kind == "colours":
        return write_colour_dataset(root, CLASSES, per_class, size, seed)
    return write_shapes_dataset(root, CLASSES, per_class, size=size, seed=seed)


def make_trained_run(
    run_dir: Path, backbone_name: str, size: int, tmp: Path, seed: int = 0, kind: str = "shapes"
) -> None:
    """A run folder holding a classifier trained by transferkit on a generated dataset."""
    import transferkit

    data = write_dataset(kind, tmp / f"train-{kind}-{backbone_name}", TRAIN_PER_CLASS, size, seed)
    overrides = {
        "backbone": backbone_name,
        "weights": "none",
        "image_size": size,
        "seed": seed,
        "stages.0.epochs": TRAIN_EPOCHS,
        "stages.0.patience": TRAIN_EPOCHS,
        "stages.1.epochs": 0,
    }
    transferkit.finetune(data, None, overrides, output=run_dir, verbose=0)


def write_images(folder: Path, count: int, size: int, seed: int = 0) -> Path:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    base = rng.integers(0, 256, (8, size, size, 3), dtype="uint8")
    for index in range(count):
        noise = rng.integers(0, 64, (size, size, 3), dtype="uint8")
        image = (base[index % 8] // 2 + noise + index % 97).astype("uint8")
        Image.fromarray(image).save(folder / f"img_{index:05d}.jpg", quality=85)
    return folder


def throughput(
    backbone_name: str, size: int, count: int, batch: int, tmp: Path, kind: str = "shapes", modes: bool = True
) -> dict:
    """Predict against Keras and the bare forward for a classifier trained on ``kind``
    ("shapes" or "colours"), and with ``--precision int8``; with ``modes``, also the other
    precisions and the untrained classifier."""
    from transferkit.data.folders import iter_image_files
    from transferkit.data.images import decode_images

    images_dir = write_dataset(kind, tmp / f"images-{kind}-{backbone_name}", -(-count // CLASSES), size, 101)
    files = [path for path, reason in iter_image_files(images_dir) if reason is None][:count]
    for extra in [path for path, reason in iter_image_files(images_dir) if reason is None][count:]:
        extra.unlink()
    run_dir = tmp / f"run-{kind}-{backbone_name}"
    make_trained_run(run_dir, backbone_name, size, tmp, kind=kind)
    figures = measure(run_dir, images_dir, files, batch, ("bfloat16", "float32", "int8") if modes else ("int8",))
    if not modes:
        return figures
    decoded, _, _ = decode_images(files, size)
    return {**figures, "untrained_classifier": untrained_agreement(backbone_name, size, decoded, batch, tmp)}


def measure(run_dir: Path, images_dir: Path, files: list[Path], batch: int, precisions: tuple[str, ...],
            keras_folder: bool = False, run=None) -> dict:
    """Predict over ``images_dir`` (whose images are ``files``) with the run in ``run_dir``,
    the default precision and each of ``precisions``, against plain Keras float32 on the same
    decoded images; with ``keras_folder``, also against plain Keras reading the folder itself
    (``image_dataset_from_directory``), as a user's script would. ``run``: the run already
    loaded with its model (default None: loaded here)."""
    from transferkit.data.images import decode_images
    from transferkit.inference.engines import inference_engine
    from transferkit.runs import load_run

    run = run if run is not None else load_run(run_dir)
    size, count = run.image_size, len(files)
    decoded, _, _ = decode_images(files, size)
    floats = decoded.astype("float32")

    plain = keras_float32(run_dir)
    plain.predict(floats[:batch], batch_size=batch, verbose=0)  # warm-up: traces the predict function
    outputs = []

    def keras_predict():
        outputs.append(plain.predict(floats, batch_size=batch, verbose=0))

    def keras_on_batch():  # the same traced function without predict's iterator and callbacks
        for start in range(0, count, batch):
            plain.predict_on_batch(floats[start : start + batch])

    # Best of ROUNDS each, in turn: one model.predict call took either about 0.8 s or 1.3 s
    # over the same images (benchmarks/README.md, quick check), so a single call is a coin toss.
    keras_rate, on_batch_rate = best_rates([keras_predict, keras_on_batch], count)
    fastest_keras = max(keras_rate, on_batch_rate)
    reference = outputs[-1]
    folder_rate = keras_folder_rate(plain, images_dir, size, batch) if keras_folder else None
    named = [path.parent.name in run.class_names for path in files]
    truth = np.asarray([run.class_names.index(path.parent.name) if known else -1
                        for path, known in zip(files, named, strict=True)])

    from transferkit.inference.openvino import engine_cache_dir

    # Setup includes the float32 network for near ties (otherwise built on the first one).
    started = time.perf_counter()
    engine = inference_engine(run.model, "auto", size, cache_dir=engine_cache_dir(run_dir), input_dtype="uint8")
    getattr(engine, "exact", None)
    first_setup = time.perf_counter() - started
    del engine
    # Each precision in a fresh process, as a user runs predict, with the engine's bare
    # forward measured in turn with it there.
    default = predict_child(run_dir, images_dir, "auto", batch)
    theirs = np.argmax(reference, axis=1)
    ordered = np.sort(reference, axis=1)
    clear = (ordered[:, -1] - ordered[:, -2]) > 0.05
    ours = np.asarray(default["labels"])
    figures = {
        "engine": default["engine"],
        "engine_setup_seconds_first": round(first_setup, 2),
        "engine_setup_seconds_cached": default["setup_seconds"],
        "keras_float32_predict_images_per_s": round(keras_rate, 1),
        "keras_float32_predict_on_batch_images_per_s": round(on_batch_rate, 1),
        "transferkit_predict_images_per_s": default["predict_images_per_s"],
        "bare_engine_forward_images_per_s": default["bare_forward_images_per_s"],
        "ratio_predict_to_keras_float32": round(default["predict_images_per_s"] / keras_rate, 2),
        "ratio_predict_to_fastest_keras_float32": round(default["predict_images_per_s"] / fastest_keras, 2),
        # The measure: transferkit's wall time over the faster Keras way's, same images.
        "wall_time_over_fastest_keras_float32": round(fastest_keras / default["predict_images_per_s"], 3),
        "ratio_predict_to_bare_engine": default["ratio"],
        "images_recomputed_in_float32_as_near_ties": default["refined"],
        "engine_forward_with_near_ties_images_per_s": default["engine_forward_images_per_s"],
        "ratio_predict_to_engine_forward_with_near_ties": default["ratio_to_engine_forward"],
        "top1_agreement_with_keras_float32": round(float(np.mean(ours == theirs)), 4),
        "top1_agreement_where_keras_margin_over_0.05": round(float(np.mean((ours == theirs)[clear])), 4)
        if clear.any()
        else None,
        "images_with_margin_over_0.05": int(clear.sum()),
        "distinct_predicted_classes": int(len(np.unique(theirs))),
        # Where the images lie in folders named for the run's classes.
        "keras_float32_accuracy_on_these_images": round(float(np.mean(theirs == truth)), 4) if all(named) else None,
    }
    if folder_rate is not None:
        figures["keras_float32_reading_the_folder_images_per_s"] = round(folder_rate, 1)
        figures["ratio_predict_to_keras_reading_the_folder"] = round(default["predict_images_per_s"] / folder_rate, 2)
    others = {}
    for precision in precisions:
        child = predict_child(run_dir, images_dir, precision, batch)
        others[f"with_precision_{precision}"] = {
            "precision_run": child["precision_run"],
            "setup_seconds": child["setup_seconds"],
            "images_per_s": child["predict_images_per_s"],
            "bare_forward_images_per_s": child["bare_forward_images_per_s"],
            "ratio_to_keras_float32": round(child["predict_images_per_s"] / keras_rate, 2),
            "ratio_to_fastest_keras_float32": round(child["predict_images_per_s"] / fastest_keras, 2),
            "wall_time_over_fastest_keras_float32": round(fastest_keras / child["predict_images_per_s"], 3),
            "ratio_to_bare_engine": child["ratio"],
            "images_recomputed_in_float32_as_near_ties": child["refined"],
            "top1_agreement_with_keras_float32": round(float(np.mean(np.asarray(child["labels"]) == theirs)), 4),
        }
        if folder_rate is not None:
            others[f"with_precision_{precision}"]["ratio_to_keras_reading_the_folder"] = round(
                child["predict_images_per_s"] / folder_rate, 2)
    return {**figures, **others}


def keras_folder_rate(plain, images_dir: Path, size: int, batch: int) -> float:
    """Images/s of plain Keras float32 over the folder as a user's script reads it (Keras's
    own decoding and resizing included), best of ``ROUNDS``."""
    import contextlib

    import keras

    with contextlib.redirect_stdout(sys.stderr):  # "Found N files": stdout holds only the JSON line
        dataset = keras.utils.image_dataset_from_directory(
            images_dir, labels=None, image_size=(size, size), batch_size=batch, shuffle=False)
    # Its own count: Keras reads fewer formats than transferkit (no WebP or TIFF, say).
    return best_rates([lambda: plain.predict(dataset, verbose=0)], len(dataset.file_paths))[0]


def predict_child(run_dir: Path, images_dir: Path, precision: str, batch: int) -> dict:
    """``throughput_child`` in a fresh process; its JSON line as a dict."""
    output = (
        subprocess.run(
            [sys.executable, __file__, "--child-throughput", str(run_dir), str(images_dir), precision, str(batch)],
            capture_output=True,
            text=True,
            check=True,
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    return json.loads(output)


def throughput_child(run_dir: str, images_dir: str, precision: str, batch: int) -> None:
    """Predict over a folder and the bare forward of the engine it uses, in turn, best of
    ``ROUNDS``; prints one JSON line (rates, labels, near ties recomputed per run)."""
    from transferkit.data.folders import iter_image_files
    from transferkit.data.images import decode_images
    from transferkit.inference.predict import engine_for, engine_outputs, predict_folder
    from transferkit.runs import load_run

    run = load_run(run_dir)
    files = [path for path, reason in iter_image_files(images_dir) if reason is None]
    started = time.perf_counter()
    # Built as predict builds it (engine_for): the network takes the decoded uint8 images; int8
    # is quantized on the run's training images and checked on held-back ones (once: cached).
    engine = engine_for(run, "auto", precision, images=len(files))
    getattr(engine, "exact", None)  # the float32 network for near ties, built now rather than on the first
    setup = time.perf_counter() - started
    decoded = decode_images(files, run.image_size)[0]
    engine.predict(decoded[:batch])  # warm-up
    # The bare forward: the network alone (for the 16-bit classifier engine, its body and
    # head without the float32 pass over near ties, which predict pays for).
    forward = engine.predict
    if hasattr(engine, "body"):
        forward = lambda images: engine.head.predict(engine.body.predict(images))  # noqa: E731
    elif hasattr(engine, "int8"):  # the int8 network alone
        forward = engine.int8.predict

    def batches():
        return (decoded[start : start + batch] for start in range(0, len(decoded), batch))

    def bare_forward():
        for images in batches():
            forward(images)

    def engine_forward():
        # The engine exactly as predict calls it (near ties again in float32 included), on
        # images decoded beforehand: what predict adds around it is reading the folder.
        engine_outputs(engine, batches(), batch)

    results, refined = [], []

    def predict():
        before = getattr(engine, "refined", 0)
        results.append(predict_folder(run, images_dir, batch_size=batch, engine=engine))
        refined.append(getattr(engine, "refined", 0) - before)

    jobs = [predict, bare_forward] + ([engine_forward] if hasattr(engine, "exact") and engine.exact else [])
    rates = best_rates(jobs, len(files))
    predict_rate, bare_rate = rates[:2]
    engine_rate = rates[2] if len(rates) > 2 else bare_rate
    print(
        json.dumps(
            {
                "engine": results[-1].engine,
                "precision_run": getattr(engine, "precision_hint", "keras"),
                "setup_seconds": round(setup, 2),
                "predict_images_per_s": round(predict_rate, 1),
                "bare_forward_images_per_s": round(bare_rate, 1),
                "ratio": round(predict_rate / bare_rate, 3),
                "engine_forward_images_per_s": round(engine_rate, 1),
                "ratio_to_engine_forward": round(predict_rate / engine_rate, 3),
                "refined": refined[-1],
                "labels": [run.class_names.index(row.label) for row in results[-1].rows],
            }
        )
    )


ROUNDS = 3


def best_rates(jobs, count: int) -> list[float]:
    """Images/s of each job, the best of ``ROUNDS`` rounds that run the jobs in turn (the
    fastest run is the one least disturbed by the rest of the machine)."""
    rates = [[] for _ in jobs]
    for _ in range(ROUNDS):
        for job, job_rates in zip(jobs, rates):
            started = time.perf_counter()
            job()
            job_rates.append(count / (time.perf_counter() - started))
    return [max(job_rates) for job_rates in rates]


def untrained_agreement(backbone_name: str, size: int, decoded: np.ndarray, batch: int, tmp: Path) -> dict:
    """Top-1 agreement of the default engine with Keras float32 on an untrained classifier."""

    from transferkit.inference.engines import inference_engine
    from transferkit.inference.openvino import engine_cache_dir
    from transferkit.runs import load_run

    run_dir = tmp / f"untrained-{backbone_name}"
    make_run(run_dir, backbone_name, size, decoded[:64])
    floats = decoded.astype("float32")
    plain = keras_float32(run_dir)
    theirs = np.argmax(plain.predict(floats, batch_size=batch, verbose=0), axis=1)
    engine = inference_engine(
        load_run(run_dir).model, "auto", size, cache_dir=engine_cache_dir(run_dir), input_dtype="uint8"
    )
    ours = np.concatenate(
        [np.argmax(engine.predict(decoded[i : i + batch]), axis=1) for i in range(0, len(decoded), batch)]
    )
    return {
        "top1_agreement_with_keras_float32": round(float(np.mean(ours == theirs)), 4),
        "distinct_predicted_classes": int(len(np.unique(theirs))),
    }


def peak_memory_child(run_dir: str, images_dir: str, batch: int) -> None:
    from transferkit.inference.predict import predict_folder
    from transferkit.runs import load_run

    result = predict_folder(load_run(run_dir), images_dir, batch_size=batch)
    # VmHWM is this process image's own peak; ru_maxrss would carry over the parent's
    # resident size from before exec.
    peak_kb = next(
        int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")
    )
    print(json.dumps({"rows": len(result.rows), "max_rss_mb": peak_kb / 1024}))


def memory(backbone_name: str, size: int, counts: list[int], batch: int, tmp: Path) -> dict:
    from transferkit.data.folders import iter_image_files
    from transferkit.data.images import decode_images

    largest = write_images(tmp / "memory-images", max(counts), size, seed=1)
    files = sorted(largest.iterdir())
    figures = {}
    for count in counts:
        folder = tmp / f"memory-{count}"
        folder.mkdir()
        for path in files[:count]:
            os.link(path, folder / path.name)
        if not (tmp / "memory-run").exists():
            sample, _, _ = decode_images([p for p, r in iter_image_files(folder) if r is None][:32], size)
            make_run(tmp / "memory-run", backbone_name, size, sample)
        started = time.perf_counter()
        output = (
            subprocess.run(
                [sys.executable, __file__, "--child", str(tmp / "memory-run"), str(folder), str(batch)],
                capture_output=True,
                text=True,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
        child = json.loads(output)
        figures[str(count)] = {
            "max_rss_mb": round(child["max_rss_mb"], 1),
            "rows": child["rows"],
            "seconds": round(time.perf_counter() - started, 1),
        }
    low, high = figures[str(counts[0])]["max_rss_mb"], figures[str(counts[-1])]["max_rss_mb"]
    return {
        "backbone": backbone_name,
        "size": size,
        "counts": figures,
        "ratio_peak_largest_to_smallest": round(high / low, 3),
    }


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        peak_memory_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return 0
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child-throughput":
        throughput_child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", default="vgg16,resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--images", type=int, default=256, help="images for the throughput comparison")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--memory-counts", default="2000,20000")
    parser.add_argument("--memory-backbone", default="resnet50")
    parser.add_argument(
        "--memory-size",
        type=int,
        default=64,
        help="image side for the memory runs (memory growth does not depend on it)",
    )
    parser.add_argument(
        "--no-confident", dest="confident", action="store_false", help="skip the classifier trained on colours"
    )
    parser.add_argument("--run", type=Path, help="a run folder to measure instead of generated ones (with --photos)")
    parser.add_argument("--photos", type=Path, help="--run: the folder of images to predict, every image in it")
    parser.add_argument("--precisions", default="float32,int8",
                        help="--run: the precisions measured beside the default (bfloat16, float32, int8)")
    args = parser.parse_args(argv)
    if (args.run is None) != (args.photos is None):
        parser.error("--run and --photos go together: a run folder and the images to predict with it")
    precisions = tuple(p for p in args.precisions.split(",") if p)
    if set(precisions) - {"bfloat16", "float32", "int8"}:
        parser.error(f"--precisions {args.precisions}: choose among bfloat16, float32 and int8")
    if args.run is not None:
        return measure_given(args, precisions)

    with tempfile.TemporaryDirectory(prefix="tk-predict-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["TRANSFERKIT_CACHE"] = str(tmp / "cache")
        result = {
            "benchmark": "predict",
            "machine": machine_facts(),
            "size": args.size,
            "batch": args.batch,
            "images": args.images,
            "backbones": {},
        }
        for name in args.backbones.split(","):
            result["backbones"][name] = throughput(name, args.size, args.images, args.batch, tmp)
            if args.confident:
                result["backbones"][name]["confident_classifier"] = throughput(
                    name, args.size, args.images, args.batch, tmp, kind="colours", modes=False
                )
        counts = [int(c) for c in args.memory_counts.split(",") if c]
        if counts:
            result["memory"] = memory(args.memory_backbone, args.memory_size, counts, args.batch, tmp)
    print(json.dumps(result))
    return 0


def measure_given(args, precisions: tuple[str, ...]) -> int:
    """``--run RUN --photos FOLDER``: the run's predict over the folder (each precision, warm:
    the engine cache filled first), against plain Keras on the same decoded images and
    reading the folder itself. One JSON line; a bad run or folder: one line and exit 1."""
    import transferkit
    from transferkit.data.folders import iter_image_files
    from transferkit.errors import DataError
    from transferkit.inference.predict import engine_for

    try:
        run = transferkit.load_run(args.run)  # with its model: measure() uses it too
        files = [path for path, reason in iter_image_files(args.photos)
                 if reason is None] if args.photos.is_dir() else []
        if not files:
            raise DataError(f"--photos {args.photos}: no images there; give a folder of images to predict")
        for precision in ("auto", *precisions):  # the engine cache filled, as for a warm predict
            engine_for(run, "auto", precision, images=len(files))
    except transferkit.TransferkitError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    result = {"benchmark": "predict", "machine": machine_facts(), "run": str(args.run), "photos": str(args.photos),
              "size": run.image_size, "batch": args.batch, "images": len(files), "backbone": run.backbone,
              **measure(args.run, args.photos, files, args.batch, precisions, keras_folder=True, run=run)}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
