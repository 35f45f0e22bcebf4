"""Alembic migrations of the records database (:mod:`qrs.records` runs them; no alembic.ini needed).

Each revision in ``versions/`` spells out its own tables and columns (never ``records.metadata``), so
that it keeps meaning what it meant when a later version changes the schema; the tests check that the
revisions together build exactly ``records.metadata``.
"""
