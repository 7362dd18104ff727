"""Lookup structures whose cost does not grow with the number of rules.

`HostIndex`: exact names in a dict, wildcard patterns in a label trie walked from the right (`*` = one label,
leading `**` = one or more). `CidrIndex`: one dict per (IP version, prefix length), so a lookup costs one probe per
distinct prefix length in use (at most 33 for IPv4, 129 for IPv6) whatever the number of ranges.
Values are opaque to the index. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from dataclasses import dataclass, field

from egress_gateway.policy.decision import IPAddress
from egress_gateway.policy.hostnames import HostPattern


@dataclass(slots=True)
class _Node[V]:
    children: dict[str, _Node[V]] = field(default_factory=dict)
    terminal: list[tuple[V, str]] = field(default_factory=list)  # pattern ends exactly here
    one_or_more: list[tuple[V, str]] = field(default_factory=list)  # a leading '**' sits left of here


class HostIndex[V]:
    def __init__(self) -> None:
        self._exact: dict[str, list[tuple[V, str]]] = {}
        self._root: _Node[V] = _Node()
        self._has_wildcards = False

    def add(self, pattern: HostPattern, value: V) -> None:
        if pattern.is_exact:
            self._exact.setdefault(pattern.text, []).append((value, pattern.text))
            return
        self._has_wildcards = True
        node = self._root
        labels = pattern.labels[1:] if pattern.multi_label else pattern.labels
        for label in reversed(labels):
            node = node.children.setdefault(label, _Node())
        (node.one_or_more if pattern.multi_label else node.terminal).append((value, pattern.text))

    def lookup(self, name: str) -> Iterator[tuple[V, str]]:
        """Yield (value, pattern text) for every pattern matching the normalized `name`."""
        exact = self._exact.get(name)
        if exact:
            yield from exact
        if not self._has_wildcards:
            return
        labels = name.split(".")
        labels.reverse()
        yield from self._walk(self._root, labels, 0)

    def _walk(self, node: _Node[V], labels: list[str], depth: int) -> Iterator[tuple[V, str]]:
        remaining = len(labels) - depth
        if node.one_or_more and remaining >= 1:
            yield from node.one_or_more
        if remaining == 0:
            yield from node.terminal
            return
        label = labels[depth]
        child = node.children.get(label)
        if child is not None:
            yield from self._walk(child, labels, depth + 1)
        star = node.children.get("*")
        if star is not None:
            yield from self._walk(star, labels, depth + 1)


class CidrIndex[V]:
    def __init__(self) -> None:
        self._tables: dict[int, dict[int, dict[int, list[tuple[V, str]]]]] = {4: {}, 6: {}}
        self._lengths: dict[int, list[int]] = {4: [], 6: []}

    def add(self, network: ipaddress.IPv4Network | ipaddress.IPv6Network, value: V) -> None:
        bits = network.max_prefixlen
        table = self._tables[network.version].setdefault(network.prefixlen, {})
        key = int(network.network_address) >> (bits - network.prefixlen)
        table.setdefault(key, []).append((value, str(network)))
        self._lengths[network.version] = sorted(self._tables[network.version], reverse=True)

    def lookup(self, address: IPAddress) -> Iterator[tuple[V, str]]:
        """Yield (value, CIDR text) for every range containing `address`, most specific first."""
        version = address.version
        tables = self._tables[version]
        as_int = int(address)
        bits = 32 if version == 4 else 128
        for length in self._lengths[version]:
            hit = tables[length].get(as_int >> (bits - length))
            if hit:
                yield from hit

    def __bool__(self) -> bool:
        return bool(self._lengths[4] or self._lengths[6])
