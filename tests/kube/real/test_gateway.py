"""`egress-gateway run` against a real kube-apiserver, through the real proxy, with the chart's own RBAC.

The gateway is a subprocess with a kubeconfig holding a ServiceAccount token (from the TokenRequest API) for the
ServiceAccount and RBAC objects `helm template` renders from the chart; policies are written with `kubectl`. Every
request the gateway makes is checked in the apiserver's audit log: none may be refused.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import NAMESPACE, _require_helm
from tests.kube.real.cluster import Cluster
from tests.kube.real.conftest import ORIGIN
from tests.proxy.conftest import ANALYTICS_POD, PAYMENTS_POD, STATIC_IDENTITIES, UNKNOWN_POD, connect, curl
from tests.support.gateway import GatewayProcess
from tests.support.origins import OriginServer
from tests.support.tls import TestCA

GV = "egressgateway.io/v1alpha1"
HOSTS = {name: [ORIGIN] for name in ("allowed.test", "other.test", "third.test", "gone.test")}
CHART_SA = "eg-egress-gateway"  # release "eg" (tests/chart/conftest.py)
CHART_USER = f"system:serviceaccount:{NAMESPACE}:{CHART_SA}"
LEASE = "eg-egress-gateway-status"
ENFORCED_WITHIN_S = 5.0  # the real server on a loaded 2-core machine; the fake-server tests hold 1 s


def policy(namespace: str, name: str, hosts: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": GV,
        "kind": "EgressPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"rules": [{"name": "r1", "hosts": hosts}], **spec},
    }


def gateway_config(kubeconfig: Path, identity: dict[str, Any] | None = None, **kubernetes: Any) -> dict[str, Any]:
    return {
        "policy_source": "kubernetes",
        "kubernetes": {
            "kubeconfig": str(kubeconfig),
            "lease_namespace": NAMESPACE,
            "lease_name": LEASE,
            "lease_duration_s": 3,
            "renew_deadline_s": 2,
            "retry_period_s": 1,
            "backoff_max_s": 0.5,
            **kubernetes,
        },
        "allowed_ranges": ["127.0.0.0/8"],
        "identity": identity or {"mode": ["static"], "static": STATIC_IDENTITIES},
        "resolver": {"hosts": HOSTS},
    }


@pytest.fixture(scope="session")
def chart_token(cluster: Cluster) -> str:
    """Install the chart's ServiceAccount and RBAC (as `helm template` renders them) and return a token for it."""
    helm = _require_helm(3)
    rendered = helm.template(
        set_values=("config.policySource=kubernetes", "config.identity.mode={service-account-token,pod-ip}"),
        extra=("--show-only", "templates/serviceaccount.yaml", "--show-only", "templates/rbac.yaml"),
    )
    objects = [doc for doc in yaml.safe_load_all(rendered) if doc]
    assert {o["kind"] for o in objects} >= {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role"}
    cluster.namespace(NAMESPACE)
    for obj in objects:
        if obj["kind"] in ("ServiceAccount", "Role", "RoleBinding"):
            obj["metadata"].setdefault("namespace", NAMESPACE)
    cluster.apply(*objects)
    return cluster.token(NAMESPACE, CHART_SA, [])


def connect_status(gateway: GatewayProcess, authority: str, source: str = PAYMENTS_POD) -> int:
    answer = connect(gateway.proxy_port, authority, source=source)
    answer.sock.close()
    return answer.status


def poll_status(gateway: GatewayProcess, authority: str, wanted: int, timeout: float = ENFORCED_WITHIN_S) -> float:
    start = time.monotonic()
    while (status := connect_status(gateway, authority)) != wanted:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"CONNECT {authority} answered {status}, not {wanted}, for {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - start


def wait_until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)
    return value


def accepted(cluster: Cluster, namespace: str, name: str) -> dict[str, Any] | None:
    """The object's Accepted condition (with the object's uid and generation added), if any."""
    done = cluster.kubectl("get", "egp", name, "-n", namespace, "-o", "json", check=False)
    if done.returncode != 0:
        return None
    obj = json.loads(done.stdout)
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Accepted":
            return {**condition, "uid": obj["metadata"]["uid"], "generation": obj["metadata"]["generation"]}
    return None


def refused(cluster: Cluster, user: str) -> list[str]:
    """Requests by `user` the apiserver answered with 401/403 (from its audit log, which must show some)."""
    assert cluster.audit(user), f"no request by {user} in the audit log"
    return [
        f"{e['verb']} {e['requestURI']} -> {e['responseStatus']['code']}"
        for e in cluster.audit(user)
        if (e.get("responseStatus") or {}).get("code") in (401, 403)
    ]


def test_kubectl_apply_edit_delete_enforced_and_status_written_with_the_charts_rbac(
    clean_policies: Cluster,
    chart_token: str,
    tmp_path: Path,
    origin: tuple[OriginServer, TestCA],
    gateways: list[GatewayProcess],
) -> None:
    cluster = clean_policies
    server, ca = origin
    cluster.namespace("shop")
    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", token=chart_token)
    gateway = GatewayProcess(tmp_path / "gw", gateway_config(kubeconfig)).start()
    gateways.append(gateway)
    gateway.wait_for("kube_policies_loaded", timeout=30)
    gateway.wait_for("kube_leader_acquired", timeout=30)
    target = f"allowed.test:{server.port}"
    assert connect_status(gateway, target) == 403

    cluster.apply(policy("shop", "web", ["allowed.test"]))
    poll_status(gateway, target, 200)
    result = curl(gateway, f"https://{target}/real", ca=ca)
    assert result.exit_code == 0 and result.status == 200, result.stderr
    condition = wait_until(lambda: accepted(cluster, "shop", "web"), 15, "Accepted condition")
    assert condition["status"] == "True" and condition["observedGeneration"] == 1
    table = cluster.kubectl("get", "egp", "web", "-n", "shop").stdout.splitlines()[1].split()
    assert table[:4] == ["web", "Enforce", "1", "True"]

    # `kubectl edit` through an editor that swaps the host: the old host is denied, the new one allowed
    cluster.kubectl("edit", "egp", "web", "-n", "shop", env={"KUBE_EDITOR": r"sed -i -e s/allowed\.test/other.test/"})
    poll_status(gateway, target, 403)
    assert connect_status(gateway, f"other.test:{server.port}") == 200
    wait_until(
        lambda: (accepted(cluster, "shop", "web") or {}).get("observedGeneration") == 2, 15, "status of generation 2"
    )

    # an edit the server accepts but the gateway rejects: last good stays in force, Accepted=False says why
    broken = policy("shop", "web", ["other.test"])
    broken["spec"]["rules"][0].update({"cidrs": ["203.0.113.0/24"], "except": ["198.51.100.1/32"]})
    cluster.apply(broken)
    condition = wait_until(
        lambda: (c := accepted(cluster, "shop", "web")) and c["status"] == "False" and c, 15, "Accepted=False"
    )
    assert "spec.rules[0].except[0]" in condition["message"] and condition["observedGeneration"] == 3
    assert connect_status(gateway, f"other.test:{server.port}") == 200

    cluster.kubectl("delete", "egp", "web", "-n", "shop")
    poll_status(gateway, f"other.test:{server.port}", 403)
    assert refused(cluster, CHART_USER) == []
    assert not gateway.find("kube_status_write_failed")


def test_pod_ip_and_token_review_identity_with_the_charts_rbac(
    clean_policies: Cluster,
    chart_token: str,
    tmp_path: Path,
    origin: tuple[OriginServer, TestCA],
    gateways: list[GatewayProcess],
    unique: Callable[[str], str],
) -> None:
    cluster = clean_policies
    server, ca = origin
    ns = unique("ident")
    cluster.namespace(ns, {"team": "money"})
    cluster.service_account(ns, "payments")
    pay = cluster.pod(ns, "pay-1", [PAYMENTS_POD], labels={"app": "payments"}, service_account="payments")
    cluster.pod(ns, "web-1", [ANALYTICS_POD], labels={"app": "web"})
    only_payments = policy(ns, "payments", ["allowed.test"], podSelector={"matchLabels": {"app": "payments"}})
    cluster.apply(only_payments)

    kubeconfig = cluster.kubeconfig(tmp_path / "kubeconfig", token=chart_token)
    config = gateway_config(kubeconfig, {"mode": ["service-account-token", "pod-ip"]}, write_status=False)
    gateway = GatewayProcess(tmp_path / "gw", config).start()
    gateways.append(gateway)
    gateway.wait_for("kube_policies_loaded", timeout=30)
    gateway.wait_for("kube_list_synced", lambda e: e.get("resource") == "Pod", timeout=30)
    target = f"allowed.test:{server.port}"

    # pod IP: the address the pod's status carries
    result = curl(gateway, f"https://{target}/pod-ip", source=PAYMENTS_POD, ca=ca)
    assert result.exit_code == 0 and result.status == 200, result.stderr
    pay_uid = pay["metadata"]["uid"]
    line = gateway.wait_for("egress_decision", lambda e: e.get("k8s.pod.name") == "pay-1")
    assert line["k8s.pod.uid"] == pay_uid  # the record names the pod unambiguously (a name can be reused)
    assert connect_status(gateway, target, source=ANALYTICS_POD) == 403  # a pod the policy does not select

    # TokenReview: a real bound token from the TokenRequest API identifies pay-1, from pay-1's address only
    # (identity.bind_token_to_pod_ip is on by default where pod-IP identity is configured too)
    token = cluster.token(ns, "payments", ["egress-gateway"], pod=pay)
    result = curl(
        gateway,
        f"https://{target}/token",
        "--proxy-header",
        f"Proxy-Authorization: Bearer {token}",
        source=PAYMENTS_POD,
        ca=ca,
    )
    assert result.exit_code == 0 and result.status == 200, result.stderr
    with_token = gateway.find("egress_decision", lambda e: e.get("egress.service_account") == "payments")
    assert with_token and all(e["k8s.pod.uid"] == pay_uid for e in with_token)
    wrong_audience = cluster.token(ns, "payments", ["someone-else"], pod=pay)
    for credential in (token, wrong_audience, token[:-4] + "AAAA"):
        answer = connect(
            gateway.proxy_port, target, source=UNKNOWN_POD, extra=f"Proxy-Authorization: Bearer {credential}\r\n"
        )
        answer.sock.close()
        assert answer.status == 407

    # the pod is deleted and its address goes to a pod the policy does not select
    cluster.request("DELETE", f"/api/v1/namespaces/{ns}/pods/pay-1?gracePeriodSeconds=0")
    cluster.pod(ns, "web-2", [PAYMENTS_POD], labels={"app": "web"})
    poll_status(gateway, target, 403)
    # a relabel of a live pod moves it back in
    cluster.request(
        "PATCH",
        f"/api/v1/namespaces/{ns}/pods/web-2",
        {"metadata": {"labels": {"app": "payments"}}},
        content_type="application/merge-patch+json",
    )
    poll_status(gateway, target, 200)
    reviews = [e for e in cluster.audit(CHART_USER) if e["objectRef"]["resource"] == "tokenreviews"]
    assert reviews and refused(cluster, CHART_USER) == []


def test_leader_handover_moves_status_writing_to_the_other_gateway(
    clean_policies: Cluster,
    chart_token: str,
    tmp_path: Path,
    origin: tuple[OriginServer, TestCA],
    gateways: list[GatewayProcess],
) -> None:
    cluster = clean_policies
    server, _ = origin
    cluster.namespace("shop")
    cluster.apply(policy("shop", "handover", ["allowed.test"]))
    processes = []
    for name in ("a", "b"):
        kubeconfig = cluster.kubeconfig(tmp_path / f"kubeconfig-{name}", token=chart_token)
        processes.append(GatewayProcess(tmp_path / name, gateway_config(kubeconfig)).start())
        gateways.append(processes[-1])
    leader = wait_until(lambda: next((g for g in processes if g.find("kube_leader_acquired")), None), 30, "a leader")
    follower = processes[1] if leader is processes[0] else processes[0]
    for gateway in processes:
        gateway.wait_for("kube_policies_loaded", timeout=30)
        assert connect_status(gateway, f"allowed.test:{server.port}") == 200
    wait_until(lambda: accepted(cluster, "shop", "handover"), 15, "status from the first leader")
    assert not follower.find("kube_status_written")

    stopped = time.monotonic()
    assert leader.stop() == 0  # releases the Lease on the way out
    follower.wait_for("kube_leader_acquired", timeout=15)
    handover_s = time.monotonic() - stopped
    broken = policy("shop", "handover", ["allowed.test"])
    broken["spec"]["rules"][0].update({"cidrs": ["203.0.113.0/24"], "except": ["198.51.100.1/32"]})
    cluster.apply(broken)
    wait_until(
        lambda: (
            (c := accepted(cluster, "shop", "handover")) and c["status"] == "False" and c["observedGeneration"] == 2
        ),
        15,
        "Accepted=False from the new leader",
    )
    assert follower.find("kube_status_written", lambda e: e.get("generation") == 2)
    assert refused(cluster, CHART_USER) == []
    print(f"\nleader handover: {handover_s:.2f} s from SIGTERM to the follower's kube_leader_acquired")
