"""`egress-gateway run` with `policy_source: kubernetes` against the fake API server, through the real proxy.

The gateway is a subprocess reading a kubeconfig that points at the fake; clients are curl and raw sockets bound
to loopback "pod" addresses; origins are TLS servers on other loopback addresses.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.kube.conftest import GV, fake_jwt, namespace, pod
from tests.kube.fake_apiserver import FakeApiServer
from tests.proxy.conftest import ANALYTICS_POD, PAYMENTS_POD, STATIC_IDENTITIES, UNKNOWN_POD, connect, curl
from tests.support.gateway import GatewayProcess
from tests.support.origins import OriginServer
from tests.support.tls import TestCA

ORIGIN = "127.0.0.31"
HOSTS = {"allowed.test": [ORIGIN], "other.test": [ORIGIN]}


def policy(name: str, hosts: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": GV,
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"rules": [{"name": "r1", "hosts": hosts}]},
    }


def gateway_config(kubeconfig: Path, **kubernetes: Any) -> dict[str, Any]:
    return {
        "policy_source": "kubernetes",
        "kubernetes": {
            "kubeconfig": str(kubeconfig),
            "lease_namespace": "egress-system",
            "lease_duration_s": 3,
            "renew_deadline_s": 2,
            "retry_period_s": 1,
            "backoff_max_s": 0.5,
            **kubernetes,
        },
        "allowed_ranges": ["127.0.0.0/8"],
        "identity": {"mode": ["static"], "static": STATIC_IDENTITIES},
        "resolver": {"hosts": HOSTS},
    }


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[tuple[OriginServer, TestCA]]:
    ca = TestCA(tmp_path / "ca")
    server = OriginServer(ORIGIN, ca.issue("allowed.test", "other.test").server_context(), "tls").start()
    try:
        yield server, ca
    finally:
        server.stop()


@pytest.fixture
def gateways() -> Iterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for gateway in started:
        gateway.stop()


def connect_status(gateway: GatewayProcess, authority: str) -> int:
    answer = connect(gateway.proxy_port, authority)
    answer.sock.close()
    return answer.status


def poll_status(gateway: GatewayProcess, authority: str, wanted: int, timeout: float) -> float:
    start = time.monotonic()
    while connect_status(gateway, authority) != wanted:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"CONNECT {authority} did not answer {wanted} within {timeout}s")
        time.sleep(0.02)
    return time.monotonic() - start


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_policy_add_modify_delete_enforced_through_the_proxy_within_one_second(
    apiserver: FakeApiServer, tmp_path: Path, origin: tuple[OriginServer, TestCA], gateways: list[GatewayProcess]
) -> None:
    server, ca = origin
    kubeconfig = apiserver.kubeconfig(tmp_path / "kubeconfig", token="gateway-a")
    gateway = GatewayProcess(tmp_path / "gw", gateway_config(kubeconfig)).start()
    gateways.append(gateway)
    gateway.wait_for("kube_policies_loaded", timeout=15)
    assert http_get(f"{gateway.admin_url}/readyz")[0] == 200
    target = f"allowed.test:{server.port}"
    assert connect_status(gateway, target) == 403

    apiserver.put(policy("web", ["allowed.test"]))
    assert poll_status(gateway, target, 200, 1.0) < 1.0
    result = curl(gateway, f"https://allowed.test:{server.port}/k8s", ca=ca)
    assert result.exit_code == 0 and result.status == 200, result.stderr
    assert result.json()["sni"] == "allowed.test"

    apiserver.put(policy("web", ["other.test"]))
    assert poll_status(gateway, target, 403, 1.0) < 1.0
    assert connect_status(gateway, f"other.test:{server.port}") == 200

    apiserver.delete("egresspolicies", "shop", "web")
    assert poll_status(gateway, f"other.test:{server.port}", 403, 1.0) < 1.0

    # an invalid edit keeps the last good version in force, and says so in status
    apiserver.put(policy("web", ["allowed.test"]))
    poll_status(gateway, target, 200, 1.0)
    apiserver.put(policy("web", ["allowed.test", "not a host"]))
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        obj = apiserver.get("egresspolicies", "shop", "web") or {}
        conditions = (obj.get("status") or {}).get("conditions") or []
        if any(c["type"] == "Accepted" and c["status"] == "False" for c in conditions):
            break
        time.sleep(0.05)
    else:
        raise AssertionError("Accepted=False never written")
    assert "spec.rules[0].hosts[1]" in conditions[-1]["message"]
    assert connect_status(gateway, target) == 200


def test_not_ready_503_until_first_list_then_enforcing_while_the_api_server_is_down(
    apiserver: FakeApiServer, tmp_path: Path, origin: tuple[OriginServer, TestCA], gateways: list[GatewayProcess]
) -> None:
    server, _ = origin
    apiserver.put(policy("web", ["allowed.test"]))
    kubeconfig = apiserver.kubeconfig(tmp_path / "kubeconfig", token="gateway-a")
    apiserver.go_down()
    gateway = GatewayProcess(tmp_path / "gw", gateway_config(kubeconfig, write_status=False)).start()
    gateways.append(gateway)
    target = f"allowed.test:{server.port}"

    status, body = http_get(f"{gateway.admin_url}/readyz")
    assert status == 503 and "policies_not_loaded" in body
    answer = connect(gateway.proxy_port, target)
    answer.sock.close()
    assert answer.status == 503
    assert "policies_not_loaded" in answer.headers.get("proxy-status", "") + answer.body.decode()

    apiserver.come_up()
    gateway.wait_for("kube_policies_loaded", timeout=10)
    assert http_get(f"{gateway.admin_url}/readyz")[0] == 200
    assert connect_status(gateway, target) == 200

    apiserver.go_down()
    gateway.wait_for("kube_watch_error", lambda e: (e.get("staleness_s") or 0) > 0, timeout=10)
    time.sleep(1.2)
    assert connect_status(gateway, target) == 200  # last known policies still enforced
    assert http_get(f"{gateway.admin_url}/readyz")[0] == 200  # still ready
    metrics = http_get(f"{gateway.admin_url}/metrics")[1]
    line = next(
        m
        for m in metrics.splitlines()
        if m.startswith('egress_gateway_policy_source_staleness_seconds{source="kubernetes"}')
    )
    assert float(line.rsplit(" ", 1)[1]) >= 1.0
    assert 'egress_gateway_watch_restarts_total{kind="EgressPolicy",reason="error"}' in metrics
    assert 'egress_gateway_policy_source_ready{source="kubernetes"} 1.0' in metrics


def test_no_credentials_is_a_clear_startup_failure(tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text("policy_source: kubernetes\nlisten: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EGRESS_GATEWAY_", "KUBE"))}
    env["HOME"] = str(tmp_path)  # no ~/.kube/config
    done = subprocess.run(
        [sys.executable, "-m", "egress_gateway", "run", "--config", str(config)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "no Kubernetes credentials" in done.stderr + done.stdout


def _identity_cluster(apiserver: FakeApiServer) -> None:
    apiserver.put(namespace("shop", {"team": "money"}))
    apiserver.put(pod("shop", "pay-1", [PAYMENTS_POD], labels={"app": "payments"}))
    apiserver.put(pod("shop", "web-1", [ANALYTICS_POD], labels={"app": "web"}))
    only_payments = policy("payments", ["allowed.test"])
    only_payments["spec"]["podSelector"] = {"matchLabels": {"app": "payments"}}
    apiserver.put(only_payments)


def test_pod_ip_identity_through_the_proxy(
    apiserver: FakeApiServer, tmp_path: Path, origin: tuple[OriginServer, TestCA], gateways: list[GatewayProcess]
) -> None:
    server, ca = origin
    _identity_cluster(apiserver)
    kubeconfig = apiserver.kubeconfig(tmp_path / "kubeconfig", token="gateway-a")
    config = gateway_config(kubeconfig, write_status=False)
    config["identity"] = {"mode": ["pod-ip"]}
    gateway = GatewayProcess(tmp_path / "gw", config).start()
    gateways.append(gateway)
    gateway.wait_for("kube_policies_loaded", timeout=15)
    gateway.wait_for("kube_list_synced", lambda e: e.get("resource") == "Pod", timeout=15)
    target = f"allowed.test:{server.port}"

    result = curl(gateway, f"https://{target}/pod", source=PAYMENTS_POD, ca=ca)
    assert result.exit_code == 0 and result.status == 200, result.stderr
    assert connect_status(gateway, target) == 200
    web = connect(gateway.proxy_port, target, source=ANALYTICS_POD)  # a pod the policy does not select
    web.sock.close()
    assert web.status == 403
    nobody = connect(gateway.proxy_port, target, source=UNKNOWN_POD)
    nobody.sock.close()
    assert nobody.status == 403 and "unknown_client" in nobody.headers.get("proxy-status", "")

    # the payments pod goes away and its address is reused by the web pod's twin: identity follows within 1 s
    apiserver.delete("pods", "shop", "pay-1")
    apiserver.put(pod("shop", "web-2", [PAYMENTS_POD], labels={"app": "web"}, created="2026-02-01T00:00:00Z"))
    assert poll_status(gateway, target, 403, 1.0) < 1.0

    # relabelling the namespace moves it in and out of a ClusterEgressPolicy's namespaceSelector
    public = f"other.test:{server.port}"
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
    time.sleep(0.3)
    assert connect_status(gateway, public) == 403
    apiserver.put(namespace("shop", {"team": "money", "tier": "public"}))
    assert poll_status(gateway, public, 200, 1.0) < 1.0
    apiserver.put(namespace("shop", {"team": "money"}))
    assert poll_status(gateway, public, 403, 1.0) < 1.0


def test_service_account_token_identity_through_the_proxy(
    apiserver: FakeApiServer, tmp_path: Path, origin: tuple[OriginServer, TestCA], gateways: list[GatewayProcess]
) -> None:
    server, ca = origin
    _identity_cluster(apiserver)
    exp = int(time.time()) + 600
    token = fake_jwt(exp)
    apiserver.add_review_token(
        token,
        username="system:serviceaccount:shop:payments",
        audiences=["egress-gateway"],
        exp=exp,
        extra={"authentication.kubernetes.io/pod-name": ["pay-1"]},
    )
    kubeconfig = apiserver.kubeconfig(tmp_path / "kubeconfig", token="gateway-a")
    config = gateway_config(kubeconfig, write_status=False)
    config["identity"] = {"mode": ["service-account-token"]}
    gateway = GatewayProcess(tmp_path / "gw", config).start()
    gateways.append(gateway)
    gateway.wait_for("kube_policies_loaded", timeout=15)
    gateway.wait_for("kube_list_synced", lambda e: e.get("resource") == "Pod", timeout=15)
    target = f"allowed.test:{server.port}"
    accepted_before = server.accepted

    for extra in ("", "Proxy-Authorization: Bearer forged-token\r\n", "Proxy-Authorization: Digest x\r\n"):
        answer = connect(gateway.proxy_port, target, source=UNKNOWN_POD, extra=extra)
        answer.sock.close()
        assert answer.status == 407, extra
        assert answer.headers.get("proxy-authenticate"), extra
    time.sleep(0.3)
    assert server.accepted == accepted_before  # no upstream connection for any of them

    # any source address: the token says who it is (pod pay-1 -> labels app=payments)
    result = curl(
        gateway,
        f"https://{target}/token",
        "--proxy-header",
        f"Proxy-Authorization: Bearer {token}",
        source=UNKNOWN_POD,
        ca=ca,
    )
    assert result.exit_code == 0 and result.status == 200, result.stderr
    assert result.json()["sni"] == "allowed.test"
    reviews = apiserver.requests_matching(lambda r: r.path.endswith("/tokenreviews"))
    assert len(reviews) == 1  # the good one; the malformed one is refused without a review, repeated use is cached


def _accepted_generation(apiserver: FakeApiServer, name: str) -> int | None:
    obj = apiserver.get("egresspolicies", "shop", name) or {}
    conditions = (obj.get("status") or {}).get("conditions") or []
    return next((c.get("observedGeneration") for c in conditions if c["type"] == "Accepted"), None)


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout}s")
        time.sleep(0.05)


def test_two_gateway_processes_both_enforce_and_one_writes_status(
    apiserver: FakeApiServer, tmp_path: Path, origin: tuple[OriginServer, TestCA], gateways: list[GatewayProcess]
) -> None:
    server, _ = origin
    apiserver.put(policy("web", ["allowed.test"]))
    apiserver.put(policy("broken", ["not a host"]))
    processes = {}
    for token in ("gateway-a", "gateway-b"):
        kubeconfig = apiserver.kubeconfig(tmp_path / f"kubeconfig-{token}", token=token)
        processes[token] = GatewayProcess(tmp_path / token, gateway_config(kubeconfig)).start()
        gateways.append(processes[token])
    for gateway in processes.values():
        gateway.wait_for("kube_policies_loaded", timeout=15)
        assert connect_status(gateway, f"allowed.test:{server.port}") == 200
    _wait(
        lambda: _accepted_generation(apiserver, "web") == 1 and _accepted_generation(apiserver, "broken") == 1,
        10,
        "status on both objects",
    )
    writers = {r.token for r in apiserver.requests_matching(lambda r: r.method == "PATCH")}
    assert len(writers) == 1
    leader = writers.pop()
    follower = "gateway-b" if leader == "gateway-a" else "gateway-a"
    assert processes[leader].find("kube_leader_acquired") and not processes[follower].find("kube_leader_acquired")

    assert processes[leader].stop() == 0  # releases the Lease on the way out
    processes[follower].wait_for("kube_leader_acquired", timeout=10)
    apiserver.put(policy("broken", ["still not a host"]))
    _wait(lambda: _accepted_generation(apiserver, "broken") == 2, 10, "status of generation 2")
    late = {
        r.token
        for r in apiserver.requests_matching(lambda r: r.method == "PATCH" and r.path.endswith("/broken/status"))
    }
    assert late == {leader, follower}


def test_run_flags_select_the_kubernetes_source_and_kubeconfig(
    apiserver: FakeApiServer, kubeconfig: Path, tmp_path: Path
) -> None:
    """`run --kubernetes --kubeconfig FILE` needs no config file: it lists policies from the API and gets ready."""
    apiserver.put(policy("payments", ["allowed.test"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EGRESS_GATEWAY_", "KUBE"))}
    env.update(
        HOME=str(tmp_path),
        EGRESS_GATEWAY_KUBERNETES__WRITE_STATUS="false",
        EGRESS_GATEWAY_IDENTITY__MODE="static",
    )
    admin_port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "egress_gateway",
            "run",
            "--kubernetes",
            "--kubeconfig",
            str(kubeconfig),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            f"127.0.0.1:{admin_port}",
        ],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        body = ""
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=2) as response:
                    body = response.read().decode()
                    break
            except OSError:
                time.sleep(0.1)
        assert body.startswith("ready (1 policies)"), body
    finally:
        process.terminate()
        process.communicate(timeout=30)
    assert process.returncode == 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_token_review_flood_from_one_address_gets_429_with_a_record(
    apiserver: FakeApiServer, tmp_path: Path, origin: tuple[OriginServer, TestCA], gateways: list[GatewayProcess]
) -> None:
    server, _ = origin
    _identity_cluster(apiserver)
    kubeconfig = apiserver.kubeconfig(tmp_path / "kubeconfig", token="gateway-a")
    config = gateway_config(kubeconfig, write_status=False)
    config["identity"] = {
        "mode": ["service-account-token"],
        "token_reviews_per_address": {"per_second": 0.01, "burst": 3},  # no refill within the test
    }
    gateway = GatewayProcess(tmp_path / "gw", config).start()
    gateways.append(gateway)
    gateway.wait_for("kube_policies_loaded", timeout=15)
    gateway.wait_for("kube_list_synced", lambda e: e.get("resource") == "Pod", timeout=15)
    target = f"allowed.test:{server.port}"
    statuses = []
    for n in range(10):
        answer = connect(
            gateway.proxy_port,
            target,
            source=UNKNOWN_POD,
            extra=f"Proxy-Authorization: Bearer {fake_jwt(time.time() + 600, junk=n)}\r\n",
        )
        answer.sock.close()
        statuses.append((answer.status, answer.headers.get("retry-after")))
    assert [s for s, _ in statuses] == [407] * 3 + [429] * 7
    assert all(retry is not None and int(retry) >= 1 for s, retry in statuses if s == 429)
    assert len(apiserver.requests_matching(lambda r: r.path.endswith("/tokenreviews"))) == 3
    records = gateway.wait_for("egress_decision", lambda e: e.get("egress.reason") == "rate_limited", timeout=5)
    assert records
    # another address is not limited by the first one's flood
    answer = connect(gateway.proxy_port, target, source=ANALYTICS_POD, extra="Proxy-Authorization: Bearer x.y.z\r\n")
    answer.sock.close()
    assert answer.status == 407


def test_past_max_staleness_pod_ip_clients_are_unknown_with_the_reason_and_readiness_stays(
    apiserver: FakeApiServer, tmp_path: Path, origin: tuple[OriginServer, TestCA], gateways: list[GatewayProcess]
) -> None:
    server, _ = origin
    _identity_cluster(apiserver)
    kubeconfig = apiserver.kubeconfig(tmp_path / "kubeconfig", token="gateway-a")
    config = gateway_config(kubeconfig, write_status=False)
    config["identity"] = {"mode": ["pod-ip"], "max_staleness_s": 1.0}
    gateway = GatewayProcess(tmp_path / "gw", config).start()
    gateways.append(gateway)
    gateway.wait_for("kube_list_synced", lambda e: e.get("resource") == "Pod", timeout=15)
    target = f"allowed.test:{server.port}"
    assert poll_status(gateway, target, 200, 5.0) < 5.0  # pay-1 by its address

    apiserver.hang()  # the API server stops answering; open watches are cut
    apiserver.cut_watches(mid_event=False)
    gateway.wait_for("pod_ip_identities_untrusted", timeout=10)
    answer = connect(gateway.proxy_port, target, source=PAYMENTS_POD)
    answer.sock.close()
    assert answer.status == 403
    assert answer.body.startswith(b"unknown_client: the pod index has been out of touch with the API server")
    assert http_get(f"{gateway.admin_url}/readyz")[0] == 200  # on purpose: docs/operations.md says why
    metrics_text = http_get(f"{gateway.admin_url}/metrics")[1]
    assert "egress_gateway_pod_ip_identity_trusted 0.0" in metrics_text

    apiserver.answer_again()
    gateway.wait_for("pod_ip_identities_trusted_again", timeout=15)
    assert poll_status(gateway, target, 200, 5.0) < 5.0
