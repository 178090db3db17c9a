"""The micro-batcher on its own: size and token caps, merging, the bounded wait, fair order across clients, failure
isolation, admission by work, and one model version per request across a hot-swap.

Deterministic: the fake classifier records every forward pass and can hold one on a threading.Event, so a test
decides what is queued while a batch runs; waiting is done on events and loop turns, never on sleeps.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from guardloop.service.admission import FairQueue, Overloaded, Pending, estimate_tokens
from guardloop.service.app import create_app
from guardloop.service.batcher import MicroBatcher, NoModelLoaded, TextRejected

from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from tests.conftest import ADMIN_TOKEN, free_port, wait_for
from tests.tiny_onnx import publish_tiny

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
@pytest.mark.anyio
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


@pytest.mark.anyio
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


@pytest.mark.anyio
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


@pytest.mark.anyio
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


@pytest.mark.anyio
async def test_a_lone_text_waits_at_most_max_wait_for_company():
    model = FakeModel(FakeClassifier(), "v1")
    batcher, _ = batcher_for(model, max_size=8, max_wait_ms=50)
    await started(batcher)
    try:
        # Nobody joins: the batch runs, short, once its 50 ms are up. The bound is generous for a busy machine
        # (100x the wait); a wait of seconds, or one that never ends (cut off at 30 s), does not meet it.
        started_at = time.monotonic()
        probs, _ = await asyncio.wait_for(batcher.predict(["alone"]), 30)
        waited = time.monotonic() - started_at
    finally:
        await batcher.stop()
    assert model.classifier.batches == [["alone"]] and probs.shape == (1, len(LABELS))
    assert waited < 5, waited


@pytest.mark.anyio
@pytest.mark.parametrize(("max_wait_ms", "batches_while_the_loop_is_busy"), [(0, 3), (1, 1)])
async def test_a_lane_takes_its_next_batches_itself_unless_a_wait_is_configured(
    max_wait_ms, batches_while_the_loop_is_busy
):
    model = FakeModel(FakeClassifier(hold=True), "v1")
    batcher, _ = batcher_for(model, max_size=4, max_wait_ms=max_wait_ms)
    await started(batcher)
    try:
        request = asyncio.ensure_future(batcher.predict([f"text {i}" for i in range(12)]))
        await entered(model.classifier)  # the first batch runs; 8 texts wait
        model.classifier.hold = False
        model.classifier.release.set()
        # wait_for blocks this thread, the event loop's, as a burst of requests to parse would keep it busy. Without
        # a wait the lane's thread runs the two waiting batches on its own; with one, the loop forms every batch.
        reached = wait_for(lambda: len(model.classifier.batches) == 3, timeout=10 if max_wait_ms == 0 else 0.5)
        assert len(model.classifier.batches) == batches_while_the_loop_is_busy and reached == (max_wait_ms == 0)
        probs, _ = await request
    finally:
        await stopped(batcher, model)
    assert [len(batch) for batch in model.classifier.batches] == [4, 4, 4]
    assert probs.shape == (12, len(LABELS))


# ------------------------------------------------------------------ fairness
@pytest.mark.anyio
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


@pytest.mark.anyio
async def test_callers_arriving_while_a_flood_runs_go_into_the_next_batch():
    model = FakeModel(FakeClassifier(hold=True), "v1")
    batcher, _ = batcher_for(model, max_size=4)
    await started(batcher)
    try:
        flood = asyncio.ensure_future(batcher.predict([f"heavy {i}" for i in range(40)], "heavy"))
        await entered(model.classifier)  # the flood's first batch runs; 36 of its texts wait
        light = asyncio.ensure_future(batcher.predict(["light"], "light"))
        # The light text is queued (the flood's 36 waiting texts alone already count 138 tokens: "heavy 10" has 4).
        waiting = sum(estimate_tokens(f"heavy {i}", 128) for i in range(4, 40)) + estimate_tokens("light", 128)
        await wait_until(lambda: batcher.pending_tokens == waiting)
        model.classifier.hold = False
        model.classifier.release.set()
        await asyncio.gather(flood, light)
    finally:
        await stopped(batcher, model)
    assert "light" in model.classifier.batches[1]


@pytest.mark.anyio
async def test_the_fair_queue_takes_one_text_per_client_per_turn():
    loop = asyncio.get_running_loop()
    queue = FairQueue()
    queue.put([Pending(f"a{i}", 1, "a", loop.create_future()) for i in range(3)])
    queue.put([Pending("b0", 1, "b", loop.create_future())])
    queue.put([Pending(f"c{i}", 1, "c", loop.create_future()) for i in range(2)])
    assert [item.text for item in queue.take_batch(4, 1000)] == ["a0", "b0", "c0", "a1"]
    assert [item.text for item in queue.take_batch(4, 1000)] == ["c1", "a2"]
    assert queue.total_tokens == 0 and len(queue) == 0


@pytest.mark.anyio
async def test_a_one_line_text_is_never_padded_to_a_long_flood_and_goes_first():
    model = FakeModel(FakeClassifier(hold=True), "v1")
    long = "x" * 4000
    batcher, _ = batcher_for(model, max_size=32, max_tokens=2 * 128)
    await started(batcher)
    try:
        flood = [asyncio.ensure_future(batcher.predict([long] * 16, f"heavy-{i}")) for i in range(2)]
        await entered(model.classifier)  # two long texts run; 30 wait
        light = asyncio.ensure_future(batcher.predict(["hello"], "light"))
        await wait_until(lambda: len(batcher._queue) == 31)
        model.classifier.hold = False
        model.classifier.release.set()
        await asyncio.gather(*flood, light)
    finally:
        await stopped(batcher, model)
    assert model.classifier.batches[1] == ["hello"]  # next, and alone: not padded to 128 tokens beside a long text
    assert all(len(batch) == 2 for batch in model.classifier.batches[2:])


# ------------------------------------------------------------------ failure isolation
@pytest.mark.anyio
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


@pytest.mark.anyio
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
@pytest.mark.anyio
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


@pytest.mark.anyio
async def test_an_idle_service_admits_a_request_larger_than_the_bound():
    model = FakeModel(FakeClassifier(), "v1")
    batcher, _ = batcher_for(model, max_queue_tokens=10)
    await started(batcher)
    try:
        probs, _ = await batcher.predict(["x" * 4000] * 3)
    finally:
        await batcher.stop()
    assert probs.shape == (3, len(LABELS))


@pytest.mark.anyio
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
@pytest.mark.anyio
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


# ------------------------------------------------------------------ through the service
MARKER = "zzfailzz"  # the served model is made to fail on texts containing this


@contextmanager
def served(settings: Settings) -> Iterator[tuple[str, FastAPI]]:
    """The real app under uvicorn on loopback; yields its URL and the app (to reach its model and batcher)."""
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started or not thread.is_alive(), timeout=60) and server.started
    try:
        yield f"http://127.0.0.1:{server.config.port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=15)


def failing_on_marker(app: FastAPI, hold: threading.Event | None = None) -> list[list[str]]:
    """Make the served classifier raise on MARKER (and wait on `hold`); returns the batches it is given."""
    classifier = app.state.holder.current.classifier
    original = classifier.predict_proba
    batches: list[list[str]] = []

    def predict_proba(texts: list[str]) -> np.ndarray:
        batches.append(list(texts))
        if hold is not None:
            assert hold.wait(30)
        if any(MARKER in text for text in texts):
            raise ValueError("the tokenizer cannot encode this text")
        return original(texts)

    classifier.predict_proba = predict_proba
    return batches


@pytest.fixture
def tiny_model(registry, tmp_path) -> str:
    return publish_tiny(registry, tmp_path, seed=3)


def test_malformed_texts_among_concurrent_good_ones_fail_alone_with_a_4xx(settings, tiny_model, caplog):
    # A bounded wait makes concurrent requests share batches, so failing texts do meet good ones.
    configured = Settings(**(settings.model_dump() | {"batch_max_wait_ms": 100, "pool_enabled": False}))
    hostile_bodies = [json.dumps({"text": f"{MARKER} number {n}"}).encode() for n in range(10)] + [
        b'{"text": "lone \\ud800 surrogate"}',
        b'{"text": "unterminated',
    ]
    with served(configured) as (url, app):
        batches = failing_on_marker(app)

        def good(n: int) -> list[int]:
            with httpx.Client(base_url=url, timeout=60) as client:
                return [
                    client.post("/classify", json={"texts": [f"hello {n} {i}", "how are you"]}).status_code
                    for i in range(12)
                ]

        def hostile() -> list[httpx.Response]:
            with httpx.Client(base_url=url, timeout=60) as client:
                headers = {"Content-Type": "application/json"}
                return [client.post("/classify", content=body, headers=headers) for body in hostile_bodies]

        with ThreadPoolExecutor(6) as pool:
            good_runs = [pool.submit(good, n) for n in range(4)]
            hostile_runs = [pool.submit(hostile) for _ in range(2)]
            good_statuses = [status for run in good_runs for status in run.result()]
            refused = [response for run in hostile_runs for response in run.result()]
    assert good_statuses == [200] * 48
    assert all(400 <= r.status_code < 500 and r.json()["detail"] for r in refused), [r.text for r in refused]
    marker_refusals = [r for r in refused if r.status_code == 422 and "could not be classified" in r.json()["detail"]]
    assert len(marker_refusals) == 20
    shared = [batch for batch in batches if len(batch) > 1 and any(MARKER in text for text in batch)]
    assert shared, "no failing text shared a batch with others: the test proved nothing"
    assert not [record for record in caplog.records if record.exc_info], "a traceback was logged"


def test_work_past_the_bound_gets_503_with_retry_after_at_once(settings, tiny_model):
    configured = Settings(**(settings.model_dump() | {"queue_max_tokens": 300, "pool_enabled": False}))
    long = "word " * 800
    hold = threading.Event()
    with served(configured) as (url, app), ThreadPoolExecutor(2) as pool:
        batches = failing_on_marker(app, hold)
        try:
            running = pool.submit(httpx.post, f"{url}/classify", json={"text": long}, timeout=60)
            assert wait_for(lambda: len(batches) == 1)  # in a forward pass, held
            queued = pool.submit(httpx.post, f"{url}/classify", json={"texts": [long, long]}, timeout=60)
            assert wait_for(lambda: app.state.batcher.pending_tokens == 256)
            refused = httpx.post(f"{url}/classify", json={"texts": [long] * 2}, timeout=60)
        finally:
            hold.set()
        assert running.result().status_code == 200 and queued.result().status_code == 200
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert "the service is busy" in refused.json()["detail"] and "retry after" in refused.json()["detail"]


def test_a_client_past_its_tokens_per_second_gets_429_with_retry_after(settings, tiny_model):
    configured = Settings(**(settings.model_dump() | {"rate_limit_classify_tokens_per_client": "300/minute"}))
    with (
        TestClient(create_app(configured), client=("127.0.0.1", 50000)) as client,
        TestClient(create_app(configured), client=("127.0.0.9", 50000)) as neighbour,
    ):
        assert client.post("/classify", json={"texts": ["x" * 4000] * 2}).status_code == 200  # 256 of 300
        refused = client.post("/classify", json={"texts": ["x" * 4000] * 2})
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "too much text from this client" in refused.json()["detail"] and "300/minute" in refused.json()["detail"]
        assert neighbour.post("/classify", json={"texts": ["x" * 4000] * 2}).status_code == 200


def test_failed_authentications_are_limited_per_address(settings, tiny_model):
    configured = Settings(**(settings.model_dump() | {"rate_limit_auth_failures_per_ip": "3/minute"}))
    app = create_app(configured)
    wrong = {"Authorization": "Bearer wrong-token"}
    right = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with TestClient(app, client=("127.0.0.1", 50000)) as client, TestClient(app, client=("127.0.0.2", 50000)) as other:
        assert [client.post("/admin/reload", headers=wrong).status_code for _ in range(3)] == [403] * 3
        refused = client.post("/admin/reload", headers=right)  # even the right token waits now
        # 3/minute: a failure is forgiven every 20 s; time passes between them, so the wait is at most 20 s
        assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 20
        assert "failed authentications" in refused.json()["detail"]
        assert client.get("/review/queue", headers=wrong).status_code == 429  # reviewer routes count too
        assert client.post("/classify", json={"text": "hi"}).status_code == 200  # classify is not affected
        assert other.get("/admin/pool", headers=right).status_code == 200  # another address is not


@pytest.mark.anyio
async def test_with_a_short_lane_a_one_line_text_is_answered_while_a_long_pass_runs():
    class HoldsLongTexts(FakeClassifier):
        def predict_proba(self, texts: list[str]) -> np.ndarray:
            self.hold = any(len(text) > 1000 for text in texts)  # only passes with long texts wait for release
            return super().predict_proba(texts)

    model = FakeModel(HoldsLongTexts(), "v1")
    batcher, _ = batcher_for(model, max_size=32, max_tokens=128, short_lane=True)
    await started(batcher)
    try:
        flood = asyncio.ensure_future(batcher.predict(["x" * 4000] * 4, "heavy"))
        await entered(model.classifier)  # a long text's pass is held in the other lane
        probs, _ = await asyncio.wait_for(batcher.predict(["hello"], "light"), 30)  # answered meanwhile
        assert not flood.done()
        model.classifier.release.set()
        await flood
    finally:
        await stopped(batcher, model)
    assert probs.shape == (1, len(LABELS)) and ["hello"] in model.classifier.batches
