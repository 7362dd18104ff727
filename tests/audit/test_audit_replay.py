"""Replay and suggest use the policy engine's verdict, even when a connection then failed around the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from egress_gateway.audit import build_recorder
from egress_gateway.policy.decision import Reason, adapter_denial
from egress_gateway.policy.engine import Engine, EngineConfig
from egress_gateway.policy.store import PolicyStore
from egress_gateway.settings import AuditSettings, Settings
from egress_gateway.sources.files import load_into_store
from egress_gateway.trail.read import read_records
from egress_gateway.trail.replay import facts_from_record, replay
from tests.audit.conftest import PAYMENTS, SHOP_PAYMENTS_POLICY, facts, write_policies


def _engine(policies: Path) -> Engine:
    store = PolicyStore()
    assert load_into_store([policies], store) == []
    return Engine(EngineConfig(), store.current)


@pytest.fixture
def trail(tmp_path: Path) -> Path:
    """Three payments connections: one refused upstream after the engine allowed it, one revoked later, and one
    the resolver failed before the engine spoke."""
    engine = _engine(write_policies(tmp_path / "in-force", SHOP_PAYMENTS_POLICY))
    path = tmp_path / "audit.jsonl"
    recorder = build_recorder(Settings(audit=AuditSettings(file=path)))
    stripe = facts("api.stripe.com", identity=PAYMENTS, destination_ip="93.184.216.34")
    refused = recorder.open("CONNECT", "127.0.0.2", 1)
    refused.decided(stripe, engine.decide(stripe))
    refused.decided(stripe, adapter_denial(Reason.CONNECTION_REFUSED, "cannot connect"))
    refused.close()
    revoked = recorder.open("CONNECT", "127.0.0.2", 2)
    revoked.decided(stripe, engine.decide(stripe))
    revoked.decided(stripe, adapter_denial(Reason.REVOKED, "policy changed"))
    revoked.close(bytes_sent=5)
    unresolved = recorder.open("CONNECT", "127.0.0.2", 3)
    unresolved.decided(facts("gone.example.com", identity=PAYMENTS), adapter_denial(Reason.DNS_ERROR, "NXDOMAIN"))
    unresolved.close()
    recorder.shutdown()
    return path


def test_the_policy_verdict_survives_a_later_adapter_outcome(trail: Path) -> None:
    records = list(read_records([str(trail)]))
    assert [r.reason for r in records] == ["connection_refused", "revoked", "dns_error"]
    verdicts = [r.policy_verdict for r in records]
    assert verdicts[0] is not None and (verdicts[0].decision, verdicts[0].rule) == ("allow", "stripe-api")
    assert verdicts[1] is not None and verdicts[1].decision == "allow"
    assert verdicts[2] is None


def test_replay_counts_connections_the_engine_allowed_even_if_they_failed_upstream(trail: Path, tmp_path: Path) -> None:
    no_stripe = SHOP_PAYMENTS_POLICY.replace("hosts: [api.stripe.com]", "hosts: [files.stripe.com]")
    report = replay(read_records([str(trail)]), _engine(write_policies(tmp_path / "candidate", no_stripe)))
    assert report.replayed == 2
    assert report.count("allow -> deny") == 2
    assert report.not_replayable == {"dns_error": 1}
    assert report.blocks_allowed_traffic


def test_facts_are_rebuilt_from_the_record(trail: Path) -> None:
    record = next(iter(read_records([str(trail)])))
    rebuilt = facts_from_record(record)
    assert rebuilt.identity is not None
    assert rebuilt.identity.namespace == "shop" and rebuilt.identity.pod == "payments-5c9d"
    assert dict(rebuilt.identity.labels) == {"app": "payments"}
    assert dict(rebuilt.identity.namespace_labels) == {"kubernetes.io/metadata.name": "shop"}
    assert (rebuilt.target, rebuilt.port, str(rebuilt.destination_ip)) == ("api.stripe.com", 443, "93.184.216.34")


def test_suggest_includes_destinations_the_policy_allowed_but_the_upstream_refused(trail: Path) -> None:
    from egress_gateway.trail.suggest import suggest_policy

    suggestion = suggest_policy(read_records([str(trail)]), "shop")
    assert suggestion.flows == 2
    policy = yaml.safe_load(suggestion.to_yaml())
    # the rule that allowed it keeps its name; the policy selects the workload it was seen for
    assert policy["spec"]["rules"] == [{"name": "stripe-api", "hosts": ["api.stripe.com"], "ports": [443]}]
    assert policy["spec"]["podSelector"] == {"matchLabels": {"app": "payments"}}
