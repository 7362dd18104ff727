"""Token buckets, alone or one per key, bounded: shared by the proxy's per-namespace rate
(`limits.namespace_rate`) and the identity's TokenReviews per client address. Time comes from an injectable clock.
Imports nothing from the gateway.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

Clock = Callable[[], float]


class TokenBucket:
    """`rate` tokens per second, up to `burst`; starts full. `take()` returns 0.0 or the seconds until a token."""

    __slots__ = ("_clock", "_tokens", "_updated", "burst", "rate")

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated)  # a clock that steps back never mints tokens
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._updated = now

    def take(self) -> float:
        self._refill()
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate

    @property
    def full(self) -> bool:
        self._refill()
        return self._tokens >= self.burst


class KeyedTokenBuckets:
    """One `TokenBucket` per key; `per_second == 0` disables the limit (`take` always 0.0).

    Buckets that are full again are dropped (they would behave exactly like a new one), oldest-touched first, and
    at most `max_keys` are kept, so a flood of distinct keys cannot grow memory without bound.
    """

    def __init__(self, per_second: float, burst: int, clock: Clock = time.monotonic, max_keys: int = 100_000) -> None:
        if per_second < 0 or burst < 1:
            raise ValueError("per_second must be >= 0 and burst >= 1")
        self.per_second = per_second
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def take(self, key: str) -> float:
        """0.0: a token was taken; else the seconds until `key` has one."""
        if not self.enabled:
            return 0.0
        bucket = self._buckets.get(key)
        if bucket is None:
            self._evict()
            bucket = TokenBucket(self.per_second, self.burst, self._clock)
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
        return bucket.take()

    def _evict(self) -> None:
        while self._buckets:
            oldest_key, oldest = next(iter(self._buckets.items()))
            if len(self._buckets) < self.max_keys and not oldest.full:
                return
            del self._buckets[oldest_key]

    def __len__(self) -> int:
        return len(self._buckets)
