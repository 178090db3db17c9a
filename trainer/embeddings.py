"""Sentence embeddings for clustering the pool: all-MiniLM-L6-v2 through ONNX Runtime, mean-pooled, cached.

The base model is exported once with optimum (feature-extraction) into the cache directory; vectors are
cached by text hash, so a pool that grows by a few hundred items per cycle costs a few hundred forward passes.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import onnxruntime as ort
from filelock import FileLock
from guardloop.trainer.base_models import minilm_dir
from tokenizers import Tokenizer

EMBEDDER_NAME = "all-MiniLM-L6-v2"


class Embedder(Protocol):
    """What the drift check and the pool map need of an embedder (tests give them synthetic ones)."""

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def export_embedder(target: Path) -> Path:
    """Export the base model for feature extraction once; later calls reuse the files."""
    if (target / "model.onnx").is_file():
        return target
    from optimum.exporters.onnx import main_export

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / ".embedder.lock")):
        if (target / "model.onnx").is_file():
            return target
        with tempfile.TemporaryDirectory(dir=target.parent, prefix=".embedder-") as tmp:
            main_export(str(minilm_dir()), output=tmp, task="feature-extraction", device="cpu", do_validation=False)
            os.rename(tmp, target)  # the directory appears complete or not at all
            Path(tmp).mkdir()  # TemporaryDirectory wants something to clean up
    return target


class SentenceEmbedder:
    def __init__(self, cache_dir: Path, *, threads: int = 2, max_seq_len: int = 128, batch_size: int = 64) -> None:
        model_dir = export_embedder(cache_dir / "embedder")
        self.cache_file = cache_dir / f"embeddings-{EMBEDDER_NAME}.npz"
        self.batch_size = batch_size
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length=max_seq_len)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self._inputs = {i.name for i in self.session.get_inputs()}

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self.tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feeds["token_type_ids"] = np.zeros_like(ids)
        (hidden,) = self.session.run(["last_hidden_state"], feeds)
        summed = (hidden * mask[:, :, None]).sum(axis=1)
        pooled = summed / np.clip(mask.sum(axis=1, keepdims=True), 1, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length vectors, one row per text; cached ones are not recomputed."""
        cache = self._load_cache()
        hashes = [text_hash(t) for t in texts]
        # Similar lengths share a batch, so little of each forward pass is spent on padding.
        missing = sorted(
            {h: t for h, t in zip(hashes, texts, strict=True) if h not in cache}.items(), key=lambda item: len(item[1])
        )
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            for (h, _), vector in zip(chunk, self._encode([t for _, t in chunk]), strict=True):
                cache[h] = vector.astype(np.float32)
        if missing:
            self._save_cache(cache)
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        return np.stack([cache[h] for h in hashes])

    def _load_cache(self) -> dict[str, np.ndarray]:
        if not self.cache_file.is_file():
            return {}
        with np.load(self.cache_file, allow_pickle=False) as data:
            return dict(zip(data["hashes"].tolist(), data["vectors"], strict=True))

    def _save_cache(self, cache: dict[str, np.ndarray]) -> None:
        tmp = self.cache_file.with_suffix(".tmp.npz")
        hashes = np.array(list(cache), dtype="<U64")
        np.savez(tmp, hashes=hashes, vectors=np.stack(list(cache.values())))
        os.replace(tmp, self.cache_file)
