"""The gateway's decision procedure around the engine: identity, target, resolution, pinning, SNI.

Owns: `Gate.decide_target` (everything that can be decided before any byte reaches a destination: readiness,
target, rules, DNS and address safety, choosing the one IP to connect to), `Gate.decide_sni` (the ClientHello
checks) and `Gate.redecide` (hot reload). No mitmproxy imports: the addon translates hooks into these calls, which
keeps this procedure testable with plain values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from egress_gateway.identity.base import IdentityResolver
from egress_gateway.policy.decision import Decision, Facts, Identity, IPAddress, Reason, adapter_denial
from egress_gateway.policy.engine import Engine
from egress_gateway.policy.errors import InvalidTarget
from egress_gateway.policy.model import Protocol
from egress_gateway.policy.targets import normalize_host
from egress_gateway.proxy.own import OwnAddresses
from egress_gateway.proxy.resolver import ResolveError, Resolver

# Denials that no destination address can turn into an allow: answered before any DNS query is sent.
_ADDRESS_INDEPENDENT = frozenset(
    {
        Reason.UNKNOWN_CLIENT,
        Reason.INVALID_TARGET,
        Reason.DENIED_BY_RULE,
        Reason.NO_POLICY,
        Reason.SNI_MISMATCH,
        Reason.HOST_MISMATCH,
    }
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of the pre-connect checks. `facts.destination_ip` is the pinned address when allowed."""

    facts: Facts
    decision: Decision
    candidates: tuple[IPAddress, ...] = ()

    @property
    def address(self) -> IPAddress | None:
        return self.facts.destination_ip


def same_host(a: str, b: str) -> bool:
    """Do two spellings name the same host? Only names the normalizer accepts can be the same."""
    try:
        return normalize_host(a) == normalize_host(b)
    except InvalidTarget:
        return False


class Gate:
    def __init__(
        self,
        engine: Engine,
        identity: IdentityResolver,
        resolver: Resolver,
        ready: Callable[[], bool],
        own: OwnAddresses | None = None,
    ) -> None:
        self.engine = engine
        self.identity = identity
        self.resolver = resolver
        self.ready = ready
        self.own = own if own is not None else OwnAddresses()

    def _checked(self, facts: Facts, decision: Decision, candidates: tuple[IPAddress, ...]) -> Verdict:
        """An engine decision for a pinned address, overridden when that address is the gateway itself."""
        address = facts.destination_ip
        if decision.allowed and address is not None:
            itself = self.own.dials_itself(address, facts.port)
            if itself is not None:
                decision = adapter_denial(Reason.SELF_CONNECT, f"{itself}; the gateway never connects to itself")
        return Verdict(facts, decision, candidates)

    async def identify(self, client_ip: str, proxy_authorization: str | None) -> Identity | None:
        """May raise `AuthenticationFailed` (-> 407)."""
        return await self.identity.identify(client_ip, proxy_authorization)

    def namespace_of_address(self, client_ip: str) -> str | None:
        """The client's namespace from its source address alone (no request yet), when the identity modes know it."""
        lookup = getattr(self.identity, "namespace_of_address", None)
        return lookup(client_ip) if lookup is not None else None

    def not_ready(self) -> Decision | None:
        if self.ready():
            return None
        return adapter_denial(
            Reason.POLICIES_NOT_LOADED, "the gateway has not loaded its policies yet; every connection is denied"
        )

    async def decide_target(
        self, identity: Identity | None, host: str, port: int, host_header: str | None = None
    ) -> Verdict:
        facts = Facts(identity=identity, target=host, port=port, host_header=host_header)
        first = self.engine.decide(facts)
        if not first.allowed and first.reason in _ADDRESS_INDEPENDENT:
            return Verdict(facts, first)
        try:
            normalized = normalize_host(host)
        except InvalidTarget:  # the engine has already said so; keep its wording
            return Verdict(facts, first)
        if normalized.ip is not None:
            pinned = Facts(identity, host, port, host_header=host_header, destination_ip=normalized.ip)
            return self._checked(pinned, self.engine.decide(pinned), (normalized.ip,))
        name = normalized.name or host
        try:
            candidates = await self.resolver.resolve(name)
        except ResolveError as exc:
            return Verdict(facts, adapter_denial(exc.reason, exc.message))
        if not candidates:  # e.g. an empty resolver.hosts entry; never connect without a checked address
            return Verdict(facts, adapter_denial(Reason.DNS_ERROR, f"{name} resolved to no addresses"))
        first_denial: Verdict | None = None
        for address in candidates:
            # `facts` with the address, built directly (half the cost of `replace`; once per candidate)
            pinned = Facts(identity, host, port, host_header=host_header, destination_ip=address)
            verdict = self._checked(pinned, self.engine.decide(pinned), candidates)
            if verdict.decision.allowed:
                return verdict
            if first_denial is None:
                first_denial = verdict
        return first_denial or Verdict(facts, adapter_denial(Reason.DNS_ERROR, f"{name} resolved to no addresses"))

    def decide_sni(self, verdict: Verdict, sni: str | None) -> Verdict:
        """Re-decide a tunnel with the SNI its ClientHello carries (consistency and SNI deny rules)."""
        was = verdict.facts  # every field: `replace` would cost twice as much on every tunnel
        facts = Facts(was.identity, was.target, was.port, sni, was.host_header, was.destination_ip, Protocol.TLS)
        protocols = verdict.decision.protocols
        if (
            sni is not None
            and (protocols is None or Protocol.TLS in protocols)
            and same_host(sni, verdict.facts.target)
        ):
            # The SNI names exactly the CONNECT host (by the one normalizer every name goes through) and the
            # CONNECT's rule allows TLS: the engine would consult nothing new, so the CONNECT decision stands.
            # Saves one decision on nearly every tunnel.
            return Verdict(facts, verdict.decision, verdict.candidates)
        return Verdict(facts, self.engine.decide(facts), verdict.candidates)

    def decide_host(self, verdict: Verdict, host_header: str) -> Verdict:
        """Re-decide a tunnel with the Host of an HTTP/1 request inside it (checked like plain HTTP)."""
        facts = replace(verdict.facts, host_header=host_header, protocol=Protocol.HTTP)
        return Verdict(facts, self.engine.decide(facts), verdict.candidates)

    def decide_protocol(self, verdict: Verdict, protocol: Protocol) -> Verdict:
        """Re-decide a tunnel whose bytes are opaque (TCP): only a rule listing the protocol allows it."""
        facts = replace(verdict.facts, protocol=protocol)
        return Verdict(facts, self.engine.decide(facts), verdict.candidates)

    def check_original_destination(self, verdict: Verdict, original: IPAddress | None) -> Verdict:
        """Transparent mode after a NAT redirect: the address the client connected to must be one the name resolves
        to (else a client could present an allowed SNI while connecting to any address). The pinned address is
        dialed either way; this only denies. `original` None: no redirect to check (DNS steering, or off)."""
        if original is None or not verdict.decision.allowed:
            return verdict
        candidates = verdict.candidates or ((verdict.address,) if verdict.address is not None else ())
        if original in candidates:
            return verdict
        shown = ", ".join(str(a) for a in candidates) or "nothing"
        return Verdict(
            verdict.facts,
            adapter_denial(
                Reason.DESTINATION_MISMATCH,
                f"the client connected to {original}, but {verdict.facts.target} resolves to {shown}",
            ),
            verdict.candidates,
        )

    def redecide(self, facts: Facts) -> Decision:
        return self._checked(facts, self.engine.decide(facts), ()).decision
