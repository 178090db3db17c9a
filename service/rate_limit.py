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

from starlette.types import ASGIApp, Receive, Scope, Send

from guardloop.core.rates import Rate

OPENAI_PATHS = ("/v1/moderations",)


class TokenBuckets:
    """One bucket per key, least recently used dropped beyond `max_keys` so memory stays bounded."""

    def __init__(self, rate: Rate, *, max_keys: int = 100_000, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()  # key -> [tokens, last refill time]

    def take(self, key: str) -> float:
        """Take one token for `key`: 0.0 if granted, else the seconds until one is available."""
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
        if bucket[0] >= 1.0:
            bucket[0] -= 1.0
            return 0.0
        return (1.0 - bucket[0]) / self.rate.per_second

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
    """Pure ASGI middleware: 429 with Retry-After before the request is read, routed or authenticated."""

    def __init__(self, app: ASGIApp, groups: list[tuple[Callable[[str], bool], LimitGroup]]) -> None:
        self.app = app
        self.groups = groups

    def _group(self, path: str) -> LimitGroup | None:
        for matches, group in self.groups:
            if matches(path):
                return group
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (group := self._group(scope["path"])) is None:
            await self.app(scope, receive, send)
            return
        if group.per_ip is not None:
            client = scope.get("client")
            wait = group.per_ip.take(client[0] if client else "unknown")
            if wait:
                await self._reject(send, scope["path"], "this client address", group.per_ip, wait)
                return
        if group.per_credential is not None and (credential := credential_of(scope["headers"])) is not None:
            wait = group.per_credential.take(credential)
            if wait:
                await self._reject(send, scope["path"], "this API key or token", group.per_credential, wait)
                return
        await self.app(scope, receive, send)

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
