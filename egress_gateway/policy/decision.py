"""Facts in, decision out: the value types the engine exchanges with its adapters.

Owns: `Identity`, `Facts`, `Decision`, `PolicyRef`, `Reason`. Pure data; no I/O and no imports of the proxy,
sources, identity or audit packages. Adapters build `Facts` and read `Decision`; nothing else crosses the boundary.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from ipaddress import IPv4Address, IPv6Address
from types import MappingProxyType

IPAddress = IPv4Address | IPv6Address

_EMPTY: Mapping[str, str] = MappingProxyType({})


class Reason(StrEnum):
    """Reason codes. The engine produces the first group; the proxy and sources add the second."""

    # engine
    INVALID_TARGET = "invalid_target"
    SNI_MISMATCH = "sni_mismatch"
    HOST_MISMATCH = "host_mismatch"
    UNKNOWN_CLIENT = "unknown_client"
    BLOCKED_ADDRESS = "blocked_address"
    PRIVATE_ADDRESS = "private_address"
    DENIED_BY_RULE = "denied_by_rule"
    ALLOWED_BY_RULE = "allowed_by_rule"
    NO_MATCHING_RULE = "no_matching_rule"
    NO_POLICY = "no_policy"
    # adapters (proxy, sources, identity)
    POLICIES_NOT_LOADED = "policies_not_loaded"
    DNS_ERROR = "dns_error"
    DNS_TIMEOUT = "dns_timeout"
    CONNECTION_REFUSED = "connection_refused"
    CONNECTION_TIMEOUT = "connection_timeout"
    REVOKED = "revoked"
    EXPIRED = "expired"  # an open tunnel re-decided when a rule's `expires` passed, and now denied
    AUTH_REQUIRED = "auth_required"
    RATE_LIMITED = "rate_limited"
    CONNECTION_LIMIT = "connection_limit"
    BAD_REQUEST = "bad_request"
    CLIENT_TIMEOUT = "client_timeout"
    URI_TOO_LONG = "uri_too_long"
    HEADERS_TOO_LARGE = "headers_too_large"
    SELF_CONNECT = "self_connect"
    PROTOCOL_NOT_ALLOWED = "protocol_not_allowed"  # engine: the matching Allow rule does not list the protocol
    NO_SNI = "no_sni"  # transparent mode: nothing names the destination (no SNI, no Host)
    DESTINATION_MISMATCH = "destination_mismatch"  # transparent mode: the original destination is not the name's


@dataclass(frozen=True, slots=True)
class Identity:
    """The workload behind a connection."""

    namespace: str
    pod: str | None = None
    labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    namespace_labels: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    service_account: str | None = None
    pod_uid: str | None = None  # metadata.uid of the pod (a pod name can be reused; its UID never is); not matched on


@dataclass(frozen=True, slots=True)
class Facts:
    """What one connection (or one plain-HTTP request) presents to the engine.

    `target` is the host as requested (CONNECT authority or absolute-URI host): a name or an IP literal in any
    form a client may send (the engine normalizes it). `destination_ip` is the address the gateway resolved and
    will connect to; None when not known yet (then CIDR rules and address safety are not evaluated).
    `host_header` is set for plain HTTP only (its presence marks the request as plain HTTP).
    `protocol` is what a tunnel was seen to carry ("TLS", "HTTP", "TCP"); None before its first bytes (a CONNECT).
    """

    identity: Identity | None
    target: str
    port: int
    sni: str | None = None
    host_header: str | None = None
    destination_ip: IPAddress | None = None
    protocol: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyRef:
    kind: str
    namespace: str | None
    name: str
    version: str

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind}/{where}{self.name}"


@dataclass(frozen=True, slots=True)
class Decider:
    """One policy that shaped a decision in one tier: the rule that decided, a Pass that skipped the rest of a tier,
    or (verdict "NoMatch") a namespace-tier policy whose selection allowlisted the client."""

    tier: str  # "Admin" | "Namespace" | "Baseline"
    policy: PolicyRef
    verdict: str  # "Allow" | "Deny" | "Log" | "Pass" | "NoMatch"
    rule: str | None = None
    text: str = field(init=False, repr=False, compare=False)  # built once: the engine reuses one Decider per rule

    def __post_init__(self) -> None:
        rule = f" rule {self.rule}" if self.rule else ""
        object.__setattr__(
            self, "text", f"{self.tier}: {self.policy} (version {self.policy.version}){rule} -> {self.verdict}"
        )

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: Reason
    message: str
    policy: PolicyRef | None = None
    rule: str | None = None
    matched: str | None = None
    logged: bool = False
    would_deny: bool = False
    audit_reason: Reason | None = None
    audit_policy: PolicyRef | None = None
    audit_rule: str | None = None
    protocols: frozenset[str] | None = None  # allowed: what the deciding rule lets the tunnel carry (None: any)
    tier: str | None = None  # the tier whose rule (or allowlist) decided; None for steps 1-3, 6 and default_action
    deciders: tuple[Decider, ...] = ()  # every policy that shaped the enforced decision, in tier order
    audit_deciders: tuple[Decider, ...] = ()  # the same for the audit decision when would_deny

    @property
    def verdict(self) -> str:
        return "allow" if self.allowed else "deny"


def adapter_denial(reason: Reason, message: str) -> Decision:
    """A deny decided outside the engine (resolver failure, readiness, limits), in the same shape."""
    return Decision(allowed=False, reason=reason, message=message)
