"""Issue 12, class 10: one namespace cannot take every connection slot with silent sockets.

`limits.namespace_connections` is each namespace's share of `limits.max_connections`, counted from accept (the
source address gives the namespace for static and pod-IP identity), silent and undecided connections included.
A namespace over its share gets 503 `connection_limit` for its extra connections (which hold no slot of the
global limit); other namespaces keep connecting.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable

from egress_gateway.proxy.limits import NamespaceConnections
from tests.hardening.conftest import PLAIN_ORIGIN
from tests.proxy.conftest import ANALYTICS_POD, PAYMENTS_POD, STATIC_IDENTITIES, connect
from tests.support.gateway import GatewayProcess
from tests.support.origins import OriginServer

POLICIES = {
    f"{name}.yaml": f"""\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {{name: {name}, namespace: {name}}}
spec:
  rules:
    - name: plain
      hosts: [plain.test]
"""
    for name in ("shop", "analytics")
}


def test_namespace_connections_counts_per_namespace_and_releases() -> None:
    share = NamespaceConnections(2)
    assert share.admit("a", "shop") and share.admit("b", "shop")
    assert not share.admit("c", "shop")
    assert share.admit("d", "analytics")
    share.release("a")
    assert share.admit("c", "shop")
    assert share.open("shop") == 2 and share.open("analytics") == 1
    share.release("unknown")  # never counted: nothing happens


def test_silent_sockets_of_one_namespace_exhaust_only_its_share(
    make_gateway: Callable[..., GatewayProcess], make_origin: Callable[..., OriginServer]
) -> None:
    origin = make_origin(PLAIN_ORIGIN, name="plain")
    gateway = make_gateway(
        {
            "allowed_ranges": ["127.0.0.0/8"],
            "identity": {"static": STATIC_IDENTITIES},
            "resolver": {"hosts": {"plain.test": [PLAIN_ORIGIN]}},
            "limits": {"max_connections": 6, "namespace_connections": 3},
            "timeouts": {"client_request_s": 30},
        },
        POLICIES,
    )
    silent: list[socket.socket] = []
    try:
        for _ in range(12):  # twice the whole gateway's limit, all from one namespace, none sends a byte
            silent.append(socket.create_connection(("127.0.0.1", gateway.proxy_port), source_address=(PAYMENTS_POD, 0)))
        time.sleep(0.5)  # let the gateway accept them all
        other = connect(gateway.proxy_port, f"plain.test:{origin.port}", source=ANALYTICS_POD)
        other.sock.close()
        assert other.status == 200, other.body  # another namespace still connects
        again = connect(gateway.proxy_port, f"plain.test:{origin.port}", source=PAYMENTS_POD)
        again.sock.close()
        assert again.status == 503, again.body
        assert again.body.startswith(b"connection_limit: namespace shop already holds its share of 3")
        record = gateway.wait_for(
            "egress_decision",
            lambda e: e.get("egress.reason") == "connection_limit" and e.get("client.address") == PAYMENTS_POD,
        )
        assert "limits.namespace_connections" in record["egress.message"]
    finally:
        for sock in silent:
            with contextlib.suppress(OSError):
                sock.close()
    # Closing them gives the namespace its share back.
    time.sleep(0.5)
    back = connect(gateway.proxy_port, f"plain.test:{origin.port}", source=PAYMENTS_POD)
    back.sock.close()
    assert back.status == 200
