"""The database connection: one SQLAlchemy engine for SQLite (a WAL file) or PostgreSQL (psycopg 3).

Only this module knows which of the two it talks to; the repositories above it are one code path.
Every call is synchronous: the service runs them in worker threads, never on the event loop.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class StorageError(Exception):
    """A database problem the user can fix (bad URL, unreachable server); printed as one line by the CLI."""


class DatabaseUnavailable(StorageError):
    """The database cannot be reached right now."""


def parse_database_url(raw: str) -> URL:
    """Accept sqlite:///path and postgresql[+psycopg]://...; anything else is refused with what to write."""
    try:
        url = make_url(raw)
    except ArgumentError:
        raise StorageError(
            "database URL is not a URL; use sqlite:///path/to/guardloop.db or postgresql+psycopg://user@host/db"
        ) from None
    if url.drivername in ("postgresql", "postgres", "postgresql+psycopg"):
        return url.set(drivername="postgresql+psycopg")  # psycopg 3 is the one PostgreSQL driver installed
    if url.drivername in ("sqlite", "sqlite+pysqlite"):
        if not url.database or url.database == ":memory:":
            raise StorageError("an in-memory SQLite database loses the pool on restart; name a file: sqlite:///path")
        return url
    raise StorageError(
        f"unsupported database {url.drivername!r}; use sqlite:///path or postgresql+psycopg://user@host/db"
    )


def safe_url(url: URL | str) -> str:
    """The URL with its password masked, for messages and logs."""
    return (url if isinstance(url, URL) else make_url(url)).render_as_string(hide_password=True)


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy (not the sqlite3 module) decide where transactions begin, so that writers can
        # take the write lock up front (BEGIN IMMEDIATE) instead of failing to upgrade a read lock.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers (the review page) never wait for the pool writer
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at each checkpoint; WAL keeps the file consistent
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get("sqlite_begin_immediate", False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class Database:
    """An engine plus session factories: `read()` for queries, `write()` for transactions that change rows."""

    def __init__(self, url: str, *, connect_timeout_s: int = 5, echo: bool = False) -> None:
        self.url = parse_database_url(url)
        self.dialect = "sqlite" if self.url.drivername.startswith("sqlite") else "postgresql"
        # hide_parameters: statement parameters are users' texts and token hashes; they must not reach a log or an
        # error message (SQLAlchemy puts them in both).
        options: dict[str, Any] = {"echo": echo, "pool_pre_ping": True, "hide_parameters": True}
        if self.dialect == "sqlite":
            Path(self.url.database or "").parent.mkdir(parents=True, exist_ok=True)
            options["connect_args"] = {"check_same_thread": False, "timeout": 10}
        else:
            # A dead server must fail fast (the pool writer retries), and no statement may hang a worker.
            options["connect_args"] = {
                "connect_timeout": connect_timeout_s,
                "options": "-c statement_timeout=30000",
            }
            options["pool_size"] = 5
            options["max_overflow"] = 5
            options["pool_timeout"] = 10
        self.engine = create_engine(self.url, **options)
        if self.dialect == "sqlite":
            _configure_sqlite(self.engine)
        self._read = sessionmaker(self.engine, expire_on_commit=False)
        self._write = sessionmaker(self.engine.execution_options(sqlite_begin_immediate=True), expire_on_commit=False)
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"Database({safe_url(self.url)})"

    @contextmanager
    def read(self) -> Iterator[Session]:
        with self._errors(), self._read() as session:
            yield session

    @contextmanager
    def write(self) -> Iterator[Session]:
        """One transaction: committed when the block ends, rolled back (nothing half-written) on any error."""
        with self._errors(), self._write() as session, session.begin():
            yield session

    @contextmanager
    def _errors(self) -> Iterator[None]:
        from sqlalchemy.exc import DBAPIError

        try:
            yield
        except DBAPIError as exc:
            if exc.connection_invalidated or _is_connection_error(exc):
                raise DatabaseUnavailable(f"database {safe_url(self.url)} unavailable: {_first_line(exc)}") from exc
            raise

    def ensure_schema(self) -> None:
        """Apply pending migrations once per process (cheap to call again)."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if not self._schema_ready:
                upgrade_database(self)
                self._schema_ready = True

    def ping(self) -> bool:
        try:
            with self.engine.connect() as connection:
                connection.exec_driver_sql("SELECT 1")
            return True
        except SQLAlchemyError:
            return False

    def dispose(self) -> None:
        self.engine.dispose()


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_connection_error(exc: Exception) -> bool:
    from sqlalchemy.exc import InterfaceError, OperationalError

    if isinstance(exc, InterfaceError):
        return True
    if not isinstance(exc, OperationalError):
        return False
    # SQLite's OperationalError also means "locked" or "no such table"; only refused connections count here.
    text = str(exc).lower()
    return any(
        hint in text
        for hint in (
            "connection",
            "could not connect",
            "server closed",
            "terminating",
            "shutting down",
            "unable to open database",
            "timeout expired",
        )
    )


def upgrade_database(target: Database | str) -> None:
    """Bring the schema to the newest migration (idempotent; safe with several replicas on PostgreSQL)."""
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import text

    database = target if isinstance(target, Database) else Database(target)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    try:
        with database.engine.begin() as connection:
            if database.dialect == "postgresql":
                # Replicas starting together would race to create the same tables; one migrates, the others wait.
                connection.execute(text("SELECT pg_advisory_xact_lock(74311)"))
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        if isinstance(exc, Exception) and _is_connection_error(exc):
            raise DatabaseUnavailable(f"database {safe_url(database.url)} unavailable: {_first_line(exc)}") from exc
        raise StorageError(f"cannot migrate {safe_url(database.url)}: {_first_line(exc)}") from exc
    finally:
        if not isinstance(target, Database):
            database.dispose()
