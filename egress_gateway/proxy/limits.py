"""Resource limits of the proxy, as plain classes: connection accounting and per-namespace rate.

Owns: `ConnectionLimit` (how many client connections are served at once), `NamespaceConnections` (each
namespace's share of them), `TokenBucket` and `NamespaceRateLimiter` (`limits.namespace_rate`: new tunnels and
plain-HTTP requests per namespace). Request-head size limits are `wire/heads.py`. No sockets, no mitmproxy, no
engine: time comes from an injectable clock, so every rule is testable with plain values.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

Clock = Callable[[], float]


class ConnectionLimit:
    """Counts client connections by id; `admit` refuses once `maximum` are open."""

    def __init__(self, maximum: int) -> None:
        if maximum < 1:
            raise ValueError("maximum must be at least 1")
        self.maximum = maximum
        self._open: set[str] = set()

    def admit(self, connection_id: str) -> bool:
        if connection_id in self._open:
            return True
        if len(self._open) >= self.maximum:
            return False
        self._open.add(connection_id)
        return True

    def release(self, connection_id: str) -> None:
        self._open.discard(connection_id)

    @property
    def open(self) -> int:
        return len(self._open)


class NamespaceConnections:
    """`limits.namespace_connections`: how many client connections one namespace may hold at once.

    A connection is counted from the moment its namespace is known (at accept from its source address, or at
    identification) until it closes, whatever it is doing: silent, waiting for a decision, or relaying."""

    def __init__(self, share: int) -> None:
        if share < 1:
            raise ValueError("share must be at least 1")
        self.share = share
        self._namespace_of: dict[str, str] = {}
        self._counts: dict[str, int] = {}

    def admit(self, connection_id: str, namespace: str) -> bool:
        if connection_id in self._namespace_of:
            return True
        count = self._counts.get(namespace, 0)
        if count >= self.share:
            return False
        self._counts[namespace] = count + 1
        self._namespace_of[connection_id] = namespace
        return True

    def release(self, connection_id: str) -> None:
        namespace = self._namespace_of.pop(connection_id, None)
        if namespace is None:
            return
        count = self._counts[namespace] - 1
        if count:
            self._counts[namespace] = count
        else:
            del self._counts[namespace]

    def counted(self, connection_id: str) -> bool:
        return connection_id in self._namespace_of

    def open(self, namespace: str) -> int:
        return self._counts.get(namespace, 0)


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


@dataclass(frozen=True, slots=True)
class RateVerdict:
    allowed: bool
    retry_after_s: float = 0.0

    @property
    def retry_after_header(self) -> str:
        """RFC 9110 Retry-After: whole seconds, rounded up, at least 1."""
        return str(max(1, math.ceil(self.retry_after_s)))


_ALLOW = RateVerdict(True)


class NamespaceRateLimiter:
    """One token bucket per namespace. `per_second == 0` disables the limit.

    Buckets of idle namespaces are dropped once they are full again (they would behave exactly like a new one), and
    at most `max_namespaces` are kept, so a flood of distinct identities cannot grow memory without bound.
    """

    def __init__(
        self, per_second: float, burst: int, clock: Clock = time.monotonic, max_namespaces: int = 100_000
    ) -> None:
        if per_second < 0 or burst < 1:
            raise ValueError("per_second must be >= 0 and burst >= 1")
        self.per_second = per_second
        self.burst = burst
        self.max_namespaces = max_namespaces
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def acquire(self, namespace: str) -> RateVerdict:
        if not self.enabled:
            return _ALLOW
        bucket = self._buckets.get(namespace)
        if bucket is None:
            self._evict()
            bucket = TokenBucket(self.per_second, self.burst, self._clock)
            self._buckets[namespace] = bucket
        else:
            self._buckets.move_to_end(namespace)
        wait = bucket.take()
        return _ALLOW if wait == 0.0 else RateVerdict(False, wait)

    def _evict(self) -> None:
        while self._buckets:
            oldest_name, oldest = next(iter(self._buckets.items()))
            if len(self._buckets) < self.max_namespaces and not oldest.full:
                return
            del self._buckets[oldest_name]

    def describe(self) -> str:
        return f"{self.per_second:g} new connections/s with a burst of {self.burst}"

    def __len__(self) -> int:
        return len(self._buckets)
