"""The tier walk, step by step as docs/policy-reference.md writes it ("Decision", steps 7a-7d and 8).

Admin cluster policies by priority -> namespaced policies (selection allowlists) -> Baseline cluster policies ->
default_action. Each test is named after the step it pins.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from types import MappingProxyType

import yaml

from egress_gateway.policy.decision import Decision, Facts, Identity, Reason
from egress_gateway.policy.engine import Engine, EngineConfig
from egress_gateway.policy.model import Tier
from egress_gateway.policy.store import PolicyStore, Versioned
from egress_gateway.policy.validation import validate_object

PUBLIC = ipaddress.ip_address("93.184.216.10")
CLIENT = Identity("shop", "pay-1", MappingProxyType({"app": "payments"}), MappingProxyType({"team": "money"}))


def cluster(name: str, rules: str, tier: str = "Admin", priority: int = 100, mode: str = "Enforce") -> str:
    return f"""
apiVersion: egressgateway.io/v1alpha2
kind: ClusterEgressPolicy
metadata: {{name: {name}, generation: 3}}
spec:
  tier: {tier}
  priority: {priority}
  mode: {mode}
  rules: {rules}
"""


def namespaced(name: str, rules: str, mode: str = "Enforce") -> str:
    return f"""
apiVersion: egressgateway.io/v1alpha2
kind: EgressPolicy
metadata: {{name: {name}, namespace: shop}}
spec:
  mode: {mode}
  rules: {rules}
"""


DENY_PASTEBIN = cluster("no-pastebin", "[{name: pastebin, action: Deny, hosts: ['pastebin.com', '**.pastebin.com']}]")
STRIPE = namespaced("payments", "[{name: stripe, hosts: [api.stripe.com], ports: [443]}]")


def engine_for(*documents: str, default_allow: bool = False) -> Engine:
    store = PolicyStore()
    objects = [validate_object(d) for doc in documents for d in yaml.safe_load_all(doc) if d]
    store.replace_group("test", [Versioned(o, "7") for o in objects])
    return Engine(EngineConfig(default_allow=default_allow), store.current)


def decide(engine: Engine, target: str, port: int = 443, now: float | None = None, **facts: object) -> Decision:
    facts.setdefault("destination_ip", PUBLIC)
    return engine.decide(Facts(CLIENT, target, port, **facts), now=now)  # type: ignore[arg-type]


def deciders(decision: Decision) -> list[str]:
    return [f"{d.tier}:{d.policy.name}:{d.verdict}:{d.rule}" for d in decision.deciders]


# The trap from issue 15: a deny-only cluster policy no longer allowlists what it selects.
def test_7a_deny_only_admin_policy_does_not_allowlist_what_it_selects() -> None:
    engine = engine_for(DENY_PASTEBIN, default_allow=True)
    allowed = decide(engine, "example.org")
    assert (allowed.allowed, allowed.reason) == (True, Reason.NO_POLICY)
    denied = decide(engine, "x.pastebin.com")
    assert (denied.allowed, denied.reason, denied.rule, denied.tier) == (
        False,
        Reason.DENIED_BY_RULE,
        "pastebin",
        "Admin",
    )
    assert deciders(denied) == ["Admin:no-pastebin:Deny:pastebin"]
    assert denied.deciders[0].policy.version == "7"


def test_7c_deny_only_baseline_policy_does_not_allowlist_what_it_selects() -> None:
    baseline = DENY_PASTEBIN.replace("tier: Admin", "tier: Baseline")
    engine = engine_for(baseline, default_allow=True)
    assert decide(engine, "example.org").allowed
    assert decide(engine, "pastebin.com").reason is Reason.DENIED_BY_RULE


def test_7a_admin_deny_decides_before_a_namespaced_allow() -> None:
    engine = engine_for(DENY_PASTEBIN, namespaced("ns", "[{name: paste, hosts: [pastebin.com]}]"))
    decision = decide(engine, "pastebin.com")
    assert (decision.allowed, decision.tier, str(decision.policy)) == (
        False,
        "Admin",
        "ClusterEgressPolicy/no-pastebin",
    )


def test_7a_admin_allow_decides_before_a_namespaced_deny() -> None:
    admin = cluster("corp-sso", "[{name: sso, hosts: [sso.corp.example]}]")
    engine = engine_for(admin, namespaced("ns", "[{name: no-sso, action: Deny, hosts: [sso.corp.example]}]"))
    decision = decide(engine, "sso.corp.example")
    assert (decision.allowed, decision.reason, decision.tier) == (True, Reason.ALLOWED_BY_RULE, "Admin")


def test_7a_lower_priority_number_decides_first() -> None:
    deny = cluster("deny-50", "[{name: d, action: Deny, hosts: [api.example.com]}]", priority=50)
    allow = cluster("allow-10", "[{name: a, hosts: [api.example.com]}]", priority=10)
    assert decide(engine_for(deny, allow), "api.example.com").allowed
    assert not decide(engine_for(deny.replace("priority: 50", "priority: 5"), allow), "api.example.com").allowed


def test_7a_equal_priority_policies_decide_together_and_deny_wins() -> None:
    allow = cluster("a-allow", "[{name: a, hosts: [api.example.com]}]", priority=10)
    deny = cluster("z-deny", "[{name: d, action: Deny, hosts: [api.example.com]}]", priority=10)
    decision = decide(engine_for(allow, deny), "api.example.com")
    assert (decision.allowed, str(decision.policy)) == (False, "ClusterEgressPolicy/z-deny")


def test_7a_pass_skips_the_rest_of_the_admin_tier_and_goes_to_namespaced_policies() -> None:
    exempt = cluster("exempt-shop-paste", "[{name: shop-paste, action: Pass, hosts: [pastebin.com]}]", priority=1)
    ns = namespaced("ns", "[{name: paste, hosts: [pastebin.com]}]")
    engine = engine_for(exempt, DENY_PASTEBIN, ns)
    decision = decide(engine, "pastebin.com")
    assert (decision.allowed, decision.tier, str(decision.policy)) == (True, "Namespace", "EgressPolicy/shop/ns")
    assert deciders(decision) == ["Admin:exempt-shop-paste:Pass:shop-paste", "Namespace:ns:Allow:paste"]
    # Without the namespaced allow, the Pass lands on the namespace tier (nothing selects) and then the default.
    alone = decide(engine_for(exempt, DENY_PASTEBIN), "pastebin.com")
    assert (alone.allowed, alone.reason) == (False, Reason.NO_POLICY)
    assert deciders(alone) == ["Admin:exempt-shop-paste:Pass:shop-paste"]


def test_7a_within_one_priority_deny_beats_pass() -> None:
    both = cluster(
        "mixed", "[{name: p, action: Pass, hosts: ['**.example.com']}, {name: d, action: Deny, hosts: [x.example.com]}]"
    )
    assert decide(engine_for(both, default_allow=True), "x.example.com").reason is Reason.DENIED_BY_RULE
    assert decide(engine_for(both, default_allow=True), "y.example.com").allowed


def test_7b_namespaced_selection_allowlists_and_names_every_selecting_policy() -> None:
    other = namespaced("other", "[{name: x, hosts: [x.example.com]}]")
    decision = decide(engine_for(STRIPE, other, DENY_PASTEBIN, default_allow=True), "example.org")
    assert (decision.allowed, decision.reason, decision.tier) == (False, Reason.NO_MATCHING_RULE, "Namespace")
    assert deciders(decision) == ["Namespace:other:NoMatch:None", "Namespace:payments:NoMatch:None"]


def test_7b_v1alpha1_cluster_policy_keeps_its_old_meaning_in_the_namespace_tier() -> None:
    legacy = """
apiVersion: egressgateway.io/v1alpha1
kind: ClusterEgressPolicy
metadata: {name: legacy}
spec:
  rules: [{name: paste, action: Deny, hosts: [pastebin.com]}]
"""
    policy = validate_object(yaml.safe_load(legacy))
    assert policy.api_version == "egressgateway.io/v1alpha2" and policy.spec.tier is Tier.NAMESPACE  # type: ignore[union-attr]
    engine = engine_for(legacy, default_allow=True)
    decision = decide(engine, "example.org")
    assert (decision.allowed, decision.reason) == (False, Reason.NO_MATCHING_RULE)  # selection allowlists, as before


def test_7c_baseline_is_consulted_after_namespaced_policies() -> None:
    baseline = cluster("base", "[{name: deny-all-paste, action: Deny, hosts: [pastebin.com]}]", tier="Baseline")
    ns = namespaced("ns", "[{name: paste, hosts: [pastebin.com]}]")
    assert decide(engine_for(baseline, ns), "pastebin.com").allowed  # the namespace decided first
    other = Identity("web", "w", MappingProxyType({}))
    engine = engine_for(baseline, ns, default_allow=True)
    decision = engine.decide(Facts(other, "pastebin.com", 443, destination_ip=PUBLIC))
    assert (decision.allowed, decision.tier) == (False, "Baseline")


def test_7c_baseline_allow_applies_where_no_namespaced_policy_selects() -> None:
    baseline = cluster("base", "[{name: mirror, hosts: [mirror.example.com]}]", tier="Baseline")
    engine = engine_for(baseline, STRIPE)
    assert not decide(engine, "mirror.example.com").allowed  # shop/payments selects the client: no_matching_rule
    web = Identity("web", "w", MappingProxyType({}))
    decision = engine.decide(Facts(web, "mirror.example.com", 443, destination_ip=PUBLIC))
    assert (decision.allowed, decision.tier, decision.rule) == (True, "Baseline", "mirror")


def test_7c_pass_in_baseline_goes_to_the_default_action() -> None:
    first = cluster("first", "[{name: p, action: Pass, hosts: [a.example.com]}]", tier="Baseline", priority=1)
    second = cluster("second", "[{name: d, action: Deny, hosts: [a.example.com]}]", tier="Baseline", priority=2)
    decision = decide(engine_for(first, second, default_allow=True), "a.example.com")
    assert (decision.allowed, decision.reason) == (True, Reason.NO_POLICY)


def test_7d_admin_and_baseline_policies_that_do_not_match_fall_to_the_default_action() -> None:
    admin = cluster("a", "[{name: x, hosts: [x.example.com]}]")
    baseline = cluster("b", "[{name: y, hosts: [y.example.com]}]", tier="Baseline")
    for default_allow in (True, False):
        decision = decide(engine_for(admin, baseline, default_allow=default_allow), "z.example.com")
        assert (decision.allowed, decision.reason) == (default_allow, Reason.NO_POLICY)
        assert "no policy decided" in decision.message


def test_6_private_address_needs_a_cidr_allow_in_any_tier() -> None:
    admin_host = cluster("db", "[{name: db, hosts: [db.corp.example]}]")
    private = ipaddress.ip_address("10.1.2.3")
    assert decide(engine_for(admin_host), "db.corp.example", destination_ip=private).reason is Reason.PRIVATE_ADDRESS
    admin_cidr = cluster("db", "[{name: db, cidrs: [10.1.2.0/24]}]")
    assert decide(engine_for(admin_cidr), "db.corp.example", destination_ip=private).allowed
    blocked = ipaddress.ip_address("169.254.169.254")
    assert decide(engine_for(admin_host), "db.corp.example", destination_ip=blocked).reason is Reason.BLOCKED_ADDRESS


def test_8_audit_mode_admin_policy_marks_would_deny_across_tiers() -> None:
    audit = DENY_PASTEBIN.replace("mode: Enforce", "mode: Audit")
    engine = engine_for(audit, namespaced("ns", "[{name: paste, hosts: [pastebin.com]}]"))
    decision = decide(engine, "pastebin.com")
    assert (decision.allowed, decision.tier, decision.would_deny, decision.audit_reason) == (
        True,
        "Namespace",
        True,
        Reason.DENIED_BY_RULE,
    )
    assert str(decision.audit_policy) == "ClusterEgressPolicy/no-pastebin"
    assert [d.tier for d in decision.audit_deciders] == ["Admin"]


def test_8_audit_mode_baseline_policy_marks_would_deny_under_default_allow() -> None:
    audit = cluster("base", "[{name: paste, action: Deny, hosts: [pastebin.com]}]", tier="Baseline", mode="Audit")
    decision = decide(engine_for(audit, default_allow=True), "pastebin.com")
    assert (decision.allowed, decision.would_deny, decision.audit_rule) == (True, True, "paste")


def test_4_expiry_applies_in_every_tier() -> None:
    expiring = "[{name: grant, hosts: [vendor.example], expires: '2026-12-31T00:00:00Z'}]"
    before = datetime(2026, 12, 30, tzinfo=UTC).timestamp()
    after = datetime(2026, 12, 31, tzinfo=UTC).timestamp()
    for tier in ("Admin", "Baseline"):
        engine = engine_for(cluster("glass", expiring, tier=tier))
        assert decide(engine, "vendor.example", now=before).allowed
        assert decide(engine, "vendor.example", now=after).reason is Reason.NO_POLICY
    deny_expiring = expiring.replace("{name: grant,", "{name: grant, action: Deny,")
    engine = engine_for(cluster("glass", deny_expiring), STRIPE)
    assert not decide(engine, "vendor.example", now=before).allowed
    assert decide(engine, "vendor.example", now=after).reason is Reason.NO_MATCHING_RULE


def test_sni_only_reaches_deny_rules_in_the_admin_tier() -> None:
    pass_all = cluster("p", "[{name: p, action: Pass, hosts: [cdn.example.com]}]", priority=1)
    engine = engine_for(pass_all, DENY_PASTEBIN, default_allow=True)
    decision = engine.decide(Facts(CLIENT, "93.184.216.10", 443, sni="pastebin.com", destination_ip=PUBLIC))
    assert decision.reason is Reason.DENIED_BY_RULE


def test_9_audit_attributes_name_the_tier_and_every_decider_with_versions() -> None:
    from egress_gateway.audit.fields import DECIDERS, TIER, decision_attributes

    exempt = cluster("exempt", "[{name: pass-paste, action: Pass, hosts: [pastebin.com]}]", priority=1)
    ns = namespaced("ns", "[{name: paste, hosts: [pastebin.com]}]")
    attributes = decision_attributes(decide(engine_for(exempt, DENY_PASTEBIN, ns), "pastebin.com"))
    assert attributes[TIER] == "Namespace"
    assert attributes[DECIDERS] == (
        "Admin: ClusterEgressPolicy/exempt (version 7) rule pass-paste -> Pass; "
        "Namespace: EgressPolicy/shop/ns (version 7) rule paste -> Allow"
    )


def test_7a_one_lookup_per_tier_equals_walking_priority_by_priority() -> None:
    """The engine matches a whole tier in one lookup; a plain walk over priorities must agree (seeded, 300 sets)."""
    import random

    rng = random.Random(15)
    hosts = ["a.example.com", "b.example.com", "*.example.com", "**.example.com"]
    actions = ["Allow", "Deny", "Log", "Pass"]
    names = ["a.example.com", "b.example.com", "c.d.example.com"]
    for _ in range(300):
        policies = []
        for i in range(rng.randint(1, 4)):
            priority = rng.choice([1, 5, 5, 9])
            rules = [(f"r{j}", rng.choice(actions), rng.choice(hosts)) for j in range(rng.randint(1, 3))]
            text = ", ".join(f"{{name: {n}, action: {a}, hosts: ['{h}']}}" for n, a, h in rules)
            policies.append((f"p{i}", priority, rules, cluster(f"p{i}", f"[{text}]", priority=priority)))
        engine = engine_for(*(doc for *_, doc in policies), default_allow=True)
        for name in names:
            expected = _walk_reference(policies, name)
            decision = decide(engine, name)
            got = (decision.rule, decision.policy.name) if decision.tier and decision.policy else None
            if expected is None:
                assert got is None, (policies, name, decision.message)
            else:
                assert got in expected, (policies, name, decision.message)


def _walk_reference(
    policies: list[tuple[str, int, list[tuple[str, str, str]], str]], name: str
) -> list[tuple[str, str]] | None:
    """Step 7a read literally: priorities in order; the candidates the first deciding priority may name, or None."""
    from egress_gateway.policy.hostnames import parse_host_pattern

    for priority in sorted({p[1] for p in policies}):
        matched = [
            (action, rule, policy)
            for policy, prio, rules, _ in sorted(policies)
            if prio == priority
            for rule, action, host in rules
            if parse_host_pattern(host).matches(name)
        ]
        for wanted in ("Deny", "Log", "Allow"):
            hits = [(rule, policy) for action, rule, policy in matched if action == wanted]
            if hits:
                return hits  # any of them may be named; compared by membership below
        if any(action == "Pass" for action, _, _ in matched):
            return None
    return None


# Rule `protocols` (issue 12, class 3) in every tier: a matching Allow that does not list the tunnel's protocol
# decides `protocol_not_allowed` in its tier, naming the rule; one that lists it allows, and says what it allows.
def test_7_protocols_are_honoured_in_every_tier() -> None:
    admin = cluster("db-admin", "[{name: db, hosts: [db.example.com], protocols: [TCP]}]", priority=10)
    baseline = cluster("mirror", "[{name: mirror, hosts: [mirror.example.com]}]", tier="Baseline")
    engine = engine_for(admin, baseline, STRIPE)
    tcp = decide(engine, "db.example.com", protocol="TCP")
    assert (tcp.allowed, tcp.tier, tcp.protocols) == (True, "Admin", frozenset({"TCP"}))
    tls = decide(engine, "db.example.com", protocol="TLS")
    assert (tls.allowed, tls.reason, tls.rule, tls.tier) == (False, Reason.PROTOCOL_NOT_ALLOWED, "db", "Admin")
    opaque = decide(engine, "api.stripe.com", protocol="TCP")
    assert (opaque.allowed, opaque.reason, opaque.tier) == (False, Reason.PROTOCOL_NOT_ALLOWED, "Namespace")
    assert decide(engine, "api.stripe.com", protocol="TLS").allowed
    # Baseline is reached only when the namespace tier selects nobody: the shop's policy allowlists, so it denies.
    assert decide(engine, "mirror.example.com", protocol="HTTP").reason is Reason.NO_MATCHING_RULE
