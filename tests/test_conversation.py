"""Conversation input for /classify: a verdict for the last user turn, with earlier user turns as context."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from guardloop.service.app import create_app
from guardloop.service.conversation import SEPARATOR, conversation_texts
from guardloop.service.schemas import Message

from tests.keyword_onnx import publish_keyword_model

# "die" reads as self-harm, "lawyer" as legal-advice; anything else is not-harmful (score ~0.6).
KEYWORDS = {"die": ("self-harm", 150.0), "lawyer": ("legal-advice", 100.0)}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


@pytest.fixture
def client(settings, registry, tmp_path: Path):
    publish_keyword_model(registry, tmp_path, KEYWORDS)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def verdict(client: TestClient, messages: list[dict[str, str]]) -> dict:
    response = client.post("/classify", json={"messages": messages})
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    return result


def test_a_harmless_last_turn_is_flagged_by_what_the_user_said_before(client):
    result = verdict(client, [user("I want to die"), assistant("I'm here for you."), user("ok thanks")])
    assert result["flagged"] is True
    assert result["label"] == "self-harm"
    assert result["decided_by_context"] is True
    assert [g["category"] for g in result["guidance"]] == ["self-harm"]


def test_the_same_last_turn_alone_is_not_flagged(client):
    result = verdict(client, [user("hello"), assistant("hi, how can I help?"), user("ok thanks")])
    assert result["flagged"] is False
    assert result["label"] == "not-harmful"
    assert result["decided_by_context"] is False
    assert result["guidance"] == []


def test_assistant_turns_are_not_context(client):
    # The chatbot's own words (e.g. its earlier crisis message) must not flag the user's next turn.
    result = verdict(client, [user("hello"), assistant("please do not die, call 988"), user("ok thanks")])
    assert result["flagged"] is False


def test_context_never_clears_a_harmful_last_turn(client):
    result = verdict(client, [user("hello"), user("good morning"), user("I want to die")])
    assert result["flagged"] is True
    assert result["label"] == "self-harm"
    assert result["decided_by_context"] is False


def test_context_raises_the_verdict_to_a_more_severe_category(client):
    # Alone, the last turn is legal-advice; with the earlier turn it reads as self-harm, which is more severe.
    alone = verdict(client, [user("need a lawyer")])
    assert alone["flagged_categories"] == ["legal-advice"]
    result = verdict(client, [user("I want to die"), user("need a lawyer")])
    assert result["flagged_categories"] == ["self-harm"]
    assert result["decided_by_context"] is True


def test_context_is_bounded_to_the_configured_number_of_user_turns(settings, registry, tmp_path):
    publish_keyword_model(registry, tmp_path, KEYWORDS)
    conversation = [user("I want to die"), user("a"), user("b"), user("ok thanks")]
    with TestClient(create_app(settings.model_copy(update={"conversation_context_turns": 2}))) as client:
        assert verdict(client, conversation)["flagged"] is False  # "I want to die" is 3 user turns back
    with TestClient(create_app(settings.model_copy(update={"conversation_context_turns": 3}))) as client:
        assert verdict(client, conversation)["flagged"] is True
    with TestClient(create_app(settings.model_copy(update={"conversation_context_turns": 0}))) as client:
        assert verdict(client, [user("I want to die"), user("ok thanks")])["flagged"] is False


def test_trailing_assistant_turns_are_ignored(client):
    result = verdict(client, [user("I want to die"), assistant("I'm listening.")])
    assert result["label"] == "self-harm"
    assert result["decided_by_context"] is False


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        ([], "'messages' is empty"),
        ([assistant("hello")], "no user turn"),
        ([{"role": "system", "content": "be nice"}, user("hi")], "messages.0.role: Input should be 'user' or"),
        ([user("hi"), {"role": "tool", "content": "x"}], "messages.1.role"),
        ([user("   ")], "messages.0.content"),
        ([user("hi"), assistant("")], "messages.1.content"),
        ([{"role": "user"}], "messages.0.content: Field required"),
        ([{"role": "user", "content": "hi", "name": "bob"}], "messages.0.name"),
        ([user("x" * 4001)], "messages.0.content has 4001 characters, at most 4000"),
        ("not a list", "valid list"),
    ],
)
def test_bad_conversations_get_a_clear_422(client, messages, fragment):
    response = client.post("/classify", json={"messages": messages})
    assert response.status_code == 422
    assert fragment in response.json()["detail"]


def test_messages_cannot_be_mixed_with_text(client):
    response = client.post("/classify", json={"text": "hi", "messages": [user("hi")]})
    assert response.status_code == 422
    assert "exactly one" in response.json()["detail"]


def test_a_long_history_is_not_refused_only_cut(client):
    long_turn = "word " * 2000  # 10,000 characters: more than one text may have, but it is only context
    result = verdict(client, [user(long_turn), user("I want to die")])
    assert result["flagged"] is True


def test_window_puts_the_last_turn_first_and_stays_within_the_text_limit():
    messages = [Message(role="user", content=c) for c in ("oldest " * 50, "middle", "latest")]
    texts = conversation_texts(messages, context_turns=5, max_chars=60)
    assert texts.turn == "latest"
    assert texts.turn_index == 2
    assert texts.window is not None
    assert texts.window.startswith("latest" + SEPARATOR + "middle" + SEPARATOR + "oldest")
    assert len(texts.window) == 60


def test_window_is_none_without_earlier_user_turns():
    messages = [Message(role="assistant", content="hello"), Message(role="user", content="hi")]
    texts = conversation_texts(messages, context_turns=3, max_chars=4000)
    assert texts.window is None


def test_an_overlong_last_turn_names_its_position():
    messages = [Message(role="user", content="hi"), Message(role="user", content="y" * 11)]
    with pytest.raises(HTTPException) as raised:
        conversation_texts(messages, context_turns=3, max_chars=10)
    assert raised.value.status_code == 422
    assert "messages.1.content has 11 characters" in raised.value.detail
