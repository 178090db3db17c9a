"""POST /v1/moderations, driven by the official `openai` client against a real server on loopback."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI
from pydantic import SecretStr

from guardloop.core.labels import LABELS
from guardloop.storage import Database
from guardloop.storage.pool import PoolRepository
from tests.conftest import live_server, wait_for
from tests.keyword_onnx import publish_keyword_model
from tests.tiny_onnx import publish_tiny

KEYWORDS = {"die": ("self-harm", 150.0), "landlord": ("legal-advice", 150.0)}


def client_for(url: str) -> OpenAI:
    # max_retries=0: a 503 must surface here, not be retried away.
    return OpenAI(base_url=f"{url}/v1", api_key="test-key", max_retries=0, timeout=30)


@pytest.fixture
def keyword_server(settings, registry, tmp_path: Path):
    version = publish_keyword_model(registry, tmp_path, KEYWORDS)
    with live_server(settings) as url:
        yield url, version


def test_a_string_input_gets_openai_shaped_results(keyword_server):
    url, version = keyword_server
    raw = client_for(url).moderations.with_raw_response.create(input="I want to die")
    assert raw.headers["X-Guardloop-Model-Version"] == version
    assert raw.headers["content-type"] == "application/json"
    response = raw.parse()
    assert response.id.startswith("modr-") and len(response.id) > len("modr-") + 16
    assert response.model == version  # no model asked for: the served version is reported
    (result,) = response.results
    assert result.flagged is True
    assert result.categories.self_harm is True  # OpenAI's own "self-harm" field, by its alias
    assert result.category_scores.self_harm > 0.99
    categories = result.categories.model_dump(by_alias=True, exclude_unset=True)
    scores = result.category_scores.model_dump(by_alias=True, exclude_unset=True)
    assert set(categories) == set(scores) == set(LABELS)
    assert categories == {label: label == "self-harm" for label in LABELS}
    assert sum(scores.values()) == pytest.approx(1.0, abs=1e-4)


def test_a_list_input_gets_one_result_per_string_in_order(keyword_server):
    url, _ = keyword_server
    texts = ["hello there", "my landlord kept my deposit", "I want to die", "what a nice day"]
    response = client_for(url).moderations.create(input=texts, model="omni-moderation-latest")
    assert response.model == "omni-moderation-latest"  # a client's model name is reported back
    flags = [(r.flagged, [k for k, v in r.categories.model_dump(by_alias=True).items() if v]) for r in response.results]
    assert flags == [(False, []), (True, ["legal-advice"]), (True, ["self-harm"]), (False, [])]


def test_moderation_scores_equal_classify_scores(keyword_server):
    url, _ = keyword_server
    texts = ["my landlord kept my deposit", "hello there"]
    moderated = client_for(url).moderations.create(input=texts).results
    classified = httpx.post(f"{url}/classify", json={"texts": texts}).json()["results"]
    for m, c in zip(moderated, classified, strict=True):
        assert m.flagged == c["flagged"]
        assert m.category_scores.model_dump(by_alias=True, exclude_unset=True) == pytest.approx(c["scores"])


def test_text_parts_are_accepted_and_images_refused(keyword_server):
    url, _ = keyword_server
    client = client_for(url)
    response = client.moderations.create(input=[{"type": "text", "text": "I want to die"}])
    assert response.results[0].flagged is True
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client.moderations.create(input=[{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}])
    assert "text only" in str(raised.value)


@pytest.mark.parametrize(
    ("moderation_input", "fragment"),
    [("", "text 0 is empty"), ([], "at least one text"), (["ok", "x" * 4001], "text 1 has 4001 characters")],
)
def test_bad_inputs_are_clear_422s_through_the_client(keyword_server, moderation_input, fragment):
    url, _ = keyword_server
    with pytest.raises(openai.UnprocessableEntityError) as raised:
        client_for(url).moderations.create(input=moderation_input)
    assert fragment in str(raised.value)


def test_same_limits_as_classify(settings, registry, tmp_path):
    publish_tiny(registry, tmp_path)
    with live_server(settings.model_copy(update={"max_texts": 2})) as url:
        with pytest.raises(openai.UnprocessableEntityError, match="at most 2 per request"):
            client_for(url).moderations.create(input=["a", "b", "c"])
        assert len(client_for(url).moderations.create(input=["a", "b"]).results) == 2


def test_unknown_fields_are_refused_like_openai_does(keyword_server):
    url, _ = keyword_server
    response = httpx.post(f"{url}/v1/moderations", json={"input": "hi", "inputs": ["typo"]})
    assert response.status_code == 422
    assert "inputs" in response.json()["detail"]


def test_the_served_version_is_in_a_header(keyword_server):
    url, version = keyword_server
    raw = client_for(url).moderations.with_raw_response.create(input="hello", model="whatever")
    assert raw.headers["x-guardloop-model-version"] == version
    assert raw.parse().model == "whatever"


def test_no_model_is_a_503(settings):
    with live_server(settings) as url, pytest.raises(openai.InternalServerError) as raised:
        client_for(url).moderations.create(input="hello")
    assert raised.value.status_code == 503
    assert "no model loaded" in str(raised.value)


def test_operator_thresholds_flag_every_category_that_reaches_its_own(settings, registry, tmp_path):
    # The model puts ~all mass on medical-advice; a near-zero self-harm threshold flags self-harm too.
    publish_tiny(registry, tmp_path, favour="medical-advice")
    tuned = settings.model_copy(update={"thresholds": {"self-harm": 1e-12}})
    with live_server(tuned) as url:
        result = client_for(url).moderations.create(input="I need advice").results[0]
        assert result.categories.self_harm is True
        assert result.categories.model_dump(by_alias=True)["medical-advice"] is True
        assert result.categories.model_dump(by_alias=True)["legal-advice"] is False
        classified = httpx.post(f"{url}/classify", json={"text": "I need advice"}).json()["results"][0]
        assert classified["label"] == "medical-advice"
        assert classified["flagged_categories"] == ["medical-advice", "self-harm"]  # highest score first
        assert [g["category"] for g in classified["guidance"]] == ["self-harm", "medical-advice"]  # most severe
        thresholds = httpx.get(f"{url}/models/current").json()["thresholds"]
        assert thresholds["self-harm"] == 1e-12
        assert thresholds["medical-advice"] == 0.5


def test_same_api_keys_as_classify(settings, registry, tmp_path):
    publish_keyword_model(registry, tmp_path, KEYWORDS)
    keyed = settings.model_copy(update={"api_keys": {"chatbot-a": SecretStr("sk-test-chatbot-a-0123456789")}})
    with live_server(keyed) as url:
        good = OpenAI(base_url=f"{url}/v1", api_key="sk-test-chatbot-a-0123456789", max_retries=0)
        assert good.moderations.create(input="I want to die").results[0].flagged is True
        with pytest.raises(openai.PermissionDeniedError, match="wrong API key"):
            client_for(url).moderations.create(input="hello")
        missing = httpx.post(f"{url}/v1/moderations", json={"input": "hello"})
        assert missing.status_code == 401
        assert "missing API key" in missing.json()["error"]["message"]
        assert missing.json()["error"]["type"] == "authentication_error"
        assert httpx.post(f"{url}/classify", json={"text": "hello"}).status_code == 401


def test_moderated_texts_reach_the_pool_with_the_client_name(settings, registry, tmp_path):
    publish_keyword_model(registry, tmp_path, KEYWORDS)
    pooled = settings.model_copy(
        update={
            "api_keys": {"chatbot-a": SecretStr("sk-test-chatbot-a-0123456789")},
            "pool_sample_rate": 1.0,  # pool every result, confident or not
            "pool_flush_seconds": 0.05,
        }
    )
    text = "my landlord kept my deposit again"
    with live_server(pooled) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="sk-test-chatbot-a-0123456789", max_retries=0)
        client.moderations.create(input=[text])
        pool = PoolRepository(Database(pooled.database_url_value))

        def stored() -> list:
            return [item for item in pool.iter_items() if item.text == text]

        assert wait_for(lambda: len(stored()) == 1)
        (item,) = stored()
        assert item.client_id == "chatbot-a"
        assert item.label == "legal-advice"


def test_openapi_documents_the_moderation_route(keyword_server):
    url, _ = keyword_server
    spec = httpx.get(f"{url}/openapi.json").json()
    assert "/v1/moderations" in spec["paths"]
    assert spec["components"]["schemas"]["ModerationRequest"]["examples"]


def test_the_openai_client_parses_answers_that_carry_the_tenants_decision(settings, registry, tmp_path):
    # Two tenants (guardloop/core/policy.py): the same text is blocked for one and only reviewed for the other.
    publish_keyword_model(registry, tmp_path, KEYWORDS | {"sad": ("self-harm", 12.0)})
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: p-1\ntenants:\n"
        "  kids: {clients: [kids], thresholds: {self-harm: 0.3}}\n"
        "  bank: {clients: [bank], review: {self-harm: 0.2}}\n",
        encoding="utf-8",
    )
    keys = {"kids": "sk-test-kids-0123456789", "bank": "sk-test-bank-0123456789"}
    tenants = settings.model_copy(
        update={"api_keys": {name: SecretStr(key) for name, key in keys.items()}, "policy_path": policy}
    )
    with live_server(tenants) as url:
        answers = {
            name: OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0).moderations.create(
                input="i feel so sad today"
            )
            for name, key in keys.items()
        }
    kids, bank = answers["kids"].results[0], answers["bank"].results[0]
    assert kids.category_scores.self_harm == pytest.approx(bank.category_scores.self_harm)
    assert (kids.flagged, kids.categories.self_harm, kids.decision) == (True, True, "block")  # flagged == block
    assert (bank.flagged, bank.categories.self_harm, bank.decision) == (False, False, "review")
    assert bank.model_extra["category_decisions"]["self-harm"] == "review"  # kept as an extra field, unvalidated
    assert answers["bank"].model_extra["policy_version"] == "p-1"
