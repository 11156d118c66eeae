"""`imageclf serve`: the trained model behind a web page and the standard inference APIs.

One uvicorn process, one model loaded once, one event loop (FastAPI) in front of a dynamic
batching queue (`imageclf.batching`); the request and response formats are in
`imageclf.protocols`. Routes:

- `/`: a page to drop images on and see each one's top-5 classes;
- `/v2/...`: the Open Inference Protocol (KServe v2, Triton) REST API, JSON tensors and the
  binary tensor data extension;
- `/v1/models/<name>:predict`: TF Serving's REST predict API;
- `/predict`: multipart uploads in, top-k classes out (the page and `curl -F file=@x.jpg`);
- `/metrics` (Prometheus), `/openapi.json` with `/docs` (every asset served locally).

A bad request gets a 4xx and `{"error": "what is wrong"}`, never a 5xx: what goes wrong while
reading a request is the request's fault (`_reading`); only a fault of the server itself
(the model call, a bug) is a 500, logged with its traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import hashlib
import html
import importlib.metadata
import json
import logging
import multiprocessing
import os
import select
import signal
import socket
import string
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import uvicorn
import yaml
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.routing import Match

from imageclf.batching import Batcher
from imageclf.errors import PipelineError
from imageclf.images import BadImage
from imageclf.paths import EVAL_METRICS, EXPORT_METRICS
from imageclf.predict import Classifier, load_classifier, native_stderr_muted
from imageclf.protocols import (
    INPUT,
    OUTPUT,
    ErrorResponse,
    InferenceRequest,
    InferenceResponse,
    ModelMetadata,
    PredictResponse,
    RequestError,
    ServerMetadata,
    TensorMetadata,
    TFServingRequest,
    TFServingResponse,
    binary_output,
    check_count,
    content_type,
    decode_files,
    header_pixels,
    multipart_files,
    parse,
    require_json,
    split_binary,
    tf_serving_images,
    tf_serving_instances,
    v2_images,
    v2_response,
    validation_message,
)
from imageclf.serve_options import Settings

log = logging.getLogger("imageclf.serve")

STATIC = Path(__file__).parent / "static"
PLATFORMS = {"keras": "tensorflow_keras", "saved_model": "tensorflow_savedmodel"}
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
PR_SET_PDEATHSIG = 1  # Linux prctl option: the signal a process gets when its parent dies
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"  # prometheus-client's: metrics of all workers
WORKER_CONFIG = "IMAGECLF_SERVE_WORKER"  # what a worker process serves (JSON), for `worker_app`
# a request's images decode in the event loop up to this many pixels together (~0.2 ms of
# decoding at most), in a worker thread above (`_decode`)
INLINE_DECODE_PIXELS = 128 * 128


# --- What the model is -----------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCard:
    """What the page tells people about the model that answers."""

    path: str
    format: str
    class_names: list[str]
    sha256: str
    accuracy: float | None  # on the test split, when a metrics file measured this very file
    accuracy_source: str  # where `accuracy` comes from, or why it is unknown


def describe(classifier: Classifier) -> ModelCard:
    path = Path(classifier.path)
    accuracy, source = measured_accuracy(path, classifier.format)
    return ModelCard(
        path=str(path),
        format=classifier.format,
        class_names=list(classifier.class_names),
        sha256=file_hash(path, "sha256"),
        accuracy=accuracy,
        accuracy_source=source,
    )


def file_hash(path: Path, algorithm: str) -> str:
    """The hash of a file, or of a folder's files (relative paths and contents, in order)."""
    digest = hashlib.new(algorithm)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        with file.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def measured_accuracy(model: Path, format: str) -> tuple[float | None, str]:  # noqa: A002
    """The test accuracy that the project's pipeline measured on this very model file, and
    where it comes from; or None and why not.

    `dvc.lock` tells which stage read or wrote the file, with its MD5: the evaluate stage's
    `metrics/eval.json` for the finetuned Keras model, the export stage's `metrics/export.json`
    (per format) for an exported file. A file changed since is not the one measured.
    """
    model = model.resolve()
    root = next((p for p in model.parents if (p / "dvc.lock").is_file()), None)
    if root is None:
        return None, "the model is not in a DVC project with a dvc.lock"
    accuracy_in = {
        EVAL_METRICS.as_posix(): lambda figures: figures.get("accuracy"),
        EXPORT_METRICS.as_posix(): lambda figures: figures.get(format, {}).get("accuracy"),
    }
    stages = (yaml.safe_load((root / "dvc.lock").read_text()) or {}).get("stages", {})
    for stage in stages.values():
        metrics = [out["path"] for out in stage.get("outs", []) if out["path"] in accuracy_in]
        entries = [*stage.get("deps", []), *stage.get("outs", [])]
        same_path = [entry for entry in entries if (root / entry["path"]).resolve() == model]
        if not metrics or not same_path or not (root / metrics[0]).is_file():
            continue
        if not model.is_file() or same_path[0].get("md5") != file_hash(model, "md5"):
            return None, f"{metrics[0]} measured another version of this file"
        figures = json.loads((root / metrics[0]).read_text())
        accuracy = accuracy_in[metrics[0]](figures)
        if isinstance(accuracy, int | float):
            return float(accuracy), metrics[0]
    return None, "no metrics file of this project measured this model file"


ERRORS = {status: {"model": ErrorResponse} for status in (400, 404, 413, 415)}


# --- Requests and the service's state ------------------------------------------------------


@contextlib.contextmanager
def _reading(what: str) -> Iterator[None]:
    """Whatever goes wrong while reading a request's content is the request's fault: a 400
    naming it, not a 500 (Pillow, numpy and base64 raise many kinds of exceptions on odd
    input). The model call and the responses stay outside, so real faults remain 500s."""
    try:
        yield
    except (RequestError, BadImage, HTTPException):
        raise
    except Exception as exc:
        log.info("bad %s: %r", what, exc)
        raise RequestError(f"could not read the {what}: {exc or exc.__class__.__name__}") from None


class Service:
    """The state behind the routes: the model, its batching queue, limits and metrics."""

    def __init__(self, classifier: Classifier, settings: Settings) -> None:
        self.classifier = classifier
        self.settings = settings
        self.card = describe(classifier)
        # a SavedModel's version folder (TF Serving's layout: export/saved_model/1); 1 else
        path = Path(classifier.path)
        self.version = path.name if classifier.format == "saved_model" else "1"
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imageclf_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "imageclf_request_duration_seconds",
            "Time from request to response, by route",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.batch_sizes = Histogram(
            "imageclf_batch_size",
            "Images per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        # with several workers: summed over the live ones (ignored with one process)
        self.in_progress = Gauge(
            "imageclf_inference_requests_in_progress",
            "Classification requests being read, queued or answered",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.queued = Gauge(
            "imageclf_queued_images",
            "Images waiting for the model",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.batcher = Batcher(
            classifier.predict,
            max_batch=settings.max_batch,
            wait=settings.batch_wait_ms / 1000,
            on_batch=self.batch_sizes.observe,
            on_queued=self.queued.set,
        )

    def metrics(self) -> bytes:
        """The Prometheus text format: this process's metrics, or with several workers
        (`PROMETHEUS_MULTIPROC_DIR` set) those of all of them, which prometheus-client keeps
        in files there."""
        if MULTIPROCESS_DIR not in os.environ:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    def check_name(self, name: str, version: str | None = None) -> None:
        """A 404 for a model name, or version, that this service does not serve."""
        if name != self.settings.name:
            raise RequestError(
                f"unknown model {name!r}; this server serves {self.settings.name!r}", 404
            )
        if version is not None and version != self.version:
            raise RequestError(
                f"model {name!r} has no version {version!r}; this server serves version "
                f"{self.version!r}",
                404,
            )


# --- The application ------------------------------------------------------------------------


def create_app(classifier: Classifier, settings: Settings) -> FastAPI:
    """The ASGI application serving `classifier` (a loaded `imageclf.predict` model)."""
    service = Service(classifier, settings)
    name = settings.name

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.batcher.start()
        yield
        # uvicorn calls this after the requests in flight have been answered
        await service.batcher.stop()

    app = FastAPIOffline(
        title="imageclf",
        version=_version(),
        summary=f"Image classification with {Path(service.card.path).name}",
        lifespan=lifespan,
    )

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, exc.status)

    @app.exception_handler(BadImage)
    async def bad_image(request: Request, exc: BadImage) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail
        if exc.status_code == 404:
            message = f"no route {request.url.path}; see /docs for the routes"
        return JSONResponse({"error": message}, exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_message(exc)}, 400)

    @app.exception_handler(Exception)
    async def server_fault(request: Request, exc: Exception) -> JSONResponse:
        # uvicorn logs the traceback after this response
        return JSONResponse({"error": "internal server error; the server's log has details"}, 500)

    page = _render_page(service)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    # Open Inference Protocol ---------------------------------------------------------------

    @app.get("/v2", tags=["Open Inference Protocol"])
    async def server_metadata() -> ServerMetadata:
        return ServerMetadata(
            name="imageclf", version=_version(), extensions=["binary_tensor_data"]
        )

    @app.get("/v2/health/live", tags=["Open Inference Protocol"])
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get(
        "/v2/health/ready",
        tags=["Open Inference Protocol"],
        responses={503: {"description": "not ready"}},
    )
    async def ready() -> JSONResponse:
        ready = service.batcher.running
        return JSONResponse({"ready": ready}, 200 if ready else 503)

    # Each model route also answers under .../versions/<version>/..., as the protocol's
    # optional versioned routes, which Triton's clients use when given a model_version.

    @app.get("/v2/models/{model}", tags=["Open Inference Protocol"], responses=ERRORS)
    async def model_metadata(model: str) -> ModelMetadata:
        service.check_name(model)
        return ModelMetadata(
            name=name,
            versions=[service.version],
            platform=PLATFORMS.get(classifier.format, classifier.format),
            inputs=[TensorMetadata(name=INPUT, datatype="UINT8", shape=[-1, -1, -1, 3])],
            outputs=[
                TensorMetadata(
                    name=OUTPUT, datatype="FP32", shape=[-1, len(service.card.class_names)]
                )
            ],
        )

    @app.get(
        "/v2/models/{model}/versions/{version}",
        tags=["Open Inference Protocol"],
        responses=ERRORS,
    )
    async def version_metadata(model: str, version: str) -> ModelMetadata:
        service.check_name(model, version)
        return await model_metadata(model)

    @app.get("/v2/models/{model}/ready", tags=["Open Inference Protocol"], responses=ERRORS)
    async def model_ready(model: str) -> dict[str, Any]:
        service.check_name(model)
        return {"name": name, "ready": service.batcher.running}

    @app.get(
        "/v2/models/{model}/versions/{version}/ready",
        tags=["Open Inference Protocol"],
        responses=ERRORS,
    )
    async def version_ready(model: str, version: str) -> dict[str, Any]:
        service.check_name(model, version)
        return await model_ready(model)

    v2_infer = {
        "tags": ["Open Inference Protocol"],
        "response_model": InferenceResponse,
        "responses": ERRORS,
        "openapi_extra": _body(
            "InferenceRequest",
            "JSON, or with the binary tensor data extension: the JSON header (its length in "
            "the Inference-Header-Content-Length header), then the tensor's bytes",
            ("application/json", "application/octet-stream"),
        ),
    }

    @app.post("/v2/models/{model}/infer", **v2_infer)
    async def infer(model: str, request: Request) -> Response:
        service.check_name(model)
        with service.in_progress.track_inprogress():
            with service.batcher.arriving(), _reading("inference request"):
                body = await request.body()
                header, binary = split_binary(
                    body,
                    request.headers.get("inference-header-content-length"),
                    content_type(request.headers),
                )
                parsed = parse(InferenceRequest, header, _v2_header(binary, len(header)))
                images = v2_images(parsed, binary, settings.max_images, settings.max_pixels)
                binary_out = binary_output(parsed)
            probabilities = await service.batcher.predict(list(images))
            return v2_response(name, parsed, probabilities, binary_out)

    @app.post("/v2/models/{model}/versions/{version}/infer", **v2_infer)
    async def version_infer(model: str, version: str, request: Request) -> Response:
        service.check_name(model, version)
        return await infer(model, request)

    # TF Serving REST ------------------------------------------------------------------------

    tf_serving = {
        "tags": ["TF Serving REST"],
        "response_model": TFServingResponse,
        "responses": ERRORS,
        "openapi_extra": _body(
            "TFServingRequest", "TF Serving's row format", ("application/json",)
        ),
    }

    @app.post("/v1/models/{model}:predict", **tf_serving)
    async def tf_serving_predict(model: str, request: Request) -> JSONResponse:
        service.check_name(model)
        with service.in_progress.track_inprogress():
            require_json(content_type(request.headers))
            with service.batcher.arriving(), _reading("predict request"):
                body = await request.body()
                instances = tf_serving_instances(parse(TFServingRequest, body, "predict request"))
                check_count(len(instances), settings.max_images)
                images = await run_in_threadpool(
                    tf_serving_images, instances, settings.max_pixels, classifier.input_size
                )
            probabilities = await service.batcher.predict(images)
            return JSONResponse({"predictions": probabilities.tolist()})

    @app.post("/v1/models/{model}/versions/{version}:predict", **tf_serving)
    async def tf_serving_version_predict(model: str, version: str, request: Request) -> Response:
        service.check_name(model, version)
        return await tf_serving_predict(model, request)

    @app.get("/v1/models/{model}", tags=["TF Serving REST"], responses=ERRORS)
    async def tf_serving_status(model: str) -> dict[str, Any]:
        """TF Serving's model status: the version served, AVAILABLE once it answers."""
        service.check_name(model)
        state = "AVAILABLE" if service.batcher.running else "LOADING"
        status = {"error_code": "OK", "error_message": ""}
        version = {"version": service.version, "state": state, "status": status}
        return {"model_version_status": [version]}

    @app.get("/v1/models/{model}/versions/{version}", tags=["TF Serving REST"], responses=ERRORS)
    async def tf_serving_version_status(model: str, version: str) -> dict[str, Any]:
        service.check_name(model, version)
        return await tf_serving_status(model)

    # Uploads --------------------------------------------------------------------------------

    @app.post(
        "/predict",
        tags=["Uploads"],
        response_model=PredictResponse,
        responses=ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "file": {
                                    "type": "array",
                                    "items": {"type": "string", "format": "binary"},
                                }
                            },
                            "required": ["file"],
                        }
                    }
                },
            }
        },
    )
    async def predict_files(
        request: Request,
        top_k: int = Query(5, ge=1, description="classes per image, most probable first"),
    ) -> JSONResponse:
        """Classify uploaded image files (any field name): `curl -F file=@cat.jpg .../predict`."""
        with service.in_progress.track_inprogress():
            media_type = content_type(request.headers)
            if media_type != "multipart/form-data":
                raise RequestError(
                    f"Content-Type {media_type or '(none)'}: upload images as "
                    "multipart/form-data, e.g. curl -F file=@cat.jpg http://HOST/predict",
                    415,
                )
            with service.batcher.arriving(), _reading("uploaded images"):
                files = await _uploads(request, settings.max_images)
                images = await _decode(files, settings.max_pixels, classifier.input_size)
            probabilities = await service.batcher.predict(images)
            classes = service.card.class_names
            predictions = []
            for (file, _), row in zip(files, probabilities):
                order = np.argsort(-row, kind="stable")[:top_k]
                top = [{"class": classes[i], "probability": float(row[i])} for i in order]
                predictions.append({"file": file, "top": top})
            return JSONResponse({"model": name, "predictions": predictions})

    # Operations -----------------------------------------------------------------------------

    @app.get("/metrics", tags=["Operations"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics: requests by route and status, latency, batch sizes, queue."""
        return Response(service.metrics(), media_type=CONTENT_TYPE_LATEST)

    app.openapi = _openapi_with(app, (InferenceRequest, TFServingRequest))
    app.add_middleware(BodyLimit, max_bytes=int(settings.max_body_mb * 1024 * 1024))
    # outermost: counts every answer
    app.add_middleware(RequestMetrics, service=service, routes=app.router.routes)
    return app


async def _uploads(request: Request, max_images: int) -> list[tuple[str, bytes]]:
    """The uploaded files of a multipart request, as (file name, content)."""
    files = multipart_files(await request.body(), request.headers["content-type"], max_images)
    if not files:
        raise RequestError(
            "no file in the request; upload images as multipart/form-data, "
            "e.g. curl -F file=@cat.jpg http://HOST/predict"
        )
    return files


async def _decode(
    files: list[tuple[str, bytes]], max_pixels: int, size: int | None
) -> list[np.ndarray]:
    """`decode_files`, in the event loop for small images, else in a worker thread. Handing a
    32 x 32 PNG to a thread and back costs more of the loop's time than decoding it there
    (benchmarks/serve_path.py: about 0.47 against 0.37 ms of CPU per request); a large image
    goes to a thread, so that the loop goes on serving others while it decodes."""
    pixels = [header_pixels(data) for _, data in files]
    if all(count is not None for count in pixels) and sum(pixels) <= INLINE_DECODE_PIXELS:
        return decode_files(files, max_pixels, size)
    return await run_in_threadpool(decode_files, files, max_pixels, size)


def _v2_header(binary: bytes | None, length: int) -> str:
    """What the error of an unreadable v2 request calls its JSON."""
    if binary is None:
        return "inference request"
    return (
        f"inference request header (the body's first {length} bytes, as "
        "Inference-Header-Content-Length says; check that count)"
    )


def _body(schema: str, description: str, media_types: tuple[str, ...]) -> dict:
    """OpenAPI for a request body that the route reads itself (JSON or JSON + binary)."""
    reference = {"$ref": f"#/components/schemas/{schema}"}
    return {
        "requestBody": {
            "required": True,
            "description": description,
            "content": {media_type: {"schema": reference} for media_type in media_types},
        }
    }


def _openapi_with(app: FastAPI, models: tuple[type[BaseModel], ...]):
    """FastAPI's OpenAPI description, plus the schemas of the bodies the routes read
    themselves."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                model_schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
        return app.openapi_schema

    return openapi


def _version() -> str:
    try:
        return importlib.metadata.version("imageclf")
    except importlib.metadata.PackageNotFoundError:
        return "0"


def _render_page(service: Service) -> str:
    card = service.card
    if card.accuracy is None:
        accuracy = f"unknown ({html.escape(card.accuracy_source)})"
    else:
        accuracy = f"{card.accuracy:.2%} <small>({html.escape(card.accuracy_source)})</small>"
    template = string.Template((STATIC / "index.html").read_text(encoding="utf-8"))
    return template.substitute(
        name=html.escape(service.settings.name),
        model_file=html.escape(Path(card.path).name),
        model_path=html.escape(card.path),
        format=html.escape(card.format),
        classes=", ".join(html.escape(c) for c in card.class_names),
        class_count=len(card.class_names),
        accuracy=accuracy,
        sha256=card.sha256,
        max_images=service.settings.max_images,
    )


# --- Middleware (plain ASGI: cheaper than BaseHTTPMiddleware on every request) ---------------


class BodyLimit:
    """Refuse request bodies over `max_bytes` with a 413, before reading them when the
    Content-Length says so, else as soon as the bytes received pass the limit."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def _too_large(self) -> RequestError:
        return RequestError(
            f"request body over the limit of {self.max_bytes / 2**20:g} MiB (--max-body-mb)", 413
        )

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            error = (
                self._too_large()
                if length.isdigit()
                else RequestError(f"Content-Length {length.decode(errors='replace')!r}")
            )
            response = JSONResponse({"error": error.message}, error.status)
            return await response(scope, receive, send)
        received = 0

        async def limited() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise self._too_large()  # answered by the app's RequestError handler
            return message

        await self.app(scope, limited, send)


class RequestMetrics:
    """Count requests by route template (not raw path: bounded label values) and status, and
    time them."""

    def __init__(self, app: Any, service: Service, routes: list) -> None:
        self.app, self.service, self.routes = app, service, routes

    def _route(self, scope: dict) -> str:
        """The route template of a request; for one answered before routing (a body over the
        limit) the route it was for, found as the router finds it."""
        route = scope.get("route")
        if route is None:
            route = next((r for r in self.routes if r.matches(scope)[0] == Match.FULL), None)
        # a mount (static files) sets root_path instead
        return getattr(route, "path", None) or scope.get("root_path") or "unmatched"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status, counted = 500, False

        def count() -> None:
            nonlocal counted
            if counted:
                return
            counted = True
            route = self._route(scope)
            self.service.requests.labels(route, scope["method"], str(status)).inc()
            self.service.latency.labels(route).observe(time.perf_counter() - start)

        async def send_counted(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                # before the last byte goes out: a client that has its answer then finds it
                # counted in /metrics
                count()
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            count()  # an app that failed without answering


# --- The command ----------------------------------------------------------------------------


def _fewer_malloc_arenas() -> None:
    """glibc gives threads that allocate their own malloc arenas (up to 8 per core), which
    keep freed memory: with decoding threads and the model's, RSS crept up under load (+6.7%
    over 10,000 requests, benchmarks/serve.py); with two arenas, +3.9%, and lower overall.
    Set before the threads start (the `MALLOC_ARENA_MAX=2` environment variable, at run time)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
            ctypes.CDLL(None).mallopt(M_ARENA_MAX, 2)


def run(args: argparse.Namespace) -> int:
    """Load the model once (per worker process), then serve until SIGINT or SIGTERM (which
    first answers the requests in flight)."""
    _fewer_malloc_arenas()
    settings = Settings(
        name=args.name,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_body_mb=args.max_body_mb,
        max_images=args.max_images,
        max_pixels=args.max_pixels,
        workers=args.workers,
    )
    # on Linux, one listening socket in a supervisor that hands each connection to the next
    # worker in turn; elsewhere uvicorn's workers on one shared socket
    hand_off = sys.platform.startswith("linux")
    # bound before the model loads: a port in use is one clear error, at once
    bound = _bound_socket(args.host, args.port)
    # loaded here also with several workers: a model that does not load is one clear error
    classifier = _load_warm(args.model)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(name)s: %(message)s")
    log.info(
        "serving %s (%s, %d classes) as %r on http://%s:%d%s",
        args.model,
        classifier.format,
        len(classifier.class_names),
        settings.name,
        args.host,
        args.port,
        f" with {settings.workers} worker processes" if settings.workers > 1 else "",
    )
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning(
            "listening beyond this machine without TLS or authentication: put a reverse proxy "
            "in front (README, 'Before exposing it')"
        )
    server = {
        "host": args.host,
        "port": args.port,
        "access_log": False,  # /metrics counts requests; a reverse proxy in front logs them
        "timeout_graceful_shutdown": 30,
    }
    if settings.workers == 1:
        config = uvicorn.Config(create_app(classifier, settings), **server)
        bound.listen(config.backlog)
        uvicorn.Server(config).run(sockets=[bound])
        return 0
    del classifier  # the workers load their own
    with tempfile.TemporaryDirectory(prefix="imageclf-serve-") as shared:
        # read by the workers, which start afresh (spawn): prometheus-client reads its
        # variable on import, so it is set before
        os.environ[MULTIPROCESS_DIR] = shared
        os.environ[WORKER_CONFIG] = json.dumps(
            {"model": str(args.model), "settings": asdict(settings), "slots": shared}
        )
        if hand_off:
            _serve_workers(server, settings.workers, bound)
        else:
            bound.close()
            uvicorn.run(WORKER_APP, factory=True, workers=settings.workers, **server)
    return 0


WORKER_APP = "imageclf.serve:worker_app"
# send buffer of a worker's queue of handed connections (the kernel doubles it): about 11
# connections on Linux 6, each message's kernel overhead counted
HAND_QUEUE_BYTES = 4096


def _serve_workers(server: dict[str, Any], workers: int, listener: socket.socket) -> None:
    """Run `workers` uvicorn server processes and hand each new connection to the next in
    turn (round robin), as Node's cluster module does: this process accepts on `listener`
    and passes the connection's descriptor on (SCM_RIGHTS). Sharing one listening socket,
    the first worker to wake accepts every connection waiting: 16 keep-alive clients that
    connect at once often all landed on one worker. With a socket per worker (SO_REUSEPORT)
    the kernel picks a worker by a hash of the addresses: 2 keep-alive clients shared one
    worker in 2 of 6 runs, at 148 and 164 against 219-249 requests/s (TFLite, 2 cores).
    A worker that is not taking connections (loading its model, stuck) is skipped once its
    small queue is full; when every queue is full, new connections wait in the listen
    backlog. A worker that dies is replaced; SIGTERM or SIGINT stops them all, each first
    answering its requests in flight."""
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter: no TensorFlow state

    def start() -> tuple[multiprocessing.process.BaseProcess, socket.socket]:
        # one message per connection, and an end of file when the other end closes
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        process = spawn.Process(target=_worker_process, args=(server, theirs), daemon=False)
        process.start()
        theirs.close()
        # a worker that is not taking connections (loading its model, stuck) gets no more
        # than its queue holds, about 10 connections (the buffer's kernel overhead per
        # message), and does not hold up the others: they wait in the listen backlog or go
        # to a worker that takes them
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, HAND_QUEUE_BYTES)
        ours.setblocking(False)
        return process, ours

    started = [start() for _ in range(workers)]
    listener.listen(uvicorn.Config(WORKER_APP).backlog)
    listener.settimeout(0.5)  # wakes to look after the workers and for `stopping`
    turn = 0
    waiting: socket.socket | None = None  # accepted; every worker's queue was full
    while not stopping.is_set():
        for index, (process, hand) in enumerate(started):
            if not process.is_alive():
                log.warning(
                    "worker process %d ended (exit code %s); starting another",
                    process.pid,
                    process.exitcode,
                )
                hand.close()  # the connections it had not taken yet close with it
                started[index] = start()
        hands = [hand for _, hand in started]
        if waiting is None:
            try:
                waiting, _ = listener.accept()
            except (TimeoutError, InterruptedError):
                continue
        taken = _hand_over(waiting, hands, turn)
        if taken is None:  # until a worker takes one; new clients wait in the listen backlog
            select.select([], hands, [], 0.5)
            continue
        waiting.close()  # the worker holds its own copy now
        waiting, turn = None, taken
    listener.close()  # no new connections while the workers finish the ones they have
    if waiting is not None:
        waiting.close()
    for process, _ in started:
        process.terminate()  # SIGTERM: uvicorn answers the requests in flight, then exits
    for process, hand in started:
        process.join()
        hand.close()


def _hand_over(connection: socket.socket, hands: list[socket.socket], turn: int) -> int | None:
    """Pass `connection` to the worker at `hands[turn]`, or to the next that takes it; the
    turn after it, or None when no worker can take it now. Never waits on a worker."""
    for offset in range(len(hands)):
        index = (turn + offset) % len(hands)
        try:
            socket.send_fds(hands[index], [b"c"], [connection.fileno()])
        except OSError:  # its queue is full (EAGAIN), or it ended (EPIPE; SIGPIPE is ignored)
            continue
        return (index + 1) % len(hands)
    return None


class _HandedServer(uvicorn.Server):
    """A uvicorn server with no listening socket of its own: it serves the connections that
    `_serve_workers` hands it over `hand`, on the same HTTP protocol as uvicorn's own."""

    def __init__(self, config: uvicorn.Config, hand: socket.socket) -> None:
        super().__init__(config)
        self.hand = hand

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=[])
        loop = asyncio.get_running_loop()
        protocol = functools.partial(
            self.config.http_protocol_class,
            config=self.config,
            server_state=self.server_state,
            app_state=self.lifespan.state,
        )

        def take() -> None:
            try:
                _, descriptors, _, _ = socket.recv_fds(self.hand, 1, 1)
            except BlockingIOError:
                return
            except OSError:
                descriptors = []
            if not descriptors:  # the supervisor ended: serve what is open, then stop
                loop.remove_reader(self.hand.fileno())
                self.should_exit = True
                return
            connection = socket.socket(fileno=descriptors[0])
            connection.setblocking(False)
            loop.create_task(loop.connect_accepted_socket(protocol, connection))

        self.hand.setblocking(False)
        loop.add_reader(self.hand.fileno(), take)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().remove_reader(self.hand.fileno())
        self.hand.close()  # connections not yet taken close with it
        await super().shutdown(sockets)


def _worker_process(server: dict[str, Any], hand: socket.socket) -> None:
    """One server process of `_serve_workers`: uvicorn on the connections handed to it."""
    # a supervisor killed outright (SIGKILL, or SIGHUP with its terminal) takes its workers
    # along, each answering its requests in flight
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    _HandedServer(uvicorn.Config(WORKER_APP, factory=True, **server), hand).run()


def _bound_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port, not listening yet."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: past TIME_WAIT
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise PipelineError(
            f"{host}:{port}: cannot listen there ({exc.strerror}); choose another --port or "
            "--host, or stop the program using it"
        ) from None
    return listener


def worker_app() -> FastAPI:
    """uvicorn's app factory in each worker process of `imageclf serve --workers N`.

    The model's threads get an equal share of the cores (on 2 cores and 2 workers: one each,
    one thread), so that two workers' model calls do not fight over the same cores; the event
    loop and the decoding threads run on any core, so that one worker reads and answers
    requests while another's model runs (benchmarks/serve.py)."""
    config = json.loads(os.environ[WORKER_CONFIG])
    settings = Settings(**config["settings"])
    every_core = os.sched_getaffinity(0)
    # thread pools size themselves by the cores this process may use when the model loads,
    # and their threads keep the affinity they are started with
    os.sched_setaffinity(0, _model_cores(Path(config["slots"]), settings.workers))
    classifier = _load_warm(config["model"])
    os.sched_setaffinity(0, every_core)
    return create_app(classifier, settings)


def _model_cores(slots: Path, workers: int) -> list[int]:
    """The cores of a free worker slot: slot i of N has every N-th core from the i-th. A slot
    is claimed by linking a file holding the worker's pid to its name (atomic between
    processes, and never seen empty); a worker started after one died takes over the slot of
    the one that died, and removes that one's live gauges from the metrics."""
    cores = sorted(os.sched_getaffinity(0))
    mine = slots / f"claim-{os.getpid()}"
    mine.write_text(str(os.getpid()))
    try:
        for slot in range(workers):
            path = slots / f"worker-{slot}.pid"
            try:
                os.link(mine, path)
            except FileExistsError:
                holder = int(path.read_text())
                if _alive(holder):
                    continue
                os.replace(mine, path)  # its worker died
                # with its live gauges (requests in progress, images queued): summed in
                # /metrics as long as their files are there
                multiprocess.mark_process_dead(holder, str(slots))
            return cores[slot::workers] or [cores[slot % len(cores)]]  # more workers than cores
        return cores
    finally:
        mine.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    if pid <= 0:  # 0 and -1 would signal process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _load_warm(model: Path | str) -> Classifier:
    with native_stderr_muted():  # TensorFlow's start-up lines (CPU features, CUDA drivers)
        classifier = load_classifier(model)
    # the first call builds the model's graph; pay for it before the first request does
    classifier.predict(np.zeros((1, 32, 32, 3), np.uint8))
    return classifier
