"""Shared fixtures: small synthetic datasets made once per test session."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from qrs.data.preparation import prepare
from qrs.data.synth import synthesize
from qrs.model import read_checkpoint
from qrs.train import TrainConfig, train

DEEPPCB = Path(__file__).resolve().parent / "data" / "deeppcb"
"""20 real DeepPCB boards (40 images) vendored with their licence; see its README."""
SMALL_SIZE = (115, 315)

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> "Exported":
    """A calibrated checkpoint of ``scoring_setup.make_checkpoint`` at 64 px and its ``qrs export`` (dynamic
    batch), for the tests of the onnx backend."""
    from qrs.export import export_onnx
    from scoring_setup import EXPORT_SIDE, Exported, make_checkpoint

    root = tmp_path_factory.mktemp("exported")
    checkpoint = make_checkpoint(root / "calibrated.pt", side=EXPORT_SIDE)
    export_onnx(checkpoint, root / "calibrated.onnx")
    return Exported(checkpoint, root / "calibrated.onnx")


@pytest.fixture(scope="session")
def ksdd2_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small raw KSDD2-layout dataset: 40 train + 20 test images, 20% defective."""
    root = tmp_path_factory.mktemp("raw") / "ksdd2"
    synthesize(root, "ksdd2", n_train=40, n_test=20, defect_rate=0.25, size=SMALL_SIZE, seed=3)
    return root


@pytest.fixture(scope="session")
def prepared_small(ksdd2_raw: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ksdd2_raw`` prepared at 32 px (for model tests that only need valid data)."""
    out = tmp_path_factory.mktemp("prepared") / "p32"
    prepare("ksdd2", ksdd2_raw, out, img_size=32, progress=False)
    return out


def straight_and_resumed(make: Callable[..., TrainConfig], tmp_path: Path, crash_at: tuple[int, int],
                         **kw: object) -> tuple[dict, dict]:
    """Train ``make(out, **kw)`` straight through, and again interrupted before batch ``crash_at[1]`` of
    epoch ``crash_at[0]`` then resumed; returns both ``last.pt`` payloads, after checking that the
    crashed run's last.pt holds the epoch before the crash."""
    full = train(make(tmp_path / "full", **kw))

    def crash(epoch: int, batch: int) -> None:
        if (epoch, batch) == crash_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(make(tmp_path / "crashed", **kw), on_batch=crash)
    assert read_checkpoint(tmp_path / "crashed" / "last.pt")["meta"]["epoch"] == crash_at[0] - 1
    resumed = train(make(tmp_path / "crashed", resume=True, **kw))
    a, b = read_checkpoint(full.last_path), read_checkpoint(resumed.last_path)
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    return a, b


def read_events(directory: Path) -> Any:
    """Every scalar and image event of the TensorBoard event files under ``directory`` (no sampling), read
    with tensorboard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """The URL of the PostgreSQL server in QRS_TEST_POSTGRES_URL, once it answers."""
    import sqlalchemy

    from services import POSTGRES_ENV, unavailable

    url = os.environ.get(POSTGRES_ENV)
    if not url:
        unavailable(f"no PostgreSQL server: {POSTGRES_ENV} is not set", ".ci/run starts one with .ci/postgres")
    engine = sqlalchemy.create_engine(url, connect_args={"connect_timeout": 5})
    try:
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("select 1"))
    except sqlalchemy.exc.SQLAlchemyError as exc:
        unavailable(f"the PostgreSQL server at {POSTGRES_ENV} does not answer: {exc}", ".ci/run starts one")
    finally:
        engine.dispose()
    return url


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """A fresh, empty database on the test PostgreSQL server (dropped afterwards)."""
    import sqlalchemy

    name = f"qrs_test_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(postgres_server, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
    try:
        yield sqlalchemy.engine.make_url(postgres_server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sqlalchemy.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh records database: an SQLite file, and a database on the test PostgreSQL server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'records.sqlite'}"
    return request.getfixturevalue("postgres_url")
