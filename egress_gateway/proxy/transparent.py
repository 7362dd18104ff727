"""Transparent mode: the name-routed listeners' settings and the original destination of a redirected socket.

A name-routed listener accepts connections addressed to anything (DNS steering, or a NAT redirect); its session
reads the first message with the tunnel inspector and is decided as a CONNECT to the name that message carries
(the ClientHello's SNI, the request's Host) on `Transparent.port` (`addon.GatewayAddon.open_transparent`). After a
local NAT redirect (iptables REDIRECT, or TPROXY) the kernel still knows the address the client connected to:
`original_destination` reads it (`SO_ORIGINAL_DST`), and the gate denies a connection whose original address is
not one the name resolves to (`Gate.check_original_destination`). Knows nothing about policies.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from egress_gateway.policy.decision import IPAddress
from egress_gateway.settings import split_hostport

if TYPE_CHECKING:
    from egress_gateway.proxy.addon import GatewayAddon
    from egress_gateway.proxy.embedded import EmbeddedProxy
    from egress_gateway.proxy.own import OwnAddresses
    from egress_gateway.settings import Settings

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST (linux/netfilter_ipv6/ip6_tables.h) is 80 too
_SOCKADDR_IN = 16
_SOCKADDR_IN6 = 28


@dataclass(frozen=True, slots=True)
class Transparent:
    """One name-routed listener. `name` is recorded (`egress.listener`); `port` is the synthesised CONNECT's port."""

    name: str
    tls: bool
    port: int
    check_original_destination: bool = True


def original_destination(sock: Any) -> tuple[IPAddress, int] | None:
    """The address a redirected connection was sent to, or None: not redirected (the client connected to this
    listener itself, as after DNS steering), or the kernel keeps no NAT record for it (nothing rewrote it here)."""
    try:
        local = sock.getsockname()
        local_address = (_unmapped(ipaddress.ip_address(local[0])), int(local[1]))
    except (OSError, ValueError):
        return None
    original = _read_original(sock)
    if original is None or original == local_address:
        return None  # connected to the listener directly: nothing was redirected
    return original


def _read_original(sock: Any) -> tuple[IPAddress, int] | None:
    # An IPv4 client of a dual-stack ("::") listener has an AF_INET6 socket but an IPv4 conntrack entry: try both.
    levels = [(socket.SOL_IP, _SOCKADDR_IN)]
    if sock.family == socket.AF_INET6:
        levels.insert(0, (socket.IPPROTO_IPV6, _SOCKADDR_IN6))
    for level, size in levels:
        try:
            raw = sock.getsockopt(level, SO_ORIGINAL_DST, size)
        except OSError:
            continue
        port = int.from_bytes(raw[2:4], "big")
        if size == _SOCKADDR_IN6:
            return _unmapped(ipaddress.IPv6Address(raw[8:24])), port
        return ipaddress.IPv4Address(raw[4:8]), port
    return None


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


async def start_transparent(
    settings: Settings, proxy: EmbeddedProxy, addon: GatewayAddon, own: OwnAddresses
) -> dict[str, tuple[str, int]]:
    """Start the configured name-routed listeners (`transparent.tls_listen`, `transparent.http_listen`); their
    ports become the gateway's own (never dialed). Returns listener name -> bound address."""
    config = settings.transparent
    started: dict[str, tuple[str, int]] = {}
    for name, listen, tls, port in (
        ("transparent-tls", config.tls_listen, True, config.tls_port),
        ("transparent-http", config.http_listen, False, config.http_port),
    ):
        if listen is None:
            continue
        host, listen_port = split_hostport(listen)
        mode = Transparent(name, tls, port, config.check_original_destination)
        started[name] = address = await proxy.start_transparent(addon, host, listen_port, mode)
        own.add_port(address[1], f"its {name} port")
    return started
