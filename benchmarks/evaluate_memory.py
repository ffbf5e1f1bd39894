"""Peak memory of ``evaluate`` over a small and a large labelled folder: it should stay flat.

A tiny VGG16 (weights "none", 32 px, a 16-unit head, untrained: memory does not depend on
what it learned) is saved as a run; two labelled folders of generated 32 px PNGs (two
classes) are written, the small one a subset of the large one (links). Each evaluation
(metrics, predictions.csv and every figure written) runs in a fresh process, whose own peak
resident size (VmHWM) is reported. Prints one JSON line.

    python benchmarks/evaluate_memory.py                     # 20,000 and 1,000 images
    python benchmarks/evaluate_memory.py --images 2000 --small 200
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
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CLASSES = ("dark", "light")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def write_images(root: Path, count: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for index in range(count):
        label = index % 2
        folder = root / CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 128, (size, size, 3)) + 127 * label
        Image.fromarray(pixels.astype("uint8")).save(folder / f"{index:06d}.png")
    return root


def subset(large: Path, small: Path, count: int) -> Path:
    per_class = count // len(CLASSES)
    for name in CLASSES:
        (small / name).mkdir(parents=True, exist_ok=True)
        for path in sorted((large / name).iterdir())[:per_class]:
            (small / name / path.name).symlink_to(path)
    return small


def save_run(folder: Path, size: int) -> Path:
    from transferkit.backbones import load_backbone
    from transferkit.model.classifier import build_classifier
    from transferkit.recipe import HeadConfig
    from transferkit.runs import write_labels

    folder.mkdir(parents=True)
    model = build_classifier(load_backbone("vgg16", "none", (size, size, 3)), 2, HeadConfig(units=(16,)))
    model.save(folder / "model.keras")
    write_labels(folder, CLASSES, size, "vgg16", "sigmoid")
    return folder


def child(run: str, images: str, out: str, batch: int) -> None:
    from transferkit.evaluation.evaluate import evaluate_folder, write_evaluation

    start = time.perf_counter()
    result = evaluate_folder(run, images, batch_size=batch)
    write_evaluation(result, out)
    seconds = time.perf_counter() - start
    # VmHWM is this process's own peak (ru_maxrss could carry the parent's from before exec).
    peak_kb = next(
        int(line.split()[1]) for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM:")
    )
    print(
        json.dumps(
            {
                "images": result.metrics["n_images"],
                "max_rss_mb": round(peak_kb / 1024, 1),
                "seconds": round(seconds, 1),
                "engine": result.engine,
            }
        )
    )


def measure(run: Path, images: Path, out: Path, batch: int) -> dict:
    command = [sys.executable, __file__, "--child", str(run), str(images), str(out), str(batch)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--small", type=int, default=1_000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run, images, out, batch = args.child
        child(run, images, out, int(batch))
        return
    with tempfile.TemporaryDirectory(prefix="tk-evaluate-memory-") as tmp:
        tmp = Path(tmp)
        run = save_run(tmp / "run", args.size)
        large = write_images(tmp / "large", args.images, args.size)
        small = subset(large, tmp / "small", args.small)
        figures = {
            "small": measure(run, small, tmp / "eval-small", args.batch_size),
            "large": measure(run, large, tmp / "eval-large", args.batch_size),
        }
    print(
        json.dumps(
            {
                "benchmark": "evaluate_memory",
                "cpu": cpu_model(),
                "image_size": args.size,
                "small": figures["small"],
                "large": figures["large"],
                "rss_ratio_large_to_small": round(figures["large"]["max_rss_mb"] / figures["small"]["max_rss_mb"], 3),
            }
        )
    )


if __name__ == "__main__":
    main()
