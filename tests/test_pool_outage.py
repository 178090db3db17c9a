"""PostgreSQL stopped during a load run: /classify answers every request, the drop counter rises, and the
pool writer resumes by itself when the server is back.

The server stopped here is a private one (initdb in a temp dir, its own loopback port), never the shared
one on 5432.
"""

from __future__ import annotations

import glob
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import httpx
import pytest
from sqlalchemy import func, select

from guardloop.core.settings import Settings
from guardloop.storage import Database
from guardloop.storage.tables import PoolItem
from tests.conftest import ADMIN_TOKEN, free_port, live_server, unavailable, wait_for
from tests.tiny_onnx import publish_tiny

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@dataclass
class PrivatePostgres:
    bin_dir: str
    data_dir: str
    port: int
    as_user: list[str]

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def pg_ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.as_user, f"{self.bin_dir}/pg_ctl", "-D", self.data_dir, *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.data_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self.pg_ctl("-o", options, "-l", f"{self.data_dir}/server.log", "-w", "start")

    def stop(self) -> None:
        self.pg_ctl("-m", "fast", "-w", "stop")


@contextmanager
def private_postgres() -> Iterator[PrivatePostgres]:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        unavailable("PostgreSQL server binaries", "no /usr/lib/postgresql/*/bin/initdb")
    bin_dir = os.path.dirname(candidates[-1])
    as_user: list[str] = []
    data_dir = tempfile.mkdtemp(prefix="guardloop-pg-")
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: run it as the postgres user
        if shutil.which("runuser") is None:
            unavailable("runuser", "needed to start PostgreSQL as a non-root user")
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(data_dir, user="postgres", group="postgres")
    server = PrivatePostgres(bin_dir, data_dir, free_port(), as_user)
    try:
        subprocess.run(
            [*as_user, f"{bin_dir}/initdb", "-D", data_dir, "-A", "trust", "-U", "postgres", "--no-sync"],
            check=True,
            capture_output=True,
            timeout=120,
        )
        server.start()
        yield server
    finally:
        with suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
            server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def pool_rows(url: str) -> int:
    database = Database(url)
    try:
        with database.read() as session:
            return session.scalar(select(func.count()).select_from(PoolItem)) or 0
    finally:
        database.dispose()


def test_postgres_stopped_during_load(settings, registry, tmp_path):
    publish_tiny(registry, tmp_path, seed=1)
    with private_postgres() as postgres:
        settings = Settings(
            **(
                settings.model_dump()
                | {
                    "database_url": postgres.url,
                    "pool_uncertainty_threshold": 0.0,  # every result is pooled: each call is one record
                    "pool_queue_size": 300,  # room for scheduling hiccups of a busy machine while it is up
                    "pool_batch_size": 20,
                    "pool_flush_seconds": 0.05,
                }
            )
        )
        admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        statuses: list[int] = []
        with live_server(settings) as base, httpx.Client(base_url=base, timeout=10) as client:

            def load(n: int, phase: str) -> list[float]:
                latencies = []
                for i in range(n):
                    start = time.perf_counter()
                    response = client.post("/classify", json={"text": f"{phase} message number {i}"})
                    latencies.append(time.perf_counter() - start)
                    statuses.append(response.status_code)
                return latencies

            def writer() -> dict:
                return client.get("/admin/pool", headers=admin).json()["writer"]

            before = load(100, "before")
            assert wait_for(lambda: writer()["written"] == 100, timeout=20), writer()
            assert pool_rows(postgres.url) == 100

            postgres.stop()
            during = load(800, "during")
            assert wait_for(lambda: writer()["write_errors"] >= 1, timeout=10)
            down = writer()
            assert down["dropped"] >= 800 - 300 - 20  # beyond the bound (queue + the batch in hand) it drops
            assert down["last_error"]

            postgres.start()
            after = load(100, "after")

            def settled() -> bool:
                # Queue empty is not enough: the last batch may be committed but not yet counted.
                state = writer()
                accounted = state["written"] + state["duplicates"] + state["dropped"]
                return state["queued"] == 0 and state["last_error"] is None and accounted == state["offered"]

            assert wait_for(settled, timeout=30), writer()
            final = writer()

        assert set(statuses) == {200} and len(statuses) == 1000  # zero 5xx, every request answered
        # Nobody waited for the database: the median request during the outage is as quick as before it
        # (generously: a busy machine's moments fall on either side; a wait for a connection does not).
        assert statistics.median(during) < 5 * statistics.median(before) + 0.05, (during, before)
        # Writing resumed by itself: what was buffered and everything after the restart is in the table,
        # and nothing written before the outage was lost.
        rows = pool_rows(postgres.url)
        assert rows == 100 + (800 - final["dropped"]) + 100
        # Every text is distinct, so a "duplicate" can only be a batch whose commit reached the server just as
        # it went down and was retried: the upsert makes the retry land on the same rows, never on new ones.
        assert final["written"] + final["duplicates"] == rows
        assert final["offered"] == 1000 == final["written"] + final["duplicates"] + final["dropped"]
        assert len(after) == 100
