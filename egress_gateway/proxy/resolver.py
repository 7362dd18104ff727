"""Name resolution for the gateway: `resolver.hosts` first, then DNS (dnspython) or the system resolver.

Owns: `Resolver.resolve(name) -> candidate IPs` and `ResolveError` (with the reason `dns_error` or `dns_timeout`).
At most `max_addresses` candidates of an answer are kept (in answer order), so a huge answer cannot multiply the
work per connection (each candidate may cost an engine decision); the whole lookup is bounded by `timeout_s`.
The gateway resolves a name exactly once per connection, checks the candidates, and connects to the one it
checked, so nobody (mitmproxy, the OS) ever looks the name up a second time: DNS rebinding has no second answer
to exploit. A DNS answer's checked candidates are kept until its TTL ends (`cache_size` names, oldest dropped
first), so a repeated name costs a dict lookup instead of a pass through dnspython and its cache (~20 us); TTL 0 is
never kept. Imports the policy value types only; no mitmproxy, no engine.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from egress_gateway.policy.decision import IPAddress, Reason
from egress_gateway.policy.errors import InvalidName
from egress_gateway.policy.hostnames import normalize_name
from egress_gateway.policy.targets import canonical_ip


class ResolveError(Exception):
    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def parse_nameserver(text: str) -> tuple[str, int]:
    """'10.0.0.10' -> ('10.0.0.10', 53); '127.0.0.1:5353' -> (..., 5353); '[::1]:53' and '::1' work too."""
    value = text.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
        port = int(port_text)
    else:
        host, port = value, 53
    ipaddress.ip_address(host)  # nameservers are addresses: resolving them by name would be circular
    if not 1 <= port <= 65535:
        raise ValueError(f"nameserver {text!r}: port {port} is outside 1..65535")
    return host, port


def _dedupe(addresses: list[IPAddress], limit: int | None = None) -> tuple[IPAddress, ...]:
    return tuple(itertools.islice(dict.fromkeys(addresses), limit))


class Resolver:
    def __init__(
        self,
        hosts: Mapping[str, Sequence[str]],
        nameservers: Sequence[str],
        timeout_s: float,
        max_addresses: int = 16,
        cache_size: int = 4096,
    ) -> None:
        if max_addresses < 1:
            raise ValueError("resolver.max_addresses must be at least 1")
        self.timeout_s = timeout_s
        self.max_addresses = max_addresses
        self.cache_size = cache_size
        # name -> (expiration of its DNS answer, the candidates taken from it)
        self._answers: OrderedDict[str, tuple[float, tuple[IPAddress, ...]]] = OrderedDict()
        self._hosts: dict[str, tuple[IPAddress, ...]] = {}
        for name, addresses in hosts.items():
            try:
                key = normalize_name(name)
            except InvalidName as exc:
                raise ValueError(f"resolver.hosts: {name!r}: {exc}") from None
            try:
                parsed = [canonical_ip(ipaddress.ip_address(a)) for a in addresses]
            except ValueError as exc:
                raise ValueError(f"resolver.hosts: {name!r}: {exc}") from None
            if not parsed:
                raise ValueError(f"resolver.hosts: {name!r} lists no addresses")
            self._hosts[key] = _dedupe(parsed)
        self._dns: dns.asyncresolver.Resolver | None = None
        if nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(*parse_nameserver(ns)) for ns in nameservers]
            resolver.timeout = timeout_s
            resolver.lifetime = timeout_s
            resolver.cache = dns.resolver.Cache()  # honours each answer's TTL (TTL 0 is never cached)
            self._dns = resolver

    @property
    def uses_system_resolver(self) -> bool:
        return self._dns is None

    async def resolve(self, name: str) -> tuple[IPAddress, ...]:
        """Candidate addresses for a normalized name, in preference order. Raises `ResolveError`."""
        static = self._hosts.get(name)
        if static is not None:
            return static
        if self._dns is not None:
            return await self._resolve_dns(self._dns, name)
        return await self._resolve_system(name)

    async def _resolve_dns(self, resolver: dns.asyncresolver.Resolver, name: str) -> tuple[IPAddress, ...]:
        kept = self._answers.get(name)
        if kept is not None:
            if kept[0] > time.time():  # wall-clock seconds, as dnspython's expirations are
                return kept[1]
            del self._answers[name]
        found: list[IPAddress] = []
        expiration = 0.0
        for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            try:
                answer = await resolver.resolve(name + ".", rdtype, search=False)
            except dns.resolver.NoAnswer:
                continue
            except dns.resolver.NXDOMAIN:
                raise ResolveError(Reason.DNS_ERROR, f"{name} does not exist (NXDOMAIN)") from None
            except dns.exception.Timeout:
                raise ResolveError(
                    Reason.DNS_TIMEOUT, f"no DNS answer for {name} within {self.timeout_s:g} s"
                ) from None
            except dns.exception.DNSException as exc:
                raise ResolveError(Reason.DNS_ERROR, f"DNS lookup of {name} failed: {exc}") from None
            # Twice the cap: room for duplicates without converting a huge answer.
            found.extend(
                canonical_ip(ipaddress.ip_address(r.address)) for r in itertools.islice(answer, 2 * self.max_addresses)
            )
            if found:
                expiration = answer.expiration
                break  # IPv4 first; AAAA is asked only for names without A records
        if not found:
            raise ResolveError(Reason.DNS_ERROR, f"{name} has no A or AAAA records")
        candidates = _dedupe(found, self.max_addresses)
        if expiration > time.time() and self.cache_size > 0:
            while len(self._answers) >= self.cache_size:
                self._answers.popitem(last=False)
            self._answers[name] = (expiration, candidates)
        return candidates

    async def _resolve_system(self, name: str) -> tuple[IPAddress, ...]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(name, None, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP),
                self.timeout_s,
            )
        except TimeoutError:
            raise ResolveError(Reason.DNS_TIMEOUT, f"no answer for {name} within {self.timeout_s:g} s") from None
        except (socket.gaierror, UnicodeError) as exc:
            raise ResolveError(Reason.DNS_ERROR, f"lookup of {name} failed: {exc}") from None
        addresses = [
            canonical_ip(ipaddress.ip_address(str(info[4][0]).partition("%")[0]))
            for info in itertools.islice(infos, 4 * self.max_addresses)
        ]
        if not addresses:
            raise ResolveError(Reason.DNS_ERROR, f"{name} has no addresses")
        ordered = [a for a in addresses if a.version == 4] + [a for a in addresses if a.version == 6]
        return _dedupe(ordered, self.max_addresses)
