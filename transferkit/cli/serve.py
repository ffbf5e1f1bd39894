"""``transferkit serve``: a run behind an HTTP API and a web page, until SIGTERM or Ctrl-C."""

from __future__ import annotations

import math
from typing import Annotated

import typer

from transferkit.cli.common import (
    InferenceEngineOption,
    InferencePrecisionOption,
    RunArgument,
    VerboseOption,
    check_choice,
    check_positive,
    reports_errors,
    setup_logging,
    usage_error,
)
from transferkit.runtime import ENGINES, PRECISIONS


@reports_errors
def serve(
    run: RunArgument,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: a free one, announced).")] = 8000,
    workers: Annotated[int, typer.Option(help="Processes answering, each with the model loaded.")] = 1,
    engine: InferenceEngineOption = "auto",
    precision: InferencePrecisionOption = "auto",
    max_batch: Annotated[int, typer.Option(
            help="Most images in one engine call: requests arriving together are batched up to it.")] = 32,
    max_upload_mb: Annotated[float, typer.Option(
            help="Largest request (all its images together), in MB; larger ones get a 413 error.")] = 20.0,
    grace: Annotated[float, typer.Option(
            help="Seconds the requests in flight may take to finish after SIGTERM or Ctrl-C; those still "
                 "running then get a 503.")] = 60.0,
    worker_timeout: Annotated[float, typer.Option(
            help="With --workers above 1: seconds a worker may leave the supervisor's ping unanswered before "
                 "it is killed and replaced (a hung worker delays a stop by up to twice this plus --grace).")] = 30.0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No line per request; warnings only.")] = False,
    verbose: VerboseOption = False,
) -> None:
    """Serve a run: POST /predict (the labels and confidences of predict), a page at /, docs at /docs."""
    from transferkit.runs import load_run
    from transferkit.serve.server import check_installed
    from transferkit.serve.server import serve as run_server
    from transferkit.serve.service import ServeSettings

    setup_logging(quiet, verbose)
    check_choice("--engine", engine, ENGINES)
    check_choice("--precision", precision, PRECISIONS)
    check_positive("--workers", workers)
    check_positive("--max-batch", max_batch)
    if not 0 <= port <= 65535:
        raise usage_error(f"--port must be 0..65535, got {port}")
    if not 0 < max_upload_mb < math.inf:  # nan fails both comparisons
        raise usage_error(f"--max-upload-mb must be a size above 0 in MB, got {max_upload_mb:g}")
    if not 0 <= grace < math.inf:
        raise usage_error(f"--grace must be 0 or more seconds, got {grace:g}")
    if not 1 <= worker_timeout < math.inf:  # a worker answers within a second, loading included
        raise usage_error(f"--worker-timeout must be 1 second or more, got {worker_timeout:g}")
    check_installed()
    load_run(run, with_model=False)  # no run there: one line, before "loading"
    if not quiet:
        typer.echo(f"loading {run} ...")

    def announce(url: str, service) -> None:
        loaded = service.run
        typer.echo(f"serving {loaded.path.name} ({len(loaded.class_names)} classes, {loaded.backbone} at "
                   f"{loaded.image_size} px, {service.forward.name} engine"
                   f"{f', {workers} workers' if workers > 1 else ''}) at {url}")
        typer.echo(f"  page {url}/  API {url}/predict  docs {url}/docs; Ctrl-C or SIGTERM stops it")

    settings = ServeSettings(run=str(run), engine=engine, precision=precision, max_batch=max_batch,
                             max_upload_mb=max_upload_mb)
    result = run_server(settings, host=host, port=port, workers=workers, access_log=not quiet, announce=announce,
                        grace=grace, worker_timeout=worker_timeout)
    answered = f"; {result.images_answered} image(s) answered" if result.images_answered is not None else ""
    typer.echo(f"stopped{f' by {result.stopped_by}' if result.stopped_by else ''}{answered}")
