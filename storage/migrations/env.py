"""Alembic environment: runs on the connection that storage.migrate passes
in, inside one transaction, holding a lock so that several nodes starting at
once upgrade the schema one after the other."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None,
                  render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(7301942651)"))
    context.run_migrations()
