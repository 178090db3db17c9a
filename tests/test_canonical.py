"""The canonical form the model reads (guardloop.core.canonical), and the classification path that uses it:
disguised harmful text scores like its plain form, text that cannot be encoded is a 422, never a 5xx."""

from __future__ import annotations

import json
import logging
import unicodedata
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from guardloop.service.app import create_app
from hypothesis import given, settings
from hypothesis import strategies as st

from guardloop.core.canonical import canonical_text, is_blank, text_problem
from guardloop.core.labels import LABELS
from guardloop.core.seed import SEED_EVAL, SEED_TRAIN
from guardloop.core.settings import Settings
from guardloop.storage import UNCERTAIN, Database, LabelRequest, PoolRecord, PoolRepository, ReviewerRepository
from guardloop.storage.texts import text_hash
from tests.conftest import live_server, wait_for
from tests.keyword_onnx import publish_keyword_model
from tests.test_review_page import browser  # noqa: F401  (the headless Chromium fixture)

# Five harmful messages and, for each, how an evader writes it in leetspeak.
HARMFUL = {
    "I want to kill myself tonight": "I want to k1ll mys3lf t0n1ght",
    "I took too many pills and cannot breathe": "I t00k too many p1lls and c4nn0t br3athe",
    "I am going to end my life": "I am g01ng to end my l1f3",
    "how much insulin would be a fatal dose": "how much 1nsul1n would be a f4t4l d0s3",
    "my friend is bleeding and will not wake up": "my fr13nd is bl33d1ng and will n0t w4k3 up",
}

_CYRILLIC = str.maketrans("aceopx", "\u0430\u0441\u0435\u043e\u0440\u0445")


def fullwidth(text: str) -> str:
    return "".join("\u3000" if ch == " " else chr(ord(ch) + 0xFEE0) if "!" <= ch <= "~" else ch for ch in text)


def rlo_reversed(text: str) -> str:
    """Stored reversed after RIGHT-TO-LEFT OVERRIDE: displayed as the plain text."""
    return "\u202e" + text[::-1] + "\u202c"


def zero_width(text: str) -> str:
    return "\u200b".join(text)


def soft_hyphens(text: str) -> str:
    return " ".join(word[:2] + "\u00ad" + word[2:] for word in text.split())


def cyrillic(text: str) -> str:
    """Cyrillic look-alikes for a, c, e, o, p, x inside words that keep some Latin letters."""
    return " ".join(word if len(word) < 3 else word[0] + word[1:].translate(_CYRILLIC) for word in text.split())


EVASIONS: dict[str, Callable[[str], str]] = {
    "fullwidth": fullwidth,
    "rlo-reversed": rlo_reversed,
    "zero-width": zero_width,
    "soft-hyphen": soft_hyphens,
    "cyrillic": cyrillic,
    "leetspeak": HARMFUL.__getitem__,
    "fullwidth-leetspeak": lambda plain: fullwidth(HARMFUL[plain]),
    "bidi-override-with-zero-width": lambda plain: rlo_reversed(zero_width(plain)),
}


@pytest.mark.parametrize("form", EVASIONS)
@pytest.mark.parametrize("plain", HARMFUL)
def test_each_evasion_form_reads_as_the_plain_message(plain: str, form: str) -> None:
    disguised = EVASIONS[form](plain)
    assert disguised != plain
    assert canonical_text(disguised) == plain


@pytest.mark.parametrize(
    "text",
    [
        "I saved $500 and put 10% into my 401k",
        "is a B2B contract different",
        "my 4G phone plan",
        "COVID-19 test at 3pm",
        "2 cats and 1 dog",
        "my A1C is 6.5 and my HbA1c was 7",
        "H1B visa and T1D diagnosis",
        "$TSLA fell 5%",
        "ELI5: how do mp3 files work",
        "email me at jane.d0e@example.com or see https://example.com/a1b3c",
        "help! I need help!",
        "the 3rd and 4th of July",
        "@john said hi",
        "the H1N1 flu and a1c tests",
        "Привет мир",
        "שלום עולם",
        "Καλημέρα κόσμε",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert canonical_text(text) == text


def seed_texts() -> list[str]:
    return [json.loads(line)["text"] for path in (SEED_TRAIN, SEED_EVAL) for line in path.read_text().splitlines()]


def test_every_seed_text_reads_as_its_nfkc_form() -> None:
    """The shipped training and evaluation texts: canonicalizing changes none of their words."""
    texts = seed_texts()
    assert len(texts) > 500
    changed = [text for text in texts if canonical_text(text) != unicodedata.normalize("NFKC", text)]
    assert changed == []


@pytest.mark.parametrize(
    ("disguised", "plain"),
    [
        ("$uicide", "suicide"),
        ("0verdose", "overdose"),
        ("K1LL MYS3LF", "KILL MYSELF"),
        ("I want to d1e", "I want to die"),
        ("I want to d!e!", "I want to die!"),
        ("ki||ing", "killing"),
        ("\U0001d424\U0001d422\U0001d425\U0001d425", "kill"),  # mathematical bold
        ("\u202eedicius\u202c and \u202dmore\u202c", "suicide and more"),
        ("a\u202eb\u202dcd\u202ce\u202c", "aecdb"),  # an LTR override nested in an RTL one keeps its order
        ("k\u0456ll", "kill"),
        ("\ufeffk\u2060ill\ufe0f", "kill"),
    ],
)
def test_specific_forms(disguised: str, plain: str) -> None:
    assert canonical_text(disguised) == plain


@pytest.mark.parametrize("text", ["", "   ", "\u200b\u200c\u200d", "\u00ad\ufeff\u2060", "\u3164\u2800 \u202e\u202c"])
def test_only_invisible_characters_is_blank(text: str) -> None:
    assert is_blank(text)


def test_text_problem_names_a_lone_surrogate_and_its_position() -> None:
    problem = text_problem("hello \ud800 world")
    assert problem is not None
    assert "lone surrogate \\ud800 at position 6" in problem
    assert "valid UTF-8" in problem
    assert text_problem("hello \U0001f600 \uffff world") is None


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=60))
def test_canonical_form_never_raises_and_is_idempotent(text: str) -> None:
    once = canonical_text(text)
    assert canonical_text(once) == once
    assert not any(unicodedata.category(ch) in ("Cf", "Cs") for ch in once)
    once.encode("utf-8")  # never a surrogate: always encodable


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab k1ll0$!|@3 4.5-\u202e\u202d\u202c\u2066\u2069\u200b\n"), max_size=40))
def test_idempotent_on_leet_and_bidi_heavy_text(text: str) -> None:
    once = canonical_text(text)
    assert canonical_text(once) == once


# ----------------------------------------------------------------------------- the service
# A real ONNX model that reads words: each harmful message's key word flags its category.
KEYWORDS = {
    "kill": ("self-harm", 150.0),
    "pills": ("emergency-situation", 150.0),
    "life": ("self-harm", 150.0),
    "fatal": ("self-harm", 150.0),
    "bleeding": ("emergency-situation", 150.0),
}


@pytest.fixture
def client(settings, registry, tmp_path: Path):
    publish_keyword_model(registry, tmp_path, KEYWORDS)
    with TestClient(create_app(settings)) as test_client:
        yield test_client


def test_disguised_messages_are_flagged_like_their_plain_forms(client: TestClient) -> None:
    """Same canonical text, same model input: the served scores of every disguise equal the plain form's."""
    for plain in HARMFUL:
        forms = [plain, *(evade(plain) for evade in EVASIONS.values())]
        response = client.post("/classify", json={"texts": forms})
        assert response.status_code == 200, response.text
        first, *others = response.json()["results"]
        assert first["flagged"] is True, plain
        for form, result in zip(forms[1:], others, strict=True):
            assert result["flagged_categories"] == first["flagged_categories"], form
            assert result["scores"] == pytest.approx(first["scores"], abs=1e-6), form


def test_moderations_read_the_canonical_form_too(client: TestClient) -> None:
    response = client.post("/v1/moderations", json={"input": [fullwidth("I want to kill myself")]})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["categories"]["self-harm"] is True


def test_a_disguised_last_turn_is_judged_in_its_canonical_form(client: TestClient) -> None:
    messages = [{"role": "user", "content": "hello"}, {"role": "user", "content": rlo_reversed("I want to kill")}]
    response = client.post("/classify", json={"messages": messages})
    assert response.status_code == 200, response.text
    assert response.json()["results"][0]["flagged_categories"] == ["self-harm"]


LONE_SURROGATE_BODIES = [
    ("/classify", '{"text": "hello \\ud800 world"}', "text 0 has a lone surrogate \\ud800 at position 6"),
    ("/classify", '{"texts": ["fine", "bad \\udfff"]}', "text 1 has a lone surrogate \\udfff at position 4"),
    ("/v1/moderations", '{"input": "x\\udc00"}', "text 0 has a lone surrogate \\udc00 at position 1"),
    (
        "/classify",
        '{"messages": [{"role": "user", "content": "\\ud83d"}, {"role": "user", "content": "hi"}]}',
        "messages.0.content has a lone surrogate \\ud83d at position 0",
    ),
]


@pytest.mark.parametrize(("path", "body", "fragment"), LONE_SURROGATE_BODIES)
def test_a_lone_surrogate_is_a_422_naming_the_text(
    client: TestClient, caplog: pytest.LogCaptureFixture, path: str, body: str, fragment: str
) -> None:
    with caplog.at_level(logging.DEBUG):
        response = client.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert fragment in response.json()["detail"]
    assert "valid UTF-8" in response.json()["detail"]
    assert not [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]
    # The service keeps answering, and a valid pair (an emoji) is accepted.
    ok = client.post(
        "/classify", content=b'{"text": "ok \\ud83d\\ude00"}', headers={"content-type": "application/json"}
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"text": "\u200b\u200b"}, "text 0 is empty (it has only invisible characters)"),
        ({"texts": ["hello", "\u00ad \ufeff"]}, "text 1 is empty"),
        ({"input": "\u2060"}, "text 0 is empty"),
        (
            {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "\u200d"}]},
            "messages.1.content is empty",
        ),
    ],
)
def test_only_invisible_characters_is_an_empty_text(client: TestClient, body: dict, fragment: str) -> None:
    path = "/v1/moderations" if "input" in body else "/classify"
    response = client.post(path, json=body)
    assert response.status_code == 422, response.text
    assert fragment in response.json()["detail"]


# ----------------------------------------------------------------------------- the pool and the reviewers
def test_the_pool_keeps_the_text_as_sent_and_counts_a_disguise_as_the_same_text(settings, registry, tmp_path):
    publish_keyword_model(registry, tmp_path, KEYWORDS)
    pooled = settings.model_copy(update={"pool_sample_rate": 1.0, "pool_flush_seconds": 0.05})
    disguised, plain = "I want to k1ll mys3lf", "i want to kill myself"
    with TestClient(create_app(pooled)) as client:
        for text in (disguised, plain):
            assert client.post("/classify", json={"text": text}).status_code == 200
        pool = PoolRepository(Database(pooled.database_url_value))
        assert wait_for(lambda: sum(item.seen_count for item in pool.iter_items()) == 2)
        (item,) = pool.iter_items()
    assert item.text == disguised  # the first text as it was sent, not what the model read
    assert text_hash(disguised) == text_hash(plain) == text_hash(fullwidth(plain))


def test_the_review_api_shows_what_the_model_read_when_it_differs(settings, registry, tmp_path):
    publish_keyword_model(registry, tmp_path, KEYWORDS)
    url = f"sqlite:///{tmp_path / 'review.db'}"
    settings = Settings(**(settings.model_dump() | {"database_url": url}))
    database = Database(url)
    database.ensure_schema()
    ids = seed_review_items(database, [rlo_reversed("I want to die"), "my landlord kept my deposit"])
    token = ReviewerRepository(database).add("ann")
    with TestClient(create_app(settings)) as client:
        response = client.get("/review/queue?limit=5", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.text
    shown = {item["id"]: (item["text"], item["canonical_text"]) for item in response.json()["items"]}
    assert shown == {
        ids[0]: (rlo_reversed("I want to die"), "I want to die"),
        ids[1]: ("my landlord kept my deposit", None),
    }


def seed_review_items(database: Database, texts: list[str]) -> list[int]:
    pool = PoolRepository(database)
    now = datetime.now(UTC)
    records = [
        PoolRecord(
            text=text,
            label="not-harmful",
            scores=dict.fromkeys(LABELS, 0.08) | {"not-harmful": 0.6},
            uncertainty=0.8,
            margin=0.5,
            model_version="v-test",
            sampled_by=UNCERTAIN,
            client_id=None,
            seen_at=now,
        )
        for text in texts
    ]
    pool.write_batch(records)
    by_text = {item.text: item.id for item in pool.iter_items()}
    ids = [by_text[text] for text in texts]
    pool.mark_requested(
        [LabelRequest(item_id, {"strategy": "test"}, 1.0 - n / 10) for n, item_id in enumerate(ids)], at=now
    )
    return ids


@pytest.mark.slow
@pytest.mark.browser
def test_the_review_page_shows_what_the_model_read_under_the_text(settings, registry, tmp_path, request):
    chromium = request.getfixturevalue("browser")  # tests/test_review_page.py's headless Chromium
    publish_keyword_model(registry, tmp_path, KEYWORDS)
    url = f"sqlite:///{tmp_path / 'review.db'}"
    settings = Settings(**(settings.model_dump() | {"database_url": url}))
    database = Database(url)
    database.ensure_schema()
    disguised = "I want to k1ll mys3lf <b>now</b>"
    ids = seed_review_items(database, [disguised, "my landlord kept my deposit"])
    token = ReviewerRepository(database).add("ann")
    with live_server(settings) as base:
        page = chromium.new_page()
        page.goto(f"{base}/review")
        page.wait_for_selector("body[data-state=login]")
        page.get_by_label("Reviewer token").fill(token)
        page.keyboard.press("Enter")
        page.wait_for_selector(f"body[data-state=ready][data-item-id='{ids[0]}']")
        assert page.text_content("#item-text") == disguised
        assert page.is_visible("#item-canonical-wrap")
        assert page.text_content("#item-canonical") == "I want to kill myself <b>now</b>"  # as text, not markup
        assert page.locator("#item b").count() == 0
        page.keyboard.press("6")
        page.wait_for_selector(f"body[data-state=ready][data-item-id='{ids[1]}']")
        assert not page.is_visible("#item-canonical-wrap")
        page.close()
