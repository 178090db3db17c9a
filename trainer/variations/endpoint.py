"""One chat request to an OpenAI-compatible endpoint, and how it failed: each failure becomes an AttemptFailed
with a short reason (timeout, connection, http_503, garbage_output, ...) and whether a retry may help. The
generator (generator.py) retries, counts and logs around it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import openai


class AttemptFailed(Exception):
    def __init__(self, reason: str, detail: str, retryable: bool) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.retryable = retryable


def chat_once(
    client: openai.OpenAI,
    model: str,
    messages: list[dict[str, str]],
    *,
    temperature: float,
    max_tokens: int,
    timeout: float,
) -> tuple[str, int]:
    """The answer's text and completion tokens; any failure raised as AttemptFailed."""
    with attempt_failures(timeout):
        response: Any = client.chat.completions.create(
            model=model,
            messages=messages,  # type: ignore[arg-type]
            temperature=temperature,
            max_tokens=max_tokens,
            timeout=timeout,
        )
    return answer_text(response)


@contextlib.contextmanager
def attempt_failures(timeout: float) -> Iterator[None]:
    """Turns the openai client's errors inside into AttemptFailed (`timeout`: the wait the client was given)."""
    import openai  # about a second to import: only a started generator pays it

    try:
        yield
    except openai.APITimeoutError as exc:
        raise AttemptFailed("timeout", f"no answer within {timeout:g}s", retryable=True) from exc
    except openai.APIConnectionError as exc:
        raise AttemptFailed("connection", describe_connection_error(exc), retryable=True) from exc
    except openai.APIStatusError as exc:
        retryable = exc.status_code >= 500 or exc.status_code in (408, 409, 429)
        raise AttemptFailed(f"http_{exc.status_code}", short(str(exc)), retryable=retryable) from exc
    except (openai.APIResponseValidationError, ValueError) as exc:  # ValueError: a body that is not JSON
        raise AttemptFailed("garbage_output", short(f"{type(exc).__name__}: {exc}"), retryable=False) from exc


def answer_text(response: Any) -> tuple[str, int]:
    """The first choice's text; anything that is not a chat completion with text is garbage."""
    try:
        content = response.choices[0].message.content
        usage = getattr(response, "usage", None)
        tokens = int(getattr(usage, "completion_tokens", 0) or 0)
    except (AttributeError, IndexError, TypeError) as exc:
        raise AttemptFailed("garbage_output", short(f"not a chat completion: {response!r}"), retryable=False) from exc
    if not isinstance(content, str) or not content.strip():
        raise AttemptFailed("garbage_output", "the answer has no text", retryable=False)
    return content, tokens


def describe_connection_error(exc: Exception) -> str:
    cause = exc.__cause__ or exc.__context__
    return short(f"{exc}: {cause}" if cause else str(exc))


def short(text: str, limit: int = 300) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
