"""The schema revisions, oldest first (Alembic skips this file)."""
