"""Rate limits per client IP and per presented credential (API key, reviewer or admin token), before routing.

Token buckets in this process's memory: a limit "N/period" is a bucket of N requests refilled at N per period,
so a caller may burst N and then keeps N per period. Limits are per process: with R replicas behind a Service a
caller gets up to R times the limit.

Why not the `limits` library: its in-memory storage starts a new timer thread every 10 ms while requests flow
and cost ~150 µs of CPU per request here (measured at 200 requests/s), next to a /classify that takes ~4 ms;
a bucket is two floats and a dict lookup (~1 µs), and the event loop is its only user, so it needs no lock.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from fastapi import HTTPException
from guardloop.service.admission import CHARS_PER_TOKEN
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardloop.core import telemetry
from guardloop.core.rates import Rate

OPENAI_PATHS = ("/v1/moderations",)


class TokenBuckets:
    """One bucket per key, least recently used dropped beyond `max_keys` so memory stays bounded."""

    def __init__(self, rate: Rate, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, last refill time]

    def _bucket(self, key: str) -> list[float]:
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = [float(self.rate.count), now]
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            bucket[0] = min(float(self.rate.count), bucket[0] + (now - bucket[1]) * self.rate.per_second)
            bucket[1] = now
        return bucket

    def take(self, key: str, cost: float = 1.0) -> float:
        """Take `cost` tokens for `key`: 0.0 if granted, else the seconds until they are available.

        A cost above the burst is granted from a full bucket and leaves it in debt, so the caller then waits
        for the whole cost to refill: a request larger than the burst is slowed, never refused forever.
        """
        bucket = self._bucket(key)
        needed = min(cost, float(self.rate.count))
        if bucket[0] >= needed:
            bucket[0] -= cost
            return 0.0
        return (needed - bucket[0]) / self.rate.per_second

    def peek(self, key: str) -> float:
        """Seconds until `key` could take one token (0.0: now), without taking it."""
        if key not in self._buckets:
            return 0.0
        bucket = self._bucket(key)
        return 0.0 if bucket[0] >= 1.0 else (1.0 - bucket[0]) / self.rate.per_second

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass
class LimitGroup:
    """The limits of one group of routes (e.g. /classify and /v1/moderations)."""

    per_ip: TokenBuckets | None
    per_credential: TokenBuckets | None


def credential_of(headers: list[tuple[bytes, bytes]]) -> str | None:
    """A digest of the presented API key or token (the raw secret is never kept, not even as a dict key)."""
    for name, value in headers:
        if name == b"authorization" or name == b"x-api-key":
            secret = value.partition(b" ")[2].strip() if name == b"authorization" else value.strip()
            if secret:
                return hashlib.blake2b(secret, digest_size=16).hexdigest()
    return None


class RateLimit:
    """Pure ASGI middleware: 429 with Retry-After before the request is read, routed or authenticated.

    `auth_failures` counts the 401/403 answers of /admin/* and /review/* per client address: once an address has
    used up its failures, every request of its to those routes is refused until the bucket refills, so tokens
    cannot be guessed at the service's speed (400 wrong admin tokens took 0.2 s without it).
    """

    def __init__(
        self,
        app: ASGIApp,
        groups: list[tuple[Callable[[str], bool], LimitGroup]],
        auth_failures: TokenBuckets | None = None,
    ) -> None:
        self.app = app
        self.groups = groups
        self.auth_failures = auth_failures

    def _group(self, path: str) -> LimitGroup | None:
        for matches, group in self.groups:
            if matches(path):
                return group
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.auth_failures is not None and _is_authenticated(scope["path"]):
            client = scope.get("client")
            address = client[0] if client else "unknown"
            wait = self.auth_failures.peek(address)
            if wait:
                who = "this client address after too many failed authentications"
                telemetry.record_refused("auth_failures")
                await self._reject(send, scope["path"], who, self.auth_failures, wait)
                return
            send = self._counting_auth_failures(send, address)
        if (group := self._group(scope["path"])) is None:
            await self.app(scope, receive, send)
            return
        if group.per_ip is not None:
            client = scope.get("client")
            wait = group.per_ip.take(client[0] if client else "unknown")
            if wait:
                telemetry.record_refused("client_requests")
                await self._reject(send, scope["path"], "this client address", group.per_ip, wait)
                return
        if group.per_credential is not None and (credential := credential_of(scope["headers"])) is not None:
            wait = group.per_credential.take(credential)
            if wait:
                telemetry.record_refused("client_requests")
                await self._reject(send, scope["path"], "this API key or token", group.per_credential, wait)
                return
        await self.app(scope, receive, send)

    def _counting_auth_failures(self, send: Send, address: str) -> Send:
        failures = self.auth_failures
        assert failures is not None

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] in (401, 403):
                failures.take(address)
            await send(message)

        return counted

    @staticmethod
    async def _reject(send: Send, path: str, who: str, buckets: TokenBuckets, wait: float) -> None:
        retry_after = max(1, math.ceil(wait))
        message = (
            f"too many requests to {path} from {who}: the limit is {buckets.rate.text}; "
            f"retry after {retry_after} s or spread your requests"
        )
        payload: dict[str, object] = {"detail": message}
        if path in OPENAI_PATHS:  # the OpenAI client shows error.message, and retries 429s after Retry-After
            payload["error"] = {"message": message, "type": "rate_limit_exceeded", "param": None, "code": None}
        body = json.dumps(payload).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 429,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"retry-after", str(retry_after).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _is_classify(path: str) -> bool:
    return path in ("/classify", "/v1/moderations")


def _is_review(path: str) -> bool:
    return path == "/review" or path.startswith("/review/")


def _is_authenticated(path: str) -> bool:
    """Routes behind the admin or a reviewer token, whose failed authentications are limited."""
    return _is_review(path) or path.startswith("/admin/")


class WorkLimit:
    """Per-client work limit on the classify routes, in estimated tokens per second (429 + Retry-After).

    Beside the requests-per-second buckets: a request of 64 texts of 4,000 characters is ~8,000 tokens of work,
    a one-word request ~3, and only a limit in work can stop one client from taking the whole service.
    """

    def __init__(self, rate: Rate, *, max_seq_len: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.buckets = TokenBuckets(rate, clock=clock)
        self.max_seq_len = max_seq_len

    def check(self, client: str, tokens: int) -> None:
        wait = self.buckets.take(client, tokens)
        if not wait:
            return
        telemetry.record_refused("client_work")
        retry_after = max(1, math.ceil(wait))
        raise HTTPException(
            429,
            f"too much text from this client: the limit is {self.buckets.rate.text} tokens (a token is about "
            f"{CHARS_PER_TOKEN} characters, at most {self.max_seq_len} count per text); retry after {retry_after} s "
            "or send fewer or shorter texts",
            headers={"Retry-After": str(retry_after)},
        )


def build_groups(
    *,
    classify_per_ip: Rate | None,
    classify_per_key: Rate | None,
    review_per_ip: Rate | None,
    review_per_token: Rate | None,
) -> list[tuple[Callable[[str], bool], LimitGroup]]:
    """The route groups that are limited, with a fresh set of buckets each (one set per app)."""

    def buckets(rate: Rate | None) -> TokenBuckets | None:
        return TokenBuckets(rate) if rate else None

    return [
        (_is_classify, LimitGroup(buckets(classify_per_ip), buckets(classify_per_key))),
        (_is_review, LimitGroup(buckets(review_per_ip), buckets(review_per_token))),
    ]
