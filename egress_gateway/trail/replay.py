"""`audit --replay`: re-decide recorded connections under a candidate policy set and report what would flip.

Every record the engine decided (its last engine decision, even when the connection then failed upstream or was
revoked; not those the resolver, rate limits or readiness ended before the engine spoke) is turned back into
`Facts` (identity with pod and namespace labels, target, port, SNI, Host header, pinned IP) and decided again by the
real `Engine` over policies loaded with the file source's own loader. Flips are grouped by namespace, destination,
before and after, with counts. Imports the policy core and `trail`; the caller loads the policies.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from egress_gateway.audit import fields
from egress_gateway.policy.decision import Decision, Facts, Identity, IPAddress
from egress_gateway.policy.engine import Engine
from egress_gateway.trail.read import FlowRecord, PolicyVerdict

ALLOW_TO_DENY = "allow -> deny"
DENY_TO_ALLOW = "deny -> allow"
NEWLY_WOULD_DENY = "allow -> would deny (Audit mode)"


def facts_from_record(record: FlowRecord) -> Facts:
    """The `Facts` the gateway presented to the engine for this record."""
    identity: Identity | None = None
    if record.namespace:
        attrs = record.attributes
        identity = Identity(
            namespace=record.namespace,
            pod=record.pod,
            labels=MappingProxyType(record.pod_labels),
            namespace_labels=MappingProxyType(record.namespace_labels),
            service_account=str(attrs[fields.SERVICE_ACCOUNT]) if fields.SERVICE_ACCOUNT in attrs else None,
        )
    destination: IPAddress | None = None
    if record.peer_address:
        try:
            destination = ipaddress.ip_address(record.peer_address)
        except ValueError:
            destination = None
    host_header = record.attributes.get(fields.HOST_HEADER)
    protocol = record.attributes.get(fields.PROTOCOL)
    return Facts(
        identity=identity,
        target=record.host or "",
        port=record.port or 0,
        sni=record.sni,
        host_header=str(host_header) if host_header is not None else None,
        destination_ip=destination,
        protocol=str(protocol) if protocol is not None else None,
    )


def _describe_recorded(verdict: PolicyVerdict) -> str:
    parts = [verdict.decision, verdict.reason]
    if verdict.policy:
        parts.append(verdict.policy + (f" rule {verdict.rule}" if verdict.rule else ""))
    return " ".join(parts)


def _describe(decision: Decision) -> str:
    parts = [decision.verdict, str(decision.reason.value)]
    if decision.policy is not None:
        parts.append(str(decision.policy) + (f" rule {decision.rule}" if decision.rule else ""))
    if decision.would_deny:
        parts.append(f"(would deny: {decision.audit_reason.value if decision.audit_reason else '?'})")
    return " ".join(parts)


@dataclass(frozen=True, slots=True)
class FlipKey:
    change: str
    namespace: str
    destination: str
    before: str
    after: str


@dataclass(slots=True)
class ReplayReport:
    replayed: int = 0
    unchanged: int = 0
    not_replayable: Counter[str] = field(default_factory=Counter)  # recorded reason -> count
    flips: Counter[FlipKey] = field(default_factory=Counter)

    def count(self, change: str) -> int:
        return sum(n for key, n in self.flips.items() if key.change == change)

    @property
    def blocks_allowed_traffic(self) -> bool:
        return self.count(ALLOW_TO_DENY) > 0

    def groups(self) -> list[tuple[FlipKey, int]]:
        order = {ALLOW_TO_DENY: 0, DENY_TO_ALLOW: 1, NEWLY_WOULD_DENY: 2}
        return sorted(
            self.flips.items(), key=lambda kv: (order[kv[0].change], -kv[1], kv[0].namespace, kv[0].destination)
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "replayed": self.replayed,
            "unchanged": self.unchanged,
            "allow_to_deny": self.count(ALLOW_TO_DENY),
            "deny_to_allow": self.count(DENY_TO_ALLOW),
            "allow_to_would_deny": self.count(NEWLY_WOULD_DENY),
            "not_replayable": dict(self.not_replayable),
            "flips": [
                {
                    "change": key.change,
                    "namespace": key.namespace,
                    "destination": key.destination,
                    "before": key.before,
                    "after": key.after,
                    "count": count,
                }
                for key, count in self.groups()
            ],
        }


def replay(records: Iterable[FlowRecord], engine: Engine, now: float | None = None) -> ReplayReport:
    report = ReplayReport()
    for record in records:
        verdict = record.policy_verdict
        if verdict is None:
            report.not_replayable[record.reason or "undecided"] += 1
            continue
        decision = engine.decide(facts_from_record(record), now=now)
        report.replayed += 1
        was_allowed = verdict.decision == "allow"
        if was_allowed and not decision.allowed:
            change = ALLOW_TO_DENY
        elif not was_allowed and decision.allowed:
            change = DENY_TO_ALLOW
        elif was_allowed and decision.would_deny and not verdict.would_deny:
            change = NEWLY_WOULD_DENY
        else:
            report.unchanged += 1
            continue
        key = FlipKey(
            change, record.namespace or "-", record.destination, _describe_recorded(verdict), _describe(decision)
        )
        report.flips[key] += 1
    return report
