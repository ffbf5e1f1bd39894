"""Which score tells images of no known class best: the candidates for ``reject.score``,
and the conformal prediction sets, on held-out images.

A run is fine-tuned (``transferkit.finetune``, the default stages) on the known classes of
each data set, and measured on held-out images:

    shapes   known: circle, square, triangle, stripes (the classes of ``sample_images/``),
             generated; near: four shapes it never saw (hexagon, star, ring, cross)
    digits   known: handwritten 0-4, near: 5-9 (scikit-learn's 8 x 8 digits, scaled up: real
             images, and the classic open-set split)
    far      for both: images of another kind: noise, smooth colour fields, checkerboards
             (``data.synthetic.write_unknown_images``) and crops of two real photographs
             (scikit-learn's sample images)

Every candidate score (higher: more like the training images) is computed from one forward
pass: the largest calibrated probability; the energy (log-sum-exp of the calibrated logits);
the cosine similarity of the backbone embedding (feature maps averaged over height and
width) to the k-th nearest training image's, k = 1 or 10, raw or centred on the training
mean first; the same k = 1 against augmented training images (the feature cache's views 0,
and 0 and 1: references the cache could give without a pass over the plain images); the
Mahalanobis distance of that embedding to the nearest class mean (shared, shrunk covariance);
the knn of the head's last hidden layer; and the sum of the knn and largest-probability scores,
each standardised by its mean and deviation on the validation split. For each: AUROC and FPR
at 95% TPR against near and far, and at the threshold fitted on the validation split for 95%
coverage (as finetune fits it), the share of known images kept and of near and far images
rejected. Prediction sets at 0.9: LAC and APS (non-randomised), coverage and mean size.

    python benchmarks/rejection.py                    # both data sets, seeds 1 2
    python benchmarks/rejection.py --data digits --seeds 1 2 3

Prints one JSON line: per data set and score, the mean over seeds (and each seed's
figures), with the machine. Weights are random ("none": no network here for ImageNet's), so the backbone's
embedding is that of random filters with a fine-tuned top block: the figures compare the
scores under that handicap, not what pretrained weights give.
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

import transferkit  # noqa: E402
from transferkit.data.images import decode_images  # noqa: E402
from transferkit.data.synthetic import write_shapes_dataset, write_unknown_images  # noqa: E402
from transferkit.inference.uncertainty import (  # noqa: E402
    REFERENCE_FILE,
    keep_threshold,
    lac_scores,
    load_reference,
    set_quantile,
    unit_rows,
)
from transferkit.runtime import machine_facts  # noqa: E402
from transferkit.trust.rejection import fpr_at_tpr, open_set_metrics  # noqa: E402

KNOWN = ("circle", "square", "triangle", "stripes")
NEAR = ("hexagon", "star", "ring", "cross")
# Per data set: the image side trained at, images per known class to train on (a fifth
# validates), and held out per class.
SETTINGS = {"shapes": (64, 60, 40), "digits": (32, 100, 60)}


def write_shapes(root: Path, seed: int) -> tuple[Path, Path, Path]:
    """(train, known, near) folders of generated shapes."""
    size, per_class, held_out = SETTINGS["shapes"]
    return (write_shapes_dataset(root / "train", KNOWN, per_class, size=size, seed=seed),
            write_shapes_dataset(root / "known", KNOWN, held_out, size=size, seed=1000 + seed),
            write_shapes_dataset(root / "near", NEAR, held_out, size=size, seed=2000 + seed))


def write_digits(root: Path, seed: int) -> tuple[Path, Path, Path]:
    """(train, known, near) folders of scikit-learn's digits as 32 px PNGs: 0-4 known, 5-9 near."""
    from PIL import Image
    from sklearn.datasets import load_digits

    size, per_class, held_out = SETTINGS["digits"]
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(digits.target == digit))
        parts = [("train", rows[:per_class]), ("known", rows[per_class : per_class + held_out])] if digit < 5 else [
            ("near", rows[:held_out])]
        for part, chosen in parts:
            folder = root / part / str(digit)
            folder.mkdir(parents=True, exist_ok=True)
            for row in chosen:
                pixels = (digits.images[row] * (255 / 16)).astype("uint8")
                Image.fromarray(pixels).convert("RGB").resize((size, size), Image.BILINEAR).save(folder / f"{row}.png")
    return root / "train", root / "known", root / "near"


DATASETS = {"shapes": write_shapes, "digits": write_digits}


def photo_crops(count: int, size: int, seed: int) -> np.ndarray:
    """Random square crops of scikit-learn's two sample photographs, resized to ``size``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        side = int(rng.integers(48, min(photo.shape[:2])))
        top, left = (int(rng.integers(0, photo.shape[axis] - side + 1)) for axis in (0, 1))
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((size, size), Image.BILINEAR)
        crops.append(np.asarray(crop))
    return np.stack(crops)


def images_of(folder: Path, size: int) -> np.ndarray:
    files = sorted(path for path in folder.rglob("*") if path.suffix in (".jpg", ".png"))
    images, _, _ = decode_images(files, size)
    return images


def forward(model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Backbone embedding, the head's last hidden layer, and the calibrated logits."""
    import keras

    head = model.get_layer("head")
    dense = head.get_layer("output")
    inputs = keras.Input(shape=(None, None, 3))
    maps = model.get_layer("backbone")(model.get_layer("preprocessing")(inputs))
    hidden = keras.Model(head.input, dense.input)(maps)
    parts = keras.Model(inputs, [keras.layers.GlobalAveragePooling2D()(maps), hidden])
    embedding, hidden = (np.asarray(part, dtype="float64")
                         for part in parts.predict(images.astype("float32"), batch_size=32, verbose=0))
    kernel, bias = (np.asarray(weight, dtype="float64") for weight in dense.get_weights())
    return {"embedding": embedding, "hidden": hidden, "logits": hidden @ kernel + bias}


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def knn(queries: np.ndarray, reference: np.ndarray, k: int, centre: np.ndarray | None = None) -> np.ndarray:
    if centre is not None:
        queries, reference = queries - centre, reference - centre
    similarity = unit_rows(queries) @ unit_rows(reference).T
    return -np.partition(-similarity, k - 1, axis=1)[:, k - 1]


def mahalanobis(queries: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from sklearn.covariance import LedoitWolf

    means = np.stack([reference[labels == c].mean(axis=0) for c in range(int(labels.max()) + 1)])
    precision = LedoitWolf().fit(reference - means[labels]).precision_
    distances = np.stack([np.einsum("ij,jk,ik->i", queries - mean, precision, queries - mean) for mean in means], 1)
    return -distances.min(axis=1)


def candidate_scores(parts: dict, train: dict, train_labels: np.ndarray) -> dict[str, np.ndarray]:
    """Every candidate score of one set of images (higher: more familiar), but the fused one."""
    from scipy.special import logsumexp

    centre = train["embedding"].mean(axis=0)
    return {
        "max_probability": softmax(parts["logits"]).max(axis=1),
        "energy": logsumexp(parts["logits"], axis=1),
        "knn_k1": knn(parts["embedding"], train["embedding"], 1),
        "knn_k10": knn(parts["embedding"], train["embedding"], 10),
        "knn_centred_k1": knn(parts["embedding"], train["embedding"], 1, centre),
        "knn_centred_k10": knn(parts["embedding"], train["embedding"], 10, centre),
        "mahalanobis": mahalanobis(parts["embedding"], train["embedding"], train_labels),
        "knn_hidden_k1": knn(parts["hidden"], train["hidden"], 1),
    }


def cached_views(prepared, overrides: dict, seed: int, views: int = 2) -> list[np.ndarray]:
    """The training images as the feature cache's first ``views`` views augment them
    (``training.features``: seeded by run seed, view and image)."""
    from transferkit.data.augment import build_augmenter
    from transferkit.data.batches import augment_one
    from transferkit.training.features import view_seed

    augmenter = build_augmenter(transferkit.load_recipe(None, overrides).augment)
    return [np.stack([augment_one(augmenter, image, view_seed(seed, view, index))
                      for index, image in enumerate(prepared.train_images)]) for view in range(views)]


def aps_sets(probabilities: np.ndarray, calibration: np.ndarray, labels: np.ndarray, coverage: float) -> np.ndarray:
    """Non-randomised APS: classes by falling probability until their sum reaches q."""
    def cumulative(probs):
        order = np.argsort(-probs, axis=1)
        sorted_probs = np.take_along_axis(probs, order, axis=1)
        return order, np.cumsum(sorted_probs, axis=1)

    order, sums = cumulative(calibration)
    rank = np.argmax(order == labels[:, None], axis=1)
    q = set_quantile(sums[np.arange(len(labels)), rank], coverage)
    order, sums = cumulative(probabilities)
    keep = np.concatenate([np.ones((len(sums), 1), bool), sums[:, :-1] < q], axis=1)
    members = np.zeros_like(probabilities, dtype=bool)
    np.put_along_axis(members, order, keep, axis=1)
    return members


def with_fused(scores: dict[str, dict[str, np.ndarray]]) -> None:
    """Add "knn_k1+max_probability": the two scores standardised on the validation split, summed."""
    def standard(name, values):
        reference = scores["val"][name]
        return (values - reference.mean()) / max(reference.std(), 1e-12)

    for part in list(scores):
        scores[part]["knn_k1+max_probability"] = (standard("knn_k1", scores[part]["knn_k1"])
                                                  + standard("max_probability", scores[part]["max_probability"]))


def one_seed(root: Path, data_set: str, seed: int, head_epochs: int, fine_epochs: int,
             precision: str = "auto") -> dict:
    """Train on the known classes with this seed and measure every score."""
    size = SETTINGS[data_set][0]
    data, known_dir, near_dir = DATASETS[data_set](root / f"{data_set}-{seed}", seed)
    far_dir = write_unknown_images(root / f"far-{seed}", 120, size=size, seed=3000 + seed)
    overrides = {"weights": "none", "image_size": size, "seed": seed, "stages.0.epochs": head_epochs,
                 "stages.1:.epochs": fine_epochs, "precision": precision}
    started = time.perf_counter()
    run = transferkit.finetune(data, None, overrides, output=root / f"run-{data_set}-{seed}", verbose=0)
    train_seconds = time.perf_counter() - started
    prepared = transferkit.prepare_data(data, transferkit.load_recipe(None, overrides), verbose=0)
    held_out = {
        "known": images_of(known_dir, size),
        "near": images_of(near_dir, size),
        "far": np.concatenate([images_of(far_dir, size), photo_crops(60, size, seed)]),
    }
    train = forward(run.model, prepared.train_images)
    augmented = [forward(run.model, view)["embedding"] for view in cached_views(prepared, overrides, seed)]
    outputs = {"val": forward(run.model, prepared.val_images),
               **{part: forward(run.model, images) for part, images in held_out.items()}}
    scores = {name: candidate_scores(parts, train, prepared.train_labels) for name, parts in outputs.items()}
    # The run's own reference (rejection.npz), as finetune computed it: through the int8
    # frozen part where the last stage trained on int8 features ("reference_passes").
    rejection = json.loads((run.path / "labels.json").read_text())["rejection"]
    run_reference = load_reference(run.path / REFERENCE_FILE)
    for name, parts in outputs.items():
        scores[name]["knn_k1_run_reference"] = knn(parts["embedding"], run_reference, 1)
        scores[name]["knn_k1_cached_view"] = knn(parts["embedding"], augmented[0], 1)
        scores[name]["knn_k1_cached_views"] = knn(parts["embedding"], np.concatenate(augmented), 1)
    with_fused(scores)
    known_labels = np.repeat(np.arange(len(prepared.class_names)), SETTINGS[data_set][2])
    figures = {}
    for score in scores["val"]:
        threshold = keep_threshold(scores["val"][score], 0.95)
        known, near, far = (scores[part][score] for part in ("known", "near", "far"))
        figures[score] = {
            "auroc_near": open_set_metrics(known, near)["auroc"],
            "auroc_far": open_set_metrics(known, far)["auroc"],
            "fpr95_near": fpr_at_tpr(known, near),
            "fpr95_far": fpr_at_tpr(known, far),
            "known_kept": float(np.mean(known >= threshold)),
            "near_rejected": float(np.mean(near < threshold)),
            "far_rejected": float(np.mean(far < threshold)),
        }
    val_probs = softmax(outputs["val"]["logits"])
    known_probs = softmax(outputs["known"]["logits"])
    quantile = set_quantile(lac_scores(val_probs, prepared.val_labels), 0.9)
    lac = (known_probs >= 1 - quantile) | (known_probs == known_probs.max(axis=1, keepdims=True))
    aps = aps_sets(known_probs, val_probs, prepared.val_labels, 0.9)
    sets = {name: {"coverage": float(np.mean(m[np.arange(len(known_labels)), known_labels])),
                   "mean_size": float(m.sum(axis=1).mean())} for name, m in (("LAC", lac), ("APS", aps))}
    return {"seed": seed, "train_seconds": round(train_seconds, 1), "n_val": int(len(prepared.val_labels)),
            "run_reference": rejection.get("reference_passes", "the float32 (or bfloat16) network"),
            "known_accuracy": float(np.mean(known_probs.argmax(axis=1) == known_labels)),
            "scores": figures, "sets_0.9": sets}


def mean_of(runs: list[dict], key: str) -> dict:
    names = runs[0][key]
    return {name: {metric: round(float(np.mean([run[key][name][metric] for run in runs])), 4)
                   for metric in runs[0][key][name]} for name in names}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", choices=sorted(DATASETS), default=["shapes", "digits"])
    parser.add_argument("--head-epochs", type=int, default=8)
    parser.add_argument("--fine-epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--precision", default="auto",
                        help="the runs' precision (int8: the run's reference goes through the int8 frozen part)")
    args = parser.parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="tk-rejection-") as folder:
        for data_set in args.data:
            runs = [one_seed(Path(folder), data_set, seed, args.head_epochs, args.fine_epochs, args.precision)
                    for seed in args.seeds]
            size, per_class, held_out = SETTINGS[data_set]
            results[data_set] = {
                "size": size, "per_class": per_class, "held_out_per_class": held_out,
                "known_accuracy": [round(run["known_accuracy"], 4) for run in runs],
                "scores": mean_of(runs, "scores"), "sets_0.9": mean_of(runs, "sets_0.9"), "per_seed": runs,
            }
    print(json.dumps({"benchmark": "rejection", "machine": machine_facts(),
                      "epochs": [args.head_epochs, args.fine_epochs], "seeds": args.seeds,
                      "precision": args.precision, **results}))


if __name__ == "__main__":
    main()
