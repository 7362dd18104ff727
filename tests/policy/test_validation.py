"""Validation errors: every invalid form is rejected with its field path and a hint, nothing is half-loaded."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from egress_gateway.policy.errors import PolicyValidationError
from egress_gateway.policy.validation import validate_object


def policy(rule: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    rules = [rule] if rule is not None else [{"name": "r", "hosts": ["a.example.com"]}]
    return {
        "apiVersion": "egressgateway.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"rules": rules, **spec},
    }


def errors_of(data: Any) -> list[tuple[str, str]]:
    with pytest.raises(PolicyValidationError) as caught:
        validate_object(data)
    return [(e.field, e.message) for e in caught.value.errors]


def assert_error(data: Any, field: str, fragment: str) -> None:
    found = errors_of(data)
    assert any(f == field and fragment in m for f, m in found), found


@pytest.mark.parametrize(
    ("host", "fragment"),
    [
        ("api-*.example.com", "partial-label wildcard"),
        ("*", "every name"),
        ("**", "every name"),
        ("example.*", "last label"),
        ("a..example.com", "empty label"),
        ("x" * 64 + ".example.com", "longer than 63"),
        (".".join(["abcdefghi"] * 26) + ".com", "longer than 253"),
        ("192.0.2.1", "cidrs"),
        ("a.**.example.com", "leftmost"),
    ],
)
def test_invalid_host_forms_report_the_index(host: str, fragment: str) -> None:
    assert_error(policy({"name": "r", "hosts": ["ok.example.com", host]}), "spec.rules[0].hosts[1]", fragment)


def test_bad_cidr_and_host_bits() -> None:
    assert_error(policy({"name": "r", "cidrs": ["nope"]}), "spec.rules[0].cidrs[0]", "not a CIDR")
    assert_error(policy({"name": "r", "cidrs": ["10.1.2.3/8"]}), "spec.rules[0].cidrs[0]", "did you mean '10.0.0.0/8'")


def test_except_must_lie_inside_cidrs() -> None:
    data = policy({"name": "r", "cidrs": ["203.0.113.0/24"], "except": ["203.0.113.7/32", "198.51.100.1/32"]})
    assert_error(data, "spec.rules[0].except[1]", "not inside any of the rule's cidrs")


@pytest.mark.parametrize(
    ("port", "fragment"),
    [(0, "outside"), (70000, "outside"), ("90-80", "empty range"), ("x", "not a port"), (True, "a port is")],
)
def test_bad_ports(port: Any, fragment: str) -> None:
    assert_error(
        policy({"name": "r", "hosts": ["a.example.com"], "ports": [443, port]}),
        "spec.rules[0].ports[1]",
        fragment,
    )


def test_rule_names_are_required_unique_and_dns_labels() -> None:
    assert_error(policy({"hosts": ["a.example.com"]}), "spec.rules[0].name", "required")
    assert_error(policy({"name": "Bad_Name", "hosts": ["a.example.com"]}), "spec.rules[0].name", "pattern")
    assert_error(policy({"name": "x" * 64, "hosts": ["a.example.com"]}), "spec.rules[0].name", "at most 63")
    twice = policy()
    twice["spec"]["rules"] = [
        {"name": "r", "hosts": ["a.example.com"]},
        {"name": "r", "hosts": ["b.example.com"]},
    ]
    assert_error(twice, "spec.rules[1].name", "duplicate rule name")


def test_rule_without_hosts_or_cidrs_matches_nothing() -> None:
    assert_error(policy({"name": "r", "ports": [443]}), "spec.rules[0]", "needs `hosts` or `cidrs`")


def test_unknown_fields_and_enums_are_rejected() -> None:
    assert_error(
        policy({"name": "r", "hosts": ["a.example.com"], "hostz": []}), "spec.rules[0].hostz", "unknown field `hostz`"
    )
    assert_error(policy({"name": "r", "hosts": ["a.example.com"], "action": "Permit"}), "spec.rules[0].action", "Allow")
    assert_error(policy(mode="Dry"), "spec.mode", "Enforce")


def test_expires_needs_a_timezone() -> None:
    assert_error(
        policy({"name": "r", "hosts": ["a.example.com"], "expires": "2026-12-31T00:00:00"}),
        "spec.rules[0].expires",
        "time zone",
    )


def test_selector_operators_and_values() -> None:
    bad = policy(
        podSelector={
            "matchExpressions": [
                {"key": "app", "operator": "In"},
                {"key": "x", "operator": "Exists", "values": ["y"]},
            ]
        }
    )
    found = errors_of(bad)
    assert ("spec.podSelector.matchExpressions[0].values", "operator In needs values") in found
    assert ("spec.podSelector.matchExpressions[1].values", "operator Exists takes no values") in found


def test_kind_api_version_and_scope() -> None:
    assert_error({**policy(), "apiVersion": "v1"}, "apiVersion", "egressgateway.io/v1alpha1")
    assert_error({**policy(), "kind": "NetworkPolicy"}, "kind", "expected one of")
    no_ns = policy()
    no_ns["metadata"] = {"name": "p"}
    assert_error(no_ns, "metadata.namespace", "needs a namespace")
    cluster = {**policy(), "kind": "ClusterEgressPolicy"}
    assert_error(cluster, "metadata.namespace", "cluster-scoped")


def test_not_a_mapping() -> None:
    assert errors_of(["a"])[0][1].startswith("expected a mapping")


def test_every_example_policy_is_valid() -> None:
    from pathlib import Path

    for path in sorted(Path("policies").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            validate_object(doc)


def test_protocols_are_checked_with_their_field_path() -> None:
    ok = validate_object(policy({"name": "r", "hosts": ["a.example.com"], "protocols": ["TLS", "TCP"]}))
    assert [str(p) for p in ok.spec.rules[0].protocols or []] == ["TLS", "TCP"]
    unknown = policy({"name": "r", "hosts": ["a.example.com"], "protocols": ["UDP"]})
    assert_error(unknown, "spec.rules[0].protocols[0]", "")
    assert_error(policy({"name": "r", "hosts": ["a.example.com"], "protocols": []}), "spec.rules[0].protocols", "empty")
    assert_error(
        policy({"name": "r", "hosts": ["a.example.com"], "protocols": ["TLS", "TLS"]}),
        "spec.rules[0].protocols[1]",
        "duplicate",
    )
    assert_error(
        policy({"name": "r", "action": "Deny", "hosts": ["a.example.com"], "protocols": ["TCP"]}),
        "spec.rules[0].protocols",
        "Deny rule denies every protocol",
    )

def test_v1alpha1_and_v1alpha2_both_validate_and_convert_to_v1alpha2() -> None:
    from egress_gateway.policy.model import Tier

    for version in ("egressgateway.io/v1alpha1", "egressgateway.io/v1alpha2"):
        assert validate_object({**policy(), "apiVersion": version}).api_version == "egressgateway.io/v1alpha2"
    cluster = {"kind": "ClusterEgressPolicy", "metadata": {"name": "c"}, "spec": {"rules": []}}
    old = validate_object({**cluster, "apiVersion": "egressgateway.io/v1alpha1"})
    new = validate_object({**cluster, "apiVersion": "egressgateway.io/v1alpha2"})
    assert (old.spec.tier, new.spec.tier) == (Tier.NAMESPACE, Tier.ADMIN)  # type: ignore[union-attr]


def test_v1alpha1_has_no_priority_pass_or_other_tiers() -> None:
    base = {"apiVersion": "egressgateway.io/v1alpha1", "kind": "ClusterEgressPolicy", "metadata": {"name": "c"}}
    assert_error({**base, "spec": {"priority": 5}}, "spec.priority", "")
    assert_error({**base, "spec": {"tier": "Admin"}}, "spec.tier", "")
    rule = {"name": "r", "action": "Pass", "hosts": ["a.example.com"]}
    assert_error({**base, "spec": {"rules": [rule]}}, "spec.rules[0].action", "Pass")


def test_pass_is_for_admin_and_baseline_cluster_policies_only() -> None:
    rule = {"name": "r", "action": "Pass", "hosts": ["a.example.com"]}
    assert_error({**policy(), "spec": {"rules": [rule]}}, "spec.rules[0].action", "ClusterEgressPolicy")
    cluster = {"apiVersion": "egressgateway.io/v1alpha2", "kind": "ClusterEgressPolicy", "metadata": {"name": "c"}}
    assert_error({**cluster, "spec": {"tier": "Namespace", "rules": [rule]}}, "spec.rules[0].action", "Pass")
    validate_object({**cluster, "spec": {"tier": "Baseline", "rules": [rule]}})
    assert_error({**cluster, "spec": {"priority": 1001}}, "spec.priority", "1000")
