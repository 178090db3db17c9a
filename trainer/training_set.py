"""Where a cycle's training data comes from besides the pool: the base set (settings.train_data, default the
shipped seed) split into train and a stratified 15% dev for early stopping, and the gate's eval set."""

from __future__ import annotations

from pathlib import Path

from guardloop.core.datafiles import Example, load_examples, stratified_split
from guardloop.core.seed import SEED_EVAL, SEED_TRAIN
from guardloop.core.settings import Settings

DEV_FRACTION = 0.15


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
