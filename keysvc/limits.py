"""Abuse limits: per-identity rate limits on the calls that leak something by volume.

A Verify endpoint is a MAC oracle and Detokenize hands out card numbers, so each
identity gets a token bucket per kind of call, counted in items (a BatchVerify of 100
seals costs 100). A call over the limit is refused whole, with the time after which the
same call would fit.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

from keysvc.errors import KeysvcError


class RateLimited(KeysvcError):
    """Over the caller's rate limit; `retry_after` seconds would make room."""

    reason = "RATE_LIMITED"

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message, metadata={"retry_after_seconds": f"{retry_after:.3f}"})
        self.retry_after = retry_after


@dataclass(frozen=True)
class Rate:
    per_second: float
    burst: float

    @classmethod
    def of(cls, per_second: float) -> "Rate":
        # A second's worth of burst, at least one call's worth of a big batch.
        return cls(per_second, max(per_second, 1000.0) if per_second else 0.0)


class RateLimiter:
    """Token buckets by (identity, kind). Thread-safe, per process."""

    def __init__(self, rates: dict[str, Rate], clock: Callable[[], float] = time.monotonic) -> None:
        self._rates = rates
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}  # (tokens, last refill)

    def take(self, identity: str, kind: str, items: int) -> None:
        """Takes `items` from the bucket; raises RateLimited when they are not there."""
        rate = self._rates.get(kind)
        if rate is None or rate.per_second <= 0:
            return
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get((identity, kind), (rate.burst, now))
            tokens = min(rate.burst, tokens + (now - last) * rate.per_second)
            if items > tokens:
                self._buckets[(identity, kind)] = (tokens, now)
                wait = (items - tokens) / rate.per_second
                raise RateLimited(f"over the {kind} rate limit of {rate.per_second:g} items/s for this caller; "
                                  f"retry after {wait:.2f} s", wait)
            self._buckets[(identity, kind)] = (tokens - items, now)
