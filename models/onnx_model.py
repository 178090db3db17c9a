"""A published registry version loaded into ONNX Runtime: tokenize, run, turn logits into verdicts.

Torch-free on purpose: the serving image carries ONNX Runtime and tokenizers only.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from guardloop.core.labels import LABELS, SAFE_LABEL

_LOG_N_LABELS = math.log(len(LABELS))


class ModelLoadError(Exception):
    """A version that cannot serve: missing file, wrong labels, failing warm-up."""


@dataclass(frozen=True)
class Verdict:
    label: str
    scores: dict[str, float]
    confidence: float
    uncertainty: float  # entropy of the scores divided by log(6): 0 = certain, 1 = uniform
    flagged: bool
    # Harmful categories whose own score reaches their own threshold, highest score first.
    flagged_categories: tuple[str, ...] = ()


class OnnxClassifier:
    """Predicts the six labels with one ONNX Runtime session. Thread-safe: `run` may be called concurrently."""

    def __init__(
        self,
        model_dir: Path,
        *,
        version: str,
        thresholds: dict[str, float] | None = None,
        threads: int = 1,
        max_seq_len: int = 128,
        model_file: str = "model.onnx",
        tokenizer_from: OnnxClassifier | None = None,
    ) -> None:
        self.version = version
        self.model_dir = model_dir
        for name in (model_file, "tokenizer.json", "labels.json"):
            if not (model_dir / name).is_file():
                raise ModelLoadError(f"{model_dir}: missing {name}")
        try:
            model_labels = json.loads((model_dir / "labels.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"{model_dir}/labels.json: unreadable ({exc})") from exc
        if not isinstance(model_labels, list) or sorted(model_labels) != sorted(LABELS):
            raise ModelLoadError(f"{model_dir}/labels.json: expected the six labels {list(LABELS)}, got {model_labels}")
        self.model_labels: list[str] = model_labels
        # Column j of the model's output is label model_labels[j]; reorder once into LABELS order.
        self._reorder = np.array([model_labels.index(label) for label in LABELS])
        self.thresholds = {label: 0.5 for label in LABELS} | (thresholds or {})

        self.max_seq_len = max_seq_len
        try:
            tokenizer_json = (model_dir / "tokenizer.json").read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"{model_dir}/tokenizer.json: unreadable ({exc})") from exc
        self.tokenizer_digest = hashlib.sha256(tokenizer_json).hexdigest()
        if (
            tokenizer_from is not None
            and tokenizer_from.tokenizer_digest == self.tokenizer_digest
            and tokenizer_from.max_seq_len == max_seq_len
        ):
            # The same file as the model being replaced: share its tokenizer. Parsing one holds the GIL for
            # 30-50 ms, which would stall every request on the event loop during a hot-swap.
            self.tokenizer = tokenizer_from.tokenizer
        else:
            try:
                self.tokenizer = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
            except Exception as exc:
                raise ModelLoadError(f"{model_dir}/tokenizer.json: unreadable ({exc})") from exc
            self.tokenizer.enable_truncation(max_length=max_seq_len)
            pad_id = self.tokenizer.token_to_id("[PAD]")
            self.tokenizer.enable_padding(pad_id=0 if pad_id is None else pad_id, pad_token="[PAD]")

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(
                str(model_dir / model_file), sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors for corrupt files
            raise ModelLoadError(f"{model_dir}/{model_file}: cannot load ({exc})") from exc
        self._input_names = {i.name for i in self.session.get_inputs()}

    def logits(self, texts: list[str]) -> np.ndarray:
        """Raw logits, columns in LABELS order."""
        encodings = self.tokenizer.encode_batch(texts)
        feeds = {
            "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        }
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.array([e.type_ids for e in encodings], dtype=np.int64)
        (out,) = self.session.run(["logits"], feeds)
        if out.shape[1:] != self._reorder.shape:  # a wider output would be cut to six columns without a word
            raise ValueError(f"output of shape {out.shape}, expected (batch, {len(self._reorder)}): one per label")
        return out[:, self._reorder]

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        logits = self.logits(texts)
        logits = logits - logits.max(axis=1, keepdims=True)
        exp = np.exp(logits)
        return exp / exp.sum(axis=1, keepdims=True)

    def predict_many(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Probabilities for any number of texts, in their order, run in batches of similar length (little padding)."""
        probs = np.zeros((len(texts), len(LABELS)), dtype=np.float32)
        for rows in length_ordered_batches(texts, batch_size):
            probs[rows] = self.predict_proba([texts[i] for i in rows])
        return probs

    def classify(self, texts: list[str]) -> list[Verdict]:
        return [self.verdict(row) for row in self.predict_proba(texts)]

    def verdict(self, probs: np.ndarray) -> Verdict:
        """The verdict for one row of probabilities (LABELS order).

        A category is flagged when its own score reaches its own threshold (one-vs-rest), whatever the top
        label is: that is the rule `guardloop calibrate` tunes thresholds for, so a calibrated low self-harm
        threshold does flag a text whose top label is something else. With thresholds >= 0.5 only the top
        label can reach its threshold, so this equals "top label is harmful and its score reaches its threshold".
        """
        best = int(probs.argmax())
        label = LABELS[best]
        confidence = float(probs[best])
        entropy = float(-(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum())
        scores = {name: float(p) for name, p in zip(LABELS, probs, strict=True)}
        flagged_categories = tuple(
            sorted(
                (name for name in LABELS if name != SAFE_LABEL and scores[name] >= self.thresholds[name]),
                key=lambda name: -scores[name],
            )
        )
        return Verdict(
            label=label,
            scores=scores,
            confidence=confidence,
            uncertainty=min(1.0, entropy / _LOG_N_LABELS),
            flagged=bool(flagged_categories),
            flagged_categories=flagged_categories,
        )

    def warm_up(self) -> None:
        """Run a few texts end to end so that a broken model fails here, before it is swapped in."""
        try:
            probs = self.predict_proba(["hello there", "I need help with my taxes and my landlord right now"])
        except Exception as exc:
            raise ModelLoadError(f"{self.model_dir}: warm-up failed ({exc})") from exc
        if probs.shape != (2, len(LABELS)) or not np.isfinite(probs).all():
            raise ModelLoadError(f"{self.model_dir}: warm-up gave unusable output of shape {probs.shape}")


def length_ordered_batches(texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """Row indices of `texts` in batches of similar length, so a batch pads to little more than its own texts."""
    order = np.argsort([len(text) for text in texts], kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
