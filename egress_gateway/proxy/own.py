"""The gateway's own addresses and ports: what no tunnel and no plain-HTTP request may dial.

Owns `OwnAddresses`: the ports the gateway listens on (proxy and admin, and any `own_ports` from configuration) and
every address that reaches this host: loopback and unspecified addresses, the configured ones (the listen address,
the pod IP, `own_addresses` such as the gateway's Service addresses) and every address of the host's interfaces,
enumerated with psutil. Interfaces are re-enumerated on demand, at most once per `refresh_s` (a lookup made later
than that after an address was added sees it), and only for a destination port that is one of the gateway's (the
cheap trigger: other connections never enumerate anything). An IPv6 destination is checked by the IPv4 addresses
it embeds too (a mapped or NAT64 form of the pod IP is the pod IP). Imports psutil and the policy's address
helpers; no mitmproxy.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterable

import psutil

from egress_gateway.policy.addresses import embedded_ipv4
from egress_gateway.policy.decision import IPAddress
from egress_gateway.policy.targets import canonical_ip

Clock = Callable[[], float]


def interface_addresses() -> frozenset[IPAddress]:
    """Every IPv4 and IPv6 address configured on this host's interfaces (zone ids dropped)."""
    found: set[IPAddress] = set()
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family not in (socket.AF_INET, socket.AF_INET6):
                continue
            try:
                found.add(canonical_ip(ipaddress.ip_address(entry.address.partition("%")[0])))
            except ValueError:
                continue
    return frozenset(found)


class OwnAddresses:
    def __init__(
        self,
        configured: Iterable[IPAddress] = (),
        ports: Iterable[int] = (),
        refresh_s: float = 1.0,
        enumerate_interfaces: Callable[[], frozenset[IPAddress]] = interface_addresses,
        clock: Clock = time.monotonic,
    ) -> None:
        self.configured = frozenset(canonical_ip(a) for a in configured)
        self.ports: dict[int, str] = {port: "a port the gateway listens on" for port in ports if port}
        self.refresh_s = refresh_s
        self._enumerate = enumerate_interfaces
        self._clock = clock
        self._interfaces: frozenset[IPAddress] = frozenset()
        self._enumerated_at: float | None = None

    def add_port(self, port: int, what: str) -> None:
        if port:
            self.ports[port] = what

    def addresses(self) -> frozenset[IPAddress]:
        """Configured and interface addresses (interfaces re-enumerated when older than `refresh_s`)."""
        now = self._clock()
        if self._enumerated_at is None or now - self._enumerated_at >= self.refresh_s:
            self._interfaces = self._enumerate()
            self._enumerated_at = now
        return self.configured | self._interfaces

    def dials_itself(self, address: IPAddress | str, port: int) -> str | None:
        """Why dialing `address:port` would reach this gateway, or None."""
        what = self.ports.get(port)
        if what is None:
            return None
        try:
            ip = canonical_ip(ipaddress.ip_address(address) if isinstance(address, str) else address)
        except ValueError:
            return None  # a name: the gateway never dials one
        forms: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            forms.extend(embedded_ipv4(ip))
        own = self.addresses()
        for form in forms:
            if form.is_loopback or form.is_unspecified or form in own:
                return f"{ip} port {port} is the gateway itself ({what})"
        return None
