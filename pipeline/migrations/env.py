"""Alembic environment: run migrations on the connection `pipeline.database.upgrade` hands in."""

from __future__ import annotations

from alembic import context

from pipeline.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite needs batch mode for ALTERs
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
