"""What the pool keeps of a text: an optional redaction of contact details, and the hash that makes
"the same text" one row however it was cased, spaced or disguised."""

from __future__ import annotations

import hashlib
import re

from guardloop.core.canonical import canonical_text

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
_URL = re.compile(
    r"\b(?:https?://|ftp://|www\.)[^\s<>\"']+"
    r"|\b(?:[a-z0-9-]+\.)+(?:com|org|net|edu|gov|io|co|uk|de|fr|info|biz|me|ly|app|dev)(?:/[^\s<>\"']*)?",
    re.IGNORECASE,
)
# A run of digits with phone punctuation; the digit count decides (below), so "2024" or "$1,500" stay.
_PHONE = re.compile(r"(?<![\w+])\+?\(?\d[\d\s().-]{5,}\d(?!\w)")
_PHONE_MIN_DIGITS = 7
_PHONE_MAX_DIGITS = 15

EMAIL_MARK, URL_MARK, PHONE_MARK = "[EMAIL]", "[URL]", "[PHONE]"


def _phone(match: re.Match[str]) -> str:
    digits = sum(ch.isdigit() for ch in match.group())
    return PHONE_MARK if _PHONE_MIN_DIGITS <= digits <= _PHONE_MAX_DIGITS else match.group()


def redact(text: str) -> str:
    """Replace e-mail addresses, URLs and phone numbers with [EMAIL], [URL], [PHONE]."""
    text = _EMAIL.sub(EMAIL_MARK, text)  # before URLs: the domain of an address looks like a URL
    text = _URL.sub(URL_MARK, text)
    return _PHONE.sub(_phone, text)


def normalize_text(text: str) -> str:
    """The text as the model reads it, case-folded, whitespace collapsed: what makes two texts "the same".

    The model reads the canonical form (guardloop.core.canonical), so a disguise of a text ("k1ll", fullwidth
    letters, zero-width characters) is the same pool item as the text. Rows hashed before (NFKC only) keep
    their hash; for ordinary text the two forms agree, so at most a disguised text gets a second row.
    """
    return " ".join(canonical_text(text).casefold().split())


def text_hash(text: str) -> str:
    return hashlib.sha256(normalize_text(text).encode("utf-8")).hexdigest()
