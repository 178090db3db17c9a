"""The drift reference of a model: sentence embeddings of a sample of its training texts, stored with the model.

Why an artifact of the version rather than recomputed later from the training data: the card records only
fingerprints of the base files, while a cycle's training set also holds the reviewers' labels and accepted
variations of that moment, which later purges, corrections and new cycles change. Written into the staging
directory before publish, `reference.npz` is copied, fsynced and renamed into the registry with the model
(models/registry.py), so a version has its reference from the instant it is visible, or is not visible at all,
and a rollback brings back the matching reference with the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from guardloop.trainer.embeddings import EMBEDDER_NAME, SentenceEmbedder

REFERENCE_FILE = "reference.npz"
# Rows kept: the drift test uses at most 500 per side; 1,000 lets it draw a fresh sample each time while the
# file stays under 1 MB (float16: the test's kernel does not need more precision than that).
REFERENCE_ROWS = 1000


def write_reference(
    target_dir: Path, texts: Sequence[str], embedder: SentenceEmbedder, *, rows: int = REFERENCE_ROWS, seed: int = 0
) -> int:
    """Embed a random sample of `texts` (at most `rows`) into `target_dir/reference.npz`; returns the rows."""
    unique = sorted(set(texts))
    rng = np.random.default_rng(seed)
    chosen = [unique[i] for i in sorted(rng.choice(len(unique), size=min(rows, len(unique)), replace=False))]
    vectors = embedder.embed(chosen).astype(np.float16)
    with open(target_dir / REFERENCE_FILE, "wb") as handle:
        np.savez(handle, embeddings=vectors, embedder=np.array(EMBEDDER_NAME))
    return len(chosen)


def load_reference(version_dir: Path) -> np.ndarray | None:
    """The stored reference embeddings (float32), or None for a version published without one (or by another
    embedder, whose vectors would not be comparable)."""
    path = version_dir / REFERENCE_FILE
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        if str(data["embedder"]) != EMBEDDER_NAME:
            return None
        return data["embeddings"].astype(np.float32)
