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
from typing import Any

import idna

from egress_gateway.policy.decision import Decision, Facts, Identity

AttributeValue = str | bool | int | float | tuple[str, ...]

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
K8S_POD_UID = "k8s.pod.uid"
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
CHANGE = "egress.change"  # revoked/expired: the change that re-decided the tunnel, in words
CHANGE_POLICIES = "egress.change.policies"  # revoked/expired: the policies it added, removed or edited ("; ")
SERVER_ADDRESS_UNICODE = "egress.server.address.unicode"  # the U-label form of an IDN server.address (display)
TLS_SERVER_NAME_UNICODE = "egress.tls.server_name.unicode"  # the same for the SNI
POLICY_SNAPSHOT = "egress.policy_snapshot"  # the `policy` record (trail) in force when it was decided
POLICY_ANNOTATION_PREFIX = "egress.policy.annotation."  # + an annotation named in audit.policy_annotations
DECIDERS = "egress.deciders"  # every policy that shaped the decision, per tier, with versions ("; "-separated)
MATCHED = "egress.matched"
LOGGED = "egress.logged"
WOULD_DENY = "egress.would_deny"
WOULD_DENY_REASON = "egress.would_deny.reason"
WOULD_DENY_POLICY = "egress.would_deny.policy"
WOULD_DENY_POLICY_VERSION = "egress.would_deny.policy.version"
WOULD_DENY_RULE = "egress.would_deny.rule"
TLS = "egress.tls"
TLS_ALPN = "egress.tls_alpn"  # the ALPN protocol ids the ClientHello offered, in order (an array)
TIMEOUT = "egress.timeout"  # the client timer that closed the connection (`client_hello`)
TIMEOUT_RECEIVED_BYTES = "egress.timeout.received_bytes"  # what the client had sent when it fired
TIMEOUT_RECEIVED = "egress.timeout.received"  # what that looked like: nothing, partial_tls_client_hello, ...
TLS_ECH = "egress.tls_ech"  # the ClientHello carried an encrypted_client_hello extension (its SNI is the outer name)
HOST_HEADER = "egress.host_header"
PROTOCOL = "egress.protocol"  # what a tunnel was seen to carry: TLS, HTTP or TCP
SERVICE_ACCOUNT = "egress.service_account"
BYTES_SENT = "egress.bytes_sent"
BYTES_RECEIVED = "egress.bytes_received"

# Every attribute name above (not the prefixes).
NAMES = frozenset(v for k, v in list(globals().items()) if k.isupper() and type(v) is str and "PREFIX" not in k)

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
    "tls_alpn": TLS_ALPN,
    "tls_ech": TLS_ECH,
    "timeout": TIMEOUT,
    "timeout_received_bytes": TIMEOUT_RECEIVED_BYTES,
    "timeout_received": TIMEOUT_RECEIVED,
    "host_header": HOST_HEADER,
}

# Anything that smells like a credential is never recorded, whatever the caller passes.
_SECRET_RE = re.compile(
    r"authorization|proxy[_-]?auth|token|secret|password|passwd|cookie|credential|api[_-]?key", re.IGNORECASE
)


@lru_cache(maxsize=1024)  # keys are a small vocabulary; checked for every attribute and log field
def is_secret_key(key: str) -> bool:
    return bool(_SECRET_RE.search(key))


def safe_text(value: str) -> str:
    """`value` as text every encoder can write: a lone surrogate (a byte that was not UTF-8, kept by mitmproxy's
    `surrogateescape`) becomes its backslash escape (`\\xff`), so a Host or SNI from the wire is kept, visibly and
    recoverably, and never makes the trail, OTLP or a log line fail. Control characters are left to JSON's escaping."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        pass
    try:
        raw = value.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate that surrogateescape did not make (U+D800..U+DC7F)
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def to_attribute_value(value: Any) -> AttributeValue | None:
    """Coerce a value to an OpenTelemetry attribute primitive; None means "leave unset"."""
    kind = type(value)
    if kind is str:
        return value if value.isascii() else safe_text(value)
    if kind is bool or kind is int or kind is float or value is None:
        return value
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, str):
        return safe_text(value)
    if isinstance(value, bool | int | float):
        return value
    if isinstance(value, tuple | list):  # an array attribute: its items as text
        return tuple([item if type(item) is str and item.isascii() else safe_text(str(item)) for item in value])
    return safe_text(str(value))


def proxy_attributes(values: Mapping[str, Any]) -> dict[str, AttributeValue]:
    """Map `set(**values)` keys from the proxy to attribute names; secrets and None are dropped, unknown keys land
    under `egress.` so nothing the proxy reports is silently lost."""
    out: dict[str, AttributeValue] = {}
    for key, value in values.items():
        name = PROXY_KEYS.get(key)  # none of these looks like a secret
        if name is None:
            if is_secret_key(key):
                continue
            name = key if key.startswith("egress.") else "egress." + key.removeprefix("egress_")
        coerced = to_attribute_value(value)
        if coerced is not None:
            out[name] = coerced
    return out


def identity_attributes(identity: Identity | None) -> dict[str, AttributeValue]:
    if identity is None:
        return {}
    out: dict[str, AttributeValue] = {K8S_NAMESPACE: identity.namespace}
    if identity.pod:
        out[K8S_POD] = identity.pod
    if identity.pod_uid:
        out[K8S_POD_UID] = identity.pod_uid
    if identity.service_account:
        out[SERVICE_ACCOUNT] = identity.service_account
    # Bounded so a pod with hundreds of labels cannot push the core attributes out of the span.
    for key, value in sorted(identity.labels.items())[:MAX_LABELS]:
        out[K8S_POD_LABEL_PREFIX + key] = value
    for key, value in sorted(identity.namespace_labels.items())[:MAX_LABELS]:
        out[K8S_NAMESPACE_LABEL_PREFIX + key] = value
    return out


def name_forms(name: str) -> tuple[str, str | None]:
    """A name as recorded: its A-label (punycode) form, and its U-label form for display when the two differ (a
    name sent in Unicode, or an `xn--` name). A name IDNA cannot convert is recorded as sent (escaped)."""
    if name.isascii():
        if "xn--" not in name.lower():
            return name, None
        try:
            return name, safe_text(idna.decode(name))
        except (idna.IDNAError, UnicodeError, ValueError):
            return name, None
    try:
        return idna.encode(name, uts46=True).decode("ascii"), safe_text(name)
    except (idna.IDNAError, UnicodeError, ValueError):
        return safe_text(name), None


def add_facts_attributes(out: dict[str, AttributeValue], facts: Facts) -> None:
    """The attributes of `facts` but its identity (`identity_attributes`), written into `out`."""
    out[SERVER_ADDRESS], display = name_forms(facts.target)
    if display is not None:
        out[SERVER_ADDRESS_UNICODE] = display
    out[SERVER_PORT] = facts.port
    if facts.sni is not None:
        out[TLS_SERVER_NAME], display = name_forms(facts.sni)
        if display is not None:
            out[TLS_SERVER_NAME_UNICODE] = display
    if facts.host_header is not None:
        out[HOST_HEADER] = safe_text(facts.host_header)
    if facts.protocol is not None:
        out[PROTOCOL] = str(facts.protocol)
    if facts.destination_ip is not None:
        out[NETWORK_PEER_ADDRESS] = str(facts.destination_ip)


def decision_attributes(decision: Decision) -> dict[str, AttributeValue]:
    out: dict[str, AttributeValue] = {
        DECISION: decision.verdict,
        REASON: str(decision.reason.value),
        MESSAGE: safe_text(decision.message),
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
