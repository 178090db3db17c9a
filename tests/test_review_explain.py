"""What the review page says about an item: "why this item" in words, the model's guess apart from it (so the page
can hide it), one uncertainty with one meaning, and the team's label definitions. No database, no browser."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest
from guardloop.service.review_explain import CLASSIFIED, PICKED, explain, normalized_entropy
from guardloop.service.review_schemas import ReviewItem
from pydantic import ValidationError

from guardloop.core.label_definitions import DefinitionsError, load_definitions
from guardloop.core.labels import LABELS
from guardloop.core.settings import Settings
from guardloop.storage import StoredItem

NOW = datetime(2026, 5, 4, 12, tzinfo=UTC)
# Logged at classification time by an older model: confident not-harmful.
LOGGED = dict.fromkeys(LABELS, 0.02) | {"not-harmful": 0.9}
# The picking model's view: torn between self-harm and not-harmful.
PICKED_SCORES = {
    "self-harm": 0.41,
    "medical-advice": 0.08,
    "legal-advice": 0.05,
    "financial-advice": 0.04,
    "emergency-situation": 0.04,
    "not-harmful": 0.38,
}


def item(reason: dict | None, *, seen: int = 1, requested: bool = True) -> StoredItem:
    # Fields this test does not care about (added by other features) stay None.
    unset = {field.name: None for field in dataclasses.fields(StoredItem)}
    return StoredItem(
        **unset
        | dict(
            id=7,
            text="some text",
            text_hash="0" * 64,
            seen_count=seen,
            label="not-harmful",
            scores=LOGGED,
            uncertainty=0.33,
            margin=0.88,
            model_version="v-old",
            sampled_by="uncertain",
            client_id=None,
            first_seen=NOW,
            last_seen=NOW,
            requested_at=NOW if requested else None,
            request_reason=reason,
            priority=0.5,
        )
    )


def cluster_reason(**extra) -> dict:
    reason = {"strategy": "cluster", "cluster": 8, "cluster_size": 11, "uncertainty": 0.654, "cycle_id": "c1"}
    return reason | {"scores": PICKED_SCORES, "scored_by": "v-new"} | extra


def test_the_issue_example_reads_as_words_and_the_guess_is_kept_apart():
    explained = explain(item(cluster_reason()))
    assert explained.why == (
        "It stands for a group of 11 similar unlabeled messages: of that group, the model is least sure about this one."
    )
    assert explained.model_guess == "The model is unsure between self-harm (0.41) and not-harmful (0.38)."
    # `why` is shown before the reviewer answers: it names no label at all.
    assert not any(label in explained.why for label in LABELS)
    assert (explained.scored_when, explained.scored_by, explained.predicted) == (PICKED, "v-new", "self-harm")


def test_one_uncertainty_from_the_scores_shown_not_the_logged_one_or_a_stale_reason_number():
    explained = explain(item(cluster_reason(uncertainty=0.654)))
    assert explained.uncertainty == round(normalized_entropy(PICKED_SCORES), 3)
    assert explained.uncertainty not in (0.33, 0.654)  # the logged value and the reason's number are not shown
    assert [label for label, _ in explained.scores][:2] == ["self-harm", "not-harmful"]

    # An item requested without the picking model's scores: everything comes from the logged scores.
    old = explain(item({"strategy": "topn", "uncertainty": 0.9}))
    assert (old.scored_when, old.scored_by) == (CLASSIFIED, "v-old")
    assert old.uncertainty == round(normalized_entropy(LOGGED), 3)
    assert old.model_guess == "The model says not-harmful (0.90); next is self-harm (0.02)."
    assert old.why == "It is among the messages the model is least sure about."


@pytest.mark.parametrize(
    ("reason", "words"),
    [
        ({"strategy": "random"}, "random sample"),
        ({"strategy": "coreset", "distance": 1.3}, "unlike anything labeled so far"),
        ({"strategy": "small-text-breaking-ties", "margin": 0.01}, "nearly tied"),
        ({"strategy": "shadow-disagreement"}, "The trainer asked for it (shadow-disagreement)."),
        ({"strategy": "rare-cluster", "cluster_size": 5, "slot": "quota", "labeled_count": 3}, "3 so far"),
    ],
)
def test_each_strategy_has_its_words(reason, words):
    assert words in explain(item(reason)).why


def test_shadow_disagreements_review_band_items_and_doubted_labels_say_why_without_naming_a_label():
    shadow = explain(item({"shadow": "v-cand", "serving_label": "not-harmful", "shadow_label": "self-harm"}))
    assert "candidate model tried beside it disagree" in shadow.why and "self-harm" not in shadow.why
    assert shadow.model_guess.endswith("The candidate model says self-harm.")
    band = explain(item({"strategy": "review-band", "categories": ["self-harm"], "policy_version": "7"}))
    assert "close to a chatbot's limit" in band.why and "self-harm" not in band.why
    doubted = dataclasses.replace(item(cluster_reason()), suspected_at=NOW)
    assert explain(doubted).why.startswith("Another reviewer has labeled it") and "group" not in explain(doubted).why


def test_rare_cluster_quota_names_its_class_only_in_the_guess():
    reason = {
        "strategy": "rare-cluster",
        "cluster_size": 4,
        "slot": "quota",
        "quota_class": "emergency-situation",
        "p_class": 0.31,
        "labeled_count": 2,
    }
    explained = explain(item(reason))
    assert "emergency" not in explained.why and "a group of 4 similar" in explained.why
    assert explained.model_guess.endswith("It was picked as a possible emergency-situation (0.31).")


def test_unrequested_or_reasonless_items_repeat_counts_and_malformed_scores():
    assert explain(item(None, requested=False)).why.startswith("It was sampled from the pool")
    assert explain(item(cluster_reason(), seen=3)).why.endswith("The same message came in 3 times.")
    # Scores in the reason that are not a full, finite set of the six labels are ignored, not trusted.
    broken = explain(item(cluster_reason(scores={"self-harm": 1.0})))
    assert broken.scored_when == CLASSIFIED


def test_the_api_item_carries_the_explanation_and_the_normalized_text():
    disguised = dataclasses.replace(item(cluster_reason()), text="I want to k1ll myself")
    out = ReviewItem.of(disguised).model_dump()
    assert out["explanation"]["why"].startswith("It stands for a group of 11")
    assert out["explanation"]["scores"][0] == {"label": "self-harm", "score": 0.41}
    assert out["canonical_text"] == "I want to kill myself"


def test_the_team_definitions_cover_every_label_with_one_or_two_short_examples():
    definitions = load_definitions()
    assert [label for label, _ in definitions.in_label_order()] == list(LABELS)
    for _, entry in definitions.in_label_order():
        assert entry.definition and 1 <= len(entry.examples) <= 2


def test_an_operators_definitions_file_missing_a_label_is_refused_with_what_to_fix(tmp_path: Path):
    bad = tmp_path / "definitions.yaml"
    bad.write_text('version: "1"\nlabels:\n  self-harm: {definition: hurting oneself, examples: ["x"]}\n')
    with pytest.raises(DefinitionsError, match="missing: medical-advice"):
        load_definitions(bad)
    with pytest.raises(ValidationError, match="missing: medical-advice"):
        Settings(review_definitions_path=bad)
    with pytest.raises(ValidationError, match="cannot read label definitions"):
        Settings(review_definitions_path=tmp_path / "absent.yaml")
