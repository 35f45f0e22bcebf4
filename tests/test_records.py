"""The records store on a real SQLite file and a real PostgreSQL server: the migrations (from an empty
database and from the first revision), every query and filter, reviews and their outcomes, kept images
and their retention; the Recorder when the database fails; ``qrs score --db``."""

from __future__ import annotations

import hashlib
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from typer.testing import CliRunner

from qrs import records
from qrs.cli import app
from qrs.predict import Scorer, score_files
from qrs.records import (
    FileRecording, Filters, Fingerprint, Inspection, NotFound, NoVerdict, Recorder, RecordSettings, RecordsError,
    RecordStore, RecordsUnavailable, fingerprint, metadata, migration_config,
)
from scoring_setup import make_checkpoint, part_image, png

FP = Fingerprint("a" * 64, "stretch", "torch", "resnet18", 32, 32, 1.5, "good", 0.99, 0.9)
T0 = datetime(2025, 3, 1, 8, 0, tzinfo=timezone.utc)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def draft(i: int, prediction: int | None, *, qrs: float = 0.0, risk: str | None = "low", station: str = "s1",
          hours: float = 0, image: bytes | None = None) -> Inspection:
    row = ({"file": f"p{i}.png", "error": "not an image file"} if prediction is None else
           {"file": f"p{i}.png", "prediction": prediction, "p_defective": 0.1 + 0.8 * prediction, "qrs": qrs,
            "risk_level": risk})
    return Inspection(file=f"p{i}.png", row=row, image=png(part_image(i)) if image is None else image,
                      overlay_png=png(part_image(100 + i)) if prediction else None, latency_ms=10.0 + i,
                      station=station, part_id=f"part-{i}", time=T0 + timedelta(hours=hours))


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> RecordStore:
    return RecordStore(db_url, images_dir=tmp_path / "kept").open()


def test_migrations_build_exactly_the_schema(db_url: str, tmp_path: Path) -> None:
    store = RecordStore(db_url, images_dir=tmp_path).open()
    store.open()  # a second time: nothing to do
    with store.engine.connect() as conn:
        context = MigrationContext.configure(conn)
        assert context.get_current_heads() == ("0001",)
        assert compare_metadata(context, metadata) == []
    store.close()


def test_a_database_of_the_first_revision_opens_with_its_records(db_url: str, tmp_path: Path) -> None:
    """Rows written by the first schema revision (its own columns, not today's metadata) are read after the
    upgrade to the newest revision."""
    engine = sa.create_engine(db_url)
    config = migration_config()
    models = sa.table("models", *(sa.column(c) for c in ("sha256", "resize", "backend", "arch", "img_height",
                                                         "img_width", "scale", "anchor", "quantile", "threshold")),
                      sa.column("first_seen", sa.DateTime(timezone=True)))
    rows = sa.table("inspections", *(sa.column(c) for c in ("station", "part_id", "file", "image_sha256", "model_id",
                                                            "prediction", "p_defective", "qrs", "risk_level",
                                                            "error", "latency_ms", "image_key", "overlay_key")),
                    sa.column("time", sa.DateTime(timezone=True)))
    with engine.begin() as conn:
        config.attributes["connection"] = conn
        command.upgrade(config, "0001")
        conn.execute(models.insert().values(sha256="b" * 64, resize="pad", backend="onnx", arch="resnet50",
                                            img_height=224, img_width=224, scale=2.5, anchor="good", quantile=0.99,
                                            threshold=0.9, first_seen=T0))
        conn.execute(rows.insert().values(time=T0, station="line 1", part_id="A-1", file="a.png", image_sha256="c" * 64,
                                          model_id=1, prediction=1, p_defective=0.75, qrs=0.125, risk_level="high",
                                          error=None, latency_ms=12.5, image_key=None, overlay_key=None))
    engine.dispose()
    store = RecordStore(db_url, images_dir=tmp_path).open()
    [record], cursor = store.query()
    assert cursor is None
    assert record == {"id": 1, "time": T0, "station": "line 1", "part_id": "A-1", "file": "a.png",
                      "image_sha256": "c" * 64, "model_sha256": "b" * 64, "arch": "resnet50", "prediction": 1,
                      "verdict": "fail", "p_defective": 0.75, "qrs": 0.125, "risk_level": "high", "error": None,
                      "latency_ms": 12.5, "image_kept": False, "overlay_kept": False, "review": None}
    assert store.model(1) == Fingerprint("b" * 64, "pad", "onnx", "resnet50", 224, 224, 2.5, "good", 0.99, 0.9)
    assert store.review(1, "good", "", "qa")["outcome"] == "false alarm"
    store.close()


def test_a_database_of_a_newer_qrs_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'r.sqlite'}"
    store = RecordStore(url).open()
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(RecordsError, match="has schema revision 0099, made by a newer qrs: upgrade qrs"):
        store.open()


def test_bad_urls_are_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(RecordsError, match="'not a url' is not a database URL"):
        RecordStore("not a url")
    with pytest.raises(RecordsError, match=r"cannot open the records database postgresql\+psycopg://qc:\*\*\*@127"):
        RecordStore(f"postgresql+psycopg://qc:secret@127.0.0.1:{closed_port()}/line").open()


def test_records_queries_filters_and_paging(store: RecordStore) -> None:
    model = store.model_id(FP)
    assert store.model_id(FP) == model and store.model_id(Fingerprint(**{**FP.__dict__, "resize": "pad"})) != model
    drafts = [draft(0, 0, hours=0), draft(1, 1, qrs=0.3, risk="high", hours=1), draft(2, 0, qrs=0.01, hours=2,
              station="s2"), draft(3, None, risk=None, hours=3), draft(4, 1, qrs=0.2, risk="medium", hours=26,
              station="s2")]
    ids = store.add(model, drafts, keep_images="flagged")
    assert ids == sorted(ids) and len(set(ids)) == 5

    everything, cursor = store.query()
    assert [r["id"] for r in everything] == ids[::-1] and cursor is None
    first = store.get(ids[1])
    assert first == {"id": ids[1], "time": T0 + timedelta(hours=1), "station": "s1", "part_id": "part-1",
                     "file": "p1.png", "image_sha256": hashlib.sha256(drafts[1].image).hexdigest(),
                     "model_sha256": FP.sha256, "arch": "resnet18", "prediction": 1, "verdict": "fail",
                     "p_defective": pytest.approx(0.9), "qrs": pytest.approx(0.3), "risk_level": "high",
                     "error": None, "latency_ms": 11.0, "image_kept": True, "overlay_kept": True, "review": None,
                     "reviews": []}
    unscorable = store.get(ids[3])
    assert unscorable["error"] == "not an image file" and unscorable["prediction"] is None
    assert unscorable["verdict"] is None and not unscorable["image_kept"]

    def found(**filters: object) -> list[int]:
        return [r["id"] for r in store.query(Filters(**filters))[0]]

    assert found(station="s2") == [ids[4], ids[2]]
    assert found(prediction=1) == [ids[4], ids[1]]
    assert found(prediction=0) == [ids[2], ids[0]]
    assert found(risk_level="medium") == [ids[4]]
    assert found(since=T0 + timedelta(hours=1), until=T0 + timedelta(hours=3)) == [ids[2], ids[1]]
    assert found(since=datetime(2025, 3, 1, 9, 0)) == ids[1:][::-1]  # naive is UTC
    assert found(model_id=model + 1) == []

    pages, before = [], None
    while True:
        page, before = store.query(limit=2, before=before)
        pages.append([r["id"] for r in page])
        if before is None:
            break
    assert pages == [[ids[4], ids[3]], [ids[2], ids[1]], [ids[0]]]
    assert [r["id"] for r in store.iter_all(page=2)] == ids[::-1]

    arrays = store.arrays(Filters())
    assert arrays["prediction"].tolist() == [0, 1, 0, 1] and arrays["qrs"].tolist() == [0.0, 0.3, 0.01, 0.2]
    assert arrays["time"][-1] == (T0 + timedelta(hours=26)).replace(tzinfo=None)
    assert store.arrays(Filters(), first=2)["prediction"].tolist() == [0, 1]


def test_reviews_are_rows_of_their_own_with_the_outcome_of_the_prediction(store: RecordStore) -> None:
    model = store.model_id(FP)
    passed, failed, broken = store.add(model, [draft(0, 0), draft(1, 1, qrs=0.3, risk="high"), draft(2, None)])
    outcomes = {(passed, "good"): "correct pass", (passed, "defective"): "missed defect",
                (failed, "good"): "false alarm", (failed, "defective"): "confirmed defect"}
    for (inspection_id, truth), outcome in outcomes.items():
        review = store.review(inspection_id, truth, f"{truth} note", "ann")
        assert review["outcome"] == outcome and review["inspection_id"] == inspection_id
    record = store.get(failed)
    assert [r["truth"] for r in record["reviews"]] == ["good", "defective"]
    assert record["review"]["outcome"] == "confirmed defect" and record["prediction"] == 1  # never edited
    assert [r["id"] for r in store.query(Filters(reviewed=True))[0]] == [failed, passed]
    assert [r["id"] for r in store.query(Filters(reviewed=False))[0]] == [broken]
    with pytest.raises(NotFound, match="no inspection record 999"):
        store.review(999, "good", "", "ann")
    with pytest.raises(NoVerdict, match=f"inspection {broken} has no verdict to review: its image could not be "
                                        r"scored \(not an image file\)"):
        store.review(broken, "good", "", "ann")
    with pytest.raises(RecordsError, match="truth must be one of defective, good"):
        store.review(passed, "bad", "", "ann")
    assert [(r["id"], r["truth"]) for r in store.reviewed()] == [(passed, "defective"), (failed, "defective")]


def test_kept_images_are_content_addressed_and_pruned(store: RecordStore) -> None:
    model = store.model_id(FP)
    same = png(part_image(42))
    old_a, old_b, old_reviewed, recent = store.add(model, [
        draft(0, 1, hours=0, image=same), draft(1, 1, hours=1), draft(2, 1, hours=2), draft(3, 1, hours=24 * 40,
                                                                                          image=same)], "flagged")
    store.add(model, [draft(5, 0, hours=0)], "flagged")  # a pass: nothing kept under "flagged"
    image = store.kept_file(old_a, "image")
    assert image is not None and image.read_bytes() == same
    assert image == store.images_dir / hashlib.sha256(same).hexdigest()[:2] / f"{hashlib.sha256(same).hexdigest()}.png"
    assert store.kept_file(recent, "image") == image  # one file for both records
    assert len([p for p in store.images_dir.rglob("*") if p.is_file()]) == 3 + 4  # 3 distinct images, 4 overlays
    store.review(old_reviewed, "defective", "", "ann")

    deleted = store.prune(keep_days=30, now=T0 + timedelta(days=41))
    # old_b's image and overlay go; old_a's image stays (recent uses it) but its overlay goes; old_reviewed stays.
    assert deleted == 3
    kept = {i: (store.get(i)["image_kept"], store.get(i)["overlay_kept"]) for i in (old_a, old_b, old_reviewed,
                                                                                     recent)}
    assert kept == {old_a: (True, False), old_b: (False, False), old_reviewed: (True, True), recent: (True, True)}
    assert store.kept_file(old_b, "image") is None and store.kept_file(recent, "image").read_bytes() == same
    assert store.prune(keep_days=30, now=T0 + timedelta(days=41)) == 0


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    store = RecordStore(f"sqlite:///{tmp_path / 'nested' / 'r.sqlite'}").open()
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    assert store.images_dir == tmp_path / "nested" / "r-images"


def test_fingerprint(tmp_path: Path) -> None:
    checkpoint = make_checkpoint(tmp_path / "m.pt")
    fp = fingerprint(Scorer.load(checkpoint, device="cpu"))
    assert fp.sha256 == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert (fp.arch, fp.img_height, fp.img_width, fp.anchor, fp.quantile, fp.resize) == ("resnet18", 32, 32, "good",
                                                                                        0.99, "stretch")
    assert fp.expected_qrs_share == 0.01
    uncalibrated = fingerprint(Scorer.load(make_checkpoint(tmp_path / "u.pt", calibrated=False), device="cpu"))
    assert uncalibrated.scale is None and uncalibrated.expected_qrs_share is None


def test_the_recorder_reports_a_full_database_and_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recorder = Recorder(RecordSettings(f"sqlite:///{tmp_path / 'r.sqlite'}", keep_images="none", station="s"))
    recorder.use(Scorer.load(make_checkpoint(tmp_path / "m.pt"), device="cpu"))
    assert recorder.record([draft(0, 0)]) == [1]
    assert recorder.status() == {"kept": True, "detail": f"kept in sqlite:///{tmp_path / 'r.sqlite'}"}

    engine = recorder.store.engine
    with engine.connect() as conn:
        pages = conn.exec_driver_sql("PRAGMA page_count").scalar()

    def full(dbapi_connection: object, _: object) -> None:
        dbapi_connection.execute(f"PRAGMA max_page_count = {pages}")

    sa.event.listen(engine, "connect", full)
    engine.dispose()
    monkeypatch.setattr(records, "RETRY_S", 3600.0)
    big = [draft(i, 0) for i in range(300)]
    for item in big:
        item.file = item.file * 200
    with pytest.raises(RecordsUnavailable, match="records not kept: .*database or disk is full"):
        recorder.record(big)
    status = recorder.status()
    assert status["kept"] is False and "database or disk is full" in status["detail"]
    with pytest.raises(RecordsUnavailable, match=r"database or disk is full \(retrying every 3600 s\)"):
        recorder.record([draft(1, 0)])
    assert recorder.lost == 301

    sa.event.remove(engine, "connect", full)
    engine.dispose()
    monkeypatch.setattr(records, "RETRY_S", 0.0)
    assert recorder.record([draft(2, 0)]) == [2]
    assert recorder.status()["kept"] is True and recorder.kept == 2


def test_an_unreachable_database_costs_no_scoring(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "a.png").write_bytes(png(part_image(0)))
    url = f"postgresql+psycopg://qc@127.0.0.1:{closed_port()}/line"
    recording = FileRecording(RecordSettings(url, station="s"))
    result = score_files([parts], make_checkpoint(tmp_path / "m.pt"), out=tmp_path / "out", progress=False,
                         recording=recording)
    assert result.n_errors == 0 and (tmp_path / "out" / "scores.jsonl").is_file()
    assert recording.lost == 1
    assert recording.summary().startswith(f"1 of 1 inspection records not kept in {records.shown_url(url)}: "
                                          "records not kept: cannot open the records database")


def test_qrs_score_records_every_file(tmp_path: Path) -> None:
    parts = tmp_path / "parts"
    parts.mkdir()
    for seed in range(3):
        (parts / f"part_{seed}.png").write_bytes(png(part_image(seed, seed == 1)))
    (parts / "notes.png").write_bytes(b"text, not an image")
    checkpoint = make_checkpoint(tmp_path / "m.pt")
    url = f"sqlite:///{tmp_path / 'line.sqlite'}"
    result = CliRunner().invoke(app, ["score", "--model", str(checkpoint), str(parts), "--out", str(tmp_path / "out"),
                                      "--db", url, "--station", "press 4", "--keep-images", "all", "--batch-size",
                                      "2"])
    assert result.exit_code == 1, result.output  # notes.png is unreadable
    assert f"recorded 4 inspections in {url}" in result.output
    rows = {Path(r["file"]).name: r for r in score_files([parts], checkpoint, out=tmp_path / "again",
                                                           progress=False).rows}
    store = RecordStore(url).open()
    recorded, _ = store.query()
    assert sorted(r["part_id"] for r in recorded) == sorted(rows)
    for record in recorded:
        want = rows[record["part_id"]]
        assert record["station"] == "press 4" and record["file"] == want["file"]
        data = (parts / record["part_id"]).read_bytes()
        assert record["image_sha256"] == hashlib.sha256(data).hexdigest()
        assert record["model_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        assert record["latency_ms"] > 0
        if "error" in want:
            assert record["error"] == want["error"] and record["prediction"] is None
            continue
        assert (record["prediction"], record["risk_level"]) == (want["prediction"], want["risk_level"])
        assert record["qrs"] == pytest.approx(want["qrs"]) and record["p_defective"] == pytest.approx(want["p_defective"])
        assert store.kept_file(record["id"], "image").read_bytes() == data
        assert record["overlay_kept"]
    assert (tmp_path / "line-images").is_dir() and not (tmp_path / "out" / "overlays").exists()

    lost = CliRunner().invoke(app, ["score", "--model", str(checkpoint), str(parts / "part_0.png"), "--out",
                                    str(tmp_path / "out2"), "--db",
                                    f"postgresql+psycopg://qc@127.0.0.1:{closed_port()}/line"])
    assert lost.exit_code == 1 and "1 of 1 inspection records not kept" in lost.output
    assert (tmp_path / "out2" / "scores.jsonl").is_file()
