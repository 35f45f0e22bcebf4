"""The service's inspection records: every scored image recorded before its answer (station, part id,
kept images), the query, CSV, review and drift routes with their 4xx answers, a database that fails
without costing an answer, and kill -9 of a serving process losing no answered record."""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import os
import signal
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from qrs.drift import drift
from qrs.predict import Scorer
from qrs.records import Filters, Inspection, RecordSettings, RecordStore, fingerprint, utcnow
from qrs.serve import create_app
from scoring_setup import free_port, make_checkpoint, part_image, png, serve_process

KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("model") / "calibrated.pt")


@pytest.fixture(scope="module")
def failing(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint that fails every part (so flagged images are kept)."""
    return make_checkpoint(tmp_path_factory.mktemp("model") / "fails.pt", fail=True)


def part_files(n: int, start: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"part_{i}.png", png(part_image(i, i % 2 == 1)), "image/png")) for i in range(start, start + n)]


@pytest.fixture
def recorded(checkpoint: Path, tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    url = f"sqlite:///{tmp_path / 'line.sqlite'}"
    settings = RecordSettings(url, station="line-1", keep_images="all")
    with TestClient(create_app(checkpoint, api_key=KEY, records=settings, max_files=8), headers=AUTH) as client:
        yield client, url


def test_every_scored_image_is_recorded_before_its_answer(recorded: tuple[TestClient, str], checkpoint: Path) -> None:
    client, url = recorded
    files = part_files(3)
    response = client.post("/v1/score", files=files, data={"part_id": ["A-1", "A-2", "A-3"], "station": "press 4"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["record"] == {"kept": True, "detail": ""}
    store = RecordStore(url).open()
    model_sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    for (_, (name, data, _)), part_id, result in zip(files, ["A-1", "A-2", "A-3"], body["results"]):
        record = store.get(result["inspection_id"])
        assert (record["station"], record["part_id"], record["file"]) == ("press 4", part_id, name)
        assert record["image_sha256"] == hashlib.sha256(data).hexdigest() and record["model_sha256"] == model_sha
        assert (record["prediction"], record["verdict"], record["risk_level"]) == (
            result["prediction"], result["verdict"], result["risk_level"])
        assert record["qrs"] == result["qrs"] and record["p_defective"] == result["p_defective"]
        assert record["latency_ms"] > 0 and "overlay_png" not in result
        assert store.kept_file(record["id"], "image").read_bytes() == data
        overlay = client.get(f"/v1/inspections/{record['id']}/overlay")
        assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
        assert client.get(f"/v1/inspections/{record['id']}").json()["overlay_png"] == base64.b64encode(
            overlay.content).decode()
        image = client.get(f"/v1/inspections/{record['id']}/image")
        assert image.content == data and image.headers["content-type"] == "image/png"

    defaults = client.post("/v1/score", files=part_files(1, start=5)).json()["results"][0]
    record = store.get(defaults["inspection_id"])
    assert (record["station"], record["part_id"]) == ("line-1", "part_5.png")


def test_an_unreadable_upload_is_recorded_with_its_error(recorded: tuple[TestClient, str]) -> None:
    client, url = recorded
    response = client.post("/v1/score", files=[("files", ("cut.png", b"not an image", "image/png"))],
                           data={"part_id": "B-7"})
    assert response.status_code == 422 and response.json()["detail"].startswith("cut.png: not an image file")
    [record], _ = RecordStore(url).open().query()
    assert record["part_id"] == "B-7" and record["prediction"] is None
    assert record["error"] == response.json()["detail"]
    assert record["image_sha256"] == hashlib.sha256(b"not an image").hexdigest()


@pytest.mark.parametrize(("data", "message"), [
    ({"part_id": ["only one"]}, "give one part_id per file: 2 files, 1 part_id fields"),
    ({"station": "x" * 256}, "station must be 1 to 255 characters (no NUL), got 256"),
    ({"station": ["a", "b"]}, "give at most one station field"),
    ({"part_id": ["ok", " "]}, "part_id must be 1 to 255 characters"),
])
def test_bad_station_or_part_id_is_422(recorded: tuple[TestClient, str], data: dict, message: str) -> None:
    client, url = recorded
    response = client.post("/v1/score", files=part_files(2), data=data)
    assert response.status_code == 422 and response.json()["detail"].startswith(message)
    assert RecordStore(url).open().query()[0] == []


def test_queries_paging_and_csv(recorded: tuple[TestClient, str]) -> None:
    client, _ = recorded
    ids = []
    for station, start in (("s1", 0), ("s2", 3), ("s1", 6)):
        answer = client.post("/v1/score", files=part_files(3, start), data={"station": station}).json()
        ids += [r["inspection_id"] for r in answer["results"]]
    page = client.get("/v1/inspections", params={"limit": 4}).json()
    assert [r["id"] for r in page["inspections"]] == ids[::-1][:4] and page["next_cursor"] == ids[5]
    rest = client.get("/v1/inspections", params={"limit": 4, "cursor": page["next_cursor"]}).json()
    assert [r["id"] for r in rest["inspections"]] == ids[::-1][4:8]
    assert [r["id"] for r in client.get("/v1/inspections", params={"station": "s2"}).json()["inspections"]] == \
        ids[3:6][::-1]
    now = utcnow()
    assert client.get("/v1/inspections", params={"since": (now + timedelta(hours=1)).isoformat()}).json() == {
        "inspections": [], "next_cursor": None}
    assert len(client.get("/v1/inspections", params={"until": (now + timedelta(hours=1)).isoformat()}).json()[
        "inspections"]) == 9
    passed = client.get("/v1/inspections", params={"prediction": 0, "risk_level": "high"}).json()["inspections"]
    assert all(r["prediction"] == 0 and r["risk_level"] == "high" for r in passed)

    response = client.get("/v1/inspections.csv", params={"station": "s1"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert [int(r["id"]) for r in rows] == ids[6:][::-1] + ids[:3][::-1]
    assert rows[0]["station"] == "s1" and rows[0]["verdict"] in ("pass", "fail") and rows[0]["truth"] == ""


@pytest.mark.parametrize(("path", "status", "message"), [
    ("/v1/inspections?limit=0", 422, "invalid request: query.limit"),
    ("/v1/inspections?limit=5000", 422, "invalid request: query.limit"),
    ("/v1/inspections?prediction=2", 422, "invalid request: query.prediction"),
    ("/v1/inspections?risk_level=extreme", 422, "invalid request: query.risk_level"),
    ("/v1/inspections?since=yesterday", 422, "invalid request: query.since"),
    ("/v1/inspections?since=0001-01-01T00:00:00%2B05:00", 422, "since is out of range"),
    ("/v1/inspections?cursor=0", 422, "invalid request: query.cursor"),
    ("/v1/inspections?reviewed=perhaps", 422, "invalid request: query.reviewed"),
    ("/v1/inspections.csv?station=", 422, "invalid request: query.station"),
    ("/v1/inspections/0", 422, "invalid request: path.inspection_id"),
    ("/v1/inspections/abc", 422, "invalid request: path.inspection_id"),
    ("/v1/inspections/99", 404, "no inspection record 99"),
    ("/v1/inspections/99/overlay", 404, "no inspection record 99"),
    ("/v1/drift?per=day", 422, "invalid request: query.per"),
    ("/v1/drift?baseline=5", 422, "invalid request: query.baseline"),
])
def test_malformed_queries_are_4xx_with_the_reason(recorded: tuple[TestClient, str], path: str, status: int,
                                                   message: str) -> None:
    response = recorded[0].get(path)
    assert response.status_code == status and response.json()["detail"].startswith(message), response.text


def test_reviews_over_http(recorded: tuple[TestClient, str]) -> None:
    client, url = recorded
    [passed] = client.post("/v1/score", files=part_files(1)).json()["results"]
    client.post("/v1/score", files=[("files", ("cut.png", b"broken", "image/png"))])
    [broken], _ = RecordStore(url).open().query(limit=1)
    inspection_id = passed["inspection_id"]
    first = client.post(f"/v1/inspections/{inspection_id}/review", json={"truth": "defective", "note": "scratch"})
    assert first.status_code == 201
    want = "missed defect" if passed["prediction"] == 0 else "confirmed defect"
    assert first.json()["outcome"] == want and first.json()["reviewer"] == "anonymous (testclient)"
    second = client.post(f"/v1/inspections/{inspection_id}/review", json={"truth": "good", "reviewer": "Ann"}).json()
    detail = client.get(f"/v1/inspections/{inspection_id}").json()
    assert [r["id"] for r in detail["reviews"]] == [first.json()["id"], second["id"]]
    assert detail["review"]["reviewer"] == "Ann" and detail["prediction"] == passed["prediction"]
    assert [r["id"] for r in client.get("/v1/inspections", params={"reviewed": True}).json()["inspections"]] == [
        inspection_id]

    cases = [
        (f"/v1/inspections/{inspection_id}/review", {"truth": "maybe"}, 422,
         "invalid request: body.truth: Input should be 'defective' or 'good'"),
        (f"/v1/inspections/{inspection_id}/review", {"note": "no truth"}, 422, "invalid request: body.truth"),
        (f"/v1/inspections/{inspection_id}/review", {"truth": "good", "note": "x" * 2001}, 422,
         "invalid request: body.note"),
        (f"/v1/inspections/{inspection_id}/review", {"truth": "good", "note": "a\x00b"}, 422,
         "note and reviewer must not contain NUL characters"),
        ("/v1/inspections/12345/review", {"truth": "good"}, 404, "no inspection record 12345"),
        (f"/v1/inspections/{broken['id']}/review", {"truth": "good"}, 409,
         f"inspection {broken['id']} has no verdict to review: its image could not be scored"),
    ]
    for path, body, status, message in cases:
        response = client.post(path, json=body)
        assert response.status_code == status and response.json()["detail"].startswith(message), response.text
    not_json = client.post(f"/v1/inspections/{inspection_id}/review", content=b"{", headers={
        "content-type": "application/json"})
    assert not_json.status_code == 422


def test_flagged_images_are_kept_and_passed_ones_not(failing: Path, checkpoint: Path, tmp_path: Path) -> None:
    for model, flagged in ((failing, True), (checkpoint, False)):
        url = f"sqlite:///{tmp_path / f'{flagged}.sqlite'}"
        with TestClient(create_app(model, records=RecordSettings(url, station="s"))) as client:
            results = client.post("/v1/score", files=part_files(2)).json()["results"]
            assert {r["verdict"] for r in results} == {"fail" if flagged else "pass"}
            for r in results:
                record = client.get(f"/v1/inspections/{r['inspection_id']}").json()
                assert record["image_kept"] is record["overlay_kept"] is flagged
                assert (record["overlay_png"] is not None) is flagged
            if not flagged:
                missing = client.get(f"/v1/inspections/{results[0]['inspection_id']}/image")
                assert missing.status_code == 404 and "was not kept (see --keep-images" in missing.json()["detail"]


def test_drift_route_charts_the_served_models_records(checkpoint: Path, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'line.sqlite'}"
    scorer = Scorer.load(checkpoint, device="cpu")
    store = RecordStore(url).open()
    model_id = store.model_id(fingerprint(scorer))
    rng = np.random.default_rng(1)
    start = (utcnow() - timedelta(hours=30)).replace(minute=0, second=0, microsecond=0)
    n = 3000
    prediction = (rng.random(n) < np.where(np.arange(n) >= 2400, 0.15, 0.04)).astype(int)
    qrs = np.where(rng.random(n) < 0.01, 0.05, 0.0)
    store.add(model_id, [Inspection(file=f"{i}.png", row={"prediction": int(p), "p_defective": 0.5, "qrs": float(q),
                                                           "risk_level": "low"}, image=None, station="s1",
                                    part_id=str(i), time=start + timedelta(seconds=30 * i))
                         for i, (p, q) in enumerate(zip(prediction, qrs))])
    with TestClient(create_app(scorer, records=RecordSettings(url, station="s1"))) as client:
        report = client.get("/v1/drift", params={"per": "100"}).json()
        arrays = store.arrays(Filters(model_id=model_id))
        want = drift(arrays["time"], arrays["prediction"], arrays["qrs"], baseline_prediction=prediction[:500],
                     expected_qrs_share=0.01, per=100)
        assert [p["alarm"] for p in report["flagged"]] == [p["alarm"] for p in want["flagged"]]
        assert report["alarms"] == want["alarms"] and report["model_sha256"] == fingerprint(scorer).sha256
        first = next(i for i, p in enumerate(report["flagged"]) if p["alarm"])
        assert 24 <= first <= 26 and report["alarm"] is True
        assert report["baseline"] == {"size": 500, "records": 500, "complete": True,
                                      "share_flagged": float(prediction[:500].mean())}
        hourly = client.get("/v1/drift", params={"since": (start + timedelta(hours=20)).isoformat()}).json()
        assert len(hourly["flagged"]) == 5 and sum(p["parts"] for p in hourly["flagged"]) == n - 2400
        other = client.get("/v1/drift", params={"station": "s9"}).json()
        assert other["flagged"] == [] and other["baseline"]["records"] == 0


def test_records_off_and_a_database_that_fails(checkpoint: Path) -> None:
    with TestClient(create_app(checkpoint)) as client:
        assert "record" not in client.post("/v1/score", files=part_files(1)).json()
        off = client.get("/v1/inspections")
        assert off.status_code == 404 and off.json()["detail"] == "records are off (qrs serve --db none): nothing " \
                                                                  "is recorded"
    url = f"postgresql+psycopg://qc@127.0.0.1:{free_port()}/line"
    with TestClient(create_app(checkpoint, records=RecordSettings(url, station="s"))) as client:
        response = client.post("/v1/score", files=part_files(2))
        assert response.status_code == 200
        body = response.json()
        assert len(body["results"]) == 2 and all("inspection_id" not in r for r in body["results"])
        assert body["record"]["kept"] is False
        assert body["record"]["detail"].startswith("records not kept: cannot open the records database")
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        assert ready.json()["records"]["kept"] is False and "cannot open" in ready.json()["records"]["detail"]
        unavailable = client.get("/v1/inspections")
        assert unavailable.status_code == 503 and "records not kept" in unavailable.json()["detail"]


@pytest.mark.timeout(600)
def test_kill_9_loses_no_answered_record(checkpoint: Path, tmp_path: Path) -> None:
    """Clients score parts until 60 answers have come back; then the server is killed with SIGKILL while
    requests are still in flight. Every answered record is in the database, as answered."""
    url = f"sqlite:///{tmp_path / 'line.sqlite'}"
    answered: list[dict] = []
    lock = threading.Lock()
    enough = threading.Event()
    with serve_process(["--model", str(checkpoint), "--db", url, "--keep-images", "none", "--max-wait-ms", "20"],
                       tmp_path / "serve.log") as (process, base):
        def client(k: int) -> None:
            with httpx.Client(base_url=base, timeout=60) as http:
                for i in range(1000):
                    try:
                        response = http.post("/v1/score", files=part_files(1, start=k * 1000 + i))
                    except httpx.HTTPError:
                        return
                    with lock:
                        answered.append(response.json()["results"][0])
                        if len(answered) >= 60:
                            enough.set()

        threads = [threading.Thread(target=client, args=(k,)) for k in range(6)]
        for thread in threads:
            thread.start()
        assert enough.wait(timeout=300)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
        for thread in threads:
            thread.join(timeout=120)
    assert process.returncode == -signal.SIGKILL
    store = RecordStore(url).open()
    for result in answered:
        record = store.get(result["inspection_id"])
        assert (record["file"], record["qrs"], record["prediction"]) == (result["file"], result["qrs"],
                                                                         result["prediction"])
    assert len(store.query(limit=1000)[0]) >= len(answered) >= 60
