"""The decision, line by line as written in docs/policy-reference.md ("Decision" section)."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from types import MappingProxyType

import pytest
import yaml

from egress_gateway.policy.decision import Decision, Facts, Identity, Reason
from egress_gateway.policy.engine import Engine, EngineConfig
from egress_gateway.policy.store import PolicyStore, Versioned
from egress_gateway.policy.validation import validate_object

ip = ipaddress.ip_address
PUBLIC = ip("93.184.216.10")

BASE = """
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: payments, namespace: shop}
spec:
  podSelector: {matchLabels: {app: payments}}
  rules:
    - name: stripe
      hosts: ["api.stripe.com", "*.stripe.com"]
      ports: [443, "8000-8100"]
    - name: no-dashboard
      action: Deny
      hosts: ["dashboard.stripe.com"]
    - name: slack
      action: Log
      hosts: ["hooks.slack.com"]
    - name: partner-net
      cidrs: ["151.101.64.0/24"]
      except: ["151.101.64.7/32"]
    - name: mirror
      cidrs: ["10.20.0.0/16"]
      ports: [443]
"""

PAYMENTS = Identity("shop", "pay-1", MappingProxyType({"app": "payments"}), MappingProxyType({"team": "money"}))
OTHER_POD = Identity("shop", "web-1", MappingProxyType({"app": "web"}))


def engine_for(*documents: str, **config: object) -> Engine:
    store = PolicyStore()
    objects = [validate_object(d) for doc in documents for d in yaml.safe_load_all(doc) if d]
    store.replace_group("test", [Versioned(o, "7") for o in objects])
    return Engine(EngineConfig(**config), store.current)  # type: ignore[arg-type]


def decide(
    engine: Engine, target: str, port: int = 443, identity: Identity | None = PAYMENTS, **facts: object
) -> Decision:
    facts.setdefault("destination_ip", PUBLIC if not target[0].isdigit() and ":" not in target else None)
    return engine.decide(Facts(identity, target, port, **facts))  # type: ignore[arg-type]


@pytest.fixture
def engine() -> Engine:
    return engine_for(BASE)


# 1. Normalize
@pytest.mark.parametrize("target", ["bad..name", "-x.example.com", "a" * 64 + ".com", "1.2.3.4.5", "fe80::1%eth0", ""])
def test_1_unparseable_target_is_invalid_target(engine: Engine, target: str) -> None:
    decision = engine.decide(Facts(PAYMENTS, target, 443))
    assert (decision.allowed, decision.reason) == (False, Reason.INVALID_TARGET)


@pytest.mark.parametrize("port", [0, -1, 65536])
def test_1_port_outside_range_is_invalid_target(engine: Engine, port: int) -> None:
    assert decide(engine, "api.stripe.com", port).reason is Reason.INVALID_TARGET


@pytest.mark.parametrize("spelling", ["API.STRIPE.COM", "api.stripe.com.", "Api.Stripe.Com."])
def test_1_names_are_normalized_before_matching(engine: Engine, spelling: str) -> None:
    assert decide(engine, spelling).reason is Reason.ALLOWED_BY_RULE


@pytest.mark.parametrize("spelling", ["2130706433", "0x7f000001", "127.1", "0177.0.0.1", "[::ffff:127.0.0.1]"])
def test_1_legacy_ipv4_forms_are_the_plain_address(engine: Engine, spelling: str) -> None:
    decision = engine.decide(Facts(PAYMENTS, spelling, 443))
    assert decision.reason is Reason.BLOCKED_ADDRESS
    assert "127.0.0.1" in decision.message


# 2. Consistency
def test_2_sni_must_equal_the_requested_name(engine: Engine) -> None:
    decision = decide(engine, "api.stripe.com", sni="evil.example.org")
    assert (decision.allowed, decision.reason) == (False, Reason.SNI_MISMATCH)


def test_2_sni_equal_up_to_case_and_trailing_dot_is_consistent(engine: Engine) -> None:
    assert decide(engine, "api.stripe.com", sni="API.stripe.com.").allowed


def test_2_consistency_can_be_switched_off() -> None:
    relaxed = engine_for(BASE, require_sni_match=False)
    assert decide(relaxed, "api.stripe.com", sni="files.stripe.com").allowed


def test_2_plain_http_host_header_must_equal_the_uri_authority(engine: Engine) -> None:
    assert decide(engine, "api.stripe.com", 8000, host_header="api.stripe.com:8000").allowed
    mismatch = decide(engine, "api.stripe.com", 8000, host_header="dashboard.stripe.com:8000")
    assert mismatch.reason is Reason.HOST_MISMATCH
    assert decide(engine, "api.stripe.com", 8000, host_header="api.stripe.com:8001").reason is Reason.HOST_MISMATCH


# 3. Identity
def test_3_unknown_client_is_denied(engine: Engine) -> None:
    decision = decide(engine, "api.stripe.com", identity=None)
    assert (decision.allowed, decision.reason) == (False, Reason.UNKNOWN_CLIENT)


# 4. Selection
def test_4_pod_selector_limits_a_namespaced_policy(engine: Engine) -> None:
    assert decide(engine, "api.stripe.com", identity=OTHER_POD).reason is Reason.NO_POLICY


def test_4_namespaced_policy_applies_only_in_its_namespace(engine: Engine) -> None:
    elsewhere = Identity("other", "pay-1", MappingProxyType({"app": "payments"}))
    assert decide(engine, "api.stripe.com", identity=elsewhere).reason is Reason.NO_POLICY


def test_4_cluster_policy_selects_by_namespace_labels_including_the_name_label() -> None:
    cluster = """
apiVersion: egressgateway.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: money-teams}
spec:
  namespaceSelector:
    matchLabels: {team: money}
    matchExpressions: [{key: kubernetes.io/metadata.name, operator: In, values: [shop]}]
  rules: [{name: bank, hosts: [api.bank.example]}]
"""
    engine = engine_for(cluster)
    assert decide(engine, "api.bank.example").allowed
    no_label = Identity("shop", "x", MappingProxyType({}), MappingProxyType({}))
    assert decide(engine, "api.bank.example", identity=no_label).reason is Reason.NO_POLICY


def test_4_expired_rules_are_skipped() -> None:
    doc = """
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: glass, namespace: shop}
spec:
  rules:
    - {name: grant, hosts: [support.vendor.example], expires: "2026-12-31T00:00:00Z"}
"""
    engine = engine_for(doc)
    facts = Facts(PAYMENTS, "support.vendor.example", 443, destination_ip=PUBLIC)
    before = datetime(2026, 12, 30, 23, 59, tzinfo=UTC).timestamp()
    after = datetime(2026, 12, 31, 0, 0, tzinfo=UTC).timestamp()
    assert engine.decide(facts, now=before).allowed
    expired = engine.decide(facts, now=after)
    assert (expired.allowed, expired.reason) == (False, Reason.NO_MATCHING_RULE)


def test_4_the_next_expiry_is_the_earliest_expires_still_ahead() -> None:
    doc = """
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: glass, namespace: shop}
spec:
  rules:
    - {name: later, hosts: [a.example], expires: "2027-01-31T00:00:00Z"}
    - {name: sooner, hosts: [b.example], expires: "2026-12-31T00:00:00Z"}
    - {name: forever, hosts: [c.example]}
"""
    policies = engine_for(doc).policies
    sooner = datetime(2026, 12, 31, tzinfo=UTC).timestamp()
    later = datetime(2027, 1, 31, tzinfo=UTC).timestamp()
    found = policies.next_expiry(sooner - 1)
    assert found is not None and (found[0], found[1].name) == (sooner, "sooner")
    found = policies.next_expiry(sooner)  # an expiry that has passed is not next again
    assert found is not None and (found[0], found[1].name) == (later, "later")
    assert policies.next_expiry(later) is None


# 5. Rule matching
def test_5_port_list_must_match(engine: Engine) -> None:
    assert decide(engine, "api.stripe.com", 8050).allowed
    assert decide(engine, "api.stripe.com", 80).reason is Reason.NO_MATCHING_RULE


def test_5_cidr_matches_unless_excepted(engine: Engine) -> None:
    assert decide(engine, "151.101.64.8").allowed
    assert decide(engine, "151.101.64.7").reason is Reason.NO_MATCHING_RULE


def test_5_deny_rules_check_the_sni_so_an_ip_literal_cannot_dodge_a_host_deny(engine: Engine) -> None:
    decision = decide(engine, "151.101.64.8", sni="dashboard.stripe.com")
    assert (decision.allowed, decision.reason, decision.rule) == (
        False,
        Reason.DENIED_BY_RULE,
        "no-dashboard",
    )


def test_5_ip_literal_is_never_matched_by_hosts_of_an_allow_rule(engine: Engine) -> None:
    decision = decide(engine, "93.184.216.10", sni="api.stripe.com")
    assert decision.reason is Reason.NO_MATCHING_RULE


# 6. Address safety
@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "169.254.169.254",
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "fe80::1",
        "ff02::1",
        "::ffff:169.254.169.254",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::1",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",
    ],
)
def test_6_blocked_addresses_are_denied_even_for_allowed_names(engine: Engine, address: str) -> None:
    decision = decide(engine, "api.stripe.com", destination_ip=ip(address))
    assert (decision.allowed, decision.reason) == (False, Reason.BLOCKED_ADDRESS)


def test_6_allowed_ranges_exempt_blocked_addresses() -> None:
    engine = engine_for(BASE, allowed_ranges=(ipaddress.ip_network("127.0.0.0/8"),))
    assert decide(engine, "api.stripe.com", destination_ip=ip("127.0.0.9")).allowed


def test_6_the_gateways_own_addresses_are_blocked() -> None:
    engine = engine_for(BASE, own_addresses=frozenset({ip("93.184.216.10")}))
    assert decide(engine, "api.stripe.com").reason is Reason.BLOCKED_ADDRESS


@pytest.mark.parametrize("address", ["10.0.0.1", "172.16.5.4", "192.168.1.1", "100.64.0.1", "fd00::1"])
def test_6_private_addresses_need_an_explicit_cidr_a_host_match_is_not_enough(engine: Engine, address: str) -> None:
    decision = decide(engine, "api.stripe.com", destination_ip=ip(address))
    assert (decision.allowed, decision.reason) == (False, Reason.PRIVATE_ADDRESS)


def test_6_private_address_reachable_through_an_allow_cidr(engine: Engine) -> None:
    assert decide(engine, "10.20.3.4").allowed
    assert decide(engine, "api.stripe.com", destination_ip=ip("10.20.3.4")).allowed
    assert decide(engine, "10.20.3.4", 80).reason is Reason.PRIVATE_ADDRESS


# 7. Outcome
def test_7_deny_rule_wins_over_allow(engine: Engine) -> None:
    decision = decide(engine, "dashboard.stripe.com")  # also matches *.stripe.com
    assert (decision.reason, decision.rule, decision.matched) == (
        Reason.DENIED_BY_RULE,
        "no-dashboard",
        "dashboard.stripe.com",
    )


def test_7_allow_names_policy_rule_and_pattern(engine: Engine) -> None:
    decision = decide(engine, "files.stripe.com")
    assert decision.allowed and decision.reason is Reason.ALLOWED_BY_RULE
    assert (str(decision.policy), decision.policy.version if decision.policy else None) == (
        "EgressPolicy/shop/payments",
        "7",
    )
    assert (decision.rule, decision.matched) == ("stripe", "*.stripe.com")
    assert "files.stripe.com:443" in decision.message


def test_7_log_rule_allows_and_flags(engine: Engine) -> None:
    decision = decide(engine, "hooks.slack.com")
    assert (decision.allowed, decision.logged, decision.rule) == (True, True, "slack")


def test_7_selected_but_unmatched_is_no_matching_rule(engine: Engine) -> None:
    assert decide(engine, "example.org").reason is Reason.NO_MATCHING_RULE


def test_7_nothing_selected_falls_back_to_default_action() -> None:
    assert decide(engine_for(BASE), "example.org", identity=OTHER_POD).allowed is False
    allowing = engine_for(BASE, default_allow=True)
    decision = decide(allowing, "example.org", identity=OTHER_POD)
    assert (decision.allowed, decision.reason) == (True, Reason.NO_POLICY)
    assert decide(allowing, "example.org", identity=OTHER_POD, destination_ip=ip("169.254.169.254")).allowed is False


# 8. Audit mode
AUDIT = """
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: tighten, namespace: shop}
spec:
  mode: Audit
  rules:
    - {name: no-uploads, action: Deny, hosts: ["*.uploads.stripe.com"]}
"""


def test_8_audit_policy_marks_would_deny_without_changing_traffic() -> None:
    engine = engine_for(BASE, AUDIT)
    decision = decide(engine, "x.stripe.com")
    assert decision.allowed and not decision.would_deny
    engine2 = engine_for(BASE.replace('"*.stripe.com"', '"**.stripe.com"'), AUDIT)
    flagged = decide(engine2, "eu.uploads.stripe.com")
    assert (flagged.allowed, flagged.would_deny, flagged.audit_reason, flagged.audit_rule) == (
        True,
        True,
        Reason.DENIED_BY_RULE,
        "no-uploads",
    )
    assert str(flagged.audit_policy) == "EgressPolicy/shop/tighten"


def test_8_audit_only_namespace_gets_the_default_action_and_would_deny() -> None:
    audit_only = AUDIT.replace("action: Deny, ", "")
    engine = engine_for(audit_only, default_allow=True)
    decision = decide(engine, "example.org", identity=OTHER_POD)
    assert (decision.allowed, decision.reason, decision.would_deny, decision.audit_reason) == (
        True,
        Reason.NO_POLICY,
        True,
        Reason.NO_MATCHING_RULE,
    )


def test_8_audit_policies_never_deny() -> None:
    engine = engine_for(AUDIT, default_allow=True)
    assert decide(engine, "a.uploads.stripe.com").allowed


# 9. What a decision carries
def test_9_decision_carries_a_human_sentence_and_reason_codes(engine: Engine) -> None:
    decision = decide(engine, "example.org")
    assert decision.verdict == "deny" and decision.reason == "no_matching_rule"
    assert "example.org:443" in decision.message and "EgressPolicy/shop/payments" in decision.message


PROTOCOLS = """
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: tunnels, namespace: shop}
spec:
  rules:
    - name: web
      hosts: [web.example.com]
    - name: database
      hosts: [db.example.com]
      protocols: [TCP]
    - name: both
      hosts: [both.example.com]
      protocols: [TLS, TCP]
"""


@pytest.mark.parametrize(
    ("target", "protocol", "allowed"),
    [
        ("web.example.com", None, True),  # the CONNECT, before any byte: the tunnel's first bytes decide again
        ("web.example.com", "TLS", True),
        ("web.example.com", "HTTP", True),
        ("web.example.com", "TCP", False),  # default [TLS, HTTP]
        ("db.example.com", "TCP", True),
        ("db.example.com", "TLS", False),
        ("both.example.com", "TCP", True),
        ("both.example.com", "HTTP", False),
    ],
)
def test_5_an_allow_rule_allows_only_its_protocols(target: str, protocol: str | None, allowed: bool) -> None:
    decision = decide(engine_for(PROTOCOLS), target, identity=OTHER_POD, protocol=protocol)
    assert decision.allowed is allowed, decision
    if not allowed:
        assert decision.reason is Reason.PROTOCOL_NOT_ALLOWED
        assert protocol is not None and protocol in decision.message and decision.rule is not None
    else:
        assert decision.protocols is not None


def test_2_sni_the_normalizer_rejects_is_invalid_even_if_it_strips_to_the_target(engine: Engine) -> None:
    decision = decide(engine, "api.stripe.com", sni="api.stripe.com..")
    assert decision.reason is Reason.INVALID_TARGET
