"""Label-preserving variations of labeled texts, written by an LLM behind any OpenAI-compatible endpoint.

For each (text, label) the LLM is asked for k variations that keep the label (the template of Hassan et al. 2024,
with one few-shot exchange per class). What comes back goes through output hygiene — numbering and chatter
stripped, empty lines, copies of the original, duplicates and near-duplicates dropped, lengths bounded — and an
optional consistency filter: variations the current model confidently puts in another class are dropped.

Then every rewrite must pass the verifier (`verifier`: copies of the prompt's examples, rewrites of injected
texts, drift from the source, the LLM's own constrained label question in `judge`), and `budget` decides how many
rewrites each item gets (more where the training set is thin); an item whose rewrites fall short of its budget
composes new posts from several labeled texts of its class (`generator.compose`).

One module per job: `prompt` (what is asked), `hygiene` (what is kept), `verifier` and `judge` (what is
label-true), `budget` (how many), `generator` (rounds, composing, retries and failures), `endpoint` (one request
and how it failed), `records` (what came out), `llm_server` (the embedded llama.cpp server used when no endpoint
is set).
"""

from __future__ import annotations

from guardloop.trainer.variations.generator import VariationConfig, VariationError, VariationGenerator
from guardloop.trainer.variations.hygiene import (
    HygieneConfig,
    PredictProba,
    apply_hygiene,
    clean_line,
    consistency_filter,
    length_bounds,
)
from guardloop.trainer.variations.prompt import build_messages, neutralize_post
from guardloop.trainer.variations.records import VariationBatch, VariationResult, VariationStats
from guardloop.trainer.variations.verifier import Verifier, VerifierConfig

__all__ = [
    "HygieneConfig",
    "PredictProba",
    "VariationBatch",
    "VariationConfig",
    "VariationError",
    "VariationGenerator",
    "VariationResult",
    "VariationStats",
    "Verifier",
    "VerifierConfig",
    "apply_hygiene",
    "build_messages",
    "clean_line",
    "consistency_filter",
    "length_bounds",
    "neutralize_post",
]
