"""Admission: the steps a session's request passes, in order, before anything is dialed.

At accept: `at_accept` (the namespace's connection share when the source address names the namespace, then
`limits.max_connections`). Per CONNECT or plain-HTTP request, `admit` runs:

1. readiness (`Gate.not_ready`): policies were loaded (else `policies_not_loaded`);
2. identity (`Gate.identify`): who the client is (token, pod IP or the static map; a bad token -> `auth_required`,
   too many TokenReviews from one address -> `rate_limited`, an identity source too stale to trust -> `unknown_client`);
3. `limits`: the namespace's connection share when only the identity named the namespace, then its token bucket;
4. the gate (`Gate.decide_target`): the decision, resolution and the pinned address.

The checks of what a tunnel carries (ClientHello, Host) follow later on the tunnel's bytes (`inspection.py`,
`Gate.decide_sni` / `decide_host`). Each step is a small call with plain values in and a denial (or None) out.
No mitmproxy, no sockets, no records: the addon records what this returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from egress_gateway.identity.base import AuthenticationFailed, IdentityUnavailable, TooManyReviews
from egress_gateway.policy.decision import Decision, Facts, Identity, Reason, adapter_denial
from egress_gateway.proxy.gate import Gate, Verdict
from egress_gateway.proxy.limits import ConnectionLimit, NamespaceConnections, NamespaceRateLimiter


@dataclass(frozen=True, slots=True)
class Admitted:
    verdict: Verdict
    retry_after: str | None = None  # Retry-After of a rate-limited request


class Admission:
    def __init__(
        self,
        gate: Gate,
        max_connections: int,
        namespace_connections: int | None = None,
        rate: NamespaceRateLimiter | None = None,
    ) -> None:
        self.gate = gate
        self.max_connections = max_connections
        self.connection_limit = ConnectionLimit(max_connections)
        # `limits.namespace_connections`; None: a quarter of max_connections.
        self.namespace_connections = NamespaceConnections(namespace_connections or max(1, max_connections // 4))
        self.rate = rate if rate is not None else NamespaceRateLimiter(0.0, 1)

    # ---- at accept --------------------------------------------------------------------------------------------
    def at_accept(self, client_id: str, address: str) -> Decision | None:
        """The denial every request of this connection gets (counted from accept: a namespace's silent or undecided
        sockets use up its share, not everyone's slots), or None."""
        namespace = self.gate.namespace_of_address(address)
        if namespace is not None and not self.namespace_connections.admit(client_id, namespace):
            return self._share_denial(namespace)
        if not self.connection_limit.admit(client_id):
            return adapter_denial(
                Reason.CONNECTION_LIMIT, f"the gateway already serves {self.max_connections} connections"
            )
        return None

    def release(self, client_id: str) -> None:
        self.connection_limit.release(client_id)
        self.namespace_connections.release(client_id)

    # ---- per request --------------------------------------------------------------------------------------------
    async def admit(
        self, client_id: str, address: str, refused: Decision | None, facts: Facts, authorization: str | None
    ) -> Admitted:
        """Steps 1-4 for one request to `facts.target:facts.port` (`refused`: the denial from `at_accept`)."""
        if refused is not None:
            return Admitted(Verdict(facts, refused))
        not_ready = self.gate.not_ready()
        if not_ready is not None:
            return Admitted(Verdict(facts, not_ready))
        try:  # `AuthenticationFailed` -> 407
            identity = await self.gate.identify(address, authorization)
        except TooManyReviews as exc:  # TokenReviews per client address (identity.review_limits)
            wait = str(max(1, math.ceil(exc.retry_after_s)))
            return Admitted(Verdict(facts, adapter_denial(Reason.RATE_LIMITED, exc.reason)), wait)
        except AuthenticationFailed as exc:
            return Admitted(Verdict(facts, adapter_denial(Reason.AUTH_REQUIRED, exc.reason)))
        except IdentityUnavailable as exc:  # e.g. the pod index is older than identity.max_staleness_s
            return Admitted(Verdict(facts, adapter_denial(Reason.UNKNOWN_CLIENT, exc.reason)))
        limited, retry_after = self.limits(client_id, identity)
        if limited is not None:
            return Admitted(Verdict(replace(facts, identity=identity), limited), retry_after)
        return Admitted(await self.gate.decide_target(identity, facts.target, facts.port, facts.host_header))

    def limits(self, client_id: str, identity: Identity | None) -> tuple[Decision | None, str | None]:
        """The namespace's connection share (a client whose namespace was not known at accept, e.g. a token
        identity, is counted when identified), then `limits.namespace_rate` (one token per new tunnel or plain-HTTP
        request, before any DNS query). Returns the denial, or None, and the Retry-After of a rate limit."""
        if identity is None:
            return None, None
        namespace = identity.namespace
        if not self.namespace_connections.counted(client_id) and not self.namespace_connections.admit(
            client_id, namespace
        ):
            return self._share_denial(namespace), None
        if not self.rate.enabled:
            return None, None
        outcome = self.rate.acquire(namespace)
        if outcome.allowed:
            return None, None
        retry_after = outcome.retry_after_header
        message = f"namespace {namespace} exceeds {self.rate.describe()}; retry in {retry_after} s"
        return adapter_denial(Reason.RATE_LIMITED, message), retry_after

    def _share_denial(self, namespace: str) -> Decision:
        return adapter_denial(
            Reason.CONNECTION_LIMIT,
            f"namespace {namespace} already holds its share of {self.namespace_connections.share} connections"
            " (limits.namespace_connections)",
        )
