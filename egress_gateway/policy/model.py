"""The EgressPolicy API (group egressgateway.io, version v1alpha1) as pydantic models.

These models are the single source of truth: the CRDs (`crd.py`), the file loader, the Kubernetes watcher and
`lint` all go through them. Per-item checks (host grammar, CIDR syntax, ports) live here so that pydantic reports
them with their index; checks across fields live in `validation.py`. Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from egress_gateway.policy.errors import InvalidName
from egress_gateway.policy.hostnames import parse_host_pattern

API_GROUP = "egressgateway.io"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"
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


HostEntry = Annotated[str, AfterValidator(_check_host)]
CidrEntry = Annotated[str, AfterValidator(_check_cidr)]
PortEntry = Annotated[int | str, BeforeValidator(_check_port)]


class LabelSelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(_Model):
    key: str = Field(min_length=1)
    operator: LabelSelectorOperator
    values: list[str] | None = None


class LabelSelector(_Model):
    """Kubernetes LabelSelector. Empty (or omitted) selects everything."""

    match_labels: dict[str, str] | None = Field(default=None, alias="matchLabels")
    match_expressions: list[LabelSelectorRequirement] | None = Field(default=None, alias="matchExpressions")


class Rule(_Model):
    name: str = Field(max_length=63, pattern=RULE_NAME_PATTERN, description="Unique within the policy.")
    action: Action = Field(default=Action.ALLOW, description="Allow | Deny | Log (allow and flag the record).")
    hosts: list[HostEntry] | None = Field(
        default=None, description="Names: exact, '*' = one label, leading '**' = one or more labels."
    )
    cidrs: list[CidrEntry] | None = Field(default=None, description="Destination IP ranges.")
    except_: list[CidrEntry] | None = Field(
        default=None, alias="except", description="Carve-outs; each must lie inside one of cidrs."
    )
    ports: list[PortEntry] | None = Field(
        default=None, description="Ports (443) or ranges ('8000-8100'); omitted = any port."
    )
    expires: Annotated[datetime, AfterValidator(_check_expires)] | None = Field(
        default=None, description="After this instant the rule is ignored (RFC 3339 with time zone)."
    )
    protocols: list[Protocol] | None = Field(
        default=None,
        description="Allow/Log rules: what the tunnel may carry (TLS, HTTP, TCP = opaque); omitted = [TLS, HTTP].",
    )


class EgressPolicySpec(_Model):
    pod_selector: LabelSelector | None = Field(default=None, alias="podSelector")
    mode: Mode = Field(default=Mode.ENFORCE, description="Enforce | Audit (records would-deny, changes nothing).")
    rules: list[Rule] = Field(default_factory=list)


class ClusterEgressPolicySpec(EgressPolicySpec):
    namespace_selector: LabelSelector | None = Field(default=None, alias="namespaceSelector")


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
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    api_version: Literal["egressgateway.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["EgressPolicy"]
    metadata: ObjectMeta
    spec: EgressPolicySpec


class ClusterEgressPolicy(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)

    api_version: Literal["egressgateway.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["ClusterEgressPolicy"]
    metadata: ObjectMeta
    spec: ClusterEgressPolicySpec


PolicyObject = EgressPolicy | ClusterEgressPolicy
KINDS: dict[str, type[EgressPolicy] | type[ClusterEgressPolicy]] = {
    "EgressPolicy": EgressPolicy,
    "ClusterEgressPolicy": ClusterEgressPolicy,
}
