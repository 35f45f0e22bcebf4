"""Outside services some tests need (headless Chromium, a PostgreSQL server): skipped with the reason
where they are missing, except under CI=true, where a missing service fails the test (.ci/run
installs and starts them)."""

from __future__ import annotations

import os

import pytest

POSTGRES_ENV = "QRS_TEST_POSTGRES_URL"
"""The SQLAlchemy URL of a PostgreSQL server whose user may create databases (.ci/postgres prints one)."""


def unavailable(reason: str, fix: str) -> None:
    """Skip with ``reason``; under CI=true fail instead, saying how CI provides the service."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: this test must run; {fix})")
    pytest.skip(reason)
