"""Admission, step by step, with real parts (engine, store, static identity, resolver, limiters) and no sockets."""

from __future__ import annotations

import asyncio

import pytest

from egress_gateway.policy.decision import Facts, Reason
from egress_gateway.proxy.admission import Admission, Admitted
from egress_gateway.proxy.gate import Gate
from egress_gateway.proxy.limits import NamespaceRateLimiter
from tests.proxy.test_gate import gate  # noqa: F401  (the fixture: policy for namespace shop, client 127.0.0.2)

SHOP_CLIENT = "127.0.0.2"


def facts(host: str = "api.test", port: int = 443) -> Facts:
    return Facts(identity=None, target=host, port=port)


def admit(admission: Admission, client: str = SHOP_CLIENT, client_id: str = "c1", host: str = "api.test") -> Admitted:
    return asyncio.run(admission.admit(client_id, client, None, facts(host), None))


def test_at_accept_refuses_over_max_connections_and_release_frees_the_slot(gate: Gate) -> None:  # noqa: F811
    admission = Admission(gate, max_connections=1, namespace_connections=1)
    assert admission.at_accept("c1", "127.0.0.9") is None
    refused = admission.at_accept("c2", "127.0.0.9")
    assert refused is not None and refused.reason is Reason.CONNECTION_LIMIT
    admission.release("c1")
    assert admission.at_accept("c3", "127.0.0.9") is None


def test_a_refusal_from_accept_answers_every_request_of_the_connection(gate: Gate) -> None:  # noqa: F811
    admission = Admission(gate, max_connections=1)
    refused = admission.at_accept("c1", SHOP_CLIENT) or admission.at_accept("c2", SHOP_CLIENT)
    assert refused is not None
    admitted = asyncio.run(admission.admit("c2", SHOP_CLIENT, refused, facts(), None))
    assert admitted.verdict.decision is refused


def test_readiness_comes_first(gate: Gate) -> None:  # noqa: F811
    gate.ready = lambda: False
    admitted = admit(Admission(gate, max_connections=10))
    assert admitted.verdict.decision.reason is Reason.POLICIES_NOT_LOADED


def test_identity_unknown_client_is_denied_by_the_gate(gate: Gate) -> None:  # noqa: F811
    admitted = admit(Admission(gate, max_connections=10), client="127.0.0.77")
    assert admitted.verdict.decision.reason is Reason.UNKNOWN_CLIENT


def test_limits_namespace_share_is_counted_when_the_identity_names_the_namespace(gate: Gate) -> None:  # noqa: F811
    admission = Admission(gate, max_connections=10, namespace_connections=1)
    assert admit(admission, client_id="c1").verdict.decision.allowed
    second = admit(admission, client_id="c2")
    assert second.verdict.decision.reason is Reason.CONNECTION_LIMIT
    assert "limits.namespace_connections" in second.verdict.decision.message
    assert second.verdict.facts.identity is not None and second.verdict.facts.identity.namespace == "shop"


def test_limits_rate_denies_with_retry_after_before_any_lookup(gate: Gate) -> None:  # noqa: F811
    admission = Admission(gate, max_connections=10, rate=NamespaceRateLimiter(0.001, 1))
    assert admit(admission, client_id="c1").verdict.decision.allowed
    limited = admit(admission, client_id="c2", host="multi.test")
    assert limited.verdict.decision.reason is Reason.RATE_LIMITED
    assert limited.retry_after is not None and int(limited.retry_after) >= 1
    assert "multi.test" not in gate.resolver.lookups  # type: ignore[attr-defined]


def test_gate_pins_an_allowed_target(gate: Gate) -> None:  # noqa: F811
    admitted = admit(Admission(gate, max_connections=10))
    assert admitted.verdict.decision.allowed and admitted.verdict.address is not None
    assert admitted.retry_after is None


@pytest.mark.parametrize("host", ["secret.test"])
def test_gate_denial_is_returned_as_is(gate: Gate, host: str) -> None:  # noqa: F811
    admitted = admit(Admission(gate, max_connections=10), host=host)
    assert admitted.verdict.decision.reason is Reason.DENIED_BY_RULE
