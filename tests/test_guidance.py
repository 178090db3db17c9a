"""The guideline library: shipped defaults, topic selection, validation, hot reload, and the HTTP surface."""

from __future__ import annotations

import logging
import os
import textwrap
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from guardloop.service.app import create_app
from guardloop.service.guideline_store import GuidelineStore

from guardloop.core.guidance import DEFAULT_LIBRARY_PATH, GuidelineError, default_library, load_library
from guardloop.core.labels import HARMFUL_LABELS
from tests.conftest import wait_for
from tests.keyword_onnx import publish_keyword_model
from tests.tiny_onnx import publish_tiny


def write_library(path: Path, version: str, *, self_harm_summary: str = "Be kind and point to crisis lines.") -> Path:
    """A valid library (the defaults with another version and self-harm summary), written atomically."""
    data = yaml.safe_load(DEFAULT_LIBRARY_PATH.read_text(encoding="utf-8"))
    data["version"] = version
    data["categories"]["self-harm"]["summary"] = self_harm_summary
    replace_file(path, yaml.safe_dump(data, sort_keys=False))
    return path


def replace_file(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ the shipped library


def test_the_shipped_library_covers_every_harmful_category():
    library = default_library()
    assert set(library.categories) == set(HARMFUL_LABELS)
    assert library.version


def test_shipped_self_harm_guidance_is_empathetic_points_to_crisis_lines_and_forbids_methods():
    guidance = default_library().guidance("self-harm", "I don't want to be here anymore")
    text = " ".join(guidance.instructions).lower()
    assert "empathy" in text
    assert any("988" in r for r in guidance.resources)
    assert any("method" in rule.lower() for rule in guidance.avoid)


def test_shipped_emergency_guidance_starts_with_calling_emergency_services():
    guidance = default_library().guidance("emergency-situation", "there is a fire in my kitchen")
    assert "emergency number" in guidance.instructions[0]
    assert guidance.topic == "fire-or-danger"


@pytest.mark.parametrize("category", ["medical-advice", "legal-advice", "financial-advice"])
def test_shipped_advice_guidance_suggests_a_professional(category):
    guidance = default_library().guidance(category, "a question")
    joined = " ".join([*guidance.instructions, *guidance.resources]).lower()
    assert any(word in joined for word in ("doctor", "lawyer", "adviser"))


# ------------------------------------------------------------------------------------------ selection


@pytest.mark.parametrize(
    ("category", "text", "topic"),
    [
        ("legal-advice", "can my landlord keep my deposit?", "housing"),
        ("legal-advice", "I was FIRED and my boss owes me wages", "employment"),
        ("medical-advice", "how much ibuprofen can I take, and what about side effects", "medication"),
        ("self-harm", "I keep cutting and I want to hide the scars", "self-injury"),
        ("emergency-situation", "my dad has chest   pain and collapsed", "medical-emergency"),
        ("financial-advice", "should I buy bitcoin with my pension", "investing"),
        ("legal-advice", "what are my rights here", None),
    ],
)
def test_topic_is_chosen_by_keywords(category, text, topic):
    guidance = default_library().guidance(category, text)
    assert guidance.topic == topic
    assert guidance.category == category


def test_keywords_match_whole_words_only():
    # "tax" must not match "taxi", "rent" must not match "parent".
    library = default_library()
    assert library.guidance("financial-advice", "my taxi business").topic is None
    assert library.guidance("legal-advice", "my parent said so").topic is None


def test_case_spacing_and_punctuation_do_not_matter():
    library = default_library()
    assert library.guidance("emergency-situation", "he CAN\u2019T   breathe!!").topic == "medical-emergency"
    assert library.guidance("legal-advice", "Landlord, again...").topic == "housing"


def test_spelling_variants_of_one_keyword_count_once():
    topic = next(t for t in default_library().categories["self-harm"].topics if t.id == "self-injury")
    assert topic.hits("self-harm, self harm, SELF HARM") == 1
    assert topic.hits("self harm and cutting") == 2


def test_the_topic_with_most_keywords_wins_and_adds_its_instructions():
    library = default_library()
    category = library.categories["financial-advice"]
    guidance = library.guidance("financial-advice", "my tax return shows a debt, should I invest in stocks or crypto")
    assert guidance.topic == "investing"  # invest, stocks, crypto (3) beat tax, tax return (2) and debt (1)
    investing = next(t for t in category.topics if t.id == "investing")
    assert guidance.instructions == [*category.instructions, *investing.instructions]


def test_several_flagged_categories_are_ordered_most_severe_first():
    ordered = default_library().guidance_for(("financial-advice", "self-harm", "emergency-situation"), "text")
    assert [g.category for g in ordered] == ["emergency-situation", "self-harm", "financial-advice"]


# ------------------------------------------------------------------------------------------ validation


def _mutated(tmp_path: Path, mutate) -> Path:
    data = yaml.safe_load(DEFAULT_LIBRARY_PATH.read_text(encoding="utf-8"))
    mutate(data)
    path = tmp_path / "library.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda d: d["categories"].pop("self-harm"), "no entry for self-harm"),
        (lambda d: d["categories"].__setitem__("weather", d["categories"]["legal-advice"]), "unknown categories"),
        (lambda d: d["categories"]["legal-advice"].__setitem__("instructions", []), "instructions"),
        (lambda d: d["categories"]["legal-advice"]["instructions"].append("   "), "must not be empty"),
        (lambda d: d["categories"]["legal-advice"].__setitem__("tone", "warm"), "legal-advice.tone"),
        (lambda d: d.pop("version"), "version: Field required"),
        (
            lambda d: d["categories"]["legal-advice"]["topics"].append(d["categories"]["legal-advice"]["topics"][0]),
            "housing appear more than once",
        ),
        (lambda d: d["categories"]["legal-advice"]["topics"][0].__setitem__("keywords", []), "keywords"),
        (lambda d: d["categories"]["legal-advice"]["topics"][0]["keywords"].append("?!"), "no letters or digits"),
    ],
)
def test_invalid_libraries_are_refused_with_the_place_to_fix(tmp_path, mutate, fragment):
    path = _mutated(tmp_path, mutate)
    with pytest.raises(GuidelineError) as raised:
        load_library(path)
    assert str(path) in str(raised.value)
    assert fragment in str(raised.value)


def test_broken_yaml_is_refused_with_its_line(tmp_path):
    path = tmp_path / "library.yaml"
    path.write_text("version: '1'\ncategories:\n  self-harm: [unclosed\n", encoding="utf-8")
    with pytest.raises(GuidelineError, match="not valid YAML at line"):
        load_library(path)


@pytest.mark.parametrize(("content", "fragment"), [(b"", "expected a mapping"), (b"\xff\xfe", "not UTF-8")])
def test_empty_or_binary_files_are_refused(tmp_path, content, fragment):
    path = tmp_path / "library.yaml"
    path.write_bytes(content)
    with pytest.raises(GuidelineError, match=fragment):
        load_library(path)


# ------------------------------------------------------------------------------------------ hot reload


def test_store_without_a_file_serves_the_builtin_library():
    store = GuidelineStore(None)
    assert store.current.source == "builtin"
    assert store.poll() is False


def test_a_changed_file_is_reloaded(tmp_path):
    path = write_library(tmp_path / "guidelines.yaml", "ops-1")
    store = GuidelineStore(path)
    assert store.current.library.version == "ops-1"
    assert store.poll() is False  # unchanged
    write_library(path, "ops-2", self_harm_summary="Stay with them.")
    assert store.poll() is True
    assert store.current.library.version == "ops-2"
    assert store.current.library.categories["self-harm"].summary == "Stay with them."


def test_a_broken_file_is_refused_at_reload_and_the_old_library_kept(tmp_path, caplog):
    path = write_library(tmp_path / "guidelines.yaml", "ops-1")
    store = GuidelineStore(path)
    replace_file(path, "version: ops-2\ncategories:\n  self-harm: {}\n")
    with caplog.at_level(logging.ERROR, logger="guardloop.service.guideline_store"):
        assert store.poll() is False
    assert store.current.library.version == "ops-1"
    assert store.refused is not None
    assert "categories.self-harm.title: Field required" in store.refused.reason
    assert any("refused guideline library" in r.getMessage() and "ops-1" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="guardloop.service.guideline_store"):
        assert store.poll() is False  # the same broken file is not re-read and re-logged on every poll
    assert not caplog.records
    write_library(path, "ops-3")
    assert store.poll() is True
    assert store.current.library.version == "ops-3"
    assert store.refused is None


def test_a_deleted_file_keeps_the_old_library(tmp_path):
    path = write_library(tmp_path / "guidelines.yaml", "ops-1")
    store = GuidelineStore(path)
    path.unlink()
    assert store.poll() is False
    assert store.current.library.version == "ops-1"
    assert store.refused is not None and "missing" in store.refused.reason


def test_a_broken_file_at_start_falls_back_to_the_builtin_library(tmp_path):
    path = tmp_path / "guidelines.yaml"
    path.write_text("version: [", encoding="utf-8")
    store = GuidelineStore(path)
    assert store.current.source == "builtin"
    assert store.current.library.version == default_library().version
    assert store.refused is not None and "not valid YAML" in store.refused.reason


def test_a_configmap_style_symlink_swap_is_noticed(tmp_path):
    # Kubernetes updates a mounted ConfigMap by pointing a symlink at a new directory.
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    write_library(first / "guidelines.yaml", "cm-1")
    write_library(second / "guidelines.yaml", "cm-2")
    (tmp_path / "data").symlink_to(first)
    store = GuidelineStore(tmp_path / "data" / "guidelines.yaml")
    assert store.current.library.version == "cm-1"
    (tmp_path / "data.new").symlink_to(second)
    os.replace(tmp_path / "data.new", tmp_path / "data")
    assert store.poll() is True
    assert store.current.library.version == "cm-2"


# ------------------------------------------------------------------------------------------ over HTTP


@pytest.fixture
def keyword_client(settings, registry, tmp_path):
    publish_keyword_model(registry, tmp_path, {"die": ("self-harm", 150.0), "landlord": ("legal-advice", 150.0)})
    with TestClient(create_app(settings)) as client:
        yield client


def test_classify_returns_guidance_for_flagged_texts_only(keyword_client):
    texts = ["my landlord kept my deposit", "hello there", "I want to die"]
    results = keyword_client.post("/classify", json={"texts": texts}).json()["results"]
    housing, hello, self_harm = results
    assert housing["flagged"] and [g["category"] for g in housing["guidance"]] == ["legal-advice"]
    assert housing["guidance"][0]["topic"] == "housing"
    assert housing["guidance"][0]["library_version"] == default_library().version
    assert hello["flagged"] is False and hello["guidance"] == []
    assert self_harm["guidance"][0]["category"] == "self-harm"
    assert self_harm["guidance"][0]["topic"] == "suicidal-thoughts"
    assert self_harm["guidance"][0]["resources"]


def test_get_guidelines_lists_the_library(keyword_client):
    body = keyword_client.get("/guidelines").json()
    assert body["source"] == "builtin"
    assert body["version"] == default_library().version
    assert body["refused"] is None
    assert set(body["categories"]) == set(HARMFUL_LABELS)
    assert body["categories"]["self-harm"]["avoid"]


def test_operators_replace_the_file_without_a_restart(settings, registry, tmp_path):
    publish_tiny(registry, tmp_path, favour="self-harm")
    path = write_library(tmp_path / "guidelines.yaml", "ops-1", self_harm_summary="First summary.")
    live = settings.model_copy(update={"guidelines_path": path, "guidelines_poll_seconds": 0.05})
    with TestClient(create_app(live)) as client:

        def served() -> dict:
            return client.post("/classify", json={"text": "anything"}).json()["results"][0]["guidance"][0]

        assert served()["summary"] == "First summary."
        write_library(path, "ops-2", self_harm_summary="Second summary.")
        assert wait_for(lambda: client.get("/guidelines").json()["version"] == "ops-2")
        assert served()["summary"] == "Second summary."
        assert served()["library_version"] == "ops-2"

        replace_file(path, textwrap.dedent("version: ops-3\ncategories: {self-harm: {title: x}}\n"))
        assert wait_for(lambda: client.get("/guidelines").json()["refused"] is not None)
        body = client.get("/guidelines").json()
        assert body["version"] == "ops-2"
        assert body["source"] == str(path)
        assert body["refused"]["source"] == str(path)
        assert "summary" in body["refused"]["reason"]
        assert served()["summary"] == "Second summary."


def test_the_shipped_file_is_package_data():
    # What `pip install` puts next to the code: the library has to be in the wheel, not only in the repo.
    import tomllib

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = pyproject["tool"]["setuptools"]["package-data"]["guardloop.core"]
    relative = DEFAULT_LIBRARY_PATH.relative_to(DEFAULT_LIBRARY_PATH.parents[1])
    assert any(relative.match(pattern) for pattern in patterns)
