"""The verifier every accepted variation must pass: it is kept only if nothing says its label changed.

Hygiene (hygiene.py) removes what is not a variation at all; the consistency filter drops what the current model
confidently puts elsewhere, which is rarely (a young model is seldom confident). The verifier asks what a rewrite
*is*, independently of that model, and rejects, with the reason counted:

- `copied_example`: a near-copy of any of the prompt's own few-shot texts (small LLMs echo them);
- `injected_source`: every rewrite of a text that carries instructions to the model ("you are now a pirate",
  "ignore the above"): what comes back may follow them instead of rewriting them, and nothing here can tell;
- `not_first_person`: a self-harm rewrite that no longer speaks in the first person while its source does: the
  class is "the writer talks about hurting or killing themselves", and SmolLM2 often turns it into advice to
  "you" or talk about "them" (in the hand-labeled sample every label-true self-harm rewrite said I/me/my);
- `drifted`: a rewrite whose sentence embedding is far from its original's (it answers the post, follows an
  instruction, or talks about something else);
- `judge_disagrees`: the LLM, asked a constrained six-way label question about the rewrite alone (judge.py),
  picks a class that is neither the label nor the class it picks for the original. SmolLM2-135M answers only
  about half of the seed eval set right, so its verdict is compared with its own reading of the original: a
  rewrite it reads like the original (right or wrong) keeps its label; one it reads differently does not;
- `teacher_disagrees`: an optional second classifier (e.g. a fine-tuned teacher) puts it in another class.

Each check is optional and fails closed: a check that cannot run rejects the rewrites it could not verify.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from guardloop.trainer.variations.hygiene import normalize_for_comparison
from guardloop.trainer.variations.prompt import FEW_SHOT

from guardloop.core.labels import LABELS, label_index

log = logging.getLogger(__name__)

Embed = Callable[[list[str]], np.ndarray]
"""texts -> unit-length sentence embeddings, one row per text."""


class Judge(Protocol):
    def labels_of(self, texts: Sequence[str]) -> list[str | None]:
        """The label the judge picks for each text; None where it gave no usable answer."""
        ...


# Phrases that address the model rather than describe the writer's situation. A post that contains one is data
# that tries to steer the rewriter; its rewrites are not trusted (see `injected_source`).
_INSTRUCTION = re.compile(
    r"\b(?:ignore|disregard|forget)\s+(?:(?:all|any|the|your|of|my)\s+)*"
    r"(?:(?:previous|prior|above|earlier|preceding|system|original)\s+)?(?:instructions?|prompts?|rules)\b"
    r"|\b(?:ignore|disregard)\s+(?:(?:all|everything|the)\s+)?(?:above|previous|prior)\b"
    r"|\byou\s+are\s+now\s+(?:a|an|my|the|in)\b|(?-i:\bDAN\b)"
    r"|\bfrom\s+now\s+on\b[^.!?\n]{0,30}\b(?:you|act|answer|respond|reply|talk|speak|write)\b"
    r"|(?:^|[.!?:;]\s*)(?:please\s+)?(?:act|behave|respond|answer|reply|talk|speak|write)\s+(?:only\s+)?(?:as|like)\s"
    r"|\bpretend\s+(?:to\s+be|you(?:'re|\s+are))\b|\broleplay\s+as\b|\bsystem\s+prompt\b"
    r"|\bnew\s+instructions\b|\bjailbreak|\bdeveloper\s+mode\b",
    re.IGNORECASE,
)


_FIRST_PERSON = re.compile(r"\b(?:i|i'm|im|i've|i'd|i'll|me|my|myself|mine)\b", re.IGNORECASE)


def lazy_embedder(cache_dir: Path) -> Embed:
    """The cycle's sentence embedder (all-MiniLM-L6-v2, cached in `cache_dir`), loaded on first use only: a run
    whose LLM writes nothing never loads (or exports) it."""
    loaded: list[Embed] = []

    def embed(texts: list[str]) -> np.ndarray:
        if not loaded:
            from guardloop.trainer.embeddings import SentenceEmbedder

            loaded.append(SentenceEmbedder(cache_dir).embed)
        return loaded[0](texts)

    return embed


def carries_instructions(text: str) -> bool:
    """Whether the text tries to instruct the model that reads it (a prompt injection)."""
    return _INSTRUCTION.search(text) is not None


def _near_copy(text: str, tokens: set[str], example: str, example_tokens: set[str], threshold: float) -> bool:
    """hygiene.similarity(text, example) >= threshold, with difflib's cheap upper bounds tried first."""
    union = tokens | example_tokens
    if union and len(tokens & example_tokens) / len(union) >= threshold:
        return True
    matcher = difflib.SequenceMatcher(None, text, example, autojunk=False)
    return (
        matcher.real_quick_ratio() >= threshold and matcher.quick_ratio() >= threshold and matcher.ratio() >= threshold
    )


def few_shot_texts() -> list[str]:
    """Every text the variations prompt shows the LLM as an example, normalized for comparison."""
    texts = [original for original, _ in FEW_SHOT.values()]
    texts += [variation for _, variations in FEW_SHOT.values() for variation in variations]
    return [normalize_for_comparison(text) for text in texts]


@dataclass(frozen=True)
class VerifierConfig:
    example_copy: float = 0.75  # similarity (hygiene.similarity) to a few-shot text at or above: a copy
    # Embedding (all-MiniLM-L6-v2) cosine to the original below this: drifted. Chosen on the 366 hand-labeled
    # SmolLM2 variations of docs/variations-hand-labeled.jsonl: off-label ones average 0.30, label-true 0.51;
    # with the judge, 0.45 kept 12 off-label of 124 (9.7%), 0.5 kept 8 of 110 (7.3%).
    min_source_cosine: float = 0.5
    teacher_threshold: float = 0.5  # the teacher's top class elsewhere with at least this probability: rejected
    first_person_labels: tuple[str, ...] = ("self-harm",)  # classes whose rewrites must keep the writer's "I"
    reject_injected: bool = True


class Verifier:
    """Runs the checks in order (cheap first) and keeps what passes all of them."""

    def __init__(
        self,
        config: VerifierConfig | None = None,
        *,
        judge: Judge | None = None,
        embed: Embed | None = None,
        teacher: Callable[[list[str]], np.ndarray] | None = None,
    ) -> None:
        self.config = config or VerifierConfig()
        self.judge = judge
        self.embed = embed
        self.teacher = teacher
        self._examples = [(text, set(text.split())) for text in few_shot_texts()]

    def verify(
        self, source: str, label: str, candidates: Sequence[str], also: Sequence[str] = ()
    ) -> tuple[list[str], Counter[str]]:
        """The candidates that pass every check, in order, and the count rejected per reason."""
        reasons = self.decide(source, label, candidates, also)
        kept = [text for text, reason in zip(candidates, reasons, strict=True) if reason is None]
        return kept, Counter(reason for reason in reasons if reason is not None)

    def decide(self, source: str, label: str, candidates: Sequence[str], also: Sequence[str] = ()) -> list[str | None]:
        """Per candidate, the reason it is rejected (the first check it fails), or None when it passes them all.

        `also`: the other texts a composed post was written from (same class as `source`): it may carry none of
        their instructions either, and it has drifted only when it is far from all of them."""
        reasons: list[str | None] = [None] * len(candidates)
        if not candidates:
            return reasons
        if self.config.reject_injected and any(carries_instructions(text) for text in (source, *also)):
            return ["injected_source"] * len(candidates)
        personal = label in self.config.first_person_labels and _FIRST_PERSON.search(source) is not None
        for i, text in enumerate(candidates):
            if self._copies_an_example(text):
                reasons[i] = "copied_example"
            elif personal and _FIRST_PERSON.search(text) is None:
                reasons[i] = "not_first_person"
        for reason, check in (
            ("drifted", lambda texts: self._drifted([source, *also], texts)),
            ("judge_disagrees", lambda texts: self._judge_disagrees(source, label, texts)),
            ("teacher_disagrees", lambda texts: self._teacher_disagrees(label, texts)),
        ):
            open_ = [i for i, why in enumerate(reasons) if why is None]
            if not open_:
                break
            try:
                verdicts = check([candidates[i] for i in open_])
            except Exception:  # an unverified rewrite is not kept; the reason is counted, the batch goes on
                log.exception("verifier check %s failed; rejecting %d unverified variations", reason, len(open_))
                verdicts, reason = [True] * len(open_), "unverified"
            for i, drop in zip(open_, verdicts, strict=True):
                if drop:
                    reasons[i] = reason
        return reasons

    def _copies_an_example(self, text: str) -> bool:
        normalized = normalize_for_comparison(text)
        tokens = set(normalized.split())
        threshold = self.config.example_copy
        return any(_near_copy(normalized, tokens, example, words, threshold) for example, words in self._examples)

    def _drifted(self, sources: list[str], texts: list[str]) -> list[bool]:
        if self.embed is None:
            return [False] * len(texts)
        vectors = np.asarray(self.embed([*sources, *texts]), dtype=np.float64)
        cosines = (vectors[len(sources) :] @ vectors[: len(sources)].T).max(axis=1)  # the nearest source counts
        return [bool(c < self.config.min_source_cosine) for c in cosines]

    def _judge_disagrees(self, source: str, label: str, texts: list[str]) -> list[bool]:
        if self.judge is None:
            return [False] * len(texts)
        source_verdict, *verdicts = self.judge.labels_of([source, *texts])
        if len(verdicts) != len(texts):
            raise ValueError(f"the judge answered {len(verdicts) + 1} times for {len(texts) + 1} texts")
        agreeing = {label, source_verdict} - {None}
        return [verdict not in agreeing for verdict in verdicts]  # no answer: not verified

    def _teacher_disagrees(self, label: str, texts: list[str]) -> list[bool]:
        if self.teacher is None:
            return [False] * len(texts)
        probs = np.asarray(self.teacher(texts), dtype=np.float64)
        if probs.shape != (len(texts), len(LABELS)):
            raise ValueError(f"the teacher returned shape {probs.shape}, expected ({len(texts)}, {len(LABELS)})")
        wanted = label_index(label)
        return [bool(row.argmax() != wanted and row.max() >= self.config.teacher_threshold) for row in probs]
