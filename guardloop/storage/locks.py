"""The single-flight lock of the active-learning cycle: one cycle at a time per database.

A PostgreSQL advisory lock when the database is PostgreSQL (every trainer of one database, on any host), a
file lock next to the data otherwise (SQLite is one host's file anyway). A dead holder's lock is released by
PostgreSQL when its connection drops, or by the operating system when the process dies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout
from sqlalchemy import text

from guardloop.storage.db import Database

ADVISORY_LOCK_KEY = 74312  # any constant shared by every trainer of one database


class CycleBusy(Exception):
    """Another trainer holds the single-flight lock."""


@contextlib.contextmanager
def single_flight(database: Database, lock_dir: Path) -> Iterator[None]:
    """Hold the cycle lock for the block, or raise CycleBusy at once."""
    if database.dialect == "postgresql":
        with database.engine.connect() as connection:
            connection = connection.execution_options(isolation_level="AUTOCOMMIT")
            got = connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": ADVISORY_LOCK_KEY}).scalar()
            if not got:
                raise CycleBusy("another trainer is running a cycle on this database")
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": ADVISORY_LOCK_KEY})
        return
    lock_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_dir / "cycle.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise CycleBusy(f"another trainer is running a cycle ({lock_dir / 'cycle.lock'} is held)") from None
    try:
        yield
    finally:
        lock.release()
