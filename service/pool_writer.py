"""Pool logging off the request path.

/classify hands each chosen result to `PoolLogger.observe`, which only decides (a comparison and, for
confident results, one draw of a seeded RNG) and puts a record into a bounded in-memory queue without
waiting. One background thread takes batches from the queue and writes them in one transaction each. When
the database is slow or down the thread keeps its batch and retries with backoff while the queue fills;
once the queue is full new records are dropped and counted, so memory stays bounded and /classify never
waits. Writing resumes by itself when the database answers again.
"""

from __future__ import annotations

import heapq
import logging
import queue
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from guardloop.models.onnx_model import Verdict
from guardloop.service.decisions import AppliedPolicy, Decision
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from guardloop.core import telemetry
from guardloop.storage import RANDOM_SAMPLE, REVIEW_BAND, UNCERTAIN, DatabaseUnavailable, PoolRecord, WriteOutcome

log = logging.getLogger(__name__)

# Errors that say "the database is not there right now" (retry the same batch) rather than "this batch is bad".
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    DatabaseUnavailable,
    OperationalError,
    InterfaceError,
    PoolTimeout,
    ConnectionError,
    TimeoutError,
)
MAX_CLIENT_ID_CHARS = 64
# Review-band texts are requested at this priority plus how far into the band they are (0-1): above every cycle's
# request (priority = uncertainty, 0-1), so reviewers see a tenant's borderline traffic first.
REVIEW_BAND_PRIORITY = 1.0


def top_two_margin(scores: dict[str, float]) -> float:
    best, runner_up = heapq.nlargest(2, scores.values())
    return best - runner_up


class PoolSampler:
    """Which results go to the pool: every uncertain one, and a seeded random share of the confident ones."""

    def __init__(
        self,
        *,
        measure: str = "entropy",
        uncertainty_threshold: float = 0.5,
        margin: float = 0.2,
        sample_rate: float = 0.02,
        seed: int = 13,
    ) -> None:
        if measure not in ("entropy", "margin"):
            raise ValueError(f"unknown uncertainty measure {measure!r}; use entropy or margin")
        self.measure = measure
        self.uncertainty_threshold = uncertainty_threshold
        self.margin = margin
        self.sample_rate = sample_rate
        self._rng = random.Random(seed)

    def is_uncertain(self, uncertainty: float, margin: float) -> bool:
        if self.measure == "margin":
            return margin < self.margin
        return uncertainty > self.uncertainty_threshold

    def choose(self, uncertainty: float, margin: float) -> str | None:
        """UNCERTAIN, RANDOM_SAMPLE, or None (not pooled)."""
        if self.is_uncertain(uncertainty, margin):
            return UNCERTAIN
        if self.sample_rate > 0 and self._rng.random() < self.sample_rate:
            return RANDOM_SAMPLE
        return None


@dataclass(frozen=True)
class WriterCounters:
    offered: int  # records handed to the writer
    written: int  # new pool rows created
    duplicates: int  # records that raised the seen_count of an existing row
    dropped: int  # records lost: queue full (database slow or down), unstorable, or still queued at shutdown
    write_errors: int  # failed write attempts (each retried)
    queued: int  # records waiting in memory now (queue + the batch being retried)
    last_error: str | None
    last_write_at: datetime | None


class PoolWriter:
    """A bounded queue and one thread that writes it to the database in batches."""

    def __init__(
        self,
        write_batch: Callable[[Sequence[PoolRecord]], WriteOutcome],
        *,
        max_queued: int = 10_000,
        batch_size: int = 256,
        flush_seconds: float = 0.5,
        prepare: Callable[[], None] | None = None,
        retry_initial_seconds: float = 0.1,
        retry_max_seconds: float = 2.0,
        poison_attempts: int = 3,
    ) -> None:
        self._write_batch = write_batch
        self._prepare = prepare
        self._queue: queue.Queue[PoolRecord] = queue.Queue(maxsize=max_queued)
        self._batch_size = batch_size
        self._flush_seconds = flush_seconds
        self._retry_initial = retry_initial_seconds
        self._retry_max = retry_max_seconds
        self._poison_attempts = poison_attempts
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending: list[PoolRecord] = []
        self._offered = self._written = self._duplicates = self._dropped = self._write_errors = 0
        self._last_error: str | None = None
        self._last_write_at: datetime | None = None

    # ------------------------------------------------------------------ the request side
    def offer(self, record: PoolRecord) -> bool:
        """Queue `record` without waiting; False (and one more drop) when the queue is full."""
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self._offered += 1
                self._dropped += 1
            telemetry.POOL_DROPPED.inc()
            return False
        with self._lock:
            self._offered += 1
        return True

    def counters(self) -> WriterCounters:
        with self._lock:
            return WriterCounters(
                offered=self._offered,
                written=self._written,
                duplicates=self._duplicates,
                dropped=self._dropped,
                write_errors=self._write_errors,
                queued=self._queue.qsize() + len(self._pending),
                last_error=self._last_error,
                last_write_at=self._last_write_at,
            )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="pool-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Write what is queued (one attempt per batch, within `timeout`), then end the thread."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout)
        self._thread = None
        lost = self._queue.qsize() + len(self._pending)
        if lost:
            with self._lock:
                self._dropped += lost
                self._pending = []
            telemetry.POOL_DROPPED.inc(lost)
            log.warning("pool writer stopped with %d unwritten records (counted as dropped)", lost)

    # ------------------------------------------------------------------ the writer thread
    def _run(self) -> None:
        backoff = self._retry_initial
        attempts = 0
        while True:
            if not self._pending:
                if self._stop.is_set() and self._queue.empty():
                    return
                self._pending = self._collect()
                attempts = 0
                if not self._pending:
                    continue
            try:
                if self._prepare is not None:
                    self._prepare()
                outcome = self._write_batch(self._pending)
            except TRANSIENT_ERRORS as exc:
                self._failed(exc, len(self._pending))
                if self._stop.is_set():
                    return  # shutting down with the database away: stop() counts what is left
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._retry_max)
                continue
            except Exception as exc:
                attempts += 1
                self._failed(exc, len(self._pending))
                if attempts >= self._poison_attempts:
                    self._write_one_by_one()
                elif not self._stop.wait(backoff):
                    backoff = min(backoff * 2, self._retry_max)
                continue
            self._succeeded(outcome)
            backoff = self._retry_initial

    def _collect(self) -> list[PoolRecord]:
        """Up to batch_size records: wait for the first, then let the flush time pass (unless a batch is already
        queued or the writer is stopping) and take what came.

        The thread sleeps through the flush time instead of waiting on the queue: waiting on it, every record the
        event loop queued woke this thread, which then took the GIL from the requests (~5% of the event loop's time
        under load at concurrency 32, py-spy)."""
        try:
            first = self._queue.get(timeout=0.1 if not self._stop.is_set() else 0.0)
        except queue.Empty:
            return []
        if self._queue.qsize() + 1 < self._batch_size:
            self._stop.wait(self._flush_seconds)  # returns at once when stop() is called
        batch = [first]
        while len(batch) < self._batch_size:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _write_one_by_one(self) -> None:
        """A batch keeps failing for a reason other than an outage: store what can be stored, drop the rest."""
        records, self._pending = self._pending, []
        for record in records:
            try:
                self._succeeded(self._write_batch([record]))
            except Exception as exc:
                self._failed(exc, 1)
                with self._lock:
                    self._dropped += 1
                telemetry.POOL_DROPPED.inc()

    def _succeeded(self, outcome: WriteOutcome) -> None:
        with self._lock:
            if self._last_error is not None:
                log.info("pool writer: database reachable again, writing resumed")
            self._written += outcome.new_items
            self._duplicates += outcome.repeats
            self._last_error = None
            self._last_write_at = datetime.now(UTC)
            self._pending = []
        telemetry.POOL_WRITES.inc(outcome.new_items)
        telemetry.POOL_DUPLICATES.inc(outcome.repeats)

    def _failed(self, exc: BaseException, size: int) -> None:
        # Only the first line of the driver's message: the full one may quote the records' text.
        cause = getattr(exc, "orig", None) or exc
        reason = f"{type(exc).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"
        with self._lock:
            first_failure = self._last_error is None
            self._write_errors += 1
            self._last_error = reason
        if first_failure:
            log.warning("pool writer: cannot write %d records (%s); retrying, buffering up to the bound", size, reason)


class PoolLogger:
    """What /classify calls: choose the results to pool and hand them to the writer."""

    def __init__(self, sampler: PoolSampler, writer: PoolWriter) -> None:
        self.sampler = sampler
        self.writer = writer

    def observe(
        self,
        texts: Sequence[str],
        verdicts: Sequence[Verdict],
        model_version: str,
        client_id: str | None,
        *,
        policy: AppliedPolicy | None = None,
        decisions: Sequence[Decision] | None = None,
    ) -> int:
        """Queue the pool-worthy results of one request; returns how many were queued.

        With the tenant's `decisions`, a text in its review band is always queued, requested for review.
        """
        now: datetime | None = None
        queued = 0
        for i, (text, verdict) in enumerate(zip(texts, verdicts, strict=True)):
            margin = top_two_margin(verdict.scores)
            decision = decisions[i] if decisions is not None else None
            band = decision if decision is not None and decision.review_categories else None
            sampled_by = REVIEW_BAND if band else self.sampler.choose(verdict.uncertainty, margin)
            if sampled_by is None:
                continue
            now = now or datetime.now(UTC)
            record = PoolRecord(
                text=text,
                label=verdict.label,
                scores=verdict.scores,
                uncertainty=verdict.uncertainty,
                margin=margin,
                model_version=model_version,
                sampled_by=sampled_by,
                client_id=client_id[:MAX_CLIENT_ID_CHARS] if client_id else None,
                seen_at=now,
                tenant=policy.name if policy is not None else None,
                review_reason=_band_reason(band, policy) if band else None,
                priority=REVIEW_BAND_PRIORITY + band.closeness if band else 0.0,
            )
            queued += self.writer.offer(record)
        return queued


def _band_reason(decision: Decision, policy: AppliedPolicy | None) -> dict[str, object]:
    # No tenant name: reviewers are not told whose traffic it is (the pool row keeps it for calibration).
    version = policy.version if policy is not None else None
    return {"strategy": REVIEW_BAND, "categories": list(decision.review_categories), "policy_version": version}
