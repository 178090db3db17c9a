"""Micro-batching: concurrent requests share one forward pass.

Each text waits at most `max_wait` for others to join, and a batch never exceeds `max_size`, so a lone
request pays almost nothing and a burst is run in a few large (much cheaper per text) passes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from guardloop.service.model_holder import LoadedModel


class NoModelLoaded(Exception):
    """The service has no model to answer with yet."""


@dataclass
class _Pending:
    text: str
    future: asyncio.Future[tuple[np.ndarray, LoadedModel]]


class MicroBatcher:
    def __init__(
        self,
        get_model: Callable[[], LoadedModel | None],
        *,
        max_size: int,
        max_wait_ms: float,
        workers: int = 1,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        self._get_model = get_model
        self._max_size = max_size
        self._max_wait = max_wait_ms / 1000
        self._workers = workers
        self._on_batch = on_batch
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="inference")
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._run(), name=f"batcher-{i}") for i in range(self._workers)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)

    async def predict(self, texts: list[str]) -> tuple[np.ndarray, LoadedModel]:
        """Probabilities (LABELS order) for `texts`, and the model that produced them.

        All texts of one request are answered by the same model version, even across a hot-swap.
        """
        model = self._get_model()
        if model is None:
            raise NoModelLoaded("no model loaded yet")
        loop = asyncio.get_running_loop()
        pending = [_Pending(text, loop.create_future()) for text in texts]
        for item in pending:
            self._queue.put_nowait(item)
        results = await asyncio.gather(*(item.future for item in pending))
        versions = {id(m) for _, m in results}
        if len(versions) > 1:
            # A swap happened between this request's batches: answer wholly with the newest model.
            newest = results[-1][1]
            probs = await loop.run_in_executor(self._executor, newest.classifier.predict_proba, texts)
            return probs, newest
        return np.stack([p for p, _ in results]), results[0][1]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            # One turn of the event loop lets requests whose bytes already arrived reach the queue: under load
            # batches grow for free, and a lone request pays one loop iteration.
            await asyncio.sleep(0)
            deadline = time.monotonic() + self._max_wait
            while len(batch) < self._max_size:
                try:
                    batch.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [item for item in batch if not item.future.done()]  # callers that gave up
            if not batch:
                continue
            model = self._get_model()
            try:
                if model is None:
                    raise NoModelLoaded("no model loaded")
                probs = await loop.run_in_executor(
                    self._executor, model.classifier.predict_proba, [item.text for item in batch]
                )
            except Exception as exc:
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            if self._on_batch:
                self._on_batch(len(batch))
            for item, row in zip(batch, probs, strict=True):
                if not item.future.done():
                    item.future.set_result((row, model))
