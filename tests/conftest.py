from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import uvicorn
from guardloop.models.registry import ModelRegistry
from guardloop.service.app import create_app

from guardloop.core.settings import Settings

ADMIN_TOKEN = "test-admin-token-0123456789"

# The suite trains many small models (cycles, bootstrap, CLI runs in subprocesses, which inherit this): one
# fine-tune each instead of the default average of three keeps it inside its time budget. The averaging itself is
# tested where it is the subject (test_weight_averaging.py, test_base_model_dirs.py), and a test that sets the
# variable keeps its own value.
os.environ.setdefault("GUARDLOOP_TRAIN_AVERAGE_OF", "1")

# The longest test files (about 7.5, 3, 2.5 and 1.5 min on one xdist worker here), run first: `make test` hands
# files to its two workers in collection order (--no-loadscope-reorder), so the longest no longer starts last and
# leaves the other worker idle for minutes (the suite's last 6% took 6 of its 16.5 min).
LONGEST_FILES_FIRST = ("test_cycle_real_llm.py", "test_cycle.py", "test_cli.py", "test_simulate.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FILES_FIRST.index(name) if name in LONGEST_FILES_FIRST else len(LONGEST_FILES_FIRST)

    items.sort(key=rank)  # stable: every file keeps its tests' order, the others keep theirs


@pytest.fixture
def registry(tmp_path: Path) -> ModelRegistry:
    return ModelRegistry(tmp_path / "registry")


@pytest.fixture
def settings(registry: ModelRegistry, tmp_path: Path) -> Settings:
    return Settings(
        registry_dir=registry.root,
        data_dir=tmp_path / "data",
        registry_poll_seconds=0.2,
        admin_token=ADMIN_TOKEN,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live_server(settings: Settings) -> Iterator[str]:
    """A real uvicorn server on loopback in a background thread; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# ----------------------------------------------------------------------------- databases (pool, review)
# The local PostgreSQL (trust auth); tests create their own database on it and drop it afterwards.
POSTGRES_ADMIN_DSN = os.environ.get("GUARDLOOP_TEST_POSTGRES", "host=127.0.0.1 port=5432 dbname=test connect_timeout=3")


def unavailable(what: str, reason: str) -> None:
    """Skip with a visible reason, but under CI=true fail: there every part must really be tested."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{what} is required under CI=true: {reason}")
    pytest.skip(f"{what} unavailable: {reason}")


@contextmanager
def temporary_postgres_database(admin_dsn: str = POSTGRES_ADMIN_DSN) -> Iterator[str]:
    """A fresh, uniquely named database; yields its SQLAlchemy URL, drops it (and its connections) afterwards."""
    import uuid

    import psycopg
    from psycopg.conninfo import conninfo_to_dict

    name = f"guardloop_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(admin_dsn, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        unavailable("PostgreSQL", (str(exc).strip().splitlines() or ["cannot connect"])[0])
    params = conninfo_to_dict(admin_dsn)
    user = f"{params['user']}@" if params.get("user") else ""
    host, port = params.get("host", "127.0.0.1"), params.get("port", "5432")
    try:
        yield f"postgresql+psycopg://{user}{host}:{port}/{name}"
    finally:
        with psycopg.connect(admin_dsn, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def postgres_url() -> Iterator[str]:
    with temporary_postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each test using it runs twice: on a SQLite file and on a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'pool.db'}"
        return
    with temporary_postgres_database() as url:
        yield url
