"""Static identity: `identity.static` maps client source CIDRs to a workload (no cluster needed).

The most specific CIDR wins. Imports settings and the decision types only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from types import MappingProxyType

from egress_gateway.policy.decision import Identity
from egress_gateway.policy.model import NAMESPACE_NAME_LABEL
from egress_gateway.policy.targets import canonical_ip
from egress_gateway.settings import StaticIdentity


class StaticIdentityResolver:
    def __init__(self, entries: Sequence[StaticIdentity]) -> None:
        compiled = []
        for entry in entries:
            ns_labels = {**entry.namespace_labels, NAMESPACE_NAME_LABEL: entry.namespace}  # always the real name
            identity = Identity(
                namespace=entry.namespace,
                pod=entry.pod,
                labels=MappingProxyType(dict(entry.labels)),
                namespace_labels=MappingProxyType(ns_labels),
            )
            compiled.append((ipaddress.ip_network(entry.cidr), identity))
        compiled.sort(key=lambda item: item[0].prefixlen, reverse=True)
        self._entries = tuple(compiled)
        self._cache: dict[str, Identity | None] = {}

    def lookup(self, client_ip: str) -> Identity | None:
        try:
            return self._cache[client_ip]
        except KeyError:
            pass
        try:
            address = ipaddress.ip_address(client_ip)
        except ValueError:
            return None
        address = canonical_ip(address)
        found = next((ident for net, ident in self._entries if address in net), None)
        if len(self._cache) < 65536:
            self._cache[client_ip] = found
        return found

    async def identify(self, client_ip: str, proxy_authorization: str | None) -> Identity | None:
        return self.lookup(client_ip)

    def namespace_of_address(self, client_ip: str) -> str | None:
        identity = self.lookup(client_ip)
        return identity.namespace if identity is not None else None
