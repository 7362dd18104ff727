"""`audit --replay`: re-decide recorded connections under a candidate policy set and report what would flip.

Every record the engine decided (its last engine decision, even when the connection then failed upstream or was
revoked; not those the resolver, rate limits or readiness ended before the engine spoke) is turned back into
`Facts` (identity with pod and namespace labels, target, port, SNI, Host header, pinned IP) and decided again by the
real `Engine` over policies loaded with the file source's own loader. Flips are grouped by direction (allow -> deny
closes access, deny -> allow opens it), namespace, pod, destination, before and after, with counts. A flip that an
`Expectation` (from the `--expect` gate file) names is expected; CI fails only on unexpected ones. Candidate rules
whose hosts/cidrs and ports cover no replayed connection of a client their policy selects are "untested by the
trail". Imports the policy core and `trail`; the caller loads the policies and the gate file.
"""

from __future__ import annotations

import fnmatch
import ipaddress
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from egress_gateway.audit import fields
from egress_gateway.policy.decision import Decision, Facts, Identity, IPAddress
from egress_gateway.policy.engine import CompiledRule, Engine
from egress_gateway.policy.errors import InvalidTarget
from egress_gateway.policy.near_miss import rule_matches_destination
from egress_gateway.policy.targets import normalize_host
from egress_gateway.trail.read import FlowRecord, PolicyVerdict

ALLOW_TO_DENY = "allow -> deny"
DENY_TO_ALLOW = "deny -> allow"
NEWLY_WOULD_DENY = "allow -> would deny (Audit mode)"
# --fail-on and --expect speak of directions: a change that closes access or one that opens it.
CLOSED, OPENED = "closed", "opened"
DIRECTION = {ALLOW_TO_DENY: CLOSED, DENY_TO_ALLOW: OPENED}
FAIL_ON = {CLOSED: (CLOSED,), OPENED: (OPENED,), "any": (CLOSED, OPENED)}
EXPECTATION_FIELDS = ("change", "namespace", "pod", "destination", "why")


class InvalidExpectation(ValueError):
    """An entry of the --expect gate file that cannot be understood."""


@dataclass(frozen=True, slots=True)
class Expectation:
    """One intended change: direction plus globs on namespace, pod and destination (host:port); None = any."""

    change: str
    namespace: str | None = None
    pod: str | None = None
    destination: str | None = None
    why: str | None = None

    @classmethod
    def parse(cls, index: int, entry: object) -> Expectation:
        if not isinstance(entry, Mapping):
            raise InvalidExpectation(f"entry {index}: expected a mapping with `change` and globs, got {entry!r}")
        unknown = sorted(set(entry) - set(EXPECTATION_FIELDS))
        if unknown:
            raise InvalidExpectation(
                f"entry {index}: unknown field(s) {', '.join(map(str, unknown))}; "
                f"allowed: {', '.join(EXPECTATION_FIELDS)}"
            )
        change = entry.get("change")
        if change not in (CLOSED, OPENED):
            raise InvalidExpectation(f"entry {index}: `change` must be {CLOSED} or {OPENED}, got {change!r}")
        values = {k: entry.get(k) for k in EXPECTATION_FIELDS[1:]}
        for key, value in values.items():
            if value is not None and not isinstance(value, str):
                raise InvalidExpectation(f"entry {index}: `{key}` must be a string (a glob), got {value!r}")
        return cls(change=str(change), **values)

    def covers(self, key: FlipKey) -> bool:
        return (
            DIRECTION.get(key.change) == self.change
            and _glob(self.namespace, key.namespace)
            and _glob(self.pod, key.pod)
            and _glob(self.destination, key.destination)
        )

    def describe(self) -> str:
        parts = [self.change]
        parts += [
            f"{k}={v}"
            for k, v in (("namespace", self.namespace), ("pod", self.pod), ("destination", self.destination))
            if v is not None
        ]
        return " ".join(parts) + (f" ({self.why})" if self.why else "")


def parse_expectations(document: object) -> list[Expectation]:
    """The gate file's content: a list of entries, or a mapping with an `expect` list."""
    if isinstance(document, Mapping):
        document = document.get("expect")
    if document is None:
        return []
    if not isinstance(document, list):
        raise InvalidExpectation("expected a list of changes (or a mapping with an `expect` list)")
    return [Expectation.parse(i, entry) for i, entry in enumerate(document)]


def _glob(pattern: str | None, value: str) -> bool:
    return pattern is None or fnmatch.fnmatchcase(value, pattern)


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
    pod: str
    destination: str
    before: str
    after: str


@dataclass(frozen=True, slots=True)
class UntestedRule:
    policy: str
    rule: str
    action: str
    covers: str  # the rule's hosts and cidrs, with ports

    def describe(self) -> str:
        return f"{self.policy} {self.action} rule {self.rule}: {self.covers}"


@dataclass(slots=True)
class ReplayReport:
    replayed: int = 0
    unchanged: int = 0
    not_replayable: Counter[str] = field(default_factory=Counter)  # recorded reason -> count
    flips: Counter[FlipKey] = field(default_factory=Counter)
    expectations: Sequence[Expectation] = ()
    untested: list[UntestedRule] = field(default_factory=list)

    def count(self, change: str) -> int:
        return sum(n for key, n in self.flips.items() if key.change == change)

    def expected(self, key: FlipKey) -> bool:
        return any(e.covers(key) for e in self.expectations)

    def unexpected(self, direction: str) -> int:
        return sum(
            n for key, n in self.flips.items() if DIRECTION.get(key.change) == direction and not self.expected(key)
        )

    def unmet(self) -> list[Expectation]:
        """Intended changes the replay did not show (the candidate may not do what the gate file says)."""
        return [e for e in self.expectations if not any(e.covers(key) for key in self.flips)]

    def fails(self, fail_on: str) -> bool:
        return any(self.unexpected(direction) for direction in FAIL_ON[fail_on])

    @property
    def blocks_allowed_traffic(self) -> bool:
        return self.count(ALLOW_TO_DENY) > 0

    def groups(self, change: str | None = None) -> list[tuple[FlipKey, int]]:
        order = {ALLOW_TO_DENY: 0, DENY_TO_ALLOW: 1, NEWLY_WOULD_DENY: 2}
        return sorted(
            ((k, n) for k, n in self.flips.items() if change is None or k.change == change),
            key=lambda kv: (order[kv[0].change], -kv[1], kv[0].namespace, kv[0].pod, kv[0].destination),
        )

    def as_dict(self, fail_on: str = "any") -> dict[str, Any]:
        return {
            "replayed": self.replayed,
            "unchanged": self.unchanged,
            "allow_to_deny": self.count(ALLOW_TO_DENY),
            "deny_to_allow": self.count(DENY_TO_ALLOW),
            "allow_to_would_deny": self.count(NEWLY_WOULD_DENY),
            "unexpected_closed": self.unexpected(CLOSED),
            "unexpected_opened": self.unexpected(OPENED),
            "fail_on": fail_on,
            "failed": self.fails(fail_on),
            "not_replayable": dict(self.not_replayable),
            "flips": [
                {
                    "change": key.change,
                    "namespace": key.namespace,
                    "pod": key.pod,
                    "destination": key.destination,
                    "before": key.before,
                    "after": key.after,
                    "count": count,
                    "expected": self.expected(key),
                }
                for key, count in self.groups()
            ],
            "unmet_expectations": [e.describe() for e in self.unmet()],
            "untested_rules": [
                {"policy": u.policy, "rule": u.rule, "action": u.action, "covers": u.covers} for u in self.untested
            ],
        }


def _covers(rule: CompiledRule) -> str:
    targets = [p.text for p in rule.host_patterns] + [str(n) for n in rule.networks]
    ports = ", ".join(str(r.low) if r.low == r.high else f"{r.low}-{r.high}" for r in rule.ports or ())
    return ", ".join(targets) + (f" on {ports}" if ports else " on any port")


class _Coverage:
    """Which candidate rules cover at least one replayed connection of a client their policy selects."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seen: set[tuple[int, str]] = set()  # (id of the compiled policy, rule name)
        self._done: set[tuple[object, ...]] = set()

    def add(self, facts: Facts) -> None:
        identity = facts.identity
        if identity is None:
            return
        try:
            target = normalize_host(facts.target)
        except InvalidTarget:
            return
        address = facts.destination_ip if facts.destination_ip is not None else target.ip
        policies = self.engine.policies.select(identity).policies
        key = (tuple(id(p) for p in policies), target.name, address, facts.port)
        if key in self._done:
            return
        self._done.add(key)
        for policy in policies:
            for rule in policy.rules:
                if rule_matches_destination(rule, target.name, address, facts.port):
                    self.seen.add((id(policy), rule.name))

    def untested(self) -> list[UntestedRule]:
        return [
            UntestedRule(str(policy.ref), rule.name, str(rule.action), _covers(rule))
            for policy in self.engine.policies.policies
            for rule in policy.rules
            if (id(policy), rule.name) not in self.seen
        ]


def replay(
    records: Iterable[FlowRecord],
    engine: Engine,
    now: float | None = None,
    expectations: Sequence[Expectation] = (),
) -> ReplayReport:
    report = ReplayReport(expectations=tuple(expectations))
    coverage = _Coverage(engine)
    for record in records:
        verdict = record.policy_verdict
        if verdict is None:
            report.not_replayable[record.reason or "undecided"] += 1
            continue
        facts = facts_from_record(record)
        decision = engine.decide(facts, now=now)
        coverage.add(facts)
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
            change,
            record.namespace or "-",
            record.pod or "-",
            record.destination,
            _describe_recorded(verdict),
            _describe(decision),
        )
        report.flips[key] += 1
    report.untested = coverage.untested()
    return report
