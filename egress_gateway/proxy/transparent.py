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
    listener itself, as after DNS steering), or the kernel keeps no NAT record for it."""
    try:
        family = sock.family
        if family == socket.AF_INET:
            raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN)
            original: tuple[IPAddress, int] = (ipaddress.IPv4Address(raw[4:8]), int.from_bytes(raw[2:4], "big"))
        elif family == socket.AF_INET6:
            raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, _SOCKADDR_IN6)
            original = (ipaddress.IPv6Address(raw[8:24]), int.from_bytes(raw[2:4], "big"))
        else:
            return None
        local = sock.getsockname()
    except (OSError, ValueError):
        return None
    try:
        if (ipaddress.ip_address(local[0]), int(local[1])) == original:
            return None  # connected to the listener directly: nothing was redirected
    except ValueError:
        return None
    return original


async def start_transparent(
    settings: Settings, proxy: EmbeddedProxy, addon: GatewayAddon, own: OwnAddresses
) -> dict[str, tuple[str, int]]:
    """Start the configured name-routed listeners (`transparent.tls_listen`, `transparent.http_listen`); their
    ports become the gateway's own (never dialed). Returns listener name -> bound address."""
    from egress_gateway.settings import split_hostport

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
