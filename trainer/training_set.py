"""Where a cycle's training data comes from besides the pool: the base set (settings.train_data, default the
shipped seed) split into train and a stratified 15% dev for early stopping, and the gate's eval set.

The gold reserve: `settings.gold_share` of the reviewed items, chosen by a hash of their id, are never trained on
(nor are their variations). Once they hold `settings.gold_min_per_class` items of every class, the gate judges
on them: the deployment's own traffic, labeled by its own reviewers, instead of the team-written eval set.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from guardloop.core.datafiles import Example, load_examples, stratified_split
from guardloop.core.labels import LABELS
from guardloop.core.seed import SEED_EVAL, SEED_TRAIN
from guardloop.core.settings import Settings

DEV_FRACTION = 0.15
T = TypeVar("T")


def base_training_sets(settings: Settings) -> tuple[list[Example], list[Example]]:
    """(train, dev): settings.train_data (default: the shipped seed) minus a stratified 15% kept for early stopping."""
    examples = load_examples(base_files(settings)).examples
    return stratified_split(examples, DEV_FRACTION, settings.seed)


def base_files(settings: Settings) -> list[Path]:
    """The base training files: settings.train_data, or the shipped seed."""
    return list(settings.train_data or [SEED_TRAIN])


def eval_set(settings: Settings) -> list[Example]:
    """The gate's held-out eval set: settings.eval_data, or the shipped seed eval file."""
    return load_examples([settings.eval_data or SEED_EVAL]).examples


# --------------------------------------------------------------------------------------------- the gold reserve
def is_gold(item_id: int, share: float) -> bool:
    """Whether a reviewed item is reserved for the gold gate set: a hash of its id alone, so every cycle and every
    replica reserves the same items and an item never moves between training and gold. Its own salt keeps the
    choice independent of the second-opinion sample (review.py), which picks by id too."""
    digest = hashlib.blake2b(f"guardloop-gold:{item_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64


def split_gold(items: Sequence[T], item_id: Callable[[T], int], share: float) -> tuple[list[T], list[T]]:
    """(trainable, gold): `items` split by `is_gold` on their ids, order kept."""
    trainable, gold = [], []
    for item in items:
        (gold if is_gold(item_id(item), share) else trainable).append(item)
    return trainable, gold


def gold_ready(labels: Sequence[str], min_per_class: int) -> bool:
    """Whether the gold labels hold `min_per_class` items of every class, so the gate may judge on them."""
    counts = Counter(labels)
    return all(counts[label] >= min_per_class for label in LABELS)
