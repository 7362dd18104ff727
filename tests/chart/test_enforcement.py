"""The cluster-scoped enforcement policy against the upstream network-policy-api CRD schemas, and the rendered
rules of every enforcement mode evaluated for concrete destinations: what an enforced pod can reach (DNS, the
gateway, each enforcement.extraEgress exception) and what it cannot (the internet, other pods).

The upstream CRDs are vendored unmodified in fixtures/network-policy-api/ (see its README for tags and commits).
Their structural schemas are converted to JSON Schema the way the API server reads them with
fieldValidation=Strict: unknown fields are errors, `x-kubernetes-list-type: set` items are unique, and the CEL
rules (`x-kubernetes-validations`) the CRDs use are evaluated; an unknown CEL rule fails the test."""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.chart.conftest import ALL_FEATURES, NAMESPACE, RELEASE, Helm, HelmError, find, one

FIXTURES = Path(__file__).parent / "fixtures" / "network-policy-api"
CRDS = {
    "ClusterNetworkPolicy": FIXTURES / "v0.2.0-policy.networking.k8s.io_clusternetworkpolicies.yaml",
    "AdminNetworkPolicy": FIXTURES / "v0.1.7-policy.networking.k8s.io_adminnetworkpolicies.yaml",
}
API_VERSIONS = {
    "ClusterNetworkPolicy": "policy.networking.k8s.io/v1alpha2",
    "AdminNetworkPolicy": "policy.networking.k8s.io/v1alpha1",
}
FULLNAME = f"{RELEASE}-egress-gateway"
GATEWAY_POD = (
    {"kubernetes.io/metadata.name": NAMESPACE},
    {"app.kubernetes.io/name": "egress-gateway", "app.kubernetes.io/instance": RELEASE},
)
DNS_POD = ({"kubernetes.io/metadata.name": "kube-system"}, {"k8s-app": "kube-dns"})
OTHER_POD = ({"kubernetes.io/metadata.name": "billing"}, {"app": "ledger"})
COLLECTOR_POD = ({"kubernetes.io/metadata.name": "observability"}, {"app": "otel-collector"})

# The exceptions a platform team needs: the API server, NodeLocal DNSCache, a collector by selectors, a port range.
EXTRA_EGRESS = """
enforcement:
  extraEgress:
    - to: [{ipBlock: {cidr: 172.18.0.2/32}}]
      ports: [{protocol: TCP, port: 6443}]
    - to: [{ipBlock: {cidr: 169.254.20.10/32}}]
      ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]
    - to:
        - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: observability}}
          podSelector: {matchLabels: {app: otel-collector}}
      ports: [{protocol: TCP, port: 4317, endPort: 4318}]
"""
SELECTOR = "enforcement:\n  namespaceSelector: {matchLabels: {egress.example.com/enforce: 'true'}}\n"
MODES = {
    "namespaces": "enforcement:\n  namespaces: [shop]\n",
    "cluster-network-policy": SELECTOR,
    "admin-network-policy": SELECTOR + "  clusterPolicyKind: AdminNetworkPolicy\n",
}


# ---- upstream schema ----------------------------------------------------------------------------------------------

_CEL: dict[str, Callable[[Any], bool]] = {
    "self.start < self.end": lambda value: value["start"] < value["end"],
    "isCIDR(self)": lambda value: _is_cidr(value),
}


def _is_cidr(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError:
        return False
    return "/" in value


def _structural_to_json_schema(node: Any) -> Any:
    """A CRD's structural schema as Draft 7 JSON Schema, strict about unknown fields."""
    if isinstance(node, list):
        return [_structural_to_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _structural_to_json_schema(value) for key, value in node.items()}
    if out.get("type") == "object" and "properties" in out and not node.get("x-kubernetes-preserve-unknown-fields"):
        out.setdefault("additionalProperties", False)
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    return out


def _cel(validator: Any, rules: list[dict[str, str]], instance: Any, _schema: Any) -> Any:
    for rule in rules:
        check = _CEL.get(rule["rule"])
        if check is None:
            yield jsonschema.ValidationError(f"CEL rule {rule['rule']!r} has no evaluator in this test; add one")
        elif not check(instance):
            yield jsonschema.ValidationError(rule.get("message", rule["rule"]))


_Validator = jsonschema.validators.extend(jsonschema.Draft7Validator, {"x-kubernetes-validations": _cel})


def _schema(kind: str) -> Any:
    crd = yaml.safe_load(CRDS[kind].read_text())
    assert crd["spec"]["names"]["kind"] == kind
    group, version = API_VERSIONS[kind].split("/")
    assert crd["spec"]["group"] == group
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = _structural_to_json_schema(copy.deepcopy(served["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}  # the API server validates metadata itself
    return schema


def _validate(obj: dict[str, Any]) -> None:
    _Validator(_schema(obj["kind"])).validate(obj)


def _values(tmp_path: Path, *documents: str) -> list[Path]:
    paths = []
    for index, text in enumerate(documents):
        path = tmp_path / f"values-{index}.yaml"
        path.write_text(text)
        paths.append(path)
    return paths


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_rendered_cluster_policy_validates_against_the_upstream_crd(helm3: Helm, tmp_path: Path, kind: str) -> None:
    objects = helm3.objects(ALL_FEATURES, *_values(tmp_path, f"enforcement:\n  clusterPolicyKind: {kind}\n"))
    (policy,) = find(objects, kind)
    assert policy["apiVersion"] == API_VERSIONS[kind]
    _validate(policy)


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_every_mode_and_exception_validates(helm3: Helm, tmp_path: Path, kind: str) -> None:
    values = _values(
        tmp_path,
        MODES["admin-network-policy" if kind == "AdminNetworkPolicy" else "cluster-network-policy"],
        EXTRA_EGRESS + "  allowClusterPods: true\n",
    )
    _validate(one(helm3.objects(*values), kind))


def test_the_schema_check_really_rejects(helm3: Helm, tmp_path: Path) -> None:
    policy = one(helm3.objects(*_values(tmp_path, MODES["cluster-network-policy"])), "ClusterNetworkPolicy")
    for mutate, message in [
        (lambda spec: spec.update(tier="Platform"), "'Platform' is not one of"),
        (lambda spec: spec["egress"][0].update(action="Allow"), "'Allow' is not one of"),  # the v1alpha1 verb
        (lambda spec: spec["egress"][0].update(ports=[]), "Additional properties"),  # v1alpha1's field name
        (lambda spec: spec["egress"][-1]["to"][1].update(networks=["10.0.0.1/8"]), "Invalid CIDR"),
        (lambda spec: spec.pop("tier"), "'tier' is a required property"),
    ]:
        bad = copy.deepcopy(policy)
        mutate(bad["spec"])
        with pytest.raises(jsonschema.ValidationError, match=message):
            _validate(bad)


# ---- the rules, evaluated ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Destination:
    """Where an enforced pod (in namespace "shop") connects: an address, or a pod by its namespace and labels."""

    protocol: str
    port: int
    address: str | None = None
    pod: tuple[dict[str, str], dict[str, str]] | None = None


@dataclass
class Verdicts:
    allowed: list[Destination] = field(default_factory=list)
    denied: list[Destination] = field(default_factory=list)


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        present, values = expression["key"] in labels, expression.get("values", [])
        if not {
            "In": present and labels.get(expression["key"]) in values,
            "NotIn": not present or labels.get(expression["key"]) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[expression["operator"]]:
            return False
    return True


def _in_cidr(address: str | None, cidr: str, excepted: list[str] = ()) -> bool:  # type: ignore[assignment]
    if address is None:
        return False
    ip = ipaddress.ip_address(address)
    network = ipaddress.ip_network(cidr)
    return ip.version == network.version and ip in network and not any(ip in ipaddress.ip_network(e) for e in excepted)


def _network_policy_allows(policy: dict[str, Any], to: Destination) -> bool:
    def peer_matches(peer: dict[str, Any]) -> bool:
        if "ipBlock" in peer:
            return _in_cidr(to.address, peer["ipBlock"]["cidr"], peer["ipBlock"].get("except", []))
        if to.pod is None:
            return False
        namespace_labels, pod_labels = to.pod
        if "namespaceSelector" not in peer:  # podSelector alone: the policy's own namespace
            return namespace_labels.get("kubernetes.io/metadata.name") == policy["metadata"]["namespace"] and (
                _selects(peer["podSelector"], pod_labels)
            )
        return _selects(peer["namespaceSelector"], namespace_labels) and _selects(
            peer.get("podSelector", {}), pod_labels
        )

    def port_matches(port: dict[str, Any]) -> bool:
        if port.get("protocol", "TCP") != to.protocol:
            return False
        if "port" not in port:
            return True
        return port["port"] <= to.port <= port.get("endPort", port["port"])

    return any(
        (not rule.get("to") or any(peer_matches(p) for p in rule["to"]))
        and (not rule.get("ports") or any(port_matches(p) for p in rule["ports"]))
        for rule in policy["spec"]["egress"]
    )


def _cluster_policy_action(policy: dict[str, Any], to: Destination) -> str:
    """The first matching rule's action (rules are ordered); no match = no opinion ("Pass")."""

    def peer_matches(peer: dict[str, Any]) -> bool:
        if "networks" in peer:
            return any(_in_cidr(to.address, cidr) for cidr in peer["networks"])
        if to.pod is None:
            return False
        namespace_labels, pod_labels = to.pod
        if "namespaces" in peer:
            return _selects(peer["namespaces"], namespace_labels)
        pods = peer["pods"]
        return _selects(pods.get("namespaceSelector", {}), namespace_labels) and _selects(
            pods["podSelector"], pod_labels
        )

    def port_matches(entry: dict[str, Any]) -> bool:
        if "portNumber" in entry:  # v1alpha1
            number = entry["portNumber"]
            return number.get("protocol", "TCP") == to.protocol and number["port"] == to.port
        if "portRange" in entry:
            ports = entry["portRange"]
            return ports.get("protocol", "TCP") == to.protocol and ports["start"] <= to.port <= ports["end"]
        ((protocol, spec),) = entry.items()  # v1alpha2: {tcp: {destinationPort: {number | range}}}
        if protocol.upper() != to.protocol:
            return False
        port = spec["destinationPort"]
        if "number" in port:
            return port["number"] == to.port
        return port["range"]["start"] <= to.port <= port["range"]["end"]

    for rule in policy["spec"]["egress"]:
        ports = rule.get("protocols", rule.get("ports"))
        if any(peer_matches(p) for p in rule["to"]) and (not ports or any(port_matches(p) for p in ports)):
            return str(rule["action"])
    return "Pass"


SHOP = {"kubernetes.io/metadata.name": "shop", "egress.example.com/enforce": "true"}
EXPECTED = {
    "dns": (Destination("UDP", 53, pod=DNS_POD), True),
    "dns-tcp": (Destination("TCP", 53, pod=DNS_POD), True),
    "gateway": (Destination("TCP", 3128, pod=GATEWAY_POD), True),
    "api-server": (Destination("TCP", 6443, address="172.18.0.2"), True),
    "nodelocal-dns": (Destination("UDP", 53, address="169.254.20.10"), True),
    "collector-grpc": (Destination("TCP", 4317, pod=COLLECTOR_POD), True),
    "collector-http": (Destination("TCP", 4318, pod=COLLECTOR_POD), True),
    "api-server-other-port": (Destination("TCP", 22, address="172.18.0.2"), False),
    "gateway-admin-port": (Destination("TCP", 9901, pod=GATEWAY_POD), False),
    "collector-other-port": (Destination("TCP", 4319, pod=COLLECTOR_POD), False),
    "internet": (Destination("TCP", 443, address="93.184.215.14"), False),
    "internet-v6": (Destination("TCP", 443, address="2606:2800:21f:cb07:6820:80da:af6b:8b2c"), False),
    "metadata": (Destination("TCP", 80, address="169.254.169.254"), False),
    "other-pod": (Destination("TCP", 8080, pod=OTHER_POD), False),
}


def _enforced_verdict(objects: list[dict[str, Any]], to: Destination) -> bool:
    """Whether a pod in the enforced namespace "shop" may open this connection, under whichever policies rendered."""
    cluster = [o for o in objects if o["kind"] in CRDS]
    if cluster:
        (policy,) = cluster
        assert _selects(policy["spec"]["subject"]["namespaces"], SHOP)
        action = _cluster_policy_action(policy, to)
        assert action != "Pass", "the cluster policy must decide every connection of an enforced pod"
        return action in ("Accept", "Allow")
    (policy,) = [
        o for o in find(objects, "NetworkPolicy", f"{FULLNAME}-enforce") if o["metadata"]["namespace"] == "shop"
    ]
    return _network_policy_allows(policy, to)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_exceptions_apply_in_every_mode_and_nothing_else_gets_out(helm3: Helm, tmp_path: Path, mode: str) -> None:
    objects = helm3.objects(*_values(tmp_path, MODES[mode], EXTRA_EGRESS))
    wrong = [name for name, (to, allowed) in EXPECTED.items() if _enforced_verdict(objects, to) != allowed]
    assert not wrong, f"{mode}: wrong verdict for {wrong}"


@pytest.mark.parametrize("mode", sorted(MODES))
def test_without_exceptions_only_dns_and_the_gateway_are_reachable(helm3: Helm, tmp_path: Path, mode: str) -> None:
    objects = helm3.objects(*_values(tmp_path, MODES[mode]))
    reachable = sorted(name for name, (to, _) in EXPECTED.items() if _enforced_verdict(objects, to))
    assert reachable == ["dns", "dns-tcp", "gateway"]


@pytest.mark.parametrize("mode", ["cluster-network-policy", "admin-network-policy"])
def test_allow_cluster_pods_passes_pod_traffic_to_namespace_policies(helm3: Helm, tmp_path: Path, mode: str) -> None:
    objects = helm3.objects(*_values(tmp_path, MODES[mode], "enforcement:\n  allowClusterPods: true\n"))
    (policy,) = [o for o in objects if o["kind"] in CRDS]
    assert _cluster_policy_action(policy, EXPECTED["other-pod"][0]) == "Pass"
    assert _cluster_policy_action(policy, EXPECTED["internet"][0]) == "Deny"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("[{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]}]", r"extraEgress\[0\]: ipBlock.except"),
        ("[{to: [{podSelector: {matchLabels: {app: x}}}]}]", r"extraEgress\[0\]: a podSelector without"),
    ],
)
def test_what_a_cluster_policy_cannot_say_fails_the_render(
    helm3: Helm, tmp_path: Path, extra: str, message: str
) -> None:
    values = _values(tmp_path, MODES["cluster-network-policy"], f"enforcement:\n  extraEgress: {extra}\n")
    with pytest.raises(HelmError, match=message):
        helm3.objects(*values)
    # The per-namespace NetworkPolicy says both, so that mode renders them as they are.
    helm3.objects(*_values(tmp_path, MODES["namespaces"], f"enforcement:\n  extraEgress: {extra}\n"))


def test_cluster_network_policy_shape(helm3: Helm, tmp_path: Path) -> None:
    values = _values(
        tmp_path,
        "enforcement:\n  namespaceSelector:\n    matchLabels: {egress.example.com/enforce: 'true'}\n"
        "    matchExpressions: [{key: tier, operator: NotIn, values: [system]}]\n  priority: 40\n",
    )
    objects = helm3.objects(*values)
    assert not find(objects, "AdminNetworkPolicy")
    policy = one(objects, "ClusterNetworkPolicy")
    assert "namespace" not in policy["metadata"]
    spec = policy["spec"]
    assert spec["tier"] == "Admin" and spec["priority"] == 40
    assert spec["subject"]["namespaces"]["matchExpressions"][-1] == {
        "key": "kubernetes.io/metadata.name",
        "operator": "NotIn",
        "values": [NAMESPACE],  # the gateway's own namespace is never enforced
    }
    assert [rule["name"] for rule in spec["egress"]] == ["allow-dns", "allow-egress-gateway", "deny-all-other-egress"]
    assert spec["egress"][1]["protocols"] == [{"tcp": {"destinationPort": {"number": 3128}}}]
