"""A tiny, randomly initialised BERT saved as a local base-model directory, with the student's real tokenizer.

Training tests need the real fine-tuning code (`fine_tune`, `train_model`, the optimum export) but not the
real MiniLM's 22M parameters: this model trains an epoch on a hundred texts in about a second.
"""

from __future__ import annotations

from pathlib import Path

import torch
from guardloop.trainer.base_models import minilm_dir
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from guardloop.core.labels import LABELS


def write_tiny_bert(out_dir: Path, *, seed: int = 0, hidden: int = 32, layers: int = 2) -> Path:
    """Save a tiny BERT (and the MiniLM tokenizer) into `out_dir`, loadable like `minilm_dir()`."""
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
        num_labels=len(LABELS),
    )
    BertForSequenceClassification(config).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
