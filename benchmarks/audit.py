"""How many deliberately mislabelled files ``transferkit audit`` ranks at the top, against
ranking by in-sample loss (what fastai's image cleaner ranks by: a head trained on every
image, each scored on its own label).

The images: scikit-learn's bundled handwritten digits (1,797 real 8 x 8 scans, 10 classes),
``--per-class`` of each, enlarged to 32 px; ``--flip`` of them are put in a random wrong class
folder. Both rankings use the same backbone features and the same head (the recipe's), so
the difference is out-of-sample probabilities and confident learning against in-sample
loss. Weights are random ("none") unless ``--weights`` names others.

    python benchmarks/audit.py                      # 90 a class, 30 flipped
    python benchmarks/audit.py --flip 60 --seed 1

Prints one JSON line: the flipped files found among the top N and top 1.5 N suspicions of
each ranking (N = --flip), how many moves ``moves.sh`` suggests and how many of them are
right, and the seconds the audit took.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

import transferkit  # noqa: E402
from transferkit.data.prepare import decode_folder  # noqa: E402
from transferkit.runtime import machine_facts  # noqa: E402
from transferkit.trust.audit import FoldHead, backbone_features, suspect_labels  # noqa: E402


def write_digits(root: Path, per_class: int, flip: int, seed: int) -> dict[str, tuple[int, int]]:
    """The folder, and {file name: (folder it is in, its true digit)} of the flipped ones."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    chosen = np.concatenate([rng.choice(np.flatnonzero(digits.target == d), per_class, replace=False)
                             for d in range(10)])
    flipped = set(rng.choice(chosen, flip, replace=False).tolist())
    truth = {}
    for index in chosen:
        label = int(digits.target[index])
        given = int(rng.choice([d for d in range(10) if d != label])) if index in flipped else label
        folder = root / f"digit{given}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[index] * 255 / 16).astype("uint8")
        name = f"scan{index:04d}.png"
        Image.fromarray(np.stack([pixels] * 3, axis=-1)).resize((32, 32), Image.Resampling.NEAREST).save(folder / name)
        if index in flipped:
            truth[name] = (given, label)
    return truth


def found(ranked: list[str], truth: dict, count: int) -> int:
    return sum(name in truth for name in ranked[:count])


def in_sample_ranking(data: Path, overrides: dict) -> list[str]:
    """The baseline: the same features and head, trained on every image, each ranked by the
    loss of its own label (1 - P(given), most suspicious first)."""
    recipe = transferkit.load_recipe(None, overrides)
    decoded = decode_folder(data, recipe, verbose=0)
    features = backbone_features(decoded.images, recipe, len(decoded.class_names), verbose=0)
    head = FoldHead(features.shape[1:], len(decoded.class_names), recipe, len(features))
    everything = np.arange(len(features))
    head.fit(features, decoded.labels, everything, 0)
    score = suspect_labels(head.predict(features), decoded.labels).score
    return [decoded.files[i].name for i in np.argsort(-score, kind="stable")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=90)
    parser.add_argument("--flip", type=int, default=30)
    parser.add_argument("--weights", default="none")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    overrides = {"weights": args.weights, "image_size": 32, "seed": args.seed}
    with tempfile.TemporaryDirectory(prefix="tk-audit-bench-") as temporary:
        data = Path(temporary) / "digits"
        truth = write_digits(data, args.per_class, args.flip, args.seed)
        started = time.perf_counter()
        result = transferkit.audit(data, None, overrides, output=Path(temporary) / "audit", folds=5, verbose=0)
        seconds = time.perf_counter() - started
        with open(result.path / "issues.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        audited = [Path(row["file"]).name for row in rows]
        moves = [row for row in rows if row["confident"] == "true"]
        right = sum(Path(row["file"]).name in truth and row["suggested"] == f"digit{truth[Path(row['file']).name][1]}"
                    for row in moves)
        baseline = in_sample_ranking(data, overrides)
    n, wider = args.flip, int(round(1.5 * args.flip))
    print(json.dumps({
        "benchmark": "audit", "images": 10 * args.per_class, "flipped": n, "weights": args.weights,
        "audit_top_n": found(audited, truth, n), "audit_top_1.5n": found(audited, truth, wider),
        "in_sample_top_n": found(baseline, truth, n), "in_sample_top_1.5n": found(baseline, truth, wider),
        "moves_suggested": len(moves), "moves_right": right,
        "out_of_sample_accuracy": round(result.accuracy, 4), "audit_seconds": round(seconds, 1),
        "machine": machine_facts(),
    }))


if __name__ == "__main__":
    main()
