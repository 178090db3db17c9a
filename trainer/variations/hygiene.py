"""Output hygiene and verification of LLM variations: numbering and chatter stripped, empties, copies of the
original, duplicates and near-duplicates dropped, lengths bounded; then the consistency filter, which drops
variations the current model confidently puts in another class."""

from __future__ import annotations

import difflib
import json
import logging
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from guardloop.trainer.variations.prompt import POST_TAG

from guardloop.core.labels import LABELS, label_index

PredictProba = Callable[[list[str]], np.ndarray]
"""texts -> probabilities of shape (len(texts), 6) in guardloop.core.labels.LABELS order."""

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- output hygiene
@dataclass(frozen=True)
class HygieneConfig:
    min_chars: int = 8
    max_chars: int = 1000
    min_length_ratio: float = 0.3  # of the original's length
    max_length_ratio: float = 3.0
    max_chars_floor: int = 80  # a 10-character original may still get an 80-character variation
    near_duplicate: float = 0.9  # difflib ratio or token Jaccard at or above this: the same text


_LEADING_MARKER = re.compile(
    r"^\s*(?:(?:variation|version|option|example)\s*\d{0,2}\s*[:.)\-]\s*"
    r"|\(?\d{1,2}\s*[.):\]]\s+|\(?\d{1,2}[.)\]](?=[^\W\d_]|[\"'])|[-*•·\u2013\u2014>]+\s+|#+\s+)",
    re.IGNORECASE,
)
_QUOTES = "\"'\u201c\u201d\u2018\u2019«»`"
_CHATTER = re.compile(
    r"^(?:(?:sure|certainly|of course|okay|ok)\s*[,.!]|(?:here (?:are|is)|below are|these are)\b|note\s*:"
    r"|(?:i hope|i'm sorry|i cannot|as an ai)\b|variations?\b)",
    re.IGNORECASE,
)
_WORD = re.compile(r"\w+")


def clean_line(line: str) -> str:
    """One line of LLM output without numbering, bullets, markdown emphasis, echoed tags or wrapping quotes."""
    line = POST_TAG.sub(" ", line).replace("**", "").replace("__", "").strip()
    while True:
        stripped = _LEADING_MARKER.sub("", line, count=1).strip()
        if stripped == line:
            break
        line = stripped
    if len(line) >= 2 and line[0] in _QUOTES and line[-1] in _QUOTES:
        line = line[1:-1].strip()
    elif line.count('"') == 1 or line.count("“") + line.count("”") == 1:
        line = line.strip(_QUOTES).strip()  # a quote opened but never closed (or the reverse)
    return " ".join(line.split())


def is_chatter(line: str) -> bool:
    """Lines that talk about the answer instead of being part of it ("Here are 5 variations:") or are data."""
    if line.endswith(":") or _CHATTER.match(line):
        return True
    if line[:1] in "{[":
        try:
            json.loads(line)
        except ValueError:
            return False
        return True
    return False


def normalize_for_comparison(text: str) -> str:
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).casefold()))


def similarity(a: str, b: str) -> float:
    """Max of character-level (difflib) and token-set (Jaccard) similarity of two normalized texts."""
    if a == b:
        return 1.0
    tokens_a, tokens_b = set(a.split()), set(b.split())
    jaccard = len(tokens_a & tokens_b) / len(tokens_a | tokens_b) if tokens_a | tokens_b else 1.0
    return max(jaccard, difflib.SequenceMatcher(None, a, b, autojunk=False).ratio())


def length_bounds(original: str, config: HygieneConfig) -> tuple[int, int]:
    n = len(original.strip())
    low = max(config.min_chars, int(n * config.min_length_ratio))
    high = min(config.max_chars, max(config.max_chars_floor, int(n * config.max_length_ratio)))
    return low, max(low, high)


def apply_hygiene(
    original: str, raw_output: str, config: HygieneConfig, already: Sequence[str] = ()
) -> tuple[list[str], Counter[str]]:
    """Candidate variations from raw LLM output, in order, and the count of lines dropped per reason.

    `already`: variations kept from an earlier request for the same text; a line repeating one is a duplicate.
    """
    filtered: Counter[str] = Counter()
    kept: list[str] = []
    kept_normalized: list[str] = [normalize_for_comparison(text) for text in already]
    original_normalized = normalize_for_comparison(original)
    low, high = length_bounds(original, config)
    for raw_line in raw_output.splitlines():
        line = clean_line(raw_line)
        if not line:
            continue  # blank lines and bare numbers are layout, not variations
        normalized = normalize_for_comparison(line)
        if not normalized or is_chatter(line):
            filtered["chatter"] += 1
        elif len(line) < low:
            filtered["too_short"] += 1
        elif len(line) > high:
            filtered["too_long"] += 1
        elif similarity(normalized, original_normalized) >= config.near_duplicate:
            filtered["copy_of_original"] += 1
        elif normalized in kept_normalized:
            filtered["duplicate"] += 1
        elif any(similarity(normalized, other) >= config.near_duplicate for other in kept_normalized):
            filtered["near_duplicate"] += 1
        else:
            kept.append(line)
            kept_normalized.append(normalized)
    return kept, filtered


def consistency_filter(
    candidates: list[str], label: str, predict_proba: PredictProba, threshold: float
) -> tuple[list[str], int]:
    """Keep the candidates the model does not confidently (>= threshold) put in a class other than `label`."""
    if not candidates:
        return [], 0
    probs = np.asarray(predict_proba(candidates), dtype=np.float64)
    if probs.shape != (len(candidates), len(LABELS)):
        raise ValueError(f"predict_proba returned shape {probs.shape}, expected ({len(candidates)}, {len(LABELS)})")
    wanted = label_index(label)
    predicted = probs.argmax(axis=1)
    confident_elsewhere = (predicted != wanted) & (probs.max(axis=1) >= threshold)
    kept = [text for text, drop in zip(candidates, confident_elsewhere, strict=True) if not drop]
    return kept, int(confident_elsewhere.sum())
