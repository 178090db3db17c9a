"""The rate notation of the rate-limit settings: "N/second", "N/minute" or "N/hour"."""

from __future__ import annotations

import re
from dataclasses import dataclass

_PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_RATE_RE = re.compile(r"^\s*(\d{1,9})\s*/\s*(second|minute|hour)s?\s*$")


@dataclass(frozen=True)
class Rate:
    """`count` requests per `period` seconds; `count` is also the burst a full bucket allows."""

    count: int
    period: float
    text: str

    @classmethod
    def parse(cls, text: str) -> Rate:
        match = _RATE_RE.match(text.lower())
        if not match or int(match.group(1)) < 1:
            raise ValueError(f"rate {text!r} is not 'N/second', 'N/minute' or 'N/hour' with N >= 1")
        return cls(int(match.group(1)), _PERIODS[match.group(2)], f"{int(match.group(1))}/{match.group(2)}")

    @property
    def per_second(self) -> float:
        return self.count / self.period
