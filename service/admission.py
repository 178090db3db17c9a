"""Fair queueing and admission by work for the micro-batcher.

Why per-client queues: one FIFO let a caller with 64 texts of 4,000 characters fill every batch ahead of a
one-text caller (p50 5 ms -> 2 s). Each client (an API key's name, else the client address) gets its own FIFO of
texts, and a batch is formed round-robin across the clients with pending texts, one text per turn: a request's
texts are thereby split into chunks that share batches with everyone else's.

Why admission by work: counting requests treats a 64 x 4,000-character request like a one-word one. Every text
costs an estimate of the tokens the model will read; a request is refused at once (503 + Retry-After) when the
work that must drain before its last text is answered exceeds a bound, instead of waiting seconds in a queue.
Under round-robin that work is the request's own work plus, from every other client, as much as that client
has pending up to the same amount: a one-text caller is admitted beside two flooding clients, a third flood is
not. A request that finds the queue empty is always admitted (the bound must never refuse the largest legal
request on an idle service).
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
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


class FairQueue:
    """Per-client FIFOs served round-robin, with the pending work counted per client and in total.

    Only the event loop touches it, so it needs no lock.
    """

    def __init__(self) -> None:
        self._clients: OrderedDict[str, deque[Pending]] = OrderedDict()  # round-robin order: front is next
        self._work: dict[str, int] = {}
        self.total_tokens = 0
        self.total_texts = 0

    def __len__(self) -> int:
        return self.total_texts

    def work_ahead(self, client: str, tokens: int) -> int:
        """Tokens that drain before the last of `tokens` more from `client` is served (round-robin estimate)."""
        mine = self._work.get(client, 0) + tokens
        return mine + sum(min(work, mine) for other, work in self._work.items() if other != client)

    def put(self, items: list[Pending]) -> None:
        for item in items:
            self._clients.setdefault(item.client, deque()).append(item)
            self._work[item.client] = self._work.get(item.client, 0) + item.tokens
            self.total_tokens += item.tokens
            self.total_texts += 1

    def _pop_front(self) -> Pending:
        client, items = next(iter(self._clients.items()))
        item = items.popleft()
        if items:
            self._clients.move_to_end(client)  # its turn is over: the next client goes first
        else:
            del self._clients[client]
        self._work[client] -= item.tokens
        if not self._work[client]:
            del self._work[client]
        self.total_tokens -= item.tokens
        self.total_texts -= 1
        return item

    def _front(self) -> Pending:
        return next(iter(self._clients.values()))[0]

    def take_batch(self, max_texts: int, max_tokens: int) -> list[Pending]:
        """Up to `max_texts` texts, round-robin across clients, whose padded size (texts x longest) stays within
        `max_tokens`; the first text is always taken. Texts whose caller gave up are dropped on the way."""
        batch: list[Pending] = []
        longest = 0
        while self._clients and len(batch) < max_texts:
            item = self._front()
            if item.future.done():  # the caller went away (cancelled): no forward pass for it
                self._pop_front()
                continue
            padded = (len(batch) + 1) * max(longest, item.tokens)
            if batch and padded > max_tokens:
                break  # this client stays at the front: its text opens the next batch
            batch.append(self._pop_front())
            longest = max(longest, item.tokens)
        return batch
