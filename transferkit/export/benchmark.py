"""``benchmark_run``: every format that runs here, side by side in one run: load time,
images per second at batch 1 and batch N, file size and validation accuracy.

Each format is exported (and checked, as ``export_run`` does) into a temporary folder, then
loaded and timed in a fresh process that never imports transferkit, as a user's program
would load it; all on the same images, one format after the other.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from transferkit.backbones import find_spec
from transferkit.data.samples import recorded_data_dir
from transferkit.errors import ExportError, RunError
from transferkit.export.formats import (
    FORMATS,
    QUANTIZATIONS,
    holdable,
    missing_packages,
    require_tensorflow_backend,
)
from transferkit.files import write_atomic, write_failure

log = logging.getLogger("transferkit")

BENCHMARK_FILE = "benchmark.json"
BENCHMARK_SUFFIXES = (".json",)
COLUMNS = ("format", "size MB", "load s", "img/s b1", "img/s bN", "accuracy", "max |dp|")


@dataclass
class BenchmarkResult:
    """The rows of a benchmark (one dict per format) and where benchmark.json went."""

    rows: list[dict]
    batch_size: int
    path: Path | None = None
    skipped: list[str] = field(default_factory=list)

    def table(self) -> str:
        """The rows as a plain-text table."""
        header = [column.replace("bN", f"b{self.batch_size}") for column in COLUMNS]
        cells = [[row["name"], f"{row['size_bytes'] / 1e6:.1f}", f"{row['load_seconds']:.2f}",
                  f"{row['images_per_second_batch_1']:.1f}", f"{row['images_per_second_batch_n']:.1f}",
                  f"{100 * row['accuracy']:.1f}%", f"{row['max_abs_diff']:.2g}"] for row in self.rows]
        widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
        lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True)).rstrip()
                 for line in [header, *cells]]
        return "\n".join([lines[0], "  ".join("-" * width for width in widths), *lines[1:]])


def parse_formats(formats) -> list[tuple[str, str]]:
    """Benchmark entries, "litert" or "litert-int8", as (format, quantization) pairs.

    Args:
        formats: names, or None for every float32 format whose runtime is installed.

    Raises:
        ExportError: an unknown name or a quantization the format lacks.
    """
    if not formats:
        return [(name, "none") for name, spec in FORMATS.items() if not missing_packages(spec)]
    entries = []
    for entry in formats:
        name, _, quantize = entry.partition("-")
        quantize = quantize or "none"
        if name not in FORMATS or quantize not in FORMATS[name].quantizations:
            choices = [spec.folder_name(q) for spec in FORMATS.values() for q in QUANTIZATIONS
                       if q in spec.quantizations]
            raise ExportError(f"unknown benchmark format {entry!r}; choose from {', '.join(choices)}")
        entries.append((name, quantize))
    return entries


def check_benchmark_output(path: Path, run_folder: Path, force: bool, data_folders=()) -> None:
    """Fail before any export where benchmark.json could not be written or would replace
    what it should not.

    Raises:
        RunError: not a .json name, a folder, a file that exists (without ``force``), inside
            the run folder or another run's (its default RUN/benchmark.json aside), inside a
            data folder, or a place that cannot be written.
    """
    from transferkit.files import require_apart, require_new_file, require_writable_place
    from transferkit.runs import require_outside_runs

    if path.is_dir():
        raise RunError(f"--output {path} is a folder; name a .json file in it")
    if path.suffix.lower() not in BENCHMARK_SUFFIXES:
        raise RunError(f"--output {path}: benchmark results are JSON; name a .json file")
    require_outside_runs(path, "--output", run=run_folder, allowed=Path(run_folder) / BENCHMARK_FILE)
    require_new_file(path, force, "benchmark file")
    require_apart(path, data_folders, "benchmark file")
    require_writable_place(path.parent)


def benchmark_run(run, formats=None, batch_size: int = 32, *, data: str | os.PathLike | None = None,
                  seconds: float = 1.0, output: str | os.PathLike | None = None,
                  force: bool = False) -> BenchmarkResult:
    """Export and time each format of a run, side by side.

    Args:
        run: a run folder (or its model.keras), or a loaded ``Run``.
        formats: entries "FORMAT" or "FORMAT-QUANTIZATION" ("litert-int8"); default None
            (every float32 format whose runtime is installed here).
        batch_size: the larger batch timed (besides batch 1); default 32.
        data: the run's data folder (see ``export_run``); default None.
        seconds: about how long each throughput is measured; default 1.0.
        output: where benchmark.json goes; default RUN/benchmark.json.
        force: replace an existing benchmark file; default False.

    Returns:
        A ``BenchmarkResult``; benchmark.json written.

    Raises:
        ExportError: an unknown format, or one that failed to export or run.
        RunError: the output cannot or may not be written (``check_benchmark_output``).
    """
    from transferkit.export.exporter import export_run
    from transferkit.export.verify import run_fresh
    from transferkit.runs import Run, load_run

    if batch_size < 1:
        raise ExportError(f"batch size must be at least 1, got {batch_size}")
    if not isinstance(run, Run):  # no run there: told before Keras and every runtime are imported (seconds)
        load_run(run, with_model=False)
    require_tensorflow_backend()
    entries = parse_formats(formats)
    run = run if isinstance(run, Run) and run.model is not None else load_run(getattr(run, "path", run))
    path = Path(output) if output is not None else Path(run.path) / BENCHMARK_FILE
    check_benchmark_output(path, Path(run.path), force, [data, recorded_data_dir(run)])
    rows, skipped = [], []
    entries, unfit = holdable(find_spec(run.backbone), entries, lambda entry: entry[0], named=formats is not None)
    for (name, quantize), error in unfit:  # of the default formats, those the backbone cannot be written as
        skipped.append(FORMATS[name].folder_name(quantize))
        log.warning("benchmark: skipping %s (%s)", skipped[-1], error)
    with tempfile.TemporaryDirectory(prefix="tk-benchmark-") as scratch:
        for name, quantize in entries:
            missing = missing_packages(FORMATS[name], quantize)
            if missing:
                skipped.append(FORMATS[name].folder_name(quantize))
                log.warning("benchmark: skipping %s (%s not installed)", skipped[-1],
                            ", ".join(package.module for package in missing))
                continue
            [exported] = export_run(run, name, Path(scratch) / FORMATS[name].folder_name(quantize), quantize,
                                    data=data, allow_drop=True)
            images = _sample_images(exported.folder)
            fresh = run_fresh(name, exported.file, images, batch_size=batch_size, benchmark_seconds=seconds)
            rows.append(_row(exported, fresh.stats))
            log.info("benchmark %s: %.1f images/s at batch 1, %.1f at batch %d", rows[-1]["name"],
                     fresh.stats["images_per_second_batch_1"], fresh.stats["images_per_second_batch_n"], batch_size)
            _remove(exported.folder)  # one export on disk at a time
    result = BenchmarkResult(rows, batch_size, path, skipped)
    payload = {"run": str(Path(run.path).resolve()), "batch_size": batch_size, "seconds_per_measure": seconds,
               "machine": {"cpu": _cpu_name(), "cores": os.cpu_count(), "python": platform.python_version()},
               "rows": rows, "skipped": skipped}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(payload, indent=2, allow_nan=True) + "\n")
    except OSError as error:
        raise RunError(f"cannot write {path}: {write_failure(error)}; choose another -o") from error
    return result


def _sample_images(folder: Path):
    """The images the export was checked on are not kept; time on generated images of the
    same size (throughput does not depend on what the pixels show)."""
    import numpy as np

    from transferkit.data.samples import generated_images

    size = json.loads((folder / "labels.json").read_text(encoding="utf-8"))["input_size"]
    return generated_images(32, size, np.random.default_rng(0))


def _row(exported, stats: dict) -> dict:
    return {
        "name": exported.format if exported.quantize == "none" else f"{exported.format}-{exported.quantize}",
        "format": exported.format,
        "quantize": exported.quantize,
        "size_bytes": exported.size_bytes,
        "load_seconds": stats["load_seconds"],
        "images_per_second_batch_1": stats["images_per_second_batch_1"],
        "images_per_second_batch_n": stats["images_per_second_batch_n"],
        "accuracy": exported.accuracy,
        "keras_float32_accuracy": exported.float_accuracy,
        "accuracy_images": exported.record["accuracy"]["images"],
        "accuracy_labels": exported.record["accuracy"]["labels"],
        "max_abs_diff": exported.max_abs_diff,
        "top1_agreement": exported.top1_agreement,
    }


def _remove(folder: Path) -> None:
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
