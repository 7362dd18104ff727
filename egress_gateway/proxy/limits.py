"""Resource limits of the proxy, as plain classes: connection accounting and per-namespace rate.

Owns: `ConnectionLimit` (how many client connections are served at once), `NamespaceConnections` (each
namespace's share of them) and `NamespaceRateLimiter` (`limits.namespace_rate`: new tunnels and plain-HTTP
requests per namespace, on `ratelimit.KeyedTokenBuckets`). Request-head size limits are `wire/heads.py`. No
sockets, no mitmproxy, no engine: time comes from an injectable clock, so every rule is testable with plain values.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from egress_gateway.ratelimit import Clock, KeyedTokenBuckets


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
    """One token bucket per namespace (`ratelimit.KeyedTokenBuckets`: idle full buckets dropped, at most
    `max_namespaces` kept). `per_second == 0` disables the limit."""

    def __init__(
        self, per_second: float, burst: int, clock: Clock = time.monotonic, max_namespaces: int = 100_000
    ) -> None:
        self._buckets = KeyedTokenBuckets(per_second, burst, clock, max_namespaces)
        self.per_second = per_second
        self.burst = burst

    @property
    def enabled(self) -> bool:
        return self._buckets.enabled

    def acquire(self, namespace: str) -> RateVerdict:
        wait = self._buckets.take(namespace)
        return _ALLOW if wait == 0.0 else RateVerdict(False, wait)

    def describe(self) -> str:
        return f"{self.per_second:g} new connections/s with a burst of {self.burst}"

    def __len__(self) -> int:
        return len(self._buckets)
