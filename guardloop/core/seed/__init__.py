"""The team-written seed data shipped with the package: the one place that says where it lives.

train.jsonl trains the bootstrap model; eval.jsonl is the gate's default evaluation set and is never trained on.
"""

from pathlib import Path

SEED_DIR = Path(__file__).parent
SEED_TRAIN = SEED_DIR / "train.jsonl"
SEED_EVAL = SEED_DIR / "eval.jsonl"
