"""/metrics: traffic, a hot-swap, a refused swap, a review label and a real (small) cycle, then every metric of the
contract (k8s/METRICS.md) is scraped with plausible values. The default registry is process-wide, so the tests
compare a scrape before with one after (deltas), never absolute counts."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from guardloop.models.registry import ModelRegistry
from guardloop.service.pool_writer import PoolWriter
from guardloop.trainer.cycle import CycleRunner, OracleLabeler
from guardloop.trainer.variations import VariationConfig, VariationGenerator
from prometheus_client.parser import text_string_to_metric_families

from guardloop.core import trainer_telemetry
from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from guardloop.storage import Database, LabelRequest, PoolRecord, PoolRepository, ReviewerRepository, WriteOutcome
from guardloop.storage.cycles import PROMOTED
from tests.conftest import ADMIN_TOKEN, free_port, live_server, wait_for
from tests.test_cycle import POOL_TEXTS, SEED, fill_pool
from tests.tiny_onnx import publish_tiny

CONTRACT_FILE = Path(__file__).resolve().parents[1] / "k8s" / "METRICS.md"


@contextmanager
def loopback_llm() -> Iterator[tuple[list[str], str]]:
    """A real OpenAI-compatible server on loopback. Each answer holds two label-preserving rewrites of the post
    (the cycle trains on them) and one line of chatter, so something is accepted and something filtered."""
    posts: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            post = re.search(r"<post>\n(.*)\n</post>", body["messages"][-1]["content"], re.DOTALL)
            posts.append(post.group(1) if post else "")
            content = (
                "Here are two variations:\n"
                f"1. a friend asked me this yesterday and i keep thinking about it: {posts[-1]}\n"
                f"2. {posts[-1]} - sorry to bother you, i really need to know what you think\n"
            )
            answer = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 0,
                "model": body["model"],
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140},
            }
            payload = json.dumps(answer).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield posts, f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class ContractMetric:
    name: str
    kind: str
    labels: frozenset[str]


def metric_contract() -> list[ContractMetric]:
    rows = re.findall(r"^\| `(guardloop_[a-z0-9_]+)` \| (\w+) \|([^|]*)\|", CONTRACT_FILE.read_text(), re.MULTILINE)
    assert len(rows) >= 26, "the table of k8s/METRICS.md was not found"
    return [
        ContractMetric(name, kind, frozenset(label.strip() for label in labels.split(",") if label.strip()))
        for name, kind, labels in rows
    ]


class Scrape:
    """One scrape of /metrics: family types and label names, and every sample's value."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        self.label_names: dict[str, set[str]] = {}
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            names = self.label_names.setdefault(family.name, set())
            for sample in family.samples:
                names.update(key for key in sample.labels if key != "le")
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float:
        """A sample's value; 0 when the series does not exist (yet)."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def series(self, name: str) -> dict[frozenset[tuple[str, str]], float]:
        return {labels: value for (sample, labels), value in self.samples.items() if sample == name}

    def family(self, metric: ContractMetric) -> str:
        # prometheus-client names a counter's family without its `_total` suffix.
        return metric.name.removesuffix("_total") if metric.kind == "counter" else metric.name


def scrape(base_url: str) -> Scrape:
    response = httpx.get(f"{base_url}/metrics", timeout=10)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def test_every_cycle_step_is_a_known_step_label() -> None:
    # The cycle's step names are initialised at 0 from this list; a renamed step must be renamed there too.
    source = (Path(__file__).resolve().parents[1] / "trainer" / "cycle.py").read_text()
    assert set(re.findall(r'self\._step\(cycle, "([^"]+)"\)', source)) == set(trainer_telemetry.CYCLE_STEPS)


@pytest.mark.slow
def test_metrics_show_traffic_swaps_pool_review_and_a_cycle(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    first = publish_tiny(registry, tmp_path, favour="legal-advice")
    settings = Settings(
        registry_dir=registry.root,
        data_dir=tmp_path / "data",
        registry_poll_seconds=0.2,
        metrics_refresh_seconds=0.2,
        pool_sample_rate=1.0,  # every classified text goes to the pool
        pool_flush_seconds=0.05,
        admin_token=ADMIN_TOKEN,
    )
    database = Database(settings.database_url_value)
    with live_server(settings) as url:
        client = httpx.Client(base_url=url, timeout=30)
        assert wait_for(lambda: client.get("/readyz").status_code == 200)
        # The cycle below exposes the trainer's metrics in this process; exposing them first puts their values so
        # far in `before` (other test files in this worker may have counted LLM requests), so deltas are this test's.
        trainer_telemetry.expose_trainer_metrics()
        before = scrape(url)

        # ---- traffic on the first model (it favours legal-advice), a bad request and an unknown path
        texts = ["can my landlord keep my deposit", "hello there", "is this contract fair"]
        for text in texts:
            assert client.post("/classify", json={"text": text}).json()["results"][0]["label"] == "legal-advice"
        assert client.post("/classify", json={"texts": ["one more", "and another"]}).status_code == 200
        assert client.post("/v1/moderations", json={"input": "via openai's shape"}).status_code == 200
        assert client.post("/classify", json={"text": ""}).status_code == 422
        assert client.get("/no/such/page").status_code == 404
        classified = len(texts) + 2 + 1
        classify_ok = len(texts) + 1

        # ---- a hot-swap, then a version that cannot load (refused: the second model keeps serving)
        second = publish_tiny(registry, tmp_path, favour="self-harm", make_current=False)
        registry.promote(second)
        assert wait_for(lambda: client.get("/readyz").json().get("model_version") == second)
        assert client.post("/classify", json={"text": "hello there"}).json()["results"][0]["label"] == "self-harm"
        classified += 1
        classify_ok += 1
        broken = publish_tiny(registry, tmp_path, make_current=False, seed=3)
        (registry.path(broken) / "model.onnx").write_bytes(b"not an onnx model")
        registry.promote(broken)
        assert wait_for(
            lambda: (
                scrape(url).value("guardloop_model_swaps_refused_total")
                > before.value("guardloop_model_swaps_refused_total")
            )
        )

        # ---- the pool: new rows, then a repeat; a writer whose buffer is full drops
        pool = PoolRepository(database)
        assert wait_for(lambda: pool.count() >= 5)
        assert client.post("/classify", json={"text": "hello there"}).status_code == 200  # seen before
        classified += 1
        classify_ok += 1
        assert wait_for(
            lambda: (
                scrape(url).value("guardloop_pool_duplicates_total") > before.value("guardloop_pool_duplicates_total")
            )
        )
        stalled = PoolWriter(lambda batch: WriteOutcome(0, 0), max_queued=1)  # never started: nothing drains it
        scores = dict.fromkeys(LABELS, 1 / 6)
        record = PoolRecord("x", "not-harmful", scores, 1.0, 0.0, "v", "uncertain", None, datetime.now(UTC))
        assert stalled.offer(record) and not stalled.offer(record)

        # ---- the review queue: one item requested a minute ago, then labelled through the review API
        token = ReviewerRepository(database).add("alice")
        item = next(pool.iter_items())
        pool.mark_requested([LabelRequest(item.id, {"strategy": "test"})], at=datetime.now(UTC) - timedelta(minutes=1))
        assert wait_for(lambda: scrape(url).value("guardloop_review_queue_depth") == 1)
        assert 60 <= scrape(url).value("guardloop_review_oldest_item_age_seconds") < 600
        labelled = client.post(
            f"/review/items/{item.id}/label",
            json={"label": "self-harm"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert labelled.status_code == 201, labelled.text
        assert wait_for(lambda: scrape(url).value("guardloop_review_queue_depth") == 0)

        # ---- a small real cycle, in this process (as `serve --with-trainer` runs it), with an LLM that answers
        cycle_settings, cycle_database = small_cycle(tmp_path / "cycle")
        cycle_registry = ModelRegistry(cycle_settings.registry_dir)
        publish_tiny(cycle_registry, tmp_path, seed=7)  # unsure about everything: the consistency filter keeps all
        with loopback_llm() as (llm_posts, llm_url):
            runner = CycleRunner(
                settings=cycle_settings,
                database=cycle_database,
                registry=cycle_registry,
                oracle=OracleLabeler(write_oracle(tmp_path)),
                variation_generator=lambda proba: VariationGenerator(
                    VariationConfig(k=3, retries=0, timeout=10), base_url=llm_url, model="fake", predict_proba=proba
                ),
            )
            cycle = runner.run()
        assert cycle.status == PROMOTED, cycle.reason

        after = scrape(url)
        served_pool_size = pool.count()

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    # ---- every metric of the contract is there, with its type and its labels
    for metric in metric_contract():
        family = after.family(metric)
        assert family in after.types, f"{metric.name} missing from /metrics"
        assert after.types[family] == metric.kind, f"{metric.name} is a {after.types[family]}"
        assert after.label_names[family] == metric.labels, f"{metric.name} has labels {after.label_names[family]}"

    # ---- HTTP: by route template, method and status; durations for every counted request
    assert delta("guardloop_http_requests_total", route="/classify", method="POST", status="200") == classify_ok
    assert delta("guardloop_http_requests_total", route="/classify", method="POST", status="422") == 1
    assert delta("guardloop_http_requests_total", route="/v1/moderations", method="POST", status="200") == 1
    assert delta("guardloop_http_requests_total", route="unmatched", method="GET", status="404") == 1
    label_route = {"route": "/review/items/{item_id}/label", "method": "POST"}
    assert delta("guardloop_http_requests_total", **label_route, status="201") == 1
    assert not any(
        ("route", f"/review/items/{item.id}/label") in labels
        for labels in after.series("guardloop_http_requests_total")
    )
    classify_route = {"route": "/classify", "method": "POST"}
    assert delta("guardloop_http_request_duration_seconds_count", **classify_route) == classify_ok + 1
    assert 0 < delta("guardloop_http_request_duration_seconds_sum", **classify_route) < 10 * (classify_ok + 1)
    assert delta("guardloop_http_request_duration_seconds_bucket", **classify_route, le="+Inf") == classify_ok + 1

    # ---- predictions, flags, uncertainty, batches: one per classified text
    predicted = {label: delta("guardloop_predictions_total", label=label) for label in LABELS}
    assert sum(predicted.values()) == classified
    assert predicted["legal-advice"] == 6 and predicted["self-harm"] == 2
    assert delta("guardloop_flagged_total", label="legal-advice") == 6
    assert delta("guardloop_flagged_total", label="self-harm") == 2
    assert delta("guardloop_flagged_total", label="not-harmful") == 0
    assert delta("guardloop_uncertainty_count") == classified
    assert 0 <= delta("guardloop_uncertainty_sum") < 0.1 * classified  # a favoured label is near certain
    assert delta("guardloop_batch_size_sum") == classified
    assert 1 <= delta("guardloop_batch_size_count") <= classified

    # ---- the model: the second version serves, the first one's series is gone; one swap, one refusal
    assert after.series("guardloop_model_info") == {frozenset({("version", second)}): 1.0}
    assert first != second
    assert after.value("guardloop_model_loaded") == 1
    assert 0 < after.value("guardloop_model_load_seconds") < 30
    assert delta("guardloop_model_swaps_total") == 1
    assert delta("guardloop_model_swaps_refused_total") == 1

    # ---- pool and review
    assert delta("guardloop_pool_writes_total") >= 5
    assert delta("guardloop_pool_duplicates_total") >= 1
    assert delta("guardloop_pool_dropped_total") >= 1
    assert after.value("guardloop_pool_size") == served_pool_size
    assert after.value("guardloop_review_queue_depth") == 0
    assert after.value("guardloop_review_oldest_item_age_seconds") == 0
    assert delta("guardloop_labels_total", reviewer="alice") == 1

    # ---- the cycle: its steps, its outcome, the promoted model's numbers
    for step in cycle.steps:
        assert delta("guardloop_cycle_step_duration_seconds_count", step=step["step"]) >= 1, step
    assert delta("guardloop_cycle_step_duration_seconds_sum", step="train and export") > 1
    assert delta("guardloop_cycles_total", outcome="promoted") == 1
    assert delta("guardloop_cycles_total", outcome="rejected") == 0
    assert delta("guardloop_cycles_total", outcome="failed") == 0
    candidate = cycle.metrics["candidate"]
    assert after.value("guardloop_last_promoted_macro_f1") == pytest.approx(candidate["macro_f1"])
    assert 0 < candidate["macro_f1"] <= 1
    for label in LABELS:
        recall = after.value("guardloop_last_promoted_recall", label=label)
        assert recall == pytest.approx(candidate["per_class_recall"][label]) and 0 <= recall <= 1

    # ---- the LLM: one request per labelled item, none failed; two variations kept, one line filtered, each
    asked = len(llm_posts)
    assert asked == cycle.counts["labeled"] >= 1
    assert delta("guardloop_llm_requests_total") == asked
    assert delta("guardloop_llm_failures_total") == 0
    assert delta("guardloop_llm_request_duration_seconds_count") == asked
    assert 0 < delta("guardloop_llm_request_duration_seconds_sum") < 10 * asked
    assert delta("guardloop_variations_total", outcome="accepted") == 2 * asked
    assert delta("guardloop_variations_total", outcome="filtered") == asked


def small_cycle(root: Path) -> tuple[Settings, Database]:
    """A cycle like tests/test_cycle.py's: a sixth of the seed data, one epoch, a gate that lets it through."""
    root.mkdir()
    small_train = root / "train.jsonl"
    lines = (SEED / "train.jsonl").read_text(encoding="utf-8").splitlines()
    small_train.write_text("\n".join(lines[::6]) + "\n", encoding="utf-8")
    settings = Settings(
        data_dir=root / "data",
        registry_dir=root / "registry",
        database_url=f"sqlite:///{root / 'cycle.db'}",
        train_data=[small_train],
        cycle_budget=4,
        cycle_epochs=1,
        gate_max_macro_f1_drop=1.0,
        gate_max_recall_drop=1.0,
        # One LLM request per labelled item, which the counts below rely on: no item withheld (gold reserve, label
        # check) or left without a budget (deficit budget), no judge question the scripted LLM cannot answer, and
        # no composing request for an item short of its budget. Each of those is tested on its own (test_gate,
        # test_suspects, test_variation_budget, test_verifier, test_compose).
        gold_share=0.0,
        label_check=False,
        llm_variation_budget="uniform",
        llm_verify=False,
        llm_compose_examples=0,
    )
    database = Database(settings.database_url_value)
    fill_pool(database, list(POOL_TEXTS))
    return settings, database


def write_oracle(tmp_path: Path) -> Path:
    oracle = tmp_path / "oracle.tsv"
    oracle.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in POOL_TEXTS.items()), encoding="utf-8")
    return oracle


def test_metrics_answer_while_the_database_is_down(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    publish_tiny(registry, tmp_path)
    settings = Settings(
        registry_dir=registry.root,
        data_dir=tmp_path / "data",
        # Nothing listens there: every query fails at once.
        database_url=f"postgresql+psycopg://guardloop@127.0.0.1:{free_port()}/guardloop",
        metrics_refresh_seconds=0.1,
    )
    with live_server(settings) as url:
        assert httpx.post(f"{url}/classify", json={"text": "still answering"}, timeout=30).status_code == 200
        for _ in range(3):
            metrics = scrape(url)
            assert "guardloop_pool_size" in metrics.types and metrics.value("guardloop_model_loaded") == 1


@pytest.mark.slow
def test_the_trainer_process_serves_its_own_metrics_only(tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "GUARDLOOP_DATA_DIR": str(tmp_path / "data"),
        "GUARDLOOP_REGISTRY_DIR": str(tmp_path / "registry"),
        "GUARDLOOP_TRAINER_METRICS_PORT": str(port),
        "GUARDLOOP_CYCLE_INTERVAL_MINUTES": "600",  # no cycle during the test
    }
    trainer = subprocess.Popen(
        [sys.executable, "-m", "guardloop.cli", "trainer"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:

        def scraped() -> Scrape | None:
            try:
                return scrape(f"http://127.0.0.1:{port}")
            except httpx.TransportError:
                assert trainer.poll() is None, trainer.stderr.read().decode() if trainer.stderr else ""
                return None

        assert wait_for(lambda: scraped() is not None, timeout=60)
        metrics = scraped()
        assert metrics is not None
        assert metrics.value("guardloop_cycles_total", outcome="failed") == 0
        assert "guardloop_llm_requests" in metrics.types and "guardloop_variations" in metrics.types
        # A trainer exporting `guardloop_model_loaded 0` would page as a replica without a model.
        assert not {"guardloop_model_loaded", "guardloop_http_requests", "guardloop_pool_size"} & set(metrics.types)

        # A second trainer cannot take the port: one line that says what to change, exit code 2.
        second = subprocess.run(
            [sys.executable, "-m", "guardloop.cli", "trainer"], env=env, capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 2
        last = second.stderr.strip().splitlines()[-1]
        assert last.startswith("error: GUARDLOOP_TRAINER_METRICS_PORT: port") and "in use" in last, last
        assert "Traceback" not in second.stderr
    finally:
        trainer.terminate()
        trainer.wait(timeout=30)


def test_route_templates_count_refused_bodies_under_their_route(tmp_path):
    registry = ModelRegistry(tmp_path / "registry")
    publish_tiny(registry, tmp_path)
    settings = Settings(registry_dir=registry.root, data_dir=tmp_path / "data", max_body_bytes=1024)
    with live_server(settings) as url:
        before = scrape(url)
        big = json.dumps({"text": "x" * 5000})
        response = httpx.post(f"{url}/classify", content=big, headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert httpx.get(f"{url}/classify").status_code == 405
        after = scrape(url)
    series = {"route": "/classify"}
    for method, status in (("POST", "413"), ("GET", "405")):
        value = after.value("guardloop_http_requests_total", **series, method=method, status=status)
        assert value - before.value("guardloop_http_requests_total", **series, method=method, status=status) == 1
