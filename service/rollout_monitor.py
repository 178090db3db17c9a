"""The service's side of a roll-out: route the canary's share of requests, feed the shadow, keep the tallies in the
shared database, and stop a canary that leaves its bounds.

Routing: while the registry's roll-out is in `canary`, a request whose client hashes into the share (or, routed per
request, a random draw) is answered by the candidate through a micro-batcher of its own; if the canary fails, the
request is answered by the served model instead, and the error is counted against the canary: no request fails
because of it. Every `rollout_check_seconds` each replica stores its cumulative tallies (one row per replica), sums
every replica's, and judges the canary against the stable model over the same step (core/rollout_judgement.py). A
canary out of bounds is halted in the database; every replica reads the halt at its next check and drops the
candidate, long before anyone completes or aborts the roll-out in the registry (`guardloop models status`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import numpy as np
from fastapi import FastAPI
from guardloop.models.rollout import routed_to_canary
from guardloop.service.admission import Overloaded
from guardloop.service.batcher import MicroBatcher, TextRejected
from guardloop.service.model_holder import LoadedModel, ModelHolder
from guardloop.service.shadow import ShadowScorer

from guardloop.core import rollout_telemetry as metrics
from guardloop.core.rollout_judgement import CanaryBounds, add_counts, canary_problem, empty_canary_counts
from guardloop.core.settings import Settings
from guardloop.storage import Database, PoolRepository
from guardloop.storage.rollout_tallies import Disagreement, RolloutRepository

log = logging.getLogger(__name__)

MAX_PENDING_DISAGREEMENTS = 1000  # per candidate between two checks


def replica_name() -> str:
    """Unique per process: tally rows are owned by one process, so a restarted pod starts a row of its own."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(3)}"


class RolloutMonitor:
    def __init__(self, settings: Settings, holder: ModelHolder, stable: MicroBatcher, database: Database) -> None:
        self.settings = settings
        self.holder = holder
        self.stable = stable
        self.replica = replica_name()
        self.repository = RolloutRepository(database)
        self.pool = PoolRepository(database, redact_contacts=settings.pool_redact) if settings.pool_enabled else None
        self.bounds = CanaryBounds(
            min_requests=settings.canary_min_requests,
            max_flag_rate_increase=settings.canary_max_flag_rate_increase,
            max_error_rate=settings.canary_max_error_rate,
            max_latency_ratio=settings.canary_max_latency_ratio,
        )
        self.canary_batcher = MicroBatcher(
            lambda: holder.canary,
            max_size=settings.batch_max_size,
            max_wait_ms=settings.batch_max_wait_ms,
            max_tokens=settings.batch_max_tokens,
            max_queue_tokens=settings.queue_max_tokens,
            max_seq_len=settings.max_seq_len,
        )
        self.shadow = ShadowScorer(
            share=settings.shadow_share,
            queue_size=settings.shadow_queue_size,
            busy=self.busy,
            quiet_for=self.quiet_for,
            quiet_seconds=settings.shadow_quiet_ms / 1000,
            on_disagreements=self._queue_for_review,
            seed=settings.seed,
        )
        self._canary_counts: dict[tuple[str, str], dict[str, Any]] = {}  # (candidate, stage key) -> counts
        self._lock = threading.Lock()
        self._in_flight = 0  # requests between predict's start and end (the batcher's queue omits the running pass)
        self._last_request_end = 0.0  # time.monotonic()
        self._disagreements: dict[str, list[Disagreement]] = {}  # candidate -> waiting for the next check
        self.halt_reasons: dict[str, str] = {}  # candidate -> why it was halted (for /models/current)

    def start(self) -> None:
        metrics.expose()
        self.canary_batcher.start()
        self.shadow.start()

    async def stop(self) -> None:
        await self.canary_batcher.stop()
        await asyncio.to_thread(self.shadow.stop)

    # ------------------------------------------------------------------ the request path
    def busy(self) -> bool:
        """Whether a request is being classified or waits to be: then the shadow leaves the cores alone."""
        return self._in_flight > 0 or self.stable.pending_tokens > 0

    def quiet_for(self) -> float:
        """Seconds since the last request was classified; 0 while one is being classified or waits."""
        return 0.0 if self.busy() else time.monotonic() - self._last_request_end

    async def predict(self, canonical: list[str], client: str) -> tuple[np.ndarray, Any]:
        """Probabilities and the model that produced them: the canary for its share of clients, else the stable."""
        self._in_flight += 1  # only the event loop changes it
        try:
            return await self._predict(canonical, client)
        finally:
            self._in_flight -= 1
            self._last_request_end = time.monotonic()

    async def _predict(self, canonical: list[str], client: str) -> tuple[np.ndarray, Any]:
        state, canary = self.holder.rollout, self.holder.canary
        in_canary = canary is not None and state is not None and routed_to_canary(state, client)
        if in_canary:
            started = time.perf_counter()
            try:
                probs, model = await self.canary_batcher.predict(canonical, client)
            except (TextRejected, Overloaded):
                raise  # the text's or the load's fault: the stable model would answer the same
            except Exception as exc:  # the canary's fault: the served model answers, the canary is charged
                log.warning("canary %s failed a request (%s); answered by the served model", canary.version, exc)
                self._count(state.candidate, state.key, "canary", time.perf_counter() - started, error=True)
            else:
                self._count(state.candidate, state.key, "canary", time.perf_counter() - started)
                return probs, model
        started = time.perf_counter()
        probs, model = await self.stable.predict(canonical, client)
        if state is not None and state.stage == "canary":
            self._count(state.candidate, state.key, "stable", time.perf_counter() - started)
        return probs, model

    def observe(
        self,
        model: LoadedModel,
        texts: list[str],
        canonical: list[str],
        verdicts: list[Any],
        client_id: str | None,
        *,
        store: bool = True,
    ) -> None:
        """After a request is answered: its flags for the canary tally, a copy for the shadow (its disagreements go
        to the review queue only when `store`: the caller's tenant pools its texts). Never raises."""
        try:
            state = self.holder.rollout
            if state is not None and state.stage == "canary":
                side = "canary" if model.version == state.candidate else "stable"
                flagged = sum(1 for verdict in verdicts if verdict.flagged)
                with self._lock:
                    counts = self._canary_counts.setdefault((state.candidate, state.key), empty_canary_counts())
                    counts[side]["texts"] += len(verdicts)
                    counts[side]["flagged"] += flagged
            self.shadow.offer(self.holder.shadow, model, texts, canonical, verdicts, client_id, store=store)
        except Exception:
            log.exception("roll-out bookkeeping failed; the request is answered anyway")

    def _count(self, candidate: str, key: str, side: str, seconds: float, *, error: bool = False) -> None:
        with self._lock:
            counts = self._canary_counts.setdefault((candidate, key), empty_canary_counts())[side]
            counts["requests"] += 1
            counts["errors"] += error
            counts["seconds"] += seconds
        metrics.CANARY_REQUESTS.labels(model=side, outcome="error" if error else "ok").inc()

    # ------------------------------------------------------------------ the shadow thread
    def _queue_for_review(self, candidate: str, disagreements: list[Disagreement]) -> None:
        """Keep them for the next check, which writes them in one transaction (a database write per shadow batch
        would cost the request path GIL time); beyond MAX_PENDING_DISAGREEMENTS they are dropped."""
        if self.pool is None:
            return  # pool logging is off: texts are not stored, not even disagreements
        with self._lock:
            pending = self._disagreements.setdefault(candidate, [])
            pending.extend(disagreements[: max(0, MAX_PENDING_DISAGREEMENTS - len(pending))])

    def _flush_disagreements(self) -> None:
        with self._lock:
            pending, self._disagreements = self._disagreements, {}
        for candidate, disagreements in pending.items():
            try:
                self.repository.queue_disagreements(
                    self.pool,  # type: ignore[arg-type]  (nothing is pending without a pool)
                    candidate,
                    disagreements,
                    priority=self.settings.shadow_review_priority,
                    at=datetime.now(UTC),
                )
            except Exception as exc:  # the database may be down: these are lost, later ones try again
                log.warning("%d shadow disagreements not queued for review: %s", len(disagreements), exc)

    # ------------------------------------------------------------------ the periodic check
    def check(self) -> str | None:
        """Store this replica's tallies, judge the canary over all replicas, obey any halt. Returns the halt's
        reason when the candidate is halted (by this replica or another). Runs in a worker thread."""
        self._flush_disagreements()
        for candidate, counts in self.shadow.counts().items():
            self.repository.save_tally(candidate, "shadow", self.replica, counts)
        with self._lock:
            canary_counts = {key: add_counts({}, counts) for key, counts in self._canary_counts.items()}
        for (candidate, key), counts in canary_counts.items():
            self.repository.save_tally(candidate, key, self.replica, counts)
        state = self.holder.rollout
        metrics.CANARY_SHARE.set(state.share if state and state.stage == "canary" and self.holder.canary else 0.0)
        if state is None:
            return None
        halt = self.repository.halt_of(state.candidate)
        if halt is None and state.stage == "canary":
            problem = canary_problem(self.repository.totals(state.candidate, state.key), self.bounds)
            if problem is not None:
                halt = self.repository.halt(state.candidate, state.key, problem, self.replica)
                log.error(
                    "canary %s (%s) out of bounds: %s; halting it everywhere", state.candidate, state.key, problem
                )
        if halt is None:
            return None
        self.halt_reasons[state.candidate] = halt.reason
        if state.candidate not in self.holder.halted:
            self.holder.halt(state.candidate)
            metrics.ROLLOUT_HALTS.inc()
            metrics.CANARY_SHARE.set(0.0)
            log.warning("roll-out of %s halted (%s): %s", halt.candidate, halt.stage, halt.reason)
        return halt.reason

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.rollout_check_seconds)
            try:
                await asyncio.to_thread(self.check)
            except Exception as exc:  # the database may be down; the tallies are cumulative, the next check catches up
                log.warning("roll-out check failed: %s", exc)


@contextlib.asynccontextmanager
async def serve_rollout(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """Sets app.state.rollout for the app's lifetime (after open_storage: it needs app.state.database)."""
    monitor = RolloutMonitor(settings, app.state.holder, app.state.batcher, app.state.database)
    monitor.start()
    app.state.rollout = monitor
    watcher = asyncio.create_task(monitor.watch())
    try:
        yield
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        await monitor.stop()
