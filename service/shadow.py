"""Shadow scoring: the roll-out's candidate scores a share of live traffic beside the served model, off the request
path, and where the two disagree the text goes to the reviewers first.

A request only offers its texts (`offer`: a random draw and a put into a bounded queue, never a wait); one daemon
thread, at the lowest CPU priority, scores them with the shadow model and compares. When the queue is full, or the
service has work waiting for its own model (when offered or when its turn comes), or no pause of
`GUARDLOOP_SHADOW_QUIET_MS` comes within a second, the texts are dropped and counted: the shadow takes the cores
only while no request waits for them.
Counts per candidate are cumulative; the roll-out monitor stores them in the database (service/rollout_monitor.py).
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from guardloop.models.onnx_model import Verdict
from guardloop.service.model_holder import LoadedModel
from guardloop.service.pool_writer import top_two_margin

from guardloop.core import rollout_telemetry as metrics
from guardloop.core.rollout_judgement import add_counts, empty_shadow_counts
from guardloop.storage.pool import PoolRecord
from guardloop.storage.rollout_tallies import Disagreement

log = logging.getLogger(__name__)

SHADOW = "shadow"  # PoolRecord.sampled_by of a text the shadow disagreed on
MAX_QUIET_WAIT_SECONDS = 1.0  # longest a copy waits for a pause in the traffic before it is dropped


@dataclass(frozen=True)
class _Job:
    shadow: LoadedModel
    serving_version: str
    texts: list[str]  # as sent (what the pool would store)
    canonical: list[str]  # what the models read
    verdicts: list[Verdict]  # the serving model's
    client_id: str | None
    store: bool  # the caller's tenant lets its texts be kept: disagreements may enter the review queue


class ShadowScorer:
    def __init__(
        self,
        *,
        share: float,
        queue_size: int,
        busy: Callable[[], bool] = lambda: False,
        quiet_for: Callable[[], float] = lambda: float("inf"),
        quiet_seconds: float = 0.0,
        on_disagreements: Callable[[str, list[Disagreement]], None] | None = None,
        seed: int | None = None,
    ) -> None:
        """`busy`: whether the served model has work waiting (then offered texts are dropped); `on_disagreements`
        (candidate, disagreements) runs in the shadow thread, e.g. to put them in the review queue."""
        self._share = share
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self._busy = busy
        self._quiet_for, self._quiet_seconds = quiet_for, quiet_seconds
        self._on_disagreements = on_disagreements
        self._random = random.Random(seed)
        self._counts: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="shadow", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return  # the daemon thread dies with the process
        self._thread.join(timeout)

    # ------------------------------------------------------------------ the request path
    def offer(
        self,
        shadow: LoadedModel | None,
        serving: LoadedModel,
        texts: Sequence[str],
        canonical: Sequence[str],
        verdicts: Sequence[Verdict],
        client_id: str | None,
        *,
        store: bool = True,
    ) -> None:
        """Queue a copy of a request's results for the shadow, or drop it; never waits, never raises."""
        if shadow is None or not texts or shadow.version == serving.version:
            return
        if self._share < 1.0 and self._random.random() >= self._share:
            return
        job = _Job(shadow, serving.version, list(texts), list(canonical), list(verdicts), client_id, store)
        if self._busy():
            self._dropped(shadow.version, len(texts))
            return
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self._dropped(shadow.version, len(texts))

    def _dropped(self, candidate: str, count: int) -> None:
        metrics.SHADOW_DROPPED.inc(count)
        with self._lock:
            self._counts.setdefault(candidate, empty_shadow_counts())["dropped"] += count

    def counts(self) -> dict[str, dict[str, Any]]:
        """Cumulative counts per candidate since this process started (a copy)."""
        with self._lock:
            return {candidate: add_counts({}, counts) for candidate, counts in self._counts.items()}

    def idle(self) -> bool:
        return self._queue.unfinished_tasks == 0

    # ------------------------------------------------------------------ the shadow thread
    def _run(self) -> None:
        _lowest_cpu_priority()
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if not self._wait_for_quiet():  # requests keep coming: they have the cores, this copy is dropped
                    self._dropped(job.shadow.version, len(job.texts))
                    continue
                self._score(job)
            except Exception:  # one failing job must not end shadow scoring
                log.exception("shadow scoring of %d texts failed", len(job.texts) if job else 0)
            finally:
                self._queue.task_done()

    def _wait_for_quiet(self) -> bool:
        """Wait (at most MAX_QUIET_WAIT_SECONDS) until no request has run for `quiet_seconds`: a shadow pass started
        in a pause is less likely to overlap the next request than one started right after a request."""
        deadline = time.monotonic() + MAX_QUIET_WAIT_SECONDS
        while True:
            if self._busy():
                return False
            quiet = self._quiet_for()
            if quiet >= self._quiet_seconds:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(self._quiet_seconds - quiet)

    def _score(self, job: _Job) -> None:
        started = time.perf_counter()
        classifier = job.shadow.classifier
        shadow_verdicts = [classifier.verdict(row) for row in classifier.predict_proba(job.canonical)]
        seconds = time.perf_counter() - started
        for _ in job.texts:
            metrics.SHADOW_SECONDS.observe(seconds / len(job.texts))
        metrics.SHADOW_SCORED.inc(len(job.texts))
        disagreements: list[Disagreement] = []
        now = datetime.now(UTC)
        with self._lock:
            counts = self._counts.setdefault(job.shadow.version, empty_shadow_counts())
            counts["scored"] += len(job.texts)
            counts["shadow_seconds"] += seconds
            for text, serving, shadow in zip(job.texts, job.verdicts, shadow_verdicts, strict=True):
                for label in {serving.label, shadow.label} if serving.label != shadow.label else ():
                    counts["per_class"][label]["disagreed"] += 1
                    metrics.SHADOW_DISAGREEMENTS.labels(label=label).inc()
                for label in serving.flagged_categories:
                    counts["per_class"][label]["serving_flagged"] += 1
                    metrics.SHADOW_FLAGGED.labels(label=label, model="serving").inc()
                for label in shadow.flagged_categories:
                    counts["per_class"][label]["shadow_flagged"] += 1
                    metrics.SHADOW_FLAGGED.labels(label=label, model="shadow").inc()
                if serving.label != shadow.label:
                    counts["disagreed"] += 1
                    if job.store:
                        disagreements.append(Disagreement(_record(text, serving, job, now), shadow.label))
        if disagreements and self._on_disagreements is not None:
            self._on_disagreements(job.shadow.version, disagreements)


def _lowest_cpu_priority() -> None:
    """Nice 19 for this thread only (Linux schedules threads alone): with intra-op threads at 1, ONNX Runtime runs
    the shadow's forward pass in this thread, so the serving threads get the cores first. Not SCHED_IDLE: a thread
    that never runs while the machine is busy could be preempted holding the GIL and stall every request."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: the shadow still only takes idle turns
        log.info("shadow thread keeps its priority (%s)", exc)


def _record(text: str, verdict: Verdict, job: _Job, now: datetime) -> PoolRecord:
    return PoolRecord(
        text=text,
        label=verdict.label,
        scores=verdict.scores,
        uncertainty=verdict.uncertainty,
        margin=top_two_margin(verdict.scores),
        model_version=job.serving_version,
        sampled_by=SHADOW,
        client_id=job.client_id[:64] if job.client_id else None,
        seen_at=now,
    )
