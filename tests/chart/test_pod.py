"""The gateway run the way the chart runs it in a pod, against the fake API server: the rendered config.yaml,
the Deployment's args, POD_NAME/POD_NAMESPACE, the probe and metrics paths, SIGTERM within the termination grace,
and every API request the gateway makes checked against the rendered ClusterRole and Role.

Only what a pod cannot have here is overridden, through the environment the way `extraEnv` would: loopback
ephemeral listen ports instead of 0.0.0.0:3128/9901, a temp data_dir, a kubeconfig for the fake API server, and
short leader-election timings.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.chart.conftest import NAMESPACE, RELEASE, Helm, one
from tests.kube.conftest import fake_jwt, namespace, pod
from tests.kube.fake_apiserver import FakeApiServer, RequestRecord
from tests.proxy.conftest import PAYMENTS_POD, UNKNOWN_POD, connect
from tests.support.gateway import GatewayProcess

FULLNAME = f"{RELEASE}-egress-gateway"
POD_NAME = f"{FULLNAME}-7d9c5b-abcde"
PAYMENTS_POLICY = {
    "apiVersion": "egressgateway.io/v1alpha1",
    "kind": "EgressPolicy",
    "metadata": {"name": "payments", "namespace": "shop"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "payments"}},
        "rules": [
            {"name": "stripe-api", "hosts": ["api.stripe.com"], "ports": [443]},
            {"name": "no-stripe-dashboard", "action": "Deny", "hosts": ["dashboard.stripe.com"]},
        ],
    },
}


@dataclass
class Pod:
    gateway: GatewayProcess
    apiserver: FakeApiServer
    objects: list[dict[str, Any]]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _eventually(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"{what} within {timeout} s")


@pytest.fixture
def chart_pod(helm3: Helm, tmp_path: Path) -> Iterator[Pod]:
    objects = helm3.objects(set_values=("config.identity.mode={service-account-token,pod-ip}",))
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    config_text = one(objects, "ConfigMap", FULLNAME)["data"]["config.yaml"]
    assert container["args"] == ["--config", "/etc/egress-gateway/config.yaml"]

    apiserver = FakeApiServer(bookmark_interval_s=0.5).start()
    try:
        apiserver.put(namespace("shop"))
        apiserver.put(namespace(NAMESPACE))
        apiserver.put(pod("shop", "payments-1", [PAYMENTS_POD], labels={"app": "payments"}))
        apiserver.put(PAYMENTS_POLICY)
        kubeconfig = apiserver.kubeconfig(tmp_path / "kubeconfig", token="gateway-sa")

        gateway = GatewayProcess(tmp_path / "pod", {})
        gateway.config_path.write_text(config_text)  # exactly what the ConfigMap mounts
        env = {
            "POD_NAME": POD_NAME,
            "POD_NAMESPACE": NAMESPACE,
            "KUBECONFIG": str(kubeconfig),
            "HOME": str(tmp_path),
            "EGRESS_GATEWAY_LISTEN": "127.0.0.1:0",
            "EGRESS_GATEWAY_ADMIN_LISTEN": "127.0.0.1:0",
            "EGRESS_GATEWAY_DATA_DIR": str(tmp_path / "data"),
            "EGRESS_GATEWAY_LOG__FORMAT": "json",
            # No name may reach a real resolver from this test.
            "EGRESS_GATEWAY_RESOLVER__HOSTS": json.dumps({"dashboard.stripe.com": ["127.0.0.1"]}),
            "EGRESS_GATEWAY_KUBERNETES__LEASE_DURATION_S": "3",
            "EGRESS_GATEWAY_KUBERNETES__RENEW_DEADLINE_S": "2",
            "EGRESS_GATEWAY_KUBERNETES__RETRY_PERIOD_S": "1",
        }
        (tmp_path / "data").mkdir()
        gateway.start(timeout=60, extra_env=env)
        try:
            yield Pod(gateway, apiserver, objects)
        finally:
            gateway.stop()
    finally:
        apiserver.stop()


def _probe_path(objects: list[dict[str, Any]], probe: str) -> str:
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    path: str = container[probe]["httpGet"]["path"]
    assert container[probe]["httpGet"]["port"] == "admin"
    return path


def test_probes_metrics_policy_status_identity_and_shutdown(chart_pod: Pod) -> None:
    gateway, apiserver, objects = chart_pod.gateway, chart_pod.apiserver, chart_pod.objects

    # Readiness: the probe path turns 200 once both policy kinds were listed.
    ready = _probe_path(objects, "readinessProbe")
    _eventually(lambda: _get(gateway.admin_url + ready)[0] == 200, 30, f"{ready} not 200")
    assert _get(gateway.admin_url + _probe_path(objects, "livenessProbe"))[0] == 200
    assert _get(gateway.admin_url + _probe_path(objects, "startupProbe"))[0] == 200
    monitor_path = "/metrics"  # the ServiceMonitor's endpoint path
    status, body = _get(gateway.admin_url + monitor_path)
    assert status == 200 and "# TYPE" in body

    # Identity by pod IP (the pod watch the ClusterRole allows): the payments pod hits its own deny rule.
    answer = connect(gateway.proxy_port, "dashboard.stripe.com:443", source=PAYMENTS_POD)
    assert answer.status == 403
    assert answer.body.startswith(b"denied_by_rule: ")
    assert connect(gateway.proxy_port, "dashboard.stripe.com:443", source=UNKNOWN_POD).body.startswith(
        b"unknown_client: "
    )

    # Identity by ServiceAccount token (TokenReview, allowed only with that identity mode). With pod-IP identity
    # also configured, the token is bound to its pod's address (identity.bind_token_to_pod_ip defaults on).
    token = fake_jwt(time.time() + 600, aud=["egress-gateway"])
    payments = apiserver.get("pods", "shop", "payments-1") or {}
    apiserver.add_review_token(
        token,
        username="system:serviceaccount:shop:payments",
        audiences=["egress-gateway"],
        exp=time.time() + 600,
        extra={
            "authentication.kubernetes.io/pod-name": ["payments-1"],
            "authentication.kubernetes.io/pod-uid": [payments["metadata"]["uid"]],
        },
    )
    proxy_authorization = f"Proxy-Authorization: Bearer {token}\r\n"
    answer = connect(gateway.proxy_port, "dashboard.stripe.com:443", source=PAYMENTS_POD, extra=proxy_authorization)
    assert answer.status == 403 and answer.body.startswith(b"denied_by_rule: ")
    answer = connect(gateway.proxy_port, "dashboard.stripe.com:443", source=UNKNOWN_POD, extra=proxy_authorization)
    assert answer.status == 407

    # Status through the Lease-elected writer (Role in the release namespace, status patch in the ClusterRole).
    def accepted() -> bool:
        obj = apiserver.get("egresspolicies", "shop", "payments") or {}
        conditions = obj.get("status", {}).get("conditions", [])
        return any(c["type"] == "Accepted" and c["status"] == "True" for c in conditions)

    _eventually(accepted, 30, "payments policy not Accepted")
    lease_name = f"{FULLNAME}-status"
    lease = apiserver.get("leases", NAMESPACE, lease_name)
    assert lease is not None and lease["spec"]["holderIdentity"].startswith(POD_NAME)

    # SIGTERM: exits 0 well within the pod's terminationGracePeriodSeconds minus the preStop sleep.
    spec = one(objects, "Deployment")["spec"]["template"]["spec"]
    pre_stop = int(spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][1])
    budget = spec["terminationGracePeriodSeconds"] - pre_stop
    started = time.monotonic()
    assert gateway.stop(timeout=budget) == 0
    assert time.monotonic() - started < budget

    # Least privilege is enough: every request the gateway made is allowed by the rendered RBAC.
    denied = [r for r in apiserver.requests if r.token == "gateway-sa" and not _allowed(r, objects)]
    assert not denied, "\n".join(f"{r.method} {r.path} {r.query}" for r in denied)
    expected = {
        ("list", "egresspolicies"),
        ("watch", "clusteregresspolicies"),
        ("watch", "pods"),
        ("watch", "namespaces"),
        ("create", "tokenreviews"),
        ("watch", "serviceaccounts"),
        ("patch", "egresspolicies/status"),
        ("create", "leases"),
    }

    def used() -> set[tuple[str, str]]:
        return {(_attributes(r)[0], _attributes(r)[2]) for r in apiserver.requests if r.token == "gateway-sa"}

    # A watch is on record once the server sees its connection end, which may come a moment after the exit.
    _eventually(lambda: expected <= used(), 10, f"expected the gateway to {sorted(expected - used())}")


# ---- a small RBAC evaluator (the authorizer's rules for resource requests) ----


def _attributes(record: RequestRecord) -> tuple[str, str, str, str | None, str | None]:
    """(verb, apiGroup, resource[/subresource], namespace, name) of an API request."""
    parts = urlsplit(record.path).path.strip("/").split("/")
    if parts[0] == "api":
        group, rest = "", parts[2:]
    else:
        group, rest = parts[1], parts[3:]
    ns = None
    if rest[0] == "namespaces" and len(rest) >= 3:
        ns, rest = rest[1], rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else None
    if len(rest) > 2:
        resource = f"{resource}/{rest[2]}"
    method = record.method
    if method == "GET":
        verb = "get" if name else ("watch" if record.query.get("watch") in ("true", "1") else "list")
    else:
        verb = {"POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}[method]
    return verb, group, resource, ns, name


def _allowed(record: RequestRecord, objects: list[dict[str, Any]]) -> bool:
    verb, group, resource, ns, name = _attributes(record)
    grants = [(rule, None) for obj in objects if obj["kind"] == "ClusterRole" for rule in obj["rules"]]
    grants += [
        (rule, obj["metadata"]["namespace"]) for obj in objects if obj["kind"] == "Role" for rule in obj["rules"]
    ]
    for rule, role_namespace in grants:
        if role_namespace is not None and ns != role_namespace:
            continue
        if group not in rule["apiGroups"] or resource not in rule["resources"] or verb not in rule["verbs"]:
            continue
        if rule.get("resourceNames") and name not in rule["resourceNames"]:
            continue
        return True
    return False


def test_rbac_evaluator_maps_requests_to_verbs_and_honours_names(helm3: Helm) -> None:
    """Guards the evaluator above against passing everything."""
    objects = helm3.objects()

    def record(method: str, path: str, **query: str) -> RequestRecord:
        return RequestRecord(method, path, query, "gateway-sa", 200)

    lease = f"/apis/coordination.k8s.io/v1/namespaces/{NAMESPACE}/leases"
    assert _attributes(record("GET", "/api/v1/pods", watch="true")) == ("watch", "", "pods", None, None)
    assert _attributes(record("GET", "/api/v1/namespaces")) == ("list", "", "namespaces", None, None)
    assert _attributes(record("PATCH", "/apis/egressgateway.io/v1alpha1/namespaces/shop/egresspolicies/p/status")) == (
        "patch",
        "egressgateway.io",
        "egresspolicies/status",
        "shop",
        "p",
    )
    assert _allowed(record("GET", "/api/v1/pods", watch="true"), objects)
    assert _allowed(record("PUT", f"{lease}/{FULLNAME}-status"), objects)
    assert _allowed(record("POST", lease), objects)
    assert not _allowed(record("PUT", f"{lease}/someone-elses-lease"), objects)
    assert not _allowed(record("POST", "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases"), objects)
    assert not _allowed(record("GET", "/api/v1/secrets"), objects)
    assert not _allowed(record("DELETE", "/api/v1/namespaces/shop/pods/x"), objects)
    assert not _allowed(record("POST", "/apis/authentication.k8s.io/v1/tokenreviews"), objects)  # pod-ip only
