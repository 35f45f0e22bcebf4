"""Alembic's entry point: migrate the connection that :meth:`qrs.records.RecordStore.open` hands over."""

from alembic import context

from qrs.records import metadata

context.configure(connection=context.config.attributes["connection"], target_metadata=metadata,
                  render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
