"""The micro-batcher on its own: size and token caps, merging, the bounded wait, round-robin fairness, failure
isolation, admission by work, and one model version per request across a hot-swap.

Deterministic: the fake classifier records every forward pass and can hold one on a threading.Event, so a test
decides what is queued while a batch runs; waiting is done on events and loop turns, never on sleeps.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from guardloop.service.admission import FairQueue, Overloaded, Pending, estimate_tokens
from guardloop.service.batcher import MicroBatcher, NoModelLoaded, TextRejected

from guardloop.core.labels import LABELS

pytestmark = pytest.mark.anyio

FAIL = "<fail>"  # a text the fake model cannot classify, alone or in a batch


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class FakeClassifier:
    """Row i of a batch is [value, 0, ...]; `FAIL` raises; `hold` (when set) keeps each pass waiting on `release`."""

    value: float = 1.0
    batches: list[list[str]] = field(default_factory=list)
    hold: bool = False
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        self.batches.append(list(texts))
        if self.hold:
            self.entered.set()
            assert self.release.wait(30), "the test never released the forward pass"
        if FAIL in texts:
            raise ValueError("cannot encode this text")
        rows = np.zeros((len(texts), len(LABELS)))
        rows[:, 0] = self.value
        return rows


@dataclass
class FakeModel:
    classifier: FakeClassifier
    version: str


async def wait_until(predicate: Callable[[], bool]) -> None:
    """Give the loop turns until `predicate` holds (threads report through events, so this ends quickly)."""
    for _ in range(100_000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition never became true")


async def entered(classifier: FakeClassifier) -> None:
    await asyncio.to_thread(classifier.entered.wait, 30)
    classifier.entered.clear()


def batcher_for(model: FakeModel | None, **options) -> tuple[MicroBatcher, list[FakeModel | None]]:
    current = [model]
    options = {"max_size": 32, "max_wait_ms": 0} | options
    return MicroBatcher(lambda: current[0], **options), current


async def started(batcher: MicroBatcher) -> MicroBatcher:
    batcher.start()
    return batcher


async def stopped(batcher: MicroBatcher, *models: FakeModel) -> None:
    """Stop the batcher; a held forward pass is released first, so a failed test ends instead of hanging."""
    for model in models:
        model.classifier.release.set()
    await batcher.stop()


# ------------------------------------------------------------------ size cap, merging, the bounded wait
async def test_concurrent_requests_merge_into_batches_of_at_most_max_size():
    model = FakeModel(FakeClassifier(), "v1")
    batcher, _ = batcher_for(model, max_size=4)
    await started(batcher)
    try:
        answers = await asyncio.gather(*(batcher.predict([f"text {i}"]) for i in range(10)))
    finally:
        await batcher.stop()
    assert [len(batch) for batch in model.classifier.batches] == [4, 4, 2]  # merged, and capped at 4
    assert all(version is model for _, version in answers)
    assert all(probs.shape == (1, len(LABELS)) for probs, _ in answers)


async def test_a_batch_is_capped_by_padded_tokens():
    model = FakeModel(FakeClassifier(), "v1")
    long = "x" * 4000  # 128 tokens, the model's limit
    batcher, _ = batcher_for(model, max_size=32, max_tokens=3 * 128)
    await started(batcher)
    try:
        await batcher.predict([long] * 7)
    finally:
        await batcher.stop()
    assert [len(batch) for batch in model.classifier.batches] == [3, 3, 1]


async def test_without_a_wait_a_lone_request_runs_at_once():
    model = FakeModel(FakeClassifier(hold=True), "v1")
    batcher, _ = batcher_for(model, max_size=8, max_wait_ms=0)
    await started(batcher)
    try:
        first = asyncio.ensure_future(batcher.predict(["first"]))
        await entered(model.classifier)  # the lone text is in a forward pass without waiting for company
        second = asyncio.ensure_future(batcher.predict(["second"]))
        model.classifier.release.set()
        await asyncio.gather(first, second)
    finally:
        await stopped(batcher, model)
    assert model.classifier.batches == [["first"], ["second"]]


async def test_within_the_wait_later_texts_join_and_a_full_batch_does_not_wait():
    model = FakeModel(FakeClassifier(), "v1")
    batcher, _ = batcher_for(model, max_size=3, max_wait_ms=600_000)  # a wait no test would sit out
    await started(batcher)
    try:
        first = asyncio.ensure_future(batcher.predict(["a"]))
        for _ in range(50):  # many loop turns later, the batch is still open
            await asyncio.sleep(0)
        assert model.classifier.batches == []
        rest = asyncio.ensure_future(batcher.predict(["b", "c"]))  # fills it: it runs now, not in 10 minutes
        await asyncio.wait_for(asyncio.gather(first, rest), 60)
    finally:
        await batcher.stop()
    assert model.classifier.batches == [["a", "b", "c"]]


# ------------------------------------------------------------------ fairness
async def test_one_text_callers_share_the_first_batch_with_a_64_text_request():
    model = FakeModel(FakeClassifier(), "v1")
    batcher, _ = batcher_for(model, max_size=8)
    await started(batcher)
    try:
        heavy = asyncio.ensure_future(batcher.predict([f"heavy {i}" for i in range(64)], "heavy"))
        light = [asyncio.ensure_future(batcher.predict([f"light {i}"], f"light-{i}")) for i in range(3)]
        await asyncio.gather(heavy, *light)
    finally:
        await batcher.stop()
    first = model.classifier.batches[0]
    assert {"light 0", "light 1", "light 2"} <= set(first) and len(first) == 8
    assert sum(len(batch) for batch in model.classifier.batches) == 67


async def test_callers_arriving_while_a_flood_runs_go_into_the_next_batch():
    model = FakeModel(FakeClassifier(hold=True), "v1")
    batcher, _ = batcher_for(model, max_size=4)
    await started(batcher)
    try:
        flood = asyncio.ensure_future(batcher.predict([f"heavy {i}" for i in range(40)], "heavy"))
        await entered(model.classifier)  # the flood's first batch runs; 36 of its texts wait
        light = asyncio.ensure_future(batcher.predict(["light"], "light"))
        await wait_until(lambda: batcher.pending_tokens > 36 * estimate_tokens("heavy 0", 128))
        model.classifier.hold = False
        model.classifier.release.set()
        await asyncio.gather(flood, light)
    finally:
        await stopped(batcher, model)
    assert "light" in model.classifier.batches[1]


async def test_the_fair_queue_takes_one_text_per_client_per_turn():
    loop = asyncio.get_running_loop()
    queue = FairQueue()
    queue.put([Pending(f"a{i}", 1, "a", loop.create_future()) for i in range(3)])
    queue.put([Pending("b0", 1, "b", loop.create_future())])
    queue.put([Pending(f"c{i}", 1, "c", loop.create_future()) for i in range(2)])
    assert [item.text for item in queue.take_batch(4, 1000)] == ["a0", "b0", "c0", "a1"]
    assert [item.text for item in queue.take_batch(4, 1000)] == ["c1", "a2"]
    assert queue.total_tokens == 0 and len(queue) == 0


# ------------------------------------------------------------------ failure isolation
async def test_a_failing_text_fails_only_its_own_request():
    model = FakeModel(FakeClassifier(), "v1")
    batcher, _ = batcher_for(model, max_size=16)
    await started(batcher)
    try:
        answers = await asyncio.gather(
            batcher.predict(["good 1", "good 2"], "a"),
            batcher.predict(["fine", FAIL], "hostile"),
            batcher.predict(["good 3"], "b"),
            return_exceptions=True,
        )
    finally:
        await batcher.stop()
    good_a, bad, good_b = answers
    assert isinstance(bad, TextRejected) and bad.index == 1 and "ValueError: cannot encode" in str(bad)
    assert good_a[0].shape == (2, len(LABELS)) and good_b[0].shape == (1, len(LABELS))
    assert len(model.classifier.batches[0]) == 5  # they did share the failing batch


async def test_when_every_text_fails_alone_the_model_error_is_raised_not_a_rejection():
    class Broken(FakeClassifier):
        def predict_proba(self, texts: list[str]) -> np.ndarray:
            raise RuntimeError("onnxruntime: invalid graph")

    batcher, _ = batcher_for(FakeModel(Broken(), "v1"), max_size=16)
    await started(batcher)
    try:
        answers = await asyncio.gather(batcher.predict(["a"], "x"), batcher.predict(["b"], "y"), return_exceptions=True)
    finally:
        await batcher.stop()
    assert all(isinstance(answer, RuntimeError) and "invalid graph" in str(answer) for answer in answers)


# ------------------------------------------------------------------ admission by work
async def test_work_past_the_bound_is_refused_at_once_with_a_retry_time():
    model = FakeModel(FakeClassifier(hold=True), "v1")
    long = "x" * 4000  # 128 tokens each
    batcher, _ = batcher_for(model, max_size=4, max_queue_tokens=10 * 128)
    await started(batcher)
    try:
        first = asyncio.ensure_future(batcher.predict([long] * 4, "heavy-1"))
        await entered(model.classifier)  # running: nothing of it is queued any more
        queued = asyncio.ensure_future(batcher.predict([long] * 8, "heavy-1"))
        await wait_until(lambda: batcher.pending_tokens == 8 * 128)
        # (wait_for: were it queued, it would wait for the held pass; the test then fails instead of hanging)
        with pytest.raises(Overloaded) as refused:  # 8 more of heavy-1 would have 16 x 128 ahead of its last
            await asyncio.wait_for(batcher.predict([long] * 8, "heavy-1"), 30)
        assert refused.value.retry_after >= 1 and "retry after" in str(refused.value)
        with pytest.raises(Overloaded):  # another flood: its 8 texts share turns with heavy-1's 8 = 16 x 128
            await asyncio.wait_for(batcher.predict([long] * 8, "heavy-2"), 30)
        light = asyncio.ensure_future(batcher.predict(["hi"], "light"))  # a one-text caller still gets in
        model.classifier.hold = False
        model.classifier.release.set()
        await asyncio.gather(first, queued, light)
    finally:
        await stopped(batcher, model)
    assert batcher.pending_tokens == 0


async def test_an_idle_service_admits_a_request_larger_than_the_bound():
    model = FakeModel(FakeClassifier(), "v1")
    batcher, _ = batcher_for(model, max_queue_tokens=10)
    await started(batcher)
    try:
        probs, _ = await batcher.predict(["x" * 4000] * 3)
    finally:
        await batcher.stop()
    assert probs.shape == (3, len(LABELS))


async def test_no_model_is_refused_before_queueing():
    batcher, _ = batcher_for(None)
    await started(batcher)
    try:
        with pytest.raises(NoModelLoaded):
            await batcher.predict(["hi"])
    finally:
        await batcher.stop()
    assert batcher.pending_tokens == 0


# ------------------------------------------------------------------ hot-swap
async def test_a_request_split_across_a_swap_is_answered_wholly_by_the_newest_model():
    old = FakeModel(FakeClassifier(value=1.0, hold=True), "old")
    new = FakeModel(FakeClassifier(value=2.0), "new")
    batcher, current = batcher_for(old, max_size=2)
    await started(batcher)
    try:
        request = asyncio.ensure_future(batcher.predict(["a", "b", "c"]))
        await entered(old.classifier)  # "a", "b" run on the old model; "c" waits
        current[0] = new
        old.classifier.release.set()
        probs, model = await request
    finally:
        await stopped(batcher, old)
    assert model is new and probs[:, 0].tolist() == [2.0, 2.0, 2.0]
    assert new.classifier.batches == [["c"], ["a", "b", "c"]]  # the rest, then the whole request again
