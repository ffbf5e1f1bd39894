"""Quick check before stopping: a few short ratios against the figures recorded for this CPU kind.

Each figure is transferkit's seconds over a baseline's, both measured in this run on the same
data (ratios travel between machines of one kind far better than seconds), best of a few
rounds run in turn; lower is better:

- ``finetune_over_keras``: the default job (head, then block5; VGG16, 32 px, 3 classes x 20
  images, 1 + 1 epochs) against the Keras transfer-learning guide written out by hand
  (``finetune_vs_keras.py``'s two jobs at a tiny size);
- ``predict_over_keras``: ``predict_folder`` over 256 JPEGs with the engine as predict builds
  it (setup excluded) against plain Keras float32 ``model.predict_on_batch`` on the same images
  decoded beforehand, 32 at a time, the run being the one the finetune above wrote. (Not
  ``model.predict``: on TensorFlow, on a 2-core AMD EPYC, its calls over these images took
  either about 0.8 s or 1.3 s, the slower on most calls, so that the best of three swung the
  ratio from 0.79 to 1.33 with the same code; ``predict_on_batch`` took 0.69-0.79 s on every
  call.)

The CPU kind is ``amx``, ``avx512_bf16``, ``avx512``, ``avx2``, or ``avx2-emulated`` with
``TRANSFERKIT_TEST_CPU=avx2`` on a CPU with AVX-512 (handled as tests/conftest.py does, plus
``ONEDNN_MAX_CPU_ISA=AVX2`` for oneDNN's kernels in TensorFlow and OpenVINO). A figure worse
than the recorded one by more than ``TOLERANCE`` fails (exit 1, one line each); a figure
with nothing recorded for this kind is shown and does not fail.

    python benchmarks/quick.py                           # check (about 2 minutes on 2 cores)
    TRANSFERKIT_TEST_CPU=avx2 python benchmarks/quick.py # as on a CPU without AVX-512
    python benchmarks/quick.py --record                  # write this kind's figures

``--override KEY=VALUE`` (recipe keys, e.g. ``engine=keras``) changes transferkit's side only:
a way to see what a slower transferkit looks like to this check. Prints one JSON line, then
one line per figure. Weights are random ("none"): speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FIGURES_FILE = HERE / "quick_figures.json"
# A ratio may be this much worse than recorded before it counts as a regression: the
# run-to-run spread measured on 2 shared cores (benchmarks/README.md) was up to 20%.
TOLERANCE = 0.25

# TRANSFERKIT_TEST_CPU=avx2 as tests/conftest.py runs it, before TensorFlow or OpenVINO load.
EMULATED_CPU = os.environ.get("TRANSFERKIT_TEST_CPU", "")
if EMULATED_CPU == "avx2":
    os.environ["TF_ENABLE_ONEDNN_OPTS"] = "0"
    os.environ["ONEDNN_MAX_CPU_ISA"] = "AVX2"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import transferkit.runtime  # noqa: E402  (cpu_flags leaves AVX-512 and AMX out under the emulation)


def cpu_kind(flags: set[str], emulated: str = "") -> str:
    """The key the figures are recorded under: what decides transferkit's kernels and precision."""
    if emulated == "avx2":
        return "avx2-emulated" if any(flag.startswith(("avx512", "amx")) for flag in flags) else "avx2"
    for flag, kind in (("amx_bf16", "amx"), ("avx512_bf16", "avx512_bf16"), ("avx512f", "avx512"), ("avx2", "avx2")):
        if flag in flags:
            return kind
    return "other"


def compare(recorded: dict, measured: dict, tolerance: float = TOLERANCE) -> tuple[list[str], list[str]]:
    """(lines to print, the regressions among them) for measured ratios against recorded ones
    (``{figure: {"value": ratio, ...}}``; lower is better)."""
    lines, regressions = [], []
    for figure, value in measured.items():
        if figure not in recorded:
            lines.append(f"{figure}: {value:.3f} (not recorded for this CPU kind: run with --record)")
            continue
        limit = recorded[figure]["value"] * (1 + tolerance)
        verdict = "REGRESSION" if value > limit else "ok"
        line = (f"{verdict}: {figure} measured {value:.3f}, recorded {recorded[figure]['value']:.3f} "
                f"(allowed up to {limit:.3f}, +{tolerance:.0%})")
        lines.append(line)
        if value > limit:
            regressions.append(line)
    return lines, regressions


def best(jobs, rounds: int) -> list[float]:
    """Seconds of each job, the best of ``rounds`` rounds running the jobs in turn."""
    seconds = [[] for _ in jobs]
    for _ in range(rounds):
        for job, times in zip(jobs, seconds):
            started = time.perf_counter()
            job()
            times.append(time.perf_counter() - started)
    return [min(times) for times in seconds]


def finetune_ratio(data: Path, tmp: Path, overrides: dict, rounds: int) -> tuple[float, dict, Path]:
    from finetune_vs_keras import keras_guide, transferkit_job

    common = dict(backbone="vgg16", size=32, batch=8, head_epochs=1, fine_epochs=1, seed=1)
    run_dir = tmp / "run"

    def baseline():
        keras_guide(data, **common)

    def ours():
        transferkit_job(data, precision="auto", engine="default", output=run_dir, extra=overrides, **common)

    keras_seconds, ours_seconds = best([baseline, ours], rounds)
    seconds = {"keras": round(keras_seconds, 2), "transferkit": round(ours_seconds, 2)}
    return ours_seconds / keras_seconds, seconds, run_dir


def predict_ratio(run_dir: Path, tmp: Path, overrides: dict, rounds: int) -> tuple[float, dict]:
    from predict import keras_float32, write_images

    from transferkit.data.folders import iter_image_files
    from transferkit.data.images import decode_images
    from transferkit.inference.predict import engine_for, predict_folder
    from transferkit.runs import load_run

    images = write_images(tmp / "images", 256, 32)
    run = load_run(run_dir)
    files = [path for path, reason in iter_image_files(images) if reason is None]
    floats = decode_images(files, run.image_size)[0].astype("float32")
    plain = keras_float32(run_dir)
    engine = engine_for(run, overrides.get("engine", "auto"), overrides.get("precision", "auto"), images=len(files))
    getattr(engine, "exact", None)  # the float32 network for near ties, built now (setup)
    plain.predict(floats[:32], batch_size=32, verbose=0)
    predict_folder(run, images, batch_size=32, engine=engine)  # warm-up
    keras_seconds, ours_seconds = best(
        [lambda: [plain.predict_on_batch(floats[start : start + 32]) for start in range(0, len(floats), 32)],
         lambda: predict_folder(run, images, batch_size=32, engine=engine)], rounds)
    engine_name = type(engine).__name__
    return ours_seconds / keras_seconds, {"keras": round(keras_seconds, 3), "transferkit": round(ours_seconds, 3),
                                          "engine": engine_name}


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help=f"write this CPU kind's figures to {FIGURES_FILE.name}")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per figure, best kept (default 3)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for transferkit's side only (e.g. engine=keras)")
    parser.add_argument("--figures", type=Path, default=FIGURES_FILE, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = dict(item.split("=", 1) for item in args.override)
    if args.record and overrides:
        parser.error("--record with --override would record a changed transferkit")

    from transferkit.data.synthetic import write_shapes_dataset

    sys.path.insert(0, str(HERE))  # finetune_vs_keras.py's and predict.py's pieces
    kind = cpu_kind(transferkit.runtime.cpu_flags(emulated=False), EMULATED_CPU)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tk-quick-") as name:
        tmp = Path(name)
        data = write_shapes_dataset(tmp / "data", 3, 20, size=40, seed=1)
        finetune, finetune_seconds, run_dir = finetune_ratio(data, tmp, overrides, max(1, args.rounds - 1))
        predict, predict_seconds = predict_ratio(run_dir, tmp, overrides, args.rounds)
    measured = {"finetune_over_keras": round(finetune, 3), "predict_over_keras": round(predict, 3)}

    everything = json.loads(args.figures.read_text()) if args.figures.exists() else {}
    lines, regressions = compare(everything.get(kind, {}), measured)
    print(json.dumps({
        "machine": transferkit.runtime.machine_facts(),
        "benchmark": "quick",
        "cpu_kind": kind,
        "overrides": overrides,
        "figures": measured,
        "seconds": {"finetune_over_keras": finetune_seconds, "predict_over_keras": predict_seconds},
        "tolerance": TOLERANCE,
        "regressions": len(regressions),
        "total_seconds": round(time.perf_counter() - started, 1),
    }))
    for line in lines:
        print(line)
    if args.record:
        today, commit = datetime.date.today().isoformat(), git_commit()
        everything[kind] = {figure: {"value": value, "recorded": today, "commit": commit}
                            for figure, value in measured.items()}
        args.figures.write_text(json.dumps(everything, indent=2, sort_keys=True) + "\n")
        print(f"recorded {len(measured)} figures for {kind} in {args.figures}")
        return 0
    if regressions:
        print(f"quick check FAILED: {len(regressions)} figure(s) slower than recorded for {kind} beyond "
              f"+{TOLERANCE:.0%}", file=sys.stderr)
        for line in regressions:
            print(line, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
