"""Security of the HTTP surface: rate limits (429 + Retry-After), security headers on every answer, CORS closed
by default, chunked uploads held to the body limit, secrets kept out of the logs, no pickle anywhere."""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydantic
import pytest
from fastapi.testclient import TestClient
from guardloop.models.registry import ModelRegistry
from guardloop.service.app import create_app
from guardloop.service.rate_limit import TokenBuckets

from guardloop.core.rates import Rate
from guardloop.core.settings import Settings
from guardloop.storage import Database, ReviewerRepository
from tests.conftest import ADMIN_TOKEN, live_server
from tests.tiny_onnx import publish_tiny

REPO_ROOT = Path(__file__).resolve().parent.parent
KEYS = {"bot-a": "key-a-0123456789abcdef", "bot-b": "key-b-0123456789abcdef"}
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def with_settings(settings: Settings, **overrides) -> Settings:
    return Settings(**(settings.model_dump() | overrides))  # validated, unlike model_copy


@pytest.fixture
def model(registry, tmp_path) -> str:
    return publish_tiny(registry, tmp_path, seed=1)


def client_for(settings: Settings, address: str = "127.0.0.1") -> TestClient:
    return TestClient(create_app(settings), client=(address, 50000))


# ------------------------------------------------------------------ rate limits
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_allows_its_burst_then_refills_at_its_rate():
    clock = FakeClock()
    buckets = TokenBuckets(Rate.parse("3/minute"), clock=clock)
    assert [buckets.take("k") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("k") == pytest.approx(20.0)  # one request per 20 s comes back
    assert buckets.take("other") == 0.0  # keys do not share a bucket
    clock.now += 10
    assert buckets.take("k") == pytest.approx(10.0)
    clock.now += 10
    assert buckets.take("k") == 0.0
    clock.now += 3600
    assert [buckets.take("k") for _ in range(4)][-1] > 0  # a long pause refills to the burst, never beyond


def test_buckets_keep_at_most_max_keys_dropping_the_least_recently_used():
    buckets = TokenBuckets(Rate.parse("1/hour"), max_keys=3, clock=FakeClock())
    for key in "abc":
        buckets.take(key)
    buckets.take("a")  # a is used again: b is now the least recently used
    buckets.take("d")
    assert len(buckets) == 3
    assert buckets.take("a") > 0 and buckets.take("d") > 0  # still remembered (and empty)
    assert buckets.take("b") == 0.0  # forgotten: a fresh bucket


@pytest.mark.parametrize("bad", ["ten per minute", "0/second", "5/day", "-1/minute", "1e3/second"])
def test_an_invalid_rate_setting_names_the_setting_and_the_format(bad):
    with pytest.raises(pydantic.ValidationError) as raised:
        Settings(rate_limit_review_per_ip=bad)
    assert "rate_limit_review_per_ip" in str(raised.value) and "N/minute" in str(raised.value)


def test_rate_settings_are_normalized_and_empty_switches_one_off():
    settings = Settings(rate_limit_classify_per_ip=" 20 / Minutes ", rate_limit_review_per_token="")
    assert settings.rate_limit_classify_per_ip == "20/minute"
    assert settings.rate("rate_limit_classify_per_ip") == Rate(20, 60.0, "20/minute")
    assert settings.rate("rate_limit_review_per_token") is None
    assert with_settings(settings, rate_limit_enabled=False).rate("rate_limit_classify_per_ip") is None


def assert_retry_after(refused: httpx.Response, *, at_most: int) -> None:
    """Retry-After is whole seconds until a request is allowed again: at least 1, at most the refill interval
    (time passes between the refusal and the bucket's last refill, so the exact value is not fixed)."""
    value = refused.headers["retry-after"]
    assert value.isdigit() and 1 <= int(value) <= at_most, value


def test_classify_is_limited_per_client_address_with_retry_after(settings, model):
    limited = with_settings(settings, rate_limit_classify_per_ip="3/minute")
    with client_for(limited) as client, client_for(limited, "127.0.0.2") as neighbour:
        assert [client.post("/classify", json={"text": "hi"}).status_code for _ in range(3)] == [200] * 3
        refused = client.post("/classify", json={"text": "hi"})
        assert refused.status_code == 429
        assert_retry_after(refused, at_most=20)  # 3/minute: one request comes back every 20 s
        assert "too many requests to /classify from this client address" in refused.json()["detail"]
        assert "3/minute" in refused.json()["detail"]
        # /v1/moderations draws on the same bucket, and answers in OpenAI's envelope as well.
        moderation = client.post("/v1/moderations", json={"input": "hi"})
        assert moderation.status_code == 429 and moderation.json()["error"]["type"] == "rate_limit_exceeded"
        assert neighbour.post("/classify", json={"text": "hi"}).status_code == 200  # another address, own bucket
        # Routes outside the limited groups are not counted.
        assert client.get("/healthz").status_code == 200 and client.get("/models/current").status_code == 200


def test_classify_is_limited_per_api_key(settings, model):
    limited = with_settings(
        settings, api_keys=KEYS, rate_limit_classify_per_key="2/minute", rate_limit_classify_per_ip="100/minute"
    )
    with client_for(limited) as client:
        key_a = {"Authorization": f"Bearer {KEYS['bot-a']}"}
        key_b = {"X-API-Key": KEYS["bot-b"]}
        assert client.post("/classify", json={"text": "hi"}, headers=key_a).status_code == 200
        assert client.post("/v1/moderations", json={"input": "hi"}, headers=key_a).status_code == 200
        refused = client.post("/classify", json={"text": "hi"}, headers=key_a)
        assert refused.status_code == 429 and "from this API key or token" in refused.json()["detail"]
        assert_retry_after(refused, at_most=30)
        assert client.post("/classify", json={"text": "hi"}, headers=key_b).status_code == 200


def test_review_is_limited_per_address_and_per_token_before_the_token_is_looked_up(settings, model, tmp_path):
    database_url = f"sqlite:///{tmp_path / 'review.db'}"
    database = Database(database_url)
    database.ensure_schema()
    token = ReviewerRepository(database).add("ann")
    limited = with_settings(
        settings, database_url=database_url, rate_limit_review_per_token="2/minute", rate_limit_review_per_ip="4/minute"
    )
    with client_for(limited) as client:
        ann = {"Authorization": f"Bearer {token}"}
        assert [client.get("/review/queue", headers=ann).status_code for _ in range(2)] == [200, 200]
        refused = client.get("/review/queue", headers=ann)
        assert refused.status_code == 429
        assert_retry_after(refused, at_most=30)
        # A guessed token has its own bucket, but every guess costs the address: the 5th request is refused
        # whatever token it carries.
        assert client.get("/review/stats", headers={"Authorization": "Bearer guess-1"}).status_code == 403
        refused = client.get("/review/stats", headers={"Authorization": "Bearer guess-2"})
        assert refused.status_code == 429 and "client address" in refused.json()["detail"]
        assert client.get("/review").status_code == 429  # the page and its assets count too
    database.dispose()


def test_rate_limits_can_be_switched_off(settings, model):
    off = with_settings(settings, rate_limit_classify_per_ip="1/hour", rate_limit_enabled=False)
    with client_for(off) as client:
        assert {client.post("/classify", json={"text": "hi"}).status_code for _ in range(5)} == {200}


# ------------------------------------------------------------------ headers, CORS
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer"}


def assert_security_headers(response: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert response.headers.get_list(name) == [value], (response.request.url, name)


def test_every_answer_carries_the_security_headers(settings, model):
    tight = with_settings(settings, max_body_bytes=2048, rate_limit_classify_per_ip="5/minute")
    with client_for(tight) as client:
        answers = [
            client.get("/healthz"),
            client.post("/classify", json={"text": "hi"}),  # 200
            client.post("/classify", json={"texts": []}),  # 422
            client.post("/classify", json={"text": "y" * 5000}),  # 413, from the body-size limit
            client.get("/no/such/route"),  # 404
            client.post("/admin/reload"),  # 401
            client.get("/openapi.json"),
            client.get("/review"),  # the page's own values are kept, not doubled
            client.get("/review/assets/review.js"),
        ]
        answers += [client.post("/classify", json={"text": "hi"}) for _ in range(4)]  # the last ones: 429
        assert {answer.status_code for answer in answers} >= {200, 401, 404, 413, 422, 429}
        for answer in answers:
            assert_security_headers(answer)
        page_policy = answers[7].headers["content-security-policy"]
        assert "default-src 'none'" in page_policy and "frame-ancestors 'none'" in page_policy


def test_cors_is_closed_by_default(settings, model):
    with client_for(settings) as client:
        preflight = client.options(
            "/classify",
            headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
        )
        assert "access-control-allow-origin" not in preflight.headers
        simple = client.post("/classify", json={"text": "hi"}, headers={"Origin": "https://evil.example"})
        assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers


def test_cors_opens_only_for_listed_origins(settings, model):
    opened = with_settings(settings, cors_origins=["https://chat.example"])
    with client_for(opened) as client:
        allowed = client.options(
            "/classify",
            headers={
                "Origin": "https://chat.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,authorization",
            },
        )
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "https://chat.example"
        other = client.post("/classify", json={"text": "hi"}, headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


# ------------------------------------------------------------------ body size, chunked
def test_a_chunked_upload_is_cut_off_at_the_body_limit(settings, model):
    """No Content-Length to check up front: the streamed bytes are counted, and the request refused once they
    pass the limit, over a real socket with Transfer-Encoding: chunked."""
    tight = with_settings(settings, max_body_bytes=4096)
    sent = 0

    def chunks(total: int) -> Iterator[bytes]:
        nonlocal sent
        yield b'{"text": "'
        while sent < total:
            sent += 1024
            yield b"x" * 1024
        yield b'"}'

    with live_server(tight) as base, httpx.Client(base_url=base, timeout=10) as client:
        response = client.post("/classify", content=chunks(64 * 1024), headers={"content-type": "application/json"})
        assert response.request.headers.get("transfer-encoding") == "chunked"
        assert "content-length" not in response.request.headers
        assert response.status_code == 413 and "4096" in response.json()["detail"]
        assert_security_headers(response)
        sent = 0
        small = client.post("/classify", content=chunks(2048), headers={"content-type": "application/json"})
        assert small.status_code == 200  # a chunked body within the limit is read as usual


def raw_request(base: str, head: bytes, body_parts: list[bytes] = ()) -> bytes:
    """Send `head` (and `body_parts`) over a plain socket, never finish the body, and read the answer.

    The server must answer without the rest of the body: if it waited for it, `recv` times out and the test fails.
    """
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as sock:
        sock.sendall(head)
        for part in body_parts:
            sock.sendall(part)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < 2:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def test_a_body_over_the_limit_by_content_length_is_refused_before_it_is_sent(settings, model):
    """The Content-Length alone decides: the server answers 413 while the client has sent no byte of the body."""
    tight = with_settings(settings, max_body_bytes=4096)
    head = (
        b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
    )
    with live_server(tight) as base:
        answer = raw_request(base, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"4096" in answer


def test_a_chunked_body_is_refused_as_soon_as_its_bytes_pass_the_limit(settings, model):
    """A chunked upload that has passed the limit is answered 413 without its last chunk ever being sent."""
    tight = with_settings(settings, max_body_bytes=4096)
    head = (
        b"POST /classify HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    chunk = b"x" * 1024
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)]  # 6 KiB of a body that never ends
    with live_server(tight) as base:
        answer = raw_request(base, head, parts)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_every_configured_api_key_is_compared_in_constant_time_whichever_matches(settings, model, monkeypatch):
    """SECURITY.md: every API key is compared (so timing does not tell which one matched), with
    hmac.compare_digest. Counted per request: the first key, the last key and a wrong key each compare all."""
    import hmac

    keys = {"bot-a": "key-a-0123456789abcdef", "bot-b": "key-b-0123456789abcdef", "bot-c": "key-c-0123456789abcdef"}
    compared: list[bytes] = []
    real_compare = hmac.compare_digest

    def counting_compare(a, b):
        compared.append(b if isinstance(b, bytes) else str(b).encode())
        return real_compare(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting_compare)
    configured = with_settings(settings, api_keys=keys)
    with client_for(configured) as client:
        for presented, status in ((keys["bot-a"], 200), (keys["bot-c"], 200), ("wrong-key-0123456789ab", 403)):
            compared.clear()
            answer = client.post("/classify", json={"text": "hi"}, headers={"X-API-Key": presented})
            assert answer.status_code == status
            assert sorted(compared) == sorted(key.encode() for key in keys.values()), presented


# ------------------------------------------------------------------ secrets and logs
def test_keys_and_tokens_never_reach_the_logs(settings, model, tmp_path, caplog):
    """Requests carrying API keys, reviewer and admin tokens (right and wrong ones), refused for auth, for rate,
    for size: whatever is logged at DEBUG by the app, uvicorn, httpx, SQLAlchemy, none of the secrets is in it."""
    caplog.set_level(logging.DEBUG)
    database_url = f"sqlite:///{tmp_path / 'review.db'}"
    database = Database(database_url)
    database.ensure_schema()
    reviewer_token = ReviewerRepository(database).add("ann")
    secrets = [*KEYS.values(), reviewer_token, ADMIN_TOKEN, "wrong-key-5f3a9c", "wrong-token-77d2e1"]
    configured = with_settings(
        settings,
        api_keys=KEYS,
        database_url=database_url,
        rate_limit_classify_per_key="3/minute",
        max_body_bytes=2048,
    )
    with live_server(configured) as base, httpx.Client(base_url=base, timeout=10) as client:
        for key in (*KEYS.values(), "wrong-key-5f3a9c"):
            for _ in range(4):  # the 4th is rate limited
                client.post("/classify", json={"text": "hi"}, headers={"Authorization": f"Bearer {key}"})
            client.post("/v1/moderations", json={"input": "hi"}, headers={"X-API-Key": key})
            client.post("/classify", json={"text": "y" * 5000}, headers={"X-API-Key": key})
        for token in (reviewer_token, "wrong-token-77d2e1"):
            client.get("/review/queue", headers={"Authorization": f"Bearer {token}"})
            client.post("/review/undo", headers={"Authorization": f"Bearer {token}"})
        for token in (ADMIN_TOKEN, "wrong-token-77d2e1"):
            client.post("/admin/reload", headers={"Authorization": f"Bearer {token}"})
            client.get("/admin/pool", headers={"Authorization": f"Bearer {token}"})
    database.dispose()
    assert len(caplog.records) > 20  # plenty was logged, so the check below means something
    logged = caplog.text + "".join(str(record.args) for record in caplog.records)
    assert [secret for secret in secrets if secret in logged] == []


def test_the_llm_api_key_never_reaches_the_logs(caplog):
    """The variations client at DEBUG (the openai client logs its request options, httpx its connections) against an
    endpoint that refuses: retries and failures are logged, the key is not."""
    from guardloop.trainer.variations import VariationConfig, VariationGenerator

    caplog.set_level(logging.DEBUG)
    secret = "sk-llm-secret-4c1d9e0b7a"
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens once the socket is closed
    config = VariationConfig(retries=1, backoff=0.01, timeout=2)
    with VariationGenerator(config, base_url=f"http://127.0.0.1:{port}/v1", model="any", api_key=secret) as gen:
        result = gen.generate("can my landlord keep my deposit", "legal-advice")
    assert result.failed and len(caplog.records) >= 3
    assert secret not in caplog.text + "".join(str(record.args) for record in caplog.records)


# ------------------------------------------------------------------ paths
def test_a_current_pointer_out_of_the_registry_is_never_followed(settings, registry, tmp_path):
    """Names read from files (the `current` pointer, cards) go through the same validation as names typed by an
    operator (tests/test_registry.py): a pointer to '../elsewhere' or an absolute path loads nothing, even where a
    complete model lies at that path. HTTP callers never name a file at all (review assets are a fixed list)."""
    outside = ModelRegistry(tmp_path / "elsewhere")
    version = publish_tiny(outside, tmp_path, seed=1)
    for pointer in (f"../elsewhere/{version}", str(outside.root / version), f"{version}/../{version}"):
        (registry.root / "current").write_text(pointer + "\n", encoding="utf-8")
        assert registry.current() is None
        with client_for(settings) as client:
            assert client.get("/readyz").status_code == 503
            for asset in ("..%2F..%2Fapp.py", "%2Fetc%2Fpasswd", "review.js%00.py"):
                assert client.get(f"/review/assets/{asset}").status_code == 404


# ------------------------------------------------------------------ artifacts: no pickle
PICKLE_PATTERNS = [
    r"\bimport pickle\b",
    r"\bfrom pickle\b",
    r"\bcPickle\b",
    r"\bdill\b",
    r"\bjoblib\b",
    r"\btorch\.load\(",
    r"allow_pickle\s*=\s*True",
    r"\bpd\.read_pickle\b",
    r"\bnp\.load\((?![^)]*allow_pickle\s*=\s*False)",  # numpy loads only with pickles refused
]


def test_no_artifact_is_loaded_through_pickle():
    """Models are ONNX + JSON, tokenizers JSON, embeddings caches .npy without pickles, weights safetensors:
    loading any of them can never run code. This keeps it so."""
    offenders = []
    for folder in ("guardloop", "service", "trainer", "models"):
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            for pattern in PICKLE_PATTERNS:
                for match in re.finditer(pattern, text):
                    line = text.count("\n", 0, match.start()) + 1
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{line}: {match.group(0)}")
    assert offenders == []
