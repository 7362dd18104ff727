"""`lint`, `check` and `crd` exercised as subprocesses, the way users and CI pipelines call them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    env_python = sys.executable
    return subprocess.run(
        [env_python, "-m", "egress_gateway", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


def test_lint_accepts_the_example_policies() -> None:
    result = cli("lint", "policies")
    assert result.returncode == 0, result.stdout + result.stderr


def test_lint_reports_file_document_field_and_hint(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        (REPO / "policies" / "shop-payments.yaml").read_text()
        + "---\napiVersion: egressgateway.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: x, namespace: y}\n"
        "spec:\n  rules:\n    - name: a\n      hosts: [ok.example.com]\n    - name: b\n      hosts: [10.0.0.1]\n"
    )
    result = cli("lint", str(bad))
    assert result.returncode == 1
    assert f"{bad}: document 1: spec.rules[1].hosts[0]: '10.0.0.1' is an IP address" in result.stdout
    assert "cidrs" in result.stdout


def test_lint_json_output_and_usage_errors(tmp_path: Path) -> None:
    (tmp_path / "broken.yml").write_text("kind: [unclosed\n")
    result = cli("lint", "--output", "json", str(tmp_path))
    payload = json.loads(result.stdout)
    assert result.returncode == 1 and payload["valid"] is False
    assert "YAML syntax error: line" in payload["errors"][0]["message"]
    assert cli("lint", str(tmp_path / "missing")).returncode == 2
    assert cli("lint").returncode == 2


# `check` as the payments pod of namespace shop, with a public IP standing in for DNS.
CHECK_AS_PAYMENTS = (
    "check",
    "--policies",
    "policies",
    "--namespace",
    "shop",
    "--label",
    "app=payments",
    "--ip",
    "93.184.216.5",
)


def test_check_allow_exit_0_with_policy_rule_and_sentence() -> None:
    result = cli(
        *CHECK_AS_PAYMENTS,
        "api.stripe.com:443",
    )
    assert result.returncode == 0, result.stderr
    assert "decision: allow" in result.stdout and "rule:     stripe-api" in result.stdout
    assert "EgressPolicy/shop/payments" in result.stdout


def test_check_deny_exit_1_json() -> None:
    result = cli(
        *CHECK_AS_PAYMENTS,
        "--output",
        "json",
        "https://dashboard.stripe.com/login",
    )
    assert result.returncode == 1
    payload = json.loads(result.stdout)
    assert payload["decision"] == "deny" and payload["reason"] == "denied_by_rule"
    assert payload["rule"] == "no-stripe-dashboard" and payload["policy"]["name"] == "payments"


def test_check_ip_literal_metadata_and_unknown_client() -> None:
    metadata = cli("check", "--policies", "policies", "--namespace", "shop", "169.254.169.254:80")
    assert metadata.returncode == 1 and "blocked_address" in metadata.stdout
    unknown = cli("check", "--policies", "policies", "--ip", "93.184.216.5", "api.stripe.com:443")
    assert unknown.returncode == 1 and "unknown_client" in unknown.stdout


def test_check_sni_mismatch() -> None:
    result = cli(
        *CHECK_AS_PAYMENTS,
        "--sni",
        "evil.example",
        "api.stripe.com:443",
    )
    assert result.returncode == 1 and "sni_mismatch" in result.stdout


def test_check_usage_and_invalid_policies_exit_2(tmp_path: Path) -> None:
    assert cli("check", "--policies", "policies", "--namespace", "shop", "no-port.example.com").returncode == 2
    (tmp_path / "bad.yaml").write_text(
        "apiVersion: egressgateway.io/v1alpha1\nkind: EgressPolicy\nmetadata: {name: a}\nspec: {}\n"
    )
    result = cli("check", "--policies", str(tmp_path), "--namespace", "a", "x.example.com:443")
    assert result.returncode == 2 and "metadata.namespace" in result.stderr


@pytest.fixture(scope="module")
def crds() -> list[dict]:
    result = cli("crd")
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_crd_output_passes_kubernetes_validate(tmp_path: Path) -> None:
    out = tmp_path / "crds.yaml"
    out.write_text(cli("crd").stdout)
    validator = Path(sys.executable).with_name("kubernetes-validate")
    result = subprocess.run([str(validator), "--strict", str(out)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 2


def test_crds_have_status_subresource_short_names_and_columns(crds: list[dict]) -> None:
    by_kind = {c["spec"]["names"]["kind"]: c for c in crds}
    assert set(by_kind) == {"EgressPolicy", "ClusterEgressPolicy"}
    assert by_kind["EgressPolicy"]["spec"]["scope"] == "Namespaced"
    assert by_kind["ClusterEgressPolicy"]["spec"]["scope"] == "Cluster"
    assert by_kind["EgressPolicy"]["spec"]["names"]["shortNames"] == ["egp"]
    assert by_kind["ClusterEgressPolicy"]["spec"]["names"]["shortNames"] == ["cegp"]
    for crd in crds:
        version = crd["spec"]["versions"][0]
        assert version["subresources"] == {"status": {}}
        tiers = ["Tier", "Priority"] if crd["spec"]["names"]["kind"] == "ClusterEgressPolicy" else []
        assert [c["name"] for c in version["additionalPrinterColumns"]] == [*tiers, "Mode", "Rules", "Accepted", "Age"]
    assert (
        "namespaceSelector"
        in by_kind["ClusterEgressPolicy"]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "properties"
        ]
    )


def test_every_example_policy_validates_against_the_crd_schema(crds: list[dict]) -> None:
    schemas = {c["spec"]["names"]["kind"]: c["spec"]["versions"][0]["schema"]["openAPIV3Schema"] for c in crds}
    count = 0
    for path in sorted((REPO / "policies").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            jsonschema.validate(doc, schemas[doc["kind"]])
            count += 1
    assert count >= 4


def test_crd_schema_rejects_wrong_types(crds: list[dict]) -> None:
    schema = crds[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    bad = {
        "apiVersion": "egressgateway.io/v1alpha1",
        "kind": "EgressPolicy",
        "metadata": {},
        "spec": {"rules": [{"name": "r", "hosts": "not-a-list"}]},
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_crd_output_dir_writes_one_file_per_crd(tmp_path: Path) -> None:
    assert cli("crd", "--output-dir", str(tmp_path)).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "clusteregresspolicies.egressgateway.io.yaml",
        "egresspolicies.egressgateway.io.yaml",
    ]


def test_check_names_every_decider_per_tier_and_explains_the_walk() -> None:
    denied = cli(*CHECK_AS_PAYMENTS, "--explain", "pastebin.com:443")
    assert denied.returncode == 1
    assert "tier:     Admin" in denied.stdout
    assert "decider:  Admin: ClusterEgressPolicy/security-denies (version sha256:" in denied.stdout
    assert "rule deny-paste-sites -> Deny" in denied.stdout
    assert "tier walk:\n  Admin tier: decided: deny (denied_by_rule)" in denied.stdout
    unmatched = cli(*CHECK_AS_PAYMENTS, "--explain", "example.org:443")
    assert unmatched.returncode == 1 and "policy:" not in unmatched.stdout
    for name in ("EgressPolicy/shop/payments", "EgressPolicy/shop/break-glass-vendor-support"):
        assert f"decider:  Namespace: {name} (version sha256:" in unmatched.stdout
    walk = unmatched.stdout.split("tier walk:\n", 1)[1]
    assert walk.splitlines()[:2] == [
        "  Admin tier: nothing decided; on to the next tier",
        "    ClusterEgressPolicy/security-denies (version "
        + walk.split("security-denies (version ", 1)[1].split(")", 1)[0]
        + ") priority 10: no match - no rule matches example.org:443",
    ]
    assert "  Namespace tier: decided: deny (no_matching_rule)" in walk
    as_json = json.loads(cli(*CHECK_AS_PAYMENTS, "--explain", "--output", "json", "example.org:443").stdout)
    assert [d["verdict"] for d in as_json["deciders"]] == ["NoMatch", "NoMatch"]
    assert [t["tier"] for t in as_json["walk"]] == ["Admin", "Namespace"]


def test_check_explain_walks_to_baseline_and_default_action() -> None:
    mirror = cli(
        *CHECK_AS_PAYMENTS[:-4],
        "--namespace",
        "web",
        "--ip",
        "10.20.1.1",
        "--explain",
        "mirror.internal.example.com:443",
    )
    assert mirror.returncode == 0, mirror.stdout + mirror.stderr
    assert "Baseline tier: decided: allow (allowed_by_rule)" in mirror.stdout
    other = cli(
        "check", "--policies", "policies", "--namespace", "web", "--ip", "93.184.216.5", "--explain", "example.org:443"
    )
    assert other.returncode == 1
    assert "Namespace tier: no policy of this tier selects the client" in other.stdout
    assert "default_action: deny (no_policy)" in other.stdout
