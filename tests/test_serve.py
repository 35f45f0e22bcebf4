"""The HTTP service: every route, every bad input (4xx JSON, never 500), auth on and off, the batcher,
a load test and schemathesis fuzzing against a real uvicorn server on loopback."""

from __future__ import annotations

import asyncio
import base64
import http.client
import io
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from qrs import __version__
from qrs.errors import QrsError
from qrs.model import load_checkpoint
from qrs.predict import Scorer, score_files
from qrs.records import RecordSettings
from qrs.serve import Batcher, create_app, run, serve_in_background
from scoring_setup import (
    PART_SIZE, RISK_CUTS, SIDE, Exported, bomb_png, make_checkpoint, part_image, png, serve_process,
)

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
N_IMAGES = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "calibrated.pt")


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("parts")
    paths = []
    for seed in range(N_IMAGES):
        path = root / f"part_{seed}.png"
        path.write_bytes(png(part_image(seed, seed % 2 == 1)))
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def in_process(checkpoint: Path, images: list[Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """What `qrs score` gives for the same images, by file name."""
    result = score_files(images, checkpoint, out=tmp_path_factory.mktemp("scores"), progress=False)
    return {Path(r["file"]).name: r for r in result.rows}


def wait_ready(client: TestClient) -> None:
    """The model loads in a thread after startup; every request waits for it, readyz does not."""
    assert client.get("/v1/model", headers=AUTH).status_code == 200
    assert client.get("/readyz").json() == {"ready": True, "detail": "", "records": None}


@pytest.fixture(scope="module")
def client(checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(checkpoint, max_upload_mb=1, max_files=4)) as c:
        wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def secured(checkpoint: Path) -> Iterator[TestClient]:
    with TestClient(create_app(checkpoint, api_key=KEY)) as c:
        wait_ready(c)
        yield c


def upload(path: Path, content_type: str = "image/png") -> tuple[str, tuple[str, bytes, str]]:
    return ("files", (path.name, path.read_bytes(), content_type))


def assert_matches(result: dict, want: dict) -> None:
    assert result["file"] == Path(want["file"]).name
    for key in ("verdict", "prediction", "risk_level", "n_over", "norm"):
        assert result[key] == want[key], key
    for key in ("p_defective", "qrs", "area", "mean_over", "max_over", "peak"):
        assert result[key] == pytest.approx(want[key], abs=1e-5), key


def test_health_and_page_routes(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'id="file-input"' in page.text
    assert "http://" not in page.text and "https://" not in page.text and "//cdn" not in page.text
    assert client.get("/docs").status_code == 200
    assert "/v1/score" in client.get("/openapi.json").json()["paths"]


def test_model_route(client: TestClient, checkpoint: Path) -> None:
    info = client.get("/v1/model").json()
    calibration = load_checkpoint(checkpoint).qrs_meta["calibration"]
    assert info["arch"] == "resnet18" and info["img_size"] == [SIDE, SIDE] and info["output_stride"] == 32 and info["threshold"] == 0.9
    assert info["scale"] == pytest.approx(calibration["scale"]) and info["risk_cuts"] == RISK_CUTS
    assert info["calibrated"] is True and info["qrs_version"] == __version__ and info["resize"] == "stretch"
    assert info["backend"] == "torch"
    assert info["calibration"] == {"anchor": "good", "quantile": 0.99, "split": "val", "n_parts": 4}


def test_a_lite0_checkpoint_is_served_with_the_same_rows_as_qrs_score(images: list[Path], tmp_path: Path) -> None:
    lite = make_checkpoint(tmp_path / "lite.pt", arch="efficientnet_lite0")
    want = {Path(r["file"]).name: r for r in score_files(images, lite, out=tmp_path, progress=False).rows}
    with TestClient(create_app(lite)) as c:
        wait_ready(c)
        assert c.get("/v1/model").json()["arch"] == "efficientnet_lite0"
        results = c.post("/v1/score", files=[upload(p) for p in images]).json()["results"]
    assert len(results) == N_IMAGES
    for result in results:
        expected = want[result["file"]]
        assert result["verdict"] == expected["verdict"] and result["risk_level"] == expected["risk_level"]
        assert result["qrs"] == pytest.approx(expected["qrs"], abs=1e-6)
        assert result["p_defective"] == pytest.approx(expected["p_defective"], abs=1e-6)


def test_score_equals_qrs_score(client: TestClient, images: list[Path], in_process: dict[str, dict]) -> None:
    response = client.post("/v1/score", files=[upload(p) for p in images])
    assert response.status_code == 200
    results = response.json()["results"]
    assert len(results) == N_IMAGES
    for result in results:
        assert "overlay_png" not in result
        assert_matches(result, in_process[result["file"]])


def test_overlay_as_query_or_form_field(client: TestClient, images: list[Path]) -> None:
    by_query = client.post("/v1/score?overlay=true", files=[upload(images[1])]).json()["results"][0]
    by_form = client.post("/v1/score", files=[upload(images[1])], data={"overlay": "true"}).json()["results"][0]
    for result in (by_query, by_form):
        with Image.open(io.BytesIO(base64.b64decode(result["overlay_png"]))) as img:
            assert img.format == "PNG" and img.size == PART_SIZE
    assert by_query["overlay_png"] == by_form["overlay_png"]


def test_roi_field(client: TestClient, checkpoint: Path, images: list[Path], tmp_path: Path) -> None:
    box = [0.0, 0.5, 1.0, 1.0]
    roi_file = tmp_path / "roi.json"
    roi_file.write_text(json.dumps({images[0].name: [box]}))
    want = {Path(r["file"]).name: r for r in score_files(images[:2], checkpoint, out=tmp_path,
                                                         roi=str(roi_file), progress=False).rows}
    response = client.post("/v1/score", files=[upload(p) for p in images[:2]],
                           data={"roi": json.dumps({images[0].name: [box]})})
    for result in response.json()["results"]:
        assert_matches(result, want[result["file"]])
    every = client.post("/v1/score", files=[upload(images[0])], data={"roi": json.dumps([box])}).json()
    assert_matches(every["results"][0], want[images[0].name])
    auto = client.post("/v1/score", files=[upload(images[0])], data={"roi": "auto"})
    assert auto.status_code == 200


@pytest.mark.parametrize(("data", "message"), [
    ("{not json", "not JSON"),
    ("[[0.5, 0.5, 0.2, 0.9]]", "x0 >= x1"),
    ("[]", "non-empty list"),
    ('{"part_0.png": "box"}', "part_0.png"),
])
def test_bad_roi_is_422(client: TestClient, images: list[Path], data: str, message: str) -> None:
    response = client.post("/v1/score", files=[upload(images[0])], data={"roi": data})
    assert response.status_code == 422 and message in response.json()["detail"]


def test_an_upload_name_that_is_not_utf8_is_scored_under_its_latin1_reading(client: TestClient,
                                                                            images: list[Path]) -> None:
    """Upload names are text once the multipart parser has read them (UTF-8, else Latin-1), never bytes
    that a response could not hold: the image is scored and named in JSON."""
    body = (b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"bad\xffname.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + images[0].read_bytes() + b"\r\n--b--\r\n")
    response = client.post("/v1/score", content=body, headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 200, response.text
    assert [r["file"] for r in response.json()["results"]] == ["bad\u00ffname.png"]


def test_bad_images_are_422_and_name_the_file(client: TestClient, images: list[Path]) -> None:
    whole = images[0].read_bytes()
    cases = {
        "notes.png": (b"plain text, not an image", "not an image file"),
        "cut.png": (whole[: len(whole) // 2], "truncated"),
        "bomb.png": (bomb_png(), "60.0 megapixels, over the limit of 50"),
        "empty.png": (b"", "not an image file"),
    }
    for name, (data, message) in cases.items():
        response = client.post("/v1/score", files=[upload(images[1]), ("files", (name, data, "image/png"))])
        assert response.status_code == 422, name
        detail = response.json()["detail"]
        assert detail.startswith(f"{name}: ") and message in detail, detail
    # The service carries on.
    assert client.post("/v1/score", files=[upload(images[1])]).status_code == 200


def test_upload_over_the_limit_is_413(client: TestClient) -> None:
    big = b"\0" * (2**20 + 1)
    declared = client.post("/v1/score", files=[("files", ("big.png", big, "image/png"))])
    assert declared.status_code == 413 and "over the limit of 1 MB" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n\r\n"
        for _ in range(3):
            yield b"\0" * 2**19

    streamed = client.post("/v1/score", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert streamed.status_code == 413 and streamed.json()["detail"] == "upload over the limit of 1 MB"


def raw_post(url: str, body: bytes, *, chunked: bool) -> tuple[int, dict]:
    """POST ``body`` to /v1/score over a plain socket with ``Connection: close`` (as urllib sends it), writing the
    whole request before reading the answer (as most clients do); the status and the JSON body."""
    parts = urlsplit(url)
    head = (f"POST /v1/score HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\n")
    if chunked:
        pieces = [body[i:i + 2**16] for i in range(0, len(body), 2**16)]
        payload = b"".join(f"{len(p):x}\r\n".encode() + p + b"\r\n" for p in pieces) + b"0\r\n\r\n"
        head += "Transfer-Encoding: chunked\r\n\r\n"
    else:
        payload = body
        head += f"Content-Length: {len(body)}\r\n\r\n"
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(head.encode() + payload)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read())


@pytest.fixture(scope="module")
def small_limit(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``qrs serve --max-upload-mb 2`` in its own process (in a thread of the test process the client and the
    server take turns on the GIL, and the reset connection that clients saw did not happen)."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve_process(["--model", str(checkpoint), "--max-upload-mb", "2", "--db", "none"], log) as (_, url):
        yield url


@pytest.mark.parametrize("attempt", range(3))
def test_a_client_that_writes_a_body_over_the_limit_before_reading_gets_the_413(small_limit: str,
                                                                                attempt: int) -> None:
    """Python's urllib sends the headers, then the whole body, then reads: it used to get a broken pipe in
    about half the runs, because the 413 was sent and the connection closed (``Connection: close``) while it
    was still writing."""
    image = bytes(range(256)) * (3 * 2**20 // 256)
    body = b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n\r\n" + image + b"\r\n--b--\r\n"
    assert raw_post(small_limit, body, chunked=False) == (
        413, {"detail": f"upload over the limit of 2 MB (Content-Length {len(body)})"})
    assert raw_post(small_limit, body, chunked=True) == (413, {"detail": "upload over the limit of 2 MB"})
    # Far more than the sockets' buffers hold: a server that does not read the body cuts the client off.
    huge = body + b"\0" * 40 * 2**20
    assert raw_post(small_limit, huge, chunked=False) == (
        413, {"detail": f"upload over the limit of 2 MB (Content-Length {len(huge)})"})
    request = urllib.request.Request(small_limit + "/v1/score", data=body,
                                     headers={"Content-Type": "multipart/form-data; boundary=b"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=60)
    assert refused.value.code == 413 and json.loads(refused.value.read())["detail"].startswith(
        "upload over the limit of 2 MB")


def test_a_client_that_waits_for_100_continue_gets_the_413_before_sending(small_limit: str) -> None:
    parts = urlsplit(small_limit)
    with socket.create_connection((parts.hostname, parts.port), timeout=60) as sock:
        sock.sendall(f"POST /v1/score HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {3 * 2**20}\r\n"
                     "Expect: 100-continue\r\nContent-Type: multipart/form-data; boundary=b\r\n\r\n".encode())
        response = http.client.HTTPResponse(sock)
        response.begin()
        assert response.status == 413 and json.loads(response.read())["detail"].startswith("upload over the limit")


def test_wrong_content_types_are_415(client: TestClient, images: list[Path]) -> None:
    as_json = client.post("/v1/score", json={"files": ["x"]})
    assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["detail"]
    as_form = client.post("/v1/score", data={"files": "x"})
    assert as_form.status_code == 415
    no_body = client.post("/v1/score")
    assert no_body.status_code == 415
    text_part = client.post("/v1/score", files=[upload(images[0], "text/plain")])
    assert text_part.status_code == 415 and "'text/plain' is not an image" in text_part.json()["detail"]
    octets = client.post("/v1/score", files=[upload(images[0], "application/octet-stream")])
    assert octets.status_code == 200


def test_missing_or_odd_file_fields(client: TestClient, images: list[Path]) -> None:
    other_field = client.post("/v1/score", files=[("image", (images[0].name, images[0].read_bytes(), "image/png"))])
    assert other_field.status_code == 422 and "missing file field" in other_field.json()["detail"]
    text_value = client.post("/v1/score", files=[("files", (None, b"abc"))])
    assert text_value.status_code == 422 and "not a file upload" in text_value.json()["detail"]
    singular = client.post("/v1/score", files=[("file", (images[0].name, images[0].read_bytes(), "image/png"))])
    assert singular.status_code == 200
    too_many = client.post("/v1/score", files=[upload(images[0])] * 5)
    assert too_many.status_code == 400 and "Too many files" in too_many.json()["detail"]
    no_boundary = client.post("/v1/score", content=b"x", headers={"content-type": "multipart/form-data"})
    assert no_boundary.status_code == 400
    bad_flag = client.post("/v1/score", files=[upload(images[0])], data={"overlay": "maybe"})
    assert bad_flag.status_code == 422 and "'overlay' must be true or false" in bad_flag.json()["detail"]
    bad_query = client.post("/v1/score?overlay=maybe", files=[upload(images[0])])
    assert bad_query.status_code == 422 and bad_query.json()["detail"].startswith("invalid request: query.overlay")


def test_auth(secured: TestClient, images: list[Path]) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": f"Bearer {KEY}x"}):
        for method, path in (("GET", "/v1/model"), ("POST", "/v1/score")):
            response = secured.request(method, path, headers=headers, files=[upload(images[0])])
            assert response.status_code == 401, (headers, path)
            assert response.headers["www-authenticate"] == "Bearer" and "API key" in response.json()["detail"]
    assert secured.get("/v1/model", headers=AUTH).status_code == 200
    assert secured.post("/v1/score", headers=AUTH, files=[upload(images[0])]).status_code == 200
    for open_path in ("/", "/healthz", "/readyz", "/openapi.json"):
        assert secured.get(open_path).status_code == 200
    assert "HTTPBearer" in secured.get("/openapi.json").json()["components"]["securitySchemes"]


def test_auth_off_needs_no_header(client: TestClient, images: list[Path]) -> None:
    assert client.post("/v1/score", files=[upload(images[0])]).status_code == 200
    assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


def test_empty_api_key_is_refused(checkpoint: Path) -> None:
    with pytest.raises(QrsError, match="API key is empty"):
        create_app(checkpoint, api_key="")


def test_readiness_while_loading_and_after_a_failed_load(checkpoint: Path, images: list[Path],
                                                         monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    release = threading.Event()
    real_load = Scorer.load

    def slow_load(*args: object, **kwargs: object) -> Scorer:
        release.wait(timeout=60)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(Scorer, "load", slow_load)
    with TestClient(create_app(checkpoint)) as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 503 and c.get("/readyz").json()["detail"] == "the model is loading"
        release.set()
        wait_ready(c)
    monkeypatch.setattr(Scorer, "load", real_load)
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with TestClient(create_app(broken)) as c:
        response = c.post("/v1/score", files=[upload(images[0])])
        assert response.status_code == 503 and "could not be loaded" in response.json()["detail"]
        ready = c.get("/readyz")
        assert ready.status_code == 503 and "not a readable checkpoint" in ready.json()["detail"]


def test_event_loop_answers_while_the_model_runs(checkpoint: Path, images: list[Path]) -> None:
    scorer = Scorer(load_checkpoint(checkpoint))
    entered, release = threading.Event(), threading.Event()
    score = scorer.score

    def held(items: list) -> list:
        entered.set()
        release.wait(timeout=60)
        return score(items)

    scorer.score = held
    answers: dict[str, httpx.Response] = {}
    with TestClient(create_app(scorer)) as c:
        request = threading.Thread(target=lambda: answers.update(score=c.post("/v1/score", files=[upload(images[0])])))
        request.start()
        assert entered.wait(timeout=60)
        # The inference thread is busy with the request: the event loop still answers.
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
        release.set()
        request.join(timeout=60)
    assert answers["score"].status_code == 200


def test_run_refuses_a_missing_checkpoint_before_binding(tmp_path: Path) -> None:
    with pytest.raises(QrsError, match="does not exist"):
        run(tmp_path / "missing.pt", port=0)


def test_the_onnx_backend_keeps_the_http_contract(exported: Exported, images: list[Path], tmp_path: Path) -> None:
    torch_rows = {Path(r["file"]).name: r for r in score_files(images, exported.checkpoint, out=tmp_path, roi="auto",
                                                                progress=False).rows}
    with TestClient(create_app(exported.onnx, backend="onnx")) as c:
        info = c.get("/v1/model").json()
        assert info == {**Scorer.load(exported.checkpoint, device="cpu").info(), "backend": "onnx"}
        response = c.post("/v1/score", files=[upload(p) for p in images], data={"roi": "auto"})
        assert response.status_code == 200 and len(response.json()["results"]) == N_IMAGES
        for result in response.json()["results"]:
            assert_matches(result, torch_rows[result["file"]])
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(exported.onnx.read_bytes()[:4096])
    with TestClient(create_app(broken, backend="onnx")) as c:
        response = c.post("/v1/score", files=[upload(images[0])])
        assert response.status_code == 503 and "not a readable ONNX model" in response.json()["detail"]
    with pytest.raises(QrsError, match="not a readable ONNX model"):
        run(broken, port=0, backend="onnx")


def test_batcher_gathers_concurrent_jobs_up_to_max_batch() -> None:
    calls: list[list[int]] = []

    def double(items: list[int]) -> list[int]:
        calls.append(items)
        return [2 * i for i in items]

    async def scenario() -> list[list[int]]:
        batcher: Batcher[int, int] = Batcher(double, max_batch=4, max_wait_s=0.001)
        task = asyncio.create_task(batcher.run())
        try:
            # Ten one-item jobs and one three-item job, all queued before the batcher wakes up.
            results = await asyncio.gather(*(batcher.submit([i]) for i in range(10)), batcher.submit([10, 11, 12]))
        finally:
            task.cancel()
        assert batcher.sizes == {4: 3, 1: 1}
        return results

    results = asyncio.run(scenario())
    assert results == [[2 * i] for i in range(10)] + [[20, 22, 24]]
    # Jobs join whole and in order; a batch over max_batch is split for the model.
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12]]


@pytest.fixture(scope="module")
def live(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, object]]:
    """A real uvicorn server on a free loopback port, with an API key, recording into an SQLite file."""
    records = RecordSettings(f"sqlite:///{tmp_path_factory.mktemp('records') / 'line.sqlite'}", station="live",
                             keep_images="all")
    app = create_app(checkpoint, api_key=KEY, max_batch=8, records=records)
    with serve_in_background(app) as url:
        yield url, app


@pytest.mark.timeout(300)
def test_load_32_clients_400_requests(live: tuple[str, object], images: list[Path],
                                      in_process: dict[str, dict]) -> None:
    url, app = live
    bodies = [(p.name, p.read_bytes()) for p in images]
    n_requests, n_clients = 400, 32
    answers: list[tuple[int, int, dict]] = []

    async def client_loop(client: httpx.AsyncClient, counter: Iterator[int]) -> None:
        for i in counter:
            name, data = bodies[i % len(bodies)]
            response = await client.post("/v1/score", files=[("files", (name, data, "image/png"))])
            answers.append((i, response.status_code, response.json()))

    async def main() -> None:
        counter = iter(range(n_requests))
        limits = httpx.Limits(max_connections=n_clients)
        async with httpx.AsyncClient(base_url=url, headers=AUTH, limits=limits, timeout=120) as client:
            await asyncio.gather(*(client_loop(client, counter) for _ in range(n_clients)))

    asyncio.run(main())
    assert sorted(i for i, _, _ in answers) == list(range(n_requests))
    for i, status, body in answers:
        assert status == 200, body
        [result] = body["results"]
        assert result["file"] == images[i % len(images)].name
        assert_matches(result, in_process[result["file"]])
        assert body["record"] == {"kept": True, "detail": ""}
    sizes = app.state.service.batcher.sizes
    assert sum(size * count for size, count in sizes.items()) >= n_requests
    ids = {body["results"][0]["inspection_id"] for _, _, body in answers}
    store = app.state.service.recorder.store
    assert len(ids) == n_requests and all(store.get(i)["station"] == "live" for i in sorted(ids)[:: n_requests // 8])


@pytest.fixture(scope="module")
def api_schema(live: tuple[str, object]) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{live[0]}/openapi.json")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("method", "path", "mode"), [
    ("GET", "/healthz", GenerationMode.POSITIVE),
    ("GET", "/readyz", GenerationMode.POSITIVE),
    ("GET", "/v1/model", GenerationMode.POSITIVE),
    ("POST", "/v1/score", GenerationMode.POSITIVE),
    ("POST", "/v1/score", GenerationMode.NEGATIVE),
    *((method, path, mode) for method, path in (
        ("GET", "/v1/inspections"), ("GET", "/v1/inspections.csv"), ("GET", "/v1/inspections/{inspection_id}"),
        ("GET", "/v1/inspections/{inspection_id}/image"), ("GET", "/v1/inspections/{inspection_id}/overlay"),
        ("POST", "/v1/inspections/{inspection_id}/review"), ("GET", "/v1/drift"))
      for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)),
])
def test_fuzz_openapi_no_server_errors(api_schema: schemathesis.BaseSchema, method: str, path: str,
                                       mode: GenerationMode) -> None:
    """Schema-driven requests (valid ones, and invalid ones for negative mode): never a 5xx, and every
    answer documented (status code, content type and body schema)."""
    operation = api_schema[path][method]

    @settings(max_examples=25, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=operation.as_strategy(generation_mode=mode))
    def fuzz(case: schemathesis.Case) -> None:
        case.call_and_validate(headers=AUTH, timeout=60, checks=[
            not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance])

    fuzz()
