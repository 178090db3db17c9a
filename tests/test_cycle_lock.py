"""The single-flight cycle lock on a real PostgreSQL, held by another real process.

In production several trainers (replicas, a cron job next to the scheduler) share one database; the advisory
lock is what keeps two cycles from selecting, training and publishing at once. An advisory lock belongs to a
database session, so it must be tested across sessions of different processes, and a SIGKILLed holder's lock
must die with its connection (there is no `finally` to release it).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from guardloop.models.registry import ModelRegistry
from guardloop.trainer.cycle import CycleBusy, CycleRunner, single_flight

from guardloop.core.settings import Settings
from guardloop.storage import Database
from tests.conftest import wait_for

# Run in a child process: take the lock, say so, hold it until told to release (a line on stdin), say so.
HOLDER = """
import sys
from pathlib import Path
from guardloop.storage import Database
try:
    from guardloop.storage.locks import single_flight  # light: no torch import in the holder
except ImportError:
    from guardloop.trainer.cycle import single_flight

with single_flight(Database(sys.argv[1]), Path(sys.argv[2])):
    print("held", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


class Holder:
    """A child process holding the cycle lock until `release()` (or until it is killed)."""

    def __init__(self, url: str, lock_dir: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", HOLDER, url, str(lock_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline().strip()  # blocks until the child holds the lock (or dies)
        if line != "held":
            self.process.kill()
            raise AssertionError(f"the holder did not take the lock: {line!r} {self.process.stderr.read()[-2000:]}")

    def release(self) -> None:
        self.process.stdin.write("release\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "released"
        assert self.process.wait(timeout=30) == 0

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        for stream in (self.process.stdin, self.process.stdout, self.process.stderr):
            stream.close()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    started: list[Holder] = []
    yield started
    for holder in started:
        holder.close()


def can_take(database: Database, lock_dir: Path) -> bool:
    try:
        with single_flight(database, lock_dir):
            return True
    except CycleBusy:
        return False


def test_postgres_lock_keeps_another_process_out_until_it_releases(postgres_url, tmp_path, holders):
    database = Database(postgres_url)
    settings = Settings(data_dir=tmp_path / "data", registry_dir=tmp_path / "registry", database_url=postgres_url)
    runner = CycleRunner(settings=settings, database=database, registry=ModelRegistry(settings.registry_dir))
    # Each side gets its own lock directory: only the database can keep them apart (as on two machines).
    holders.append(holder := Holder(postgres_url, tmp_path / "elsewhere"))

    with pytest.raises(CycleBusy, match="another trainer"), single_flight(database, tmp_path / "b"):
        pass
    with pytest.raises(CycleBusy):
        runner.run()
    assert runner.cycles.recent() == []  # a refused cycle starts nothing
    assert not can_take(database, tmp_path / "b")  # and refused attempts leave the holder's lock alone

    holder.release()
    cycle = runner.run()  # an empty pool: the cycle takes the lock, runs and is skipped
    assert cycle.status == "skipped"
    assert can_take(database, tmp_path / "b")  # released after the run


def test_postgres_lock_dies_with_a_killed_holder(postgres_url, tmp_path, holders):
    database = Database(postgres_url)
    holders.append(holder := Holder(postgres_url, tmp_path / "a"))
    assert not can_take(database, tmp_path / "b")

    holder.kill()  # no `finally` runs: only PostgreSQL ending the dead session can free the lock
    # The server notices the closed socket on its own schedule; poll rather than assume it is instant.
    assert wait_for(lambda: can_take(database, tmp_path / "b"), timeout=30)
