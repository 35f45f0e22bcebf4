"""``qrs serve``: the scoring service (FastAPI under uvicorn) and its web page.

Each request's images are decoded and resized in worker threads, then queued; one batcher task
gathers the queued images of concurrent requests (up to ``max_batch``, waiting at most
``max_wait_ms`` for more) and runs the model in a single inference thread, so the event loop never
blocks and the model runs batched under load. Scoring goes through :class:`qrs.predict.Scorer`, the
same path as ``qrs score``. Bad input is a 4xx JSON error ``{"detail": "..."}``, never a 500.
Uploaded file names are text once the multipart parser has read them (UTF-8, else Latin-1), so unlike
file system names (:mod:`qrs.files`) none is refused for its encoding.

With records (:mod:`qrs.records`), a second batcher writes the records of every scored image in its own
thread, all the requests waiting for it in one transaction, and a request is answered once its records
are committed; a database that fails costs no answer (the response says the records were not kept).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import csv
import hmac
import io
import json
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import Any, Generic, Literal, Optional, TypeVar

import uvicorn
from fastapi import Body, Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from qrs import __version__
from qrs.choices import BackendName, RiskLevel, Truth
from qrs.drift import DEFAULT_BASELINE, parse_per
from qrs.errors import QrsError
from qrs.images import open_rgb
from qrs.data.regions import RoiSpec, parse_roi
from qrs.predict import Prepared, Scored, Scorer
from qrs.records import (
    MAX_TEXT, Filters, Inspection, NotFound, NoVerdict, Recorder, RecordSettings, RecordsError, RecordsUnavailable,
    RecordStore, check_text, utcnow,
)

ACCEPTED_PART_TYPES = ("image/", "application/octet-stream")
"""Content types accepted for an uploaded file (besides none at all)."""
PAGE_CSP = ("default-src 'none'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
            "img-src 'self' data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; "
            "frame-ancestors 'none'")
"""The web page may talk to this service only: nothing from the internet, ever."""
STATIC_FILES = {"chart.umd.min.js": "text/javascript", "chart.js-LICENSE.md": "text/markdown"}
"""Files served under /static/: Chart.js (the page's charts) and its licence."""
LOOPBACK = ("127.0.0.1", "localhost", "::1")
DRAIN_BYTES = 64 * 2**20
"""How much of a body over the upload limit is still read (and dropped) before the 413 is sent."""
MAX_ID = 2**63 - 1
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".bmp": "image/bmp", ".tif": "image/tiff"}
"""Content types of kept images by the suffix :meth:`qrs.records.RecordStore.keep_file` gives (.bin: octets)."""
RECORDS_OFF = "records are off (qrs serve --db none): nothing is recorded"

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
    inspection_id: Optional[int] = Field(None, description="The id of the image's inspection record, when kept.")


class RecordStatus(BaseModel):
    """Whether the inspection records are kept (and why not)."""

    kept: bool
    detail: str = ""


class ScoreResponse(BaseModel):
    results: list[ScoreResult]
    record: Optional[RecordStatus] = Field(None, description="Whether the records of these images were kept "
                                                              "(absent when the service keeps no records).")


class RiskCuts(BaseModel):
    low: float
    high: float


class CalibrationInfo(BaseModel):
    """Where the calibration scale came from (docs/method.md#calibration)."""

    anchor: str = Field(description="good: scale = quantile of good parts' map peaks / threshold; defective: "
                                    "scale = quantile of defective training parts' peaks")
    quantile: float
    split: str = Field(description="split of the parts whose peaks were used")
    n_parts: Optional[int] = None


class ModelInfo(BaseModel):
    """The served model and how it scores."""

    arch: str
    img_size: list[int] = Field(description="height and width of the model's input, in pixels")
    output_stride: int = Field(description="input pixels per cell of the explained map (32, 16 or 8)")
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
    records: Optional[RecordStatus] = Field(None, description="Whether inspection records are being kept; null "
                                                               "when the service keeps none (--db none).")


class Review(BaseModel):
    """An inspector's review of a record: what the part really is, and what that makes the verdict."""

    id: int
    inspection_id: int
    time: datetime
    reviewer: str
    truth: Truth
    outcome: Literal["confirmed defect", "false alarm", "missed defect", "correct pass"]
    note: str


class ReviewRequest(BaseModel):
    truth: Truth = Field(description="What the part really is.")
    note: str = Field("", max_length=2000)
    reviewer: Optional[str] = Field(None, min_length=1, max_length=MAX_TEXT,
                                    description="Who reviews (default: the client's address).")


class InspectionRecord(BaseModel):
    """One scored image as recorded."""

    id: int
    time: datetime = Field(description="When the image arrived (UTC).")
    station: str
    part_id: str
    file: str
    image_sha256: Optional[str]
    model_sha256: str = Field(description="SHA-256 of the checkpoint or ONNX file that scored it.")
    arch: str
    prediction: Optional[int] = Field(description="1 = defective (fail); null when the image could not be scored.")
    verdict: Optional[Literal["pass", "fail"]]
    p_defective: Optional[float]
    qrs: Optional[float]
    risk_level: Optional[RiskLevel]
    error: Optional[str] = Field(description="Why the image could not be scored.")
    latency_ms: float = Field(description="From the request's arrival to its scores.")
    image_kept: bool
    overlay_kept: bool
    review: Optional[Review] = Field(description="The latest review.")


class InspectionDetail(InspectionRecord):
    reviews: list[Review] = Field(description="Every review, oldest first.")
    overlay_png: Optional[str] = Field(description="The kept overlay, base64 PNG.")


class InspectionPage(BaseModel):
    inspections: list[InspectionRecord] = Field(description="Newest first.")
    next_cursor: Optional[int] = Field(description="Pass as cursor for the next page; null on the last page.")


class DriftBaseline(BaseModel):
    size: int = Field(description="Records in the baseline window.")
    records: int = Field(description="Records there are in it so far.")
    complete: bool = Field(description="Whether the window is full (no p-chart limits before).")
    share_flagged: Optional[float]


class FlaggedPoint(BaseModel):
    start: datetime
    end: datetime
    parts: int
    n: int
    k: int = Field(description="Flagged (failed) parts.")
    share: float
    lower: Optional[float] = Field(description="3-sigma limits around the baseline share.")
    upper: Optional[float]
    alarm: bool


class QrsPoint(BaseModel):
    start: datetime
    end: datetime
    parts: int
    n: int = Field(description="Passed parts.")
    k: int = Field(description="Passed parts with QRS > 0.")
    share: Optional[float]
    expected: Optional[float] = Field(description="1 - the calibration quantile.")
    upper: Optional[float] = Field(description="The largest share the binomial test lets pass.")
    p_value: Optional[float] = Field(description="One-sided binomial test of k in n against the expected share.")
    alarm: bool


class DriftReport(BaseModel):
    model_sha256: str
    station: Optional[str]
    per: str | int
    alpha: float
    baseline: DriftBaseline
    expected_qrs_share: Optional[float]
    flagged: list[FlaggedPoint]
    qrs_over_zero: list[QrsPoint]
    alarm: bool = Field(description="Whether any point lies beyond its limit.")
    alarms: list[str]


def _error(what: str) -> dict[str, Any]:
    """An OpenAPI error response: ``{"detail": "..."}``."""
    return {"model": ErrorBody, "description": what}


def _json_errors(responses: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Error responses of a route whose own answer is not JSON (CSV, images): they stay JSON."""
    schema = {"$ref": "#/components/schemas/ErrorBody"}
    return {code: {"description": r["description"], "content": {"application/json": {"schema": schema}}}
            for code, r in responses.items()}


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
                "station": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT,
                            "description": "Where the parts were inspected (recorded; default --station)."},
                "part_id": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": MAX_TEXT},
                            "description": "One part id per file, in order (recorded; default the file name)."},
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
    """The model (loaded in a thread, so the health routes answer meanwhile), its batcher, and the records'
    writer (a batcher too: the records of all the requests waiting for it go in one transaction)."""

    def __init__(self, model: Scorer | str | os.PathLike[str], *, device: str, resize: str | None, backend: str,
                 max_batch: int, max_wait_s: float, recorder: Recorder | None = None) -> None:
        self._model = model
        self._device = device
        self._resize = resize
        self._backend = backend
        self._loading: asyncio.Task[Scorer] | None = None
        self.batcher: Batcher[Prepared, Scored] = Batcher(self._score, max_batch=max_batch, max_wait_s=max_wait_s)
        self._batching: asyncio.Task[None] | None = None
        self.scorer: Scorer | None = None
        self.recorder = recorder
        self.writer: Batcher[Inspection, int] | None = (
            Batcher(recorder.record, max_batch=sys.maxsize, max_wait_s=0) if recorder is not None else None)
        self._writing: asyncio.Task[None] | None = None

    def _load(self) -> Scorer:
        model = self._model
        scorer = model if isinstance(model, Scorer) else Scorer.load(model, device=self._device, resize=self._resize,
                                                                     backend=self._backend)
        if self.recorder is not None:
            self.recorder.use(scorer)
            self.recorder.open()
        return scorer

    def _score(self, items: list[Prepared]) -> list[Scored]:
        assert self.scorer is not None
        return self.scorer.score(items)

    async def start(self) -> None:
        self._loading = asyncio.create_task(asyncio.to_thread(self._load))
        self._batching = asyncio.create_task(self.batcher.run())
        if self.writer is not None:
            self._writing = asyncio.create_task(self.writer.run())

    async def stop(self) -> None:
        for task in (self._batching, self._writing, self._loading):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        if self.recorder is not None:
            self.recorder.close()

    async def record(self, items: list[Inspection]) -> tuple[list[int | None], RecordStatus]:
        """Keep the records of ``items``; their ids (None when not kept) and whether they were kept."""
        assert self.writer is not None
        try:
            return list(await self.writer.submit(items)), RecordStatus(kept=True)
        except RecordsUnavailable as exc:
            return [None] * len(items), RecordStatus(kept=False, detail=str(exc))

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

    async def read(self, what: Callable[[RecordStore, int], T]) -> T:
        """``what(store, model id)`` in a worker thread once the records database is open: 404 when records
        are off or the record is unknown, 409 for a review of a record without verdict, 503 when the
        database fails."""
        if self.recorder is None:
            raise HTTPException(404, detail=RECORDS_OFF)
        await self.ready_scorer()
        recorder = self.recorder

        def call() -> T:
            store, model_id = recorder.ready()
            return what(store, model_id)

        try:
            return await asyncio.to_thread(call)
        except NotFound as exc:
            raise HTTPException(404, detail=str(exc)) from exc
        except NoVerdict as exc:
            raise HTTPException(409, detail=str(exc)) from exc
        except RecordsError as exc:
            raise HTTPException(503, detail=str(exc)) from exc


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


class UnreadableUpload(Exception):
    """An uploaded image that cannot be scored: its index among the uploads and the reason."""

    def __init__(self, index: int, detail: str) -> None:
        super().__init__(detail)
        self.index = index
        self.detail = detail


def _prepare_all(scorer: Scorer, uploads: Sequence[tuple[str, bytes]], roi: RoiSpec,
                 overlay: bool | Literal["flagged"]) -> list[Prepared]:
    """Decode and resize every upload (in a worker thread); :class:`UnreadableUpload` for the first bad image."""
    prepared = []
    for i, (name, data) in enumerate(uploads):
        try:
            prepared.append(scorer.prepare(name, open_rgb(data), roi, overlay=overlay))
        except QrsError as exc:
            raise UnreadableUpload(i, f"{name}: {exc}") from exc
    return prepared


def _result(scored: Scored, overlay: bool) -> dict[str, Any]:
    row = dict(scored.row)
    if overlay and scored.overlay_png is not None:
        row["overlay_png"] = base64.b64encode(scored.overlay_png).decode("ascii")
    return row


def _text_field(form: FormData, name: str) -> list[str]:
    """The values of a text form field (station, part_id); 422 for a file or a bad value."""
    values = form.getlist(name)
    for value in values:
        if not isinstance(value, str):
            raise HTTPException(422, detail=f"form field {name!r} must be text, not a file")
        try:
            check_text(value, name)
        except RecordsError as exc:
            raise HTTPException(422, detail=str(exc)) from exc
    return [str(v) for v in values]


def _part_ids(form: FormData, uploads: Sequence[tuple[str, bytes]]) -> list[str]:
    """One part id per upload: the ``part_id`` fields in order, else the file names."""
    given = _text_field(form, "part_id")
    if given and len(given) != len(uploads):
        raise HTTPException(422, detail=f"give one part_id per file: {len(uploads)} files, {len(given)} part_id "
                                        "fields")
    return given or [name[:MAX_TEXT] for name, _ in uploads]


def _utc_query(value: Optional[datetime], name: str) -> Optional[datetime]:
    """A time from the query in UTC (a time without offset is taken as UTC)."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
    except OverflowError as exc:
        raise HTTPException(422, detail=f"{name} is out of range: {value}") from exc


NO_NUL = r"^[^\x00]*$"
STATION_QUERY = Query(None, min_length=1, max_length=MAX_TEXT, pattern=NO_NUL, description="Only this station.")
SINCE_QUERY = Query(None, description="From this time on (ISO 8601; UTC when it has no offset).")
UNTIL_QUERY = Query(None, description="Before this time (ISO 8601; UTC when it has no offset).")


def _filters(since: Optional[datetime] = SINCE_QUERY, until: Optional[datetime] = UNTIL_QUERY,
             station: Optional[str] = STATION_QUERY,
             prediction: Optional[int] = Query(None, ge=0, le=1, description="1: flagged (failed) parts, 0: passed."),
             risk_level: Optional[RiskLevel] = Query(None, description="Only this risk level."),
             reviewed: Optional[bool] = Query(None, description="Only reviewed (true) or unreviewed (false) parts.")
             ) -> Filters:
    return Filters(since=_utc_query(since, "since"), until=_utc_query(until, "until"), station=station,
                   prediction=prediction, risk_level=risk_level, reviewed=reviewed)


CSV_FIELDS = ("id", "time", "station", "part_id", "file", "image_sha256", "model_sha256", "arch", "prediction",
              "verdict", "p_defective", "qrs", "risk_level", "error", "latency_ms", "image_kept", "overlay_kept",
              "truth", "outcome", "reviewer", "review_note")


def _csv_line(values: Sequence[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerow(["" if v is None else v for v in values])
    return buf.getvalue()


def _csv_row(record: dict[str, Any]) -> str:
    review = record["review"] or {}
    values = {**record, "time": record["time"].isoformat(), "truth": review.get("truth"),
              "outcome": review.get("outcome"), "reviewer": review.get("reviewer"), "review_note": review.get("note")}
    return _csv_line([values[k] for k in CSV_FIELDS])


class CsvResponse(StreamingResponse):
    media_type = "text/csv"


def create_app(model: Scorer | str | os.PathLike[str], *, api_key: str | None = None, max_upload_mb: float = 20,
               max_batch: int = 16, max_wait_ms: float = 5, max_files: int = 64, device: str = "auto",
               resize: str | None = None, backend: str = "torch", records: RecordSettings | None = None) -> FastAPI:
    """The service's ASGI app for a model path (a checkpoint, or with ``backend="onnx"`` a model from
    ``qrs export``; loaded when the app starts) or a loaded Scorer.

    With ``api_key`` every ``/v1`` route needs ``Authorization: Bearer <api_key>``; ``/``,
    ``/healthz``, ``/readyz`` and the OpenAPI routes stay open. With ``records``, every scored image
    is recorded (:mod:`qrs.records`) and the ``/v1/inspections`` and ``/v1/drift`` routes read them.
    """
    if api_key is not None and not api_key:
        raise QrsError("the API key is empty; give a non-empty --api-key / QRS_API_KEY, or none")
    if not (max_upload_mb > 0 and max_batch >= 1 and max_wait_ms >= 0 and max_files >= 1):
        raise QrsError("--max-upload-mb must be > 0, --max-batch >= 1, --max-wait-ms >= 0 and max_files >= 1")
    static = resources.files("qrs").joinpath("static")
    page = static.joinpath("index.html").read_text(encoding="utf-8")
    recorder = Recorder(records) if records is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = Service(model, device=device, resize=resize, backend=backend, max_batch=max_batch,
                          max_wait_s=max_wait_ms / 1000, recorder=recorder)
        await service.start()
        app.state.service = service
        try:
            yield
        finally:
            del app.state.service
            await service.stop()

    app = FastAPI(title="qrs", version=__version__, lifespan=lifespan,
                  description="Scores images of parts: pass/fail, p_defective, the Quality Risk Score (QRS), its "
                              "risk level and a heat map overlay; keeps a record of every scored part, charts "
                              "them for drift and takes inspectors' reviews. The web page is at /.")
    app.add_middleware(UploadLimit, max_bytes=int(max_upload_mb * 2**20))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors())
        return JSONResponse({"detail": f"invalid request: {details}"}, 422)

    v1 = [Depends(_auth(api_key))] if api_key else []
    errors = {401: _error("Missing or wrong API key."), 503: _error("The model is not loaded.")}
    record_errors = {**errors, 404: _error("Records are off, or no such record."),
                     422: _error("A malformed query."),
                     503: _error("The model is not loaded, or the records database is unavailable.")}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_CSP, "Cache-Control": "no-store"})

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str) -> Response:
        if name not in STATIC_FILES:
            raise HTTPException(404, detail=f"no static file {name!r}")
        return Response(static.joinpath(name).read_bytes(), media_type=STATIC_FILES[name],
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=Ready, responses={503: {"model": Ready}})
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: 200 once the model is loaded, 503 before (or when it cannot be loaded). ``records`` says
        whether inspection records are being kept; scoring goes on when they are not."""
        service = _service(request)
        ready, why = service.readiness()
        records = service.recorder.status() if service.recorder is not None else None
        return JSONResponse({"ready": ready, "detail": why, "records": records}, 200 if ready else 503)

    @app.get("/v1/model", response_model=ModelInfo, dependencies=v1, responses=errors, tags=["v1"])
    async def model_info(request: Request) -> dict[str, Any]:
        """The model: arch, image size, threshold, calibration scale, risk cut points, qrs version."""
        return (await _service(request).ready_scorer()).info()

    @app.post("/v1/score", response_model=ScoreResponse, response_model_exclude_none=True, dependencies=v1,
              openapi_extra=SCORE_REQUEST_BODY, tags=["v1"], responses={
                  **errors, 400: _error("Malformed multipart body or too many files."),
                  413: _error("Upload over the limit."),
                  415: _error("Not multipart/form-data, or a file that is not an image."),
                  422: _error("Missing file field, unreadable/truncated image, over 50 megapixels, bad roi, "
                              "bad station or part_id.")})
    async def score(request: Request, overlay: bool = Query(False, description="Also return the overlay PNG "
                                                                                "(base64) of every image.")
                    ) -> dict[str, Any]:
        """Score one or more images (multipart field ``files``), optionally with an ROI and overlays; with
        records on, each image's record is committed before the answer."""
        received, started = utcnow(), time.perf_counter()
        service = _service(request)
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise HTTPException(415, detail=f"send the images as multipart/form-data (field 'files'), not "
                                            f"{content_type or 'a body without content type'!r}")
        form = await request.form(max_files=max_files, max_fields=max_files + 8)
        try:
            overlay = overlay or _form_flag(form.get("overlay"), "overlay")
            roi = await _roi_field(form)
            uploads = await _uploads(form)
            stations = _text_field(form, "station")
            part_ids = _part_ids(form, uploads)
        finally:
            await form.close()
        if len(stations) > 1:
            raise HTTPException(422, detail="give at most one station field")
        station = stations[0] if stations else (records.station if records is not None else "")
        scorer = await service.ready_scorer()

        def inspection(i: int, row: dict[str, Any], overlay_png: bytes | None = None) -> Inspection:
            name, data = uploads[i]
            return Inspection(file=name, row=row, image=data, overlay_png=overlay_png, station=station,
                              part_id=part_ids[i], time=received, latency_ms=1000 * (time.perf_counter() - started))

        wanted: bool | Literal["flagged"] = overlay or (records.overlays() if records is not None else False)
        try:
            prepared = await asyncio.to_thread(_prepare_all, scorer, uploads, roi, wanted)
        except UnreadableUpload as exc:
            if records is not None:
                await service.record([inspection(exc.index, {"file": uploads[exc.index][0], "error": exc.detail})])
            raise HTTPException(422, detail=exc.detail) from None
        scored = await service.batcher.submit(prepared)
        results = [_result(s, overlay) for s in scored]
        if records is None:
            return {"results": results}
        ids, status = await service.record([inspection(i, s.row, s.overlay_png) for i, s in enumerate(scored)])
        for result, inspection_id in zip(results, ids):
            result["inspection_id"] = inspection_id
        return {"results": results, "record": status}

    @app.get("/v1/inspections", response_model=InspectionPage, dependencies=v1, responses=record_errors,
             tags=["records"])
    async def list_inspections(request: Request, filters: Filters = Depends(_filters),
                               limit: int = Query(50, ge=1, le=1000, description="Most records in the page."),
                               cursor: Optional[int] = Query(None, ge=1, le=MAX_ID, description="next_cursor of the "
                                                             "previous page.")) -> dict[str, Any]:
        """Inspection records, newest first, a page at a time."""
        rows, next_cursor = await _service(request).read(lambda store, _: store.query(filters, limit=limit,
                                                                                       before=cursor))
        return {"inspections": rows, "next_cursor": next_cursor}

    @app.get("/v1/inspections.csv", response_class=CsvResponse, dependencies=v1,
             responses=_json_errors(record_errors), tags=["records"])
    async def inspections_csv(request: Request, filters: Filters = Depends(_filters)) -> CsvResponse:
        """Every record matching the filters as CSV, newest first (with the latest review)."""
        service = _service(request)
        await service.read(lambda store, _: store.query(filters, limit=1))
        assert service.recorder is not None
        store = service.recorder.store

        def lines() -> Iterator[str]:
            yield _csv_line(CSV_FIELDS)
            for record in store.iter_all(filters):
                yield _csv_row(record)

        return CsvResponse(lines(), headers={"Content-Disposition": 'attachment; filename="inspections.csv"'})

    ID_PATH = Path(ge=1, le=MAX_ID, description="The record's id.")

    @app.get("/v1/inspections/{inspection_id}", response_model=InspectionDetail, dependencies=v1,
             responses=record_errors, tags=["records"])
    async def get_inspection(request: Request, inspection_id: int = ID_PATH) -> dict[str, Any]:
        """One record with all its reviews and, when it was kept, its overlay (base64 PNG)."""

        def read(store: RecordStore, _: int) -> dict[str, Any]:
            record = store.get(inspection_id)
            path = store.kept_file(inspection_id, "overlay")
            record["overlay_png"] = base64.b64encode(path.read_bytes()).decode("ascii") if path else None
            return record

        return await _service(request).read(read)

    def kept(what: str) -> Callable[..., Awaitable[FileResponse]]:
        async def route(request: Request, inspection_id: int = ID_PATH) -> FileResponse:
            path = await _service(request).read(lambda store, _: store.kept_file(inspection_id, what))
            if path is None:
                raise HTTPException(404, detail=f"the {what} of inspection {inspection_id} was not kept "
                                                "(see --keep-images and --keep-days)")
            return FileResponse(path, media_type=IMAGE_TYPES.get(path.suffix, "application/octet-stream"))

        return route

    binary = {"schema": {"type": "string", "format": "binary"}}
    for what, summary, types in (
            ("image", "The kept image as it was uploaded (application/octet-stream when it was not an image).",
             ("image/*", "application/octet-stream")),
            ("overlay", "The kept overlay (PNG): the heat map over the image.", ("image/png",))):
        app.get(f"/v1/inspections/{{inspection_id}}/{what}", dependencies=v1, tags=["records"], summary=summary,
                response_class=FileResponse, responses={**_json_errors(record_errors), 200: {
                    "content": {t: binary for t in types}, "description": summary}})(kept(what))

    @app.post("/v1/inspections/{inspection_id}/review", status_code=201, response_model=Review, dependencies=v1,
              tags=["records"], responses={**record_errors, 400: _error("A body that cannot be read as text."),
                                           409: _error("The record has no verdict (its image could not be scored)."),
                                           422: _error("A malformed review (truth must be defective or good).")})
    async def review(request: Request, inspection_id: int = ID_PATH,
                     body: ReviewRequest = Body(...)) -> dict[str, Any]:
        """An inspector's review: what the part really is. It is a row of its own; it never changes the record."""
        if "\x00" in body.note or (body.reviewer and "\x00" in body.reviewer):
            raise HTTPException(422, detail="note and reviewer must not contain NUL characters")
        host = request.client.host if request.client else "unknown"
        reviewer = body.reviewer or f"anonymous ({host})"
        return await _service(request).read(
            lambda store, _: store.review(inspection_id, body.truth, body.note, reviewer))

    @app.get("/v1/drift", response_model=DriftReport, dependencies=v1, responses=record_errors, tags=["records"])
    async def drift(request: Request,
                    per: str = Query("hour", pattern=r"^(hour|[1-9][0-9]{0,5})$",
                                     description="One point per hour, or per this many parts."),
                    baseline: int = Query(DEFAULT_BASELINE, ge=20, le=1_000_000,
                                          description="The first records of the model that set the p-chart's "
                                                      "centre and limits."),
                    since: Optional[datetime] = Query(None, description="From this time on (default: 7 days ago)."),
                    until: Optional[datetime] = UNTIL_QUERY,
                    station: Optional[str] = STATION_QUERY) -> dict[str, Any]:
        """The two control charts of the served model's records (share flagged; share of passed parts
        with QRS > 0 against the calibration) and their alarms."""
        start = _utc_query(since, "since") or utcnow() - timedelta(days=7)
        end = _utc_query(until, "until")
        return await _service(request).read(lambda store, model_id: store.drift(
            model_id, station=station, since=start, until=end, per=parse_per(per), baseline=baseline))

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
        resize: str | None = None, backend: str = "torch", records: RecordSettings | None = None) -> None:
    """``qrs serve``: load the model (a bad one stops here, before binding), say where records go, then serve.

    A records database that cannot be opened only prints a warning: the service scores anyway, says in
    every answer and in ``/readyz`` that records are not kept, and tries the database again.
    """
    scorer = Scorer.load(model_path, device=device, resize=resize, backend=backend)
    app = create_app(scorer, api_key=api_key, max_upload_mb=max_upload_mb, max_batch=max_batch,
                     max_wait_ms=max_wait_ms, records=records)
    print(records.describe() if records is not None else "records: off (--db none)", file=sys.stderr)
    if records is not None:
        try:
            RecordStore(records.url, images_dir=records.images_dir).open().close()
        except RecordsError as exc:
            print(f"warning: records not kept: {exc} (scoring goes on; the database is tried again every "
                  f"few seconds)", file=sys.stderr)
    if scorer.note:
        print(f"note: {scorer.note}", file=sys.stderr)
    if api_key is None and host not in LOOPBACK:
        print(f"warning: serving on {host} without an API key: anyone who reaches it can score", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="info")
