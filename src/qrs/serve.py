"""``qrs serve``: the scoring service (FastAPI under uvicorn) and its web page.

Each request's images are decoded and resized in worker threads, then queued; one batcher task
gathers the queued images of concurrent requests (up to ``max_batch``, waiting at most
``max_wait_ms`` for more) and runs the model in a single inference thread, so the event loop never
blocks and the model runs batched under load. Scoring goes through :class:`qrs.predict.Scorer`, the
same path as ``qrs score``. Bad input is a 4xx JSON error ``{"detail": "..."}``, never a 500.
Uploaded file names are text once the multipart parser has read them (UTF-8, else Latin-1), so unlike
file system names (:mod:`qrs.files`) none is refused for its encoding.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from typing import Any, Generic, Literal, Optional, TypeVar

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qrs import __version__
from qrs.choices import BackendName
from qrs.errors import QrsError
from qrs.images import open_rgb
from qrs.data.regions import RoiSpec, parse_roi
from qrs.predict import Prepared, Scored, Scorer

ACCEPTED_PART_TYPES = ("image/", "application/octet-stream")
"""Content types accepted for an uploaded file (besides none at all)."""
PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self' data: blob:; "
            "connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'")
"""The web page may talk to this service only: nothing from the internet, ever."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DRAIN_BYTES = 64 * 2**20
"""How much of a body over the upload limit is still read (and dropped) before the 413 is sent."""

T = TypeVar("T")
R = TypeVar("R")


class ScoreResult(BaseModel):
    """One scored image (the row of ``qrs score``)."""

    file: str = Field(description="The uploaded file's name.")
    verdict: Literal["pass", "fail"]
    prediction: int = Field(description="1 = defective (fail), 0 = non-defective (pass).")
    p_defective: float = Field(description="Softmax probability of the defective class.")
    qrs: float = Field(description="Quality Risk Score in [0, 1].")
    risk_level: Optional[Literal["low", "medium", "high"]] = Field(
        None, description="Omitted when the checkpoint has no risk cut points.")
    area: float = Field(description="Share of the ROI at or over the threshold.")
    mean_over: float
    max_over: float
    peak: float = Field(description="Maximum of the raw class activation map.")
    n_over: int = Field(description="ROI pixels at or over the threshold (on the model's input square).")
    norm: str = Field(description="dataset (calibrated) or image (uncalibrated checkpoint).")
    overlay_png: Optional[str] = Field(None, description="With overlay=true: the heat map over the image, base64 PNG.")


class ScoreResponse(BaseModel):
    results: list[ScoreResult]


class RiskCuts(BaseModel):
    low: float
    high: float


class CalibrationInfo(BaseModel):
    """Where the calibration scale came from (QRS_SPEC section 3)."""

    anchor: str = Field(description="good: scale = quantile of good parts' map peaks / threshold; defective: "
                                    "scale = quantile of defective training parts' peaks")
    quantile: float
    split: str = Field(description="split of the parts whose peaks were used")
    n_parts: Optional[int] = None


class ModelInfo(BaseModel):
    """The served model and how it scores."""

    arch: str
    img_size: int
    class_names: list[str]
    epoch: Optional[int] = None
    resize: str
    method: str
    threshold: float
    norm: str
    aggregation: str
    calibrated: bool
    scale: Optional[float] = None
    calibration: Optional[CalibrationInfo] = None
    risk_cuts: Optional[RiskCuts] = None
    note: str = Field(description="Why QRS is not comparable across images or levels are missing, if so.")
    backend: BackendName = Field(description="What runs the model: torch (a checkpoint, PyTorch) or "
                                                          "onnx (a model from qrs export, ONNX Runtime).")
    qrs_version: str
    checkpoint_qrs_version: Optional[str] = None


class ErrorBody(BaseModel):
    detail: str


class Ready(BaseModel):
    ready: bool
    detail: str = ""


def _error(what: str) -> dict[str, Any]:
    """An OpenAPI error response: ``{"detail": "..."}``."""
    return {"model": ErrorBody, "description": what}


SCORE_REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["files"],
            "properties": {
                "files": {"type": "array", "items": {"type": "string", "format": "binary"},
                          "description": "One or more images (PNG, JPEG, BMP, TIFF; any size up to 50 megapixels)."},
                "roi": {"type": "string", "description": "Region of interest: full (default), auto, or JSON: a list "
                        "of relative boxes [x0, y0, x1, y1] / polygons [[x, y], ...] for every image, or an object "
                        "file name -> list of regions."},
                "overlay": {"type": "boolean", "description": "Also return the overlay PNG (as the query parameter)."},
            },
        }}},
    }
}


class UploadLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413, decided from Content-Length when it
    says so, else as soon as the bytes received pass the limit (chunked or lying clients).

    The rest of the body (up to :data:`DRAIN_BYTES` more) is read and dropped before the 413 is sent:
    a client that writes its whole body before reading the answer (most HTTP clients) would otherwise
    have its connection reset under it and never see the 413. A client that sent ``Expect:
    100-continue`` has not sent its body yet and gets the 413 at once; a body larger still is cut off.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"upload over the limit of {max_bytes / 2**20:g} MB"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            waits = "100-continue" in headers.get("expect", "").lower()
            if not waits and int(declared) <= self.max_bytes + DRAIN_BYTES:
                await self._drain(receive, 0)
            await JSONResponse({"detail": f"{self.message} (Content-Length {declared})"}, 413)(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if message.get("more_body", False):
                        await self._drain(receive, received)
                    raise HTTPException(413, detail=self.message)
            return message

        await self.app(scope, counted, send)

    async def _drain(self, receive: Receive, received: int) -> None:
        """Read and drop the body until its end, a disconnect, or DRAIN_BYTES past the limit."""
        while received <= self.max_bytes + DRAIN_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                return
            received += len(message.get("body", b""))
            if not message.get("more_body", False):
                return


@dataclass
class _Job(Generic[T, R]):
    items: list[T]
    future: asyncio.Future[list[R]]


class Batcher(Generic[T, R]):
    """Gathers the items of concurrent requests into batches for one inference thread.

    ``run`` takes the first waiting job, waits ``max_wait_s`` for more when the batch is not full,
    adds waiting jobs up to ``max_batch`` items, and calls ``score`` (one list in, one result per
    item out, at most ``max_batch`` items per call) in its single thread. ``sizes`` counts the batches
    run by size.
    """

    def __init__(self, score: Callable[[list[T]], list[R]], *, max_batch: int, max_wait_s: float) -> None:
        self.score = score
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.sizes: Counter[int] = Counter()
        self._queue: asyncio.Queue[_Job[T, R]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="qrs-inference")

    async def submit(self, items: list[T]) -> list[R]:
        """Queue ``items`` and wait for their results (in order)."""
        job: _Job[T, R] = _Job(items, asyncio.get_running_loop().create_future())
        self._queue.put_nowait(job)
        return await job.future

    async def run(self) -> None:
        """Serve the queue until cancelled."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                jobs = [await self._queue.get()]
                n = len(jobs[0].items)
                if n < self.max_batch:
                    await asyncio.sleep(self.max_wait_s)
                while n < self.max_batch and not self._queue.empty():
                    jobs.append(self._queue.get_nowait())
                    n += len(jobs[-1].items)
                jobs = [job for job in jobs if not job.future.done()]
                items = [item for job in jobs for item in job.items]
                try:
                    results = await loop.run_in_executor(self._executor, self._score_all, items)
                except asyncio.CancelledError:
                    for job in jobs:
                        job.future.cancel()
                    raise
                except Exception as exc:
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                start = 0
                for job in jobs:
                    if not job.future.done():
                        job.future.set_result(results[start:start + len(job.items)])
                    start += len(job.items)
        finally:
            self._executor.shutdown(wait=False, cancel_futures=True)
            while not self._queue.empty():
                self._queue.get_nowait().future.cancel()

    def _score_all(self, items: list[T]) -> list[R]:
        results: list[R] = []
        for start in range(0, len(items), self.max_batch):
            chunk = items[start:start + self.max_batch]
            self.sizes[len(chunk)] += 1
            results.extend(self.score(chunk))
        return results


class Service:
    """The model (loaded in a thread, so the health routes answer meanwhile) and its batcher."""

    def __init__(self, model: Scorer | str | os.PathLike[str], *, device: str, resize: str | None, backend: str,
                 max_batch: int, max_wait_s: float) -> None:
        self._model = model
        self._device = device
        self._resize = resize
        self._backend = backend
        self._loading: asyncio.Task[Scorer] | None = None
        self.batcher: Batcher[Prepared, Scored] = Batcher(self._score, max_batch=max_batch, max_wait_s=max_wait_s)
        self._batching: asyncio.Task[None] | None = None
        self.scorer: Scorer | None = None

    def _load(self) -> Scorer:
        model = self._model
        if isinstance(model, Scorer):
            return model
        return Scorer.load(model, device=self._device, resize=self._resize, backend=self._backend)

    def _score(self, items: list[Prepared]) -> list[Scored]:
        assert self.scorer is not None
        return self.scorer.score(items)

    async def start(self) -> None:
        self._loading = asyncio.create_task(asyncio.to_thread(self._load))
        self._batching = asyncio.create_task(self.batcher.run())

    async def stop(self) -> None:
        for task in (self._batching, self._loading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def readiness(self) -> tuple[bool, str]:
        """(ready, why not): ready once the model is loaded."""
        if self._loading is None or not self._loading.done():
            return False, "the model is loading"
        if self._loading.cancelled():
            return False, "the service is stopping"
        error = self._loading.exception()
        return (False, f"the model could not be loaded: {error}") if error else (True, "")

    async def ready_scorer(self) -> Scorer:
        """The scorer, waiting for the model to load; 503 when it cannot be loaded."""
        assert self._loading is not None
        try:
            self.scorer = await asyncio.shield(self._loading)
        except Exception as exc:
            raise HTTPException(503, detail=f"the model could not be loaded: {exc}") from exc
        return self.scorer


def _service(request: Request) -> Service:
    service = getattr(request.app.state, "service", None)
    if service is None:
        raise HTTPException(503, detail="the service is not started")
    return service


def _auth(api_key: str) -> Callable[..., Awaitable[None]]:
    """A dependency that wants ``Authorization: Bearer <api_key>``, compared in constant time."""
    bearer = HTTPBearer(auto_error=False, description="The service's API key (--api-key or QRS_API_KEY).")
    expected = api_key.encode()

    async def check(credentials: Optional[HTTPAuthorizationCredentials] = Depends(bearer)) -> None:
        given = credentials.credentials.encode() if credentials else b""
        if not (credentials and hmac.compare_digest(given, expected)):
            raise HTTPException(401, detail="missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                                headers={"WWW-Authenticate": "Bearer"})

    return check


def _form_flag(value: str | UploadFile | None, name: str) -> bool:
    if value is None:
        return False
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("", "0", "false", "no", "off"):
        return False
    raise HTTPException(422, detail=f"form field {name!r} must be true or false")


async def _roi_field(form: FormData) -> RoiSpec:
    value = form.get("roi")
    if isinstance(value, UploadFile):
        value = (await value.read()).decode("utf-8", errors="replace")
    if value is None or value.strip() in ("", "full", "auto"):
        return (value or "").strip() or "full"
    try:
        return parse_roi(json.loads(value), source="roi")
    except json.JSONDecodeError as exc:
        raise HTTPException(422, detail=f"roi must be full, auto or JSON regions; it is not JSON: {exc}") from exc
    except QrsError as exc:
        raise HTTPException(422, detail=str(exc)) from exc


async def _uploads(form: FormData) -> list[tuple[str, bytes]]:
    """(file name, bytes) of every uploaded image, in order; 4xx for a missing or odd file field."""
    parts = form.getlist("files") + form.getlist("file")
    if not parts:
        raise HTTPException(422, detail="missing file field: send one or more images in the multipart field 'files'")
    uploads = []
    for i, part in enumerate(parts, start=1):
        if not isinstance(part, UploadFile):
            raise HTTPException(422, detail=f"field 'files' #{i} is a text value, not a file upload (give it a "
                                            "filename, e.g. curl -F files=@part.png)")
        name = (part.filename or f"upload-{i}")[:255]
        content_type = (part.content_type or "").lower()
        if content_type and not content_type.startswith(ACCEPTED_PART_TYPES):
            raise HTTPException(415, detail=f"{name}: content type {content_type!r} is not an image; send image/png, "
                                            "image/jpeg, image/bmp, image/tiff or application/octet-stream")
        uploads.append((name, await part.read()))
    return uploads


def _prepare_all(scorer: Scorer, uploads: Sequence[tuple[str, bytes]], roi: RoiSpec,
                 overlay: bool) -> list[Prepared]:
    """Decode and resize every upload (in a worker thread); 422 naming the first bad image."""
    prepared = []
    for name, data in uploads:
        try:
            prepared.append(scorer.prepare(name, open_rgb(data), roi, overlay=overlay))
        except QrsError as exc:
            raise HTTPException(422, detail=f"{name}: {exc}") from exc
    return prepared


def _result(scored: Scored) -> dict[str, Any]:
    row = dict(scored.row)
    if scored.overlay_png is not None:
        row["overlay_png"] = base64.b64encode(scored.overlay_png).decode("ascii")
    return row


def create_app(model: Scorer | str | os.PathLike[str], *, api_key: str | None = None, max_upload_mb: float = 20,
               max_batch: int = 16, max_wait_ms: float = 5, max_files: int = 64, device: str = "auto",
               resize: str | None = None, backend: str = "torch") -> FastAPI:
    """The service's ASGI app for a model path (a checkpoint, or with ``backend="onnx"`` a model from
    ``qrs export``; loaded when the app starts) or a loaded Scorer.

    With ``api_key`` every ``/v1`` route needs ``Authorization: Bearer <api_key>``; ``/``,
    ``/healthz``, ``/readyz`` and the OpenAPI routes stay open.
    """
    if api_key is not None and not api_key:
        raise QrsError("the API key is empty; give a non-empty --api-key / QRS_API_KEY, or none")
    if not (max_upload_mb > 0 and max_batch >= 1 and max_wait_ms >= 0 and max_files >= 1):
        raise QrsError("--max-upload-mb must be > 0, --max-batch >= 1, --max-wait-ms >= 0 and max_files >= 1")
    page = resources.files("qrs").joinpath("static/index.html").read_text(encoding="utf-8")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(model, device=device, resize=resize, backend=backend, max_batch=max_batch,
                          max_wait_s=max_wait_ms / 1000)
        await service.start()
        app.state.service = service
        try:
            yield
        finally:
            del app.state.service
            await service.stop()

    app = FastAPI(title="qrs", version=__version__, lifespan=lifespan,
                  description="Scores images of parts: pass/fail, p_defective, the Quality Risk Score (QRS), its "
                              "risk level and a heat map overlay. The web page is at /.")
    app.add_middleware(UploadLimit, max_bytes=int(max_upload_mb * 2**20))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request: {details}"}, 422)

    v1 = [Depends(_auth(api_key))] if api_key else []
    errors = {401: _error("Missing or wrong API key."), 503: _error("The model is not loaded.")}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=Ready, responses={503: {"model": Ready}})
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: 200 once the model is loaded, 503 before (or when it cannot be loaded)."""
        ready, why = _service(request).readiness()
        return JSONResponse({"ready": ready, "detail": why}, 200 if ready else 503)

    @app.get("/v1/model", response_model=ModelInfo, dependencies=v1, responses=errors, tags=["v1"])
    async def model_info(request: Request) -> dict[str, Any]:
        """The model: arch, image size, threshold, calibration scale, risk cut points, qrs version."""
        return (await _service(request).ready_scorer()).info()

    @app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True, dependencies=v1,
              openapi_extra=SCORE_REQUEST_BODY, tags=["v1"], responses={
                  **errors, 400: _error("Malformed multipart body or too many files."),
                  413: _error("Upload over the limit."),
                  415: _error("Not multipart/form-data, or a file that is not an image."),
                  422: _error("Missing file field, unreadable/truncated image, over 50 megapixels, bad roi.")})
    async def score(request: Request, overlay: bool = Query(False, description="Also return the overlay PNG "
                                                                                "(base64) of every image.")
                    ) -> dict[str, Any]:
        """Score one or more images (multipart field ``files``), optionally with an ROI and overlays."""
        service = _service(request)
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise HTTPException(415, detail=f"send the images as multipart/form-data (field 'files'), not "
                                            f"{content_type or 'a body without content type'!r}")
        form = await request.form(max_files=max_files, max_fields=8)
        try:
            overlay = overlay or _form_flag(form.get("overlay"), "overlay")
            roi = await _roi_field(form)
            uploads = await _uploads(form)
        finally:
            await form.close()
        scorer = await service.ready_scorer()
        prepared = await asyncio.to_thread(_prepare_all, scorer, uploads, roi, overlay)
        return {"results": [_result(s) for s in await service.batcher.submit(prepared)]}

    return app


@contextlib.contextmanager
def serve_in_background(app: ASGIApp, *, host: str = "127.0.0.1", port: int = 0,
                        startup_timeout_s: float = 120) -> Iterator[str]:
    """Run ``app`` under uvicorn in a daemon thread (port 0: a free one); yield its base URL, stop on exit.

    For tests, benchmarks and embedding; ``qrs serve`` runs uvicorn in the foreground instead.
    """
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="qrs-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.01)
    bound_host, bound_port = server.servers[0].sockets[0].getsockname()[:2]
    try:
        yield f"http://{bound_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def run(model_path: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
        max_upload_mb: float = 20, max_batch: int = 16, max_wait_ms: float = 5, device: str = "auto",
        resize: str | None = None, backend: str = "torch") -> None:
    """``qrs serve``: load the model (a bad one stops here, before binding), then serve."""
    scorer = Scorer.load(model_path, device=device, resize=resize, backend=backend)
    app = create_app(scorer, api_key=api_key, max_upload_mb=max_upload_mb, max_batch=max_batch,
                     max_wait_ms=max_wait_ms)
    if scorer.note:
        print(f"note: {scorer.note}", file=sys.stderr)
    if api_key is None and host not in LOOPBACK:
        print(f"warning: serving on {host} without an API key: anyone who reaches it can score", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info")
