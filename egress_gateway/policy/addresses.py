"""Destination address safety: which IPs are never reachable (blocked) and which only by explicit CIDR (private).

Owns the address classes of the decision's step 6. The table is one data file, `special_addresses.json` (the
complete IANA IPv4 and IPv6 special-purpose registries, multicast, and the cloud metadata endpoints, each entry with
its source); the most specific entry containing an address gives its class and its reason. IPv6 forms that embed an
IPv4 address (IPv4-mapped, IPv4-translated, IPv4-compatible, NAT64 64:ff9b::/96 and 64:ff9b:1::/48, 6to4 2002::/16,
Teredo 2001::/32) are classified by every address they may embed as well; the stricter class wins. Pure: the table
is package data read once at import (no other I/O).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from importlib import resources
from typing import Any

from egress_gateway.policy.decision import IPAddress

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AddressClass(StrEnum):
    PUBLIC = "public"
    PRIVATE = "private"
    BLOCKED = "blocked"


_STRICTNESS = {AddressClass.PUBLIC: 0, AddressClass.PRIVATE: 1, AddressClass.BLOCKED: 2}


@dataclass(frozen=True, slots=True)
class SpecialRange:
    """One entry of `special_addresses.json`."""

    network: IPNetwork
    cls: AddressClass
    name: str
    reference: str
    source: str
    metadata: bool = False
    embeds: tuple[str, ...] = ()

    @property
    def reason(self) -> str:
        """What the decision message says about an address in this range."""
        if self.metadata:
            return f"{self.name} (cloud metadata endpoint; {self.reference})"
        return f"{self.name} ({self.reference})"


def _low32(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    return [ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)]


def _rfc6052_48(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """RFC 6052 section 2.2, /48 prefix: IPv4 bits 48..63 and 72..87 (bits 64..71 are the u-octet)."""
    packed = address.packed
    return [ipaddress.IPv4Address(packed[6:8] + packed[9:11])]


def _sixtofour(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    return [address.sixtofour] if address.sixtofour is not None else []


def _teredo(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    return list(address.teredo) if address.teredo is not None else []


_EMBEDDINGS: dict[str, Callable[[ipaddress.IPv6Address], list[ipaddress.IPv4Address]]] = {
    "low32": _low32,
    "rfc6052_48": _rfc6052_48,
    "6to4": _sixtofour,
    "teredo": _teredo,
}


def _entry(raw: dict[str, Any]) -> SpecialRange:
    kind = raw["class"]
    embeds = tuple(raw.get("embeds", ()))
    unknown = [e for e in embeds if e not in _EMBEDDINGS]
    if unknown:
        raise ValueError(f"special_addresses.json: {raw['network']}: unknown embedding {unknown}")
    return SpecialRange(
        network=ipaddress.ip_network(raw["network"]),
        cls=AddressClass.BLOCKED if kind == "metadata" else AddressClass(kind),
        name=raw["name"],
        reference=raw["reference"],
        source=raw["source"],
        metadata=kind == "metadata",
        embeds=embeds,
    )


def load_special_ranges() -> tuple[SpecialRange, ...]:
    """The table, most specific entries first (so the first containing entry is the longest-prefix match)."""
    text = resources.files("egress_gateway.policy").joinpath("special_addresses.json").read_text("utf-8")
    entries = [_entry(raw) for raw in json.loads(text)["entries"]]
    return tuple(sorted(entries, key=lambda e: e.network.prefixlen, reverse=True))


SPECIAL_RANGES = load_special_ranges()


def special_range(address: IPAddress) -> SpecialRange | None:
    """The most specific special-purpose entry containing `address`, or None (an ordinary public address)."""
    for entry in SPECIAL_RANGES:
        if address.version == entry.network.version and address in entry.network:
            return entry
    return None


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 address may carry by a standard transition mechanism: the `embeds` of the most
    specific table entry containing it (so ::1, inside the IPv4-compatible ::/96, is loopback and embeds nothing)."""
    entry = special_range(address)
    found: list[ipaddress.IPv4Address] = []
    if entry is None:
        return found
    for embedding in entry.embeds:
        for inner in _EMBEDDINGS[embedding](address):
            # With several possible layouts, one whose IPv4 bits are all zero carries no address.
            if inner not in found and not (len(entry.embeds) > 1 and int(inner) == 0):
                found.append(inner)
    return found


@dataclass(frozen=True, slots=True)
class AddressVerdict:
    cls: AddressClass
    detail: str = ""


class AddressPolicy:
    """Classifies destination IPs for one gateway configuration (its allowed ranges and own addresses).

    `allowed_ranges` exempts blocked special-purpose ranges and own addresses, never a cloud metadata endpoint."""

    def __init__(self, allowed_ranges: Iterable[IPNetwork] = (), own_addresses: Iterable[IPAddress] = ()) -> None:
        self.allowed_ranges = tuple(allowed_ranges)
        self.own_addresses = frozenset(own_addresses)
        self._cache: dict[IPAddress, AddressVerdict] = {}

    def _allowed(self, address: IPAddress) -> bool:
        return any(address.version == net.version and address in net for net in self.allowed_ranges)

    def _classify_one(self, address: IPAddress) -> AddressVerdict:
        if address in self.own_addresses and not self._allowed(address):
            return AddressVerdict(AddressClass.BLOCKED, f"{address} is the gateway's own address")
        entry = special_range(address)
        if entry is None or entry.cls is AddressClass.PUBLIC:
            return AddressVerdict(AddressClass.PUBLIC)
        if entry.cls is AddressClass.BLOCKED:
            # `allowed_ranges` opens blocked ranges (e.g. loopback in tests); a metadata endpoint stays closed.
            if not entry.metadata and self._allowed(address):
                return AddressVerdict(AddressClass.PUBLIC)
            return AddressVerdict(AddressClass.BLOCKED, f"{address} is {entry.reason}")
        return AddressVerdict(AddressClass.PRIVATE, f"{address} is {entry.reason}")

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
            if _STRICTNESS[inner_verdict.cls] > _STRICTNESS[verdict.cls]:
                verdict = AddressVerdict(inner_verdict.cls, f"{address} embeds {inner_verdict.detail}")
            if verdict.cls is AddressClass.BLOCKED:
                break
        return verdict
