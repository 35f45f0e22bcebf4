"""Inspection records: every part that ``qrs serve`` or ``qrs score --db`` scores, kept in a database.

One row per scored image (time in UTC, station, part id, file name, the image's SHA-256, the model
that scored it, prediction, p_defective, QRS, risk level, the error of an image that could not be
scored, latency), the models by fingerprint, and the inspectors' reviews as rows of their own (a
review never edits a record). Any SQLAlchemy URL works; SQLite (WAL, the default of ``qrs serve``)
and PostgreSQL (psycopg 3) are tested. The schema is versioned by the Alembic migrations in
:mod:`qrs.migrations`, which :meth:`RecordStore.open` runs, so a database made by one version opens
in the next. Images and overlays kept for review (``--keep-images``) lie next to the database, named
by their SHA-256, and are removed after ``--keep-days`` unless a review refers to them.

:class:`RecordStore` is the database; :class:`Recorder` is what the scoring paths use: it never lets
a database problem cost an answer (it raises :class:`RecordsUnavailable`, which the caller reports,
and retries the database a few seconds later).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import (
    BigInteger, Column, DateTime, Engine, Float, ForeignKey, Index, Integer, MetaData, SmallInteger, String, Table,
    Text, UniqueConstraint, and_, create_engine, event, exists, func, insert, select, update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.types import TypeDecorator

from qrs.atomic import write_bytes
from qrs.choices import KEEP_IMAGES, TRUTHS
from qrs.errors import QrsError

if TYPE_CHECKING:
    import alembic.config
    import pandas as pd

    from qrs.predict import Scorer

log = logging.getLogger("qrs.records")

DEFAULT_KEEP_DAYS = 30
RETRY_S = 10.0
"""After a failed write, the database is tried again at most this often (the answers do not wait on it)."""
PRUNE_EVERY_S = 3600.0
MAX_TEXT = 255
"""Longest station, part id and reviewer name."""
MAX_FILE = 1024
"""Longest file name kept (longer ones are cut)."""
OUTCOMES = {(1, "defective"): "confirmed defect", (1, "good"): "false alarm", (0, "defective"): "missed defect",
            (0, "good"): "correct pass"}
"""A review's outcome from the record's prediction (1 = fail) and the truth the inspector gives."""
_SUFFIXES = ((b"\x89PNG", ".png"), (b"\xff\xd8", ".jpg"), (b"BM", ".bmp"), (b"II*\x00", ".tif"), (b"MM\x00*", ".tif"))
"""A kept image's suffix from its first bytes; other formats (or bytes that are no image) are kept as .bin."""


class RecordsError(QrsError):
    """A records database that cannot be opened or used; the message says which and why."""


class RecordsUnavailable(RecordsError):
    """Records could not be kept just now (the scoring answered anyway)."""


class NotFound(RecordsError):
    """No inspection record with that id."""


class NoVerdict(RecordsError):
    """A review of a record without a verdict (its image could not be scored)."""


class UtcDateTime(TypeDecorator[datetime]):
    """An aware datetime stored as UTC: timestamptz on PostgreSQL, naive UTC text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        value = value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


Id = BigInteger().with_variant(Integer, "sqlite")
"""64-bit ids; INTEGER on SQLite, where only that spelling makes an autoincrementing row id."""

metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s", "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s", "pk": "pk_%(table_name)s"})
"""The schema as this version uses it; :mod:`qrs.migrations` creates exactly this (tested)."""

models = Table(
    "models", metadata,
    Column("id", Id, primary_key=True),
    Column("sha256", String(64), nullable=False, doc="SHA-256 of the checkpoint or ONNX file"),
    Column("resize", String(16), nullable=False),
    Column("backend", String(16), nullable=False),
    Column("arch", String(64), nullable=False),
    Column("img_height", Integer, nullable=False),
    Column("img_width", Integer, nullable=False),
    Column("scale", Float, nullable=True, doc="calibration scale; null when not calibrated"),
    Column("anchor", String(16), nullable=True),
    Column("quantile", Float, nullable=True),
    Column("threshold", Float, nullable=False),
    Column("first_seen", UtcDateTime, nullable=False),
    UniqueConstraint("sha256", "resize", "backend"),
)

inspections = Table(
    "inspections", metadata,
    Column("id", Id, primary_key=True),
    Column("time", UtcDateTime, nullable=False, index=True),
    Column("station", String(MAX_TEXT), nullable=False, index=True),
    Column("part_id", String(MAX_TEXT), nullable=False),
    Column("file", String(MAX_FILE), nullable=False),
    Column("image_sha256", String(64), nullable=True, index=True, doc="null when the file could not be read"),
    Column("model_id", Id, ForeignKey("models.id"), nullable=False),
    Column("prediction", SmallInteger, nullable=True, doc="1 = defective (fail); null for an unscorable image"),
    Column("p_defective", Float, nullable=True),
    Column("qrs", Float, nullable=True),
    Column("risk_level", String(8), nullable=True),
    Column("error", Text, nullable=True),
    Column("latency_ms", Float, nullable=False),
    Column("image_key", String(80), nullable=True, index=True, doc="kept image, relative to the images directory"),
    Column("overlay_key", String(80), nullable=True, index=True),
    Index(None, "model_id", "id"),
)

reviews = Table(
    "reviews", metadata,
    Column("id", Id, primary_key=True),
    Column("inspection_id", Id, ForeignKey("inspections.id"), nullable=False, index=True),
    Column("time", UtcDateTime, nullable=False),
    Column("reviewer", String(MAX_TEXT), nullable=False),
    Column("truth", String(16), nullable=False),
    Column("outcome", String(20), nullable=False),
    Column("note", Text, nullable=False),
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def file_sha256(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Fingerprint:
    """What identifies the model behind a record: its file's SHA-256 and how it scores."""

    sha256: str
    resize: str
    backend: str
    arch: str
    img_height: int
    img_width: int
    scale: float | None
    anchor: str | None
    quantile: float | None
    threshold: float

    @property
    def expected_qrs_share(self) -> float | None:
        """Share of good parts with QRS > 0 that the calibration implies (1 - its quantile), when it is
        anchored on good parts; None otherwise (no such expectation)."""
        return round(1.0 - self.quantile, 12) if self.anchor == "good" and self.quantile is not None else None


def fingerprint(scorer: "Scorer") -> Fingerprint:
    """The scorer's fingerprint: the SHA-256 of the file it was loaded from (of its weights when it was
    built from a model in memory), arch, input size, calibration scale, anchor and quantile."""
    from qrs.extract import calibration_source

    if scorer.source is not None:
        sha = file_sha256(scorer.source)
    else:
        digest = hashlib.sha256()
        for name, tensor in scorer.backend.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
        sha = digest.hexdigest()
    calibration = scorer.meta.get("calibration") or {}
    source = calibration_source(calibration) if calibration else {}
    height, width = scorer.size
    return Fingerprint(sha, scorer.resize, scorer.backend.name, str(scorer.meta["arch"]), height, width, scorer.scale,
                       source.get("anchor"), source.get("quantile"), float(scorer.options.threshold))


@dataclass
class Inspection:
    """One scored (or unscorable) image, as the scoring path hands it to the records."""

    file: str
    row: dict[str, Any]
    image: bytes | None
    overlay_png: bytes | None = None
    latency_ms: float = 0.0
    station: str = ""
    part_id: str = ""
    time: datetime = field(default_factory=utcnow)

    @property
    def flagged(self) -> bool:
        return self.row.get("prediction") == 1


@dataclass(frozen=True)
class Filters:
    """Which records a query returns (every field optional)."""

    since: datetime | None = None
    until: datetime | None = None
    station: str | None = None
    prediction: int | None = None
    risk_level: str | None = None
    reviewed: bool | None = None
    model_id: int | None = None

    def where(self) -> list[Any]:
        c = inspections.c
        has_review = exists().where(reviews.c.inspection_id == c.id)
        conditions = [
            (self.since is not None, lambda: c.time >= self.since),
            (self.until is not None, lambda: c.time < self.until),
            (self.station is not None, lambda: c.station == self.station),
            (self.prediction is not None, lambda: c.prediction == self.prediction),
            (self.risk_level is not None, lambda: c.risk_level == self.risk_level),
            (self.reviewed is True, lambda: has_review),
            (self.reviewed is False, lambda: ~has_review),
            (self.model_id is not None, lambda: c.model_id == self.model_id),
        ]
        return [make() for given, make in conditions if given]


def sqlite_path(url: str) -> Path | None:
    """The file of an SQLite URL (None for in-memory or other databases)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def default_images_dir(url: str) -> Path:
    """Beside an SQLite file: ``<stem>-images/``; for a database server: ``qrs-images/`` in the working directory."""
    path = sqlite_path(url)
    return path.with_name(f"{path.stem}-images") if path is not None else Path("qrs-images")


def shown_url(url: str) -> str:
    """The URL without its password, an SQLite file as an absolute path."""
    path = sqlite_path(url)
    if path is not None:
        return f"sqlite:///{path.resolve()}"
    return make_url(url).render_as_string(hide_password=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """WAL: readers never block the writer and a commit is one append; synchronous FULL: a commit is on
    disk before the answer leaves; foreign keys on."""
    cursor = dbapi_connection.cursor()
    for pragma in ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON"):
        cursor.execute(f"PRAGMA {pragma}")
    cursor.close()


def _engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise RecordsError(f"--db {url!r} is not a database URL (e.g. sqlite:///records.sqlite or "
                           f"postgresql+psycopg://user@host/db, or none): {exc}") from exc
    backend = parsed.get_backend_name()
    try:
        if backend == "sqlite":
            path = sqlite_path(url)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, connect_args={"timeout": 5})
            event.listen(engine, "connect", _sqlite_pragmas)
            return engine
        connect_args = {"connect_timeout": 5} if backend == "postgresql" else {}
        return create_engine(parsed, pool_pre_ping=True, connect_args=connect_args)
    except (ArgumentError, ImportError, SQLAlchemyError) as exc:
        raise RecordsError(f"cannot use the records database {shown_url(url)}: {exc}") from exc


def migration_config() -> "alembic.config.Config":
    """Alembic's configuration for the migrations shipped in :mod:`qrs.migrations` (no alembic.ini)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(resources.files("qrs") / "migrations"))
    return config


def _reason(exc: BaseException) -> str:
    """A database error in one line, without SQLAlchemy's background links."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class RecordStore:
    """The records database and the kept images.

    ``open`` brings the schema to this version (Alembic); every method raises :class:`RecordsError`
    with the reason when the database fails.
    """

    def __init__(self, url: str, *, images_dir: str | os.PathLike[str] | None = None) -> None:
        self.url = url
        self.engine = _engine(url)
        self.shown_url = shown_url(url)
        self.images_dir = Path(images_dir) if images_dir is not None else default_images_dir(url)

    # -- schema ------------------------------------------------------------------------------------

    def open(self) -> RecordStore:
        """Create or upgrade the schema; refuse a database made by a newer qrs."""
        from alembic import command
        from alembic.runtime.migration import MigrationContext
        from alembic.script import ScriptDirectory

        config = migration_config()
        known = {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}
        try:
            with self.engine.begin() as conn:
                current = set(MigrationContext.configure(conn).get_current_heads())
                if current - known:
                    raise RecordsError(f"the records database {self.shown_url} has schema revision "
                                       f"{', '.join(sorted(current - known))}, made by a newer qrs: upgrade qrs "
                                       "to open it")
                config.attributes["connection"] = conn
                command.upgrade(config, "head")
        except SQLAlchemyError as exc:
            raise RecordsError(f"cannot open the records database {self.shown_url}: {_reason(exc)}") from exc
        return self

    def close(self) -> None:
        self.engine.dispose()

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            raise RecordsError(f"records database {self.shown_url}: {doing} failed: {_reason(exc)}") from exc

    # -- writing -----------------------------------------------------------------------------------

    def model_id(self, fp: Fingerprint) -> int:
        """The id of the model with this fingerprint, registered on first use."""
        key = and_(models.c.sha256 == fp.sha256, models.c.resize == fp.resize, models.c.backend == fp.backend)
        with self._errors("registering the model"), self.engine.begin() as conn:
            found = conn.execute(select(models.c.id).where(key)).scalar_one_or_none()
            if found is None:
                values = {k: getattr(fp, k) for k in ("sha256", "resize", "backend", "arch", "img_height",
                                                      "img_width", "scale", "anchor", "quantile", "threshold")}
                found = conn.execute(insert(models).values(**values, first_seen=utcnow()).returning(models.c.id)
                                     ).scalar_one()
            return int(found)

    def keep_file(self, data: bytes) -> str:
        """Store ``data`` under its SHA-256 (once) and return its key, relative to the images directory."""
        digest = hashlib.sha256(data).hexdigest()
        suffix = next((s for magic, s in _SUFFIXES if data.startswith(magic)), ".bin")
        key = f"{digest[:2]}/{digest}{suffix}"
        target = self.images_dir / key
        if not target.exists():
            write_bytes(target, data)
        return key

    def add(self, model_id: int, items: Sequence[Inspection], keep_images: str = "none") -> list[int]:
        """Insert the records of ``items`` in one transaction (kept images written first); their ids."""
        if not items:
            return []
        rows = []
        for item in items:
            keep = item.image is not None and (keep_images == "all" or (keep_images == "flagged" and item.flagged))
            try:
                image_key = self.keep_file(item.image) if keep else None
                overlay_key = self.keep_file(item.overlay_png) if keep and item.overlay_png else None
            except OSError as exc:
                raise RecordsError(f"cannot keep the image of {item.file} in {self.images_dir}: {exc}") from exc
            row = item.row
            rows.append({
                "time": item.time, "station": item.station, "part_id": item.part_id,
                "file": item.file.replace("\x00", "\ufffd")[:MAX_FILE],
                "image_sha256": hashlib.sha256(item.image).hexdigest() if item.image is not None else None,
                "model_id": model_id, "prediction": row.get("prediction"), "p_defective": row.get("p_defective"),
                "qrs": row.get("qrs"), "risk_level": row.get("risk_level"), "error": row.get("error"),
                "latency_ms": item.latency_ms, "image_key": image_key, "overlay_key": overlay_key,
            })
        statement = insert(inspections).returning(inspections.c.id, sort_by_parameter_order=True)
        with self._errors("writing records"), self.engine.begin() as conn:
            return [int(i) for i in conn.execute(statement, rows).scalars()]

    def review(self, inspection_id: int, truth: str, note: str, reviewer: str) -> dict[str, Any]:
        """Add a review of a record: the part is really ``truth``; the outcome follows from its prediction."""
        if truth not in TRUTHS:
            raise RecordsError(f"truth must be one of {', '.join(TRUTHS)}, got {truth!r}")
        with self._errors("writing the review"), self.engine.begin() as conn:
            found = conn.execute(select(inspections.c.prediction, inspections.c.error)
                                 .where(inspections.c.id == inspection_id)).one_or_none()
            if found is None:
                raise NotFound(f"no inspection record {inspection_id}")
            if found.prediction is None:
                raise NoVerdict(f"inspection {inspection_id} has no verdict to review: its image could not be "
                                f"scored ({found.error})")
            values = {"inspection_id": inspection_id, "time": utcnow(), "reviewer": reviewer, "truth": truth,
                      "outcome": OUTCOMES[(int(found.prediction), truth)], "note": note}
            review_id = conn.execute(insert(reviews).values(**values).returning(reviews.c.id)).scalar_one()
        return {"id": int(review_id), **values}

    def prune(self, keep_days: float, now: datetime | None = None) -> int:
        """Forget and delete the kept images and overlays whose newest record is older than ``keep_days``,
        except those of reviewed records (they are training data); the number of files deleted."""
        cutoff = (now or utcnow()) - timedelta(days=keep_days)
        reviewed = select(inspections.c.id).where(exists().where(reviews.c.inspection_id == inspections.c.id))
        deleted = 0
        with self._errors("removing old images"), self.engine.begin() as conn:
            for column in (inspections.c.image_key, inspections.c.overlay_key):
                protected = select(column).where(inspections.c.id.in_(reviewed), column.is_not(None))
                old = conn.execute(select(column).where(column.is_not(None)).group_by(column)
                                   .having(func.max(inspections.c.time) < cutoff)
                                   .where(column.not_in(protected))).scalars().all()
                for start in range(0, len(old), 500):
                    chunk = old[start:start + 500]
                    conn.execute(update(inspections).where(column.in_(chunk)).values({column.name: None}))
                    for key in chunk:
                        path = self.images_dir / key
                        if path.exists():
                            path.unlink()
                            deleted += 1
        return deleted

    # -- reading -----------------------------------------------------------------------------------

    def _select(self) -> Any:
        return select(inspections, models.c.sha256.label("model_sha256"), models.c.arch).join(models)

    def _with_reviews(self, conn: Any, rows: Sequence[Any]) -> list[dict[str, Any]]:
        ids = [r.id for r in rows]
        latest: dict[int, dict[str, Any]] = {}
        if ids:
            for review in conn.execute(select(reviews).where(reviews.c.inspection_id.in_(ids)).order_by(reviews.c.id)):
                latest[review.inspection_id] = review_dict(review._mapping)
        return [record_dict(r._mapping, latest.get(r.id)) for r in rows]

    def query(self, filters: Filters = Filters(), *, limit: int = 50, before: int | None = None
              ) -> tuple[list[dict[str, Any]], int | None]:
        """Records matching ``filters``, newest first, at most ``limit``, with ids below ``before`` (the
        cursor); and the cursor of the next page (None on the last)."""
        where = filters.where() + ([inspections.c.id < before] if before is not None else [])
        statement = self._select().where(*where).order_by(inspections.c.id.desc()).limit(limit + 1)
        with self._errors("reading records"), self.engine.connect() as conn:
            rows = conn.execute(statement).all()
            page = self._with_reviews(conn, rows[:limit])
        return page, (page[-1]["id"] if len(rows) > limit else None)

    def iter_all(self, filters: Filters = Filters(), *, page: int = 1000) -> Iterator[dict[str, Any]]:
        """Every record matching ``filters``, newest first, read a page at a time."""
        before = None
        while True:
            rows, before = self.query(filters, limit=page, before=before)
            yield from rows
            if before is None:
                return

    def get(self, inspection_id: int) -> dict[str, Any]:
        """One record with all its reviews (oldest first); :class:`NotFound` when there is none."""
        with self._errors("reading a record"), self.engine.connect() as conn:
            row = conn.execute(self._select().where(inspections.c.id == inspection_id)).one_or_none()
            if row is None:
                raise NotFound(f"no inspection record {inspection_id}")
            [record] = self._with_reviews(conn, [row])
            history = conn.execute(select(reviews).where(reviews.c.inspection_id == inspection_id)
                                   .order_by(reviews.c.id)).all()
        record["reviews"] = [review_dict(r._mapping) for r in history]
        return record

    def kept_file(self, inspection_id: int, what: str) -> Path | None:
        """The kept image (``what="image"``) or overlay of a record, when it is still there."""
        column = inspections.c.image_key if what == "image" else inspections.c.overlay_key
        with self._errors("reading a record"), self.engine.connect() as conn:
            found = conn.execute(select(inspections.c.id, column).where(inspections.c.id == inspection_id)).one_or_none()
        if found is None:
            raise NotFound(f"no inspection record {inspection_id}")
        path = self.images_dir / found[1] if found[1] else None
        return path if path is not None and path.is_file() else None

    def model(self, model_id: int) -> Fingerprint:
        with self._errors("reading a model"), self.engine.connect() as conn:
            row = conn.execute(select(models).where(models.c.id == model_id)).one()
        values = dict(row._mapping)
        return Fingerprint(**{k: values[k] for k in Fingerprint.__dataclass_fields__})

    def arrays(self, filters: Filters, *, first: int | None = None) -> dict[str, np.ndarray]:
        """Time (UTC, numpy datetime64[us]), prediction and QRS of the scored records matching ``filters``,
        oldest first; only the ``first`` of them when given (the drift baseline)."""
        c = inspections.c
        statement = (select(c.time, c.prediction, c.qrs).where(*filters.where(), c.prediction.is_not(None))
                     .order_by(c.id))
        if first is not None:
            statement = statement.limit(first)
        with self._errors("reading records"), self.engine.connect() as conn:
            rows = conn.execute(statement).all()
        return {
            "time": np.array([r.time.replace(tzinfo=None) for r in rows], dtype="datetime64[us]"),
            "prediction": np.array([r.prediction for r in rows], dtype=np.int8),
            "qrs": np.array([r.qrs for r in rows], dtype=np.float64),
        }

    def frame(self, filters: Filters = Filters()) -> "pd.DataFrame":
        """Time, station, prediction, QRS and error of the records matching ``filters`` as a DataFrame."""
        import pandas as pd

        c = inspections.c
        statement = select(c.time, c.station, c.prediction, c.qrs, c.error).where(*filters.where()).order_by(c.id)
        with self._errors("reading records"), self.engine.connect() as conn:
            rows = conn.execute(statement).all()
        frame = pd.DataFrame(rows, columns=["time", "station", "prediction", "qrs", "error"])
        return frame.astype({"station": str, "prediction": "float64", "qrs": "float64"}).assign(
            time=pd.to_datetime(frame["time"], utc=True))

    def drift(self, model_id: int, *, station: str | None = None, since: datetime | None = None,
              until: datetime | None = None, per: str | int = "hour", baseline: int = 500) -> dict[str, Any]:
        """The drift charts (:func:`qrs.drift.drift`) of a model's records (at one station, when given)
        between ``since`` and ``until``; the baseline is the model's first ``baseline`` records there."""
        from qrs.drift import drift

        model = self.model(model_id)
        base = self.arrays(Filters(station=station, model_id=model_id), first=baseline)
        window = self.arrays(Filters(since=since, until=until, station=station, model_id=model_id))
        report = drift(window["time"], window["prediction"], window["qrs"], baseline_prediction=base["prediction"],
                       baseline_size=baseline, expected_qrs_share=model.expected_qrs_share, per=per)
        return {"model_sha256": model.sha256, "station": station, **report}

    def reviewed(self) -> list[dict[str, Any]]:
        """Every reviewed record with its latest review (``review_id``, truth, outcome), the most recently
        reviewed last."""
        latest = (select(reviews.c.inspection_id, func.max(reviews.c.id).label("review_id"))
                  .group_by(reviews.c.inspection_id).subquery())
        statement = (select(inspections.c.id, inspections.c.part_id, inspections.c.file, inspections.c.image_sha256,
                            inspections.c.station, latest.c.review_id, reviews.c.truth, reviews.c.outcome)
                     .join(latest, latest.c.inspection_id == inspections.c.id)
                     .join(reviews, reviews.c.id == latest.c.review_id).order_by(latest.c.review_id))
        with self._errors("reading reviews"), self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(statement)]

    def kept_image(self, image_sha256: str) -> Path | None:
        """The kept file of an image, by its SHA-256, whichever record kept it (None when none did)."""
        return next(iter(sorted((self.images_dir / image_sha256[:2]).glob(f"{image_sha256}.*"))), None)


def record_dict(row: Any, review: dict[str, Any] | None) -> dict[str, Any]:
    """A record as the API, the CSV and ``qrs history`` give it."""
    prediction = row["prediction"]
    return {
        "id": int(row["id"]), "time": row["time"], "station": row["station"], "part_id": row["part_id"],
        "file": row["file"], "image_sha256": row["image_sha256"], "model_sha256": row["model_sha256"],
        "arch": row["arch"], "prediction": prediction,
        "verdict": None if prediction is None else ("fail" if prediction else "pass"),
        "p_defective": row["p_defective"], "qrs": row["qrs"], "risk_level": row["risk_level"], "error": row["error"],
        "latency_ms": row["latency_ms"], "image_kept": row["image_key"] is not None,
        "overlay_kept": row["overlay_key"] is not None, "review": review,
    }


def review_dict(row: Any) -> dict[str, Any]:
    return {k: row[k] for k in ("id", "inspection_id", "time", "reviewer", "truth", "outcome", "note")}


@dataclass(frozen=True)
class RecordSettings:
    """How the scoring paths keep records: ``--db``, ``--images-dir``, ``--keep-images``, ``--keep-days``
    and the default ``--station``."""

    url: str
    images_dir: Path | None = None
    keep_images: str = "flagged"
    keep_days: float = DEFAULT_KEEP_DAYS
    station: str = field(default_factory=socket.gethostname)

    def __post_init__(self) -> None:
        if self.keep_images not in KEEP_IMAGES:
            raise RecordsError(f"--keep-images must be one of {', '.join(KEEP_IMAGES)}, got {self.keep_images!r}")
        if not self.keep_days > 0:
            raise RecordsError(f"--keep-days must be > 0, got {self.keep_days}")
        check_text(self.station, "station")

    @staticmethod
    def from_option(db: str | None, **kwargs: Any) -> RecordSettings | None:
        """None for ``--db none`` (or no --db), else the settings."""
        if db is None or db.strip().lower() == "none":
            return None
        return RecordSettings(db, **{k: v for k, v in kwargs.items() if v is not None})

    def overlays(self) -> bool | str:
        """Which overlays the records need: every image's, the flagged ones' or none."""
        return {"all": True, "flagged": "flagged", "none": False}[self.keep_images]

    def describe(self) -> str:
        images = default_images_dir(self.url) if self.images_dir is None else self.images_dir
        kept = ("no images kept" if self.keep_images == "none" else
                f"images of {'every' if self.keep_images == 'all' else 'every flagged'} part kept in "
                f"{images.resolve()} for {self.keep_days:g} days")
        return f"records: kept in {shown_url(self.url)} (station {self.station}; {kept})"


def check_text(value: str, name: str) -> str:
    """A station, part id or reviewer name: non-empty, at most :data:`MAX_TEXT` characters."""
    if not value.strip() or len(value) > MAX_TEXT or "\x00" in value:
        raise RecordsError(f"{name} must be 1 to {MAX_TEXT} characters (no NUL), got {len(value)}")
    return value


class Recorder:
    """Keeps the records of one scoring process for one model, and never fails a scoring.

    ``record`` writes a batch in one transaction and returns the ids, or raises
    :class:`RecordsUnavailable` with the reason; the database is opened on first use and, after a
    failure, tried again at most every :data:`RETRY_S` seconds. ``status`` is what ``/readyz`` shows.
    Old kept images are pruned at most once an hour. Thread-safe.
    """

    def __init__(self, settings: RecordSettings) -> None:
        self.settings = settings
        self.store = RecordStore(settings.url, images_dir=settings.images_dir)
        self.model: Fingerprint | None = None
        self.model_id: int | None = None
        self._lock = threading.Lock()
        self._error = ""
        self._failed_at = -float("inf")
        self._pruned_at = -float("inf")
        self.kept = 0
        self.lost = 0

    def use(self, scorer: "Scorer") -> None:
        """Record for this scorer's model (hashes its file: call it where loading the model already waits)."""
        self.model = fingerprint(scorer)

    def _ready(self) -> int:
        if self.model_id is None:
            if time.monotonic() - self._failed_at < RETRY_S:
                raise RecordsUnavailable(f"records not kept: {self._error} (retrying every {RETRY_S:g} s)")
            assert self.model is not None, "Recorder.use(scorer) first"
            try:
                self.model_id = self.store.open().model_id(self.model)
            except RecordsError as exc:
                self._fail(exc)
                raise RecordsUnavailable(f"records not kept: {exc}") from exc
        return self.model_id

    def _fail(self, exc: Exception) -> None:
        self._error = str(exc)
        self._failed_at = time.monotonic()
        self.model_id = None

    def ready(self) -> tuple[RecordStore, int]:
        """The open store and the model's id (opening it if needed), or :class:`RecordsUnavailable`."""
        with self._lock:
            return self.store, self._ready()

    def open(self) -> bool:
        """Open the database now (so that the first lines and ``/readyz`` can tell); False when it fails."""
        with self._lock:
            try:
                self._ready()
                return True
            except RecordsUnavailable:
                return False

    def record(self, items: Sequence[Inspection]) -> list[int]:
        """Keep the records of ``items`` (one transaction); their ids."""
        with self._lock:
            try:
                model_id = self._ready()
                ids = self.store.add(model_id, items, self.settings.keep_images)
            except Exception as exc:  # whatever fails here, the scoring is answered
                if not isinstance(exc, RecordsUnavailable):
                    self._fail(exc)
                    exc = RecordsUnavailable(f"records not kept: {exc}")
                self.lost += len(items)
                log.warning("%d inspection records not kept: %s", len(items), exc)
                raise exc from None
            self._error = ""
            self.kept += len(ids)
            if time.monotonic() - self._pruned_at > PRUNE_EVERY_S:
                self._prune()
            return ids

    def _prune(self) -> None:
        self._pruned_at = time.monotonic()
        try:
            self.store.prune(self.settings.keep_days)
        except RecordsError as exc:
            log.warning("old kept images not removed: %s", exc)

    def status(self) -> dict[str, Any]:
        """``{"kept": bool, "detail": str}``: whether records are being kept, and why not. It takes no lock, so
        the event loop may ask while a write waits on the database."""
        model_id, error = self.model_id, self._error
        if model_id is not None and not error:
            return {"kept": True, "detail": f"kept in {self.store.shown_url}"}
        return {"kept": False, "detail": error or "the records database is not open yet"}

    def close(self) -> None:
        self.store.close()


class FileRecording:
    """``qrs score --db``: the records of the scored files, one transaction per batch (see
    :class:`qrs.predict.Recording`). A database problem never stops the scoring: the rows and files are
    still written and :meth:`summary` says how many records were not kept, and why."""

    def __init__(self, settings: RecordSettings) -> None:
        self.recorder = Recorder(settings)
        self.station = settings.station
        self.overlays = settings.overlays()
        self.problem = ""

    def start(self, scorer: "Scorer") -> None:
        self.recorder.use(scorer)

    def batch(self, items: list[tuple[Path, dict[str, Any], bytes | None, float]]) -> None:
        now = utcnow()
        drafts = [Inspection(file=row["file"], row=row, image=_read_image(file), overlay_png=overlay_png,
                             latency_ms=1000 * seconds, station=self.station, part_id=Path(row["file"]).name[:MAX_TEXT],
                             time=now - timedelta(seconds=seconds))
                  for file, row, overlay_png, seconds in items]
        try:
            self.recorder.record(drafts)
        except RecordsUnavailable as exc:
            self.problem = str(exc)

    @property
    def lost(self) -> int:
        return self.recorder.lost

    def summary(self) -> str:
        where = self.recorder.store.shown_url
        if not self.recorder.lost:
            return f"recorded {self.recorder.kept} inspections in {where}"
        return (f"{self.recorder.lost} of {self.recorder.kept + self.recorder.lost} inspection records not kept "
                f"in {where}: {self.problem}")


def _read_image(path: Path) -> bytes | None:
    """The bytes of a scored (or unscorable) image file; None for special files (never opened) or when
    it cannot be read."""
    from qrs.files import file_problem

    if file_problem(path):
        return None
    try:
        return path.read_bytes()
    except OSError:
        return None
