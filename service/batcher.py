"""Micro-batching: concurrent requests share one forward pass, fairly, and one bad text fails only its request.

A batch holds at most `max_size` texts and `max_tokens` padded tokens, formed in fair order across clients, short
and long texts apart (service/admission.py): a lone request pays almost nothing, a burst runs in a few large
passes, and a caller with many long texts shares the batches instead of filling them. With `short_lane` a second
inference thread runs short texts only: a one-line request then never waits for a long text's forward pass.
Each text waits at most `max_wait` for others to join. When a forward pass raises, its texts are re-run one by
one and only those that fail alone fail (TextRejected): batch-mates of a malformed text never see its error.

The event loop starts a lane's work; under load the lane's thread then takes its next batch itself, as soon as a
pass ends, until the queue is empty (`_run_while_queued`). Going back through the event loop between batches left
a core idle while the loop served other requests first: at concurrency 32 the two inference threads and the loop
together kept about 1.7 of the 2 cores busy. The queue is shared with those threads under a lock.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
from guardloop.service.admission import FairQueue, Overloaded, Pending, estimate_tokens

log = logging.getLogger(__name__)

# About the estimated tokens/s one inference thread drains here when idle (README, "Sharing the service"): the
# Retry-After estimate until the service has measured its own batches.
INITIAL_DRAIN_TOKENS_PER_SECOND = 6000.0
_DRAIN_SMOOTHING = 0.2  # weight of the newest batch in the moving average of the drain rate


class NoModelLoaded(Exception):
    """The service has no model to answer with yet."""


class TextRejected(Exception):
    """A text failed in a forward pass of its own: the text, not its batch-mates or the model, is at fault."""

    def __init__(self, reason: str, index: int | None = None, kind: str = "Exception") -> None:
        self.reason, self.index, self.kind = reason, index, kind  # kind: the exception's type, safe to log
        where = f"text {index}" if index is not None else "a text"
        super().__init__(f"{where} could not be classified ({reason}); send it as valid UTF-8 text")


class _Model(Protocol):  # LoadedModel, or a test's stand-in: anything with a classifier that has predict_proba
    @property
    def classifier(self) -> Any: ...


def _forward_isolated(model: _Model, texts: list[str]) -> list[np.ndarray | BaseException]:
    """One row per text, or the exception of a text that fails alone. Runs in the inference thread.

    When every text of a multi-text batch fails alone the model is at fault, not the texts: the batch's own
    error is given to all of them (a 500, not a 422).
    """
    try:
        return list(model.classifier.predict_proba(texts))
    except Exception as batch_error:
        if len(texts) == 1:
            return [_rejected(batch_error)]
        rows: list[np.ndarray | BaseException] = []
        for text in texts:
            try:
                rows.append(model.classifier.predict_proba([text])[0])
            except Exception as alone:
                rows.append(_rejected(alone))
        if all(isinstance(row, BaseException) for row in rows):
            return [batch_error] * len(texts)
        return rows


def _rejected(exc: BaseException) -> TextRejected:
    return TextRejected(f"{type(exc).__name__}: {str(exc)[:200]}", kind=type(exc).__name__)


class MicroBatcher:
    def __init__(
        self,
        get_model: Callable[[], Any],
        *,
        max_size: int,
        max_wait_ms: float,
        max_tokens: int = 1 << 30,
        max_queue_tokens: int = 1 << 30,
        max_seq_len: int = 128,
        workers: int = 1,
        short_lane: bool = False,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._get_model = get_model
        self._max_size = max_size
        self._max_wait = max_wait_ms / 1000
        self._max_tokens = max_tokens
        self._max_queue_tokens = max_queue_tokens
        self._max_seq_len = max_seq_len
        self._workers = workers
        self._short_lane = short_lane
        self._on_batch = on_batch
        self._queue = FairQueue(long_tokens=max_seq_len // 2)
        # The event loop puts texts in; a lane's thread takes its next batch itself (_run_while_queued).
        self._queue_lock = threading.Lock()
        self._arrived: asyncio.Event | None = None  # created in start(): it belongs to the running loop
        self._executor = ThreadPoolExecutor(max_workers=workers + short_lane, thread_name_prefix="inference")
        self._tasks: list[asyncio.Task[None]] = []
        self.drain_tokens_per_second = INITIAL_DRAIN_TOKENS_PER_SECOND

    def start(self) -> None:
        self._arrived = asyncio.Event()
        self._tasks = [asyncio.create_task(self._run(), name=f"batcher-{i}") for i in range(self._workers)]
        if self._short_lane:
            self._tasks.append(asyncio.create_task(self._run(short_only=True), name="batcher-short"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def pending_tokens(self) -> int:
        return self._queue.total_tokens  # one int, read whole

    def cost(self, texts: list[str]) -> int:
        """The estimated tokens of work `texts` put in the queue (the unit of admission and rate limits)."""
        return sum(estimate_tokens(text, self._max_seq_len) for text in texts)

    async def predict(self, texts: list[str], client: str = "anonymous") -> tuple[np.ndarray, Any]:
        """Probabilities (LABELS order) for `texts`, and the model that produced them.

        All texts of one request are answered by the same model version, even across a hot-swap. Raises
        Overloaded (refused unqueued), NoModelLoaded, or TextRejected with the index of the failing text.
        """
        if self._get_model() is None:
            raise NoModelLoaded("no model loaded yet")
        assert self._arrived is not None, "start() the batcher first"
        loop = asyncio.get_running_loop()
        pending = [
            Pending(text, estimate_tokens(text, self._max_seq_len), client, loop.create_future()) for text in texts
        ]
        cost = sum(item.tokens for item in pending)
        with self._queue_lock:
            ahead = self._queue.work_ahead(client, cost)
            if self._queue.total_texts and ahead > self._max_queue_tokens:
                retry_after = (ahead - self._max_queue_tokens) / self.drain_tokens_per_second
                raise Overloaded(max(1.0, retry_after), ahead, self._max_queue_tokens)
            self._queue.put(pending)
        self._arrived.set()
        answers = await asyncio.gather(*(item.future for item in pending), return_exceptions=True)
        results = [_unwrap(answer, index) for index, answer in enumerate(answers)]
        models = {id(model): model for _, model in results}
        if len(models) > 1:
            # A swap happened between this request's batches: answer wholly with the newest model (the current one:
            # with two lanes the request's last text may have run on the older model).
            newest = self._get_model() or results[-1][1]
            rows = await loop.run_in_executor(self._executor, _forward_isolated, newest, texts)
            return _stack(rows), newest
        return _stack([row for row, _ in results]), results[0][1]

    async def _run(self, *, short_only: bool = False) -> None:
        """One inference lane; the short-only lane takes short texts only, so they never wait for a long pass."""
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._has_work(short_only):
                self._arrived.clear()
                await self._arrived.wait()
            # One turn of the event loop lets requests whose bytes already arrived reach the queue: under load
            # batches grow for free, and a lone request pays one loop iteration.
            await asyncio.sleep(0)
            deadline = loop.time() + self._max_wait
            while len(self._queue) < self._max_size and (remaining := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch = self._take(short_only)
            if not batch:
                continue
            try:
                await loop.run_in_executor(self._executor, self._run_while_queued, loop, batch, short_only)
            except Exception as exc:  # the executor itself failed (shut down): nothing was computed
                _fail(batch, exc)

    def _has_work(self, short_only: bool) -> bool:
        with self._queue_lock:
            return self._queue.has_short() if short_only else bool(self._queue)

    def _take(self, short_only: bool) -> list[Pending]:
        with self._queue_lock:
            return self._queue.take_batch(self._max_size, self._max_tokens, short_only=short_only)

    def _run_while_queued(self, loop: asyncio.AbstractEventLoop, batch: list[Pending], short_only: bool) -> None:
        """In a lane's thread: run `batch`, hand its answers to the event loop, and take the next batch here while
        texts are queued. With a wait configured (`max_wait`), the event loop forms every batch instead."""
        while batch:
            model = self._get_model()
            started = time.perf_counter()
            if model is None:
                rows: list[np.ndarray | BaseException] = [NoModelLoaded("no model loaded")] * len(batch)
            else:
                rows = _forward_isolated(model, [item.text for item in batch])
            seconds = time.perf_counter() - started
            try:
                loop.call_soon_threadsafe(self._deliver, batch, rows, model, seconds)
            except RuntimeError:  # the loop closed while this pass ran: nobody waits for these answers
                return
            batch = self._take(short_only) if self._max_wait == 0 else []

    def _deliver(
        self, batch: list[Pending], rows: list[np.ndarray | BaseException], model: Any, seconds: float
    ) -> None:
        """In the event loop: each text's answer to its caller."""
        if model is not None:
            self._observe_drain(batch, seconds)
            if self._on_batch:
                self._on_batch(len(batch))
        for item, row in zip(batch, rows, strict=True):
            if item.future.done():
                continue
            if isinstance(row, BaseException):
                item.future.set_exception(row)
            else:
                item.future.set_result((row, model))

    def _observe_drain(self, batch: list[Pending], seconds: float) -> None:
        if seconds <= 0:
            return
        rate = sum(item.tokens for item in batch) / seconds
        self.drain_tokens_per_second += _DRAIN_SMOOTHING * (rate - self.drain_tokens_per_second)


def _fail(batch: list[Pending], exc: BaseException) -> None:
    for item in batch:
        if not item.future.done():
            item.future.set_exception(exc)


def _unwrap(answer: Any, index: int) -> Any:
    """The answer for the request's text `index`, or its error raised (a rejected text with its index)."""
    if isinstance(answer, TextRejected):
        raise TextRejected(answer.reason, index, answer.kind)
    if isinstance(answer, BaseException):
        raise answer
    return answer


def _stack(rows: list[Any]) -> np.ndarray:
    return np.stack([_unwrap(row, index) for index, row in enumerate(rows)])
