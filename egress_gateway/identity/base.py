"""The identity contract shared by static, pod-IP and ServiceAccount-token identification.

`IdentityResolver.identify` gets the client's source address and the raw `Proxy-Authorization` header (or None)
and returns an `Identity`, or None when it cannot say (the next resolver is tried; none left = `unknown_client`).
Resolvers that can tell a source address's namespace synchronously (static, pod IP) also offer
`namespace_of_address(client_ip)`, which the proxy uses at accept for `limits.namespace_connections`.
`AuthenticationFailed` means credentials were presented and rejected or required and missing: the proxy answers
407 with `Proxy-Authenticate`, and opens no upstream connection. `TooManyReviews` (a kind of it) means the client's
address asked for too many token reviews: 429 with `Retry-After`. `IdentityUnavailable` means a resolver knows the
address but cannot vouch for it now (its data is too stale): the next resolver is still tried, and if none answers
the client is `unknown_client` with that reason instead of the generic one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from egress_gateway.policy.decision import Identity


class AuthenticationFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TooManyReviews(AuthenticationFailed):
    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


class IdentityUnavailable(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IdentityResolver(Protocol):
    async def identify(self, client_ip: str, proxy_authorization: str | None) -> Identity | None: ...


class ChainResolver:
    """Tries resolvers in order; the first answer wins. An `IdentityUnavailable` from one resolver does not stop the
    others; it is raised only when none of them answers."""

    def __init__(self, resolvers: Sequence[IdentityResolver]) -> None:
        self._resolvers = tuple(resolvers)

    async def identify(self, client_ip: str, proxy_authorization: str | None) -> Identity | None:
        unavailable: IdentityUnavailable | None = None
        for resolver in self._resolvers:
            try:
                identity = await resolver.identify(client_ip, proxy_authorization)
            except IdentityUnavailable as exc:
                unavailable = unavailable or exc
                continue
            if identity is not None:
                return identity
        if unavailable is not None:
            raise unavailable
        return None

    def namespace_of_address(self, client_ip: str) -> str | None:
        """The namespace a source address belongs to, known at accept before any request (static map, pod index),
        or None (e.g. ServiceAccount tokens: known only once the request is identified). Used for connection shares."""
        for resolver in self._resolvers:
            lookup = getattr(resolver, "namespace_of_address", None)
            if lookup is not None and (namespace := lookup(client_ip)) is not None:
                return str(namespace)
        return None
