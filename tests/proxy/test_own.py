"""`proxy/own.py`: what is the gateway itself (issue 12, class 4), with plain values; the end-to-end tests with a
dummy interface in a network namespace are in tests/hardening/test_self_dial.py."""

from __future__ import annotations

import ipaddress

from egress_gateway.policy.decision import IPAddress
from egress_gateway.proxy.own import OwnAddresses, interface_addresses


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


class Interfaces:
    def __init__(self, *addresses: str) -> None:
        self.addresses = {ip(a) for a in addresses}
        self.calls = 0

    def __call__(self) -> frozenset[IPAddress]:
        self.calls += 1
        return frozenset(self.addresses)


def test_own_addresses_on_own_ports_only() -> None:
    interfaces = Interfaces("10.1.2.3")
    own = OwnAddresses([ip("10.96.0.10")], ports=[3128], enumerate_interfaces=interfaces)
    own.add_port(9901, "its admin port")
    assert own.dials_itself("10.1.2.3", 3128) is not None
    assert "admin port" in (own.dials_itself("10.96.0.10", 9901) or "")
    assert own.dials_itself("10.1.2.3", 8443) is None  # another port of the pod: a sidecar, not the gateway
    assert own.dials_itself("10.1.2.4", 3128) is None
    for spelled in ("127.0.0.1", "127.9.9.9", "0.0.0.0", "::1", "::", "::ffff:10.1.2.3", "64:ff9b::a01:203"):
        assert own.dials_itself(spelled, 3128) is not None, spelled
    assert own.dials_itself("gateway.example", 3128) is None  # names are never dialed; the gate pins an IP


def test_interfaces_are_enumerated_only_for_own_ports_and_at_most_once_per_refresh_interval() -> None:
    now = [0.0]
    interfaces = Interfaces("10.1.2.3")
    own = OwnAddresses(ports=[3128], refresh_s=1.0, enumerate_interfaces=interfaces, clock=lambda: now[0])
    assert own.dials_itself("10.9.9.9", 443) is None
    assert interfaces.calls == 0  # other ports never enumerate
    assert own.dials_itself("10.9.9.9", 3128) is None
    interfaces.addresses.add(ip("10.9.9.9"))  # an address appears on an interface
    now[0] = 0.5
    assert own.dials_itself("10.9.9.9", 3128) is None  # within the refresh interval: not seen yet
    now[0] = 1.0
    assert own.dials_itself("10.9.9.9", 3128) is not None
    assert interfaces.calls == 2


def test_psutil_enumeration_includes_loopback() -> None:
    assert ip("127.0.0.1") in interface_addresses()
