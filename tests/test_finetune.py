"""Training batches and scoring: length grouping spares padding without dropping, repeating or reordering anything."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from guardloop.trainer.base_models import minilm_dir
from guardloop.trainer.finetune import length_grouped_batches, predict_proba, token_lengths
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from guardloop.core.labels import LABELS


def padded_tokens(batches: list[list[int]], lengths: np.ndarray) -> int:
    return sum(int(lengths[b].max()) * len(b) for b in batches)


def test_every_example_once_per_epoch_in_batches_of_the_asked_size():
    lengths = np.random.default_rng(0).integers(3, 64, size=1000)
    batches = length_grouped_batches(lengths, 16, torch.Generator().manual_seed(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert len(batches) == -(-1000 // 16)  # the schedule's steps per epoch still hold
    assert sum(len(b) != 16 for b in batches) <= 1


def test_grouping_cuts_padding_and_stays_random():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(2.4, 0.5, size=2000).astype(int), 3, 64)  # short titles, a long tail
    grouped = length_grouped_batches(lengths, 16, torch.Generator().manual_seed(1))
    shuffled = torch.randperm(2000, generator=torch.Generator().manual_seed(1)).tolist()
    plain = [shuffled[i : i + 16] for i in range(0, 2000, 16)]
    assert padded_tokens(grouped, lengths) < 0.7 * padded_tokens(plain, lengths)
    again = length_grouped_batches(lengths, 16, torch.Generator().manual_seed(1))
    other = length_grouped_batches(lengths, 16, torch.Generator().manual_seed(2))
    assert again == grouped  # reproducible from the seed
    assert other != grouped
    first_lengths = [int(lengths[b].max()) for b in grouped[:20]]
    assert first_lengths != sorted(first_lengths) and first_lengths != sorted(first_lengths, reverse=True)


@pytest.fixture(scope="module")
def tiny_classifier():
    """A small randomly initialised BERT on the real MiniLM tokenizer: what matters here is row order, not skill."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(LABELS),
    )
    return BertForSequenceClassification(config).eval(), tokenizer


def test_scores_come_back_in_input_order(tiny_classifier):
    model, tokenizer = tiny_classifier
    texts = [
        "a much longer message about my landlord keeping the deposit after I moved out last spring",
        "hi",
        "chest pain since this morning",
        "should I put my savings in an index fund or pay off the car loan first",
        "ok",
    ]
    together = predict_proba(model, tokenizer, texts, 64, batch_size=2)
    one_by_one = np.concatenate([predict_proba(model, tokenizer, [t], 64) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)
    assert together.shape == (5, len(LABELS))
    assert list(token_lengths(tokenizer, texts, 64)) == [len(tokenizer(t)["input_ids"]) for t in texts]
    assert predict_proba(model, tokenizer, [], 64).shape == (0, len(LABELS))
