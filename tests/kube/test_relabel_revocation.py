"""Open tunnels follow their client's identity: a gateway process with `identity.mode: [pod-ip]` against the fake API
server closes (`revoked`) the open tunnels a pod relabel, a namespace relabel or a pod deletion makes denied, and
keeps those still allowed. Clients are raw sockets from loopback "pod" addresses with a real TLS handshake through
the tunnel to a loopback origin."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube.conftest import GV, namespace, pod
from tests.kube.fake_apiserver import FakeApiServer
from tests.kube.test_gateway_kubernetes import connect_status, gateway_config, policy, poll_status
from tests.proxy.conftest import ANALYTICS_POD, PAYMENTS_POD, closed_by_peer, connect, tls_through
from tests.support.gateway import GatewayProcess
from tests.support.origins import OriginServer
from tests.support.tls import TestCA

pytestmark = pytest.mark.slow

ORIGIN = "127.0.0.32"
REVOKED_WITHIN_S = 2.0  # watch delivery + at most one coalescing interval (0.5 s) + margin for a loaded machine


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "ca")


@pytest.fixture
def origin(ca: TestCA) -> Iterator[OriginServer]:
    server = OriginServer(ORIGIN, ca.issue("allowed.test", "other.test").server_context(), "tls").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_gateway(apiserver: FakeApiServer, tmp_path: Path) -> Iterator[Callable[..., GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(**settings: Any) -> GatewayProcess:
        kubeconfig = apiserver.kubeconfig(tmp_path / "kubeconfig", token="gateway-a")
        config = gateway_config(kubeconfig, write_status=False)
        config["identity"] = {"mode": ["pod-ip"]}
        config["resolver"] = {"hosts": {"allowed.test": [ORIGIN], "other.test": [ORIGIN]}}
        config.update(settings)
        gateway = GatewayProcess(tmp_path / f"gw{len(started)}", config).start()
        started.append(gateway)
        gateway.wait_for("kube_policies_loaded", timeout=15)
        gateway.wait_for("kube_list_synced", lambda e: e.get("resource") == "Pod", timeout=15)
        gateway.wait_for("kube_list_synced", lambda e: e.get("resource") == "Namespace", timeout=15)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


def _payments_cluster(apiserver: FakeApiServer) -> None:
    """shop/pay-1 (PAYMENTS_POD) and shop/pay-2 (ANALYTICS_POD), both app=payments; only app=payments may reach
    allowed.test."""
    apiserver.put(namespace("shop", {"team": "money"}))
    apiserver.put(pod("shop", "pay-1", [PAYMENTS_POD], labels={"app": "payments"}))
    apiserver.put(pod("shop", "pay-2", [ANALYTICS_POD], labels={"app": "payments"}))
    only_payments = policy("payments", ["allowed.test"])
    only_payments["spec"]["podSelector"] = {"matchLabels": {"app": "payments"}}
    apiserver.put(only_payments)


def _tunnel(gateway: GatewayProcess, ca: TestCA, host: str, origin: OriginServer, source: str) -> ssl.SSLSocket:
    answer = connect(gateway.proxy_port, f"{host}:{origin.port}", source=source)
    assert answer.status == 200, (answer.status, answer.body)
    tls = tls_through(answer, ca, host)
    assert f'"/{source}"'.encode() in _get(tls, f"/{source}")
    return tls


def _get(tls: socket.socket, path: str) -> bytes:
    tls.settimeout(5)
    tls.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    for _ in range(100):  # bounded: one small JSON answer
        if b"}" in data:
            break
        chunk = tls.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _closed_within(tls: socket.socket, bound: float) -> float:
    started = time.monotonic()
    assert closed_by_peer(tls, timeout=bound + 3), "the tunnel its client may no longer open stays open"
    took = time.monotonic() - started
    assert took < bound, f"revocation took {took:.2f} s"
    return took


def _revoked(gateway: GatewayProcess, pod_name: str) -> dict[str, Any]:
    return gateway.wait_for(
        "egress_decision", lambda e: e.get("egress.reason") == "revoked" and e.get("k8s.pod.name") == pod_name
    )


def test_a_pod_relabelled_out_of_its_policy_loses_its_open_tunnel(
    apiserver: FakeApiServer, start_gateway: Callable[..., GatewayProcess], origin: OriginServer, ca: TestCA
) -> None:
    _payments_cluster(apiserver)
    gateway = start_gateway()
    relabelled = _tunnel(gateway, ca, "allowed.test", origin, PAYMENTS_POD)
    kept = _tunnel(gateway, ca, "allowed.test", origin, ANALYTICS_POD)

    apiserver.put(pod("shop", "pay-1", [PAYMENTS_POD], labels={"app": "web"}))  # no policy selects it any more
    apiserver.put(pod("shop", "pay-2", [ANALYTICS_POD], labels={"app": "payments", "version": "2"}))  # still does
    took = _closed_within(relabelled, REVOKED_WITHIN_S)
    print(f"pod relabel -> tunnel closed after {took:.2f} s")

    record = _revoked(gateway, "pay-1")
    assert record["k8s.pod.label.app"] == "payments"  # recorded with the identity that opened it, like a policy change
    assert record["egress.message"].startswith(
        "the client's labels changed: pod shop/pay-1 (app: payments -> web), which denies this open tunnel ("
    )
    assert "no_matching_rule" in record["egress.message"] or "no_policy" in record["egress.message"]
    assert b'"/after"' in _get(kept, "/after")  # the pod whose labels still match keeps its tunnel
    logged = gateway.wait_for("tunnels_revoked", lambda e: e.get("cause") == "identity_change")
    assert logged["count"] == 1
    assert len(gateway.find("egress_decision", lambda e: e.get("egress.reason") == "revoked")) == 1
    assert connect_status(gateway, f"allowed.test:{origin.port}") == 403  # from pay-1 (PAYMENTS_POD)
    kept.close()


def test_a_namespace_relabelled_out_of_a_cluster_policy_loses_only_what_that_policy_allowed(
    apiserver: FakeApiServer, start_gateway: Callable[..., GatewayProcess], origin: OriginServer, ca: TestCA
) -> None:
    _payments_cluster(apiserver)
    apiserver.put(namespace("shop", {"team": "money", "tier": "public"}))
    apiserver.put(
        {
            "apiVersion": GV,
            "kind": "ClusterEgressPolicy",
            "metadata": {"name": "public-tier"},
            "spec": {
                "namespaceSelector": {"matchLabels": {"tier": "public"}},
                "rules": [{"name": "r1", "hosts": ["other.test"]}],
            },
        }
    )
    gateway = start_gateway()
    public = _tunnel(gateway, ca, "other.test", origin, PAYMENTS_POD)
    own = _tunnel(gateway, ca, "allowed.test", origin, PAYMENTS_POD)  # allowed by shop's own policy

    apiserver.put(namespace("shop", {"team": "money"}))
    _closed_within(public, REVOKED_WITHIN_S)
    record = _revoked(gateway, "pay-1")
    assert record["server.address"] == "other.test"
    assert record["egress.message"].startswith(
        "the client's labels changed: namespace shop (tier: public -> (none)), which denies this open tunnel ("
    )
    assert b'"/after"' in _get(own, "/after")
    own.close()


def test_a_deleted_pod_loses_its_open_tunnel(
    apiserver: FakeApiServer, start_gateway: Callable[..., GatewayProcess], origin: OriginServer, ca: TestCA
) -> None:
    _payments_cluster(apiserver)
    gateway = start_gateway()
    gone = _tunnel(gateway, ca, "allowed.test", origin, PAYMENTS_POD)
    kept = _tunnel(gateway, ca, "allowed.test", origin, ANALYTICS_POD)

    apiserver.delete("pods", "shop", "pay-1")
    _closed_within(gone, REVOKED_WITHIN_S)
    record = _revoked(gateway, "pay-1")  # recorded with the identity it had
    assert record["egress.message"].startswith("the client's pod shop/pay-1 is gone, which denies this open tunnel")
    assert "unknown_client" in record["egress.message"]
    assert b'"/after"' in _get(kept, "/after")
    kept.close()


def test_with_revoke_open_tunnels_off_a_relabel_applies_to_new_connections_only(
    apiserver: FakeApiServer, start_gateway: Callable[..., GatewayProcess], origin: OriginServer, ca: TestCA
) -> None:
    _payments_cluster(apiserver)
    gateway = start_gateway(revoke_open_tunnels=False)
    tunnel = _tunnel(gateway, ca, "allowed.test", origin, PAYMENTS_POD)

    apiserver.put(pod("shop", "pay-1", [PAYMENTS_POD], labels={"app": "web"}))
    poll_status(gateway, f"allowed.test:{origin.port}", 403, 3)  # new connections from pay-1 are denied
    time.sleep(0.6)  # past one coalescing interval
    assert b'"/still"' in _get(tunnel, "/still")
    assert not gateway.find("tunnels_revoked")
    tunnel.close()
