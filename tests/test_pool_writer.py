"""The pool writer and sampler on a real SQLite pool: batching, counters, the bound, outages, bad records."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import UTC, datetime

import pytest
from guardloop.service.pool_writer import PoolSampler, PoolWriter, top_two_margin

from guardloop.core.labels import LABELS
from guardloop.storage import (
    RANDOM_SAMPLE,
    UNCERTAIN,
    Database,
    DatabaseUnavailable,
    PoolRecord,
    PoolRepository,
    WriteOutcome,
)
from tests.conftest import wait_for


def record(text: str) -> PoolRecord:
    return PoolRecord(
        text=text,
        label="not-harmful",
        scores=dict.fromkeys(LABELS, 1 / 6),
        uncertainty=1.0,
        margin=0.0,
        model_version="v1",
        sampled_by=UNCERTAIN,
        client_id=None,
        seen_at=datetime.now(UTC),
    )


@pytest.fixture
def pool(tmp_path) -> PoolRepository:
    database = Database(f"sqlite:///{tmp_path / 'pool.db'}")
    database.ensure_schema()
    return PoolRepository(database)


class SwitchableDatabase:
    """The real pool behind a switch that makes every write fail as if the server were gone."""

    def __init__(self, pool: PoolRepository) -> None:
        self.pool = pool
        self.down = threading.Event()
        self.batches: list[int] = []

    def write(self, records: Sequence[PoolRecord]) -> WriteOutcome:
        if self.down.is_set():
            raise DatabaseUnavailable("database unavailable: connection refused")
        self.batches.append(len(records))
        return self.pool.write_batch(records)


def test_records_are_written_in_batches_and_counted(pool):
    db = SwitchableDatabase(pool)
    writer = PoolWriter(db.write, max_queued=1000, batch_size=50, flush_seconds=0.2)
    for i in range(120):
        assert writer.offer(record(f"text {i % 100}"))
    writer.start()
    assert wait_for(lambda: writer.counters().written + writer.counters().duplicates == 120)
    writer.stop()
    counters = writer.counters()
    assert (counters.offered, counters.written, counters.duplicates, counters.dropped) == (120, 100, 20, 0)
    assert max(db.batches) == 50 and len(db.batches) >= 3  # batched, never more than batch_size per transaction
    assert pool.count() == 100


def test_an_outage_buffers_up_to_the_bound_then_drops_and_counts_and_writing_resumes(pool):
    db = SwitchableDatabase(pool)
    writer = PoolWriter(
        db.write, max_queued=20, batch_size=5, flush_seconds=0.01, retry_initial_seconds=0.01, retry_max_seconds=0.05
    )
    writer.start()
    writer.offer(record("before the outage"))
    assert wait_for(lambda: writer.counters().written == 1)

    db.down.set()
    accepted = [writer.offer(record(f"during {i}")) for i in range(100)]
    assert wait_for(lambda: writer.counters().write_errors >= 2)
    counters = writer.counters()
    # Held in memory: one batch being retried (5) plus a full queue (20); everything else dropped and counted.
    assert counters.queued <= 25 and counters.dropped == accepted.count(False) >= 75
    assert counters.last_error and "unavailable" in counters.last_error
    assert pool.count() == 1  # what was written before stays

    db.down.clear()
    assert wait_for(lambda: writer.counters().queued == 0)
    writer.offer(record("after the outage"))
    assert wait_for(lambda: pool.count() == 1 + accepted.count(True) + 1)
    writer.stop()
    counters = writer.counters()
    assert counters.last_error is None
    assert counters.offered == counters.written + counters.duplicates + counters.dropped == 102


def test_a_record_the_database_refuses_is_dropped_alone(pool):
    def write(records: Sequence[PoolRecord]) -> WriteOutcome:
        if any(r.text == "poison" for r in records):
            raise ValueError("value out of range")  # not an outage: retrying the same batch can never succeed
        return pool.write_batch(records)

    writer = PoolWriter(write, batch_size=10, flush_seconds=0.05, retry_initial_seconds=0.01, poison_attempts=2)
    for text in ("good 1", "poison", "good 2"):
        writer.offer(record(text))
    writer.start()
    assert wait_for(lambda: writer.counters().dropped == 1 and writer.counters().written == 2)
    writer.stop()
    assert sorted(item.text for item in pool.iter_items()) == ["good 1", "good 2"]


def test_stop_writes_what_is_queued(pool):
    writer = PoolWriter(pool.write_batch, batch_size=1000, flush_seconds=30)
    writer.start()
    for i in range(10):
        writer.offer(record(f"late {i}"))
    writer.stop(timeout=10)
    assert pool.count() == 10 and writer.counters().dropped == 0


def test_stop_with_the_database_down_counts_the_rest_as_dropped(pool):
    db = SwitchableDatabase(pool)
    db.down.set()
    writer = PoolWriter(db.write, flush_seconds=0.01, retry_initial_seconds=0.01)
    writer.start()
    for i in range(7):
        writer.offer(record(f"lost {i}"))
    assert wait_for(lambda: writer.counters().write_errors >= 1)
    writer.stop(timeout=5)
    assert writer.counters().dropped == 7 and writer.counters().queued == 0


def test_the_sampler_keeps_every_uncertain_result_and_a_seeded_share_of_the_rest():
    sampler = PoolSampler(uncertainty_threshold=0.5, sample_rate=0.02, seed=7)
    assert all(sampler.choose(0.51, 0.9) == UNCERTAIN for _ in range(100))
    picks = [sampler.choose(0.2, 0.9) for _ in range(20_000)]
    share = picks.count(RANDOM_SAMPLE) / len(picks)
    assert 0.017 < share < 0.023 and set(picks) == {None, RANDOM_SAMPLE}
    assert PoolSampler(sample_rate=0.0).choose(0.1, 0.9) is None


def test_same_seed_same_sample():
    first = PoolSampler(sample_rate=0.1, seed=3)
    second = PoolSampler(sample_rate=0.1, seed=3)
    assert [first.choose(0.1, 0.9) for _ in range(500)] == [second.choose(0.1, 0.9) for _ in range(500)]


def test_margin_mode_decides_on_the_gap_between_the_top_two_scores():
    sampler = PoolSampler(measure="margin", margin=0.2, sample_rate=0.0)
    close = dict.fromkeys(LABELS, 0.0) | {"self-harm": 0.45, "medical-advice": 0.35, "not-harmful": 0.2}
    clear = dict.fromkeys(LABELS, 0.0) | {"self-harm": 0.8, "medical-advice": 0.1, "not-harmful": 0.1}
    assert top_two_margin(close) == pytest.approx(0.1)
    assert sampler.choose(0.1, top_two_margin(close)) == UNCERTAIN  # low entropy does not matter here
    assert sampler.choose(0.99, top_two_margin(clear)) is None
    with pytest.raises(ValueError, match="unknown uncertainty measure"):
        PoolSampler(measure="variance")
