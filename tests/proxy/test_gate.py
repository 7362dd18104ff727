"""The gate's procedure with real parts (engine, store, static identity, resolver) and no sockets."""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import fields, replace

import pytest
import yaml

from egress_gateway.identity.static import StaticIdentityResolver
from egress_gateway.policy.decision import Reason
from egress_gateway.policy.engine import Engine, EngineConfig
from egress_gateway.policy.store import PolicyStore
from egress_gateway.policy.validation import validate_object
from egress_gateway.proxy.gate import Gate, Verdict
from egress_gateway.proxy.resolver import Resolver
from egress_gateway.settings import StaticIdentity

POLICY = """
apiVersion: egressgateway.io/v1alpha1
kind: EgressPolicy
metadata: {name: p, namespace: shop}
spec:
  rules:
    - {name: names, hosts: [multi.test, api.test, "*.wild.test"]}
    - {name: no-secret, action: Deny, hosts: [secret.test]}
"""


class CountingResolver(Resolver):
    def __init__(self) -> None:
        super().__init__(
            {
                "multi.test": ["169.254.169.254", "10.0.0.1", "127.0.0.20"],
                "api.test": ["127.0.0.21"],
                "secret.test": ["127.0.0.22"],
            },
            [],
            1,
        )
        self.lookups: list[str] = []

    async def resolve(self, name: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]:
        self.lookups.append(name)
        return await super().resolve(name)


@pytest.fixture
def gate() -> Gate:
    store = PolicyStore()
    store.upsert(validate_object(yaml.safe_load(POLICY)), "1")
    store.mark_loaded()
    engine = Engine(EngineConfig(allowed_ranges=(ipaddress.ip_network("127.0.0.0/8"),)), store.current)
    identity = StaticIdentityResolver([StaticIdentity(cidr="127.0.0.2/32", namespace="shop")])
    return Gate(engine, identity, CountingResolver(), ready=lambda: store.loaded)


def decide(gate: Gate, host: str, port: int = 443) -> Verdict:
    identity = asyncio.run(gate.identify("127.0.0.2", None))
    return asyncio.run(gate.decide_target(identity, host, port))


def test_first_allowed_candidate_is_pinned(gate: Gate) -> None:
    verdict = decide(gate, "multi.test")
    assert verdict.decision.allowed
    assert str(verdict.address) == "127.0.0.20"
    assert [str(a) for a in verdict.candidates] == ["169.254.169.254", "10.0.0.1", "127.0.0.20"]


def test_denied_names_are_not_resolved(gate: Gate) -> None:
    verdict = decide(gate, "secret.test")
    assert verdict.decision.reason is Reason.DENIED_BY_RULE
    assert gate.resolver.lookups == []  # type: ignore[attr-defined]


def test_ip_literals_are_not_resolved_and_pinned_to_themselves(gate: Gate) -> None:
    verdict = decide(gate, "0x7f000015")
    assert str(verdict.address) == "127.0.0.21"
    assert verdict.decision.reason is Reason.NO_MATCHING_RULE
    assert gate.resolver.lookups == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "sni",
    # api.test.. and api.test... are rejected by the normalizer: the shortcut must not strip them into a match
    # (issue 12, class 12).
    ["api.test", "API.TEST", "api.test.", "api.test..", "api.test...", ".api.test", "x.wild.test", "secret.test", None],
)
def test_sni_shortcut_agrees_with_the_engine(gate: Gate, sni: str | None) -> None:
    verdict = decide(gate, "api.test")
    shortcut = gate.decide_sni(verdict, sni)
    full = gate.engine.decide(replace(verdict.facts, sni=sni, protocol="TLS"))
    assert shortcut.decision.allowed == full.allowed
    assert shortcut.decision.reason == full.reason


def test_sni_check_keeps_every_other_fact(gate: Gate) -> None:
    verdict = decide(gate, "api.test")
    facts = replace(verdict.facts, host_header="api.test:443")  # every field set
    checked = gate.decide_sni(Verdict(facts, verdict.decision, verdict.candidates), "api.test")
    assert checked.facts == replace(facts, sni="api.test", protocol="TLS")
    assert None not in (getattr(checked.facts, f.name) for f in fields(checked.facts))


def test_not_ready_until_loaded() -> None:
    gate = Gate(Engine(), StaticIdentityResolver([]), Resolver({}, [], 1), ready=lambda: False)
    denial = gate.not_ready()
    assert denial is not None and denial.reason is Reason.POLICIES_NOT_LOADED


# ---- transparent mode: the original destination of a redirected connection ----


def test_original_destination_among_the_names_addresses_keeps_the_verdict(gate: Gate) -> None:
    verdict = decide(gate, "multi.test")  # pinned 127.0.0.20, the first allowed of three candidates
    for original in ("127.0.0.20", "10.0.0.1"):  # any address the name resolves to, not only the pinned one
        assert gate.check_original_destination(verdict, ipaddress.ip_address(original)) is verdict


def test_original_destination_elsewhere_is_a_mismatch_and_the_pin_is_unchanged(gate: Gate) -> None:
    verdict = decide(gate, "api.test")
    checked = gate.check_original_destination(verdict, ipaddress.ip_address("127.0.0.98"))
    assert checked.decision.reason is Reason.DESTINATION_MISMATCH
    assert "127.0.0.98" in checked.decision.message and "127.0.0.21" in checked.decision.message
    assert checked.facts == verdict.facts  # recorded with the name's facts, never dialed


def test_original_destination_does_not_turn_a_denial_into_another(gate: Gate) -> None:
    verdict = decide(gate, "secret.test")
    assert gate.check_original_destination(verdict, ipaddress.ip_address("127.0.0.98")) is verdict
    assert gate.check_original_destination(decide(gate, "api.test"), None).decision.allowed
