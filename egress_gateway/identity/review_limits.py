"""How often one client address may make the gateway ask TokenReview (`identity.token_reviews_per_address`).

Owns: `AddressRateLimiter`, a token bucket per source address. Only reviews that reach the API server are counted
(cached verdicts and tokens refused locally cost nothing), so a pod that presents its own token is never limited,
while a client spraying distinct tokens is. Buckets that are full again are forgotten and at most `max_addresses`
are kept, so a flood from many addresses cannot grow memory without bound (`ratelimit.KeyedTokenBuckets`).
"""

from __future__ import annotations

import time

from egress_gateway.ratelimit import Clock, KeyedTokenBuckets


class AddressRateLimiter:
    """`acquire(address)` -> 0.0 when a review may be made now, else the seconds until one may."""

    def __init__(
        self, per_second: float, burst: int, clock: Clock = time.monotonic, max_addresses: int = 100_000
    ) -> None:
        self._buckets = KeyedTokenBuckets(per_second, burst, clock, max_addresses)
        self.per_second = per_second
        self.burst = burst

    @property
    def enabled(self) -> bool:
        return self._buckets.enabled

    def describe(self) -> str:
        return f"{self.per_second:g} token reviews/s (burst {self.burst}) per client address"

    def acquire(self, address: str) -> float:
        return self._buckets.take(address)
