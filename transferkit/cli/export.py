"""``transferkit export`` and ``benchmark``: a run's model in other runtimes' formats,
each checked against the Keras model; and those formats timed side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from transferkit.cli.common import (
    RunArgument,
    VerboseOption,
    check_choice,
    check_positive,
    check_suffix,
    choices,
    reports_errors,
    setup_logging,
    usage_error,
    usage_errors,
)
from transferkit.export.formats import DEFAULT_MAX_DROP, FORMAT_CHOICES, QUANTIZATIONS, check_quantization, get_format

DataOption = Annotated[
    Optional[Path],
    typer.Option("--data", help="The run's data folder: its validation split (the run's split.csv) checks "
                 "each export, its training images calibrate int8; default the data folder the run's labels.json "
                 "names, else generated images."),
]


@reports_errors
def export(
    run: RunArgument,
    format: Annotated[str, typer.Option("--format", "-f", metavar=choices(FORMAT_CHOICES),
                                        help="The format to write; all: every format whose runtime is installed.")],
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o",
        help="Export folder (with --format all: the folder holding one per format); default "
        "RUN/exports/FORMAT[-QUANTIZE]/.")] = None,
    quantize: Annotated[str, typer.Option(metavar=choices(QUANTIZATIONS), help="none (float32), float16, dynamic "
                                          "(int8 weights) or int8 (weights and activations, calibrated).")] = "none",
    data: DataOption = None,
    max_drop: Annotated[float, typer.Option(help="Accuracy points a quantized export may lose.")] = DEFAULT_MAX_DROP,
    allow_drop: Annotated[bool, typer.Option("--allow-drop", help="Keep a quantized export that loses more than "
                                             "--max-drop.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing export folder.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Export a run's model (SavedModel, LiteRT, ONNX, OpenVINO, .h5, .keras), checked against Keras."""
    from transferkit.export.exporter import export_run

    setup_logging(False, verbose)
    check_choice("--format", format, FORMAT_CHOICES)
    check_choice("--quantize", quantize, QUANTIZATIONS)
    if format != "all":
        with usage_errors():  # h5 --quantize int8: a quantization the format lacks
            check_quantization(get_format(format), quantize)
    if not max_drop >= 0:  # nan too
        raise usage_error(f"--max-drop must be at least 0, got {max_drop:g}")
    results = export_run(run, format, output, quantize, data=data, max_drop=max_drop, allow_drop=allow_drop,
                         force=force)
    folders = sorted({str(result.folder) for result in results})
    typer.echo(f"{len(results)} export(s) written and checked: {', '.join(folders)}")


@reports_errors
def benchmark(
    run: RunArgument,
    formats: Annotated[Optional[str], typer.Option(
        "--formats",
        help="Comma-separated, e.g. keras,litert,litert-int8,onnx; default every float32 format installed.",
    )] = None,
    batch_size: Annotated[int, typer.Option(help="The larger batch timed, besides batch 1.")] = 32,
    data: DataOption = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="benchmark.json path; default RUN/benchmark.json.")] = None,
    seconds: Annotated[float, typer.Option(help="About how long each throughput is measured.")] = 1.0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing benchmark file.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Time each export format side by side: load time, images/s, size and accuracy."""
    from transferkit.export.benchmark import BENCHMARK_SUFFIXES, benchmark_run, parse_formats

    setup_logging(False, verbose)
    check_positive("--batch-size", batch_size)
    if not seconds > 0:
        raise usage_error(f"--seconds must be above 0, got {seconds:g}")
    entries = [entry.strip() for entry in formats.split(",") if entry.strip()] if formats is not None else None
    if entries == []:  # "--formats ," or "--formats ''": nothing named, not every format
        raise usage_error("--formats names no format; give e.g. keras,onnx, or leave it out for every installed one")
    if entries is not None:
        with usage_errors():  # an unknown name, or a quantization its format lacks (the default imports each runtime)
            parse_formats(entries)
    check_suffix("--output", output, BENCHMARK_SUFFIXES)
    result = benchmark_run(run, entries, batch_size, data=data, seconds=seconds, output=output, force=force)
    typer.echo(result.table())
    typer.echo(f"written to {result.path}")

