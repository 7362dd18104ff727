"""`egress-gateway check` explains near misses in sentences, on real policy files, as a subprocess."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.policy.test_cli import cli

POLICIES = """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: payments, namespace: shop}
spec:
  podSelector: {matchLabels: {app: payments}}
  rules:
    - {name: stripe-api, hosts: [api.stripe.com], ports: [443]}
    - {name: migration, hosts: [old.example.com], expires: "2020-01-01T00:00:00Z"}
    - {name: aws, hosts: ["*.amazonaws.com"], ports: [443]}
---
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  rules:
    - {name: cdn, hosts: [cdn.example.com], ports: [443]}
---
apiVersion: egressgateway.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: prod-telemetry}
spec:
  namespaceSelector: {matchLabels: {env: prod}}
  rules:
    - {name: telemetry, hosts: [telemetry.example.com], ports: [443]}
"""


@pytest.fixture(scope="module")
def policies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("check") / "policies.yaml"
    path.write_text(POLICIES)
    return path


def check(policies: Path, target: str, *labels: str) -> tuple[int, str]:
    args = ["--label", "app=payments"] if not labels else [a for label in labels for a in ("--label", label)]
    result = cli("check", "--policies", str(policies), "--namespace", "shop", *args, "--ip", "93.184.216.5", target)
    return result.returncode, result.stdout


def test_host_matched_but_not_the_port(policies: Path) -> None:
    code, out = check(policies, "api.stripe.com:80")
    assert code == 1 and "reason:   no_matching_rule" in out
    assert "Allow rule `stripe-api` of EgressPolicy/shop/payments matches the host on port 443 only" in out


def test_rule_expired_at(policies: Path) -> None:
    code, out = check(policies, "old.example.com:443")
    assert code == 1
    assert (
        "Allow rule `migration` of EgressPolicy/shop/payments matches old.example.com:443 but expired at "
        "2020-01-01T00:00:00Z"
    ) in out


def test_selector_did_not_match_because_of_a_label(policies: Path) -> None:
    code, out = check(policies, "api.stripe.com:443", "app=web")
    assert code == 1
    assert "its policy does not select this client: the pod has app=web, the selector wants app=payments" in out
    code, out = check(policies, "telemetry.example.com:443")
    assert code == 1
    assert "the namespace has no label env, the selector wants env=prod" in out


def test_one_label_wildcard_near_miss(policies: Path) -> None:
    _, out = check(policies, "s3.us-east-1.amazonaws.com:443")
    assert "has `*.amazonaws.com`, which does not match s3.us-east-1.amazonaws.com: `*` is exactly one label" in out


def test_no_matching_rule_names_the_selecting_policies_not_an_unrelated_one(policies: Path) -> None:
    _, out = check(policies, "unlisted.example.com:443", "app=web")
    assert "decider:  Namespace: EgressPolicy/shop/web (version sha256:" in out
    assert "policy:" not in out and "payments" not in out
    result = cli(
        "check", "--policies", str(policies), "--namespace", "shop", "--label", "app=web", "--output", "json",
        "--ip", "93.184.216.5", "api.stripe.com:80",
    )  # fmt: skip
    payload = json.loads(result.stdout)
    assert [d["policy"]["name"] for d in payload["deciders"]] == ["web"]
    assert [m["rule"] for m in payload["near_misses"]] == ["stripe-api"]
    assert payload["near_misses"][0]["policy"]["name"] == "payments"
    assert [m["sentence"] for m in payload["near_misses"]] == [
        "Allow rule `stripe-api` of EgressPolicy/shop/payments matches the host on port 443 only, and its policy "
        "does not select this client: the pod has app=web, the selector wants app=payments"
    ]


def test_an_allowed_connection_has_no_near_misses(policies: Path) -> None:
    code, out = check(policies, "api.stripe.com:443")
    assert code == 0 and "near misses" not in out


def test_a_deny_decided_before_the_rules_has_no_near_misses(policies: Path) -> None:
    result = cli(
        "check", "--policies", str(policies), "--namespace", "shop", "--label", "app=payments",
        "--ip", "169.254.169.254", "api.stripe.com:80",
    )  # fmt: skip
    assert result.returncode == 1 and "reason:   blocked_address" in result.stdout
    assert "near misses" not in result.stdout
