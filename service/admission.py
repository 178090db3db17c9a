"""Fair queueing and admission by work for the micro-batcher.

Why per-client queues: one FIFO let a caller with 64 texts of 4,000 characters fill every batch ahead of a
one-text caller (p50 5 ms -> 2 s). Each client (an API key's name, else the client address) gets its own FIFO of
texts, and batches are formed in start-time fair order across clients (each client gets an equal share of the
tokens, one text at a time): a request's texts are thereby split into chunks that share batches with everyone
else's.

Why admission by work: counting requests treats a 64 x 4,000-character request like a one-word one. Every text
costs an estimate of the tokens the model will read; a request is refused at once (503 + Retry-After) when the
work that must drain before its last text is answered exceeds a bound, instead of waiting seconds in a queue.
Under fair sharing that work is the request's own work plus, from every other client, as much as that client
has pending up to the same amount: a one-text caller is admitted beside two flooding clients, a third flood is
not. A request that finds the queue empty is always admitted (the bound must never refuse the largest legal
request on an idle service).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# Tokens are estimated from characters (~4 per wordpiece in English text, plus [CLS] and [SEP]), capped at what
# the model reads. Tokenizing for real in the event loop would cost ~8 ms per 4,000-character text here.
CHARS_PER_TOKEN = 4
SPECIAL_TOKENS = 2


def estimate_tokens(text: str, max_seq_len: int) -> int:
    """The tokens the model will read for `text` (an estimate that is never above `max_seq_len`)."""
    return min(max_seq_len, len(text) // CHARS_PER_TOKEN + SPECIAL_TOKENS)


class Overloaded(Exception):
    """The pending work is past the admission bound: answer 503 with Retry-After instead of queueing."""

    def __init__(self, retry_after: float, pending_tokens: int, bound_tokens: int) -> None:
        self.retry_after = retry_after
        self.pending_tokens = pending_tokens
        self.bound_tokens = bound_tokens
        super().__init__(
            f"the service is busy: {pending_tokens} tokens of work would be ahead of this request's last text, "
            f"at most {bound_tokens} are queued; retry after {math.ceil(retry_after)} s or send fewer texts"
        )


@dataclass(eq=False)
class Pending:
    """One text waiting for a forward pass."""

    text: str
    tokens: int
    client: str
    future: asyncio.Future[Any] = field(repr=False)
    start: float = 0.0  # virtual start tag, set by FairQueue.put
    sequence: int = 0  # arrival order, breaks ties between equal tags


class FairQueue:
    """Per-client FIFOs served in start-time fair order, with the pending work counted per client and in total.

    Each text gets a virtual start tag: its client's previous finish tag, or the queue's virtual time (the tag of
    the text last taken) if that is later; its finish tag adds its tokens. Texts are taken by smallest start tag,
    so a 64-text request spreads its texts over virtual time, and a caller that was idle starts at "now": its text
    goes into the next batch, ahead of the flood's remaining texts.

    Short and long texts (more than `long_tokens`) never share a batch: a one-line text would otherwise be padded
    to the length of a 4,000-character batch-mate and wait as long as it. The micro-batcher guards
    it with one lock: the event loop puts texts in, and a lane's thread may take its next batch (service/batcher.py).
    """

    def __init__(self, long_tokens: int = 64) -> None:
        self.long_tokens = long_tokens
        self._clients: dict[str, deque[Pending]] = {}
        self._work: dict[str, int] = {}
        self._finish: dict[str, float] = {}  # client -> finish tag of its last queued text
        self._virtual = 0.0
        self._sequence = 0
        self.total_tokens = 0
        self.total_texts = 0

    def __len__(self) -> int:
        return self.total_texts

    def work_ahead(self, client: str, tokens: int) -> int:
        """Tokens that drain before the last of `tokens` more from `client` is served (fair-share estimate)."""
        mine = self._work.get(client, 0) + tokens
        return mine + sum(min(work, mine) for other, work in self._work.items() if other != client)

    def put(self, items: list[Pending]) -> None:
        for item in items:
            start = max(self._virtual, self._finish.get(item.client, 0.0))
            item.start, item.sequence = start, self._sequence
            self._sequence += 1
            self._finish[item.client] = start + item.tokens
            self._clients.setdefault(item.client, deque()).append(item)
            self._work[item.client] = self._work.get(item.client, 0) + item.tokens
            self.total_tokens += item.tokens
            self.total_texts += 1

    def _is_long(self, item: Pending) -> bool:
        return item.tokens > self.long_tokens

    def has_short(self) -> bool:
        """Whether some client's next text is short (what the short-only lane can take)."""
        return any(not self._is_long(items[0]) for items in self._clients.values())

    def _next_client(self, short_only: bool = False) -> str | None:
        heads = [(items[0].start, items[0].sequence, client, items[0]) for client, items in self._clients.items()]
        candidates = [head for head in heads if not (short_only and self._is_long(head[3]))]
        return min(candidates, key=lambda head: head[:2])[2] if candidates else None

    def _pop(self, client: str) -> Pending:
        items = self._clients[client]
        item = items.popleft()
        if not items:
            del self._clients[client]
            del self._finish[client]  # an idle client starts again at the virtual time
        self._work[client] -= item.tokens
        if not self._work[client]:
            del self._work[client]
        self.total_tokens -= item.tokens
        self.total_texts -= 1
        self._virtual = max(self._virtual, item.start)
        return item

    def take_batch(self, max_texts: int, max_tokens: int, *, short_only: bool = False) -> list[Pending]:
        """Up to `max_texts` texts in fair order, all short or all long (`short_only`: short ones), whose padded size
        (texts x longest) stays within `max_tokens`; the first text is always taken. Texts whose caller gave up are
        dropped on the way."""
        batch: list[Pending] = []
        longest = 0
        while self._clients and len(batch) < max_texts:
            client = self._next_client(short_only)
            if client is None:
                break
            item = self._clients[client][0]
            if item.future.done():  # the caller went away (cancelled): no forward pass for it
                self._pop(client)
                continue
            if batch:
                other_kind = self._is_long(item) != self._is_long(batch[0])
                if other_kind or (len(batch) + 1) * max(longest, item.tokens) > max_tokens:
                    break  # this text has the smallest tag left: it opens the next batch
            batch.append(self._pop(client))
            longest = max(longest, item.tokens)
        return batch
