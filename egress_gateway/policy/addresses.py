"""Destination address safety: which IPs are never reachable (blocked) and which only by explicit CIDR (private).

Owns the address classes of the decision's step 6, including IPv6 forms that embed an IPv4 address (IPv4-mapped,
IPv4-compatible, NAT64 64:ff9b::/96 and 64:ff9b:1::/48, 6to4 2002::/16, Teredo 2001::/32), which are classified
by every address they embed. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from egress_gateway.policy.decision import IPAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressClass(StrEnum):
    PUBLIC = "public"
    PRIVATE = "private"
    BLOCKED = "blocked"


_BLOCKED_V4 = {
    "0.0.0.0/8": "unspecified ('this network')",
    "127.0.0.0/8": "loopback",
    "169.254.0.0/16": "link-local (cloud metadata lives at 169.254.169.254)",
    "224.0.0.0/4": "multicast",
    "240.0.0.0/4": "reserved",
    "255.255.255.255/32": "broadcast",
}
_BLOCKED_V6 = {
    "::/128": "unspecified",
    "::1/128": "loopback",
    "fe80::/10": "link-local",
    "fec0::/10": "site-local (deprecated)",
    "ff00::/8": "multicast",
}
_PRIVATE_V4 = {
    "10.0.0.0/8": "private (RFC 1918)",
    "172.16.0.0/12": "private (RFC 1918)",
    "192.168.0.0/16": "private (RFC 1918)",
    "100.64.0.0/10": "carrier-grade NAT (RFC 6598)",
}
_PRIVATE_V6 = {"fc00::/7": "unique local (RFC 4193)"}

_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
_COMPAT = ipaddress.IPv6Network("::/96")


def _table(entries: dict[str, str]) -> tuple[tuple[IPNetwork, str], ...]:
    return tuple((ipaddress.ip_network(k), v) for k, v in entries.items())


_BLOCKED = _table(_BLOCKED_V4) + _table(_BLOCKED_V6)
_PRIVATE = _table(_PRIVATE_V4) + _table(_PRIVATE_V6)


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address carries by a standard transition mechanism."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        server, client = address.teredo
        found.extend((server, client))
    as_int = int(address)
    if any(address in net for net in _NAT64) or (address in _COMPAT and as_int > 1):
        found.append(ipaddress.IPv4Address(as_int & 0xFFFFFFFF))
    return found


@dataclass(frozen=True, slots=True)
class AddressVerdict:
    cls: AddressClass
    detail: str = ""


class AddressPolicy:
    """Classifies destination IPs for one gateway configuration (its allowed ranges and own addresses)."""

    def __init__(self, allowed_ranges: Iterable[IPNetwork] = (), own_addresses: Iterable[IPAddress] = ()) -> None:
        self.allowed_ranges = tuple(allowed_ranges)
        self.own_addresses = frozenset(own_addresses)
        self._cache: dict[IPAddress, AddressVerdict] = {}

    def _allowed(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.allowed_ranges)

    def _classify_one(self, address: IPAddress) -> AddressVerdict:
        if address in self.own_addresses and not self._allowed(address):
            return AddressVerdict(AddressClass.BLOCKED, f"{address} is the gateway's own address")
        for network, what in _BLOCKED:
            if address.version == network.version and address in network:
                if self._allowed(address):
                    break
                return AddressVerdict(AddressClass.BLOCKED, f"{address} is {what}")
        for network, what in _PRIVATE:
            if address.version == network.version and address in network:
                return AddressVerdict(AddressClass.PRIVATE, f"{address} is {what}")
        return AddressVerdict(AddressClass.PUBLIC)

    def classify(self, address: IPAddress) -> AddressVerdict:
        cached = self._cache.get(address)
        if cached is None:
            if len(self._cache) >= 65536:
                self._cache.clear()
            cached = self._cache[address] = self._classify_uncached(address)
        return cached

    def _classify_uncached(self, address: IPAddress) -> AddressVerdict:
        verdict = self._classify_one(address)
        if verdict.cls is AddressClass.BLOCKED or not isinstance(address, ipaddress.IPv6Address):
            return verdict
        for inner in embedded_ipv4(address):
            inner_verdict = self._classify_one(inner)
            if inner_verdict.cls is AddressClass.BLOCKED:
                return AddressVerdict(AddressClass.BLOCKED, f"{address} embeds {inner_verdict.detail}")
            if inner_verdict.cls is AddressClass.PRIVATE and verdict.cls is AddressClass.PUBLIC:
                verdict = AddressVerdict(AddressClass.PRIVATE, f"{address} embeds {inner_verdict.detail}")
        return verdict
