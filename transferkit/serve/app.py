"""The HTTP application: FastAPI routes over a ``Service``.

    POST /predict   images as multipart fields named "file" (one or more); ?top_k=, and
                    predict's other per-row options (?reject=true, ?sets=0.9) where predict
                    has them -> {"predictions": [{"file", "label", "confidence", "top_k"}, ...]}
    POST /explain   one image -> PNG: its Grad-CAM heatmap drawn over it (?class= a class)
    GET  /health    liveness and counters
    GET  /metadata  the run's facts (classes, image size, backbone, calibration, rejection
                    threshold, version)
    GET  /          the page: choose or drop an image, see the classes and the heatmap
    GET  /docs      the OpenAPI documentation (FastAPI's)

Every error is ``{"error": "..."}`` with a 4xx status (a request body over the limit: 413,
told before its files are parsed), or 500 with one log line for a failure of the server's
own; no traceback reaches the log and the server keeps answering.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from contextlib import asynccontextmanager, suppress
from importlib import resources
from typing import Annotated, Optional

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from transferkit.errors import TransferkitError, first_line
from transferkit.serve.service import (
    SNAPSHOT_VARIABLE,
    Service,
    Upload,
    load_service,
    settings_from_environment,
    upload_name,
)

log = logging.getLogger("transferkit")

# A body over the limit is read to its end (up to this much) before the 413 is sent: a client
# still sending when the server closes would see a reset connection instead of the answer.
DRAIN_LIMIT = 1 << 30


class TopClass(BaseModel):
    """One of an image's most likely classes."""

    label: str
    probability: float


class PredictionOut(BaseModel):
    """One image's answer, as a row of ``transferkit predict``'s JSON output (predict's
    options that add fields, such as rejection, add them here too)."""

    model_config = ConfigDict(extra="allow")
    file: str
    label: str
    confidence: float
    top_k: list[TopClass]


class PredictionsOut(BaseModel):
    """The answer of POST /predict: one prediction per uploaded file, in order."""

    predictions: list[PredictionOut]


class ErrorOut(BaseModel):
    """Any error: what was wrong, and what to do."""

    error: str


ERRORS = {400: {"model": ErrorOut, "description": "a bad upload or option"},
          413: {"model": ErrorOut, "description": "the request is larger than --max-upload-mb"}}


def error_response(status: int, message: str) -> JSONResponse:
    """``{"error": message}`` with a status code."""
    return JSONResponse({"error": message}, status_code=status)


def page_html() -> str:
    """The page served at / (``page.html`` beside this module)."""
    return resources.files("transferkit.serve").joinpath("page.html").read_text(encoding="utf-8")


def create_app(service: Service) -> FastAPI:
    """The FastAPI application for a loaded run; its lifespan starts and stops the engine's thread.

    Args:
        service: from ``load_service``.

    Returns:
        A ``FastAPI`` application, for uvicorn.
    """
    from transferkit import __version__

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.batcher.start()
        try:
            yield
        except asyncio.CancelledError:  # a second Ctrl-C: at once, the images still queued not run
            service.stopped.set()
            service.batcher.stop(drain=False)
            raise
        # After uvicorn has let the requests in flight finish (or answered them 503 at the
        # end of its grace): what still decodes stops, and the queue is empty by then.
        service.stopped.set()
        service.batcher.stop()

    app = FastAPI(
        title=f"transferkit: {service.run.path.name}",
        version=__version__,
        description=("Classify images with a transferkit run: the labels and calibrated confidences of "
                     "`transferkit predict`. Classes: " + ", ".join(service.run.class_names) + "."),
        lifespan=lifespan,
    )
    app.add_middleware(RequestGuard, max_body=service.settings.max_upload_bytes,
                       limit_text=f"{service.settings.max_upload_mb:g} MB", service=service)
    page = page_html()

    @app.exception_handler(TransferkitError)
    async def user_error(request: Request, error: TransferkitError) -> JSONResponse:
        return error_response(400, str(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        if error.status_code == 404:
            return error_response(404, f"no such endpoint: {request.url.path}; see /docs for the API")
        if error.status_code == 405:
            return error_response(405, f"{request.method} is not allowed on {request.url.path}; see /docs")
        detail = str(error.detail)
        if detail.startswith("Too many files"):  # Starlette's form limit (1,000)
            detail = f"{detail.rstrip('.')}; send the images in several requests"
        elif detail.startswith("Too many fields"):
            detail = f"{detail.rstrip('.')}; send only the images, each as a field named 'file'"
        return error_response(error.status_code, detail)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
        # ?top_k=3&top_k=0: the repetition is the mistake, not the value FastAPI validated
        return error_response(400, repeated_query(request) or validation_message(error))

    @app.post("/predict", response_model=PredictionsOut, responses=ERRORS,
              summary="Classify images as `transferkit predict` does")
    async def predict(
        request: Request,
        file: Annotated[list[UploadFile], File(description="One or more images, each a form field named 'file'.")],
        top_k: Annotated[int, Query(ge=1, description="How many classes to list per image.")] = 1,
        reject: Annotated[bool, Query(description="Answer 'unknown' below the run's rejection threshold "
                                      "(as predict --reject).")] = False,
        sets: Annotated[Optional[float], Query(gt=0, lt=1, description="Prediction sets at this coverage "
                                               "(as predict --sets).")] = None,
    ) -> JSONResponse:
        require_known_query(request, ("top_k", "reject", "sets"))
        options = service.row_options(top_k, reject=reject, sets=sets)
        uploads = [Upload(upload_name(part.filename, index), await part.read()) for index, part in enumerate(file)]
        images = await run_in_threadpool(service.decode, uploads)
        outputs = await asyncio.wrap_future(service.batcher.submit(images))
        rows = service.rows([upload.name for upload in uploads], outputs, options)
        return JSONResponse({"predictions": rows})

    @app.post("/explain", response_class=Response, responses={**ERRORS, 200: {"content": {"image/png": {}}}},
              summary="The Grad-CAM heatmap of an image, drawn over it (PNG)")
    async def explain(
        request: Request,
        file: Annotated[UploadFile, File(description="One image.")],
        class_name: Annotated[Optional[str], Query(alias="class", description="The class to explain; "
                                                   "default the predicted one.")] = None,
    ) -> Response:
        require_known_query(request, ("class",))
        sent = len((await request.form()).getlist("file"))  # the form FastAPI parsed, kept by the request
        if sent > 1:
            return error_response(400, f"/explain takes one image per request, got {sent}; send each in its own "
                                       "request (/predict takes several)")
        upload = Upload(upload_name(file.filename, 0), await file.read())
        png = await run_in_threadpool(service.explain_png, upload, class_name)
        return Response(png, media_type="image/png")

    @app.get("/health", summary="Liveness and counters")
    async def health() -> dict:
        return service.health()

    @app.get("/metadata", summary="The run: classes, image size, backbone, calibration, rejection threshold")
    async def metadata() -> dict:
        return service.metadata()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def validation_message(error: RequestValidationError) -> str:
    """One line for FastAPI's validation errors: which field, what was wrong."""
    parts = []
    for item in error.errors():
        where = [str(part) for part in item.get("loc", ())]
        if where[:2] == ["body", "file"] and item.get("type") == "missing":
            parts.append("no image in the request: send each image as a multipart form field named 'file'")
            continue
        if where[:2] == ["body", "file"]:
            parts.append("the 'file' field must hold a file (multipart/form-data with a file name), not text")
            continue
        name = " ".join(where[1:]) if where and where[0] in ("query", "body") else " ".join(where)
        parts.append(f"{where[0] if where else 'request'} {name}: {item.get('msg', 'invalid')}".replace("  ", " "))
    return "; ".join(dict.fromkeys(parts)) or "the request is not valid; see /docs"


class RequestGuard:
    """ASGI middleware: a request body over ``max_body`` bytes is answered 413 (read to its
    end first, up to ``DRAIN_LIMIT``, so the client gets the answer; at once where the client
    waits for "100 Continue" before sending it), and any exception
    that escapes a route becomes a 500 ``{"error"}`` and one log line, never a traceback.
    It also counts the requests in flight (``Service.in_flight``; health checks not counted).
    """

    def __init__(self, app, max_body: int, limit_text: str, service: Service):
        self.app = app
        self.max_body = max_body
        self.limit_text = limit_text
        self.service = service

    def too_large(self, size: str) -> str:
        return (f"the request is {size}, over the server's limit of {self.limit_text} (--max-upload-mb); "
                "send smaller or fewer images per request")

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            cut_short: list[bool] = []
            try:
                await self.app(scope, receive, lifespan_send(send, cut_short))
            except asyncio.CancelledError:
                if not cut_short:
                    raise
                # told in one line already; ended here, or uvicorn would call the lifespan unsupported
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        counted = scope.get("path") != "/health"
        if counted:
            self.service.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            if counted:
                self.service.in_flight -= 1

    async def _guarded(self, scope, receive, send):
        headers = Headers(scope=scope)
        declared = content_length(headers)
        if declared is not None and declared > self.max_body:
            if not headers.get("expect", "").lower().startswith("100-continue"):
                await drain(receive, DRAIN_LIMIT)
            # (a client that waits for "100 Continue" before sending, as curl does for large
            # bodies, is answered before it has sent any of it). The connection is closed after
            # the answer: what of the body is still to come would be read as the next request.
            await send_json(send, 413, {"error": self.too_large(f"{declared / 1048576:.1f} MB")}, close=True)
            return
        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, self.too_large(f"over {self.limit_text}"))
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except asyncio.CancelledError:
            # The server stopped (SIGTERM, Ctrl-C) and its grace for requests in flight passed:
            # uvicorn cancels what still runs. One line and a 503, not a traceback and a 500.
            log.warning("%s %s: not finished when the server stopped", scope.get("method"), scope.get("path"))
            if not started:
                with suppress(Exception):
                    await send_json(send, 503, {"error": "the server stopped before this request finished; send it "
                                                         "again once it is back"})
        except Exception as error:  # whatever a route did not expect: one line, and a 500 if possible
            log.error("%s %s failed: %s: %s", scope.get("method"), scope.get("path"), type(error).__name__,
                      first_line(error))
            if not started:
                await send_json(send, 500, {"error": f"the server failed on this request ({type(error).__name__}: "
                                                     f"{first_line(error)}); it keeps answering others"})


def lifespan_send(send, cut_short: list[bool]):
    """``send`` for the lifespan protocol, where a shutdown cut short by a second Ctrl-C
    (uvicorn cancels the lifespan: Starlette would log its ``CancelledError`` traceback as a
    failed shutdown) is one line; ``cut_short`` records it."""
    async def relay(message):
        if (message["type"] == "lifespan.shutdown.failed"
                and str(message.get("message", "")).rstrip().endswith("CancelledError")):
            log.warning("stopped at once (a second Ctrl-C): the requests still in flight were not answered")
            cut_short.append(True)
            return  # nothing waits for the shutdown's end: uvicorn skipped it
        await send(message)

    return relay


def require_known_query(request: Request, known: tuple[str, ...]) -> None:
    """Refuse a query parameter the endpoint does not take (``?tta=true`` would otherwise be
    dropped without a word, and the answer taken for what it asked), and one given twice
    (``?top_k=1&top_k=5``: FastAPI would take the last without a word).

    Raises:
        HTTPException: 400 naming it and the parameters taken, or the one repeated.
    """
    unknown = sorted(set(request.query_params) - set(known))
    if unknown:
        raise HTTPException(400, f"unknown query parameter(s) {', '.join(unknown)} on {request.url.path}; it takes "
                                 f"{', '.join(known)} (see /docs)")
    repeated = repeated_query(request)
    if repeated:
        raise HTTPException(400, repeated)


def repeated_query(request: Request) -> str | None:
    """The error for query parameters given more than once, or None."""
    repeated = sorted(name for name in set(request.query_params) if len(request.query_params.getlist(name)) > 1)
    if not repeated:
        return None
    return f"query parameter(s) {', '.join(repeated)} given more than once on {request.url.path}; give each once"


def content_length(headers: Headers) -> int | None:
    """The request's Content-Length header, or None."""
    try:
        return int(headers.get("content-length", ""))
    except ValueError:
        return None


async def drain(receive, limit: int) -> None:
    """Read and drop a request's body, up to ``limit`` bytes."""
    seen = 0
    while seen <= limit:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def send_json(send, status: int, payload: dict, close: bool = False) -> None:
    """A whole JSON response through a raw ASGI ``send`` (``close``: the connection ends after it)."""
    body = json.dumps(payload).encode("utf-8")
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status,
                "headers": headers + ([(b"connection", b"close")] if close else [])})
    await send({"type": "http.response.body", "body": body})


def app_from_environment() -> FastAPI:
    """The application of a worker process (``transferkit serve --workers N``): the run named
    by ``TRANSFERKIT_SERVE``, loaded in this process from the snapshot the server took of it
    (``TRANSFERKIT_SERVE_SNAPSHOT``; ``service.take_snapshot``).

    Returns:
        A ``FastAPI`` application.
    """
    from transferkit.runtime import import_tensorflow_quietly

    settings = settings_from_environment()
    import_tensorflow_quietly()  # as the command line does: no C++ start-up lines from each worker
    return create_app(load_service(settings, os.environ.get(SNAPSHOT_VARIABLE) or None))
