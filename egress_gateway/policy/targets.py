"""Connection targets: parsing `host:port` authorities and normalizing hosts to a name or an IP address.

Owns every form a client may use to spell a destination: DNS names (via `hostnames.normalize_name`), IPv6 literals
with or without brackets, IPv4-mapped IPv6, and the legacy IPv4 spellings that resolvers and browsers accept
(`2130706433`, `0x7f000001`, `127.1`, `0177.0.0.1`), so that `10.1` cannot slip past a check meant for `10.0.0.1`.
Pure: no I/O.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass

from egress_gateway.policy.decision import IPAddress
from egress_gateway.policy.errors import InvalidName, InvalidTarget
from egress_gateway.policy.hostnames import normalize_name

_IPV4_CHARS = re.compile(r"^[0-9a-fA-FxX.]+$")
_NUMERIC_LABEL = re.compile(r"^(?:0[xX][0-9a-fA-F]*|[0-9]+)$")


@dataclass(frozen=True, slots=True)
class NormalizedHost:
    """Exactly one of `name` and `ip` is set."""

    name: str | None = None
    ip: IPAddress | None = None

    def __str__(self) -> str:
        return self.name if self.name is not None else str(self.ip)


def parse_port(text: str) -> int:
    if not text.isdigit() or len(text) > 5:
        raise InvalidTarget(f"port {text!r} is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise InvalidTarget(f"port {port} is outside 1..65535")
    return port


def parse_authority(authority: str, default_port: int | None = None) -> tuple[str, int]:
    """Split `host:port` (or `[v6]:port`). Rejects userinfo, empty hosts and bad ports with `InvalidTarget`."""
    if not authority or any(ch in authority for ch in "@/\\?# \t\r\n\x00"):
        raise InvalidTarget(f"malformed authority {authority!r}")
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise InvalidTarget(f"unterminated IPv6 literal in {authority!r}")
        host, rest = authority[1:end], authority[end + 1 :]
        if rest and not rest.startswith(":"):
            raise InvalidTarget(f"malformed authority {authority!r}")
        port_text = rest[1:] if rest else None
    elif authority.count(":") > 1:
        raise InvalidTarget(f"IPv6 literal without brackets in {authority!r}; write [addr]:port")
    else:
        host, sep, port_text_raw = authority.partition(":")
        port_text = port_text_raw if sep else None
    if not host:
        raise InvalidTarget(f"empty host in {authority!r}")
    if port_text is None:
        if default_port is None:
            raise InvalidTarget(f"{authority!r} has no port")
        return host, default_port
    return host, parse_port(port_text)


def _parse_ipv4_part(part: str) -> int:
    if part[:2].lower() == "0x":
        return int(part[2:] or "0", 16)
    if len(part) > 1 and part.startswith("0"):
        if not all(c in "01234567" for c in part):
            raise InvalidTarget(f"{part!r} is not a valid octal IPv4 part")
        return int(part, 8)
    return int(part)


def parse_legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """inet_aton-style IPv4 (1 to 4 parts, decimal/octal/hex). None if `host` is not numeric at all."""
    if not _IPV4_CHARS.match(host):
        return None
    parts = host.split(".")
    if parts[-1] == "" and len(parts) > 1:
        parts = parts[:-1]  # a trailing dot, as in "127.0.0.1."
    if not parts or not _NUMERIC_LABEL.match(parts[-1]):
        return None  # a name like "cafe.example" made of hex letters; let name parsing decide
    if len(parts) > 4 or not all(_NUMERIC_LABEL.match(p) for p in parts):
        raise InvalidTarget(f"{host!r} is neither a valid IPv4 address nor a valid name")
    values = [_parse_ipv4_part(p) for p in parts]
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        raise InvalidTarget(f"{host!r} is out of range for an IPv4 address")
    number = last
    for index, value in enumerate(head):
        number += value << (8 * (3 - index))
    return ipaddress.IPv4Address(number)


def canonical_ip(address: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (::ffff:a.b.c.d) becomes the plain IPv4 address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=16384)
def normalize_host(host: str) -> NormalizedHost:
    """A requested host as a canonical name or IP. Raises `InvalidTarget` with a reason. Pure, hence cached."""
    if not host:
        raise InvalidTarget("empty host")
    text = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in text:
        if "%" in text:
            raise InvalidTarget(f"{host!r}: IPv6 zone identifiers are not accepted")
        try:
            return NormalizedHost(ip=canonical_ip(ipaddress.IPv6Address(text)))
        except ValueError:
            raise InvalidTarget(f"{host!r} is not a valid IPv6 address") from None
    legacy = parse_legacy_ipv4(text)
    if legacy is not None:
        return NormalizedHost(ip=legacy)
    try:
        return NormalizedHost(name=normalize_name(text))
    except InvalidName as exc:
        raise InvalidTarget(str(exc)) from None
