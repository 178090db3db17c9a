"""A published registry version loaded into ONNX Runtime: tokenize, run, turn logits into verdicts.

Torch-free on purpose: the serving image carries ONNX Runtime and tokenizers only.

Batch independence: a guard's verdict must depend on the text, not on the texts that share its forward pass.
Two things could make a row's output depend on its batch-mates, and both are removed by construction:
- Padding: a text runs padded to `padded_length(its own token count)` (a multiple of PAD_MULTIPLE), never to the
  longest batch-mate. `predict_proba` runs one session call per padded length, so a text always runs at the same
  shape [rows, padded_length], alone or not; only the number of rows varies, and every op of the exported models
  (int8 MatMuls with fixed scales, LayerNorm, softmax over a row, GELU) computes each row from that row alone.
- Dynamic int8 quantization (DynamicQuantizeLinear): it picks one activation scale for the whole batch tensor, so
  a row's scores move with its batch-mates (0.369-0.484 self-harm for one text). Models with that op run one
  text per session call, unpadded, instead: the same scores as that text sent alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from guardloop.core.labels import LABELS, SAFE_LABEL

_LOG_N_LABELS = math.log(len(LABELS))
# A text runs padded to its token count rounded up to this: few distinct shapes (so batch-mates of similar length
# share one session call) and at most 7 pad tokens of wasted work per text.
PAD_MULTIPLE = 8
# The op whose activation scale is computed over the whole batch tensor (see the module docstring).
_BATCH_DEPENDENT_OP = b"DynamicQuantizeLinear"


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
            self.tokenizer.no_padding()  # each text is padded to its own bucket in `_run`, not to its batch-mates
        pad_id = self.tokenizer.token_to_id("[PAD]")
        self._pad_id = 0 if pad_id is None else pad_id

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
        # False for dynamic int8 graphs: each text then gets a session call of its own (see the module docstring).
        self.batches_rows_together = not _has_op(model_dir / model_file, _BATCH_DEPENDENT_OP)

    def logits(self, texts: list[str]) -> np.ndarray:
        """Raw logits, columns in LABELS order; each row is the same as the text's logits when run alone."""
        encodings = self.tokenizer.encode_batch(texts)
        out = np.zeros((len(texts), len(LABELS)), dtype=np.float32)
        for rows in self._session_groups([len(e.ids) for e in encodings]):
            out[rows] = self._run([encodings[i] for i in rows])
        return out

    def _session_groups(self, n_tokens: Sequence[int]) -> list[list[int]]:
        """Row indices run together: texts of one padded length (or one text each for a dynamic int8 graph)."""
        if not self.batches_rows_together:
            return [[i] for i in range(len(n_tokens))]
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(n_tokens):
            groups.setdefault(padded_length(n, self.max_seq_len), []).append(i)
        return list(groups.values())

    def _run(self, encodings: Sequence[Any]) -> np.ndarray:
        """One session call for texts of one padded length, each padded to its own bucket (they all share it).

        A dynamic int8 graph runs one text, unpadded: its scale spans pad positions too, so a text there is only
        "alone" at its exact length (as a lone request was always served).
        """
        longest = max(len(e.ids) for e in encodings)
        width = padded_length(longest, self.max_seq_len) if self.batches_rows_together else longest
        input_ids = np.full((len(encodings), width), self._pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(encodings), width), dtype=np.int64)
        token_type_ids = np.zeros((len(encodings), width), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            input_ids[row, :n] = encoding.ids
            attention_mask[row, :n] = encoding.attention_mask
            token_type_ids[row, :n] = encoding.type_ids
        feeds = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = token_type_ids
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
        """Probabilities for any number of texts, in their order, in batches of similar length (few session calls).

        Row for row the same as `predict_proba` on each text alone: batching here only saves time.
        """
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


def padded_length(n_tokens: int, max_seq_len: int) -> int:
    """The sequence length a text of `n_tokens` tokens always runs at: decided by the text alone."""
    return min(max_seq_len, -(-max(n_tokens, 1) // PAD_MULTIPLE) * PAD_MULTIPLE)


def _has_op(model_file: Path, op_type: bytes) -> bool:
    """Whether the ONNX file names `op_type`: protobuf stores node op types as plain strings, so a byte search
    answers without the `onnx` package (not in the serving image). A false positive only costs speed."""
    with model_file.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(op_type) != -1


def length_ordered_batches(texts: Sequence[str], batch_size: int) -> list[np.ndarray]:
    """Row indices of `texts` in batches of similar length, so a batch pads to little more than its own texts."""
    order = np.argsort([len(text) for text in texts], kind="stable")
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
