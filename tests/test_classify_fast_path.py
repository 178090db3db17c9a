"""/classify's fast path (service/classify_fast_path.py): what it takes never reaches FastAPI and is answered as the
route answers it; what it cannot take reaches FastAPI with its body intact. On a real app (real ONNX sessions, the
real micro-batcher), driven in the app's own event loop; FastAPI behind the fast path is a recording stand-in."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from guardloop.service.app import create_app
from guardloop.service.classify_fast_path import ClassifyFastPath
from prometheus_client import REGISTRY
from pydantic import SecretStr
from starlette.responses import JSONResponse
from starlette.types import Message, Receive, Scope, Send

from guardloop.core.labels import LABELS
from tests.tiny_onnx import publish_tiny

STAND_IN_STATUS = 418  # what the stand-in for FastAPI answers: the request went past the fast path


class FastAPIStandIn:
    """Records each request it is given, with the body it reads, and answers 418."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        self.bodies.append(body)
        await JSONResponse({"detail": "reached FastAPI"}, STAND_IN_STATUS)(scope, receive, send)


async def drive(app: Any, fast: ClassifyFastPath, body: bytes, headers: dict[str, str]) -> tuple[int, dict, Scope]:
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/classify",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 50000),
        "app": app,  # as Starlette sets it before its middleware runs
        "state": {},
    }
    messages: list[Message] = [{"type": "http.request", "body": body[:5], "more_body": True}]
    messages.append({"type": "http.request", "body": body[5:], "more_body": False})  # a streamed body, two chunks
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await fast(scope, receive, send)
    answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(answer), scope


@pytest.fixture
def app_client(settings, registry, tmp_path: Path):
    publish_tiny(registry, tmp_path, seed=1)
    with TestClient(create_app(settings)) as client:
        yield client


def call(client: TestClient, payload: Any, **headers: str) -> tuple[int, dict, Scope, FastAPIStandIn]:
    stand_in = FastAPIStandIn()
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = {"content-type": "application/json"} | headers
    status, answer, scope = client.portal.call(drive, client.app, ClassifyFastPath(stand_in), body, headers)
    return status, answer, scope, stand_in


@pytest.mark.parametrize(
    "payload",
    [
        {"text": "my landlord kept my deposit"},
        {"texts": ["hello", "my landlord kept my deposit"]},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "I feel awful"}]},
    ],
    ids=["text", "texts", "messages"],
)
def test_a_valid_body_is_answered_without_fastapi_as_the_route_answers_it(app_client, payload):
    status, answer, _, stand_in = call(app_client, payload)
    assert status == 200 and stand_in.bodies == []
    through_fastapi = app_client.post(
        "/classify", json=payload, headers={"content-type": "application/vnd.example+json"}
    )
    assert through_fastapi.status_code == 200  # FastAPI reads a +json type as JSON; the fast path leaves it alone
    expected = through_fastapi.json()
    assert set(answer) == set(expected)
    for mine, theirs in zip(answer["results"], expected["results"], strict=True):
        assert set(mine) == set(theirs) and mine["label"] == theirs["label"]
        assert mine["scores"] == pytest.approx(theirs["scores"], abs=1e-6) and set(mine["scores"]) == set(LABELS)


def test_a_fast_answer_is_counted_and_carries_the_security_headers(app_client):
    def answered() -> float:
        return (
            REGISTRY.get_sample_value(
                "guardloop_http_requests_total", {"route": "/classify", "method": "POST", "status": "200"}
            )
            or 0.0
        )

    before = answered()
    response = app_client.post("/classify", json={"text": "hello"})  # application/json: the fast path takes it
    assert response.status_code == 200 and answered() == before + 1
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(
    ("payload", "headers"),
    [
        (b'{"text": "unterminated', {}),
        (b'{"text": "a \\ud800 lone surrogate"}', {}),
        ({"text": "x", "unknown": 1}, {}),
        ({"texts": "not a list"}, {}),
        ({"text": "fine"}, {"content-type": "text/plain"}),
    ],
    ids=["invalid-json", "lone-surrogate", "unknown-field", "wrong-type", "not-json"],
)
def test_what_the_fast_path_cannot_take_reaches_fastapi_with_its_body(app_client, payload, headers):
    status, _, _, stand_in = call(app_client, payload, **headers)
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    assert status == STAND_IN_STATUS and stand_in.bodies == [body]


def test_a_caller_is_checked_as_the_route_checks_it(settings, registry, tmp_path):
    publish_tiny(registry, tmp_path, seed=1)
    keyed = settings.model_copy(update={"api_keys": {"acme": SecretStr("k-acme")}})
    with TestClient(create_app(keyed)) as client:
        status, answer, _, stand_in = call(client, {"text": "hello"}, authorization="Bearer wrong")
        assert (status, answer, stand_in.bodies) == (403, {"detail": "wrong API key"}, [])
        status, answer, _, _ = call(client, {"text": "hello"})
        assert status == 401 and answer["detail"].startswith("missing API key")
        status, answer, _, stand_in = call(client, {"text": "hello"}, authorization="Bearer k-acme")
        assert status == 200 and stand_in.bodies == [] and answer["results"][0]["label"] in LABELS
        # the same refusal from the route itself (a body the fast path leaves to FastAPI)
        refused = client.post("/classify", content=b'{"text": "hello"}', headers={"Authorization": "Bearer wrong"})
        assert refused.status_code == 403 and refused.json() == {"detail": "wrong API key"}


def test_an_error_while_classifying_is_written_as_the_app_writes_it(settings, registry, tmp_path):
    with TestClient(create_app(settings)) as client:  # nothing published: no model
        status, answer, _, stand_in = call(client, {"text": "hello"})
        assert status == 503 and stand_in.bodies == []
        assert answer == {"detail": "no model loaded yet; retry shortly"}
        assert client.post("/classify", json={"text": "hello"}).json() == answer
        too_many = call(client, {"texts": ["a"] * 65})
        assert too_many[0] == 422 and too_many[1] == {
            "detail": "too many texts: 65 sent, at most 64 per request; split the request"
        }
