"""How often one client address may make the gateway ask TokenReview (`identity.token_reviews_per_address`).

Owns: `AddressRateLimiter`, a token bucket per source address. Only reviews that reach the API server are counted
(cached verdicts and tokens refused locally cost nothing), so a pod that presents its own token is never limited,
while a client spraying distinct tokens is. Buckets that are full again are forgotten and at most `max_addresses`
are kept, so a flood from many addresses cannot grow memory without bound. Imports nothing from the gateway.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

Clock = Callable[[], float]


class AddressRateLimiter:
    """`acquire(address)` -> 0.0 when a review may be made now, else the seconds until one may."""

    def __init__(
        self, per_second: float, burst: int, clock: Clock = time.monotonic, max_addresses: int = 100_000
    ) -> None:
        if per_second < 0 or burst < 1:
            raise ValueError("per_second must be >= 0 and burst >= 1")
        self.per_second = per_second
        self.burst = burst
        self._clock = clock
        self._max = max_addresses
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # address -> (tokens, updated)

    @property
    def enabled(self) -> bool:
        return self.per_second > 0

    def describe(self) -> str:
        return f"{self.per_second:g} token reviews/s (burst {self.burst}) per client address"

    def acquire(self, address: str) -> float:
        if not self.enabled:
            return 0.0
        now = self._clock()
        tokens, updated = self._buckets.pop(address, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - updated) * self.per_second)
        if tokens >= 1.0:
            tokens -= 1.0
            wait = 0.0
        else:
            wait = (1.0 - tokens) / self.per_second
        self._buckets[address] = (tokens, now)
        self._forget_idle(now)
        return wait

    def _forget_idle(self, now: float) -> None:
        # The oldest-touched buckets first: a full one behaves exactly like a new one, so it can go.
        while self._buckets:
            address, (tokens, updated) = next(iter(self._buckets.items()))
            full = tokens + (now - updated) * self.per_second >= self.burst
            if not full and len(self._buckets) <= self._max:
                break
            del self._buckets[address]
