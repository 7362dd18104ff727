"""The EgressPolicy API (group egressgateway.io, versions v1alpha2 and v1alpha1) as pydantic models.

These models are the single source of truth: the CRDs (`crd.py`), the file loader, the Kubernetes watcher and
`lint` all go through them. Per-item checks (host grammar, CIDR syntax, ports) live here so that pydantic reports
them with their index; checks across fields live in `validation.py`. Pure: no I/O.

v1alpha2 is the storage version and the only one the engine sees: `to_storage_version` converts a v1alpha1 object
(a v1alpha1 ClusterEgressPolicy keeps its old meaning as `tier: Namespace`; see docs/policy-reference.md).
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from egress_gateway.policy.errors import InvalidName
from egress_gateway.policy.hostnames import parse_host_pattern

API_GROUP = "egressgateway.io"
API_VERSION = "v1alpha2"  # the storage version: what the watcher reads and the CRDs store
LEGACY_API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"
LEGACY_GROUP_VERSION = f"{API_GROUP}/{LEGACY_API_VERSION}"
GROUP_VERSIONS = (GROUP_VERSION, LEGACY_GROUP_VERSION)
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

RULE_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"
_PORT_RANGE_RE = re.compile(r"^\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?$")


class Mode(StrEnum):
    ENFORCE = "Enforce"
    AUDIT = "Audit"


class Action(StrEnum):
    ALLOW = "Allow"
    DENY = "Deny"
    LOG = "Log"
    PASS = "Pass"  # ClusterEgressPolicy (Admin and Baseline tiers) only: skip the rest of this tier


class Tier(StrEnum):
    """Where a ClusterEgressPolicy is evaluated (docs/policy-reference.md, "Tiers")."""

    ADMIN = "Admin"  # before namespaced policies; first Allow/Deny decides
    NAMESPACE = "Namespace"  # together with the namespace's EgressPolicies (what a v1alpha1 cluster policy means)
    BASELINE = "Baseline"  # after namespaced policies, before default_action


PRIORITY_MIN = 0
PRIORITY_MAX = 1000
DEFAULT_PRIORITY = PRIORITY_MAX


class Protocol(StrEnum):
    """What a tunnel carries, as the gateway sees its first bytes."""

    TLS = "TLS"
    HTTP = "HTTP"
    TCP = "TCP"  # opaque bytes: neither a TLS ClientHello nor an HTTP/1 request


DEFAULT_PROTOCOLS = (Protocol.TLS, Protocol.HTTP)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


def _check_host(value: str) -> str:
    try:
        return parse_host_pattern(value).text
    except InvalidName as exc:
        raise ValueError(str(exc)) from None


def _check_cidr(value: str) -> str:
    text = value.strip()
    try:
        return str(ipaddress.ip_network(text, strict=True))
    except ValueError:
        pass
    try:
        loose = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ValueError(f"{value!r} is not a CIDR (e.g. '203.0.113.0/24' or '2001:db8::/32')") from None
    raise ValueError(f"{value!r} has host bits set; did you mean '{loose}'?")


def _check_port(value: Any) -> int | str:
    if isinstance(value, bool):
        raise ValueError("a port is a number (443) or a range string ('8000-8100')")
    if isinstance(value, int):
        if not 1 <= value <= 65535:
            raise ValueError(f"port {value} is outside 1..65535")
        return value
    if isinstance(value, str):
        match = _PORT_RANGE_RE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a port or a range like '8000-8100'")
        low = int(match.group(1))
        high = int(match.group(2) or low)
        if not (1 <= low <= 65535 and 1 <= high <= 65535):
            raise ValueError(f"{value!r} is outside 1..65535")
        if low > high:
            raise ValueError(f"{value!r} is an empty range (start > end); write '{high}-{low}'")
        return low if low == high else f"{low}-{high}"
    raise ValueError("a port is a number (443) or a range string ('8000-8100')")


def _check_expires(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("expires needs a time zone, e.g. '2026-12-31T00:00:00Z'")
    return value


def _check_namespaced_action(value: Action) -> Action:
    if value is Action.PASS:
        raise ValueError("Pass only exists in a ClusterEgressPolicy (it skips the rest of a tier); use Allow or Deny")
    return value


# What the CRD schema can say of each entry (the API server checks these; `_check_*` above stay the authority and
# give the hints). The patterns accept everything the checks accept, and reject what a regular expression can see:
# hosts: a wildcard that is not a whole label, `**` not leftmost, a wildcard in or directly above the last label,
# single-label names, empty labels, IP literals (an all-digit last label, or ':'); cidrs: anything that is not an
# IPv4 or IPv6 network with a valid prefix length; ports: numbers and range ends outside 1-65535.
_LABEL = r"[^.*\s:/@\[\]]{1,63}"
_TOP_LABEL = r"[^.*\s:/@\[\]]*[^.*\s:/@\[\]0-9][^.*\s:/@\[\]]*"
HOST_SCHEMA_PATTERN = rf"^(\*\*\.)?({_LABEL}\.|\*\.)*{_LABEL}\.{_TOP_LABEL}\.?$"
_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
CIDR_SCHEMA_PATTERN = (
    rf"^\s*({_OCTET}\.){{3}}{_OCTET}(/(3[0-2]|[12]?[0-9]))?\s*$"
    r"|^\s*[0-9A-Fa-f]*:[0-9A-Fa-f:.]*(/(12[0-8]|1[01][0-9]|[1-9]?[0-9]))?\s*$"
)
_PORT = r"0{0,4}([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])"
PORT_SCHEMA_PATTERN = rf"^\s*{_PORT}\s*(-\s*{_PORT}\s*)?$"

HostEntry = Annotated[
    str,
    AfterValidator(_check_host),
    WithJsonSchema({"type": "string", "minLength": 3, "maxLength": 254, "pattern": HOST_SCHEMA_PATTERN}),
]
CidrEntry = Annotated[
    str, AfterValidator(_check_cidr), WithJsonSchema({"type": "string", "pattern": CIDR_SCHEMA_PATTERN})
]
PortEntry = Annotated[
    int | str,
    BeforeValidator(_check_port),
    WithJsonSchema(
        {"x-kubernetes-int-or-string": True, "minimum": 1, "maximum": 65535, "pattern": PORT_SCHEMA_PATTERN}
    ),
]
RULES_LIST_MAP: dict[str, Any] = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}


class LabelSelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(_Model):
    """One term of a LabelSelector."""

    key: str = Field(min_length=1, description="The label key the term applies to.")
    operator: LabelSelectorOperator = Field(description="In | NotIn (need values) | Exists | DoesNotExist (take none).")
    values: list[str] | None = Field(default=None, description="Label values for In and NotIn.")


class LabelSelector(_Model):
    """Kubernetes LabelSelector. Empty (or omitted) selects everything."""

    match_labels: dict[str, str] | None = Field(
        default=None, alias="matchLabels", description="Labels that must all be present with these values."
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        default=None, alias="matchExpressions", description="Terms that must all hold (ANDed with matchLabels)."
    )


_RULE_FIELDS = "An egress rule: a rule matches when its ports match and a host or CIDR matches."


class Rule(_Model):
    __doc__ = _RULE_FIELDS

    name: str = Field(
        min_length=1,
        max_length=63,
        pattern=RULE_NAME_PATTERN,
        description="Required, unique within the policy ([a-z0-9-], at most 63 characters); named in every decision.",
    )
    action: Annotated[Action, AfterValidator(_check_namespaced_action)] = Field(
        default=Action.ALLOW,
        description="Allow (default) | Deny | Log (allow and flag the record for review).",
        json_schema_extra={"enum": [Action.ALLOW.value, Action.DENY.value, Action.LOG.value]},
    )
    hosts: list[HostEntry] | None = Field(
        default=None,
        description="Host names: exact, '*' = exactly one label, leading '**' = one or more labels. No IPs.",
    )
    cidrs: list[CidrEntry] | None = Field(
        default=None, description="Destination IP ranges ('203.0.113.0/24', '2001:db8::/32'); host bits zero."
    )
    except_: list[CidrEntry] | None = Field(
        default=None, alias="except", description="Carve-outs from cidrs; each must lie inside one of cidrs."
    )
    ports: list[PortEntry] | None = Field(
        default=None, description="Ports (443) or ranges ('8000-8100') within 1-65535; omitted = any port."
    )
    expires: Annotated[datetime, AfterValidator(_check_expires)] | None = Field(
        default=None, description="After this instant the rule is ignored (RFC 3339 with time zone)."
    )
    protocols: list[Protocol] | None = Field(
        default=None,
        description="Allow/Log rules: what the tunnel may carry (TLS, HTTP, TCP = opaque); omitted = [TLS, HTTP].",
    )


class ClusterRule(Rule):
    __doc__ = _RULE_FIELDS

    action: Action = Field(
        default=Action.ALLOW,
        description="Allow (default) | Deny | Log (allow and flag) | Pass (skip the rest of this tier).",
    )


class EgressPolicySpec(_Model):
    """What the policy selects and the egress rules it applies."""

    pod_selector: LabelSelector | None = Field(
        default=None, alias="podSelector", description="Pods this policy applies to; omitted or {} = every pod."
    )
    mode: Mode = Field(
        default=Mode.ENFORCE, description="Enforce (default) | Audit (records would-deny, changes no traffic)."
    )
    rules: list[Rule] = Field(
        default_factory=list,
        description="Egress rules; any matching Deny wins, else any matching Allow or Log.",
        json_schema_extra=RULES_LIST_MAP,
    )


class ClusterEgressPolicySpecV1Alpha1(EgressPolicySpec):
    """v1alpha1: evaluated together with the namespace's EgressPolicies (tier Namespace in v1alpha2)."""

    namespace_selector: LabelSelector | None = Field(
        default=None, alias="namespaceSelector", description="Namespaces this policy applies to; omitted = all."
    )
    tier: Literal[Tier.NAMESPACE] = Field(
        default=Tier.NAMESPACE,
        description="Always Namespace in v1alpha1: evaluated with the namespace's EgressPolicies (old semantics).",
    )


class ClusterEgressPolicySpec(EgressPolicySpec):
    """What the policy selects, where it is evaluated (tier, priority) and its egress rules."""

    namespace_selector: LabelSelector | None = Field(
        default=None, alias="namespaceSelector", description="Namespaces this policy applies to; omitted = all."
    )
    tier: Tier = Field(
        default=Tier.ADMIN,
        description=(
            "Admin (default): evaluated before namespaced policies, first Allow/Deny decides | Baseline: after them,"
            " before default_action | Namespace: together with the namespace's EgressPolicies (v1alpha1 meaning)."
        ),
    )
    priority: int = Field(
        default=DEFAULT_PRIORITY,
        ge=PRIORITY_MIN,
        le=PRIORITY_MAX,
        description="0-1000, lower is evaluated first within the tier; policies of equal priority decide together.",
    )
    rules: list[ClusterRule] = Field(  # type: ignore[assignment]
        default_factory=list,
        description="Egress rules; within one priority any matching Deny wins, then Allow or Log, then Pass.",
        json_schema_extra=RULES_LIST_MAP,
    )


class ObjectMeta(BaseModel):
    """The parts of Kubernetes ObjectMeta the gateway reads; everything else is accepted and ignored."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    name: str = Field(min_length=1, max_length=253, pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    namespace: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    generation: int | None = None
    resource_version: str | None = Field(default=None, alias="resourceVersion")
    uid: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class EgressPolicy(BaseModel):
    """Egress rules for the pods of one namespace (NetworkPolicy semantics: selecting a pod allowlists it)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    api_version: Literal["egressgateway.io/v1alpha2", "egressgateway.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["EgressPolicy"]
    metadata: ObjectMeta
    spec: EgressPolicySpec


class ClusterEgressPolicy(BaseModel):
    """Egress rules for pods across namespaces, in the Admin, Namespace or Baseline tier."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    api_version: Literal["egressgateway.io/v1alpha2"] = Field(alias="apiVersion")
    kind: Literal["ClusterEgressPolicy"]
    metadata: ObjectMeta
    spec: ClusterEgressPolicySpec


class ClusterEgressPolicyV1Alpha1(BaseModel):
    """The v1alpha1 form; read through `to_storage_version`, never handed to the engine as is."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    api_version: Literal["egressgateway.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["ClusterEgressPolicy"]
    metadata: ObjectMeta
    spec: ClusterEgressPolicySpecV1Alpha1


PolicyObject = EgressPolicy | ClusterEgressPolicy
AnyVersionObject = PolicyObject | ClusterEgressPolicyV1Alpha1
KINDS: dict[str, type[EgressPolicy] | type[ClusterEgressPolicy]] = {
    "EgressPolicy": EgressPolicy,
    "ClusterEgressPolicy": ClusterEgressPolicy,
}
MODELS: dict[tuple[str, str], type[AnyVersionObject]] = {
    (GROUP_VERSION, "EgressPolicy"): EgressPolicy,
    (GROUP_VERSION, "ClusterEgressPolicy"): ClusterEgressPolicy,
    (LEGACY_GROUP_VERSION, "EgressPolicy"): EgressPolicy,
    (LEGACY_GROUP_VERSION, "ClusterEgressPolicy"): ClusterEgressPolicyV1Alpha1,
}


def to_storage_version(policy: AnyVersionObject) -> PolicyObject:
    """v1alpha1 -> v1alpha2, the documented conversion (the same one the API server applies, field for field).

    An EgressPolicy is unchanged. A v1alpha1 ClusterEgressPolicy becomes `tier: Namespace`: it is evaluated with the
    namespace's EgressPolicies and selecting a pod allowlists it, exactly what it meant in v1alpha1.
    """
    if isinstance(policy, EgressPolicy):
        if policy.api_version == GROUP_VERSION:
            return policy
        return policy.model_copy(update={"api_version": GROUP_VERSION})
    if isinstance(policy, ClusterEgressPolicy):
        return policy
    spec = policy.spec
    return ClusterEgressPolicy(
        apiVersion="egressgateway.io/v1alpha2",
        kind="ClusterEgressPolicy",
        metadata=policy.metadata,
        spec=ClusterEgressPolicySpec(
            podSelector=spec.pod_selector,
            namespaceSelector=spec.namespace_selector,
            mode=spec.mode,
            tier=Tier.NAMESPACE,
            rules=[
                ClusterRule.model_validate(rule.model_dump(by_alias=True, exclude_unset=True)) for rule in spec.rules
            ],
        ),
    )
