"""`audit --suggest-policy` output a security engineer can merge: never a denied or unreachable destination, existing
rule names kept, one policy per workload selector, and --collapse that says what it newly admits. Real trail (real
engine, real recorder), real CLI."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from types import MappingProxyType

import pytest
import yaml

from egress_gateway.audit import build_recorder
from egress_gateway.cli import main
from egress_gateway.policy.decision import Facts, Identity
from egress_gateway.policy.engine import Engine, EngineConfig
from egress_gateway.policy.store import PolicyStore
from egress_gateway.policy.validation import validate_object
from egress_gateway.settings import AuditSettings, Settings
from egress_gateway.sources.files import load_into_store
from tests.audit.conftest import write_policies

NOTEBOOK = Identity(
    namespace="analytics",
    pod="notebook-0",
    labels=MappingProxyType({"app": "notebook"}),
    namespace_labels=MappingProxyType({"kubernetes.io/metadata.name": "analytics"}),
)
# In force while the trail was recorded (default Allow): an Audit-mode preview that denies pastebin.com.
PREVIEW = """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: onboarding, namespace: analytics}
spec:
  mode: Audit
  rules:
    - {name: google-apis, hosts: ["*.googleapis.com"], ports: [443]}
    - {name: no-paste, action: Deny, hosts: [pastebin.com]}
"""
# In force now: a cluster-wide Deny added after the trail was recorded, and a rule for the warehouse on 443 only.
CLUSTER_DENY = """\
apiVersion: egressgateway.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: no-file-sharing}
spec:
  rules:
    - {name: file-sharing, action: Deny, hosts: ["**.files.example.net"]}
    - {name: everything-else, hosts: ["**.example.com", "**.example.org", "**.amazonaws.com"]}
"""
WAREHOUSE = """\
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: warehouse, namespace: analytics}
spec:
  podSelector: {matchLabels: {app: notebook}}
  rules:
    - {name: warehouse, hosts: [warehouse.example.com], ports: [443]}
"""
FLOWS: list[tuple[str, int, str]] = [
    ("storage.googleapis.com", 443, "93.184.216.40"),
    ("pastebin.com", 443, "93.184.216.50"),  # an Audit-mode Deny rule denies it
    ("share.files.example.net", 443, "93.184.216.51"),  # the cluster Deny added since denies it
    ("metadata.example.org", 80, "93.184.216.52"),  # allowed once ...
    ("metadata.example.org", 80, "169.254.169.254"),  # ... then resolved to a blocked address
    ("warehouse.example.com", 5432, "93.184.216.53"),  # an in-force rule covers the host on 443 only
    ("logs-a.s3.amazonaws.com", 443, "93.184.216.54"),
    ("logs-b.s3.amazonaws.com", 443, "93.184.216.55"),
]


@pytest.fixture(scope="module")
def trail(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("suggest")
    store = PolicyStore()
    assert load_into_store([write_policies(root / "recorded", PREVIEW)], store) == []
    engine = Engine(EngineConfig(default_allow=True), store.current)
    path = root / "audit.jsonl"
    recorder = build_recorder(Settings(audit=AuditSettings(file=path)))
    for index, (host, port, ip) in enumerate(FLOWS):
        facts = Facts(NOTEBOOK, host, port, destination_ip=ipaddress.ip_address(ip))
        record = recorder.open("CONNECT", "127.0.0.2", 41000 + index)
        record.decided(facts, engine.decide(facts))
        record.close()
    recorder.shutdown()
    write_policies(root / "in-force", CLUSTER_DENY, WAREHOUSE)
    return path


def suggest(capsys: pytest.CaptureFixture[str], trail: Path, *args: str) -> tuple[int, str, str]:
    code = main(["audit", str(trail), "--suggest-policy", "analytics", *args])
    out, err = capsys.readouterr()
    return code, out, err


def hosts(out: str) -> set[str]:
    return {h for p in yaml.safe_load_all(out) if p for r in p["spec"]["rules"] for h in r.get("hosts", ())}


def test_never_suggests_what_a_deny_rule_denies_or_a_blocked_address(
    trail: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = suggest(capsys, trail)
    assert code == 0
    assert "pastebin.com" not in hosts(out) and "metadata.example.org" not in hosts(out)
    assert (
        "# not included: pastebin.com:443: denied by Deny rule 'no-paste' of EgressPolicy/analytics/onboarding" in out
    )
    assert (
        "# not included: metadata.example.org:80: the trail saw it resolve to a refused address (blocked_address)"
        in out
    )


def test_never_suggests_what_the_policies_in_force_deny(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, without, _ = suggest(capsys, trail)
    assert "share.files.example.net" in hosts(without)  # the trail alone cannot know about the new cluster Deny
    code, out, _ = suggest(capsys, trail, "--policies", str(trail.parent / "in-force"))
    assert code == 0
    assert "share.files.example.net" not in hosts(out)
    assert (
        "# not included: share.files.example.net:443: share.files.example.net:443 is denied by rule 'file-sharing'"
        in out
    )
    for policy in yaml.safe_load_all(out):
        if policy:
            validate_object(policy)


def test_keeps_the_name_of_the_rule_a_suggestion_extends(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = suggest(capsys, trail, "--policies", str(trail.parent / "in-force"))
    (policy,) = [p for p in yaml.safe_load_all(out) if p]
    rules = {r["name"]: r for r in policy["spec"]["rules"]}
    assert rules["warehouse"] == {"name": "warehouse", "hosts": ["warehouse.example.com"], "ports": [5432]}
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app": "notebook"}}


def test_collapse_warns_what_the_wildcard_newly_admits(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, plain, plain_err = suggest(capsys, trail)
    assert "*.s3.amazonaws.com" not in plain and "warning" not in plain_err
    code, out, err = suggest(capsys, trail, "--collapse")
    assert code == 0
    assert "*.s3.amazonaws.com" in hosts(out)
    warning = (
        "--collapse wrote `*.s3.amazonaws.com` for logs-a.s3.amazonaws.com, logs-b.s3.amazonaws.com; it newly admits "
        "every other name one label under s3.amazonaws.com (s3.amazonaws.com is a public suffix"
    )
    assert f"audit: warning: {warning}" in err
    assert f"# WARNING: {warning}" in out


BASELINE_DENY = """\
apiVersion: egressgateway.io/v1alpha2
kind: ClusterEgressPolicy
metadata: {name: baseline}
spec:
  tier: Baseline
  rules:
    - {name: no-warehouse, action: Deny, hosts: [warehouse.example.com]}
"""


def test_never_suggests_what_a_baseline_tier_denies(trail: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The namespace's own policy selects the pod (so the engine stops at the namespace tier with no_matching_rule);
    a suggestion would override the Baseline Deny, so it is left out."""
    policies = write_policies(trail.parent / "baseline", BASELINE_DENY, WAREHOUSE)
    code, out, _ = suggest(capsys, trail, "--policies", str(policies))
    assert code == 0
    assert "warehouse.example.com" not in hosts(out)
    assert "# not included: warehouse.example.com:5432: " in out and "rule 'no-warehouse'" in out
