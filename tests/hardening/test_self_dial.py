"""Issue 12, class 4: the gateway never dials itself through any of its addresses, on any port it listens on.

The gateway listens on 0.0.0.0 (the chart's default) in a network namespace where a dummy interface carries a
non-loopback address (10.99.0.1, standing in for the pod IP), and the client is allowed into that range (an
`allowed_ranges` entry and a `cidrs` rule). CONNECT and plain-HTTP requests to that address on the proxy port or the
admin port are denied (`self_connect`) before any dial; other ports of the same address stay reachable. An address
added to an interface while the gateway runs is recognised too (interfaces are re-enumerated at most once a second).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from tests.proxy.conftest import PAYMENTS_POD, STATIC_IDENTITIES, connect, raw_request
from tests.support.gateway import GatewayProcess
from tests.support.netns import require_isolated_network
from tests.support.origins import OriginServer

pytestmark = pytest.mark.netns

DUMMY = "eg12d0"
POD_IP = "10.99.0.1"
LATER_IP = "10.99.0.2"

POLICY = """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: payments, namespace: shop}
spec:
  rules:
    - name: pod-range
      cidrs: ["10.99.0.0/24", "127.0.0.0/8"]
    - name: by-name
      hosts: [gateway.test]
"""


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture
def dummy_interface() -> Iterator[str]:
    """A dummy interface with POD_IP, in the test's (throwaway, loopback-only) network namespace; removed after
    (deleting one end of the veth fallback deletes both)."""
    require_isolated_network()
    try:
        ip("link", "add", DUMMY, "type", "dummy")
    except subprocess.CalledProcessError:
        # Kernels without the dummy module: a veth pair with both ends in this namespace (no way off the machine).
        ip("link", "add", DUMMY, "type", "veth", "peer", "name", f"{DUMMY}p")
        ip("link", "set", f"{DUMMY}p", "up")
    try:
        ip("addr", "add", f"{POD_IP}/24", "dev", DUMMY)
        ip("link", "set", DUMMY, "up")
        yield POD_IP
    finally:
        subprocess.run(["ip", "link", "del", DUMMY], capture_output=True, timeout=10)


@pytest.fixture
def gateway(dummy_interface: str, make_gateway: Callable[..., GatewayProcess]) -> GatewayProcess:
    return make_gateway(
        {
            "listen": "0.0.0.0:0",
            "admin_listen": "0.0.0.0:0",
            "allowed_ranges": ["127.0.0.0/8", "10.99.0.0/24"],
            "identity": {"static": STATIC_IDENTITIES},
            "resolver": {"hosts": {"gateway.test": [POD_IP]}},
        },
        {"shop.yaml": POLICY},
    )


def assert_self_denied(gateway: GatewayProcess, authority: str, port_kind: str) -> None:
    answer = connect(gateway.proxy_port, authority)
    answer.sock.close()
    assert answer.status == 403, (authority, answer.status, answer.body)
    assert answer.body.startswith(b"self_connect: "), answer.body
    assert b"the gateway itself" in answer.body and port_kind.encode() in answer.body


def test_connect_to_the_gateways_own_address_on_its_proxy_and_admin_ports_is_refused(gateway: GatewayProcess) -> None:
    assert_self_denied(gateway, f"{POD_IP}:{gateway.proxy_port}", "proxy port")
    assert_self_denied(gateway, f"{POD_IP}:{gateway.admin_port}", "admin port")
    assert_self_denied(gateway, f"[::ffff:{POD_IP}]:{gateway.proxy_port}", "proxy port")
    assert_self_denied(gateway, f"gateway.test:{gateway.admin_port}", "admin port")
    assert_self_denied(gateway, f"127.0.0.5:{gateway.proxy_port}", "proxy port")  # loopback is in allowed_ranges
    records = gateway.find("egress_decision", lambda e: e.get("egress.reason") == "self_connect")
    assert len(records) == 5
    # Never dialed: a tunnel into itself would show up as a second client, from the gateway's own address.
    time.sleep(0.3)
    assert not gateway.find("egress_decision", lambda e: e.get("client.address") != PAYMENTS_POD)


def test_plain_http_to_the_admin_port_through_the_proxy_is_refused(gateway: GatewayProcess) -> None:
    for port, kind in ((gateway.admin_port, "admin port"), (gateway.proxy_port, "proxy port")):
        request = f"GET http://{POD_IP}:{port}/metrics HTTP/1.1\r\nHost: {POD_IP}:{port}\r\n\r\n".encode()
        answer = raw_request(gateway.proxy_port, request)
        answer.sock.close()
        assert answer.status == 403, answer.body
        assert answer.body.startswith(b"self_connect: ") and kind.encode() in answer.body
        assert b"egress_" not in answer.body  # no metrics were served


def test_other_ports_of_the_same_address_stay_reachable(
    gateway: GatewayProcess, make_origin: Callable[..., OriginServer]
) -> None:
    origin = make_origin(POD_IP, name="sidecar")
    answer = connect(gateway.proxy_port, f"{POD_IP}:{origin.port}")
    answer.sock.close()
    assert answer.status == 200


def test_an_address_added_while_running_is_recognised(gateway: GatewayProcess) -> None:
    ip("addr", "add", f"{LATER_IP}/24", "dev", DUMMY)
    time.sleep(1.5)  # interfaces are re-enumerated at most once a second
    assert_self_denied(gateway, f"{LATER_IP}:{gateway.proxy_port}", "proxy port")


def test_configured_service_addresses_are_self(
    dummy_interface: str, make_gateway: Callable[..., GatewayProcess]
) -> None:
    """A Service ClusterIP is on no interface of the pod: it is self because the configuration says so."""
    gateway = make_gateway(
        {
            "listen": "0.0.0.0:0",
            "allowed_ranges": ["127.0.0.0/8", "10.99.0.0/24"],
            "identity": {"static": STATIC_IDENTITIES},
            "own_addresses": ["10.99.0.77"],
            "own_ports": [3128],
        },
        {"shop.yaml": POLICY},
    )
    assert_self_denied(gateway, f"10.99.0.77:{gateway.proxy_port}", "proxy port")
    assert_self_denied(gateway, "10.99.0.77:3128", "a port the gateway listens on")
