"""Attribute names of the audit trail, and the mapping from `Facts`/`Decision` to them.

Owns the vocabulary shared by spans, decision log lines, the JSON-lines trail reader and replay: semantic
convention names where they exist (`client.address`, `server.address`, `tls.client.server_name`, ...), our own
under `egress.*`. Pure: imports only the decision types; no OpenTelemetry, no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from enum import Enum
from functools import lru_cache
from ipaddress import IPv4Address, IPv6Address
from typing import Any

from egress_gateway.policy.decision import Decision, Facts, Identity, PolicyRef, Reason

AttributeValue = str | bool | int | float

# Semantic conventions (https://opentelemetry.io/docs/specs/semconv/).
CLIENT_ADDRESS = "client.address"
CLIENT_PORT = "client.port"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"
NETWORK_PEER_ADDRESS = "network.peer.address"  # the IP the gateway pinned and connected to
TLS_SERVER_NAME = "tls.client.server_name"
HTTP_METHOD = "http.request.method"
HTTP_STATUS = "http.response.status_code"
K8S_NAMESPACE = "k8s.namespace.name"
K8S_POD = "k8s.pod.name"
K8S_POD_LABEL_PREFIX = "k8s.pod.label."
K8S_NAMESPACE_LABEL_PREFIX = "k8s.namespace.label."

# Ours.
DECISION = "egress.decision"  # "allow" | "deny"
REASON = "egress.reason"
MESSAGE = "egress.message"
POLICY = "egress.policy"  # "EgressPolicy/namespace/name"
POLICY_VERSION = "egress.policy.version"
RULE = "egress.rule"
TIER = "egress.tier"  # "Admin" | "Namespace" | "Baseline": the tier whose rule or allowlist decided
DECIDERS = "egress.deciders"  # every policy that shaped the decision, per tier, with versions ("; "-separated)
MATCHED = "egress.matched"
LOGGED = "egress.logged"
WOULD_DENY = "egress.would_deny"
WOULD_DENY_REASON = "egress.would_deny.reason"
WOULD_DENY_POLICY = "egress.would_deny.policy"
WOULD_DENY_POLICY_VERSION = "egress.would_deny.policy.version"
WOULD_DENY_RULE = "egress.would_deny.rule"
TLS = "egress.tls"
HOST_HEADER = "egress.host_header"
PROTOCOL = "egress.protocol"  # what a tunnel was seen to carry: TLS, HTTP or TCP
SERVICE_ACCOUNT = "egress.service_account"
BYTES_SENT = "egress.bytes_sent"
BYTES_RECEIVED = "egress.bytes_received"

MAX_LABELS = 32

# Keys the proxy passes to `ConnectionRecord.set()` -> attribute names.
PROXY_KEYS: Mapping[str, str] = {
    "network_peer_address": NETWORK_PEER_ADDRESS,
    "server_address": SERVER_ADDRESS,
    "server_port": SERVER_PORT,
    "tls_client_server_name": TLS_SERVER_NAME,
    "http_response_status_code": HTTP_STATUS,
    "http_request_method": HTTP_METHOD,
    "egress_tls": TLS,
    "tls": TLS,
    "host_header": HOST_HEADER,
}

# Anything that smells like a credential is never recorded, whatever the caller passes.
_SECRET_RE = re.compile(
    r"authorization|proxy[_-]?auth|token|secret|password|passwd|cookie|credential|api[_-]?key", re.IGNORECASE
)


@lru_cache(maxsize=4096)  # keys are a small vocabulary; checked for every attribute and log field
def is_secret_key(key: str) -> bool:
    return bool(_SECRET_RE.search(key))


_PRIMITIVES = frozenset((str, bool, int, float))


def to_attribute_value(value: Any) -> AttributeValue | None:
    """Coerce a value to an OpenTelemetry attribute primitive; None means "leave unset"."""
    if type(value) in _PRIMITIVES:  # exactly a primitive (an Enum member is a subclass): as is
        return value
    if value is None:
        return None
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, IPv4Address | IPv6Address | PolicyRef):
        return str(value)
    return str(value)


_MAX_CACHED = 4096
# `set()` key -> attribute name, or "" for a credential-looking key (dropped).
_proxy_names: dict[str, str] = {}


def _proxy_name(key: str) -> str:
    if is_secret_key(key):
        name = ""
    else:
        name = PROXY_KEYS.get(key) or (key if key.startswith("egress.") else "egress." + key.removeprefix("egress_"))
    if len(_proxy_names) >= _MAX_CACHED:
        _proxy_names.clear()
    _proxy_names[key] = name
    return name


def proxy_attributes(values: Mapping[str, Any]) -> dict[str, AttributeValue]:
    """Map `set(**values)` keys from the proxy to attribute names; secrets and None are dropped.

    Unknown keys land under `egress.` so nothing the proxy reports is silently lost.
    """
    out: dict[str, AttributeValue] = {}
    names = _proxy_names
    for key, value in values.items():
        name = names.get(key)
        if name is None:
            name = _proxy_name(key)
        if not name:
            continue
        coerced = to_attribute_value(value)
        if coerced is None:
            continue
        out[name] = coerced
    return out


# id(identity) -> (identity, its attributes). Identities are immutable values (frozen, labels copied into a read-only
# mapping by the resolvers), and the resolvers hand out the same object for every connection of a workload.
_identity_attributes: dict[int, tuple[Identity, dict[str, AttributeValue]]] = {}
# The last IP written as text, and its text (a tunnel reports the same address object at CONNECT and at the SNI).
_last_ip: tuple[Any, str] = (None, "")


def identity_attributes(identity: Identity | None) -> dict[str, AttributeValue]:
    if identity is None:
        return {}
    cached = _identity_attributes.get(id(identity))
    if cached is not None and cached[0] is identity:
        return dict(cached[1])
    out: dict[str, AttributeValue] = {K8S_NAMESPACE: identity.namespace}
    if identity.pod:
        out[K8S_POD] = identity.pod
    if identity.service_account:
        out[SERVICE_ACCOUNT] = identity.service_account
    # Bounded so a pod with hundreds of labels cannot push the core attributes out of the span.
    for key, value in sorted(identity.labels.items())[:MAX_LABELS]:
        out[K8S_POD_LABEL_PREFIX + key] = value
    for key, value in sorted(identity.namespace_labels.items())[:MAX_LABELS]:
        out[K8S_NAMESPACE_LABEL_PREFIX + key] = value
    if len(_identity_attributes) >= _MAX_CACHED:
        _identity_attributes.clear()
    _identity_attributes[id(identity)] = (identity, out)  # holds the identity: its id cannot be reused meanwhile
    return dict(out)


def facts_attributes(facts: Facts) -> dict[str, AttributeValue]:
    global _last_ip
    out = identity_attributes(facts.identity)
    out[SERVER_ADDRESS] = facts.target
    out[SERVER_PORT] = facts.port
    if facts.sni is not None:
        out[TLS_SERVER_NAME] = facts.sni
    if facts.host_header is not None:
        out[HOST_HEADER] = facts.host_header
    if facts.protocol is not None:
        out[PROTOCOL] = str(facts.protocol)
    ip = facts.destination_ip
    if ip is not None:
        last = _last_ip
        if last[0] is not ip:
            last = _last_ip = (ip, str(ip))
        out[NETWORK_PEER_ADDRESS] = last[1]
    return out


def decision_attributes(decision: Decision) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {
        DECISION: decision.verdict,
        REASON: str(decision.reason.value),
        MESSAGE: decision.message,
        LOGGED: decision.logged,
        WOULD_DENY: decision.would_deny,
    }
    if decision.policy is not None:
        out[POLICY] = str(decision.policy)
        out[POLICY_VERSION] = decision.policy.version
    if decision.rule is not None:
        out[RULE] = decision.rule
    if decision.matched is not None:
        out[MATCHED] = decision.matched
    if decision.tier is not None:
        out[TIER] = decision.tier
    if decision.deciders:
        out[DECIDERS] = "; ".join([d.text for d in decision.deciders])
    if decision.would_deny:
        if decision.audit_reason is not None:
            out[WOULD_DENY_REASON] = str(decision.audit_reason.value)
        if decision.audit_policy is not None:
            out[WOULD_DENY_POLICY] = str(decision.audit_policy)
            out[WOULD_DENY_POLICY_VERSION] = decision.audit_policy.version
        if decision.audit_rule is not None:
            out[WOULD_DENY_RULE] = decision.audit_rule
    return out


# Reasons the policy engine produces. Other reasons (dns_error, connection_refused, rate_limited, revoked, ...) are
# outcomes decided around the engine; a record's policy verdict is its last decision with one of these.
ENGINE_REASONS = frozenset(
    str(r.value)
    for r in (
        Reason.INVALID_TARGET,
        Reason.SNI_MISMATCH,
        Reason.HOST_MISMATCH,
        Reason.UNKNOWN_CLIENT,
        Reason.BLOCKED_ADDRESS,
        Reason.PRIVATE_ADDRESS,
        Reason.DENIED_BY_RULE,
        Reason.ALLOWED_BY_RULE,
        Reason.NO_MATCHING_RULE,
        Reason.NO_POLICY,
    )
)
