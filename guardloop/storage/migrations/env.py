"""Alembic environment: migrations run on the connection that `upgrade_database` hands over (never from a URL
in a config file), so the service, the CLI and the tests all migrate the same way."""

from __future__ import annotations

from alembic import context

from guardloop.storage.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through guardloop.storage.upgrade_database(url)")

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=True,  # SQLite can only ALTER tables by copying them; batch mode does that
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
