"""Issue 12, classes 7 and 9, end to end: names that a real DNS server (dnspython's wire format on loopback UDP)
resolves to special-purpose addresses are denied with the address's reason and never dialed, on both transports;
one huge answer is considered only up to `resolver.max_addresses`.

The gateway runs in a network namespace with only loopback: a dial to any of these addresses would fail with
"network unreachable" and be recorded as `connection_refused` (502), so a 403 `blocked_address` proves the gateway
decided before dialing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.hardening.conftest import PLAIN_ORIGIN
from tests.proxy.conftest import STATIC_IDENTITIES, connect, raw_request
from tests.support.dns_server import TableDNS
from tests.support.gateway import GatewayProcess
from tests.support.netns import require_isolated_network
from tests.support.origins import OriginServer

pytestmark = pytest.mark.netns

# name -> (the address its DNS answer carries, what the denial must say)
SPECIAL = {
    "azure.special.test": ("168.63.129.16", "Azure WireServer"),
    "oracle.special.test": ("192.0.0.192", "Oracle Cloud metadata"),
    "bench.special.test": ("198.18.0.1", "benchmarking"),
    "alibaba.special.test": ("100.100.100.200", "Alibaba Cloud"),
    "imds.special.test": ("169.254.169.254", "cloud instance metadata"),
    "doc.special.test": ("192.0.2.10", "documentation"),
    "translated.special.test": ("::ffff:0:a9fe:a9fe", "cloud instance metadata"),
    "mapped.special.test": ("::ffff:169.254.169.254", "cloud instance metadata"),
    "nat64.special.test": ("64:ff9b::a83f:8110", "Azure WireServer"),
    "aws6.special.test": ("fd00:ec2::254", "AWS instance metadata"),
    "gcp6.special.test": ("fd20:ce::254", "Google Cloud metadata"),
    "sixtofour.special.test": ("2002:c000:c0::1", "Oracle Cloud metadata"),
}

POLICY = """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: payments, namespace: shop}
spec:
  rules:
    - name: everything-by-name
      hosts: ["*.special.test", huge.test, plain.test]
"""


@pytest.fixture
def dns_table() -> Iterator[Callable[[dict[str, list[str]]], TableDNS]]:
    started: list[TableDNS] = []

    def make(answers: dict[str, list[str]]) -> TableDNS:
        server = TableDNS(answers).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def gateway_with_dns(make_gateway: Callable[..., GatewayProcess], dns: TableDNS, **extra: object) -> GatewayProcess:
    config: dict[str, object] = {
        "allowed_ranges": ["127.0.0.0/8"],
        "identity": {"static": STATIC_IDENTITIES},
        "resolver": {"nameservers": [dns.address], "timeout_s": 2},
    }
    config.update(extra)
    return make_gateway(config, {"shop.yaml": POLICY})


def test_names_resolving_to_special_purpose_addresses_are_denied_with_their_reason_and_never_dialed(
    make_gateway: Callable[..., GatewayProcess], dns_table: Callable[[dict[str, list[str]]], TableDNS]
) -> None:
    require_isolated_network()
    dns = dns_table({name: [address] for name, (address, _) in SPECIAL.items()})
    gateway = gateway_with_dns(make_gateway, dns)
    for name, (_, what) in SPECIAL.items():
        answer = connect(gateway.proxy_port, f"{name}:443")
        answer.sock.close()
        assert answer.status == 403, (name, answer.status, answer.body)
        assert answer.body.startswith(b"blocked_address: "), (name, answer.body)
        assert what in answer.body.decode(), (name, answer.body)
        # Plain HTTP takes mitmproxy's path: the same decision.
        request = f"GET http://{name}/ HTTP/1.1\r\nHost: {name}\r\n\r\n".encode()
        plain = raw_request(gateway.proxy_port, request)
        plain.sock.close()
        assert plain.status == 403 and what in plain.body.decode(), (name, plain.status, plain.body)
    records = gateway.find("egress_decision", lambda e: str(e.get("server.address", "")).endswith(".special.test"))
    assert len(records) == 2 * len(SPECIAL)
    assert {r["egress.reason"] for r in records} == {"blocked_address"}
    assert not gateway.find("egress_decision", lambda e: e.get("egress.reason") == "connection_refused")


def test_a_huge_dns_answer_is_considered_only_up_to_max_addresses(
    make_gateway: Callable[..., GatewayProcess],
    dns_table: Callable[[dict[str, list[str]]], TableDNS],
    make_origin: Callable[..., OriginServer],
) -> None:
    """3000 A records in one datagram: the first 20 are blocked (benchmarking range), the 21st is a reachable
    origin. Only the first `max_addresses` (16 by default) are checked, so the connection is denied by the first
    blocked one; before the cap the gateway ran the engine for each record until it found the origin."""
    require_isolated_network()
    origin = make_origin(PLAIN_ORIGIN, name="plain")
    blocked = [f"198.18.{i // 250}.{i % 250 + 1}" for i in range(20)]
    filler = [f"198.19.{i // 250}.{i % 250 + 1}" for i in range(2979)]
    dns = dns_table({"huge.test": [*blocked, PLAIN_ORIGIN, *filler], "plain.test": [PLAIN_ORIGIN]})
    gateway = gateway_with_dns(make_gateway, dns)
    answer = connect(gateway.proxy_port, f"huge.test:{origin.port}")
    answer.sock.close()
    assert answer.status == 403 and answer.body.startswith(b"blocked_address: "), answer.body
    assert b"198.18.0.1 " in answer.body
    # A small answer for the same origin works, so the denial above is the cap, not the origin.
    ok = connect(gateway.proxy_port, f"plain.test:{origin.port}")
    ok.sock.close()
    assert ok.status == 200
    assert origin.accepted == 0  # the CONNECT answer comes before any dial; nothing reached the origin


def test_max_addresses_setting_bounds_the_candidates(
    make_gateway: Callable[..., GatewayProcess],
    dns_table: Callable[[dict[str, list[str]]], TableDNS],
    make_origin: Callable[..., OriginServer],
) -> None:
    require_isolated_network()
    origin = make_origin(PLAIN_ORIGIN, name="plain")
    dns = dns_table({"huge.test": ["198.18.0.1", "198.18.0.2", PLAIN_ORIGIN]})
    two = gateway_with_dns(make_gateway, dns, resolver={"nameservers": [dns.address], "max_addresses": 2})
    denied = connect(two.proxy_port, f"huge.test:{origin.port}")
    denied.sock.close()
    assert denied.status == 403
    three = gateway_with_dns(make_gateway, dns, resolver={"nameservers": [dns.address], "max_addresses": 3})
    allowed = connect(three.proxy_port, f"huge.test:{origin.port}")
    allowed.sock.close()
    assert allowed.status == 200
