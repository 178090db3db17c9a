"""The six labels of the guard, and the one place where label strings are parsed."""

from __future__ import annotations

LABELS: tuple[str, ...] = (
    "self-harm",
    "medical-advice",
    "legal-advice",
    "financial-advice",
    "emergency-situation",
    "not-harmful",
)
SAFE_LABEL = "not-harmful"
HARMFUL_LABELS: tuple[str, ...] = tuple(label for label in LABELS if label != SAFE_LABEL)
# Most severe first: when several categories apply, the chatbot should follow the first one's guidance
# (a danger to life outranks advice topics).
HARMFUL_BY_SEVERITY: tuple[str, ...] = (
    "emergency-situation",
    "self-harm",
    "medical-advice",
    "legal-advice",
    "financial-advice",
)

# Spellings seen in public datasets and in hand-written files. Keys are normalized (see below).
_ALIASES: dict[str, str] = {
    "discard": "not-harmful",
    "not harmful": "not-harmful",
    "nonharmful": "not-harmful",
    "non-harmful": "not-harmful",
    "safe": "not-harmful",
    "none": "not-harmful",
    "selfharm": "self-harm",
    "self harm": "self-harm",
    "medical": "medical-advice",
    "medical advice": "medical-advice",
    "legal": "legal-advice",
    "legal advice": "legal-advice",
    "financial": "financial-advice",
    "financial advice": "financial-advice",
    "emergency": "emergency-situation",
    "emergency situation": "emergency-situation",
}


class UnknownLabelError(ValueError):
    """A label string that is neither one of LABELS nor a known alias."""

    def __init__(self, raw: str) -> None:
        super().__init__(f"unknown label {raw!r}; accepted labels: {', '.join(LABELS)} (alias: discard)")
        self.raw = raw


def _normalize(raw: str) -> str:
    return " ".join(raw.strip().lower().replace("_", "-").split())


def parse_label(raw: str) -> str:
    """Return the canonical label for `raw`, ignoring case, stray whitespace and known aliases."""
    key = _normalize(raw)
    if key in LABELS:
        return key
    if key in _ALIASES:
        return _ALIASES[key]
    raise UnknownLabelError(raw)


def label_index(label: str) -> int:
    return LABELS.index(label)
