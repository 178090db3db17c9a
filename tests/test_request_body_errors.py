"""A body FastAPI cannot even parse gets the reason that applies: nested too deeply, or not UTF-8, on both the
guardloop and the OpenAI-compatible route (where OpenAI's `error.message` carries it too)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from guardloop.service.app import create_app
from guardloop.service.errors import NESTED_TOO_DEEPLY, UNREADABLE_BODY

JSON = {"content-type": "application/json"}
DEEP_ARRAY = b"[" * 10_000 + b"]" * 10_000
DEEP_IN_FIELD = b'{"texts": ' + b"[" * 3_000 + b"]" * 3_000 + b"}"


@pytest.fixture
def client(settings):
    with TestClient(create_app(settings)) as client:
        yield client


@pytest.mark.parametrize("path", ["/classify", "/v1/moderations"])
@pytest.mark.parametrize(
    ("body", "reason"),
    [(DEEP_ARRAY, NESTED_TOO_DEEPLY), (DEEP_IN_FIELD, NESTED_TOO_DEEPLY), (b'{"text": "\xff\xfe"}', UNREADABLE_BODY)],
    ids=["10000-deep array", "3000-deep field", "not UTF-8"],
)
def test_an_unparsable_body_is_refused_with_its_own_reason(client, path, body, reason):
    response = client.post(path, content=body, headers=JSON)
    assert response.status_code == 400
    assert response.json()["detail"] == reason
    if path == "/v1/moderations":
        assert response.json()["error"]["message"] == reason
