"""The NetworkPolicy pack: the gateway's own traffic, and enforcement that leaves pods in chosen namespaces only
DNS and the gateway, so they cannot bypass it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.chart.conftest import NAMESPACE, RELEASE, Helm, find, one

FULLNAME = f"{RELEASE}-egress-gateway"
GATEWAY_PODS = {"app.kubernetes.io/name": "egress-gateway", "app.kubernetes.io/instance": RELEASE}
DNS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}
DNS_PORTS = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
GATEWAY_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}},
    "podSelector": {"matchLabels": GATEWAY_PODS},
}


def _enforcement_policies(objects: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["namespace"]: o for o in find(objects, "NetworkPolicy", f"{FULLNAME}-enforce")}


def test_nothing_is_enforced_by_default(default_objects: list[dict[str, Any]]) -> None:
    assert not find(default_objects, "NetworkPolicy")
    assert not find(default_objects, "ClusterNetworkPolicy")
    assert not find(default_objects, "AdminNetworkPolicy")


def test_enforced_namespaces_get_a_deny_all_egress_policy_allowing_dns_and_the_gateway_only(helm3: Helm) -> None:
    objects = helm3.objects(set_values=("enforcement.namespaces={shop,analytics}",))

    policies = _enforcement_policies(objects)

    assert sorted(policies) == ["analytics", "shop"]
    for policy in policies.values():
        spec = policy["spec"]
        assert spec["podSelector"] == {}  # every pod in the namespace
        assert spec["policyTypes"] == ["Egress"]  # egress only: ingress to these pods is not our business
        assert spec["egress"] == [
            {"to": [DNS_PEER], "ports": DNS_PORTS},
            {"to": [GATEWAY_PEER], "ports": [{"protocol": "TCP", "port": 3128}]},
        ]
    assert not find(objects, "ClusterNetworkPolicy")


def test_gateway_peer_matches_the_gateway_pods(helm3: Helm) -> None:
    objects = helm3.objects(set_values=("enforcement.namespaces={shop}", "service.port=8888"))
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    (policy,) = _enforcement_policies(objects).values()
    gateway_rule = policy["spec"]["egress"][1]
    selector = gateway_rule["to"][0]["podSelector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert gateway_rule["ports"] == [{"protocol": "TCP", "port": 8888}]
    ports = {
        p["name"]: p["containerPort"]
        for p in one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]
    }
    assert ports["proxy"] == 8888


def test_allow_cluster_pods_and_extra_egress_are_opt_in(helm3: Helm, tmp_path: Path) -> None:
    values = tmp_path / "values.yaml"
    values.write_text(
        "enforcement:\n  namespaces: [shop]\n  allowClusterPods: true\n  extraEgress:\n"
        "    - to: [{ipBlock: {cidr: 172.18.0.2/32}}]\n      ports: [{protocol: TCP, port: 6443}]\n"
    )
    (policy,) = _enforcement_policies(helm3.objects(values)).values()
    egress = policy["spec"]["egress"]
    assert egress[2] == {"to": [{"namespaceSelector": {}}]}
    assert egress[3] == {"to": [{"ipBlock": {"cidr": "172.18.0.2/32"}}], "ports": [{"protocol": "TCP", "port": 6443}]}
    assert not any(
        "ipBlock" in peer and peer["ipBlock"]["cidr"] == "0.0.0.0/0" for rule in egress for peer in rule["to"]
    )


def test_gateway_network_policy_opens_the_internet_on_allowed_ports_only(all_objects: list[dict[str, Any]]) -> None:
    policy = one(all_objects, "NetworkPolicy", FULLNAME)
    assert policy["metadata"]["namespace"] == NAMESPACE
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": GATEWAY_PODS}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    ports = [{"protocol": "TCP", "port": name} for name in ("proxy", "transparent-tls", "transparent-http")]
    assert spec["ingress"][0] == {"from": [{"namespaceSelector": {}}], "ports": ports}  # transparent mode is on
    dns, api_server, internet, allowed_ranges, collector = spec["egress"]
    assert dns == {"to": [DNS_PEER], "ports": DNS_PORTS}
    assert api_server == {"to": [{"ipBlock": {"cidr": "172.18.0.2/32"}}], "ports": [{"protocol": "TCP", "port": 6443}]}
    assert internet["ports"] == [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 80}]
    blocks = {peer["ipBlock"]["cidr"]: set(peer["ipBlock"]["except"]) for peer in internet["to"]}
    assert {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"} <= blocks["0.0.0.0/0"]
    assert {"fc00::/7", "fe80::/10"} <= blocks["::/0"]
    assert allowed_ranges == {"to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}]}  # config.allowedRanges, any port
    assert collector["ports"] == [{"protocol": "TCP", "port": 4318}]


def test_gateway_network_policy_admin_port_is_closed_to_pods_unless_scrapers_are_named(helm3: Helm) -> None:
    objects = helm3.objects(
        set_values=("networkPolicy.enabled=true", "networkPolicy.egress.apiServer.cidrs={172.18.0.2/32}")
    )
    ingress = one(objects, "NetworkPolicy", FULLNAME)["spec"]["ingress"]
    assert [rule["ports"] for rule in ingress] == [[{"protocol": "TCP", "port": "proxy"}]]


def test_gateway_network_policy_opens_the_api_server_only_where_the_gateway_calls_it(
    helm3: Helm, tmp_path: Path
) -> None:
    objects = helm3.objects(
        set_values=(
            "networkPolicy.enabled=true",
            "networkPolicy.egress.apiServer.cidrs={172.18.0.2/32,172.18.0.3/32}",
            "networkPolicy.egress.apiServer.ports={6443}",
        )
    )
    egress = one(objects, "NetworkPolicy", FULLNAME)["spec"]["egress"]
    assert egress[1] == {
        "to": [{"ipBlock": {"cidr": "172.18.0.2/32"}}, {"ipBlock": {"cidr": "172.18.0.3/32"}}],
        "ports": [{"protocol": "TCP", "port": 6443}],
    }
    values = tmp_path / "values.yaml"
    values.write_text(
        "networkPolicy: {enabled: true}\nconfig:\n  policySource: files\n  identity:\n    mode: [static]\n"
    )
    egress = one(helm3.objects(values), "NetworkPolicy", FULLNAME)["spec"]["egress"]
    dns, internet = egress  # no API server rule: file policies and static identity never call it
    assert dns["ports"] == DNS_PORTS
    assert {peer["ipBlock"]["cidr"] for peer in internet["to"]} == {"0.0.0.0/0", "::/0"}
