"""Conversation input: one verdict for the last user turn, read with a bounded window of earlier user turns.

How context is used (also in the README):

1. The last user turn is classified alone ("turn"), and together with up to K earlier user turns
   ("window": the last turn first, then the earlier ones newest first, joined with [SEP]; K is
   `conversation_context_turns`, and the window is cut at `max_text_chars`).
2. The verdict is the turn's, unless the window flags a more severe category than the turn does
   (severity: emergency, self-harm, medical, legal, financial). So context can raise a verdict
   ("how many of these would be too many" after "I want it all to end") but never clears one: a harmful
   last turn stays flagged whatever came before it.

Why only user turns: assistant turns are the chatbot's own words. A chatbot that has just answered with
crisis resources would otherwise keep every later, harmless turn flagged as self-harm. Why the last turn
first: the tokenizer keeps the first `max_seq_len` tokens, so a long context must lose its oldest words,
never the turn being judged.

The window is built from the turns' canonical forms (guardloop.core.canonical), the text the model reads;
the turn itself is kept as sent, for the pool. A turn that cannot be encoded (a lone surrogate) is a 422
naming it; earlier turns with nothing readable in them are left out of the window.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import HTTPException, status
from guardloop.models.onnx_model import Verdict
from guardloop.service.schemas import Message

from guardloop.core.canonical import canonical_text, text_problem
from guardloop.core.labels import HARMFUL_BY_SEVERITY

SEPARATOR = " [SEP] "  # the tokenizer's own separator token, so the model sees turn boundaries


@dataclass(frozen=True)
class ConversationTexts:
    turn: str  # the last user turn, as sent
    turn_index: int  # its position in `messages`
    # The turn's canonical form with its context (canonical forms too); None without earlier user turns to add.
    window: str | None


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


def conversation_texts(messages: list[Message], *, context_turns: int, max_chars: int) -> ConversationTexts:
    """The texts to classify for a conversation; 422 when there is no user turn to judge."""
    if not messages:
        raise _unprocessable("'messages' is empty: send the conversation, ending with the user turn to judge")
    user_turns = [i for i, message in enumerate(messages) if message.role == "user"]
    if not user_turns:
        raise _unprocessable("'messages' has no user turn: the verdict is for the last message with role 'user'")
    for i, message in enumerate(messages):
        problem = text_problem(message.content)
        if problem is not None:
            raise _unprocessable(f"messages.{i}.content {problem}")
    last = user_turns[-1]
    turn = messages[last].content
    if len(turn) > max_chars:
        raise _unprocessable(
            f"messages.{last}.content has {len(turn)} characters, at most {max_chars} allowed; shorten it"
        )
    readable = canonical_text(turn)
    if not readable.strip():
        raise _unprocessable(f"messages.{last}.content is empty (it has only invisible characters): send some words")
    earlier: list[str] = []  # newest first
    for i in reversed(user_turns[:-1]):
        if len(earlier) >= context_turns:
            break
        text = canonical_text(messages[i].content)
        if text.strip():
            earlier.append(text)
    parts = [readable]
    room = max_chars - len(readable)
    for text in earlier:
        room -= len(SEPARATOR)
        if room <= 0:
            break
        parts.append(text[:room])
        room -= len(parts[-1])
    return ConversationTexts(turn, last, SEPARATOR.join(parts) if len(parts) > 1 else None)


def _severity_rank(verdict: Verdict) -> int:
    """0 for the most severe flagged category; len(HARMFUL_BY_SEVERITY) when nothing is flagged."""
    return min((HARMFUL_BY_SEVERITY.index(c) for c in verdict.flagged_categories), default=len(HARMFUL_BY_SEVERITY))


def pick_verdict(turn: Verdict, window: Verdict | None) -> tuple[Verdict, bool]:
    """The conversation's verdict and whether the context decided it (see the module docstring)."""
    if window is not None and _severity_rank(window) < _severity_rank(turn):
        return window, True
    return turn, False
